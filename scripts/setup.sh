#!/bin/sh
# Installs what building and testing vmapple needs on Debian, then builds
# the Linux guest (kernel + initramfs) the tests and the demo boot.
#
#   scripts/setup.sh            packages + guest
#   scripts/setup.sh --packages packages only
#
# Idempotent: packages already installed and guest files already built are
# not fetched again.
set -eu
cd "$(dirname "$0")/.."

packages="cmake pkg-config libclang-dev patch gcc g++ \
gcc-aarch64-linux-gnu binutils-aarch64-linux-gnu \
cpio gzip device-tree-compiler e2fsprogs passt qemu-system-arm qemu-utils strace"

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
