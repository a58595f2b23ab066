#![no_main]

use ebb_collector::simulate::trace::Trace;

// What `ebb-collector simulate --trace` reads from an operator's CSV file: parsed with a speedup taken
// from the first byte, then sampled when the run would be small.
libfuzzer_sys::fuzz_target!(|bytes: &[u8]| {
    let Some((&first, rest)) = bytes.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let speedup = [1.0, 30.0, 0.5, 1e-9, f64::NAN][usize::from(first) % 5];
    if let Ok(trace) = Trace::parse(text, speedup) {
        let step_ms = 1000 * (1 + i64::from(first));
        if (trace.end() - trace.start()) / step_ms < 100_000 {
            let demand = trace.sample(step_ms).unwrap();
            assert!(demand.iter().all(|d| d.is_finite() && *d >= 0.0));
        }
    }
});
