//! Test doubles at the queue's seams: an in-memory spool, a router that sends every
//! recipient one way, and a courier that answers from a script and records each
//! call. With tokio's paused clock they drive the scheduler through hours of retries
//! in milliseconds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::spool::{Recovered, Spool, SpoolError};
use crate::envelope::{DeliveryState, Envelope, QueueId, Reply};
use crate::events::SpfOutcome;
use crate::message::Data;
use crate::pipeline::{Courier, LegOutcome, PlanItem, Router};
use crate::regions::{RouteTarget, TlsMode};

type Stored = BTreeMap<QueueId, (Envelope, Bytes, Option<DeliveryState>)>;

/// A spool in memory: durable as soon as asked, and inspectable.
pub struct MemSpool {
    messages: Mutex<Stored>,
    dir: PathBuf,
}

impl Default for MemSpool {
    fn default() -> Self {
        MemSpool {
            messages: Mutex::default(),
            dir: std::env::temp_dir(),
        }
    }
}

impl MemSpool {
    pub fn ids(&self) -> Vec<QueueId> {
        self.lock().keys().cloned().collect()
    }

    pub fn state(&self, id: &QueueId) -> Option<DeliveryState> {
        self.lock().get(id).and_then(|m| m.2.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Stored> {
        self.messages.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Spool for MemSpool {
    async fn store(&self, envelope: &Envelope, data: Data) -> Result<(), SpoolError> {
        let data = data.to_bytes().map_err(|source| SpoolError::Io {
            what: "spilled body".into(),
            source,
        })?;
        self.lock()
            .insert(envelope.id.clone(), (envelope.clone(), data, None));
        Ok(())
    }

    async fn save_state(&self, id: &QueueId, state: &DeliveryState) -> Result<(), SpoolError> {
        if let Some(m) = self.lock().get_mut(id) {
            m.2 = Some(state.clone());
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), SpoolError> {
        Ok(())
    }

    fn load(&self, id: &QueueId) -> Result<Bytes, SpoolError> {
        self.lock()
            .get(id)
            .map(|m| m.1.clone())
            .ok_or_else(|| SpoolError::NotFound(id.to_string()))
    }

    fn remove(&self, id: &QueueId) -> Result<(), SpoolError> {
        self.lock().remove(id);
        Ok(())
    }

    fn recover(&self, found: &mut dyn FnMut(Recovered) -> bool) -> Result<(), SpoolError> {
        let all: Vec<_> = self.lock().values().cloned().collect();
        for (envelope, _, state) in all {
            if !found(Recovered { envelope, state }) {
                break;
            }
        }
        Ok(())
    }

    fn probe(&self) -> Result<(), SpoolError> {
        Ok(())
    }

    fn size(&self) -> u64 {
        self.lock().values().map(|m| m.1.len() as u64).sum()
    }

    fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Every pending recipient on one route.
pub struct OneRoute(pub Arc<RouteTarget>);

impl Default for OneRoute {
    fn default() -> Self {
        OneRoute(Arc::new(RouteTarget {
            name: "test".into(),
            hosts: Vec::new(),
            tls: TlsMode::None,
            ca_file: None,
            tls_name: None,
            auth: None,
        }))
    }
}

impl Router for OneRoute {
    async fn plan(&self, _: &Envelope, pending: &[usize]) -> Vec<PlanItem> {
        vec![PlanItem::Leg {
            route: self.0.clone(),
            recipients: pending.to_vec(),
            spf: SpfOutcome::NotChecked,
        }]
    }
}

/// One call the courier took.
#[derive(Debug, Clone)]
pub struct Call {
    pub at: tokio::time::Instant,
    pub id: QueueId,
    pub sender: String,
    pub recipients: Vec<usize>,
    pub data: Bytes,
}

type Script = dyn Fn(&Envelope, usize, usize) -> Reply + Send + Sync;

/// Answers each recipient with `script(envelope, recipient, attempt)`, where
/// `attempt` counts this message's earlier calls.
pub struct ScriptedCourier {
    script: Box<Script>,
    pub calls: Mutex<Vec<Call>>,
}

impl ScriptedCourier {
    pub fn new(script: impl Fn(&Envelope, usize, usize) -> Reply + Send + Sync + 'static) -> Self {
        ScriptedCourier {
            script: Box::new(script),
            calls: Mutex::default(),
        }
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn calls_for(&self, id: &QueueId) -> Vec<Call> {
        self.calls().into_iter().filter(|c| &c.id == id).collect()
    }
}

impl Courier for ScriptedCourier {
    async fn deliver(
        &self,
        _: &RouteTarget,
        envelope: &Envelope,
        data: &Bytes,
        recipients: &[usize],
    ) -> LegOutcome {
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        let attempt = calls.iter().filter(|c| c.id == envelope.id).count();
        calls.push(Call {
            at: tokio::time::Instant::now(),
            id: envelope.id.clone(),
            sender: envelope.sender.clone(),
            recipients: recipients.to_vec(),
            data: data.clone(),
        });
        LegOutcome {
            host: Some("scripted.test:25".into()),
            replies: recipients
                .iter()
                .map(|&i| (i, (self.script)(envelope, i, attempt)))
                .collect(),
            tls: false,
            dsn_passed: false,
        }
    }
}
