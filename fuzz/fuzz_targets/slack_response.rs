//! Fuzz target `slack_response`: a Slack Web API answer (status, headers,
//! body) classified as the client does, then the delivery policy's next
//! step for it, for every method and kind of target.
//!
//! The input reads like an HTTP response: the status code on the first
//! line, `Name: value` header lines, an empty line, the body. What it checks:
//! - only `{"ok":true}` bodies with a status that is neither 429 nor 5xx succeed;
//! - 429 and 5xx are transient whatever the body; a 429 always carries a
//!   wait, and no wait is absurd (at most an hour and its margin);
//! - every failure has a code: Slack's `error` when the body gives one;
//! - the policy never repeats a recovery it already tried, so that with
//!   the same answer every time each path ends within a few steps; a direct
//!   message never goes to a shared channel; "Slack is unavailable, and it
//!   may pass" only for answers that may pass.
#![no_main]

use std::time::Duration;

use alert_router::deliver::policy::{Method, Step, TargetKind, Tried, next_step};
use alert_router::deliver::slack::client::{Posted, classify_response};
use alert_router::deliver::slack::{SlackError, SlackFailure, honoured_retry_after};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const METHODS: [Method; 7] = [
    Method::PostMessage,
    Method::Join,
    Method::Open,
    Method::List,
    Method::History,
    Method::LookupByEmail,
    Method::Update,
];

fuzz_target!(|data: &[u8]| {
    let Some((status, headers, body)) = read_answer(data) else {
        return;
    };
    for method in METHODS {
        let answer = classify_response::<Value>(method.name(), status, &headers, body);
        check_answer(status, &headers, body, &answer);
        if method == Method::PostMessage {
            check_post_reading(status, &headers, body, &answer);
        }
        let Err(error) = answer else { continue };
        assert_eq!(error.method, method.name());
        for kind in [TargetKind::Channel, TargetKind::Person] {
            // What the delivery knows before its first post, in every combination.
            for facts in 0..8u8 {
                let tried = Tried {
                    have_channel_id: facts & 1 != 0,
                    resolved_from_name: facts & 2 != 0,
                    at_default_channel: facts & 4 != 0,
                    ..Tried::default()
                };
                follow_policy(method, kind, &error, tried);
            }
        }
    }
});

/// The post's own reading ([`Posted`], which skips Slack's echo of the
/// message) accepts only what the whole reading accepts, and finds the
/// message where the whole reading does.
fn check_post_reading(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    whole: &Result<Value, SlackError>,
) {
    let Ok(posted) = classify_response::<Posted>("chat.postMessage", status, headers, body) else {
        return;
    };
    let Ok(whole) = whole else {
        panic!("the post's reading accepted what the whole reading refused: {whole:?}");
    };
    assert_eq!(
        posted.channel.as_deref(),
        whole.get("channel").and_then(Value::as_str)
    );
    assert_eq!(posted.ts.as_deref(), whole.get("ts").and_then(Value::as_str));
    let echo = whole.get("message").and_then(Value::as_object);
    assert_eq!(
        posted.echoed_top_level(),
        echo.is_some_and(|m| m.get("thread_ts").is_none_or(Value::is_null))
    );
}

/// `status\nName: value\n…\n\nbody`; `None` for a status line that is not one.
fn read_answer(data: &[u8]) -> Option<(StatusCode, HeaderMap, &[u8])> {
    let (head, body) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(at) => (&data[..at], &data[at + 2..]),
        None => (data, &[][..]),
    };
    let mut lines = head.split(|b| *b == b'\n');
    let status_line = std::str::from_utf8(lines.next()?).ok()?;
    let status = StatusCode::from_u16(status_line.trim().parse().ok()?).ok()?;
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        // Lines that are not a valid header are what no HTTP client hands over.
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    Some((status, headers, body))
}

fn check_answer(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    answer: &Result<Value, SlackError>,
) {
    let longest_wait = honoured_retry_after(Duration::from_secs(3600));
    let json: Option<Value> = serde_json::from_slice(body).ok();
    let ok_body = json
        .as_ref()
        .and_then(|v| v.get("ok"))
        .and_then(Value::as_bool)
        == Some(true);
    // A proxy's 408 means Slack never had the request: decided by the
    // status, like a 5xx.
    let head_decides = status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT;
    let error = match answer {
        Ok(value) => {
            assert!(!head_decides, "a {status} is never a success");
            assert!(ok_body, "only an ok:true body is a success");
            assert_eq!(Some(value), json.as_ref());
            return;
        }
        Err(error) => error,
    };
    assert!(!error.code.is_empty(), "every failure has a code");
    assert_eq!(
        error.retry_after().is_some(),
        matches!(
            error.failure,
            SlackFailure::Transient {
                retry_after: Some(_)
            }
        ),
    );
    if let Some(wait) = error.retry_after() {
        assert!(wait <= longest_wait, "a wait of {wait:?} is absurd");
        assert!(wait >= Duration::from_millis(50), "a wait has its margin");
        assert!(
            headers.contains_key(http::header::RETRY_AFTER)
                || status == StatusCode::TOO_MANY_REQUESTS,
            "a wait comes from Retry-After or a 429"
        );
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        assert_eq!(error.code, "ratelimited");
        assert!(
            error.retry_after().is_some(),
            "a 429 always says how long to wait"
        );
    } else if status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT {
        assert!(error.is_transient(), "a {status} may pass");
        assert_eq!(error.code, format!("http_{}", status.as_u16()));
    } else {
        assert!(!ok_body, "an ok:true body with a {status} is a success");
        match json.as_ref() {
            Some(value) => {
                let expected = value
                    .get("error")
                    .and_then(Value::as_str)
                    .filter(|code| !code.is_empty())
                    .unwrap_or("unknown_error");
                assert_eq!(
                    error.code, expected,
                    "the code is Slack's own, when it gives one"
                );
            }
            None if status.is_success() => {
                assert_eq!(error.code, "invalid_response");
                assert!(error.is_transient(), "an unreadable 2xx answer may pass");
            }
            None => assert_eq!(error.code, format!("http_{}", status.as_u16())),
        }
    }
}

/// Follows the policy with the same answer every time, taking each
/// recovery it asks for, until it gives a final step.
fn follow_policy(method: Method, kind: TargetKind, error: &SlackError, mut tried: Tried) {
    let longest_wait = honoured_retry_after(Duration::from_secs(3600));
    // Seven recoveries exist, each tried at most once.
    for _ in 0..8 {
        let step = next_step(method, kind, error, tried);
        let flag = match step {
            Step::RefreshToken => &mut tried.refreshed_token,
            Step::JoinAndPost => {
                assert!(tried.have_channel_id, "joining needs the channel's id");
                assert_eq!((method, kind), (Method::PostMessage, TargetKind::Channel));
                &mut tried.joined
            }
            Step::ResolveAgain => {
                assert!(
                    tried.resolved_from_name,
                    "only a name can be resolved again"
                );
                &mut tried.resolved_again
            }
            Step::PostToDefaultChannel => {
                assert!(
                    !(method == Method::PostMessage && kind == TargetKind::Person),
                    "a direct message never goes to a shared channel"
                );
                &mut tried.at_default_channel
            }
            Step::PostPlainText => &mut tried.plain_text,
            Step::PostWithoutMetadata => &mut tried.without_metadata,
            Step::PostWithoutThread => &mut tried.without_thread,
            Step::Wait(wait) => {
                assert!(
                    matches!(error.code.as_str(), "ratelimited" | "rate_limited"),
                    "only a rate limit is waited out in place"
                );
                assert!(wait <= longest_wait, "a wait of {wait:?} is absurd");
                return;
            }
            Step::SlackUnavailable { transient } => {
                if transient {
                    assert!(
                        error.is_transient() || error.failure == SlackFailure::TokenExpired,
                        "{} cannot pass by itself",
                        error.code
                    );
                } else {
                    assert!(!error.is_transient(), "{} may pass by itself", error.code);
                }
                return;
            }
            Step::EmailPerson | Step::PostByName | Step::PostWithoutCheck => return,
        };
        assert!(
            !*flag,
            "{step:?} asked for again after {error} ({method:?}, {kind:?})"
        );
        *flag = true;
    }
    panic!("the policy did not end within 8 steps for {error} ({method:?}, {kind:?})");
}
