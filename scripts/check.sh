#!/usr/bin/env bash
# The whole test suite: formatting, then lints and tests for every feature set,
# docs, and each benchmark run once.
# Fails on the first failure. Run from anywhere: scripts/check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# Each step's name and how long it took, printed at the end.
started=$(date +%s)
step_name=
step_started=$started
timings=()
end_step() {
  [ -z "$step_name" ] || timings+=("$(printf '%5d s  %s' "$(( $(date +%s) - step_started ))" "$step_name")")
}
step() {
  end_step
  step_name=$*
  step_started=$(date +%s)
  printf '\n==> %s\n' "$*"
}

# A clean build gains nothing from incremental compilation's caches, and they
# take gigabytes; nor from line tables in every test binary (a failure's message
# still names its file and line).
if [ "${CI:-}" = true ]; then
  export CARGO_INCREMENTAL=0 CARGO_PROFILE_DEV_DEBUG=0
fi

# What to stop on exit, in order; never failing (under `set -e` a failing trap
# would fail the run).
cleanups=()
cleanup() { for c in "${cleanups[@]}"; do "$c" || true; done; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# A throwaway Redis for the gate and stream tests: loopback, a free port, durable as
# production must be (AOF, fsynced before every reply), stopped on exit. Skipped when COMAPI_TEST_REDIS_URL is already set; without a
# redis-server binary the Redis tests say loudly that they were skipped (and fail
# under CI=true).
if [ -z "${COMAPI_TEST_REDIS_URL:-}" ] && command -v redis-server >/dev/null 2>&1; then
  redis_dir=$(mktemp -d)
  redis_port=$(free_port)
  redis-server --bind 127.0.0.1 --port "$redis_port" --save '' --appendonly yes --appendfsync always \
    --daemonize yes --pidfile "$redis_dir/redis.pid" --logfile "$redis_dir/redis.log" --dir "$redis_dir"
  # Waits for redis-server to exit before removing its folder (it writes its log on
  # the way out), and never fails: under `set -e` a failing trap would fail the run.
  stop_redis() {
    local pid
    pid=$(cat "$redis_dir/redis.pid" 2>/dev/null) || pid=
    if [ -n "$pid" ] && kill "$pid" 2>/dev/null; then
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -rf "$redis_dir" 2>/dev/null || true
  }
  cleanups+=(stop_redis)
  for _ in $(seq 50); do
    redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break
    sleep 0.1
  done
  export COMAPI_TEST_REDIS_URL="redis://127.0.0.1:$redis_port/"
  echo "redis-server for the tests on 127.0.0.1:$redis_port"
elif [ -z "${COMAPI_TEST_REDIS_URL:-}" ]; then
  echo "!!! no redis-server on PATH: the Redis tests will be SKIPPED (apt-get install redis-server)"
fi


# A throwaway RabbitMQ node for the RabbitMQ tests: Debian's rabbitmq-server without a
# service manager (its own HOME and cookie, free loopback ports, folders in a temp
# folder), stopped with its epmd on exit. Skipped when COMAPI_TEST_AMQP_URL is set;
# without rabbitmq-server the RabbitMQ tests say they were skipped (and fail under CI=true).
if [ -z "${COMAPI_TEST_AMQP_URL:-}" ] && [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
  # shellcheck source=scripts/rabbit-node.sh
  . scripts/rabbit-node.sh
  rabbit_node_start "$(mktemp -d)" management
  cleanups+=(rabbit_node_stop)
  export COMAPI_TEST_AMQP_URL=$RABBIT_URL
  export COMAPI_TEST_AMQP_MANAGEMENT_URL=$RABBIT_MANAGEMENT_URL
  echo "rabbitmq-server for the tests on $RABBIT_URL"
elif [ -z "${COMAPI_TEST_AMQP_URL:-}" ]; then
  echo "!!! no rabbitmq-server: the RabbitMQ tests will be SKIPPED (apt-get install rabbitmq-server)"
fi

# The tests' folders go in a temp folder of this run's own, which must be empty
# at the end: every test removes what it made, a failing one too.
test_tmp=$(mktemp -d)
export TMPDIR=$test_tmp

step "cargo fmt --check"
cargo fmt --all -- --check

# Every feature set a user can pick: none (the defaults: verifier, events, in-memory
# gate), each feature on its own, and all of them. Each is linted warning-free with
# its tests compiled (`--all-targets`). The tests run with none, the defaults and all
# of them: every test runs under --all-features, and a feature set of its own adds
# nothing but time; the receiver alone runs its unit tests, whose paths without a
# broker (the errors that name a missing feature) exist only there.
feature_sets=("--no-default-features" "" "--features receiver" "--features binaries"
  "--features redis" "--features rabbitmq" "--features actix" "--features axum" "--all-features")
tested=("--no-default-features" "" "--features receiver --lib" "--all-features")
# A test run: cargo-nextest where it is installed (each test in a process of its own,
# both cores busy across test binaries, and a hung test killed: .config/nextest.toml)
# and then the doc tests, which nextest does not run; plain `cargo test` elsewhere.
run_tests() {
  if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --no-fail-fast "$@"
    if [[ " $* " != *" --test "* && " $* " != *" --lib "* ]]; then cargo test --doc "$@"; fi
  else
    cargo test "$@"
  fi
}

# Every lint run also shows the manifest's own warnings, which -D warnings does not
# turn into errors: none is allowed (the reference receivers are examples/ files built
# as binaries, so examples are declared, not discovered, and no file is in two targets).
for features in "${feature_sets[@]}"; do
  step "cargo clippy --all-targets ${features:-(default features)} -- -D warnings"
  # shellcheck disable=SC2086 # the feature flags are separate words
  lints=$(cargo clippy --all-targets $features -- -D warnings 2>&1) || { echo "$lints"; exit 1; }
  if grep -q '^warning' <<<"$lints"; then echo "$lints"; exit 1; fi
  for run in "${tested[@]}"; do
    if [ "${run% --lib}" = "$features" ]; then
      step "tests: ${run:-(default features)}"
      # shellcheck disable=SC2086
      run_tests $run
    fi
  done
done

# The delivery tests again with one handler at a time: every guarantee holds at any
# concurrency (the binaries they start read the same variable).
step "COMAPI_CONCURRENCY=1, the delivery tests (--all-features)"
COMAPI_CONCURRENCY=1 run_tests --all-features --test worker --test stream --test spool \
  --test receivers --test scale_out --test keep_alive --test late --test shutdown --test clock \
  --test retries

for features in "--no-default-features" "--all-features"; do
  step "RUSTDOCFLAGS=-Dwarnings cargo doc --no-deps $features"
  RUSTDOCFLAGS=-Dwarnings cargo doc --no-deps $features
done

# The benchmarks build and run each case once (criterion's test mode), on the dev
# build the tests made, rather than a release build of 271 crates of their own;
# `cargo bench` builds them for real.
step "cargo test --benches --all-features (each benchmark once)"
cargo test --benches --all-features

step "scripts/readme.sh (the READMEs' snippets, built as shown in a new project)"
scripts/readme.sh

step "no folder left in the temp folder"
left=$(find "$test_tmp" -mindepth 1 -maxdepth 1 | head -20)
if [ -n "$left" ]; then
  echo "the tests left these behind:"; echo "$left"; exit 1
fi
rmdir "$test_tmp"

end_step
printf '\n==> time per step\n'
printf '%s\n' "${timings[@]}"
step "all checks passed in $(( $(date +%s) - started )) s"
