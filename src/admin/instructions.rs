//! Per-platform set-up steps filled with this relay's real values, and the SPF record to
//! publish per domain: the text an administrator hands to whoever runs the platform and
//! the DNS.

use serde::Serialize;

use crate::config::{Config, SharedPlatform};
use crate::spf::validate::Report;

#[derive(Debug, Clone, Serialize)]
pub struct SpfToPublish {
    pub domain: String,
    pub record: String,
    pub valid_now: bool,
    /// What to send to whoever runs the domain's DNS.
    pub share: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Instructions {
    pub platform: String,
    pub relay_host: String,
    pub relay_port: u16,
    pub tls: String,
    pub steps: Vec<String>,
    pub spf: Vec<SpfToPublish>,
    /// Everything above as one plain-text document.
    pub text: String,
}

/// `port`: where the relay actually listens for the platform's connections.
pub fn build(
    cfg: &Config,
    port: u16,
    platform: &str,
    reports: &[Report],
) -> Result<Instructions, String> {
    let host = cfg.server.hostname.clone();
    let tls = match &cfg.tls {
        Some(t) if t.require => "required: the relay refuses mail before STARTTLS".to_string(),
        Some(_) => "offered (STARTTLS); the relay's certificate must be trusted by the platform"
            .to_string(),
        None => "not offered: configure [tls] before requiring TLS on the platform".to_string(),
    };
    let tls_on = cfg.tls.is_some();
    let ranges = cfg
        .access
        .allowed_ranges
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let steps: Vec<String> = match platform {
        "exchange" => vec![
            "Exchange admin center: Mail flow > Send connectors > Add (+).".into(),
            "Name: smartrelay. Type: Custom.".into(),
            format!("Network settings: Route mail through smart hosts; add {host}."),
            "Smart host authentication: None (the relay admits your servers by source address).".into(),
            "Address space: type SMTP, domain *, cost 1. Source server: every transport server that sends outbound.".into(),
            format!("Each source server's address must be in the relay's allowed ranges: {ranges}."),
            format!(
                "Exchange Management Shell equivalent:\n  New-SendConnector -Name \"smartrelay\" -Usage Custom -AddressSpaces \"SMTP:*;1\" -DNSRoutingEnabled $false -SmartHosts \"{host}\" -Port {port} -SmartHostAuthMechanism None{}",
                if tls_on { " -RequireTLS $true -TlsAuthLevel CertificateValidation" } else { "" }
            ),
            "Send a test message to an external address, then run the connector verification here.".into(),
        ],
        "o365" => {
            let mut s = vec![
                "Exchange admin center (Microsoft 365): Mail flow > Connectors > Add a connector.".into(),
                "Connection from: Office 365. Connection to: Partner organization. Name: smartrelay.".into(),
                "Use of connector: only when email messages are sent to these domains: * (all external mail).".into(),
                format!("Routing: route email through these smart hosts: {host}."),
            ];
            if tls_on {
                s.push("Security restrictions: Always use TLS; connect only if the recipient's certificate is issued by a trusted certificate authority.".into());
            } else {
                s.push("Security restrictions: Microsoft 365 always sends with TLS 1.2+: configure [tls] with a publicly trusted certificate first.".into());
            }
            if port != 25 {
                s.push(format!("Microsoft 365 connects on port 25 only: the relay listens on {port}; add a listener on port 25."));
            }
            s.push("Microsoft 365 sends for every tenant from the same Exchange Online Protection ranges: list them as a shared range, never in access.allowed_ranges:\n  [[access.shared_ranges]]\n  platform = \"o365\"\n  ranges_from_spf = \"spf.protection.outlook.com\"".into());
            s.push(format!("Each message from those ranges must prove it is your tenant's. The binding to prefer is a secret route header: a mail flow rule (transport rule) in Exchange Online that sets a message header with a secret value on mail sent to this relay, and here header = {{ name = \"X-...\", secret_env = \"VAR\" }} (the relay removes that header before it queues the message). Set tenant_id to your Microsoft 365 tenant ID too (the GUID Exchange Online stamps in {}): mail stamped with another tenant's id is refused. DKIM signing for your custom domains ({}) proves a message when the signature's d= is the From: address's domain, is fresh, and was not used before for other recipients (access.dkim_replay); a signature can be replayed, so it is the weaker proof.", crate::tenant::TENANT_ID_HEADER, cfg.access.domains.join(", ")));
            s.push(shared_status(cfg, SharedPlatform::O365));
            s.push("Validate the connector with an external address, then run the connector verification here.".into());
            s
        }
        "gsuite" => vec![
            "Google Admin console: Apps > Google Workspace > Gmail > Hosts > Add route.".into(),
            format!("Route 1, name \"smartrelay outbound\": single host {host}, port {port} (not 465).{}",
                if tls_on { " Require secure transport (TLS); require CA-signed certificate." } else { "" }),
            "Route 2, name \"Google internal\": multiple hosts, primary ASPMX.L.GOOGLE.COM port 25 (100%), secondary ALT1.ASPMX.L.GOOGLE.COM port 25 (new tenants since 2023: SMTP.GOOGLE.COM).".into(),
            "Gmail > Routing > Add rule 1, \"Outbound via gateway\": messages to affect: Outbound; route: change route to \"smartrelay outbound\".".into(),
            "Add rule 2, \"Internal mail\": messages to affect: Internal - sending; route: change route to \"Google internal\".".into(),
            "Google sends for every Workspace customer from the ranges behind _spf.google.com: list them as a shared range, never in access.allowed_ranges:\n  [[access.shared_ranges]]\n  platform = \"gsuite\"\n  ranges_from_spf = \"_spf.google.com\"".into(),
            format!("Each message from those ranges must prove it is yours. The binding to prefer is the route's custom header: have the outbound route to this relay add a custom header with a secret value, and set header = {{ name = \"X-...\", secret_env = \"VAR\" }} here (the relay removes that header before it queues the message). DKIM signing for your domains ({}) proves a message when d= is the From: address's domain, the signature is fresh and was not used before for other recipients (access.dkim_replay); a signature can be replayed, so it is the weaker proof. Google's fallback signature (d=<domain>.<date>.gappssmtp.com) is not proof.", cfg.access.domains.join(", ")),
            shared_status(cfg, SharedPlatform::Gsuite),
            "Send a test message to an external address, then run the connector verification here.".into(),
        ],
        other => return Err(format!("unknown platform `{other}` (use exchange, o365 or gsuite)")),
    };
    let spf: Vec<SpfToPublish> = reports
        .iter()
        .map(|r| SpfToPublish {
            domain: r.domain.clone(),
            record: r.recommended.clone(),
            valid_now: r.valid,
            share: format!(
                "Please publish this TXT record at {} (it replaces the existing v=spf1 record: a domain must have exactly one):\n  {}\nThe include:{} must stay the first mechanism.",
                r.domain, r.recommended, r.include
            ),
        })
        .collect();
    let mut text =
        format!("smartrelay set-up for {platform}\nRelay: {host} port {port}; TLS {tls}\n\n");
    for (i, s) in steps.iter().enumerate() {
        text.push_str(&format!("{}. {s}\n", i + 1));
    }
    text.push_str("\nSPF records to publish:\n");
    for s in &spf {
        text.push_str(&format!("\n{}\n", s.share));
    }
    Ok(Instructions {
        platform: platform.to_string(),
        relay_host: host,
        relay_port: port,
        tls,
        steps,
        spf,
        text,
    })
}

/// What the configuration already has for this platform's shared ranges.
fn shared_status(cfg: &Config, platform: SharedPlatform) -> String {
    let mine: Vec<String> = cfg
        .access
        .shared_ranges
        .iter()
        .filter(|r| r.platform == platform)
        .map(|r| {
            format!(
                "{} (proof: {})",
                r.name,
                r.proofs(&cfg.access.domains).join(", ")
            )
        })
        .collect();
    if mine.is_empty() {
        format!(
            "Now: no shared range for {} is configured.",
            platform.label()
        )
    } else {
        format!("Now configured: {}.", mine.join("; "))
    }
}
