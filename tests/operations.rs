//! Operations: the alert rules under `promtool test rules`, a live `/metrics` under
//! `promtool check metrics`, the systemd unit under `systemd-analyze verify`, the
//! READY notification, and the CLI's version, completions and manual page.

mod support;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn alert_rules_pass_their_promtool_tests() {
    let dir = root().join("config/prometheus");
    let check = Command::new("promtool")
        .args(["check", "rules", "smartrelay-rules.yml"])
        .current_dir(&dir)
        .output()
        .expect("promtool (Debian package prometheus) is installed by tests/setup.sh");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let test = Command::new("promtool")
        .args(["test", "rules", "smartrelay-rules.test.yml"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        test.status.success(),
        "{}{}",
        String::from_utf8_lossy(&test.stdout),
        String::from_utf8_lossy(&test.stderr)
    );
    // Every alert the issue asks for is defined, and each has a test.
    let rules = std::fs::read_to_string(dir.join("smartrelay-rules.yml")).unwrap();
    let tests = std::fs::read_to_string(dir.join("smartrelay-rules.test.yml")).unwrap();
    for alert in [
        "SmartrelayDown",
        "SmartrelayOldestQueuedMessageTooOld",
        "SmartrelayDeliveryFailuresRising",
        "SmartrelaySmartHostFailing",
        "SmartrelaySpoolSpaceLow",
        "SmartrelaySpoolSyncSlow",
        "SmartrelayTenantProofMissing",
        "SmartrelaySpfInvalid",
        "SmartrelayTlsCertificateExpiring",
    ] {
        assert!(
            rules.contains(&format!("alert: {alert}\n")),
            "{alert} defined"
        );
        assert!(
            tests.contains(&format!("alertname: {alert}\n")),
            "{alert} tested"
        );
    }
}

/// `notAfter` of a PEM certificate, in seconds since the epoch, through openssl and
/// date(1): an independent reading of what the gauge must show.
fn not_after(cert: &Path) -> i64 {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-enddate", "-in"])
        .arg(cert)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let when = text.trim().strip_prefix("notAfter=").unwrap().to_string();
    let out = Command::new("date")
        .args(["-u", "-d", &when, "+%s"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn live_metrics_pass_promtool_and_show_the_certificate_expiry() {
    let dir = tmpdir("ops-metrics");
    let certs = certs(&dir);
    let up = Upstream::start(&dir, &[]);
    let cfg = Cfg::new(&dir, &up.addr())
        .set("tls", "cert", &format!("\"{}\"", certs.cert.display()))
        .set("tls", "key", &format!("\"{}\"", certs.key.display()));
    let relay = Relay::start(&cfg);
    // Some traffic, so that counters and histograms have samples.
    let mut c = Smtp::connect(relay.smtp);
    c.greet();
    queued_id(&c.mail(
        "alice@example.test",
        &["bob@partner.test"],
        "Subject: m\r\n\r\nx",
    ));
    assert!(relay.wait_queue_empty(Duration::from_secs(20)));
    let (status, text) = http_text("GET", &relay.url("/metrics"), None);
    assert_eq!(status, 200);
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let gauge = text
        .lines()
        .find_map(|l| l.strip_prefix("smartrelay_tls_certificate_expiry_timestamp_seconds "))
        .unwrap_or_else(|| panic!("no expiry gauge in\n{text}"));
    assert_eq!(
        gauge.trim().parse::<f64>().unwrap() as i64,
        not_after(&certs.cert)
    );
}

#[test]
fn systemd_unit_verifies() {
    let unit = std::fs::read_to_string(root().join("config/systemd/smartrelay.service")).unwrap();
    for key in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "User=smartrelay",
        "StateDirectory=smartrelay",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "ReadWritePaths=/var/lib/smartrelay",
    ] {
        assert!(unit.lines().any(|l| l == key), "{key} in the unit");
    }
    // verify checks that the executables exist: point them at this build.
    let dir = tmpdir("ops-systemd");
    let copy = dir.join("smartrelay.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/smartrelay", bin())).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze (Debian package systemd) is installed by tests/setup.sh");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Under systemd, READY=1 arrives on NOTIFY_SOCKET once the SMTP listener is bound:
/// a connection made the moment it arrives is greeted.
#[test]
fn ready_is_notified_once_the_listeners_are_bound() {
    let dir = tmpdir("ops-notify");
    let socket_path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let port = free_port();
    let up = Upstream::start(&dir, &[]);
    let cfg =
        Cfg::new(&dir, &up.addr()).set("server", "listen", &format!("[\"127.0.0.1:{port}\"]"));
    let config = cfg.write();
    let waiter = std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("a notification");
        let message = String::from_utf8_lossy(&buf[..n]).into_owned();
        let mut c = Smtp::connect(format!("127.0.0.1:{port}").parse().unwrap());
        (message, c.reply().code)
    });
    let _relay = Relay::start_with(
        &dir,
        &config,
        &[("NOTIFY_SOCKET", socket_path.to_str().unwrap())],
    )
    .unwrap();
    let (message, greeting) = waiter.join().unwrap();
    assert!(message.lines().any(|l| l == "READY=1"), "{message:?}");
    assert_eq!(greeting, 220);
}

#[test]
fn version_completions_and_manual_page() {
    let run = |args: &[&str]| {
        let out = Command::new(bin()).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(
        run(&["--version"]).trim(),
        format!("smartrelay {}", env!("CARGO_PKG_VERSION"))
    );
    let bash = run(&["completions", "bash"]);
    assert!(bash.contains("complete -F _smartrelay"), "{bash}");
    assert!(bash.contains("check-config") && bash.contains("eval"));
    for shell in ["zsh", "fish"] {
        assert!(
            run(&["completions", shell]).contains("check-config"),
            "{shell}"
        );
    }
    let man = run(&["man"]);
    assert!(man.contains(".TH smartrelay 1"));
    assert!(man.contains("completions"));
}
