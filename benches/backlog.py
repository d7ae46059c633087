#!/usr/bin/python3
"""The worst-day benchmark: smartrelay with a slow or missing smart host.

Run through benches/backlog.sh. Loopback only; every phase is bounded and stops by
itself. Scenarios, all against one release binary in one run:

  fresh     an empty queue and a fast smart host: the reference accept rate;
  slow-N    a smart host that takes 2 s per DATA (smtp-sink -w 2) while clients send N
            messages as fast as they can (N = 10,000 and 100,000);
  restart   after slow-100k: SIGTERM, then start again with the queue full and a fast
            smart host: restart-to-ready and the drain;
  outage    steady input; the smart host goes away for a while and comes back.

Measured on the relay process: write_bytes of /proc/PID/io per byte accepted (write
amplification), VmHWM (peak RSS), accepted messages and queue depth from /metrics over
time. Results: benches/results/backlog.md and backlog.png.
"""
import argparse
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("SMARTRELAY_BIN", os.path.join(ROOT, "target/release/smartrelay"))
SIZE = 51200
SESSIONS = 20


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("port %d never came up" % port)


class Sink:
    """smtp-sink as the smart host; its counter only goes to a terminal, so it runs
    under script(1) and the count is read from the log."""

    def __init__(self, work, port, delay=0):
        self.port, self.log = port, os.path.join(work, "sink-%d.log" % port)
        wait = ["-w", str(delay)] if delay else []
        cmd = "smtp-sink -u nobody -c %s 127.0.0.1:%d 1000" % (" ".join(wait), port)
        self.proc = subprocess.Popen(["script", "-qfc", cmd, self.log],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        wait_port(port)

    def stop(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


class Relay:
    def __init__(self, work, name, sink_port, spool=None):
        self.dir = os.path.join(work, name)
        os.makedirs(self.dir, exist_ok=True)
        self.port, self.admin = free_port(), free_port()
        self.spool = spool or os.path.join(self.dir, "spool")
        self.config = os.path.join(self.dir, "smartrelay.toml")
        with open(self.config, "w") as f:
            # Tens of thousands from one sender: the default sender-daily limit would
            # hold them, so this benchmark runs without limits.
            f.write("""limits = []

[server]
hostname = "relay.bench"
listen = ["127.0.0.1:%d"]
max_connections = 4000
max_connections_per_ip = 4000
[access]
allowed_ranges = ["127.0.0.0/8"]
domains = ["example.test"]
[queue]
dir = "%s"
[routing]
spf_aware = false
[dns]
nameservers = ["127.0.0.1:1"]
[routing.regions.eu]
hosts = ["127.0.0.1:%d"]
tls = "none"
[admin]
listen = "127.0.0.1:%d"
database = "%s/state.sqlite3"
[trusted]
database = "%s/trusted.sqlite3"
[tracking]
database = "%s/tracking.sqlite3"
[log]
level = "warn"
""" % (self.port, self.spool, sink_port, self.admin, self.dir, self.dir, self.dir))
        self.started = time.time()
        self.proc = subprocess.Popen([BIN, "run", "--config", self.config],
                                     stdout=subprocess.DEVNULL,
                                     stderr=open(os.path.join(self.dir, "relay.log"), "w"))
        self.pid = self.proc.pid
        self.ready_after = self.wait_ready()

    def wait_ready(self, timeout=120):
        end = time.time() + timeout
        while time.time() < end:
            try:
                with urllib.request.urlopen("http://127.0.0.1:%d/readyz" % self.admin, timeout=1) as r:
                    if r.status == 200:
                        return time.time() - self.started
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("relay exited: see %s/relay.log" % self.dir)
            time.sleep(0.02)
        raise RuntimeError("relay never ready")

    def metrics(self):
        out = {}
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % self.admin, timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("#") or " " not in line:
                    continue
                name, value = line.rsplit(" ", 1)
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
        return out

    def proc_io(self):
        with open("/proc/%d/io" % self.pid) as f:
            return {k: int(v) for k, v in (l.split(": ") for l in f)}

    def hwm_kb(self):
        with open("/proc/%d/status" % self.pid) as f:
            for l in f:
                if l.startswith("VmHWM"):
                    return int(l.split()[1])
        return 0

    def rss_kb(self):
        with open("/proc/%d/status" % self.pid) as f:
            for l in f:
                if l.startswith("VmRSS"):
                    return int(l.split()[1])
        return 0

    def stop(self, timeout=120):
        t0 = time.time()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout)
        return time.time() - t0


class Sampler(threading.Thread):
    """Every half second: accepted, queue depth, RSS and bytes written."""

    def __init__(self, relay, label):
        super().__init__(daemon=True)
        self.relay, self.label, self.samples = relay, label, []
        self.t0, self.done = time.time(), threading.Event()

    def run(self):
        while not self.done.is_set():
            self.take()
            self.done.wait(0.5)
        self.take()

    def take(self):
        try:
            m = self.relay.metrics()
            io = self.relay.proc_io()
            self.samples.append({
                "t": time.time() - self.t0,
                "accepted": m.get("smartrelay_messages_accepted_total", 0),
                "queue": m.get("smartrelay_queue_messages", 0),
                "rss": self.relay.rss_kb() / 1024,
                "written": io["write_bytes"],
            })
        except (OSError, ValueError, KeyError):
            pass

    def stop(self):
        self.done.set()
        self.join()


def smtp_source(port, n):
    t0 = time.time()
    subprocess.run(["smtp-source", "-s", str(SESSIONS), "-m", str(n), "-l", str(SIZE), "-d",
                    "-f", "bench@example.test", "-t", "rcpt@partner.test", "127.0.0.1:%d" % port],
                   check=True, stdout=subprocess.DEVNULL)
    return time.time() - t0


def steady_sender(port, rate, seconds, threads=4):
    """`rate` messages a second for `seconds`, over persistent sessions."""
    body = ("Subject: steady\r\n\r\n" + ("x" * 76 + "\r\n") * (SIZE // 78)).encode()
    per = rate / threads
    sent = [0] * threads

    def worker(i):
        c = smtplib.SMTP("127.0.0.1", port)
        c.ehlo("steady.bench")
        start = time.time()
        while time.time() - start < seconds:
            due = start + sent[i] / per
            if time.time() < due:
                time.sleep(due - time.time())
            c.sendmail("steady@example.test", ["rcpt@partner.test"], body)
            sent[i] += 1
        c.quit()

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(sent)


def wait_queue(relay, want, timeout):
    end = time.time() + timeout
    while time.time() < end:
        if relay.metrics().get("smartrelay_queue_messages", -1) <= want:
            return True
        time.sleep(0.25)
    return False


def rate_between(samples, lo, hi):
    """Accept rate over the samples whose accepted count is within [lo, hi)."""
    s = [x for x in samples if lo <= x["accepted"] < hi]
    if len(s) < 2 or s[-1]["t"] == s[0]["t"]:
        return None
    return (s[-1]["accepted"] - s[0]["accepted"]) / (s[-1]["t"] - s[0]["t"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=10000)
    ap.add_argument("--large", type=int, default=100000)
    ap.add_argument("--outage-rate", type=int, default=200)
    ap.add_argument("--outage", type=int, default=30, help="seconds the smart host is away")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="smartrelay-backlog.")
    os.chmod(work, 0o755)
    results, charts = {}, {}
    try:
        # fresh: the reference.
        sink = Sink(work, free_port())
        r = Relay(work, "fresh", sink.port)
        io0 = r.proc_io()["write_bytes"]
        n = 10000
        secs = smtp_source(r.port, n)
        fresh_rate = n / secs
        fresh_wa = (r.proc_io()["write_bytes"] - io0) / (n * SIZE)
        r.stop()
        sink.stop()
        print("fresh: %.0f msg/s, %.2f bytes written per byte" % (fresh_rate, fresh_wa), flush=True)

        for n in (args.small, args.large):
            label = "slow-%dk" % (n // 1000)
            sink = Sink(work, free_port(), delay=2)
            r = Relay(work, label, sink.port)
            io0 = r.proc_io()["write_bytes"]
            samp = Sampler(r, label)
            samp.start()
            secs = smtp_source(r.port, n)
            samp.stop()
            written = r.proc_io()["write_bytes"] - io0
            depth = r.metrics().get("smartrelay_queue_messages", 0)
            res = {
                "n": n,
                "rate": n / secs,
                "late_rate": rate_between(samp.samples, 0.75 * n, n + 1),
                "wa": written / (n * SIZE),
                "hwm_mb": r.hwm_kb() / 1024,
                "depth": depth,
            }
            charts[label] = samp.samples
            print("%s: %.0f msg/s overall, %.0f msg/s in the last quarter, WA %.2f, peak RSS %.0f MiB, backlog %d"
                  % (label, res["rate"], res["late_rate"] or 0, res["wa"], res["hwm_mb"], depth), flush=True)
            if n == args.large:
                # Restart with the queue full, against a fast smart host, and drain.
                res["stop_s"] = r.stop()
                sink.stop()
                fast = Sink(work, free_port())
                r2 = Relay(work, label + "-restart", fast.port, spool=r.spool)
                res["ready_s"] = r2.ready_after
                res["recovered"] = r2.metrics().get("smartrelay_queue_messages", 0)
                samp = Sampler(r2, "drain")
                samp.start()
                t0 = time.time()
                drained = wait_queue(r2, 0, 1800)
                res["drain_s"] = time.time() - t0 if drained else None
                samp.stop()
                res["drain_hwm_mb"] = r2.hwm_kb() / 1024
                charts["restart-drain"] = samp.samples
                print("restart: ready in %.2f s with %d queued; drained in %s s; peak RSS %.0f MiB"
                      % (res["ready_s"], res["recovered"], res["drain_s"], res["drain_hwm_mb"]), flush=True)
                r2.stop()
                fast.stop()
            else:
                r.stop()
                sink.stop()
            results[label] = res

        # outage: steady input, the smart host away for a while.
        port = free_port()
        sink = Sink(work, port)
        r = Relay(work, "outage", port)
        io0 = r.proc_io()["write_bytes"]
        samp = Sampler(r, "outage")
        samp.start()
        total = args.outage + 40
        box = {}
        sender = threading.Thread(target=lambda: box.update(sent=steady_sender(r.port, args.outage_rate, total)))
        sender.start()
        time.sleep(10)
        sink.stop()
        away = time.time()
        time.sleep(args.outage)
        sink = Sink(work, port)
        back = time.time()
        sender.join()
        drained = wait_queue(r, 0, 600)
        samp.stop()
        sent = box.get("sent", 0)
        outage = {
            "rate": args.outage_rate,
            "sent": sent,
            "peak": max(s["queue"] for s in samp.samples),
            "drain_s": (time.time() - back) if drained else None,
            "wa": (r.proc_io()["write_bytes"] - io0) / max(1, sent * SIZE),
            "hwm_mb": r.hwm_kb() / 1024,
            "during": rate_between([s for s in samp.samples if away - samp.t0 <= s["t"] <= back - samp.t0], 0, 1e12),
        }
        charts["outage"] = samp.samples
        results["outage"] = outage
        print("outage: %d sent at %d/s, peak backlog %d, accepted %.0f msg/s while away, back to empty %.0f s after the smart host returned"
              % (sent, args.outage_rate, outage["peak"], outage["during"] or 0, outage["drain_s"] or -1), flush=True)
        r.stop()
        sink.stop()
    finally:
        subprocess.run(["pkill", "-f", work], stderr=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)

    write_report(args, fresh_rate, fresh_wa, results)
    draw(charts)


def fmt(v, spec="%.2f"):
    return "n/a" if v is None else spec % v


def write_report(args, fresh_rate, fresh_wa, res):
    out = os.path.join(ROOT, "benches/results/backlog.md")
    s, l, o = res["slow-%dk" % (args.small // 1000)], res["slow-%dk" % (args.large // 1000)], res["outage"]
    lines = [
        "# Backlog benchmark: a slow or missing smart host",
        "",
        "Command: `benches/backlog.sh` (%s, %d cores, release build). Messages of %d octets from"
        % (time.strftime("%Y-%m-%d"), os.cpu_count(), SIZE),
        "`smtp-source -s %d -d` as fast as it goes; the slow smart host is `smtp-sink -w 2` (2 s per"
        % SESSIONS,
        "DATA). Write amplification is `write_bytes` of `/proc/PID/io` over the octets accepted; peak",
        "RSS is `VmHWM`. Rates are ratios against the fresh rate of the same run (%.0f msg/s into an"
        % fresh_rate,
        "empty queue with a fast smart host; its write amplification: %.2f)." % fresh_wa,
        "",
        "| scenario | accept rate / fresh | last quarter / fresh | write amplification | peak RSS | backlog at end |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in (("slow, %d messages" % s["n"], s), ("slow, %d messages" % l["n"], l)):
        lines.append("| %s | %.2f | %s | %.2f | %.0f MiB | %d |" % (
            label, r["rate"] / fresh_rate, fmt(r["late_rate"] and r["late_rate"] / fresh_rate),
            r["wa"], r["hwm_mb"], r["depth"]))
    lines += [
        "",
        "| with %d queued | |" % l.get("recovered", 0),
        "|---|---|",
        "| SIGTERM to exit | %s s |" % fmt(l.get("stop_s")),
        "| restart to ready (`/readyz` 200) | %s s |" % fmt(l.get("ready_s")),
        "| drain to a fast smart host | %s s (%s msg/s) |" % (
            fmt(l.get("drain_s"), "%.0f"),
            fmt(l.get("drain_s") and l.get("recovered", 0) / l["drain_s"], "%.0f")),
        "| peak RSS while draining | %.0f MiB |" % l.get("drain_hwm_mb", 0),
        "",
        "Outage: %d msg/s of steady input for %d s; the smart host is away for %d s from the tenth"
        % (o["rate"], args.outage + 40, args.outage),
        "second. Accepted while it was away: %s msg/s (%s of the offered rate). Peak backlog %d;"
        % (fmt(o["during"], "%.0f"), fmt(o["during"] and o["during"] / o["rate"]), o["peak"]),
        "the queue was empty again %s s after the smart host returned (deferred messages wait for"
        % fmt(o["drain_s"], "%.0f"),
        "their first retry, 1 min). Write amplification %.2f, peak RSS %.0f MiB." % (o["wa"], o["hwm_mb"]),
        "",
        "![queue depth, accept rate and RSS over time](backlog.png)",
        "",
    ]
    with open(out, "w") as f:
        f.write("\n".join(lines))
    print("wrote", out)


def draw(charts):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (apt-get install python3-matplotlib): no chart", file=sys.stderr)
        return
    fig, axes = plt.subplots(3, 1, figsize=(10, 10), sharex=False)
    for label, samples in charts.items():
        if len(samples) < 2:
            continue
        t = [s["t"] for s in samples]
        axes[0].plot(t, [s["queue"] for s in samples], label=label)
        rates = [0.0] + [
            (b["accepted"] - a["accepted"]) / max(1e-9, b["t"] - a["t"]) for a, b in zip(samples, samples[1:])
        ]
        axes[1].plot(t, rates, label=label)
        axes[2].plot(t, [s["rss"] for s in samples], label=label)
    axes[0].set_ylabel("queued messages")
    axes[1].set_ylabel("accepted msg/s")
    axes[2].set_ylabel("RSS (MiB)")
    axes[2].set_xlabel("seconds since the scenario started")
    for a in axes:
        a.grid(True, alpha=0.3)
        a.legend(loc="upper right", fontsize=8)
    fig.suptitle("smartrelay with a slow or missing smart host (benches/backlog.sh)")
    fig.tight_layout()
    out = os.path.join(ROOT, "benches/results/backlog.png")
    fig.savefig(out, dpi=90)
    print("wrote", out)


if __name__ == "__main__":
    main()
