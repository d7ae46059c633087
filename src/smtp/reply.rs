//! The replies this server writes to its clients (`WireReply`; the replies recorded
//! from upstream servers are `envelope::Reply`): code, enhanced status code (RFC 3463) and text, written in wire form.

use std::borrow::Cow;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireReply {
    pub code: u16,
    /// Enhanced status code, empty for replies that carry none (220, 221 banners are
    /// allowed one, but greetings and EHLO lines traditionally omit it).
    pub esc: &'static str,
    pub lines: Vec<Cow<'static, str>>,
}

impl WireReply {
    pub fn new(code: u16, esc: &'static str, text: impl Into<Cow<'static, str>>) -> WireReply {
        WireReply {
            code,
            esc,
            lines: vec![text.into()],
        }
    }

    pub fn multi(code: u16, lines: Vec<Cow<'static, str>>) -> WireReply {
        WireReply {
            code,
            esc: "",
            lines,
        }
    }

    pub fn write_to(&self, out: &mut Vec<u8>) {
        let last = self.lines.len().saturating_sub(1);
        for (i, line) in self.lines.iter().enumerate() {
            out.extend_from_slice(self.code.to_string().as_bytes());
            out.push(if i == last { b' ' } else { b'-' });
            if !self.esc.is_empty() {
                out.extend_from_slice(self.esc.as_bytes());
                out.push(b' ');
            }
            // A reply line must not carry CR or LF of its own (they would forge replies).
            for &b in line.as_bytes() {
                out.push(if b == b'\r' || b == b'\n' { b' ' } else { b });
            }
            out.extend_from_slice(b"\r\n");
        }
    }

    pub fn text(&self) -> String {
        let mut v = Vec::new();
        self.write_to(&mut v);
        String::from_utf8_lossy(&v).trim_end().to_string()
    }
}

/// The replies used in more than one place, so their wording stays the same.
pub mod common {
    use super::WireReply;

    pub fn ok() -> WireReply {
        WireReply::new(250, "2.0.0", "Ok")
    }
    pub fn bad_sequence(what: &'static str) -> WireReply {
        WireReply::new(503, "5.5.1", what)
    }
    pub fn line_too_long() -> WireReply {
        WireReply::new(500, "5.5.2", "Line too long")
    }
    pub fn too_many_errors() -> WireReply {
        WireReply::new(421, "4.7.0", "Too many errors, closing connection")
    }
    pub fn timeout() -> WireReply {
        WireReply::new(421, "4.4.2", "Timeout exceeded, closing connection")
    }
    pub fn too_slow() -> WireReply {
        WireReply::new(421, "4.4.2", "Data rate too low, closing connection")
    }
    pub fn memory_busy() -> WireReply {
        WireReply::new(
            421,
            "4.3.2",
            "Too much mail in flight, try again later; closing connection",
        )
    }
    pub fn body_unwritable() -> WireReply {
        WireReply::new(
            421,
            "4.3.0",
            "Cannot hold the message now, try again later; closing connection",
        )
    }
    pub fn body_unreadable() -> WireReply {
        WireReply::new(
            451,
            "4.3.0",
            "Cannot read the message back now, try again later",
        )
    }
    pub fn shutting_down() -> WireReply {
        WireReply::new(421, "4.3.0", "Service shutting down, closing connection")
    }
    pub fn size_exceeded() -> WireReply {
        WireReply::new(
            552,
            "5.3.4",
            "Message size exceeds fixed maximum message size",
        )
    }
    pub fn queue_unavailable() -> WireReply {
        WireReply::new(452, "4.3.1", "Insufficient system storage, try again later")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiline_wire_form() {
        let r = WireReply::multi(
            250,
            vec!["relay.test".into(), "PIPELINING".into(), "SIZE 10".into()],
        );
        let mut out = Vec::new();
        r.write_to(&mut out);
        assert_eq!(out, b"250-relay.test\r\n250-PIPELINING\r\n250 SIZE 10\r\n");
    }

    #[test]
    fn text_cannot_inject_lines() {
        let mut out = Vec::new();
        WireReply::new(550, "5.7.1", "a\r\n250 ok").write_to(&mut out);
        assert_eq!(out, b"550 5.7.1 a  250 ok\r\n");
    }
}
