//! Test harness: runs the real binary, real SMTP peers (aiosmtpd, smtp-sink, swaks,
//! Python smtplib) and a real DNS server, all on 127.0.0.1.

#![allow(dead_code)]

pub mod cluster;
pub mod dkim;
pub mod dns;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_smartrelay")
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A count from the environment (benchmark sizes: `MESSAGES=…`), or `default`.
pub fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A test's own directory under the system temp dir. It goes when the test passes, so
/// a suite run does not leave gigabytes of spools behind on a shared disk; it stays
/// when the test fails (the drop runs while panicking), with the relay's log and spool
/// in it for whoever reads the failure.
pub struct TestDir(PathBuf);

impl std::ops::Deref for TestDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TestDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test directory kept for the failure: {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A fresh directory for one test; see [`TestDir`].
pub fn tmpdir(name: &str) -> TestDir {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let d = std::env::temp_dir()
        .join("smartrelay-tests")
        .join(format!("{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TestDir(d)
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

// ---------------------------------------------------------------- configuration

/// The relay's TOML, section by section, with defaults every test starts from.
#[derive(Clone)]
pub struct Cfg {
    pub dir: PathBuf,
    sections: Vec<(String, Vec<(String, String)>)>,
    tail: String,
}

impl Cfg {
    pub fn new(dir: &Path, upstream: &str) -> Cfg {
        let d = dir.display();
        let mut c = Cfg {
            dir: dir.to_owned(),
            sections: Vec::new(),
            tail: String::new(),
        };
        c = c
            .set("server", "hostname", "\"relay.test\"")
            .set("server", "listen", "[\"127.0.0.1:0\"]")
            .set("server", "shutdown_timeout", "\"5s\"")
            .set("access", "allowed_ranges", "[\"127.0.0.0/8\", \"::1/128\"]")
            .set("access", "domains", "[\"example.test\"]")
            .set("queue", "dir", &format!("\"{d}/spool\""))
            .set("routing", "region", "\"eu\"")
            .set("routing", "spf_aware", "false")
            .set("routing.regions.eu", "hosts", &format!("[\"{upstream}\"]"))
            .set("routing.regions.eu", "tls", "\"none\"")
            .set("delivery", "connect_timeout", "\"5s\"")
            .set("delivery", "host_backoff", "\"1s\"")
            // Tests talk to loopback only: without a test's own DNS server, lookups go
            // to a loopback port where nothing listens, never to the system resolver.
            .set("dns", "nameservers", "[\"127.0.0.1:1\"]")
            .set("dns", "timeout", "\"2s\"")
            .set("admin", "listen", "\"127.0.0.1:0\"")
            .set("admin", "database", &format!("\"{d}/state.sqlite3\""))
            .set("trusted", "database", &format!("\"{d}/trusted.sqlite3\""))
            .set("tracking", "database", &format!("\"{d}/tracking.sqlite3\""))
            .set("trusted", "flush_interval", "\"100ms\"")
            .set("log", "level", "\"info\"");
        c
    }

    pub fn set(mut self, section: &str, key: &str, value: &str) -> Cfg {
        let sec = match self.sections.iter_mut().find(|(s, _)| s == section) {
            Some(s) => s,
            None => {
                self.sections.push((section.to_string(), Vec::new()));
                self.sections.last_mut().unwrap()
            }
        };
        match sec.1.iter_mut().find(|(k, _)| k == key) {
            Some(kv) => kv.1 = value.to_string(),
            None => sec.1.push((key.to_string(), value.to_string())),
        }
        self
    }

    pub fn remove(mut self, section: &str) -> Cfg {
        self.sections.retain(|(s, _)| s != section);
        self
    }

    /// TOML appended as it is, after the sections: arrays of tables (`[[limits]]`).
    #[allow(dead_code)]
    pub fn append(mut self, toml: &str) -> Cfg {
        self.tail.push_str(toml);
        self.tail.push('\n');
        self
    }

    /// Section "" holds top-level keys (`limits = []`), written before every table.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let top = self.sections.iter().filter(|(s, _)| s.is_empty());
        let tables = self.sections.iter().filter(|(s, _)| !s.is_empty());
        for (s, kvs) in top.chain(tables) {
            if !s.is_empty() {
                out.push_str(&format!("[{s}]\n"));
            }
            for (k, v) in kvs {
                out.push_str(&format!("{k} = {v}\n"));
            }
            out.push('\n');
        }
        out.push_str(&self.tail);
        out
    }

    pub fn write(&self) -> PathBuf {
        let p = self.dir.join("smartrelay.toml");
        std::fs::write(&p, self.render()).unwrap();
        p
    }
}

// ---------------------------------------------------------------- the relay

pub struct Relay {
    pub dir: PathBuf,
    pub config: PathBuf,
    child: Option<Child>,
    logs: Arc<Mutex<Vec<String>>>,
    pub smtp: SocketAddr,
    pub smtp_all: Vec<SocketAddr>,
    pub admin: SocketAddr,
}

impl Relay {
    pub fn start(cfg: &Cfg) -> Relay {
        let path = cfg.write();
        Relay::start_with(&cfg.dir, &path, &[])
            .unwrap_or_else(|e| panic!("relay did not start: {e}"))
    }

    /// Starts the binary; `Err` carries its output when it exits instead.
    pub fn start_with(dir: &Path, config: &Path, env: &[(&str, &str)]) -> Result<Relay, String> {
        let mut cmd = Command::new(bin());
        cmd.args(["run", "--config"])
            .arg(config)
            .args(["--log-format", "json"]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Relay::start_command(dir, config, cmd)
    }

    /// Starts the relay with a prepared command (e.g. under a wrapper).
    pub fn start_command(dir: &Path, config: &Path, mut cmd: Command) -> Result<Relay, String> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn relay");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut relay = Relay {
            dir: dir.to_owned(),
            config: config.to_owned(),
            child: Some(child),
            logs,
            smtp: "0.0.0.0:0".parse().unwrap(),
            smtp_all: Vec::new(),
            admin: "0.0.0.0:0".parse().unwrap(),
        };
        let ready = wait_until(Duration::from_secs(30), || {
            relay.log_json().iter().any(|l| l["message"] == "ready")
                || relay
                    .child
                    .as_mut()
                    .unwrap()
                    .try_wait()
                    .ok()
                    .flatten()
                    .is_some()
        });
        if !ready
            || relay
                .child
                .as_mut()
                .unwrap()
                .try_wait()
                .ok()
                .flatten()
                .is_some()
        {
            std::thread::sleep(Duration::from_millis(200));
            let out = relay.logs.lock().unwrap().join("\n");
            relay.child.take().map(|mut c| c.kill());
            return Err(out);
        }
        for l in relay.log_json() {
            if l["message"] == "smtp listening" {
                relay
                    .smtp_all
                    .push(l["addr"].as_str().unwrap().parse().unwrap());
            }
            if l["message"] == "admin listening" {
                relay.admin = l["addr"].as_str().unwrap().parse().unwrap();
            }
        }
        relay.smtp = relay.smtp_all[0];
        Ok(relay)
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    pub fn log_json(&self) -> Vec<Value> {
        self.logs()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The log so far, joined, once `pred` holds for it: lines are written by the
    /// relay's log thread, a moment after the reply they go with.
    pub fn logs_when(&self, pred: impl Fn(&str) -> bool) -> String {
        let mut text = String::new();
        let seen = wait_until(Duration::from_secs(10), || {
            text = self.logs().join("\n");
            pred(&text)
        });
        assert!(seen, "the log never showed it:\n{text}");
        text
    }

    pub fn wait_log(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> bool {
        wait_until(timeout, || self.log_json().iter().any(&pred))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        unsafe_kill(child.id(), "TERM");
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > end {
                let _ = child.kill();
                panic!("relay did not stop within 30s after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM without waiting: the stop is the test's to watch.
    pub fn terminate(&mut self) {
        unsafe_kill(self.pid(), "TERM");
    }

    /// The exit status once the process has ended, or `None` after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut().expect("running");
            if let Some(s) = child.try_wait().unwrap() {
                self.child = None;
                return Some(s);
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        unsafe_kill(child.id(), "KILL");
        let _ = child.wait();
    }

    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        *self = Relay::start_with(&self.dir, &self.config, &[]).expect("restart");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        http("GET", &self.url(path), None)
    }

    pub fn post(&self, path: &str) -> (u16, Value) {
        http("POST", &self.url(path), None)
    }

    pub fn queue(&self) -> Vec<Value> {
        let (s, v) = self.get("/api/v1/queue");
        assert_eq!(s, 200, "{v}");
        v["messages"].as_array().cloned().unwrap_or_default()
    }

    pub fn wait_queue_empty(&self, timeout: Duration) -> bool {
        wait_until(timeout, || self.queue().is_empty())
    }

    /// The whole `/metrics` text.
    pub fn metrics(&self) -> String {
        http_text("GET", &self.url("/metrics"), None).1
    }

    /// The value of one series: `name` with its labels as `/metrics` prints them
    /// (`smartrelay_queue_refusals_total{reason="max_size"}`); `None` when absent.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let prefix = format!("{series} ");
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Delivery reports the trusted-sender recorder has processed: what a test waits
    /// on instead of a sleep.
    pub fn trusted_recorded(&self) -> f64 {
        self.metric("smartrelay_trusted_deliveries_recorded_total")
            .unwrap_or(0.0)
    }

    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(bin());
        cmd.args(args).arg("--config").arg(&self.config);
        cmd.args(["--admin", &self.url("")]);
        cmd.output().unwrap()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn unsafe_kill(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// A tiny HTTP call through ureq (status errors are answers, not failures).
pub fn http(method: &str, url: &str, token: Option<&str>) -> (u16, Value) {
    let (status, text) = http_text(method, url, token);
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

pub fn http_text(method: &str, url: &str, token: Option<&str>) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into();
    let auth = token.map(|t| format!("Bearer {t}"));
    let with_auth = |r: ureq::RequestBuilder<ureq::typestate::WithoutBody>| match &auth {
        Some(a) => r.header("Authorization", a),
        None => r,
    };
    let resp = match method {
        "GET" => with_auth(agent.get(url)).call(),
        "DELETE" => with_auth(agent.delete(url)).call(),
        // POST carries no body here; ureq types it apart, so the token goes on by hand.
        _ => match &auth {
            Some(a) => agent.post(url).header("Authorization", a).send_empty(),
            None => agent.post(url).send_empty(),
        },
    };
    let mut resp = resp.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_to_string().unwrap_or_default())
}

/// A POST with a body of the given content type; the answer as text.
pub fn post_body(url: &str, content_type: &str, body: &str) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into();
    let mut resp = agent
        .post(url)
        .header("Content-Type", content_type)
        .send(body)
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_to_string().unwrap_or_default())
}

/// A JSON POST; the answer parsed as JSON (or as a string when it is not).
pub fn post_json(url: &str, body: &Value) -> (u16, Value) {
    let (status, text) = post_body(url, "application/json", &body.to_string());
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// The dashboard as a browser holds it: its session cookie and the CSRF token of its
/// forms, read from the page itself.
pub struct Dashboard {
    agent: ureq::Agent,
    base: String,
    pub cookie: String,
    pub csrf: String,
}

impl Dashboard {
    /// Opens `/` (signing in first with `token`, when given) and keeps what the page
    /// hands out.
    pub fn open(relay: &Relay, token: Option<&str>) -> Dashboard {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .build()
            .into();
        let base = relay.url("");
        let set_cookie = |resp: &ureq::http::Response<ureq::Body>| {
            resp.headers()
                .get_all("set-cookie")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .find_map(|v| {
                    v.split(';')
                        .next()
                        .filter(|c| c.starts_with("smartrelay_session="))
                })
                .map(str::to_string)
        };
        let mut cookie = String::new();
        if let Some(t) = token {
            let resp = agent
                .post(&format!("{base}/login"))
                .header("Origin", &base)
                .send_form([("token", t)])
                .unwrap();
            assert_eq!(resp.status().as_u16(), 303, "sign-in");
            cookie = set_cookie(&resp).expect("a session cookie");
        }
        let mut req = agent.get(&format!("{base}/"));
        if !cookie.is_empty() {
            req = req.header("Cookie", &cookie);
        }
        let mut resp = req.call().unwrap();
        if let Some(c) = set_cookie(&resp) {
            cookie = c;
        }
        let page = resp.body_mut().read_to_string().unwrap();
        let csrf = page
            .split("name=\"csrf\" value=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .expect("a CSRF field in the page")
            .to_string();
        Dashboard {
            agent,
            base,
            cookie,
            csrf,
        }
    }

    /// A form POST as the dashboard's own page makes it: the session cookie, the CSRF
    /// field and the admin's own `Origin`. Returns the status and the body.
    pub fn post_form(&self, path: &str, fields: &[(&str, &str)]) -> (u16, String) {
        let mut all: Vec<(&str, &str)> = fields.to_vec();
        all.push(("csrf", &self.csrf));
        let mut resp = self
            .agent
            .post(&format!("{}{path}", self.base))
            .header("Cookie", &self.cookie)
            .header("Origin", &self.base)
            .send_form(all)
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.body_mut().read_to_string().unwrap_or_default())
    }
}

// ---------------------------------------------------------------- a raw SMTP client

#[derive(Debug, Clone)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }
}

/// Writes exactly what a test says, reads replies line by line.
pub struct Smtp {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Smtp {
    pub fn connect(addr: SocketAddr) -> Smtp {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        Smtp::wrap(stream)
    }

    /// Connects from a chosen local address (any of 127.0.0.0/8 works here).
    pub fn connect_from(local: IpAddr, addr: SocketAddr) -> Smtp {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.bind(&SocketAddr::new(local, 0).into()).unwrap();
        socket
            .connect_timeout(&addr.into(), Duration::from_secs(5))
            .unwrap();
        Smtp::wrap(socket.into())
    }

    pub fn from_stream(stream: TcpStream) -> Smtp {
        Smtp::wrap(stream)
    }

    fn wrap(stream: TcpStream) -> Smtp {
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Smtp {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    fn line(&mut self) -> Option<String> {
        loop {
            if let Some(p) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=p).collect();
                return Some(String::from_utf8_lossy(&line).trim_end().to_string());
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// One (possibly multi-line) reply; `None` when the server closed.
    pub fn try_reply(&mut self) -> Option<Reply> {
        let mut lines = Vec::new();
        loop {
            let l = self.line()?;
            let code: u16 = l.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
            let more = l.as_bytes().get(3) == Some(&b'-');
            lines.push(l.get(4..).unwrap_or("").to_string());
            if !more {
                return Some(Reply { code, lines });
            }
        }
    }

    pub fn reply(&mut self) -> Reply {
        self.try_reply().expect("server closed the connection")
    }

    pub fn cmd(&mut self, line: &str) -> Reply {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    pub fn expect(&mut self, line: &str, code: u16) -> Reply {
        let r = self.cmd(line);
        assert_eq!(r.code, code, "{line} -> {r:?}");
        r
    }

    pub fn greet(&mut self) -> Reply {
        let g = self.reply();
        assert_eq!(g.code, 220, "{g:?}");
        self.expect("EHLO client.test", 250)
    }

    /// A whole transaction; returns the final reply.
    pub fn mail(&mut self, from: &str, to: &[&str], body: &str) -> Reply {
        self.expect(&format!("MAIL FROM:<{from}>"), 250);
        for t in to {
            self.expect(&format!("RCPT TO:<{t}>"), 250);
        }
        self.expect("DATA", 354);
        self.send(body.as_bytes());
        self.send(b"\r\n.\r\n");
        self.reply()
    }

    /// True when the server closed the connection (end of stream or a reset) within
    /// 5 s, with nothing more to read; false when it sent more, and false when it stayed
    /// silent with the connection open: silence is not a close.
    pub fn closed(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        self.stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut b = [0u8; 1];
        match self.stream.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    }
}

/// The queue ID in "250 2.0.0 Ok: queued as ID".
pub fn queued_id(r: &Reply) -> String {
    assert_eq!(r.code, 250, "{r:?}");
    r.text().rsplit(' ').next().unwrap().to_string()
}

// ---------------------------------------------------------------- upstreams

/// aiosmtpd upstream (tests/support/upstream.py).
pub struct Upstream {
    child: Child,
    pub port: u16,
    pub out: PathBuf,
}

impl Upstream {
    /// On a free port; another is tried should someone take it between finding and
    /// binding it.
    pub fn start(dir: &Path, args: &[&str]) -> Upstream {
        (0..5)
            .find_map(|_| Upstream::try_start_on(dir, free_port(), args))
            .expect("upstream did not start on any of 5 ports")
    }

    pub fn start_on(dir: &Path, port: u16, args: &[&str]) -> Upstream {
        Upstream::try_start_on(dir, port, args).expect("upstream did not start")
    }

    fn try_start_on(dir: &Path, port: u16, args: &[&str]) -> Option<Upstream> {
        let out = dir.join(format!("upstream-{port}"));
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/upstream.py");
        std::fs::create_dir_all(&out).unwrap();
        // aiosmtpd logs every refused handshake with a traceback; keep it out of the way.
        let log = std::fs::File::create(out.join("stderr.log")).unwrap();
        let mut child = Command::new("/usr/bin/python3")
            .arg(script)
            .args(["--port", &port.to_string(), "--out"])
            .arg(&out)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("python3 with aiosmtpd");
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        if !first.starts_with("READY") {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        Some(Upstream { child, port, out })
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Received messages in arrival order: (envelope JSON, data).
    pub fn messages(&self) -> Vec<(Value, Vec<u8>)> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(&self.out)
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        names.retain(|p| p.extension().is_some_and(|e| e == "eml"));
        names.sort();
        names
            .iter()
            .map(|p| {
                let meta = std::fs::read_to_string(p.with_extension("json")).unwrap();
                (
                    serde_json::from_str(&meta).unwrap(),
                    std::fs::read(p).unwrap(),
                )
            })
            .collect()
    }

    pub fn wait_messages(&self, n: usize, timeout: Duration) -> Vec<(Value, Vec<u8>)> {
        wait_until(timeout, || self.messages().len() >= n);
        self.messages()
    }

    /// RCPT commands seen, with the reply given.
    pub fn rcpt_log(&self) -> Vec<Value> {
        std::fs::read_to_string(self.out.join("log.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Postfix's smtp-sink, dumping each transaction to a file.
pub struct Sink {
    child: Child,
    pub port: u16,
    pub dump: PathBuf,
}

impl Sink {
    pub fn start(dir: &Path, extra: &[&str]) -> Sink {
        Sink::start_on(dir, free_port(), extra)
    }

    /// On a given port (a smart host back from an outage on its old address).
    pub fn start_on(dir: &Path, port: u16, extra: &[&str]) -> Sink {
        let dump = dir.join(format!("sink-{port}"));
        std::fs::create_dir_all(&dump).unwrap();
        // smtp-sink drops privileges to `nobody` when run as root.
        let _ = Command::new("chown").args(["nobody"]).arg(&dump).status();
        let template = format!("{}/%s.", dump.display());
        let child = Command::new("/usr/sbin/smtp-sink")
            .args(["-u", "nobody", "-d", &template])
            .args(extra)
            .arg(format!("127.0.0.1:{port}"))
            .arg("256")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("smtp-sink (Debian postfix)");
        assert!(wait_until(Duration::from_secs(5), || TcpStream::connect((
            "127.0.0.1",
            port
        ))
        .is_ok()));
        Sink { child, port, dump }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn count(&self) -> usize {
        std::fs::read_dir(&self.dump)
            .map(|d| d.count())
            .unwrap_or(0)
    }

    pub fn dumps(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.dump)
            .map(|d| {
                d.flatten()
                    .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- certificates

pub struct Certs {
    pub ca: PathBuf,
    /// Issued by `ca` for 127.0.0.1 and localhost.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Self-signed for 127.0.0.1: verifies against nothing.
    pub rogue_cert: PathBuf,
    pub rogue_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `<name>.pem` and `<name>.key`: a self-signed P-256 certificate with these extensions.
fn self_signed(dir: &Path, name: &str, subject: &str, extensions: &[&str]) {
    let (key, pem) = (format!("{name}.key"), format!("{name}.pem"));
    let mut args = vec![
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &key,
        "-out",
        &pem,
        "-days",
        "2",
        "-subj",
        subject,
    ];
    for e in extensions {
        args.extend(["-addext", e]);
    }
    openssl(dir, &args);
}

/// A CA and a leaf it signed, plus a self-signed certificate, made with openssl.
pub fn certs(dir: &Path) -> Certs {
    let d = dir.join("tls");
    std::fs::create_dir_all(&d).unwrap();
    self_signed(
        &d,
        "ca",
        "/CN=smartrelay test CA",
        &[
            "basicConstraints=critical,CA:TRUE",
            "keyUsage=critical,keyCertSign",
        ],
    );
    openssl(
        &d,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "leaf.key",
            "-out",
            "leaf.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(d.join("leaf.ext"), "basicConstraints=critical,CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n").unwrap();
    openssl(
        &d,
        &[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "leaf.pem",
            "-days",
            "2",
            "-extfile",
            "leaf.ext",
        ],
    );
    // rustls refuses a certificate without CA:FALSE as an end entity.
    self_signed(
        &d,
        "rogue",
        "/CN=rogue",
        &[
            "basicConstraints=critical,CA:FALSE",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
    );
    Certs {
        ca: d.join("ca.pem"),
        cert: d.join("leaf.pem"),
        key: d.join("leaf.key"),
        rogue_cert: d.join("rogue.pem"),
        rogue_key: d.join("rogue.key"),
    }
}

/// Runs a Python snippet with Debian's python3 (smtplib); returns stdout, panics on failure.
pub fn python(code: &str) -> String {
    let out = Command::new("/usr/bin/python3")
        .args(["-c", code])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python failed:\n{code}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ---------------------------------------------------------------- the spool on disk

/// Every message the spool's segment log holds (removal records applied): ID ->
/// (envelope, data), read with the relay's own reader, without its lock, so a
/// running relay's spool can be looked at.
pub fn spool_messages(spool: &Path) -> std::collections::BTreeMap<String, (Value, Vec<u8>)> {
    smartrelay::queue::file::snapshot(spool)
        .unwrap_or_default()
        .into_iter()
        .map(|(env, data)| {
            (
                env.id.as_str().to_string(),
                (serde_json::to_value(&env).unwrap(), data),
            )
        })
        .collect()
}

/// A queued message read straight from the spool: (envelope, data).
pub fn spool_message(spool: &Path, id: &str) -> Option<(Value, Vec<u8>)> {
    spool_messages(spool).remove(id)
}

/// IDs of every message in the spool.
pub fn spool_ids(spool: &Path) -> Vec<String> {
    spool_messages(spool).into_keys().collect()
}
