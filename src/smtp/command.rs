//! SMTP command grammar (RFC 5321 §4.1, RFC 1870 SIZE, RFC 6152 8BITMIME, RFC 3030
//! CHUNKING/BINARYMIME, RFC 6531 SMTPUTF8, RFC 3461 DSN). Takes one command line without
//! its CRLF and returns a typed command or the precise reason it is not one.

use crate::envelope::{BodyType, Notify, Ret};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Ehlo(String),
    Helo(String),
    Mail {
        sender: String,
        params: MailParams,
    },
    Rcpt {
        recipient: String,
        params: RcptParams,
    },
    Data,
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    Noop,
    Quit,
    Vrfy,
    Expn,
    Help,
    StartTls,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MailParams {
    pub size: Option<u64>,
    pub body: BodyType,
    pub smtputf8: bool,
    pub ret: Option<Ret>,
    pub envid: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RcptParams {
    pub notify: Option<Notify>,
    pub orcpt: Option<String>,
}

/// Why a line is not an acceptable command; each maps to one reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// 500 5.5.1
    #[error("command unrecognized")]
    Unrecognized,
    /// 502 5.5.1: a real SMTP command this server does not offer.
    #[error("command not implemented")]
    NotImplemented,
    /// 501 5.5.4 / 5.1.7 / 5.1.3: bad arguments.
    #[error("{0}")]
    Syntax(&'static str),
    /// 501 5.1.7 (sender) or 501 5.1.3 (recipient): malformed address.
    #[error("{0}")]
    BadAddress(&'static str),
    /// 555 5.5.4: a MAIL/RCPT parameter we do not know or did not advertise.
    #[error("unsupported parameter {0}")]
    UnknownParam(String),
}

impl Command {
    /// The command line (without CRLF) that parses back to this command: what a client
    /// would send. Used by the round-trip tests and the command fuzzer.
    pub fn encode(&self) -> String {
        match self {
            Command::Ehlo(d) => format!("EHLO {d}"),
            Command::Helo(d) => format!("HELO {d}"),
            Command::Mail { sender, params } => {
                let mut out = format!("MAIL FROM:<{sender}>");
                if let Some(size) = params.size {
                    out.push_str(&format!(" SIZE={size}"));
                }
                match params.body {
                    BodyType::SevenBit => {}
                    BodyType::EightBitMime => out.push_str(" BODY=8BITMIME"),
                    BodyType::BinaryMime => out.push_str(" BODY=BINARYMIME"),
                }
                if params.smtputf8 {
                    out.push_str(" SMTPUTF8");
                }
                match params.ret {
                    Some(Ret::Full) => out.push_str(" RET=FULL"),
                    Some(Ret::Hdrs) => out.push_str(" RET=HDRS"),
                    None => {}
                }
                if let Some(envid) = &params.envid {
                    out.push_str(&format!(" ENVID={envid}"));
                }
                out
            }
            Command::Rcpt { recipient, params } => {
                let mut out = format!("RCPT TO:<{recipient}>");
                if let Some(n) = params.notify {
                    out.push_str(&format!(" NOTIFY={}", n.keyword()));
                }
                if let Some(orcpt) = &params.orcpt {
                    out.push_str(&format!(" ORCPT={orcpt}"));
                }
                out
            }
            Command::Data => "DATA".into(),
            Command::Bdat { size, last } => {
                format!("BDAT {size}{}", if *last { " LAST" } else { "" })
            }
            Command::Rset => "RSET".into(),
            Command::Noop => "NOOP".into(),
            Command::Quit => "QUIT".into(),
            Command::Vrfy => "VRFY".into(),
            Command::Expn => "EXPN".into(),
            Command::Help => "HELP".into(),
            Command::StartTls => "STARTTLS".into(),
        }
    }
}

/// Which stage of a transaction a command line belongs to, from its verb alone, so a
/// line too long or too broken to parse is still told apart (for the MAIL/RCPT
/// length allowance and for labelling refusals).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Mail,
    Rcpt,
    Data,
    Other,
}

impl Stage {
    pub fn of(line: &[u8]) -> Stage {
        let verb = line.get(..4).unwrap_or(line);
        if verb.eq_ignore_ascii_case(b"MAIL") {
            Stage::Mail
        } else if verb.eq_ignore_ascii_case(b"RCPT") {
            Stage::Rcpt
        } else if verb.eq_ignore_ascii_case(b"DATA") || verb.eq_ignore_ascii_case(b"BDAT") {
            Stage::Data
        } else {
            Stage::Other
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Stage::Mail => "mail",
            Stage::Rcpt => "rcpt",
            Stage::Data => "data",
            Stage::Other => "other",
        }
    }
}

pub fn parse(line: &[u8]) -> Result<Command, CommandError> {
    let line = std::str::from_utf8(line).map_err(|_| CommandError::Syntax("Invalid UTF-8"))?;
    if line.contains(['\r', '\n', '\0']) {
        return Err(CommandError::Syntax("Bare CR, LF or NUL in command"));
    }
    let (verb, rest) = match line.find(' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, ""),
    };
    let upper = verb.to_ascii_uppercase();
    let no_args = |cmd: Command| {
        if rest.trim().is_empty() {
            Ok(cmd)
        } else {
            Err(CommandError::Syntax("Syntax error, no parameters allowed"))
        }
    };
    match upper.as_str() {
        "EHLO" => domain_arg(rest).map(Command::Ehlo),
        "HELO" => domain_arg(rest).map(Command::Helo),
        "MAIL" => parse_mail(rest),
        "RCPT" => parse_rcpt(rest),
        "DATA" => no_args(Command::Data),
        "BDAT" => parse_bdat(rest),
        "RSET" => no_args(Command::Rset),
        // NOOP, HELP and VRFY may carry a string that is ignored (RFC 5321 §4.1.1.9).
        "NOOP" => Ok(Command::Noop),
        "QUIT" => no_args(Command::Quit),
        "VRFY" => Ok(Command::Vrfy),
        "EXPN" => Ok(Command::Expn),
        "HELP" => Ok(Command::Help),
        "STARTTLS" => no_args(Command::StartTls),
        "AUTH" | "TURN" | "ETRN" | "ATRN" | "SEND" | "SOML" | "SAML" => {
            Err(CommandError::NotImplemented)
        }
        _ => Err(CommandError::Unrecognized),
    }
}

fn domain_arg(rest: &str) -> Result<String, CommandError> {
    let arg = rest.trim();
    if arg.is_empty() {
        return Err(CommandError::Syntax("Syntax: EHLO hostname"));
    }
    if arg.contains(char::is_whitespace) {
        return Err(CommandError::Syntax("Syntax: EHLO hostname (one argument)"));
    }
    if !(crate::envelope::is_valid_domain(arg) || crate::address::is_address_literal(arg)) {
        return Err(CommandError::Syntax("Invalid domain name"));
    }
    Ok(arg.to_string())
}

/// Splits `FROM:<path> params` after the keyword, tolerating spaces around the colon
/// (common in the wild, harmless).
fn keyword_path<'a>(rest: &'a str, keyword: &str) -> Option<(&'a str, &'a str)> {
    let rest = rest.trim_start();
    // `get` and not indexing: the client chooses the bytes, and a multi-byte character
    // straddling the keyword's length is not a char boundary.
    let head = rest.get(..keyword.len())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let rest = rest
        .get(keyword.len()..)?
        .trim_start()
        .strip_prefix(':')?
        .trim_start();
    if !rest.starts_with('<') {
        return None;
    }
    let end = path_end(rest)?;
    Some((&rest[..=end], rest[end + 1..].trim()))
}

/// Index of the `>` that closes a path, skipping quoted strings.
fn path_end(s: &str) -> Option<usize> {
    let bytes = s.as_bytes();
    let mut quoted = false;
    let mut i = 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            b'>' if !quoted => return Some(i),
            _ => {}
        }
        i += 1;
    }
    None
}

fn parse_mail(rest: &str) -> Result<Command, CommandError> {
    let (path, params) =
        keyword_path(rest, "FROM").ok_or(CommandError::Syntax("Syntax: MAIL FROM:<address>"))?;
    let sender = if path == "<>" {
        String::new()
    } else {
        crate::address::parse_path(path).map_err(CommandError::BadAddress)?
    };
    let mut p = MailParams::default();
    let mut seen = Vec::new();
    for param in params.split_ascii_whitespace() {
        let (key, value) = split_param(param);
        let key = key.to_ascii_uppercase();
        if seen.contains(&key) {
            return Err(CommandError::Syntax("Duplicate MAIL parameter"));
        }
        match (key.as_str(), value) {
            ("SIZE", Some(v)) => {
                if v.is_empty() || v.len() > 20 || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(CommandError::Syntax("Bad SIZE parameter"));
                }
                p.size = Some(v.parse().unwrap_or(u64::MAX));
            }
            ("BODY", Some(v)) => {
                p.body = match v.to_ascii_uppercase().as_str() {
                    "7BIT" => BodyType::SevenBit,
                    "8BITMIME" => BodyType::EightBitMime,
                    "BINARYMIME" => BodyType::BinaryMime,
                    _ => return Err(CommandError::Syntax("Bad BODY parameter")),
                }
            }
            ("SMTPUTF8", None) => p.smtputf8 = true,
            ("RET", Some(v)) => {
                p.ret = Some(match v.to_ascii_uppercase().as_str() {
                    "FULL" => Ret::Full,
                    "HDRS" => Ret::Hdrs,
                    _ => return Err(CommandError::Syntax("Bad RET parameter")),
                })
            }
            ("ENVID", Some(v)) => {
                if v.is_empty() || v.len() > 100 || !is_xtext(v) {
                    return Err(CommandError::Syntax("Bad ENVID parameter"));
                }
                p.envid = Some(v.to_string());
            }
            ("SIZE" | "BODY" | "RET" | "ENVID", None) | ("SMTPUTF8", Some(_)) => {
                return Err(CommandError::Syntax("Bad MAIL parameter value"));
            }
            _ => return Err(CommandError::UnknownParam(key)),
        }
        seen.push(key);
    }
    if !sender.is_ascii() && !p.smtputf8 {
        return Err(CommandError::BadAddress(
            "Non-ASCII address without SMTPUTF8",
        ));
    }
    Ok(Command::Mail { sender, params: p })
}

fn parse_rcpt(rest: &str) -> Result<Command, CommandError> {
    let (path, params) =
        keyword_path(rest, "TO").ok_or(CommandError::Syntax("Syntax: RCPT TO:<address>"))?;
    let recipient = if path.eq_ignore_ascii_case("<postmaster>") {
        "postmaster".to_string()
    } else {
        crate::address::parse_path(path).map_err(CommandError::BadAddress)?
    };
    let mut p = RcptParams::default();
    let mut seen = Vec::new();
    for param in params.split_ascii_whitespace() {
        let (key, value) = split_param(param);
        let key = key.to_ascii_uppercase();
        if seen.contains(&key) {
            return Err(CommandError::Syntax("Duplicate RCPT parameter"));
        }
        match (key.as_str(), value) {
            ("NOTIFY", Some(v)) => p.notify = Some(parse_notify(v)?),
            ("ORCPT", Some(v)) => {
                let (kind, addr) = v
                    .split_once(';')
                    .ok_or(CommandError::Syntax("Bad ORCPT parameter"))?;
                if kind.is_empty()
                    || !kind.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    || addr.is_empty()
                    || v.len() > 500
                    || !is_xtext(addr)
                {
                    return Err(CommandError::Syntax("Bad ORCPT parameter"));
                }
                p.orcpt = Some(v.to_string());
            }
            _ => return Err(CommandError::UnknownParam(key)),
        }
        seen.push(key);
    }
    Ok(Command::Rcpt {
        recipient,
        params: p,
    })
}

fn parse_notify(v: &str) -> Result<Notify, CommandError> {
    let mut n = Notify::NEVER;
    let mut never = false;
    for item in v.split(',') {
        match item.to_ascii_uppercase().as_str() {
            "NEVER" => never = true,
            "SUCCESS" => n.success = true,
            "FAILURE" => n.failure = true,
            "DELAY" => n.delay = true,
            _ => return Err(CommandError::Syntax("Bad NOTIFY parameter")),
        }
    }
    if never && n != Notify::NEVER {
        // RFC 3461 §4.1: NEVER must appear alone.
        return Err(CommandError::Syntax("NOTIFY=NEVER cannot be combined"));
    }
    Ok(n)
}

fn parse_bdat(rest: &str) -> Result<Command, CommandError> {
    let mut parts = rest.split_ascii_whitespace();
    let size = parts
        .next()
        .filter(|s| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or(CommandError::Syntax("Syntax: BDAT size [LAST]"))?;
    let last = match parts.next() {
        None => false,
        Some(s) if s.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return Err(CommandError::Syntax("Syntax: BDAT size [LAST]")),
    };
    if parts.next().is_some() {
        return Err(CommandError::Syntax("Syntax: BDAT size [LAST]"));
    }
    Ok(Command::Bdat { size, last })
}

fn split_param(p: &str) -> (&str, Option<&str>) {
    match p.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (p, None),
    }
}

/// xtext (RFC 3461 §4): printable ASCII except `+` and `=`, or `+` and two upper-case hex
/// digits.
fn is_xtext(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                let hex = |c: u8| c.is_ascii_digit() || (b'A'..=b'F').contains(&c);
                if !(b.get(i + 1).copied().is_some_and(hex)
                    && b.get(i + 2).copied().is_some_and(hex))
                {
                    return false;
                }
                i += 3;
            }
            33..=126 if b[i] != b'=' => i += 1,
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Command, CommandError> {
        parse(s.as_bytes())
    }

    #[test]
    fn verbs_are_case_insensitive() {
        assert_eq!(
            p("ehlo client.test").unwrap(),
            Command::Ehlo("client.test".into())
        );
        assert_eq!(p("QuIt").unwrap(), Command::Quit);
        assert_eq!(p("NOOP anything").unwrap(), Command::Noop);
        assert_eq!(
            p("EHLO [127.0.0.1]").unwrap(),
            Command::Ehlo("[127.0.0.1]".into())
        );
        assert_eq!(
            p("EHLO [IPv6:::1]").unwrap(),
            Command::Ehlo("[IPv6:::1]".into())
        );
    }

    #[test]
    fn bad_commands() {
        assert_eq!(p("FOO"), Err(CommandError::Unrecognized));
        assert_eq!(p(""), Err(CommandError::Unrecognized));
        assert_eq!(p("AUTH PLAIN x"), Err(CommandError::NotImplemented));
        assert!(matches!(p("EHLO"), Err(CommandError::Syntax(_))));
        assert!(matches!(p("EHLO a b"), Err(CommandError::Syntax(_))));
        assert!(matches!(p("EHLO bad_host!"), Err(CommandError::Syntax(_))));
        assert!(matches!(p("DATA now"), Err(CommandError::Syntax(_))));
        assert!(matches!(p("RSET\rMAIL"), Err(CommandError::Syntax(_))));
        assert!(matches!(parse(b"NOOP \xff"), Err(CommandError::Syntax(_))));
    }

    #[test]
    fn mail_from_with_all_parameters() {
        let c = p("MAIL FROM:<a.b@Example.TEST> SIZE=1000 BODY=8BITMIME RET=HDRS ENVID=QQ+2B1")
            .unwrap();
        let Command::Mail { sender, params } = c else {
            panic!()
        };
        assert_eq!(sender, "a.b@Example.TEST");
        assert_eq!(params.size, Some(1000));
        assert_eq!(params.body, BodyType::EightBitMime);
        assert_eq!(params.ret, Some(Ret::Hdrs));
        assert_eq!(params.envid.as_deref(), Some("QQ+2B1"));
    }

    #[test]
    fn mail_from_variants() {
        assert!(
            matches!(p("MAIL FROM:<>").unwrap(), Command::Mail { sender, .. } if sender.is_empty())
        );
        assert!(
            matches!(p("mail from: <x@y.test>").unwrap(), Command::Mail { sender, .. } if sender == "x@y.test")
        );
        assert!(
            matches!(p("MAIL FROM:<@relay.test:x@y.test>").unwrap(), Command::Mail { sender, .. } if sender == "x@y.test")
        );
        assert!(
            matches!(p("MAIL FROM:<\"a b@c\"@y.test>").unwrap(), Command::Mail { sender, .. } if sender == "\"a b@c\"@y.test")
        );
        assert!(matches!(
            p("MAIL FROM:x@y.test"),
            Err(CommandError::Syntax(_))
        ));
        assert!(matches!(
            p("MAIL FROM:<x@>"),
            Err(CommandError::BadAddress(_))
        ));
        assert!(matches!(
            p("MAIL FROM:<x..y@a.test>"),
            Err(CommandError::BadAddress(_))
        ));
        assert!(matches!(
            p("MAIL FROM:<xy>"),
            Err(CommandError::BadAddress(_))
        ));
        let long = format!("MAIL FROM:<{}@a.test>", "x".repeat(65));
        assert!(matches!(p(&long), Err(CommandError::BadAddress(_))));
        assert!(matches!(
            p("MAIL FROM:<ü@a.test>"),
            Err(CommandError::BadAddress(_))
        ));
        assert!(p("MAIL FROM:<ü@bücher.test> SMTPUTF8").is_ok());
    }

    #[test]
    fn mail_parameter_errors() {
        assert_eq!(
            p("MAIL FROM:<a@b.test> AUTH=<>"),
            Err(CommandError::UnknownParam("AUTH".into()))
        );
        assert!(matches!(
            p("MAIL FROM:<a@b.test> SIZE=abc"),
            Err(CommandError::Syntax(_))
        ));
        assert!(matches!(
            p("MAIL FROM:<a@b.test> SIZE=1 SIZE=2"),
            Err(CommandError::Syntax(_))
        ));
        assert!(matches!(
            p("MAIL FROM:<a@b.test> BODY=9BIT"),
            Err(CommandError::Syntax(_))
        ));
        assert!(matches!(
            p("MAIL FROM:<a@b.test> ENVID=a=b"),
            Err(CommandError::Syntax(_))
        ));
        assert!(matches!(
            p("MAIL FROM:<a@b.test> ENVID=a+2"),
            Err(CommandError::Syntax(_))
        ));
        assert!(matches!(
            p("MAIL FROM:<a@b.test> SMTPUTF8=yes"),
            Err(CommandError::Syntax(_))
        ));
        // A SIZE beyond u64 still parses as "too big" rather than an error.
        let Command::Mail { params, .. } =
            p("MAIL FROM:<a@b.test> SIZE=99999999999999999999").unwrap()
        else {
            panic!()
        };
        assert_eq!(params.size, Some(u64::MAX));
    }

    #[test]
    fn rcpt_to_with_dsn_parameters() {
        let c = p("RCPT TO:<bob@x.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@x.test").unwrap();
        let Command::Rcpt { recipient, params } = c else {
            panic!()
        };
        assert_eq!(recipient, "bob@x.test");
        assert_eq!(
            params.notify,
            Some(Notify {
                success: true,
                failure: true,
                delay: false
            })
        );
        assert_eq!(params.orcpt.as_deref(), Some("rfc822;bob@x.test"));
        assert!(matches!(
            p("RCPT TO:<b@x.test> NOTIFY=NEVER,DELAY"),
            Err(CommandError::Syntax(_))
        ));
        assert!(matches!(
            p("RCPT TO:<b@x.test> ORCPT=bob"),
            Err(CommandError::Syntax(_))
        ));
        assert!(
            matches!(p("RCPT TO:<Postmaster>").unwrap(), Command::Rcpt { recipient, .. } if recipient == "postmaster")
        );
        assert_eq!(
            p("RCPT TO:<b@x.test> FOO=1"),
            Err(CommandError::UnknownParam("FOO".into()))
        );
    }

    #[test]
    fn bdat() {
        assert_eq!(
            p("BDAT 100 LAST").unwrap(),
            Command::Bdat {
                size: 100,
                last: true
            }
        );
        assert_eq!(
            p("bdat 0 last").unwrap(),
            Command::Bdat {
                size: 0,
                last: true
            }
        );
        assert_eq!(
            p("BDAT 5").unwrap(),
            Command::Bdat {
                size: 5,
                last: false
            }
        );
        assert!(matches!(p("BDAT"), Err(CommandError::Syntax(_))));
        assert!(matches!(p("BDAT -1"), Err(CommandError::Syntax(_))));
        assert!(matches!(
            p("BDAT 1 LAST extra"),
            Err(CommandError::Syntax(_))
        ));
        assert!(matches!(p("BDAT 1 FIRST"), Err(CommandError::Syntax(_))));
    }

    #[test]
    fn xtext() {
        assert!(is_xtext("abc+2B+3D"));
        assert!(!is_xtext("a+2"));
        assert!(!is_xtext("a+"));
        assert!(!is_xtext("a+zz"));
        assert!(!is_xtext("a b"));
        assert!(!is_xtext("a=b"));
    }

    /// Found in the field: a multi-byte character where the keyword ends panicked the
    /// session (byte index not a char boundary). Every such line is a 501 now.
    #[test]
    fn non_ascii_after_the_verb_is_a_syntax_error() {
        for line in [
            "RCPT T\u{f6}:<a@b.c>",
            "MAIL FR\u{f6}M:<a@b.c>",
            "MAIL \u{f6}",
            "RCPT \u{20ac}\u{20ac}\u{20ac}",
            "MAIL F\u{1f600}",
            "RCPT TO\u{f6}<a@b.c>",
        ] {
            assert!(
                matches!(parse(line.as_bytes()), Err(CommandError::Syntax(_))),
                "{line}"
            );
        }
    }

    /// Every prefix of a command with multi-byte characters, cut at every byte, parses
    /// to a command or an error, never a panic.
    #[test]
    fn every_cut_of_a_non_ascii_line_is_handled() {
        let line = "MAIL FROM:<j\u{f6}rg@b\u{fc}cher.example> SMTPUTF8 SIZE=1\u{20ac}";
        for end in 0..=line.len() {
            let _ = parse(&line.as_bytes()[..end]);
        }
    }

    /// parse(encode(c)) == c over generated commands: every verb, address shapes
    /// (quoted, UTF-8, literals, postmaster) and every parameter combination.
    #[test]
    fn encode_round_trips() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let senders = [
            "",
            "a@b.example",
            "\"john doe\"@example.test",
            "j\u{f6}rg@b\u{fc}cher.example",
            "x@[192.0.2.1]",
            "x@[IPv6:2001:db8::1]",
        ];
        let domains = ["client.test", "[192.0.2.1]", "mx-1.example.test"];
        for _ in 0..5000 {
            let sender = senders[next(senders.len() as u64) as usize].to_string();
            let notify = match next(5) {
                0 => None,
                1 => Some(crate::envelope::Notify::NEVER),
                _ => Some(crate::envelope::Notify {
                    success: next(2) == 0,
                    failure: true,
                    delay: next(2) == 0,
                }),
            };
            let cmd = match next(12) {
                0 => Command::Ehlo(domains[next(3) as usize].into()),
                1 => Command::Helo(domains[next(3) as usize].into()),
                2 => Command::Mail {
                    sender: sender.clone(),
                    params: MailParams {
                        size: (next(2) == 0).then(|| next(1 << 40)),
                        body: [
                            BodyType::SevenBit,
                            BodyType::EightBitMime,
                            BodyType::BinaryMime,
                        ][next(3) as usize],
                        smtputf8: !sender.is_ascii() || next(2) == 0,
                        ret: [None, Some(Ret::Full), Some(Ret::Hdrs)][next(3) as usize],
                        envid: (next(2) == 0).then(|| "QQ+2Bx".to_string()),
                    },
                },
                3 => Command::Rcpt {
                    recipient: if next(4) == 0 {
                        "postmaster".into()
                    } else {
                        "bob@partner.test".into()
                    },
                    params: RcptParams {
                        notify,
                        orcpt: (next(2) == 0).then(|| "rfc822;bob+40x@partner.test".to_string()),
                    },
                },
                4 => Command::Bdat {
                    size: next(u64::MAX),
                    last: next(2) == 0,
                },
                5 => Command::Data,
                6 => Command::Rset,
                7 => Command::Noop,
                8 => Command::Quit,
                9 => Command::StartTls,
                10 => Command::Vrfy,
                _ => Command::Help,
            };
            let line = cmd.encode();
            assert_eq!(parse(line.as_bytes()), Ok(cmd), "{line}");
        }
    }
}
