//! The checks behind the fuzz targets in `fuzz_targets/`: each takes the fuzzer's bytes, runs
//! them through the worker's own functions and asserts what the worker promises about them.
//! A panic (a failed assertion included) or an abort is a crash for libFuzzer.
//!
//! Kept in a library so the targets stay one line each and the checks can be read together.

pub mod config;
pub mod meter;
pub mod preprocess;
pub mod request;
