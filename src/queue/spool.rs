//! The storage behind the queue, as a small trait so another backend can replace the
//! file spool. Calls block (disk I/O); the queue runs them on the blocking pool.

use crate::envelope::{DeliveryState, Envelope, QueueId};

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool I/O on {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("spool entry {id} is corrupt: {reason}")]
    Corrupt { id: String, reason: String },
    #[error("spool {0} is locked by another process")]
    Locked(String),
    #[error("no such message {0}")]
    NotFound(String),
}

/// A message found in the spool at start-up.
#[derive(Debug)]
pub struct Recovered {
    pub envelope: Envelope,
    /// `None` for a message that was never attempted.
    pub state: Option<DeliveryState>,
}

pub trait Spool: Send + Sync + 'static {
    /// Makes the message durable: when this returns `Ok`, a crash cannot lose it, and an
    /// error leaves nothing that recovery would deliver.
    fn store(&self, envelope: &Envelope, data: &[u8]) -> Result<(), SpoolError>;
    /// The message data (as received, with our Received header).
    fn load(&self, id: &QueueId) -> Result<Vec<u8>, SpoolError>;
    /// Replaces the delivery state atomically.
    fn save_state(&self, id: &QueueId, state: &DeliveryState) -> Result<(), SpoolError>;
    /// Removes a message and its state; after a crash it may come back (at least once).
    fn remove(&self, id: &QueueId) -> Result<(), SpoolError>;
    /// Every complete message, for delivery after a restart. Incomplete writes are
    /// purged; unreadable entries are moved aside, never delivered and never fatal.
    fn recover(&self) -> Result<Vec<Recovered>, SpoolError>;
    /// Whether the spool can take new mail (a probe write succeeds).
    fn probe(&self) -> Result<(), SpoolError>;
}
