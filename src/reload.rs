//! Reload without restart: which keys changed between two configuration files, which
//! of them take effect in place and which wait for a restart, and the request that
//! SIGHUP, `POST /api/v1/reload` and `smartrelay reload` all send to the one task that
//! applies it (in `app`).

use std::collections::BTreeMap;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::config::Config;

/// What a changed key does on reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// New sessions and new delivery attempts use it.
    Applied,
    /// Bound sockets, the spool, databases, worker counts: kept until the next start.
    RestartRequired,
}

/// Keys applied in place (a key matches an entry or lies below it). Everything else
/// needs a restart.
const APPLIED: &[&str] = &[
    "access",
    "routing",
    "tls",
    "log.level",
    "admin.token",
    "admin.hosts",
    "admin.session_ttl",
    "admin.share_rate",
    "trusted.exclude_senders",
    "trusted.exclude_recipient_domains",
    "server.max_message_size",
    "server.max_recipients",
    "server.max_connections_per_ip",
    "server.command_timeout",
    "server.data_timeout",
    "server.session_timeout",
    "server.min_data_rate",
    "server.hop_limit",
    "server.max_line_length",
    "server.max_errors",
    "server.bare_line_endings",
    "server.proxy_protocol",
];

pub fn effect(key: &str) -> Effect {
    let applied = APPLIED.iter().any(|p| {
        key == *p
            || key
                .strip_prefix(p)
                .is_some_and(|rest| rest.starts_with('.'))
    });
    if applied {
        Effect::Applied
    } else {
        Effect::RestartRequired
    }
}

/// Dotted keys whose values differ between two TOML documents (added and removed keys
/// included). Arrays are compared whole: `access.shared_ranges`, not its elements.
pub fn changed_keys(old: &str, new: &str) -> Result<Vec<String>, String> {
    let parse = |t: &str| t.parse::<toml::Table>().map_err(|e| e.to_string());
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten("", &toml::Value::Table(parse(old)?), &mut a);
    flatten("", &toml::Value::Table(parse(new)?), &mut b);
    let mut keys: Vec<String> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    Ok(keys)
}

fn flatten(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, toml::Value>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

/// The configuration a reload puts in force: the new file's values where they apply in
/// place, the running ones where they need a restart, so what the admin API shows is
/// what the relay does.
pub fn effective(running: &Config, new: Config) -> Config {
    let mut c = new;
    c.server.hostname = running.server.hostname.clone();
    c.server.listen = running.server.listen.clone();
    c.server.listen_tls = running.server.listen_tls.clone();
    c.server.max_connections = running.server.max_connections;
    c.server.shutdown_timeout = running.server.shutdown_timeout;
    c.server.drain_delay = running.server.drain_delay;
    c.queue = running.queue.clone();
    c.delivery = running.delivery.clone();
    c.dns = running.dns.clone();
    c.store = running.store.clone();
    c.admin.listen = running.admin.listen;
    c.admin.database = running.admin.database.clone();
    c.admin.retention = running.admin.retention;
    c.admin.buffer_limit = running.admin.buffer_limit;
    let exclusions = (
        std::mem::take(&mut c.trusted.exclude_senders),
        std::mem::take(&mut c.trusted.exclude_recipient_domains),
    );
    c.trusted = running.trusted.clone();
    (
        c.trusted.exclude_senders,
        c.trusted.exclude_recipient_domains,
    ) = exclusions;
    c.log.format = running.log.format;
    c
}

/// SHA-256 of the file as read, in hex: `smartrelay_config_info{hash}` and the API.
pub fn fingerprint(text: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, text);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Puts a reloaded `log.level` in force for the process's subscriber.
pub type LogLevelSetter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// What a reload did.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub hash: String,
    /// Changed keys now in force for new sessions and attempts.
    pub applied: Vec<String>,
    /// Keys that differ from the running process's and wait for a restart.
    pub restart_required: Vec<String>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ReloadError {
    /// The file does not parse or validate, or a certificate does not load: the old
    /// configuration stays in force.
    #[error("{0}")]
    Invalid(String),
    #[error("the relay is stopping")]
    Stopping,
}

/// Who asked, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Signal,
    Api,
}

impl Origin {
    pub fn label(self) -> &'static str {
        match self {
            Origin::Signal => "SIGHUP",
            Origin::Api => "admin API",
        }
    }
}

pub struct Request {
    pub origin: Origin,
    pub reply: oneshot::Sender<Result<Outcome, ReloadError>>,
}

/// The sending side, held by the admin API.
#[derive(Clone)]
pub struct Reloads(mpsc::Sender<Request>);

impl Reloads {
    pub fn channel() -> (Reloads, mpsc::Receiver<Request>) {
        let (tx, rx) = mpsc::channel(8);
        (Reloads(tx), rx)
    }

    pub async fn request(&self, origin: Origin) -> Result<Outcome, ReloadError> {
        let (reply, answer) = oneshot::channel();
        self.0
            .send(Request { origin, reply })
            .await
            .map_err(|_| ReloadError::Stopping)?;
        answer.await.map_err(|_| ReloadError::Stopping)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_applied_or_wait_for_a_restart() {
        assert_eq!(effect("access.allowed_ranges"), Effect::Applied);
        assert_eq!(effect("routing.regions.eu.hosts"), Effect::Applied);
        assert_eq!(effect("tls.cert"), Effect::Applied);
        assert_eq!(effect("server.max_message_size"), Effect::Applied);
        assert_eq!(effect("server.listen"), Effect::RestartRequired);
        assert_eq!(effect("server.listen_tls"), Effect::RestartRequired);
        assert_eq!(effect("queue.dir"), Effect::RestartRequired);
        assert_eq!(effect("admin.database"), Effect::RestartRequired);
        assert_eq!(effect("trusted.database"), Effect::RestartRequired);
        assert_eq!(effect("trusted.exclude_senders"), Effect::Applied);
        // A prefix is a whole segment, not a string prefix.
        assert_eq!(effect("tlsx"), Effect::RestartRequired);
        assert_eq!(effect("log.levelx"), Effect::RestartRequired);
    }

    #[test]
    fn changed_keys_name_leaves_and_whole_arrays() {
        let old = "[server]\nlisten = [\"127.0.0.1:25\"]\nmax_recipients = 10\n\
                   [access]\nallowed_ranges = [\"10.0.0.0/8\"]\n\
                   [[access.shared_ranges]]\nname = \"a\"\n";
        let new = "[server]\nlisten = [\"127.0.0.1:25\"]\nmax_recipients = 20\n\
                   [access]\nallowed_ranges = [\"10.0.0.0/8\"]\ndomains = [\"x.test\"]\n\
                   [[access.shared_ranges]]\nname = \"b\"\n";
        assert_eq!(
            changed_keys(old, new).unwrap(),
            vec![
                "access.domains",
                "access.shared_ranges",
                "server.max_recipients"
            ]
        );
        assert!(changed_keys(old, old).unwrap().is_empty());
        assert!(changed_keys(old, "[server").is_err());
    }

    #[test]
    fn fingerprint_is_sha256_hex() {
        assert_eq!(
            fingerprint(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
