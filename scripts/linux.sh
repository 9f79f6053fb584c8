#!/usr/bin/env bash
# Boots Debian's Linux kernel with esvm's busybox initramfs on the software vCPU, to a shell
# on this terminal (Ctrl-A x quits, Ctrl-A h helps; `poweroff -f` or `reboot -f` in the guest
# end the VM). Fetches the kernel and busybox with apt on first use (scripts/linux-assets.sh).
# Extra arguments go to `esvm run`, e.g.
#   scripts/linux.sh --cmdline "console=ttyS0 reboot=k panic=-1 cryptomgr.notests esvm.run=workload"
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
eval "$(./scripts/linux-assets.sh)"
cargo build --release --locked -p esvm
exec target/release/esvm run --kernel "$ESVM_LINUX_KERNEL" --initrd "$ESVM_LINUX_INITRD" "$@"
