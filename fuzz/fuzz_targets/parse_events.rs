//! Event and batch parsing on any bytes: never panics; whatever parses serializes
//! and parses back to equal events.
#![no_main]

use comapi_webhook::dangerous::parse_unverified;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(events) = parse_unverified(data) {
        let json = serde_json::to_vec(&events).expect("events serialize");
        let again = parse_unverified(&json).expect("serialized events parse");
        assert_eq!(events, again);
        for event in &events {
            let _ = (
                event.kind(),
                event.entity_id(),
                event.message_id(),
                event.message(),
                event.account_id(),
                event.revision(),
                event.time(),
                event.field_json("payload"),
            );
        }
    }
});
