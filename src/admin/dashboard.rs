//! The onboarding dashboard at `/`: server-rendered HTML, no JavaScript. It reads the
//! same data as the JSON API and posts the same endpoints (confirm, verify) as forms.

use std::fmt::Write;
use std::time::Duration;

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Form, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::Extension;
use serde::Deserialize;

use super::guard::{self, SessionInfo};
use super::onboarding::{self, StepState};
use super::{trusted_api, Admin};
use crate::envelope::rfc3339;
use crate::envelope::{now_ms, Millis};
use crate::spf::walk::Node;
use crate::spf::Severity;

pub(crate) fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

pub(crate) fn when(ms: Millis) -> String {
    if ms == 0 {
        "never".into()
    } else {
        rfc3339(ms)
    }
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:70em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
.step{padding:.4em .6em;margin:.3em 0;border-left:4px solid #bbb;background:#fafafa}
.done{border-color:#2e7d32}.failing{border-color:#c62828}.todo{border-color:#9e9e9e}
.mark{font-weight:bold;margin-right:.4em}.done .mark{color:#2e7d32}.todo .mark{color:#757575}
.bang{display:inline-block;width:1.2em;height:1.2em;line-height:1.2em;text-align:center;border-radius:50%;background:#c62828;color:#fff;font-weight:bold}
.tick{color:#2e7d32;font-weight:bold}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.2em .5em;text-align:left;font-size:.9em}
code,pre{background:#f0f0f0;padding:.1em .3em}pre{padding:.5em;white-space:pre-wrap}
.error{color:#c62828}.warning{color:#ef6c00}.info{color:#555}.notify{background:#ffebee}
form{display:inline}button{margin:.3em 0}";

pub(crate) fn page_shell(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{STYLE}</style></head><body>{body}</body></html>",
        html_escape(title)
    )
}

pub fn login_page() -> Response {
    let body = "<h1>smartrelay</h1><p>This dashboard needs the admin token.</p>\
        <form method=\"post\" action=\"/login\"><label>Token <input type=\"password\" name=\"token\"></label> \
        <button type=\"submit\">Sign in</button></form>";
    (
        StatusCode::UNAUTHORIZED,
        Html(page_shell("smartrelay: sign in", body)),
    )
        .into_response()
}

#[derive(Deserialize)]
pub struct LoginForm {
    token: String,
}

/// The session cookie for `s`: never the token, gone with the session.
fn session_cookie(s: &SessionInfo, ttl: Duration) -> String {
    format!(
        "{}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        guard::SESSION_COOKIE,
        s.id,
        ttl.as_secs()
    )
}

fn with_cookie(mut resp: Response, cookie: &str) -> Response {
    if let Ok(v) = cookie.parse() {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

/// Signing in: the token for a session of `admin.session_ttl`. A wrong token makes the
/// client wait (1 s, then 2 s, 4 s… up to 5 minutes) before the next try.
pub async fn login(
    State(st): State<Admin>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Form(f): Form<LoginForm>,
) -> Response {
    let ip = peer.ip().to_canonical();
    if let Some(wait) = st.guard.throttled(ip) {
        return super::throttled(wait);
    }
    let cfg = st.config();
    let ok = cfg
        .admin
        .token
        .as_deref()
        .filter(|t| !t.is_empty())
        .is_some_and(|t| guard::secret_matches(t, f.token.trim()));
    if !ok {
        ::metrics::counter!(crate::telemetry::ADMIN_LOGIN_FAILURES_TOTAL).increment(1);
        st.guard.failed(ip);
        tracing::warn!(client = %ip, "admin sign-in with a wrong token");
        return login_page();
    }
    st.guard.succeeded(ip);
    let ttl = cfg.admin.session_ttl.0;
    let session = st.guard.open(true, ttl);
    with_cookie(
        Redirect::to("/").into_response(),
        &session_cookie(&session, ttl),
    )
}

/// Signing out: the session is forgotten here and the cookie cleared.
pub async fn logout(State(st): State<Admin>, session: Option<Extension<SessionInfo>>) -> Response {
    if let Some(Extension(s)) = session {
        st.guard.close(&s.id);
    }
    with_cookie(
        Redirect::to("/").into_response(),
        &format!(
            "{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
            guard::SESSION_COOKIE
        ),
    )
}

/// The hidden field every form of the page carries.
fn csrf_field(s: &SessionInfo) -> String {
    format!(
        "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
        guard::CSRF_FIELD,
        html_escape(&s.csrf)
    )
}

pub async fn page(State(st): State<Admin>, session: Option<Extension<SessionInfo>>) -> Response {
    let cfg = st.config();
    // The page's forms need a session for their CSRF token: without a token to sign
    // in with, an anonymous one.
    let (session, new_cookie) = match session {
        Some(Extension(s)) => (s, None),
        None => {
            let ttl = cfg.admin.session_ttl.0;
            let s = st.guard.open(false, ttl);
            let c = session_cookie(&s, ttl);
            (s, Some(c))
        }
    };
    let resp = render(&st, &session).await;
    match new_cookie {
        Some(c) => with_cookie(resp, &c),
        None => resp,
    }
}

async fn render(st: &Admin, session: &SessionInfo) -> Response {
    let st = st.clone();
    let csrf = csrf_field(session);
    let mut b = String::new();
    let cfg = st.config();
    let _ = write!(
        b,
        "<h1>smartrelay on {}</h1><p><a href=\"/messages\" id=\"messages-link\">Messages: what happened to a message</a></p>",
        html_escape(&cfg.server.hostname)
    );
    let overview = match onboarding::overview(&st).await {
        Ok(o) => o,
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                Html(page_shell("smartrelay", &html_escape(&e.1))),
            )
                .into_response()
        }
    };
    let (steps, reports, ips, verification) = (
        &overview.steps,
        &overview.spf,
        &overview.ips,
        overview.verification.as_ref(),
    );
    let done = steps
        .steps
        .iter()
        .filter(|s| s.state == StepState::Done)
        .count();
    let _ = write!(
        b,
        "<p id=\"overall\" data-complete=\"{}\">Onboarding: {done} of {} steps done.</p><h2>Onboarding</h2>",
        steps.complete,
        steps.steps.len()
    );
    for step in &steps.steps {
        let (class, mark) = match step.state {
            StepState::Done => ("done", "✔"),
            // A drawn badge: the emoji needs a font that servers seldom have.
            StepState::Failing => ("failing", "<span class=\"bang\" title=\"failing\">!</span>"),
            StepState::Todo => ("todo", "○"),
        };
        let _ = write!(
            b,
            "<div class=\"step {class}\" id=\"step-{id}\" data-step=\"{id}\" data-state=\"{class}\"><span class=\"mark\">{mark}</span><strong>{}</strong> — {}",
            html_escape(&step.title),
            html_escape(&step.reason),
            id = html_escape(&step.id)
        );
        b.push_str("<details><summary>More</summary>");
        if step.id == "outbound_ips" {
            outbound_details(&mut b, ips, &csrf);
        } else if let Some(domain) = step.id.strip_prefix("spf:") {
            if let Some(r) = reports.iter().find(|r| r.domain == domain) {
                spf_details(&mut b, r);
            }
        } else if step.id == "connector" {
            connector_details(&mut b, verification, &csrf);
        } else if step.id == "domains" {
            let _ = write!(
                b,
                "<p>Mail is relayed only for: {}</p>",
                html_escape(&cfg.access.domains.join(", "))
            );
        } else if step.id == "mail_flowing" {
            b.push_str("<p>See the outbound flow below.</p>");
        } else if step.id == "tenant" {
            tenant_details(&mut b, &st);
        }
        b.push_str("</details></div>");
    }
    share_form(&mut b, &cfg.access.domains, &csrf);
    if let Ok(s) = onboarding::summary_for(&st, Duration::from_secs(86_400)).await {
        let _ = write!(
            b,
            "<h2 id=\"flow\">Outbound flow, last 24 hours</h2><p id=\"flow-totals\">{} accepted, {} delivered, {} deferred, {} bounced, {} connections refused</p>",
            s.accepted, s.delivered, s.deferred, s.bounced, s.refused_connections
        );
        count_table(&mut b, "By source address", &s.by_source);
        count_table(&mut b, "By sender domain", &s.by_sender_domain);
        b.push_str("<table><tr><th>Route / smart host</th><th>Delivered</th><th>Deferred</th><th>Bounced</th></tr>");
        for r in s.by_route.iter().chain(&s.by_smart_host) {
            let _ = write!(
                b,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                html_escape(&r.key),
                r.delivered,
                r.deferred,
                r.bounced
            );
        }
        b.push_str("</table>");
        count_table(&mut b, "Top upstream replies", &s.top_replies);
    }
    let queue = st.queue.list();
    let held = queue.iter().filter(|q| q.held).count();
    let _ = write!(
        b,
        "<h2 id=\"queue\">Queue</h2><p id=\"queue-count\">{} message(s) queued, {held} held.</p>",
        queue.len()
    );
    if !queue.is_empty() {
        b.push_str("<table><tr><th>ID</th><th>Sender</th><th>Recipients</th><th>Attempts</th><th>Next attempt</th><th>Last reply</th></tr>");
        for q in queue.iter().take(25) {
            let _ = write!(
                b,
                "<tr><td><a href=\"/messages/{id}\">{id}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                html_escape(if q.sender.is_empty() { "<>" } else { &q.sender }),
                q.recipients.len(),
                q.attempts,
                if q.held {
                    "held".into()
                } else {
                    when(q.next_attempt)
                },
                html_escape(
                    &q.last_reply
                        .as_ref()
                        .map(|r| r.to_string())
                        .unwrap_or_default()
                ),
                id = q.id,
            );
        }
        b.push_str("</table>");
    }
    restricted_section(&mut b, &st, &csrf);
    b.push_str("<h2 id=\"trusted\">Trusted senders</h2>");
    match trusted_api::stats_of(&st).await {
        Ok(t) => {
            let _ = write!(
                b,
                "<p id=\"trusted-progress\" data-ready=\"{}\">{} addresses in {} domains learned; {} of {} days observed{}.</p>",
                t.ready,
                t.recipients,
                t.domains,
                t.days_observed.min(u64::from(t.learning_days)),
                t.learning_days,
                if t.ready { " — ready" } else { " — still learning" }
            );
        }
        Err(e) => {
            let _ = write!(b, "<p>{}</p>", html_escape(&e.1));
        }
    }
    if session.signed_in {
        let _ = write!(
            b,
            "<form method=\"post\" action=\"/logout\">{csrf}<button type=\"submit\" id=\"logout\">Sign out</button></form>"
        );
    }
    let _ = write!(b, "<p><small>Rendered {}.</small></p>", rfc3339(now_ms()));
    Html(page_shell("smartrelay onboarding", &b)).into_response()
}

/// The key values a limit restricted, each with Release and Discard.
fn restricted_section(b: &mut String, st: &Admin, csrf: &str) {
    let rows = super::limits_api::restricted_views(st);
    let _ = write!(
        b,
        "<h2 id=\"restricted\">Restricted senders</h2><p id=\"restricted-count\">{} restricted: their mail is accepted and held. Release delivers it; Discard deletes it without a bounce (after securing the account).</p>",
        rows.len()
    );
    if rows.is_empty() {
        return;
    }
    b.push_str("<table><tr><th>Key</th><th>Value</th><th>Limit</th><th>Since</th><th>Held here</th><th></th></tr>");
    for r in &rows {
        let (key, value) = (r.key.label(), html_escape(&r.value));
        let form = |action: &str, label: &str| {
            format!(
                "<form method=\"post\" action=\"/api/v1/restricted/{action}\" style=\"display:inline\">{csrf}<input type=\"hidden\" name=\"key\" value=\"{key}\"><input type=\"hidden\" name=\"value\" value=\"{value}\"><button type=\"submit\" class=\"{action}\">{label}</button></form>"
            )
        };
        let _ = write!(
            b,
            "<tr><td>{key}</td><td>{value}</td><td>{}</td><td>{}</td><td>{}</td><td>{} {}</td></tr>",
            html_escape(&r.limit),
            html_escape(&r.since),
            r.held,
            form("release", "Release"),
            form("discard", "Discard")
        );
    }
    b.push_str("</table>");
}

fn count_table(b: &mut String, title: &str, rows: &[super::activity::Count]) {
    let _ = write!(
        b,
        "<table><tr><th>{}</th><th>Messages</th></tr>",
        html_escape(title)
    );
    for r in rows {
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td></tr>",
            html_escape(&r.key),
            r.count
        );
    }
    b.push_str("</table>");
}

fn outbound_details(b: &mut String, ips: &onboarding::OutboundIps, csrf: &str) {
    let _ = write!(
        b,
        "<p>Configured ranges: <code>{}</code></p>",
        html_escape(&ips.ranges.join(", "))
    );
    if !ips.notify.is_empty() {
        b.push_str("<p class=\"error\"><strong>Refused addresses that look like your servers</strong> — add them to access.allowed_ranges, or notify support:</p><ul>");
        for n in &ips.notify {
            let _ = write!(
                b,
                "<li class=\"notify\">{} — {}</li>",
                html_escape(&n.source.ip),
                html_escape(n.why.as_deref().unwrap_or(""))
            );
        }
        b.push_str("</ul>");
    }
    b.push_str("<table id=\"sources\"><tr><th>Source address</th><th>Allowed</th><th>Sessions</th><th>Refused</th><th>Messages</th><th>Last seen</th></tr>");
    for s in &ips.sources {
        let _ = write!(
            b,
            "<tr{}><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            if s.notify { " class=\"notify\"" } else { "" },
            html_escape(&s.source.ip),
            if s.allowed { "yes" } else { "no" },
            s.source.connections,
            s.source.refused,
            s.source.messages,
            when(s.source.last_seen)
        );
    }
    b.push_str("</table>");
    if ips.confirmed {
        let _ = write!(
            b,
            "<p>Confirmed {}.</p>",
            when(ips.confirmed_at.unwrap_or(0))
        );
    } else {
        let _ = write!(b, "<form method=\"post\" action=\"/api/v1/onboarding/outbound-ips/confirm\">{csrf}<input type=\"hidden\" name=\"confirm\" value=\"1\"><button type=\"submit\" id=\"confirm-ips\">Confirm these ranges</button></form>");
    }
}

/// The vendor page's "Share": the SPF instructions mailed to whoever runs DNS.
fn share_form(b: &mut String, domains: &[String], csrf: &str) {
    let _ = write!(
        b,
        "<h2 id=\"share\">Share the SPF instructions</h2><p>Mails each domain's current \
         record, what is wrong with it, the record to publish and how to verify it, from \
         postmaster@ through this relay.</p><form method=\"post\" \
         action=\"/api/v1/onboarding/share\" id=\"share-form\">{csrf}<label>To <input \
         type=\"email\" name=\"to\" required></label> <label>Domains <input name=\"domains\" \
         placeholder=\"all: {}\"></label> <button type=\"submit\" id=\"share-spf\">Share\
         </button></form>",
        html_escape(&domains.join(" "))
    );
}

fn spf_details(b: &mut String, r: &crate::spf::validate::Report) {
    let _ = write!(
        b,
        "<p class=\"spf-result\" data-valid=\"{}\">{} SPF for {} against include:{} — {} of 10 DNS lookups, {} void</p>",
        r.valid,
        if r.valid {
            "<span class=\"tick\">✔</span> valid"
        } else {
            "<span class=\"bang\">!</span> not valid"
        },
        html_escape(&r.domain),
        html_escape(&r.include),
        r.lookups,
        r.void_lookups
    );
    for rec in &r.records {
        let _ = write!(b, "<p>Published: <code>{}</code></p>", html_escape(rec));
    }
    if !r.findings.is_empty() {
        b.push_str("<ul class=\"findings\">");
        for f in &r.findings {
            let class = match f.severity {
                Severity::Error => "error",
                Severity::Warning => "warning",
                Severity::Info => "info",
            };
            let _ = write!(
                b,
                "<li class=\"{class}\" data-code=\"{}\">{class}: {}{}</li>",
                f.code,
                html_escape(&f.message),
                f.term
                    .as_ref()
                    .map(|t| format!(" (<code>{}</code>)", html_escape(t)))
                    .unwrap_or_default()
            );
        }
        b.push_str("</ul>");
    }
    gateway_pass(b, &r.gateway_pass);
    let _ = write!(
        b,
        "<p>Recommended record:</p><pre class=\"recommended\">{}</pre>",
        html_escape(&r.recommended)
    );
    b.push_str("<details><summary>Include tree</summary>");
    tree(b, &r.tree);
    b.push_str("</details>");
}

/// The receivers' result for each gateway range.
fn gateway_pass(b: &mut String, p: &crate::spf::gateway::GatewayPass) {
    use crate::spf::gateway::Verdict;
    let verdict = match p.verdict {
        Verdict::All => "all",
        Verdict::Some => "some",
        Verdict::None => "none",
        Verdict::Unknown => "unknown",
    };
    let _ = write!(
        b,
        "<p class=\"gateway-pass\" data-verdict=\"{verdict}\">Receivers pass gateway-relayed mail for <b>{verdict}</b> of the gateway's ranges.</p>"
    );
    if p.ranges.is_empty() {
        return;
    }
    b.push_str("<table class=\"gateway-ranges\"><tr><th>Range</th><th>Address</th><th>Result</th><th>Decided by</th></tr>");
    for r in &p.ranges {
        let _ = write!(
            b,
            "<tr data-result=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            r.result,
            r.range,
            r.address,
            r.result,
            r.mechanism
                .as_ref()
                .map(|t| format!("<code>{}</code>", html_escape(t)))
                .unwrap_or_else(|| "no term matched".into())
        );
    }
    b.push_str("</table>");
}

fn tree(b: &mut String, n: &Node) {
    let _ = write!(
        b,
        "<ul><li>{} <code>{}</code> ({} lookups{}){}",
        html_escape(n.via.label()),
        html_escape(&n.domain),
        n.total_lookups,
        n.error
            .as_ref()
            .map(|e| format!(", <span class=\"error\">{}</span>", html_escape(e)))
            .unwrap_or_default(),
        n.record
            .as_ref()
            .map(|r| format!("<br><small>{}</small>", html_escape(r)))
            .unwrap_or_default()
    );
    for c in &n.children {
        tree(b, c);
    }
    b.push_str("</li></ul>");
}

fn connector_details(b: &mut String, v: Option<&onboarding::Verification>, csrf: &str) {
    match v {
        Some(v) => {
            let _ = write!(
                b,
                "<p id=\"connector\">Last verified {}: {}</p>",
                when(v.at),
                html_escape(&v.reason)
            );
            b.push_str("<table><tr><th>Route</th><th>Smart host</th><th>Reachable</th><th>STARTTLS</th><th>TLS</th><th>Certificate</th><th>Result</th></tr>");
            for h in &v.hosts {
                let _ = write!(
                    b,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    html_escape(&h.route),
                    html_escape(&h.host),
                    if h.reachable { "yes" } else { "no" },
                    match h.starttls_offered { Some(true) => "offered", Some(false) => "not offered", None => "?" },
                    html_escape(h.tls.as_deref().unwrap_or("none")),
                    match h.certificate_verified { Some(true) => "verified", Some(false) => "does not verify", None => "-" },
                    if h.ok {
                        "<span class=\"tick\">✔</span>".to_string()
                    } else {
                        format!("<span class=\"bang\">!</span> {}", html_escape(h.error.as_deref().unwrap_or("")))
                    }
                );
            }
            b.push_str("</table>");
        }
        None => b.push_str("<p id=\"connector\">Not verified yet.</p>"),
    }
    let _ = write!(b, "<form method=\"post\" action=\"/api/v1/onboarding/connector/verify\">{csrf}<input type=\"hidden\" name=\"verify\" value=\"1\"><button type=\"submit\" id=\"verify-connector\">Verify connector</button></form>");
}

/// Each shared range: its addresses (configured and from SPF) and the proofs it takes.
fn tenant_details(b: &mut String, st: &super::AdminState) {
    let views = st.shared_sources.get().view();
    if views.is_empty() {
        b.push_str("<p>No shared-platform ranges are configured.</p>");
        return;
    }
    b.push_str(
        "<table id=\"shared-ranges\"><tr><th>Range</th><th>Addresses</th><th>Proofs</th></tr>",
    );
    for (v, r) in views.iter().zip(&st.config().access.shared_ranges) {
        let mut nets: Vec<String> = v.ranges.iter().map(|n| n.to_string()).collect();
        if let Some(spf) = &v.ranges_from_spf {
            match &v.resolved {
                Some(res) => nets.push(format!("{} networks from {spf}", res.nets.len())),
                None => nets.push(format!("{spf}: not resolved yet")),
            }
        }
        let proofs = r.proofs(&st.config().access.domains);
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            html_escape(&v.name),
            html_escape(&nets.join(", ")),
            html_escape(&proofs.join(", "))
        );
    }
    b.push_str("</table>");
}
