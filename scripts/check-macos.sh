#!/bin/sh
# Type-checks and lints the macOS-only code for macOS/arm64 from any host:
# the Hypervisor.framework accelerator, the ParavirtualizedGraphics glue,
# the machine, virtio (vmnet backend), block (F_PUNCHHOLE) and the vmapple
# binary (which picks the display backend) without the software CPU.
# Needs no macOS SDK: nothing is linked and none of these crates (or their
# dependencies) has a build script that compiles C, so only
# `cargo check`/`clippy` run. The default `tcg` feature is left out because
# Unicorn's build script needs a C compiler and the SDK.
set -eu

TARGET=aarch64-apple-darwin
cd "$(dirname "$0")/.."

if ! rustup target list --installed | grep -qx "$TARGET"; then
    rustup target add "$TARGET"
fi

for pkg in accel-hvf apple-gfx-macos block virtio machine; do
    cargo check --target "$TARGET" -p "$pkg" --all-targets
    cargo clippy --target "$TARGET" -p "$pkg" --all-targets -- -D warnings
done
cargo check --target "$TARGET" -p vmapple --no-default-features --all-targets
cargo clippy --target "$TARGET" -p vmapple --no-default-features --all-targets -- -D warnings
echo "skipped: -p vmapple with the default tcg feature (Unicorn's C build needs the macOS SDK)"
