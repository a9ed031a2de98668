//! Renders an event as a Slack message: Block Kit layout, colour bar, plain-text fallback, metadata.
//!
//! All event text placed in mrkdwn is escaped (`&`, `<`, `>`), so a title such
//! as `<!channel>` shows literally instead of paging a whole channel. Every
//! piece is cut to Slack's documented limits so a long event never makes the
//! post fail.

use serde_json::{Value, json};

use crate::event::{Event, Severity};

/// Slack's limit on a header block's plain text.
const HEADER_LIMIT: usize = 150;
/// Slack's limit on a section's text.
const SECTION_LIMIT: usize = 3000;
/// Slack's limit on a field's text.
const FIELD_LIMIT: usize = 2000;
/// Kept well under Slack's 40,000-character truncation, and readable in a notification.
const FALLBACK_LIMIT: usize = 3000;
/// Slack's limit on a button value.
const BUTTON_VALUE_LIMIT: usize = 2000;

/// `action_id` of the Acknowledge button, for the interactivity endpoint.
pub const ACK_ACTION_ID: &str = "alert_router_ack";
/// `event_type` of the message metadata on every post.
pub const METADATA_EVENT_TYPE: &str = "alert_router_notification";

/// What a rendered post is for, beyond the event itself.
#[derive(Debug, Clone, Default)]
pub struct RenderContext<'a> {
    /// The rule that routed the event here (`None`: the event's own targets).
    pub rule: Option<&'a str>,
    /// Set when the post lands somewhere other than intended, e.g. the default
    /// channel standing in for an archived one: said at the top of the message.
    pub rerouted_from: Option<&'a str>,
}

/// The `chat.postMessage` fields for one event, without `channel`.
pub fn render(event: &Event, context: &RenderContext<'_>) -> Value {
    let mut blocks = Vec::new();
    if let Some(intended) = context.rerouted_from {
        blocks.push(json!({
            "type": "context",
            "elements": [{"type": "mrkdwn", "text": truncate(&format!(
                ":warning: Meant for {}, which could not take it.", escape(intended)), SECTION_LIMIT)}]
        }));
    }
    blocks.push(json!({
        "type": "header",
        "text": {"type": "plain_text", "emoji": true,
                 "text": truncate(&format!("{} {}", severity_emoji(event.severity), event.title), HEADER_LIMIT)}
    }));

    let mut fields = vec![field("Severity", &severity_label(event.severity))];
    if let Some(ticket) = &event.ticket {
        let number = ticket.number.as_deref().map(escape);
        let shown = match (number, ticket.url.as_deref().filter(|u| is_web_url(u))) {
            (Some(number), Some(url)) => Some(format!("<{}|{}>", escape(url), number)),
            (Some(number), None) => Some(number),
            (None, Some(url)) => Some(format!("<{}|open>", escape(url))),
            (None, None) => None,
        };
        if let Some(shown) = shown {
            fields.push(field("Ticket", &shown));
        }
        if let Some(form) = &ticket.form {
            fields.push(field("Form", &escape(form)));
        }
    }
    if let Some(assignee) = &event.assignee {
        let shown = match (&assignee.name, &assignee.email) {
            (Some(name), _) => Some(escape(name)),
            (None, Some(email)) => Some(escape(email)),
            (None, None) => None,
        };
        if let Some(shown) = shown {
            fields.push(field("Assignee", &shown));
        }
    }
    if let Some(level) = event.level {
        fields.push(field("Level", &level.to_string()));
    }
    if let Some(source) = &event.source {
        fields.push(field("Source", &escape(source)));
    }
    if let Some(at) = event.occurred_at {
        fields.push(field(
            "Occurred",
            &format!(
                "<!date^{}^{{date_short_pretty}} {{time}}|{}>",
                at.timestamp(),
                at.to_rfc3339()
            ),
        ));
    }
    // Slack allows at most 10 fields in a section.
    fields.truncate(10);
    blocks.push(json!({"type": "section", "fields": fields}));

    if let Some(summary) = event.summary.as_deref().filter(|s| !s.trim().is_empty()) {
        blocks.push(json!({"type": "section", "text": {"type": "mrkdwn", "text": truncate(&escape(summary), SECTION_LIMIT)}}));
    }
    if let Some(comment) = event.comment.as_deref().filter(|s| !s.trim().is_empty()) {
        blocks.push(json!({"type": "section", "text": {"type": "mrkdwn",
            "text": truncate(&format!(":speech_balloon: {}", escape(comment)), SECTION_LIMIT)}}));
    }

    let mut actions = vec![json!({
        "type": "button",
        "action_id": ACK_ACTION_ID,
        "text": {"type": "plain_text", "text": "Acknowledge"},
        "style": "primary",
        "value": truncate(&event.id, BUTTON_VALUE_LIMIT),
    })];
    if let Some(url) = event
        .ticket
        .as_ref()
        .and_then(|t| t.url.as_deref())
        .filter(|u| is_web_url(u) && u.len() <= 3000)
    {
        actions.push(json!({
            "type": "button",
            "action_id": "alert_router_open_ticket",
            "text": {"type": "plain_text", "text": "Open ticket"},
            "url": url,
        }));
    }
    blocks.push(json!({"type": "actions", "elements": actions}));

    let mut context_line = format!("`{}` · event `{}`", escape(&event.kind), escape(&event.id));
    if let Some(rule) = context.rule {
        context_line.push_str(&format!(" · rule `{}`", escape(rule)));
    }
    json!({
        "text": fallback_text(event, context),
        "blocks": blocks,
        "attachments": [{
            "color": severity_color(event.severity),
            "blocks": [{"type": "context", "elements": [{"type": "mrkdwn", "text": truncate(&context_line, SECTION_LIMIT)}]}],
        }],
        "metadata": {
            "event_type": METADATA_EVENT_TYPE,
            // Slack metadata values are strings, numbers, booleans or objects (no null): "" is "no rule".
            "event_payload": {"event_id": event.id, "rule": context.rule.unwrap_or("")},
        },
        "unfurl_links": false,
        "unfurl_media": false,
    })
}

/// The notification text: what phones and screen readers show.
pub fn fallback_text(event: &Event, context: &RenderContext<'_>) -> String {
    let mut text = format!("[{}] {}", severity_label(event.severity), event.title);
    if let Some(number) = event.ticket.as_ref().and_then(|t| t.number.as_deref()) {
        text.push_str(&format!(" ({number})"));
    }
    if let Some(intended) = context.rerouted_from {
        text.push_str(&format!(" — meant for {intended}"));
    }
    truncate(&escape(&text), FALLBACK_LIMIT)
}

/// Escapes the three characters Slack's mrkdwn treats as control characters.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

/// Cuts `text` to at most `limit` characters, ending with `…` when cut, and
/// never inside an `&amp;`-style entity.
pub fn truncate(text: &str, limit: usize) -> String {
    if text.chars().count() <= limit {
        return text.to_string();
    }
    let mut out: String = text.chars().take(limit.saturating_sub(1)).collect();
    if let Some(amp) = out.rfind('&')
        && !out[amp..].contains(';')
    {
        out.truncate(amp);
    }
    out.push('…');
    out
}

fn field(label: &str, value: &str) -> Value {
    json!({"type": "mrkdwn", "text": truncate(&format!("*{label}*\n{value}"), FIELD_LIMIT)})
}

/// Whether `url` is an http(s) link safe to show as one.
pub(crate) fn is_web_url(url: &str) -> bool {
    (url.starts_with("https://") || url.starts_with("http://"))
        && !url.contains(char::is_whitespace)
}

/// `CRITICAL`, `HIGH`, … for subjects and fallback text.
pub(crate) fn severity_label(severity: Severity) -> String {
    severity.as_str().to_uppercase()
}

fn severity_emoji(severity: Severity) -> &'static str {
    match severity {
        Severity::Critical => "🔴",
        Severity::High => "🟠",
        Severity::Medium => "🟡",
        Severity::Low => "🔵",
        Severity::Info => "⚪",
    }
}

/// The attachment colour bar for a severity.
pub fn severity_color(severity: Severity) -> &'static str {
    match severity {
        Severity::Critical => "#E01E5A",
        Severity::High => "#F2952F",
        Severity::Medium => "#ECB22E",
        Severity::Low => "#36C5F0",
        Severity::Info => "#9DA0A4",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::DEFAULT_MAX_BODY_BYTES;

    fn event(json: &str) -> Event {
        Event::decode(json.as_bytes(), DEFAULT_MAX_BODY_BYTES).unwrap()
    }

    fn all_mrkdwn(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                if map.get("type").and_then(Value::as_str) == Some("mrkdwn")
                    && let Some(text) = map.get("text").and_then(Value::as_str)
                {
                    out.push(text.to_string());
                }
                map.values().for_each(|v| all_mrkdwn(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| all_mrkdwn(v, out)),
            _ => {}
        }
    }

    #[test]
    fn mentions_in_event_text_cannot_ping_anyone() {
        let e = event(
            r#"{"id":"x","type":"t","severity":"high","title":"<!channel> down","summary":"<!here> and <@U123>",
                "comment":"<!everyone> <https://evil|click>","assignee":{"name":"<@U999>"},"source":"a&b"}"#,
        );
        let message = render(&e, &RenderContext::default());
        let mut texts = Vec::new();
        all_mrkdwn(&message, &mut texts);
        texts.push(message["text"].as_str().unwrap().to_string());
        for text in texts {
            for live in [
                "<!channel>",
                "<!here>",
                "<@U123>",
                "<!everyone>",
                "<@U999>",
                "<https://evil",
            ] {
                assert!(!text.contains(live), "{live} is live in {text}");
            }
        }
        assert_eq!(message["text"], "[HIGH] &lt;!channel&gt; down");
    }

    #[test]
    fn the_message_carries_ticket_assignee_colour_button_and_metadata() {
        let e = event(
            r#"{"id":"esc-1","type":"escalation.escalated","severity":"critical","title":"Checkout down",
                "ticket":{"number":"TCK-2041","form":"Incident report","url":"https://support.example.com/t/2041"},
                "assignee":{"name":"Ana Ruiz","email":"ana@example.com"},"level":2}"#,
        );
        let message = render(
            &e,
            &RenderContext {
                rule: Some("payments-critical"),
                rerouted_from: None,
            },
        );
        let rendered = message.to_string();
        for expected in [
            "TCK-2041",
            "Incident report",
            "Ana Ruiz",
            "Level",
            "Acknowledge",
            ACK_ACTION_ID,
            "https://support.example.com/t/2041",
        ] {
            assert!(rendered.contains(expected), "{expected} missing");
        }
        assert_eq!(message["attachments"][0]["color"], "#E01E5A");
        assert_eq!(message["metadata"]["event_type"], METADATA_EVENT_TYPE);
        assert_eq!(message["metadata"]["event_payload"]["event_id"], "esc-1");
        assert_eq!(
            message["metadata"]["event_payload"]["rule"],
            "payments-critical"
        );
        assert_eq!(message["text"], "[CRITICAL] Checkout down (TCK-2041)");
    }

    #[test]
    fn long_text_is_cut_to_slack_limits() {
        let long = "x".repeat(1000);
        let summary = "&".repeat(5000);
        let e = event(&format!(
            r#"{{"id":"x","type":"t","severity":"info","title":"{long}","summary":"{summary}"}}"#
        ));
        let message = render(&e, &RenderContext::default());
        let header = message["blocks"][0]["text"]["text"].as_str().unwrap();
        assert_eq!(header.chars().count(), HEADER_LIMIT);
        assert!(header.ends_with('…'));
        let summary = message["blocks"][2]["text"]["text"].as_str().unwrap();
        assert!(summary.chars().count() <= SECTION_LIMIT);
        assert!(
            summary.trim_end_matches('…').ends_with("&amp;"),
            "no half entity"
        );
    }

    #[test]
    fn a_ticket_url_that_is_not_a_web_link_is_not_linked() {
        let e = event(
            r#"{"id":"x","type":"t","severity":"info","title":"t","ticket":{"number":"1","url":"javascript:alert(1)"}}"#,
        );
        assert!(
            !render(&e, &RenderContext::default())
                .to_string()
                .contains("javascript")
        );
    }
}
