#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| crewdesk_fuzz::sync_message(data));
