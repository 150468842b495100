//! The protobuf contracts (`proto/clipqc/v1/inspection.proto`), generated at build time, with
//! serde impls that follow the proto3 JSON mapping (lowerCamelCase on output; both the proto
//! field names and their lowerCamelCase forms accepted on input).

#![allow(clippy::all, missing_docs)]

pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/clipqc.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/clipqc.v1.serde.rs"));
}

pub mod schema;

/// The compiled `.proto` files (a `FileDescriptorSet`), for the JSON Schemas.
pub const DESCRIPTOR: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/clipqc_descriptor.bin"));
