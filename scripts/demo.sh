#!/usr/bin/env bash
# Builds esvm and runs the built-in demo guest on the embedded default backend (the software
# vCPU). Extra arguments are passed to `esvm run`, e.g. `scripts/demo.sh -- iterations=5`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release --locked -p esvm
exec target/release/esvm run "$@"
