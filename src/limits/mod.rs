//! Outbound abuse control (`[[limits]]`): how much one sender, sender domain or client
//! may send. A `defer` rule answers `451 4.7.1` at the MAIL or RCPT that would go over;
//! a `hold` rule accepts the message and holds it, and restricts its key value: all its
//! later mail is held too, until an administrator releases or discards it.
//!
//! Counting is local and never waits on the store: each node counts in its own cells
//! and, every `store.sync_interval`, adds what it counted to the store's cells and takes
//! every node's counts back (`sync`). Restrictions travel the same way, and so do the
//! releases and discards, which each node applies to the mail it holds.

pub mod counts;
pub mod gate;
pub mod model;
pub mod pg;
pub mod rules;
pub mod sqlite;
pub mod store;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::config::{LimitAction, LimitConfig};
use crate::envelope::{now_ms, HoldReason, LimitKey, Millis, Settle};
use crate::events::{DeliveryReport, Event, EventBus, Outcome};
use crate::pipeline::{Deferral, Unit};
use crate::store::StoreError;
use counts::{Counts, Slot};
pub use model::Restriction;
use model::{Added, RowState};
use rules::{Measure, Rule, Who};
pub use store::Store;

/// How far back a sync reads what other nodes changed, beyond its last read: commits
/// that landed late and clocks a little apart are not missed (reading twice is
/// harmless: cells merge by maximum, lifts apply once per restriction).
const READ_MARGIN: Millis = 5_000;
/// Lifted restrictions and idle cells are kept this long in the store.
const KEEP_LIFTED: Millis = 86_400_000;

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A rule as `GET /api/v1/limits` shows it, with its busiest key values.
#[derive(Debug, Clone, Serialize)]
pub struct RuleView {
    pub name: String,
    pub key: LimitKey,
    pub action: LimitAction,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipients: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bounces: Option<String>,
    pub top: Vec<KeyCount>,
}

#[derive(Debug, Clone, Serialize)]
pub struct KeyCount {
    pub value: String,
    /// Counted now against each of the rule's rates (what is not left of its burst).
    pub counts: HashMap<Measure, u64>,
}

/// A restriction lifted elsewhere (another node, or the store before a restart) that
/// this node must apply to the mail it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lifted {
    pub key: LimitKey,
    pub value: String,
    pub how: Settle,
}

#[derive(Default)]
struct State {
    counts: Counts,
    restricted: HashMap<(LimitKey, String), Restriction>,
    /// Restrictions made here and not yet in the store.
    unsaved: Vec<Restriction>,
    /// Where the next sync starts reading what other nodes changed.
    read_from: Millis,
}

pub struct Limits {
    rules: Vec<Rule>,
    state: Mutex<State>,
    store: Store,
    events: EventBus,
    /// Held by whoever lifts a restriction and settles its held mail (an operator's
    /// release, or a sync that found a lift): one at a time, so a sync never releases
    /// part of the mail an operator is releasing and the operator hears the whole count.
    settling: tokio::sync::Mutex<()>,
}

impl Limits {
    pub fn new(rules: &[LimitConfig], store: Store, events: EventBus) -> Limits {
        Limits {
            rules: rules.iter().map(Rule::new).collect(),
            state: Mutex::new(State::default()),
            store,
            events,
            settling: tokio::sync::Mutex::new(()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn rule(&self, name: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.name == name)
    }

    /// At MAIL (a message) or RCPT (a recipient): counts it under every `defer` rule,
    /// or, when one of them would go over, counts nothing and names that rule.
    pub fn admit(&self, unit: Unit, who: &Who<'_>) -> Result<(), Deferral> {
        let measure = match unit {
            Unit::Message => Measure::Messages,
            Unit::Recipient => Measure::Recipients,
        };
        let mut asks = Vec::new();
        let mut names = Vec::new();
        for rule in self.rules.iter().filter(|r| r.action == LimitAction::Defer) {
            let (Some(rate), Some(value)) = (rule.rate(measure), rule.value(who)) else {
                continue;
            };
            let slot = Slot {
                rule: rule.name.clone(),
                measure,
                value,
            };
            asks.push((slot, *rate, 1));
            names.push(&rule.name);
        }
        if asks.is_empty() {
            return Ok(());
        }
        let taken = self.lock().counts.take_all(&asks, now_us());
        taken.map_err(|i| {
            let limit = names.get(i).map_or_else(String::new, |n| n.to_string());
            metrics::counter!(crate::telemetry::LIMIT_EXCEEDED_TOTAL, "limit" => limit.clone(), "action" => "defer")
                .increment(1);
            Deferral { limit }
        })
    }

    /// At submission: whether the message is held. A restricted key value's mail
    /// always is; otherwise it is counted under every `hold` rule, and the first rule
    /// it goes over restricts its key value from now on.
    pub fn hold(&self, who: &Who<'_>, recipients: usize) -> Option<HoldReason> {
        if self.rules.is_empty() {
            return None;
        }
        let hold_rules = || {
            self.rules
                .iter()
                .filter(|r| r.action == LimitAction::Hold)
                .filter_map(|r| Some((r, r.value(who)?)))
        };
        let mut st = self.lock();
        for (rule, value) in hold_rules() {
            if let Some(r) = st.restricted.get(&(rule.key, value.clone())) {
                return Some(HoldReason::Limit {
                    limit: r.limit.clone(),
                    key: rule.key,
                    value,
                });
            }
        }
        let now = now_us();
        let mut fired = None;
        for (rule, value) in hold_rules() {
            for (measure, cost) in [
                (Measure::Messages, 1),
                (Measure::Recipients, recipients as u64),
            ] {
                let Some(rate) = rule.rate(measure) else {
                    continue;
                };
                let slot = Slot {
                    rule: rule.name.clone(),
                    measure,
                    value: value.clone(),
                };
                let within = st.counts.force(&slot, rate, cost, now);
                if !within && fired.is_none() {
                    let count = st.counts.used(&slot, rate, now);
                    fired = Some((rule, value.clone(), measure, count));
                }
            }
        }
        let (rule, value, measure, count) = fired?;
        self.restrict(&mut st, rule, value.clone(), measure, count);
        Some(HoldReason::Limit {
            limit: rule.name.clone(),
            key: rule.key,
            value,
        })
    }

    /// Counts what the smart host refused with 5xx in a delivery, under every rule with
    /// a `bounces` rate.
    pub fn delivered(&self, report: &DeliveryReport) {
        let bounced = report
            .results
            .iter()
            .filter(|r| r.outcome == Outcome::Bounced && r.reply.code >= 500)
            .count() as u64;
        if bounced == 0 {
            return;
        }
        let who = Who {
            sender: &report.sender,
            client: report.client,
            ours: report.generated_dsn || report.system,
        };
        let now = now_us();
        let mut st = self.lock();
        for rule in &self.rules {
            let (Some(rate), Some(value)) = (rule.rate(Measure::Bounces), rule.value(&who)) else {
                continue;
            };
            if st.restricted.contains_key(&(rule.key, value.clone())) {
                continue;
            }
            let slot = Slot {
                rule: rule.name.clone(),
                measure: Measure::Bounces,
                value: value.clone(),
            };
            if !st.counts.force(&slot, rate, bounced, now) {
                let count = st.counts.used(&slot, rate, now);
                self.restrict(&mut st, rule, value, Measure::Bounces, count);
            }
        }
    }

    fn restrict(&self, st: &mut State, rule: &Rule, value: String, measure: Measure, count: u64) {
        let now = now_ms();
        let r = Restriction {
            key: rule.key,
            value: value.clone(),
            limit: rule.name.clone(),
            since: now,
            count,
        };
        st.restricted.insert((rule.key, value.clone()), r.clone());
        st.unsaved.push(r);
        metrics::counter!(crate::telemetry::LIMIT_EXCEEDED_TOTAL, "limit" => rule.name.clone(), "action" => "hold")
            .increment(1);
        metrics::gauge!(crate::telemetry::RESTRICTED_KEYS).set(st.restricted.len() as f64);
        tracing::warn!(
            key = rule.key.label(),
            value = %value,
            limit = %rule.name,
            measure = measure.label(),
            count,
            "key value restricted: its mail is held until an administrator releases or discards it"
        );
        let window = u64::try_from(rule.window().as_millis()).unwrap_or(u64::MAX);
        self.events.publish_now(Event::Restricted {
            key: rule.key,
            value,
            limit: rule.name.clone(),
            window_start: now.saturating_sub(window),
            at: now,
        });
    }

    /// Restrictions in force, oldest first.
    pub fn restricted(&self) -> Vec<Restriction> {
        let mut out: Vec<Restriction> = self.lock().restricted.values().cloned().collect();
        out.sort_by(|a, b| a.since.cmp(&b.since).then_with(|| a.value.cmp(&b.value)));
        out
    }

    /// An administrator's release or discard: the restriction ends everywhere (through
    /// the store), the key value's counters start again, and the trusted list is told.
    /// The caller settles this node's held mail; other nodes do theirs at their next
    /// sync. `None` when the key value was not restricted.
    /// Taken around a lift (or a sync) and the settling of its held mail.
    pub async fn settling(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.settling.lock().await
    }

    pub async fn lift(
        &self,
        key: LimitKey,
        value: &str,
        how: Settle,
    ) -> Result<Option<Restriction>, LimitsError> {
        let value = value.trim().to_ascii_lowercase();
        let now = now_ms();
        // Saved first, so that a restriction made a moment ago is there to lift.
        self.save_unsaved(now).await;
        let stored = self.store.lift(key, value.clone(), how, now).await?;
        let local = {
            let mut st = self.lock();
            let local = st.restricted.remove(&(key, value.clone()));
            metrics::gauge!(crate::telemetry::RESTRICTED_KEYS).set(st.restricted.len() as f64);
            let rules = self.rules_keyed(key);
            st.counts.reset(&rules, &value);
            local
        };
        let rules = self
            .rules_keyed(key)
            .iter()
            .map(|r| r.to_string())
            .collect();
        self.store.reset(rules, value.clone()).await?;
        let lifted = stored.or(local);
        if lifted.is_some() {
            tracing::info!(key = key.label(), value = %value, "restriction {}", how.label());
            self.events.publish_now(Event::Lifted {
                key,
                value,
                how,
                at: now,
            });
        }
        Ok(lifted)
    }

    fn rules_keyed(&self, key: LimitKey) -> Vec<&str> {
        self.rules
            .iter()
            .filter(|r| r.key == key)
            .map(|r| r.name.as_str())
            .collect()
    }

    /// A message found held under a restriction at start (its envelope says so): the
    /// restriction stands, whatever the store lost.
    pub fn restore(&self, reason: &HoldReason, since: Millis) {
        let HoldReason::Limit { limit, key, value } = reason else {
            return;
        };
        let mut st = self.lock();
        if st.restricted.contains_key(&(*key, value.clone())) {
            return;
        }
        let r = Restriction {
            key: *key,
            value: value.clone(),
            limit: limit.clone(),
            since,
            count: 0,
        };
        st.restricted.insert((*key, value.clone()), r.clone());
        st.unsaved.push(r);
        metrics::gauge!(crate::telemetry::RESTRICTED_KEYS).set(st.restricted.len() as f64);
    }

    /// The rules and their busiest key values now.
    pub fn overview(&self) -> Vec<RuleView> {
        let now = now_us();
        let st = self.lock();
        self.rules
            .iter()
            .map(|rule| RuleView {
                name: rule.name.clone(),
                key: rule.key,
                action: rule.action,
                messages: rule.messages.map(|r| r.to_string()),
                recipients: rule.recipients.map(|r| r.to_string()),
                bounces: rule.bounces.map(|r| r.to_string()),
                top: st
                    .counts
                    .top(&rule.name, |m| rule.rate(m).copied(), now, 20)
                    .into_iter()
                    .map(|(value, counts)| KeyCount {
                        value,
                        counts: counts.into_iter().collect(),
                    })
                    .collect(),
            })
            .collect()
    }

    async fn save_unsaved(&self, now: Millis) {
        let unsaved = std::mem::take(&mut self.lock().unsaved);
        let mut failed = Vec::new();
        for r in unsaved {
            if let Err(e) = self.store.restrict(r.clone(), now).await {
                tracing::warn!(error = %e, "cannot save a restriction yet; will retry");
                failed.push(r);
            }
        }
        self.lock().unsaved.extend(failed);
    }

    /// One exchange with the store: this node's counts and restrictions go in; every
    /// node's cells, restrictions and lifts come back. Returns the lifts this node has
    /// still to apply to its held mail.
    pub async fn sync(&self) -> Vec<Lifted> {
        let now = now_ms();
        let now_u = now_us();
        let (drained, read_from) = {
            let mut st = self.lock();
            let drained = st.counts.drain();
            let read_from = st.read_from;
            (drained, read_from)
        };
        let added: Vec<Added> = drained
            .iter()
            .filter_map(|(slot, units)| {
                let rate = self.rule(&slot.rule)?.rate(slot.measure)?;
                Some(Added {
                    slot: slot.clone(),
                    units: *units,
                    interval_us: rate.interval_us(),
                })
            })
            .collect();
        if !added.is_empty() {
            match self.store.add(added, now_u, now).await {
                Ok(cells) => self.merge(cells),
                Err(e) => {
                    tracing::warn!(error = %e, "limits not synced (counting on locally)");
                    let mut st = self.lock();
                    for (slot, units) in drained {
                        st.counts.undrain(&slot, units);
                    }
                    return Vec::new();
                }
            }
        }
        self.save_unsaved(now).await;
        let since = read_from.saturating_sub(READ_MARGIN);
        match self.store.changed_cells(since).await {
            Ok(cells) => self.merge(cells),
            Err(e) => {
                tracing::warn!(error = %e, "limits not synced (counting on locally)");
                return Vec::new();
            }
        }
        let rows = match self.store.changed_rows(since).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "restrictions not synced");
                return Vec::new();
            }
        };
        let mut lifted = Vec::new();
        let mut st = self.lock();
        st.read_from = now;
        for row in rows {
            let id = (row.restriction.key, row.restriction.value.clone());
            match row.state {
                RowState::Restricted => {
                    st.restricted.entry(id).or_insert(row.restriction);
                }
                RowState::Lifted(how) => {
                    // A restriction made here after that lift stands.
                    let stale = st
                        .restricted
                        .get(&id)
                        .is_some_and(|r| r.since <= row.updated);
                    if stale {
                        st.restricted.remove(&id);
                        let rules = self.rules_keyed(id.0);
                        st.counts.reset(&rules, &id.1);
                    }
                    // Its held mail is this lift's only while no restriction made here
                    // since holds it.
                    let newer = st
                        .restricted
                        .get(&id)
                        .is_some_and(|r| r.since > row.updated);
                    if !newer {
                        lifted.push(Lifted {
                            key: id.0,
                            value: id.1,
                            how,
                        });
                    }
                }
            }
        }
        st.counts.prune(now_u);
        metrics::gauge!(crate::telemetry::RESTRICTED_KEYS).set(st.restricted.len() as f64);
        lifted
    }

    fn merge(&self, cells: Vec<(Slot, u64)>) {
        let mut st = self.lock();
        for (slot, tat) in cells {
            if let Some(rate) = self.rule(&slot.rule).and_then(|r| r.rate(slot.measure)) {
                st.counts.merge(&slot, rate, tat);
            }
        }
    }

    /// Forgets lifted restrictions and idle cells a day old.
    pub async fn prune(&self) -> Result<u64, StoreError> {
        self.store.prune(now_ms().saturating_sub(KEEP_LIFTED)).await
    }
}

#[cfg(test)]
mod tests;
