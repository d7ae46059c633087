//! Runs one session over a byte stream: buffers reads, splits command lines, reads DATA
//! and BDAT bodies, applies timeouts, batches replies for pipelining, and hands finished
//! messages to the queue. Everything it decides comes from [`Session`].

use std::sync::Arc;
use std::time::Duration;

// tokio's clock, so the unit tests drive every timeout with the paused clock.
use tokio::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use super::body::{Bodies, Body, BodySink};
use super::command::Stage;
use super::data::{DataError, DataReceiver, LineEndings};
use super::reply::{common, WireReply};
use super::session::{Action, Completed, Refusal, Session, SessionConfig, Unproven};
use crate::budget::Held;
use crate::envelope::{now_ms, QueueId};
use crate::events::{Event, EventBus, TenantProof};
use crate::lifecycle::Phase;
use crate::pipeline::{Intake, SenderPolicy, Submission, Unit};
use crate::tenant::{TenantBinder, Verdict};

/// What every session of a listener shares.
pub struct Context<I, P> {
    pub cfg: Arc<SessionConfig>,
    pub intake: Arc<I>,
    pub policy: Arc<P>,
    pub events: EventBus,
    /// Checks messages from shared ranges for tenant proof.
    pub tenant: Arc<TenantBinder>,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    pub session_timeout: Duration,
    /// Octets per second during DATA and BDAT; 0: no minimum.
    pub min_data_rate: u64,
    /// Where bodies in flight are kept, under `server.ingress_memory`.
    pub bodies: Arc<Bodies>,
}

/// How a session's run over one stream ended.
pub enum Exit {
    Closed,
    /// The client asked for STARTTLS and got its 220; what it sent after the command
    /// was discarded. The caller takes the stream back with `Conn::into_stream` for the
    /// handshake.
    StartTls,
}

#[derive(Debug)]
enum Stop {
    Eof,
    Io,
    Timeout,
    /// A DATA or BDAT sender fell below `min_data_rate`.
    TooSlow,
    /// No room in `server.ingress_memory` came within `data_timeout`.
    Busy,
    /// The body could not be written to its file.
    Unwritable,
    Shutdown,
}

pub struct Conn<S> {
    stream: S,
    buf: Vec<u8>,
    /// Start of unconsumed input in `buf`.
    pos: usize,
    out: Vec<u8>,
    session_deadline: Instant,
    phase: watch::Receiver<Phase>,
}

enum Line {
    /// `buf[start..end]`, line ending excluded.
    Complete(usize, usize),
    TooLong,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub fn new(stream: S, session_deadline: Instant, phase: watch::Receiver<Phase>) -> Conn<S> {
        Conn {
            stream,
            buf: Vec::with_capacity(4096),
            pos: 0,
            out: Vec::with_capacity(1024),
            session_deadline,
            phase,
        }
    }

    pub fn into_stream(self) -> S {
        self.stream
    }

    fn queue_reply(&mut self, r: &WireReply) {
        r.write_to(&mut self.out);
    }

    async fn flush(&mut self, timeout: Duration) -> Result<(), Stop> {
        if self.out.is_empty() {
            return Ok(());
        }
        let write = async {
            self.stream.write_all(&self.out).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(timeout, write).await {
            Ok(Ok(())) => {
                self.out.clear();
                Ok(())
            }
            Ok(Err(_)) => Err(Stop::Io),
            Err(_) => Err(Stop::Timeout),
        }
    }

    /// Sends a last reply and gives up on errors: the connection is closing anyway.
    async fn final_reply(&mut self, r: &WireReply) {
        self.queue_reply(r);
        let _ = self.flush(Duration::from_secs(5)).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.stream.shutdown()).await;
    }

    fn has_complete_line(&self) -> bool {
        memchr::memchr(b'\n', &self.buf[self.pos..]).is_some()
    }

    fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Reads more input, waiting at most until `deadline`. `idle_ok` lets a draining
    /// server end an idle session here.
    async fn fill(&mut self, deadline: Instant, idle_ok: bool) -> Result<(), Stop> {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 32 * 1024 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.reserve(8192);
        let deadline = deadline.min(self.session_deadline);
        loop {
            let phase = *self.phase.borrow_and_update();
            if phase == Phase::Stop || (phase == Phase::Closing && idle_ok) {
                return Err(Stop::Shutdown);
            }
            tokio::select! {
                r = self.stream.read_buf(&mut self.buf) => {
                    return match r {
                        Ok(0) => Err(Stop::Eof),
                        Ok(_) => Ok(()),
                        Err(_) => Err(Stop::Io),
                    };
                }
                _ = tokio::time::sleep_until(deadline) => return Err(Stop::Timeout),
                changed = self.phase.changed() => {
                    if changed.is_err() {
                        // The server is gone; treat it as the hard stop.
                        return Err(Stop::Shutdown);
                    }
                }
            }
        }
    }

    /// The next command line. `timeout` bounds the wait for its first octet, and then
    /// the whole line from that octet on: reads that bring a byte at a time do not
    /// extend it (RFC 5321 §4.5.3.2, "to receive a complete command line").
    async fn next_line(&mut self, max: usize, timeout: Duration, idle: bool) -> Result<Line, Stop> {
        let mut discarding = false;
        let mut deadline = Instant::now() + timeout;
        let mut started = self.buffered() > 0;
        loop {
            if let Some(k) = memchr::memchr(b'\n', &self.buf[self.pos..]) {
                let start = self.pos;
                self.pos += k + 1;
                if discarding {
                    return Ok(Line::TooLong);
                }
                let mut end = start + k;
                if end > start && self.buf[end - 1] == b'\r' {
                    end -= 1;
                }
                return Ok(Line::Complete(start, end));
            }
            if self.buffered() > max {
                // Drop what we have and keep dropping until the line ends.
                discarding = true;
                self.pos = self.buf.len();
            }
            let waiting = idle && !discarding && self.buffered() == 0;
            self.fill(deadline, waiting).await?;
            if !started && self.buffered() > 0 {
                started = true;
                deadline = Instant::now() + timeout;
            }
        }
    }

    /// Reads exactly `size` octets into `chunks` (or nowhere).
    async fn read_chunk(
        &mut self,
        mut size: u64,
        mut chunks: Option<&mut Chunks>,
        timeout: Duration,
        pace: &mut Pace,
    ) -> Result<(), Stop> {
        loop {
            let take = (self.buffered() as u64).min(size) as usize;
            if let Some(c) = chunks.as_deref_mut() {
                let piece = &self.buf[self.pos..self.pos + take];
                match &mut c.fix {
                    Some(fix) => fix.feed(piece, c.sink.buffer()),
                    None => c.sink.buffer().extend_from_slice(piece),
                }
                c.sink.settle().await.map_err(unwritable)?;
            }
            self.pos += take;
            size -= take as u64;
            if size == 0 {
                return Ok(());
            }
            if let Some(c) = chunks.as_deref_mut() {
                let waited = self.room(&mut c.sink, timeout).await?;
                pace.pause(waited);
            }
            self.fill_paced(timeout, pace).await?;
        }
    }

    async fn read_data(
        &mut self,
        rx: &mut DataReceiver,
        sink: &mut BodySink,
        timeout: Duration,
        pace: &mut Pace,
    ) -> Result<(), Stop> {
        loop {
            let end = rx.feed(&self.buf[self.pos..], sink.buffer());
            match end {
                Some(n) => self.pos += n,
                None => self.pos = self.buf.len(),
            }
            sink.settle().await.map_err(unwritable)?;
            if end.is_some() {
                return Ok(());
            }
            let waited = self.room(sink, timeout).await?;
            pace.pause(waited);
            self.fill_paced(timeout, pace).await?;
        }
    }

    /// Room in the ingress memory for the next read. Waiting for it reads nothing
    /// (the sender meets TCP backpressure); it ends at `timeout`, at the session's
    /// deadline or at the hard stop.
    async fn room(&mut self, sink: &mut BodySink, timeout: Duration) -> Result<Duration, Stop> {
        let deadline = (Instant::now() + timeout).min(self.session_deadline);
        // Polled to its end or dropped with the session: a room request cut short and
        // started again could write a body's octets twice.
        let room = sink.room();
        tokio::pin!(room);
        loop {
            if *self.phase.borrow_and_update() == Phase::Stop {
                return Err(Stop::Shutdown);
            }
            tokio::select! {
                r = &mut room => return r.map_err(unwritable),
                _ = tokio::time::sleep_until(deadline) => return Err(Stop::Busy),
                changed = self.phase.changed() => {
                    if changed.is_err() {
                        return Err(Stop::Shutdown);
                    }
                }
            }
        }
    }

    /// `fill` inside DATA or BDAT. `timeout` (`data_timeout`) runs from the last real
    /// progress, [`PROGRESS`] octets, so a drip of single octets does not extend it; and
    /// the wait also ends when the sender falls behind the minimum rate, so a slow drip
    /// is cut off, not carried for hours.
    async fn fill_paced(&mut self, timeout: Duration, pace: &mut Pace) -> Result<(), Stop> {
        let before = self.buf.len() - self.pos;
        let stalled = pace.progress_at + timeout;
        let behind = pace.deadline();
        let deadline = behind.map_or(stalled, |b| b.min(stalled));
        match self.fill(deadline, false).await {
            Ok(()) => {
                let n = (self.buf.len() - self.pos).saturating_sub(before) as u64;
                pace.received(n, Instant::now());
                Ok(())
            }
            Err(Stop::Timeout) if behind.is_some_and(|b| b < stalled) => Err(Stop::TooSlow),
            Err(e) => Err(e),
        }
    }
}

/// How long a sender may take before its average data rate must reach the minimum:
/// a connection's first round trips and a client's own pauses are not slowness.
const PACE_GRACE: Duration = Duration::from_secs(5);

/// Octets that count as progress inside DATA or BDAT: `data_timeout` runs again from
/// each such step, not from every read.
const PROGRESS: u64 = 1024;

/// The minimum data rate of one DATA body or BDAT chunk (Postfix's
/// `smtpd_min_data_rate`): by `start + grace + received / rate` more must have come.
/// And the last time the sender made progress, for `data_timeout`.
#[derive(Debug, Clone, Copy)]
struct Pace {
    rate: u64,
    start: Instant,
    received: u64,
    progress_at: Instant,
    since_progress: u64,
}

impl Pace {
    fn new(rate: u64, start: Instant) -> Pace {
        Pace {
            rate,
            start,
            received: 0,
            progress_at: start,
            since_progress: 0,
        }
    }

    /// The time a session waited for memory is neither the sender's slowness nor
    /// its silence.
    fn pause(&mut self, waited: Duration) {
        self.start += waited;
        self.progress_at += waited;
    }

    fn received(&mut self, n: u64, now: Instant) {
        self.received = self.received.saturating_add(n);
        self.since_progress = self.since_progress.saturating_add(n);
        if self.since_progress >= PROGRESS {
            self.since_progress = 0;
            self.progress_at = now;
        }
    }

    /// When the sender falls behind unless more arrives; `None` without a minimum.
    fn deadline(&self) -> Option<Instant> {
        if self.rate == 0 {
            return None;
        }
        let earned = Duration::from_secs_f64(self.received as f64 / self.rate as f64);
        Some(self.start + PACE_GRACE + earned)
    }
}

fn unwritable(e: std::io::Error) -> Stop {
    tracing::error!(error = %e, "cannot write a body in flight to its file");
    Stop::Unwritable
}

/// The chunks of one BDAT transaction, kept across its commands.
struct Chunks {
    sink: BodySink,
    /// Line endings made CRLF for a text body; `None` for BINARYMIME.
    fix: Option<LineEndings>,
}

impl Chunks {
    async fn finish(mut self) -> Result<(Result<Body, DataError>, Option<Held>), Stop> {
        if let Some(fix) = &mut self.fix {
            if let Err(e) = fix.finish(self.sink.buffer()) {
                return Ok((Err(e), None));
            }
        }
        let (body, held) = self.sink.finish().await.map_err(unwritable)?;
        Ok((Ok(body), Some(held)))
    }
}

/// Runs the session until it ends or asks for TLS.
pub async fn drive<S, I, P>(
    conn: &mut Conn<S>,
    session: &mut Session,
    ctx: &Context<I, P>,
    greet: bool,
) -> Exit
where
    S: AsyncRead + AsyncWrite + Unpin,
    I: Intake,
    P: SenderPolicy,
{
    if greet {
        conn.queue_reply(&session.greeting());
    }
    match run(conn, session, ctx).await {
        Ok(exit) => exit,
        Err(stop) => {
            match stop {
                Stop::Timeout => conn.final_reply(&common::timeout()).await,
                Stop::TooSlow => {
                    tracing::info!(client = %session.client_ip(), "data rate below server.min_data_rate: closed with 421");
                    metrics::counter!(crate::telemetry::SESSIONS_TOO_SLOW_TOTAL).increment(1);
                    conn.final_reply(&common::too_slow()).await
                }
                Stop::Busy => {
                    tracing::warn!(client = %session.client_ip(), "no room in server.ingress_memory within data_timeout: closed with 421");
                    conn.final_reply(&common::memory_busy()).await
                }
                Stop::Unwritable => conn.final_reply(&common::body_unwritable()).await,
                Stop::Shutdown => conn.final_reply(&common::shutting_down()).await,
                Stop::Eof | Stop::Io => {}
            }
            Exit::Closed
        }
    }
}

async fn run<S, I, P>(
    conn: &mut Conn<S>,
    session: &mut Session,
    ctx: &Context<I, P>,
) -> Result<Exit, Stop>
where
    S: AsyncRead + AsyncWrite + Unpin,
    I: Intake,
    P: SenderPolicy,
{
    let ct = ctx.command_timeout;
    let dt = ctx.data_timeout;
    let policy = session.config().bare_line_endings;
    let mut chunks: Option<Chunks> = None;
    loop {
        if !conn.has_complete_line() {
            conn.flush(ct).await?;
        }
        let idle = !session.in_transaction();
        let action = match conn
            .next_line(session.max_buffered_line(), ct, idle)
            .await?
        {
            Line::TooLong => session.line_too_long(),
            Line::Complete(a, b) => {
                let stage = Stage::of(&conn.buf[a..b]);
                let action = session.command(&conn.buf[a..b], ctx.intake.admission());
                count_refusal(stage, &action);
                match session.take_refusal() {
                    Some(Refusal::TlsRequired) => {
                        metrics::counter!(crate::telemetry::CONNECTIONS_REFUSED_TOTAL, "reason" => "tls_required")
                            .increment(1);
                    }
                    Some(Refusal::Queue(why)) => {
                        metrics::counter!(crate::telemetry::QUEUE_REFUSALS_TOTAL, "reason" => why.label())
                            .increment(1);
                    }
                    None => {}
                }
                action
            }
        };
        if !session.chunking() {
            // Reset, failed or never begun: what was kept belongs to no message.
            chunks = None;
        }
        let mut action = action;
        // The answers of the sender policy and of the limits lead to a next step.
        loop {
            match action {
                Action::CheckSender(domain) => {
                    let verdict = ctx.policy.check_sender(&domain).await;
                    action = session.sender_checked(verdict);
                    if let Action::Reply(r) = &action {
                        if r.code >= 500 {
                            count("mail", r);
                        }
                    }
                    continue;
                }
                Action::Count { unit, sender } => {
                    let counted = ctx.intake.count(unit, &sender, session.client_ip());
                    let r = session.counted(counted);
                    if r.code >= 400 {
                        count(
                            match unit {
                                Unit::Message => "mail",
                                Unit::Recipient => "rcpt",
                            },
                            &r,
                        );
                    }
                    action = Action::Reply(r);
                }
                other => action = other,
            }
            break;
        }
        match action {
            Action::Reply(r) => conn.queue_reply(&r),
            Action::Close(r) => {
                conn.final_reply(&r).await;
                return Ok(Exit::Closed);
            }
            Action::StartTls(r) => {
                conn.queue_reply(&r);
                conn.flush(ct).await?;
                // Whatever the client pipelined after STARTTLS was sent in the clear and
                // must never be executed inside the TLS session (CVE-2011-0411).
                conn.pos = conn.buf.len();
                return Ok(Exit::StartTls);
            }
            // Answered above.
            Action::CheckSender(_) | Action::Count { .. } => {}
            Action::ReadData { reply, max } => {
                conn.queue_reply(&reply);
                conn.flush(ct).await?;
                let mut rx = DataReceiver::new(max, policy);
                let mut sink = ctx.bodies.sink();
                let mut pace = Pace::new(ctx.min_data_rate, Instant::now());
                conn.read_data(&mut rx, &mut sink, dt, &mut pace).await?;
                let (result, held) = match rx.finish() {
                    Ok(()) => {
                        let (body, held) = sink.finish().await.map_err(unwritable)?;
                        (Ok(body), Some(held))
                    }
                    Err(e) => (Err(e), None),
                };
                let done = session.data_done(result, now_ms());
                if !complete(conn, session, ctx, done, held).await? {
                    return Ok(Exit::Closed);
                }
            }
            Action::ReadChunk {
                size,
                last,
                keep,
                text,
            } => {
                if size > 2 * session.config().max_message_size && !keep {
                    // Reading gigabytes only to throw them away helps nobody.
                    conn.final_reply(&WireReply::new(
                        552,
                        "5.3.4",
                        "Chunk exceeds the maximum message size, closing connection",
                    ))
                    .await;
                    return Ok(Exit::Closed);
                }
                let kept = keep.then(|| {
                    chunks.get_or_insert_with(|| Chunks {
                        sink: ctx.bodies.sink(),
                        fix: text.then(|| LineEndings::new(policy)),
                    })
                });
                let mut pace = Pace::new(ctx.min_data_rate, Instant::now());
                conn.read_chunk(size, kept, dt, &mut pace).await?;
                let (body, held) = match (keep && last).then(|| chunks.take()).flatten() {
                    Some(c) => {
                        let (body, held) = c.finish().await?;
                        (Some(body), held)
                    }
                    None => (None, None),
                };
                let done = session.chunk_done(size, last, body, now_ms());
                if !complete(conn, session, ctx, done, held).await? {
                    return Ok(Exit::Closed);
                }
            }
        }
    }
}

/// Queues a finished message or sends the refusal. False when the session must end.
/// `held` is the ingress memory the body takes, given back once it is stored.
async fn complete<S, I, P>(
    conn: &mut Conn<S>,
    session: &mut Session,
    ctx: &Context<I, P>,
    done: Completed,
    mut held: Option<Held>,
) -> Result<bool, Stop>
where
    S: AsyncRead + AsyncWrite + Unpin,
    I: Intake,
    P: SenderPolicy,
{
    let mut done = done;
    // A message from a shared range goes round once more with its proof checked.
    loop {
        match done {
            Completed::Prove(unproven) => {
                let (next, room) = prove(session, ctx, *unproven).await;
                done = next;
                if room.is_some() {
                    held = room;
                }
                continue;
            }
            Completed::Refused { reply, message } => {
                ctx.events.publish_now(Event::Refused(message));
                done = Completed::Reply(reply);
                continue;
            }
            Completed::Reply(r) => {
                if r.code >= 500 {
                    count("data", &r);
                }
                if session.too_many_errors() {
                    conn.queue_reply(&r);
                    conn.final_reply(&common::too_many_errors()).await;
                    return Ok(false);
                }
                conn.queue_reply(&r);
            }
            Completed::Submit(sub) => {
                let r = submit(session, ctx, *sub).await;
                conn.queue_reply(&r);
            }
        }
        drop(held);
        return Ok(true);
    }
}

/// Hands a message to the queue; the reply says whether it is on disk.
async fn submit<I, P>(session: &mut Session, ctx: &Context<I, P>, sub: Submission) -> WireReply
where
    I: Intake,
{
    let started = Instant::now();
    let id: QueueId = sub.envelope.id.clone();
    let (ip, nrcpt, size, tls) = (
        sub.envelope.client.ip,
        sub.envelope.recipients.len(),
        sub.envelope.size,
        sub.envelope.client.tls.is_some(),
    );
    let sender = sub.envelope.sender.clone();
    let result = ctx.intake.submit(sub).await;
    let r = session.stored(&id, &result);
    match &result {
        Ok(_) => {
            tracing::info!(queue_id = %id, "accepted client=[{ip}] from=<{sender}> nrcpt={nrcpt} size={size} tls={tls}");
            metrics::counter!(crate::telemetry::MESSAGES_ACCEPTED_TOTAL).increment(1);
            metrics::counter!(crate::telemetry::RECEIVED_BYTES_TOTAL).increment(size);
            metrics::histogram!(crate::telemetry::ACCEPT_LATENCY_SECONDS)
                .record(started.elapsed().as_secs_f64());
        }
        Err(e) => {
            tracing::error!(queue_id = %id, error = %e, "not queued client=[{ip}] from=<{sender}> nrcpt={nrcpt} size={size}");
            count("data", &r);
        }
    }
    r
}

/// Runs the tenant check on a message from a shared range: one log line, the metrics,
/// an event for onboarding, then the session's decision. A body in a file is read back
/// for the check under the ingress memory budget; that room is returned with the
/// decision, to be held until the message is stored.
async fn prove<I, P>(
    session: &mut Session,
    ctx: &Context<I, P>,
    unproven: Unproven,
) -> (Completed, Option<Held>) {
    let source = unproven.source();
    let now = now_ms();
    let (loaded, room) = match unproven.body() {
        Body::Memory(_) => (None, None),
        Body::Spilled { file, .. } => {
            let room = ctx.bodies.memory().take(file.len()).await;
            let file = file.clone();
            let read = tokio::task::spawn_blocking(move || file.read_all())
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r);
            match read {
                Ok(m) => (Some(m), Some(room)),
                Err(e) => {
                    tracing::error!(error = %e, "cannot read a spilled body back for its tenant check");
                    return (Completed::Reply(common::body_unreadable()), None);
                }
            }
        }
    };
    let message: &[u8] = match (&loaded, unproven.body()) {
        (Some(m), _) => m,
        (None, Body::Memory(m)) => m,
        (None, Body::Spilled { .. }) => &[],
    };
    let binding = ctx
        .tenant
        .bind(source, message, &unproven.recipients(), now)
        .await;
    drop(loaded);
    let range = ctx.tenant.range(source);
    let (name, platform) = range.map_or(("?", "other"), |r| (r.name.as_str(), r.platform.label()));
    let ip = session.client_ip();
    let sender = unproven.sender().to_string();
    let (proof, unbound) = match &binding.verdict {
        Verdict::Proven(p) => (*p, None),
        Verdict::NotProven(kind, _) => (TenantProof::None, Some(*kind)),
        Verdict::TryLater(_) => (TenantProof::None, None),
    };
    metrics::counter!(crate::telemetry::TENANT_CHECKS_TOTAL, "platform" => platform, "proof" => proof.label())
        .increment(1);
    if let Some(kind) = unbound.filter(|k| k.is_replay_rule()) {
        metrics::counter!(crate::telemetry::DKIM_REPLAY_REFUSALS_TOTAL, "platform" => platform, "reason" => kind.label())
            .increment(1);
    }
    if binding.skipped > 0 {
        metrics::counter!(crate::telemetry::DKIM_SIGNATURES_SKIPPED_TOTAL)
            .increment(binding.skipped as u64);
    }
    match &binding.verdict {
        Verdict::Proven(p) => tracing::info!(
            range = name,
            "tenant proven client=[{ip}] from=<{sender}> proof={} ({})",
            p.label(),
            binding.detail
        ),
        Verdict::NotProven(kind, why) => tracing::warn!(
            range = name,
            reason = kind.label(),
            "tenant not proven, refused client=[{ip}] from=<{sender}>: {why}"
        ),
        Verdict::TryLater(why) => tracing::warn!(
            range = name,
            "tenant proof not verifiable now, deferred client=[{ip}] from=<{sender}>: {why}"
        ),
    }
    if !matches!(binding.verdict, Verdict::TryLater(_)) {
        ctx.events.publish_now(Event::TenantCheck {
            range: name.to_string(),
            proof,
            unbound,
            ip,
            sender,
            at: now,
        });
    }
    let done = session.proof_checked(unproven, &binding.verdict, binding.stripped, now);
    (done, room)
}

fn count_refusal(stage: Stage, action: &Action) {
    if let Action::Reply(r) | Action::Close(r) = action {
        if r.code >= 400 && stage != Stage::Other {
            count(stage.label(), r);
        }
    }
}

/// Refusals are labelled by stage and enhanced status code: a small, fixed set.
fn count(stage: &'static str, r: &WireReply) {
    let reason = if r.esc.is_empty() { "none" } else { r.esc };
    metrics::counter!(crate::telemetry::MESSAGES_REFUSED_TOTAL, "stage" => stage, "reason" => reason)
        .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pace_deadline_moves_with_the_data() {
        let t0 = Instant::now();
        let mut p = Pace::new(500, t0);
        assert_eq!(p.deadline(), Some(t0 + PACE_GRACE));
        p.received(1000, t0);
        assert_eq!(p.deadline(), Some(t0 + PACE_GRACE + Duration::from_secs(2)));
        assert_eq!(Pace::new(0, t0).deadline(), None, "0 turns the minimum off");
    }

    use crate::pipeline::{Backpressure, IntakeError, SenderVerdict, Stored};
    use crate::smtp::session::SourceKind;
    use crate::spf::hickory::HickoryDns;
    use crate::tenant::dkim::DkimVerifier;
    use std::sync::Mutex;
    use tokio::io::DuplexStream;

    /// Takes every submission and keeps it.
    #[derive(Default)]
    struct MemIntake {
        taken: Mutex<Vec<Submission>>,
    }

    impl Intake for MemIntake {
        async fn submit(&self, msg: Submission) -> Result<Stored, IntakeError> {
            self.taken.lock().unwrap().push(msg);
            Ok(Stored::default())
        }
        fn admission(&self) -> Result<(), Backpressure> {
            Ok(())
        }
    }

    struct AnySender;

    impl SenderPolicy for AnySender {
        async fn check_sender(&self, _: &str) -> SenderVerdict {
            SenderVerdict::Accept
        }
    }

    const CMD: Duration = Duration::from_secs(300);
    const DATA: Duration = Duration::from_secs(600);
    const SESSION: Duration = Duration::from_secs(3600);

    fn ctx(intake: Arc<MemIntake>) -> Context<MemIntake, AnySender> {
        let dns =
            HickoryDns::new(&["127.0.0.1:1".parse().unwrap()], Duration::from_secs(1)).unwrap();
        Context {
            cfg: Arc::new(SessionConfig::for_tests()),
            intake,
            policy: Arc::new(AnySender),
            events: EventBus::new(),
            tenant: Arc::new(TenantBinder::new(
                Vec::new(),
                vec!["example.test".into()],
                DkimVerifier::new(dns.resolver()),
                Duration::from_secs(1),
                None,
            )),
            command_timeout: CMD,
            data_timeout: DATA,
            session_timeout: SESSION,
            min_data_rate: 0,
            bodies: bodies(),
        }
    }

    fn bodies() -> Arc<Bodies> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = crate::scratch::dir(&format!("conn-{n}"));
        Arc::new(Bodies::new(dir, 4 << 20, 1 << 20).unwrap())
    }

    fn text(d: &crate::message::Data) -> String {
        String::from_utf8_lossy(&d.to_bytes().unwrap()).into_owned()
    }

    /// Runs one session over an in-memory stream; returns the client end, the
    /// intake and the task driving the server end.
    fn session() -> (DuplexStream, Arc<MemIntake>, tokio::task::JoinHandle<()>) {
        session_with(0)
    }

    fn session_with(
        min_data_rate: u64,
    ) -> (DuplexStream, Arc<MemIntake>, tokio::task::JoinHandle<()>) {
        let (client, server) = tokio::io::duplex(1 << 16);
        let intake = Arc::new(MemIntake::default());
        let mut sh = ctx(intake.clone());
        sh.min_data_rate = min_data_rate;
        let task = tokio::spawn(async move {
            let (_phase_tx, phase) = watch::channel(Phase::Running);
            let mut conn = Conn::new(server, Instant::now() + sh.session_timeout, phase);
            let mut s = Session::new(
                sh.cfg.clone(),
                "127.0.0.1".parse().unwrap(),
                SourceKind::Dedicated,
                None,
            );
            let _ = drive(&mut conn, &mut s, &sh, true).await;
        });
        (client, intake, task)
    }

    /// Reads reply lines until `n` final ones (code + space) have come.
    async fn replies(c: &mut DuplexStream, n: usize) -> Vec<u16> {
        let mut text = String::new();
        let mut codes = Vec::new();
        let mut buf = [0u8; 4096];
        while codes.len() < n {
            let k = c.read(&mut buf).await.unwrap();
            if k == 0 {
                break;
            }
            text.push_str(&String::from_utf8_lossy(&buf[..k]));
            while let Some(end) = text.find("\r\n") {
                let line: String = text.drain(..end + 2).collect();
                if line.as_bytes().get(3) == Some(&b' ') {
                    codes.push(line[..3].parse().unwrap());
                }
            }
        }
        codes
    }

    /// A whole pipelined transaction in one write: every reply comes back in order
    /// and the message is handed to the queue as sent.
    #[tokio::test(start_paused = true)]
    async fn pipelined_transaction_in_one_write() {
        let (mut c, intake, task) = session();
        assert_eq!(replies(&mut c, 1).await, [220]);
        c.write_all(
            b"EHLO c.test\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<b@p.test>\r\nRCPT TO:<c@p.test>\r\nDATA\r\n",
        )
        .await
        .unwrap();
        assert_eq!(replies(&mut c, 5).await, [250, 250, 250, 250, 354]);
        c.write_all(b"Subject: x\r\n\r\n..dot\r\n.\r\nQUIT\r\n")
            .await
            .unwrap();
        assert_eq!(replies(&mut c, 2).await, [250, 221]);
        task.await.unwrap();
        let taken = intake.taken.lock().unwrap();
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].envelope.recipients.len(), 2);
        assert!(text(&taken[0].data).ends_with("Subject: x\r\n\r\n.dot\r\n"));
    }

    /// BDAT chunks make one message, line endings made CRLF as in DATA.
    #[tokio::test(start_paused = true)]
    async fn bdat_chunks_make_one_message() {
        let (mut c, intake, task) = session();
        replies(&mut c, 1).await;
        c.write_all(b"EHLO c.test\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<b@p.test>\r\n")
            .await
            .unwrap();
        assert_eq!(replies(&mut c, 3).await, [250, 250, 250]);
        c.write_all(b"BDAT 14\r\nSubject: y\r\n\r\nBDAT 6 LAST\r\n.body\n")
            .await
            .unwrap();
        assert_eq!(replies(&mut c, 2).await, [250, 250]);
        c.write_all(b"QUIT\r\n").await.unwrap();
        assert_eq!(replies(&mut c, 1).await, [221]);
        task.await.unwrap();
        let taken = intake.taken.lock().unwrap();
        assert!(text(&taken[0].data).ends_with("Subject: y\r\n\r\n.body\r\n"));
    }

    /// A silent client is closed with 421 4.4.2 after `command_timeout`, not before.
    #[tokio::test(start_paused = true)]
    async fn command_timeout_closes_with_421() {
        let (mut c, _, task) = session();
        replies(&mut c, 1).await;
        c.write_all(b"EHLO c.test\r\n").await.unwrap();
        assert_eq!(replies(&mut c, 1).await, [250]);
        let t0 = Instant::now();
        assert_eq!(replies(&mut c, 1).await, [421]);
        assert_eq!(t0.elapsed().as_secs(), CMD.as_secs());
        task.await.unwrap();
    }

    /// `command_timeout` bounds a whole command line from its first octet: one octet
    /// every 100 s keeps each read well inside the timeout, and the line is still cut
    /// `command_timeout` after it began, not after the last read.
    #[tokio::test(start_paused = true)]
    async fn a_dripped_command_line_is_cut_a_timeout_after_its_first_octet() {
        let (mut c, _, task) = session();
        replies(&mut c, 1).await;
        tokio::time::sleep(Duration::from_secs(100)).await;
        let t0 = Instant::now();
        let (mut rd, mut wr) = tokio::io::split(c);
        let drip = tokio::spawn(async move {
            for b in b"NOOP and more and more" {
                if wr.write_all(&[*b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(100)).await;
            }
        });
        let mut rest = Vec::new();
        let _ = rd.read_to_end(&mut rest).await;
        assert_eq!(
            t0.elapsed(),
            CMD,
            "cut command_timeout after the first octet"
        );
        assert!(
            String::from_utf8_lossy(&rest).starts_with("421 4.4.2"),
            "{rest:?}"
        );
        drip.abort();
        task.await.unwrap();
    }

    /// Inside DATA, `data_timeout` runs from the last kilobyte, not from the last read:
    /// with no minimum rate, one octet every 100 s is cut `data_timeout` after the 354.
    #[tokio::test(start_paused = true)]
    async fn a_dripped_body_is_cut_a_data_timeout_after_its_last_progress() {
        let (mut c, intake, task) = session();
        replies(&mut c, 1).await;
        c.write_all(b"EHLO c.test\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<b@p.test>\r\nDATA\r\n")
            .await
            .unwrap();
        assert_eq!(replies(&mut c, 4).await, [250, 250, 250, 354]);
        let t0 = Instant::now();
        let (mut rd, mut wr) = tokio::io::split(c);
        let drip = tokio::spawn(async move {
            for _ in 0..60 {
                if wr.write_all(b"x").await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(100)).await;
            }
        });
        let mut got = Vec::new();
        let _ = rd.read_to_end(&mut got).await;
        let cut = t0.elapsed();
        assert!(
            String::from_utf8_lossy(&got).starts_with("421 4.4.2"),
            "{got:?}"
        );
        assert_eq!(cut, DATA, "cut at data_timeout after the 354");
        drip.abort();
        task.await.unwrap();
        assert!(intake.taken.lock().unwrap().is_empty());
    }

    /// A slow sender that makes progress (a kilobyte now and then, each well inside
    /// `data_timeout`) is not cut, however long the whole body takes.
    #[tokio::test(start_paused = true)]
    async fn a_slow_body_that_progresses_is_taken() {
        let (mut c, intake, task) = session();
        replies(&mut c, 1).await;
        c.write_all(b"EHLO c.test\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<b@p.test>\r\nDATA\r\n")
            .await
            .unwrap();
        assert_eq!(replies(&mut c, 4).await, [250, 250, 250, 354]);
        let line = [b'y'; 1022];
        for _ in 0..5 {
            c.write_all(&line).await.unwrap();
            c.write_all(b"\r\n").await.unwrap();
            tokio::time::sleep(DATA - Duration::from_secs(60)).await;
        }
        c.write_all(b".\r\nQUIT\r\n").await.unwrap();
        assert_eq!(replies(&mut c, 2).await, [250, 221]);
        task.await.unwrap();
        assert_eq!(intake.taken.lock().unwrap().len(), 1);
    }

    /// A client that stops in the middle of DATA is closed after `data_timeout`, and
    /// nothing is queued.
    #[tokio::test(start_paused = true)]
    async fn data_timeout_closes_with_421_and_queues_nothing() {
        let (mut c, intake, task) = session();
        replies(&mut c, 1).await;
        c.write_all(b"EHLO c.test\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<b@p.test>\r\nDATA\r\n")
            .await
            .unwrap();
        assert_eq!(replies(&mut c, 4).await, [250, 250, 250, 354]);
        c.write_all(b"Subject: half\r\n").await.unwrap();
        let t0 = Instant::now();
        assert_eq!(replies(&mut c, 1).await, [421]);
        assert_eq!(t0.elapsed().as_secs(), DATA.as_secs());
        task.await.unwrap();
        assert!(intake.taken.lock().unwrap().is_empty());
    }

    /// However busy, a session ends at `session_timeout`.
    #[tokio::test(start_paused = true)]
    async fn session_timeout_ends_a_busy_session() {
        let (mut c, _, task) = session();
        replies(&mut c, 1).await;
        let t0 = Instant::now();
        let mut n = 0;
        loop {
            tokio::time::sleep(Duration::from_secs(60)).await;
            if c.write_all(b"NOOP\r\n").await.is_err() {
                break;
            }
            let got = replies(&mut c, 1).await;
            n += 1;
            if got.last() != Some(&250) {
                assert_eq!(got.last(), Some(&421));
                break;
            }
        }
        assert!(n >= 59, "{n} commands");
        assert!(t0.elapsed() >= SESSION && t0.elapsed() < SESSION + Duration::from_secs(61));
        task.await.unwrap();
    }

    /// `server.min_data_rate`: a body dripped slower than the minimum is cut with 421
    /// 4.4.2 once the grace is used up, though every chunk beats the data timeout.
    #[tokio::test(start_paused = true)]
    async fn a_body_below_the_minimum_rate_is_cut() {
        let (mut c, intake, task) = session_with(1000);
        replies(&mut c, 1).await;
        c.write_all(b"EHLO c.test\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<b@p.test>\r\nDATA\r\n")
            .await
            .unwrap();
        assert_eq!(replies(&mut c, 4).await, [250, 250, 250, 354]);
        let t0 = Instant::now();
        let dripping = tokio::spawn(async move {
            // 10 octets a second, far under 1,000.
            for _ in 0..120 {
                if c.write_all(b"xxxxxxxx\r\n").await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            c
        });
        let mut c = dripping.await.unwrap();
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest).await;
        let text = String::from_utf8_lossy(&rest);
        assert!(text.starts_with("421 4.4.2"), "{text}");
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "cut only at {:?}",
            t0.elapsed()
        );
        task.await.unwrap();
        assert!(intake.taken.lock().unwrap().is_empty());
    }
}
