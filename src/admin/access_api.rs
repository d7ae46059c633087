//! `/api/v1/access/shared-ranges`: the shared-platform ranges as configured and as last
//! resolved from SPF, and a refresh on demand (after the platform changed its record).

use axum::extract::State;
use axum::Json;

use super::{Admin, ApiError};
use crate::tenant::sources::SourceView;

/// State-database key of the shared ranges last resolved from SPF.
pub const SHARED_RANGES_KEY: &str = "shared_ranges";

pub async fn list(State(st): State<Admin>) -> Json<Vec<SourceView>> {
    Json(st.shared_sources.get().view())
}

/// Resolves every `ranges_from_spf` list now; a failure keeps the last good list.
pub async fn refresh(State(st): State<Admin>) -> Result<Json<Vec<SourceView>>, ApiError> {
    let (_, changed) = st.shared_sources.get().refresh_once(&st.spf).await;
    if changed {
        st.activity
            .set_meta(SHARED_RANGES_KEY, &st.shared_sources.get().resolved())
            .await
            .map_err(ApiError::internal)?;
    }
    Ok(Json(st.shared_sources.get().view()))
}
