//! One ADS/IDS line (TSV 14/15/16/17 fields or a JSON object) from stdin.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(event)) = samgate::flowmon::parse_line(data) {
        // What parses must serialise: the shim writes it to Kafka next.
        serde_json::to_string(&event).expect("a parsed event serialises");
    }
});
