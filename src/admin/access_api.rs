//! `/api/v1/access/shared-ranges`: the shared-platform ranges as configured and as last
//! resolved from SPF, and a refresh on demand (after the platform changed its record).

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use super::{Admin, ApiError};
use crate::tenant::sources::SourceView;

/// State-database key of the shared ranges last resolved from SPF.
pub const SHARED_RANGES_KEY: &str = "shared_ranges";

pub async fn list(State(st): State<Admin>) -> Json<Vec<SourceView>> {
    Json(st.shared_sources.get().view())
}

/// Has the refresher resolve every `ranges_from_spf` list now (it persists what
/// changed); a failure keeps the last good list.
pub async fn refresh(State(st): State<Admin>) -> Result<Json<Vec<SourceView>>, ApiError> {
    let sources = st.shared_sources.get();
    let within = st.config().dns.spf_timeout.0 + Duration::from_secs(5);
    if !sources.refresh_now(within).await {
        return Err(ApiError(
            StatusCode::GATEWAY_TIMEOUT,
            "the shared-range refresh did not finish in time".into(),
        ));
    }
    Ok(Json(sources.view()))
}
