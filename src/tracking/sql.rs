//! The search statement both backends run, built from the conditions asked for only:
//! a condition that is absent costs nothing, and each present one can use its index.

use super::model::Query;

/// A bound value.
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    Text(String),
    Int(i64),
}

/// The statement and its values; `mark(n)` writes the n-th placeholder (from 1).
pub fn search(q: &Query, mark: fn(usize) -> String) -> (String, Vec<Param>) {
    let mut conds: Vec<String> = Vec::new();
    let mut params: Vec<Param> = Vec::new();
    // The next placeholder, for the value about to be pushed.
    let next = |params: &Vec<Param>| mark(params.len() + 1);
    if let Some(m) = &q.message_id {
        conds.push(format!("m.message_id = {}", next(&params)));
        params.push(Param::Text(m.clone()));
    }
    if let Some(id) = &q.queue_id {
        conds.push(format!("m.queue_id = {}", next(&params)));
        params.push(Param::Text(id.clone()));
    }
    if let Some(s) = &q.sender {
        conds.push(format!("m.sender = {}", next(&params)));
        params.push(Param::Text(s.clone()));
    }
    if let Some(r) = &q.recipient {
        conds.push(format!(
            "m.queue_id IN (SELECT queue_id FROM tracked_recipients WHERE address = {})",
            next(&params)
        ));
        params.push(Param::Text(r.clone()));
    }
    if let Some(s) = q.status {
        conds.push(format!("m.status = {}", next(&params)));
        params.push(Param::Text(s.label().into()));
    }
    if let Some(s) = q.since {
        conds.push(format!("m.received_at >= {}", next(&params)));
        params.push(Param::Int(s));
    }
    if let Some(u) = q.until {
        conds.push(format!("m.received_at <= {}", next(&params)));
        params.push(Param::Int(u));
    }
    if let Some((at, id)) = &q.after {
        let a = next(&params);
        params.push(Param::Int(*at));
        let i = next(&params);
        params.push(Param::Text(id.clone()));
        conds.push(format!(
            "(m.received_at < {a} OR (m.received_at = {a} AND m.queue_id < {i}))"
        ));
    }
    let filter = if conds.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conds.join(" AND "))
    };
    let take = next(&params);
    params.push(Param::Int((q.limit + 1) as i64));
    let sql = format!(
        "SELECT m.queue_id, m.node, m.received_at, m.sender, m.message_id, m.status
         FROM tracked_messages m {filter}
         ORDER BY m.received_at DESC, m.queue_id DESC LIMIT {take}"
    );
    (sql, params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracking::model::{Filter, Query};

    #[test]
    fn only_what_is_asked_is_in_the_statement() {
        let q = Query::of(&Filter {
            recipient: Some("Bob@Partner.test".into()),
            since: Some(5),
            ..Filter::default()
        })
        .unwrap();
        let (sql, params) = search(&q, |n| format!("${n}"));
        assert!(sql.contains("WHERE m.queue_id IN (SELECT queue_id FROM tracked_recipients WHERE address = $1) AND m.received_at >= $2"), "{sql}");
        assert!(sql.ends_with("LIMIT $3"), "{sql}");
        assert_eq!(
            params,
            vec![
                Param::Text("bob@partner.test".into()),
                Param::Int(5),
                Param::Int(101)
            ]
        );
        let (all, _) = search(&Query::of(&Filter::default()).unwrap(), |_| "?".into());
        assert!(!all.contains("WHERE"));
    }
}
