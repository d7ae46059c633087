//! The shared state below `tenant`, `trusted` and `admin`: one shape for every room
//! that keeps state. Each room has a trait in its own `mod.rs` and one file per
//! backend (`sqlite.rs`, `pg.rs`); what they share lives here: the schemas of both
//! dialects side by side (`schema`), the embedded file (`sqlite`), and the cluster's
//! PostgreSQL pool with its migrations and health check (`pg`).

pub mod pg;
pub mod schema;
pub mod sqlite;

use std::path::Path;

pub use pg::Postgres;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Config(String),
    #[error("{path}: {source}")]
    Sqlite {
        path: String,
        source: rusqlite::Error,
    },
    /// With its causes: tokio-postgres shows only its kind ("db error", "error
    /// performing TLS handshake"), and the reason is in the source.
    #[error("PostgreSQL: {}", with_causes(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("PostgreSQL pool: {0}")]
    Pool(String),
    #[error("the {schema} schema is at version {found}, newer than this relay knows ({known})")]
    Newer {
        schema: &'static str,
        found: i64,
        known: usize,
    },
    #[error("store task failed: {0}")]
    Task(String),
}

impl StoreError {
    pub fn sqlite(path: &Path, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: path.display().to_string(),
            source,
        }
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> StoreError {
        StoreError::Pool(with_causes(&e))
    }
}

/// An error and each of its sources that adds something, joined by ": ".
pub fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
        next = cause.source();
    }
    text
}

/// Rows per multi-row statement: well under PostgreSQL's 65,535 parameters.
pub const ROWS_PER_STATEMENT: usize = 1000;

/// `($1, $2, $3), ($4, $5, $6)` for `rows` rows of `cols` parameters: the VALUES of a
/// multi-row INSERT.
pub fn values_list(rows: usize, cols: usize) -> String {
    (0..rows)
        .map(|r| {
            let cells: Vec<String> = (1..=cols).map(|c| format!("${}", r * cols + c)).collect();
            format!("({})", cells.join(", "))
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    #[test]
    fn values_list_numbers_every_parameter_once() {
        assert_eq!(super::values_list(2, 3), "($1, $2, $3),($4, $5, $6)");
        assert_eq!(super::values_list(0, 3), "");
    }
}
