# Shared by benches/e2e.sh and benches/compare.sh: the processes of a run and their
# clean-up, smtp-sink with its counter, smartrelay and a throwaway Postfix on loopback
# ports, and the load run. The caller sets ROOT, BIN, WORK, LOGS, and N, S, L for
# run_load.
# shellcheck shell=bash
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done
  pkill -f "$LOGS" 2>/dev/null || true
  for d in "$WORK"/postfix-* "$LOGS"/sink-*; do
    [ -d "$d/etc" ] && postfix -c "$d/etc" stop >/dev/null 2>&1
  done || true
  sleep 0.5
  rm -rf "$WORK" "$LOGS"
}
trap cleanup EXIT
trap "exit 130" INT TERM

[ -x "$BIN" ] || (cd "$ROOT" && cargo build --release --quiet)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 not up" >&2; exit 1; }

# smtp-sink's counter only goes to a terminal: run it under script(1) and read the log.
start_sink() {
  local port=$1 log=$2
  script -qfc "smtp-sink -u nobody -c 127.0.0.1:$port 1000" "$log" >/dev/null 2>&1 &
  PIDS+=($!)
  wait_port "$port"
}
sink_count() { { tr '\r' '\n' <"$1" | grep -o 'mesg=[0-9]*' | tail -1 | cut -d= -f2; } 2>/dev/null || true; }
wait_sink() {
  local log=$1 want=$2
  while :; do
    local c; c=$(sink_count "$log"); c=${c:-0}
    [ "$c" -ge "$want" ] && return 0
    sleep 0.05
  done
}

# Runs one load; prints "accept_rate e2e_rate".
run_load() {
  local port=$1 sinklog=$2 base
  base=$(sink_count "$sinklog"); base=${base:-0}
  local t0 t1 t2
  t0=$(now)
  smtp-source -s "$S" -m "$N" -l "$L" -d -f bench@example.test -t rcpt@partner.test "127.0.0.1:$port"
  t1=$(now)
  wait_sink "$sinklog" $((base + N))
  t2=$(now)
  python3 -c "print('%.0f %.0f' % ($N/($t1-$t0), $N/($t2-$t0)))"
}

start_relay() {
  local name=$1 sinkport=$2 trusted=$3 dir=$WORK/$1
  mkdir -p "$dir"
  local port admin; port=$(free_port); admin=$(free_port)
  # Benchmarks send thousands from one sender: limits are stated, never the defaults.
  cat >"$dir/smartrelay.toml" <<EOF
${LIMITS_TOML:-limits = []}

[server]
hostname = "relay.bench"
listen = ["127.0.0.1:$port"]
max_connections = 4000
max_connections_per_ip = 4000
[access]
allowed_ranges = ["127.0.0.0/8"]
domains = ["example.test"]
[queue]
dir = "$dir/spool"
[delivery]
concurrency = "${DELIVERY_CONCURRENCY:-fixed}"
${DELIVERY_EXTRA:-}
[routing]
spf_aware = false
[dns]
# Loopback only: the onboarding refresh's SPF lookups must not leave the machine.
nameservers = ["127.0.0.1:1"]
[routing.regions.eu]
hosts = ["127.0.0.1:$sinkport"]
tls = "${UPSTREAM_TLS:-none}"
${UPSTREAM_CA:+ca_file = \"$UPSTREAM_CA\"}
[admin]
listen = "127.0.0.1:$admin"
database = "$dir/state.sqlite3"
[trusted]
enabled = $trusted
database = "$dir/trusted.sqlite3"
[tracking]
enabled = ${TRACKING:-true}
database = "$dir/tracking.sqlite3"
[log]
level = "warn"
EOF
  if [ -n "${RELAY_CERT:-}" ]; then
    printf '[tls]\ncert = "%s"\nkey = "%s"\n' "$RELAY_CERT" "$RELAY_KEY" >>"$dir/smartrelay.toml"
  fi
  "${RELAY_BIN:-$BIN}" run --config "$dir/smartrelay.toml" >/dev/null 2>"$LOGS/$name.relay.log" &
  local pid=$!
  wait_port "$port" >/dev/null
  echo "$pid $port $admin"
}

# A throwaway Postfix in DIR on PORT, logging to LOGS/NAME.maillog: the settings every
# instance shares, then EXTRA (main.cf lines).
postfix_instance() {
  local pf=$1 name=$2 port=$3 host=$4 extra=$5
  mkdir -p "$pf/etc" "$pf/queue" "$pf/data"
  cat >"$pf/etc/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $pf/queue
data_directory = $pf/data
mail_owner = postfix
setgid_group = postdrop
myhostname = $host
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
alias_maps =
alias_database =
local_recipient_maps =
maillog_file = $LOGS/$name.maillog
maillog_file_prefixes = $LOGS
$extra
EOF
  postfix_master_cf "$pf" "$port"
  chown postfix "$pf/data"
  postfix -c "$pf/etc" check >/dev/null 2>&1 || true
  script -qc "postfix -c $pf/etc start" /dev/null >"$WORK/postfix-start.log" 2>&1 || { cat "$WORK/postfix-start.log" >&2; exit 1; }
  wait_port "$port"
}

# A Postfix relay toward the sink (its queue fsynced on disk); PF_EXTRA (main.cf lines)
# adds to it, e.g. TLS. Prints the port.
start_postfix() {
  local sinkport=$1 port
  port=$(free_port)
  postfix_instance "$WORK/$2" "$2" "$port" postfix.bench "relayhost = [127.0.0.1]:$sinkport
${PF_EXTRA:-}"
  echo "$port"
}

postfix_master_cf() {
  local pf=$1 port=$2
  cat >"$pf/etc/master.cf" <<EOF
127.0.0.1:$port inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
EOF
}

# The TLS smart host: Postfix's smtpd offering STARTTLS (smtpd_tls_security_level = may)
# with CERTS/sink.pem, passing each message as it arrives to smtp-sink
# (smtpd_proxy_filter, a before-queue proxy): Postfix's queue is never written, and the
# 250 is smtp-sink's. Messages received: sink_count on LOGS/NAME.log. Prints the port.
start_tls_sink() {
  local name=$1 port sinkport
  port=$(free_port); sinkport=$(free_port)
  start_sink "$sinkport" "$LOGS/$name.log"
  echo "$sinkport" >"$LOGS/$name.sinkport"
  postfix_instance "$LOGS/$name" "$name" "$port" sink.bench "smtpd_proxy_filter = 127.0.0.1:$sinkport
smtpd_tls_security_level = may
smtpd_tls_cert_file = $CERTS/sink.pem
smtpd_tls_key_file = $CERTS/sink.key
smtpd_tls_session_cache_database = btree:\${data_directory}/smtpd_scache"
  echo "$port"
}

# A CA and two leaves it signed (P-256): sink.pem for sink.bench and 127.0.0.1, relay.pem
# for relay.bench and 127.0.0.1; rustls refuses a leaf without CA:FALSE.
make_certs() {
  local d=$1
  mkdir -p "$d"
  ( cd "$d"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.pem \
      -days 2 -subj "/CN=bench CA" -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign 2>/dev/null
    for leaf in sink relay; do
      openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout $leaf.key -out $leaf.csr -subj "/CN=$leaf.bench" 2>/dev/null
      printf 'basicConstraints=critical,CA:FALSE\nsubjectAltName=DNS:%s.bench,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' $leaf >$leaf.ext
      openssl x509 -req -in $leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out $leaf.pem -days 2 -extfile $leaf.ext 2>/dev/null
    done
    chmod 644 ./*.key ./*.pem )
}

# CPU seconds (user + system) of a process and of the children it has reaped.
cpu_s() {
  awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15 + $16 + $17) / hz}' "/proc/$1/stat" 2>/dev/null || echo 0
}
# Postfix: the master, its children alive, and (in the master's) those reaped.
postfix_cpu_s() {
  local master p total=0
  master=$(head -1 "$1/queue/pid/master.pid" | tr -d ' ')
  for p in $master $(pgrep -P "$master" || true); do
    total=$(awk -v a="$total" -v b="$(cpu_s "$p")" 'BEGIN {print a + b}')
  done
  echo "$total"
}


# The TLS sink NAME: its Postfix and the smtp-sink behind it.
tls_sink_cpu_s() {
  local sp pid
  sp=$(cat "$LOGS/$1.sinkport")
  pid=$(pgrep -f "^smtp-sink -u nobody -c 127.0.0.1:$sp " | head -1)
  awk -v a="$(postfix_cpu_s "$LOGS/$1")" -v b="$(cpu_s "${pid:-0}")" 'BEGIN {print a + b}'
}
# Runs CMD and writes its user + system CPU seconds (and its children's) to FILE.
cpu_of() {
  local file=$1; shift
  python3 -c 'import resource, subprocess, sys
code = subprocess.run(sys.argv[2:]).returncode
u = resource.getrusage(resource.RUSAGE_CHILDREN)
open(sys.argv[1], "w").write("%.3f\n" % (u.ru_utime + u.ru_stime))
sys.exit(code)' "$file" "$@"
}
# Logs the machine's busy and total jiffies (/proc/stat; idle and iowait are not busy)
# every 10 ms to FILE as "unix_time busy total", until killed; prints its PID.
machine_log() {
  python3 -c 'import sys, time
out = open(sys.argv[1], "w", buffering=1)
while True:
    f = open("/proc/stat").readline().split()[1:]
    v = [int(x) for x in f]
    out.write("%.3f %d %d\n" % (time.time(), sum(v) - v[3] - v[4], sum(v)))
    time.sleep(0.01)' "$1" >/dev/null 2>&1 &
  echo $!
}
# The busy share of the machine between unix times T0 and T1, from machine_log's FILE.
machine_busy() {
  python3 -c 'import sys
t0, t1 = float(sys.argv[2]), float(sys.argv[3])
rows = [tuple(map(float, l.split())) for l in open(sys.argv[1]) if len(l.split()) == 3]
a = max((r for r in rows if r[0] <= t0), default=rows[0], key=lambda r: r[0])
b = min((r for r in rows if r[0] >= t1), default=rows[-1], key=lambda r: r[0])
print("%.3f" % ((b[1] - a[1]) / max(1.0, b[2] - a[2])))' "$1" "$2" "$3"
}

rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

