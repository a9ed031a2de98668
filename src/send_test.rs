//! `alert-router send-test`: one test notification through the worker's own delivery path.
//!
//! A fresh install is checked end to end by sending something real: the
//! token lookup, channel and user resolution, idempotency, the shared rate
//! limits, Slack's error policy and the email fallback all run exactly as
//! they do for a published event (the [`Deliverer`] comes from
//! [`crate::worker::delivery_path`]), in this process and without the
//! broker. The event is built here, validated and held to the trust policy
//! like a published one, and routed to the one target asked for: no rule
//! adds recipients, so a test cannot page a team by accident.
//!
//! [`Deliverer`]: crate::deliver::Deliverer

use std::path::PathBuf;

use lettre::Address;

use crate::config::{Secrets, Settings};
use crate::deliver::{DeliveryReport, TargetReport, TargetStatus};
use crate::event::{Event, EventError, Severity, Target};
use crate::redact::Addresses;
use crate::rules::{Routing, Rules, RulesErrors};
use crate::trust::{Forbidden, TrustPolicy};
use crate::worker::{WorkerError, delivery_path};

/// The event type of test notifications; rules never see it (the routing
/// is the asked target only), producers can bind to it to ignore it.
pub const EVENT_TYPE: &str = "alert_router.test";

/// The title when `--message` is not given.
pub const DEFAULT_TITLE: &str = "alert-router test notification";

/// What the command line asked for.
#[derive(Debug, Clone)]
pub struct Request {
    /// Slack workspace (team) id, `T…`.
    pub workspace: String,
    /// `C…`, `G…`, `#name`, `U…`, `W…` or an email address.
    pub to: String,
    /// The message's title; [`DEFAULT_TITLE`] when `None`.
    pub message: Option<String>,
}

/// Why nothing was sent.
#[derive(Debug, thiserror::Error)]
pub enum SendTestError {
    /// `--workspace` is not a workspace id.
    #[error(
        "--workspace `{0}` is not a Slack workspace id: expected T… (as `alert-router tokens list` shows it)"
    )]
    BadWorkspace(String),
    /// `--to` is none of the forms a target can take.
    #[error("--to `{to}` {problem}")]
    BadTarget { to: String, problem: String },
    /// The event would be poison if published (a `--message` too long, say).
    #[error("the test event is not valid: {0}")]
    InvalidEvent(#[from] EventError),
    /// `slack.allowed_workspaces` or `email.allowed_domains` refuses it, as
    /// it would refuse a published event naming the same.
    #[error("{0}")]
    Forbidden(#[from] Forbidden),
    /// The delivery path cannot be built from these settings.
    #[error(transparent)]
    Setup(#[from] WorkerError),
}

impl SendTestError {
    /// Whether the command line or the settings are at fault (exit 2), as
    /// opposed to something failing while it ran (exit 1).
    pub fn is_bad_input(&self) -> bool {
        match self {
            SendTestError::Setup(e) => matches!(e, WorkerError::Email(_)),
            _ => true,
        }
    }
}

/// The rules file, as far as a test notification uses it: the default
/// channel and `defaults.email`.
#[derive(Debug)]
pub enum RulesUsed {
    Loaded(PathBuf),
    /// Not loaded: no default channel, no fallback email.
    NotLoaded {
        path: PathBuf,
        why: String,
    },
}

/// What happened to a test notification.
#[derive(Debug)]
pub struct Sent {
    pub event: Event,
    pub report: DeliveryReport,
    pub rules: RulesUsed,
    /// How addresses may be shown (`log.show_addresses`).
    pub addresses: Addresses,
}

impl Sent {
    /// Delivered to Slack or by email, every target.
    pub fn delivered(&self) -> bool {
        !self.report.targets.is_empty()
            && self.report.targets.iter().all(|t| {
                matches!(
                    t.status,
                    TargetStatus::Delivered { .. } | TargetStatus::AlreadyDelivered
                )
            })
    }

    /// One line per target, for people: where it landed, or why not.
    pub fn lines(&self) -> Vec<String> {
        self.report
            .targets
            .iter()
            .map(|t| describe(t, self.addresses))
            .collect()
    }

    /// The report as JSON, for scripts; addresses shown as in [`Sent::lines`].
    pub fn to_json(&self) -> serde_json::Value {
        let targets: Vec<serde_json::Value> = self
            .report
            .targets
            .iter()
            .map(|t| {
                let show = |text: &str| self.addresses.text(text).into_owned();
                let mut entry = serde_json::json!({
                    "target": show(&t.target),
                    "kind": t.kind,
                });
                let fields = match &t.status {
                    TargetStatus::Delivered { to } => serde_json::json!({
                        "status": if to.starts_with("email:") { "emailed" } else { "delivered" },
                        "to": show(to),
                    }),
                    TargetStatus::AlreadyDelivered => {
                        serde_json::json!({"status": "already_delivered"})
                    }
                    TargetStatus::Failed { detail, retryable } => serde_json::json!({
                        "status": "failed", "detail": show(detail), "retryable": retryable,
                    }),
                    TargetStatus::Deferred { wait } => serde_json::json!({
                        "status": "deferred", "wait_ms": u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                    }),
                    TargetStatus::Skipped { reason } => {
                        serde_json::json!({"status": "skipped", "reason": show(reason)})
                    }
                };
                if let (Some(entry), serde_json::Value::Object(fields)) =
                    (entry.as_object_mut(), fields)
                {
                    entry.extend(fields);
                    if let Some(note) = &t.note {
                        entry.insert("note".into(), show(note).into());
                    }
                }
                entry
            })
            .collect();
        let (rules_file, rules_loaded) = match &self.rules {
            RulesUsed::Loaded(path) => (path, true),
            RulesUsed::NotLoaded { path, .. } => (path, false),
        };
        serde_json::json!({
            "event_id": self.event.id,
            "workspace": self.event.workspace,
            "delivered": self.delivered(),
            "rules_file": rules_file.display().to_string(),
            "rules_loaded": rules_loaded,
            "targets": targets,
        })
    }
}

/// Sends one test notification as the worker would deliver it.
pub async fn send(
    settings: &Settings,
    secrets: &Secrets,
    request: &Request,
) -> Result<Sent, SendTestError> {
    let target = parse_target(&request.to)?;
    let event = test_event(&request.workspace, target, request.message.as_deref())?;
    let (rules, used) = match Rules::load(&settings.rules.path) {
        Ok(loaded) => (
            Some(loaded.rules),
            RulesUsed::Loaded(settings.rules.path.clone()),
        ),
        Err(errors) => (
            None,
            RulesUsed::NotLoaded {
                path: settings.rules.path.clone(),
                why: rules_problem(&errors),
            },
        ),
    };
    let routing = Routing::own_targets_only(
        &event,
        rules.as_ref().map_or(&[][..], |r| r.default_emails()),
    );
    let addresses = Addresses::new(settings.log.show_addresses);
    let trust = TrustPolicy::from_settings(settings);
    trust.check_workspace(&event)?;
    trust.check_addresses(&event, &routing, addresses)?;

    let path = delivery_path(settings, secrets)?;
    // Not `waited_enough`: a test that finds the channel's rate limit full
    // says so rather than emailing, as a first attempt in the worker would.
    let report = path
        .deliverer
        .deliver(
            &event,
            &routing,
            rules.as_ref().and_then(Rules::default_channel),
            false,
        )
        .await;
    Ok(Sent {
        event,
        report,
        rules: used,
        addresses,
    })
}

/// `--to` as a target: `C…`/`G…`/`#name` a channel, `U…`/`W…` a person by
/// id, `name@domain` a person by email. Anything else is refused here
/// rather than guessed at: a bare word would be taken for a channel name.
pub fn parse_target(to: &str) -> Result<Target, SendTestError> {
    let bad = |problem: &str| SendTestError::BadTarget {
        to: to.to_string(),
        problem: problem.to_string(),
    };
    let to = to.trim();
    if to.is_empty() {
        return Err(bad(
            "is empty: give a channel id (C…), #channel-name, user id (U…) or email address",
        ));
    }
    if let Some(name) = to.strip_prefix('#') {
        // Slack's own rule for names (letters, digits, `-`, `_`); the
        // delivery path lower-cases them as Slack does.
        let valid = !name.is_empty()
            && name.chars().count() <= 80
            && name
                .chars()
                .all(|c| c.is_alphanumeric() || c == '-' || c == '_');
        return if valid {
            Ok(Target::SlackChannel(to.to_string()))
        } else {
            Err(bad(
                "is not a Slack channel name: after # come letters, digits, - and _ (80 at most)",
            ))
        };
    }
    if to.contains('@') {
        return match to.parse::<Address>() {
            Ok(_) => Ok(Target::SlackEmail(to.to_string())),
            Err(e) => Err(bad(&format!("is not an email address ({e})"))),
        };
    }
    let is_id = to.len() >= 3
        && to
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit());
    match to.chars().next() {
        Some('C' | 'G') if is_id => Ok(Target::SlackChannel(to.to_string())),
        Some('U' | 'W') if is_id => Ok(Target::SlackUser(to.to_string())),
        Some('D') if is_id => Err(bad(
            "is a direct-message conversation; name the person by user id (U…) or email instead",
        )),
        _ if is_id => Err(bad("is not a channel id (C…, G…) or user id (U…, W…)")),
        _ => Err(bad(&format!(
            "is not a channel id (C…), #channel-name, user id (U…) or email address; for the channel named {to}, write #{}",
            to.to_lowercase()
        ))),
    }
}

/// The test event: its own incident (no `dedup_key`, no ticket), severity
/// `info`, validated as a published event is.
pub fn test_event(
    workspace: &str,
    target: Target,
    message: Option<&str>,
) -> Result<Event, SendTestError> {
    let workspace = workspace.trim();
    let looks_like_team = workspace.len() >= 2
        && workspace.starts_with(['T', 'E'])
        && workspace
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit());
    if !looks_like_team {
        return Err(SendTestError::BadWorkspace(workspace.to_string()));
    }
    let event = Event {
        id: format!("send-test-{}", uuid::Uuid::new_v4()),
        kind: EVENT_TYPE.to_string(),
        severity: Severity::Info,
        title: message.unwrap_or(DEFAULT_TITLE).to_string(),
        workspace: Some(workspace.to_string()),
        occurred_at: Some(chrono::Utc::now().fixed_offset()),
        source: Some("alert-router send-test".into()),
        summary: None,
        ticket: None,
        assignee: None,
        level: None,
        labels: None,
        comment: None,
        targets: Some(vec![target]),
        dedup_key: None,
        acknowledged_by: None,
        received: Default::default(),
    };
    event.validate()?;
    Ok(event)
}

/// The first problem of a rules file, in one line.
fn rules_problem(errors: &RulesErrors) -> String {
    let text = errors.to_string();
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let first = lines.next().unwrap_or("not valid").trim().to_string();
    match lines.count() {
        0 => first,
        more => format!("{first} (and {more} more lines)"),
    }
}

/// `delivered to slack:C0PAY (#payments)`, `emailed o***@example.com (…)`,
/// `not delivered to C0PAY: …`.
fn describe(report: &TargetReport, addresses: Addresses) -> String {
    // What the person asked for: `#payments`, `C0PAY`, `U0ANA`, an address.
    let asked = report
        .target
        .split_once(':')
        .map_or(report.target.as_str(), |(_, value)| value);
    let text = match &report.status {
        TargetStatus::Delivered { to } => match (to.strip_prefix("email:"), &report.note) {
            (Some(emails), Some(note)) => {
                let note = note.strip_prefix("Slack cannot take it: ").unwrap_or(note);
                format!("emailed {emails} (Slack could not take it: {note})")
            }
            (Some(emails), None) => format!("emailed {emails}"),
            (None, Some(note)) => {
                format!("delivered to {to}, the default channel, instead of {asked} ({note})")
            }
            (None, None) if matches!(report.kind, "slack_user" | "slack_email") => {
                format!("delivered to {to} (direct message to {asked})")
            }
            (None, None) if to.strip_prefix("slack:") == Some(asked) => {
                format!("delivered to {to}")
            }
            (None, None) => format!("delivered to {to} ({asked})"),
        },
        TargetStatus::AlreadyDelivered => format!("{asked}: already delivered"),
        TargetStatus::Failed { detail, .. } => format!("not delivered to {asked}: {detail}"),
        TargetStatus::Deferred { wait } => format!(
            "not delivered to {asked}: Slack's rate limit has no room for it for another {wait:.0?}; try again then"
        ),
        TargetStatus::Skipped { reason } => format!("{asked}: skipped: {reason}"),
    };
    addresses.text(&text).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(to: &str) -> Result<Target, String> {
        parse_target(to).map_err(|e| e.to_string())
    }

    #[test]
    fn every_form_of_to_becomes_its_target() {
        assert_eq!(
            target("C0PAYMENTS"),
            Ok(Target::SlackChannel("C0PAYMENTS".into()))
        );
        assert_eq!(
            target("G0PRIVATE"),
            Ok(Target::SlackChannel("G0PRIVATE".into()))
        );
        assert_eq!(
            target("#payments"),
            Ok(Target::SlackChannel("#payments".into()))
        );
        assert_eq!(
            target("#on-call_2"),
            Ok(Target::SlackChannel("#on-call_2".into()))
        );
        assert_eq!(target("U0ANA"), Ok(Target::SlackUser("U0ANA".into())));
        assert_eq!(
            target("W0ENTERPRISE"),
            Ok(Target::SlackUser("W0ENTERPRISE".into()))
        );
        assert_eq!(
            target(" ana@example.com "),
            Ok(Target::SlackEmail("ana@example.com".into()))
        );
    }

    #[test]
    fn a_bad_to_is_refused_with_a_sentence_saying_what_would_do() {
        let bare = target("payments").unwrap_err();
        assert!(bare.contains("write #payments"), "{bare}");
        assert!(target("").unwrap_err().contains("is empty"));
        assert!(
            target("#")
                .unwrap_err()
                .contains("not a Slack channel name")
        );
        assert!(
            target("#Payments Team")
                .unwrap_err()
                .contains("not a Slack channel name")
        );
        assert!(target("ana@").unwrap_err().contains("not an email address"));
        assert!(target("D0DM").unwrap_err().contains("user id (U…)"));
        assert!(target("X0THING").unwrap_err().contains("not a channel id"));
        assert!(target("c0lower").unwrap_err().contains("write #c0lower"));
    }

    #[test]
    fn the_test_event_is_its_own_info_incident_in_the_workspace() {
        let event = test_event("T0AEXY01", Target::SlackUser("U0ANA".into()), None).unwrap();
        assert!(event.id.starts_with("send-test-"), "{}", event.id);
        assert_eq!(event.kind, "alert_router.test");
        assert_eq!(event.severity, Severity::Info);
        assert_eq!(event.title, DEFAULT_TITLE);
        assert_eq!(event.workspace.as_deref(), Some("T0AEXY01"));
        assert_eq!(event.own_targets(), &[Target::SlackUser("U0ANA".into())]);
        assert_eq!(event.incident_key(), format!("event:{}", event.id));
        let other = test_event("T0AEXY01", Target::SlackUser("U0ANA".into()), Some("hi")).unwrap();
        assert_ne!(event.id, other.id, "every test is new, never deduplicated");
        assert_eq!(other.title, "hi");
    }

    #[test]
    fn a_bad_workspace_or_message_is_refused_before_anything_is_sent() {
        let to = || Target::SlackChannel("C0PAY".into());
        assert!(matches!(
            test_event("payments", to(), None),
            Err(SendTestError::BadWorkspace(_))
        ));
        let long = "x".repeat(1001);
        let err = test_event("T0AEXY01", to(), Some(&long)).unwrap_err();
        assert!(err.to_string().contains("title"), "{err}");
        assert!(err.is_bad_input());
        assert!(matches!(
            test_event("T0AEXY01", to(), Some("")),
            Err(SendTestError::InvalidEvent(_))
        ));
    }

    fn line(target: &str, status: TargetStatus, note: Option<&str>, show: bool) -> String {
        let kind = match target.split_once(':') {
            Some(("slack_user", _)) => "slack_user",
            Some(("slack_email", _)) => "slack_email",
            _ => "slack_channel",
        };
        describe(
            &TargetReport {
                target: target.into(),
                kind,
                status,
                note: note.map(str::to_string),
            },
            Addresses::new(show),
        )
    }

    #[test]
    fn each_outcome_reads_as_one_line_naming_the_place() {
        let delivered = |to: &str| TargetStatus::Delivered { to: to.into() };
        assert_eq!(
            line(
                "slack_channel:#payments",
                delivered("slack:C0PAY"),
                None,
                false
            ),
            "delivered to slack:C0PAY (#payments)"
        );
        assert_eq!(
            line("slack_user:U0ANA", delivered("slack:D0ANA"), None, false),
            "delivered to slack:D0ANA (direct message to U0ANA)"
        );
        assert_eq!(
            line(
                "slack_channel:C0OLD",
                delivered("slack:C0ESC"),
                Some("chat.postMessage: is_archived"),
                false
            ),
            "delivered to slack:C0ESC, the default channel, instead of C0OLD (chat.postMessage: is_archived)"
        );
        assert_eq!(
            line("slack_channel:C0PAY", delivered("slack:C0PAY"), None, false),
            "delivered to slack:C0PAY"
        );
        assert_eq!(
            line(
                "slack_email:ana@example.com",
                delivered("slack:D0ANA"),
                None,
                false
            ),
            "delivered to slack:D0ANA (direct message to a***@example.com)"
        );
        assert_eq!(
            line(
                "slack_email:nobody@example.com",
                delivered("email:nobody@example.com"),
                Some("no Slack user has the email nobody@example.com"),
                false
            ),
            "emailed n***@example.com (Slack could not take it: no Slack user has the email n***@example.com)"
        );
        assert_eq!(
            line(
                "slack_channel:C0PAY",
                delivered("email:oncall@example.com"),
                Some("Slack cannot take it: chat.postMessage: http_503"),
                true
            ),
            "emailed oncall@example.com (Slack could not take it: chat.postMessage: http_503)"
        );
        assert_eq!(
            line(
                "slack_channel:C0PAY",
                TargetStatus::Failed {
                    detail: "no Slack token for workspace T1".into(),
                    retryable: true
                },
                None,
                false
            ),
            "not delivered to C0PAY: no Slack token for workspace T1"
        );
    }
}
