#!/bin/sh
# Runs the test programs on QEMU's -M virt, to check the programs
# themselves against a known-good emulator (QEMU is a peer to compare
# with, never a dependency of vmapple's tests).
set -eu
cd "$(dirname "$0")"
out=${OUT:-../out/firmware}
make -s OUT="$out"
qemu() {
    timeout 120 qemu-system-aarch64 -M virt,gic-version=3,virtualization=off,secure=off \
        -cpu max -smp 2 -m 256M -nographic -no-reboot -bios "$1"
}
qemu "$out/fw-virt.bin" | tee "$out/fw-virt.log"
grep -q "ALL CHECKS PASSED" "$out/fw-virt.log"
qemu "$out/chaos-virt.bin" | tee "$out/chaos-virt.log"
grep -q "CHAOS DONE" "$out/chaos-virt.log"
echo "run-qemu.sh: both programs passed on QEMU virt"
