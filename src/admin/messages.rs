//! `/api/v1/messages` and the dashboard's `/messages` pages: message tracking searched
//! by Message-ID, queue id, sender, recipient, status and time, and one message's whole
//! timeline.

use std::fmt::Write;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::dashboard::{html_escape, page_shell, when};
use super::{Admin, ApiError};
use crate::envelope::{now_ms, QueueId};
use crate::tracking::model::{Filter, Record, TrackingError};
use crate::tracking::Store;
use crate::trusted::export::parse_since;

/// A search as the API and the page take it; times as `2h` (ago), a date or RFC 3339.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Search {
    message_id: Option<String>,
    queue_id: Option<String>,
    sender: Option<String>,
    recipient: Option<String>,
    status: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

fn store(st: &Admin) -> Result<Store, ApiError> {
    st.tracking
        .clone()
        .ok_or_else(|| ApiError::not_found("message tracking is off (tracking.enabled = false)"))
}

fn time(v: &Option<String>, what: &str) -> Result<Option<u64>, ApiError> {
    v.as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            parse_since(t, now_ms()).map_err(|e| ApiError::bad_request(format!("{what}: {e}")))
        })
        .transpose()
}

fn filter(s: &Search) -> Result<Filter, ApiError> {
    Ok(Filter {
        message_id: s.message_id.clone(),
        queue_id: s.queue_id.clone(),
        sender: s.sender.clone(),
        recipient: s.recipient.clone(),
        status: s.status.clone(),
        since: time(&s.since, "since")?,
        until: time(&s.until, "until")?,
        limit: s.limit,
        cursor: s.cursor.clone(),
    })
}

fn tracking_error(e: TrackingError) -> ApiError {
    match e {
        TrackingError::Invalid(m) => ApiError::bad_request(m),
        other => ApiError(StatusCode::SERVICE_UNAVAILABLE, other.to_string()),
    }
}

pub async fn search(
    State(st): State<Admin>,
    Query(s): Query<Search>,
) -> Result<impl IntoResponse, ApiError> {
    let store = store(&st)?;
    let page = store.search(&filter(&s)?).await.map_err(tracking_error)?;
    Ok(Json(page))
}

async fn record(st: &Admin, id: &str) -> Result<Record, ApiError> {
    let store = store(st)?;
    let id = QueueId::parse(id.trim())
        .ok_or_else(|| ApiError::bad_request(format!("`{id}` is not a queue id")))?;
    store
        .show(id.as_str())
        .await
        .map_err(tracking_error)?
        .ok_or_else(|| ApiError::not_found(format!("no message {id} is tracked")))
}

pub async fn show(
    State(st): State<Admin>,
    Path(id): Path<String>,
) -> Result<Json<Record>, ApiError> {
    record(&st, &id).await.map(Json)
}

fn field(name: &str, label: &str, value: &Option<String>) -> String {
    format!(
        "<label>{label} <input name=\"{name}\" value=\"{}\"></label> ",
        html_escape(value.as_deref().unwrap_or(""))
    )
}

/// The search page: the form, and the messages it found.
pub async fn page(State(st): State<Admin>, Query(s): Query<Search>) -> Response {
    let mut b = String::from("<h1>Messages</h1><p><a href=\"/\">Back to the dashboard</a></p>");
    b.push_str("<form method=\"get\" action=\"/messages\" id=\"search\">");
    b.push_str(&field("message_id", "Message-ID", &s.message_id));
    b.push_str(&field("sender", "Sender", &s.sender));
    b.push_str(&field("recipient", "Recipient", &s.recipient));
    b.push_str(&field("status", "Status", &s.status));
    b.push_str(&field("since", "Since (2h, 2026-12-01)", &s.since));
    b.push_str("<button type=\"submit\">Search</button></form>");
    let found = match (store(&st), filter(&s)) {
        (Ok(store), Ok(f)) => store.search(&f).await.map_err(tracking_error),
        (Err(e), _) | (_, Err(e)) => Err(e),
    };
    match found {
        Ok(page) => {
            let _ = write!(b, "<p id=\"found\">{} message(s)</p>", page.messages.len());
            b.push_str("<table><tr><th>Received</th><th>Queue id</th><th>Node</th><th>Sender</th><th>Recipients</th><th>Message-ID</th><th>Status</th></tr>");
            for m in &page.messages {
                let rcpts: Vec<String> = m
                    .recipients
                    .iter()
                    .map(|r| format!("{} ({})", html_escape(&r.address), r.status.label()))
                    .collect();
                let _ = write!(
                    b,
                    "<tr><td>{}</td><td><a href=\"/messages/{id}\">{id}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    when(m.received_at),
                    html_escape(&m.node),
                    html_escape(if m.sender.is_empty() { "<>" } else { &m.sender }),
                    rcpts.join("<br>"),
                    html_escape(m.message_id.as_deref().unwrap_or("")),
                    m.status.label(),
                    id = html_escape(&m.queue_id),
                );
            }
            b.push_str("</table>");
            if let Some(next) = &page.next_cursor {
                let _ = write!(
                    b,
                    "<p><a href=\"/messages?{}\">Older</a></p>",
                    html_escape(&next_query(&s, next))
                );
            }
        }
        Err(e) => {
            let _ = write!(b, "<p id=\"error\">{}</p>", html_escape(&e.1));
        }
    }
    Html(page_shell("smartrelay: messages", &b)).into_response()
}

fn next_query(s: &Search, cursor: &str) -> String {
    let pairs = [
        ("message_id", &s.message_id),
        ("sender", &s.sender),
        ("recipient", &s.recipient),
        ("status", &s.status),
        ("since", &s.since),
        ("until", &s.until),
    ];
    let mut q: Vec<(&str, String)> = pairs
        .iter()
        .filter_map(|(k, v)| {
            let v: &Option<String> = v;
            v.clone().filter(|v| !v.is_empty()).map(|v| (*k, v))
        })
        .collect();
    q.push(("cursor", cursor.to_string()));
    serde_urlencoded::to_string(q).unwrap_or_default()
}

/// One message's timeline.
pub async fn timeline(State(st): State<Admin>, Path(id): Path<String>) -> Response {
    let r = match record(&st, &id).await {
        Ok(r) => r,
        Err(e) => {
            return (
                e.0,
                Html(page_shell(
                    "smartrelay: message",
                    &format!(
                    "<h1>Message</h1><p id=\"error\">{}</p><p><a href=\"/messages\">Search</a></p>",
                    html_escape(&e.1)
                ),
                )),
            )
                .into_response()
        }
    };
    let mut b = String::new();
    let _ = write!(
        b,
        "<h1>Message {}</h1><p><a href=\"/messages\">Search</a> · <a href=\"/\">Dashboard</a></p>",
        html_escape(&r.queue_id)
    );
    let _ = write!(
        b,
        "<table id=\"message\"><tr><th>Status</th><td id=\"status\">{}</td></tr><tr><th>Node</th><td>{}</td></tr><tr><th>Received</th><td>{}</td></tr><tr><th>Client</th><td>{} (HELO {}, TLS {})</td></tr><tr><th>Proof</th><td>{}</td></tr><tr><th>Sender</th><td>{}</td></tr><tr><th>Message-ID</th><td>{}</td></tr><tr><th>Size</th><td>{}</td></tr>",
        r.status.label(),
        html_escape(&r.node),
        when(r.received_at),
        html_escape(&r.client),
        html_escape(&r.helo),
        html_escape(r.tls.as_deref().unwrap_or("none")),
        html_escape(&r.proof),
        html_escape(if r.sender.is_empty() { "<>" } else { &r.sender }),
        html_escape(r.message_id.as_deref().unwrap_or("")),
        r.size
    );
    if let Some(s) = &r.subject {
        let _ = write!(b, "<tr><th>Subject</th><td>{}</td></tr>", html_escape(s));
    }
    b.push_str("</table><h2>Recipients</h2><table><tr><th>Address</th><th>Status</th><th>Attempts</th></tr>");
    for rc in &r.recipients {
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            html_escape(&rc.address),
            rc.status.label(),
            rc.attempts.len()
        );
    }
    b.push_str("</table><h2>Timeline</h2><table id=\"timeline\"><tr><th>At</th><th>Event</th><th>Recipient</th><th>Details</th></tr>");
    for e in &r.events {
        let details: Vec<String> = e
            .detail
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| {
                let v = v.as_str().map_or_else(|| v.to_string(), str::to_string);
                format!("{k}: {}", html_escape(&v))
            })
            .collect();
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            when(e.at),
            html_escape(&e.kind),
            html_escape(e.recipient.as_deref().unwrap_or("")),
            details.join("; ")
        );
    }
    b.push_str("</table>");
    Html(page_shell("smartrelay: message", &b)).into_response()
}
