//! Reload without restart, driven from outside: `POST /api/v1/reload`, SIGHUP and
//! `smartrelay reload` against the release-style binary, with real SMTP clients, real
//! upstreams and a real TLS client (openssl s_client).

mod support;

use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use support::*;

fn ip(t: &str) -> IpAddr {
    t.parse().unwrap()
}

fn sha256_hex(path: &std::path::Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

/// What systemd's `ExecReload` does.
fn hup(relay: &Relay) {
    let sent = Command::new("kill")
        .args(["-HUP", &relay.pid().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// New ranges and a new route apply to new connections and new delivery attempts; a
/// session opened before the reload finishes under the rules it started with.
#[test]
fn ranges_and_routes_apply_to_new_sessions_while_an_open_one_keeps_its_rules() {
    let dir = tmpdir("reload-apply");
    let (a, b) = (Upstream::start(&dir, &[]), Upstream::start(&dir, &[]));
    let before = Cfg::new(&dir, &a.addr())
        .set("access", "allowed_ranges", "[\"127.0.0.1/32\"]")
        .set("server", "max_message_size", "100000");
    let relay = Relay::start(&before);

    let mut open = Smtp::connect_from(ip("127.0.0.1"), relay.smtp);
    assert!(open.greet().text().contains("SIZE 100000"));
    queued_id(&open.mail(
        "alice@example.test",
        &["bob@partner.test"],
        "Subject: before\r\n\r\nx",
    ));
    assert_eq!(a.wait_messages(1, Duration::from_secs(20)).len(), 1);
    let mut refused = Smtp::connect_from(ip("127.0.0.2"), relay.smtp);
    assert_eq!(refused.reply().code, 554);
    let (status, _) = relay.post("/api/v1/onboarding/outbound-ips/confirm");
    assert_eq!(status, 200);

    let after = before
        .clone()
        .set("access", "allowed_ranges", "[\"127.0.0.2/32\"]")
        .set(
            "routing.regions.eu",
            "hosts",
            &format!("[\"{}\"]", b.addr()),
        )
        .set("server", "max_message_size", "200000");
    after.write();
    let (status, v) = relay.post("/api/v1/reload");
    assert_eq!(status, 200, "{v}");
    let applied = strings(&v["applied"]);
    for key in [
        "access.allowed_ranges",
        "routing.regions.eu.hosts",
        "server.max_message_size",
    ] {
        assert!(applied.contains(&key.to_string()), "{key} in {applied:?}");
    }
    assert!(strings(&v["restart_required"]).is_empty(), "{v}");
    assert_eq!(v["hash"], sha256_hex(&relay.config));

    // New connections: the new ranges.
    let mut gone = Smtp::connect_from(ip("127.0.0.1"), relay.smtp);
    assert_eq!(gone.reply().code, 554);
    let mut new = Smtp::connect_from(ip("127.0.0.2"), relay.smtp);
    assert!(new.greet().text().contains("SIZE 200000"));
    queued_id(&new.mail(
        "alice@example.test",
        &["carol@partner.test"],
        "Subject: new session\r\n\r\nx",
    ));
    // The open session: its address is no longer allowed and its limits are the old
    // ones, and it still finishes; its next message takes the new route.
    assert!(open
        .expect("EHLO client.test", 250)
        .text()
        .contains("SIZE 100000"));
    queued_id(&open.mail(
        "alice@example.test",
        &["dave@partner.test"],
        "Subject: open session\r\n\r\nx",
    ));
    let at_b = b.wait_messages(2, Duration::from_secs(20));
    assert_eq!(at_b.len(), 2);
    assert_eq!(a.messages().len(), 1, "nothing more to the old route");
    assert_eq!(relay.metric("smartrelay_config_reloads_total"), Some(1.0));
    let info = format!(
        "smartrelay_config_info{{hash=\"{}\"}}",
        sha256_hex(&relay.config)
    );
    assert_eq!(relay.metric(&info), Some(1.0));
    // The admin API shows what is in force.
    // The admin API shows what is in force, and the confirmation was for other ranges.
    let (_, ips) = relay.get("/api/v1/onboarding/outbound-ips");
    assert_eq!(ips["ranges"], serde_json::json!(["127.0.0.2/32"]), "{ips}");
    assert_eq!(ips["confirmed"], false, "{ips}");
    assert_eq!(ips["changed_since_confirmation"], true, "{ips}");
    assert_eq!(
        relay.metric("smartrelay_onboarding_outbound_ips_confirmed"),
        Some(0.0)
    );
}

/// A file that does not parse or validate changes nothing: the API answers 422 with
/// the line or the key, SIGHUP and `smartrelay reload` fail the same way, the failures
/// are counted, and mail flows under the previous configuration.
#[test]
fn a_broken_file_keeps_the_old_configuration() {
    let dir = tmpdir("reload-broken");
    let up = Upstream::start(&dir, &[]);
    let cfg = Cfg::new(&dir, &up.addr()).set("access", "allowed_ranges", "[\"127.0.0.1/32\"]");
    let relay = Relay::start(&cfg);

    std::fs::write(&relay.config, "[server\nlisten = ").unwrap();
    let (status, v) = relay.post("/api/v1/reload");
    assert_eq!(status, 422, "{v}");
    assert!(v["error"].as_str().unwrap().contains("line 1"), "{v}");

    std::fs::write(
        &relay.config,
        cfg.clone()
            .set(
                "access",
                "allowed_ranges",
                "[\"127.0.0.2/32\", \"not-a-range\"]",
            )
            .render(),
    )
    .unwrap();
    let (status, v) = relay.post("/api/v1/reload");
    assert_eq!(status, 422, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("access.allowed_ranges"),
        "{v}"
    );
    let out = relay.cli(&["reload"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("422") && stderr.contains("access.allowed_ranges"),
        "{stderr}"
    );
    hup(&relay);
    assert!(relay.wait_log(Duration::from_secs(20), |l| {
        l["message"] == "configuration not reloaded; running on the previous one"
            && l["origin"] == "SIGHUP"
            && l["error"]
                .as_str()
                .is_some_and(|e| e.contains("access.allowed_ranges"))
    }));
    assert_eq!(
        relay.metric("smartrelay_config_reload_failures_total"),
        Some(4.0)
    );
    assert_eq!(relay.metric("smartrelay_config_reloads_total"), None);

    // The old ranges are still the ones in force.
    let mut c = Smtp::connect_from(ip("127.0.0.1"), relay.smtp);
    c.greet();
    queued_id(&c.mail(
        "alice@example.test",
        &["bob@partner.test"],
        "Subject: still\r\n\r\nx",
    ));
    assert_eq!(up.wait_messages(1, Duration::from_secs(20)).len(), 1);
    let mut other = Smtp::connect_from(ip("127.0.0.2"), relay.smtp);
    assert_eq!(other.reply().code, 554);
}

/// SIGHUP (the unit's `ExecReload`) reloads; a key that needs a restart is named in
/// the answer, the log and a gauge, and is not applied.
#[test]
fn sighup_reloads_and_restart_only_keys_are_reported() {
    let dir = tmpdir("reload-hup");
    let up = Upstream::start(&dir, &[]);
    let cfg = Cfg::new(&dir, &up.addr());
    let mut relay = Relay::start(&cfg);
    let other_port = free_port();
    cfg.clone()
        .set("server", "max_recipients", "1")
        .set("server", "listen", &format!("[\"127.0.0.1:{other_port}\"]"))
        .write();
    hup(&relay);
    assert!(relay.wait_log(Duration::from_secs(20), |l| {
        l["message"] == "configuration reloaded" && l["origin"] == "SIGHUP"
    }));
    assert!(relay.wait_log(Duration::from_secs(5), |l| {
        l["message"] == "configuration changed: restart required for it to take effect"
            && l["key"] == "server.listen"
    }));
    assert_eq!(
        relay.metric("smartrelay_config_restart_required"),
        Some(1.0)
    );
    // Applied: the new recipient limit, on the old listener.
    let mut c = Smtp::connect(relay.smtp);
    c.greet();
    c.expect("MAIL FROM:<alice@example.test>", 250);
    c.expect("RCPT TO:<bob@partner.test>", 250);
    assert_eq!(c.cmd("RCPT TO:<carol@partner.test>").code, 452);
    assert!(std::net::TcpStream::connect(("127.0.0.1", other_port)).is_err());

    // The CLI answers the same question.
    let out = relay.cli(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("applied: nothing changed"), "{text}");
    assert!(
        text.contains("restart required for: server.listen"),
        "{text}"
    );
    assert!(relay.stop().success());
}

/// The subject of the certificate a real STARTTLS client is shown.
fn served_subject(relay: &Relay) -> String {
    let script = format!(
        "openssl s_client -starttls smtp -connect {} </dev/null 2>/dev/null | openssl x509 -noout -subject",
        relay.smtp
    );
    let out = Command::new("sh").args(["-c", &script]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A certificate replaced on disk (rotation) is served after a reload, though the
/// configuration file itself did not change.
#[test]
fn a_certificate_swapped_on_disk_is_served_after_reload() {
    let dir = tmpdir("reload-cert");
    let certs = certs(&dir);
    let (cert, key) = (dir.join("served.pem"), dir.join("served.key"));
    std::fs::copy(&certs.cert, &cert).unwrap();
    std::fs::copy(&certs.key, &key).unwrap();
    let up = Upstream::start(&dir, &[]);
    let cfg = Cfg::new(&dir, &up.addr())
        .set("tls", "cert", &format!("\"{}\"", cert.display()))
        .set("tls", "key", &format!("\"{}\"", key.display()));
    let relay = Relay::start(&cfg);
    assert!(served_subject(&relay).contains("CN = localhost"));

    std::fs::copy(&certs.rogue_cert, &cert).unwrap();
    std::fs::copy(&certs.rogue_key, &key).unwrap();
    assert!(
        served_subject(&relay).contains("CN = localhost"),
        "read at reload, not behind the operator's back"
    );
    let (status, v) = relay.post("/api/v1/reload");
    assert_eq!(status, 200, "{v}");
    assert!(strings(&v["applied"]).is_empty(), "the file is unchanged");
    assert!(served_subject(&relay).contains("CN = rogue"));

    // A key that does not match (or is missing) is refused: the last good pair stays.
    std::fs::write(&key, "not a key").unwrap();
    let (status, v) = relay.post("/api/v1/reload");
    assert_eq!(status, 422, "{v}");
    assert!(served_subject(&relay).contains("CN = rogue"));
}

/// `log.level` and the trusted-list exclusions take effect on reload: the `accepted`
/// line stops at `warn` and comes back at `info`, and a sender excluded by the new file
/// teaches the list nothing while one not excluded still does.
#[test]
fn log_level_and_trusted_exclusions_follow_a_reload() {
    let dir = tmpdir("reload-log-trusted");
    let up = Upstream::start(&dir, &[]);
    let cfg = Cfg::new(&dir, &up.addr());
    let relay = Relay::start(&cfg);
    let send = |from: &str, to: &str| {
        let mut c = Smtp::connect(relay.smtp);
        c.greet();
        queued_id(&c.mail(from, &[to], "Subject: t\r\n\r\nx"))
    };
    let accepted_logged = |id: &str| {
        relay.log_json().iter().any(|l| {
            l["queue_id"] == id
                && l["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("accepted"))
        })
    };
    let first = send("alice@example.test", "bob@partner.test");
    assert!(wait_until(Duration::from_secs(20), || accepted_logged(
        &first
    )));

    cfg.clone()
        .set("log", "level", "\"warn\"")
        .set("trusted", "exclude_senders", "[\"carol@example.test\"]")
        .write();
    let (status, v) = relay.post("/api/v1/reload");
    assert_eq!(status, 200, "{v}");
    let applied = strings(&v["applied"]);
    assert!(applied.contains(&"log.level".to_string()), "{applied:?}");
    assert!(
        applied.contains(&"trusted.exclude_senders".to_string()),
        "{applied:?}"
    );
    let second = send("carol@example.test", "dave@partner.test");
    send("erin@example.test", "frank@partner.test");
    // Both delivered and seen by the recorder: the accepted line came long before.
    assert!(wait_until(Duration::from_secs(20), || relay
        .trusted_recorded()
        >= 3.0));
    assert!(!accepted_logged(&second), "no info lines at warn");
    let (_, list) = relay.get("/api/v1/trusted-senders");
    let mut addresses: Vec<String> = list["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["address"].as_str().unwrap().to_string())
        .collect();
    addresses.sort();
    assert_eq!(
        addresses,
        ["bob@partner.test", "frank@partner.test"],
        "{list}"
    );

    cfg.write();
    let (status, v) = relay.post("/api/v1/reload");
    assert_eq!(status, 200, "{v}");
    let third = send("alice@example.test", "grace@partner.test");
    assert!(wait_until(Duration::from_secs(20), || accepted_logged(
        &third
    )));
}
