//! The SMTP session state machine. It takes command lines and received data and
//! returns replies and actions; it never touches a socket, and the time it stamps is
//! the `now` the caller passes (only a new queue ID reads the clock, for its
//! uniqueness), so every protocol rule is unit-testable.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;

use super::body::Body;
use super::command::{self, Command, CommandError, MailParams};
use super::data::DataError;
use super::inspect::{self, Trace};
use super::reply::{common, WireReply};
use crate::config::BareLineEndings;
use crate::envelope::{
    domain_in, BodyType, ClientInfo, Envelope, Millis, QueueId, Recipient, Reply,
};
use crate::events::{RefusedMessage, TenantProof, Unbound};
use crate::message::Data;
use crate::pipeline::{
    Backpressure, Deferral, IntakeError, SenderVerdict, Stored, Submission, Unit,
};
use crate::tenant::Verdict;

/// What a session is allowed to do; fixed per listener.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub hostname: String,
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_line_length: usize,
    pub hop_limit: usize,
    pub max_errors: u32,
    pub bare_line_endings: BareLineEndings,
    /// Sender domains that may relay (lower-case).
    pub domains: Vec<String>,
    /// `RCPT TO:<postmaster>` is delivered to postmaster at this domain.
    pub postmaster_domain: String,
    /// STARTTLS can be offered (a certificate is configured).
    pub starttls: bool,
    pub tls_required: bool,
    /// Ask the sender policy (SPF) at MAIL FROM before accepting.
    pub check_sender: bool,
    /// Count each MAIL and RCPT against the rate limits before accepting it.
    pub limits: bool,
}

impl SessionConfig {
    /// For unit tests and fuzz targets: `relay.test` relaying for `example.test`, a
    /// 1 MiB message limit, 100 recipients and RFC 5321's 512-octet lines, no TLS;
    /// callers change what their case is about.
    pub fn for_tests() -> SessionConfig {
        SessionConfig {
            hostname: "relay.test".into(),
            max_message_size: 1 << 20,
            max_recipients: 100,
            max_line_length: 512,
            hop_limit: 30,
            max_errors: 10,
            bare_line_endings: BareLineEndings::Normalize,
            domains: vec!["example.test".into()],
            postmaster_domain: "example.test".into(),
            starttls: false,
            tls_required: false,
            check_sender: false,
            limits: false,
        }
    }
}

/// What the connection driver must do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Reply(WireReply),
    /// Send the reply, then close the connection.
    Close(WireReply),
    /// Send the 220, drop any input read so far, and run the TLS handshake.
    StartTls(WireReply),
    /// Ask the sender policy about this domain, then call [`Session::sender_checked`].
    CheckSender(String),
    /// Count one more `unit` from `sender` against the rate limits, then call
    /// [`Session::counted`].
    Count {
        unit: Unit,
        sender: String,
    },
    /// Send the 354 and read a DATA body of at most `max` octets.
    ReadData {
        reply: WireReply,
        max: u64,
    },
    /// Read exactly `size` octets of a BDAT chunk; pass them on when `keep`, with
    /// their line endings made CRLF (as DATA's) unless the body is BINARYMIME.
    ReadChunk {
        size: u64,
        last: bool,
        keep: bool,
        text: bool,
    },
}

/// Where an admitted client sends from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// The organization's own servers (`access.allowed_ranges`).
    Dedicated,
    /// A platform many organizations send from (index into `access.shared_ranges`):
    /// each message needs tenant proof.
    Shared(usize),
}

/// What a finished DATA or BDAT chunk leads to: a reply, or a message to queue.
#[derive(Debug)]
pub enum Completed {
    Reply(WireReply),
    /// The message was read and refused: the reply, and what tracking keeps of it.
    Refused {
        reply: WireReply,
        message: Box<RefusedMessage>,
    },
    Submit(Box<Submission>),
    /// From a shared range: check the message's tenant proof, then call
    /// [`Session::proof_checked`].
    Prove(Box<Unproven>),
}

/// A complete message from a shared range, waiting for its tenant check.
#[derive(Debug)]
pub struct Unproven {
    tx: Transaction,
    body: Body,
    /// What the header said; read again only if the route header is taken out.
    seen: inspect::Inspection,
    source: usize,
}

impl Unproven {
    /// The message as the client sent it (our `Received:` is not there yet).
    pub fn body(&self) -> &Body {
        &self.body
    }

    pub fn source(&self) -> usize {
        self.source
    }

    pub fn sender(&self) -> &str {
        &self.tx.sender
    }

    /// The addresses the transaction accepted.
    pub fn recipients(&self) -> Vec<String> {
        self.tx
            .recipients
            .iter()
            .map(|r| r.address.clone())
            .collect()
    }
}

#[derive(Debug)]
struct Transaction {
    sender: String,
    params: MailParams,
    recipients: Vec<Recipient>,
    /// Octets of BDAT chunks so far (the driver keeps them); `Some` once the first
    /// chunk arrived.
    chunked: Option<u64>,
    /// A BDAT chunk failed: the rest of this transaction's chunks get this reply.
    failed: Option<WireReply>,
}

pub struct Session {
    cfg: Arc<SessionConfig>,
    ip: IpAddr,
    kind: SourceKind,
    tls: Option<String>,
    helo: Option<String>,
    esmtp: bool,
    tx: Option<Transaction>,
    /// MAIL FROM waiting for the sender policy's verdict or the limits' count.
    pending_mail: Option<(String, MailParams)>,
    /// RCPT TO waiting for the limits' count.
    pending_rcpt: Option<Recipient>,
    errors: u32,
    /// Why the last command was refused, when the driver counts it apart: for its
    /// metrics, which must not guess it from the reply code.
    refusal: Option<Refusal>,
}

/// A refusal the driver counts in a metric of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// MAIL before STARTTLS under `tls.require`.
    TlsRequired,
    /// MAIL while the queue takes no mail (452 4.3.1).
    Queue(Backpressure),
}

impl Session {
    pub fn new(
        cfg: Arc<SessionConfig>,
        ip: IpAddr,
        kind: SourceKind,
        tls: Option<String>,
    ) -> Session {
        Session {
            cfg,
            ip,
            kind,
            tls,
            helo: None,
            esmtp: false,
            tx: None,
            pending_mail: None,
            pending_rcpt: None,
            errors: 0,
            refusal: None,
        }
    }

    /// Why the last command was refused, when it is one the driver counts apart;
    /// reading it clears it.
    pub fn take_refusal(&mut self) -> Option<Refusal> {
        self.refusal.take()
    }

    pub fn config(&self) -> &SessionConfig {
        &self.cfg
    }

    pub fn greeting(&self) -> WireReply {
        WireReply::new(
            220,
            "",
            format!("{} ESMTP smartrelay ready", self.cfg.hostname),
        )
    }

    pub fn client_ip(&self) -> IpAddr {
        self.ip
    }

    pub fn in_transaction(&self) -> bool {
        self.tx.is_some()
    }

    /// After a STARTTLS handshake the session starts over (RFC 3207 §4.2).
    pub fn tls_established(&mut self, description: String) {
        self.tls = Some(description);
        self.helo = None;
        self.esmtp = false;
        self.tx = None;
        self.pending_mail = None;
    }

    /// The longest line the driver should buffer before calling it too long: MAIL and
    /// RCPT may exceed the base limit by the DSN allowance.
    pub fn max_buffered_line(&self) -> usize {
        self.cfg.max_line_length + 500
    }

    /// A command line that exceeded [`Self::max_buffered_line`] was discarded.
    pub fn line_too_long(&mut self) -> Action {
        self.error(common::line_too_long())
    }

    /// One command line, without its line ending. `admission` is whether the queue
    /// takes mail now.
    pub fn command(&mut self, line: &[u8], admission: Result<(), Backpressure>) -> Action {
        // RFC 5321 §4.5.3.1.4 counts the CRLF in the 512.
        let limit = self.cfg.max_line_length - 2;
        let allowance = match command::Stage::of(line) {
            command::Stage::Mail | command::Stage::Rcpt => 500,
            _ => 0,
        };
        if line.len() > limit + allowance {
            return self.error(common::line_too_long());
        }
        let cmd = match command::parse(line) {
            Ok(c) => c,
            Err(e) => return self.error(command_error_reply(&e, line)),
        };
        match cmd {
            Command::Ehlo(name) => self.hello(name, true),
            Command::Helo(name) => self.hello(name, false),
            Command::Mail { sender, params } => self.mail(sender, params, admission),
            Command::Rcpt { recipient, params } => self.rcpt(recipient, params),
            Command::Data => self.data(),
            Command::Bdat { size, last } => self.bdat(size, last),
            Command::Rset => {
                self.tx = None;
                Action::Reply(common::ok())
            }
            Command::Noop => Action::Reply(common::ok()),
            Command::Quit => Action::Close(WireReply::new(221, "2.0.0", "Bye")),
            Command::Vrfy => Action::Reply(WireReply::new(
                252,
                "2.5.2",
                "Cannot VRFY user, but will accept message and attempt delivery",
            )),
            Command::Expn => self.error(WireReply::new(502, "5.5.1", "EXPN not available")),
            Command::Help => Action::Reply(WireReply::new(
                214,
                "2.0.0",
                "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT STARTTLS",
            )),
            Command::StartTls => self.starttls(),
        }
    }

    fn hello(&mut self, name: String, esmtp: bool) -> Action {
        self.tx = None;
        self.helo = Some(name.clone());
        self.esmtp = esmtp;
        let greet = format!("{} greets {}", self.cfg.hostname, name);
        if !esmtp {
            return Action::Reply(WireReply::new(250, "", greet));
        }
        let mut lines: Vec<Cow<'static, str>> = vec![
            greet.into(),
            "PIPELINING".into(),
            format!("SIZE {}", self.cfg.max_message_size).into(),
            "8BITMIME".into(),
            "SMTPUTF8".into(),
            "ENHANCEDSTATUSCODES".into(),
        ];
        if self.cfg.starttls && self.tls.is_none() {
            lines.push("STARTTLS".into());
        }
        lines.extend(["CHUNKING".into(), "BINARYMIME".into(), "DSN".into()]);
        Action::Reply(WireReply::multi(250, lines))
    }

    fn starttls(&mut self) -> Action {
        if self.tls.is_some() {
            return self.error(common::bad_sequence("TLS already active"));
        }
        if !self.cfg.starttls {
            return self.error(WireReply::new(502, "5.5.1", "STARTTLS not available"));
        }
        if self.helo.is_none() || !self.esmtp {
            return self.error(common::bad_sequence("Send EHLO first"));
        }
        if self.tx.is_some() {
            return self.error(common::bad_sequence(
                "STARTTLS not allowed in a transaction",
            ));
        }
        Action::StartTls(WireReply::new(220, "2.0.0", "Ready to start TLS"))
    }

    fn mail(
        &mut self,
        sender: String,
        params: MailParams,
        admission: Result<(), Backpressure>,
    ) -> Action {
        if self.helo.is_none() {
            return self.error(common::bad_sequence("Send HELO/EHLO first"));
        }
        if self.tx.is_some() {
            return self.error(common::bad_sequence("Nested MAIL command"));
        }
        if self.cfg.tls_required && self.tls.is_none() {
            self.refusal = Some(Refusal::TlsRequired);
            return self.error(WireReply::new(
                530,
                "5.7.0",
                "Must issue a STARTTLS command first",
            ));
        }
        if !self.esmtp && params != MailParams::default() {
            return self.error(WireReply::new(555, "5.5.4", "ESMTP parameters need EHLO"));
        }
        if params.size.is_some_and(|s| s > self.cfg.max_message_size) {
            return self.error(common::size_exceeded());
        }
        if let Err(why) = admission {
            self.refusal = Some(Refusal::Queue(why));
            return Action::Reply(common::queue_unavailable());
        }
        if !sender.is_empty() {
            let domain = crate::envelope::domain_of(&sender);
            if !domain_in(domain, &self.cfg.domains) {
                return self.error(WireReply::new(
                    550,
                    "5.7.1",
                    format!("Sender domain {domain} is not allowed to relay through this host"),
                ));
            }
            if self.cfg.check_sender {
                let domain = domain.to_ascii_lowercase();
                self.pending_mail = Some((sender, params));
                return Action::CheckSender(domain);
            }
        }
        self.sender_ok(sender, params)
    }

    /// The sender passed every check but the limits: they count it last, so that a
    /// MAIL refused for another reason counts nothing.
    fn sender_ok(&mut self, sender: String, params: MailParams) -> Action {
        if self.cfg.limits {
            let count = Action::Count {
                unit: Unit::Message,
                sender: sender.clone(),
            };
            self.pending_mail = Some((sender, params));
            return count;
        }
        self.open_transaction(sender, params);
        Action::Reply(WireReply::new(250, "2.1.0", "Sender ok"))
    }

    /// The sender policy's answer to [`Action::CheckSender`].
    pub fn sender_checked(&mut self, verdict: SenderVerdict) -> Action {
        let Some((sender, params)) = self.pending_mail.take() else {
            return Action::Reply(common::bad_sequence("No MAIL pending"));
        };
        match verdict {
            SenderVerdict::Accept => self.sender_ok(sender, params),
            SenderVerdict::Reject(why) => {
                self.errors += 1;
                Action::Reply(WireReply::new(550, "5.7.1", why))
            }
        }
    }

    /// The limits' answer to [`Action::Count`].
    pub fn counted(&mut self, result: Result<(), Deferral>) -> WireReply {
        let deferred = |d: Deferral| {
            WireReply::new(
                451,
                "4.7.1",
                format!("Sending rate limit {} reached, try again later", d.limit),
            )
        };
        if let Some((sender, params)) = self.pending_mail.take() {
            return match result {
                Ok(()) => {
                    self.open_transaction(sender, params);
                    WireReply::new(250, "2.1.0", "Sender ok")
                }
                Err(d) => deferred(d),
            };
        }
        let (Some(recipient), Some(tx)) = (self.pending_rcpt.take(), self.tx.as_mut()) else {
            return common::bad_sequence("Nothing to count");
        };
        match result {
            Ok(()) => {
                tx.recipients.push(recipient);
                WireReply::new(250, "2.1.5", "Recipient ok")
            }
            Err(d) => deferred(d),
        }
    }

    fn open_transaction(&mut self, sender: String, params: MailParams) {
        self.tx = Some(Transaction {
            sender,
            params,
            recipients: Vec::new(),
            chunked: None,
            failed: None,
        });
    }

    fn rcpt(&mut self, recipient: String, params: command::RcptParams) -> Action {
        let max = self.cfg.max_recipients;
        let postmaster_domain = &self.cfg.postmaster_domain;
        let Some(tx) = self.tx.as_mut() else {
            return self.error(common::bad_sequence("Need MAIL before RCPT"));
        };
        if tx.chunked.is_some() {
            return self.error(common::bad_sequence("RCPT not allowed after BDAT"));
        }
        if !recipient.is_ascii() && !tx.params.smtputf8 {
            return self.error(WireReply::new(
                553,
                "5.6.7",
                "Non-ASCII recipient needs SMTPUTF8",
            ));
        }
        if (params.notify.is_some() || params.orcpt.is_some()) && !self.esmtp {
            return self.error(WireReply::new(555, "5.5.4", "ESMTP parameters need EHLO"));
        }
        if tx.recipients.len() >= max {
            // 452, not 552: RFC 5321 §4.5.3.1.10, the client sends the rest later.
            return Action::Reply(WireReply::new(452, "4.5.3", "Too many recipients"));
        }
        let address = if recipient == "postmaster" {
            format!("postmaster@{postmaster_domain}")
        } else {
            recipient
        };
        let duplicate = tx
            .recipients
            .iter()
            .any(|r| same_address(&r.address, &address));
        if !duplicate {
            let recipient = Recipient {
                address,
                notify: params.notify,
                orcpt: params.orcpt,
            };
            if self.cfg.limits {
                let sender = tx.sender.clone();
                self.pending_rcpt = Some(recipient);
                return Action::Count {
                    unit: Unit::Recipient,
                    sender,
                };
            }
            tx.recipients.push(recipient);
        }
        Action::Reply(WireReply::new(250, "2.1.5", "Recipient ok"))
    }

    fn data(&mut self) -> Action {
        let max = self.cfg.max_message_size;
        let Some(tx) = self.tx.as_ref() else {
            return self.error(common::bad_sequence("Need MAIL before DATA"));
        };
        if tx.chunked.is_some() {
            return self.error(common::bad_sequence("DATA not allowed after BDAT"));
        }
        if tx.params.body == BodyType::BinaryMime {
            return self.error(common::bad_sequence("BODY=BINARYMIME requires BDAT"));
        }
        if tx.recipients.is_empty() {
            return self.error(WireReply::new(554, "5.5.1", "No valid recipients"));
        }
        Action::ReadData {
            reply: WireReply::new(354, "", "End data with <CR><LF>.<CR><LF>"),
            max,
        }
    }

    fn bdat(&mut self, size: u64, last: bool) -> Action {
        let max = self.cfg.max_message_size;
        let discard = Action::ReadChunk {
            size,
            last,
            keep: false,
            text: false,
        };
        let Some(tx) = self.tx.as_mut() else {
            self.errors += 1;
            return discard;
        };
        if tx.recipients.is_empty() || tx.failed.is_some() {
            return discard;
        }
        let so_far = tx.chunked.unwrap_or(0);
        if so_far.saturating_add(size) > max {
            tx.failed = Some(common::size_exceeded());
            tx.chunked = Some(so_far);
            return discard;
        }
        tx.chunked = Some(so_far + size);
        Action::ReadChunk {
            size,
            last,
            keep: true,
            text: tx.params.body != BodyType::BinaryMime,
        }
    }

    /// Whether a BDAT transaction is under way whose chunks the driver keeps: when
    /// not, anything it kept belongs to no transaction any more.
    pub fn chunking(&self) -> bool {
        self.tx
            .as_ref()
            .is_some_and(|t| t.chunked.is_some() && t.failed.is_none())
    }

    /// A BDAT chunk was read completely (kept or discarded as [`Action::ReadChunk`]
    /// said). After the last kept chunk, `body` is everything the driver kept, or why
    /// it cannot be.
    pub fn chunk_done(
        &mut self,
        size: u64,
        last: bool,
        body: Option<Result<Body, DataError>>,
        now: Millis,
    ) -> Completed {
        let Some(tx) = self.tx.as_mut() else {
            return Completed::Reply(common::bad_sequence("Need MAIL before BDAT"));
        };
        if tx.recipients.is_empty() {
            self.errors += 1;
            return Completed::Reply(WireReply::new(554, "5.5.1", "No valid recipients"));
        }
        if let Some(failure) = tx.failed.clone() {
            if last {
                self.tx = None;
            }
            self.errors += 1;
            return Completed::Reply(failure);
        }
        if !last {
            return Completed::Reply(WireReply::new(
                250,
                "2.0.0",
                format!("{size} octets received"),
            ));
        }
        let Some(tx) = self.tx.take() else {
            return Completed::Reply(common::bad_sequence("No transaction"));
        };
        self.body_done(tx, body.unwrap_or(Ok(Body::Memory(Vec::new()))), now)
    }

    /// The DATA body ended (CRLF.CRLF) with this result.
    pub fn data_done(&mut self, result: Result<Body, DataError>, now: Millis) -> Completed {
        let Some(tx) = self.tx.take() else {
            return Completed::Reply(common::bad_sequence("No transaction"));
        };
        self.body_done(tx, result, now)
    }

    fn body_done(
        &mut self,
        tx: Transaction,
        result: Result<Body, DataError>,
        now: Millis,
    ) -> Completed {
        match result {
            // Nothing to relay: no header, no From (RFC 5322 §3.6), no message.
            Ok(body) if body.is_empty() => {
                let reply = WireReply::new(554, "5.6.0", "Empty message");
                self.refuse(tx, reply, None, 0, now)
            }
            Ok(body) => self.finish(tx, body, now),
            Err(DataError::TooBig) => self.refuse(tx, common::size_exceeded(), None, 0, now),
            Err(DataError::BareLineEnding) => {
                let reply = WireReply::new(
                    550,
                    "5.6.0",
                    "Message contains a bare CR or LF; lines must end with CRLF",
                );
                self.refuse(tx, reply, None, 0, now)
            }
        }
    }

    /// A message refused after its content was read: the reply, and a record for
    /// tracking under an id of the queue's form (it is never queued).
    fn refuse(
        &mut self,
        tx: Transaction,
        reply: WireReply,
        seen: Option<&inspect::Inspection>,
        size: u64,
        now: Millis,
    ) -> Completed {
        self.errors += 1;
        let message = RefusedMessage {
            id: QueueId::generate(),
            ip: self.ip,
            helo: self.helo.clone().unwrap_or_default(),
            tls: self.tls.clone(),
            sender: tx.sender,
            message_id: seen.and_then(|s| s.message_id.clone()),
            subject: seen.and_then(|s| s.subject.clone()),
            recipients: tx.recipients.into_iter().map(|r| r.address).collect(),
            size,
            reply: Reply::new(reply.code, reply.esc, reply.lines.join(" ")),
            at: now,
        };
        Completed::Refused {
            reply,
            message: Box::new(message),
        }
    }

    fn finish(&mut self, tx: Transaction, body: Body, now: Millis) -> Completed {
        let seen = look(&body);
        if seen.received_count > self.cfg.hop_limit {
            let reply = WireReply::new(
                554,
                "5.4.6",
                format!(
                    "Too many hops ({} Received headers): mail loop",
                    seen.received_count
                ),
            );
            let size = body.len();
            return self.refuse(tx, reply, Some(&seen), size, now);
        }
        if let SourceKind::Shared(source) = self.kind {
            return Completed::Prove(Box::new(Unproven {
                tx,
                body,
                seen,
                source,
            }));
        }
        self.submission(tx, body, seen, TenantProof::Dedicated, now)
    }

    /// The tenant check's answer for [`Completed::Prove`]. `stripped` is the message
    /// without the route header, when it had one.
    pub fn proof_checked(
        &mut self,
        unproven: Unproven,
        verdict: &Verdict,
        stripped: Option<Vec<u8>>,
        now: Millis,
    ) -> Completed {
        match verdict {
            Verdict::Proven(proof) => match stripped {
                Some(body) => {
                    let body = Body::Memory(body);
                    let seen = look(&body);
                    self.submission(unproven.tx, body, seen, *proof, now)
                }
                None => self.submission(unproven.tx, unproven.body, unproven.seen, *proof, now),
            },
            Verdict::NotProven(kind, _) => {
                let reply = WireReply::new(550, "5.7.1", unbound_text(*kind));
                let size = unproven.body.len();
                self.refuse(unproven.tx, reply, Some(&unproven.seen), size, now)
            }
            Verdict::TryLater(_) => Completed::Reply(WireReply::new(
                451,
                "4.7.1",
                "Cannot verify that the message is bound to this organization now, try again later",
            )),
        }
    }

    fn submission(
        &mut self,
        tx: Transaction,
        body: Body,
        seen: inspect::Inspection,
        proof: TenantProof,
        now: Millis,
    ) -> Completed {
        let id = QueueId::generate();
        let helo = self.helo.clone().unwrap_or_default();
        let trace = inspect::received_header(&Trace {
            helo: &helo,
            ip: self.ip,
            hostname: &self.cfg.hostname,
            esmtp: self.esmtp,
            tls: self.tls.as_deref(),
            smtputf8: tx.params.smtputf8,
            id: &id,
            single_recipient: (tx.recipients.len() == 1).then(|| tx.recipients[0].address.as_str()),
            now,
        });
        let size = trace.len() as u64 + body.len();
        let data = match body {
            Body::Memory(body) => {
                let mut data = Vec::with_capacity(trace.len() + body.len());
                data.extend_from_slice(&trace);
                data.extend_from_slice(&body);
                Data::Memory(Bytes::from(data))
            }
            Body::Spilled { file, .. } => Data::Spilled {
                prefix: Bytes::from(trace),
                file,
            },
        };
        let envelope = Envelope {
            id,
            sender: tx.sender,
            recipients: tx.recipients,
            body: tx.params.body,
            smtputf8: tx.params.smtputf8,
            ret: tx.params.ret,
            envid: tx.params.envid,
            client: ClientInfo {
                ip: self.ip,
                helo,
                tls: self.tls.clone(),
            },
            received_at: now,
            size,
            message_id: seen.message_id,
            flags: seen.flags,
            generated_dsn: false,
            system: false,
            held: None,
        };
        Completed::Submit(Box::new(Submission {
            envelope,
            data,
            proof,
            subject: seen.subject,
        }))
    }

    /// The queue's answer for a submitted message.
    pub fn stored(&mut self, id: &QueueId, result: &Result<Stored, IntakeError>) -> WireReply {
        match result {
            Ok(_) => WireReply::new(250, "2.0.0", format!("Ok: queued as {id}")),
            Err(_) => common::queue_unavailable(),
        }
    }

    /// Counts a failed command; past the limit the session ends with 421.
    fn error(&mut self, reply: WireReply) -> Action {
        self.errors += 1;
        if self.errors >= self.cfg.max_errors {
            return Action::Close(common::too_many_errors());
        }
        Action::Reply(reply)
    }

    /// True once the error budget is spent (checked after BDAT and DATA refusals).
    pub fn too_many_errors(&self) -> bool {
        self.errors >= self.cfg.max_errors
    }
}

/// The client's word for a message that proved nothing: what rule, never the details.
/// What the header says, and whether any octet is 8-bit (seen while a spilled body
/// was written).
fn look(body: &Body) -> inspect::Inspection {
    let mut seen = inspect::inspect(body.head());
    if let Body::Spilled { eight_bit, .. } = body {
        seen.flags.eight_bit = *eight_bit;
    }
    seen
}

fn unbound_text(kind: Unbound) -> &'static str {
    match kind {
        Unbound::NoProof => "Message refused: it is not bound to this organization (no DKIM signature of its domains, tenant id or route header)",
        Unbound::OtherTenant => "Message refused: it came from another tenant of the platform, not this organization's (X-MS-Exchange-CrossTenant-Id)",
        Unbound::Stale => "Message refused: its DKIM signature is too old to prove it is this organization's",
        Unbound::Replayed => "Message refused: its DKIM signature was already used for other recipients (a replayed signature proves nothing)",
        Unbound::DuplicateHeader => "Message refused: more than one From, Sender, Reply-To, To, Cc, Subject, Date or Message-ID header (RFC 5322 section 3.6)",
        Unbound::Unaligned => "Message refused: its DKIM signature is not of the From: address's domain",
    }
}

fn same_address(a: &str, b: &str) -> bool {
    match (a.rsplit_once('@'), b.rsplit_once('@')) {
        (Some((la, da)), Some((lb, db))) => la == lb && da.eq_ignore_ascii_case(db),
        _ => a == b,
    }
}

fn command_error_reply(e: &CommandError, line: &[u8]) -> WireReply {
    match e {
        CommandError::Unrecognized => WireReply::new(500, "5.5.1", "Command unrecognized"),
        CommandError::NotImplemented => WireReply::new(502, "5.5.1", "Command not implemented"),
        CommandError::Syntax(why) => WireReply::new(501, "5.5.4", *why),
        CommandError::BadAddress(why) => {
            let esc = if line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"MAIL") {
                "5.1.7"
            } else {
                "5.1.3"
            };
            WireReply::new(501, esc, *why)
        }
        CommandError::UnknownParam(p) => {
            WireReply::new(555, "5.5.4", format!("Unsupported parameter {p}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Notify;

    fn cfg() -> SessionConfig {
        SessionConfig {
            max_message_size: 1000,
            max_recipients: 3,
            hop_limit: 5,
            starttls: true,
            ..SessionConfig::for_tests()
        }
    }

    fn session_with(c: SessionConfig) -> Session {
        Session::new(
            Arc::new(c),
            "127.0.0.1".parse().unwrap(),
            SourceKind::Dedicated,
            None,
        )
    }

    fn session() -> Session {
        session_with(cfg())
    }

    fn memory(d: &Data) -> &[u8] {
        match d {
            Data::Memory(b) => b,
            Data::Spilled { .. } => panic!("a test body spilled"),
        }
    }

    fn code(a: Action) -> u16 {
        match a {
            Action::Reply(r) | Action::Close(r) | Action::StartTls(r) => r.code,
            Action::ReadData { reply, .. } => reply.code,
            other => panic!("no reply: {other:?}"),
        }
    }

    fn cmd(s: &mut Session, line: &str) -> u16 {
        code(s.command(line.as_bytes(), Ok(())))
    }

    #[test]
    fn ehlo_advertises_extensions() {
        let mut s = session();
        let Action::Reply(r) = s.command(b"EHLO c.test", Ok(())) else {
            panic!()
        };
        let text = r.text();
        for ext in [
            "PIPELINING",
            "SIZE 1000",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "STARTTLS",
            "CHUNKING",
            "BINARYMIME",
            "DSN",
        ] {
            assert!(text.contains(ext), "{ext} missing in {text}");
        }
        s.tls_established("TLSv1.3".into());
        let Action::Reply(r) = s.command(b"EHLO c.test", Ok(())) else {
            panic!()
        };
        assert!(!r.text().contains("STARTTLS"));
    }

    #[test]
    fn sequence_errors() {
        let mut s = session();
        assert_eq!(cmd(&mut s, "MAIL FROM:<a@example.test>"), 503);
        assert_eq!(cmd(&mut s, "RCPT TO:<b@x.test>"), 503);
        assert_eq!(cmd(&mut s, "DATA"), 503);
        assert_eq!(cmd(&mut s, "EHLO c.test"), 250);
        assert_eq!(cmd(&mut s, "DATA"), 503);
        assert_eq!(cmd(&mut s, "MAIL FROM:<a@example.test>"), 250);
        assert_eq!(cmd(&mut s, "MAIL FROM:<a@example.test>"), 503);
        assert_eq!(cmd(&mut s, "DATA"), 554);
    }

    #[test]
    fn sender_domain_policy() {
        let mut s = session();
        cmd(&mut s, "EHLO c.test");
        assert_eq!(cmd(&mut s, "MAIL FROM:<a@other.test>"), 550);
        assert_eq!(cmd(&mut s, "MAIL FROM:<a@sub.example.test>"), 550);
        assert_eq!(cmd(&mut s, "MAIL FROM:<a@EXAMPLE.test>"), 250);
        assert_eq!(cmd(&mut s, "RSET"), 250);
        assert_eq!(cmd(&mut s, "MAIL FROM:<>"), 250);
    }

    #[test]
    fn size_and_recipient_limits() {
        let mut s = session();
        cmd(&mut s, "EHLO c.test");
        assert_eq!(cmd(&mut s, "MAIL FROM:<a@example.test> SIZE=1001"), 552);
        assert_eq!(cmd(&mut s, "MAIL FROM:<a@example.test> SIZE=1000"), 250);
        for i in 0..3 {
            assert_eq!(cmd(&mut s, &format!("RCPT TO:<r{i}@x.test>")), 250);
        }
        assert_eq!(cmd(&mut s, "RCPT TO:<r9@x.test>"), 452);
    }

    #[test]
    fn postmaster_is_accepted_and_qualified() {
        let mut s = session();
        cmd(&mut s, "EHLO c.test");
        cmd(&mut s, "MAIL FROM:<>");
        assert_eq!(cmd(&mut s, "RCPT TO:<Postmaster>"), 250);
        assert!(matches!(
            s.command(b"DATA", Ok(())),
            Action::ReadData { .. }
        ));
        let Completed::Submit(sub) =
            s.data_done(Ok(Body::Memory(b"Subject: x\r\n\r\n".to_vec())), 0)
        else {
            panic!()
        };
        assert_eq!(
            sub.envelope.recipients[0].address,
            "postmaster@example.test"
        );
    }

    #[test]
    fn tls_required_before_mail() {
        let mut c = cfg();
        c.tls_required = true;
        let mut s = session_with(c);
        cmd(&mut s, "EHLO c.test");
        assert_eq!(cmd(&mut s, "MAIL FROM:<a@example.test>"), 530);
        assert_eq!(
            s.take_refusal(),
            Some(Refusal::TlsRequired),
            "the driver is told why"
        );
        assert_eq!(s.take_refusal(), None);
        assert!(matches!(
            s.command(b"STARTTLS", Ok(())),
            Action::StartTls(_)
        ));
        s.tls_established("TLSv1.3".into());
        assert_eq!(
            cmd(&mut s, "MAIL FROM:<a@example.test>"),
            503,
            "EHLO again after TLS"
        );
        cmd(&mut s, "EHLO c.test");
        assert_eq!(cmd(&mut s, "MAIL FROM:<a@example.test>"), 250);
    }

    #[test]
    fn unhealthy_spool_defers_at_mail() {
        let mut s = session();
        cmd(&mut s, "EHLO c.test");
        let full = Err(Backpressure::MinFree);
        assert_eq!(code(s.command(b"MAIL FROM:<a@example.test>", full)), 452);
        assert_eq!(
            s.take_refusal(),
            Some(Refusal::Queue(Backpressure::MinFree))
        );
    }

    #[test]
    fn dsn_parameters_reach_the_envelope() {
        let mut s = session();
        cmd(&mut s, "EHLO c.test");
        cmd(
            &mut s,
            "MAIL FROM:<a@example.test> RET=HDRS ENVID=abc BODY=8BITMIME",
        );
        cmd(
            &mut s,
            "RCPT TO:<b@x.test> NOTIFY=FAILURE,DELAY ORCPT=rfc822;b@x.test",
        );
        cmd(&mut s, "DATA");
        let Completed::Submit(sub) = s.data_done(
            Ok(Body::Memory(b"Message-ID: <m@x>\r\n\r\nhi\r\n".to_vec())),
            1_000_000,
        ) else {
            panic!()
        };
        let env = &sub.envelope;
        assert_eq!(env.ret, Some(crate::envelope::Ret::Hdrs));
        assert_eq!(env.envid.as_deref(), Some("abc"));
        assert_eq!(env.body, BodyType::EightBitMime);
        assert_eq!(
            env.recipients[0].notify,
            Some(Notify {
                success: false,
                failure: true,
                delay: true
            })
        );
        assert_eq!(env.recipients[0].orcpt.as_deref(), Some("rfc822;b@x.test"));
        assert_eq!(env.message_id.as_deref(), Some("m@x"));
        assert!(memory(&sub.data).starts_with(b"Received: from c.test ([127.0.0.1])"));
        assert!(memory(&sub.data).ends_with(b"\r\nMessage-ID: <m@x>\r\n\r\nhi\r\n"));
        assert_eq!(env.size, sub.data.len());
        assert!(!s.in_transaction());
    }

    #[test]
    fn bdat_chunks_accumulate() {
        let mut s = session();
        cmd(&mut s, "EHLO c.test");
        cmd(&mut s, "MAIL FROM:<a@example.test> BODY=BINARYMIME");
        cmd(&mut s, "RCPT TO:<b@x.test>");
        assert_eq!(cmd(&mut s, "DATA"), 503, "BINARYMIME needs BDAT");
        assert_eq!(
            s.command(b"BDAT 5", Ok(())),
            Action::ReadChunk {
                size: 5,
                last: false,
                keep: true,
                text: false
            }
        );
        assert!(s.chunking());
        assert!(matches!(s.chunk_done(5, false, None, 0), Completed::Reply(r) if r.code == 250));
        assert_eq!(cmd(&mut s, "RCPT TO:<c@x.test>"), 503);
        assert_eq!(
            s.command(b"BDAT 5 LAST", Ok(())),
            Action::ReadChunk {
                size: 5,
                last: true,
                keep: true,
                text: false
            }
        );
        let kept = Body::Memory(b"A: b\r\n\r\n\0\xff".to_vec());
        let Completed::Submit(sub) = s.chunk_done(5, true, Some(Ok(kept)), 0) else {
            panic!()
        };
        assert!(memory(&sub.data).ends_with(b"A: b\r\n\r\n\0\xff"));
        assert_eq!(sub.envelope.body, BodyType::BinaryMime);
    }

    #[test]
    fn bdat_over_size_fails_the_rest_of_the_transaction() {
        let mut s = session();
        cmd(&mut s, "EHLO c.test");
        cmd(&mut s, "MAIL FROM:<a@example.test>");
        cmd(&mut s, "RCPT TO:<b@x.test>");
        assert_eq!(
            s.command(b"BDAT 900", Ok(())),
            Action::ReadChunk {
                size: 900,
                last: false,
                keep: true,
                text: true
            }
        );
        assert!(matches!(s.chunk_done(900, false, None, 0), Completed::Reply(r) if r.code == 250));
        assert_eq!(
            s.command(b"BDAT 200", Ok(())),
            Action::ReadChunk {
                size: 200,
                last: false,
                keep: false,
                text: false
            }
        );
        assert!(!s.chunking(), "the driver drops what it kept");
        assert!(matches!(s.chunk_done(200, false, None, 0), Completed::Reply(r) if r.code == 552));
        assert_eq!(
            s.command(b"BDAT 1 LAST", Ok(())),
            Action::ReadChunk {
                size: 1,
                last: true,
                keep: false,
                text: false
            }
        );
        assert!(matches!(s.chunk_done(1, true, None, 0), Completed::Reply(r) if r.code == 552));
        assert!(!s.in_transaction());
    }

    #[test]
    fn an_empty_message_is_refused() {
        let mut s = session();
        cmd(&mut s, "EHLO c.test");
        cmd(&mut s, "MAIL FROM:<a@example.test>");
        cmd(&mut s, "RCPT TO:<b@x.test>");
        assert!(matches!(
            s.command(b"BDAT 0 LAST", Ok(())),
            Action::ReadChunk {
                size: 0,
                last: true,
                keep: true,
                text: true
            }
        ));
        let Completed::Refused { reply: r, message } =
            s.chunk_done(0, true, Some(Ok(Body::Memory(Vec::new()))), 0)
        else {
            panic!()
        };
        assert_eq!((r.code, r.esc), (554, "5.6.0"));
        assert_eq!(message.recipients, ["b@x.test"]);
        assert_eq!(message.reply.to_string(), "554 5.6.0 Empty message");
        assert!(!s.in_transaction());
        cmd(&mut s, "MAIL FROM:<a@example.test>");
        cmd(&mut s, "RCPT TO:<b@x.test>");
        cmd(&mut s, "DATA");
        let Completed::Refused { reply: r, .. } = s.data_done(Ok(Body::Memory(Vec::new())), 0)
        else {
            panic!()
        };
        assert_eq!(r.code, 554);
    }

    #[test]
    fn bdat_without_transaction_is_discarded() {
        let mut s = session();
        cmd(&mut s, "EHLO c.test");
        assert_eq!(
            s.command(b"BDAT 3 LAST", Ok(())),
            Action::ReadChunk {
                size: 3,
                last: true,
                keep: false,
                text: false
            }
        );
        assert!(matches!(s.chunk_done(3, true, None, 0), Completed::Reply(r) if r.code == 503));
    }

    #[test]
    fn hop_limit() {
        let mut s = session();
        cmd(&mut s, "EHLO c.test");
        cmd(&mut s, "MAIL FROM:<a@example.test>");
        cmd(&mut s, "RCPT TO:<b@x.test>");
        cmd(&mut s, "DATA");
        let body = "Received: x\r\n".repeat(5) + "\r\nbody\r\n";
        assert!(matches!(
            s.data_done(Ok(Body::Memory(body.into_bytes())), 0),
            Completed::Submit(_)
        ));
        cmd(&mut s, "MAIL FROM:<a@example.test>");
        cmd(&mut s, "RCPT TO:<b@x.test>");
        cmd(&mut s, "DATA");
        let body = "Received: x\r\n".repeat(6) + "Message-ID: <loop@x>\r\n\r\nbody\r\n";
        let Completed::Refused { reply: r, message } =
            s.data_done(Ok(Body::Memory(body.into_bytes())), 0)
        else {
            panic!()
        };
        assert_eq!((r.code, r.esc), (554, "5.4.6"));
        assert_eq!(
            message.message_id.as_deref(),
            Some("loop@x"),
            "tracked by its id"
        );
    }

    #[test]
    fn error_budget_closes_with_421() {
        let mut s = session();
        for _ in 0..9 {
            assert_eq!(cmd(&mut s, "BOGUS"), 500);
        }
        assert!(matches!(s.command(b"BOGUS", Ok(())), Action::Close(r) if r.code == 421));
    }

    #[test]
    fn long_lines() {
        let mut s = session();
        cmd(&mut s, "EHLO c.test");
        let noop = format!("NOOP {}", "x".repeat(600));
        assert_eq!(cmd(&mut s, &noop), 500);
        let mail = format!("MAIL FROM:<a@example.test> ENVID={}", "x".repeat(100));
        assert!(mail.len() > 130);
        assert_eq!(cmd(&mut s, &mail), 250);
    }

    #[test]
    fn sender_policy_round_trip() {
        let mut c = cfg();
        c.check_sender = true;
        let mut s = session_with(c);
        cmd(&mut s, "EHLO c.test");
        assert_eq!(
            s.command(b"MAIL FROM:<a@Example.test>", Ok(())),
            Action::CheckSender("example.test".into())
        );
        let Action::Reply(r) = s.sender_checked(SenderVerdict::Reject(
            "publish include:eu._netblocks.mimecast.com".into(),
        )) else {
            panic!()
        };
        assert_eq!((r.code, r.esc), (550, "5.7.1"));
        assert!(!s.in_transaction());
        assert!(matches!(
            s.command(b"MAIL FROM:<a@example.test>", Ok(())),
            Action::CheckSender(_)
        ));
        assert_eq!(code(s.sender_checked(SenderVerdict::Accept)), 250);
        assert!(s.in_transaction());
        assert_eq!(cmd(&mut s, "RSET"), 250);
        assert_eq!(
            cmd(&mut s, "MAIL FROM:<>"),
            250,
            "the null sender is never checked"
        );
    }

    #[test]
    fn non_ascii_recipient_needs_smtputf8() {
        let mut s = session();
        cmd(&mut s, "EHLO c.test");
        cmd(&mut s, "MAIL FROM:<a@example.test>");
        assert_eq!(cmd(&mut s, "RCPT TO:<ü@x.test>"), 553);
        cmd(&mut s, "RSET");
        cmd(&mut s, "MAIL FROM:<a@example.test> SMTPUTF8");
        assert_eq!(cmd(&mut s, "RCPT TO:<ü@x.test>"), 250);
    }
}
