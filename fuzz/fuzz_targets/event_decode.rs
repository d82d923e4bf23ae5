//! A message from the events topic, as `samgate run` decodes it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<samgate::event::Event>(data);
    let _ = serde_json::from_slice::<samgate::pipeline::dedupe::BlockRecord>(data);
});
