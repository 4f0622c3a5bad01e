#!/usr/bin/env bash
# Fuzzes the parsers of untrusted input with cargo-fuzz (libFuzzer): the wire
# protocol decoder (protocol_frame), what a stranger sends first to the
# destination's listener over plain TCP and TLS (first_frame), the guest agent's hint and file-layout
# answers (guest_answer) and the InnoDB page parser (innodb_frame), each for
# a bounded time (default 60 s; `scripts/fuzz.sh 300` for 5 minutes each).
# Needs a nightly toolchain and cargo-fuzz; installs cargo-fuzz if missing.
# Crashes are kept in fuzz/artifacts/<target>/ and make the script fail.
set -euo pipefail
secs="${1:-60}"
cd "$(dirname "$0")/.."
if ! rustup toolchain list | grep -q '^nightly'; then
  echo "fuzz.sh: installing the nightly toolchain (cargo-fuzz needs it)" >&2
  rustup toolchain install nightly --profile minimal
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "fuzz.sh: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi
for t in protocol_frame first_frame guest_answer innodb_frame; do
  echo "fuzz.sh: $t for ${secs}s" >&2
  mkdir -p "fuzz/corpus/$t"
  cargo +nightly fuzz run --fuzz-dir fuzz "$t" "fuzz/corpus/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -max_len=70000
done
echo "fuzz.sh: no crash" >&2
