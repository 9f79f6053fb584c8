#!/usr/bin/env bash
# Fetches and builds the Linux test guest: Debian's cloud kernel (linux-image-cloud-amd64,
# Linux 6.1, LZ4 bzImage) and an initramfs of static busybox (busybox-static), esvm's init
# (guests/linux/init) and the userland workloads (guests/linux/workload.c and the
# multithreaded guests/linux/mtload.c, static C built with gcc). Nothing is committed: the packages come from the system package manager (the
# only network there is) and everything lands in a cache directory.
#
# Usage: scripts/linux-assets.sh [--print]
#   --print   only print where the assets are (KEY=path lines), building what is missing
#
# Cache: $ESVM_CACHE (default ${XDG_CACHE_HOME:-$HOME/.cache}/esvm)/linux. Delete it to
# fetch again. The kernel and busybox are fetched once; the initramfs is rebuilt whenever
# init, workload.c, mtload.c or this script is newer than it.
#
# Prints, on stdout, lines a caller can `eval` or parse:
#   ESVM_LINUX_KERNEL=<bzImage>  ESVM_LINUX_VMLINUX=<the ELF inside it>
#   ESVM_LINUX_INITRD=<cpio>     ESVM_LINUX_WORKLOAD=<static ELF>
#   ESVM_LINUX_MTLOAD=<static ELF>
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${ESVM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/esvm}/linux
mkdir -p "$cache"
log() { echo "linux-assets: $*" >&2; }

sudo_if_needed() {
    if [ "$(id -u)" -ne 0 ]; then sudo "$@"; else "$@"; fi
}

# Download a Debian package into $cache/debs and unpack it into $cache/root.
fetch_deb() {
    local pkg=$1
    mkdir -p "$cache/debs" "$cache/root"
    if ! ls "$cache/debs/${pkg}_"*.deb >/dev/null 2>&1; then
        log "downloading $pkg with apt-get"
        # apt-get download writes into the current directory; as root it warns that the
        # _apt user cannot write there, which is harmless.
        if ! (cd "$cache/debs" && apt-get download "$pkg" >/dev/null 2>"$cache/apt.err"); then
            log "apt-get download $pkg failed; refreshing the package lists once"
            sudo_if_needed apt-get update >/dev/null
            (cd "$cache/debs" && apt-get download "$pkg" >/dev/null 2>"$cache/apt.err") || {
                cat "$cache/apt.err" >&2
                log "cannot download $pkg: is a Debian mirror reachable?"
                exit 1
            }
        fi
    fi
    dpkg-deb -x "$(ls "$cache/debs/${pkg}_"*.deb | head -n 1)" "$cache/root"
}

kernel=$cache/vmlinuz
if [ ! -s "$kernel" ]; then
    # linux-image-cloud-amd64 is a metapackage: the image is the package it depends on.
    image_pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
    if [ -z "$image_pkg" ]; then
        sudo_if_needed apt-get update >/dev/null
        image_pkg=$(apt-cache depends linux-image-cloud-amd64 |
            awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
    fi
    [ -n "$image_pkg" ] || { log "linux-image-cloud-amd64 is not known to apt"; exit 1; }
    fetch_deb "$image_pkg"
    cp "$(ls "$cache"/root/boot/vmlinuz-* | head -n 1)" "$kernel.tmp"
    cp "$(ls "$cache"/root/boot/config-* | head -n 1)" "$cache/config"
    mv "$kernel.tmp" "$kernel"
    log "kernel: $image_pkg"
fi

# The vmlinux ELF inside the bzImage (for the ELF boot path): Debian's payload is LZ4
# (legacy frame, magic 02 21 4c 18); lz4 stops at the end of the frame.
vmlinux=$cache/vmlinux
if [ ! -s "$vmlinux" ] || [ "$kernel" -nt "$vmlinux" ]; then
    command -v lz4 >/dev/null || {
        log "installing lz4"
        sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends lz4 >/dev/null
    }
    offset=$(grep -obUaP '\x02\x21\x4c\x18' "$kernel" | head -n 1 | cut -d: -f1)
    [ -n "$offset" ] || { log "no LZ4 payload found in $kernel"; exit 1; }
    tail -c +$((offset + 1)) "$kernel" | lz4 -dc >"$vmlinux.tmp" 2>/dev/null || true
    head -c 4 "$vmlinux.tmp" | grep -q ELF || { log "extracting vmlinux from $kernel failed"; exit 1; }
    mv "$vmlinux.tmp" "$vmlinux"
fi

busybox=$cache/busybox
if [ ! -x "$busybox" ]; then
    fetch_deb busybox-static
    cp "$cache/root/bin/busybox" "$busybox.tmp"
    mv "$busybox.tmp" "$busybox"
fi

workload=$cache/workload
src=$repo/guests/linux/workload.c
if [ ! -x "$workload" ] || [ "$src" -nt "$workload" ]; then
    command -v gcc >/dev/null || { log "gcc is needed to build the workload"; exit 1; }
    gcc -static -O2 -Wall -Wextra -o "$workload.tmp" "$src" -lm
    mv "$workload.tmp" "$workload"
fi

# -mcx16: its 16-byte compare-exchange is an inline LOCK CMPXCHG16B.
mtload=$cache/mtload
src=$repo/guests/linux/mtload.c
if [ ! -x "$mtload" ] || [ "$src" -nt "$mtload" ]; then
    command -v gcc >/dev/null || { log "gcc is needed to build the workload"; exit 1; }
    gcc -static -O2 -Wall -Wextra -mcx16 -pthread -o "$mtload.tmp" "$src"
    mv "$mtload.tmp" "$mtload"
fi

initrd=$cache/initramfs.cpio
init=$repo/guests/linux/init
if [ ! -s "$initrd" ] || [ "$init" -nt "$initrd" ] || [ "$workload" -nt "$initrd" ] ||
    [ "$mtload" -nt "$initrd" ] || [ "$busybox" -nt "$initrd" ] || [ "$0" -nt "$initrd" ]; then
    command -v cpio >/dev/null || {
        log "installing cpio"
        sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends cpio >/dev/null
    }
    stage=$(mktemp -d)
    trap 'rm -rf "$stage"' EXIT
    mkdir -p "$stage"/{bin,dev,proc,sys,tmp}
    cp "$busybox" "$stage/bin/busybox"
    cp "$workload" "$stage/bin/workload"
    cp "$mtload" "$stage/bin/mtload"
    cp "$init" "$stage/init"
    chmod 0755 "$stage/init" "$stage/bin/busybox" "$stage/bin/workload" "$stage/bin/mtload"
    # Uncompressed newc: the guest spends no instructions inflating it. Fixed timestamps
    # (the epoch) and owners so the same inputs give the same bytes on every build and
    # machine: the SEV-ES launch digest covers them, and the kernel's unpacking of them is
    # part of every boot's instruction count.
    find "$stage" -exec touch -h -d @0 {} +
    (cd "$stage" && find . -print0 | LC_ALL=C sort -z |
        cpio --null -o -H newc --owner=0:0 --reproducible 2>/dev/null) >"$initrd.tmp"
    mv "$initrd.tmp" "$initrd"
fi

echo "ESVM_LINUX_KERNEL=$kernel"
echo "ESVM_LINUX_VMLINUX=$vmlinux"
echo "ESVM_LINUX_INITRD=$initrd"
echo "ESVM_LINUX_WORKLOAD=$workload"
echo "ESVM_LINUX_MTLOAD=$mtload"
