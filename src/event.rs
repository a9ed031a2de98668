//! The event model (what producers publish) and its validation.
//!
//! Decoding is strict about the documented fields and lenient about unknown
//! ones. A body that fails here is *poison*: it can never succeed on a retry,
//! so the worker dead-letters it at once with [`EventError::reason_code`].

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, FixedOffset};
use serde::{Deserialize, Serialize};

/// Default limit on the size of an event body, in bytes (256 KiB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 256 * 1024;

/// Bodies up to this size are kept beside the decoded event
/// ([`ReceivedJson`]). Events are a few KiB; a larger one is encoded again
/// when needed, so that a window of near-limit bodies is not held twice.
pub const KEEP_RECEIVED_MAX_BYTES: usize = 16 * 1024;

/// One notification-worthy thing that happened, as a producer published it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unique id; the idempotency key for every target.
    pub id: String,
    /// Dotted event type such as `escalation.triggered`; also the routing key.
    #[serde(rename = "type")]
    pub kind: String,
    /// Drives colour and routing.
    pub severity: Severity,
    /// One-line headline.
    pub title: String,
    /// Slack workspace (team) id whose token to use; `None` means the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
    /// When it happened, as the producer saw it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub occurred_at: Option<DateTime<FixedOffset>>,
    /// Producing system, e.g. `aexy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Longer description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// The ticket this event is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket: Option<Ticket>,
    /// Who owns it now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assignee: Option<Assignee>,
    /// Escalation level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<u64>,
    /// Free labels used by routing rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// A human's note shown with the message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// Explicit recipients, in addition to what the rules route to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<Vec<Target>>,
    /// The incident this event belongs to; absent, the ticket number names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup_key: Option<String>,
    /// Who acknowledged it (on `*.acknowledged` events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acknowledged_by: Option<Assignee>,
    /// The body it was decoded from, not a field of the event.
    #[serde(skip)]
    pub received: ReceivedJson,
}

/// The JSON text an [`Event`] was decoded from, kept so that an incident can
/// store its first event without encoding it again (about 3.5 % of the
/// worker's instructions per event). Events built in code, and bodies over
/// [`KEEP_RECEIVED_MAX_BYTES`], have none. It takes no part in comparisons,
/// and `Debug` shows only its length.
#[derive(Clone, Default)]
pub struct ReceivedJson(Option<Arc<str>>);

impl ReceivedJson {
    fn keep(text: &str) -> ReceivedJson {
        ReceivedJson((text.len() <= KEEP_RECEIVED_MAX_BYTES).then(|| Arc::from(text)))
    }

    /// The text, if the event was decoded from one.
    pub fn as_str(&self) -> Option<&str> {
        self.0.as_deref()
    }
}

impl PartialEq for ReceivedJson {
    fn eq(&self, _: &ReceivedJson) -> bool {
        true
    }
}

impl fmt::Debug for ReceivedJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(text) => write!(f, "ReceivedJson({} bytes)", text.len()),
            None => f.write_str("ReceivedJson(none)"),
        }
    }
}

/// How urgent an event is, most urgent first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Critical,
    High,
    Medium,
    Low,
    Info,
}

impl Severity {
    /// The lowercase name used on the wire and in matchers.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Critical => "critical",
            Severity::High => "high",
            Severity::Medium => "medium",
            Severity::Low => "low",
            Severity::Info => "info",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an incident stands, as its latest event says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IncidentState {
    /// Until an event says otherwise.
    #[default]
    Open,
    Acknowledged,
    Resolved,
}

impl IncidentState {
    pub fn as_str(self) -> &'static str {
        match self {
            IncidentState::Open => "open",
            IncidentState::Acknowledged => "acknowledged",
            IncidentState::Resolved => "resolved",
        }
    }

    pub fn parse(text: &str) -> Option<IncidentState> {
        match text {
            "open" => Some(IncidentState::Open),
            "acknowledged" => Some(IncidentState::Acknowledged),
            "resolved" => Some(IncidentState::Resolved),
            _ => None,
        }
    }
}

/// The ticket an event is about; every part is optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ticket {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub form: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// Who owns the event now.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Assignee {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slack_user: Option<String>,
}

/// Whether `text` is a Slack user id (`U…`, or `W…` on Enterprise Grid):
/// upper-case letters and digits. A direct message goes by the user's id;
/// Slack takes a channel id or name in the same argument and posts there, so
/// anything else would put a message meant for one person in a channel.
pub fn is_slack_user_id(text: &str) -> bool {
    let mut chars = text.chars();
    matches!(chars.next(), Some('U' | 'W'))
        && text.len() >= 2
        && chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
}

/// The problem with a `slack_user` that is not a user id.
pub fn not_a_user_id(text: &str) -> String {
    let text: String = text.chars().take(80).collect();
    format!(
        "must be a Slack user id (U… or W…), not `{text}`; a channel goes in `slack_channel`, an address in `slack_email`"
    )
}

/// A recipient, as written in a rule's `notify` list or an event's `targets`.
///
/// On the wire a target is a one-key map (`{"slack_channel": "C0PAY"}`) or, for
/// the assignee, the bare word `assignee`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Target {
    /// Post to a channel, by id (`C0PAY`) or name (`#payments`).
    SlackChannel(String),
    /// Direct-message a Slack user by id.
    SlackUser(String),
    /// Direct-message the Slack user with this email address.
    SlackEmail(String),
    /// Direct-message the event's assignee (by `slack_user`, else by email).
    Assignee,
    /// Send an email.
    Email(String),
}

impl Target {
    /// The recipient text inside the target (`None` for `assignee`).
    pub fn value(&self) -> Option<&str> {
        match self {
            Target::SlackChannel(v)
            | Target::SlackUser(v)
            | Target::SlackEmail(v)
            | Target::Email(v) => Some(v),
            Target::Assignee => None,
        }
    }

    /// The key word used on the wire (`slack_channel`, `assignee`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Target::SlackChannel(_) => "slack_channel",
            Target::SlackUser(_) => "slack_user",
            Target::SlackEmail(_) => "slack_email",
            Target::Assignee => "assignee",
            Target::Email(_) => "email",
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.value() {
            Some(v) => write!(f, "{}:{}", self.kind(), v),
            None => f.write_str(self.kind()),
        }
    }
}

/// Why a body is not an acceptable event. Always permanent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// The body is larger than the configured limit.
    #[error("event body is {size} bytes, over the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    /// The body is not UTF-8 JSON.
    #[error("event body is not valid JSON: {0}")]
    InvalidJson(String),
    /// The body is JSON but breaks the event schema.
    #[error("event field `{field}` {problem}")]
    InvalidField { field: String, problem: String },
}

impl EventError {
    /// Every code [`EventError::reason_code`] can return. The body itself is
    /// at fault, so a replayed copy fails the same way: `dlq replay` warns.
    pub const REASON_CODES: [&'static str; 3] = ["too_large", "invalid_json", "invalid_event"];

    /// The short code written to `x-alert-router-reason` when dead-lettered.
    pub fn reason_code(&self) -> &'static str {
        match self {
            EventError::TooLarge { .. } => "too_large",
            EventError::InvalidJson(_) => "invalid_json",
            EventError::InvalidField { .. } => "invalid_event",
        }
    }

    fn field(field: impl Into<String>, problem: impl Into<String>) -> Self {
        EventError::InvalidField {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

impl Event {
    /// Decodes and validates an event body.
    pub fn decode(body: &[u8], max_bytes: usize) -> Result<Event, EventError> {
        if body.len() > max_bytes {
            return Err(EventError::TooLarge {
                size: body.len(),
                limit: max_bytes,
            });
        }
        let text = std::str::from_utf8(body).map_err(|e| {
            EventError::InvalidJson(format!("not UTF-8 at byte {}", e.valid_up_to()))
        })?;
        // Nearly every body is valid: one plain parse. Only a failure pays for
        // the passes below, which find the error worth reporting.
        if let Ok(mut event) = serde_json::from_str::<Event>(text) {
            event.validate()?;
            event.received = ReceivedJson::keep(text);
            return Ok(event);
        }
        // A syntax pass first, so a truncated body is reported as broken JSON
        // rather than as whatever type error the parser happened to hit first.
        serde_json::from_str::<serde::de::IgnoredAny>(text)
            .map_err(|e| EventError::InvalidJson(e.to_string()))?;
        let mut json = serde_json::Deserializer::from_str(text);
        let mut event: Event = serde_path_to_error::deserialize(&mut json).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            match inner.classify() {
                serde_json::error::Category::Data => {
                    let field = if path == "." {
                        // serde reports a missing field at the parent.
                        missing_field_name(&inner.to_string()).unwrap_or_else(|| path.clone())
                    } else {
                        path
                    };
                    EventError::field(field, strip_position(&inner.to_string()))
                }
                _ => EventError::InvalidJson(inner.to_string()),
            }
        })?;
        json.end()
            .map_err(|e| EventError::InvalidJson(e.to_string()))?;
        event.validate()?;
        event.received = ReceivedJson::keep(text);
        Ok(event)
    }

    /// Checks the rules serde cannot express: lengths, patterns, non-empty values.
    pub fn validate(&self) -> Result<(), EventError> {
        check_len("id", &self.id, 1, 200)?;
        check_len("type", &self.kind, 1, 255)?;
        if !self
            .kind
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
        {
            return Err(EventError::field(
                "type",
                format!(
                    "must match [a-z0-9_.-]+ (e.g. `escalation.triggered`), got {:?}",
                    self.kind
                ),
            ));
        }
        check_len("title", &self.title, 1, 1000)?;
        if let Some(ws) = &self.workspace {
            check_len("workspace", ws, 1, 255)?;
        }
        if let Some(summary) = &self.summary {
            check_len("summary", summary, 0, 10_000)?;
        }
        if let Some(comment) = &self.comment {
            check_len("comment", comment, 0, 4_000)?;
        }
        if let Some(dedup_key) = &self.dedup_key {
            check_len("dedup_key", dedup_key, 1, 200)?;
        }
        for (i, target) in self.targets.iter().flatten().enumerate() {
            if let Some(value) = target.value()
                && value.trim().is_empty()
            {
                return Err(EventError::field(
                    format!("targets[{i}].{}", target.kind()),
                    "must not be empty",
                ));
            }
            if let Target::SlackUser(user) = target
                && !is_slack_user_id(user)
            {
                return Err(EventError::field(
                    format!("targets[{i}].slack_user"),
                    not_a_user_id(user),
                ));
            }
        }
        if let Some(user) = self.assignee.as_ref().and_then(|a| a.slack_user.as_deref())
            && !user.trim().is_empty()
            && !is_slack_user_id(user)
        {
            return Err(EventError::field(
                "assignee.slack_user",
                not_a_user_id(user),
            ));
        }
        Ok(())
    }

    /// The value of a routing label: a built-in field or a key of `labels`.
    ///
    /// Built-in names (`type`, `severity`, `source`, `workspace`, `level`) win
    /// over labels of the same name. A missing label is the empty string, as in
    /// Alertmanager.
    pub fn label(&self, name: &str) -> Cow<'_, str> {
        match name {
            "type" => Cow::Borrowed(&self.kind),
            "severity" => Cow::Borrowed(self.severity.as_str()),
            "source" => Cow::Borrowed(self.source.as_deref().unwrap_or("")),
            "workspace" => Cow::Borrowed(self.workspace.as_deref().unwrap_or("")),
            "level" => match self.level {
                Some(level) => Cow::Owned(level.to_string()),
                None => Cow::Borrowed(""),
            },
            other => Cow::Borrowed(
                self.labels
                    .as_ref()
                    .and_then(|labels| labels.get(other))
                    .map(String::as_str)
                    .unwrap_or(""),
            ),
        }
    }

    /// The incident this event belongs to: its `dedup_key`, else
    /// `ticket:<number>`, else `event:<id>` (an incident of its own, so that
    /// its Acknowledge button works too); one longer than 200 characters is
    /// cut to 120 and a hash of the whole. An `escalation.acknowledged`
    /// event for it carries this as its `dedup_key`, which maps back here.
    pub fn incident_key(&self) -> Cow<'_, str> {
        if let Some(key) = &self.dedup_key {
            return Cow::Borrowed(key);
        }
        let key = match self.ticket.as_ref().and_then(|t| t.number.as_deref()) {
            Some(number) if !number.trim().is_empty() => ["ticket:", number].concat(),
            _ => ["event:", &self.id].concat(),
        };
        // Within `dedup_key`'s 200 characters, so an acknowledgement can carry it.
        if key.chars().count() <= 200 {
            return Cow::Owned(key);
        }
        use sha2::{Digest, Sha256};
        let digest = hex::encode(Sha256::digest(key.as_bytes()));
        let prefix: String = key.chars().take(120).collect();
        Cow::Owned(format!("{prefix}~{digest}"))
    }

    /// What this event says about its incident's state.
    pub fn incident_state(&self) -> IncidentState {
        if self.kind.ends_with(".resolved") {
            IncidentState::Resolved
        } else if self.kind.ends_with(".acknowledged") {
            IncidentState::Acknowledged
        } else {
            IncidentState::Open
        }
    }

    /// The event's explicit targets (empty when it names none).
    pub fn own_targets(&self) -> &[Target] {
        self.targets.as_deref().unwrap_or(&[])
    }
}

/// Best-effort id of a body that failed to decode, for logs and the DLQ tools.
pub fn sniff_id(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct IdOnly {
        id: serde_json::Value,
    }
    let parsed: IdOnly = serde_json::from_slice(body).ok()?;
    match parsed.id {
        serde_json::Value::String(s) => Some(s.chars().take(200).collect()),
        _ => None,
    }
}

fn check_len(field: &str, value: &str, min: usize, max: usize) -> Result<(), EventError> {
    let len = value.chars().count();
    if len < min {
        return Err(EventError::field(field, "must not be empty"));
    }
    if len > max {
        return Err(EventError::field(
            field,
            format!("is {len} characters long; the limit is {max}"),
        ));
    }
    Ok(())
}

/// `missing field `id` at line 1 column 20` → `id`.
fn missing_field_name(message: &str) -> Option<String> {
    let rest = message.strip_prefix("missing field `")?;
    let end = rest.find('`')?;
    Some(rest[..end].to_string())
}

/// Drops serde_json's "at line 1 column 20" suffix: the field path is clearer.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(pos) => message[..pos].to_string(),
        None => message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"{"id":"esc-2041-2","type":"escalation.escalated","severity":"critical",
 "title":"Checkout API error rate above SLO","workspace":"T0AEXY01",
 "ticket":{"number":"TCK-2041","form":"Incident report","url":"https://support.example.com/t/2041"},
 "assignee":{"name":"Ana Ruiz","email":"ana@example.com"},
 "level":2,"labels":{"team":"payments","env":"prod"}}"#;

    fn decode(body: &str) -> Result<Event, EventError> {
        Event::decode(body.as_bytes(), DEFAULT_MAX_BODY_BYTES)
    }

    #[test]
    fn a_decoded_event_keeps_its_body_which_decodes_to_the_same_event() {
        let event = decode(EXAMPLE).unwrap();
        assert_eq!(event.received.as_str(), Some(EXAMPLE));
        let again: Event = serde_json::from_str(event.received.as_str().unwrap()).unwrap();
        assert_eq!(again, event);
        assert!(
            again.received.as_str().is_none(),
            "not decoded by Event::decode"
        );
        // The body is not part of the event: neither encoded nor compared.
        let encoded = serde_json::to_string(&event).unwrap();
        assert!(!encoded.contains("received"), "{encoded}");
        assert_eq!(serde_json::from_str::<Event>(&encoded).unwrap(), event);
        assert_eq!(
            format!("{:?}", event.received),
            format!("ReceivedJson({} bytes)", EXAMPLE.len())
        );
        // A large body is not held twice: it is encoded again when needed.
        let large = EXAMPLE.replacen(
            r#""title":"#,
            &format!(
                r#""producer_debug":"{}","title":"#,
                "x".repeat(KEEP_RECEIVED_MAX_BYTES)
            ),
            1,
        );
        let event = decode(&large).unwrap();
        assert!(event.received.as_str().is_none());
    }

    #[test]
    fn the_documented_example_decodes() {
        let event = decode(EXAMPLE).unwrap();
        assert_eq!(event.id, "esc-2041-2");
        assert_eq!(event.severity, Severity::Critical);
        assert_eq!(event.label("team"), "payments");
        assert_eq!(event.label("level"), "2");
        assert_eq!(event.label("source"), "");
        assert_eq!(event.ticket.unwrap().number.as_deref(), Some("TCK-2041"));
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let event =
            decode(r#"{"id":"a","type":"t","severity":"info","title":"x","shiny":{"new":1}}"#)
                .unwrap();
        assert_eq!(event.id, "a");
    }

    #[test]
    fn built_in_labels_win_over_labels_of_the_same_name() {
        let event = decode(
            r#"{"id":"a","type":"t","severity":"info","title":"x","labels":{"severity":"critical","type":"other"}}"#,
        )
        .unwrap();
        assert_eq!(event.label("severity"), "info");
        assert_eq!(event.label("type"), "t");
    }

    #[test]
    fn targets_accept_maps_and_the_bare_word_assignee() {
        let event = decode(
            r#"{"id":"a","type":"t","severity":"info","title":"x",
                "targets":[{"slack_channel":"C1"},"assignee",{"email":"a@example.com"}]}"#,
        )
        .unwrap();
        assert_eq!(
            event.own_targets(),
            &[
                Target::SlackChannel("C1".into()),
                Target::Assignee,
                Target::Email("a@example.com".into())
            ]
        );
    }

    #[test]
    fn broken_events_name_the_field_and_the_rule() {
        let cases = [
            (
                r#"{"type":"t","severity":"info","title":"x"}"#,
                "event field `id` missing field `id`",
            ),
            (
                r#"{"id":"a","type":"t","severity":"urgent","title":"x"}"#,
                "event field `severity` unknown variant `urgent`, expected one of `critical`, `high`, `medium`, `low`, `info`",
            ),
            (
                r#"{"id":"a","type":"Bad Type","severity":"info","title":"x"}"#,
                "event field `type` must match [a-z0-9_.-]+ (e.g. `escalation.triggered`), got \"Bad Type\"",
            ),
            (
                r#"{"id":"","type":"t","severity":"info","title":"x"}"#,
                "event field `id` must not be empty",
            ),
            (
                r#"{"id":"a","type":"t","severity":"info","title":"x","level":-1}"#,
                "event field `level` invalid value: integer `-1`, expected u64",
            ),
            (
                r#"{"id":"a","type":"t","severity":"info","title":"x","ticket":{"number":7}}"#,
                "event field `ticket.number` invalid type: integer `7`, expected a string",
            ),
            (
                r#"{"id":"a","type":"t","severity":"info","title":"x","targets":[{"pager":"x"}]}"#,
                "event field `targets[0]` unknown variant `pager`, expected one of `slack_channel`, `slack_user`, `slack_email`, `assignee`, `email`",
            ),
            (
                r#"{"id":"a","type":"t","severity":"info","title":"x","targets":[{"slack_user":"U0A"},{"slack_user":"C0PAY"}]}"#,
                "event field `targets[1].slack_user` must be a Slack user id (U… or W…), not `C0PAY`; a channel goes in `slack_channel`, an address in `slack_email`",
            ),
            (
                r##"{"id":"a","type":"t","severity":"info","title":"x","assignee":{"slack_user":"#general"}}"##,
                "event field `assignee.slack_user` must be a Slack user id (U… or W…), not `#general`; a channel goes in `slack_channel`, an address in `slack_email`",
            ),
            (
                r#"{"id":"a","type":"t","severity":"info","title":"x","occurred_at":"yesterday"}"#,
                "event field `occurred_at` input contains invalid characters",
            ),
        ];
        for (body, expected) in cases {
            let err = decode(body).unwrap_err();
            assert_eq!(err.reason_code(), "invalid_event", "{body}");
            assert_eq!(err.to_string(), expected, "{body}");
        }
    }

    #[test]
    fn limits_are_counted_in_characters() {
        let title = "é".repeat(1000);
        let body = format!(r#"{{"id":"a","type":"t","severity":"info","title":"{title}"}}"#);
        assert!(decode(&body).is_ok());
        let body = format!(r#"{{"id":"a","type":"t","severity":"info","title":"{title}é"}}"#);
        assert_eq!(
            decode(&body).unwrap_err().to_string(),
            "event field `title` is 1001 characters long; the limit is 1000"
        );
    }

    #[test]
    fn not_json_is_invalid_json() {
        for body in ["{not json", "", "[1,2", "{\"id\":\"a\"} trailing"] {
            assert_eq!(
                decode(body).unwrap_err().reason_code(),
                "invalid_json",
                "{body}"
            );
        }
        let err = Event::decode(&[0xff, 0xfe], DEFAULT_MAX_BODY_BYTES).unwrap_err();
        assert_eq!(
            err.to_string(),
            "event body is not valid JSON: not UTF-8 at byte 0"
        );
    }

    #[test]
    fn a_json_value_that_is_not_an_object_is_an_invalid_event() {
        let err = decode("[1,2]").unwrap_err();
        assert_eq!(err.reason_code(), "invalid_event");
    }

    #[test]
    fn oversized_bodies_are_refused_before_parsing() {
        let err = Event::decode(&[b' '; 11], 10).unwrap_err();
        assert_eq!(err.reason_code(), "too_large");
    }

    #[test]
    fn every_reason_code_is_listed_as_a_body_fault() {
        let errors = [
            EventError::TooLarge { size: 2, limit: 1 },
            EventError::InvalidJson(String::new()),
            EventError::field("title", "missing"),
        ];
        // A new variant makes the match below fail to compile until it is listed here.
        for error in &errors {
            match error {
                EventError::TooLarge { .. }
                | EventError::InvalidJson(_)
                | EventError::InvalidField { .. } => {}
            }
            assert!(EventError::REASON_CODES.contains(&error.reason_code()));
        }
        assert_eq!(errors.len(), EventError::REASON_CODES.len());
    }

    #[test]
    fn sniff_id_reads_the_id_of_a_broken_event() {
        assert_eq!(
            sniff_id(br#"{"id":"x-1","severity":9}"#).as_deref(),
            Some("x-1")
        );
        assert_eq!(sniff_id(b"nope"), None);
    }

    #[test]
    fn an_incident_is_its_dedup_key_else_its_ticket_else_the_event_and_fits_a_dedup_key() {
        let decode = |json: &str| Event::decode(json.as_bytes(), DEFAULT_MAX_BODY_BYTES).unwrap();
        let base = r#""type":"issue.created","severity":"low","title":"t""#;
        let keyed = decode(&format!(
            r#"{{"id":"e1",{base},"dedup_key":"db-down","ticket":{{"number":"T-1"}}}}"#
        ));
        assert_eq!(keyed.incident_key(), "db-down");
        let ticket = decode(&format!(
            r#"{{"id":"e1",{base},"ticket":{{"number":"T-1"}}}}"#
        ));
        assert_eq!(ticket.incident_key(), "ticket:T-1");
        let alone = decode(&format!(r#"{{"id":"e1",{base}}}"#));
        assert_eq!(alone.incident_key(), "event:e1");
        let long_id = "x".repeat(200);
        let long = decode(&format!(r#"{{"id":"{long_id}",{base}}}"#));
        let key = long.incident_key();
        assert!(key.chars().count() <= 200, "{key}");
        assert!(key.starts_with("event:xxx"));
        let ack = decode(&format!(
            r#"{{"id":"ack-1","type":"escalation.acknowledged","severity":"low","title":"t","dedup_key":"{key}"}}"#
        ));
        assert_eq!(ack.incident_key(), key, "an acknowledgement maps back");
    }
}
