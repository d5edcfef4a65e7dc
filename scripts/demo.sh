#!/bin/sh
# Installs what is needed (scripts/setup.sh), builds the release binary and
# boots a demo guest on this terminal.
#
#   scripts/demo.sh [extra vmapple run options]
#
# Debian: Debian's arm64 Linux with a busybox shell, on two vCPUs of the
# software CPU. `poweroff -f` in the guest (or Ctrl-A x) ends it.
# macOS (Apple silicon): the binary is signed with the hypervisor
# entitlement and runs on Hypervisor.framework (--accel hvf). It boots the
# same Linux if VMAPPLE_GUEST_DIR names a directory guest/linux/build.sh
# made on a Debian machine; otherwise the test firmware (guest/firmware,
# built from source), which runs its checks on two vCPUs and powers off.
set -eu
cd "$(dirname "$0")/.."
# shellcheck source=scripts/host.sh
. scripts/host.sh
scripts/setup.sh
cargo build --release -p vmapple
vmapple=${CARGO_TARGET_DIR:-target}/release/vmapple

if [ "$host" = macos ]; then
    # Without the entitlement hv_vm_create fails (docs/macos.md).
    scripts/macos-sign.sh "$vmapple" >/dev/null
    # Unless the caller chose another accelerator.
    case " $* " in
    *" --accel"*) ;;
    *) set -- --accel hvf "$@" ;;
    esac
fi

guest=${VMAPPLE_GUEST_DIR:-guest/out/linux}
if [ -f "$guest/Image" ] && [ -f "$guest/initramfs.cpio.gz" ]; then
    exec "$vmapple" run \
        --kernel "$guest/Image" \
        --initrd "$guest/initramfs.cpio.gz" \
        --append "console=ttyAMA0 vmapple.demo quiet" \
        --cpus 2 --memory 1G "$@"
fi
if [ "$host" != macos ] || [ -n "${VMAPPLE_GUEST_DIR:-}" ]; then
    echo "demo.sh: no Image and initramfs.cpio.gz in $guest (guest/linux/build.sh makes them)" >&2
    exit 1
fi

echo "demo.sh: no Linux guest (VMAPPLE_GUEST_DIR is not set): booting the test firmware instead"
make -s -C guest/firmware OUT="$PWD/guest/out/firmware"
exec "$vmapple" run --firmware guest/out/firmware/fw-vmapple.bin \
    --cpus 2 --memory 256M "$@"
