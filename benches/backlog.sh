#!/usr/bin/env bash
# The worst-day benchmark: a slow smart host (10,000 and 100,000 messages of 50 KB), a
# restart with the queue full, and an outage under steady input. Loopback only; it
# stops by itself (about 10 minutes here). Needs smtp-source/smtp-sink (postfix) and
# python3-matplotlib for the chart.
#
#   benches/backlog.sh [--small N] [--large N] [--outage SECONDS] [--outage-rate MSG/S]
#
# Writes benches/results/backlog.md and benches/results/backlog.png.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${SMARTRELAY_BIN:-$ROOT/target/release/smartrelay}
[ -x "$BIN" ] || (cd "$ROOT" && cargo build --release --quiet)
command -v smtp-source >/dev/null || { echo "smtp-source missing: apt-get install postfix" >&2; exit 1; }
SMARTRELAY_BIN=$BIN exec /usr/bin/python3 "$ROOT/benches/backlog.py" "$@"
