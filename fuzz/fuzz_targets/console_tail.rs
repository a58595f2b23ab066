#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| ebb_collector::fuzzing::console_tail(bytes));
