//! The admin listener against the browser, from outside: pages of other origins (a
//! different site, and the same site on another port) that try to Share, Confirm, Flush
//! and Reload through an administrator's real headless Chromium change nothing; the
//! dashboard's own forms still work; a foreign `Host` is refused; sign-in sets a session
//! (never the token), expires and backs off; Share is rate-limited.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::*;

const T: Duration = Duration::from_secs(30);
const TOKEN: &str = "admin-s3cret-token";

/// The directory comes first so that it goes last, after the relay has stopped.
fn relay(name: &str, token: Option<&str>) -> (TestDir, Relay, Upstream, support::dns::Dns) {
    let dir = tmpdir(name);
    let up = Upstream::start(&dir, &[]);
    // A DNS server that answers at once (nothing is published): the dashboard's SPF
    // checks cost no time.
    let dns = support::dns::Dns::start(&[]);
    let mut cfg = Cfg::new(&dir, &up.addr())
        .set("admin", "share_rate", "\"3/1h\"")
        .set("dns", "nameservers", &format!("[\"{}\"]", dns.addr));
    if let Some(t) = token {
        cfg = cfg.set("admin", "token", &format!("\"{t}\""));
    }
    let relay = Relay::start(&cfg);
    (dir, relay, up, dns)
}

fn refused_origin(relay: &Relay) -> f64 {
    relay
        .metric("smartrelay_admin_requests_refused_total{reason=\"origin\"}")
        .unwrap_or(0.0)
}

/// Runs the browser script; its JSON report.
fn browser(relay: &Relay, token: Option<&str>, evil: &[String], own: bool) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/csrf_browser.py");
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg(script).arg(relay.url(""));
    if let Some(t) = token {
        cmd.args(["--token", t]);
    }
    for e in evil {
        cmd.args(["--evil", e]);
    }
    if own {
        cmd.arg("--own");
    }
    let out = cmd.output().expect("python3 with selenium");
    assert!(
        out.status.success(),
        "browser: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Nothing the evil pages asked for happened: no Share queued, no confirmation, no
/// reload, no flush.
fn nothing_happened(relay: &Relay) {
    assert!(relay.queue().is_empty(), "a Share was queued");
    assert_eq!(
        relay.get("/api/v1/onboarding/outbound-ips").1["confirmed"],
        false
    );
    assert_eq!(
        relay
            .metric("smartrelay_config_reloads_total")
            .unwrap_or(0.0),
        0.0
    );
    assert!(!relay
        .log_json()
        .iter()
        .any(|l| l["message"] == "queue flushed by administrator"));
}

fn evil_pages() -> Vec<String> {
    vec![
        // Another site.
        format!("http://127.0.0.2:{}/evil.html", free_port()),
        // The same site (127.0.0.1), another port: SameSite cookies go along.
        format!("http://127.0.0.1:{}/evil.html", free_port()),
    ]
}

#[test]
fn pages_of_other_origins_drive_nothing_without_a_token() {
    let (_dir, relay, up, _dns) = relay("csrf-open", None);
    let report = browser(&relay, None, &evil_pages(), false);
    assert_eq!(
        report["evil"],
        serde_json::json!(["sent", "sent"]),
        "{report}"
    );
    // Each page sent seven requests; every one was refused for its origin.
    assert!(
        wait_until(T, || refused_origin(&relay) >= 14.0),
        "refused: {}",
        refused_origin(&relay)
    );
    nothing_happened(&relay);
    // The dashboard's own forms still work, in the same browser.
    let report = browser(&relay, None, &[], true);
    assert_eq!(report["confirmed_page"], true, "{report}");
    assert_eq!(report["shared_page"], true, "{report}");
    assert_eq!(up.wait_messages(1, T).len(), 1, "the Share went out");
}

#[test]
fn pages_of_other_origins_drive_nothing_when_signed_in() {
    let (_dir, relay, _up, _dns) = relay("csrf-token", Some(TOKEN));
    let report = browser(&relay, Some(TOKEN), &evil_pages(), true);
    assert_eq!(report["signed_in"], true, "{report}");
    assert_eq!(report["cookie_is_token"], false, "{report}");
    assert_eq!(
        report["evil"],
        serde_json::json!(["sent", "sent"]),
        "{report}"
    );
    let refused = |reason: &str| -> f64 {
        let (_, m) = http_text("GET", &relay.url("/metrics"), Some(TOKEN));
        m.lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "smartrelay_admin_requests_refused_total{{reason=\"{reason}\"}} "
                ))
            })
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    assert!(
        wait_until(T, || refused("origin") >= 14.0),
        "origin {}, csrf {}",
        refused("origin"),
        refused("csrf")
    );
    // The own forms (after the evil pages) did their job...
    assert_eq!(report["confirmed_page"], true, "{report}");
    assert_eq!(report["shared_page"], true, "{report}");
    assert_eq!(report["after_logout"], true, "{report}");
    // ...and nothing else happened: one Share (the own one), no reload, no flush.
    let queued = || http("GET", &relay.url("/api/v1/queue"), Some(TOKEN)).1["count"].as_u64();
    assert!(wait_until(T, || queued().is_some_and(|n| n <= 1)));
    assert!(!relay
        .log_json()
        .iter()
        .any(|l| l["message"] == "configuration reloaded"));
    assert!(!relay
        .log_json()
        .iter()
        .any(|l| l["message"] == "queue flushed by administrator"));
}

/// One raw HTTP/1.1 request; the status line and the headers, lower-case.
fn raw(relay: &Relay, head: &str) -> (u16, String) {
    let mut s = TcpStream::connect(relay.admin).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out.to_ascii_lowercase())
}

#[test]
fn a_foreign_host_is_misdirected_and_pages_carry_their_policy() {
    let (_dir, relay, _up, _dns) = relay("admin-host", None);
    let port = relay.admin.port();
    // DNS rebinding: a name that resolves to us, in a page of its own origin.
    let (status, _) = raw(
        &relay,
        &format!(
            "GET /api/v1/queue HTTP/1.1\r\nHost: attacker.test:{port}\r\nConnection: close\r\n\r\n"
        ),
    );
    assert_eq!(status, 421);
    let (status, _) = raw(
        &relay,
        "GET /api/v1/trusted-senders HTTP/1.1\r\nHost: rebind.attacker.test\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 421);
    for host in [format!("127.0.0.1:{port}"), format!("localhost:{port}")] {
        let (status, text) = raw(
            &relay,
            &format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        );
        assert_eq!(status, 200, "{host}");
        assert!(text.contains(
            "content-security-policy: default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"
        ));
        assert!(text.contains("x-frame-options: deny"));
    }
    // Health checks answer whatever the name (orchestrators probe by service name).
    let (status, _) = raw(
        &relay,
        "GET /healthz HTTP/1.1\r\nHost: smartrelay.svc\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200);
    // A name the administrator lists in admin.hosts is the admin's own.
    let dir = tmpdir("admin-hosts");
    let named = Relay::start(&Cfg::new(&dir, "127.0.0.1:9").set(
        "admin",
        "hosts",
        "[\"relay.example.test\"]",
    ));
    let (status, _) = raw(
        &named,
        &format!(
            "GET /api/v1/queue HTTP/1.1\r\nHost: relay.example.test:{}\r\nConnection: close\r\n\r\n",
            named.admin.port()
        ),
    );
    assert_eq!(status, 200);
    assert_eq!(
        relay
            .metric("smartrelay_admin_requests_refused_total{reason=\"host\"}")
            .unwrap_or(0.0),
        2.0
    );
}

#[test]
fn sign_in_is_a_session_that_expires_and_wrong_tokens_back_off() {
    let dir = tmpdir("admin-session");
    // A DNS server that answers at once: the page's SPF checks take no time from the
    // short session.
    let dns = support::dns::Dns::start(&[]);
    let relay = Relay::start(
        &Cfg::new(&dir, "127.0.0.1:9")
            .set("admin", "token", &format!("\"{TOKEN}\""))
            .set("admin", "session_ttl", "\"3s\"")
            .set("dns", "nameservers", &format!("[\"{}\"]", dns.addr)),
    );
    let page = Dashboard::open(&relay, Some(TOKEN));
    assert!(!page.cookie.contains(TOKEN), "the cookie is not the token");
    let get_with = |cookie: &str| -> u16 {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        agent
            .get(&relay.url("/api/v1/queue"))
            .header("Cookie", cookie)
            .call()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(get_with(&page.cookie), 200);
    // The token itself as a cookie, as older relays set it, is nothing.
    assert_eq!(get_with(&format!("smartrelay_token={TOKEN}")), 401);
    assert!(
        wait_until(T, || get_with(&page.cookie) == 401),
        "the session expires"
    );
    // Signing out forgets the session at once.
    let page = Dashboard::open(&relay, Some(TOKEN));
    assert_eq!(get_with(&page.cookie), 200);
    assert_eq!(page.post_form("/logout", &[]).0, 303);
    assert_eq!(get_with(&page.cookie), 401);

    // Wrong tokens: after the first, the client waits before the next try.
    let login = |token: &str| -> u16 {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .build()
            .into();
        agent
            .post(&relay.url("/login"))
            .send_form([("token", token)])
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(login("wrong-1"), 401);
    let burst: Vec<u16> = (0..20).map(|i| login(&format!("wrong-{i}"))).collect();
    assert!(burst.iter().all(|s| *s == 429), "{burst:?}");
    assert_eq!(login(TOKEN), 429, "even the right token waits its turn");
    assert!(relay.wait_log(T, |l| l["message"] == "admin sign-in with a wrong token"));
    let wrong = relay
        .log_json()
        .iter()
        .filter(|l| l["message"] == "admin sign-in with a wrong token")
        .count();
    assert_eq!(wrong, 1, "only the first wrong token was tried");
    // Bearer tokens count too.
    let (status, _) = http("GET", &relay.url("/api/v1/queue"), Some("wrong"));
    assert_eq!(status, 429);
}

#[test]
fn share_is_rate_limited() {
    let (_dir, relay, up, _dns) = relay("admin-share-rate", None);
    let share = |to: &str| {
        post_json(
            &relay.url("/api/v1/onboarding/share"),
            &serde_json::json!({ "to": to }),
        )
    };
    // A refused request takes nothing of the rate.
    assert_eq!(share("not an address").0, 400);
    for i in 0..3 {
        assert_eq!(share(&format!("dns{i}@partner.test")).0, 202);
    }
    let (status, body) = share("dns4@partner.test");
    assert_eq!(status, 429, "{body}");
    assert!(body.to_string().contains("admin.share_rate"), "{body}");
    assert!(relay.wait_queue_empty(T));
    assert_eq!(up.messages().len(), 3, "three Shares went out, not four");
}
