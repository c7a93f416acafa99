#!/usr/bin/env bash
# Runs every Ferrum test: pure unit/property tests, BPF_PROG_TEST_RUN datapath tests, CNI
# plugin tests and end-to-end lab tests (network namespaces only). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "the test suite needs root (network namespaces, BPF)" >&2; exit 1; }
scripts/install-deps.sh
# e2e tests run the binaries, so build them first.
cargo build --workspace --bins
cargo test --workspace --no-fail-fast -- --test-threads="${FERRUM_TEST_THREADS:-2}"
