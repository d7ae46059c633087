//! DKIM replay: a signature proves a tenant once, fresh, not forever.
//!
//! A signature is a property of a message, not of a sender: whoever received one
//! signed message can send it again, to anyone, through their own tenant of the same
//! platform, and it still verifies. So a signature proves a message only
//! - when it was made recently: its time of signing (`t=`, or else the signed `Date:`)
//!   is within `max_age` of now and at most [`MAX_FUTURE`] ahead;
//! - and, once `window` has passed since it was first seen, only for recipients it was
//!   already accepted for (a retry of a lost reply), never for new ones.
//!
//! The memory keeps, per signature (a SHA-256 of `d=`, `s=` and `b=`), when and where
//! it was first seen and the recipients it was accepted for, for `max_age` (after which
//! the freshness rule refuses it anyway). It lives in the store, so a replay through
//! another node is caught as well. `sqlite` and `pg` keep it.

pub mod pg;
pub mod sqlite;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::dkim::Passed;
use crate::envelope::Millis;
use crate::store::StoreError;

/// How far ahead of our clock a time of signing may be (clock skew).
pub const MAX_FUTURE: Duration = Duration::from_secs(15 * 60);

/// A signature's identity: SHA-256 of `d=`, `s=` and `b=`.
pub type Key = [u8; 32];

pub fn key(sig: &Passed) -> Key {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(sig.domain.as_bytes());
    ctx.update(b"\0");
    ctx.update(sig.selector.as_bytes());
    ctx.update(b"\0");
    ctx.update(&sig.b);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// When the signature was made: `t=`, or else the signed `Date:` (`date`, from the
/// message); `None` when neither says.
pub fn signed_at(sig: &Passed, date: Option<Millis>) -> Option<Millis> {
    if sig.t > 0 {
        return Some(sig.t.saturating_mul(1000));
    }
    date.filter(|_| sig.signs_date)
}

/// Made within `max_age` of `now`, and not more than [`MAX_FUTURE`] ahead of it.
pub fn fresh(signed: Millis, now: Millis, max_age: Duration) -> bool {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    signed.saturating_add(ms(max_age)) >= now && signed <= now.saturating_add(ms(MAX_FUTURE))
}

/// What the memory held for a signature, and did with this use of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub first_seen: Millis,
    /// `server.hostname` of the node that saw it first.
    pub node: String,
    /// This use is its first.
    pub inserted: bool,
    /// How many of this use's recipients it had been accepted for before.
    pub known: usize,
}

/// What a use of a signature is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Use {
    /// Never seen before: it proves the message.
    First,
    /// Within `window` of its first use: any recipients (one message, split or retried).
    Within,
    /// After `window`, every recipient already accepted with it: a retry.
    Retry,
    /// After `window`, with a recipient it was never accepted for.
    Replayed { first_seen: Millis, node: String },
}

impl Use {
    pub fn proves(&self) -> bool {
        !matches!(self, Use::Replayed { .. })
    }
}

/// The rule, on what the memory said.
pub fn judge(seen: Seen, recipients: usize, now: Millis, window: Duration) -> Use {
    let window = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
    if seen.inserted {
        Use::First
    } else if now <= seen.first_seen.saturating_add(window) {
        Use::Within
    } else if seen.known >= recipients {
        Use::Retry
    } else {
        Use::Replayed {
            first_seen: seen.first_seen,
            node: seen.node,
        }
    }
}

/// Recipients as the memory compares them: the local part as written, the domain in
/// lower case.
pub fn normalize(recipient: &str) -> String {
    match recipient.rsplit_once('@') {
        Some((local, domain)) => format!("{local}@{}", domain.to_ascii_lowercase()),
        None => recipient.to_string(),
    }
}

/// What keeps the memory.
pub trait Backend: Send + Sync + 'static {
    /// Records a use of `key` at `now` on `node`: the signature on its first use, and
    /// the recipients while it is within its window (`first_seen >= window_start`).
    /// Returns what it held before.
    fn remember(
        &self,
        key: Key,
        domain: &str,
        recipients: Vec<String>,
        now: Millis,
        window_start: Millis,
        node: &str,
    ) -> impl Future<Output = Result<Seen, StoreError>> + Send;
    /// Forgets signatures first seen before `before`; returns how many.
    fn prune(&self, before: Millis) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

/// The memory where it is kept: the node's state file, or the cluster's PostgreSQL.
#[derive(Clone)]
pub enum Store {
    Sqlite(Arc<sqlite::SqliteSignatures>),
    Postgres(pg::PgSignatures),
}

impl Store {
    pub fn open(path: &std::path::Path) -> Result<Store, StoreError> {
        Ok(Store::Sqlite(Arc::new(sqlite::SqliteSignatures::open(
            path,
        )?)))
    }

    pub fn shared(pg: crate::store::Postgres) -> Store {
        Store::Postgres(pg::PgSignatures::new(pg))
    }

    pub async fn prune(&self, before: Millis) -> Result<u64, StoreError> {
        match self {
            Store::Sqlite(s) => s.prune(before).await,
            Store::Postgres(p) => p.prune(before).await,
        }
    }
}

/// The replay rules with their memory and settings (`[access.dkim_replay]`).
pub struct ReplayGuard {
    pub store: Store,
    pub window: Duration,
    pub max_age: Duration,
    /// This node's name (`server.hostname`), recorded with a first use.
    pub node: String,
}

impl ReplayGuard {
    /// Records this use of a verified, fresh signature for `recipients` and says what
    /// it is.
    pub async fn check(
        &self,
        sig: &Passed,
        recipients: &[String],
        now: Millis,
    ) -> Result<Use, StoreError> {
        let mut rcpts: Vec<String> = recipients.iter().map(|r| normalize(r)).collect();
        rcpts.sort();
        rcpts.dedup();
        let n = rcpts.len();
        let window_ms = u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX);
        let window_start = now.saturating_sub(window_ms);
        let key = key(sig);
        let seen = match &self.store {
            Store::Sqlite(s) => {
                s.remember(key, &sig.domain, rcpts, now, window_start, &self.node)
                    .await?
            }
            Store::Postgres(p) => {
                p.remember(key, &sig.domain, rcpts, now, window_start, &self.node)
                    .await?
            }
        };
        Ok(judge(seen, n, now, self.window))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = 3_600_000;

    fn sig(t: u64, signs_date: bool) -> Passed {
        Passed {
            domain: "contoso.test".into(),
            selector: "s1".into(),
            b: vec![1, 2, 3],
            t,
            signs_date,
        }
    }

    #[test]
    fn time_of_signing_is_t_or_the_signed_date() {
        assert_eq!(signed_at(&sig(1000, true), Some(5)), Some(1_000_000));
        assert_eq!(signed_at(&sig(0, true), Some(5)), Some(5));
        assert_eq!(signed_at(&sig(0, false), Some(5)), None, "Date not signed");
        assert_eq!(signed_at(&sig(0, true), None), None);
    }

    #[test]
    fn freshness_bounds() {
        let day = Duration::from_secs(86_400);
        let now = 100 * H;
        assert!(fresh(now - 23 * H, now, day));
        assert!(!fresh(now - 25 * H, now, day));
        assert!(fresh(now + 14 * 60_000, now, day), "a little skew");
        assert!(!fresh(now + 16 * 60_000, now, day), "from the future");
    }

    #[test]
    fn first_within_retry_replayed() {
        let w = Duration::from_secs(3600);
        let seen = |first_seen, inserted, known| Seen {
            first_seen,
            node: "a".into(),
            inserted,
            known,
        };
        assert_eq!(judge(seen(10 * H, true, 0), 2, 10 * H, w), Use::First);
        assert_eq!(judge(seen(10 * H, false, 0), 2, 10 * H + H, w), Use::Within);
        assert_eq!(judge(seen(10 * H, false, 2), 2, 12 * H, w), Use::Retry);
        assert_eq!(
            judge(seen(10 * H, false, 1), 2, 12 * H, w),
            Use::Replayed {
                first_seen: 10 * H,
                node: "a".into()
            }
        );
    }

    #[test]
    fn the_key_is_the_signature_not_the_message() {
        let a = sig(1, true);
        let mut b = sig(1, true);
        assert_eq!(key(&a), key(&b));
        b.b.push(4);
        assert_ne!(key(&a), key(&b));
        assert_eq!(normalize("Bob@Partner.TEST"), "Bob@partner.test");
    }
}
