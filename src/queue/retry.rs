//! When to try again, when to give up, when to warn: pure arithmetic on the schedule.

use std::time::Duration;

use crate::envelope::Millis;

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Waits after the 1st, 2nd, ... failed attempt; the last one repeats.
    pub retry: Vec<Duration>,
    pub max_age: Duration,
    pub delay_warning: Option<Duration>,
}

impl RetryPolicy {
    /// When to try again after `attempts` attempts (>= 1) that left recipients pending.
    pub fn next_attempt(&self, attempts: u32, now: Millis) -> Millis {
        let i = (attempts.max(1) as usize - 1).min(self.retry.len().saturating_sub(1));
        let wait = self
            .retry
            .get(i)
            .copied()
            .unwrap_or(Duration::from_secs(300));
        now + wait.as_millis() as Millis
    }

    pub fn expired(&self, received_at: Millis, now: Millis) -> bool {
        now.saturating_sub(received_at) >= self.max_age.as_millis() as Millis
    }

    pub fn delay_warning_due(&self, received_at: Millis, now: Millis) -> bool {
        self.delay_warning
            .is_some_and(|d| now.saturating_sub(received_at) >= d.as_millis() as Millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            retry: vec![Duration::from_secs(60), Duration::from_secs(300)],
            max_age: Duration::from_secs(3600),
            delay_warning: Some(Duration::from_secs(600)),
        }
    }

    #[test]
    fn schedule_repeats_last_interval() {
        let p = policy();
        assert_eq!(p.next_attempt(1, 1000), 61_000);
        assert_eq!(p.next_attempt(2, 1000), 301_000);
        assert_eq!(p.next_attempt(9, 1000), 301_000);
    }

    #[test]
    fn expiry_and_delay_warning() {
        let p = policy();
        assert!(!p.expired(0, 3_599_999));
        assert!(p.expired(0, 3_600_000));
        assert!(!p.delay_warning_due(0, 599_999));
        assert!(p.delay_warning_due(0, 600_000));
    }
}
