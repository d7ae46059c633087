//! The storage behind the queue, as a small trait so another backend can replace the
//! file spool. Durable writes are async (a backend may batch them); reads block on disk
//! I/O and are run on the blocking pool; a removal does not wait.

use std::future::Future;
use std::path::Path;

use bytes::Bytes;

use crate::envelope::{DeliveryState, Envelope, QueueId};
use crate::message::Data;

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
    /// Makes the message durable: when this resolves `Ok`, a crash cannot lose it, and
    /// an error leaves nothing that recovery would deliver.
    fn store(
        &self,
        envelope: &Envelope,
        data: Data,
    ) -> impl Future<Output = Result<(), SpoolError>> + Send;
    /// Replaces the delivery state atomically and durably.
    fn save_state(
        &self,
        id: &QueueId,
        state: &DeliveryState,
    ) -> impl Future<Output = Result<(), SpoolError>> + Send;
    /// Makes every earlier write durable, removals included (at shutdown).
    fn flush(&self) -> impl Future<Output = Result<(), SpoolError>> + Send;
    /// The message data (as received, with our Received header).
    fn load(&self, id: &QueueId) -> Result<Bytes, SpoolError>;
    /// Removes a message without waiting for the disk: after a crash it may come back
    /// (at least once), never the other way round.
    fn remove(&self, id: &QueueId) -> Result<(), SpoolError>;
    /// Hands every complete message to `found`, oldest first, for delivery after a
    /// restart, until it returns false. Incomplete writes are purged; unreadable
    /// entries are moved aside, never delivered and never fatal. Blocks: run it off
    /// the async runtime.
    fn recover(&self, found: &mut dyn FnMut(Recovered) -> bool) -> Result<(), SpoolError>;
    /// Whether the spool can take new mail (a probe write succeeds).
    fn probe(&self) -> Result<(), SpoolError>;
    /// Octets the spool takes on disk.
    fn size(&self) -> u64;
    /// Where the spool is, for the free-space check of its file system.
    fn dir(&self) -> &Path;
}
