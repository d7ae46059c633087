//! The trusted-sender list, learned from real deliveries through the relay.

mod support;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::*;

const T: Duration = Duration::from_secs(20);

fn relay_for(dir: &std::path::Path, up: &Upstream) -> Relay {
    let cfg = Cfg::new(dir, &up.addr())
        .set(
            "trusted",
            "exclude_senders",
            "[\"noreply@example.test\", \"*@bulk.example.test\"]",
        )
        .set(
            "trusted",
            "exclude_recipient_domains",
            "[\"freemail.test\"]",
        )
        .set(
            "access",
            "domains",
            "[\"example.test\", \"bulk.example.test\"]",
        )
        .set(
            "access",
            "internal_domains",
            "[\"example.test\", \"bulk.example.test\"]",
        );
    Relay::start(&cfg)
}

fn send(relay: &Relay, from: &str, to: &[&str], headers: &str) {
    let mut c = Smtp::connect(relay.smtp);
    c.greet();
    let r = c.mail(from, to, &format!("{headers}Subject: t\r\n\r\nbody"));
    assert_eq!(r.code, 250, "{r:?}");
}

fn listed(relay: &Relay, query: &str) -> Vec<Value> {
    let (s, v) = relay.get(&format!("/api/v1/trusted-senders?{query}"));
    assert_eq!(s, 200, "{v}");
    v["entries"].as_array().cloned().unwrap()
}

fn addresses(entries: &[Value]) -> Vec<String> {
    entries
        .iter()
        .map(|e| e["address"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn only_accepted_external_recipients_of_real_mail_are_trusted() {
    let dir = tmpdir("trusted-learn");
    let up = Upstream::start(
        &dir,
        &[
            "--reply",
            "bad@partner.test=550 5.1.1 No such user",
            "--reply",
            "later@partner.test=452 4.2.2 Mailbox full",
        ],
    );
    let relay = relay_for(&dir, &up);
    let before = support_now();
    send(
        &relay,
        "alice@example.test",
        &[
            "bob@partner.test",
            "bad@partner.test",
            "Carol@Partner.TEST",
            "later@partner.test",
        ],
        "",
    );
    send(&relay, "alice@example.test", &["bob@partner.test"], "");
    send(
        &relay,
        "dave@example.test",
        &["bob@partner.test", "colleague@example.test"],
        "",
    );
    send(&relay, "", &["erin@partner.test"], "");
    send(
        &relay,
        "alice@example.test",
        &["frank@partner.test"],
        "Auto-Submitted: auto-replied\r\n",
    );
    send(
        &relay,
        "alice@example.test",
        &["ooo@partner.test"],
        "Precedence: bulk\r\n",
    );
    send(&relay, "noreply@example.test", &["gina@partner.test"], "");
    send(&relay, "news@bulk.example.test", &["hank@partner.test"], "");
    send(&relay, "alice@example.test", &["ivy@freemail.test"], "");
    // Everything that can be delivered has been, and recorded.
    assert!(wait_until(T, || up.messages().len() >= 9));
    assert!(wait_until(T, || listed(&relay, "").len() >= 2
        && relay.queue().len() == 1));
    // The recorder has processed every delivery report so far (one per message and
    // route in the delivery log), so nothing is still on its way into the list.
    assert!(wait_until(T, || {
        let reports: BTreeSet<(String, String)> = relay
            .log_json()
            .iter()
            .filter(|l| l["message"] == "delivery")
            .map(|l| (l["queue_id"].to_string(), l["route"].to_string()))
            .collect();
        relay.trusted_recorded() >= reports.len() as f64 && reports.len() >= 10
    }));
    let entries = listed(&relay, "");
    assert_eq!(
        addresses(&entries),
        ["Carol@partner.test", "bob@partner.test"],
        "{entries:#?}"
    );
    let bob = &entries[1];
    assert_eq!(
        (bob["count"].as_u64(), bob["senders"].as_u64()),
        (Some(3), Some(2))
    );
    let (first, last) = (
        bob["first_seen"].as_u64().unwrap(),
        bob["last_seen"].as_u64().unwrap(),
    );
    assert!(before <= first && first <= last && last <= support_now());
    assert_eq!(bob["domain"], "partner.test");
    // Per internal user.
    let alices = listed(&relay, "sender=alice@example.test");
    assert_eq!(
        addresses(&alices),
        ["Carol@partner.test", "bob@partner.test"]
    );
    assert_eq!(alices[1]["count"], 2);
    assert_eq!(
        addresses(&listed(&relay, "sender=dave@example.test")),
        ["bob@partner.test"]
    );
    assert_eq!(
        addresses(&listed(&relay, "min_count=2")),
        ["bob@partner.test"]
    );
    assert_eq!(listed(&relay, "domain=elsewhere.test").len(), 0);
    let (_, stats) = relay.get("/api/v1/trusted-senders/stats");
    assert_eq!(
        (
            stats["recipients"].as_u64(),
            stats["domains"].as_u64(),
            stats["pairs"].as_u64()
        ),
        (Some(2), Some(1), Some(3))
    );
    assert_eq!(stats["ready"], false, "learning takes learning_days (3)");
    assert_eq!(stats["added_per_day"][0]["added"], 2);
}

/// `smartrelay trusted ARGS --config CONFIG`, run to completion.
fn trusted_cli(args: &[&str], config: &std::path::Path) -> std::process::Output {
    Command::new(bin())
        .arg("trusted")
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap()
}

fn support_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn the_list_survives_a_restart_and_is_readable_with_sqlite3() {
    let dir = tmpdir("trusted-restart");
    let up = Upstream::start(&dir, &[]);
    let mut relay = relay_for(&dir, &up);
    let mut c = Smtp::connect(relay.smtp);
    c.greet();
    c.expect("MAIL FROM:<alice@example.test> SMTPUTF8", 250);
    c.expect("RCPT TO:<bob@partner.test>", 250);
    c.expect("RCPT TO:<zoë@bücher.test>", 250);
    c.expect("DATA", 354);
    c.send("Subject: ünïcode\r\n\r\nbody\r\n.\r\n".as_bytes());
    assert_eq!(c.reply().code, 250);
    assert!(wait_until(T, || listed(&relay, "").len() == 2));
    assert!(relay.stop().success());
    let out = Command::new("sqlite3")
        .arg(dir.join("trusted.sqlite3"))
        .arg("SELECT address, count FROM recipients ORDER BY address;")
        .output()
        .expect("sqlite3 shell");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "bob@partner.test|1\nzoë@xn--bcher-kva.test|1\n"
    );
    relay.restart();
    assert_eq!(
        addresses(&listed(&relay, "")),
        ["bob@partner.test", "zoë@xn--bcher-kva.test"]
    );
}

#[test]
fn paging_csv_and_a_round_trip_through_export_and_import() {
    let dir = tmpdir("trusted-csv");
    let up = Upstream::start(&dir, &[]);
    let relay = relay_for(&dir, &up);
    let rcpts: Vec<String> = (0..12)
        .map(|i| format!("r{i:02}@partner{}.test", i % 3))
        .collect();
    let refs: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    send(&relay, "alice@example.test", &refs, "");
    assert!(wait_until(T, || listed(&relay, "").len() == 12));
    // Pages of 5 in a stable order, nothing missed or repeated.
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let (_, v) = relay.get(&format!("/api/v1/trusted-senders?limit=5&cursor={cursor}"));
        seen.extend(addresses(v["entries"].as_array().unwrap()));
        match v["next_cursor"].as_str() {
            Some(c) => cursor = c.to_string(),
            None => break,
        }
    }
    assert_eq!(seen, rcpts);
    let (s, csv) = http_text(
        "GET",
        &relay.url("/api/v1/trusted-senders?format=csv&domain=partner1.test"),
        None,
    );
    assert_eq!(s, 200);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "address,domain,count,first_seen,last_seen,senders,origin"
    );
    assert_eq!(lines.len(), 5);
    assert!(
        lines[1].starts_with("r01@partner1.test,partner1.test,1,20"),
        "{csv}"
    );
    // Export with the CLI, import into another relay's list, export again.
    let export = trusted_cli(&["export", "--format", "csv"], &relay.config);
    assert!(export.status.success());
    let file = dir.join("export.csv");
    std::fs::write(&file, &export.stdout).unwrap();
    let other = tmpdir("trusted-import");
    let other_cfg = Cfg::new(&other, "127.0.0.1:2").write();
    let import = trusted_cli(&["import", file.to_str().unwrap()], &other_cfg);
    assert!(
        import.status.success(),
        "{}",
        String::from_utf8_lossy(&import.stderr)
    );
    assert!(String::from_utf8_lossy(&import.stdout).starts_with("12 address(es) added"));
    let again = trusted_cli(&["export", "--format", "json"], &other_cfg);
    let entries: Vec<Value> = serde_json::from_slice(&again.stdout).unwrap();
    let a: BTreeSet<String> = addresses(&entries).into_iter().collect();
    assert_eq!(a, rcpts.iter().cloned().collect::<BTreeSet<_>>());
    assert!(entries.iter().all(|e| e["origin"] == "imported"));
    // Importing twice adds nothing.
    let import = trusted_cli(&["import", file.to_str().unwrap()], &other_cfg);
    assert!(String::from_utf8_lossy(&import.stdout).starts_with("0 address(es) added"));
}

#[test]
fn entries_expire_after_the_retention() {
    let dir = tmpdir("trusted-expiry");
    let up = Upstream::start(&dir, &[]);
    let cfg = Cfg::new(&dir, &up.addr())
        .set("trusted", "retention", "\"2s\"")
        .set("trusted", "prune_interval", "\"1s\"");
    let relay = Relay::start(&cfg);
    send(&relay, "alice@example.test", &["old@partner.test"], "");
    assert!(wait_until(T, || listed(&relay, "").len() == 1));
    std::thread::sleep(Duration::from_millis(1500));
    send(&relay, "alice@example.test", &["new@partner.test"], "");
    // The periodic pruning drops what nothing was delivered to within 2 s, keeps the rest.
    assert!(wait_until(T, || addresses(&listed(&relay, "")) == ["new@partner.test"]));
    // The CLI prunes on demand with its own retention.
    let out = trusted_cli(&["prune", "--retention", "1ms"], &relay.config);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed"));
    assert!(listed(&relay, "").is_empty());
}
