//! Accepts connections: the IP allowlist, connection limits, implicit TLS and STARTTLS
//! upgrades, and the graceful stop.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

use super::conn::{drive, Conn, Context, Exit};
use super::proxy::{self, ProxyError, Source};
use super::session::{Session, SourceKind};
use super::tls::describe;
use crate::envelope::now_ms;
use crate::events::{Event, RefusalReason};
use crate::lifecycle::Phase;
use crate::live::Live;
use crate::pipeline::{Intake, SenderPolicy};
use crate::tenant::sources::{Membership, SharedSources};

/// The gate's answer for a client address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Admit(SourceKind),
    /// Maybe a shared platform's, not known yet: `421`, try later.
    NotYet,
    Refuse,
}

/// Who may connect: the dedicated ranges and the shared platforms' ranges.
pub struct Access {
    pub allowed: Vec<IpNet>,
    pub sources: Arc<SharedSources>,
}

impl Access {
    /// A shared range wins over a dedicated one that also holds the address: the
    /// stricter rule applies. While a shared range's list has never been resolved, no
    /// address can be known to be outside it, an address of `allowed_ranges` included:
    /// treating one as dedicated then would relay for every tenant of the platform.
    /// `ip` must be canonical.
    pub fn standing(&self, ip: IpAddr) -> Standing {
        match self.sources.classify(ip) {
            Membership::Shared(i) => Standing::Admit(SourceKind::Shared(i)),
            Membership::Unresolved => Standing::NotYet,
            Membership::Outside if self.allowed.iter().any(|net| net.contains(&ip)) => {
                Standing::Admit(SourceKind::Dedicated)
            }
            Membership::Outside => Standing::Refuse,
        }
    }
}

/// How many may be connected at once, in all and per address. The total is fixed for
/// the process's life (shutdown waits on it); the per-address limit follows a reload.
pub struct Gate {
    max_per_ip: AtomicUsize,
    slots: Arc<Semaphore>,
    max_connections: usize,
    /// The polite refusals' own small budget ([`REFUSAL_SHARE`] of the slots), so that
    /// clients nobody allowed can never take the organization's slots.
    refusals: Arc<Semaphore>,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// The part of `max_connections` refused clients may hold (at least one).
pub const REFUSAL_SHARE: usize = 20;

impl Gate {
    pub fn new(max_connections: usize, max_per_ip: usize) -> Gate {
        Gate {
            max_per_ip: AtomicUsize::new(max_per_ip),
            slots: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            refusals: Arc::new(Semaphore::new((max_connections / REFUSAL_SHARE).max(1))),
            per_ip: Mutex::new(HashMap::new()),
        }
    }

    pub fn set_max_per_ip(&self, n: usize) {
        self.max_per_ip.store(n, Ordering::Relaxed);
    }

    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Admission> {
        self.hold(&self.slots, ip)
    }

    /// A slot of the refusals' budget for a polite refusal, counted per address like
    /// any connection.
    fn admit_refused(self: &Arc<Self>, ip: IpAddr) -> Option<Admission> {
        self.hold(&self.refusals, ip)
    }

    fn hold(self: &Arc<Self>, slots: &Arc<Semaphore>, ip: IpAddr) -> Option<Admission> {
        let permit = slots.clone().try_acquire_owned().ok()?;
        let mut map = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= self.max_per_ip.load(Ordering::Relaxed) {
            return None;
        }
        *n += 1;
        Some(Admission {
            _permit: permit,
            gate: self.clone(),
            ip,
        })
    }

    /// Waits until every session has ended, or the deadline passes.
    pub async fn wait_idle(&self, deadline: Instant) -> bool {
        let all = self.max_connections as u32;
        tokio::time::timeout_at(deadline.into(), self.slots.acquire_many(all))
            .await
            .is_ok()
    }

    pub fn active(&self) -> usize {
        self.max_connections - self.slots.available_permits()
    }
}

/// Holds a connection slot and the per-IP count for as long as the session lives.
struct Admission {
    _permit: OwnedSemaphorePermit,
    gate: Arc<Gate>,
    ip: IpAddr,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut map = self.gate.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Lives as long as a session task and is dropped on every way out of it, a panic
/// included: it gives back the connection slot and the per-IP count, keeps
/// `smartrelay_sessions_active` true, and on a panic counts it and tells a plain-text
/// client `421` instead of leaving it without a reply.
struct SessionGuard {
    _admission: Admission,
    /// A second descriptor of the client socket, for the last words after a panic; `None`
    /// once TLS is (or is about to be) spoken on it, where plain text would be garbage.
    plain: Mutex<Option<std::net::TcpStream>>,
}

impl SessionGuard {
    fn new(admission: Admission, stream: &TcpStream, implicit_tls: bool) -> SessionGuard {
        use std::os::fd::AsFd;
        metrics::gauge!(crate::telemetry::SESSIONS_ACTIVE).increment(1.0);
        let plain = if implicit_tls {
            None
        } else {
            stream
                .as_fd()
                .try_clone_to_owned()
                .ok()
                .map(std::net::TcpStream::from)
        };
        SessionGuard {
            _admission: admission,
            plain: Mutex::new(plain),
        }
    }

    fn encrypted(&self) {
        *self.plain.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        metrics::gauge!(crate::telemetry::SESSIONS_ACTIVE).decrement(1.0);
        if !std::thread::panicking() {
            return;
        }
        metrics::counter!(crate::telemetry::SESSION_PANICS_TOTAL).increment(1);
        tracing::error!("session task panicked: connection closed with 421");
        let plain = self.plain.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(sock) = plain.take() {
            use std::io::Write;
            // The descriptor is non-blocking (tokio's): one attempt, never a wait.
            let mut sock = sock;
            let _ = sock.write(b"421 4.3.0 Internal error, closing connection\r\n");
            let _ = sock.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Everything a session is judged by, from its first byte to its last: a reload makes
/// new rules for the next connection and leaves open sessions with theirs.
pub struct Rules<I, P> {
    pub context: Arc<Context<I, P>>,
    pub access: Access,
    /// For STARTTLS on plain listeners and for implicit TLS listeners.
    pub tls: Option<TlsAcceptor>,
    /// Load balancers whose PROXY header is believed.
    pub proxy: ProxyTrust,
}

#[derive(Debug, Clone, Default)]
pub struct ProxyTrust {
    pub trusted: Vec<IpNet>,
    pub timeout: Duration,
}

pub struct Listener<I, P> {
    pub rules: Live<Rules<I, P>>,
    pub gate: Arc<Gate>,
    /// Every session task and every polite refusal: shutdown waits for them.
    pub sessions: TaskTracker,
}

impl<I: Intake, P: SenderPolicy> Listener<I, P> {
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        implicit_tls: bool,
        mut phase: watch::Receiver<Phase>,
    ) {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = phase.changed() => {
                    if matches!(*phase.borrow(), Phase::Closing | Phase::Stop) { return; }
                    continue;
                }
            };
            let (stream, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends pass; hammering accept() would not help.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            self.clone()
                .on_connect(stream, peer, implicit_tls, phase.clone());
        }
    }

    fn on_connect(
        self: Arc<Self>,
        mut stream: TcpStream,
        peer: SocketAddr,
        implicit_tls: bool,
        phase: watch::Receiver<Phase>,
    ) {
        // An IPv4 client on a dual-stack socket shows up as ::ffff:a.b.c.d.
        let peer_ip = peer.ip().to_canonical();
        let rules = self.rules.get();
        if *phase.borrow() == Phase::Draining {
            metrics::counter!(crate::telemetry::CONNECTIONS_REFUSED_TOTAL, "reason" => "draining")
                .increment(1);
            if implicit_tls {
                // A TLS client would read a plain reply as a broken handshake anyway.
                return;
            }
            let reply = format!(
                "421 4.3.0 {} is draining, try another server\r\n",
                rules.context.cfg.hostname
            );
            // Whoever it is, a client or a balancer's check: the 421 and a clean close,
            // after the PROXY header a balancer sends first (closing on unread bytes
            // would reset the connection, and a balancer may take a reset for a failed
            // connect and send the client to this node again). On the refusals' budget;
            // past it one non-blocking write.
            let Some(admission) = self.gate.admit_refused(peer_ip) else {
                let _ = stream.try_write(reply.as_bytes());
                return;
            };
            let balancer = rules.proxy.trusted.iter().any(|n| n.contains(&peer_ip));
            let timeout = rules.proxy.timeout;
            self.sessions.spawn(async move {
                if balancer {
                    let _ = proxy::read_header(&mut stream, timeout).await;
                }
                close_with(stream, reply.as_bytes()).await;
                drop(admission);
            });
            return;
        }
        if !rules.proxy.trusted.iter().any(|n| n.contains(&peer_ip)) {
            self.admit(rules, stream, peer_ip, implicit_tls, phase);
            return;
        }
        // A balancer: the client is whoever its header names, read before anything else.
        let sessions = self.sessions.clone();
        sessions.spawn(async move {
            match proxy::read_header(&mut stream, rules.proxy.timeout).await {
                Ok(Source::Client(client)) => {
                    let ip = client.ip().to_canonical();
                    self.admit(rules, stream, ip, implicit_tls, phase);
                }
                Ok(Source::Local) => {
                    metrics::counter!(crate::telemetry::PROXY_HEALTH_CHECKS_TOTAL).increment(1);
                    let greeting = format!("220 {} ESMTP smartrelay\r\n", rules.context.cfg.hostname);
                    brief_dialogue(stream, &greeting, health_reply).await;
                }
                Err(e) => {
                    let reason = match e {
                        ProxyError::Timeout(_) => "timeout",
                        ProxyError::Closed => "closed",
                        ProxyError::Invalid(_) => "invalid",
                    };
                    metrics::counter!(crate::telemetry::PROXY_HEADER_FAILURES_TOTAL, "reason" => reason)
                        .increment(1);
                    tracing::warn!(balancer = %peer_ip, error = %e, "connection from a trusted balancer closed: no valid PROXY header");
                }
            }
        });
    }

    /// The gate's checks for the client (the peer, or the one a PROXY header named),
    /// then the session task.
    fn admit(
        self: Arc<Self>,
        rules: Arc<Rules<I, P>>,
        stream: TcpStream,
        ip: IpAddr,
        implicit_tls: bool,
        phase: watch::Receiver<Phase>,
    ) {
        let kind = match rules.access.standing(ip) {
            Standing::Admit(kind) => kind,
            Standing::NotYet => {
                tracing::warn!(client = %ip, "connection refused for now: the shared ranges from SPF have never been resolved");
                refused(&rules, ip, RefusalReason::SharedRangesUnresolved);
                // One non-blocking write, no task: this can be a whole platform knocking.
                let _ = stream.try_write(
                    b"421 4.3.0 Shared-platform ranges not resolved yet, try again later\r\n",
                );
                return;
            }
            Standing::Refuse => {
                tracing::warn!(client = %ip, "connection refused: address not in access.allowed_ranges");
                refused(&rules, ip, RefusalReason::IpNotAllowed);
                // Never a slot of the organization's: the refusals' own few, within the
                // per-address limit; past them one non-blocking write and the close.
                match self.gate.admit_refused(ip) {
                    Some(admission) => {
                        let hostname = rules.context.cfg.hostname.clone();
                        self.sessions.spawn(async move {
                            refuse_politely(stream, ip, &hostname).await;
                            drop(admission);
                        });
                    }
                    None => {
                        let _ = stream.try_write(
                            format!("554 5.7.1 {ip} is not allowed to use this relay\r\n")
                                .as_bytes(),
                        );
                    }
                }
                return;
            }
        };
        let Some(admission) = self.gate.admit(ip) else {
            tracing::warn!(client = %ip, "connection refused: connection limit");
            refused(&rules, ip, RefusalReason::Limit);
            // No task is spawned for a connection over the limit: one non-blocking write.
            let _ = stream.try_write(b"421 4.7.0 Too many connections, try again later\r\n");
            return;
        };
        metrics::counter!(crate::telemetry::CONNECTIONS_ACCEPTED_TOTAL).increment(1);
        rules.context.events.publish_now(Event::Connection {
            ip,
            at: now_ms(),
            refused: None,
        });
        let guard = SessionGuard::new(admission, &stream, implicit_tls);
        self.sessions.spawn(async move {
            session(&rules, stream, ip, kind, implicit_tls, phase, &guard).await;
            drop(guard);
        });
    }
}

fn refused<I, P>(rules: &Rules<I, P>, ip: IpAddr, reason: RefusalReason) {
    metrics::counter!(crate::telemetry::CONNECTIONS_REFUSED_TOTAL, "reason" => reason.label())
        .increment(1);
    rules.context.events.publish_now(Event::Connection {
        ip,
        at: now_ms(),
        refused: Some(reason),
    });
}

async fn session<I: Intake, P: SenderPolicy>(
    rules: &Rules<I, P>,
    stream: TcpStream,
    ip: IpAddr,
    kind: SourceKind,
    implicit_tls: bool,
    phase: watch::Receiver<Phase>,
    guard: &SessionGuard,
) {
    let ctx = &rules.context;
    let deadline = tokio::time::Instant::now() + ctx.session_timeout;
    if implicit_tls {
        let Some(acceptor) = &rules.tls else { return };
        let Some(tls) = handshake(acceptor, stream, ctx.command_timeout).await else {
            return;
        };
        let desc = describe(tls.get_ref().1);
        let mut session = Session::new(ctx.cfg.clone(), ip, kind, Some(desc));
        let mut conn = Conn::new(tls, deadline, phase);
        drive(&mut conn, &mut session, ctx, true).await;
        return;
    }
    let mut session = Session::new(ctx.cfg.clone(), ip, kind, None);
    let mut conn = Conn::new(stream, deadline, phase.clone());
    if let Exit::StartTls = drive(&mut conn, &mut session, ctx, true).await {
        let Some(acceptor) = &rules.tls else { return };
        guard.encrypted();
        let Some(tls) = handshake(acceptor, conn.into_stream(), ctx.command_timeout).await else {
            return;
        };
        session.tls_established(describe(tls.get_ref().1));
        let mut conn = Conn::new(tls, deadline, phase);
        drive(&mut conn, &mut session, ctx, false).await;
    }
}

async fn handshake(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    timeout: Duration,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            tracing::info!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::info!("TLS handshake timed out");
            None
        }
    }
}

/// RFC 5321 §3.1: after a 554 greeting the server waits for QUIT and answers 503 to
/// everything else. Bounded in time and commands so refused clients cost little.
async fn refuse_politely(stream: TcpStream, ip: IpAddr, hostname: &str) {
    let greeting = format!("554 5.7.1 {hostname} {ip} is not allowed to use this relay\r\n");
    brief_dialogue(stream, &greeting, |line| {
        if is_command(line, b"QUIT") {
            (b"221 2.0.0 Bye\r\n", true)
        } else {
            (
                b"503 5.7.1 Not allowed: this address may not relay, send QUIT\r\n",
                false,
            )
        }
    })
    .await;
}

/// Writes `reply` and closes: FIN after it, and what the peer still sends read and
/// dropped for up to a second, so the close never turns into a reset that could
/// overtake the reply.
async fn close_with(mut stream: TcpStream, reply: &[u8]) {
    if stream.write_all(reply).await.is_err() {
        return;
    }
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 512];
    let until = Instant::now() + Duration::from_secs(1);
    while let Ok(Ok(n)) = tokio::time::timeout_at(until.into(), stream.read(&mut sink)).await {
        if n == 0 {
            break;
        }
    }
}

/// A balancer's health check (PROXY v2 `LOCAL`): a greeting, EHLO/HELO and NOOP
/// answered, QUIT; no session, no source recorded.
fn health_reply(line: &[u8]) -> (&'static [u8], bool) {
    if is_command(line, b"QUIT") {
        (b"221 2.0.0 Bye\r\n", true)
    } else if is_command(line, b"EHLO") || is_command(line, b"HELO") {
        (b"250 ok\r\n", false)
    } else if is_command(line, b"NOOP") || is_command(line, b"RSET") {
        (b"250 2.0.0 OK\r\n", false)
    } else {
        (
            b"503 5.5.1 Health check connection: EHLO, NOOP or QUIT only\r\n",
            false,
        )
    }
}

fn is_command(line: &[u8], verb: &[u8]) -> bool {
    line.get(..verb.len())
        .is_some_and(|v| v.eq_ignore_ascii_case(verb))
}

/// A greeting, then a few lines each answered by `reply` until it says to close;
/// at most 10 commands in 10 seconds.
async fn brief_dialogue(
    mut stream: TcpStream,
    greeting: &str,
    reply: impl Fn(&[u8]) -> (&'static [u8], bool),
) {
    if stream.write_all(greeting.as_bytes()).await.is_err() {
        return;
    }
    let mut buf = [0u8; 1024];
    let mut pending = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut commands = 0;
    while commands < 10 {
        let n = match tokio::time::timeout_at(deadline.into(), stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return,
        };
        pending.extend_from_slice(buf.get(..n).unwrap_or_default());
        while let Some(k) = memchr::memchr(b'\n', &pending) {
            let line: Vec<u8> = pending.drain(..=k).collect();
            commands += 1;
            let (answer, close) = reply(&line);
            if stream.write_all(answer).await.is_err() || close {
                return;
            }
        }
        if pending.len() > 4096 {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_shared() -> Arc<SharedSources> {
        Arc::new(SharedSources::new(&[]))
    }

    #[test]
    fn shared_wins_over_dedicated() {
        let shared = crate::config::SharedRange {
            name: "o365".into(),
            platform: crate::config::SharedPlatform::O365,
            ranges: vec!["127.0.0.2/32".parse().unwrap()],
            ranges_from_spf: None,
            tenant_id: None,
            dkim_domains: Vec::new(),
            header: None,
        };
        let gate = Access {
            allowed: vec!["127.0.0.0/8".parse().unwrap()],
            sources: Arc::new(SharedSources::new(&[shared])),
        };
        let ip = |t: &str| t.parse::<IpAddr>().unwrap();
        assert_eq!(
            gate.standing(ip("127.0.0.2")),
            Standing::Admit(SourceKind::Shared(0))
        );
        assert_eq!(
            gate.standing(ip("127.0.0.3")),
            Standing::Admit(SourceKind::Dedicated)
        );
        assert_eq!(gate.standing(ip("10.0.0.1")), Standing::Refuse);
    }

    /// While a shared range's SPF list has never been resolved, an address of
    /// `allowed_ranges` is not known to be outside it: not yet, rather than dedicated.
    #[test]
    fn an_unresolved_shared_range_holds_dedicated_addresses_too() {
        let shared = crate::config::SharedRange {
            name: "o365".into(),
            platform: crate::config::SharedPlatform::O365,
            ranges: Vec::new(),
            ranges_from_spf: Some("spf.protection.outlook.test".into()),
            tenant_id: None,
            dkim_domains: Vec::new(),
            header: None,
        };
        let gate = Access {
            allowed: vec!["127.0.0.0/8".parse().unwrap()],
            sources: Arc::new(SharedSources::new(&[shared])),
        };
        assert_eq!(
            gate.standing("127.0.0.2".parse().unwrap()),
            Standing::NotYet
        );
        assert_eq!(gate.standing("10.0.0.1".parse().unwrap()), Standing::NotYet);
    }

    /// Refused clients hold slots of their own budget only, counted per address.
    #[test]
    fn refusals_have_their_own_budget() {
        let gate = Arc::new(Gate::new(40, 3));
        let ip: IpAddr = "10.9.9.9".parse().unwrap();
        let held: Vec<_> = (0..2).filter_map(|_| gate.admit_refused(ip)).collect();
        assert_eq!(held.len(), 2, "40 / {REFUSAL_SHARE} refusal slots");
        assert!(gate.admit_refused("10.9.9.10".parse().unwrap()).is_none());
        assert_eq!(gate.active(), 0, "none of the organization's slots");
        let _one = gate.admit(ip).unwrap();
        assert!(
            gate.admit(ip).is_none(),
            "the per-address limit counts refusals"
        );
        drop(held);
        assert!(gate.admit_refused("10.9.9.10".parse().unwrap()).is_some());
    }

    #[test]
    fn allowlist_matches_mapped_v4() {
        let gate = Access {
            allowed: vec!["127.0.0.1/32".parse().unwrap(), "::1/128".parse().unwrap()],
            sources: no_shared(),
        };
        let dedicated = Standing::Admit(SourceKind::Dedicated);
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(gate.standing(mapped.to_canonical()), dedicated);
        assert_eq!(
            gate.standing("127.0.0.2".parse().unwrap()),
            Standing::Refuse
        );
        assert_eq!(gate.standing("::1".parse().unwrap()), dedicated);
    }

    #[test]
    fn per_ip_limit_and_release() {
        let gate = Arc::new(Gate::new(10, 2));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let a = gate.admit(ip).unwrap();
        let b = gate.admit(ip).unwrap();
        assert!(gate.admit(ip).is_none());
        assert!(gate.admit("10.0.0.2".parse().unwrap()).is_some());
        drop(a);
        let _c = gate.admit(ip).unwrap();
        assert_eq!(gate.active(), 2);
        // A reload lowers the per-address limit: one held, no second.
        drop(b);
        gate.set_max_per_ip(1);
        assert!(gate.admit(ip).is_none());
        gate.set_max_per_ip(2);
        assert!(gate.admit(ip).is_some());
    }

    /// A session task that panics gives back its slot and per-IP count, and the client
    /// reads 421 rather than a silent close.
    #[tokio::test]
    async fn a_panicking_session_releases_its_slot_and_says_421() {
        let gate = Arc::new(Gate::new(4, 1));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (server, peer) = listener.accept().await.unwrap();
        let admission = gate.admit(peer.ip()).unwrap();
        assert!(gate.admit(peer.ip()).is_none(), "per-IP limit of 1 is held");
        let guard = SessionGuard::new(admission, &server, false);
        let task = tokio::spawn(async move {
            let _server = server;
            let _guard = guard;
            panic!("a bug in a session");
        });
        assert!(task.await.unwrap_err().is_panic());
        let mut reply = String::new();
        client.read_to_string(&mut reply).await.unwrap();
        assert!(reply.starts_with("421 4.3.0 "), "{reply:?}");
        assert_eq!(gate.active(), 0);
        assert!(gate.admit(peer.ip()).is_some(), "per-IP count released");
    }
}
