#!/usr/bin/env bash
# Runs every fuzz target for SECONDS seconds each (default 30), seeded from the test
# fixtures. Needs cargo-fuzz (`cargo install cargo-fuzz`); on stable Rust it uses
# RUSTC_BOOTSTRAP=1 for the sanitizer flags cargo-fuzz passes. A crash stops the run
# with libFuzzer's report and the input under fuzz/artifacts/TARGET/.
#
#   scripts/fuzz.sh 600                      # ten minutes per target
#   TARGETS="verify receive" scripts/fuzz.sh  # some targets only
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-30}
command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz is missing: cargo install cargo-fuzz" >&2; exit 1; }
export RUSTC_BOOTSTRAP=1
# The receive target's spool goes in a folder of this run's own, removed at the end.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
export TMPDIR=$scratch

for target in ${TARGETS:-signature_header verify parse_events receive}; do
  corpus=fuzz/corpus/$target
  mkdir -p "$corpus"
  cp tests/fixtures/events/*.json tests/fixtures/drifted/*.json tests/fixtures/invalid/* "$corpus/" 2>/dev/null || true
  if [ "$target" = signature_header ] || [ "$target" = verify ]; then
    cut -d' ' -f3 tests/fixtures/hmac_sha1_vectors.txt | grep -v '^#' | head -20 |
      while read -r sig; do printf '%s' "$sig" > "$corpus/vector-$sig"; done
  fi
  echo "==> fuzzing $target for ${seconds}s"
  log=$(mktemp -p "$scratch")
  if ! cargo fuzz run "$target" "$corpus" -- -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=65536 \
      -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
    tail -60 "$log"
    exit 1
  fi
  grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1 || true
  grep -E '^stat::(number_of_executed_units|peak_rss_mb)' "$log"
  rm -f "$log"
done
echo "fuzzing passed"
