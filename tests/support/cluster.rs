//! The parts of a multi-node deployment, on loopback: a throwaway PostgreSQL cluster
//! (Debian's `postgresql`, `initdb` in a temporary directory, run as a non-root user on
//! a free port) and HAProxy (Debian's `haproxy`, TCP mode, `send-proxy-v2`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{free_port, wait_until};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A PostgreSQL command, as the `postgres` user when the tests run as root (initdb and
/// the server refuse root).
fn pg_command(bin: &str) -> Command {
    let path = format!("{PG_BIN}/{bin}");
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", &path]);
        c
    } else {
        Command::new(path)
    }
}

pub struct Pg {
    pub dir: PathBuf,
    pub port: u16,
    fsync: bool,
    /// `ssl = on` with this certificate and key, and only `hostssl` rules for TCP.
    tls: bool,
    frozen: std::sync::atomic::AtomicBool,
}

impl Pg {
    /// A fresh cluster with a `smartrelay` role (trust authentication on loopback) and
    /// database.
    /// Without fsync: tests check behaviour, not durability of the database itself.
    pub fn start(name: &str) -> Pg {
        Pg::start_with(name, false)
    }

    pub fn start_with(name: &str, fsync: bool) -> Pg {
        Pg::create(name, fsync, None)
    }

    /// A cluster with `ssl = on` serving `cert` (its key `key`), whose `pg_hba.conf`
    /// takes TCP connections only over TLS (`hostssl`): clear text is refused.
    pub fn start_tls(name: &str, cert: &Path, key: &Path) -> Pg {
        Pg::create(name, false, Some((cert, key)))
    }

    fn create(name: &str, fsync: bool, tls: Option<(&Path, &Path)>) -> Pg {
        // Outside the build tree: the postgres user must be able to reach it.
        let dir = std::env::temp_dir().join(format!("smartrelay-pg-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown the PostgreSQL directory");
        }
        let out = pg_command("initdb")
            .args(["-D", &dir.join("data").display().to_string()])
            .args([
                "-U",
                "smartrelay",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ])
            .output()
            .expect("initdb (Debian package postgresql)");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let data = dir.join("data");
        if let Some((cert, key)) = tls {
            std::fs::copy(cert, data.join("server.crt")).unwrap();
            std::fs::copy(key, data.join("server.key")).unwrap();
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n",
            )
            .unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                data.join("server.key"),
                std::fs::Permissions::from_mode(0o600),
            )
            .unwrap();
            if is_root() {
                let ok = Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&data)
                    .status()
                    .unwrap()
                    .success();
                assert!(ok, "chown the server's key");
            }
        }
        let pg = Pg {
            dir,
            port: free_port(),
            fsync,
            tls: tls.is_some(),
            frozen: false.into(),
        };
        pg.start_server();
        let out = pg_command("createdb")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &pg.port.to_string(),
                "-U",
                "smartrelay",
            ])
            .arg("smartrelay")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "createdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg
    }

    pub fn url(&self) -> String {
        format!("postgres://smartrelay@127.0.0.1:{}/smartrelay", self.port)
    }

    fn start_server(&self) {
        let mut opts = format!(
            "-k {} -p {} -c listen_addresses=127.0.0.1 -c fsync={}",
            self.dir.display(),
            self.port,
            if self.fsync { "on" } else { "off" }
        );
        if self.tls {
            // initdb's data folder is the server's working directory: relative names.
            opts.push_str(" -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key");
        }
        let out = pg_command("pg_ctl")
            .args(["-D", &self.dir.join("data").display().to_string()])
            .args([
                "-o",
                &opts,
                "-l",
                &self.dir.join("log").display().to_string(),
            ])
            .args(["-w", "start"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn stop(&self) {
        let _ = pg_command("pg_ctl")
            .args(["-D", &self.dir.join("data").display().to_string()])
            .args(["-m", "fast", "-w", "stop"])
            .output();
    }

    /// The server and every backend stopped with SIGSTOP: connections stay open and
    /// nothing answers (a hung database, not a refused one). `thaw` resumes them.
    pub fn freeze(&self) {
        self.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(self.signal_all("STOP"), "kill -STOP the cluster");
    }

    pub fn thaw(&self) {
        if self.frozen.swap(false, std::sync::atomic::Ordering::SeqCst) {
            assert!(self.signal_all("CONT"), "kill -CONT the cluster");
        }
    }

    fn signal_all(&self, sig: &str) -> bool {
        let pidfile = std::fs::read_to_string(self.dir.join("data/postmaster.pid")).unwrap();
        let main = pidfile.lines().next().unwrap().trim().to_string();
        let children = Command::new("pgrep").args(["-P", &main]).output().unwrap();
        let mut pids = vec![main];
        pids.extend(
            String::from_utf8_lossy(&children.stdout)
                .split_whitespace()
                .map(str::to_string),
        );
        Command::new("kill")
            .arg(format!("-{sig}"))
            .args(&pids)
            .status()
            .is_ok_and(|s| s.success())
    }

    pub fn restart(&self) {
        self.start_server();
    }

    /// One value from a query, through `psql`.
    pub fn query(&self, sql: &str) -> String {
        let out = pg_command("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "smartrelay",
            ])
            .args(["-d", "smartrelay", "-At", "-c", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        if self.frozen.load(std::sync::atomic::Ordering::SeqCst) {
            self.signal_all("CONT");
        }
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// HAProxy in TCP mode in front of relay nodes, sending PROXY v2 (and v2 LOCAL on its
/// SMTP health checks).
pub struct Haproxy {
    child: Child,
    pub port: u16,
    pub config: PathBuf,
}

impl Haproxy {
    pub fn start(dir: &Path, nodes: &[std::net::SocketAddr]) -> Haproxy {
        let port = free_port();
        let template = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/haproxy/haproxy.cfg"
        ))
        .unwrap();
        // The example's addresses, replaced by this test's ports; everything else as
        // shipped.
        let mut servers = String::new();
        for (i, n) in nodes.iter().enumerate() {
            servers.push_str(&format!(
                "    server node{} {n} send-proxy-v2 check check-send-proxy inter 500ms fall 2 rise 1\n",
                i + 1
            ));
        }
        let mut cfg = String::new();
        let mut skipping = false;
        for line in template.lines() {
            if line.trim_start().starts_with("bind ") && line.contains(":25") {
                cfg.push_str(&format!("    bind 127.0.0.1:{port}\n"));
                continue;
            }
            if line.trim_start().starts_with("maxconn ") {
                // Whatever open-files limit the test machine has.
                cfg.push_str("    maxconn 256\n");
                continue;
            }
            if line.trim_start().starts_with("server ") {
                if !skipping {
                    cfg.push_str(&servers);
                    skipping = true;
                }
                continue;
            }
            cfg.push_str(line);
            cfg.push('\n');
        }
        let config = dir.join("haproxy.cfg");
        std::fs::write(&config, cfg).unwrap();
        let check = Command::new("haproxy")
            .arg("-c")
            .arg("-f")
            .arg(&config)
            .output()
            .expect("haproxy (Debian package)");
        assert!(
            check.status.success(),
            "haproxy -c: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        assert!(wait_until(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        }));
        Haproxy {
            child,
            port,
            config,
        }
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
