//! Real DKIM signatures for tests: keys made by openssl (RSA) and PyNaCl (Ed25519),
//! messages signed by Python's dkimpy (Debian python3-dkim), public keys published as
//! zone-file TXT records for the in-process DNS server.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Algo {
    RsaSha256,
    Ed25519Sha256,
}

/// A signing key and the TXT record that publishes it.
pub struct Key {
    pub algo: Algo,
    /// For dkimpy: a PEM file (RSA) or a file with the base64 seed (Ed25519).
    pub private: PathBuf,
    /// `v=DKIM1; k=...; p=...` split into zone-file strings of at most 200 octets.
    pub txt: String,
}

impl Key {
    pub fn generate(dir: &Path, name: &str, algo: Algo) -> Key {
        std::fs::create_dir_all(dir).unwrap();
        match algo {
            Algo::RsaSha256 => {
                let private = dir.join(format!("{name}.pem"));
                run(Command::new("openssl")
                    .args(["genrsa", "-traditional", "-out"])
                    .arg(&private)
                    .arg("2048"));
                let der = run(Command::new("openssl")
                    .args(["rsa", "-pubout", "-outform", "DER", "-in"])
                    .arg(&private));
                let p = base64(&der);
                Key {
                    algo,
                    private,
                    txt: zone_strings(&format!("v=DKIM1; k=rsa; p={p}")),
                }
            }
            Algo::Ed25519Sha256 => {
                let private = dir.join(format!("{name}.ed25519"));
                let out = super::python(&format!(
                    r#"
import base64, nacl.signing
k = nacl.signing.SigningKey.generate()
open(r"{}", "wb").write(base64.b64encode(bytes(k)))
print(base64.b64encode(bytes(k.verify_key)).decode())
"#,
                    private.display()
                ));
                Key {
                    algo,
                    private,
                    txt: zone_strings(&format!("v=DKIM1; k=ed25519; p={}", out.trim())),
                }
            }
        }
    }

    /// Zone-file line publishing the key at `selector._domainkey` of the zone's origin.
    pub fn record(&self, selector: &str) -> String {
        format!("{selector}._domainkey IN TXT {}\n", self.txt)
    }

    /// `message` (CRLF line endings) with a DKIM-Signature prepended. `canon` is dkimpy's
    /// `header/body` pair, e.g. `("relaxed", "simple")`. dkimpy stamps `t=` with now.
    pub fn sign(
        &self,
        message: &[u8],
        domain: &str,
        selector: &str,
        canon: (&'static str, &'static str),
    ) -> Vec<u8> {
        self.sign_with(
            message,
            domain,
            selector,
            &Sign {
                canon,
                ..Sign::default()
            },
        )
    }

    /// Signed as Exchange Online signs: `h=From:Date:Subject:Message-ID:Content-Type:
    /// MIME-Version`, relaxed/relaxed, no `t=` and no `x=`. To and Cc are not signed.
    pub fn sign_like_exchange(&self, message: &[u8], domain: &str, selector: &str) -> Vec<u8> {
        self.sign_with(
            message,
            domain,
            selector,
            &Sign {
                canon: ("relaxed", "relaxed"),
                headers: EXCHANGE_HEADERS,
                t: Stamp::Omit,
                x: None,
            },
        )
    }

    /// `message` signed with every choice spelled out.
    pub fn sign_with(&self, message: &[u8], domain: &str, selector: &str, how: &Sign) -> Vec<u8> {
        let dir = self.private.parent().unwrap();
        let input = dir.join(format!("msg-{}.eml", unique()));
        std::fs::write(&input, message).unwrap();
        let algo = match self.algo {
            Algo::RsaSha256 => "rsa-sha256",
            Algo::Ed25519Sha256 => "ed25519-sha256",
        };
        let headers = how
            .headers
            .iter()
            .map(|h| format!("b\"{}\"", h.to_ascii_lowercase()))
            .collect::<Vec<_>>()
            .join(", ");
        // dkimpy always writes t=now; the signed field list is changed on its way to
        // the signer (t= left out or set, x= added) so the signature covers what it says.
        let t = match how.t {
            Stamp::Now => "keep".to_string(),
            Stamp::Omit => "omit".to_string(),
            Stamp::At(v) => v.to_string(),
        };
        let x = how.x.map_or("None".to_string(), |v| v.to_string());
        let out = super::python(&format!(
            r#"
import dkim
orig = dkim.DKIM.gen_header
def gen(self, fields, include_headers, canon_policy, header_name, pk, standardize=False):
    t = "{t}"
    if t != "keep":
        fields = [f for f in fields if f[0] != b't']
        if t != "omit":
            fields.insert(-3, (b't', t.encode()))
    x = {x}
    if x is not None:
        fields.insert(-3, (b'x', str(x).encode()))
    return orig(self, fields, include_headers, canon_policy, header_name, pk, standardize)
dkim.DKIM.gen_header = gen
msg = open(r"{input}", "rb").read()
key = open(r"{key}", "rb").read()
sig = dkim.sign(msg, b"{selector}", b"{domain}", key,
                canonicalize=(b"{h}", b"{b}"), signature_algorithm=b"{algo}",
                include_headers=[{headers}])
open(r"{input}", "wb").write(sig + msg)
"#,
            input = input.display(),
            key = self.private.display(),
            h = how.canon.0,
            b = how.canon.1,
        ));
        let _ = out;
        std::fs::read(&input).unwrap()
    }
}

/// What Exchange Online puts in `h=`.
pub const EXCHANGE_HEADERS: &[&str] = &[
    "From",
    "Date",
    "Subject",
    "Message-ID",
    "Content-Type",
    "MIME-Version",
];

/// `t=` of a signature.
#[derive(Clone, Copy)]
pub enum Stamp {
    /// dkimpy's: the time of signing.
    Now,
    Omit,
    /// Seconds since the epoch.
    At(u64),
}

/// How to sign.
pub struct Sign {
    pub canon: (&'static str, &'static str),
    pub headers: &'static [&'static str],
    pub t: Stamp,
    /// `x=`, seconds since the epoch.
    pub x: Option<u64>,
}

impl Default for Sign {
    fn default() -> Sign {
        Sign {
            canon: ("relaxed", "simple"),
            headers: &["from", "to", "subject", "date", "message-id"],
            t: Stamp::Now,
            x: None,
        }
    }
}

fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().expect("openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A TXT value longer than one character-string (255 octets) is split into several.
fn zone_strings(value: &str) -> String {
    value
        .as_bytes()
        .chunks(200)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect::<Vec<_>>()
        .join(" ")
}
