#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| crewdesk_fuzz::message_body(data));
