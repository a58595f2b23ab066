#![no_main]

libfuzzer_sys::fuzz_target!(|text: &str| ebb_collector::fuzzing::snapshot(text));
