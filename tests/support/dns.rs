//! A real authoritative DNS server (hickory-server) on 127.0.0.1, serving zones given as
//! zone-file text, over UDP and TCP. Names containing "slow" are never answered, so
//! timeouts can be tested against a live server. Every question asked is logged, so a
//! test can count what the relay looked up.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_server::proto::rr::{LowerName, Name};
use hickory_server::proto::serialize::txt::Parser;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};
use hickory_server::Server;

pub struct Dns {
    pub addr: SocketAddr,
    stop: Option<std::sync::mpsc::Sender<()>>,
    asked: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Dns {
    /// `zones`: (origin, records without SOA). `$ORIGIN` and an SOA are added.
    pub fn start(zones: &[(&str, &str)]) -> Dns {
        Dns::serve(zones, None)
    }

    /// The same on a given address, e.g. that of a server just dropped, so that a relay
    /// configured with it sees the zones change. Retries while the old socket closes.
    #[allow(dead_code)]
    pub fn start_on(addr: SocketAddr, zones: &[(&str, &str)]) -> Dns {
        Dns::serve(zones, Some(addr))
    }

    /// The names asked so far, in order (lower case, with the final dot).
    #[allow(dead_code)]
    pub fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }

    fn serve(zones: &[(&str, &str)], fixed: Option<SocketAddr>) -> Dns {
        let mut catalog = Catalog::new();
        for (origin, body) in zones {
            // "." is the root zone: it makes every name outside the others NXDOMAIN.
            let fqdn = format!("{}.", origin.trim_end_matches('.')).replace("..", ".");
            let fqdn = if fqdn == "." {
                fqdn
            } else {
                fqdn.trim_start_matches('.').to_string()
            };
            let soa_host = if fqdn == "." {
                "root.".to_string()
            } else {
                fqdn.clone()
            };
            // `@raw<TAB>LABELS<TAB>TYPE<TAB>DATA` lines: what a zone file cannot write but
            // DNS carries. Names whose labels hold ':', '/' or ' ' (TYPE A, DATA an
            // address; TYPE MX, DATA "preference labels", the exchange below the
            // origin), and a TXT record with no character-string at all (TYPE TXT,
            // DATA empty), added beside the owner's other TXT records.
            let (raw, body): (Vec<&str>, Vec<&str>) =
                body.lines().partition(|l| l.starts_with("@raw\t"));
            let body = body.join("\n");
            let text = format!(
                "$ORIGIN {fqdn}\n$TTL 60\n@ IN SOA ns.{soa_host} hostmaster.{soa_host} 1 3600 600 86400 60\n{body}\n"
            );
            let origin = fqdn.as_str();
            let name = Name::from_ascii(&fqdn).unwrap();
            let (parsed_origin, records): (Name, BTreeMap<_, _>) =
                Parser::new(text.as_str(), None, Some(name.clone()))
                    .parse()
                    .unwrap_or_else(|e| panic!("zone {origin}: {e}"));
            let mut records = records;
            let below = |labels: &str| {
                let mut all: Vec<&[u8]> = if labels == "@" {
                    Vec::new()
                } else {
                    labels.split('.').map(str::as_bytes).collect()
                };
                all.extend(
                    fqdn.trim_end_matches('.')
                        .split('.')
                        .filter(|l| !l.is_empty())
                        .map(str::as_bytes),
                );
                Name::from_labels(all).unwrap()
            };
            use hickory_server::proto::rr::{rdata, RData, RecordSet, RecordType, RrKey};
            for line in raw {
                let parts: Vec<&str> = line.split('\t').collect();
                let [_, labels, kind, data] = parts.as_slice() else {
                    panic!("`{line}`: want @raw<TAB>labels<TAB>TYPE<TAB>data");
                };
                let owner = below(labels);
                let (rtype, rdata) = match *kind {
                    "A" => (RecordType::A, RData::A(data.parse().unwrap())),
                    "MX" => {
                        let (pref, exchange) = data.split_once(' ').unwrap();
                        (
                            RecordType::MX,
                            RData::MX(rdata::MX::new(pref.parse().unwrap(), below(exchange))),
                        )
                    }
                    "TXT" => (RecordType::TXT, RData::TXT(rdata::TXT::new(Vec::new()))),
                    other => panic!("@raw type {other}"),
                };
                let record =
                    hickory_server::proto::rr::Record::from_rdata(owner.clone(), 60, rdata);
                records
                    .entry(RrKey::new(LowerName::new(&owner), rtype))
                    .or_insert_with(|| RecordSet::new(owner.clone(), rtype, 0))
                    .insert(record, 0);
            }
            let handler =
                InMemoryZoneHandler::<hickory_server::net::runtime::TokioRuntimeProvider>::new(
                    parsed_origin,
                    records,
                    ZoneType::Primary,
                    AxfrPolicy::Deny,
                )
                .unwrap();
            catalog.upsert(LowerName::new(&name), vec![Arc::new(handler)]);
        }
        let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = asked.clone();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                // UDP and TCP on one port number: the TCP port may be taken by
                // someone else, so pick again until both are free.
                let mut tries = 0;
                let (udp, tcp, addr) = loop {
                    tries += 1;
                    assert!(tries < 100, "no port for the DNS server ({fixed:?})");
                    let want = fixed.unwrap_or_else(|| "127.0.0.1:0".parse().unwrap());
                    let Ok(udp) = tokio::net::UdpSocket::bind(want).await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let addr = udp.local_addr().unwrap();
                    if let Ok(tcp) = tokio::net::TcpListener::bind(addr).await {
                        break (udp, tcp, addr);
                    }
                    if fixed.is_some() {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                };
                let mut server = Server::new(Slow(catalog, log));
                server.register_socket(udp);
                server.register_listener(tcp, Duration::from_secs(5), 65_535);
                addr_tx.send(addr).unwrap();
                let stop = tokio::task::spawn_blocking(move || {
                    let _ = stop_rx.recv();
                });
                tokio::select! {
                    _ = server.block_until_done() => {}
                    _ = stop => {}
                }
            });
        });
        Dns {
            addr: addr_rx.recv().unwrap(),
            stop: Some(stop_tx),
            asked,
        }
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.stop.take();
    }
}

/// Answers through the catalog, except for names with "slow" in them; logs each name.
struct Slow(Catalog, Arc<std::sync::Mutex<Vec<String>>>);

#[async_trait::async_trait]
impl RequestHandler for Slow {
    async fn handle_request<R: ResponseHandler, T: hickory_server::net::runtime::Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        if let Ok(info) = request.request_info() {
            let name = info.query.name().to_string().to_ascii_lowercase();
            self.1.lock().unwrap().push(name);
            if info.query.name().to_string().contains("slow") {
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
        }
        self.0
            .handle_request::<R, T>(request, response_handle)
            .await
    }
}

/// A server that accepts queries and never answers (UDP and TCP).
pub struct Silent {
    pub addr: SocketAddr,
    _udp: std::net::UdpSocket,
    _tcp: std::net::TcpListener,
}

impl Silent {
    pub fn start() -> Silent {
        loop {
            let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let addr = udp.local_addr().unwrap();
            if let Ok(tcp) = std::net::TcpListener::bind(addr) {
                return Silent {
                    addr,
                    _udp: udp,
                    _tcp: tcp,
                };
            }
        }
    }
}
