#!/bin/sh
# Installs what is needed and boots the bundled demo guest: Debian's arm64
# Linux with a busybox shell, on two vCPUs of the software CPU, on this
# terminal. `poweroff -f` in the guest (or Ctrl-A x) ends it.
set -eu
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p vmapple
exec target/release/vmapple run \
    --kernel guest/out/linux/Image \
    --initrd guest/out/linux/initramfs.cpio.gz \
    --append "console=ttyAMA0 vmapple.demo quiet" \
    --cpus 2 --memory 1G "$@"
