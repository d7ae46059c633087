//! Who owns background work. Every periodic or long-running task is spawned through
//! [`Tasks`], which holds the token that stops it and the tracker that shutdown waits
//! on, so no task outlives the relay's shutdown.

use std::future::Future;
use std::time::Duration;

pub use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Clone, Default)]
pub struct Tasks {
    stop: CancellationToken,
    tracker: TaskTracker,
}

impl Tasks {
    pub fn new() -> Tasks {
        Tasks::default()
    }

    /// Runs `fut` until it ends or the stop token fires, whichever is first.
    pub fn spawn<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let stop = self.stop.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                () = fut => {}
            }
        });
    }

    /// Runs `tick` every `every` (the first time at once) until the stop token fires;
    /// a tick in progress is not interrupted.
    pub fn every<F, Fut>(&self, every: Duration, mut tick: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let stop = self.stop.clone();
        self.tracker.spawn(async move {
            let mut interval = tokio::time::interval(every.max(Duration::from_millis(10)));
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = interval.tick() => tick().await,
                }
            }
        });
    }

    /// Stops every task and waits for all of them to end.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }

    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn periodic_tasks_stop_on_shutdown() {
        let tasks = Tasks::new();
        let ticks = Arc::new(AtomicUsize::new(0));
        let t = ticks.clone();
        tasks.every(Duration::from_secs(1), move || {
            let t = t.clone();
            async move {
                t.fetch_add(1, Ordering::SeqCst);
            }
        });
        tasks.spawn(std::future::pending());
        tokio::time::sleep(Duration::from_millis(3500)).await;
        assert_eq!(ticks.load(Ordering::SeqCst), 4);
        assert_eq!(tasks.len(), 2);
        tasks.shutdown().await;
        assert!(tasks.is_empty(), "a task outlived shutdown");
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(ticks.load(Ordering::SeqCst), 4);
    }
}
