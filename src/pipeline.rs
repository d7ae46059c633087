//! The seams between stages. A message passes
//!
//! ```text
//! smtp (listener, session) --Intake--> queue (spool, scheduler) --Router--> route
//!                                            \--Courier--> deliver --> smart host
//! ```
//!
//! Each stage implements the trait it offers and calls the trait of the next one, so no
//! stage names a later stage's types; `app` plugs the implementations together.

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::envelope::{Envelope, HoldReason, Reply};
use crate::events::{SpfOutcome, TenantProof};
use crate::message::Data;
use crate::regions::{GatewayInclude, RouteTarget};

/// A message the SMTP stage has received completely: the data already carries our
/// `Received:` header.
#[derive(Debug)]
pub struct Submission {
    pub envelope: Envelope,
    pub data: Data,
    /// What made it the organization's (for tracking; the queue does not keep it).
    pub proof: TenantProof,
    /// Its Subject, for tracking when `tracking.subjects` is on.
    pub subject: Option<String>,
}

/// What the queue did with a submission beyond storing it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stored {
    /// Held at once (a limit), not to be delivered until released.
    pub held: Option<HoldReason>,
}

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    /// Disk full, write error, spool unusable: the client must try again later.
    #[error("queue unavailable: {0}")]
    Unavailable(String),
}

/// Why the queue takes no new mail for now (sessions answer 452 4.3.1 at MAIL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Backpressure {
    /// A spool write failed a moment ago.
    WriteFailed = 1,
    /// The spool's file system has less free space than `queue.min_free`.
    MinFree = 2,
    /// The spool takes more than `queue.max_size`.
    MaxSize = 3,
}

impl Backpressure {
    pub fn label(self) -> &'static str {
        match self {
            Backpressure::WriteFailed => "write_failed",
            Backpressure::MinFree => "min_free",
            Backpressure::MaxSize => "max_size",
        }
    }

    pub fn from_code(code: u8) -> Option<Backpressure> {
        match code {
            1 => Some(Backpressure::WriteFailed),
            2 => Some(Backpressure::MinFree),
            3 => Some(Backpressure::MaxSize),
            _ => None,
        }
    }
}

/// What a session counts against the rate limits before it accepts a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// A MAIL: one more message.
    Message,
    /// A RCPT: one more recipient.
    Recipient,
}

/// A rate limit that defers the command (`451 4.7.1`); the reply names the limit, never
/// the address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deferral {
    pub limit: String,
}

/// smtp → queue: make a message durable. `Ok` means it is on disk, fsynced.
pub trait Intake: Send + Sync + 'static {
    fn submit(&self, msg: Submission) -> impl Future<Output = Result<Stored, IntakeError>> + Send;
    /// Whether the queue takes new mail now; sessions answer 452 at MAIL when not.
    fn admission(&self) -> Result<(), Backpressure>;
    /// Counts one more `unit` from `sender` (empty for `<>`) at `client` against the
    /// rate limits, or says which one defers it (then nothing is counted). Without
    /// limits, everything is admitted.
    fn count(&self, unit: Unit, sender: &str, client: IpAddr) -> Result<(), Deferral> {
        let _ = (unit, sender, client);
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderVerdict {
    Accept,
    /// Refuse at MAIL FROM; the text names what is missing from the SPF record.
    Reject(String),
}

/// smtp → route: may this sender domain be relayed at all (`on_unauthorized = "reject"`)?
pub trait SenderPolicy: Send + Sync + 'static {
    fn check_sender(&self, domain: &str) -> impl Future<Output = SenderVerdict> + Send;
}

/// One part of a delivery plan.
#[derive(Debug, Clone)]
pub enum PlanItem {
    /// Hand these recipients (indexes into the envelope) to this route.
    Leg {
        route: Arc<RouteTarget>,
        recipients: Vec<usize>,
        spf: SpfOutcome,
    },
    /// Do not send to these recipients; record the reply (4xx: they stay queued and are
    /// retried, 5xx: they bounce). Used when SPF does not authorize the smart hosts.
    Refuse {
        recipients: Vec<usize>,
        reply: Reply,
    },
}

/// queue → route: which route each pending recipient takes.
pub trait Router: Send + Sync + 'static {
    fn plan(
        &self,
        envelope: &Envelope,
        pending: &[usize],
    ) -> impl Future<Output = Vec<PlanItem>> + Send;
}

/// The replies one upstream transaction gave.
#[derive(Debug, Clone)]
pub struct LegOutcome {
    /// host:port that gave the replies; `None` when no host could be reached.
    pub host: Option<String>,
    /// One reply per recipient of the leg, in the leg's order.
    pub replies: Vec<(usize, Reply)>,
    pub tls: bool,
    /// The upstream offered DSN, so NOTIFY/ORCPT went on with the message and success
    /// notices are its job from here (RFC 3461 §6.2.2).
    pub dsn_passed: bool,
}

/// queue → deliver: send the message to these recipients over this route.
pub trait Courier: Send + Sync + 'static {
    fn deliver(
        &self,
        route: &RouteTarget,
        envelope: &Envelope,
        data: &Bytes,
        recipients: &[usize],
    ) -> impl Future<Output = LegOutcome> + Send;
}

/// What a domain's published SPF record says about the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayAuthorization {
    /// The first gateway include found, depth first in record order.
    pub include: Option<GatewayInclude>,
    /// How long the answer may be cached (the smallest TTL seen).
    pub ttl: Duration,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("SPF lookup for {domain} failed: {reason}")]
pub struct SpfLookupError {
    pub domain: String,
    pub reason: String,
}

/// route → spf: resolve a domain's SPF tree and find the gateway include in it.
pub trait SpfLookup: Send + Sync + 'static {
    fn gateway_authorization(
        &self,
        domain: &str,
    ) -> impl Future<Output = Result<GatewayAuthorization, SpfLookupError>> + Send;
}
