//! Generated code and link-time details.
//!
//! The protobuf contracts in `proto/` are compiled with protox (a protobuf compiler in Rust:
//! no system `protoc` needed) into prost types, plus pbjson serde impls for the proto3 JSON
//! mapping.
//!
//! Link-time details of libtorch that cargo cannot know:
//! * `libtorch_cuda.so` only registers the CUDA backend from its static initialisers: nothing
//!   references its symbols, so the linker's default `--as-needed` drops it and tch then never
//!   sees a GPU. Where the libtorch in use has it, keep it among the NEEDED libraries.
//! * An rpath to libtorch's directory lets the binary and the tests run without
//!   `LD_LIBRARY_PATH`; on another machine `LD_LIBRARY_PATH` still takes precedence.

use std::path::{Path, PathBuf};

fn main() {
    compile_protos();
    link_libtorch();
}

fn compile_protos() {
    // Read at run time, not with env!(): cargo reuses a compiled build script when the checkout
    // moves (its hash does not include the path), and a path baked in at compile time then
    // points at the old place.
    let manifest_dir =
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let proto_root = Path::new(&manifest_dir).join("../proto");
    let file = proto_root.join("clipqc/v1/inspection.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    let fds = protox::compile([&file], [&proto_root])
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let descriptor = prost::Message::encode_to_vec(&fds);
    std::fs::write(out.join("clipqc_descriptor.bin"), &descriptor)
        .expect("write the descriptor set");
    prost_build::Config::new()
        // Well-known types from pbjson-types, whose serde impls follow the JSON mapping.
        .compile_well_known_types()
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_fds(fds)
        .expect("generate prost types");
    pbjson_build::Builder::new()
        .register_descriptors(&descriptor)
        .expect("read the descriptor set")
        .build(&[".clipqc"])
        .expect("generate serde impls");
}

fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Some(lib_dir) = std::env::var_os("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    let lib_dir = Path::new(&lib_dir);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-search=native={}", lib_dir.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
