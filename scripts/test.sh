#!/usr/bin/env bash
# The project's test command (README, .ci/run): installs what is missing,
# checks formatting and lints, builds in release mode (the engine hashes and
# copies GiBs; debug builds are far too slow for the VM tests) and runs every
# test. VM tests run one at a time: the machine has two cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release -- -D warnings
cargo build --release --workspace --all-targets
cargo test --release --workspace -- --test-threads=1
