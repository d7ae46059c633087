//! `POST /api/v1/reload`: the same reload as SIGHUP, with its outcome in the answer.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use super::{Admin, ApiError};
use crate::reload::{Origin, Outcome, ReloadError};

/// `200` with the applied and restart-required keys; `422` with the reason when the
/// file is not valid (the previous configuration stays in force).
pub async fn reload(State(st): State<Admin>) -> Result<Json<Outcome>, ApiError> {
    match st.reloads.request(Origin::Api).await {
        Ok(outcome) => Ok(Json(outcome)),
        Err(e @ ReloadError::Invalid(_)) => {
            Err(ApiError(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))
        }
        Err(e @ ReloadError::Stopping) => {
            Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
        }
    }
}
