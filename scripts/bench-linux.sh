#!/usr/bin/env bash
# `esvm bench linux` with its inputs: Debian's kernel and esvm's initramfs
# (scripts/linux-assets.sh) and QEMU for the TCG comparison (qemu-system-x86 from the
# package manager, installed if missing). Extra arguments go to `esvm bench linux`, e.g.
# --repeat 5, or --sev-es --platform DIR (`esvm platform init --dir DIR`) to boot the kernel
# as an SEV-ES guest too. Prints the tables BENCHMARKS.md quotes.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
eval "$(./scripts/linux-assets.sh)"
if ! command -v qemu-system-x86_64 >/dev/null; then
    echo "bench-linux: installing qemu-system-x86 (the TCG comparator)" >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends qemu-system-x86 >/dev/null
fi
cargo build --release --locked -p esvm
exec target/release/esvm bench linux --kernel "$ESVM_LINUX_KERNEL" --initrd "$ESVM_LINUX_INITRD" "$@"
