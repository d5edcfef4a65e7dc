#!/bin/sh
# Takes the README's screenshot of a guest display through vmapple's VNC
# server: Debian's kernel on virtio-gpu (1024x768), its boot log on the
# framebuffer console, captured by a real VNC client (vncdotool).
#
#   scripts/readme-screenshot.sh [OUT.png]   (default docs/images/vnc-linux-console.png)
#
# Needs: a built vmapple (VMAPPLE=path, default target/debug/vmapple), the
# Linux guest (guest/out/linux) and vncdo (pip install vncdotool).
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/docs/images/vnc-linux-console.png}
vmapple=${VMAPPLE:-$root/target/debug/vmapple}
guest=$root/guest/out/linux
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
port=5957

"$vmapple" run --kernel "$guest/Image" --initrd "$guest/initramfs-devices.cpio.gz" \
    --append "console=tty0 console=ttyAMA0 vmapple.powerkey" \
    --cpus 2 --memory 512M --net none --gpu virtio --display-modes 1024x768@60 \
    --display "vnc=127.0.0.1:$port" --control "$work/control.sock" \
    > "$work/console.log" 2> "$work/vmm.log" &
vm=$!
i=0
until grep -q "waiting for the power button" "$work/console.log"; do
    i=$((i + 1))
    if [ $i -gt 600 ] || ! kill -0 "$vm" 2>/dev/null; then
        echo "readme-screenshot: the guest did not come up; its console:" >&2
        cat "$work/console.log" >&2
        kill "$vm" 2>/dev/null || true
        exit 1
    fi
    sleep 0.2
done
vncdo -s "127.0.0.1::$port" capture "$out"
"$vmapple" ctl "$work/control.sock" powerdown > /dev/null
wait "$vm" || true
echo "readme-screenshot: $out"
