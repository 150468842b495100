//! The fuzz binaries' global allocator: the worker's counting allocator
//! ([`clipqc::preprocess::alloc_meter`]), which counts what the fuzzing thread holds while
//! asked to (so the preprocess target can hold `Preprocessor::run` to its plan, as the worker's
//! own unit tests do), here refusing any single allocation over [`MAX_ALLOCATION`].
//!
//! Why refuse: without a sanitizer, libFuzzer cannot see allocations (its `-malloc_limit_mb`
//! needs a sanitizer's hooks), and an input that makes the worker ask for gigabytes would only
//! show up as a slow run or the machine's OOM killer. Refused, an infallible allocation aborts
//! at once with "memory allocation of N bytes failed" (a crash, with the input saved), and a
//! fallible one (`try_reserve`) takes its error path, as it would in a worker out of memory.
//! Memory allocated by C code (libjpeg's) is not seen.

pub use clipqc::preprocess::alloc_meter::peak_of;
use clipqc::preprocess::alloc_meter::Meter;

/// No input of these targets needs more in one piece: the preprocess target's decode limits
/// allow 4 MiB allocations, and requests and configs are at most a few hundred kilobytes.
pub const MAX_ALLOCATION: usize = 256 << 20;

#[global_allocator]
static METER: Meter = Meter::refusing_over(MAX_ALLOCATION);
