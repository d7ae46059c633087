//! Connector verification: talk to a smart host as far as a delivery would, without
//! sending mail, and report what was seen.

use serde::{Deserialize, Serialize};

use super::connection::{open, ClientSettings, UpstreamError};
use super::tls::Connectors;
use crate::regions::{HostPort, RouteTarget, TlsMode};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProbeReport {
    pub route: String,
    pub host: String,
    /// The route's TLS mode the check was made under.
    pub tls_mode: TlsMode,
    /// Greeting and EHLO were answered.
    pub reachable: bool,
    pub starttls_offered: Option<bool>,
    /// Negotiated TLS version, when TLS was used.
    pub tls: Option<String>,
    /// Whether the certificate verified against the system roots or the route's CA.
    pub certificate_verified: Option<bool>,
    pub extensions: Vec<String>,
    /// Everything a delivery over this route needs worked.
    pub ok: bool,
    pub error: Option<String>,
}

pub async fn probe(
    route: &RouteTarget,
    host: &HostPort,
    s: &ClientSettings,
    c: &Connectors,
) -> ProbeReport {
    let mut report = ProbeReport {
        route: route.name.clone(),
        host: host.to_string(),
        tls_mode: route.tls,
        reachable: false,
        starttls_offered: None,
        tls: None,
        certificate_verified: None,
        extensions: Vec::new(),
        ok: false,
        error: None,
    };
    // First as a delivery would, in the route's mode.
    match open(host, route, s, c).await {
        Ok(conn) => {
            report.reachable = true;
            report.tls = conn.tls.clone();
            report.extensions = extensions(&conn.caps);
            report.starttls_offered =
                Some(conn.tls.is_some() || report.extensions.iter().any(|e| e == "STARTTLS"));
            report.ok = route.tls != TlsMode::Required || conn.tls.is_some();
            if route.tls == TlsMode::Required {
                report.certificate_verified = Some(true);
            }
            let _ = conn.client.quit().await;
        }
        Err(e) => {
            if matches!(e, UpstreamError::Tls(_) | UpstreamError::NoStartTls) {
                report.reachable = true;
                report.starttls_offered = Some(!matches!(e, UpstreamError::NoStartTls));
                if matches!(e, UpstreamError::Tls(_)) {
                    report.certificate_verified = Some(false);
                }
            }
            report.error = Some(e.to_string());
            return report;
        }
    }
    // Then, where the route does not already require it, whether the certificate
    // would verify: the vendor's are publicly trusted, so "required" is the goal.
    if route.tls != TlsMode::Required && report.tls.is_some() {
        let strict = RouteTarget {
            tls: TlsMode::Required,
            ..route.clone()
        };
        match open(host, &strict, s, c).await {
            Ok(conn) => {
                report.certificate_verified = Some(true);
                let _ = conn.client.quit().await;
            }
            Err(UpstreamError::Tls(e)) => {
                report.certificate_verified = Some(false);
                report.error = Some(format!("certificate does not verify: {e}"));
            }
            Err(_) => {}
        }
    }
    report
}

fn extensions(caps: &smtp_proto::EhloResponse<String>) -> Vec<String> {
    use smtp_proto::*;
    let names = [
        (EXT_PIPELINING, "PIPELINING"),
        (EXT_SIZE, "SIZE"),
        (EXT_8BIT_MIME, "8BITMIME"),
        (EXT_SMTP_UTF8, "SMTPUTF8"),
        (EXT_ENHANCED_STATUS_CODES, "ENHANCEDSTATUSCODES"),
        (EXT_START_TLS, "STARTTLS"),
        (EXT_CHUNKING, "CHUNKING"),
        (EXT_BINARY_MIME, "BINARYMIME"),
        (EXT_DSN, "DSN"),
        (EXT_AUTH, "AUTH"),
    ];
    names
        .iter()
        .filter(|(bit, _)| caps.has_capability(*bit))
        .map(|(_, n)| n.to_string())
        .collect()
}
