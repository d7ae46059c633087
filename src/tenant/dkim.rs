//! DKIM (RFC 6376) verification for tenant proof, by mail-auth: relaxed and simple
//! canonicalization, rsa-sha256 and ed25519-sha256. Key lookups use the `[dns]` resolver.

use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator};

/// The signatures of one message, reduced to what tenant proof needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DkimVerdict {
    /// `d=` of every signature that verified (lower-case).
    pub passing: Vec<String>,
    /// Why the others did not: `d=foreign.test: signature mismatch`.
    pub failures: Vec<String>,
    /// A key lookup failed for a reason other than "no such key": trying again later
    /// may succeed.
    pub temporary: bool,
}

impl DkimVerdict {
    pub fn timed_out() -> DkimVerdict {
        DkimVerdict {
            passing: Vec::new(),
            failures: vec!["DKIM verification timed out".into()],
            temporary: true,
        }
    }

    /// One line for the log.
    pub fn explain(&self) -> String {
        match (self.passing.as_slice(), self.failures.as_slice()) {
            ([], []) => "no DKIM signature".into(),
            ([], f) => format!("no DKIM signature verified ({})", f.join("; ")),
            (p, _) => format!(
                "DKIM signature(s) of d={} verified, none of the organization's domains",
                p.join(", d=")
            ),
        }
    }
}

pub struct DkimVerifier {
    auth: MessageAuthenticator,
}

impl DkimVerifier {
    pub fn new(resolver: hickory_resolver::TokioResolver) -> DkimVerifier {
        DkimVerifier {
            auth: MessageAuthenticator(resolver),
        }
    }

    pub async fn verify(&self, message: &[u8]) -> DkimVerdict {
        let mut out = DkimVerdict::default();
        let Some(parsed) = AuthenticatedMessage::parse(message) else {
            out.failures
                .push("message header could not be parsed".into());
            return out;
        };
        for result in self.auth.verify_dkim(&parsed).await {
            let domain = result
                .signature()
                .map(|s| s.d.trim_end_matches('.').to_ascii_lowercase())
                .unwrap_or_default();
            // `l=` signs only a prefix of the body: anything appended to a signed
            // message would still verify, so such a signature proves nothing here.
            let partial = result.signature().is_some_and(|s| s.l > 0);
            match result.result() {
                DkimResult::Pass if partial => out
                    .failures
                    .push(format!("d={domain}: signs only part of the body (l=)")),
                DkimResult::Pass => out.passing.push(domain),
                DkimResult::TempError(e) => {
                    out.temporary = true;
                    out.failures.push(format!("d={domain}: {e}"));
                }
                DkimResult::Neutral(e) | DkimResult::Fail(e) | DkimResult::PermError(e) => {
                    out.failures.push(format!("d={domain}: {e}"))
                }
                DkimResult::None => {}
            }
        }
        out
    }
}
