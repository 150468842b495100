#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| clipqc_fuzz::preprocess::check(data));
