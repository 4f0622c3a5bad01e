#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = dbmigrate_fuzz_checks::first_frame(data);
});
