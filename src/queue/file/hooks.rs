//! Test hooks of the file spool: fault injection that stops the committer at a chosen
//! step, as a `kill -9` would.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::Step;

/// The committer dies at the `halt_at`-th step it passes.
#[derive(Default)]
pub(super) struct Faults {
    pub(super) halt_at: AtomicUsize,
    pub(super) passed: AtomicUsize,
}

impl Faults {
    pub(super) fn step(&self, step: Step) {
        let n = self.passed.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.halt_at.load(Ordering::SeqCst) {
            // Unwinds the committer thread and nothing else: the files stay exactly
            // as this step left them, as after a kill.
            std::panic::panic_any(format!("fault injected after {step:?}"));
        }
    }
}
