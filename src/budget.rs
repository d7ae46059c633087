//! A memory budget shared by tasks that hold message bodies: sessions receiving them
//! (`server.ingress_memory`) and deliveries sending them (half of
//! `queue.memory_budget`). Counted in KiB so a semaphore's permits cover any size.
//! Who cannot get room waits, and while it waits it reads nothing: the sender sees TCP
//! backpressure instead of the relay allocating.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

const KIB: u64 = 1024;

#[derive(Debug, Clone)]
pub struct MemoryBudget {
    sem: Arc<Semaphore>,
    /// All of it, in KiB: a single hold never asks for more, so one body larger than
    /// the budget still passes, alone.
    total: u32,
}

/// Room taken from a budget; given back when dropped.
#[derive(Debug)]
pub struct Held {
    budget: MemoryBudget,
    permit: Option<OwnedSemaphorePermit>,
}

fn kib(bytes: u64) -> u64 {
    bytes.div_ceil(KIB)
}

impl MemoryBudget {
    pub fn new(bytes: u64) -> MemoryBudget {
        let total = u32::try_from(kib(bytes).max(1)).unwrap_or(u32::MAX);
        MemoryBudget {
            sem: Arc::new(Semaphore::new(total as usize)),
            total,
        }
    }

    /// Octets of room no one holds now.
    pub fn available(&self) -> u64 {
        self.sem.available_permits() as u64 * KIB
    }

    /// Nothing held yet.
    pub fn empty(&self) -> Held {
        Held {
            budget: self.clone(),
            permit: None,
        }
    }

    /// Room for `bytes`, waiting until it is free.
    pub async fn take(&self, bytes: u64) -> Held {
        let mut held = self.empty();
        held.grow_to(bytes).await;
        held
    }

    fn capped(&self, kib: u64) -> u32 {
        u32::try_from(kib).unwrap_or(u32::MAX).min(self.total)
    }
}

impl Held {
    /// Octets this hold covers.
    pub fn bytes(&self) -> u64 {
        self.permit
            .as_ref()
            .map_or(0, |p| p.num_permits() as u64 * KIB)
    }

    fn kib(&self) -> u32 {
        self.permit
            .as_ref()
            .map_or(0, |p| u32::try_from(p.num_permits()).unwrap_or(u32::MAX))
    }

    fn add(&mut self, more: OwnedSemaphorePermit) {
        match &mut self.permit {
            Some(p) => p.merge(more),
            None => self.permit = Some(more),
        }
    }

    /// Grows the hold to cover `bytes` if that room is free now.
    pub fn try_grow_to(&mut self, bytes: u64) -> bool {
        let want = self.budget.capped(kib(bytes));
        let have = self.kib();
        if want <= have {
            return true;
        }
        match self.budget.sem.clone().try_acquire_many_owned(want - have) {
            Ok(p) => {
                self.add(p);
                true
            }
            Err(TryAcquireError::NoPermits) => false,
            // Never closed: only this type owns the semaphore.
            Err(TryAcquireError::Closed) => false,
        }
    }

    /// Grows the hold to cover `bytes`, waiting for the room.
    pub async fn grow_to(&mut self, bytes: u64) {
        let want = self.budget.capped(kib(bytes));
        let have = self.kib();
        if want <= have {
            return;
        }
        if let Ok(p) = self
            .budget
            .sem
            .clone()
            .acquire_many_owned(want - have)
            .await
        {
            self.add(p);
        }
    }

    /// Gives back what goes beyond `bytes`.
    pub fn shrink_to(&mut self, bytes: u64) {
        let keep = self.budget.capped(kib(bytes));
        if let Some(p) = &mut self.permit {
            let extra = p.num_permits().saturating_sub(keep as usize);
            if extra > 0 {
                drop(p.split(extra));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn holds_grow_shrink_and_give_back() {
        let budget = MemoryBudget::new(100 * KIB);
        let mut a = budget.take(60 * KIB).await;
        assert_eq!(a.bytes(), 60 * KIB);
        let mut b = budget.empty();
        assert!(!b.try_grow_to(50 * KIB), "only 40 KiB are left");
        assert!(b.try_grow_to(40 * KIB));
        a.shrink_to(10 * KIB);
        assert_eq!(budget.available(), 50 * KIB);
        drop(a);
        drop(b);
        assert_eq!(budget.available(), 100 * KIB);
    }

    #[tokio::test]
    async fn one_body_larger_than_the_budget_passes_alone() {
        let budget = MemoryBudget::new(100 * KIB);
        let big = budget.take(1 << 30).await;
        assert_eq!(big.bytes(), 100 * KIB);
        assert_eq!(budget.available(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gets_its_room_when_it_is_given_back() {
        let budget = MemoryBudget::new(100 * KIB);
        let first = budget.take(80 * KIB).await;
        let waiter = tokio::spawn({
            let budget = budget.clone();
            async move { budget.take(50 * KIB).await.bytes() }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(first);
        assert_eq!(waiter.await.unwrap(), 50 * KIB);
    }
}
