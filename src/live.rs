//! A value a reload replaces while readers keep the one they took: a session holds the
//! `Arc` it started with for its whole life, the next session takes the new one.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;

use crate::envelope::Envelope;
use crate::pipeline::{PlanItem, Router};

pub struct Live<T> {
    current: watch::Sender<Arc<T>>,
}

impl<T> Live<T> {
    pub fn new(value: T) -> Live<T> {
        Live::from_arc(Arc::new(value))
    }

    pub fn from_arc(value: Arc<T>) -> Live<T> {
        Live {
            current: watch::Sender::new(value),
        }
    }

    /// The value in force now.
    pub fn get(&self) -> Arc<T> {
        self.current.borrow().clone()
    }

    /// From now on readers get `value`; those holding the old one keep it.
    pub fn set(&self, value: Arc<T>) {
        self.current.send_replace(value);
    }

    /// For a task that follows the value (the shared-range refresher).
    pub fn subscribe(&self) -> watch::Receiver<Arc<T>> {
        self.current.subscribe()
    }
}

/// Every delivery attempt plans with the routes in force when it starts.
impl<T: Router> Router for Live<T> {
    fn plan(
        &self,
        envelope: &Envelope,
        pending: &[usize],
    ) -> impl Future<Output = Vec<PlanItem>> + Send {
        let current = self.get();
        async move { current.plan(envelope, pending).await }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_keeps_what_it_took() {
        let live = Live::new(1);
        let held = live.get();
        live.set(Arc::new(2));
        assert_eq!(*held, 1);
        assert_eq!(*live.get(), 2);
    }

    #[tokio::test]
    async fn followers_see_each_replacement() {
        let live = Live::new("a");
        let mut rx = live.subscribe();
        live.set(Arc::new("b"));
        rx.changed().await.unwrap();
        assert_eq!(**rx.borrow(), "b");
    }
}
