#!/usr/bin/env bash
# The whole test suite: formatting, lints, tests, docs and a bench build.
# Fails on the first failure. Run from anywhere: scripts/check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets --all-features -- -D warnings"
cargo clippy --all-targets --all-features -- -D warnings

step "cargo test --all-features"
cargo test --all-features

step "RUSTDOCFLAGS=-Dwarnings cargo doc --no-deps --all-features"
RUSTDOCFLAGS=-Dwarnings cargo doc --no-deps --all-features

step "cargo bench --no-run"
cargo bench --all-features --no-run

step "all checks passed"
