#!/bin/sh
# Runs vmapple's whole test suite: formatting and lint gates (shellcheck
# and pyflakes included), unit tests, device tests and the guest tests that boot the
# aarch64 test firmware and Debian's arm64 Linux. Prepares what it needs
# first (scripts/setup.sh).
#
#   scripts/test.sh [extra cargo test arguments]
#
# Debian: the guest tests run through the software CPU and through the
# Hypervisor.framework accelerator against its behavioural double
# (crates/hvf-double), and the macOS-only code is type-checked for
# aarch64-apple-darwin.
# macOS (Apple silicon): no double (the real framework is linked); the
# test binary of vmapple is signed with the hypervisor entitlement, and the
# guest tests run through the software CPU and Hypervisor.framework. The
# Linux guest tests need VMAPPLE_GUEST_DIR (a directory guest/linux/build.sh
# made on a Debian machine) and are skipped, each with a line saying so,
# without it.
set -eu
cd "$(dirname "$0")/.."
# shellcheck source=scripts/host.sh
. scripts/host.sh
scripts/setup.sh
shellcheck -x scripts/*.sh guest/linux/*.sh guest/linux/init guest/firmware/*.sh .ci/run
python3 -m pyflakes scripts/*.py
cargo fmt --all -- --check

if [ "$host" = macos ]; then
    # hvf-double stands in for Hypervisor.framework on Linux and refuses to
    # build on macOS.
    cargo clippy --workspace --exclude hvf-double --all-targets -- -D warnings
    # The binary must also build without the GPL software CPU.
    cargo clippy -p vmapple --no-default-features -- -D warnings
    RUSTDOCFLAGS="-D warnings" cargo doc --workspace --exclude hvf-double --no-deps
    echo "test.sh: skipped scripts/check-macos.sh: the clippy runs above check the macOS code natively"
    # The guest tests run the vmapple binary cargo built, which needs the
    # hypervisor entitlement: build everything, sign it, then run (signing
    # does not make cargo rebuild it).
    cargo test --workspace --exclude hvf-double --no-run "$@"
    for binary in "${CARGO_TARGET_DIR:-target}"/debug/vmapple "${CARGO_TARGET_DIR:-target}"/release/vmapple; do
        [ ! -f "$binary" ] || scripts/macos-sign.sh "$binary" >/dev/null
    done
    exec cargo test --workspace --exclude hvf-double "$@"
fi

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
