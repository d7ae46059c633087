//! A TXT question asked and answered without hickory's message decoder, for the one
//! answer it refuses whole: a record with empty RDATA ("a TXT record with no strings",
//! which outside a dynamic update it reads as malformed). RFC 7208 §4.5 only asks to
//! skip records that are not SPF policies, so such an answer must not turn into a
//! temperror for the policy beside it. The records are still read with hickory's own
//! record decoder, one by one; only the whole-message check is left out.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use hickory_resolver::proto::serialize::binary::{BinDecodable, BinDecoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::dns::{DnsFailure, TxtAnswer};

/// The most a UDP answer is read into (EDNS is not offered, so 512 is the rule;
/// some servers send more).
const UDP_BUFFER: usize = 4096;
/// The most a TCP answer may claim (its two-octet length prefix).
const TCP_MAX: usize = 65_535;

/// What one answer said.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    Answer(TxtAnswer),
    /// The TC bit: ask again over TCP.
    Truncated,
    /// The answer to another question (another ID): not this one.
    Stray,
}

/// The query to send.
pub fn question(id: u16, name: &Name) -> Result<Vec<u8>, DnsFailure> {
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(name.clone(), RecordType::TXT));
    msg.to_vec()
        .map_err(|e| DnsFailure::Other(format!("cannot encode the TXT question: {e}")))
}

/// Reads the TXT records of an answer to query `id`. A record with empty RDATA is a
/// TXT record with no strings; records of other types (a CNAME chain) are skipped.
pub fn parse(response: &[u8], id: u16) -> Result<Parsed, DnsFailure> {
    let malformed = |why: String| DnsFailure::Other(format!("malformed DNS answer: {why}"));
    let mut decoder = BinDecoder::new(response);
    let header = hickory_resolver::proto::op::Header::read(&mut decoder)
        .map_err(|e| malformed(e.to_string()))?;
    let meta = header.metadata;
    if meta.id != id || meta.message_type != MessageType::Response {
        return Ok(Parsed::Stray);
    }
    if meta.truncation {
        return Ok(Parsed::Truncated);
    }
    match meta.response_code {
        ResponseCode::NoError => {}
        ResponseCode::NXDomain => return Err(DnsFailure::NxDomain),
        other => return Err(DnsFailure::Other(format!("DNS answer: {other}"))),
    }
    for _ in 0..header.counts.queries {
        Query::read(&mut decoder).map_err(|e| malformed(e.to_string()))?;
    }
    let mut records = Vec::new();
    let mut ttl = u32::MAX;
    for _ in 0..header.counts.answers {
        let record = Record::read(&mut decoder).map_err(|e| malformed(e.to_string()))?;
        if record.record_type() != RecordType::TXT {
            continue;
        }
        ttl = ttl.min(record.ttl);
        match &record.data {
            RData::TXT(txt) => records.push(txt.txt_data.iter().map(|s| s.to_vec()).collect()),
            // Empty RDATA: no character-string at all.
            RData::Update0(_) => records.push(Vec::new()),
            _ => {}
        }
    }
    if records.is_empty() {
        return Err(DnsFailure::NoData);
    }
    Ok(Parsed::Answer(TxtAnswer { records, ttl }))
}

/// Asks `server` over UDP, and over TCP when the answer was truncated.
pub async fn txt(
    server: SocketAddr,
    name: &Name,
    timeout: Duration,
) -> Result<TxtAnswer, DnsFailure> {
    let id: u16 = rand_id();
    let question = question(id, name)?;
    let io = |e: std::io::Error| DnsFailure::Other(format!("DNS to {server}: {e}"));
    let exchange = async {
        let bind: SocketAddr = if server.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let udp = tokio::net::UdpSocket::bind(bind).await.map_err(io)?;
        udp.connect(server).await.map_err(io)?;
        udp.send(&question).await.map_err(io)?;
        let mut buf = vec![0u8; UDP_BUFFER];
        loop {
            let n = udp.recv(&mut buf).await.map_err(io)?;
            // A stray datagram for another question is not this answer: wait on.
            match parse(buf.get(..n).unwrap_or_default(), id) {
                Ok(Parsed::Answer(a)) => return Ok(a),
                Ok(Parsed::Truncated) => break,
                Ok(Parsed::Stray) => continue,
                Err(e) => return Err(e),
            }
        }
        let mut tcp = tokio::net::TcpStream::connect(server).await.map_err(io)?;
        let len = u16::try_from(question.len())
            .map_err(|_| DnsFailure::Other("question too long".into()))?;
        tcp.write_all(&len.to_be_bytes()).await.map_err(io)?;
        tcp.write_all(&question).await.map_err(io)?;
        let mut prefix = [0u8; 2];
        tcp.read_exact(&mut prefix).await.map_err(io)?;
        let len = usize::from(u16::from_be_bytes(prefix)).min(TCP_MAX);
        let mut answer = vec![0u8; len];
        tcp.read_exact(&mut answer).await.map_err(io)?;
        match parse(&answer, id)? {
            Parsed::Answer(a) => Ok(a),
            Parsed::Truncated | Parsed::Stray => {
                Err(DnsFailure::Other("no usable answer over TCP".into()))
            }
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| DnsFailure::Timeout)?
}

/// A query ID nobody on the path can predict (RFC 5452), from the OS's generator.
fn rand_id() -> u16 {
    let mut b = [0u8; 2];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_err() {
        return 0x5a5a;
    }
    u16::from_be_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_resolver::proto::rr::rdata::TXT;

    fn answer(id: u16, records: Vec<RData>, truncated: bool) -> Vec<u8> {
        let name = Name::from_ascii("example.test.").unwrap();
        let mut msg = Message::new(id, MessageType::Response, OpCode::Query);
        msg.metadata.truncation = truncated;
        msg.add_query(Query::query(name.clone(), RecordType::TXT));
        for r in records {
            msg.add_answer(Record::from_rdata(name.clone(), 300, r));
        }
        msg.to_vec().unwrap()
    }

    #[test]
    fn an_empty_txt_record_reads_as_no_strings() {
        let bytes = answer(
            7,
            vec![
                RData::TXT(TXT::new(vec!["v=spf1 -all".into()])),
                RData::TXT(TXT::new(Vec::new())),
            ],
            false,
        );
        // hickory's message decoder refuses this answer whole.
        assert!(Message::from_vec(&bytes).is_err());
        let Parsed::Answer(a) = parse(&bytes, 7).unwrap() else {
            panic!("not an answer")
        };
        assert_eq!(a.records, vec![vec![b"v=spf1 -all".to_vec()], Vec::new()]);
        assert_eq!(a.ttl, 300);
    }

    #[test]
    fn the_id_truncation_and_garbage_are_checked() {
        let bytes = answer(7, vec![RData::TXT(TXT::new(vec!["x".into()]))], false);
        assert_eq!(parse(&bytes, 8).unwrap(), Parsed::Stray);
        assert_eq!(
            parse(&answer(9, Vec::new(), true), 9).unwrap(),
            Parsed::Truncated
        );
        assert_eq!(
            parse(&answer(9, Vec::new(), false), 9),
            Err(DnsFailure::NoData)
        );
        for cut in 0..bytes.len() {
            let _ = parse(&bytes[..cut], 7);
        }
    }
}
