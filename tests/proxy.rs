//! The PROXY protocol on the SMTP listener, from outside: a trusted balancer's v1 and
//! v2 headers name the client for the allowlist, the per-IP limit, the observed sources
//! and `Received:`; a v2 LOCAL health check gets the greeting and is no source; a
//! trusted peer without a header is closed; an untrusted peer's header is not believed.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use support::*;

const T: Duration = Duration::from_secs(20);
const BALANCER: &str = "127.0.0.1";

fn ip(t: &str) -> IpAddr {
    t.parse().unwrap()
}

fn v2(command: u8, client: Option<SocketAddr>) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x20 | command);
    match client {
        Some(SocketAddr::V4(a)) => {
            h.push(0x11);
            h.extend_from_slice(&12u16.to_be_bytes());
            h.extend_from_slice(&a.ip().octets());
            h.extend_from_slice(&[127, 0, 0, 1]);
            h.extend_from_slice(&a.port().to_be_bytes());
            h.extend_from_slice(&25u16.to_be_bytes());
        }
        _ => {
            h.push(0x00);
            h.extend_from_slice(&0u16.to_be_bytes());
        }
    }
    h
}

fn start(dir: &std::path::Path, up: &Upstream, extra: &[(&str, &str, &str)]) -> Relay {
    let mut cfg = Cfg::new(dir, &up.addr())
        .set("access", "allowed_ranges", "[\"127.0.0.0/8\"]")
        .set(
            "server.proxy_protocol",
            "trusted",
            &format!("[\"{BALANCER}/32\"]"),
        )
        .set("server.proxy_protocol", "timeout", "\"500ms\"");
    for (s, k, v) in extra {
        cfg = cfg.set(s, k, v);
    }
    Relay::start(&cfg)
}

fn sources(relay: &Relay) -> Vec<String> {
    let (_, v) = relay.get("/api/v1/onboarding/outbound-ips");
    v["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["ip"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_client_a_trusted_header_names_is_the_client() {
    let dir = tmpdir("proxy-client");
    let up = Upstream::start(&dir, &[]);
    let relay = start(&dir, &up, &[("server", "max_connections_per_ip", "1")]);

    // v1 for 127.0.0.5: admitted, and it is 127.0.0.5 in Received: and the sources.
    let mut c = Smtp::connect_from(ip(BALANCER), relay.smtp);
    c.send(b"PROXY TCP4 127.0.0.5 127.0.0.1 40000 25\r\n");
    c.greet();
    queued_id(&c.mail(
        "alice@example.test",
        &["bob@partner.test"],
        "Subject: via v1\r\n\r\nx",
    ));
    // The per-IP limit counts the named client: a second session for it is refused,
    // one for another client (over v2) is not.
    let mut same = Smtp::connect_from(ip(BALANCER), relay.smtp);
    same.send(b"PROXY TCP4 127.0.0.5 127.0.0.1 40001 25\r\n");
    assert_eq!(same.reply().code, 421);
    let mut other = Smtp::connect_from(ip(BALANCER), relay.smtp);
    other.send(&v2(1, Some("127.0.0.6:40002".parse().unwrap())));
    other.greet();
    queued_id(&other.mail(
        "alice@example.test",
        &["carol@partner.test"],
        "Subject: via v2\r\n\r\nx",
    ));

    let got = up.wait_messages(2, T);
    assert_eq!(got.len(), 2);
    for (client, (_, data)) in ["127.0.0.5", "127.0.0.6"].iter().zip(&got) {
        let text = String::from_utf8_lossy(data);
        let received = text.lines().next().unwrap();
        assert!(
            received.contains(&format!("[{client}]")),
            "{client}: {received}"
        );
    }
    assert!(wait_until(T, || {
        let seen = sources(&relay);
        seen.contains(&"127.0.0.5".to_string()) && seen.contains(&"127.0.0.6".to_string())
    }));
    let seen = sources(&relay);
    assert!(
        !seen.contains(&BALANCER.to_string()),
        "the balancer is no source: {seen:?}"
    );
}

#[test]
fn a_named_client_outside_the_ranges_gets_554() {
    let dir = tmpdir("proxy-outside");
    let up = Upstream::start(&dir, &[]);
    let relay = start(&dir, &up, &[]);
    let mut c = Smtp::connect_from(ip(BALANCER), relay.smtp);
    c.send(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n");
    let r = c.reply();
    assert_eq!(r.code, 554, "{r:?}");
    assert!(r.text().contains("192.0.2.7"), "{r:?}");
    let mut c = Smtp::connect_from(ip(BALANCER), relay.smtp);
    c.send(&v2(1, Some("192.0.2.8:40000".parse().unwrap())));
    assert_eq!(c.reply().code, 554);
}

#[test]
fn local_health_checks_get_the_greeting_and_are_no_source() {
    let dir = tmpdir("proxy-local");
    let up = Upstream::start(&dir, &[]);
    let relay = start(&dir, &up, &[]);
    for _ in 0..3 {
        let mut c = Smtp::connect_from(ip(BALANCER), relay.smtp);
        c.send(&v2(0, None));
        assert_eq!(c.reply().code, 220);
        c.expect("EHLO haproxy", 250);
        c.expect("QUIT", 221);
        assert!(c.closed());
    }
    assert_eq!(
        relay.metric("smartrelay_proxy_health_checks_total"),
        Some(3.0)
    );
    assert!(sources(&relay).is_empty(), "{:?}", sources(&relay));
}

#[test]
fn a_trusted_peer_without_a_header_is_closed_and_counted() {
    let dir = tmpdir("proxy-missing");
    let up = Upstream::start(&dir, &[]);
    let relay = start(&dir, &up, &[]);
    // Silent: closed at the timeout, nothing said.
    let mut silent = Smtp::connect_from(ip(BALANCER), relay.smtp);
    assert!(silent.try_reply().is_none());
    // Plain SMTP instead of a header: closed at once.
    let mut plain = Smtp::connect_from(ip(BALANCER), relay.smtp);
    plain.send(b"EHLO client.test\r\n");
    assert!(plain.try_reply().is_none());
    assert_eq!(
        relay.metric("smartrelay_proxy_header_failures_total{reason=\"timeout\"}"),
        Some(1.0)
    );
    assert_eq!(
        relay.metric("smartrelay_proxy_header_failures_total{reason=\"invalid\"}"),
        Some(1.0)
    );
    assert!(relay.wait_log(T, |l| {
        l["message"] == "connection from a trusted balancer closed: no valid PROXY header"
            && l["balancer"] == BALANCER
    }));
}

/// From a peer that is not a trusted balancer, a PROXY header is a bad command: the
/// session stays the peer's own, and the header changes nothing.
#[test]
fn an_untrusted_peers_header_is_not_believed() {
    let dir = tmpdir("proxy-untrusted");
    let up = Upstream::start(&dir, &[]);
    let relay = start(&dir, &up, &[]);
    let mut c = Smtp::connect_from(ip("127.0.0.2"), relay.smtp);
    assert_eq!(c.reply().code, 220);
    let r = c.cmd("PROXY TCP4 127.0.0.9 127.0.0.1 40000 25");
    assert_eq!(r.code, 500, "{r:?}");
    c.expect("EHLO client.test", 250);
    queued_id(&c.mail(
        "alice@example.test",
        &["bob@partner.test"],
        "Subject: own address\r\n\r\nx",
    ));
    let got = up.wait_messages(1, T);
    let text = String::from_utf8_lossy(&got[0].1);
    assert!(
        text.lines().next().unwrap().contains("[127.0.0.2]"),
        "{text}"
    );
    let seen = sources(&relay);
    assert!(!seen.contains(&"127.0.0.9".to_string()), "{seen:?}");
}
