#!/usr/bin/env bash
# The main demo (run as root): the MariaDB VM under sysbench oltp_read_write
# migrates between two hosts (network namespaces joined by a 1 Gbit/s link;
# a storage host serves the VM's disk over NBD; a client host runs
# sysbench) with dbmigrate: clean buffer-pool pages are rebuilt on the
# destination from shared storage, every page checked. It prints the pages
# rebuilt, the bytes on the link, the client's transactions before and
# during the move, and the database's check on the destination.
#
#   scripts/demo.sh [--with-qemu] [--ram-mib 2048]   QEMU's own pre-copy of the same VM beside it
#   scripts/demo.sh --dirtier [--ram-mib 1024] ...   the synthetic guest instead (scripts/demo-dirtier.sh)
#
# The first run builds the guest image and its data set (a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --dirtier ]; then
  shift
  exec bash scripts/demo-dirtier.sh "$@"
fi
bash scripts/setup.sh
cargo build --release --workspace >&2
bash scripts/package.sh target/release >/dev/null
exec target/release/bench demo "$@"
