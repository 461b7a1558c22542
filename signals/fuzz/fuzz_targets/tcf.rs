#![no_main]

use libfuzzer_sys::fuzz_target;

// Any input must give Ok or Err, never a panic. Invalid UTF-8 is replaced
// rather than skipped so every input reaches the decoder.
fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = madtech_signals::decode_tcf(&text);
    let _ = madtech_signals::decode(&text, None);
});
