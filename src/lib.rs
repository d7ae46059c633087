//! smartrelay: an SMTP outbound relay to the gateway's regional smart hosts.
//!
//! Stages in the order a message passes through them: `smtp` (ingress), `limits` (how
//! much a sender may send: deferred, or accepted and held), `queue`
//! (durable spool and scheduler), `route` (SPF-aware choice of smart hosts), `deliver`
//! (upstream client pool), with `tenant` beside ingress (proof that mail from a shared
//! platform is the organization's); then `spf` (record parser and validator), `store` (SQLite or
//! PostgreSQL, below the next two), `trusted` (the
//! trusted-sender list) and `admin` (HTTP API, dashboard, metrics). Types several stages
//! share sit below them all: `envelope`, `message` (a message's octets, in memory or
//! spilled to a file), `regions`, `events`, `pipeline`, `live` (what a reload replaces), `lifecycle` (running,
//! draining, stopping), `client_tls` (the TLS client configurations).

pub mod address;
pub mod admin;
pub mod app;
pub mod budget;
pub mod client_tls;
pub mod config;
pub mod dur;
pub mod envelope;
pub mod events;
pub mod lifecycle;
pub mod live;
pub mod message;
pub mod pipeline;
pub mod rate;
pub mod regions;
pub mod reload;
#[cfg(test)]
pub mod scratch;
pub mod tasks;
pub mod telemetry;

pub mod deliver;
pub mod limits;
pub mod queue;
pub mod route;
pub mod smtp;
pub mod spf;
pub mod store;
pub mod tenant;
pub mod tracking;
pub mod trusted;
