//! Opening an upstream session: connect, greeting, EHLO, STARTTLS as the route's TLS
//! mode asks, EHLO again, AUTH. Every step is under a timeout (mail-send does not time
//! out the greeting of a plain connection by itself).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use mail_send::Credentials;
use mail_send::SmtpClient;
use smtp_proto::{EhloResponse, Response, EXT_START_TLS};
use tokio::io::BufStream;
use tokio::net::TcpStream;

use super::stream::Stream;
use super::tls::Connectors;
use crate::envelope::Reply;
use crate::regions::{HostPort, RouteTarget, TlsMode};

pub type Client = SmtpClient<BufStream<Stream>>;

/// Timeouts and identity for upstream sessions.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    pub helo_name: String,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    /// Fired when shutdown begins: an attempt still waiting for a session to its
    /// smart host gives up at once, and the message stays queued.
    pub stopping: crate::tasks::CancellationToken,
    /// Fired late in shutdown: a transaction that has not sent its data yet stops
    /// there, and the message stays queued.
    pub cut: crate::tasks::CancellationToken,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("timed out during {0}")]
    Timeout(&'static str),
    #[error("refused the session: {0}")]
    Refused(Reply),
    #[error("STARTTLS is required but not offered")]
    NoStartTls,
    #[error("TLS failed: {0}")]
    Tls(String),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("connection lost: {0}")]
    Io(String),
}

impl UpstreamError {
    /// The temporary reply recorded for recipients when no host could take them.
    pub fn reply(&self, host: &HostPort) -> Reply {
        let esc = match self {
            UpstreamError::Tls(_) | UpstreamError::NoStartTls => "4.7.5",
            UpstreamError::Auth(_) => "4.7.8",
            UpstreamError::Timeout(_) => "4.4.2",
            _ => "4.4.1",
        };
        Reply::new(451, esc, format!("{host}: {self}"))
    }
}

/// An established session, ready for MAIL.
pub struct Connection {
    pub client: Client,
    pub caps: EhloResponse<String>,
    /// Negotiated TLS, e.g. "TLSv1.3"; `None` in plaintext.
    pub tls: Option<String>,
    pub created: Instant,
    pub last_used: Instant,
    pub messages: u32,
}

impl super::pool::Pooled for Connection {
    fn created(&self) -> Instant {
        self.created
    }
    fn last_used(&self) -> Instant {
        self.last_used
    }
    fn messages(&self) -> u32 {
        self.messages
    }
    fn used(&mut self, now: Instant) {
        self.last_used = now;
    }
    /// Says goodbye politely, bounded so a silent server cannot hold shutdown.
    async fn retire(self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.client.quit()).await;
    }
}

impl Connection {
    pub fn has(&self, ext: u32) -> bool {
        self.caps.has_capability(ext)
    }
}

pub fn reply_of(r: &Response<String>) -> Reply {
    let esc = (r.esc[0] != 0).then(|| format!("{}.{}.{}", r.esc[0], r.esc[1], r.esc[2]));
    Reply {
        code: r.code,
        esc,
        text: r.message.replace(['\r', '\n'], " "),
    }
}

pub fn error_of(e: mail_send::Error, during: &'static str) -> UpstreamError {
    match e {
        mail_send::Error::Timeout => UpstreamError::Timeout(during),
        mail_send::Error::UnexpectedReply(r) => UpstreamError::Refused(reply_of(&r)),
        mail_send::Error::Tls(t) => UpstreamError::Tls(t.to_string()),
        mail_send::Error::Io(io) => UpstreamError::Io(io.to_string()),
        mail_send::Error::AuthenticationFailed(r) => UpstreamError::Auth(reply_of(&r).to_string()),
        other => UpstreamError::Io(format!("{other:?}")),
    }
}

async fn connect_tcp(host: &HostPort, timeout: Duration) -> Result<TcpStream, UpstreamError> {
    let target = (host.host.as_str(), host.port);
    let addrs: Vec<SocketAddr> = tokio::time::timeout(timeout, tokio::net::lookup_host(target))
        .await
        .map_err(|_| UpstreamError::Timeout("name resolution"))?
        .map_err(|e| UpstreamError::Resolve(format!("{}: {e}", host.host)))?
        .collect();
    let mut last = UpstreamError::Resolve(host.host.clone());
    for addr in addrs {
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                // Without it, a body and its final dot written separately stall ~40 ms
                // (Nagle against delayed ACK).
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) => last = UpstreamError::Connect(format!("{addr}: {e}")),
            Err(_) => last = UpstreamError::Timeout("connect"),
        }
    }
    Err(last)
}

async fn greet(
    client: &mut SmtpClient<TcpStream>,
    s: &ClientSettings,
) -> Result<EhloResponse<String>, UpstreamError> {
    let greeting = tokio::time::timeout(s.connect_timeout, client.read())
        .await
        .map_err(|_| UpstreamError::Timeout("greeting"))?
        .map_err(|e| error_of(e, "greeting"))?;
    if greeting.code != 220 {
        return Err(UpstreamError::Refused(reply_of(&greeting)));
    }
    client
        .ehlo(&s.helo_name)
        .await
        .map_err(|e| error_of(e, "EHLO"))
}

/// Opens a session on `host` following `route`'s TLS mode and authentication.
pub async fn open(
    host: &HostPort,
    route: &RouteTarget,
    settings: &ClientSettings,
    connectors: &Connectors,
) -> Result<Connection, UpstreamError> {
    match open_once(host, route, settings, connectors, route.tls).await {
        // Opportunistic TLS that fails is retried in plaintext on a new connection
        // (RFC 7435): encryption is welcome, not a condition.
        Err(UpstreamError::Tls(e)) if route.tls == TlsMode::Opportunistic => {
            tracing::info!(%host, error = %e, "STARTTLS failed, retrying in plaintext");
            open_once(host, route, settings, connectors, TlsMode::None).await
        }
        other => other,
    }
}

async fn open_once(
    host: &HostPort,
    route: &RouteTarget,
    s: &ClientSettings,
    connectors: &Connectors,
    mode: TlsMode,
) -> Result<Connection, UpstreamError> {
    let tcp = connect_tcp(host, s.connect_timeout).await?;
    let mut plain = SmtpClient {
        stream: tcp,
        timeout: s.command_timeout,
    };
    let caps = greet(&mut plain, s).await?;
    let offered = caps.has_capability(EXT_START_TLS);
    let (mut client, caps, tls) = match mode {
        TlsMode::None => (wrap(Stream::Plain(plain.stream), s), caps, None),
        TlsMode::Opportunistic if !offered => (wrap(Stream::Plain(plain.stream), s), caps, None),
        TlsMode::Required if !offered => return Err(UpstreamError::NoStartTls),
        TlsMode::Opportunistic | TlsMode::Required => {
            let connector = if mode == TlsMode::Required {
                connectors
                    .verified(route.ca_file.as_deref())
                    .map_err(UpstreamError::Tls)?
            } else {
                connectors.opportunistic().clone()
            };
            let name = route.tls_name.as_deref().unwrap_or(&host.host);
            let tls_client = plain
                .start_tls(&connector, name)
                .await
                .map_err(|e| match e {
                    mail_send::Error::UnexpectedReply(r) => UpstreamError::Refused(reply_of(&r)),
                    mail_send::Error::Timeout => UpstreamError::Timeout("TLS handshake"),
                    other => UpstreamError::Tls(tls_reason(other)),
                })?;
            // The connectors' one client configuration keeps the sessions (and
            // TLS 1.3 tickets) smart hosts issue, so a new connection resumes.
            let kind = match tls_client.tls_connection().handshake_kind() {
                Some(rustls::HandshakeKind::Resumed) => "resumed",
                _ => "full",
            };
            metrics::counter!(crate::telemetry::UPSTREAM_TLS_HANDSHAKES_TOTAL, "kind" => kind)
                .increment(1);
            let version = tls_client
                .tls_connection()
                .protocol_version()
                .map(|v| match v {
                    rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3".to_string(),
                    rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2".to_string(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_else(|| "TLS".into());
            let mut client = wrap(Stream::Tls(Box::new(tls_client.stream)), s);
            let caps = client
                .ehlo(&s.helo_name)
                .await
                .map_err(|e| error_of(e, "EHLO after STARTTLS"))?;
            (client, caps, Some(version))
        }
    };
    if let Some(auth) = &route.auth {
        if tls.is_none() && route.tls != TlsMode::None {
            return Err(UpstreamError::Auth(
                "refusing to send a password without TLS".into(),
            ));
        }
        let password = std::env::var(&auth.password_env)
            .map_err(|_| UpstreamError::Auth(format!("{} is not set", auth.password_env)))?;
        let creds = Credentials::new(auth.username.clone(), password);
        client
            .authenticate(&creds, &caps)
            .await
            .map_err(|e| UpstreamError::Auth(format!("{:?}", error_of(e, "AUTH"))))?;
    }
    let now = Instant::now();
    Ok(Connection {
        client,
        caps,
        tls,
        created: now,
        last_used: now,
        messages: 0,
    })
}

fn wrap(stream: Stream, s: &ClientSettings) -> Client {
    SmtpClient {
        stream: BufStream::new(stream),
        timeout: s.command_timeout,
    }
}

fn tls_reason(e: mail_send::Error) -> String {
    match e {
        mail_send::Error::Tls(t) => t.to_string(),
        mail_send::Error::Io(io) => io.to_string(),
        other => format!("{other:?}"),
    }
}
