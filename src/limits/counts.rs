//! The counters of every rule, as pure arithmetic on a clock the caller passes: one
//! GCRA cell per rule, measure and key value (`rate::Cell`). What this node counted
//! since the last sync is kept apart, so it can be added to the store's cell, and the
//! store's cell (every node's counts) can be taken back without losing what came since.

use std::collections::HashMap;

use super::rules::Measure;
use crate::rate::{Cell, Decision, Rate};

/// One counted thing: a rule's measure for one key value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slot {
    pub rule: String,
    pub measure: Measure,
    pub value: String,
}

#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    cell: Cell,
    /// Units counted here since the last drain.
    unsynced: u64,
}

/// Cells kept at most; past it the idle ones (a full burst available, nothing to sync)
/// go first, then the least used.
const MAX_SLOTS: usize = 200_000;

#[derive(Debug, Default)]
pub struct Counts {
    entries: HashMap<Slot, Entry>,
}

impl Counts {
    /// Takes `cost` from every slot at its rate, or from none: returns the index of the
    /// first that would go over.
    pub fn take_all(&mut self, asks: &[(Slot, Rate, u64)], now_us: u64) -> Result<(), usize> {
        let mut taken = Vec::with_capacity(asks.len());
        for (i, (slot, rate, cost)) in asks.iter().enumerate() {
            let mut cell = self.entries.get(slot).map(|e| e.cell).unwrap_or_default();
            if cell.take(rate, *cost, now_us) != Decision::Allowed {
                return Err(i);
            }
            taken.push(cell);
        }
        for ((slot, _, cost), cell) in asks.iter().zip(taken) {
            let e = self.entries.entry(slot.clone()).or_default();
            e.cell = cell;
            e.unsynced += cost;
        }
        self.bound(now_us);
        Ok(())
    }

    /// Counts `cost` whether or not the rate allows it (a held message is accepted all
    /// the same); returns whether it was within the rate.
    pub fn force(&mut self, slot: &Slot, rate: &Rate, cost: u64, now_us: u64) -> bool {
        let e = self.entries.entry(slot.clone()).or_default();
        // A trial on a copy: the decision, not its effect.
        let mut trial = e.cell;
        let within = trial.take(rate, cost, now_us) == Decision::Allowed;
        e.cell.add(rate, cost, now_us);
        e.unsynced += cost;
        self.bound(now_us);
        within
    }

    /// Units counted against `rate` now (what is not left of the burst).
    pub fn used(&self, slot: &Slot, rate: &Rate, now_us: u64) -> u64 {
        self.entries
            .get(slot)
            .map_or(0, |e| e.cell.used(rate, now_us))
    }

    /// What was counted here since the last drain, to be added to the store's cells.
    pub fn drain(&mut self) -> Vec<(Slot, u64)> {
        self.entries
            .iter_mut()
            .filter(|(_, e)| e.unsynced > 0)
            .map(|(s, e)| (s.clone(), std::mem::take(&mut e.unsynced)))
            .collect()
    }

    /// Gives back units a drain took when they could not be synced.
    pub fn undrain(&mut self, slot: &Slot, units: u64) {
        if let Some(e) = self.entries.get_mut(slot) {
            e.unsynced += units;
        }
    }

    /// The store's cell for a slot (every node's counts, ours up to the last drain):
    /// what was counted here since the drain goes on top of it.
    pub fn merge(&mut self, slot: &Slot, rate: &Rate, tat: u64) {
        let e = self.entries.entry(slot.clone()).or_default();
        let since = rate.interval_us().saturating_mul(e.unsynced);
        e.cell.tat = e.cell.tat.max(tat.saturating_add(since));
    }

    /// Forgets the counts of `value` under the named rules (a release).
    pub fn reset(&mut self, rules: &[&str], value: &str) {
        self.entries
            .retain(|s, _| !(s.value == value && rules.contains(&s.rule.as_str())));
    }

    /// Key values of a rule with their cells' use now, most used first.
    pub fn top(
        &self,
        rule: &str,
        rate_of: impl Fn(Measure) -> Option<Rate>,
        now_us: u64,
        n: usize,
    ) -> Vec<(String, Vec<(Measure, u64)>)> {
        let mut by_value: HashMap<&str, Vec<(Measure, u64)>> = HashMap::new();
        for (slot, e) in &self.entries {
            if slot.rule != rule {
                continue;
            }
            let Some(rate) = rate_of(slot.measure) else {
                continue;
            };
            let used = e.cell.used(&rate, now_us);
            if used > 0 {
                by_value
                    .entry(&slot.value)
                    .or_default()
                    .push((slot.measure, used));
            }
        }
        let mut out: Vec<(String, Vec<(Measure, u64)>)> = by_value
            .into_iter()
            .map(|(v, mut m)| {
                m.sort();
                (v.to_string(), m)
            })
            .collect();
        out.sort_by(|a, b| {
            let total = |m: &[(Measure, u64)]| m.iter().map(|(_, n)| *n).sum::<u64>();
            total(&b.1).cmp(&total(&a.1)).then_with(|| a.0.cmp(&b.0))
        });
        out.truncate(n);
        out
    }

    /// Drops cells whose burst is whole again and that have nothing to sync.
    pub fn prune(&mut self, now_us: u64) {
        self.entries
            .retain(|_, e| e.unsynced > 0 || e.cell.tat > now_us);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn bound(&mut self, now_us: u64) {
        if self.entries.len() <= MAX_SLOTS {
            return;
        }
        self.prune(now_us);
        if self.entries.len() <= MAX_SLOTS {
            return;
        }
        // Still full of live cells: the ones closest to a whole burst go.
        let mut tats: Vec<u64> = self.entries.values().map(|e| e.cell.tat).collect();
        tats.sort_unstable();
        let cut = tats[self.entries.len() - MAX_SLOTS * 9 / 10];
        self.entries
            .retain(|_, e| e.cell.tat >= cut || e.unsynced > 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000;

    fn slot(rule: &str, value: &str) -> Slot {
        Slot {
            rule: rule.into(),
            measure: Measure::Messages,
            value: value.into(),
        }
    }

    #[test]
    fn all_or_nothing_across_rules() {
        let (a, b) = (Rate::parse("5/10s").unwrap(), Rate::parse("2/10s").unwrap());
        let mut c = Counts::default();
        let t = 100 * S;
        let asks = [(slot("wide", "x"), a, 1), (slot("narrow", "x"), b, 1)];
        assert_eq!(c.take_all(&asks, t), Ok(()));
        assert_eq!(c.take_all(&asks, t), Ok(()));
        assert_eq!(c.take_all(&asks, t), Err(1));
        assert_eq!(
            c.used(&slot("wide", "x"), &a, t),
            2,
            "a refused take counts nothing"
        );
        assert_eq!(c.used(&slot("narrow", "x"), &b, t + 10 * S), 0, "recovered");
    }

    #[test]
    fn forced_counts_go_past_the_rate() {
        let r = Rate::parse("2/10s").unwrap();
        let mut c = Counts::default();
        let s = slot("hold", "x");
        assert!(c.force(&s, &r, 1, 0));
        assert!(c.force(&s, &r, 1, 0));
        assert!(!c.force(&s, &r, 1, 0));
        assert_eq!(c.drain(), vec![(s.clone(), 3)]);
        assert!(c.drain().is_empty());
    }

    /// Two nodes, one store: each adds what it counted to the store's cell and takes the
    /// sum back, so the rate holds for their sum.
    #[test]
    fn two_nodes_share_a_cell_through_the_store() {
        let r = Rate::parse("10/100s").unwrap();
        let s = slot("shared", "alice");
        let (mut a, mut b) = (Counts::default(), Counts::default());
        let mut store = Cell::default();
        let t = 1000 * S;
        for _ in 0..4 {
            a.take_all(&[(s.clone(), r, 1)], t).unwrap();
            b.take_all(&[(s.clone(), r, 1)], t).unwrap();
        }
        for node in [&mut a, &mut b] {
            for (slot, units) in node.drain() {
                store.add(&r, units, t);
                node.merge(&slot, &r, store.tat);
            }
        }
        a.merge(&s, &r, store.tat);
        assert_eq!(a.used(&s, &r, t), 8);
        // Counted here after the drain stays on top of the store's cell.
        a.take_all(&[(s.clone(), r, 1)], t).unwrap();
        a.merge(&s, &r, store.tat);
        assert_eq!(a.used(&s, &r, t), 9);
        assert!(a.take_all(&[(s.clone(), r, 2)], t).is_err());
    }

    #[test]
    fn reset_top_and_prune() {
        let r = Rate::parse("10/10s").unwrap();
        let mut c = Counts::default();
        for (v, n) in [("a", 3), ("b", 5), ("c", 1)] {
            c.take_all(&[(slot("r", v), r, n)], 0).unwrap();
        }
        let top = c.top("r", |_| Some(r), 0, 2);
        assert_eq!(top[0].0, "b");
        assert_eq!(top[1], ("a".to_string(), vec![(Measure::Messages, 3)]));
        c.reset(&["r"], "b");
        assert_eq!(c.used(&slot("r", "b"), &r, 0), 0);
        c.drain();
        c.prune(20 * S);
        assert!(c.is_empty());
    }
}
