//! Routing: the region a sender domain's SPF record authorizes decides which smart hosts
//! carry its mail (the region table itself is shared, in `regions`).

pub mod cache;
pub mod router;

pub use router::{Decision, SpfRouter};
