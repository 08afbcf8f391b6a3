//! `Signature::parse` on any bytes: never panics, and whatever it accepts is 40 hex
//! digits (either case) with optional spaces or tabs around them.
#![no_main]

use comapi_webhook::signature::Signature;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(signature) = Signature::parse(data) {
        let trimmed = data
            .iter()
            .position(|b| !matches!(b, b' ' | b'\t'))
            .map_or(&[][..], |start| &data[start..]);
        let end = trimmed
            .iter()
            .rposition(|b| !matches!(b, b' ' | b'\t'))
            .map_or(0, |e| e + 1);
        let digits = &trimmed[..end];
        assert_eq!(digits.len(), 40);
        assert_eq!(
            signature.to_string().as_bytes(),
            digits.to_ascii_lowercase().as_slice()
        );
    }
});
