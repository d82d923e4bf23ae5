//! The simulator's gateway shell: `fw sam` / `fw samp` scripts as run-script delivers them.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let script = String::from_utf8_lossy(data);
    let mut gateway = samgate_sim::checkpoint::gateway::Gateway::default();
    let outcome = gateway.run_script(&script, 1_763_640_000_000);
    let _ = gateway.run_script(&script, 1_763_640_000_500);
    gateway.expire(1_763_650_000_000);
    let _ = outcome;
});
