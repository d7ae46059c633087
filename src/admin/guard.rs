//! The admin listener's gate against the browser: what keeps a page on another origin
//! from driving the relay through an administrator's browser.
//!
//! - **Host**: a request whose `Host` is not the admin's own (its listen address, an
//!   address literal when it listens on all addresses, `localhost` on loopback, or one of
//!   `admin.hosts`) gets `421 Misdirected Request`: DNS rebinding ends there.
//! - **Sessions**: signing in with the token sets a random session id (never the token)
//!   kept here for `admin.session_ttl`; signing out forgets it. Without a token, the
//!   dashboard still opens an (anonymous) session, for its CSRF token.
//! - **State-changing requests** (`POST`, `PUT`, `PATCH`, `DELETE`): with a valid
//!   `Authorization: Bearer` they pass (a browser never adds one across origins). Any
//!   other must not come from another origin (`Origin`, or failing that `Referer`), and
//!   a form (or a request carrying the session cookie) must carry the session's CSRF
//!   token. A request with neither cookie nor `Origin` is a program, not a page: the
//!   command line without a token configured.
//! - **Sign-in** attempts are throttled per client address (exponential back-off).
//! - Every answer carries a `Content-Security-Policy` and `X-Frame-Options: DENY`.
//!
//! The parsing here (cookies, origins, hosts) is fuzzed (`fuzz/`, target `admin`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use subtle::ConstantTimeEq;
use tokio::time::Instant;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "smartrelay_session";
/// The form field that carries the CSRF token.
pub const CSRF_FIELD: &str = "csrf";
/// What every answer says about framing and sources.
pub const CSP: &str =
    "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'";
/// The longest a client waits after repeated failed sign-ins.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Sessions kept at most: past it the oldest goes (a flood of anonymous visits cannot
/// grow the table without bound).
const MAX_SESSIONS: usize = 10_000;

/// A session as the handlers see it.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub id: String,
    pub csrf: String,
    /// Signed in with the token (not an anonymous session of a token-less relay).
    pub signed_in: bool,
}

struct Session {
    csrf: String,
    signed_in: bool,
    expires: Instant,
}

#[derive(Default)]
struct Failures {
    count: u32,
    until: Option<Instant>,
}

#[derive(Default)]
pub struct Guard {
    sessions: Mutex<HashMap<String, Session>>,
    failures: Mutex<HashMap<IpAddr, Failures>>,
}

impl Guard {
    pub fn new() -> Guard {
        Guard::default()
    }

    /// A new session; `signed_in` after a good token.
    pub fn open(&self, signed_in: bool, ttl: Duration) -> SessionInfo {
        let info = SessionInfo {
            id: random_hex(),
            csrf: random_hex(),
            signed_in,
        };
        let mut s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        s.retain(|_, v| v.expires > now);
        if s.len() >= MAX_SESSIONS {
            if let Some(oldest) = s
                .iter()
                .min_by_key(|(_, v)| v.expires)
                .map(|(k, _)| k.clone())
            {
                s.remove(&oldest);
            }
        }
        s.insert(
            info.id.clone(),
            Session {
                csrf: info.csrf.clone(),
                signed_in,
                expires: now + ttl,
            },
        );
        info
    }

    /// The session a cookie names, while it lives.
    pub fn session(&self, id: &str) -> Option<SessionInfo> {
        let s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let found = s.get(id).filter(|v| v.expires > Instant::now())?;
        Some(SessionInfo {
            id: id.to_string(),
            csrf: found.csrf.clone(),
            signed_in: found.signed_in,
        })
    }

    pub fn close(&self, id: &str) {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// How long `ip` must still wait before its next sign-in attempt.
    pub fn throttled(&self, ip: IpAddr) -> Option<Duration> {
        let f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let until = f.get(&ip)?.until?;
        let now = Instant::now();
        (until > now).then(|| until - now)
    }

    /// A wrong token from `ip`: the next attempt waits 1 s, then 2 s, 4 s… up to
    /// [`MAX_BACKOFF`].
    pub fn failed(&self, ip: IpAddr) {
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if f.len() >= MAX_SESSIONS && !f.contains_key(&ip) {
            let now = Instant::now();
            f.retain(|_, v| v.until.is_some_and(|u| u > now));
        }
        let e = f.entry(ip).or_default();
        e.count = e.count.saturating_add(1);
        let wait = Duration::from_secs(1u64 << (e.count - 1).min(16)).min(MAX_BACKOFF);
        e.until = Some(Instant::now() + wait);
    }

    pub fn succeeded(&self, ip: IpAddr) {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ip);
    }
}

/// 32 random octets in hex, from the OS's generator.
fn random_hex() -> String {
    let mut b = [0u8; 32];
    // The OS generator failing leaves no safe way on: an all-zero id would be shared
    // by every session, so better one that nobody can present (never matches).
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_err() {
        return String::from("unavailable");
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Equal, compared in constant time whatever the lengths: both are hashed first, so
/// neither the length nor any prefix of the secret shows in the timing.
pub fn secret_matches(expected: &str, given: &str) -> bool {
    let h = |s: &str| ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    bool::from(h(expected).as_ref().ct_eq(h(given).as_ref()))
}

/// The value of cookie `name` in `Cookie` header values.
pub fn cookie<'a>(headers: impl Iterator<Item = &'a str>, name: &str) -> Option<&'a str> {
    headers
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// `Host` (`name` or `name:port`, `[v6]:port`) split into host and port.
pub fn split_host(host: &str) -> Option<(&str, Option<u16>)> {
    let host = host.trim();
    if let Some(rest) = host.strip_prefix('[') {
        let (name, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None if after.is_empty() => None,
            None => return None,
        };
        return Some((name, port));
    }
    match host.rsplit_once(':') {
        Some((name, p)) if !name.contains(':') => Some((name, Some(p.parse().ok()?))),
        Some(_) => None,
        None => Some((host, None)),
    }
}

/// Whether a request's `Host` names this admin listener. `listen` is its bound
/// address; `hosts` are `admin.hosts` (names, with or without a port).
pub fn host_allowed(host: &str, listen: SocketAddr, hosts: &[String]) -> bool {
    let Some((name, port)) = split_host(host) else {
        return false;
    };
    if port.is_some_and(|p| p != listen.port()) {
        return false;
    }
    if hosts.iter().any(|h| {
        let (hn, hp) = split_host(h).unwrap_or((h.as_str(), None));
        hn.eq_ignore_ascii_case(name) && hp.is_none_or(|p| Some(p) == port)
    }) {
        return true;
    }
    match name.parse::<IpAddr>() {
        // An address literal is never rebound: on a wildcard listener any of the
        // machine's addresses is the admin's own.
        Ok(ip) => listen.ip().is_unspecified() || ip == listen.ip(),
        Err(_) => listen.ip().is_loopback() && name.eq_ignore_ascii_case("localhost"),
    }
}

/// `scheme://host[:port]` of an `Origin` or `Referer` value, as a browser writes it.
pub fn origin_of(value: &str) -> Option<&str> {
    let v = value.trim();
    let rest = v
        .strip_prefix("http://")
        .or_else(|| v.strip_prefix("https://"))?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let scheme = v.len() - rest.len();
    v.get(..scheme + end)
}

/// Whether `origin` (from `Origin` or `Referer`) is this listener as the request's
/// `Host` names it.
pub fn same_origin(origin: &str, host: &str) -> bool {
    let Some(o) = origin_of(origin) else {
        return false;
    };
    let authority = o
        .strip_prefix("http://")
        .or_else(|| o.strip_prefix("https://"))
        .unwrap_or("");
    authority.eq_ignore_ascii_case(host.trim())
}

/// The CSRF field of an `application/x-www-form-urlencoded` body.
pub fn form_csrf(body: &[u8]) -> Option<String> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body).ok()?;
    pairs
        .into_iter()
        .find(|(k, _)| k == CSRF_FIELD)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whatever_the_length() {
        assert!(secret_matches("s3cret", "s3cret"));
        assert!(!secret_matches("s3cret", "s3cre"));
        assert!(!secret_matches("s3cret", "s3cret!"));
        assert!(!secret_matches("s3cret", ""));
    }

    #[test]
    fn cookies() {
        let h = ["a=b; smartrelay_session=abc ", "c=d"];
        assert_eq!(cookie(h.iter().copied(), SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie(h.iter().copied(), "c"), Some("d"));
        assert_eq!(
            cookie(["smartrelay_sessionx=1"].into_iter(), SESSION_COOKIE),
            None
        );
    }

    #[test]
    fn hosts() {
        let lo: SocketAddr = "127.0.0.1:8025".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:8025".parse().unwrap();
        let names = vec!["relay.example.com".to_string()];
        assert!(host_allowed("127.0.0.1:8025", lo, &[]));
        assert!(host_allowed("localhost:8025", lo, &[]));
        assert!(
            !host_allowed("attacker.test:8025", lo, &[]),
            "DNS rebinding"
        );
        assert!(!host_allowed("127.0.0.1:9999", lo, &[]));
        assert!(!host_allowed("192.0.2.7:8025", lo, &[]));
        assert!(host_allowed("192.0.2.7:8025", any, &[]));
        assert!(!host_allowed("localhost:8025", any, &[]));
        assert!(host_allowed("relay.example.com:8025", any, &names));
        assert!(host_allowed("RELAY.example.com", any, &names));
        assert!(host_allowed(
            "[::1]:8025",
            "[::1]:8025".parse().unwrap(),
            &[]
        ));
        assert!(!host_allowed("", lo, &[]));
        assert!(!host_allowed("a:b:c", lo, &[]));
    }

    #[test]
    fn origins() {
        assert!(same_origin("http://127.0.0.1:8025", "127.0.0.1:8025"));
        assert!(same_origin(
            "http://127.0.0.1:8025/queue?x=1",
            "127.0.0.1:8025"
        ));
        assert!(
            !same_origin("http://127.0.0.1:9999", "127.0.0.1:8025"),
            "same site, other port"
        );
        assert!(!same_origin("http://evil.test", "127.0.0.1:8025"));
        assert!(!same_origin("null", "127.0.0.1:8025"));
        assert_eq!(origin_of("https://a.test:1/x"), Some("https://a.test:1"));
    }

    #[test]
    fn form_fields() {
        assert_eq!(form_csrf(b"to=a%40b.test&csrf=abc"), Some("abc".into()));
        assert_eq!(form_csrf(b"to=a"), None);
        assert_eq!(form_csrf(b"\xff\xfe"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn sessions_expire_and_sign_ins_back_off() {
        let g = Guard::new();
        let s = g.open(true, Duration::from_secs(60));
        assert!(g
            .session(&s.id)
            .is_some_and(|i| i.signed_in && i.csrf == s.csrf));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(g.session(&s.id).is_none(), "expired");
        let s = g.open(false, Duration::from_secs(60));
        g.close(&s.id);
        assert!(g.session(&s.id).is_none(), "signed out");

        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(g.throttled(ip).is_none());
        g.failed(ip);
        assert_eq!(g.throttled(ip), Some(Duration::from_secs(1)));
        g.failed(ip);
        g.failed(ip);
        assert_eq!(g.throttled(ip), Some(Duration::from_secs(4)));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(g.throttled(ip).is_none());
        g.succeeded(ip);
        g.failed(ip);
        assert_eq!(
            g.throttled(ip),
            Some(Duration::from_secs(1)),
            "reset after a success"
        );
    }
}
