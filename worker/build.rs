//! Link-time details of libtorch that cargo cannot know.
//!
//! * `libtorch_cuda.so` only registers the CUDA backend from its static initialisers: nothing
//!   references its symbols, so the linker's default `--as-needed` drops it and tch then never
//!   sees a GPU. Where the libtorch in use has it, keep it among the NEEDED libraries.
//! * An rpath to libtorch's directory lets the binary and the tests run without
//!   `LD_LIBRARY_PATH`; on another machine `LD_LIBRARY_PATH` still takes precedence.

use std::path::Path;

fn main() {
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
