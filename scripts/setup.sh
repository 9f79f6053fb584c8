#!/usr/bin/env bash
# Installs the system packages esvm needs to build and test.
# Idempotent: packages already present are not touched, and apt is not run at
# all when nothing is missing.
set -euo pipefail

PACKAGES=(
    # OpenSSL headers for the virtee `sev` crate (dev-dependency of esvm-psp,
    # used by the cross-check tests against an independent SEV implementation).
    libssl-dev
    pkg-config
    # The Linux test guest (scripts/linux-assets.sh): the initramfs archive, the vmlinux
    # inside Debian's LZ4 bzImage, and the static workload (gcc with glibc's static libc).
    cpio
    lz4
    gcc
    libc6-dev
)

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg -s "$pkg" >/dev/null 2>&1; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends "${missing[@]}"
