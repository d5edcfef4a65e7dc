#!/usr/bin/env python3
"""Snapshot save and restore times of vmapple against QEMU TCG.

    scripts/bench-snapshot.py [--sizes 512M,1G,4G] [--vmapple PATH]

For each memory size, boots Debian's arm64 Linux (guest/out/linux, two
vCPUs, a shell loop printing "tick N" every 0.2 s) on vmapple (software
CPU) and on qemu-system-aarch64 -M virt -accel tcg, then:
  - save: vmapple `ctl VM save FILE --stop`; QEMU `stop` then
    `migrate "exec:cat > FILE"` on its monitor, until `info migrate` says
    completed. Wall time of the command.
  - restore: a new process with `--restore FILE` (vmapple) or
    `-incoming "exec:cat FILE"` (QEMU), timed from process start to the
    first guest instruction (vmapple prints when its state is back; for
    QEMU it is when its monitor reports the incoming migration done and
    takes `cont`, since the saved VM was stopped) and to the guest's next
    console line.
  - size: the snapshot file's allocated size (holes not counted) against
    the RAM size.
Every ratio is QEMU / vmapple (> 1: vmapple is faster or smaller).
Figures never gate CI.
"""

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINUX = ROOT / "guest" / "out" / "linux"
APPEND = "console=ttyAMA0 quiet vmapple.tick vmapple.powerkey"
QEMU_CPU = "max,pauth=off,sve=off"


class Console:
    """A process whose stdout is collected line by line with arrival times."""

    def __init__(self, argv):
        self.start = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.lines = []
        self.errors = []
        self.lock = threading.Lock()
        threading.Thread(target=self._read, args=(self.proc.stdout, self.lines),
                         daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, self.errors),
                         daemon=True).start()

    def _read(self, stream, into):
        for raw in stream:
            with self.lock:
                into.append((time.monotonic(), raw.decode(errors="replace").strip()))

    def wait_for(self, pattern, limit=600, after=0.0, stream="lines"):
        regex = re.compile(pattern)
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            with self.lock:
                for t, line in getattr(self, stream):
                    if t >= after and regex.search(line):
                        return t, line
            if self.proc.poll() is not None:
                break
            time.sleep(0.01)
        tail = "\n".join(l for _, l in (self.lines + self.errors)[-20:])
        sys.exit(f"bench-snapshot: never saw {pattern!r}; last output:\n{tail}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def size_arg(text):
    return int(text[:-1]) << (30 if text.endswith("G") else 20)


def allocated(path):
    return os.stat(path).st_blocks * 512


def vmapple(binary, mem, tmp):
    sock = tmp / "vm.sock"
    snap = tmp / "vm.snap"
    base = [str(binary), "run", "--kernel", str(LINUX / "Image"),
            "--initrd", str(LINUX / "initramfs-devices.cpio.gz"),
            "--append", APPEND, "--cpus", "2", "--memory", mem,
            "--serial", "stdio", "--no-usb", "--net", "none",
            "--accel", "tcg", "--control", str(sock)]
    vm = Console(base)
    vm.wait_for(r"tick 3\b")
    t0 = time.monotonic()
    subprocess.run([str(binary), "ctl", str(sock), "save", str(snap), "--stop"],
                   check=True, stdout=subprocess.DEVNULL)
    save = time.monotonic() - t0
    vm.proc.wait()
    vm = Console(base + ["--restore", str(snap)])
    _, line = vm.wait_for(r"restored machine state in", stream="errors")
    first_insn = float(re.search(r"in (\d+) ms", line).group(1)) / 1000
    t_line, _ = vm.wait_for(r"tick \d+")
    restore_line = t_line - vm.start
    subprocess.run([str(binary), "ctl", str(sock), "stop"],
                   stdout=subprocess.DEVNULL)
    vm.stop()
    size = allocated(snap)
    snap.unlink()
    return save, first_insn, restore_line, size


def monitor(path, command):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
        s.settimeout(600)
        s.recv(4096)  # banner
        s.sendall(command.encode() + b"\n")
        out = b""
        while not out.rstrip().endswith(b"(qemu)"):
            out += s.recv(65536)
        return out.decode(errors="replace")


def qemu(mem, tmp):
    mon = tmp / "qemu.mon"
    snap = tmp / "qemu.snap"
    base = ["qemu-system-aarch64",
            "-M", "virt,gic-version=3,virtualization=off,secure=off",
            "-cpu", QEMU_CPU, "-accel", "tcg", "-smp", "2", "-m", mem,
            "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
            "-kernel", str(LINUX / "Image"),
            "-initrd", str(LINUX / "initramfs-devices.cpio.gz"),
            "-append", APPEND,
            "-monitor", f"unix:{mon},server,nowait"]
    vm = Console(base)
    vm.wait_for(r"tick 3\b")
    t0 = time.monotonic()
    monitor(mon, "stop")
    monitor(mon, f'migrate "exec:cat > {snap}"')
    while "completed" not in monitor(mon, "info migrate"):
        time.sleep(0.01)
    save = time.monotonic() - t0
    vm.stop()
    vm = Console(base + ["-incoming", f"exec:cat {snap}"])
    # The source was stopped, and QEMU carries that run state across: the
    # destination waits, paused, once the stream is in; `cont` starts it.
    deadline = time.monotonic() + 600
    status = ""
    first_insn = None
    while "running" not in status:
        try:
            status = monitor(mon, "info status")
            if "VM status: paused" in status and "inmigrate" not in status:
                monitor(mon, "cont")
                first_insn = first_insn or time.monotonic() - vm.start
        except OSError:
            pass
        if time.monotonic() > deadline or vm.proc.poll() is not None:
            vm.stop()
            sys.exit(f"bench-snapshot: QEMU's incoming migration did not finish: {status!r}")
        time.sleep(0.005)
    t_line, _ = vm.wait_for(r"tick \d+")
    restore_line = t_line - vm.start
    vm.stop()
    size = allocated(snap)
    snap.unlink()
    return save, first_insn, restore_line, size


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="512M,1G,4G")
    ap.add_argument("--vmapple", default=os.environ.get(
        "VMAPPLE", ROOT / "target" / "release" / "vmapple"))
    args = ap.parse_args()
    binary = Path(args.vmapple)
    if not binary.exists():
        sys.exit(f"bench-snapshot: no {binary}: cargo build --release (or --vmapple PATH)")
    print(f"{'RAM':>5} {'':8} {'save s':>8} {'1st insn s':>11} {'1st line s':>11} {'file MiB':>9}")
    for mem in args.sizes.split(","):
        with tempfile.TemporaryDirectory(prefix="vmsb") as d:
            tmp = Path(d)
            ours = vmapple(binary, mem, tmp)
            theirs = qemu(mem, tmp)
        for name, r in (("vmapple", ours), ("qemu", theirs)):
            print(f"{mem:>5} {name:8} {r[0]:8.3f} {r[1]:11.3f} {r[2]:11.3f} {r[3] / 2**20:9.1f}")
        ratio = [t / o if o else float("inf") for t, o in zip(theirs, ours)]
        print(f"{mem:>5} {'ratio':8} {ratio[0]:8.1f}x {ratio[1]:10.1f}x {ratio[2]:10.1f}x {ratio[3]:8.1f}x"
              f"   (QEMU / vmapple; RAM {size_arg(mem) >> 20} MiB)")


if __name__ == "__main__":
    main()
