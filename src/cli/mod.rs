//! The command line: `run`, `check-config`, and the operator verbs (queue, spf,
//! onboarding, trusted, trace, restricted). Binary-side code, so errors are `anyhow`
//! here.

mod args;
mod local;
mod remote;

pub use args::*;
pub use local::{shared_range_overlaps, spf, trusted};
pub use remote::{onboarding, queue, reload, restricted, trace};
