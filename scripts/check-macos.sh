#!/bin/sh
# Type-checks and lints the Hypervisor.framework accelerator for
# macOS/arm64 from any host. Needs no macOS SDK: nothing is linked and the
# crate has no build script, so only `cargo check`/`clippy` run.
set -eu

TARGET=aarch64-apple-darwin
cd "$(dirname "$0")/.."

if ! rustup target list --installed | grep -qx "$TARGET"; then
    rustup target add "$TARGET"
fi

cargo check --target "$TARGET" -p accel-hvf --all-targets
cargo clippy --target "$TARGET" -p accel-hvf --all-targets -- -D warnings
