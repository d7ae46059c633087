//! Ingress: the SMTP server the organization's mail platforms connect to.
//!
//! `command` and `data` are the grammar, `session` the state machine, `inspect` what we
//! read from the header, `proxy` the PROXY protocol header a trusted load balancer sends
//! first; `conn` and `listener` (and `proxy::read_header`) are the only parts that do I/O,
//! with `body`, where a body in flight is kept (memory or a file, under one budget).

pub mod body;
pub mod command;
pub mod conn;
pub mod data;
pub mod inspect;
pub mod listener;
pub mod proxy;
pub mod reply;
pub mod session;
pub mod tls;
