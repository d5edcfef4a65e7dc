#!/bin/sh
# Fetches Debian's arm64 kernel and busybox-static:arm64 and builds the
# initramfs vmapple's Linux guest tests and demo boot.
#
#   guest/linux/build.sh [OUT_DIR]       (default: guest/out/linux)
#
# Produces OUT_DIR/Image (the uncompressed kernel), OUT_DIR/initramfs.cpio.gz
# and OUT_DIR/modules/ (the kernel's modules, for tests that need drivers
# which are not built in). Needs: apt-get (with the arm64 architecture
# added: dpkg --add-architecture arm64 && apt-get update), dpkg-deb, cpio,
# gzip. Downloads are cached in OUT_DIR/debs; a rerun rebuilds only the
# initramfs.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../out/linux}
mkdir -p "$out/debs"
out=$(cd "$out" && pwd)

need() { command -v "$1" >/dev/null 2>&1 || { echo "build.sh: '$1' is missing; install $2" >&2; exit 1; }; }
need apt-get apt
need dpkg-deb dpkg
need cpio cpio
need gzip gzip

if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    echo "build.sh: the arm64 architecture is not enabled; run: dpkg --add-architecture arm64 && apt-get update" >&2
    exit 1
fi

# The generic flavour: PL011, GICv3, the arch timer and PSCI are built in;
# virtio, XHCI and HID come as modules for the tests that need them.
kernel_pkg=$(apt-cache depends linux-image-arm64:arm64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9].*-arm64\):arm64$/\1/p' | head -n1)
[ -n "$kernel_pkg" ] || { echo "build.sh: cannot resolve linux-image-arm64:arm64 (apt-get update?)" >&2; exit 1; }

# Prints the first of its arguments (a glob's sorted expansion) if it
# exists; fails if the glob matched nothing.
first() { [ -e "$1" ] && echo "$1"; }

fetch() {
    # $1 = package:arch; downloads into debs/ unless already there.
    name=${1%%:*}
    if ! first "$out/debs/${name}_"*.deb >/dev/null; then
        echo "build.sh: downloading $1" >&2
        (cd "$out/debs" && apt-get -q -o APT::Sandbox::User=root download "$1" >/dev/null)
    fi
    first "$out/debs/${name}_"*.deb || { echo "build.sh: apt-get download $1 left no .deb" >&2; exit 1; }
}

kernel_deb=$(fetch "$kernel_pkg:arm64")
busybox_deb=$(fetch busybox-static:arm64)

if [ ! -f "$out/Image" ] || [ -n "$(find "$kernel_deb" -newer "$out/Image")" ]; then
    rm -rf "$out/kernel-root" "$out/modules"
    dpkg-deb -x "$kernel_deb" "$out/kernel-root"
    vmlinuz=$(first "$out/kernel-root/boot/vmlinuz-"*) || { echo "build.sh: no vmlinuz in $kernel_deb" >&2; exit 1; }
    # Debian ships a raw Image (some releases a gzip-compressed one):
    # vmapple reads either form, QEMU (for benchmark comparisons) wants it raw.
    if gzip -t "$vmlinuz" 2>/dev/null; then
        gzip -dc "$vmlinuz" > "$out/Image.tmp"
    else
        cp "$vmlinuz" "$out/Image.tmp"
    fi
    mv "$out/Image.tmp" "$out/Image"
    cp "$out/kernel-root/boot/config-"* "$out/config"
    mv "$out/kernel-root/lib/modules" "$out/modules"
    rm -rf "$out/kernel-root"
fi

rm -rf "$out/busybox-root"
dpkg-deb -x "$busybox_deb" "$out/busybox-root"
kver=$(first "$out/modules/"*) || { echo "build.sh: no modules in $out/modules" >&2; exit 1; }
kver=$(basename "$kver")

# Prints the module files $@ need, dependencies first, each once. The
# package has no modules.dep (depmod makes it at install time), so the
# dependencies come from each module's own modinfo "depends=" string.
resolve_modules() {
    seen=""
    visit() {
        # Module names use '_' where some file names have '-'.
        pattern=$(echo "$1" | sed 's/[-_]/[-_]/g')
        f=$(find "$out/modules/$kver" -name "$pattern.ko*" | head -n1)
        [ -n "$f" ] || { echo "build.sh: module $1 not found in $kver" >&2; exit 1; }
        rel=${f#"$out/modules/$kver/"}
        case " $seen " in *" $rel "*) return ;; esac
        seen="$seen $rel"
        deps=$(tr '\0' '\n' < "$f" | sed -n 's/^depends=//p' | head -n1 | tr ',' ' ')
        # POSIX sh has no local variables but each call has its own
        # positional parameters: the dependencies, then this module last.
        # shellcheck disable=SC2086 # deps is a list of words
        set -- $deps "$rel"
        while [ $# -gt 1 ]; do
            visit "$1"
            shift
        done
        echo "$1"
    }
    for m in "$@"; do visit "$m"; done
}

# $1 = output file, the rest = modules to include (init loads them in
# order, dependencies first).
make_initramfs() {
    target=$1; shift
    root="$out/initramfs-root"
    rm -rf "$root"
    mkdir -p "$root/bin" "$root/dev" "$root/proc" "$root/sys" "$root/tmp" "$root/mnt" "$root/lib/modules"
    cp "$out/busybox-root/bin/busybox" "$root/bin/busybox"
    cp "$here/init" "$root/init"
    chmod 755 "$root/init" "$root/bin/busybox"
    for prog in ${progs:-}; do
        [ -f "$out/progs/$prog" ] && cp "$out/progs/$prog" "$root/bin/"
    done
    # $tree: a directory laid over the root (Debian programs with their
    # libraries).
    [ -z "${tree:-}" ] || cp -a "$tree/." "$root/"
    for rel in $(resolve_modules "$@" | awk '!seen[$0]++'); do
        cp "$out/modules/$kver/$rel" "$root/lib/modules/"
        basename "$rel" >> "$root/lib/modules/load-order"
    done
    # $compress: the compressor (gzip by default; the kernel reads zstd too).
    (cd "$root" && find . -print | LC_ALL=C sort | cpio -o -H newc --quiet --reproducible) | ${compress:-gzip -9n} > "$target"
    rm -rf "$root"
    echo "build.sh: initramfs -> $target"
}

# Guest test programs: static aarch64 C, put in /bin of the initramfs
# that names them in $progs.
mkdir -p "$out/progs"
need aarch64-linux-gnu-gcc "gcc-aarch64-linux-gnu and libc6-dev-arm64-cross"
# Display tests: fbwrite draws into /dev/fb0 through a mapping;
# drmcursor sets a hardware cursor through DRM.
device_progs="fbwrite drmcursor"
# virtio-fs and virtio-vsock tests (shares.rs).
share_progs="vmapple-fs vmapple-vsock"
# Snapshot tests (snapshot_process.rs): a counting process with state in
# a tmpfs and an open file on a disk.
snapshot_progs="vmapple-counter"
for prog in $device_progs $share_progs $snapshot_progs; do
    [ -f "$here/$prog.c" ] || continue
    aarch64-linux-gnu-gcc -static -O2 -Wall -o "$out/progs/$prog" "$here/$prog.c"
done

# The plain guest (boot, SMP, timer, console); modules a caller asks for
# with VMAPPLE_GUEST_MODULES="..." are added.
# shellcheck disable=SC2086
make_initramfs "$out/initramfs.cpio.gz" ${VMAPPLE_GUEST_MODULES:-}
# The device guest: drivers for the PCI devices (virtio-blk/net, XHCI and
# HID), ext4, evdev and the GPIO power key, all modules in Debian's kernel.
# Display tests: virtio-gpu (DRM with its fbdev emulation, /dev/fb0).
progs="$device_progs $snapshot_progs" make_initramfs "$out/initramfs-devices.cpio.gz" \
    virtio_pci virtio_blk virtio_net crc32c_generic ext4 xhci-pci usbhid hid-generic evdev gpio_keys \
    virtio_gpu
# The sharing guest: virtio-fs and virtio-vsock (and 9p, for
# scripts/bench-share.sh's comparison with QEMU).
progs=$share_progs make_initramfs "$out/initramfs-share.cpio.gz" \
    virtio_pci virtiofs vmw_vsock_virtio_transport 9pnet_virtio 9p

# The fio guest (crates/vmapple/tests/fio.rs, scripts/bench.py --suite
# blk): Debian's fio:arm64 with every shared library it loads. The library
# packages come from fio's dependencies (lib* only, recursively); the files
# taken from them follow each ELF file's DT_NEEDED, searched in its RUNPATH
# and the multiarch directories, as the dynamic loader does.
fio_tree="$out/fio-root"
fio_pkgs="$out/fio-pkgs"
rm -rf "$fio_tree" "$fio_pkgs"
mkdir -p "$fio_tree" "$fio_pkgs"
# Breadth first, one apt-cache call per level of the dependency tree.
pending=fio
listed=""
while [ -n "$pending" ]; do
    fresh=""
    for pkg in $pending; do
        case " $listed " in *" $pkg "*) ;; *) fresh="$fresh $pkg:arm64" listed="$listed $pkg" ;; esac
    done
    [ -n "$fresh" ] || break
    # shellcheck disable=SC2086 # a list of package names
    pending=$(apt-cache depends $fresh 2>/dev/null |
        sed -n 's/^ *|\{0,1\}\(Pre\)\{0,1\}Depends: \([^<][^ ]*\)$/\2/p' | sed 's/:arm64$//; s/:any$//' |
        grep -E '^(lib|zlib1g$)' | sort -u)
done
for pkg in $listed; do
    dpkg-deb -x "$(fetch "$pkg:arm64")" "$fio_pkgs"
done
elf_needed() { aarch64-linux-gnu-readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]$/\1/p'; }
elf_runpath() { aarch64-linux-gnu-readelf -d "$1" | sed -n 's/.*(RUNPATH).*\[\(.*\)\]$/\1/p' | tr ':' ' '; }
pending=/usr/bin/fio
copied=""
while [ -n "$pending" ]; do
    # shellcheck disable=SC2086 # a list of paths
    set -- $pending
    file=$1
    shift
    pending="$*"
    case " $copied " in *" $file "*) continue ;; esac
    copied="$copied $file"
    mkdir -p "$fio_tree$(dirname "$file")"
    cp -L "$fio_pkgs$file" "$fio_tree$file"
    interp=$(aarch64-linux-gnu-readelf -l "$fio_pkgs$file" | sed -n 's/.*Requesting program interpreter: \(.*\)\]$/\1/p')
    [ -z "$interp" ] || pending="$pending $interp"
    search="$(elf_runpath "$fio_pkgs$file") /lib/aarch64-linux-gnu /usr/lib/aarch64-linux-gnu"
    for lib in $(elf_needed "$fio_pkgs$file"); do
        found=""
        for dir in $search; do
            if [ -e "$fio_pkgs$dir/$lib" ]; then
                found="$dir/$lib"
                break
            fi
        done
        [ -n "$found" ] || { echo "build.sh: $lib (needed by $file) is in none of fio's library packages" >&2; exit 1; }
        pending="$pending $found"
    done
done
rm -rf "$fio_pkgs"
# zstd: the libraries are 80 MiB; it packs them as small as gzip -9, in
# a fraction of the time, and the guest unpacks them faster.
need zstd zstd
tree=$fio_tree compress="zstd -q -T0 -6" make_initramfs "$out/initramfs-fio.cpio.zst" virtio_pci virtio_blk
rm -rf "$fio_tree"
rm -rf "$out/busybox-root"
echo "build.sh: kernel $kernel_pkg -> $out/Image"
