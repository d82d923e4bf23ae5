//! A whole ADS run on stdin through the bounded line reader (a small bound, so long lines and
//! their truncation are exercised).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut reader = samgate::flowmon::LineReader::new(data, 256);
    let mut lines = 0usize;
    while let Ok(Some(line)) = reader.next_line() {
        let _ = line.parse(256);
        lines += 1;
        assert!(lines <= data.len() + 1, "more lines than bytes");
    }
});
