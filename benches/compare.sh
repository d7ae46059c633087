#!/usr/bin/env bash
# The comparison report, one command: in one run on this machine,
#   direct      smtp-source -> smtp-sink                 (the ceiling)
#   postfix     smtp-source -> Postfix (fsync) -> smtp-sink
#   smartrelay  smtp-source -> smartrelay (fsync) -> smtp-sink
# for 1, 5 and 100 KiB messages over 1, 20 and 200 sessions: accept and end-to-end
# msg/s and peak RSS; then p50/p99 accept latency (end of data to 250) at half of each
# path's measured maximum rate (5 KiB, 20 sessions) with a paced client
# (benches/loadgen.rs). Writes benches/results/compare.md and compare.png.
#
#   benches/compare.sh            (needs postfix, python3-matplotlib; loopback only;
#                                  about 5 minutes, stops by itself)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${SMARTRELAY_BIN:-$ROOT/target/release/smartrelay}
WORK=$(mktemp -d /tmp/smartrelay-compare.XXXXXX)
chmod 755 "$WORK"
LOGS=$(mktemp -d /dev/shm/smartrelay-compare.XXXXXX)
chmod 755 "$LOGS"
OUT=$ROOT/benches/results/compare.md
CSV=$WORK/results.csv
command -v smtp-source >/dev/null || { echo "smtp-source missing: apt-get install postfix" >&2; exit 1; }
PY=${PYTHON:-/usr/bin/python3}
"$PY" -c "import matplotlib" 2>/dev/null || { echo "python3-matplotlib missing" >&2; exit 1; }
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"
(cd "$ROOT" && cargo bench --quiet --bench loadgen --no-run >/dev/null 2>&1)

hwm_kb() { awk '/VmHWM/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
# Postfix is a family of processes: the master and every child it started.
postfix_hwm_kb() {
  local master; master=$(head -1 "$1/queue/pid/master.pid" | tr -d ' ')
  local total=0 p
  for p in $master $(pgrep -P "$master" || true); do
    total=$((total + $(hwm_kb "$p")))
  done
  echo "$total"
}
settle() { sync; sleep 0.5; }
messages_for() {
  local size=$1 sessions=$2
  if [ "$sessions" -eq 1 ]; then echo 400
  elif [ "$size" -ge 102400 ]; then echo 1000
  else echo 3000; fi
}

echo "path,size,sessions,messages,accept,e2e,rss_kb" >"$CSV"
for L in 1024 5120 102400; do
  for S in 1 20 200; do
    N=$(messages_for "$L" "$S")
    tag="$L-$S"
    settle
    sp=$(free_port); start_sink "$sp" "$LOGS/direct-$tag.log"
    read -r a e < <(run_load "$sp" "$LOGS/direct-$tag.log")
    echo "direct,$L,$S,$N,$a,$e,0" >>"$CSV"
    settle
    sp=$(free_port); start_sink "$sp" "$LOGS/pf-$tag.log"
    pp=$(start_postfix "$sp" "postfix-$tag")
    read -r a e < <(run_load "$pp" "$LOGS/pf-$tag.log")
    echo "postfix,$L,$S,$N,$a,$e,$(postfix_hwm_kb "$WORK/postfix-$tag")" >>"$CSV"
    postfix -c "$WORK/postfix-$tag/etc" stop >/dev/null 2>&1 || true
    settle
    sp=$(free_port); start_sink "$sp" "$LOGS/sr-$tag.log"
    read -r pid port _admin < <(start_relay "sr-$tag" "$sp" true)
    PIDS+=("$pid")
    read -r a e < <(run_load "$port" "$LOGS/sr-$tag.log")
    echo "smartrelay,$L,$S,$N,$a,$e,$(hwm_kb "$pid")" >>"$CSV"
    kill "$pid"; wait "$pid" 2>/dev/null || true
    printf '%6s B %3s sessions: %s\n' "$L" "$S" "$(tail -3 "$CSV" | cut -d, -f1,5,6 | tr '\n' ' ')"
  done
done

# Latency at half of the measured maximum accept rate, 5 KiB over 20 sessions.
LAT=$WORK/latency.csv
echo "path,rate,sent,p50,p99,max,achieved" >"$LAT"
half_rate() { awk -F, -v p="$1" '$1==p && $2==5120 && $3==20 {printf "%d", $5/2}' "$CSV"; }
loadgen() { (cd "$ROOT" && cargo bench --quiet --bench loadgen -- "$@" 2>/dev/null | tail -1); }
lat_row() {
  local path=$1 addr=$2 rate=$3 line
  line=$(loadgen "$addr" "$rate" $((rate * 5)) 5120 20)
  echo "$path,$rate,$(echo "$line" | sed -E 's/sent=([0-9]+) p50_ms=([0-9.]+) p99_ms=([0-9.]+) max_ms=([0-9.]+) achieved_rate=([0-9]+)/\1,\2,\3,\4,\5/')" >>"$LAT"
}
settle
sp=$(free_port); start_sink "$sp" "$LOGS/lat-direct.log"
lat_row direct "127.0.0.1:$sp" "$(half_rate direct)"
settle
sp=$(free_port); start_sink "$sp" "$LOGS/lat-pf.log"
pp=$(start_postfix "$sp" postfix-lat)
lat_row postfix "127.0.0.1:$pp" "$(half_rate postfix)"
postfix -c "$WORK/postfix-lat/etc" stop >/dev/null 2>&1 || true
settle
sp=$(free_port); start_sink "$sp" "$LOGS/lat-sr.log"
read -r pid port _admin < <(start_relay sr-lat "$sp" true)
PIDS+=("$pid")
lat_row smartrelay "127.0.0.1:$port" "$(half_rate smartrelay)"
kill "$pid"; wait "$pid" 2>/dev/null || true

"$PY" - "$CSV" "$LAT" "$OUT" "$ROOT/benches/results/compare.png" "$(nproc)" "$(postconf -d -h mail_version)" <<'PY'
import csv, sys, datetime
rows = list(csv.DictReader(open(sys.argv[1])))
lat = list(csv.DictReader(open(sys.argv[2])))
out, png, cores, pfv = sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
by = {(r["path"], int(r["size"]), int(r["sessions"])): r for r in rows}
combos = sorted({(int(r["size"]), int(r["sessions"])) for r in rows})
f = lambda x: float(x)
lines = [
    "# smartrelay against Postfix and the direct ceiling",
    "",
    "`benches/compare.sh` (release build, %s cores, %s; one run; smtp-source is the client and"
    " smtp-sink the smart host; Postfix %s fsyncs its queue files, smartrelay fdatasyncs its spool"
    " before every 250). Rates in msg/s: accept (until smtp-source is done) and end to end (until"
    " the sink has every message). Peak RSS is VmHWM: smartrelay's process, Postfix's master and"
    " all its children summed." % (cores, datetime.date.today(), pfv),
    "",
    "| size | sessions | messages | direct e2e | Postfix accept / e2e | smartrelay accept / e2e | smartrelay vs Postfix (e2e) | smartrelay vs direct (e2e) | peak RSS Postfix / smartrelay (MiB) |",
    "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
]
for size, s in combos:
    d, p, r = by[("direct", size, s)], by[("postfix", size, s)], by[("smartrelay", size, s)]
    lines.append("| %d KiB | %d | %s | %.0f | %.0f / %.0f | %.0f / %.0f | %.2f× | %.2f | %.0f / %.0f |" % (
        size // 1024, s, r["messages"], f(d["e2e"]), f(p["accept"]), f(p["e2e"]), f(r["accept"]), f(r["e2e"]),
        f(r["e2e"]) / f(p["e2e"]), f(r["e2e"]) / f(d["e2e"]), f(p["rss_kb"]) / 1024, f(r["rss_kb"]) / 1024))
lines += [
    "",
    "## Accept latency at half load (5 KiB, 20 sessions)",
    "",
    "`cargo bench --bench loadgen -- ADDR RATE COUNT 5120 20`: a paced client at half of each path's"
    " measured maximum accept rate above, timing each message from its final dot to the 250.",
    "",
    "| path | rate (msg/s) | sent | p50 (ms) | p99 (ms) | max (ms) |",
    "|---|---:|---:|---:|---:|---:|",
]
for l in lat:
    lines.append("| %s | %s | %s | %s | %s | %s |" % (l["path"], l["rate"], l["sent"], l["p50"], l["p99"], l["max"]))
open(out, "w").write("\n".join(lines) + "\n")
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(11, 4.5))
labels = ["%d KiB\n%d sess." % (size // 1024, s) for size, s in combos]
w = 0.27
for i, (path, color) in enumerate([("direct", "#999999"), ("postfix", "#d95f02"), ("smartrelay", "#1b9e77")]):
    ax.bar([x + (i - 1) * w for x in range(len(combos))], [f(by[(path, size, s)]["e2e"]) for size, s in combos],
           w, label=path, color=color)
ax.set_xticks(range(len(combos)))
ax.set_xticklabels(labels)
ax.set_ylabel("end-to-end msg/s")
ax.set_yscale("log")
ax.set_title("End-to-end rate, one run on this machine (log scale)")
ax.legend()
fig.tight_layout()
fig.savefig(png, dpi=110)
print(open(out).read())
PY
