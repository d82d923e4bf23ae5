//! What gateways print back through show-task: batch outcomes, verification sections, `fw samp
//! get` and `fw sam -M` listings.
#![no_main]
use libfuzzer_sys::fuzz_target;
use samgate::checkpoint::sam;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let count = data.first().map_or(0, |b| usize::from(*b % 64));
    assert_eq!(sam::parse_outcomes(&text, count).len(), count);
    assert_eq!(sam::split_sections(&text, count).len(), count);
    for entry in sam::parse_samp_get(&text) {
        let _ = entry.samgate_key();
    }
    let _ = sam::parse_sam_monitor(&text);
});
