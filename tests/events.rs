//! Event parsing on the fixtures: typed fields, every family, batches, round trips,
//! and the negative cases with their JSON paths.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::path::Path;

use comapi_webhook::dangerous::parse_unverified;
use comapi_webhook::event::{Family, MessageStatus};
use comapi_webhook::{Error, Event, EventKind, SIGNATURE_HEADER, Verifier};

fn fixture(name: &str) -> Vec<u8> {
    fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap()
}

fn one(body: &[u8]) -> Event<'_> {
    let mut events = parse_unverified(body).unwrap();
    assert_eq!(events.len(), 1);
    events.remove(0)
}

fn invalid(body: &[u8]) -> (String, String) {
    match parse_unverified(body) {
        Err(Error::InvalidEvent { path, message }) => (path, message),
        Err(other) => panic!("expected InvalidEvent, got {other:?}"),
        Ok(events) => panic!("expected InvalidEvent, got {} events", events.len()),
    }
}

#[test]
fn documented_message_sent_example() {
    let body = fixture("events/message_sent_sms.json");
    let event = one(&body);
    assert_eq!(event.event_id(), "0dceaf0d-93ea-4314-a6f8-b0cffe69799a");
    assert_eq!(event.account_id(), Some(1234));
    assert_eq!(
        event.api_space_id(),
        Some("c924cf6e-4352-4b26-a71a-c2032bea7a01")
    );
    assert_eq!(event.name(), "message.sent");
    assert_eq!(event.kind(), EventKind::Message(MessageStatus::Sent));
    assert_eq!(event.revision(), Some(2));
    assert_eq!(event.etag(), Some("\"2e-PLB2C6w/yVdPjUhuRiZtlvt8k0Q\""));
    assert_eq!(event.timestamp(), Some("2017-08-31T09:26:14.604Z"));
    assert_eq!(
        event.message_id(),
        Some("e9f154c8-4011-493f-bb73-09cfcf8a1411")
    );
    assert_eq!(event.entity_id(), event.message_id());

    let message = event.message().unwrap();
    assert_eq!(
        message.updated_on.as_deref(),
        Some("2017-08-31T09:26:14.799Z")
    );
    assert_eq!(
        message.metadata.as_ref().unwrap().get(),
        r#"{"data":"My correlation data"}"#
    );
    assert_eq!(
        message.channel_data.as_ref().unwrap().get(),
        r#"{"sms":{"phoneNumberCountryCode":"GB","segmentCount":1}}"#
    );
    let details = message.details.as_ref().unwrap();
    assert_eq!(details.channel.as_deref(), Some("sms"));
    assert!(
        details
            .additional_info
            .as_ref()
            .unwrap()
            .get()
            .contains(r#""successful":true"#)
    );
    let [sms] = &details.channel_status[..] else {
        panic!("one channel status")
    };
    assert_eq!(sms.channel, "sms");
    assert_eq!(sms.status.as_deref(), Some("sent"));
    assert_eq!(sms.updated_on.as_deref(), Some("2017-08-31T09:26:14.798Z"));
    assert!(event.extra_fields().next().is_none());
}

#[test]
fn message_states_rise_in_revision_for_one_message() {
    let mut last = 0;
    for (file, status) in [
        ("message_sent_sms", MessageStatus::Sent),
        ("message_delivered", MessageStatus::Delivered),
        ("message_read", MessageStatus::Read),
        ("message_expired", MessageStatus::Expired),
        ("message_failed", MessageStatus::Failed),
    ] {
        let body = fixture(&format!("events/{file}.json"));
        let event = one(&body);
        assert_eq!(event.kind(), EventKind::Message(status), "{file}");
        assert_eq!(
            event.message_id(),
            Some("e9f154c8-4011-493f-bb73-09cfcf8a1411"),
            "{file}"
        );
        let revision = event.revision().unwrap();
        assert!(revision > last, "{file}: revision {revision} after {last}");
        last = revision;
        let message = event.message().unwrap();
        let sms = &message.details.as_ref().unwrap().channel_status[0];
        assert_eq!(
            sms.status.as_deref(),
            Some(file.trim_start_matches("message_").trim_end_matches("_sms"))
        );
    }
}

#[test]
fn every_family() {
    let inbound_body = fixture("events/message_inbound.json");
    let inbound = one(&inbound_body);
    assert_eq!(inbound.kind(), EventKind::MessageInbound);
    let message = inbound.message().unwrap();
    assert_eq!(
        message.body.as_deref(),
        Some("Yes please, book me in for Tuesday")
    );
    assert_eq!(message.channel.as_deref(), Some("sms"));
    assert!(
        message
            .from
            .as_ref()
            .unwrap()
            .get()
            .contains("447123123123")
    );
    assert_eq!(
        inbound.message_id(),
        Some("5f8c3f0e-8a3b-4f43-9d2b-2b7f1c0e6a11")
    );

    let body = fixture("events/conversation_message_delivered.json");
    let event = one(&body);
    assert_eq!(event.kind().family(), Family::ConversationMessage);
    assert_eq!((event.revision(), event.etag()), (Some(2), None));
    assert_eq!(
        event.message_id(),
        Some("a3c2e8c1-2f7d-4b1e-9a53-6b0f3d8e2c44")
    );
    assert_eq!(event.entity_id(), event.message_id());
    assert_eq!(
        event.message().unwrap_err().to_string(),
        "invalid event body at name: \"conversationMessage.delivered\" is not a message.* event"
    );

    let body = fixture("events/conversation_create.json");
    let event = one(&body);
    assert_eq!(event.kind().family(), Family::Conversation);
    assert_eq!((event.revision(), event.etag()), (None, None));
    assert_eq!(
        (event.entity_id(), event.message_id()),
        (Some("support-1234"), None)
    );

    let body = fixture("events/profile_update.json");
    let event = one(&body);
    assert_eq!(event.kind().family(), Family::Profile);
    assert_eq!(
        (event.entity_id(), event.revision()),
        (Some("alex@example.com"), Some(7))
    );
}

#[test]
fn unknown_events_are_kept_with_their_raw_name_payload_and_fields() {
    let body = fixture("events/unknown_event.json");
    let event = one(&body);
    assert_eq!(event.kind(), EventKind::Unknown);
    assert_eq!(event.name(), "message.teleported");
    assert_eq!((event.message_id(), event.entity_id()), (None, None));
    let payload: serde_json::Value =
        serde_json::from_str(event.payload_json().unwrap().get()).unwrap();
    assert_eq!(payload["destination"]["planet"], "Mars");
    assert_eq!(payload["future"][2]["nested"], serde_json::json!([]));
    let extra: Vec<(&str, &str)> = event.extra_fields().map(|(k, v)| (k, v.get())).collect();
    assert_eq!(
        extra,
        [
            ("region", "\"eu-west\""),
            ("trace", r#"{"spans":[1,2,3],"sampled":true}"#)
        ]
    );
}

#[test]
fn non_ascii_metadata_is_kept_exactly() {
    let body = fixture("events/non_ascii_metadata.json");
    let event = one(&body);
    let metadata: serde_json::Value =
        serde_json::from_str(event.message().unwrap().metadata.as_ref().unwrap().get()).unwrap();
    assert_eq!(metadata["note"], "Grüße aus Köln — 東京 📱");
    assert_eq!(metadata["quote"], "she said \"hi\"\n");
}

#[test]
fn batches_keep_order_and_empty_batches_are_empty() {
    let body = fixture("events/batch_500.json");
    let events = parse_unverified(&body).unwrap();
    assert_eq!(events.len(), 500);
    let expected: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
    for (event, want) in events.iter().zip(&expected) {
        assert_eq!(event.event_id(), want["eventId"]);
    }
    assert!(parse_unverified(b"[]").unwrap().is_empty());
    assert!(parse_unverified(b" \n[ ]\n").unwrap().is_empty());
}

#[test]
fn every_fixture_round_trips() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/events");
    let mut count = 0;
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let body = fs::read(&path).unwrap();
        let events = parse_unverified(&body).unwrap();
        let serialized = serde_json::to_vec(&events).unwrap();
        let again = parse_unverified(&serialized).unwrap();
        assert_eq!(events, again, "{}", path.display());
        // Nothing lost: the same JSON value, whatever the key order.
        let original: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let original = if original.is_array() {
            original
        } else {
            serde_json::Value::Array(vec![original])
        };
        assert_eq!(
            original,
            serde_json::from_slice::<serde_json::Value>(&serialized).unwrap(),
            "{}",
            path.display()
        );
        count += 1;
    }
    assert_eq!(count, 12);
}

#[test]
fn owned_events_outlive_their_body() {
    let owned: Vec<Event<'static>> = {
        let body = fixture("events/message_inbound.json");
        parse_unverified(&body)
            .unwrap()
            .into_iter()
            .map(Event::into_owned)
            .collect()
    };
    assert_eq!(
        owned[0].message().unwrap().body.as_deref(),
        Some("Yes please, book me in for Tuesday")
    );
    assert_eq!(
        owned[0].message_id(),
        Some("5f8c3f0e-8a3b-4f43-9d2b-2b7f1c0e6a11")
    );
}

#[test]
fn escaped_envelope_strings_are_unescaped() {
    let body = br#"{"eventId":"e\u0031","name":"profile.update","payload":{"id":"p\"1"}}"#;
    let event = one(body);
    assert_eq!((event.event_id(), event.entity_id()), ("e1", Some("p\"1")));
}

#[test]
fn negative_cases_say_where() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "not_json.txt",
            "$",
            "the body is not JSON (expected ident at line 1 column 2): expected an event object or an array of events",
        ),
        ("not_an_envelope.json", "$", "missing field `eventId`"),
        ("missing_event_id.json", "$", "missing field `eventId`"),
        (
            "bare_string.json",
            "$",
            "expected an event object or an array of events, not a string",
        ),
        (
            "number.json",
            "$",
            "expected an event object or an array of events, not a number",
        ),
        (
            "nested_10000.json",
            "[0]",
            "invalid type: sequence, expected a Comapi event envelope (a JSON object)",
        ),
    ];
    for (file, want_path, want_message) in cases {
        let body = fixture(&format!("invalid/{file}"));
        let (path, message) = invalid(&body);
        assert_eq!(
            (path.as_str(), message.as_str()),
            (*want_path, *want_message),
            "{file}"
        );
    }
    let error = parse_unverified(&fixture("invalid/missing_event_id.json")).unwrap_err();
    assert_eq!(error.status(), http::StatusCode::BAD_REQUEST);
    assert_eq!(
        error.to_string(),
        "invalid event body at $: missing field `eventId`"
    );
}

/// Signed bodies whose fields drifted from the documented types parse whole; only a
/// typed read of the drifted part fails, and it says where.
#[test]
fn drifted_shapes_parse_and_fail_only_on_demand() {
    let deep = fixture("drifted/wrong_type_deep.json");
    let event = one(&deep);
    assert_eq!(
        event.message_id(),
        Some("e9f154c8-4011-493f-bb73-09cfcf8a1411")
    );
    assert_eq!(
        event.message().unwrap_err().to_string(),
        "invalid event body at payload.details.channelStatus.sms.status: invalid type: integer `42`, expected a string"
    );

    let batch = fixture("drifted/batch_one_bad.json");
    let events = parse_unverified(&batch).unwrap();
    assert_eq!(events.len(), 5);
    assert_eq!(events[3].entity_id(), None, "a numeric id is no id");
    assert!(events[3].message().is_err());
    assert!(events[2].message().is_ok());

    let drifted = fixture("drifted/batch_drifted.json");
    let events = parse_unverified(&drifted).unwrap();
    assert_eq!(events.len(), 6);
    assert_eq!(
        events[0].message().unwrap_err().to_string(),
        "invalid event body at payload.details.channel: invalid type: integer `7`, expected a string"
    );
    assert_eq!(events[1].revision(), None, "5.5 is no revision");
    assert_eq!(events[1].field_json("revision").unwrap().get(), "5.5");
    assert_eq!(events[2].api_space_id(), None);
    assert_eq!(events[2].field_json("apiSpaceId").unwrap().get(), "123");
    assert_eq!(events[3].etag(), None);
    assert_eq!(events[4].entity_id(), None);
    assert_eq!(
        events[4].message().unwrap_err().to_string(),
        "invalid event body at payload: expected an object"
    );
    assert!(events[5].payload_json().is_none());
    assert_eq!(
        events[5].message().unwrap_err().to_string(),
        "invalid event body at payload: missing field `payload`"
    );
    // Every drifted event serializes back to what it was.
    for event in &events {
        let again = serde_json::to_vec(event).unwrap();
        assert_eq!(&one(&again), event);
    }
}

/// The shapes seen drifting in the wild: a numeric text, a string revision and
/// account, a numeric timestamp, an inbound payload naming its id `messageId`.
#[test]
fn lenient_envelope_fields() {
    let event = one(
        br#"{"eventId":"e","name":"message.inbound","accountId":"1234","revision":"5",
             "timestamp":1504171574,"payload":{"messageId":"m-9","body":42}}"#,
    );
    assert_eq!(event.account_id(), Some(1234));
    assert_eq!(event.revision(), Some(5));
    assert_eq!((event.timestamp(), event.time()), (None, None));
    assert_eq!(event.field_json("timestamp").unwrap().get(), "1504171574");
    assert_eq!(event.message_id(), Some("m-9"));
    assert_eq!(
        event.message().unwrap_err().to_string(),
        "invalid event body at payload.body: invalid type: integer `42`, expected a string"
    );
    let inbound = one(br#"{"eventId":"e","name":"message.inbound","payload":{"messageId":"m-9"}}"#);
    assert_eq!(inbound.message().unwrap().id, "m-9");
    for (revision, want) in [
        ("\"-1\"", None),
        ("-1", None),
        ("\"\"", None),
        ("\"+5\"", None),
        ("\" 5\"", None),
        ("null", None),
        ("18446744073709551615", Some(u64::MAX)),
        ("\"18446744073709551616\"", None),
    ] {
        let body = format!(r#"{{"eventId":"e","name":"x","revision":{revision}}}"#);
        assert_eq!(one(body.as_bytes()).revision(), want, "{revision}");
    }
    // A field sent twice keeps its first value; the second is kept too.
    let twice = one(br#"{"eventId":"a","eventId":"b","name":"x","revision":1,"revision":2}"#);
    assert_eq!((twice.event_id(), twice.revision()), ("a", Some(1)));
    let extra: Vec<(&str, &str)> = twice.extra_fields().map(|(k, v)| (k, v.get())).collect();
    assert_eq!(extra, [("eventId", "\"b\""), ("revision", "2")]);
}

#[test]
fn more_malformed_envelopes() {
    let cases: &[(&[u8], &str, &str)] = &[
        (
            b"",
            "$",
            "the body is empty: expected an event object or an array of events",
        ),
        (
            b"null",
            "$",
            "expected an event object or an array of events, not null",
        ),
        (b"{", "$", "EOF while parsing an object"),
        (
            br#"{"eventId":1,"name":"x","payload":{}}"#,
            "eventId",
            "invalid type: integer `1`, expected a string",
        ),
        (
            br#"{"name":"x","eventId":null}"#,
            "eventId",
            "invalid type: null, expected a string",
        ),
        (br#"{"eventId":"a"}"#, "$", "missing field `name`"),
        (
            br#"[{"eventId":"a","name":"x"},{"eventId":"b","name":["x"]}]"#,
            "[1].name",
            "invalid type: sequence, expected a string",
        ),
        (
            br#"{"eventId":"a","name":"x","payload":{}} trailing"#,
            "$",
            "trailing characters",
        ),
        (
            br#"[{"eventId":"a","name":"x","payload":{}}, 7]"#,
            "[1]",
            "invalid type: integer `7`, expected a Comapi event envelope (a JSON object)",
        ),
    ];
    for (body, want_path, want_message) in cases {
        let (path, message) = invalid(body);
        assert_eq!(
            (path.as_str(), message.as_str()),
            (*want_path, *want_message),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
}

#[test]
fn deep_nesting_never_overflows_the_stack() {
    let depth = 10_000;
    let deep = format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth));
    // In an unknown event's payload it is kept raw, unparsed.
    let unknown = format!(r#"{{"eventId":"e","name":"x.y","payload":{deep}}}"#);
    assert_eq!(
        one(unknown.as_bytes()).payload_json().unwrap().get().len(),
        deep.len()
    );
    // Inside a typed payload, free-form JSON such as `metadata` is kept raw too.
    let typed = format!(
        r#"{{"eventId":"e","name":"message.sent","payload":{{"id":"m","metadata":{deep}}}}}"#
    );
    let event = one(typed.as_bytes());
    assert_eq!(
        event
            .message()
            .unwrap()
            .metadata
            .as_ref()
            .unwrap()
            .get()
            .len(),
        deep.len()
    );
    // Where a typed field is expected, the nesting is a type error at its first
    // level, when the typed payload is asked for.
    let typed = format!(r#"{{"eventId":"e","name":"message.sent","payload":{{"id":{deep}}}}}"#);
    assert_eq!(
        one(typed.as_bytes()).message().unwrap_err(),
        Error::InvalidEvent {
            path: "payload.id".to_owned(),
            message: "invalid type: map, expected a string".to_owned()
        }
    );
    let array = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let (path, _) = invalid(array.as_bytes());
    assert_eq!(path, "[0]");
}

#[test]
fn verify_events_verifies_before_parsing() {
    let verifier = Verifier::new("a-comapi-webhook-secret-of-36-chars!").unwrap();
    let good = fixture("events/batch_500.json");
    let mut headers = http::HeaderMap::new();
    headers.insert(
        SIGNATURE_HEADER,
        verifier.sign(&good).to_string().parse().unwrap(),
    );
    assert_eq!(verifier.verify_events(&headers, &good).unwrap().len(), 500);

    // Not JSON and not signed right: the signature is what fails, with a 401.
    let junk = b"not json";
    let error = verifier.verify_events(&headers, junk).unwrap_err();
    assert_eq!(error.status(), http::StatusCode::UNAUTHORIZED);
    assert_eq!(error, Error::SignatureMismatch);
    assert_eq!(
        verifier
            .verify_events(&http::HeaderMap::new(), junk)
            .unwrap_err(),
        Error::MissingSignature
    );

    // Signed right but not JSON: a 400.
    headers.insert(
        SIGNATURE_HEADER,
        verifier.sign(junk).to_string().parse().unwrap(),
    );
    let error = verifier.verify_events(&headers, junk).unwrap_err();
    assert_eq!(error.status(), http::StatusCode::BAD_REQUEST);
}
