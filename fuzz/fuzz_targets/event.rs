//! Fuzz target `event`: a raw message body decoded and validated exactly as
//! the worker does on delivery (`worker::process`), with what it promises:
//! an accepted event is valid and survives a round trip, a refused one has a
//! dead-letter reason, a size verdict that matches its length, and a detail
//! that can be redacted.
#![no_main]

use alert_router::event::{DEFAULT_MAX_BODY_BYTES, Event, EventError, sniff_id};
use alert_router::redact::Addresses;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    // What the worker does with a delivery's body.
    let decoded = Event::decode(body, DEFAULT_MAX_BODY_BYTES);
    let event_id = match &decoded {
        Ok(event) => event.id.clone(),
        Err(_) => sniff_id(body).unwrap_or_else(|| "?".into()),
    };
    assert!(
        event_id.chars().count() <= 200,
        "a logged id is cut to 200 characters"
    );

    match decoded {
        Ok(event) => accepted(body, &event),
        Err(error) => refused(body, &error),
    }

    // The size limit is checked before anything else.
    if !body.is_empty() {
        assert!(
            matches!(
                Event::decode(body, body.len() - 1),
                Err(EventError::TooLarge { .. })
            ),
            "a body one byte over the limit is refused as too large"
        );
    }
});

fn accepted(body: &[u8], event: &Event) {
    assert_eq!(event.validate(), Ok(()), "a decoded event is valid");
    // The same event, written out and read back, is the same event: what
    // the worker republishes (retries, escalations) decodes as it was.
    let written = serde_json::to_vec(event).expect("an event serialises");
    let again = Event::decode(&written, usize::MAX).expect("a written event decodes again");
    assert_eq!(&again, event, "an event survives a round trip");
    // Its id is what the logs and the dead-letter tools sniff from the body.
    assert_eq!(sniff_id(body).as_deref(), Some(event.id.as_str()));
    let key = event.incident_key();
    assert!(!key.is_empty(), "every event has an incident");
    assert!(
        key.chars().count() <= 200,
        "an incident key fits in a dedup_key (200 characters)"
    );
    for target in event.own_targets() {
        if let Some(value) = target.value() {
            assert!(!value.trim().is_empty(), "an event's target names someone");
        }
    }
    // Every label a matcher can ask for has a value (empty when missing).
    for name in ["type", "severity", "source", "workspace", "level", "team"] {
        let _ = event.label(name);
    }
    let _ = event.incident_state();
}

fn refused(body: &[u8], error: &EventError) {
    assert!(
        EventError::REASON_CODES.contains(&error.reason_code()),
        "a refused body gets a known dead-letter reason"
    );
    let too_large = matches!(error, EventError::TooLarge { .. });
    assert_eq!(
        too_large,
        body.len() > DEFAULT_MAX_BODY_BYTES,
        "too large exactly when over the limit"
    );
    let detail = error.to_string();
    assert!(!detail.is_empty(), "the dead-letter detail says something");
    // The detail goes to logs and headers with its addresses redacted.
    let shown = Addresses::new(false).text(&detail);
    if !detail.contains('@') {
        assert_eq!(shown, detail, "text without an address is shown as it is");
    }
    if let EventError::InvalidField { field, .. } = error {
        assert!(!field.is_empty(), "an invalid field is named");
    }
}
