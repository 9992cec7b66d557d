#![no_main]
libfuzzer_sys::fuzz_target!(|input: crewdesk_fuzz::JudgeInput| crewdesk_fuzz::judge_sequence(input));
