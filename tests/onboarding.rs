//! Onboarding: the SPF validator over a real DNS server (through the `spf check` CLI and
//! the admin API), outbound-IP confirmation, connector verification against real SMTP
//! servers, the flow summary and the platform instructions.

mod support;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::dns::{Dns, Silent};
use support::*;

const T: Duration = Duration::from_secs(20);

/// The scenarios: name → (TXT records at <name>.test as zone-file text).
fn scenario_zone() -> String {
    let mut z = String::new();
    fn add(z: &mut String, name: &str, txts: &[&str]) {
        for t in txts {
            z.push_str(&format!("{name} IN TXT {t}\n"));
        }
    }
    add(
        &mut z,
        "valid",
        &[r#""v=spf1 include:eu._netblocks.mimecast.com ip4:192.0.2.10 -all""#],
    );
    add(
        &mut z,
        "notfirst",
        &[r#""v=spf1 ip4:192.0.2.10 include:eu._netblocks.mimecast.com ~all""#],
    );
    add(
        &mut z,
        "missing",
        &[r#""v=spf1 include:_spf.partner.test ~all""#],
    );
    add(
        &mut z,
        "afterall",
        &[r#""v=spf1 ip4:192.0.2.10 ~all include:eu._netblocks.mimecast.com""#],
    );
    add(
        &mut z,
        "tworecords",
        &[
            r#""v=spf1 include:eu._netblocks.mimecast.com -all""#,
            r#""v=spf1 ip4:192.0.2.10 -all""#,
        ],
    );
    add(
        &mut z,
        "norecord",
        &[r#""google-site-verification=abc123""#],
    );
    // nxdomain.test has no name at all.
    add(
        &mut z,
        "eleven",
        &[r#""v=spf1 include:eu._netblocks.mimecast.com include:n1.test include:n2.test ~all""#],
    );
    add(
        &mut z,
        "n1",
        &[r#""v=spf1 include:l1.test include:l2.test include:l3.test include:l4.test ~all""#],
    );
    add(
        &mut z,
        "n2",
        &[r#""v=spf1 include:l5.test include:l6.test include:l7.test include:l8.test ~all""#],
    );
    for i in 1..=8 {
        add(
            &mut z,
            &format!("l{i}"),
            &[r#""v=spf1 ip4:192.0.2.1 ~all""#],
        );
    }
    add(
        &mut z,
        "voids",
        &[
            r#""v=spf1 include:eu._netblocks.mimecast.com a:gone1.test a:gone2.test a:gone3.test ~all""#,
        ],
    );
    add(
        &mut z,
        "loop",
        &[r#""v=spf1 include:eu._netblocks.mimecast.com include:loop2.test ~all""#],
    );
    add(&mut z, "loop2", &[r#""v=spf1 include:loop.test ~all""#]);
    add(
        &mut z,
        "redirnone",
        &[r#""v=spf1 include:eu._netblocks.mimecast.com redirect=empty.test""#],
    );
    add(&mut z, "empty", &[r#""not an spf record""#]);
    add(
        &mut z,
        "redirall",
        &[r#""v=spf1 include:eu._netblocks.mimecast.com -all redirect=valid.test""#],
    );
    add(
        &mut z,
        "plusall",
        &[r#""v=spf1 include:eu._netblocks.mimecast.com +all""#],
    );
    add(
        &mut z,
        "qall",
        &[r#""v=spf1 include:eu._netblocks.mimecast.com ?all""#],
    );
    add(
        &mut z,
        "noterm",
        &[r#""v=spf1 include:eu._netblocks.mimecast.com ip4:192.0.2.10""#],
    );
    add(
        &mut z,
        "ptr",
        &[r#""v=spf1 include:eu._netblocks.mimecast.com ptr -all""#],
    );
    add(
        &mut z,
        "badcidr",
        &[r#""v=spf1 include:eu._netblocks.mimecast.com ip4:192.0.2.0/33 -all""#],
    );
    add(
        &mut z,
        "badip",
        &[r#""v=spf1 include:eu._netblocks.mimecast.com ip4:999.1.1.1 -all""#],
    );
    add(
        &mut z,
        "unknownmech",
        &[r#""v=spf1 include:eu._netblocks.mimecast.com ipv4:192.0.2.1 -all""#],
    );
    add(
        &mut z,
        "badmacro",
        &[r#""v=spf1 include:eu._netblocks.mimecast.com exists:%{z}.bl.test -all""#],
    );
    add(
        &mut z,
        "split",
        &[r#""v=spf1 include:eu._netblocks.mimecast.com " "ip4:192.0.2.10 -all""#],
    );
    let long_terms: Vec<String> = (0..40).map(|i| format!("ip4:198.18.{i}.0/24")).collect();
    let long = format!(
        "v=spf1 include:eu._netblocks.mimecast.com {} -all",
        long_terms.join(" ")
    );
    let chunks: Vec<String> = long
        .as_bytes()
        .chunks(250)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect();
    z.push_str(&format!("long IN TXT {}\n", chunks.join(" ")));
    add(
        &mut z,
        "global",
        &[r#""v=spf1 include:_netblocks.mimecast.com -all""#],
    );
    add(
        &mut z,
        "slowinc",
        &[r#""v=spf1 include:eu._netblocks.mimecast.com include:slow.test -all""#],
    );
    add(
        &mut z,
        "incnone",
        &[r#""v=spf1 include:eu._netblocks.mimecast.com include:empty.test -all""#],
    );
    add(
        &mut z,
        "dupinc",
        &[r#""v=spf1 include:eu._netblocks.mimecast.com include:l1.test include:l1.test -all""#],
    );
    add(
        &mut z,
        "mxmany",
        &[r#""v=spf1 include:eu._netblocks.mimecast.com mx -all""#],
    );
    for i in 0..11 {
        z.push_str(&format!(
            "mxmany IN MX {} mx{i}.test.\nmx{i} IN A 192.0.2.{}\n",
            10 + i,
            i + 1
        ));
    }
    add(
        &mut z,
        "nine",
        &[
            r#""v=spf1 include:eu._netblocks.mimecast.com include:l1.test include:l2.test include:l3.test include:l4.test include:l5.test include:l6.test include:l7.test a -all""#,
        ],
    );
    z.push_str("nine IN A 192.0.2.50\n");
    add(
        &mut z,
        "otherregion",
        &[r#""v=spf1 include:de._netblocks.mimecast.com -all""#],
    );
    add(
        &mut z,
        "nested",
        &[r#""v=spf1 include:_spf.nested.test -all""#],
    );
    add(
        &mut z,
        "_spf.nested",
        &[r#""v=spf1 include:eu._netblocks.mimecast.com ~all""#],
    );
    add(
        &mut z,
        "spf10",
        &[r#""v=spf10 include:eu._netblocks.mimecast.com -all""#],
    );
    add(
        &mut z,
        "_spf.partner",
        &[r#""v=spf1 ip4:203.0.113.0/24 ~all""#],
    );
    add(
        &mut z,
        "example",
        &[r#""v=spf1 include:eu._netblocks.mimecast.com -all""#],
    );
    add(&mut z, "broken", &[r#""v=spf1 ip4:192.0.2.10 ~all""#]);
    // Names the include, but denies one of the gateway's ranges before it.
    add(
        &mut z,
        "denyfirst",
        &[r#""v=spf1 -ip4:198.51.101.0/24 include:eu._netblocks.mimecast.com -all""#],
    );
    add(
        &mut z,
        "existsdeny",
        &[r#""v=spf1 -exists:%{i}.deny.test include:eu._netblocks.mimecast.com -all""#],
    );
    z.push_str("198.51.100.1.deny IN A 127.0.0.2\n");
    z
}

fn dns() -> Dns {
    Dns::start(&[
        (
            "mimecast.com",
            r#"
eu._netblocks IN TXT "v=spf1 ip4:198.51.100.0/24 ip4:198.51.101.0/24 ~all"
de._netblocks IN TXT "v=spf1 ip4:203.0.113.0/24 ~all"
_netblocks IN TXT "v=spf1 include:eu._netblocks.mimecast.com include:de._netblocks.mimecast.com include:us._netblocks.mimecast.com ~all"
us._netblocks IN TXT "v=spf1 ip4:192.0.2.128/25 ~all"
"#,
        ),
        ("test", &scenario_zone()),
    ])
}

fn spf_check(ns: &str, domain: &str) -> (bool, Value, String) {
    let out = Command::new(bin())
        .args([
            "spf",
            "check",
            domain,
            "--region",
            "eu",
            "--nameserver",
            ns,
            "--json",
        ])
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{domain}: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.success(), report, String::new())
}

fn codes(report: &Value, severity: &str) -> Vec<String> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["severity"] == severity)
        .map(|f| f["code"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn spf_scenarios_through_the_cli() {
    let dns = dns();
    let ns = dns.addr.to_string();
    // (domain, valid, errors expected exactly, warnings/infos that must be present)
    let cases: Vec<(&str, bool, Vec<&str>, Vec<&str>)> = vec![
        ("valid.test", true, vec![], vec![]),
        (
            "notfirst.test",
            false,
            vec!["gateway_include_not_first"],
            vec![],
        ),
        (
            "missing.test",
            false,
            vec!["gateway_include_missing", "gateway_not_passing"],
            vec![],
        ),
        (
            "afterall.test",
            false,
            vec!["gateway_include_after_all", "gateway_not_passing"],
            vec!["terms_after_all"],
        ),
        (
            "denyfirst.test",
            false,
            vec!["gateway_include_not_first", "gateway_not_passing"],
            vec![],
        ),
        (
            "existsdeny.test",
            false,
            vec!["gateway_include_not_first", "gateway_not_passing"],
            vec![],
        ),
        ("tworecords.test", false, vec!["multiple_records"], vec![]),
        ("norecord.test", false, vec!["no_record"], vec![]),
        ("nxdomain.test", false, vec!["nxdomain"], vec![]),
        ("eleven.test", false, vec!["lookup_limit"], vec![]),
        ("voids.test", false, vec!["void_limit"], vec!["void_lookup"]),
        ("loop.test", false, vec!["include_loop"], vec![]),
        (
            "redirnone.test",
            false,
            vec!["redirect_no_record", "no_terminator"],
            vec![],
        ),
        ("redirall.test", true, vec![], vec!["redirect_ignored"]),
        ("plusall.test", false, vec!["all_pass"], vec![]),
        ("qall.test", false, vec!["all_neutral"], vec![]),
        ("noterm.test", false, vec!["no_terminator"], vec![]),
        ("ptr.test", true, vec![], vec!["ptr_used"]),
        ("badcidr.test", false, vec!["syntax_bad_cidr"], vec![]),
        ("badip.test", false, vec!["syntax_bad_ip4"], vec![]),
        (
            "unknownmech.test",
            false,
            vec!["syntax_unknown_mechanism"],
            vec![],
        ),
        ("badmacro.test", false, vec!["syntax_bad_macro"], vec![]),
        ("split.test", true, vec![], vec!["split_strings"]),
        (
            "long.test",
            true,
            vec![],
            vec!["record_over_255", "txt_answer_over_512"],
        ),
        ("global.test", true, vec![], vec!["global_include"]),
        ("slowinc.test", false, vec!["dns_timeout"], vec![]),
        ("incnone.test", false, vec!["include_no_record"], vec![]),
        ("dupinc.test", true, vec![], vec!["duplicate_term"]),
        ("mxmany.test", false, vec!["mx_limit"], vec![]),
        ("nine.test", true, vec![], vec!["lookups_near_limit"]),
        (
            "otherregion.test",
            false,
            vec!["gateway_include_missing", "gateway_not_passing"],
            vec!["other_region_include"],
        ),
        ("nested.test", false, vec!["gateway_include_nested"], vec![]),
        ("spf10.test", false, vec!["no_record"], vec![]),
    ];
    assert!(cases.len() >= 25);
    let handles: Vec<_> = cases
        .into_iter()
        .map(|case| {
            let ns = ns.clone();
            std::thread::spawn(move || {
                let (domain, valid, errors, notes) = case;
                let (ok, report, _) = spf_check(&ns, domain);
                assert_eq!(report["valid"], valid, "{domain}: {report:#}");
                assert_eq!(ok, valid, "{domain}: exit code follows validity");
                let mut got = codes(&report, "error");
                got.dedup();
                assert_eq!(got, errors, "{domain}: {report:#}");
                let all: Vec<String> = report["findings"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| f["code"].as_str().unwrap().to_string())
                    .collect();
                for n in notes {
                    assert!(
                        all.iter().any(|c| c == n),
                        "{domain}: expected {n} in {all:?}"
                    );
                }
                (domain, report)
            })
        })
        .collect();
    let reports: HashMap<&str, Value> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    // The receivers' verdict, range by range: one address of each published range,
    // evaluated against the domain's record.
    let verdict = |d: &str| {
        reports[d]["gateway_pass"]["verdict"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let ranges = |d: &str| {
        reports[d]["gateway_pass"]["ranges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                format!(
                    "{} {} {} {}",
                    r["range"].as_str().unwrap(),
                    r["address"].as_str().unwrap(),
                    r["result"].as_str().unwrap(),
                    r["mechanism"].as_str().unwrap_or("-")
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(verdict("valid.test"), "all");
    assert_eq!(
        ranges("valid.test"),
        [
            "198.51.100.0/24 198.51.100.1 pass include:eu._netblocks.mimecast.com",
            "198.51.101.0/24 198.51.101.1 pass include:eu._netblocks.mimecast.com"
        ]
    );
    assert_eq!(verdict("denyfirst.test"), "some");
    assert_eq!(
        ranges("denyfirst.test")[1],
        "198.51.101.0/24 198.51.101.1 fail -ip4:198.51.101.0/24"
    );
    assert_eq!(verdict("existsdeny.test"), "some");
    assert_eq!(
        ranges("existsdeny.test")[0],
        "198.51.100.0/24 198.51.100.1 fail -exists:%{i}.deny.test"
    );
    let broken: Vec<&Value> = reports["existsdeny.test"]["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["code"] == "gateway_not_passing")
        .collect();
    assert_eq!(broken.len(), 1);
    assert_eq!(broken[0]["term"], "-exists:%{i}.deny.test");
    assert_eq!(verdict("missing.test"), "none");
    assert_eq!(verdict("otherregion.test"), "none");
    // A macro term is evaluated now, not reported as unevaluated.
    assert!(!reports["existsdeny.test"]
        .to_string()
        .contains("macro_not_evaluated"));
    // A record that does not evaluate has its own error; its ranges say permerror.
    assert_eq!(verdict("tworecords.test"), "none");
    assert_eq!(verdict("nested.test"), "all");
    assert_eq!(reports["eleven.test"]["lookups"], 11);
    assert_eq!(reports["voids.test"]["void_lookups"], 3);
    assert_eq!(
        reports["split.test"]["records"][0],
        "v=spf1 include:eu._netblocks.mimecast.com ip4:192.0.2.10 -all"
    );
    assert_eq!(
        reports["valid.test"]["tree"]["children"][0]["domain"],
        "eu._netblocks.mimecast.com"
    );
    assert_eq!(
        reports["notfirst.test"]["recommended"],
        "v=spf1 include:eu._netblocks.mimecast.com ip4:192.0.2.10 ~all"
    );
    assert_eq!(
        reports["plusall.test"]["recommended"],
        "v=spf1 include:eu._netblocks.mimecast.com ~all"
    );
    assert_eq!(
        reports["global.test"]["recommended"],
        "v=spf1 include:eu._netblocks.mimecast.com -all"
    );
    let g = reports["global.test"]["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["code"] == "global_include")
        .unwrap()
        .clone();
    assert!(
        g["message"]
            .as_str()
            .unwrap()
            .contains("costs 4 DNS lookups"),
        "{g}"
    );
    let bad = reports["badip.test"]["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["code"] == "syntax_bad_ip4")
        .unwrap()
        .clone();
    assert_eq!(bad["term"], "ip4:999.1.1.1", "errors point at the term");
}

/// Invalid records whose recommended replacement is published and validated again.
const REPUBLISHED: [&str; 9] = [
    "notfirst",
    "missing",
    "afterall",
    "plusall",
    "qall",
    "noterm",
    "global",
    "otherregion",
    "redirnone",
];

#[test]
fn recommended_records_validate_when_published() {
    let dns = dns();
    let ns = dns.addr.to_string();
    let mut zone = String::new();
    for d in REPUBLISHED {
        let (_, report, _) = spf_check(&ns, &format!("{d}.test"));
        let rec = report["recommended"].as_str().unwrap().to_string();
        zone.push_str(&format!("{d} IN TXT \"{rec}\"\n"));
    }
    zone.push_str(
        "_spf.partner IN TXT \"v=spf1 ip4:203.0.113.0/24 ~all\"\nempty IN TXT \"v=spf1 -all\"\n",
    );
    let fixed = Dns::start(&[
        ("mimecast.com", "eu._netblocks IN TXT \"v=spf1 ip4:198.51.100.0/24 ~all\"\nde._netblocks IN TXT \"v=spf1 ip4:203.0.113.0/24 ~all\"\n"),
        ("test", &zone),
    ]);
    for d in REPUBLISHED {
        let (ok, report, _) = spf_check(&fixed.addr.to_string(), &format!("{d}.test"));
        assert!(ok, "the recommended record for {d} validates: {report:#}");
    }
}

#[test]
fn cli_text_output_and_dns_timeout() {
    let dns = dns();
    let out = Command::new(bin())
        .args([
            "spf",
            "check",
            "notfirst.test",
            "--region",
            "eu",
            "--nameserver",
            &dns.addr.to_string(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(text.starts_with("✘ notfirst.test"), "{text}");
    assert!(
        text.contains("gateway_include_not_first")
            && text.contains("recommended: v=spf1 include:eu._netblocks.mimecast.com")
    );
    let ok = Command::new(bin())
        .args([
            "spf",
            "check",
            "valid.test",
            "--nameserver",
            &dns.addr.to_string(),
        ])
        .output()
        .unwrap();
    assert!(ok.status.success());
    assert!(String::from_utf8_lossy(&ok.stdout).starts_with("✔ valid.test"));
    // A server that never answers: a temperror, reported, not a crash or a hang.
    let silent = Silent::start();
    let started = std::time::Instant::now();
    let (ok, report, _) = spf_check(&silent.addr.to_string(), "valid.test");
    assert!(!ok);
    assert_eq!(report["status"], "temperror", "{report:#}");
    assert!(
        codes(&report, "error")
            .iter()
            .any(|c| c == "dns_timeout" || c == "dns_error"),
        "{report:#}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}

fn onboarding_relay(dir: &std::path::Path, dns: &Dns, upstream: &str, ranges: &str) -> Relay {
    let cfg = Cfg::new(dir, upstream)
        .set("access", "domains", "[\"example.test\", \"broken.test\"]")
        .set("access", "allowed_ranges", ranges)
        .set("dns", "nameservers", &format!("[\"{}\"]", dns.addr));
    Relay::start(&cfg)
}

fn step<'a>(steps: &'a Value, id: &str) -> &'a Value {
    steps["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("step {id}: {steps:#}"))
}

#[test]
fn onboarding_api_steps_confirmation_and_flow() {
    let dir = tmpdir("onboarding-api");
    let dns = dns();
    let up = Upstream::start(&dir, &[]);
    let mut relay = onboarding_relay(&dir, &dns, &up.addr(), "[\"127.0.0.1/32\"]");
    let (s, steps) = relay.get("/api/v1/onboarding");
    assert_eq!(s, 200);
    assert_eq!(steps["complete"], false);
    assert_eq!(step(&steps, "domains")["state"], "done");
    assert_eq!(step(&steps, "outbound_ips")["state"], "todo");
    assert_eq!(step(&steps, "spf:example.test")["state"], "done");
    let broken = step(&steps, "spf:broken.test");
    assert_eq!(broken["state"], "failing");
    assert!(broken["reason"]
        .as_str()
        .unwrap()
        .contains("include:eu._netblocks.mimecast.com"));
    assert_eq!(step(&steps, "connector")["state"], "todo");
    assert_eq!(step(&steps, "mail_flowing")["state"], "todo");

    // SPF per domain and for all configured domains.
    let (_, one) = relay.get("/api/v1/onboarding/spf/broken.test?region=eu");
    assert_eq!(one["valid"], false);
    assert_eq!(
        one["recommended"],
        "v=spf1 include:eu._netblocks.mimecast.com ip4:192.0.2.10 ~all"
    );
    // Without the include, receivers softfail what the gateway relays.
    assert_eq!(one["gateway_pass"]["verdict"], "none", "{one:#}");
    assert_eq!(one["gateway_pass"]["ranges"][0]["address"], "198.51.100.1");
    assert_eq!(one["gateway_pass"]["ranges"][0]["result"], "softfail");
    assert_eq!(one["gateway_pass"]["ranges"][0]["mechanism"], "~all");
    let (_, all) = relay.get("/api/v1/onboarding/spf");
    assert_eq!(all["domains"].as_array().unwrap().len(), 2);
    assert_eq!(
        relay.get("/api/v1/onboarding/spf/valid.test?region=mars").0,
        400
    );

    // Traffic: one allowed source sends mail, a neighbour is refused three times.
    let mut c = Smtp::connect_from("127.0.0.1".parse().unwrap(), relay.smtp);
    c.greet();
    queued_id(&c.mail(
        "alice@example.test",
        &["bob@partner.test"],
        "Subject: hi\r\n\r\nx",
    ));
    for _ in 0..3 {
        let mut r = Smtp::connect_from("127.0.0.9".parse().unwrap(), relay.smtp);
        assert_eq!(r.reply().code, 554);
    }
    up.wait_messages(1, T);
    assert!(wait_until(T, || {
        let (_, ips) = relay.get("/api/v1/onboarding/outbound-ips");
        ips["notify"]
            .as_array()
            .is_some_and(|n| n.iter().any(|s| s["ip"] == "127.0.0.9"))
    }));
    let (_, ips) = relay.get("/api/v1/onboarding/outbound-ips");
    assert_eq!(ips["ranges"], serde_json::json!(["127.0.0.1/32"]));
    let src = ips["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["ip"] == "127.0.0.1")
        .unwrap()
        .clone();
    assert_eq!(
        (src["allowed"].clone(), src["messages"].clone()),
        (Value::Bool(true), Value::from(1))
    );
    assert!(ips["notify"][0]["why"]
        .as_str()
        .unwrap()
        .contains("127.0.0.0/24"));
    let (_, steps) = relay.get("/api/v1/onboarding");
    assert_eq!(
        step(&steps, "outbound_ips")["state"],
        "failing",
        "a refused neighbour is the notify case"
    );

    // The summary counts what happened.
    assert!(wait_until(T, || relay
        .get("/api/v1/onboarding/summary?window=24h")
        .1["delivered"]
        == 1));
    let (_, sum) = relay.get("/api/v1/onboarding/summary?window=24h");
    assert_eq!(sum["accepted"], 1);
    assert_eq!(sum["refused_connections"], 3);
    assert_eq!(sum["by_source"][0]["key"], "127.0.0.1");
    assert_eq!(sum["by_sender_domain"][0]["key"], "example.test");
    assert_eq!(sum["by_route"][0]["key"], "eu");
    assert_eq!(sum["by_smart_host"][0]["key"], up.addr().as_str());
    assert!(sum["top_replies"][0]["key"]
        .as_str()
        .unwrap()
        .starts_with("250"));
    assert_eq!(relay.get("/api/v1/onboarding/summary?window=soon").0, 400);

    // Confirmation persists across a restart...
    let (s, c) = relay.post("/api/v1/onboarding/outbound-ips/confirm");
    assert_eq!((s, c["confirmed"].clone()), (200, Value::Bool(true)));
    relay.restart();
    let (_, ips) = relay.get("/api/v1/onboarding/outbound-ips");
    assert_eq!(ips["confirmed"], true);
    // ...and is invalidated when the ranges in the configuration change.
    let cfg_text = std::fs::read_to_string(&relay.config)
        .unwrap()
        .replace("[\"127.0.0.1/32\"]", "[\"127.0.0.0/29\"]");
    std::fs::write(&relay.config, cfg_text).unwrap();
    relay.restart();
    let (_, ips) = relay.get("/api/v1/onboarding/outbound-ips");
    assert_eq!(ips["confirmed"], false);
    assert_eq!(ips["changed_since_confirmation"], true);

    // The CLI shows the same steps.
    let out = relay.cli(&["onboarding", "status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("✔ Domains validated") && text.contains("✘ SPF record of broken.test valid"),
        "{text}"
    );
}

#[test]
fn connector_verification_against_real_smtp_servers() {
    let dir = tmpdir("connector");
    let dns = dns();
    let certs = certs(&dir);
    let tls_good = Upstream::start(
        &dir,
        &[
            "--cert",
            certs.cert.to_str().unwrap(),
            "--key",
            certs.key.to_str().unwrap(),
        ],
    );
    let tls_rogue = Upstream::start(
        &dir,
        &[
            "--cert",
            certs.rogue_cert.to_str().unwrap(),
            "--key",
            certs.rogue_key.to_str().unwrap(),
        ],
    );
    let plain = Upstream::start(&dir, &[]);
    let cfg = Cfg::new(&dir, "x:25")
        .set(
            "routing.regions.eu",
            "hosts",
            &format!("[\"{}\", \"{}\"]", tls_good.addr(), tls_rogue.addr()),
        )
        .set("routing.regions.eu", "tls", "\"required\"")
        .set(
            "routing.regions.eu",
            "ca_file",
            &format!("\"{}\"", certs.ca.display()),
        )
        .set(
            "routing.internal",
            "hosts",
            &format!("[\"{}\"]", plain.addr()),
        )
        .set("routing.internal", "tls", "\"opportunistic\"")
        .set("dns", "nameservers", &format!("[\"{}\"]", dns.addr));
    let relay = Relay::start(&cfg);
    let (s, v) = relay.post("/api/v1/onboarding/connector/verify");
    assert_eq!(s, 422, "{v:#}");
    let hosts = v["verification"]["hosts"].as_array().unwrap();
    let by = |addr: &str| hosts.iter().find(|h| h["host"] == addr).unwrap().clone();
    let good = by(&tls_good.addr());
    assert_eq!(
        (good["ok"].clone(), good["certificate_verified"].clone()),
        (Value::Bool(true), Value::Bool(true)),
        "{good:#}"
    );
    assert!(good["tls"].as_str().unwrap().starts_with("TLSv1."));
    assert_eq!(good["starttls_offered"], true);
    assert!(good["extensions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e == "PIPELINING" || e == "8BITMIME"));
    let rogue = by(&tls_rogue.addr());
    assert_eq!(
        (rogue["ok"].clone(), rogue["certificate_verified"].clone()),
        (Value::Bool(false), Value::Bool(false)),
        "{rogue:#}"
    );
    let plain_h = by(&plain.addr());
    assert_eq!(
        (plain_h["ok"].clone(), plain_h["reachable"].clone()),
        (Value::Bool(true), Value::Bool(true))
    );
    assert_eq!(
        plain_h["tls"],
        Value::Null,
        "no STARTTLS offered: plaintext"
    );
    // No mail was sent by the check itself.
    assert!(tls_good.messages().is_empty() && plain.messages().is_empty());
    let (_, steps) = relay.get("/api/v1/onboarding");
    assert_eq!(step(&steps, "connector")["state"], "failing");
}

#[test]
fn connector_verification_succeeds_with_mail_flowing_and_returns_the_summary() {
    let dir = tmpdir("connector-ok");
    let dns = dns();
    let up = Upstream::start(&dir, &[]);
    let relay = onboarding_relay(&dir, &dns, &up.addr(), "[\"127.0.0.0/8\"]");
    let (s, v) = relay.post("/api/v1/onboarding/connector/verify");
    assert_eq!(s, 422);
    assert!(
        v["verification"]["reason"]
            .as_str()
            .unwrap()
            .contains("no mail accepted and delivered"),
        "{v:#}"
    );
    let mut c = Smtp::connect(relay.smtp);
    c.greet();
    queued_id(&c.mail(
        "alice@example.test",
        &["bob@partner.test"],
        "Subject: test\r\n\r\nconnector test",
    ));
    up.wait_messages(1, T);
    assert!(wait_until(T, || relay.get("/api/v1/onboarding/summary").1
        ["delivered"]
        == 1));
    let (s, v) = relay.post("/api/v1/onboarding/connector/verify");
    assert_eq!(s, 200, "{v:#}");
    assert_eq!(v["verification"]["ok"], true);
    assert_eq!(v["summary"]["delivered"], 1);
    let (_, steps) = relay.get("/api/v1/onboarding");
    assert_eq!(step(&steps, "connector")["state"], "done");
    assert_eq!(step(&steps, "mail_flowing")["state"], "done");
}

#[test]
fn platform_instructions_carry_the_real_values() {
    let dir = tmpdir("instructions");
    let dns = dns();
    let relay = onboarding_relay(&dir, &dns, "127.0.0.1:2", "[\"127.0.0.0/8\"]");
    let port = relay.smtp.port().to_string();
    for platform in ["exchange", "o365", "gsuite"] {
        let (s, v) = relay.get(&format!(
            "/api/v1/onboarding/instructions?platform={platform}"
        ));
        assert_eq!(s, 200);
        let text = v["text"].as_str().unwrap();
        assert!(text.contains("relay.test"), "{platform}: {text}");
        assert!(text.contains(&port), "{platform}: {text}");
        let broken = v["spf"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["domain"] == "broken.test")
            .unwrap();
        assert_eq!(
            broken["record"],
            "v=spf1 include:eu._netblocks.mimecast.com ip4:192.0.2.10 ~all"
        );
        assert!(broken["share"].as_str().unwrap().contains("exactly one"));
    }
    let (_, g) = relay.get("/api/v1/onboarding/instructions?platform=gsuite");
    let steps = g["steps"].as_array().unwrap();
    assert!(steps
        .iter()
        .any(|s| s.as_str().unwrap().contains("ASPMX.L.GOOGLE.COM")));
    assert_eq!(
        steps
            .iter()
            .filter(|s| s.as_str().unwrap().contains("rule"))
            .count(),
        2,
        "two routing rules"
    );
    let (_, o) = relay.get("/api/v1/onboarding/instructions?platform=o365");
    assert!(o["text"].as_str().unwrap().contains("port 25 only"));
    assert_eq!(
        relay
            .get("/api/v1/onboarding/instructions?platform=lotus")
            .0,
        400
    );
}

#[test]
fn admin_token_rules() {
    let dir = tmpdir("token");
    let cfg = Cfg::new(&dir, "127.0.0.1:2").set("admin", "token", "\"s3cret-token\"");
    let relay = Relay::start(&cfg);
    assert_eq!(http("GET", &relay.url("/api/v1/queue"), None).0, 401);
    assert_eq!(
        http("GET", &relay.url("/api/v1/queue"), Some("wrong")).0,
        401
    );
    // A wrong token makes the client wait a little (sign-in back-off), then the right
    // one is taken.
    assert_eq!(
        http("GET", &relay.url("/api/v1/queue"), Some("s3cret-token")).0,
        429
    );
    assert!(wait_until(Duration::from_secs(5), || http(
        "GET",
        &relay.url("/api/v1/queue"),
        Some("s3cret-token")
    )
    .0 == 200));
    assert_eq!(http("GET", &relay.url("/metrics"), None).0, 401);
    assert_eq!(http("GET", &relay.url("/healthz"), None).0, 200);
    // A non-loopback admin listener without a token is refused at start.
    let dir2 = tmpdir("token-required");
    let bad = Cfg::new(&dir2, "127.0.0.1:2").set("admin", "listen", "\"0.0.0.0:0\"");
    let out = Command::new(bin())
        .args(["check-config", "--config"])
        .arg(bad.write())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin.token"));
}
