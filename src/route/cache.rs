//! SPF answers per sender domain, kept for their TTL and, past it, as the last known
//! answer to fall back on when DNS fails.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::regions::GatewayInclude;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cached {
    /// Within its TTL.
    Fresh(Option<GatewayInclude>),
    /// Expired: ask DNS again, use this only if DNS fails.
    Stale(Option<GatewayInclude>),
    Missing,
}

#[derive(Default)]
pub struct SpfCache {
    entries: Mutex<HashMap<String, (Option<GatewayInclude>, Instant)>>,
}

impl SpfCache {
    pub fn get(&self, domain: &str, now: Instant) -> Cached {
        let map = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(domain) {
            Some((answer, until)) if now < *until => Cached::Fresh(*answer),
            Some((answer, _)) => Cached::Stale(*answer),
            None => Cached::Missing,
        }
    }

    pub fn put(&self, domain: &str, answer: Option<GatewayInclude>, ttl: Duration, now: Instant) {
        let mut map = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(domain.to_string(), (answer, now + ttl));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_then_stale() {
        let c = SpfCache::default();
        let t0 = Instant::now();
        assert_eq!(c.get("a.test", t0), Cached::Missing);
        c.put(
            "a.test",
            Some(GatewayInclude::Region("de")),
            Duration::from_secs(60),
            t0,
        );
        assert_eq!(
            c.get("a.test", t0 + Duration::from_secs(59)),
            Cached::Fresh(Some(GatewayInclude::Region("de")))
        );
        assert_eq!(
            c.get("a.test", t0 + Duration::from_secs(60)),
            Cached::Stale(Some(GatewayInclude::Region("de")))
        );
    }
}
