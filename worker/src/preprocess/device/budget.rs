//! The device path's memory budget: bytes reserved by the frames being preprocessed.
//!
//! Guarantees: the bytes reserved at once never exceed the total; a frame that needs more
//! than the total is refused at once (it falls back to the CPU path) rather than waiting for
//! ever; a reservation is returned when dropped, waking the frames that wait.

use std::sync::{Condvar, Mutex};

#[derive(Debug)]
pub struct Budget {
    total: u64,
    state: Mutex<State>,
    freed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    used: u64,
    /// The most ever reserved at once (tests and the bench read it).
    high_water: u64,
}

/// Bytes held from a [`Budget`] until dropped.
#[derive(Debug)]
pub struct Reservation<'a> {
    budget: &'a Budget,
    bytes: u64,
}

impl Budget {
    pub fn new(total: u64) -> Self {
        Self {
            total,
            state: Mutex::new(State::default()),
            freed: Condvar::new(),
        }
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// The most bytes reserved at once so far.
    pub fn high_water(&self) -> u64 {
        self.lock().high_water
    }

    /// `bytes` from the budget, waiting (blocking this thread) until they are free; `None`
    /// when they are more than the whole budget.
    pub fn reserve(&self, bytes: u64) -> Option<Reservation<'_>> {
        if bytes > self.total {
            return None;
        }
        let mut state = self.lock();
        while state.used + bytes > self.total {
            state = self.freed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.used += bytes;
        state.high_water = state.high_water.max(state.used);
        Some(Reservation {
            budget: self,
            bytes,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is two integers, consistent after every statement: a panic elsewhere
        // while holding the lock leaves nothing half-done.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut state = self.budget.lock();
        state.used -= self.bytes;
        drop(state);
        self.budget.freed.notify_all();
    }
}
