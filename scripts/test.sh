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
# The Debian packages (the MariaDB test guest installs the guest agent's).
bash scripts/package.sh target/release >/dev/null
# The fault tests' agent: fault injection (DBMIGRATE_FAILPOINT) exists only
# in a build with debug assertions, kept apart from the release binaries.
CARGO_PROFILE_RELEASE_DEBUG_ASSERTIONS=true cargo build --release -p host-agent \
  --features failpoints --target-dir target/failpoints
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --release --workspace --no-fail-fast -- --test-threads=1 2>&1 | tee "$log" || status=$?
# One closing line over all test binaries (cargo prints one per binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
# The main demo, run as the README runs it (on CI: from a fresh clone); it
# fails unless the VM moved byte-exact and its database checked out.
if [ $status -eq 0 ]; then
  if bash scripts/demo.sh; then
    echo "demo: ok"
  else
    status=$?
    echo "demo: FAILED"
  fi
fi
exit $status
