#!/usr/bin/env python3
"""Benchmarks vmapple's software CPU side by side with QEMU TCG.

    scripts/bench.py [--runs N] [--suite cpu|blk|all] [--msi on|off]

Runs, on vmapple and on qemu-system-aarch64 -M virt -accel tcg (both
multi-threaded and single-threaded TCG), in one go:
  - the bench firmware (guest/firmware/bench.c): ALU instructions/s,
    MMIO round trips/s, virtual-timer interrupt latency;
  - Debian's arm64 Linux (guest/out/linux) with 2 vCPUs: wall time from
    process start to the init's first line, and to power-off.
The blk suite boots the same Linux (the fio initramfs) on both with one
virtio-blk-pci disk (a 1 GiB raw image, host page cache on both sides)
and measures, inside the guest, 1 MiB sequential and 4 KiB queue-depth-1
direct reads and writes with dd (vmapple.blkbench), then with Debian's
fio (vmapple.fiobench; libaio, O_DIRECT, 10 s each): 4 KiB random read
and write at queue depth 1 and 32 with 2 jobs, 1 MiB sequential read and
write at depth 8. QEMU runs multi-threaded TCG with its disk on an
iothread (num-queues=2, aio=threads); vmapple runs with --msi as given
(default on, MSI-X per queue; off = INTx only).
Each figure is the median of N runs (default 3) and every ratio is
vmapple / QEMU, so > 1 means vmapple is faster for throughputs and
< 1 means vmapple is faster for times. Figures never gate CI.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "target" / "bench"
LINUX = ROOT / "guest" / "out" / "linux"
VMAPPLE = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release" / "vmapple"
QEMU_CPU = "max,pauth=off,sve=off"  # the features vmapple's CPU shows a guest


def qemu(accel, smp):
    return [
        "qemu-system-aarch64", "-M", "virt,gic-version=3,virtualization=off,secure=off",
        "-cpu", QEMU_CPU, "-accel", accel, "-smp", str(smp), "-m", "512M",
        "-nographic", "-no-reboot",
        # No NIC: QEMU's default one wants an option ROM (Debian's ipxe-qemu),
        # and vmapple's bench runs have none either.
        "-nic", "none",
    ]


def timed_lines(cmd, marks, timeout=300):
    """Runs cmd; returns {mark: seconds from start to the first line containing it}."""
    start = time.monotonic()
    found = {}
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, errors="replace")
    try:
        for line in proc.stdout:
            now = time.monotonic() - start
            for mark in marks:
                if mark in line and mark not in found:
                    found[mark] = now
            if now > timeout:
                break
    finally:
        proc.kill()
        proc.wait()
    found["exit"] = time.monotonic() - start
    return found


def bench_firmware(cmd, runs):
    values = {}
    for _ in range(runs):
        out = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=300).stdout
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "BENCH":
                values.setdefault(parts[1], []).append(int(parts[2]))
    return {k: statistics.median(v) for k, v in values.items()}


BLK_WORKLOADS = {
    # label in the guest: (metric, bytes moved, operations)
    "seq-read-1GiB": ("blk-seq-read-MiB/s", 1024 << 20, 1024),
    "seq-write-512MiB": ("blk-seq-write-MiB/s", 512 << 20, 512),
    "read-4KiB-x32768": ("blk-4k-read-IOPS", 32768 * 4096, 32768),
    "write-4KiB-x32768": ("blk-4k-write-IOPS", 32768 * 4096, 32768),
}


FIO_WORKLOADS = {
    # fio job name in the guest: (metric, the figure taken: read or write)
    "randread-4k-qd1": ("fio-4k-randread-qd1-IOPS", "read"),
    "randread-4k-qd32": ("fio-4k-randread-qd32-IOPS", "read"),
    "randwrite-4k-qd1": ("fio-4k-randwrite-qd1-IOPS", "write"),
    "randwrite-4k-qd32": ("fio-4k-randwrite-qd32-IOPS", "write"),
    "read-1m-qd8": ("fio-1m-read-qd8-MiB/s", "read"),
    "write-1m-qd8": ("fio-1m-write-qd8-MiB/s", "write"),
}


def fio_figure(parts, values):
    """Takes one guest line "fiobench NAME ERROR RIOPS RKIB/S WIOPS WKIB/S"."""
    if len(parts) != 8 or parts[2] not in FIO_WORKLOADS or parts[3] != "0":
        return
    metric, direction = FIO_WORKLOADS[parts[2]]
    iops, kib_s = (parts[4], parts[5]) if direction == "read" else (parts[6], parts[7])
    value = float(iops) if metric.endswith("IOPS") else float(kib_s) / 1024
    values.setdefault(metric, []).append(value)


def bench_blk(cmd, runs):
    """Runs the guest's blkbench and fiobench; returns {metric: median}."""
    values = {}
    for _ in range(runs):
        out = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             errors="replace", timeout=900).stdout
        for line in out.splitlines():
            parts = line.split()
            if parts[:2] == ["VMAPPLE-GUEST:", "fiobench"]:
                fio_figure(parts, values)
                continue
            if len(parts) == 5 and parts[:2] == ["VMAPPLE-GUEST:", "blkbench"]:
                metric, nbytes, ops = BLK_WORKLOADS[parts[2]]
                seconds = max(float(parts[4]) - float(parts[3]), 0.01)
                if metric.endswith("IOPS"):
                    values.setdefault(metric, []).append(ops / seconds)
                else:
                    values.setdefault(metric, []).append(nbytes / seconds / (1 << 20))
    return {k: statistics.median(v) for k, v in values.items()}


def blk_suite(runs, msi):
    image = OUT / "blk-bench.raw"
    OUT.mkdir(parents=True, exist_ok=True)
    with open(image, "wb") as f:
        chunk = bytes(range(256)) * 4096
        for _ in range(1024):
            f.write(chunk)
    append = "console=ttyAMA0 vmapple.blkbench=vda vmapple.fiobench=vda"
    initrd = str(LINUX / "initramfs-fio.cpio.zst")
    vmapple = [str(VMAPPLE), "run", "--memory", "512M", "--cpus", "2", "--serial", "stdio",
               "--no-usb", "--net", "none", "--kernel", str(LINUX / "Image"),
               "--initrd", initrd, "--append", append, "--disk", str(image), "--msi", msi]
    peer = qemu("tcg", 2) + [
        "-kernel", str(LINUX / "Image"), "-initrd", initrd, "-append", append,
        "-object", "iothread,id=io0",
        "-drive", f"file={image},format=raw,if=none,id=bench,aio=threads",
        "-device", "virtio-blk-pci,drive=bench,iothread=io0,num-queues=2"]
    results = {"vmapple": bench_blk(vmapple, runs), "qemu-mttcg": bench_blk(peer, runs)}
    image.unlink()
    print(f"{'metric':24} {'vmapple':>10} {'qemu-mttcg':>11} {'ratio':>7}")
    metrics = [m for m, _, _ in BLK_WORKLOADS.values()] + [m for m, _ in FIO_WORKLOADS.values()]
    for metric in metrics:
        v = results["vmapple"].get(metric, float("nan"))
        a = results["qemu-mttcg"].get(metric, float("nan"))
        print(f"{metric:24} {v:10.1f} {a:11.1f} {v / a:7.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--suite", choices=["cpu", "blk", "all"], default="all")
    parser.add_argument("--msi", choices=["on", "off"], default="on",
                        help="vmapple's --msi for the blk suite")
    args = parser.parse_args()

    subprocess.run(["cargo", "build", "--release", "-q", "-p", "vmapple"], cwd=ROOT, check=True)
    subprocess.run(["make", "-s", "-C", str(ROOT / "guest" / "firmware"), f"OUT={OUT}"], check=True)
    # Rebuilds the initramfs from guest/linux/init (downloads are cached).
    if subprocess.run([str(ROOT / "guest" / "linux" / "build.sh"), str(LINUX)]).returncode != 0:
        sys.exit("bench.py: could not prepare the Linux guest; run scripts/setup.sh first")

    if args.suite in ("blk", "all"):
        blk_suite(args.runs, args.msi)
    if args.suite == "blk":
        return

    peers = {
        "vmapple": lambda fw, smp: [str(VMAPPLE), "run", "--memory", "512M", "--cpus", str(smp),
                                    "--serial", "stdio"] + fw,
        "qemu-mttcg": lambda fw, smp: qemu("tcg", smp) + fw,
        "qemu-1thread": lambda fw, smp: qemu("tcg,thread=single", smp) + fw,
    }
    firmware = {
        "vmapple": ["--firmware", str(OUT / "bench-vmapple.bin")],
        "qemu-mttcg": ["-bios", str(OUT / "bench-virt.bin")],
        "qemu-1thread": ["-bios", str(OUT / "bench-virt.bin")],
    }
    linux_args = {
        "vmapple": ["--kernel", str(LINUX / "Image"), "--initrd", str(LINUX / "initramfs.cpio.gz"),
                    "--append", "console=ttyAMA0"],
    }
    linux_args["qemu-mttcg"] = linux_args["qemu-1thread"] = [
        "-kernel", str(LINUX / "Image"), "-initrd", str(LINUX / "initramfs.cpio.gz"),
        "-append", "console=ttyAMA0"]

    results = {}
    for name, build in peers.items():
        results[name] = bench_firmware(build(firmware[name], 1), args.runs)
        userspace, poweroff = [], []
        for _ in range(args.runs):
            t = timed_lines(build(linux_args[name], 2),
                            ["VMAPPLE-GUEST: userspace up", "VMAPPLE-GUEST: powering off"])
            userspace.append(t.get("VMAPPLE-GUEST: userspace up", float("nan")))
            poweroff.append(t["exit"])
        results[name]["linux-userspace-s"] = statistics.median(userspace)
        results[name]["linux-poweroff-s"] = statistics.median(poweroff)

    metrics = ["alu-minsns-per-s", "mmio-kreads-per-s", "irq-latency-avg-ns",
               "irq-latency-max-ns", "linux-userspace-s", "linux-poweroff-s"]
    print(f"{'metric':24} {'vmapple':>10} {'qemu-mttcg':>11} {'ratio':>7} {'qemu-1thr':>10} {'ratio':>7}")
    for m in metrics:
        v = results["vmapple"].get(m, float("nan"))
        a = results["qemu-mttcg"].get(m, float("nan"))
        b = results["qemu-1thread"].get(m, float("nan"))
        print(f"{m:24} {v:10.3f} {a:11.3f} {v / a:7.2f} {b:10.3f} {v / b:7.2f}")


if __name__ == "__main__":
    main()
