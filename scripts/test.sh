#!/bin/sh
# Runs vmapple's whole test suite: unit tests, device tests, and the guest
# tests that boot the aarch64 test firmware and Debian's arm64 Linux on
# the software CPU. Prepares what it needs first (scripts/setup.sh).
#
#   scripts/test.sh [extra cargo test arguments]
set -eu
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --workspace --all-targets
cargo test --workspace "$@"
