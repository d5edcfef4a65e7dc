#!/bin/sh
# Installs what building and testing vmapple needs, then builds the Linux
# guest (kernel + initramfs) the tests and the demo boot.
#
#   scripts/setup.sh            packages + guest
#   scripts/setup.sh --packages packages only
#
# Debian: apt packages (through sudo when not root), then
# guest/linux/build.sh fetches Debian's arm64 kernel and busybox.
# macOS (Apple silicon only): Homebrew formulae. No guest is built there
# (build.sh needs Debian's apt); the tests and the demo boot one made on a
# Debian machine when VMAPPLE_GUEST_DIR names its directory.
#
# Idempotent: packages already installed and guest files already built are
# not fetched again.
set -eu
cd "$(dirname "$0")/.."
# shellcheck source=scripts/host.sh
. scripts/host.sh

if [ "$host" = macos ]; then
    if ! xcode-select -p >/dev/null 2>&1; then
        echo "setup: Xcode's command-line tools (linker, macOS SDK) are missing: run xcode-select --install, then this again" >&2
        exit 1
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        echo "setup: Rust is missing: install it with rustup (https://rustup.rs), then run this again" >&2
        exit 1
    fi
    missing=""
    # $1 = Homebrew formula, $2 = a command or file it provides.
    need() { command -v "$2" >/dev/null 2>&1 || missing="$missing $1"; }
    # Unicorn's build (the software CPU).
    need cmake cmake
    need pkg-config pkg-config
    # The test firmware: clang, llvm-objcopy and ld.lld (guest/firmware/Makefile).
    need llvm "$HOMEBREW_PREFIX/opt/llvm/bin/clang"
    need lld "$HOMEBREW_PREFIX/opt/lld/bin/ld.lld"
    # Disk images for the device tests.
    need e2fsprogs "$HOMEBREW_PREFIX/opt/e2fsprogs/sbin/mkfs.ext4"
    # scripts/test.sh lints the scripts.
    need shellcheck shellcheck
    if [ -n "$missing" ]; then
        echo "setup: brew install$missing"
        # shellcheck disable=SC2086 # a list of formulae
        brew install $missing
    fi
    # The display test's VNC client (crates/vmapple/tests/display.rs).
if ! command -v vncdo >/dev/null 2>&1; then
    echo "setup: installing vncdotool (pip)"
    python3 -m pip install -q vncdotool || echo "setup: pip install vncdotool failed; the display test will fail" >&2
fi
# scripts/test.sh lints the Python benchmark scripts.
if ! python3 -m pyflakes --version >/dev/null 2>&1; then
    echo "setup: installing pyflakes (pip)"
    python3 -m pip install -q pyflakes || echo "setup: pip install pyflakes failed; scripts/test.sh will stop at its lint" >&2
fi

[ "${1:-}" = "--packages" ] && exit 0
    if [ -z "${VMAPPLE_GUEST_DIR:-}" ]; then
        echo "setup: no Linux guest on macOS (guest/linux/build.sh needs Debian's apt): set VMAPPLE_GUEST_DIR to a directory it made on a Debian machine to boot one"
    elif [ ! -f "$VMAPPLE_GUEST_DIR/Image" ] || [ ! -f "$VMAPPLE_GUEST_DIR/initramfs.cpio.gz" ]; then
        echo "setup: VMAPPLE_GUEST_DIR=$VMAPPLE_GUEST_DIR has no Image and initramfs.cpio.gz: make it with guest/linux/build.sh DIR on a Debian machine" >&2
        exit 1
    fi
    exit 0
fi

packages="cmake pkg-config libclang-dev patch gcc g++ \
gcc-aarch64-linux-gnu binutils-aarch64-linux-gnu libc6-dev-arm64-cross \
cpio gzip zstd device-tree-compiler e2fsprogs passt qemu-system-arm qemu-utils strace \
docker-registry skopeo"
packages="$packages shellcheck"

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

missing=""
for p in $packages; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
arm64_enabled=$(dpkg --print-foreign-architectures | grep -cx arm64 || true)
if [ -n "$missing" ] || [ "$arm64_enabled" = 0 ]; then
    echo "setup: installing:$missing"
    [ "$arm64_enabled" != 0 ] || $sudo dpkg --add-architecture arm64
    $sudo apt-get update -q
    # shellcheck disable=SC2086
    [ -z "$missing" ] || DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends $missing
fi

[ "${1:-}" = "--packages" ] && exit 0

guest/linux/build.sh
