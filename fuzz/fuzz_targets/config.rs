//! A configuration file: parse, then validate.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = samgate::config::Config::from_toml(text) {
        let _ = config.validate();
    }
});
