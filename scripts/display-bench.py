#!/usr/bin/env python3
"""Benchmarks vmapple's virtio-gpu + VNC server side by side with QEMU's.

    scripts/display-bench.py [--seconds N] [--vmapple PATH] [--append ARGS]

Boots the same guest (guest/out/linux: Debian's kernel with virtio_gpu and
the device initramfs, whose fbwrite draws through /dev/fb0) on vmapple
(--gpu virtio --display vnc=...) and on QEMU TCG (-M virt -device
virtio-gpu-pci -vnc), both at 1920x1080 with 2 vCPUs, and connects the
same VNC client (this script: RFB 3.8, ZRLE and Raw, one incremental
request in flight, the way vncviewer asks) to each while the guest

  - full: redraws the whole screen as fast as it can, and
  - small: moves a 64x64 square every 5 ms.

For each it reports frames per second received, the VMM's host CPU time
per frame (user + system of the whole process, guest CPU emulation
included) and bytes per frame, and the vmapple / QEMU ratios. Figures
never gate CI.

--append adds kernel arguments for both guests. `--append kpti=0` takes
out a cost of vmapple's software CPU rather than of the display path: it
lacks FEAT_E0PD, so Debian's kernel (with KASLR) isolates its page tables
and switches TTBR on every exception, and each switch flushes the
emulator's whole TLB; with the guest taking a write fault per page of the
framebuffer each frame (fbdev's deferred I/O), that was 40% of the vCPU
thread's time in one profile. QEMU's `max` CPU has E0PD, so its guest
runs without the isolation either way.
"""

import argparse
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINUX = ROOT / "guest" / "out" / "linux"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port():
    """A free port in QEMU's VNC range (5900 + display number)."""
    for port in range(5910, 6000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port in 5910..5999")


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def recv_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError("server closed the connection")
        buf += chunk
    return bytes(buf)


def measure(port, pid, seconds):
    """Connects a VNC client and counts updates for `seconds`."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    version = recv_exact(s, 12)
    s.sendall(b"RFB 003.008\n")
    if version >= b"RFB 003.007":
        n = recv_exact(s, 1)[0]
        types = recv_exact(s, n)
        assert 1 in types, f"no None security: {types}"
        s.sendall(b"\x01")
        assert struct.unpack(">I", recv_exact(s, 4))[0] == 0
    else:
        assert struct.unpack(">I", recv_exact(s, 4))[0] == 1
    s.sendall(b"\x01")
    w, h = struct.unpack(">HH", recv_exact(s, 4))
    recv_exact(s, 16)
    recv_exact(s, struct.unpack(">I", recv_exact(s, 4))[0])
    # ZRLE, Raw, DesktopSize.
    encs = [16, 0, -223]
    s.sendall(struct.pack(">BxH", 2, len(encs)) + b"".join(struct.pack(">i", e) for e in encs))

    def request(incremental):
        s.sendall(struct.pack(">BBHHHH", 3, incremental, 0, 0, w, h))

    def read_update():
        kind = recv_exact(s, 1)[0]
        if kind != 0:
            raise RuntimeError(f"message type {kind}")
        n = struct.unpack(">xH", recv_exact(s, 3))[0]
        size = 4
        pixels = 0
        for _ in range(n):
            x, y, rw, rh, enc = struct.unpack(">HHHHi", recv_exact(s, 12))
            size += 12
            if enc == 0:
                size += len(recv_exact(s, rw * rh * 4))
            elif enc == 16:
                ln = struct.unpack(">I", recv_exact(s, 4))[0]
                size += 4 + len(recv_exact(s, ln))
            elif enc == -223:
                pass
            else:
                raise RuntimeError(f"encoding {enc}")
            pixels += rw * rh
        return size, pixels

    request(0)
    read_update()
    frames = 0
    total = 0
    area = 0
    cpu0 = cpu_seconds(pid)
    start = time.monotonic()
    request(1)
    while time.monotonic() - start < seconds:
        size, pixels = read_update()
        if pixels:
            frames += 1
            total += size
            area += pixels
        request(1)
    elapsed = time.monotonic() - start
    cpu = cpu_seconds(pid) - cpu0
    s.close()
    return {
        "fps": frames / elapsed,
        "cpu_ms_per_frame": 1000 * cpu / max(frames, 1),
        "bytes_per_frame": total / max(frames, 1),
        "pixels_per_frame": area / max(frames, 1),
    }


def wait_for(proc, needle, limit=300):
    """Reads the console until `needle`; returns False on timeout."""
    deadline = time.monotonic() + limit
    seen = b""
    os.set_blocking(proc.stdout.fileno(), False)
    while time.monotonic() < deadline:
        chunk = proc.stdout.read() or b""
        seen += chunk
        if needle.encode() in seen:
            return True
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    sys.stderr.write(seen.decode(errors="replace")[-2000:])
    return False


def run(name, cmd, port, seconds):
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        if not wait_for(proc, "fbbench start"):
            raise RuntimeError(f"{name}: the guest did not start drawing")
        time.sleep(1)  # let the first frames settle
        return measure(port, proc.pid, seconds)
    finally:
        proc.kill()
        proc.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--vmapple", default=str(ROOT / "target" / "release" / "vmapple"))
    ap.add_argument("--append", default="", help="more kernel arguments for both guests")
    args = ap.parse_args()
    kernel = str(LINUX / "Image")
    initrd = str(LINUX / "initramfs-devices.cpio.gz")
    results = {}
    for mode in ["full", "small"]:
        append = f"console=ttyAMA0 quiet vt.global_cursor_default=0 vmapple.fb=none vmapple.fbbench={mode} {args.append}".strip()
        port = free_port()
        results[("vmapple", mode)] = run("vmapple", [
            args.vmapple, "run", "--kernel", kernel, "--initrd", initrd, "--append", append,
            "--cpus", "2", "--memory", "512M", "--net", "none", "--no-usb",
            "--gpu", "virtio", "--display-modes", "1920x1080@60",
            "--display", f"vnc=127.0.0.1:{port}",
        ], port, args.seconds)
        port = free_port()
        results[("qemu", mode)] = run("qemu", [
            "qemu-system-aarch64", "-M", "virt,gic-version=3", "-cpu", "max,pauth=off,sve=off",
            "-accel", "tcg", "-smp", "2", "-m", "512M", "-nographic", "-no-reboot",
            "-nodefaults", "-serial", "stdio",
            "-kernel", kernel, "-initrd", initrd, "-append", append,
            "-device", "virtio-gpu-pci,xres=1920,yres=1080",
            "-vnc", f"127.0.0.1:{port - 5900}",
        ], port, args.seconds)
    print(f"{'':14}{'vmapple':>14}{'qemu':>14}{'ratio':>10}")
    for mode in ["full", "small"]:
        v, q = results[("vmapple", mode)], results[("qemu", mode)]
        for key in ["fps", "cpu_ms_per_frame", "bytes_per_frame", "pixels_per_frame"]:
            ratio = v[key] / q[key] if q[key] else float("nan")
            print(f"{mode + ' ' + key:28}{v[key]:14.1f}{q[key]:14.1f}{ratio:10.2f}")


if __name__ == "__main__":
    main()
