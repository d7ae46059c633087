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

pub struct DataReceiver {
    state: State,
    max: u64,
    policy: BareLineEndings,
    out: Vec<u8>,
    too_big: bool,
    bare_seen: bool,
}

impl DataReceiver {
    pub fn new(max: u64, policy: BareLineEndings) -> DataReceiver {
        DataReceiver {
            state: State::LineStart,
            max,
            policy,
            out: Vec::with_capacity(8192),
            too_big: false,
            bare_seen: false,
        }
    }

    /// Consumes input. Returns `Some(n)` when the end of data was found after `n` bytes of
    /// `input` (what follows belongs to the next command), `None` when all of it was taken.
    pub fn feed(&mut self, input: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < input.len() {
            if self.state == State::Mid {
                // Fast path: copy ordinary bytes up to the next CR or LF in one go.
                match memchr::memchr2(b'\r', b'\n', &input[i..]) {
                    Some(k) => {
                        self.emit(&input[i..i + k]);
                        i += k;
                    }
                    None => {
                        self.emit(&input[i..]);
                        return None;
                    }
                }
            }
            let b = input[i];
            i += 1;
            match (self.state, b) {
                (State::LineStart, b'.') => self.state = State::Dot,
                (State::LineStart | State::Mid, b'\r') => self.state = State::Cr,
                (State::LineStart | State::Mid, b'\n') => self.bare(),
                (State::LineStart | State::Mid, _) => {
                    self.emit(&[b]);
                    self.state = State::Mid;
                }
                (State::Cr, b'\n') => {
                    self.emit(b"\r\n");
                    self.state = State::LineStart;
                }
                (State::Cr, b'\r') => {
                    // The first CR was bare; the second waits for its LF.
                    self.bare();
                    self.state = State::Cr;
                }
                (State::Cr, _) => {
                    self.bare();
                    self.content_after_bare(b);
                }
                (State::Dot, b'\r') => self.state = State::DotCr,
                (State::Dot, b'\n') => {
                    // ".\n" is not an end; keep the dot as written.
                    self.emit(b".");
                    self.bare();
                }
                (State::Dot, _) => {
                    // Unstuff: the line's first "." goes, the rest is content.
                    self.emit(&[b]);
                    self.state = State::Mid;
                }
                (State::DotCr, b'\n') => {
                    self.state = State::LineStart;
                    return Some(i);
                }
                (State::DotCr, b'\r') => {
                    self.emit(b".");
                    self.bare();
                    self.state = State::Cr;
                }
                (State::DotCr, _) => {
                    self.emit(b".");
                    self.bare();
                    self.content_after_bare(b);
                }
            }
        }
        None
    }

    /// The message, once `feed` reported the end.
    pub fn finish(self) -> Result<Vec<u8>, DataError> {
        if self.too_big {
            Err(DataError::TooBig)
        } else if self.bare_seen {
            Err(DataError::BareLineEnding)
        } else {
            Ok(self.out)
        }
    }

    pub fn len(&self) -> usize {
        self.out.len()
    }

    pub fn is_empty(&self) -> bool {
        self.out.is_empty()
    }

    /// A bare CR or LF: written as CRLF (normalize) or remembered (reject). It is never a
    /// line start for unstuffing or for the end of data.
    fn bare(&mut self) {
        match self.policy {
            BareLineEndings::Normalize => self.emit(b"\r\n"),
            BareLineEndings::Reject => self.bare_seen = true,
        }
        self.state = State::Mid;
    }

    fn content_after_bare(&mut self, b: u8) {
        match b {
            b'\n' => self.bare(),
            _ => {
                self.emit(&[b]);
                self.state = State::Mid;
            }
        }
    }

    fn emit(&mut self, bytes: &[u8]) {
        if self.too_big {
            return;
        }
        if self.out.len() as u64 + bytes.len() as u64 > self.max {
            // Keep reading to the real end so the session stays in step, but store no more.
            self.too_big = true;
            self.out = Vec::new();
            return;
        }
        self.out.extend_from_slice(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(policy: BareLineEndings, input: &[u8]) -> (Result<Vec<u8>, DataError>, Option<usize>) {
        let mut r = DataReceiver::new(1 << 20, policy);
        let end = r.feed(input);
        (r.finish(), end)
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
        assert_eq!(r.feed(b"0123456789abcdef\r\n"), None);
        assert!(r.is_empty(), "nothing kept beyond the limit");
        assert!(r.feed(b".\r\n").is_some());
        assert_eq!(r.finish(), Err(DataError::TooBig));
    }

    #[test]
    fn byte_at_a_time_matches_whole() {
        let input = b"H: v\r\n\r\n..a\nb\r.\rc\r\n.x\r\n\r\n.\r\n";
        let whole = body(input);
        let mut r = DataReceiver::new(1 << 20, BareLineEndings::Normalize);
        let mut ended = None;
        for (i, b) in input.iter().enumerate() {
            if r.feed(std::slice::from_ref(b)).is_some() {
                ended = Some(i + 1);
                break;
            }
        }
        assert_eq!(ended, Some(input.len()));
        assert_eq!(r.finish().unwrap(), whole);
    }
}
