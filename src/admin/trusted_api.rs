//! `/api/v1/trusted-senders`: the learned list, paged and filtered, as JSON or CSV, and
//! the learning progress.

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::{Admin, ApiError};
use crate::envelope::now_ms;
use crate::trusted::export::{csv_row, parse_since, CSV_HEADER};
use crate::trusted::Store;
use crate::trusted::{Filter, Stats, TrustedError};

#[derive(Deserialize, Default)]
pub struct ListQuery {
    format: Option<String>,
    sender: Option<String>,
    domain: Option<String>,
    since: Option<String>,
    min_count: Option<u64>,
    limit: Option<usize>,
    cursor: Option<String>,
    /// Entries a restricted sender taught too.
    #[serde(default)]
    include_suspect: bool,
}

fn store(st: &Admin) -> Result<Store, ApiError> {
    st.trusted.clone().ok_or_else(|| {
        ApiError::not_found("the trusted-sender list is disabled (trusted.enabled = false)")
    })
}

pub async fn list(
    State(st): State<Admin>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let store = store(&st)?;
    let since = q
        .since
        .as_deref()
        .map(|s| parse_since(s, now_ms()))
        .transpose()
        .map_err(ApiError::bad_request)?;
    let filter = Filter {
        sender: q.sender.filter(|s| !s.is_empty()),
        domain: q.domain.filter(|s| !s.is_empty()),
        since,
        min_count: q.min_count,
        limit: q.limit.unwrap_or(1000),
        cursor: q.cursor.filter(|s| !s.is_empty()),
        include_suspect: q.include_suspect,
    };
    let page = store.list(filter).await.map_err(|e| match e {
        TrustedError::Invalid(m) => ApiError::bad_request(m),
        other => ApiError(StatusCode::SERVICE_UNAVAILABLE, other.to_string()),
    })?;
    match q.format.as_deref().unwrap_or("json") {
        "json" => Ok(Json(page).into_response()),
        "csv" => {
            let mut body = format!("{CSV_HEADER}\r\n");
            for e in &page.entries {
                body.push_str(&csv_row(e));
            }
            let mut resp =
                ([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], body).into_response();
            if let Some(c) = page.next_cursor.and_then(|c| c.parse().ok()) {
                resp.headers_mut().insert("x-next-cursor", c);
            }
            Ok(resp)
        }
        other => Err(ApiError::bad_request(format!(
            "unknown format `{other}` (json or csv)"
        ))),
    }
}

pub async fn stats_of(st: &Admin) -> Result<Stats, ApiError> {
    let store = store(st)?;
    let days = st.config().trusted.learning_days;
    store
        .stats(now_ms(), days)
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
}

pub async fn stats(State(st): State<Admin>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(stats_of(&st).await?))
}
