//! The admin listener: JSON API (queue, onboarding, trusted senders), the HTML
//! dashboard, Prometheus metrics and health checks. Loopback by default; when a token is
//! configured every route but the health checks requires it.

pub mod access_api;
pub mod activity;
pub mod dashboard;
pub mod guard;
pub mod instructions;
pub mod limits_api;
pub mod messages;
pub mod metrics;
pub mod onboarding;
pub mod queue_api;
pub mod reload_api;
pub mod share;
pub mod trusted_api;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
    /// `[[limits]]`: the rules' counts and the restricted key values.
    pub limits: Arc<crate::limits::Limits>,
    pub spf: Arc<SpfService<HickoryDns>>,
    pub deliverer: Arc<Deliverer>,
    pub activity: Arc<Activity>,
    pub trusted: Option<crate::trusted::Store>,
    /// `None` with `tracking.enabled = false`.
    pub tracking: Option<crate::tracking::Store>,
    /// The shared database, when `store.kind = "postgres"`: `/readyz` pings it.
    pub shared_store: Option<crate::store::Postgres>,
    pub metrics: PrometheusHandle,
    pub shared_sources: Arc<Live<crate::tenant::sources::SharedSources>>,
    /// Set once every SMTP listener is bound.
    pub listening: AtomicBool,
    /// Where the SMTP listeners are bound (the configured port may be 0).
    pub smtp_addrs: Vec<std::net::SocketAddr>,
    /// Where the admin listener is bound: the `Host` it answers to.
    pub admin_addr: Option<std::net::SocketAddr>,
    /// Sessions, CSRF tokens and sign-in back-off.
    pub guard: guard::Guard,
    /// `admin.share_rate`, for the whole relay.
    pub share_cell: std::sync::Mutex<crate::rate::Cell>,
    /// Running or draining: `/readyz` and `POST /api/v1/drain`.
    pub lifecycle: Arc<crate::lifecycle::Lifecycle>,
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
        .route("/api/v1/drain", post(drain))
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
        .route("/api/v1/messages", get(messages::search))
        .route("/api/v1/messages/{id}", get(messages::show))
        .route("/messages", get(messages::page))
        .route("/messages/{id}", get(messages::timeline))
        .route("/api/v1/limits", get(limits_api::limits))
        .route("/api/v1/restricted", get(limits_api::restricted))
        .route("/api/v1/restricted/release", post(limits_api::release))
        .route("/api/v1/restricted/discard", post(limits_api::discard))
        .route("/api/v1/trusted-senders", get(trusted_api::list))
        .route("/api/v1/trusted-senders/stats", get(trusted_api::stats))
        .route("/logout", post(dashboard::logout))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/login", post(dashboard::login))
        .merge(api)
        .layer(middleware::from_fn_with_state(state.clone(), check_request))
        .layer(middleware::from_fn(security_headers))
        .with_state(state)
}

/// The token from `Authorization: Bearer` (programs: the CLI, Prometheus).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// The configured token, when there is one (an empty one is none).
fn configured_token(st: &AdminState) -> Option<String> {
    st.config().admin.token.clone().filter(|t| !t.is_empty())
}

fn peer(req: &Request) -> Option<IpAddr> {
    req.extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_canonical())
}

fn refuse(reason: &'static str, status: StatusCode, message: String) -> Response {
    ::metrics::counter!(crate::telemetry::ADMIN_REQUESTS_REFUSED_TOTAL, "reason" => reason)
        .increment(1);
    (status, Json(json!({ "error": message }))).into_response()
}

/// Every request: its `Host` (DNS rebinding), its session, and for a state-changing
/// one where it comes from (`Origin`/`Referer`) and its CSRF token. See [`guard`].
async fn check_request(State(st): State<Admin>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let health = path == "/healthz" || path == "/readyz";
    if let (false, Some(listen)) = (health, st.admin_addr) {
        if !guard::host_allowed(&host, listen, &st.config().admin.hosts) {
            return refuse(
                "host",
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "Host `{host}` is not this admin listener's; name it in admin.hosts to use it"
                ),
            );
        }
    }
    let mut req = req;
    let cookie = guard::cookie(
        req.headers()
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok()),
        guard::SESSION_COOKIE,
    )
    .map(str::to_string);
    let session = cookie.as_deref().and_then(|id| st.guard.session(id));
    if let Some(s) = &session {
        req.extensions_mut().insert(s.clone());
    }
    let changes_state = !matches!(
        *req.method(),
        axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS
    );
    if !changes_state {
        return next.run(req).await;
    }
    let token = configured_token(&st);
    if let (Some(t), Some(b)) = (&token, bearer(req.headers())) {
        if guard::secret_matches(t, b) {
            return next.run(req).await;
        }
    }
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .or_else(|| req.headers().get(header::REFERER))
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if let Some(o) = &origin {
        if !guard::same_origin(o, &host) {
            tracing::warn!(origin = %o, %path, "admin request from another origin refused");
            return refuse(
                "origin",
                StatusCode::FORBIDDEN,
                format!("a request from {o} may not change this relay"),
            );
        }
    }
    let is_form = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.starts_with("application/x-www-form-urlencoded") || v.starts_with("multipart/")
        });
    // Signing in needs no session yet; where it comes from was checked above.
    if path == "/login" || !(is_form || cookie.is_some()) {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, FORM_LIMIT).await else {
        return refuse(
            "csrf",
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body too large".into(),
        );
    };
    let presented = if is_form {
        guard::form_csrf(&bytes)
    } else {
        parts
            .headers
            .get("x-csrf-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let valid =
        matches!((&session, &presented), (Some(s), Some(p)) if guard::secret_matches(&s.csrf, p));
    if !valid {
        tracing::warn!(%path, "admin form without a valid CSRF token refused");
        return refuse(
            "csrf",
            StatusCode::FORBIDDEN,
            "missing or wrong CSRF token: use the dashboard's own form".into(),
        );
    }
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

/// Forms are small; a larger body is not one of the dashboard's.
const FORM_LIMIT: usize = 64 * 1024;

/// Every answer: no framing, no foreign sources, no sniffing.
async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    for (name, value) in [
        ("content-security-policy", guard::CSP),
        ("x-frame-options", "DENY"),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "same-origin"),
    ] {
        if let Ok(v) = axum::http::HeaderValue::from_str(value) {
            h.insert(name, v);
        }
    }
    resp
}

/// Signed in: a valid `Authorization: Bearer`, or a session signed in with the token.
/// Wrong bearer tokens count against the client like wrong sign-ins.
async fn require_token(State(st): State<Admin>, req: Request, next: Next) -> Response {
    let Some(expected) = configured_token(&st) else {
        return next.run(req).await;
    };
    let ip = peer(&req);
    if let Some(given) = bearer(req.headers()) {
        if let Some(wait) = ip.and_then(|ip| st.guard.throttled(ip)) {
            return throttled(wait);
        }
        if guard::secret_matches(&expected, given) {
            if let Some(ip) = ip {
                st.guard.succeeded(ip);
            }
            return next.run(req).await;
        }
        ::metrics::counter!(crate::telemetry::ADMIN_LOGIN_FAILURES_TOTAL).increment(1);
        if let Some(ip) = ip {
            st.guard.failed(ip);
        }
    } else if req
        .extensions()
        .get::<guard::SessionInfo>()
        .is_some_and(|s| s.signed_in)
    {
        return next.run(req).await;
    }
    if req.uri().path() == "/" {
        return dashboard::login_page();
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        Json(json!({ "error": "missing or wrong bearer token" })),
    )
        .into_response()
}

/// `429` with how long to wait.
pub fn throttled(wait: Duration) -> Response {
    ::metrics::counter!(crate::telemetry::ADMIN_REQUESTS_REFUSED_TOTAL, "reason" => "throttled")
        .increment(1);
    let secs = wait.as_secs().max(1).to_string();
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::RETRY_AFTER, secs)],
        Json(json!({ "error": "too many failed sign-ins from this address; wait and try again" })),
    )
        .into_response()
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

/// An orchestrator's preStop: the node leaves the balancer (new connections get
/// `421 4.3.0`, `/readyz` 503) and keeps running until it is told to stop.
async fn drain(State(st): State<Admin>) -> Response {
    st.lifecycle.drain(crate::lifecycle::DrainOrigin::Api);
    (
        StatusCode::ACCEPTED,
        Json(json!({
            "status": "draining",
            "drain_delay_secs": st.config().server.drain_delay.0.as_secs_f64(),
        })),
    )
        .into_response()
}

/// Ready when the listeners are bound, the spool takes writes and the databases answer;
/// never while draining, so an orchestrator stops sending connections at once.
async fn readyz(State(st): State<Admin>) -> Response {
    if st.lifecycle.phase() != crate::lifecycle::Phase::Running {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "draining", "ready": false })),
        )
            .into_response();
    }
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
    fn bearer_tokens() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer s3cret".parse().unwrap());
        assert_eq!(bearer(&h), Some("s3cret"));
        let mut c = HeaderMap::new();
        c.insert(header::COOKIE, "smartrelay_token=xyz".parse().unwrap());
        assert_eq!(bearer(&c), None, "a cookie is never the token");
    }
}
