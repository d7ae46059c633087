//! The trusted-sender list the gateway learns from outbound mail: every external
//! recipient an internal user's message was delivered to, with counts and times.
//! `policy` decides what counts, `store` keeps it (SQLite, or PostgreSQL through `pg`),
//! `recorder` feeds it from the delivery events, `export` turns it into CSV or JSON.

pub mod export;
pub mod pg;
pub mod policy;
pub mod recorder;
pub mod store;

pub use policy::TrustPolicy;
pub use store::{Filter, Store};
