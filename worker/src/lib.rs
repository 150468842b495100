//! clipqc: zero-shot visual quality inspection with CLIP.
//!
//! One message's way through the crate, each stage in a module named for it:
//!
//! ```text
//! record ──request──▶ InspectionRequest ──preprocess──▶ pixels ──batch──▶ model (one OS thread)
//!        ──▶ embeddings ──score──▶ verdict            offsets: what may be committed
//! ```
//!
//! `model`, `preprocess` and `score` know nothing of Kafka, HTTP or tokio's runtime: they are
//! plain types and functions, used alike by the offline `classify` command and by the worker.

pub mod batch;
pub mod brokers;
pub mod cli;
pub mod config;
pub mod exemplars;
pub mod fetch;
pub mod gpu;
pub mod http;
pub mod kafka;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod offsets;
pub mod panics;
pub mod pipeline;
pub mod preprocess;
pub mod profiles;
pub mod proto;
pub mod request;
pub mod routing;
pub mod score;
pub mod segment;
pub mod sink;
pub mod source;
pub mod timestamps;
pub mod trace_context;
pub mod verdict;
