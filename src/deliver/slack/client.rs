//! Slack Web API client: one HTTP call, its response classified, retried while transient.
//!
//! Slack reports most errors as HTTP 200 with `{"ok":false,"error":"…"}`, so
//! success is decided by the body, not the status. Every failure is sorted
//! into a [`SlackFailure`] class that tells the caller what to do next.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use serde::Deserialize;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde_json::Value;

use crate::config::{Secret, SlackSettings};

/// What kind of failure a Slack error is, which decides the next step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlackFailure {
    /// Try again later: network, timeouts, 5xx, 429, `internal_error`, ….
    Transient { retry_after: Option<Duration> },
    /// The rotating access token expired: refresh it and try again.
    TokenExpired,
    /// The workspace token cannot be used (`invalid_auth`, `token_revoked`,
    /// `missing_scope`, …): Slack is unavailable for this workspace.
    Workspace,
    /// The destination is wrong (`channel_not_found`, `not_in_channel`,
    /// `is_archived`, `users_not_found`, …): change the route.
    Destination,
    /// Slack refused the message itself (`invalid_blocks`, `no_text`, …).
    Payload,
    /// Anything else: permanent, not retried.
    Other,
}

/// A failed Slack call. Carries no token: safe to log and to put in headers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{method}: {code}{}", detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
pub struct SlackError {
    /// The Web API method called, e.g. `chat.postMessage`.
    pub method: &'static str,
    /// Slack's error code, or ours for transport problems (`http_503`, `timeout`).
    pub code: String,
    /// Extra context, e.g. the scope `missing_scope` needs.
    pub detail: Option<String>,
    pub failure: SlackFailure,
}

impl SlackError {
    pub(crate) fn new(
        method: &'static str,
        code: impl Into<String>,
        failure: SlackFailure,
    ) -> SlackError {
        SlackError {
            method,
            code: code.into(),
            detail: None,
            failure,
        }
    }

    pub(crate) fn with_detail(mut self, detail: String) -> SlackError {
        self.detail = Some(detail);
        self
    }

    pub fn is_transient(&self) -> bool {
        matches!(self.failure, SlackFailure::Transient { .. })
    }

    /// Whether the call may have been done although it failed: the request
    /// left and its answer was lost (a timeout, a dropped connection), or
    /// Slack answered a 5xx, `internal_error` or `fatal_error` ("it's
    /// possible some aspect of the operation succeeded"). Calling again
    /// blindly could do it twice.
    pub fn may_have_landed(&self) -> bool {
        matches!(
            self.code.as_str(),
            "timeout" | "network_error" | "fatal_error" | "internal_error"
        ) || self.code.starts_with("http_5")
    }

    /// Slack's rate limit: HTTP 429 (`ratelimited`), or `rate_limited` in
    /// an HTTP 200 body, which `chat.postMessage` also documents.
    pub fn is_rate_limited(&self) -> bool {
        self.code == "ratelimited" || self.code == "rate_limited"
    }

    /// How long to wait before calling again, if Slack said (a 429's
    /// `Retry-After`, already padded by [`honoured_retry_after`]).
    pub fn retry_after(&self) -> Option<Duration> {
        match self.failure {
            SlackFailure::Transient { retry_after } => retry_after,
            _ => None,
        }
    }
}

/// The wait that honours a `Retry-After` of `asked`: the asked time plus
/// max(50 ms, 2 %).
///
/// Slack counts the pause on its own clock from when it answered; the worker
/// counts from when the answer arrived, through Redis's clock and its own, in
/// whole milliseconds. Calling again exactly on time can land a few
/// milliseconds early as Slack sees it, which earns another 429.
pub fn honoured_retry_after(asked: Duration) -> Duration {
    asked + (asked / 50).max(RETRY_AFTER_MIN_MARGIN)
}

/// The smallest margin [`honoured_retry_after`] adds.
pub const RETRY_AFTER_MIN_MARGIN: Duration = Duration::from_millis(50);

/// Sorts a Slack `error` code into its class.
pub fn classify(code: &str) -> SlackFailure {
    match code {
        "ratelimited"
        | "rate_limited"
        | "update_failed"
        | "external_channel_migrating"
        // "until migration is complete"
        | "org_login_required"
        | "internal_error"
        | "fatal_error"
        | "service_unavailable"
        | "request_timeout"
        | "team_added_to_org" => SlackFailure::Transient { retry_after: None },
        "token_expired" => SlackFailure::TokenExpired,
        "invalid_auth"
        | "not_authed"
        | "account_inactive"
        | "token_revoked"
        | "team_access_not_granted"
        | "missing_scope"
        | "not_allowed_token_type"
        | "no_permission"
        | "ekm_access_denied"
        | "enterprise_is_restricted"
        // "Two factor setup is required": of the token's user, not of a channel.
        | "two_factor_setup_required"
        | "access_denied"
        | "team_not_found" => SlackFailure::Workspace,
        "channel_not_found"
        | "not_in_channel"
        | "is_archived"
        | "messages_tab_disabled"
        | "users_not_found"
        | "user_not_found"
        | "user_disabled"
        | "cannot_dm_bot"
        | "method_not_supported_for_channel_type" => SlackFailure::Destination,
        code if code.starts_with("restricted_action") => SlackFailure::Destination,
        "no_text"
        | "invalid_blocks"
        | "invalid_blocks_format"
        | "msg_blocks_too_long"
        | "too_many_attachments"
        | "invalid_arguments"
        | "msg_too_long"
        | "invalid_metadata_format"
        | "invalid_metadata_schema"
        | "metadata_too_large"
        | "metadata_must_be_sent_from_app"
        | "invalid_attachments"
        | "attachment_payload_limit_exceeded" => SlackFailure::Payload,
        _ => SlackFailure::Other,
    }
}

/// A request body: write methods take JSON, some methods only forms.
pub enum Body<'a> {
    Json(&'a Value),
    /// JSON already serialised (a message, rendered once for all its attempts).
    JsonBytes(&'a [u8]),
    Form(&'a [(&'a str, &'a str)]),
}

/// A thin, cloneable client for the Web API.
#[derive(Clone)]
pub struct SlackClient {
    http: reqwest::Client,
    api_url: String,
    /// `api_url` parsed once; each call appends its method (`None`: not a
    /// valid URL, and every call fails with a transport error saying so).
    api_base: Option<reqwest::Url>,
    max_attempts: u32,
    retry_base_delay: Duration,
    retry_budget: Duration,
}

/// A Web API answer as a caller reads it: the whole document ([`Value`]), or
/// only the fields it uses ([`Posted`]), with Slack's verdict in `ok`,
/// `error` and (for `missing_scope`) `needed`.
pub trait Answer: DeserializeOwned {
    fn ok(&self) -> bool;
    fn error(&self) -> Option<&str>;
    fn needed(&self) -> Option<&str>;
}

impl Answer for Value {
    fn ok(&self) -> bool {
        self.get("ok").and_then(Value::as_bool) == Some(true)
    }
    fn error(&self) -> Option<&str> {
        self.get("error").and_then(Value::as_str)
    }
    fn needed(&self) -> Option<&str> {
        self.get("needed").and_then(Value::as_str)
    }
}

/// `chat.postMessage`'s answer as far as the worker reads it: where the
/// message landed. Slack echoes the whole message back (its blocks, the
/// bot's profile, …); that is skipped unread, where building it as a
/// [`Value`] took most of the post's parsing and allocation. Each field is
/// read as [`Value`] would read it (`ok` only when `true`, strings only
/// when strings, the last of repeated keys); an answer that is not a JSON
/// object is no answer.
#[derive(Debug, Default)]
pub struct Posted {
    ok: bool,
    error: Option<String>,
    needed: Option<String>,
    /// The conversation id (a DM posted by user id answers its `D…` id).
    pub channel: Option<String>,
    pub ts: Option<String>,
    /// Slack's echo of the message, when it is an object: whether it has a `thread_ts`.
    echo_in_thread: Option<bool>,
}

impl Posted {
    /// Slack says the message is top-level: its echo has no `thread_ts`
    /// (a reply whose parent is gone can be taken as a channel message).
    pub fn echoed_top_level(&self) -> bool {
        self.echo_in_thread == Some(false)
    }
}

impl<'de> Deserialize<'de> for Posted {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Posted, D::Error> {
        deserializer.deserialize_map(PostedVisitor)
    }
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum PostedField {
    Ok,
    Error,
    Needed,
    Channel,
    Ts,
    Message,
    #[serde(other)]
    Other,
}

struct PostedVisitor;

impl<'de> serde::de::Visitor<'de> for PostedVisitor {
    type Value = Posted;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a Web API answer (a JSON object)")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Posted, A::Error> {
        let string = |value: Value| match value {
            Value::String(s) => Some(s),
            _ => None,
        };
        let mut posted = Posted::default();
        while let Some(field) = map.next_key::<PostedField>()? {
            match field {
                PostedField::Ok => posted.ok = map.next_value::<Value>()? == Value::Bool(true),
                PostedField::Error => posted.error = string(map.next_value()?),
                PostedField::Needed => posted.needed = string(map.next_value()?),
                PostedField::Channel => posted.channel = string(map.next_value()?),
                PostedField::Ts => posted.ts = string(map.next_value()?),
                PostedField::Message => posted.echo_in_thread = map.next_value::<Echo>()?.0,
                PostedField::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(posted)
    }
}

/// The echoed message, read only for whether it has a `thread_ts` (a
/// `null` one counts as none); anything but an object is no echo.
struct Echo(Option<bool>);

impl<'de> Deserialize<'de> for Echo {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Echo, D::Error> {
        deserializer.deserialize_any(EchoVisitor)
    }
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum EchoField {
    ThreadTs,
    #[serde(other)]
    Other,
}

struct EchoVisitor;

impl<'de> serde::de::Visitor<'de> for EchoVisitor {
    type Value = Echo;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Echo, A::Error> {
        let mut in_thread = false;
        while let Some(field) = map.next_key::<EchoField>()? {
            match field {
                EchoField::ThreadTs => in_thread = !map.next_value::<Value>()?.is_null(),
                EchoField::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Echo(Some(in_thread)))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Echo, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Echo(None))
    }

    fn visit_unit<E>(self) -> Result<Echo, E> {
        Ok(Echo(None))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Echo, E> {
        Ok(Echo(None))
    }

    fn visit_i64<E>(self, _: i64) -> Result<Echo, E> {
        Ok(Echo(None))
    }

    fn visit_u64<E>(self, _: u64) -> Result<Echo, E> {
        Ok(Echo(None))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Echo, E> {
        Ok(Echo(None))
    }

    fn visit_str<E>(self, _: &str) -> Result<Echo, E> {
        Ok(Echo(None))
    }
}

impl Answer for Posted {
    fn ok(&self) -> bool {
        self.ok
    }
    fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }
    fn needed(&self) -> Option<&str> {
        self.needed.as_deref()
    }
}

/// Longest `Retry-After` worth waiting for inside one delivery attempt; a
/// longer one sends the event to a broker retry queue instead of holding it.
const MAX_INLINE_RETRY_AFTER: Duration = Duration::from_secs(10);

impl SlackClient {
    pub fn new(settings: &SlackSettings) -> Result<SlackClient, reqwest::Error> {
        let http = reqwest::Client::builder()
            // The Web API answers where it is asked; a redirect would be a
            // misconfigured proxy, and following it would resend the token.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(settings.request_timeout)
            .connect_timeout(settings.request_timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("alert-router/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(SlackClient {
            http,
            api_url: settings.api_url.trim_end_matches('/').to_string(),
            api_base: reqwest::Url::parse(settings.api_url.trim_end_matches('/'))
                .ok()
                .filter(|url| !url.cannot_be_a_base()),
            max_attempts: settings.max_attempts,
            retry_base_delay: settings.retry_base_delay,
            retry_budget: settings.retry_budget,
        })
    }

    /// Calls `method` once, without retries.
    pub async fn call_once(
        &self,
        method: &'static str,
        token: Option<&Secret>,
        body: &Body<'_>,
    ) -> Result<Value, SlackError> {
        self.call_once_as(method, token, body).await
    }

    async fn call_once_as<T: Answer>(
        &self,
        method: &'static str,
        token: Option<&Secret>,
        body: &Body<'_>,
    ) -> Result<T, SlackError> {
        let result = self.request(method, token, body).await;
        match &result {
            Ok(_) => crate::telemetry::record_slack_call(method, "ok"),
            Err(e) => crate::telemetry::record_slack_call(method, &e.code),
        }
        result
    }

    async fn request<T: Answer>(
        &self,
        method: &'static str,
        token: Option<&Secret>,
        body: &Body<'_>,
    ) -> Result<T, SlackError> {
        let mut request = match &self.api_base {
            Some(base) => {
                let mut url = base.clone();
                if let Ok(mut path) = url.path_segments_mut() {
                    path.pop_if_empty().push(method);
                }
                self.http.post(url)
            }
            None => self.http.post(format!("{}/{method}", self.api_url)),
        };
        if let Some(token) = token {
            request = request.bearer_auth(token.expose());
        }
        // Slack warns `missing_charset` without an explicit charset.
        let json = |request: reqwest::RequestBuilder, bytes: Vec<u8>| {
            request
                .header(
                    reqwest::header::CONTENT_TYPE,
                    "application/json; charset=utf-8",
                )
                .body(bytes)
        };
        request = match body {
            Body::Json(value) => json(request, serde_json::to_vec(value).unwrap_or_default()),
            Body::JsonBytes(bytes) => json(request, bytes.to_vec()),
            Body::Form(fields) => request.form(fields),
        };
        let response = request
            .send()
            .await
            .map_err(|e| transport_error(method, &e))?;
        let status = response.status();
        let retry_after = classify_head(method, status, response.headers())?;
        let bytes = response
            .bytes()
            .await
            .map_err(|e| transport_error(method, &e))?;
        classify_body(method, status, retry_after, &bytes)
    }

    /// Calls `method`, retrying transient failures with exponential backoff and
    /// full jitter within `slack.max_attempts`, honouring short `Retry-After`s.
    pub async fn call(
        &self,
        method: &'static str,
        token: Option<&Secret>,
        body: &Body<'_>,
    ) -> Result<Value, SlackError> {
        self.call_retrying(method, token, body, Retrying::Everything)
            .await
    }

    /// Like [`SlackClient::call`], but a 429 comes straight back: the caller
    /// owns rate limiting (shared across replicas) for this method.
    pub async fn call_leaving_rate_limits(
        &self,
        method: &'static str,
        token: Option<&Secret>,
        body: &Body<'_>,
    ) -> Result<Value, SlackError> {
        self.call_retrying(method, token, body, Retrying::AllButRateLimits)
            .await
    }

    /// Like [`SlackClient::call_leaving_rate_limits`], and a failure after
    /// which the call may have been done ([`SlackError::may_have_landed`])
    /// comes straight back too: for a call that must not be done twice,
    /// whose caller looks before calling again. Answers what the caller
    /// reads of it (`T`: [`Posted`] for a post).
    pub async fn call_once_sure<T: Answer>(
        &self,
        method: &'static str,
        token: Option<&Secret>,
        body: &Body<'_>,
    ) -> Result<T, SlackError> {
        self.call_retrying(method, token, body, Retrying::OnlyWhatDidNotHappen)
            .await
    }

    /// The delays [`SlackClient::call`] retries after, one per retry it
    /// would make: for a caller retrying itself what the client leaves to it.
    pub fn retry_delays(&self) -> impl Iterator<Item = Duration> + Send + use<> {
        self.backoff().build()
    }

    fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(self.retry_base_delay)
            .with_max_delay(Duration::from_secs(5))
            .with_max_times(self.max_attempts.saturating_sub(1) as usize)
            .with_total_delay(Some(self.retry_budget))
            .with_jitter()
    }

    async fn call_retrying<T: Answer>(
        &self,
        method: &'static str,
        token: Option<&Secret>,
        body: &Body<'_>,
        retrying: Retrying,
    ) -> Result<T, SlackError> {
        (|| self.call_once_as(method, token, body))
            .retry(self.backoff())
            .when(|e: &SlackError| {
                e.is_transient()
                    && (retrying == Retrying::Everything || !e.is_rate_limited())
                    && (retrying != Retrying::OnlyWhatDidNotHappen || !e.may_have_landed())
                    && e.retry_after()
                        .is_none_or(|ra| ra <= MAX_INLINE_RETRY_AFTER.min(self.retry_budget))
            })
            // Only replace a planned delay: returning Some for None would retry forever.
            .adjust(|e: &SlackError, delay| {
                delay.map(|delay| e.retry_after().map_or(delay, |ra| ra.max(delay)))
            })
            .notify(|e: &SlackError, delay| {
                tracing::debug!(error = %e, ?delay, "slack call failed; retrying");
            })
            .await
    }
}

/// Which transient failures [`SlackClient`] retries itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retrying {
    Everything,
    AllButRateLimits,
    /// Neither rate limits nor failures after which the call may have been done.
    OnlyWhatDidNotHappen,
}

/// What a Web API answer means, from its status, headers and body: the
/// `Ok` body, or the failure with its class. The client applies the same two
/// steps (status and headers before the body is read, then the body); this
/// one call is public, hidden, for the fuzz target `slack_response`
/// (`fuzz/`), which feeds it arbitrary answers.
#[doc(hidden)]
pub fn classify_response<T: Answer>(
    method: &'static str,
    status: reqwest::StatusCode,
    headers: &reqwest::header::HeaderMap,
    body: &[u8],
) -> Result<T, SlackError> {
    let retry_after = classify_head(method, status, headers)?;
    classify_body(method, status, retry_after, body)
}

/// The verdict of the status line and headers alone (429, 5xx), else the
/// `Retry-After` to attach to a transient failure the body reports.
fn classify_head(
    method: &'static str,
    status: reqwest::StatusCode,
    headers: &reqwest::header::HeaderMap,
) -> Result<Option<Duration>, SlackError> {
    let retry_after = headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        // An absurd header must not become an absurd (or overflowing) wait.
        .map(|secs| honoured_retry_after(Duration::from_secs(secs.min(3600))));
    if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
        return Err(SlackError::new(
            method,
            "ratelimited",
            SlackFailure::Transient {
                retry_after: Some(
                    retry_after.unwrap_or_else(|| honoured_retry_after(Duration::from_secs(1))),
                ),
            },
        ));
    }
    // 408: a proxy gave up waiting for the request itself, so Slack never
    // had it: worth another try, like a 5xx, and certainly not posted.
    if status.is_server_error() || status == reqwest::StatusCode::REQUEST_TIMEOUT {
        return Err(SlackError::new(
            method,
            format!("http_{}", status.as_u16()),
            SlackFailure::Transient { retry_after },
        ));
    }
    Ok(retry_after)
}

/// The verdict of the body: `{"ok":true,…}`, or Slack's error code classified.
fn classify_body<T: Answer>(
    method: &'static str,
    status: reqwest::StatusCode,
    retry_after: Option<Duration>,
    bytes: &[u8],
) -> Result<T, SlackError> {
    // UTF-8 checked for the whole body first: skipping a field (as
    // [`Posted`] does) would not check it, and both readings must refuse
    // the same answers (found by the fuzz target `slack_response`).
    let parsed = std::str::from_utf8(bytes)
        .ok()
        .and_then(|text| serde_json::from_str(text).ok());
    let value: T = match parsed {
        Some(value) => value,
        None if status.is_success() => {
            // A proxy or a half-deployed Slack answering HTML: worth another try.
            return Err(SlackError::new(
                method,
                "invalid_response",
                SlackFailure::Transient { retry_after: None },
            ));
        }
        None => {
            return Err(SlackError::new(
                method,
                format!("http_{}", status.as_u16()),
                SlackFailure::Other,
            ));
        }
    };
    if value.ok() {
        return Ok(value);
    }
    // An empty code would make an empty reason, log field and metric label.
    let code = value
        .error()
        .filter(|code| !code.is_empty())
        .unwrap_or("unknown_error")
        .to_string();
    let mut error = SlackError::new(method, code.clone(), classify(&code));
    if let SlackFailure::Transient { retry_after: slot } = &mut error.failure {
        *slot = retry_after;
    }
    if code == "missing_scope" {
        error.detail = value
            .needed()
            .map(|needed| format!("needs scope {needed}; reinstall the app with it"));
    }
    Err(error)
}

fn transport_error(method: &'static str, error: &reqwest::Error) -> SlackError {
    let code = if error.is_timeout() {
        "timeout"
    } else if error.is_connect() {
        "connect_error"
    } else {
        "network_error"
    };
    SlackError::new(method, code, SlackFailure::Transient { retry_after: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_after_is_honoured_with_a_margin_of_at_least_50_ms_or_2_percent() {
        assert_eq!(
            honoured_retry_after(Duration::from_secs(1)),
            Duration::from_millis(1050)
        );
        assert_eq!(
            honoured_retry_after(Duration::from_secs(3)),
            Duration::from_millis(3060)
        );
        assert_eq!(
            honoured_retry_after(Duration::from_secs(30)),
            Duration::from_millis(30_600)
        );
    }

    #[test]
    fn an_answer_is_classified_by_status_then_headers_then_body_whole_or_as_a_post() {
        classified_by_status_then_headers_then_body::<Value>();
        classified_by_status_then_headers_then_body::<Posted>();
    }

    fn classified_by_status_then_headers_then_body<T: Answer + std::fmt::Debug>() {
        use reqwest::StatusCode;
        use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
        let none = HeaderMap::new();
        let mut seven = HeaderMap::new();
        seven.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        let answer = |status: u16, headers: &HeaderMap, body: &str| {
            let status = StatusCode::from_u16(status).unwrap();
            classify_response::<T>("chat.postMessage", status, headers, body.as_bytes())
        };
        assert!(answer(200, &none, r#"{"ok":true,"ts":"1.2"}"#).is_ok());
        let limited = answer(429, &none, r#"{"ok":true}"#).unwrap_err();
        assert_eq!(
            (limited.code.as_str(), limited.retry_after()),
            ("ratelimited", Some(Duration::from_millis(1050)))
        );
        let busy = answer(503, &seven, "<html>").unwrap_err();
        assert_eq!(busy.code, "http_503");
        assert_eq!(busy.retry_after(), Some(Duration::from_millis(7140)));
        let html = answer(200, &none, "<html>").unwrap_err();
        assert_eq!(
            (html.code.as_str(), html.is_transient()),
            ("invalid_response", true)
        );
        let gone = answer(404, &none, "<html>").unwrap_err();
        assert_eq!(
            (gone.code.as_str(), gone.failure),
            ("http_404", SlackFailure::Other)
        );
        let proxy_timeout = answer(408, &none, "<html>").unwrap_err();
        assert_eq!(
            (
                proxy_timeout.code.as_str(),
                proxy_timeout.is_transient(),
                proxy_timeout.may_have_landed()
            ),
            ("http_408", true, false)
        );
        let internal = answer(200, &seven, r#"{"ok":false,"error":"internal_error"}"#).unwrap_err();
        assert_eq!(internal.retry_after(), Some(Duration::from_millis(7140)));
        let scope = answer(
            200,
            &none,
            r#"{"ok":false,"error":"missing_scope","needed":"chat:write"}"#,
        )
        .unwrap_err();
        assert_eq!(scope.failure, SlackFailure::Workspace);
        assert_eq!(
            scope.detail.as_deref(),
            Some("needs scope chat:write; reinstall the app with it")
        );
        let no_code = answer(200, &none, r#"{"ok":false}"#).unwrap_err();
        assert_eq!(no_code.code, "unknown_error");
        // Found by the fuzz target `slack_response`: the code was "".
        let empty_code = answer(200, &none, r#"{"ok":false,"error":""}"#).unwrap_err();
        assert_eq!(empty_code.code, "unknown_error");
    }

    #[test]
    fn a_post_answer_reads_where_the_message_landed_and_skips_slacks_echo_of_it() {
        let read = |body: &str| {
            classify_response::<Posted>(
                "chat.postMessage",
                reqwest::StatusCode::OK,
                &reqwest::header::HeaderMap::new(),
                body.as_bytes(),
            )
            .unwrap()
        };
        // As Slack answers a DM posted by user id: the echo in full.
        let first = read(
            r#"{"ok":true,"channel":"D0LEAD","ts":"1700000000.000100","message":{"type":"message",
                "text":"db down","user":"U0BOT","bot_id":"B0BOT","ts":"1700000000.000100",
                "blocks":[{"type":"section","text":{"type":"mrkdwn","text":"*db down*"}},
                          {"type":"actions","elements":[{"type":"button","value":"{\"k\":\"x\"}"}]}],
                "bot_profile":{"id":"B0BOT","icons":{"image_36":"https://a"},"deleted":false},
                "metadata":{"event_type":"alert","event_payload":{"id":"e1"}}},
               "warning":"missing_charset","response_metadata":{"warnings":["missing_charset"]}}"#,
        );
        assert_eq!(first.channel.as_deref(), Some("D0LEAD"));
        assert_eq!(first.ts.as_deref(), Some("1700000000.000100"));
        assert!(first.echoed_top_level());
        let reply = read(
            r#"{"ok":true,"channel":"C1","ts":"2.000000","message":{"ts":"2.000000","thread_ts":"1.000000"}}"#,
        );
        assert!(!reply.echoed_top_level());
        // No echo: nothing says it is top-level (the caller knows what it asked for).
        let bare = read(r#"{"ok":true,"channel":"C1","ts":"3.000000"}"#);
        assert!(!bare.echoed_top_level());
        for odd in [r#""text""#, "[]", "null", "7"] {
            let echo = format!(r#"{{"ok":true,"channel":"C1","message":{odd}}}"#);
            assert!(!read(&echo).echoed_top_level(), "{odd} is no echo");
        }
        let null_thread = read(r#"{"ok":true,"message":{"thread_ts":null}}"#);
        assert!(null_thread.echoed_top_level());
        // As the whole reading: the last of repeated keys, strings only as strings.
        let repeated = read(r#"{"ok":true,"channel":"C1","channel":"C2","ts":5}"#);
        assert_eq!(
            (repeated.channel.as_deref(), repeated.ts),
            (Some("C2"), None)
        );
    }

    #[test]
    fn a_post_answer_fails_where_the_whole_reading_fails_and_as_it_does() {
        let both = |status: u16, body: &str| {
            let status = reqwest::StatusCode::from_u16(status).unwrap();
            let headers = reqwest::header::HeaderMap::new();
            let whole =
                classify_response::<Value>("chat.postMessage", status, &headers, body.as_bytes());
            let posted =
                classify_response::<Posted>("chat.postMessage", status, &headers, body.as_bytes());
            (whole.err(), posted.err())
        };
        for (status, body) in [
            (200, r#"{"ok":"true"}"#),
            (200, r#"{"ok":false,"error":5}"#),
            (200, r#"{"ok":false,"error":"channel_not_found"}"#),
            (200, r#"{"ok":true,"ok":false,"error":"fatal_error"}"#),
            (400, r#"{"ok":false,"error":"invalid_arguments"}"#),
            (200, "<html>"),
            (502, "<html>"),
        ] {
            let (whole, posted) = both(status, body);
            assert!(whole.is_some(), "{body}");
            assert_eq!(whole, posted, "{status} {body}");
        }
        // Not UTF-8 in a field the post's reading skips: refused by both.
        let not_utf8 = b"{\"ok\":true,\"ts\":\"1.2\",\"t\":\"1\x8d\"}";
        let headers = reqwest::header::HeaderMap::new();
        let ok = reqwest::StatusCode::OK;
        let whole = classify_response::<Value>("chat.postMessage", ok, &headers, not_utf8);
        let posted = classify_response::<Posted>("chat.postMessage", ok, &headers, not_utf8);
        assert!(whole.is_err());
        assert_eq!(whole.err(), posted.err());
        // An answer that is not an object: no answer at all, to the post's reading.
        let (_, posted) = both(200, r#"[true,null,null,"C1","1.2"]"#);
        assert_eq!(posted.map(|e| e.code), Some("invalid_response".to_string()));
    }

    #[test]
    fn documented_error_codes_fall_into_the_right_class() {
        let cases = [
            ("internal_error", "transient"),
            ("fatal_error", "transient"),
            ("service_unavailable", "transient"),
            ("request_timeout", "transient"),
            ("ratelimited", "transient"),
            ("rate_limited", "transient"),
            ("update_failed", "transient"),
            ("external_channel_migrating", "transient"),
            ("token_expired", "token_expired"),
            ("invalid_auth", "workspace"),
            ("token_revoked", "workspace"),
            ("account_inactive", "workspace"),
            ("missing_scope", "workspace"),
            ("channel_not_found", "destination"),
            ("not_in_channel", "destination"),
            ("is_archived", "destination"),
            ("users_not_found", "destination"),
            ("restricted_action_read_only_channel", "destination"),
            ("invalid_blocks", "payload"),
            ("no_text", "payload"),
            ("msg_blocks_too_long", "payload"),
            ("something_new", "other"),
        ];
        for (code, class) in cases {
            let got = match classify(code) {
                SlackFailure::Transient { .. } => "transient",
                SlackFailure::TokenExpired => "token_expired",
                SlackFailure::Workspace => "workspace",
                SlackFailure::Destination => "destination",
                SlackFailure::Payload => "payload",
                SlackFailure::Other => "other",
            };
            assert_eq!(got, class, "{code}");
        }
    }
}
