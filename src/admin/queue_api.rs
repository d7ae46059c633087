//! `/api/v1/queue`: what is queued, and the operator's levers (flush, hold, release,
//! remove).

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::{Admin, ApiError};
use crate::envelope::QueueId;
use crate::queue::QueueError;

fn id_of(raw: &str) -> Result<QueueId, ApiError> {
    QueueId::parse(raw).ok_or_else(|| ApiError::bad_request(format!("`{raw}` is not a queue ID")))
}

fn queue_error(e: QueueError) -> ApiError {
    match e {
        QueueError::NotFound(id) => ApiError::not_found(format!("no message {id} in the queue")),
        other => ApiError::internal(other),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only held (`true`) or only not held (`false`) messages.
    held: Option<bool>,
    /// Only this envelope sender (case-insensitive; empty for `<>`).
    sender: Option<String>,
}

/// The spool is per node: the answer names the node (`server.hostname`) it lists.
pub async fn list(State(st): State<Admin>, Query(q): Query<ListQuery>) -> impl IntoResponse {
    let mut messages = st.queue.list();
    if let Some(held) = q.held {
        messages.retain(|m| m.held == held);
    }
    if let Some(sender) = &q.sender {
        messages.retain(|m| m.sender.eq_ignore_ascii_case(sender.trim()));
    }
    let node = st.config().server.hostname.clone();
    Json(json!({ "node": node, "count": messages.len(), "messages": messages }))
}

pub async fn show(
    State(st): State<Admin>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let id = id_of(&id)?;
    st.queue
        .show(&id)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no message {id} in the queue")))
}

pub async fn flush(State(st): State<Admin>) -> impl IntoResponse {
    let n = st.queue.flush();
    tracing::info!(rescheduled = n, "queue flushed by administrator");
    Json(json!({ "rescheduled": n }))
}

pub async fn hold(
    State(st): State<Admin>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let id = id_of(&id)?;
    st.queue.hold(&id).await.map(Json).map_err(queue_error)
}

pub async fn release(
    State(st): State<Admin>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let id = id_of(&id)?;
    st.queue.release(&id).await.map(Json).map_err(queue_error)
}

pub async fn remove(
    State(st): State<Admin>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let id = id_of(&id)?;
    st.queue.remove(&id).await.map_err(queue_error)?;
    Ok(StatusCode::NO_CONTENT)
}
