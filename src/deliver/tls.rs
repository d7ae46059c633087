//! Client TLS for upstreams: a verifying connector (system roots, or a route's
//! `ca_file`) for `tls = "required"`, and a non-verifying one for opportunistic TLS,
//! where encryption without authentication beats plaintext (RFC 7435).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio_rustls::TlsConnector;

use crate::client_tls;

/// Connectors by purpose, built once and shared.
pub struct Connectors {
    opportunistic: TlsConnector,
    system: Result<TlsConnector, String>,
    by_ca: Mutex<HashMap<PathBuf, TlsConnector>>,
}

impl Connectors {
    pub fn new() -> Connectors {
        Connectors {
            opportunistic: TlsConnector::from(Arc::new(client_tls::unverified())),
            system: client_tls::system_roots().map(|c| TlsConnector::from(Arc::new(c))),
            by_ca: Mutex::new(HashMap::new()),
        }
    }

    pub fn opportunistic(&self) -> &TlsConnector {
        &self.opportunistic
    }

    /// The verifying connector: system roots, or only the CAs in `ca_file`.
    pub fn verified(&self, ca_file: Option<&Path>) -> Result<TlsConnector, String> {
        let Some(path) = ca_file else {
            return self.system.clone();
        };
        let mut map = self.by_ca.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(path) {
            return Ok(c.clone());
        }
        let c = TlsConnector::from(Arc::new(client_tls::ca_file(path)?));
        map.insert(path.to_owned(), c.clone());
        Ok(c)
    }
}

impl Default for Connectors {
    fn default() -> Self {
        Connectors::new()
    }
}
