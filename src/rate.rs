//! A rate as administrators write it, `N/period` ("60/1m", "10000/1d"), and the
//! generic cell rate algorithm (GCRA) that enforces it: a burst of at most N, refilled
//! at N per period. One value per limited key (the theoretical arrival time), no timers,
//! no per-event history: pure arithmetic on a time the caller passes in.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// `N/period`: at most N in any burst, N more each period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u64,
    pub period: Duration,
}

impl Rate {
    pub fn parse(text: &str) -> Result<Rate, String> {
        let (n, period) = text
            .trim()
            .split_once('/')
            .ok_or_else(|| format!("`{text}` is not a rate such as \"60/1m\" (N/period)"))?;
        let count: u64 = n
            .trim()
            .parse()
            .map_err(|_| format!("`{text}`: `{n}` is not a count"))?;
        if count == 0 {
            return Err(format!("`{text}`: the count must be at least 1"));
        }
        let period = crate::dur::Dur::parse(period)?.0;
        if period.is_zero() {
            return Err(format!("`{text}`: the period must be longer than zero"));
        }
        Ok(Rate { count, period })
    }

    /// Microseconds between two units at the sustained rate (at least 1).
    pub fn interval_us(&self) -> u64 {
        let period = u64::try_from(self.period.as_micros()).unwrap_or(u64::MAX);
        (period / self.count).max(1)
    }

    /// The whole burst, in microseconds of the cell's clock.
    pub fn burst_us(&self) -> u64 {
        self.interval_us().saturating_mul(self.count)
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.count, crate::dur::Dur(self.period))
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Rate::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// One key's state: its theoretical arrival time, in microseconds of the caller's
/// clock. Zero for a key never seen (a full burst available).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cell {
    pub tat: u64,
}

/// What a request for `cost` units got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// Over the rate; this much later the same request would be allowed.
    Denied {
        retry_after: Duration,
    },
}

impl Cell {
    /// Takes `cost` units at `now_us` when the rate allows it; a denied request takes
    /// nothing.
    pub fn take(&mut self, rate: &Rate, cost: u64, now_us: u64) -> Decision {
        let tat = self.tat.max(now_us);
        let new_tat = tat.saturating_add(rate.interval_us().saturating_mul(cost));
        let allowed_at = new_tat.saturating_sub(rate.burst_us());
        if allowed_at > now_us {
            return Decision::Denied {
                retry_after: Duration::from_micros(allowed_at - now_us),
            };
        }
        self.tat = new_tat;
        Decision::Allowed
    }

    /// Units that would be allowed at `now_us` (what is left of the burst).
    pub fn remaining(&self, rate: &Rate, now_us: u64) -> u64 {
        let used = self.tat.saturating_sub(now_us);
        rate.burst_us().saturating_sub(used) / rate.interval_us()
    }

    /// Units counted against the rate at `now_us`: `count - remaining`.
    pub fn used(&self, rate: &Rate, now_us: u64) -> u64 {
        rate.count.saturating_sub(self.remaining(rate, now_us))
    }

    /// Adds units counted elsewhere (another node's share of the same key), without a
    /// decision: the next `take` sees them.
    pub fn add(&mut self, rate: &Rate, units: u64, now_us: u64) {
        self.tat = self
            .tat
            .max(now_us)
            .saturating_add(rate.interval_us().saturating_mul(units));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000;

    #[test]
    fn parse_and_print() {
        let r = Rate::parse("60/1m").unwrap();
        assert_eq!((r.count, r.period), (60, Duration::from_secs(60)));
        assert_eq!(r.to_string(), "60/1m");
        for bad in ["60", "0/1m", "x/1m", "5/0s", "5/soon", "/1m"] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
    }

    /// A burst of N at once, then one more per N-th of the period.
    #[test]
    fn a_burst_then_the_sustained_rate() {
        let rate = Rate::parse("5/2s").unwrap();
        let mut c = Cell::default();
        let t0 = 100 * S;
        for _ in 0..5 {
            assert_eq!(c.take(&rate, 1, t0), Decision::Allowed);
        }
        assert_eq!(
            c.take(&rate, 1, t0),
            Decision::Denied {
                retry_after: Duration::from_millis(400)
            }
        );
        assert_eq!(c.remaining(&rate, t0), 0);
        assert_eq!(c.take(&rate, 1, t0 + 400_000), Decision::Allowed);
        assert_eq!(c.remaining(&rate, t0 + 2 * S + 400_000), 5, "all back");
    }

    #[test]
    fn a_request_larger_than_what_is_left_takes_nothing() {
        let rate = Rate::parse("10/1s").unwrap();
        let mut c = Cell::default();
        assert_eq!(c.take(&rate, 8, S), Decision::Allowed);
        assert!(matches!(c.take(&rate, 3, S), Decision::Denied { .. }));
        assert_eq!(c.remaining(&rate, S), 2);
        assert_eq!(c.take(&rate, 2, S), Decision::Allowed);
        assert_eq!(c.used(&rate, S), 10);
        // More than the whole burst is never allowed.
        assert!(matches!(
            Cell::default().take(&rate, 11, S),
            Decision::Denied { .. }
        ));
    }

    #[test]
    fn units_from_elsewhere_count() {
        let rate = Rate::parse("10/1s").unwrap();
        let mut c = Cell::default();
        c.add(&rate, 9, S);
        assert_eq!(c.take(&rate, 1, S), Decision::Allowed);
        assert!(matches!(c.take(&rate, 1, S), Decision::Denied { .. }));
    }
}
