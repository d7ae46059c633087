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
    /// `header/body` pair, e.g. `("relaxed", "simple")`.
    pub fn sign(
        &self,
        message: &[u8],
        domain: &str,
        selector: &str,
        canon: (&str, &str),
    ) -> Vec<u8> {
        let dir = self.private.parent().unwrap();
        let input = dir.join(format!("msg-{}.eml", unique()));
        std::fs::write(&input, message).unwrap();
        let algo = match self.algo {
            Algo::RsaSha256 => "rsa-sha256",
            Algo::Ed25519Sha256 => "ed25519-sha256",
        };
        let out = super::python(&format!(
            r#"
import dkim, sys
msg = open(r"{input}", "rb").read()
key = open(r"{key}", "rb").read()
sig = dkim.sign(msg, b"{selector}", b"{domain}", key,
                canonicalize=(b"{h}", b"{b}"), signature_algorithm=b"{algo}",
                include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
open(r"{input}", "wb").write(sig + msg)
"#,
            input = input.display(),
            key = self.private.display(),
            h = canon.0,
            b = canon.1,
        ));
        let _ = out;
        std::fs::read(&input).unwrap()
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
