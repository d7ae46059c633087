//! The admin listener: JSON API (queue, onboarding, trusted senders), the HTML
//! dashboard, Prometheus metrics and health checks. Loopback by default; when a token is
//! configured every route but the health checks requires it.

pub mod access_api;
pub mod activity;
pub mod dashboard;
pub mod instructions;
pub mod metrics;
pub mod onboarding;
pub mod queue_api;
pub mod reload_api;
pub mod share;
pub mod trusted_api;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

use crate::config::Config;
use crate::deliver::Deliverer;
use crate::live::Live;
use crate::queue::file::FileSpool;
use crate::queue::Queue;
use crate::reload::Reloads;
use crate::spf::hickory::HickoryDns;
use crate::spf::SpfService;
use activity::Activity;

pub struct AdminState {
    /// The configuration in force; a reload replaces it.
    pub config: Live<Config>,
    pub reloads: Reloads,
    pub queue: Arc<Queue<FileSpool>>,
    pub spf: Arc<SpfService<HickoryDns>>,
    pub deliverer: Arc<Deliverer>,
    pub activity: Arc<Activity>,
    pub trusted: Option<crate::trusted::Store>,
    /// The shared database, when `store.kind = "postgres"`: `/readyz` pings it.
    pub shared_store: Option<crate::store::Postgres>,
    pub metrics: PrometheusHandle,
    pub shared_sources: Arc<Live<crate::tenant::sources::SharedSources>>,
    /// Set once every SMTP listener is bound.
    pub listening: AtomicBool,
    /// Where the SMTP listeners are bound (the configured port may be 0).
    pub smtp_addrs: Vec<std::net::SocketAddr>,
}

impl AdminState {
    pub fn config(&self) -> Arc<Config> {
        self.config.get()
    }
}

pub type Admin = Arc<AdminState>;

/// An error as the API shows it: a status and a JSON body with one message.
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl ApiError {
    pub fn bad_request(m: impl Into<String>) -> ApiError {
        ApiError(StatusCode::BAD_REQUEST, m.into())
    }
    pub fn not_found(m: impl Into<String>) -> ApiError {
        ApiError(StatusCode::NOT_FOUND, m.into())
    }
    pub fn internal(m: impl std::fmt::Display) -> ApiError {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, m.to_string())
    }
}

pub fn router(state: Admin) -> Router {
    let api = Router::new()
        .route("/", get(dashboard::page))
        .route("/metrics", get(metrics_text))
        .route("/api/v1/queue", get(queue_api::list))
        .route("/api/v1/queue/flush", post(queue_api::flush))
        .route(
            "/api/v1/queue/{id}",
            get(queue_api::show).delete(queue_api::remove),
        )
        .route("/api/v1/queue/{id}/hold", post(queue_api::hold))
        .route("/api/v1/queue/{id}/release", post(queue_api::release))
        .route("/api/v1/onboarding", get(onboarding::steps))
        .route("/api/v1/onboarding/spf", get(onboarding::spf_all))
        .route("/api/v1/onboarding/spf/{domain}", get(onboarding::spf_one))
        .route(
            "/api/v1/onboarding/outbound-ips",
            get(onboarding::outbound_ips),
        )
        .route(
            "/api/v1/onboarding/outbound-ips/confirm",
            post(onboarding::confirm_ips),
        )
        .route(
            "/api/v1/onboarding/connector/verify",
            post(onboarding::verify_connector),
        )
        .route("/api/v1/onboarding/summary", get(onboarding::summary))
        .route("/api/v1/onboarding/share", post(share::share))
        .route(
            "/api/v1/onboarding/instructions",
            get(onboarding::instructions),
        )
        .route("/api/v1/access/shared-ranges", get(access_api::list))
        .route(
            "/api/v1/access/shared-ranges/refresh",
            post(access_api::refresh),
        )
        .route("/api/v1/reload", post(reload_api::reload))
        .route("/api/v1/trusted-senders", get(trusted_api::list))
        .route("/api/v1/trusted-senders/stats", get(trusted_api::stats))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/login", post(dashboard::login))
        .merge(api)
        .with_state(state)
}

/// The token from `Authorization: Bearer` or the dashboard's cookie.
fn presented_token(headers: &HeaderMap) -> Option<String> {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        if let Some(t) = v.strip_prefix("Bearer ") {
            return Some(t.trim().to_string());
        }
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            c.trim()
                .strip_prefix("smartrelay_token=")
                .map(str::to_string)
        })
}

/// Constant-time comparison: the token must not leak through response timing.
fn token_matches(expected: &str, given: &str) -> bool {
    let (a, b) = (expected.as_bytes(), given.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_token(State(st): State<Admin>, req: Request, next: Next) -> Response {
    let cfg = st.config();
    let Some(expected) = cfg.admin.token.as_deref().filter(|t| !t.is_empty()) else {
        return next.run(req).await;
    };
    match presented_token(req.headers()) {
        Some(t) if token_matches(expected, &t) => next.run(req).await,
        _ if req.uri().path() == "/" => dashboard::login_page().into_response(),
        _ => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            Json(json!({ "error": "missing or wrong bearer token" })),
        )
            .into_response(),
    }
}

async fn metrics_text(State(st): State<Admin>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.metrics.render(),
    )
}

/// Ready when the listeners are bound, the spool takes writes and the databases answer.
async fn readyz(State(st): State<Admin>) -> Response {
    let mut failing = Vec::new();
    if !st.listening.load(Ordering::Relaxed) {
        failing.push("listeners: not bound yet".to_string());
    }
    if let Err(e) = st.queue.writable().await {
        failing.push(format!("queue: {e}"));
    }
    let q = st.queue.clone();
    if let Ok(report) = tokio::task::spawn_blocking(move || q.check_space()).await {
        if report.refusing.is_some() {
            failing.push(format!("queue: {report}"));
        }
    }
    if let Err(e) = st.activity.sources().await {
        failing.push(format!("state database: {e}"));
    }
    if let Some(pg) = &st.shared_store {
        if let Err(e) = pg.ping().await {
            failing.push(format!("store: {e}"));
        }
    } else if let Some(t) = &st.trusted {
        if let Err(e) = t.count().await {
            failing.push(format!("trusted database: {e}"));
        }
    }
    if failing.is_empty() {
        (StatusCode::OK, Json(json!({ "ready": true }))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false, "failing": failing })),
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer s3cret".parse().unwrap());
        assert_eq!(presented_token(&h).as_deref(), Some("s3cret"));
        let mut c = HeaderMap::new();
        c.insert(header::COOKIE, "a=b; smartrelay_token=xyz".parse().unwrap());
        assert_eq!(presented_token(&c).as_deref(), Some("xyz"));
        assert!(token_matches("abc", "abc"));
        assert!(!token_matches("abc", "abd"));
        assert!(!token_matches("abc", "ab"));
    }
}
