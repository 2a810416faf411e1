#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tailguard_fuzz::wgconf(data));
