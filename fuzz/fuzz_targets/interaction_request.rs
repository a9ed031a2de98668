//! Fuzz target `interaction_request`: a request to `/slack/interactions` as
//! the endpoint screens it before Redis and the broker (size, signature,
//! form body), with a fixed signing secret and clock. The first byte picks
//! the kind of request:
//!
//! - `R` + `Name: value` header lines, an empty line, the body: a request
//!   as anyone may send it. It is taken exactly when an independent check
//!   (HMAC-SHA256 over `v0:{timestamp}:{body}`, the timestamp within five
//!   minutes) says Slack signed it;
//! - `S` + a signed offset in seconds from the clock, a line break, the
//!   body: signed correctly by the target. Within five minutes it is never
//!   refused; the same request with one signature bit flipped, or outside the
//!   five minutes, always is;
//! - `C` + bytes read as a click's shape (kind, user, actions, values,
//!   `response_url`, other form fields), which the target writes as Slack
//!   does and signs: the click read back names exactly that user and incident.
//!
//! The secret never reaches a panic message: only verdicts are printed.
#![no_main]

use alert_router::config::Secret;
use alert_router::deliver::slack::message::{ACK_ACTION_ID, AckButtonValue};
use alert_router::interactions::{
    MAX_BODY_BYTES, MAX_SKEW_SECS, Screened, SignatureError, screen_request,
};
use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::arbitrary::{self, Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};
use sha2::Sha256;

/// The worker's clock during the run (Unix seconds).
const NOW: i64 = 1_700_000_000;
const TIMESTAMP: &str = "x-slack-request-timestamp";
const SIGNATURE: &str = "x-slack-signature";

fn secret() -> Secret {
    // Built at run time, like every secret in the tree's tests.
    Secret::new(format!("fuzz-{}-signing-secret", "interactions"))
}

/// Slack's signature, computed here without the worker's code.
fn expected_mac(timestamp: &str, body: &[u8]) -> Vec<u8> {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret().expose().as_bytes()).expect("any key length");
    mac.update(format!("v0:{timestamp}:").as_bytes());
    mac.update(body);
    mac.finalize().into_bytes().to_vec()
}

fn signed_headers(timestamp: &str, body: &[u8]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(TIMESTAMP, HeaderValue::from_str(timestamp).expect("digits"));
    let signature = format!("v0={}", hex::encode(expected_mac(timestamp, body)));
    headers.insert(SIGNATURE, HeaderValue::from_str(&signature).expect("hex"));
    headers
}

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((b'R', rest)) => anyone(rest),
        Some((b'S', rest)) => signed(rest),
        Some((b'C', rest)) => click(rest),
        _ => {}
    }
});

fn anyone(data: &[u8]) {
    let (head, body) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(at) => (&data[..at], &data[at + 2..]),
        None => (data, &[][..]),
    };
    let mut headers = HeaderMap::new();
    for line in head.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    let verdict = screen_request(&secret(), &headers, body, NOW);

    let declared_too_large = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n > MAX_BODY_BYTES);
    if declared_too_large || body.len() > MAX_BODY_BYTES {
        assert_eq!(verdict, Screened::TooLarge);
        return;
    }
    // The first value of each header is the one read, as `HeaderMap::get` does.
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
    };
    let signed_by_slack = match (text(TIMESTAMP), text(SIGNATURE)) {
        (Some(timestamp), Some(signature)) => {
            let fresh = timestamp
                .parse::<i64>()
                .is_ok_and(|at| NOW.saturating_sub(at).saturating_abs() <= MAX_SKEW_SECS);
            let given = signature
                .strip_prefix("v0=")
                .filter(|hex| hex.len() == 64)
                .and_then(|hex| hex::decode(hex).ok());
            fresh && given.is_some_and(|given| given == expected_mac(timestamp, body))
        }
        _ => false,
    };
    let refused = matches!(verdict, Screened::Refused(_));
    assert_eq!(
        refused, !signed_by_slack,
        "taken exactly when Slack signed it; the verdict was {verdict:?}"
    );
}

fn signed(data: &[u8]) {
    let (offset, body) = match data.iter().position(|b| *b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let Some(offset) = std::str::from_utf8(offset)
        .ok()
        .and_then(|o| o.trim().parse::<i64>().ok())
        .filter(|o| o.abs() <= 100_000)
    else {
        return;
    };
    if body.len() > MAX_BODY_BYTES {
        return;
    }
    let timestamp = (NOW + offset).to_string();
    let headers = signed_headers(&timestamp, body);
    let verdict = screen_request(&secret(), &headers, body, NOW);
    if offset.abs() > MAX_SKEW_SECS {
        assert_eq!(
            verdict,
            Screened::Refused(SignatureError::Stale {
                skew_secs: offset.abs()
            }),
            "a request signed {offset} s from now is stale"
        );
        return;
    }
    assert!(
        !matches!(verdict, Screened::Refused(_) | Screened::TooLarge),
        "a request Slack signed is taken; the verdict was {verdict:?}"
    );
    // One bit of the signature flipped, at a place the body picks.
    let mut forged = headers.clone();
    let signature = headers[SIGNATURE].to_str().expect("ASCII").to_string();
    let digits = signature.len() - 3;
    let at = 3 + body.iter().map(|b| *b as usize).sum::<usize>() % digits;
    let mut chars: Vec<char> = signature.chars().collect();
    let digit = chars[at].to_digit(16).expect("a hex digit") ^ (1 << (at % 4));
    chars[at] = char::from_digit(digit, 16).expect("a hex digit");
    let flipped: String = chars.into_iter().collect();
    forged.insert(SIGNATURE, HeaderValue::from_str(&flipped).expect("hex"));
    assert_eq!(
        screen_request(&secret(), &forged, body, NOW),
        Screened::Refused(SignatureError::Mismatch),
        "a signature with one bit flipped is refused"
    );
}

/// The shape of an interaction payload.
#[derive(Arbitrary, Debug)]
struct Shape {
    block_actions: bool,
    other_kind: Option<String>,
    user: UserShape,
    actions: Vec<ActionShape>,
    response_url: Option<String>,
    /// Other form fields, after `payload` (as Slack sends none, any is ignored).
    extra_fields: Vec<(String, String)>,
}

#[derive(Arbitrary, Debug)]
enum UserShape {
    Absent,
    Null,
    /// Without an id, the payload is not a click: some other interaction.
    WithoutId,
    WithId {
        id: String,
        name: Option<String>,
    },
}

#[derive(Arbitrary, Debug)]
struct ActionShape {
    ours: bool,
    other_action_id: Option<String>,
    value: ValueShape,
}

#[derive(Arbitrary, Debug)]
enum ValueShape {
    Absent,
    /// `f`: when the incident began; absent on buttons from before it was added.
    Button { w: String, k: String, f: Option<u64> },
    Raw(String),
}

fn click(data: &[u8]) {
    let Ok(shape) = Shape::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let mut payload = json!({
        "type": if shape.block_actions { "block_actions" } else { shape.other_kind.as_deref().unwrap_or("view_submission") },
        "actions": shape.actions.iter().map(|a| {
            let mut action = json!({});
            if a.ours {
                action["action_id"] = json!(ACK_ACTION_ID);
            } else if let Some(id) = &a.other_action_id {
                action["action_id"] = json!(id);
            }
            match &a.value {
                ValueShape::Absent => {}
                ValueShape::Button { w, k, f: None } => action["value"] = json!(json!({"w": w, "k": k}).to_string()),
                ValueShape::Button { w, k, f: Some(f) } => action["value"] = json!(json!({"w": w, "k": k, "f": f}).to_string()),
                ValueShape::Raw(raw) => action["value"] = json!(raw),
            }
            action
        }).collect::<Vec<Value>>(),
    });
    match &shape.user {
        UserShape::Absent => {}
        UserShape::Null => payload["user"] = Value::Null,
        UserShape::WithoutId => payload["user"] = json!({"name": "ana"}),
        UserShape::WithId { id, name } => payload["user"] = json!({"id": id, "name": name}),
    }
    if let Some(url) = &shape.response_url {
        payload["response_url"] = json!(url);
    }
    let mut form = url::form_urlencoded::Serializer::new(String::new());
    form.append_pair("payload", &payload.to_string());
    for (name, value) in &shape.extra_fields {
        form.append_pair(name, value);
    }
    let body = form.finish().into_bytes();
    if body.len() > MAX_BODY_BYTES {
        return;
    }
    let verdict = screen_request(
        &secret(),
        &signed_headers(&NOW.to_string(), &body),
        &body,
        NOW,
    );

    let kind_is_ours = payload["type"] == "block_actions";
    let our_action = shape
        .actions
        .iter()
        .find(|a| a.ours || a.other_action_id.as_deref() == Some(ACK_ACTION_ID));
    let expected = match (kind_is_ours, our_action, &shape.user) {
        (_, _, UserShape::WithoutId) => Screened::NotOurs,
        (false, _, _) | (_, None, _) => Screened::NotOurs,
        (true, Some(_), UserShape::Absent | UserShape::Null) => Screened::BadRequest,
        (true, Some(_), UserShape::WithId { id, .. }) if id.is_empty() => Screened::BadRequest,
        (true, Some(action), UserShape::WithId { id, .. }) => Screened::Click {
            user: id.clone(),
            incident: match &action.value {
                ValueShape::Button { w, k, f } if !w.is_empty() && !k.is_empty() => {
                    Some(AckButtonValue {
                        w: w.clone(),
                        k: k.clone(),
                        f: *f,
                    })
                }
                ValueShape::Raw(raw) => serde_json::from_str::<AckButtonValue>(raw)
                    .ok()
                    .filter(|v| !v.w.is_empty() && !v.k.is_empty()),
                _ => None,
            },
            has_response_url: shape.response_url.is_some(),
        },
    };
    assert_eq!(verdict, expected, "the click reads back as it was written");
}
