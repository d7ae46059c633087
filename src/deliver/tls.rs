//! Client TLS for upstreams: a verifying connector (system roots, or a route's
//! `ca_file`) for `tls = "required"`, and a non-verifying one for opportunistic TLS,
//! where encryption without authentication beats plaintext (RFC 7435).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_platform_verifier::BuilderVerifierExt;
use tokio_rustls::TlsConnector;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Connectors by purpose, built once and shared.
pub struct Connectors {
    opportunistic: TlsConnector,
    system: Result<TlsConnector, String>,
    by_ca: Mutex<HashMap<PathBuf, TlsConnector>>,
}

impl Connectors {
    pub fn new() -> Connectors {
        let opportunistic = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map(|b| {
                b.dangerous()
                    .with_custom_certificate_verifier(Arc::new(AcceptAny))
                    .with_no_client_auth()
            })
            .expect("ring supports the default protocol versions");
        let system = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())
            .and_then(|b| b.with_platform_verifier().map_err(|e| e.to_string()))
            .map(|b| TlsConnector::from(Arc::new(b.with_no_client_auth())));
        Connectors {
            opportunistic: TlsConnector::from(Arc::new(opportunistic)),
            system,
            by_ca: Mutex::new(HashMap::new()),
        }
    }

    pub fn opportunistic(&self) -> &TlsConnector {
        &self.opportunistic
    }

    /// The verifying connector: system roots, or only the CAs in `ca_file`.
    pub fn verified(&self, ca_file: Option<&Path>) -> Result<TlsConnector, String> {
        let Some(path) = ca_file else {
            return self.system.clone();
        };
        let mut map = self.by_ca.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(path) {
            return Ok(c.clone());
        }
        let mut roots = RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        for c in certs {
            roots
                .add(c)
                .map_err(|e| format!("bad CA certificate in {}: {e}", path.display()))?;
        }
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let c = TlsConnector::from(Arc::new(config));
        map.insert(path.to_owned(), c.clone());
        Ok(c)
    }
}

impl Default for Connectors {
    fn default() -> Self {
        Connectors::new()
    }
}

/// Opportunistic TLS: any certificate; the handshake signatures are still checked.
#[derive(Debug)]
struct AcceptAny;

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
