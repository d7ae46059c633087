//! The header fields tenant proof reads, located with mail-parser's offsets so that a
//! field can be removed without touching a byte of the rest of the message.

use std::ops::Range;
use std::sync::OnceLock;

use mail_parser::MessageParser;

/// One header field: its name as written and where the whole field (name, value and
/// line ending, continuation lines included) lies in the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field<'a> {
    pub name: &'a str,
    /// The value: after the colon, up to the end of the field.
    pub value: &'a [u8],
    pub span: Range<usize>,
}

fn parser() -> &'static MessageParser {
    static PARSER: OnceLock<MessageParser> = OnceLock::new();
    // No field is decoded: we need names and offsets, not structured values.
    PARSER.get_or_init(|| MessageParser::new().default_header_raw())
}

/// The header fields of `message`, in order. An unparsable header section has none.
pub fn fields(message: &[u8]) -> Vec<Field<'_>> {
    let Some(parsed) = parser().parse_headers(message) else {
        return Vec::new();
    };
    parsed
        .headers()
        .iter()
        .filter_map(|h| {
            let start = h.offset_field as usize;
            let value_start = h.offset_start as usize;
            let end = h.offset_end as usize;
            // The name as written: up to the colon that `offset_start` follows.
            let name = message.get(start..value_start.checked_sub(1)?)?;
            let name = std::str::from_utf8(name).ok()?.trim_end();
            message.get(start..end)?;
            Some(Field {
                name,
                value: message.get(value_start..end)?,
                span: start..end,
            })
        })
        .collect()
}

/// A message's header section, parsed once for every question asked of it.
pub struct Headers<'a> {
    message: &'a [u8],
    fields: Vec<Field<'a>>,
}

impl<'a> Headers<'a> {
    pub fn parse(message: &'a [u8]) -> Headers<'a> {
        Headers {
            message,
            fields: fields(message),
        }
    }

    /// The values of every field called `name` (case-insensitive), unfolded and trimmed.
    pub fn values(&self, name: &str) -> Vec<Vec<u8>> {
        self.fields
            .iter()
            .filter(|f| f.name.eq_ignore_ascii_case(name))
            .map(|f| unfold(f.value))
            .collect()
    }

    /// The message without any field called `name`; `None` when there is none.
    pub fn without(&self, name: &str) -> Option<Vec<u8>> {
        let mut spans = self
            .fields
            .iter()
            .filter(|f| f.name.eq_ignore_ascii_case(name))
            .map(|f| f.span.clone())
            .peekable();
        spans.peek()?;
        let mut out = Vec::with_capacity(self.message.len());
        let mut pos = 0;
        for span in spans {
            out.extend_from_slice(self.message.get(pos..span.start)?);
            pos = span.end;
        }
        out.extend_from_slice(self.message.get(pos..)?);
        Some(out)
    }
}

/// The values of every field called `name` in `message`.
pub fn values(message: &[u8], name: &str) -> Vec<Vec<u8>> {
    Headers::parse(message).values(name)
}

/// `message` without any field called `name`; `None` when there is none to remove.
pub fn without(message: &[u8], name: &str) -> Option<Vec<u8>> {
    Headers::parse(message).without(name)
}

/// RFC 5322 §2.2.3: a folded value is the same value with the CRLFs taken out; leading
/// and trailing white space is not part of it.
fn unfold(value: &[u8]) -> Vec<u8> {
    let unfolded: Vec<u8> = value
        .iter()
        .copied()
        .filter(|b| *b != b'\r' && *b != b'\n')
        .collect();
    unfolded.trim_ascii().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG: &[u8] = b"From: a@contoso.test\r\nX-Route: s3cr\r\n et\r\nSubject: hi\r\nx-route:  two\r\n\r\nbody\r\nX-Route: not a header\r\n";

    #[test]
    fn values_are_unfolded_and_case_insensitive() {
        assert_eq!(
            values(MSG, "X-ROUTE"),
            vec![b"s3cr et".to_vec(), b"two".to_vec()]
        );
        assert_eq!(values(MSG, "Subject"), vec![b"hi".to_vec()]);
        assert!(values(MSG, "X-Missing").is_empty());
    }

    #[test]
    fn removal_keeps_every_other_byte() {
        let out = without(MSG, "x-route").unwrap();
        assert_eq!(
            out,
            b"From: a@contoso.test\r\nSubject: hi\r\n\r\nbody\r\nX-Route: not a header\r\n"
        );
        assert_eq!(without(MSG, "X-Missing"), None);
    }

    #[test]
    fn bare_lf_and_a_body_less_message() {
        let m = b"X-Route: a\nFrom: b@c.test\n";
        assert_eq!(values(m, "x-route"), vec![b"a".to_vec()]);
        assert_eq!(without(m, "x-route").unwrap(), b"From: b@c.test\n");
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..400 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    b"X-Route: :\r\n \tab\xff"[(seed % 16) as usize]
                })
                .collect();
            let _ = values(&bytes, "x-route");
            if let Some(out) = without(&bytes, "x-route") {
                assert!(out.len() < bytes.len());
            }
        }
    }
}
