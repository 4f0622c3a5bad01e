#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dbmigrate_fuzz_checks::protocol_frame(data));
