//! Seeing the main job work without a Slack workspace.
//!
//! - [`builder_url`]: a Block Kit Builder link for a rendered message
//!   (`alert-router preview EVENT.json`).
//! - [`Preview`]: the message the worker would post for an event, with
//!   the first matched rule and the incident as the worker names them.
//! - [`stand_in`] and [`smtp_stand_in`]: what answers for Slack and for the
//!   SMTP server in `run --dry-run`.

pub mod page;
pub mod smtp_stand_in;
pub mod stand_in;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use crate::deliver::slack::message::{IncidentRef, Message, RenderContext, render};
use crate::event::Event;
use crate::rules::Rules;

/// Slack's Block Kit Builder: it reads the message from the URL fragment, a
/// percent-encoded JSON object with `blocks` (and `attachments`). The
/// fragment never reaches a server, so the preview shares nothing by itself.
pub const BUILDER_URL: &str = "https://app.slack.com/block-kit-builder#";

/// What JavaScript's `encodeURIComponent` leaves as is, which is what the
/// builder's own share links are decoded with.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'!')
    .remove(b'~')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

/// The workspace named in a preview when neither the event nor the settings
/// name one: the Acknowledge button needs some value.
pub const PLACEHOLDER_WORKSPACE: &str = "T00000000";

/// A Block Kit Builder link showing `message`'s blocks and colour bar.
pub fn builder_url(message: &Message<'_>) -> String {
    let payload = serde_json::json!({
        "blocks": message.blocks,
        "attachments": message.attachments,
    });
    let json = payload.to_string();
    format!("{BUILDER_URL}{}", utf8_percent_encode(&json, COMPONENT))
}

/// A rendered preview: the message and where it would go.
#[derive(Debug, Clone)]
pub struct Preview {
    /// The first routed target (`slack_channel:#payments`), `None` when the
    /// rules send nothing.
    pub target: Option<String>,
    /// The first matched rule.
    pub rule: Option<String>,
    /// The workspace the incident is named in.
    pub workspace: String,
    /// The incident key the Acknowledge button carries.
    pub incident: String,
}

impl Preview {
    /// Routes `event` as the worker would and names what the first post carries.
    pub fn of(event: &Event, rules: &Rules, default_workspace: Option<&str>) -> Preview {
        let routing = rules.route(event);
        let first = routing.targets.first();
        Preview {
            target: first.map(|t| t.target.to_string()),
            // The rule that produced the first target, as the worker's first
            // post names it; else the first rule that matched at all.
            rule: first
                .and_then(|t| t.rule.clone())
                .or_else(|| routing.matched_rules.first().cloned()),
            workspace: event
                .workspace
                .as_deref()
                .or(default_workspace)
                .unwrap_or(PLACEHOLDER_WORKSPACE)
                .to_string(),
            incident: event.incident_key().into_owned(),
        }
    }

    /// The `chat.postMessage` body for `event` (without `channel`), as the
    /// worker renders a new incident's first message.
    pub fn render<'a>(&'a self, event: &'a Event) -> Message<'a> {
        let context = RenderContext {
            rule: self.rule.as_deref(),
            target: self.target.as_deref().unwrap_or(""),
            incident: Some(IncidentRef {
                workspace: &self.workspace,
                key: &self.incident,
                since_ms: None,
            }),
            ..RenderContext::default()
        };
        render(event, &context)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builder_link_carries_the_blocks_percent_encoded_in_the_fragment() {
        let event = Event::decode(
            br#"{"id":"e1","type":"escalation.escalated","severity":"high","title":"A & B"}"#,
            65536,
        )
        .unwrap();
        let preview = Preview {
            target: None,
            rule: None,
            workspace: "T1".into(),
            incident: "event:e1".into(),
        };
        let url = builder_url(&preview.render(&event));
        let fragment = url.strip_prefix(BUILDER_URL).unwrap();
        assert!(!fragment.contains(['"', ' ', '{', '&', '#']), "{fragment}");
        let decoded = percent_encoding::percent_decode_str(fragment)
            .decode_utf8()
            .unwrap();
        let json: serde_json::Value = serde_json::from_str(&decoded).unwrap();
        assert_eq!(json["blocks"][0]["type"], "header");
        assert!(json["attachments"][0]["color"].is_string());
    }
}
