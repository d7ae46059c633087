//! `check_host()` of a typical record (three includes) with every answer already at
//! hand, as with a warm resolver cache: `cargo bench --bench spf_eval`, against parsing one 450-byte record in the
//! same run. What is left is
//! the evaluator's own cost: parsing each record met, matching, and the bookkeeping.

use std::collections::HashMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[path = "support/spf_record.rs"]
mod spf_record;

use criterion::{criterion_group, criterion_main, Criterion};
use smartrelay::spf::dns::{DnsFailure, SpfDns, TxtAnswer};
use smartrelay::spf::eval::{check_host, Query, SpfResult};

/// Answers from memory: the warm cache.
struct Warm(HashMap<&'static str, &'static str>);

impl SpfDns for Warm {
    async fn txt(&self, name: &str) -> Result<TxtAnswer, DnsFailure> {
        let text = self.0.get(name).ok_or(DnsFailure::NxDomain)?;
        Ok(TxtAnswer {
            records: vec![vec![text.as_bytes().to_vec()]],
            ttl: 300,
        })
    }
    async fn a(&self, _: &str) -> Result<Vec<Ipv4Addr>, DnsFailure> {
        Err(DnsFailure::NoData)
    }
    async fn aaaa(&self, _: &str) -> Result<Vec<Ipv6Addr>, DnsFailure> {
        Err(DnsFailure::NoData)
    }
    async fn mx(&self, _: &str) -> Result<Vec<String>, DnsFailure> {
        Err(DnsFailure::NoData)
    }
    async fn ptr(&self, _: IpAddr) -> Result<Vec<String>, DnsFailure> {
        Err(DnsFailure::NoData)
    }
}

fn eval(c: &mut Criterion) {
    let zone = Warm(HashMap::from([
        (
            "example.com",
            "v=spf1 include:eu._netblocks.mimecast.com include:spf.protection.outlook.com include:_spf.google.com -all",
        ),
        (
            "eu._netblocks.mimecast.com",
            "v=spf1 ip4:198.51.100.0/24 ip4:198.51.101.0/24 ip4:198.51.102.0/24 ~all",
        ),
        (
            "spf.protection.outlook.com",
            "v=spf1 ip4:40.92.0.0/15 ip4:40.107.0.0/16 ip4:52.100.0.0/14 ip4:104.47.0.0/17 ip6:2a01:111:f400::/48 ip6:2a01:111:f403::/49 -all",
        ),
        (
            "_spf.google.com",
            "v=spf1 ip4:74.125.0.0/16 ip4:209.85.128.0/17 ip4:172.217.0.0/19 ip6:2001:4860:4000::/36 ~all",
        ),
    ]));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let query = |ip: &str| Query {
        ip: ip.parse().expect("ip"),
        sender: "alice@example.com".into(),
        helo: "mail.example.com".into(),
        receiver: "mx.receiver.example".into(),
        timestamp: 0,
    };
    // The gateway's address: the first include matches.
    let first = query("198.51.100.7");
    // Matched by the last include: all three records parsed.
    let last = query("209.85.128.9");
    // Nothing matches: `-all`, and the default explanation is expanded.
    let none = query("192.0.2.1");
    assert_eq!(
        rt.block_on(check_host(&zone, &first)).result,
        SpfResult::Pass
    );
    assert_eq!(
        rt.block_on(check_host(&zone, &last)).result,
        SpfResult::Pass
    );
    assert_eq!(
        rt.block_on(check_host(&zone, &none)).result,
        SpfResult::Fail
    );
    let mut g = c.benchmark_group("spf eval, 3 includes, warm");
    for (name, q) in [
        ("first include", &first),
        ("last include", &last),
        ("fail", &none),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| black_box(rt.block_on(check_host(&zone, black_box(q)))))
        });
    }
    g.finish();
}

/// The reference in the same run: parsing one 450-octet record (the size at which
/// records start to risk UDP truncation).
fn parse(c: &mut Criterion) {
    let rec = spf_record::record_450();
    c.bench_function("spf parse 450-byte record", |b| {
        b.iter(|| black_box(smartrelay::spf::record::parse(black_box(&rec))))
    });
}

criterion_group!(benches, parse, eval);
criterion_main!(benches);
