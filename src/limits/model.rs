//! What the limits keep in the store, whatever keeps it: this node's counts added to
//! the store's cells, and the restricted key values with what became of them.

use std::future::Future;

use serde::Serialize;

use super::counts::Slot;
use crate::envelope::{LimitKey, Millis, Settle};
use crate::store::StoreError;

/// Units this node counted in a slot since the last sync, and the rate's interval.
#[derive(Debug, Clone)]
pub struct Added {
    pub slot: Slot,
    pub units: u64,
    pub interval_us: u64,
}

/// A key value whose mail is held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Restriction {
    pub key: LimitKey,
    pub value: String,
    /// The rule that fired.
    pub limit: String,
    pub since: Millis,
    /// The rule's count when it fired.
    pub count: u64,
}

/// What a restricted key value's row says now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowState {
    Restricted,
    Lifted(Settle),
}

impl RowState {
    pub fn label(self) -> &'static str {
        match self {
            RowState::Restricted => "restricted",
            RowState::Lifted(Settle::Release) => "released",
            RowState::Lifted(Settle::Discard) => "discarded",
        }
    }

    pub fn parse(text: &str) -> Option<RowState> {
        match text {
            "restricted" => Some(RowState::Restricted),
            "released" => Some(RowState::Lifted(Settle::Release)),
            "discarded" => Some(RowState::Lifted(Settle::Discard)),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub restriction: Restriction,
    pub state: RowState,
    pub updated: Millis,
}

pub trait Backend: Send + Sync + 'static {
    /// Adds this node's counts to the store's cells; returns each cell after.
    fn add(
        &self,
        added: Vec<Added>,
        now_us: u64,
        now: Millis,
    ) -> impl Future<Output = Result<Vec<(Slot, u64)>, StoreError>> + Send;
    /// Cells any node changed at or after `since`.
    fn changed_cells(
        &self,
        since: Millis,
    ) -> impl Future<Output = Result<Vec<(Slot, u64)>, StoreError>> + Send;
    /// Forgets the cells of `value` under the named rules.
    fn reset(
        &self,
        rules: Vec<String>,
        value: String,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Records a restriction unless the key value is restricted already.
    fn restrict(
        &self,
        r: Restriction,
        now: Millis,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Ends a restriction; returns it when there was one in force.
    fn lift(
        &self,
        key: LimitKey,
        value: String,
        how: Settle,
        now: Millis,
    ) -> impl Future<Output = Result<Option<Restriction>, StoreError>> + Send;
    /// Rows any node changed at or after `since`, lifted ones included.
    fn changed_rows(
        &self,
        since: Millis,
    ) -> impl Future<Output = Result<Vec<Row>, StoreError>> + Send;
    /// Deletes lifted rows and idle cells last changed before `before`.
    fn prune(&self, before: Millis) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

/// A row as both backends read it: (key, value, rule, since, count, state, updated).
pub(super) fn row_of(
    key: &str,
    value: String,
    limit: String,
    since: i64,
    count: i64,
    state: &str,
    updated: i64,
) -> Option<Row> {
    Some(Row {
        restriction: Restriction {
            key: LimitKey::parse(key)?,
            value,
            limit,
            since: since.max(0) as Millis,
            count: count.max(0) as u64,
        },
        state: RowState::parse(state)?,
        updated: updated.max(0) as Millis,
    })
}

/// A cell as both backends read it: (rule, measure, value, tat).
pub(super) fn cell_of(rule: String, measure: &str, value: String, tat: i64) -> Option<(Slot, u64)> {
    Some((
        Slot {
            rule,
            measure: super::rules::Measure::parse(measure)?,
            value,
        },
        tat.max(0) as u64,
    ))
}
