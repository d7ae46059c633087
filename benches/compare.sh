#!/usr/bin/env bash
# The comparison report, one command: in one run on this machine,
#   direct      smtp-source -> smtp-sink                 (the ceiling)
#   postfix     smtp-source -> Postfix (fsync) -> smtp-sink
#   smartrelay  smtp-source -> smartrelay (fsync) -> smtp-sink
# for 1, 5 and 100 KiB messages over 1, 20 and 200 sessions: accept and end-to-end
# msg/s and peak RSS; then p50/p99 accept latency (end of data to 250) at half of each
# path's measured maximum rate (5 KiB, 20 sessions) with a paced client
# (benches/loadgen.rs). CPU per message (user + system of the relay's processes) for
# Postfix and smartrelay. Then the same with TLS on both legs (benches/loadgen.rs with
# STARTTLS, a Postfix TLS sink, verified TLS toward it), over 20 reused sessions and with
# one message per connection. Writes benches/results/compare.md, compare.png and
# compare-tls.png.
#   DELIVERY_CONCURRENCY=adaptive benches/compare.sh   runs smartrelay with
#     [delivery] concurrency = "adaptive" and writes compare-adaptive.md and its charts
#     instead, beside the default's.
#   DELIVERY_EXTRA='max_connections_per_host = 8' benches/compare.sh   adds lines to
#     smartrelay's [delivery] table (the report keeps its name: say so where it is quoted).
#
#   benches/compare.sh            (needs postfix, python3-matplotlib; loopback only;
#                                  about 4 minutes, stops by itself)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${SMARTRELAY_BIN:-$ROOT/target/release/smartrelay}
WORK=$(mktemp -d /tmp/smartrelay-compare.XXXXXX)
chmod 755 "$WORK"
LOGS=$(mktemp -d /dev/shm/smartrelay-compare.XXXXXX)
chmod 755 "$LOGS"
SUFFIX=${DELIVERY_CONCURRENCY:+-$DELIVERY_CONCURRENCY}
OUT=$ROOT/benches/results/compare$SUFFIX.md
CSV=$WORK/results.csv
command -v smtp-source >/dev/null || { echo "smtp-source missing: apt-get install postfix" >&2; exit 1; }
PY=${PYTHON:-/usr/bin/python3}
"$PY" -c "import matplotlib" 2>/dev/null || { echo "python3-matplotlib missing" >&2; exit 1; }
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"
(cd "$ROOT" && cargo bench --quiet --bench loadgen --no-run >/dev/null 2>&1)
LOADGEN=$(ls -t "$ROOT"/target/release/deps/loadgen-* | grep -v '\.d$' | head -1)
# "sent=N elapsed_s=… rate=… p50_ms=… p99_ms=… max_ms=… …" -> "N,p50,p99,max"
latency_cells() { sed -E 's/sent=([0-9]+) elapsed_s=[0-9.]+ rate=[0-9]+ p50_ms=([0-9.]+) p99_ms=([0-9.]+) max_ms=([0-9.]+) .*/\1,\2,\3,\4/'; }

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

echo "path,size,sessions,messages,accept,e2e,rss_kb,cpu_s" >"$CSV"
for L in 1024 5120 102400; do
  for S in 1 20 200; do
    N=$(messages_for "$L" "$S")
    tag="$L-$S"
    settle
    sp=$(free_port); start_sink "$sp" "$LOGS/direct-$tag.log"
    read -r a e < <(run_load "$sp" "$LOGS/direct-$tag.log")
    echo "direct,$L,$S,$N,$a,$e,0,0" >>"$CSV"
    settle
    sp=$(free_port); start_sink "$sp" "$LOGS/pf-$tag.log"
    pp=$(start_postfix "$sp" "postfix-$tag")
    c0=$(postfix_cpu_s "$WORK/postfix-$tag")
    read -r a e < <(run_load "$pp" "$LOGS/pf-$tag.log")
    c1=$(postfix_cpu_s "$WORK/postfix-$tag")
    echo "postfix,$L,$S,$N,$a,$e,$(postfix_hwm_kb "$WORK/postfix-$tag"),$(awk -v a="$c0" -v b="$c1" 'BEGIN {print b - a}')" >>"$CSV"
    postfix -c "$WORK/postfix-$tag/etc" stop >/dev/null 2>&1 || true
    settle
    sp=$(free_port); start_sink "$sp" "$LOGS/sr-$tag.log"
    read -r pid port _admin < <(start_relay "sr-$tag" "$sp" true)
    PIDS+=("$pid")
    c0=$(cpu_s "$pid")
    read -r a e < <(run_load "$port" "$LOGS/sr-$tag.log")
    c1=$(cpu_s "$pid")
    echo "smartrelay,$L,$S,$N,$a,$e,$(hwm_kb "$pid"),$(awk -v a="$c0" -v b="$c1" 'BEGIN {print b - a}')" >>"$CSV"
    kill "$pid"; wait "$pid" 2>/dev/null || true
    printf '%6s B %3s sessions: %s\n' "$L" "$S" "$(tail -3 "$CSV" | cut -d, -f1,5,6 | tr '\n' ' ')"
  done
done

# Latency at half of the measured maximum accept rate, 5 KiB over 20 sessions.
LAT=$WORK/latency.csv
echo "path,rate,sent,p50,p99,max" >"$LAT"
half_rate() { awk -F, -v p="$1" '$1==p && $2==5120 && $3==20 {printf "%d", $5/2}' "$CSV"; }
lat_row() {
  local path=$1 addr=$2 rate=$3 line
  line=$("$LOADGEN" "$addr" $((rate * 5)) 5120 20 --rate "$rate")
  echo "$path,$rate,$(echo "$line" | latency_cells)" >>"$LAT"
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

# TLS on both legs: the TLS load generator, a Postfix TLS sink, and each path with TLS
# in and verified TLS out; 20 reused sessions, then one message per connection.
CERTS=$WORK/certs
make_certs "$CERTS"
TLSCSV=$WORK/tls.csv
TLSLAT=$WORK/tls-latency.csv
echo "path,mode,messages,accept,e2e,cpu_s,upstream_connections,loadgen_cpu_s,sink_cpu_s,busy" >"$TLSCSV"
echo "mode,path,rate,sent,p50,p99,max" >"$TLSLAT"
tls_postfix() {
  local sinkport=$1 name=$2
  printf '[127.0.0.1]:%s secure match=sink.bench\n' "$sinkport" >"$WORK/$name.tls_policy"
  PF_EXTRA="smtpd_tls_security_level = may
smtpd_tls_cert_file = $CERTS/relay.pem
smtpd_tls_key_file = $CERTS/relay.key
smtpd_tls_session_cache_database = btree:\${data_directory}/smtpd_scache
smtp_tls_security_level = verify
smtp_tls_CAfile = $CERTS/ca.pem
smtp_tls_policy_maps = texthash:$WORK/$name.tls_policy
smtp_tls_session_cache_database = btree:\${data_directory}/smtp_scache" start_postfix "$sinkport" "$name"
}
tls_relay() {
  RELAY_CERT=$CERTS/relay.pem RELAY_KEY=$CERTS/relay.key UPSTREAM_TLS=required \
    UPSTREAM_CA=$CERTS/ca.pem start_relay "$1" "$2" true
}
# Runs one TLS load to PORT, into the TLS sink NAME. Prints "accept e2e loadgen_cpu
# sink_cpu busy": the rates and the machine's busy share from the load's first message
# until the sink has the last, and the CPU seconds the load generator and the sink spent.
run_tls() {
  local port=$1 name=$2 n=$3 flag=$4 base line t2 k0 k1 logger
  base=$(sink_count "$LOGS/$name.log"); base=${base:-0}
  k0=$(tls_sink_cpu_s "$name")
  logger=$(machine_log "$LOGS/machine.log")
  line=$(cpu_of "$WORK/loadgen.cpu" "$LOADGEN" "127.0.0.1:$port" "$n" 5120 20 --starttls --ca "$CERTS/ca.pem" $flag)
  wait_sink "$LOGS/$name.log" $((base + n))
  t2=$(now)
  k1=$(tls_sink_cpu_s "$name")
  sleep 0.05; kill "$logger"
  local rate t0
  rate=$(echo "$line" | sed -E 's/.* rate=([0-9]+) .*/\1/')
  t0=$(echo "$line" | sed -E 's/.* started_at=([0-9.]+).*/\1/')
  python3 -c "print('%s %.0f %s %.3f %s' % ($rate, $n/($t2-$t0), '$(cat "$WORK/loadgen.cpu")', $k1 - $k0, '$(machine_busy "$LOGS/machine.log" "$t0" "$t2")'))"
}
tls_lat() {
  local mode=$1 path=$2 port=$3 rate=$4 flag=$5 line
  line=$("$LOADGEN" "127.0.0.1:$port" $((rate * 5)) 5120 20 --starttls --ca "$CERTS/ca.pem" --rate "$rate" $flag)
  echo "$mode,$path,$rate,$(echo "$line" | latency_cells)" >>"$TLSLAT"
}
upstream_connections() {
  curl -s "http://127.0.0.1:$1/metrics" | awk '/^smartrelay_upstream_connections_total/ {n += $2} END {print n + 0}'
}
for mode in reuse perconn; do
  flag=""; n=3000
  [ "$mode" = perconn ] && { flag="--per-connection"; n=1000; }
  settle
  sp=$(start_tls_sink "sink-direct-$mode")
  read -r a e lg k b < <(run_tls "$sp" "sink-direct-$mode" "$n" "$flag")
  echo "direct,$mode,$n,$a,$e,0,0,$lg,$k,$b" >>"$TLSCSV"
  tls_lat "$mode" direct "$sp" $((a / 2)) "$flag"
  settle
  sp=$(start_tls_sink "sink-pf-$mode")
  pp=$(tls_postfix "$sp" "postfix-tls-$mode")
  c0=$(postfix_cpu_s "$WORK/postfix-tls-$mode")
  read -r a e lg k b < <(run_tls "$pp" "sink-pf-$mode" "$n" "$flag")
  c1=$(postfix_cpu_s "$WORK/postfix-tls-$mode")
  echo "postfix,$mode,$n,$a,$e,$(awk -v a="$c0" -v b="$c1" 'BEGIN {print b - a}'),0,$lg,$k,$b" >>"$TLSCSV"
  tls_lat "$mode" postfix "$pp" $((a / 2)) "$flag"
  postfix -c "$WORK/postfix-tls-$mode/etc" stop >/dev/null 2>&1 || true
  settle
  sp=$(start_tls_sink "sink-sr-$mode")
  read -r pid port admin < <(tls_relay "sr-tls-$mode" "$sp")
  PIDS+=("$pid")
  c0=$(cpu_s "$pid")
  read -r a e lg k b < <(run_tls "$port" "sink-sr-$mode" "$n" "$flag")
  c1=$(cpu_s "$pid")
  echo "smartrelay,$mode,$n,$a,$e,$(awk -v a="$c0" -v b="$c1" 'BEGIN {print b - a}'),$(upstream_connections "$admin"),$lg,$k,$b" >>"$TLSCSV"
  tls_lat "$mode" smartrelay "$port" $((a / 2)) "$flag"
  kill "$pid"; wait "$pid" 2>/dev/null || true
  for d in "$LOGS"/sink-*-"$mode"; do postfix -c "$d/etc" stop >/dev/null 2>&1 || true; done
  printf 'TLS %-7s: %s\n' "$mode" "$(tail -3 "$TLSCSV" | cut -d, -f1,4,5,6,7 | tr '\n' ' ')"
done

"$PY" - "$CSV" "$LAT" "$TLSCSV" "$TLSLAT" "$OUT" "$ROOT/benches/results/compare$SUFFIX.png" "$(nproc)" "$(postconf -d -h mail_version)" "${DELIVERY_CONCURRENCY:-fixed}" <<'PY'
import csv, sys, datetime
rows = list(csv.DictReader(open(sys.argv[1])))
lat = list(csv.DictReader(open(sys.argv[2])))
tls = list(csv.DictReader(open(sys.argv[3])))
tlslat = list(csv.DictReader(open(sys.argv[4])))
out, png, cores, pfv, concurrency = sys.argv[5], sys.argv[6], sys.argv[7], sys.argv[8], sys.argv[9]
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
    " all its children summed. smartrelay's `[delivery] concurrency` is `%s`."
    % (cores, datetime.date.today(), pfv, concurrency),
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
    "`cargo bench --bench loadgen -- ADDR COUNT 5120 20 --rate RATE`: a paced client at half of each path's"
    " measured maximum accept rate above, timing each message from its final dot to the 250.",
    "",
    "| path | rate (msg/s) | sent | p50 (ms) | p99 (ms) | max (ms) |",
    "|---|---:|---:|---:|---:|---:|",
]
for l in lat:
    lines.append("| %s | %s | %s | %s | %s | %s |" % (l["path"], l["rate"], l["sent"], l["p50"], l["p99"], l["max"]))
ms = lambda r: 1000 * f(r["cpu_s"]) / f(r["messages"])
lines += [
    "",
    "## CPU per message, plain text",
    "",
    "User + system CPU time of the relay's processes during the run (`/proc/PID/stat`: Postfix's"
    " master, its children alive and those it reaped), divided by the messages relayed.",
    "",
    "| size | sessions | Postfix (ms/msg) | smartrelay (ms/msg) | smartrelay / Postfix |",
    "|---:|---:|---:|---:|---:|",
]
for size, s in combos:
    p, r = by[("postfix", size, s)], by[("smartrelay", size, s)]
    lines.append("| %d KiB | %d | %.3f | %.3f | %.2f |" % (size // 1024, s, ms(p), ms(r), ms(r) / ms(p)))
tb = {(r["path"], r["mode"]): r for r in tls}
modes = [("reuse", "20 sessions, messages reuse them"), ("perconn", "one message per connection, 20 at a time")]
lines += [
    "",
    "## TLS on both legs",
    "",
    "`cargo bench --bench loadgen -- … --starttls --ca CA` (STARTTLS with rustls, 5 KiB messages, 20 concurrent sessions)"
    " against: the TLS sink directly (Postfix's smtpd offering STARTTLS, `smtpd_tls_security_level ="
    " may`, an openssl-made certificate, passing each message as it arrives to smtp-sink through"
    " `smtpd_proxy_filter`, so no queue is written); Postfix relaying"
    " with TLS in (`smtpd_tls_security_level = may`) and verified TLS out (`smtp_tls_policy_maps`:"
    " `secure match=sink.bench`, `smtp_tls_CAfile`), fsync on; smartrelay with `[tls]` on ingress"
    " and `tls = \"required\"` with `ca_file` toward the sink. Accept: until the load generator"
    " is done; end to end: until smtp-sink behind the TLS sink has every message, both from the first"
    " message's start. Upstream connections:"
    " `smartrelay_upstream_connections_total` after the run.",
    "",
    "| mode | messages | direct e2e | Postfix accept / e2e | smartrelay accept / e2e | smartrelay vs Postfix (e2e) | smartrelay vs direct (e2e) | CPU ms/msg Postfix / smartrelay | CPU smartrelay / Postfix | smartrelay upstream connections |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
]
for mode, label in modes:
    d, p, r = tb[("direct", mode)], tb[("postfix", mode)], tb[("smartrelay", mode)]
    lines.append("| %s | %s | %.0f | %.0f / %.0f | %.0f / %.0f | %.2f× | %.2f | %.3f / %.3f | %.2f | %s |" % (
        label, r["messages"], f(d["e2e"]), f(p["accept"]), f(p["e2e"]), f(r["accept"]), f(r["e2e"]),
        f(r["e2e"]) / f(p["e2e"]), f(r["e2e"]) / f(d["e2e"]), ms(p), ms(r), ms(r) / ms(p), r["upstream_connections"]))
per = lambda r, k: 1000 * f(r[k]) / f(r["messages"])
lines += [
    "",
    "Where the machine's time went in each TLS run: CPU per message of the load generator (`getrusage`),"
    " of the smart host (the TLS sink's Postfix processes and the smtp-sink behind it) and of the relay,"
    " and the busy share of the %s cores from the first message until the sink had the last (`/proc/stat`)."
    " They share one machine, so every millisecond the load generator and the smart host spend is one"
    " the relay cannot: a relay that cost nothing would reach at most cores ÷ (load generator + smart host)"
    " per message." % cores,
    "",
    "| mode | path | e2e | load generator ms/msg | smart host ms/msg | relay ms/msg | all ms/msg | machine busy | ceiling for a relay that costs nothing | its ratio to Postfix (e2e) |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
]
for mode, _ in modes:
    for path in ("direct", "postfix", "smartrelay"):
        r = tb[(path, mode)]
        lg, sk, rl = per(r, "loadgen_cpu_s"), per(r, "sink_cpu_s"), ms(r)
        ceiling = "" if path == "direct" else "%.0f" % (int(cores) * 1000 / (lg + sk))
        vs = "" if path == "direct" else "%.2f×" % (int(cores) * 1000 / (lg + sk) / f(tb[("postfix", mode)]["e2e"]))
        lines.append("| %s | %s | %.0f | %.3f | %.3f | %.3f | %.3f | %.0f %% | %s | %s |" % (
            mode, path, f(r["e2e"]), lg, sk, rl if path != "direct" else 0, lg + sk + (rl if path != "direct" else 0),
            100 * f(r["busy"]), ceiling, vs))
lines += [
    "",
    "Accept latency at half of each path's TLS accept rate above (`loadgen --starttls --rate`), from the final"
    " dot to the 250:",
    "",
    "| mode | path | rate (msg/s) | sent | p50 (ms) | p99 (ms) | max (ms) |",
    "|---|---|---:|---:|---:|---:|---:|",
]
for l in tlslat:
    lines.append("| %s | %s | %s | %s | %s | %s | %s |" % (l["mode"], l["path"], l["rate"], l["sent"], l["p50"], l["p99"], l["max"]))
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
# Rate and CPU per message side by side: plain (5 KiB, 20 sessions) and both TLS modes.
groups = [("plain\n20 sessions", lambda p: by[(p, 5120, 20)])] + [
    ("TLS\n" + ("20 sessions" if m == "reuse" else "1 msg/conn."), (lambda m: lambda p: tb[(p, m)])(m)) for m, _ in modes]
fig, (left, right, where) = plt.subplots(1, 3, figsize=(17, 4.5))
for i, (path, color) in enumerate([("direct", "#999999"), ("postfix", "#d95f02"), ("smartrelay", "#1b9e77")]):
    left.bar([x + (i - 1) * w for x in range(len(groups))], [f(g(path)["e2e"]) for _, g in groups], w, label=path, color=color)
for i, (path, color) in enumerate([("postfix", "#d95f02"), ("smartrelay", "#1b9e77")]):
    right.bar([x + (i - 0.5) * w for x in range(len(groups))], [ms(g(path)) for _, g in groups], w, label=path, color=color)
for ax, title, ylabel in [(left, "End-to-end rate", "msg/s"), (right, "CPU per message", "ms of CPU (user + system)")]:
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([g for g, _ in groups])
    ax.set_title(title + " (5 KiB)")
    ax.set_ylabel(ylabel)
    ax.legend()
# Where each TLS run's CPU went per message, stacked: what the relay leaves the rest.
bars = [(m, p) for m, _ in modes for p in ("postfix", "smartrelay")]
bottom = [0.0] * len(bars)
for part, key, color in [("load generator", "loadgen_cpu_s", "#7570b3"), ("smart host", "sink_cpu_s", "#999999"),
                         ("relay", "cpu_s", "#e7298a")]:
    vals = [per(tb[(p, m)], key) for m, p in bars]
    where.bar(range(len(bars)), vals, 0.6, bottom=bottom, label=part, color=color)
    bottom = [b + v for b, v in zip(bottom, vals)]
where.set_xticks(range(len(bars)))
where.set_xticklabels(["%s\nTLS %s" % (p, "reused" if m == "reuse" else "1/conn.") for m, p in bars])
where.set_title("Where the CPU went per message (TLS, 5 KiB)")
where.set_ylabel("ms of CPU (user + system)")
where.legend()
fig.tight_layout()
fig.savefig(png.replace(".png", "-tls.png"), dpi=110)
print(open(out).read())
PY
