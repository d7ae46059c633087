//! Observability: Prometheus metrics (parsed by a real Prometheus parser), health and
//! readiness, structured logs, the Grafana dashboard's queries, and the HTML dashboard
//! in a real browser (headless Chromium).

mod support;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::dns::Dns;
use support::*;

const T: Duration = Duration::from_secs(20);

/// Parses the exposition with prometheus_client's parser: {name{labels}: value}.
fn scrape(relay: &Relay) -> HashMap<String, f64> {
    let (s, text) = http_text("GET", &relay.url("/metrics"), None);
    assert_eq!(s, 200);
    let path = relay.dir.join(format!(
        "metrics-{}.txt",
        std::time::Instant::now().elapsed().as_nanos()
    ));
    std::fs::write(&path, &text).unwrap();
    let out = python(&format!(
        r#"
import json
from prometheus_client.parser import text_string_to_metric_families
out = {{}}
for fam in text_string_to_metric_families(open(r"{}").read()):
    for s in fam.samples:
        labels = ",".join("%s=%s" % kv for kv in sorted(s.labels.items()))
        out["%s{{%s}}" % (s.name, labels)] = s.value
print(json.dumps(out))
"#,
        path.display()
    ));
    serde_json::from_str(&out).unwrap()
}

fn get(m: &HashMap<String, f64>, key: &str) -> f64 {
    m.get(key).copied().unwrap_or(0.0)
}

fn traffic_relay(dir: &std::path::Path, up: &Upstream) -> Relay {
    let cfg = Cfg::new(dir, "x:25")
        .set("access", "allowed_ranges", "[\"127.0.0.1/32\"]")
        .set(
            "routing.regions.eu",
            "hosts",
            &format!("[\"127.0.0.1:{}\", \"{}\"]", free_port(), up.addr()),
        );
    Relay::start(&cfg)
}

#[test]
fn metrics_parse_and_move_with_traffic() {
    let dir = tmpdir("metrics");
    let up = Upstream::start(
        &dir,
        &["--reply", "bad@partner.test=550 5.1.1 No such user"],
    );
    let relay = traffic_relay(&dir, &up);
    let before = scrape(&relay);
    assert_eq!(
        get(&before, "smartrelay_messages_accepted_total{}"),
        0.0,
        "series exist from the start"
    );
    let mut c = Smtp::connect(relay.smtp);
    c.greet();
    queued_id(&c.mail(
        "alice@example.test",
        &["bob@partner.test", "bad@partner.test"],
        "Subject: one\r\n\r\nx",
    ));
    queued_id(&c.mail(
        "alice@example.test",
        &["carol@partner.test"],
        "Subject: two\r\n\r\nx",
    ));
    assert_eq!(c.cmd("MAIL FROM:<eve@elsewhere.test>").code, 550);
    let mut refused = Smtp::connect_from("127.0.0.2".parse().unwrap(), relay.smtp);
    assert_eq!(refused.reply().code, 554);
    assert!(up.wait_messages(3, T).len() >= 3, "two messages and a DSN");
    assert!(relay.wait_queue_empty(T));
    let after = scrape(&relay);
    let delta = |k: &str| get(&after, k) - get(&before, k);
    assert_eq!(
        delta("smartrelay_messages_accepted_total{}"),
        2.0,
        "from clients; the DSN is ours"
    );
    assert_eq!(
        delta("smartrelay_connections_refused_total{reason=ip_not_allowed}"),
        1.0
    );
    assert_eq!(
        delta("smartrelay_messages_refused_total{reason=5.7.1,stage=mail}"),
        1.0
    );
    assert_eq!(delta("smartrelay_dsn_sent_total{action=failed}"), 1.0);
    assert!(get(&after, "smartrelay_accept_latency_seconds_count{}") >= 2.0);
    // Two messages, a DSN and delivery states went through the spool's commits.
    assert!(delta("smartrelay_spool_commits_total{}") >= 1.0);
    assert!(delta("smartrelay_spool_records_total{}") >= 4.0);
    assert!(get(&after, "smartrelay_spool_sync_seconds_count{}") >= 1.0);
    assert!(get(&after, "smartrelay_spool_bytes{}") > 100.0);
    assert!(get(&after, "smartrelay_spool_segments{}") >= 1.0);
    assert!(get(&after, "smartrelay_received_bytes_total{}") > 100.0);
    let host = up.addr();
    let sum_outcome = |o: &str| -> f64 {
        after
            .iter()
            .filter(|(k, _)| {
                k.starts_with("smartrelay_delivery_recipients_total{")
                    && k.contains(&format!("outcome={o}"))
                    && k.contains(&host)
            })
            .map(|(_, v)| v)
            .sum()
    };
    assert_eq!(sum_outcome("delivered"), 3.0);
    assert_eq!(sum_outcome("bounced"), 1.0);
    assert!(
        after.keys().any(
            |k| k.starts_with("smartrelay_upstream_connection_failures_total{")
                && k.contains("route=eu")
        ),
        "the dead host counted"
    );
    assert!(after
        .keys()
        .any(|k| k.starts_with("smartrelay_routing_decisions_total{")
            && k.contains("spf=not_checked")));
    assert!(after
        .keys()
        .any(|k| k.starts_with("smartrelay_upstream_transaction_seconds_count{route=eu")));
    assert_eq!(get(&after, "smartrelay_queue_messages{}"), 0.0);
    // Label values come from small fixed sets: never an address or a queue ID.
    for k in after.keys() {
        assert!(!k.contains('@'), "address in a label: {k}");
    }
}

#[test]
fn grafana_dashboard_queries_known_metrics() {
    let dir = tmpdir("grafana");
    let up = Upstream::start(
        &dir,
        &["--reply", "bad@partner.test=550 5.1.1 No such user"],
    );
    let relay = traffic_relay(&dir, &up);
    let mut c = Smtp::connect(relay.smtp);
    c.greet();
    queued_id(&c.mail(
        "alice@example.test",
        &["bob@partner.test", "bad@partner.test"],
        "Subject: one\r\n\r\nx",
    ));
    assert_eq!(c.cmd("MAIL FROM:<eve@elsewhere.test>").code, 550);
    up.wait_messages(2, T);
    assert!(relay.wait_queue_empty(T));
    relay.get("/api/v1/onboarding");
    let (_, text) = http_text("GET", &relay.url("/metrics"), None);
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/grafana/smartrelay.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut names = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            for (i, _) in expr.match_indices("smartrelay_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                names.push(name);
            }
        }
    }
    assert!(names.len() > 20);
    for n in names {
        let base = n.trim_end_matches("_bucket");
        assert!(
            text.contains(&format!("\n{base}")),
            "the dashboard queries {n}, which /metrics does not export"
        );
    }
}

#[test]
fn health_and_readiness() {
    let dir = tmpdir("health");
    let relay = Relay::start(&Cfg::new(&dir, "127.0.0.1:2"));
    assert_eq!(
        http_text("GET", &relay.url("/healthz"), None),
        (200, "ok\n".to_string())
    );
    let (s, v) = relay.get("/readyz");
    assert_eq!((s, v["ready"].clone()), (200, Value::Bool(true)));
    // The spool stops taking new files (its probe path is taken by a directory): not
    // ready, and it says why.
    let probe = dir.join("spool/log/probe");
    std::fs::create_dir(&probe).unwrap();
    let (s, v) = relay.get("/readyz");
    assert_eq!(s, 503);
    assert!(
        v["failing"][0].as_str().unwrap().starts_with("queue:"),
        "{v}"
    );
    std::fs::remove_dir(&probe).unwrap();
    assert_eq!(relay.get("/readyz").0, 200);
}

#[test]
fn one_log_line_per_message_event_keyed_by_queue_id() {
    let dir = tmpdir("logs");
    let up = Upstream::start(&dir, &[]);
    let relay = Relay::start(&Cfg::new(&dir, &up.addr()));
    let mut c = Smtp::connect(relay.smtp);
    c.greet();
    let id = queued_id(&c.mail(
        "alice@example.test",
        &["bob@partner.test"],
        "Subject: log\r\n\r\nx",
    ));
    assert!(relay.wait_queue_empty(T));
    assert!(relay.wait_log(T, |l| l["message"] == "removed"));
    let mine: Vec<Value> = relay
        .log_json()
        .into_iter()
        .filter(|l| l["queue_id"] == id.as_str())
        .collect();
    let events: Vec<&str> = mine
        .iter()
        .map(|l| l["message"].as_str().unwrap())
        .collect();
    assert!(
        events[0]
            .starts_with("accepted client=[127.0.0.1] from=<alice@example.test> nrcpt=1 size="),
        "{events:?}"
    );
    assert!(events[0].ends_with("tls=false"));
    assert!(
        events.contains(&"routed") && events.contains(&"delivery") && events.contains(&"removed"),
        "{events:?}"
    );
    let routed = mine.iter().find(|l| l["message"] == "routed").unwrap();
    assert_eq!(
        (routed["route"].as_str(), routed["spf"].as_str()),
        (Some("eu"), Some("not_checked"))
    );
    let delivered = mine.iter().find(|l| l["message"] == "delivery").unwrap();
    assert_eq!(delivered["status"], "sent");
    assert_eq!(delivered["to"], "bob@partner.test");
    assert_eq!(delivered["relay"], up.addr().as_str());
    assert!(delivered["reply"].as_str().unwrap().starts_with("250"));
    assert!(mine
        .iter()
        .all(|l| l["level"] == "INFO" && l["timestamp"].is_string()));

    // Text format, for people.
    let dir = tmpdir("logs-text");
    let path = Cfg::new(&dir, "127.0.0.1:2").write();
    let mut child = Command::new(bin())
        .args(["run", "--config"])
        .arg(&path)
        .args(["--log-format", "text"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = lines.clone();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            sink.lock().unwrap().push(l);
        }
    });
    let ready = wait_until(Duration::from_secs(30), || {
        lines.lock().unwrap().iter().any(|l| l.contains("ready"))
    });
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    reader.join().unwrap();
    let text = lines.lock().unwrap().join("\n");
    assert!(ready, "{text}");
    assert!(
        text.contains("INFO") && text.contains("smtp listening addr=127.0.0.1:"),
        "{text}"
    );
    assert!(!text.contains('\u{1b}'), "no terminal colours in a pipe");
}

fn chromium(args: &[&str], url: &str, profile: &std::path::Path) -> String {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .expect("chromium (Debian package)");
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn dashboard_in_a_real_browser() {
    let dir = tmpdir("dashboard");
    let dns = Dns::start(&[
        ("mimecast.com", "eu._netblocks IN TXT \"v=spf1 ip4:198.51.100.0/24 ~all\"\n"),
        ("test", "example IN TXT \"v=spf1 include:eu._netblocks.mimecast.com -all\"\nbroken IN TXT \"v=spf1 ip4:192.0.2.1 include:eu._netblocks.mimecast.com ~all\"\n"),
    ]);
    let up = Upstream::start(&dir, &[]);
    let cfg = Cfg::new(&dir, &up.addr())
        .set("access", "domains", "[\"example.test\", \"broken.test\"]")
        .set("dns", "nameservers", &format!("[\"{}\"]", dns.addr));
    let relay = Relay::start(&cfg);
    let mut c = Smtp::connect(relay.smtp);
    c.greet();
    queued_id(&c.mail(
        "alice@example.test",
        &["bob@partner.test"],
        "Subject: hi\r\n\r\nx",
    ));
    assert!(relay.wait_queue_empty(T));
    assert!(wait_until(T, || relay.get("/api/v1/onboarding/summary").1
        ["delivered"]
        == 1));
    let profile = dir.join("chromium-profile");
    let dom = chromium(&["--dump-dom"], &relay.url("/"), &profile);
    assert!(dom.contains("smartrelay on relay.test"), "{dom}");
    assert!(dom.contains(r#"data-step="domains" data-state="done""#));
    assert!(dom.contains(r#"data-step="spf:example.test" data-state="done""#));
    assert!(dom.contains(r#"data-step="spf:broken.test" data-state="failing""#));
    assert!(dom.contains(r#"<span class="bang">!</span> not valid SPF for broken.test"#));
    assert!(dom.contains(r#"<span class="tick">✔</span> valid SPF for example.test"#));
    assert!(dom.contains(r#"data-code="gateway_include_not_first""#));
    // The receivers' verdict, range by range.
    assert!(
        dom.contains(r#"class="gateway-pass" data-verdict="all""#),
        "{dom}"
    );
    assert!(dom.contains("<td>198.51.100.0/24</td><td>198.51.100.1</td><td>pass</td>"));
    assert!(
        dom.contains("v=spf1 include:eu._netblocks.mimecast.com ip4:192.0.2.1 ~all"),
        "recommended record shown"
    );
    assert!(dom.contains(r#"data-step="outbound_ips" data-state="todo""#));
    assert!(dom.contains("Confirm these ranges"));
    assert!(dom.contains(r#"data-step="mail_flowing" data-state="done""#));
    assert!(dom.contains("1 accepted, 1 delivered"));
    assert!(dom.contains("0 message(s) queued"));
    assert!(dom.contains("1 addresses in 1 domains learned"));
    // The Confirm button posts a form (with its session's CSRF token); the page then
    // shows the step done. The same form without the token is refused.
    let page = Dashboard::open(&relay, None);
    let forged = post_body(
        &relay.url("/api/v1/onboarding/outbound-ips/confirm"),
        "application/x-www-form-urlencoded",
        "confirm=1",
    );
    assert_eq!(forged.0, 403, "{}", forged.1);
    let (status, _) = page.post_form(
        "/api/v1/onboarding/outbound-ips/confirm",
        &[("confirm", "1")],
    );
    assert_eq!(status, 303);
    let dom = chromium(&["--dump-dom"], &relay.url("/"), &profile);
    assert!(dom.contains(r#"data-step="outbound_ips" data-state="done""#));
    // A screenshot for people who want to look.
    let shot = dir.join("dashboard.png");
    chromium(
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1280,2000",
        ],
        &relay.url("/"),
        &profile,
    );
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000);
}

/// The container's HEALTHCHECK, exactly as the Dockerfile has it (the admin port
/// aside), passes against a running relay and fails once it is gone.
#[test]
fn dockerfile_health_check_follows_the_relay() {
    let dockerfile =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).unwrap();
    let line = dockerfile
        .lines()
        .find(|l| l.starts_with("HEALTHCHECK"))
        .expect("a HEALTHCHECK");
    let exec: Vec<String> =
        serde_json::from_str(line[line.find("CMD").unwrap() + 3..].trim()).expect("exec form");
    let dir = tmpdir("docker-health");
    let mut relay = Relay::start(&Cfg::new(&dir, "127.0.0.1:2"));
    let port = relay.admin.port().to_string();
    let run = |exec: &[String]| {
        let args: Vec<String> = exec.iter().map(|a| a.replace("8025", &port)).collect();
        std::process::Command::new(&args[0])
            .args(&args[1..])
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    assert!(run(&exec), "healthy relay reported unhealthy: {exec:?}");
    relay.stop();
    assert!(!run(&exec));
}

/// The remote panic found in the field: a multi-byte character right after the verb.
/// Every such line gets a 501 and the session goes on; once the clients have gone, the
/// session gauge is back at zero and no panic was counted.
#[test]
fn non_ascii_commands_get_a_reply_and_leave_the_gauges_true() {
    let dir = tmpdir("obs-nonascii");
    let cfg = Cfg::new(&dir, &format!("127.0.0.1:{}", free_port()));
    let relay = Relay::start(&cfg);
    for i in 0..20 {
        let mut c = Smtp::connect(relay.smtp);
        c.greet();
        c.expect("EHLO client.test", 250);
        c.expect("MAIL FROM:<alice@example.test>", 250);
        let bad = [
            "RCPT T\u{f6}:<a@b.c>",
            "RCPT \u{20ac}",
            "MAIL FR\u{f6}M:<x@y.z>",
        ][i % 3];
        let r = c.cmd(bad);
        assert_eq!(r.code, 501, "{bad}: {}", r.text());
        c.expect("RSET", 250);
        c.expect("QUIT", 221);
    }
    let settled = wait_until(T, || {
        let m = scrape(&relay);
        get(&m, "smartrelay_sessions_active{}") == 0.0
    });
    assert!(settled, "sessions_active did not return to 0");
    let m = scrape(&relay);
    assert_eq!(get(&m, "smartrelay_session_panics_total{}"), 0.0);
    assert!(m.contains_key("smartrelay_session_panics_total{}"));
}
