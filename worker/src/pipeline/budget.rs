//! The worker's in-flight byte budget: what records in flight may hold in memory (payloads,
//! fetched images, decoded pixels and their copies, tensors).
//!
//! Guarantees: the bytes held never exceed the budget, except by one reservation larger than
//! the whole budget, which waits until it holds all of it (so a huge image passes alone
//! instead of never); a record never waits for budget while holding part of it
//! ([`Reserved::grow_to`]), so records cannot deadlock each other.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::OwnedSemaphorePermit;

use crate::metrics;

/// Bytes held by records in flight, capped.
pub struct ByteBudget {
    permits: std::sync::Arc<tokio::sync::Semaphore>,
    total_kib: u32,
    held: AtomicU64,
    peak: AtomicU64,
}

/// Bytes reserved until dropped.
pub struct Reserved<'a> {
    budget: &'a ByteBudget,
    bytes: u64,
    permit: Option<OwnedSemaphorePermit>,
}

impl ByteBudget {
    pub fn new(max_bytes: u64) -> Self {
        let total_kib = (max_bytes / 1024).clamp(1, u32::MAX as u64 >> 4) as u32;
        Self {
            permits: std::sync::Arc::new(tokio::sync::Semaphore::new(total_kib as usize)),
            total_kib,
            held: 0.into(),
            peak: 0.into(),
        }
    }

    /// Wait until `bytes` fit. A reservation larger than the whole budget waits for all of
    /// it, so one huge image passes alone instead of never.
    pub async fn reserve(&self, bytes: usize) -> Reserved<'_> {
        let kib = self.kib(bytes);
        let permit = match kib {
            0 => None,
            n => Some(
                self.permits
                    .clone()
                    .acquire_many_owned(n)
                    .await
                    .expect("the byte budget is never closed. This is a bug."),
            ),
        };
        let reserved = u64::from(kib) * 1024;
        let held = self.held.fetch_add(reserved, Ordering::Relaxed) + reserved;
        self.peak.fetch_max(held, Ordering::Relaxed);
        metrics::in_flight_bytes(held);
        Reserved {
            budget: self,
            bytes: reserved,
            permit,
        }
    }

    fn kib(&self, bytes: usize) -> u32 {
        (bytes as u64).div_ceil(1024).min(self.total_kib as u64) as u32
    }

    /// Bytes held now, and the whole budget (in whole KiB per reservation).
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    pub fn total(&self) -> u64 {
        u64::from(self.total_kib) * 1024
    }

    /// Most bytes held at once so far (in whole KiB per reservation).
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl<'a> Reserved<'a> {
    /// Give back all but `bytes` of this reservation (what the record no longer holds).
    pub fn shrink_to(mut self, bytes: usize) -> Reserved<'a> {
        let keep = self.budget.kib(bytes);
        let have = (self.bytes / 1024) as u32;
        if keep >= have {
            return self;
        }
        let freed = u64::from(have - keep) * 1024;
        if let Some(p) = &mut self.permit {
            // Split off what is given back and drop it: those permits return to the budget.
            if keep == 0 {
                self.permit = None;
            } else {
                drop(p.split((have - keep) as usize));
            }
        }
        let held = self.budget.held.fetch_sub(freed, Ordering::Relaxed) - freed;
        metrics::in_flight_bytes(held);
        self.bytes -= freed;
        self
    }

    /// Grow this reservation to `bytes` in all, without hold-and-wait: when the extra does
    /// not fit at once, everything held is given back before waiting for the whole amount.
    /// (A record that waits while holding part of the budget can deadlock the worker: a few
    /// records each holding their payload's share, each waiting for room that only the
    /// others can free.)
    pub async fn grow_to(mut self, bytes: usize) -> Reserved<'a> {
        let budget = self.budget;
        let want = budget.kib(bytes);
        let have = (self.bytes / 1024) as u32;
        if want <= have {
            return self;
        }
        match budget.permits.clone().try_acquire_many_owned(want - have) {
            Ok(extra) => {
                match &mut self.permit {
                    Some(p) => p.merge(extra),
                    None => self.permit = Some(extra),
                }
                let added = u64::from(want - have) * 1024;
                let held = budget.held.fetch_add(added, Ordering::Relaxed) + added;
                budget.peak.fetch_max(held, Ordering::Relaxed);
                metrics::in_flight_bytes(held);
                self.bytes += added;
                self
            }
            Err(_) => {
                drop(self);
                budget.reserve(bytes).await
            }
        }
    }
}

/// A record's reservation while its image body streams in: the fetch stage asks for room
/// ([`crate::fetch::Room`]) before it holds the body, and the reservation grows to the
/// record's payload plus the body (without hold-and-wait, as [`Reserved::grow_to`]).
///
/// Cancellation: a fetch can be dropped while it waits for room (its time limit, a retry).
/// Growing gives the reservation back before waiting, so a dropped wait leaves none held;
/// [`BodyRoom::into_reserved`] then reserves the payload's share again.
pub struct BodyRoom<'a> {
    budget: &'a ByteBudget,
    base: usize,
    reserved: tokio::sync::Mutex<Option<Reserved<'a>>>,
}

impl<'a> BodyRoom<'a> {
    /// `reserved` holds `base` bytes (the payload) of `budget` now.
    pub fn new(budget: &'a ByteBudget, reserved: Reserved<'a>, base: usize) -> Self {
        Self {
            budget,
            base,
            reserved: tokio::sync::Mutex::new(Some(reserved)),
        }
    }

    /// The reservation as grown; the payload's share again if a wait for room was dropped.
    pub async fn into_reserved(self) -> Reserved<'a> {
        match self.reserved.into_inner() {
            Some(r) => r,
            None => self.budget.reserve(self.base).await,
        }
    }
}

impl crate::fetch::Room for BodyRoom<'_> {
    async fn make_room(&self, body_bytes: u64) {
        let mut slot = self.reserved.lock().await;
        let bytes = self.base.saturating_add(body_bytes as usize);
        // Taken out for the wait: if this future is dropped meanwhile, the slot stays empty
        // (and nothing is held: `grow_to` gives back before it waits).
        *slot = Some(match slot.take() {
            Some(reserved) => reserved.grow_to(bytes).await,
            None => self.budget.reserve(bytes).await,
        });
    }
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        let held = self.budget.held.fetch_sub(self.bytes, Ordering::Relaxed) - self.bytes;
        metrics::in_flight_bytes(held);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn reservations_wait_for_room_and_an_oversized_one_passes_alone() {
        let budget = std::sync::Arc::new(ByteBudget::new(10 * 1024));
        let a = budget.reserve(6 * 1024).await;
        // 6 + 6 > 10: the second waits until the first is dropped.
        let b = tokio::time::timeout(Duration::from_millis(50), budget.reserve(6 * 1024)).await;
        assert!(b.is_err(), "over budget: must wait");
        drop(a);
        let b = budget.reserve(6 * 1024).await;
        drop(b);
        // Larger than everything: takes the whole budget, no deadlock.
        let huge = budget.reserve(1 << 30).await;
        assert_eq!(budget.peak(), 10 * 1024);
        drop(huge);
        assert_eq!(budget.held.load(Ordering::Relaxed), 0);
    }

    /// Two records each hold 4 of 10 KiB and each need 8: waiting while holding, neither
    /// could ever go on. Growing gives back before waiting, so both finish.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_growing_their_reservations_at_once_do_not_deadlock() {
        let budget = std::sync::Arc::new(ByteBudget::new(10 * 1024));
        let both_hold = std::sync::Arc::new(tokio::sync::Barrier::new(2));
        let record = |budget: std::sync::Arc<ByteBudget>,
                      barrier: std::sync::Arc<tokio::sync::Barrier>| async move {
            let payload = budget.reserve(4 * 1024).await;
            barrier.wait().await;
            let all = payload.grow_to(8 * 1024).await;
            assert_eq!(all.bytes, 8 * 1024);
            tokio::task::yield_now().await;
        };
        let a = tokio::spawn(record(budget.clone(), both_hold.clone()));
        let b = tokio::spawn(record(budget.clone(), both_hold.clone()));
        tokio::time::timeout(Duration::from_secs(30), async {
            a.await.unwrap();
            b.await.unwrap();
        })
        .await
        .expect("deadlocked: each record waited while holding");
        assert!(budget.peak() <= 10 * 1024);
        assert_eq!(budget.held.load(Ordering::Relaxed), 0);
        // Growing within what is free keeps the one reservation.
        let r = budget.reserve(1024).await.grow_to(3 * 1024).await;
        assert_eq!(
            (r.bytes, budget.held.load(Ordering::Relaxed)),
            (3 * 1024, 3 * 1024)
        );
    }

    /// A fetch dropped while it waits for room (its time limit) leaves the room empty, not
    /// broken: the record gets its payload's share back, and the budget counts what is held.
    /// (It panicked the record once: the hostile campaign's file:// reads past their time.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wait_for_room_dropped_midway_leaves_the_record_its_payload_share() {
        use crate::fetch::Room;
        let budget = ByteBudget::new(10 * 1024);
        let other = budget.reserve(8 * 1024).await;
        let room = BodyRoom::new(&budget, budget.reserve(1024).await, 1024);
        // 1 + 6 KiB does not fit beside the other 8: the wait is cut short.
        let waited =
            tokio::time::timeout(Duration::from_millis(50), room.make_room(6 * 1024)).await;
        assert!(waited.is_err(), "over budget: must wait");
        assert_eq!(budget.held(), 8 * 1024, "nothing held by the dropped wait");
        drop(other);
        let r = room.into_reserved().await;
        assert_eq!((r.bytes, budget.held()), (1024, 1024));
        drop(r);
        // Grown when it fits.
        let room = BodyRoom::new(&budget, budget.reserve(1024).await, 1024);
        room.make_room(4 * 1024).await;
        assert_eq!(room.into_reserved().await.bytes, 5 * 1024);
        assert_eq!(budget.held(), 0);
    }

    /// Shrinking gives back what the record no longer holds, at once.
    #[tokio::test]
    async fn a_reservation_shrinks_to_what_is_still_held() {
        let budget = ByteBudget::new(10 * 1024);
        let r = budget.reserve(8 * 1024).await.shrink_to(2 * 1024);
        assert_eq!((r.bytes, budget.held()), (2 * 1024, 2 * 1024));
        let other = budget.reserve(8 * 1024).await;
        assert_eq!(budget.held(), 10 * 1024);
        drop((r, other));
        assert_eq!(budget.held(), 0);
        let r = budget.reserve(4 * 1024).await.shrink_to(0);
        assert_eq!((r.bytes, budget.held()), (0, 0));
    }
}
