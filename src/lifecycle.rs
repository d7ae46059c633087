//! The relay's way from running to stopped, shared by ingress (which greets or refuses
//! by it), the admin face (`/readyz`, `POST /api/v1/drain`) and the stop sequence.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// Server-wide state of a graceful stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Running,
    /// Leaving the balancer: new connections and health checks get `421 4.3.0`, so
    /// the balancer marks the node down; sessions in progress go on; `/readyz` is 503.
    Draining,
    /// Stop accepting; idle sessions end with 421, transactions may finish.
    Closing,
    /// The deadline passed: every session ends now with 421.
    Stop,
}

/// Who asked the node to leave the balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainOrigin {
    Signal,
    Api,
}

impl DrainOrigin {
    fn label(self) -> &'static str {
        match self {
            DrainOrigin::Signal => "SIGTERM",
            DrainOrigin::Api => "POST /api/v1/drain",
        }
    }
}

pub struct Lifecycle {
    phase: watch::Sender<Phase>,
    draining_since: Mutex<Option<Instant>>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle::new()
    }
}

impl Lifecycle {
    pub fn new() -> Lifecycle {
        metrics::gauge!(crate::telemetry::DRAINING).set(0.0);
        Lifecycle {
            phase: watch::channel(Phase::Running).0,
            draining_since: Mutex::new(None),
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Starts draining unless it already has; returns when it began.
    pub fn drain(&self, origin: DrainOrigin) -> Instant {
        let mut since = self
            .draining_since
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(at) = *since {
            return at;
        }
        let at = Instant::now();
        *since = Some(at);
        self.phase.send_if_modified(|p| {
            let running = *p == Phase::Running;
            if running {
                *p = Phase::Draining;
            }
            running
        });
        metrics::gauge!(crate::telemetry::DRAINING).set(1.0);
        tracing::info!(
            by = origin.label(),
            "draining: new connections get 421 4.3.0, /readyz answers 503"
        );
        at
    }

    /// A later phase of the stop; never back to an earlier one.
    pub fn advance(&self, to: Phase) {
        self.phase.send_if_modified(|p| {
            let later = rank(to) > rank(*p);
            if later {
                *p = to;
            }
            later
        });
    }
}

fn rank(p: Phase) -> u8 {
    match p {
        Phase::Running => 0,
        Phase::Draining => 1,
        Phase::Closing => 2,
        Phase::Stop => 3,
    }
}

/// The last resort behind the stop deadline: if the runtime itself is wedged (a
/// blocking call that never returns), the process exits anyway. What was acknowledged
/// is on disk before its `250`; at worst a delivery is repeated.
pub fn watchdog(after: Duration) {
    let spawned = std::thread::Builder::new()
        .name("stop-deadline".into())
        .spawn(move || {
            std::thread::sleep(after);
            eprintln!("smartrelay: the stop deadline passed with work left; exiting");
            std::process::exit(1);
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "stop-deadline watchdog not started");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn phases_only_move_forward() {
        let l = Lifecycle::new();
        let mut rx = l.subscribe();
        let first = l.drain(DrainOrigin::Api);
        assert_eq!(l.phase(), Phase::Draining);
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        assert_eq!(
            l.drain(DrainOrigin::Signal),
            first,
            "the first drain counts"
        );
        l.advance(Phase::Stop);
        l.advance(Phase::Closing);
        assert_eq!(l.phase(), Phase::Stop);
        l.drain(DrainOrigin::Api);
        assert_eq!(l.phase(), Phase::Stop);
    }
}
