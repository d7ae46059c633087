#!/usr/bin/env bash
# End-to-end benchmark: smartrelay against Postfix on the same machine, in one run.
#
#   benches/e2e.sh [MESSAGES] [SESSIONS] [SIZE]      (defaults 5000 20 5120; ROUNDS=5)
#
# BASELINE_BIN=path/to/an/earlier/smartrelay adds that binary as one more variant in
# every round, so a change is measured before and after in the same run.
#
# Measures, with Postfix's smtp-source as the load client and smtp-sink as the smart host:
#   direct      smtp-source -> smtp-sink                 (the ceiling)
#   postfix     smtp-source -> Postfix (fsync) -> smtp-sink
#   smartrelay  smtp-source -> smartrelay (fsync) -> smtp-sink
#   smartrelay, trusted-sender recording off (its cost)
#   smartrelay, message tracking off (its cost)
#   smartrelay with the default limits, and with three rules (sender, sender domain,
#   client) that the load stays under: what counting costs (every other variant runs
#   with limits = [])
# For each: accept rate (until smtp-source is done) and end-to-end rate (until the sink
# has every message). Then RSS with 1,000 idle sessions and the trusted-list export of
# 100,000 entries. Everything talks to 127.0.0.1 only. Results: benches/results.md.
set -euo pipefail

N=${1:-5000}
S=${2:-20}
L=${3:-5120}
ROUNDS=${ROUNDS:-5}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${SMARTRELAY_BIN:-$ROOT/target/release/smartrelay}
WORK=$(mktemp -d /tmp/smartrelay-bench.XXXXXX)
# Postfix daemons and smtp-sink run as other users: they must reach their files.
chmod 755 "$WORK"
# Logs and counters go to memory, so the harness's own writes do not compete with
# the queues being measured.
LOGS=$(mktemp -d /dev/shm/smartrelay-bench.XXXXXX)
chmod 755 "$LOGS"
OUT=$ROOT/benches/results.md
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"

echo "== smartrelay benchmark: $N messages of $L bytes, $S sessions ($(nproc) cores), $ROUNDS rounds"

# Each variant gets a fresh sink (and relay or Postfix) per round; the disk is synced
# and given a second between runs so one run's writeback does not land on the next.
settle() { sync; sleep 1; }
variant_direct() {
  local sp; sp=$(free_port); start_sink "$sp" "$LOGS/direct-$1.log"
  run_load "$sp" "$LOGS/direct-$1.log"
}
variant_postfix() {
  local sp pp; sp=$(free_port); start_sink "$sp" "$LOGS/pf-$1.log"
  pp=$(start_postfix "$sp" "postfix-$1")
  run_load "$pp" "$LOGS/pf-$1.log"
  postfix -c "$WORK/postfix-$1/etc" stop >/dev/null 2>&1 || true
}
variant_relay() {
  local name=$1 trusted=$2 round=$3 sp pid port admin
  sp=$(free_port); start_sink "$sp" "$LOGS/$name-$round.log"
  # A fresh directory per round; nothing is deleted until the end, because deletions
  # (with the discard mount option) slow the next run's syncs down.
  read -r pid port admin < <(start_relay "$name-$round" "$sp" "$trusted")
  PIDS+=("$pid")
  run_load "$port" "$LOGS/$name-$round.log"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}
median() { python3 -c "import statistics,sys; print('%.0f' % statistics.median(float(x) for x in sys.argv[1:]))" "$@"; }

# Three rules the load stays under (every message counted under each).
THREE_LIMITS='[[limits]]
name = "sender-burst"
key = "sender"
messages = "1000000/1m"
action = "defer"

[[limits]]
name = "domain-hourly"
key = "sender_domain"
recipients = "10000000/1h"
action = "hold"

[[limits]]
name = "client-burst"
key = "client"
messages = "1000000/1m"
action = "defer"'
declare -A ACC E2E
VARIANTS="direct postfix relay notrusted notracking defaultlimits threelimits"
[ -n "${BASELINE_BIN:-}" ] && VARIANTS="$VARIANTS baseline"
for round in $(seq "$ROUNDS"); do
  for v in $VARIANTS; do
    settle
    case $v in
      direct) read -r a e < <(variant_direct "$round") ;;
      postfix) read -r a e < <(variant_postfix "$round") ;;
      relay) read -r a e < <(variant_relay relay true "$round") ;;
      notrusted) read -r a e < <(variant_relay notrusted false "$round") ;;
      baseline) read -r a e < <(RELAY_BIN=$BASELINE_BIN variant_relay baseline true "$round") ;;
      notracking) read -r a e < <(TRACKING=false variant_relay notracking true "$round") ;;
      defaultlimits) read -r a e < <(LIMITS_TOML="# limits: the defaults" variant_relay defaultlimits true "$round") ;;
      threelimits) read -r a e < <(LIMITS_TOML=$THREE_LIMITS variant_relay threelimits true "$round") ;;
    esac
    ACC[$v]="${ACC[$v]:-} $a"; E2E[$v]="${E2E[$v]:-} $e"
    printf 'round %d %-10s accept %6s/s  end-to-end %6s/s\n' "$round" "$v" "$a" "$e"
  done
done
# shellcheck disable=SC2086
{
  D_ACC=$(median ${ACC[direct]}); D_E2E=$(median ${E2E[direct]})
  P_ACC=$(median ${ACC[postfix]}); P_E2E=$(median ${E2E[postfix]})
  R_ACC=$(median ${ACC[relay]}); R_E2E=$(median ${E2E[relay]})
  T_ACC=$(median ${ACC[notrusted]}); T_E2E=$(median ${E2E[notrusted]})
  K_ACC=$(median ${ACC[notracking]}); K_E2E=$(median ${E2E[notracking]})
  L_ACC=$(median ${ACC[defaultlimits]}); L_E2E=$(median ${E2E[defaultlimits]})
  M_ACC=$(median ${ACC[threelimits]}); M_E2E=$(median ${E2E[threelimits]})
  if [ -n "${BASELINE_BIN:-}" ]; then
    B_ACC=$(median ${ACC[baseline]}); B_E2E=$(median ${E2E[baseline]})
  fi
  RANGE_R=$(python3 -c "import sys; v=[float(x) for x in sys.argv[1:]]; print('%.0f-%.0f' % (min(v), max(v)))" ${E2E[relay]})
  SPREAD=$(python3 -c "import sys; v=[float(x) for x in sys.argv[1:]]; print('%.0f' % (100*(max(v)-min(v))/min(v)))" ${E2E[relay]})
  RANGE_P=$(python3 -c "import sys; v=[float(x) for x in sys.argv[1:]]; print('%.0f-%.0f' % (min(v), max(v)))" ${E2E[postfix]})
}

# Idle sessions: 1,000 clients connected, greeted and silent.
settle
SR_SINK=$(free_port); start_sink "$SR_SINK" "$LOGS/idle-sink.log"
read -r SR_PID SR_PORT SR_ADMIN < <(start_relay relay "$SR_SINK" true)
PIDS+=("$SR_PID")
RSS_BEFORE=$(rss_kb "$SR_PID")
python3 - "$SR_PORT" "$SR_PID" >"$WORK/idle.txt" <<'PY'
import socket, sys, time
port, pid = int(sys.argv[1]), sys.argv[2]
socks = []
for _ in range(1000):
    s = socket.create_connection(("127.0.0.1", port)); s.recv(512)
    s.sendall(b"EHLO idle.bench\r\n"); s.recv(4096)
    socks.append(s)
time.sleep(1)
rss = [l.split()[1] for l in open("/proc/%s/status" % pid) if l.startswith("VmRSS")][0]
print(rss)
PY
RSS_IDLE=$(cat "$WORK/idle.txt")
echo "smartrelay  RSS ${RSS_BEFORE} kB idle, ${RSS_IDLE} kB with 1000 idle sessions"
kill "$SR_PID"; wait "$SR_PID" 2>/dev/null || true

# Trusted-list export: 100,000 entries.
python3 -c "
for i in range(100000): print('user%06d@partner%03d.test' % (i, i % 500))" >"$WORK/100k.csv"
"$BIN" trusted import "$WORK/100k.csv" --config "$WORK/relay/smartrelay.toml" >/dev/null
t0=$(now); "$BIN" trusted export --format csv --config "$WORK/relay/smartrelay.toml" >"$WORK/export.csv"; t1=$(now)
EXPORT_S=$(python3 -c "print('%.2f' % ($t1-$t0))")
EXPORT_LINES=$(($(wc -l <"$WORK/export.csv") - 1))
echo "trusted export: $EXPORT_LINES entries in ${EXPORT_S}s"

ratio() { python3 -c "print('%.2f' % ($1/$2))"; }
cat >"$OUT" <<EOF
# Benchmark results

Command: \`benches/e2e.sh $N $S $L\` ($N messages of $L bytes over $S sessions, $(nproc) cores,
$(date -u +%Y-%m-%d)); medians of $ROUNDS alternating rounds. smtp-source is the client, smtp-sink the smart host; Postfix
$(postconf -d -h mail_version) fsyncs its queue files; smartrelay appends to its spool log and
fdatasyncs it before every 250. Rates in messages per second; ratios against Postfix and against the
direct source-to-sink ceiling measured in the same run.

| path | accept/s | end-to-end/s | accept vs Postfix | end-to-end vs Postfix | end-to-end vs direct |
|---|---:|---:|---:|---:|---:|
| smtp-source -> smtp-sink (direct) | $D_ACC | $D_E2E | | | 1.00 |
| smtp-source -> Postfix -> smtp-sink | $P_ACC | $P_E2E | 1.00 | 1.00 | $(ratio "$P_E2E" "$D_E2E") |
| smtp-source -> smartrelay -> smtp-sink | $R_ACC | $R_E2E | $(ratio "$R_ACC" "$P_ACC") | $(ratio "$R_E2E" "$P_E2E") | $(ratio "$R_E2E" "$D_E2E") |
| same, trusted-list recording off | $T_ACC | $T_E2E | $(ratio "$T_ACC" "$P_ACC") | $(ratio "$T_E2E" "$P_E2E") | $(ratio "$T_E2E" "$D_E2E") |
| same, message tracking off | $K_ACC | $K_E2E | $(ratio "$K_ACC" "$P_ACC") | $(ratio "$K_E2E" "$P_E2E") | $(ratio "$K_E2E" "$D_E2E") |
| same, default limits (sender-daily, sender-bounces) | $L_ACC | $L_E2E | $(ratio "$L_ACC" "$P_ACC") | $(ratio "$L_E2E" "$P_E2E") | $(ratio "$L_E2E" "$D_E2E") |
| same, three limits (sender, sender domain, client) | $M_ACC | $M_E2E | $(ratio "$M_ACC" "$P_ACC") | $(ratio "$M_E2E" "$P_E2E") | $(ratio "$M_E2E" "$D_E2E") |
$(if [ -n "${BASELINE_BIN:-}" ]; then echo "| same, baseline binary \`$BASELINE_BIN\` | $B_ACC | $B_E2E | $(ratio "$B_ACC" "$P_ACC") | $(ratio "$B_E2E" "$P_E2E") | $(ratio "$B_E2E" "$D_E2E") |"; fi)

Per-round end-to-end rates varied $RANGE_R/s for smartrelay and $RANGE_P/s for Postfix. The
virtual disk's sync latency varies from minute to minute, so the variants alternate
within each round and medians are reported.

$(if [ -n "${BASELINE_BIN:-}" ]; then echo "- This build against the baseline binary, same run: accept $(ratio "$R_ACC" "$B_ACC"), end-to-end $(ratio "$R_E2E" "$B_E2E")."; fi)
- Message tracking on (the smartrelay row) against \`tracking.enabled = false\`, same run: accept $(ratio "$R_ACC" "$K_ACC"), end-to-end $(ratio "$R_E2E" "$K_E2E").
- Limits against \`limits = []\` (the smartrelay row), same run: default limits accept $(ratio "$L_ACC" "$R_ACC"), end-to-end $(ratio "$L_E2E" "$R_E2E"); three limits accept $(ratio "$M_ACC" "$R_ACC"), end-to-end $(ratio "$M_E2E" "$R_E2E").
- Trusted-list recording costs $(python3 -c "print('%.1f' % (100*(1-$R_E2E/$T_E2E)))") % of end-to-end throughput; rounds of the same variant differ by up to $SPREAD %.
- RSS: ${RSS_BEFORE} kB at rest; ${RSS_IDLE} kB with 1,000 idle sessions open.
- \`smartrelay trusted export --format csv\` of $EXPORT_LINES entries: ${EXPORT_S} s.
EOF
echo "written to $OUT"
