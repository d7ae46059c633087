//! Share: the SPF instructions mailed to whoever runs DNS (the vendor page's "Share"
//! link). `POST /api/v1/onboarding/share` composes one message (text plus an HTML
//! alternative, one section per domain) and queues it through the relay's own spool,
//! so it routes, retries and bounces like any mail.

use axum::extract::{FromRequest, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::{Form, Json};
use bytes::Bytes;
use mail_builder::MessageBuilder;
use serde::{Deserialize, Serialize};

use super::{Admin, ApiError};
use crate::envelope::{
    now_ms, rfc5322_date, BodyType, ClientInfo, ContentFlags, Envelope, QueueId, Recipient,
};
use crate::events::TenantProof;
use crate::message::Data;
use crate::pipeline::{Intake, Submission};
use crate::spf::validate::Report;
use crate::spf::Severity;

#[derive(Debug, Deserialize)]
pub struct ShareRequest {
    #[serde(default)]
    pub to: String,
    /// Empty: every configured domain.
    #[serde(default)]
    pub domains: Vec<String>,
}

/// The dashboard's form: domains as one space- or comma-separated field.
#[derive(Debug, Deserialize)]
struct ShareForm {
    #[serde(default)]
    to: String,
    #[serde(default)]
    domains: String,
}

#[derive(Debug, Serialize)]
pub struct ShareReply {
    pub queue_id: String,
    pub to: String,
    pub domains: Vec<String>,
}

/// Which configured domains to share: all when none are named; an unknown one is an
/// error naming it.
pub fn select_domains(asked: &[String], configured: &[String]) -> Result<Vec<String>, String> {
    if asked.is_empty() {
        return Ok(configured.to_vec());
    }
    let mut out: Vec<String> = Vec::new();
    for d in asked {
        let d = d.trim().trim_end_matches('.').to_ascii_lowercase();
        match configured.iter().find(|c| c.eq_ignore_ascii_case(&d)) {
            Some(c) if !out.contains(c) => out.push(c.clone()),
            Some(_) => {}
            None => {
                return Err(format!(
                    "{d} is not one of the relay's domains (access.domains)"
                ))
            }
        }
    }
    Ok(out)
}

/// One domain's section, as plain text.
fn text_section(r: &Report) -> String {
    let mut s = format!(
        "SPF for {}\n{}\n\n",
        r.domain,
        "=".repeat(8 + r.domain.len())
    );
    s.push_str("Current record:\n");
    if r.records.is_empty() {
        s.push_str("  (none published)\n");
    }
    for rec in &r.records {
        s.push_str(&format!("  {rec}\n"));
    }
    s.push_str("\nWhat is wrong with it:\n");
    let problems: Vec<_> = r
        .findings
        .iter()
        .filter(|f| f.severity != Severity::Info)
        .collect();
    if problems.is_empty() {
        s.push_str("  Nothing: receivers pass mail the gateway relays for this domain.\n");
    }
    for f in problems {
        let level = if f.severity == Severity::Error {
            "error"
        } else {
            "warning"
        };
        s.push_str(&format!("  - {level}: {}\n", f.message));
    }
    s.push_str(&format!(
        "\nRecommended record (a TXT record at {d}; it replaces the existing v=spf1 record, \
         as a domain must have exactly one):\n  {rec}\n\
         The include:{inc} must stay the first mechanism.\n\n\
         How to verify, once it is published:\n  \
         1. dig +short TXT {d}\n     must print exactly one \"v=spf1 ...\" string, the one above.\n  \
         2. On the relay: smartrelay spf check {d} --region {region}\n     \
         exits 0 and prints \"valid\" when the gateway's addresses pass.\n\n",
        d = r.domain,
        rec = r.recommended,
        inc = r.include,
        region = r.region,
    ));
    s
}

fn html_section(r: &Report) -> String {
    let e = super::dashboard::html_escape;
    let mut s = format!(
        "<h2>SPF for {}</h2>\n<p>Current record:</p>\n",
        e(&r.domain)
    );
    if r.records.is_empty() {
        s.push_str("<p><em>none published</em></p>\n");
    }
    for rec in &r.records {
        s.push_str(&format!("<pre class=\"current\">{}</pre>\n", e(rec)));
    }
    s.push_str("<p>What is wrong with it:</p>\n<ul>\n");
    let mut any = false;
    for f in r.findings.iter().filter(|f| f.severity != Severity::Info) {
        any = true;
        s.push_str(&format!("<li>{}</li>\n", e(&f.message)));
    }
    if !any {
        s.push_str("<li>Nothing: receivers pass mail the gateway relays for this domain.</li>\n");
    }
    s.push_str(&format!(
        "</ul>\n<p>Recommended record (a TXT record at {d}; it replaces the existing v=spf1 \
         record):</p>\n<pre class=\"recommended\">{rec}</pre>\n<p>The include:{inc} must stay \
         the first mechanism.</p>\n<p>How to verify, once it is published:</p>\n<ol>\n\
         <li><code>dig +short TXT {d}</code> must print exactly one \"v=spf1 ...\" string, the \
         one above.</li>\n<li>On the relay: <code>smartrelay spf check {d} --region {region}\
         </code> exits 0 and prints \"valid\".</li>\n</ol>\n",
        d = e(&r.domain),
        rec = e(&r.recommended),
        inc = e(&r.include),
        region = e(&r.region),
    ));
    s
}

/// The message as it goes on the wire, with our `Received:` first.
pub fn compose(
    reports: &[Report],
    from: &str,
    to: &str,
    hostname: &str,
    id: &QueueId,
    now: crate::envelope::Millis,
) -> std::io::Result<(String, Vec<u8>)> {
    let names: Vec<&str> = reports.iter().map(|r| r.domain.as_str()).collect();
    let mut text = format!(
        "Hello,\n\nmail for {} goes out through the security gateway. For receivers to accept \
         it, each domain's SPF record must authorize the gateway. Below, for each domain: its \
         record now, what is wrong with it, the record to publish and how to check it.\n\n",
        names.join(", ")
    );
    let mut html = format!(
        "<!DOCTYPE html>\n<html><body>\n<p>Hello,</p>\n<p>Mail for {} goes out through the \
         security gateway. For receivers to accept it, each domain's SPF record must \
         authorize the gateway.</p>\n",
        super::dashboard::html_escape(&names.join(", "))
    );
    for r in reports {
        text.push_str(&text_section(r));
        html.push_str(&html_section(r));
    }
    text.push_str(&format!("-- \nsmartrelay on {hostname}\n"));
    html.push_str("</body></html>\n");
    let message_id = format!("{}.share@{hostname}", id.as_str());
    let body = MessageBuilder::new()
        .from(("smartrelay onboarding", from))
        .to(to)
        .subject(format!("SPF records to publish for {}", names.join(", ")))
        .message_id(message_id.clone())
        .date((now / 1000) as i64)
        // RFC 3834: machine-made, so no vacation replies come back to postmaster@.
        .header(
            "Auto-Submitted",
            mail_builder::headers::raw::Raw::new("auto-generated"),
        )
        .text_body(text)
        .html_body(html)
        .write_to_vec()?;
    let mut out = format!(
        "Received: by {hostname} (smartrelay onboarding share) id {};\r\n\t{}\r\n",
        id.as_str(),
        rfc5322_date(now)
    )
    .into_bytes();
    out.extend_from_slice(&body);
    Ok((message_id, out))
}

/// `202 {"queue_id"}` once the message is on disk; `400` for a missing or invalid
/// address or an unknown domain (nothing is queued); `503` when the queue takes no mail.
pub async fn share(State(st): State<Admin>, req: Request) -> Result<Response, ApiError> {
    let is_form = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let ask = if is_form {
        let Form(f) = Form::<ShareForm>::from_request(req, &())
            .await
            .map_err(|e| ApiError(e.status(), e.body_text()))?;
        ShareRequest {
            to: f.to,
            domains: f
                .domains
                .split([' ', ','])
                .filter(|d| !d.is_empty())
                .map(str::to_string)
                .collect(),
        }
    } else {
        // Its status: 400 for bad JSON, 413 past the body limit, 415 for another type.
        let Json(r) = Json::<ShareRequest>::from_request(req, &())
            .await
            .map_err(|e| ApiError(e.status(), e.body_text()))?;
        r
    };
    let shared = match queue_share(&st, ask).await {
        Ok(s) => s,
        Err(Refused::Api(e)) => return Err(e),
        Err(Refused::Rate { rate, retry_after }) => {
            ::metrics::counter!(crate::telemetry::ADMIN_REQUESTS_REFUSED_TOTAL, "reason" => "share_rate")
                .increment(1);
            return Ok((
                StatusCode::TOO_MANY_REQUESTS,
                [(
                    header::RETRY_AFTER,
                    retry_after.as_secs().max(1).to_string(),
                )],
                Json(serde_json::json!({
                    "error": format!("admin.share_rate ({rate}) reached: try again later")
                })),
            )
                .into_response());
        }
    };
    if is_form {
        let e = super::dashboard::html_escape;
        let page = format!(
            "<!DOCTYPE html><html><body><p id=\"shared\">The SPF instructions for {} are queued \
             for {} as <code>{}</code>.</p><p><a href=\"/\">Back to the dashboard</a></p>\
             </body></html>",
            e(&shared.domains.join(", ")),
            e(&shared.to),
            e(&shared.queue_id)
        );
        return Ok((StatusCode::ACCEPTED, Html(page)).into_response());
    }
    Ok((StatusCode::ACCEPTED, Json(shared)).into_response())
}

/// Why a Share was not queued.
enum Refused {
    Api(ApiError),
    /// `admin.share_rate` is spent for now.
    Rate {
        rate: crate::rate::Rate,
        retry_after: std::time::Duration,
    },
}

impl From<ApiError> for Refused {
    fn from(e: ApiError) -> Refused {
        Refused::Api(e)
    }
}

/// Checks the request, then takes one of `admin.share_rate` (a refused request takes
/// none), then composes and queues the message.
async fn queue_share(st: &Admin, ask: ShareRequest) -> Result<ShareReply, Refused> {
    let to = ask.to.trim().to_string();
    if to.is_empty() {
        return Err(Refused::Api(ApiError::bad_request(
            "\"to\" is required: the address to send to",
        )));
    }
    // The same grammar as ingress's RCPT: what the relay refuses from a client it does
    // not send on an operator's behalf either.
    let to = crate::address::parse_mailbox(&to)
        .map_err(|why| ApiError::bad_request(format!("{to} is not a valid address: {why}")))?;
    let cfg = st.config();
    let domains =
        select_domains(&ask.domains, &cfg.access.domains).map_err(ApiError::bad_request)?;
    if domains.is_empty() {
        return Err(Refused::Api(ApiError::bad_request("no domain to share")));
    }
    if let Err(b) = st.queue.admission() {
        return Err(Refused::Api(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the queue takes no mail now ({})", b.label()),
        )));
    }
    let rate = cfg.admin.share_rate;
    let decision = st
        .share_cell
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take(&rate, 1, now_ms().saturating_mul(1000));
    if let crate::rate::Decision::Denied { retry_after } = decision {
        return Err(Refused::Rate { rate, retry_after });
    }
    let mut reports = Vec::new();
    for d in &domains {
        reports.push(st.spf.check(d, &cfg.routing.region).await);
    }
    let from = format!("postmaster@{}", domains[0]);
    let id = QueueId::generate();
    let now = now_ms();
    let (message_id, data) = compose(&reports, &from, &to, &cfg.server.hostname, &id, now)
        .map_err(ApiError::internal)?;
    let envelope = Envelope {
        id: id.clone(),
        sender: from,
        recipients: vec![Recipient {
            address: to.clone(),
            notify: None,
            orcpt: None,
        }],
        body: BodyType::SevenBit,
        // A non-ASCII address goes upstream only with SMTPUTF8 (refused, and bounced,
        // where the smart host does not offer it).
        smtputf8: !to.is_ascii(),
        ret: None,
        envid: None,
        client: ClientInfo {
            ip: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            helo: cfg.server.hostname.clone(),
            tls: None,
        },
        received_at: now,
        size: data.len() as u64,
        message_id: Some(format!("<{message_id}>")),
        flags: ContentFlags {
            auto_reply: true,
            report: false,
            eight_bit: !data.is_ascii(),
        },
        generated_dsn: false,
        system: true,
        held: None,
    };
    st.queue
        .submit(Submission {
            envelope,
            data: Data::Memory(Bytes::from(data)),
            proof: TenantProof::Dedicated,
            subject: None,
        })
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    tracing::info!(queue_id = %id, to = %to, domains = ?domains, "onboarding SPF instructions queued");
    Ok(ShareReply {
        queue_id: id.as_str().to_string(),
        to,
        domains,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Share takes what ingress takes (`crate::address`), nothing more: no trailing
    /// dot, no path syntax.
    #[test]
    fn addresses() {
        use crate::address::parse_mailbox;
        for ok in [
            "dns-admin@example.com",
            "a.b+c@sub.example.test",
            "x_y@ex-ample.org",
            "zoë@bücher.test",
        ] {
            assert!(parse_mailbox(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "dns-admin",
            "@example.com",
            "a@",
            "a b@example.com",
            "<a@example.com>",
            ".a@example.com",
            "a..b@example.com",
            "a@exa mple.com",
            "a@-example.com",
            "x@victim.test.",
        ] {
            assert!(parse_mailbox(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn domain_selection() {
        let conf = vec!["example.test".to_string(), "other.test".to_string()];
        assert_eq!(select_domains(&[], &conf).unwrap(), conf);
        assert_eq!(
            select_domains(&["OTHER.test.".into(), "other.test".into()], &conf).unwrap(),
            vec!["other.test"]
        );
        let e = select_domains(&["nope.test".into()], &conf).unwrap_err();
        assert!(e.contains("nope.test"), "{e}");
    }
}
