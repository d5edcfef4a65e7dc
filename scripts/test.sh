#!/bin/sh
# Runs vmapple's whole test suite: formatting and lint gates, unit tests,
# device tests, a type-check of the macOS-only code for aarch64-apple-darwin,
# and the guest tests that boot the aarch64 test firmware
# and Debian's arm64 Linux on the software CPU. Prepares what it needs
# first (scripts/setup.sh).
#
#   scripts/test.sh [extra cargo test arguments]
set -eu
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all -- --check
# `vmapple/hvf-double` adds `--accel hvf` against the behavioural double
# of Hypervisor.framework (crates/hvf-double): the guest tests then run
# through both accelerators.
cargo clippy --workspace --all-targets --features vmapple/hvf-double -- -D warnings
# The binary must also build without the GPL software CPU.
cargo clippy -p vmapple --no-default-features -- -D warnings
# The API documentation builds without warnings (broken links, bad HTML).
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps
# The macOS-only crates and modules, type-checked and linted for
# aarch64-apple-darwin (no SDK needed; adds the Rust target if missing).
scripts/check-macos.sh
cargo test --workspace --features vmapple/hvf-double "$@"
