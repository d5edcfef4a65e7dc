#!/bin/sh
# Signs a vmapple binary with the entitlements Hypervisor.framework needs
# (scripts/vmapple.entitlements). Run on macOS after every build: cargo
# does not sign, and an unsigned or unentitled binary gets HV_DENIED from
# hv_vm_create.
#
#   scripts/macos-sign.sh [BINARY] [IDENTITY]
#
# BINARY defaults to target/release/vmapple; IDENTITY to "-" (ad-hoc),
# enough to run locally. Give a Developer ID to distribute.
set -eu
cd "$(dirname "$0")/.."

if [ "$(uname -s)" != Darwin ]; then
    echo "macos-sign.sh: codesign exists only on macOS" >&2
    exit 1
fi

binary=${1:-${CARGO_TARGET_DIR:-target}/release/vmapple}
identity=${2:--}

if [ ! -f "$binary" ]; then
    echo "macos-sign.sh: no binary at $binary (cargo build --release first)" >&2
    exit 1
fi

# The hardened runtime is what notarisation asks of a Developer ID build;
# an ad-hoc local build does without it.
if [ "$identity" = - ]; then
    codesign --force --sign - \
        --entitlements scripts/vmapple.entitlements "$binary"
else
    codesign --force --sign "$identity" --options runtime \
        --entitlements scripts/vmapple.entitlements "$binary"
fi
codesign --display --entitlements - "$binary"
