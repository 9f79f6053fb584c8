#!/usr/bin/env bash
# Runs the whole esvm test suite: formatting, lints, and every crate's tests.
# Installs what it needs first (scripts/setup.sh). Tests that need /dev/kvm, root or
# network namespaces print "skipped: <reason>" when those are absent.
set -euo pipefail
cd "$(dirname "$0")/.."
# A one-off build gains nothing from incremental state, which doubles the target
# directory's size on disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
./scripts/setup.sh
echo "== Linux test guest (Debian kernel, busybox, workload; cached)"
./scripts/linux-assets.sh >/dev/null
echo "== cargo fmt --check"
cargo fmt --all -- --check
# The bare-metal guests are built by crates/guests/build.rs, outside the workspace.
rustfmt --check --edition 2021 $(find guests -name '*.rs' | sort)
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked --no-fail-fast 2>&1 | tee target/test-output.txt
# One summary line for the whole run, in the plain form CI tools read.
awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "%d passed, %d failed, %d skipped\n", p, f, i }' \
    target/test-output.txt
