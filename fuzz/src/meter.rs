//! The fuzz binaries' global allocator: it counts what the fuzzing thread holds while asked
//! to (so the preprocess target can hold `Preprocessor::run` to its plan, as the worker's own
//! `alloc_meter` does in its unit tests), and it refuses any single allocation over
//! [`MAX_ALLOCATION`].
//!
//! Why refuse: without a sanitizer, libFuzzer cannot see allocations (its `-malloc_limit_mb`
//! needs a sanitizer's hooks), and an input that makes the worker ask for gigabytes would only
//! show up as a slow run or the machine's OOM killer. Refused, an infallible allocation aborts
//! at once with "memory allocation of N bytes failed" (a crash, with the input saved), and a
//! fallible one (`try_reserve`) takes its error path, as it would in a worker out of memory.
//! Memory allocated by C code (libjpeg's) is not seen.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// No input of these targets needs more in one piece: the preprocess target's decode limits
/// allow 4 MiB allocations, and requests and configs are at most a few hundred kilobytes.
pub const MAX_ALLOCATION: usize = 256 << 20;

struct Meter;

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

// SAFETY: every call is passed on to `System` unchanged, or refused with a null pointer as
// the trait allows; only sizes are counted.
unsafe impl GlobalAlloc for Meter {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count(layout.size() as i64);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count(layout.size() as i64);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        count(-(layout.size() as i64));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(new_size as i64 - layout.size() as i64);
        }
        p
    }
}

#[global_allocator]
static METER: Meter = Meter;

/// Runs `f` and returns its result with the most bytes it held at once on this thread,
/// counting what it returns (still held at the end).
pub fn peak_of<T>(f: impl FnOnce() -> T) -> (T, u64) {
    HELD.set(0);
    PEAK.set(0);
    ON.set(true);
    let out = f();
    ON.set(false);
    (out, PEAK.get().max(0) as u64)
}
