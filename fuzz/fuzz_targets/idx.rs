#![no_main]
//! The `idx` target of `snella::fuzz::run`: src/fuzz.rs says what it reads and how.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // An error is a correct answer to a bad input; only a panic, an abort or a hang is a finding.
    let _ = snella::fuzz::run("idx", data);
});
