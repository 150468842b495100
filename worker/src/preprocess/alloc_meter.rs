//! A counting global allocator: it counts what one thread holds while asked to ([`peak_of`]),
//! so tests can check [`super::Preprocessor::plan`] against what `run` really allocates, and
//! it may refuse any single allocation over a bound ([`Meter::refusing_over`]).
//!
//! It is the library's unit-test binary's allocator ([`Meter::UNLIMITED`]; there can be only
//! one per binary) and the fuzz targets' (`fuzz/src/meter.rs`, which refuses what no input
//! needs): everything else goes straight to the system allocator after one comparison and one
//! thread-local check. Memory allocated by C code (libjpeg's) is not seen.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The allocator: [`System`]'s, counted. Declare it with `#[global_allocator]`.
pub struct Meter {
    max_allocation: usize,
}

impl Meter {
    /// Passes every allocation on.
    pub const UNLIMITED: Meter = Meter::refusing_over(usize::MAX);

    /// Refuses any single allocation of more than `bytes` (a null pointer, as the trait
    /// allows): an infallible allocation then aborts at once with "memory allocation of N
    /// bytes failed", and a fallible one (`try_reserve`) takes its error path.
    pub const fn refusing_over(bytes: usize) -> Self {
        Self {
            max_allocation: bytes,
        }
    }
}

thread_local! {
    // Const-initialised and without destructors: reading them never allocates.
    static ON: Cell<bool> = const { Cell::new(false) };
    static HELD: Cell<i64> = const { Cell::new(0) };
    static PEAK: Cell<i64> = const { Cell::new(0) };
}

fn count(delta: i64) {
    // `try_with`: the allocator is called while a thread's locals are being torn down.
    let _ = ON.try_with(|on| {
        if on.get() {
            let held = HELD.get() + delta;
            HELD.set(held);
            if held > PEAK.get() {
                PEAK.set(held);
            }
        }
    });
}

impl Meter {
    /// `allocate`'s block of `size` bytes (replacing one of `freed`), counted; refused over
    /// the bound.
    fn counted(&self, size: usize, freed: usize, allocate: impl FnOnce() -> *mut u8) -> *mut u8 {
        if size > self.max_allocation {
            return std::ptr::null_mut();
        }
        let p = allocate();
        if !p.is_null() {
            count(size as i64 - freed as i64);
        }
        p
    }
}

// SAFETY: every call is passed on to `System` unchanged, or refused with a null pointer as
// the trait allows; only sizes are counted.
unsafe impl GlobalAlloc for Meter {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.counted(layout.size(), 0, || unsafe { System.alloc(layout) })
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.counted(layout.size(), 0, || unsafe { System.alloc_zeroed(layout) })
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        count(-(layout.size() as i64));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        self.counted(new_size, layout.size(), || unsafe {
            System.realloc(ptr, layout, new_size)
        })
    }
}

#[cfg(test)]
#[global_allocator]
static METER: Meter = Meter::UNLIMITED;

/// Runs `f` and returns its result with the most bytes it held at once on this thread,
/// counting what it returns (still held at the end). Counts only under a [`Meter`] declared
/// as the global allocator (else it says 0).
pub fn peak_of<T>(f: impl FnOnce() -> T) -> (T, u64) {
    HELD.set(0);
    PEAK.set(0);
    ON.set(true);
    let out = f();
    ON.set(false);
    (out, PEAK.get().max(0) as u64)
}
