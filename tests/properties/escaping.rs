//! Escaping: whatever text an event (or the worker's context) carries, the
//! rendered message holds no live mention or control sequence. In mrkdwn and
//! the top-level `text` every `&`, `<`, `>` from outside is `&amp;`, `&lt;`,
//! `&gt;` (Slack's documented escaping, nothing else); in `plain_text` every
//! `<` is followed by a word joiner.

use alert_router::deliver::slack::message::{
    IncidentRef, RenderContext, Status, escape, neutralise_plain, render,
};
use alert_router::event::{Assignee, Event, Severity, Ticket};
use chrono::{DateTime, FixedOffset};
use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::sample::select;
use regex::Regex;
use serde_json::Value;

use super::{WORD_JOINER, hostile_text, mrkdwn_sequences, unescape};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn escape_leaves_only_whole_entities_and_undoes_exactly(text in hostile_text(40)) {
        let escaped = escape(&text);
        prop_assert_eq!(mrkdwn_sequences(&escaped), Ok(vec![]));
        prop_assert_eq!(unescape(&escaped), text.clone());
        // Only the three characters: everything else passes as it is.
        let others: String = text.chars().filter(|c| !matches!(c, '&' | '<' | '>')).collect();
        prop_assert_eq!(escape(&others), others);
    }

    #[test]
    fn neutralised_plain_text_has_a_word_joiner_after_every_angle_bracket(
        text in hostile_text(40),
    ) {
        let plain = neutralise_plain(&text);
        prop_assert!(every_angle_bracket_is_joined(&plain), "{plain:?}");
        prop_assert_eq!(plain.replace(WORD_JOINER, ""), text.replace(WORD_JOINER, ""));
    }
}

pub fn every_angle_bracket_is_joined(text: &str) -> bool {
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '<' && chars.peek() != Some(&WORD_JOINER) {
            return false;
        }
    }
    true
}

// ---------------------------------------------------------------------------
// Whole messages.

/// An event with hostile text in every field that reaches the message.
#[derive(Debug, Clone)]
pub struct Case {
    pub event: Event,
    pub rule: Option<String>,
    pub rerouted_from: Option<String>,
    pub escalation: Option<String>,
    pub emailed_note: Option<String>,
    pub incident: Option<(String, String)>,
    pub status: Option<(Option<String>, i64, bool)>,
    pub plain_text: bool,
    pub without_metadata: bool,
}

impl Case {
    /// The message as Slack receives it.
    pub fn rendered(&self) -> Value {
        let context = RenderContext {
            rule: self.rule.as_deref(),
            rerouted_from: self.rerouted_from.as_deref(),
            plain_text: self.plain_text,
            without_metadata: self.without_metadata,
            target: "slack_channel:#payments",
            incident: self.incident.as_ref().map(|(w, k)| IncidentRef {
                workspace: w,
                key: k,
                since_ms: Some(1_764_000_000_123),
            }),
            status: self.status.as_ref().map(|(by, at, resolved)| {
                if *resolved {
                    Status::Resolved { at_unix: *at }
                } else {
                    Status::Acknowledged {
                        by: by.as_deref(),
                        at_unix: *at,
                    }
                }
            }),
            escalation: self.escalation.as_deref(),
            emailed_note: self.emailed_note.as_deref(),
        };
        serde_json::from_slice(&render(&self.event, &context).to_json())
            .expect("the message is JSON")
    }
}

/// A ticket URL: a web link (with hostile and long paths), or not one.
fn url() -> impl Strategy<Value = String> {
    let path = prop::collection::vec(
        select(vec![
            "a",
            "&",
            "<",
            ">",
            "|",
            "%20",
            "é",
            "🔴",
            "?q=1&r=<2>",
            "/",
        ]),
        0..=700,
    )
    .prop_map(|p| p.concat());
    prop_oneof![
        path.clone()
            .prop_map(|p| format!("https://support.example.com/{p}")),
        path.prop_map(|p| format!("http://t.example/{p}")),
        Just("javascript:alert(1)".to_string()),
        hostile_text(6),
    ]
}

fn occurred_at() -> impl Strategy<Value = DateTime<FixedOffset>> {
    (0i64..4_000_000_000, -14 * 60..=14 * 60i32).prop_map(|(secs, minutes)| {
        let offset = FixedOffset::east_opt(minutes * 60).expect("within a day");
        DateTime::from_timestamp(secs, 0)
            .expect("in range")
            .with_timezone(&offset)
    })
}

/// Text that is long for some fields: over every limit once escaped.
fn long_text() -> impl Strategy<Value = String> {
    prop_oneof![3 => hostile_text(30), 1 => hostile_text(1200)]
}

pub fn case() -> impl Strategy<Value = Case> {
    let short = || prop::option::of(hostile_text(12));
    let event = (
        (
            hostile_text(12),
            "[a-z0-9_.-]{1,30}",
            select(vec![
                Severity::Critical,
                Severity::High,
                Severity::Medium,
                Severity::Low,
                Severity::Info,
            ]),
            long_text(),
            short(),
            prop::option::of(long_text()),
            prop::option::of(long_text()),
        ),
        (
            prop::option::of((
                prop::option::of(long_text()),
                short(),
                prop::option::of(url()),
            )),
            prop::option::of((short(), short())),
            prop::option::of(any::<u64>()),
            prop::option::of(occurred_at()),
        ),
    )
        .prop_map(
            |(
                (id, kind, severity, title, source, summary, comment),
                (ticket, assignee, level, occurred_at),
            )| Event {
                id,
                kind,
                severity,
                title,
                workspace: None,
                occurred_at,
                source,
                summary,
                ticket: ticket.map(|(number, form, url)| Ticket { number, form, url }),
                assignee: assignee.map(|(name, email)| Assignee {
                    name,
                    email,
                    slack_user: None,
                }),
                level,
                labels: None,
                comment,
                targets: None,
                dedup_key: None,
                acknowledged_by: None,
                received: Default::default(),
            },
        );
    let acknowledger = prop_oneof![
        hostile_text(8),
        "[UW][A-Z0-9]{1,12}",
        "U[A-Z0-9]{0,3}[a-z<>!|][A-Z0-9]{0,3}",
    ];
    (
        event,
        (short(), short(), short(), short()),
        prop::option::of((hostile_text(8), hostile_text(8))),
        prop::option::of((
            prop::option::of(acknowledger),
            -1i64..4_000_000_000,
            any::<bool>(),
        )),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(
                event,
                (rule, rerouted_from, escalation, emailed_note),
                incident,
                status,
                plain_text,
                without_metadata,
            )| Case {
                event,
                rule,
                rerouted_from,
                escalation,
                emailed_note,
                incident,
                status,
                plain_text,
                without_metadata,
            },
        )
}

/// Every text object of `kind` (`mrkdwn`, `plain_text`) in the message.
pub fn texts_of(value: &Value, kind: &str) -> Vec<String> {
    let mut out = Vec::new();
    collect(value, kind, &mut out);
    out
}

fn collect(value: &Value, kind: &str, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if map.get("type").and_then(Value::as_str) == Some(kind)
                && let Some(text) = map.get("text").and_then(Value::as_str)
            {
                out.push(text.to_string());
            }
            map.values().for_each(|v| collect(v, kind, out));
        }
        Value::Array(items) => items.iter().for_each(|v| collect(v, kind, out)),
        _ => {}
    }
}

/// A Slack user id as the status line shows it: `U`/`W`, upper-case and digits.
fn is_user_id(text: &str) -> bool {
    text.len() >= 3
        && text.len() <= 32
        && text.starts_with(['U', 'W'])
        && text
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

/// `<!date^1700000000^{date_short_pretty} {time}|2023-11-14T22:13:20+00:00>`.
fn date_sequence() -> &'static Regex {
    static DATE: OnceLock<Regex> = OnceLock::new();
    DATE.get_or_init(|| {
        Regex::new(r"^<!date\^-?[0-9]+\^\{date_short_pretty\} \{time\}\|[^<>|]*>$")
            .expect("a valid regex")
    })
}

/// The sequences the worker itself writes into mrkdwn, which Slack is meant
/// to act on: a date (`<!date^…|…>`), the ticket's own web link, and the
/// acknowledger's user id in a status line. Anything else is a leak.
fn is_own_sequence(sequence: &str, case: &Case) -> bool {
    let is_date = date_sequence().is_match(sequence);
    let ticket_url = case
        .event
        .ticket
        .as_ref()
        .and_then(|t| t.url.as_deref())
        .filter(|u| {
            (u.starts_with("https://") || u.starts_with("http://"))
                && !u.contains(char::is_whitespace)
        });
    let is_ticket_link =
        ticket_url.is_some_and(|url| sequence.starts_with(&format!("<{}|", escape(url))));
    let is_acknowledger = case
        .status
        .as_ref()
        .and_then(|(by, _, resolved)| by.as_deref().filter(|_| !resolved))
        .is_some_and(|by| is_user_id(by) && sequence == format!("<@{by}>"));
    is_date || is_ticket_link || is_acknowledger
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(600))]

    #[test]
    fn no_event_text_is_live_anywhere_in_the_message(case in case()) {
        let message = case.rendered();
        for text in texts_of(&message, "mrkdwn") {
            let sequences = mrkdwn_sequences(&text);
            prop_assert!(sequences.is_ok(), "mrkdwn {:?}", sequences);
            for sequence in sequences.unwrap_or_default() {
                prop_assert!(
                    is_own_sequence(sequence, &case),
                    "live {sequence:?} in mrkdwn {text:?}"
                );
            }
        }
        let fallback = message["text"].as_str().expect("text is always set");
        prop_assert_eq!(mrkdwn_sequences(fallback), Ok(vec![]), "the text fallback");
        for text in texts_of(&message, "plain_text") {
            prop_assert!(every_angle_bracket_is_joined(&text), "plain_text {text:?}");
        }
    }

    #[test]
    fn the_header_and_summary_show_the_event_text_as_written(case in case()) {
        // The layout, not the plain-text retry that has none.
        let message = Case { plain_text: false, ..case.clone() }.rendered();
        let blocks = message["blocks"].as_array().expect("blocks");
        let header = blocks
            .iter()
            .find(|b| b["type"] == "header")
            .and_then(|b| b["text"]["text"].as_str())
            .expect("a header");
        // The severity's emoji and a space, then the title.
        let shown: String = header.chars().skip(2).filter(|c| *c != WORD_JOINER).collect();
        let title: String = case.event.title.chars().filter(|c| *c != WORD_JOINER).collect();
        assert_shown_as_written(&shown, &title, header.chars().count(), 150)?;

        if let Some(summary) = case.event.summary.as_deref().filter(|s| !s.trim().is_empty()) {
            let section = blocks
                .iter()
                .filter(|b| b["type"] == "section")
                .find_map(|b| b["text"]["text"].as_str())
                .expect("the summary's section, the first with a text");
            assert_shown_as_written(&unescape(section), summary, section.chars().count(), 3000)?;
        }
    }
}

/// `shown` is `written`, or a cut of it ending in `…` that lost at most the
/// few characters of one entity or `<` (its length is `len` of `limit`).
fn assert_shown_as_written(
    shown: &str,
    written: &str,
    len: usize,
    limit: usize,
) -> Result<(), TestCaseError> {
    match shown.strip_suffix('…') {
        Some(kept) if shown != written => {
            prop_assert!(
                written.starts_with(kept),
                "{shown:?} is not a cut of {written:?}"
            );
            prop_assert!(
                len + 6 >= limit,
                "cut to {len} characters of {limit}: {shown:?}"
            );
        }
        _ => prop_assert_eq!(shown, written),
    }
    Ok(())
}
