#!/usr/bin/env bash
# Ticket verifications per second on one core (every piece request checks one), against sha256 of
# one 4 MiB piece (what the downloader spends verifying the piece the ticket guards).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --locked -p damselfly-tests --bin damselfly-ticket-bench >&2
taskset -c 0 target/release/damselfly-ticket-bench
