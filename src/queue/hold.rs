//! Held mail: an operator's hold of one message, and the mail a limit holds under a
//! restricted key value, released (delivered) or discarded (removed, no DSN) together.

use super::spool::Spool;
use super::{Queue, QueueError, QueueItem};
use crate::envelope::{HoldReason, LimitKey, QueueId, Settle};
use crate::events::Event;

fn held_under(reason: Option<&HoldReason>, key: LimitKey, value: &str) -> bool {
    matches!(reason, Some(HoldReason::Limit { key: k, value: v, .. }) if *k == key && v == value)
}

impl<S: Spool> Queue<S> {
    pub async fn hold(&self, id: &QueueId) -> Result<QueueItem, QueueError> {
        self.set_held(id, true).await
    }

    pub async fn release(&self, id: &QueueId) -> Result<QueueItem, QueueError> {
        self.set_held(id, false).await
    }

    async fn set_held(&self, id: &QueueId, held: bool) -> Result<QueueItem, QueueError> {
        let now = self.now();
        let (state, changed) = {
            let mut idx = self.lock();
            let e = idx
                .entries
                .get_mut(id)
                .ok_or_else(|| QueueError::NotFound(id.to_string()))?;
            let was_held = e.state.held;
            e.state.held = held;
            if held {
                if e.state.hold_reason.is_none() {
                    e.state.hold_reason = Some(HoldReason::Manual);
                }
            } else {
                e.state.hold_reason = None;
                e.state.next_attempt = now;
                if was_held {
                    e.state.since = Some(now);
                }
            }
            let st = e.state.clone();
            if !held {
                idx.schedule(id, st.next_attempt);
            }
            (st, was_held != held)
        };
        self.spool.save_state(id, &state).await?;
        if changed {
            self.events.publish_now(match &state.hold_reason {
                Some(reason) if held => Event::Held {
                    id: id.clone(),
                    reason: reason.clone(),
                    at: now,
                },
                _ => Event::Released {
                    id: id.clone(),
                    at: now,
                },
            });
        }
        self.wake.notify_one();
        self.show(id)
            .ok_or_else(|| QueueError::NotFound(id.to_string()))
    }

    /// The limit holds of the messages held here, with when each arrived: after a
    /// restart, the restrictions they were held under stand whatever the store kept.
    pub fn hold_reasons(&self) -> Vec<(HoldReason, crate::envelope::Millis)> {
        self.lock()
            .entries
            .values()
            .filter(|e| e.state.held)
            .filter_map(|e| match &e.state.hold_reason {
                Some(r @ HoldReason::Limit { .. }) => Some((r.clone(), e.envelope.received_at)),
                _ => None,
            })
            .collect()
    }

    /// Messages held under `key` = `value` here.
    pub fn held_count(&self, key: LimitKey, value: &str) -> usize {
        self.lock()
            .entries
            .values()
            .filter(|e| e.state.held && held_under(e.state.hold_reason.as_ref(), key, value))
            .count()
    }

    /// Releases or discards every message held under `key` = `value`; returns how many.
    pub async fn settle_held(&self, key: LimitKey, value: &str, how: Settle) -> usize {
        let ids: Vec<QueueId> = self
            .lock()
            .entries
            .iter()
            .filter(|(_, e)| e.state.held && held_under(e.state.hold_reason.as_ref(), key, value))
            .map(|(id, _)| id.clone())
            .collect();
        let mut done = 0;
        for id in ids {
            let result = match how {
                Settle::Release => self.set_held(&id, false).await.map(|_| ()),
                Settle::Discard => self.discard(&id),
            };
            match result {
                Ok(()) => done += 1,
                // Gone meanwhile (an operator removed it): nothing left to do.
                Err(QueueError::NotFound(_)) => {}
                Err(e) => {
                    tracing::error!(queue_id = %id, error = %e, "cannot settle a held message")
                }
            }
        }
        if done > 0 {
            tracing::info!(
                key = key.label(),
                value,
                messages = done,
                "held mail {}",
                how.label()
            );
        }
        done
    }

    fn discard(&self, id: &QueueId) -> Result<(), QueueError> {
        if self.lock().remove(id).is_none() {
            return Err(QueueError::NotFound(id.to_string()));
        }
        self.spool.remove(id)?;
        self.events.publish_now(Event::Removed {
            id: id.clone(),
            at: self.now(),
        });
        Ok(())
    }
}
