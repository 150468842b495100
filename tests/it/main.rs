//! The integration tests: one binary (one link of libtorch and the dependency tree, not one
//! per suite). Every `tests/it/*.rs` file is a suite, compiled in by `automod` without being
//! listed, so a new suite cannot be left out; `common/` holds what they share.
//!
//! Run one suite with `cargo test --test it pipeline_mock::`. Under a plain `cargo test`
//! the tests that compare with Python's reference outputs or need programs beyond Rust (the
//! Apache Kafka broker and the Python Kafka client, moto, Prometheus, the exported tiny SAM) are
//! ignored, each saying what it needs; scripts/test.sh prepares all of that and runs them
//! too (`--include-ignored`). Measurements run by hand are named `measure_*`.
//!
//! Cargo notices a new suite file once something else in the binary changes (the macro reads
//! the folder; cargo does not watch it): `touch tests/it/main.rs` after adding one.

mod common;

automod::dir!("../tests/it");
