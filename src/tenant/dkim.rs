//! DKIM (RFC 6376) verification for tenant proof, by mail-auth: relaxed and simple
//! canonicalization, rsa-sha256 and ed25519-sha256. Key lookups use the `[dns]` resolver.
//!
//! The work is bounded: at most [`MAX_SIGNATURES`] signatures of a message are verified,
//! those whose `d=` could prove the tenant first, so a message cannot make the relay ask
//! DNS for hundreds of names of the sender's choosing.

use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator};

use crate::envelope::Millis;

/// Signatures verified per message at most; the rest are skipped (and counted).
pub const MAX_SIGNATURES: usize = 10;

/// A signature that verified, with what the replay rules look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passed {
    /// `d=`, lower-case, without trailing dot.
    pub domain: String,
    pub selector: String,
    /// The signature itself (`b=`): with `d=` and `s=`, what identifies it.
    pub b: Vec<u8>,
    /// `t=` in seconds, 0 when absent.
    pub t: u64,
    /// `Date` is among the signed header fields (`h=`).
    pub signs_date: bool,
}

/// The signatures of one message, reduced to what tenant proof needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DkimVerdict {
    /// Every signature that verified and signs the whole body.
    pub passing: Vec<Passed>,
    /// Why the others did not: `d=foreign.test: signature mismatch`.
    pub failures: Vec<String>,
    /// A key lookup failed for a reason other than "no such key": trying again later
    /// may succeed.
    pub temporary: bool,
    /// Signatures left unverified past [`MAX_SIGNATURES`].
    pub skipped: usize,
    /// The addresses of the `From:` field, lower-case.
    pub from: Vec<String>,
    /// The `Date:` field, in milliseconds since the epoch, when it parses.
    pub date: Option<Millis>,
}

impl DkimVerdict {
    pub fn timed_out() -> DkimVerdict {
        DkimVerdict {
            failures: vec!["DKIM verification timed out".into()],
            temporary: true,
            ..DkimVerdict::default()
        }
    }

    /// One line for the log.
    pub fn explain(&self) -> String {
        match (self.passing.as_slice(), self.failures.as_slice()) {
            ([], []) => "no DKIM signature".into(),
            ([], f) => format!("no DKIM signature verified ({})", f.join("; ")),
            (p, _) => format!(
                "DKIM signature(s) of d={} verified, none of the organization's domains",
                p.iter()
                    .map(|s| s.domain.as_str())
                    .collect::<Vec<_>>()
                    .join(", d=")
            ),
        }
    }
}

pub struct DkimVerifier {
    auth: MessageAuthenticator,
    keys: super::keys::KeyCache,
}

impl DkimVerifier {
    pub fn new(resolver: hickory_resolver::TokioResolver) -> DkimVerifier {
        DkimVerifier {
            auth: MessageAuthenticator(resolver),
            keys: super::keys::KeyCache::default(),
        }
    }

    /// Verifies at most [`MAX_SIGNATURES`] signatures, those whose `d=` satisfies
    /// `prefer` first (in their order in the message), then the others.
    pub async fn verify(&self, message: &[u8], prefer: impl Fn(&str) -> bool) -> DkimVerdict {
        let mut out = DkimVerdict::default();
        let Some(mut parsed) = AuthenticatedMessage::parse(message) else {
            out.failures
                .push("message header could not be parsed".into());
            return out;
        };
        out.from = parsed.from.clone();
        out.date = parsed
            .headers
            .iter()
            .rev()
            .find(|(name, _)| name.eq_ignore_ascii_case(b"Date"))
            .and_then(|(_, value)| std::str::from_utf8(value).ok())
            .and_then(|v| mail_parser::DateTime::parse_rfc822(v.trim()))
            .map(|d| u64::try_from(d.to_timestamp()).unwrap_or(0) * 1000);
        let domain = |d: &str| d.trim_end_matches('.').to_ascii_lowercase();
        // A stable sort: the preferred first, each group in message order.
        parsed
            .dkim_headers
            .sort_by_key(|h| !prefer(&domain(&h.header.d)));
        out.skipped = parsed.dkim_headers.len().saturating_sub(MAX_SIGNATURES);
        parsed.dkim_headers.truncate(MAX_SIGNATURES);
        let params = mail_auth::Parameters::new(&parsed).with_txt_cache(&self.keys);
        for result in self.auth.verify_dkim(params).await {
            let Some(sig) = result.signature() else {
                if let DkimResult::PermError(e) | DkimResult::Neutral(e) = result.result() {
                    out.failures.push(format!("malformed signature: {e}"));
                }
                continue;
            };
            let d = domain(&sig.d);
            // `l=` signs only a prefix of the body: anything appended to a signed
            // message would still verify, so such a signature proves nothing here.
            let partial = sig.l > 0;
            match result.result() {
                DkimResult::Pass if partial => out
                    .failures
                    .push(format!("d={d}: signs only part of the body (l=)")),
                DkimResult::Pass => out.passing.push(Passed {
                    domain: d,
                    selector: sig.s.to_ascii_lowercase(),
                    b: sig.b.clone(),
                    t: sig.t,
                    signs_date: sig.h.iter().any(|h| h.eq_ignore_ascii_case("date")),
                }),
                DkimResult::TempError(e) => {
                    out.temporary = true;
                    out.failures.push(format!("d={d}: {e}"));
                }
                DkimResult::Neutral(e) | DkimResult::Fail(e) | DkimResult::PermError(e) => {
                    out.failures.push(format!("d={d}: {e}"))
                }
                DkimResult::None => {}
            }
        }
        out
    }
}
