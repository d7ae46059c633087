//! `/api/v1/limits` and `/api/v1/restricted`: the rules with their busiest key values,
//! the restricted key values, and the administrator's levers on them (release: lift and
//! deliver the held mail; discard: lift and remove it, no DSN).

use axum::extract::{FromRequest, Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Form, Json};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{Admin, ApiError};
use crate::envelope::{LimitKey, Settle};
use crate::limits::LimitsError;

#[derive(Debug, Serialize)]
pub struct RestrictedView {
    pub key: LimitKey,
    pub value: String,
    pub limit: String,
    /// RFC 3339, UTC.
    pub since: String,
    /// The rule's count when it fired.
    pub count: u64,
    /// Messages this node holds for it.
    pub held: usize,
}

pub async fn limits(State(st): State<Admin>) -> Json<serde_json::Value> {
    Json(json!({ "limits": st.limits.overview() }))
}

pub fn restricted_views(st: &Admin) -> Vec<RestrictedView> {
    st.limits
        .restricted()
        .into_iter()
        .map(|r| RestrictedView {
            held: st.queue.held_count(r.key, &r.value),
            since: crate::envelope::rfc3339(r.since),
            key: r.key,
            value: r.value,
            limit: r.limit,
            count: r.count,
        })
        .collect()
}

pub async fn restricted(State(st): State<Admin>) -> Json<Vec<RestrictedView>> {
    Json(restricted_views(&st))
}

/// The body of a release or discard: JSON from the API, or the dashboard's form (whose
/// CSRF field the admin's guard has checked).
#[derive(Debug, Deserialize)]
pub struct KeyValue {
    pub key: String,
    pub value: String,
}

async fn key_value(req: Request) -> Result<(KeyValue, bool), ApiError> {
    let is_form = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if is_form {
        let Form(kv) = Form::<KeyValue>::from_request(req, &())
            .await
            .map_err(|e| ApiError(e.status(), e.body_text()))?;
        return Ok((kv, true));
    }
    let Json(kv) = Json::<KeyValue>::from_request(req, &())
        .await
        .map_err(|e| ApiError(e.status(), e.body_text()))?;
    Ok((kv, false))
}

/// What a release or discard did here.
#[derive(Debug, Serialize)]
pub struct LiftReply {
    pub key: LimitKey,
    pub value: String,
    pub action: Settle,
    /// Whether a restriction was in force.
    pub restricted: bool,
    /// Held messages released or removed on this node (other nodes act within a sync).
    pub messages: usize,
}

pub async fn lift(st: &Admin, kv: &KeyValue, how: Settle) -> Result<LiftReply, ApiError> {
    let key = LimitKey::parse(kv.key.trim()).ok_or_else(|| {
        ApiError::bad_request(format!(
            "key `{}` is not one of sender, sender_domain, client",
            kv.key
        ))
    })?;
    let value = kv.value.trim().to_ascii_lowercase();
    if value.is_empty() {
        return Err(ApiError::bad_request("value is required"));
    }
    let _settling = st.limits.settling().await;
    let lifted = st
        .limits
        .lift(key, &value, how)
        .await
        .map_err(|e| match e {
            LimitsError::Invalid(m) => ApiError::bad_request(m),
            other => ApiError::internal(other),
        })?;
    let messages = st.queue.settle_held(key, &value, how).await;
    Ok(LiftReply {
        key,
        value,
        action: how,
        restricted: lifted.is_some(),
        messages,
    })
}

async fn lift_request(st: Admin, req: Request, how: Settle) -> Result<Response, ApiError> {
    let (kv, form) = key_value(req).await?;
    let reply = lift(&st, &kv, how).await?;
    if form {
        return Ok(Redirect::to("/#restricted").into_response());
    }
    Ok(Json(reply).into_response())
}

pub async fn release(State(st): State<Admin>, req: Request) -> Result<Response, ApiError> {
    lift_request(st, req, Settle::Release).await
}

pub async fn discard(State(st): State<Admin>, req: Request) -> Result<Response, ApiError> {
    lift_request(st, req, Settle::Discard).await
}
