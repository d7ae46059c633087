//! The gateway's onboarding steps, checked from the relay itself: domains configured,
//! outbound IP ranges confirmed (with the sources actually seen), SPF valid per domain,
//! connector verified, mail flowing. The dashboard and the CLI show the same data.

use std::net::IpAddr;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Json;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::activity::{Confirmation, Source, Summary};
use super::{instructions, Admin, AdminState, ApiError};
use crate::config::Dur;
use crate::deliver::probe::{probe, ProbeReport};
use crate::envelope::{now_ms, Millis};
use crate::regions::RouteTarget;
use crate::spf::validate::Report;

const CONFIRMATION_KEY: &str = "outbound_ips_confirmation";
const VERIFICATION_KEY: &str = "connector_verification";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StepState {
    Done,
    Todo,
    Failing,
}

#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub id: String,
    pub title: String,
    pub state: StepState,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Steps {
    pub complete: bool,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SeenSource {
    #[serde(flatten)]
    pub source: Source,
    /// Inside `access.allowed_ranges`.
    pub allowed: bool,
    /// Refused, but it looks like one of the organization's servers: the ranges (or the
    /// gateway's authorized IPs) need fixing.
    pub notify: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OutboundIps {
    pub ranges: Vec<String>,
    pub confirmed: bool,
    pub confirmed_at: Option<Millis>,
    /// A confirmation exists but was for other ranges.
    pub changed_since_confirmation: bool,
    pub notify: Vec<SeenSource>,
    pub sources: Vec<SeenSource>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FlowCheck {
    pub accepted: u64,
    pub delivered: u64,
    pub ok: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verification {
    pub ok: bool,
    pub at: Millis,
    /// The routes checked, so a change of configuration invalidates the result.
    pub routes: String,
    pub hosts: Vec<ProbeReport>,
    pub mail_flow: FlowCheck,
    pub reason: String,
}

fn range_strings(st: &AdminState) -> Vec<String> {
    let mut r: Vec<String> = st
        .config()
        .access
        .allowed_ranges
        .iter()
        .map(|n| n.to_string())
        .collect();
    r.sort();
    r
}

/// The routes a connector check covers: the default region, every region configured by
/// hand, the internal and the fallback route.
pub fn routes_to_verify(st: &AdminState) -> Vec<RouteTarget> {
    let routing = &st.config().routing;
    let mut out = vec![routing.default_route().clone()];
    for (name, route) in &routing.regions {
        let preset = crate::regions::preset(name).map(|p| p.route(routing.platform));
        let overridden = preset.as_ref() != Some(route);
        if overridden && !out.iter().any(|r| r.name == route.name) {
            out.push(route.clone());
        }
    }
    out.extend(routing.internal.clone());
    out.extend(routing.fallback.clone());
    out
}

fn routes_fingerprint(routes: &[RouteTarget]) -> String {
    serde_json::to_string(routes).unwrap_or_default()
}

pub async fn outbound_ips_view(st: &AdminState) -> Result<OutboundIps, ApiError> {
    let ranges = range_strings(st);
    let confirmation: Option<Confirmation> = st
        .activity
        .meta(CONFIRMATION_KEY)
        .await
        .map_err(ApiError::internal)?;
    let confirmed = confirmation.as_ref().is_some_and(|c| c.ranges == ranges);
    let allowed_nets = &st.config().access.allowed_ranges;
    let raw = st.activity.sources().await.map_err(ApiError::internal)?;
    let accepted_ips: Vec<IpAddr> = raw
        .iter()
        .filter(|s| s.connections > 0)
        .filter_map(|s| s.ip.parse().ok())
        .collect();
    let sources: Vec<SeenSource> = raw
        .into_iter()
        .map(|s| {
            let ip: Option<IpAddr> = s.ip.parse().ok();
            let allowed = ip.is_some_and(|ip| allowed_nets.iter().any(|n| n.contains(&ip)));
            let why = ip
                .filter(|_| s.refused > 0 && !allowed)
                .and_then(|ip| looks_ours(ip, allowed_nets, &accepted_ips, s.refused));
            SeenSource {
                notify: why.is_some(),
                why,
                allowed,
                source: s,
            }
        })
        .collect();
    let notify = sources.iter().filter(|s| s.notify).cloned().collect();
    let gauge = if confirmed { 1.0 } else { 0.0 };
    metrics::gauge!(crate::telemetry::ONBOARDING_OUTBOUND_IPS_CONFIRMED).set(gauge);
    Ok(OutboundIps {
        changed_since_confirmation: confirmation.is_some() && !confirmed,
        confirmed_at: confirmation.filter(|_| confirmed).map(|c| c.confirmed_at),
        confirmed,
        ranges,
        notify,
        sources,
    })
}

/// A refused address next to the organization's own (same /24 or /48 as a configured
/// range or an accepted source), or one that keeps trying, is probably a mail server of
/// the organization missing from the ranges.
fn looks_ours(ip: IpAddr, nets: &[IpNet], accepted: &[IpAddr], attempts: u64) -> Option<String> {
    let wide = |ip: IpAddr| -> Option<IpNet> {
        let prefix = if ip.is_ipv4() { 24 } else { 48 };
        IpNet::new(ip, prefix).ok().map(|n| n.trunc())
    };
    let neighbourhood = wide(ip)?;
    if nets
        .iter()
        .any(|n| neighbourhood.contains(&n.network()) || n.contains(&neighbourhood.network()))
    {
        return Some(format!(
            "refused, but in the same {neighbourhood} as a configured range"
        ));
    }
    if accepted.iter().any(|a| neighbourhood.contains(a)) {
        return Some(format!(
            "refused, but in the same {neighbourhood} as an accepted server"
        ));
    }
    (attempts >= 3).then(|| format!("refused {attempts} times: a server retrying, not a passer-by"))
}

pub async fn spf_reports(st: &AdminState, region: &str) -> Vec<Report> {
    let mut out = Vec::new();
    for domain in &st.config().access.domains {
        let report = st.spf.check(domain, region).await;
        metrics::gauge!(crate::telemetry::ONBOARDING_SPF_VALID, "domain" => domain.clone())
            .set(if report.valid { 1.0 } else { 0.0 });
        out.push(report);
    }
    out
}

/// Everything the onboarding page shows, looked up once.
pub struct Overview {
    pub steps: Steps,
    pub spf: Vec<Report>,
    pub ips: OutboundIps,
    pub verification: Option<Verification>,
}

pub async fn compute_steps(st: &AdminState) -> Result<Steps, ApiError> {
    Ok(overview(st).await?.steps)
}

pub async fn overview(st: &AdminState) -> Result<Overview, ApiError> {
    let cfg = st.config();
    let mut steps = vec![Step {
        id: "domains".into(),
        title: "Domains validated".into(),
        state: StepState::Done,
        reason: format!(
            "{} domain(s) relayed: {}",
            cfg.access.domains.len(),
            cfg.access.domains.join(", ")
        ),
    }];
    let ips = outbound_ips_view(st).await?;
    steps.push(Step {
        id: "outbound_ips".into(),
        title: "Outbound IP ranges confirmed".into(),
        state: if !ips.notify.is_empty() {
            StepState::Failing
        } else if ips.confirmed {
            StepState::Done
        } else {
            StepState::Todo
        },
        reason: if let Some(n) = ips.notify.first() {
            format!(
                "{} {}: fix access.allowed_ranges or notify support",
                n.source.ip,
                n.why.clone().unwrap_or_default()
            )
        } else if ips.confirmed {
            format!("{} confirmed", ips.ranges.join(", "))
        } else if ips.changed_since_confirmation {
            "the ranges changed since they were confirmed: confirm them again".into()
        } else {
            format!(
                "check {} against your servers and confirm",
                ips.ranges.join(", ")
            )
        },
    });
    let spf = spf_reports(st, &cfg.routing.region).await;
    for report in &spf {
        let first_error = report.errors().next().map(|f| f.message.clone());
        steps.push(Step {
            id: format!("spf:{}", report.domain),
            title: format!("SPF record of {} valid", report.domain),
            state: if report.valid {
                StepState::Done
            } else {
                StepState::Failing
            },
            reason: match first_error {
                None => format!(
                    "include:{} first, {} lookups",
                    report.include, report.lookups
                ),
                Some(e) => format!("{e}; publish: {}", report.recommended),
            },
        });
    }
    let current = routes_fingerprint(&routes_to_verify(st));
    let verification: Option<Verification> = st
        .activity
        .meta(VERIFICATION_KEY)
        .await
        .map_err(ApiError::internal)?;
    let verified = verification.as_ref().filter(|v| v.routes == current);
    metrics::gauge!(crate::telemetry::ONBOARDING_CONNECTOR_VERIFIED).set(
        if verified.is_some_and(|v| v.ok) {
            1.0
        } else {
            0.0
        },
    );
    steps.push(Step {
        id: "connector".into(),
        title: "Connector verified".into(),
        state: match verified {
            Some(v) if v.ok => StepState::Done,
            Some(_) => StepState::Failing,
            None => StepState::Todo,
        },
        reason: match (verified, &verification) {
            (Some(v), _) => v.reason.clone(),
            (None, Some(_)) => {
                "the routes changed since the last verification: verify again".into()
            }
            (None, None) => {
                "create the connector on your mail platform, send mail through it, then verify"
                    .into()
            }
        },
    });
    steps.push(tenant_step(st).await?);
    let flow = st
        .activity
        .summary(Duration::from_secs(86_400))
        .await
        .map_err(ApiError::internal)?;
    steps.push(Step {
        id: "mail_flowing".into(),
        title: "Mail flowing through the gateway".into(),
        state: if flow.accepted > 0 && flow.delivered > 0 {
            StepState::Done
        } else if flow.accepted > 0 {
            StepState::Failing
        } else {
            StepState::Todo
        },
        reason: format!(
            "last 24h: {} accepted, {} delivered, {} deferred, {} bounced",
            flow.accepted, flow.delivered, flow.deferred, flow.bounced
        ),
    });
    Ok(Overview {
        steps: Steps {
            complete: steps.iter().all(|s| s.state == StepState::Done),
            steps,
        },
        spf,
        ips,
        verification,
    })
}

/// "Tenant bound": every shared range's mail of the last 24 hours carried proof.
async fn tenant_step(st: &AdminState) -> Result<Step, ApiError> {
    let ranges = &st.config().access.shared_ranges;
    let day = Duration::from_secs(86_400);
    let checks = st
        .activity
        .tenant_checks(day)
        .await
        .map_err(ApiError::internal)?;
    let count = |range: &str, proven: bool| -> u64 {
        checks
            .iter()
            .filter(|(r, p, _)| r == range && (p != "none") == proven)
            .map(|(_, _, n)| n)
            .sum()
    };
    let refused: u64 = ranges.iter().map(|r| count(&r.name, false)).sum();
    let title = "Tenant bound".to_string();
    if ranges.is_empty() {
        return Ok(Step {
            id: "tenant".into(),
            title,
            state: StepState::Done,
            reason: "no shared-platform ranges: every source is one of the organization's own"
                .into(),
        });
    }
    if refused > 0 {
        let last = st
            .activity
            .last_tenant_refusal()
            .await
            .map_err(ApiError::internal)?;
        let last = last.map_or(String::new(), |l| {
            let sender = if l.sender.is_empty() {
                "<>".to_string()
            } else {
                l.sender
            };
            let why = l
                .reason
                .map_or(String::new(), |r| format!(", reason {}", r.label()));
            format!("; last from {} ({}), sender {sender}{why}", l.ip, l.range)
        });
        let mut reasons = st
            .activity
            .tenant_refusals(day)
            .await
            .map_err(ApiError::internal)?;
        reasons.sort();
        let reasons = if reasons.is_empty() {
            String::new()
        } else {
            format!(
                " ({})",
                reasons
                    .iter()
                    .map(|(r, n)| format!("{r}: {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        return Ok(Step {
            id: "tenant".into(),
            title,
            state: StepState::Failing,
            reason: format!(
                "{refused} message(s) from shared ranges refused in the last 24h for lack of tenant proof{reasons}{last}"
            ),
        });
    }
    let waiting: Vec<&str> = ranges
        .iter()
        .filter(|r| count(&r.name, true) == 0)
        .map(|r| r.name.as_str())
        .collect();
    Ok(if waiting.is_empty() {
        Step {
            id: "tenant".into(),
            title,
            state: StepState::Done,
            reason: format!(
                "last 24h: every message from {} carried tenant proof",
                ranges
                    .iter()
                    .map(|r| r.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    } else {
        Step {
            id: "tenant".into(),
            title,
            state: StepState::Todo,
            reason: format!(
                "no proven mail from {} in the last 24h: configure a proof (DKIM, tenant id or route header) and send a message",
                waiting.join(", ")
            ),
        }
    })
}

pub async fn verify(st: &AdminState) -> Result<Verification, ApiError> {
    let routes = routes_to_verify(st);
    let mut hosts = Vec::new();
    for route in &routes {
        for host in &route.hosts {
            hosts.push(
                probe(
                    route,
                    host,
                    st.deliverer.settings(),
                    st.deliverer.connectors(),
                )
                .await,
            );
        }
    }
    let flow = st
        .activity
        .summary(Duration::from_secs(86_400))
        .await
        .map_err(ApiError::internal)?;
    let mail_flow = FlowCheck {
        accepted: flow.accepted,
        delivered: flow.delivered,
        ok: flow.accepted > 0 && flow.delivered > 0,
    };
    let failed: Vec<&ProbeReport> = hosts.iter().filter(|h| !h.ok).collect();
    let reason = if let Some(f) = failed.first() {
        format!(
            "{} ({}): {}",
            f.host,
            f.route,
            f.error.clone().unwrap_or_else(|| "not usable".into())
        )
    } else if !mail_flow.ok {
        format!(
            "smart hosts reachable, but no mail accepted and delivered in the last 24h ({} accepted, {} delivered): send a test message through the connector",
            mail_flow.accepted, mail_flow.delivered
        )
    } else {
        format!(
            "{} smart host(s) reachable; {} messages accepted and {} delivered in 24h",
            hosts.len(),
            mail_flow.accepted,
            mail_flow.delivered
        )
    };
    let v = Verification {
        ok: failed.is_empty() && mail_flow.ok,
        at: now_ms(),
        routes: routes_fingerprint(&routes),
        hosts,
        mail_flow,
        reason,
    };
    st.activity
        .set_meta(VERIFICATION_KEY, &v)
        .await
        .map_err(ApiError::internal)?;
    metrics::gauge!(crate::telemetry::ONBOARDING_CONNECTOR_VERIFIED).set(if v.ok {
        1.0
    } else {
        0.0
    });
    tracing::info!(ok = v.ok, reason = %v.reason, "connector verification");
    Ok(v)
}

/// Keeps the onboarding gauges current without anyone opening the dashboard: an SPF
/// record that breaks shows up in Prometheus within `every`.
pub fn spawn_gauge_refresh(
    tasks: &crate::tasks::Tasks,
    st: std::sync::Arc<AdminState>,
    every: Duration,
) {
    tasks.every(every, move || {
        let st = st.clone();
        async move {
            if let Err(e) = compute_steps(&st).await {
                tracing::warn!(error = %e.1, "onboarding state not refreshed");
            }
        }
    });
}

pub async fn confirm(st: &AdminState) -> Result<Confirmation, ApiError> {
    let c = Confirmation {
        ranges: range_strings(st),
        confirmed_at: now_ms(),
    };
    st.activity
        .set_meta(CONFIRMATION_KEY, &c)
        .await
        .map_err(ApiError::internal)?;
    metrics::gauge!(crate::telemetry::ONBOARDING_OUTBOUND_IPS_CONFIRMED).set(1.0);
    tracing::info!(ranges = ?c.ranges, "outbound IP ranges confirmed");
    Ok(c)
}

fn window(q: &WindowQuery) -> Result<Duration, ApiError> {
    match &q.window {
        None => Ok(Duration::from_secs(86_400)),
        Some(w) => Dur::parse(w).map(|d| d.0).map_err(ApiError::bad_request),
    }
}

pub async fn summary_for(st: &AdminState, w: Duration) -> Result<Summary, ApiError> {
    st.activity.summary(w).await.map_err(ApiError::internal)
}

/// Browsers posting the dashboard's forms get sent back to it; API clients get JSON.
fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"))
}

// ---- handlers ----

pub async fn steps(State(st): State<Admin>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(compute_steps(&st).await?))
}

#[derive(Deserialize)]
pub struct RegionQuery {
    region: Option<String>,
}

pub async fn spf_all(
    State(st): State<Admin>,
    Query(q): Query<RegionQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let region = q
        .region
        .unwrap_or_else(|| st.config().routing.region.clone());
    check_region(&region)?;
    let reports = spf_reports(&st, &region).await;
    Ok(Json(
        json!({ "region": region, "valid": reports.iter().all(|r| r.valid), "domains": reports }),
    ))
}

pub async fn spf_one(
    State(st): State<Admin>,
    Path(domain): Path<String>,
    Query(q): Query<RegionQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let region = q
        .region
        .unwrap_or_else(|| st.config().routing.region.clone());
    check_region(&region)?;
    if !crate::envelope::is_valid_domain(&domain) {
        return Err(ApiError::bad_request(format!(
            "`{domain}` is not a domain name"
        )));
    }
    Ok(Json(st.spf.check(&domain, &region).await))
}

fn check_region(region: &str) -> Result<(), ApiError> {
    crate::regions::preset(region)
        .map(|_| ())
        .ok_or_else(|| ApiError::bad_request(format!("unknown region `{region}`")))
}

pub async fn outbound_ips(State(st): State<Admin>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(outbound_ips_view(&st).await?))
}

pub async fn confirm_ips(
    State(st): State<Admin>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let c = confirm(&st).await?;
    if wants_html(&headers) {
        return Ok(Redirect::to("/").into_response());
    }
    Ok(
        Json(json!({ "confirmed": true, "ranges": c.ranges, "confirmed_at": c.confirmed_at }))
            .into_response(),
    )
}

pub async fn verify_connector(
    State(st): State<Admin>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let v = verify(&st).await?;
    if wants_html(&headers) {
        return Ok(Redirect::to("/#connector").into_response());
    }
    let status = if v.ok {
        StatusCode::OK
    } else {
        StatusCode::UNPROCESSABLE_ENTITY
    };
    let summary = if v.ok {
        Some(summary_for(&st, Duration::from_secs(86_400)).await?)
    } else {
        None
    };
    Ok((
        status,
        Json(json!({ "verification": v, "summary": summary })),
    )
        .into_response())
}

#[derive(Deserialize)]
pub struct WindowQuery {
    window: Option<String>,
}

pub async fn summary(
    State(st): State<Admin>,
    Query(q): Query<WindowQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let w = window(&q)?;
    Ok(Json(summary_for(&st, w).await?))
}

#[derive(Deserialize)]
pub struct PlatformQuery {
    platform: Option<String>,
    format: Option<String>,
}

pub async fn instructions(
    State(st): State<Admin>,
    Query(q): Query<PlatformQuery>,
) -> Result<Response, ApiError> {
    let platform = q.platform.as_deref().unwrap_or("exchange");
    let reports = spf_reports(&st, &st.config().routing.region).await;
    let port = st.smtp_addrs.first().map_or(25, |a| a.port());
    let ins = instructions::build(&st.config(), port, platform, &reports)
        .map_err(ApiError::bad_request)?;
    if q.format.as_deref() == Some("text") {
        return Ok((
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            ins.text,
        )
            .into_response());
    }
    Ok(Json(ins).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_neighbours_are_flagged() {
        let nets: Vec<IpNet> = vec!["10.0.0.0/28".parse().unwrap()];
        let accepted: Vec<IpAddr> = vec!["192.0.2.10".parse().unwrap()];
        assert!(looks_ours("10.0.0.77".parse().unwrap(), &nets, &accepted, 1).is_some());
        assert!(looks_ours("192.0.2.99".parse().unwrap(), &nets, &accepted, 1).is_some());
        assert!(looks_ours("198.51.100.1".parse().unwrap(), &nets, &accepted, 1).is_none());
        assert!(looks_ours("198.51.100.1".parse().unwrap(), &nets, &accepted, 5).is_some());
    }
}
