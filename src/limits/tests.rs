//! The limits against a real SQLite store in a temporary directory: defer and hold,
//! restriction and lift, and two `Limits` sharing one store as two nodes would.

use std::net::IpAddr;

use super::*;
use crate::config::LimitConfig;
use crate::rate::Rate;

fn dir(name: &str) -> std::path::PathBuf {
    crate::scratch::dir(&format!("limits-{name}"))
}

fn rule(name: &str, key: LimitKey, action: LimitAction, rates: &[(&str, &str)]) -> LimitConfig {
    let get = |m: &str| {
        rates
            .iter()
            .find(|(k, _)| *k == m)
            .map(|(_, r)| Rate::parse(r).unwrap())
    };
    LimitConfig {
        name: name.into(),
        key,
        messages: get("messages"),
        recipients: get("recipients"),
        bounces: get("bounces"),
        action,
        exempt: vec!["newsletter@contoso.test".into()],
    }
}

fn who(sender: &str) -> Who<'_> {
    Who {
        sender,
        client: IpAddr::from([192, 0, 2, 7]),
        ours: false,
    }
}

fn limits(name: &str, rules: &[LimitConfig]) -> Limits {
    let store = Store::open(&dir(name).join("state.sqlite3")).unwrap();
    Limits::new(rules, store, EventBus::new())
}

#[test]
fn defer_names_the_rule_and_counts_nothing_refused() {
    let l = limits(
        "defer",
        &[rule(
            "burst",
            LimitKey::Sender,
            LimitAction::Defer,
            &[("messages", "2/1h"), ("recipients", "3/1h")],
        )],
    );
    let a = who("alice@contoso.test");
    assert_eq!(l.admit(Unit::Message, &a), Ok(()));
    assert_eq!(l.admit(Unit::Message, &a), Ok(()));
    assert_eq!(
        l.admit(Unit::Message, &a),
        Err(Deferral {
            limit: "burst".into()
        })
    );
    for _ in 0..3 {
        assert_eq!(l.admit(Unit::Recipient, &a), Ok(()));
    }
    assert!(l.admit(Unit::Recipient, &a).is_err());
    // Others, the null sender and the exempt are not this sender.
    assert_eq!(l.admit(Unit::Message, &who("bob@contoso.test")), Ok(()));
    for _ in 0..5 {
        assert_eq!(l.admit(Unit::Message, &who("")), Ok(()));
        assert_eq!(
            l.admit(Unit::Message, &who("newsletter@contoso.test")),
            Ok(())
        );
    }
    // A hold rule never defers.
    let h = limits(
        "defer-hold",
        &[rule(
            "daily",
            LimitKey::Sender,
            LimitAction::Hold,
            &[("messages", "1/1h")],
        )],
    );
    for _ in 0..3 {
        assert_eq!(h.admit(Unit::Message, &a), Ok(()));
    }
}

#[tokio::test]
async fn a_hold_rule_restricts_until_lifted_and_the_store_remembers() {
    let rules = [rule(
        "daily",
        LimitKey::Sender,
        LimitAction::Hold,
        &[("recipients", "5/1d")],
    )];
    let d = dir("hold");
    let l = Limits::new(
        &rules,
        Store::open(&d.join("s.sqlite3")).unwrap(),
        EventBus::new(),
    );
    let a = who("alice@contoso.test");
    assert_eq!(l.hold(&a, 3), None);
    assert_eq!(l.hold(&a, 2), None);
    let held = l.hold(&a, 1).expect("the sixth recipient goes over");
    assert_eq!(
        held,
        HoldReason::Limit {
            limit: "daily".into(),
            key: LimitKey::Sender,
            value: "alice@contoso.test".into()
        }
    );
    // Restricted: held whatever the counts, the null sender never.
    assert!(l.hold(&a, 0).is_some());
    assert_eq!(l.hold(&who(""), 100), None);
    assert_eq!(l.restricted().len(), 1);
    assert!(l.sync().await.is_empty());

    // Another process on the same file knows the restriction.
    let again = Limits::new(
        &rules,
        Store::open(&d.join("s.sqlite3")).unwrap(),
        EventBus::new(),
    );
    again.sync().await;
    assert_eq!(again.restricted()[0].value, "alice@contoso.test");
    assert!(again.hold(&a, 1).is_some());

    // Released: counters start again, and the other process applies the release.
    let lifted = l
        .lift(LimitKey::Sender, "Alice@contoso.test", Settle::Release)
        .await
        .unwrap();
    assert_eq!(lifted.map(|r| r.limit), Some("daily".into()));
    assert_eq!(l.hold(&a, 5), None);
    let applied = again.sync().await;
    assert!(applied.contains(&Lifted {
        key: LimitKey::Sender,
        value: "alice@contoso.test".into(),
        how: Settle::Release
    }));
    assert!(again.restricted().is_empty());
    assert_eq!(
        l.lift(LimitKey::Sender, "nobody@contoso.test", Settle::Discard)
            .await
            .unwrap(),
        None
    );
}

/// Two nodes on one store: each counts locally, and after a sync each sees the sum.
#[tokio::test]
async fn two_nodes_count_one_sum() {
    let rules = [rule(
        "burst",
        LimitKey::SenderDomain,
        LimitAction::Defer,
        &[("messages", "10/1h")],
    )];
    let d = dir("two-nodes");
    let a = Limits::new(
        &rules,
        Store::open(&d.join("s.sqlite3")).unwrap(),
        EventBus::new(),
    );
    let b = Limits::new(
        &rules,
        Store::open(&d.join("s.sqlite3")).unwrap(),
        EventBus::new(),
    );
    let w = who("x@contoso.test");
    for _ in 0..4 {
        a.admit(Unit::Message, &w).unwrap();
        b.admit(Unit::Message, &w).unwrap();
    }
    a.sync().await;
    b.sync().await;
    a.sync().await;
    assert!(a.admit(Unit::Message, &w).is_ok());
    assert!(a.admit(Unit::Message, &w).is_ok());
    assert!(a.admit(Unit::Message, &w).is_err(), "8 + 2 of 10");
    let top = &a.overview()[0].top[0];
    assert_eq!(top.value, "contoso.test");
    assert_eq!(top.counts[&Measure::Messages], 10);
}

#[test]
fn bounces_restrict_the_sender() {
    let l = limits(
        "bounces",
        &[rule(
            "bounces",
            LimitKey::Sender,
            LimitAction::Hold,
            &[("bounces", "2/1h")],
        )],
    );
    let report = |n: usize| DeliveryReport {
        id: crate::envelope::QueueId::generate(),
        sender: "alice@contoso.test".into(),
        flags: Default::default(),
        generated_dsn: false,
        system: false,
        client: IpAddr::from([192, 0, 2, 7]),
        tls: false,
        duration_ms: 0,
        expired: false,
        route: None,
        host: None,
        at: 0,
        results: (0..n)
            .map(|i| crate::events::RcptResult {
                address: format!("r{i}@partner.test"),
                outcome: Outcome::Bounced,
                reply: crate::envelope::Reply::new(550, "5.1.1", "no such user"),
            })
            .collect(),
    };
    l.delivered(&report(2));
    assert!(l.restricted().is_empty());
    l.delivered(&report(1));
    assert_eq!(l.restricted()[0].limit, "bounces");
    assert!(l.hold(&who("alice@contoso.test"), 1).is_some());
}
