//! Which client addresses belong to a shared platform: the configured ranges plus those
//! last resolved from the platform's SPF record (`ranges_from_spf`). The resolved lists
//! are refreshed within the record's TTL, kept when DNS fails, and handed to the caller
//! to persist, so a restart without DNS still knows them.

use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};

use crate::config::{SharedPlatform, SharedRange};
use crate::envelope::{now_ms, Millis};
use crate::spf::dns::SpfDns;
use crate::spf::walk::SpfStatus;
use crate::spf::{authorized_networks, SpfService};

/// RFC 7208 records change rarely; these bounds keep a 0 TTL from meaning a lookup a
/// second and a week-long TTL from hiding a change for a week.
const MIN_REFRESH: Duration = Duration::from_secs(300);
const MAX_REFRESH: Duration = Duration::from_secs(86_400);
/// After a failed lookup, with a list still in hand.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(60);

/// Where a client address stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    /// Inside this shared range (index into `access.shared_ranges`).
    Shared(usize),
    /// Outside every known range, but a `ranges_from_spf` list has never been resolved:
    /// the address may be one of its, so the answer is "later", not "never".
    Unresolved,
    Outside,
}

/// A list resolved from SPF, as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolved {
    /// The `shared_ranges` entry's name.
    pub name: String,
    pub domain: String,
    pub nets: Vec<IpNet>,
    pub resolved_at: Millis,
    pub ttl_secs: u64,
}

/// One range as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SourceView {
    pub name: String,
    pub platform: SharedPlatform,
    pub ranges: Vec<IpNet>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ranges_from_spf: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolved: Option<Resolved>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

struct Tracked {
    name: String,
    platform: SharedPlatform,
    fixed: Vec<IpNet>,
    spf: Option<String>,
    state: RwLock<EntryState>,
}

#[derive(Default)]
struct EntryState {
    resolved: Option<Resolved>,
    last_error: Option<String>,
}

pub struct SharedSources {
    entries: Vec<Tracked>,
    refresh: Notify,
    /// Refresh passes (started, finished), for a caller waiting on the one it asked for.
    passes: watch::Sender<(u64, u64)>,
}

impl SharedSources {
    pub fn new(ranges: &[SharedRange]) -> SharedSources {
        SharedSources {
            entries: ranges
                .iter()
                .map(|r| Tracked {
                    name: r.name.clone(),
                    platform: r.platform,
                    fixed: r.ranges.clone(),
                    spf: r.ranges_from_spf.clone(),
                    state: RwLock::new(EntryState::default()),
                })
                .collect(),
            refresh: Notify::new(),
            passes: watch::Sender::new((0, 0)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// `ip` must be canonical (an IPv4-mapped IPv6 address as IPv4).
    pub fn classify(&self, ip: IpAddr) -> Membership {
        let mut unresolved = false;
        for (i, e) in self.entries.iter().enumerate() {
            if e.fixed.iter().any(|n| n.contains(&ip)) {
                return Membership::Shared(i);
            }
            let state = e.state.read().unwrap_or_else(|p| p.into_inner());
            match &state.resolved {
                Some(r) if r.nets.iter().any(|n| n.contains(&ip)) => return Membership::Shared(i),
                Some(_) => {}
                None => unresolved |= e.spf.is_some(),
            }
        }
        if unresolved {
            Membership::Unresolved
        } else {
            Membership::Outside
        }
    }

    /// Takes back lists persisted by an earlier run; a list for another SPF name than
    /// the one configured now is ignored.
    pub fn restore(&self, saved: Vec<Resolved>) {
        for r in saved {
            if let Some(e) = self
                .entries
                .iter()
                .find(|e| e.name == r.name && e.spf.as_deref() == Some(r.domain.as_str()))
            {
                let mut state = e.state.write().unwrap_or_else(|p| p.into_inner());
                if state.resolved.is_none() {
                    state.resolved = Some(r);
                }
            }
        }
    }

    pub fn resolved(&self) -> Vec<Resolved> {
        self.entries
            .iter()
            .filter_map(|e| {
                e.state
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .resolved
                    .clone()
            })
            .collect()
    }

    pub fn view(&self) -> Vec<SourceView> {
        self.entries
            .iter()
            .map(|e| {
                let state = e.state.read().unwrap_or_else(|p| p.into_inner());
                SourceView {
                    name: e.name.clone(),
                    platform: e.platform,
                    ranges: e.fixed.clone(),
                    ranges_from_spf: e.spf.clone(),
                    resolved: state.resolved.clone(),
                    last_error: state.last_error.clone(),
                }
            })
            .collect()
    }

    /// Wakes the refresher to resolve every list now, and waits (at most `within`)
    /// for that pass to end: its outcome is then in [`Self::view`], and a changed list
    /// has been handed to the refresher's `persist`. False when it did not end in time.
    pub async fn refresh_now(&self, within: Duration) -> bool {
        if !self.entries.iter().any(|e| e.spf.is_some()) {
            return true;
        }
        let mut passes = self.passes.subscribe();
        // A pass already under way began before this request: wait for the next.
        let target = passes.borrow().0 + 1;
        self.refresh.notify_one();
        tokio::time::timeout(within, passes.wait_for(|(_, done)| *done >= target))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Resolves every `ranges_from_spf` list once; returns how long until the next pass
    /// and whether any list changed.
    async fn refresh_once<D: SpfDns>(&self, spf: &SpfService<D>) -> (Duration, bool) {
        let mut next = MAX_REFRESH;
        let mut changed = false;
        for e in &self.entries {
            let Some(domain) = &e.spf else { continue };
            let walk = spf.walk(domain).await;
            let nets = authorized_networks(&walk);
            let mut state = e.state.write().unwrap_or_else(|p| p.into_inner());
            if walk.status == SpfStatus::Ok && !nets.is_empty() {
                let ttl = Duration::from_secs(u64::from(walk.ttl)).clamp(MIN_REFRESH, MAX_REFRESH);
                next = next.min(ttl);
                if state.resolved.as_ref().map(|r| &r.nets) != Some(&nets) {
                    changed = true;
                    tracing::info!(range = %e.name, spf = %domain, networks = nets.len(), "shared range resolved from SPF");
                }
                state.resolved = Some(Resolved {
                    name: e.name.clone(),
                    domain: domain.clone(),
                    nets,
                    resolved_at: now_ms(),
                    ttl_secs: ttl.as_secs(),
                });
                state.last_error = None;
                metrics::gauge!(crate::telemetry::SHARED_RANGE_NETWORKS, "range" => e.name.clone())
                    .set(state.resolved.as_ref().map_or(0, |r| r.nets.len()) as f64);
            } else {
                let why = walk
                    .findings
                    .iter()
                    .find(|f| f.severity == crate::spf::Severity::Error)
                    .map(|f| f.message.clone())
                    .unwrap_or_else(|| format!("{domain}: no ip4/ip6 ranges published"));
                tracing::warn!(range = %e.name, spf = %domain, error = %why, kept = state.resolved.is_some(), "shared range not refreshed; the last good list stays in force");
                metrics::counter!(crate::telemetry::SHARED_RANGE_REFRESH_FAILURES_TOTAL, "range" => e.name.clone())
                    .increment(1);
                state.last_error = Some(why);
                next = next.min(RETRY_AFTER_FAILURE);
            }
        }
        (next, changed)
    }

    /// Refreshes until `stop`, calling `persist` whenever a list changed.
    pub async fn run<D: SpfDns>(
        &self,
        spf: &SpfService<D>,
        persist: &(impl Fn(Vec<Resolved>) + Send + Sync),
        mut stop: watch::Receiver<bool>,
    ) {
        if !self.entries.iter().any(|e| e.spf.is_some()) {
            return;
        }
        loop {
            self.passes.send_modify(|p| p.0 += 1);
            let (wait, changed) = tokio::select! {
                r = self.refresh_once(spf) => r,
                _ = stop.changed() => return,
            };
            if changed {
                persist(self.resolved());
            }
            self.passes.send_modify(|p| p.1 += 1);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.refresh.notified() => {}
                _ = stop.changed() => return,
            }
        }
    }
}

/// Refreshes the sources in force until `stop`; when a reload puts others in their
/// place, those from then on.
pub async fn follow<D: SpfDns>(
    mut current: watch::Receiver<Arc<SharedSources>>,
    spf: Arc<SpfService<D>>,
    persist: impl Fn(Vec<Resolved>) + Send + Sync + 'static,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let sources = current.borrow_and_update().clone();
        tokio::select! {
            _ = sources.run(&spf, &persist, stop.clone()) => {
                if *stop.borrow() {
                    return;
                }
                // Nothing to resolve in this set: wait for the next one.
                tokio::select! {
                    r = current.changed() => if r.is_err() { return },
                    _ = stop.changed() => return,
                }
            }
            r = current.changed() => if r.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(name: &str, fixed: &[&str], spf: Option<&str>) -> SharedRange {
        SharedRange {
            name: name.into(),
            platform: SharedPlatform::O365,
            ranges: fixed.iter().map(|r| r.parse().unwrap()).collect(),
            ranges_from_spf: spf.map(str::to_string),
            tenant_id: None,
            dkim_domains: Vec::new(),
            header: None,
        }
    }

    #[test]
    fn classification_and_the_unresolved_state() {
        let s = SharedSources::new(&[
            range("o365", &["2001:db8::/32"], None),
            range("o365-2", &[], Some("spf.example.test")),
        ]);
        let ip = |t: &str| t.parse::<IpAddr>().unwrap();
        assert_eq!(s.classify(ip("2001:db8::5")), Membership::Shared(0));
        assert_eq!(s.classify(ip("192.0.2.1")), Membership::Unresolved);
        s.restore(vec![Resolved {
            name: "o365-2".into(),
            domain: "spf.example.test".into(),
            nets: vec!["192.0.2.0/24".parse().unwrap()],
            resolved_at: 1,
            ttl_secs: 300,
        }]);
        assert_eq!(s.classify(ip("192.0.2.1")), Membership::Shared(1));
        assert_eq!(s.classify(ip("198.51.100.1")), Membership::Outside);
        // A list saved for another SPF name is not this range's.
        let t = SharedSources::new(&[range("o365", &[], Some("spf.other.test"))]);
        t.restore(s.resolved());
        assert_eq!(t.classify(ip("192.0.2.1")), Membership::Unresolved);
    }
}
