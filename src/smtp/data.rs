//! The DATA body receiver (RFC 5321 §4.1.1.4, §4.5.2).
//!
//! The end of data is CRLF "." CRLF and nothing else. A bare CR or a bare LF is content,
//! never a line end: that is what keeps `\n.\n`, `\r.\r`, `\n.\r\n` and `\r\n.\n` from
//! ending (and so splitting) a message, the SMTP smuggling class of attacks. Depending on
//! policy such bytes are rewritten to CRLF or make the message refused.
//!
//! Dot-unstuffing removes the leading "." of a line only when the line began after a real
//! CRLF and goes on with ordinary content.

use crate::config::BareLineEndings;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line: after the DATA command's CRLF or after a CRLF in the body.
    LineStart,
    Mid,
    /// A CR was seen and not yet written: CRLF if LF follows, else a bare CR.
    Cr,
    /// The line began with ".".
    Dot,
    /// The line began with ".", then CR: the end of data if LF follows.
    DotCr,
}

#[derive(Debug, PartialEq, Eq)]
pub enum DataError {
    TooBig,
    BareLineEnding,
}

/// Unstuffs and checks a DATA body; the octets go to a buffer the caller owns (and may
/// empty between calls, to a file).
pub struct DataReceiver {
    state: State,
    max: u64,
    policy: BareLineEndings,
    /// Octets of the message so far, whatever was taken out of the buffer.
    len: u64,
    too_big: bool,
    bare_seen: bool,
}

impl DataReceiver {
    pub fn new(max: u64, policy: BareLineEndings) -> DataReceiver {
        DataReceiver {
            state: State::LineStart,
            max,
            policy,
            len: 0,
            too_big: false,
            bare_seen: false,
        }
    }

    /// Consumes input, appending the message's octets to `out`. Returns `Some(n)` when
    /// the end of data was found after `n` bytes of `input` (what follows belongs to the
    /// next command), `None` when all of it was taken.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Option<usize> {
        let mut i = 0;
        while i < input.len() {
            if self.state == State::Mid {
                // Fast path: copy ordinary bytes up to the next CR or LF in one go.
                match memchr::memchr2(b'\r', b'\n', &input[i..]) {
                    Some(k) => {
                        self.emit(out, &input[i..i + k]);
                        i += k;
                    }
                    None => {
                        self.emit(out, &input[i..]);
                        return None;
                    }
                }
            }
            let b = input[i];
            i += 1;
            match (self.state, b) {
                (State::LineStart, b'.') => self.state = State::Dot,
                (State::LineStart | State::Mid, b'\r') => self.state = State::Cr,
                (State::LineStart | State::Mid, b'\n') => self.bare(out),
                (State::LineStart | State::Mid, _) => {
                    self.emit(out, &[b]);
                    self.state = State::Mid;
                }
                (State::Cr, b'\n') => {
                    self.emit(out, b"\r\n");
                    self.state = State::LineStart;
                }
                (State::Cr, b'\r') => {
                    // The first CR was bare; the second waits for its LF.
                    self.bare(out);
                    self.state = State::Cr;
                }
                (State::Cr, _) => {
                    self.bare(out);
                    self.content_after_bare(out, b);
                }
                (State::Dot, b'\r') => self.state = State::DotCr,
                (State::Dot, b'\n') => {
                    // ".\n" is not an end; keep the dot as written.
                    self.emit(out, b".");
                    self.bare(out);
                }
                (State::Dot, _) => {
                    // Unstuff: the line's first "." goes, the rest is content.
                    self.emit(out, &[b]);
                    self.state = State::Mid;
                }
                (State::DotCr, b'\n') => {
                    self.state = State::LineStart;
                    return Some(i);
                }
                (State::DotCr, b'\r') => {
                    self.emit(out, b".");
                    self.bare(out);
                    self.state = State::Cr;
                }
                (State::DotCr, _) => {
                    self.emit(out, b".");
                    self.bare(out);
                    self.content_after_bare(out, b);
                }
            }
        }
        None
    }

    /// Whether the message may be kept, once `feed` reported the end.
    pub fn finish(&self) -> Result<(), DataError> {
        if self.too_big {
            Err(DataError::TooBig)
        } else if self.bare_seen {
            Err(DataError::BareLineEnding)
        } else {
            Ok(())
        }
    }

    /// Octets of the message so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A bare CR or LF: written as CRLF (normalize) or remembered (reject). It is never a
    /// line start for unstuffing or for the end of data.
    fn bare(&mut self, out: &mut Vec<u8>) {
        match self.policy {
            BareLineEndings::Normalize => self.emit(out, b"\r\n"),
            BareLineEndings::Reject => self.bare_seen = true,
        }
        self.state = State::Mid;
    }

    fn content_after_bare(&mut self, out: &mut Vec<u8>, b: u8) {
        match b {
            b'\n' => self.bare(out),
            _ => {
                self.emit(out, &[b]);
                self.state = State::Mid;
            }
        }
    }

    fn emit(&mut self, out: &mut Vec<u8>, bytes: &[u8]) {
        if self.too_big {
            return;
        }
        if self.len + bytes.len() as u64 > self.max {
            // Keep reading to the real end so the session stays in step, but store no more.
            self.too_big = true;
            out.clear();
            return;
        }
        self.len += bytes.len() as u64;
        out.extend_from_slice(bytes);
    }
}

/// Line endings of a BDAT text body (RFC 3030 leaves them to the client, who must send
/// CRLF): bare CR and bare LF are rewritten to CRLF or make the message refused, as in
/// DATA. A CR at a chunk's end waits for the next chunk's first octet.
#[derive(Debug)]
pub struct LineEndings {
    policy: BareLineEndings,
    cr: bool,
    bare_seen: bool,
}

impl LineEndings {
    pub fn new(policy: BareLineEndings) -> LineEndings {
        LineEndings {
            policy,
            cr: false,
            bare_seen: false,
        }
    }

    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let mut i = 0;
        while i < input.len() {
            if !self.cr {
                match memchr::memchr2(b'\r', b'\n', &input[i..]) {
                    Some(k) => {
                        out.extend_from_slice(&input[i..i + k]);
                        i += k;
                    }
                    None => {
                        out.extend_from_slice(&input[i..]);
                        return;
                    }
                }
            }
            let b = input[i];
            i += 1;
            match (self.cr, b) {
                (true, b'\n') => {
                    out.extend_from_slice(b"\r\n");
                    self.cr = false;
                }
                (true, b'\r') => self.bare(out),
                (true, _) => {
                    self.bare(out);
                    self.cr = false;
                    out.push(b);
                }
                (false, b'\r') => self.cr = true,
                (false, _) => self.bare(out),
            }
        }
    }

    /// After the last chunk: a CR still waiting was bare.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), DataError> {
        if self.cr {
            self.cr = false;
            self.bare(out);
        }
        if self.bare_seen {
            Err(DataError::BareLineEnding)
        } else {
            Ok(())
        }
    }

    fn bare(&mut self, out: &mut Vec<u8>) {
        match self.policy {
            BareLineEndings::Normalize => out.extend_from_slice(b"\r\n"),
            BareLineEndings::Reject => self.bare_seen = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(policy: BareLineEndings, input: &[u8]) -> (Result<Vec<u8>, DataError>, Option<usize>) {
        let mut r = DataReceiver::new(1 << 20, policy);
        let mut out = Vec::new();
        let end = r.feed(input, &mut out);
        assert_eq!(r.len(), out.len() as u64);
        (r.finish().map(|()| out), end)
    }

    fn body(input: &[u8]) -> Vec<u8> {
        let (res, end) = run(BareLineEndings::Normalize, input);
        assert!(end.is_some(), "no end found in {input:?}");
        res.unwrap()
    }

    #[test]
    fn plain_message_and_rest() {
        let input = b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n";
        let (res, end) = run(BareLineEndings::Normalize, input);
        assert_eq!(res.unwrap(), b"Subject: x\r\n\r\nhello\r\n");
        assert_eq!(&input[end.unwrap()..], b"QUIT\r\n");
    }

    #[test]
    fn empty_message() {
        assert_eq!(body(b".\r\n"), b"");
    }

    #[test]
    fn dot_unstuffing() {
        assert_eq!(body(b"..hidden\r\n...\r\n.\r\n"), b".hidden\r\n..\r\n");
        assert_eq!(body(b"a.b\r\n .x\r\n.\r\n"), b"a.b\r\n .x\r\n");
    }

    #[test]
    fn smuggling_sequences_never_end_the_message() {
        for sep in [
            &b"\n.\n"[..],
            b"\r.\r",
            b"\n.\r\n",
            b"\r\n.\n",
            b"\r.\r\n",
            b"\n.\r",
        ] {
            let mut input = b"A: b\r\n\r\nfirst".to_vec();
            input.extend_from_slice(sep);
            input.extend_from_slice(
                b"MAIL FROM:<x@evil.test>\r\nRCPT TO:<y@v.test>\r\nDATA\r\nsmuggled\r\n",
            );
            let (res, end) = run(BareLineEndings::Normalize, &input);
            assert_eq!(end, None, "{sep:?} ended the message");
            input.extend_from_slice(b".\r\n");
            let out = body(&input);
            // Everything up to the real end is one message.
            assert!(out.ends_with(b"smuggled\r\n"));
            assert!(out.windows(10).any(|w| w == b"MAIL FROM:"));
            let _ = res;
        }
    }

    #[test]
    fn bare_endings_are_normalized() {
        assert_eq!(body(b"a\nb\rc\r\n.\r\n"), b"a\r\nb\r\nc\r\n");
        assert_eq!(body(b"x\r\n.\nY\r\n.\r\n"), b"x\r\n.\r\nY\r\n");
        assert_eq!(body(b"x\r\n.\r.\r\n.\r\n"), b"x\r\n.\r\n.\r\n");
        assert_eq!(body(b"x\r\r\n.\r\n"), b"x\r\n\r\n");
    }

    #[test]
    fn bare_endings_rejected_but_stream_stays_in_step() {
        let input = b"a\nb\r\n.\r\nNOOP\r\n";
        let (res, end) = run(BareLineEndings::Reject, input);
        assert_eq!(res, Err(DataError::BareLineEnding));
        assert_eq!(&input[end.unwrap()..], b"NOOP\r\n");
    }

    #[test]
    fn size_enforced_while_reading() {
        let mut r = DataReceiver::new(10, BareLineEndings::Normalize);
        let mut out = Vec::new();
        assert_eq!(r.feed(b"0123456789abcdef\r\n", &mut out), None);
        assert!(out.is_empty(), "nothing kept beyond the limit");
        assert!(r.feed(b".\r\n", &mut out).is_some());
        assert_eq!(r.finish(), Err(DataError::TooBig));
    }

    #[test]
    fn byte_at_a_time_matches_whole() {
        let input = b"H: v\r\n\r\n..a\nb\r.\rc\r\n.x\r\n\r\n.\r\n";
        let whole = body(input);
        let mut r = DataReceiver::new(1 << 20, BareLineEndings::Normalize);
        let mut out = Vec::new();
        let mut ended = None;
        for (i, b) in input.iter().enumerate() {
            if r.feed(std::slice::from_ref(b), &mut out).is_some() {
                ended = Some(i + 1);
                break;
            }
            // The caller may take what came so far at any point.
            if i % 5 == 0 {
                let taken = std::mem::take(&mut out);
                out.extend_from_slice(&taken);
            }
        }
        assert_eq!(ended, Some(input.len()));
        assert_eq!(r.finish(), Ok(()));
        assert_eq!(out, whole);
    }

    fn chunks(policy: BareLineEndings, parts: &[&[u8]]) -> Result<Vec<u8>, DataError> {
        let mut fix = LineEndings::new(policy);
        let mut out = Vec::new();
        for p in parts {
            fix.feed(p, &mut out);
        }
        fix.finish(&mut out).map(|()| out)
    }

    #[test]
    fn bdat_line_endings_are_normalized_across_chunks() {
        let n = BareLineEndings::Normalize;
        assert_eq!(chunks(n, &[b"a\r\nb\r\n"]).unwrap(), b"a\r\nb\r\n");
        assert_eq!(
            chunks(n, &[b"a\nb\rc\r\r\n"]).unwrap(),
            b"a\r\nb\r\nc\r\n\r\n"
        );
        // A CRLF split between chunks is one line end, not a bare CR and a bare LF.
        assert_eq!(
            chunks(n, &[b"a\r", b"\nb\r", b"x"]).unwrap(),
            b"a\r\nb\r\nx"
        );
        assert_eq!(chunks(n, &[b"end\r"]).unwrap(), b"end\r\n");
        assert_eq!(chunks(n, &[b"\n.\n"]).unwrap(), b"\r\n.\r\n");
    }

    #[test]
    fn bdat_bare_endings_rejected() {
        let r = BareLineEndings::Reject;
        assert_eq!(chunks(r, &[b"a\r", b"\nb\r\n"]).unwrap(), b"a\r\nb\r\n");
        assert_eq!(chunks(r, &[b"a\nb"]), Err(DataError::BareLineEnding));
        assert_eq!(chunks(r, &[b"a\r"]), Err(DataError::BareLineEnding));
    }
}
