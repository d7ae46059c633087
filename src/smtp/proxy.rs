//! The PROXY protocol (HAProxy's, v1 text and v2 binary) on connections from trusted
//! load balancers: the client the header names is the client, for the allowlist, the
//! limits, the observed sources, the logs and `Received:`.
//!
//! Framing is ours and exact (the header is read to its last octet and not one further,
//! so the SMTP stream after it is untouched); the header itself is parsed by `ppp`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ppp::{v1, v2, HeaderResult, PartialResult};
use tokio::io::{AsyncRead, AsyncReadExt};

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// RFC-like bound from the spec: a v1 line is at most 107 octets with its CRLF.
const V1_MAX: usize = 107;
/// v2 headers carry TLVs (unique id, TLS details); more than this is no balancer's.
pub const V2_MAX: usize = 4096;

/// What the header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Relayed for this client.
    Client(SocketAddr),
    /// The balancer's own connection (v2 `LOCAL`, v1 `UNKNOWN`, or an address family
    /// other than IP): a health check, never a source.
    Local,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("no PROXY header within {0:?}")]
    Timeout(Duration),
    #[error("connection closed before the PROXY header was complete")]
    Closed,
    #[error("not a valid PROXY header: {0}")]
    Invalid(String),
}

/// How many more octets the header needs, given what has been read: `Ok(0)` when
/// `buf` holds exactly one whole header. Never asks past the header's end.
pub fn needed(buf: &[u8]) -> Result<usize, ProxyError> {
    let invalid = |m: &str| Err(ProxyError::Invalid(m.to_string()));
    // Both forms are at least 15 octets ("PROXY UNKNOWN\r\n"); 12 decide which.
    if buf.len() < 12 {
        let matches = |sig: &[u8]| buf.iter().zip(sig).all(|(a, b)| a == b);
        let prefix_ok = matches(V2_SIGNATURE) || matches(b"PROXY ");
        return if prefix_ok {
            Ok(12 - buf.len())
        } else {
            invalid("neither a v1 nor a v2 signature")
        };
    }
    if buf.starts_with(V2_SIGNATURE) {
        let Some(len) = buf.get(14..16) else {
            return Ok(16 - buf.len());
        };
        let total = 16 + usize::from(u16::from_be_bytes([len[0], len[1]]));
        if total > V2_MAX {
            return invalid("v2 header longer than 4096 octets");
        }
        return Ok(total.saturating_sub(buf.len()));
    }
    if !buf.starts_with(b"PROXY ") {
        return invalid("neither a v1 nor a v2 signature");
    }
    if buf.ends_with(b"\r\n") {
        return Ok(0);
    }
    if buf.len() >= V1_MAX {
        return invalid("v1 line longer than 107 octets");
    }
    // One octet at a time: the CRLF may come at any point.
    Ok(1)
}

/// Parses one whole header (as framed by `needed`).
pub fn parse(header: &[u8]) -> Result<Source, ProxyError> {
    let invalid = |e: String| ProxyError::Invalid(e);
    let result = HeaderResult::parse(header);
    if result.is_incomplete() {
        return Err(invalid("incomplete".into()));
    }
    match result {
        HeaderResult::V2(Ok(h)) => {
            if h.len() != header.len() {
                return Err(invalid("trailing octets after the v2 header".into()));
            }
            if h.command == v2::Command::Local {
                return Ok(Source::Local);
            }
            Ok(match h.addresses {
                v2::Addresses::IPv4(a) => {
                    Source::Client(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
                }
                v2::Addresses::IPv6(a) => {
                    Source::Client(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
                }
                v2::Addresses::Unspecified | v2::Addresses::Unix(_) => Source::Local,
            })
        }
        HeaderResult::V2(Err(e)) => Err(invalid(e.to_string())),
        HeaderResult::V1(Ok(h)) => {
            if h.header.len() != header.len() {
                return Err(invalid("trailing octets after the v1 line".into()));
            }
            Ok(match h.addresses {
                v1::Addresses::Tcp4(a) => {
                    Source::Client(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
                }
                v1::Addresses::Tcp6(a) => {
                    Source::Client(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
                }
                v1::Addresses::Unknown => Source::Local,
            })
        }
        HeaderResult::V1(Err(e)) => Err(invalid(e.to_string())),
    }
}

/// Reads exactly one header from the start of `stream`, within `timeout`.
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> Result<Source, ProxyError> {
    let read = async {
        let mut buf = Vec::with_capacity(64);
        loop {
            let more = needed(&buf)?;
            if more == 0 {
                return parse(&buf);
            }
            let start = buf.len();
            buf.resize(start + more, 0);
            let slice = buf.get_mut(start..).ok_or(ProxyError::Closed)?;
            stream
                .read_exact(slice)
                .await
                .map_err(|_| ProxyError::Closed)?;
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| ProxyError::Timeout(timeout))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, addresses: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        let len = (addresses.len() + tlvs.len()) as u16;
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(addresses);
        h.extend_from_slice(tlvs);
        h
    }

    fn frame_and_parse(input: &[u8]) -> Result<(Source, usize), ProxyError> {
        let mut buf = Vec::new();
        loop {
            let more = needed(&buf)?;
            if more == 0 {
                return parse(&buf).map(|s| (s, buf.len()));
            }
            let end = buf.len() + more;
            let Some(chunk) = input.get(buf.len()..end) else {
                return Err(ProxyError::Closed);
            };
            buf.extend_from_slice(chunk);
        }
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let line = b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 25\r\nEHLO x\r\n";
        let (s, n) = frame_and_parse(line).unwrap();
        assert_eq!(s, Source::Client("192.0.2.7:40000".parse().unwrap()));
        assert_eq!(&line[n..], b"EHLO x\r\n", "stops at the header's end");
        let (s, _) = frame_and_parse(b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 25\r\n").unwrap();
        assert_eq!(s, Source::Client("[2001:db8::7]:40000".parse().unwrap()));
        assert_eq!(
            frame_and_parse(b"PROXY UNKNOWN\r\n").unwrap().0,
            Source::Local
        );
    }

    #[test]
    fn v2_proxy_and_local() {
        let mut addr = vec![192, 0, 2, 9, 10, 0, 0, 1];
        addr.extend_from_slice(&40001u16.to_be_bytes());
        addr.extend_from_slice(&25u16.to_be_bytes());
        let tlv = [0x05, 0x00, 0x02, b'i', b'd'];
        let mut input = v2(1, 0x11, &addr, &tlv);
        let header_len = input.len();
        input.extend_from_slice(b"QUIT\r\n");
        let (s, n) = frame_and_parse(&input).unwrap();
        assert_eq!(s, Source::Client("192.0.2.9:40001".parse().unwrap()));
        assert_eq!(n, header_len);
        assert_eq!(
            frame_and_parse(&v2(0, 0x00, &[], &[])).unwrap().0,
            Source::Local
        );
    }

    #[test]
    fn garbage_and_bounds_are_refused() {
        assert!(matches!(needed(b"EHLO"), Err(ProxyError::Invalid(_))));
        assert!(matches!(needed(b"PROXY TCP4 1.2.3.4"), Ok(1)));
        let long = [b"PROXY ".as_slice(), &[b'1'; 120]].concat();
        assert!(frame_and_parse(&long).is_err());
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(matches!(needed(&huge), Err(ProxyError::Invalid(_))));
        assert!(frame_and_parse(b"PROXY TCP4 999.0.2.7 10.0.0.1 1 25\r\n").is_err());
        assert!(frame_and_parse(b"PROXY TCP4 192.0.2.7 10.0.0.1 1\r\n").is_err());
        assert!(frame_and_parse(&v2(1, 0x11, &[1, 2, 3], &[])).is_err());
    }

    #[tokio::test]
    async fn reads_from_a_stream_and_times_out() {
        let (mut client, mut server) = tokio::io::duplex(256);
        use tokio::io::AsyncWriteExt;
        client
            .write_all(b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 25\r\nEHLO")
            .await
            .unwrap();
        let s = read_header(&mut server, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(s, Source::Client("192.0.2.7:40000".parse().unwrap()));
        let mut rest = [0u8; 4];
        server.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"EHLO");
        let (_c, mut silent) = tokio::io::duplex(16);
        assert_eq!(
            read_header(&mut silent, Duration::from_millis(20)).await,
            Err(ProxyError::Timeout(Duration::from_millis(20)))
        );
    }
}
