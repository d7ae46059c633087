//! One mail transaction on an open session, with a reply per recipient. mail-send's
//! `send()` stops at the first refused RCPT; here every RCPT is answered on its own, the
//! commands are pipelined when the upstream allows it, and the message goes byte for byte.

use bytes::Bytes;
use smtp_proto::{
    EXT_8BIT_MIME, EXT_BINARY_MIME, EXT_CHUNKING, EXT_DSN, EXT_PIPELINING, EXT_SIZE, EXT_SMTP_UTF8,
};

use super::connection::{error_of, reply_of, ClientSettings, Connection, UpstreamError};
use crate::envelope::{BodyType, Envelope, Reply, Ret};

/// What a transaction left behind.
#[derive(Debug)]
pub struct TxOutcome {
    /// One reply per recipient, in the order given.
    pub replies: Vec<(usize, Reply)>,
    /// The session can carry another message.
    pub reusable: bool,
    /// DSN parameters went upstream with the message.
    pub dsn_passed: bool,
}

/// `Err` means nothing was handed over and the session is dead: the recipients can be
/// tried on another host. Once the body has gone out, failures become temporary
/// per-recipient replies instead (the upstream may have the message).
pub async fn send(
    conn: &mut Connection,
    env: &Envelope,
    data: &Bytes,
    rcpts: &[usize],
    s: &ClientSettings,
) -> Result<TxOutcome, UpstreamError> {
    if let Some(reply) = cannot_carry(conn, env, data) {
        return Ok(TxOutcome {
            replies: rcpts.iter().map(|&i| (i, reply.clone())).collect(),
            reusable: true,
            dsn_passed: false,
        });
    }
    let bdat = env.body == BodyType::BinaryMime;
    let pipelining = conn.has(EXT_PIPELINING);
    let mut cmds = Vec::with_capacity(rcpts.len() + 2);
    cmds.push(format!(
        "MAIL FROM:<{}>{}\r\n",
        env.sender,
        mail_params(conn, env, data)
    ));
    for &i in rcpts {
        let r = &env.recipients[i];
        cmds.push(format!(
            "RCPT TO:<{}>{}\r\n",
            r.address,
            rcpt_params(conn, r)
        ));
    }
    let data_pipelined = pipelining && !bdat;
    if data_pipelined {
        cmds.push("DATA\r\n".into());
    }
    conn.client.timeout = s.command_timeout;
    let replies: Vec<Reply> = if pipelining {
        conn.client
            .cmds(cmds.iter())
            .await
            .map_err(|e| error_of(e, "MAIL/RCPT"))?
            .iter()
            .map(reply_of)
            .collect()
    } else {
        let mut out = Vec::with_capacity(cmds.len());
        for (k, c) in cmds.iter().enumerate() {
            let r = reply_of(
                &conn
                    .client
                    .cmd(c)
                    .await
                    .map_err(|e| error_of(e, "MAIL/RCPT"))?,
            );
            let mail_failed = k == 0 && !r.is_positive();
            out.push(r);
            if mail_failed {
                break;
            }
        }
        out
    };
    if let Some(closing) = replies.iter().find(|r| r.code == 421) {
        return Err(UpstreamError::Refused(closing.clone()));
    }
    let mail = &replies[0];
    if !mail.is_positive() {
        let failed = rcpts.iter().map(|&i| (i, mail.clone())).collect();
        return Ok(abort(
            conn,
            data_pipelined.then(|| replies.last()).flatten(),
            failed,
        )
        .await);
    }
    let mut out = Vec::with_capacity(rcpts.len());
    let mut accepted = Vec::new();
    for (k, &i) in rcpts.iter().enumerate() {
        let r = replies
            .get(k + 1)
            .cloned()
            .unwrap_or_else(|| Reply::new(451, "4.4.0", "no reply to RCPT"));
        if r.is_positive() {
            accepted.push(i);
        } else {
            out.push((i, r));
        }
    }
    if accepted.is_empty() {
        let data_reply = data_pipelined.then(|| replies.last()).flatten();
        return Ok(abort(conn, data_reply, out).await);
    }
    if s.cut.is_cancelled() {
        // Shutting down past the deadline: keep the message rather than send it and
        // not wait for the answer. After a 354 only closing the session is safe.
        let stop = Reply::new(451, "4.3.2", "relay shutting down; not sent");
        out.extend(accepted.iter().map(|&i| (i, stop.clone())));
        let data_reply = data_pipelined.then(|| replies.last()).flatten();
        if data_reply.is_some_and(|r| r.code == 354) {
            return Ok(TxOutcome {
                replies: out,
                reusable: false,
                dsn_passed: false,
            });
        }
        return Ok(abort(conn, data_reply, out).await);
    }
    let final_reply = if bdat {
        body_bdat(conn, data, s).await
    } else {
        let go = if data_pipelined {
            replies
                .last()
                .cloned()
                .unwrap_or_else(|| Reply::new(451, "4.4.0", "no reply to DATA"))
        } else {
            match conn.client.cmd(b"DATA\r\n").await {
                Ok(r) => reply_of(&r),
                Err(e) => return Err(error_of(e, "DATA")),
            }
        };
        if go.code == 421 {
            return Err(UpstreamError::Refused(go));
        }
        if go.code != 354 {
            out.extend(accepted.iter().map(|&i| (i, go.clone())));
            return Ok(abort(conn, None, out).await);
        }
        body_data(conn, data, s).await
    };
    conn.messages += 1;
    let reusable = final_reply.is_ok();
    let reply = final_reply.unwrap_or_else(|e| {
        Reply::new(
            451,
            "4.4.2",
            format!("connection lost after the message was sent: {e}"),
        )
    });
    out.extend(accepted.iter().map(|&i| (i, reply.clone())));
    out.sort_by_key(|(i, _)| rcpts.iter().position(|r| r == i));
    Ok(TxOutcome {
        replies: out,
        reusable: reusable && reply.code != 421,
        dsn_passed: conn.has(EXT_DSN),
    })
}

/// A permanent refusal decided before talking: the upstream cannot take this message.
fn cannot_carry(conn: &Connection, env: &Envelope, data: &[u8]) -> Option<Reply> {
    if needs_smtputf8(env, data) && !conn.has(EXT_SMTP_UTF8) {
        return Some(Reply::new(
            550,
            "5.6.7",
            "the message needs SMTPUTF8 and the upstream does not support it",
        ));
    }
    if env.body == BodyType::BinaryMime && !(conn.has(EXT_CHUNKING) && conn.has(EXT_BINARY_MIME)) {
        return Some(Reply::new(
            554,
            "5.6.3",
            "BINARYMIME message and the upstream does not offer BINARYMIME with CHUNKING",
        ));
    }
    if conn.has(EXT_SIZE) && conn.caps.size > 0 && data.len() > conn.caps.size {
        return Some(Reply::new(
            552,
            "5.3.4",
            format!(
                "message size {} exceeds the upstream's limit {}",
                data.len(),
                conn.caps.size
            ),
        ));
    }
    None
}

/// SMTPUTF8 is needed for non-ASCII addresses or header fields, not for an 8-bit body.
fn needs_smtputf8(env: &Envelope, data: &[u8]) -> bool {
    if !env.smtputf8 {
        return false;
    }
    let header_end = data
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(data.len());
    !env.sender.is_ascii()
        || env.recipients.iter().any(|r| !r.address.is_ascii())
        || !data[..header_end].is_ascii()
}

fn mail_params(conn: &Connection, env: &Envelope, data: &[u8]) -> String {
    let mut p = String::new();
    if conn.has(EXT_SIZE) {
        p.push_str(&format!(" SIZE={}", data.len()));
    }
    match env.body {
        BodyType::EightBitMime if conn.has(EXT_8BIT_MIME) => p.push_str(" BODY=8BITMIME"),
        BodyType::BinaryMime => p.push_str(" BODY=BINARYMIME"),
        _ => {}
    }
    if needs_smtputf8(env, data) {
        p.push_str(" SMTPUTF8");
    }
    if conn.has(EXT_DSN) {
        match env.ret {
            Some(Ret::Full) => p.push_str(" RET=FULL"),
            Some(Ret::Hdrs) => p.push_str(" RET=HDRS"),
            None => {}
        }
        if let Some(envid) = &env.envid {
            p.push_str(&format!(" ENVID={envid}"));
        }
    }
    p
}

fn rcpt_params(conn: &Connection, r: &crate::envelope::Recipient) -> String {
    let mut p = String::new();
    if conn.has(EXT_DSN) {
        if let Some(n) = r.notify {
            p.push_str(&format!(" NOTIFY={}", n.keyword()));
        }
        if let Some(o) = &r.orcpt {
            p.push_str(&format!(" ORCPT={o}"));
        }
    }
    p
}

/// Ends a transaction that will not carry the message, leaving the session usable.
async fn abort(
    conn: &mut Connection,
    data_reply: Option<&Reply>,
    replies: Vec<(usize, Reply)>,
) -> TxOutcome {
    // A server that answered 354 to a pipelined DATA despite refusing every RCPT gets an
    // empty message it will refuse for lack of recipients.
    if data_reply.is_some_and(|r| r.code == 354) && conn.client.cmd(b".\r\n").await.is_err() {
        return TxOutcome {
            replies,
            reusable: false,
            dsn_passed: false,
        };
    }
    let reusable = conn.client.rset().await.is_ok();
    TxOutcome {
        replies,
        reusable,
        dsn_passed: false,
    }
}

async fn body_data(
    conn: &mut Connection,
    data: &Bytes,
    s: &ClientSettings,
) -> Result<Reply, UpstreamError> {
    // write_message appends CRLF "." CRLF; the message's own last CRLF is that CRLF.
    let body = data.strip_suffix(b"\r\n").unwrap_or(data);
    let client = &mut conn.client;
    let sent = tokio::time::timeout(s.data_timeout, async {
        client.write_message(body).await?;
        client
            .read()
            .await
            .map_err(|e| std::io::Error::other(format!("{e:?}")))
    })
    .await;
    match sent {
        Ok(Ok(r)) => Ok(reply_of(&r)),
        Ok(Err(e)) => Err(UpstreamError::Io(e.to_string())),
        Err(_) => Err(UpstreamError::Timeout("end of data")),
    }
}

async fn body_bdat(
    conn: &mut Connection,
    data: &Bytes,
    s: &ClientSettings,
) -> Result<Reply, UpstreamError> {
    conn.client.timeout = s.data_timeout;
    let r = conn.client.bdat(data).await;
    conn.client.timeout = s.command_timeout;
    match r {
        Ok(r) => Ok(reply_of(&r)),
        Err(mail_send::Error::UnexpectedReply(r)) => Ok(reply_of(&r)),
        Err(e) => Err(error_of(e, "BDAT")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use mail_send::SmtpClient;
    use smtp_proto::{EhloResponse, EXT_ENHANCED_STATUS_CODES};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, BufStream, DuplexStream};

    use crate::deliver::connection::{ClientSettings, Connection};
    use crate::deliver::stream::Stream;
    use crate::tasks::CancellationToken;

    const CMD: Duration = Duration::from_secs(300);
    const DATA: Duration = Duration::from_secs(600);

    fn settings() -> ClientSettings {
        ClientSettings {
            helo_name: "relay.test".into(),
            connect_timeout: Duration::from_secs(30),
            command_timeout: CMD,
            data_timeout: DATA,
            stopping: CancellationToken::new(),
            cut: CancellationToken::new(),
        }
    }

    /// A session already past EHLO, to a server offering `caps`, over a pipe.
    fn connection(caps: u32) -> (Connection, DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(1 << 16);
        let conn = Connection {
            client: SmtpClient {
                stream: BufStream::new(Stream::Mem(ours)),
                timeout: CMD,
            },
            caps: EhloResponse {
                hostname: "upstream.test".into(),
                capabilities: caps | EXT_ENHANCED_STATUS_CODES,
                auth_mechanisms: 0,
                deliver_by: 0,
                future_release_interval: 0,
                future_release_datetime: 0,
                mt_priority: Default::default(),
                no_soliciting: None,
                size: 0,
            },
            tls: None,
            created: tokio::time::Instant::now(),
            last_used: tokio::time::Instant::now(),
            messages: 0,
        };
        (conn, theirs)
    }

    /// What the scripted server saw: each read it got (so a pipelined batch is one
    /// entry), and the message data.
    #[derive(Default, Debug)]
    struct Seen {
        reads: Vec<String>,
        data: Vec<u8>,
    }

    /// Answers each command line with `answer(line)` and the end of data with
    /// `end_of_data` (`None`: never answers it).
    fn serve(
        mut s: DuplexStream,
        answer: impl Fn(&str) -> String + Send + 'static,
        end_of_data: Option<&'static str>,
    ) -> Arc<Mutex<Seen>> {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let record = seen.clone();
        tokio::spawn(async move {
            let mut pending = Vec::new();
            let mut in_data = false;
            let mut buf = [0u8; 4096];
            loop {
                let n = match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                record
                    .lock()
                    .unwrap()
                    .reads
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
                pending.extend_from_slice(&buf[..n]);
                let mut out = String::new();
                loop {
                    if in_data {
                        let Some(end) = pending.windows(5).position(|w| w == b"\r\n.\r\n") else {
                            break;
                        };
                        record
                            .lock()
                            .unwrap()
                            .data
                            .extend_from_slice(&pending[..end + 2]);
                        pending.drain(..end + 5);
                        in_data = false;
                        if let Some(r) = end_of_data {
                            out.push_str(&format!("{r}\r\n"));
                        }
                        continue;
                    }
                    let Some(k) = pending.iter().position(|&b| b == b'\n') else {
                        break;
                    };
                    let line: Vec<u8> = pending.drain(..=k).collect();
                    let line = String::from_utf8_lossy(&line).trim_end().to_string();
                    let reply = answer(&line);
                    in_data = reply.starts_with("354");
                    out.push_str(&format!("{reply}\r\n"));
                }
                if !out.is_empty() && s.write_all(out.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
        seen
    }

    fn envelope(rcpts: &[&str]) -> Envelope {
        Envelope::for_test("a@example.test", rcpts, 0)
    }

    fn body() -> Bytes {
        Bytes::from_static(b"Subject: t\r\n\r\nhello\r\n")
    }

    fn codes(out: &TxOutcome) -> Vec<(usize, u16)> {
        out.replies.iter().map(|(i, r)| (*i, r.code)).collect()
    }

    /// With PIPELINING, MAIL, every RCPT and DATA go in one write, and each recipient
    /// gets its own reply: the refused one its 550, the others the final 250.
    #[tokio::test]
    async fn pipelined_with_a_reply_per_recipient() {
        let (mut conn, server) = connection(EXT_PIPELINING);
        let seen = serve(
            server,
            |l| match l {
                l if l.starts_with("MAIL") => "250 2.1.0 ok".into(),
                "RCPT TO:<gone@x.test>" => "550 5.1.1 no such user".into(),
                l if l.starts_with("RCPT") => "250 2.1.5 ok".into(),
                "DATA" => "354 go".into(),
                _ => "250 ok".into(),
            },
            Some("250 2.0.0 queued as UP1"),
        );
        let env = envelope(&["b@x.test", "gone@x.test", "c@x.test"]);
        let out = send(&mut conn, &env, &body(), &[0, 1, 2], &settings())
            .await
            .unwrap();
        assert_eq!(codes(&out), [(0, 250), (1, 550), (2, 250)]);
        assert_eq!(out.replies[1].1.esc.as_deref(), Some("5.1.1"));
        assert_eq!(out.replies[0].1.text, "queued as UP1");
        assert!(out.reusable);
        let seen = seen.lock().unwrap();
        assert_eq!(
            seen.reads[0],
            "MAIL FROM:<a@example.test>\r\nRCPT TO:<b@x.test>\r\nRCPT TO:<gone@x.test>\r\nRCPT TO:<c@x.test>\r\nDATA\r\n",
            "one pipelined batch"
        );
        assert_eq!(seen.data, b"Subject: t\r\n\r\nhello\r\n");
    }

    /// Without PIPELINING each command waits for its reply.
    #[tokio::test]
    async fn one_command_at_a_time_without_pipelining() {
        let (mut conn, server) = connection(0);
        let seen = serve(
            server,
            |l| {
                if l == "DATA" {
                    "354 go".into()
                } else {
                    "250 ok".into()
                }
            },
            Some("250 done"),
        );
        let out = send(
            &mut conn,
            &envelope(&["b@x.test"]),
            &body(),
            &[0],
            &settings(),
        )
        .await
        .unwrap();
        assert_eq!(codes(&out), [(0, 250)]);
        let reads = seen.lock().unwrap().reads.clone();
        assert_eq!(reads[0], "MAIL FROM:<a@example.test>\r\n");
        assert_eq!(reads[1], "RCPT TO:<b@x.test>\r\n");
        assert_eq!(reads[2], "DATA\r\n");
    }

    /// A 5xx to DATA itself goes to every accepted recipient; the session is reset and
    /// stays usable.
    #[tokio::test]
    async fn a_permanent_refusal_at_data() {
        let (mut conn, server) = connection(EXT_PIPELINING);
        let seen = serve(
            server,
            |l| match l {
                "DATA" => "554 5.6.0 content refused".into(),
                _ => "250 ok".into(),
            },
            None,
        );
        let env = envelope(&["b@x.test", "c@x.test"]);
        let out = send(&mut conn, &env, &body(), &[0, 1], &settings())
            .await
            .unwrap();
        assert_eq!(codes(&out), [(0, 554), (1, 554)]);
        assert!(out.reusable, "RSET after the refusal");
        assert!(seen.lock().unwrap().reads.iter().any(|r| r == "RSET\r\n"));
        assert!(seen.lock().unwrap().data.is_empty());
    }

    /// A 5xx after the final dot is every recipient's permanent reply.
    #[tokio::test]
    async fn a_permanent_refusal_after_the_data() {
        let (mut conn, server) = connection(EXT_PIPELINING);
        serve(
            server,
            |l| {
                if l == "DATA" {
                    "354 go".into()
                } else {
                    "250 ok".into()
                }
            },
            Some("552 5.3.4 message too big"),
        );
        let out = send(
            &mut conn,
            &envelope(&["b@x.test"]),
            &body(),
            &[0],
            &settings(),
        )
        .await
        .unwrap();
        assert_eq!(codes(&out), [(0, 552)]);
        assert!(out.replies[0].1.is_permanent());
    }

    /// A server that takes the message and never answers the final dot: after
    /// `data_timeout` (not before), each recipient gets a temporary reply and the
    /// session is not reused.
    #[tokio::test(start_paused = true)]
    async fn no_answer_to_the_data_times_out() {
        let (mut conn, server) = connection(EXT_PIPELINING);
        serve(
            server,
            |l| {
                if l == "DATA" {
                    "354 go".into()
                } else {
                    "250 ok".into()
                }
            },
            None,
        );
        let t0 = tokio::time::Instant::now();
        let out = send(
            &mut conn,
            &envelope(&["b@x.test"]),
            &body(),
            &[0],
            &settings(),
        )
        .await
        .unwrap();
        assert_eq!(t0.elapsed(), DATA);
        assert_eq!(codes(&out), [(0, 451)]);
        assert_eq!(out.replies[0].1.esc.as_deref(), Some("4.4.2"));
        assert!(!out.reusable);
    }
}
