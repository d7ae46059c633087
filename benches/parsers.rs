//! Criterion micro-benchmarks of the pure hot paths, with byte throughput:
//! `cargo bench --bench parsers`. Inputs are what a relay sees every message.

#[path = "support/spf_record.rs"]
mod spf_record;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;

use smartrelay::config::BareLineEndings;
use smartrelay::smtp::command;
use smartrelay::smtp::data::DataReceiver;
use smartrelay::spf::record;

fn commands(c: &mut Criterion) {
    let lines: [&[u8]; 4] = [
        b"MAIL FROM:<alice@example.com> SIZE=5120 BODY=8BITMIME",
        b"RCPT TO:<bob@partner.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@partner.example",
        b"EHLO exch01.example.com",
        b"BDAT 65536 LAST",
    ];
    let bytes: usize = lines.iter().map(|l| l.len()).sum();
    let mut g = c.benchmark_group("command");
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("parse 4 lines", |b| {
        b.iter(|| {
            for l in &lines {
                let _ = black_box(command::parse(black_box(l)));
            }
        })
    });
    g.finish();
}

fn data(c: &mut Criterion) {
    let mut body =
        b"From: alice@example.com\r\nTo: bob@partner.example\r\nSubject: figures\r\n\r\n".to_vec();
    while body.len() < 100 * 1024 {
        body.extend_from_slice(
            b"The quick brown fox jumps over the lazy dog, line after line.\r\n",
        );
        body.extend_from_slice(b"..a stuffed dot line\r\n");
    }
    body.extend_from_slice(b".\r\n");
    let mut g = c.benchmark_group("data");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("receive 100 KiB", |b| {
        b.iter(|| {
            let mut rx = DataReceiver::new(u64::MAX, BareLineEndings::Normalize);
            let mut out = Vec::with_capacity(body.len());
            let end = rx.feed(black_box(&body), &mut out);
            black_box((end, rx.finish().map(|()| out.len()).ok()))
        })
    });
    g.finish();
}

fn spf(c: &mut Criterion) {
    let rec = spf_record::record_450();
    let mut g = c.benchmark_group("spf");
    g.throughput(Throughput::Bytes(rec.len() as u64));
    g.bench_function("parse 450-byte record", |b| {
        b.iter(|| black_box(record::parse(black_box(&rec))))
    });
    g.finish();
}

criterion_group!(benches, commands, data, spf);
criterion_main!(benches);
