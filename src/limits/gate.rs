//! The limits between ingress and the queue: an `Intake` that counts what sessions ask
//! and marks the messages it holds before the queue makes them durable.

use std::net::IpAddr;
use std::sync::Arc;

use super::rules::Who;
use super::Limits;
use crate::pipeline::{Backpressure, Deferral, Intake, IntakeError, Stored, Submission, Unit};

pub struct Limited<I> {
    inner: Arc<I>,
    limits: Arc<Limits>,
}

impl<I> Limited<I> {
    pub fn new(inner: Arc<I>, limits: Arc<Limits>) -> Limited<I> {
        Limited { inner, limits }
    }
}

impl<I: Intake> Intake for Limited<I> {
    async fn submit(&self, mut msg: Submission) -> Result<Stored, IntakeError> {
        let env = &msg.envelope;
        let who = Who {
            sender: &env.sender,
            client: env.client.ip,
            ours: env.generated_dsn || env.system,
        };
        if let Some(reason) = self.limits.hold(&who, env.recipients.len()) {
            msg.envelope.held = Some(reason);
        }
        self.inner.submit(msg).await
    }

    fn admission(&self) -> Result<(), Backpressure> {
        self.inner.admission()
    }

    fn count(&self, unit: Unit, sender: &str, client: IpAddr) -> Result<(), Deferral> {
        self.limits.admit(
            unit,
            &Who {
                sender,
                client,
                ours: false,
            },
        )
    }
}
