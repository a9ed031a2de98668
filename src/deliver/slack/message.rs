//! Renders an event as a Slack message: Block Kit layout, colour bar, plain-text fallback, metadata.
//!
//! All event text placed in mrkdwn and in the top-level `text` is escaped
//! (`&`, `<`, `>`), so a title such as `<!channel>` shows literally instead of
//! paging a whole channel; in `plain_text` objects (the header) every `<` is
//! followed by an invisible word joiner (see [`neutralise_plain`]). Every
//! piece is cut to Slack's documented limits so a long event never makes the
//! post fail.

use serde::Serialize;

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
    /// Only the notification text and metadata, no layout: for a second try
    /// after Slack refused the blocks (`invalid_blocks` and the like).
    pub plain_text: bool,
    /// No message metadata: for a second try after Slack refused it
    /// (`invalid_metadata_*`, `metadata_too_large`).
    pub without_metadata: bool,
    /// The target as routed (`slack_channel:#payments`), carried in the
    /// metadata so a lost post can be recognised for its target.
    pub target: &'a str,
    /// The incident the event belongs to: the Acknowledge button names it.
    pub incident: Option<IncidentRef<'a>>,
    /// How the incident stands, for a first message being updated; `None`
    /// for a new post (open, with its Acknowledge button).
    pub status: Option<Status<'a>>,
    /// Set when this post is a step of an escalation chain: said at the top.
    pub escalation: Option<&'a str>,
    /// Said at the top when earlier notifications of the incident went to
    /// email because Slack could not take them.
    pub emailed_note: Option<&'a str>,
}

/// Which incident a message is about, as the Acknowledge button carries it.
#[derive(Debug, Clone, Copy)]
pub struct IncidentRef<'a> {
    pub workspace: &'a str,
    pub key: &'a str,
    /// When this incident began (Unix ms), if it is recorded: a key that
    /// fires again after a resolution (or the incident's lifetime) starts a
    /// new incident, and a button of the old one must not acknowledge it.
    pub since_ms: Option<u64>,
}

/// What the Acknowledge button's `value` holds: enough to find the incident.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct AckButtonValue {
    /// Workspace.
    pub w: String,
    /// Incident key.
    pub k: String,
    /// When the incident began (Unix ms): which incident of that key.
    /// Absent on buttons posted before it was added; they name the key only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub f: Option<u64>,
}

/// An incident's state, shown on its first messages once it changes.
#[derive(Debug, Clone, Copy)]
pub enum Status<'a> {
    /// `by` is a Slack user id (`U…`) or a name; `at_unix` when.
    Acknowledged {
        by: Option<&'a str>,
        at_unix: i64,
    },
    Resolved {
        at_unix: i64,
    },
}

/// The `chat.postMessage` body for one event. Typed rather than a
/// `serde_json::Value` tree: it is built for every post, and serialising
/// structs straight to bytes costs a fraction of building a map of maps.
#[derive(Debug, Clone, Serialize)]
pub struct Message<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<&'a str>,
    pub text: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub blocks: Vec<Block<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<Attachment>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata<'a>>,
    pub unfurl_links: bool,
    pub unfurl_media: bool,
    /// A reply in this message's thread.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thread_ts: Option<&'a str>,
    /// A thread reply also shown in the channel.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub reply_broadcast: bool,
    /// For `chat.update`: the message to replace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ts: Option<&'a str>,
}

impl<'a> Message<'a> {
    /// The same message addressed to `channel` (a channel id, `#name` or user id).
    pub fn to(mut self, channel: &'a str) -> Message<'a> {
        self.channel = Some(channel);
        self
    }

    /// The same message as a reply in the thread of `ts`, also shown in
    /// the channel when `broadcast`.
    pub fn in_thread(mut self, ts: &'a str, broadcast: bool) -> Message<'a> {
        self.thread_ts = Some(ts);
        self.reply_broadcast = broadcast;
        self
    }

    /// The `chat.update` body replacing message `ts` in `channel` with this
    /// one. Without metadata: Slack keeps the message's own when none is sent.
    pub fn replacing(mut self, channel: &'a str, ts: &'a str) -> Message<'a> {
        self.channel = Some(channel);
        self.ts = Some(ts);
        self.metadata = None;
        self.unfurl_links = false;
        self.unfurl_media = false;
        self
    }

    /// Only the notification text and metadata: what is left to send when
    /// Slack refuses the layout (`invalid_blocks` and the like).
    pub fn plain_text(mut self) -> Message<'a> {
        self.blocks.clear();
        self.attachments.clear();
        self
    }

    /// The `chat.update` body for when Slack refuses the layout: the
    /// notification text led by `status`, and empty `blocks` and
    /// `attachments`, which `chat.update` needs to drop the old ones (and
    /// their Acknowledge button); left out, it keeps them.
    pub fn plain_update(self, status: Option<Status<'_>>) -> Vec<u8> {
        let mut message = self.plain_text();
        if let Some(status) = status {
            message.text = format!("{} {}", status_line(status), message.text);
        }
        let mut body = serde_json::to_value(&message).unwrap_or_default();
        if let Some(fields) = body.as_object_mut() {
            fields.insert("blocks".into(), serde_json::Value::Array(Vec::new()));
            fields.insert("attachments".into(), serde_json::Value::Array(Vec::new()));
        }
        serde_json::to_vec(&body).unwrap_or_default()
    }

    /// The JSON body to send.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain structs and strings to a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// One Block Kit block.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Block<'a> {
    Header {
        text: TextObject,
    },
    Section {
        #[serde(skip_serializing_if = "Option::is_none")]
        text: Option<TextObject>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        fields: Vec<TextObject>,
    },
    Context {
        elements: Vec<TextObject>,
    },
    Actions {
        elements: Vec<Button<'a>>,
    },
}

/// A Block Kit text object.
#[derive(Debug, Clone, Serialize)]
pub struct TextObject {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub emoji: Option<bool>,
}

impl TextObject {
    fn mrkdwn(text: String) -> TextObject {
        TextObject {
            kind: "mrkdwn",
            text,
            emoji: None,
        }
    }

    fn plain(text: String) -> TextObject {
        TextObject {
            kind: "plain_text",
            text,
            emoji: None,
        }
    }
}

/// A button element.
#[derive(Debug, Clone, Serialize)]
pub struct Button<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub action_id: &'static str,
    pub text: TextObject,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub style: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<&'a str>,
}

/// The colour bar: a legacy attachment holding one context block.
#[derive(Debug, Clone, Serialize)]
pub struct Attachment {
    pub color: &'static str,
    pub blocks: Vec<Block<'static>>,
}

/// Message metadata, so a post can be traced back to its event.
#[derive(Debug, Clone, Serialize)]
pub struct Metadata<'a> {
    pub event_type: &'static str,
    pub event_payload: MetadataPayload<'a>,
}

/// Slack metadata values are strings, numbers, booleans or objects (no null):
/// `rule` is `""` when no rule routed the event.
#[derive(Debug, Clone, Serialize)]
pub struct MetadataPayload<'a> {
    pub event_id: &'a str,
    pub rule: &'a str,
    pub target: &'a str,
}

/// The `chat.postMessage` fields for one event, without `channel`.
pub fn render<'a>(event: &'a Event, context: &RenderContext<'a>) -> Message<'a> {
    let mut blocks = Vec::with_capacity(6);
    if let Some(status) = context.status {
        blocks.push(Block::Context {
            elements: vec![TextObject::mrkdwn(status_line(status))],
        });
    }
    if let Some(after) = context.escalation {
        blocks.push(Block::Context {
            elements: vec![TextObject::mrkdwn(truncated(
                format!(
                    ":rotating_light: *Escalated*: not acknowledged {} after it was first notified.",
                    escape(after)
                ),
                SECTION_LIMIT,
            ))],
        });
    }
    if let Some(note) = context.emailed_note {
        blocks.push(Block::Context {
            elements: vec![TextObject::mrkdwn(truncated(
                format!(":email: {}", escape(note)),
                SECTION_LIMIT,
            ))],
        });
    }
    if let Some(intended) = context.rerouted_from {
        blocks.push(Block::Context {
            elements: vec![TextObject::mrkdwn(truncated(
                format!(
                    ":warning: Meant for {}, which could not take it.",
                    escape(intended)
                ),
                SECTION_LIMIT,
            ))],
        });
    }
    blocks.push(Block::Header {
        text: TextObject {
            emoji: Some(true),
            ..TextObject::plain(truncated(
                [
                    severity_emoji(event.severity),
                    " ",
                    &neutralise_plain(&event.title),
                ]
                .concat(),
                HEADER_LIMIT,
            ))
        },
    });

    let mut fields = vec![field("Severity", &severity_label(event.severity))];
    if let Some(ticket) = &event.ticket {
        let number = ticket.number.as_deref().map(escape);
        // A link the field's limit would cut would show its markup and lead
        // nowhere: then the number goes unlinked (the Open ticket button
        // still has the URL when Slack takes it).
        let link = |label: &str| {
            let url = ticket.url.as_deref().filter(|u| is_web_url(u))?;
            Some(format!("<{}|{label}>", escape(url))).filter(|link| fits_field("Ticket", link))
        };
        let shown = match number {
            Some(number) => Some(link(&number).unwrap_or(number)),
            None => link("open"),
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
    blocks.push(Block::Section { text: None, fields });

    if let Some(summary) = event.summary.as_deref().filter(|s| !s.trim().is_empty()) {
        blocks.push(Block::Section {
            text: Some(TextObject::mrkdwn(truncated(
                escape(summary),
                SECTION_LIMIT,
            ))),
            fields: Vec::new(),
        });
    }
    if let Some(comment) = event.comment.as_deref().filter(|s| !s.trim().is_empty()) {
        blocks.push(Block::Section {
            text: Some(TextObject::mrkdwn(truncated(
                format!(":speech_balloon: {}", escape(comment)),
                SECTION_LIMIT,
            ))),
            fields: Vec::new(),
        });
    }

    let mut actions = Vec::with_capacity(2);
    // Only an open incident can be acknowledged; a value Slack would refuse
    // (over its limit) leaves the button out rather than the message.
    if let (None, Some(incident)) = (context.status, context.incident) {
        let value = serde_json::to_string(&AckButtonValue {
            w: incident.workspace.to_string(),
            k: incident.key.to_string(),
            f: incident.since_ms,
        })
        .unwrap_or_default();
        if !value.is_empty() && value.chars().count() <= BUTTON_VALUE_LIMIT {
            actions.push(Button {
                kind: "button",
                action_id: ACK_ACTION_ID,
                text: TextObject::plain("Acknowledge".into()),
                style: Some("primary"),
                value: Some(value),
                url: None,
            });
        }
    }
    if let Some(url) = event
        .ticket
        .as_ref()
        .and_then(|t| t.url.as_deref())
        .filter(|u| is_web_url(u) && u.len() <= 3000)
    {
        actions.push(Button {
            kind: "button",
            action_id: "alert_router_open_ticket",
            text: TextObject::plain("Open ticket".into()),
            style: None,
            value: None,
            url: Some(url),
        });
    }
    if !actions.is_empty() {
        blocks.push(Block::Actions { elements: actions });
    }

    let mut context_line = [
        "`",
        &escape(&event.kind),
        "` · event `",
        &escape(&event.id),
        "`",
    ]
    .concat();
    if let Some(rule) = context.rule {
        context_line.push_str(" · rule `");
        context_line.push_str(&escape(rule));
        context_line.push('`');
    }
    let message = Message {
        channel: None,
        text: fallback_text(event, context),
        blocks,
        attachments: vec![Attachment {
            color: match context.status {
                Some(Status::Resolved { .. }) => RESOLVED_COLOR,
                _ => severity_color(event.severity),
            },
            blocks: vec![Block::Context {
                elements: vec![TextObject::mrkdwn(truncated(context_line, SECTION_LIMIT))],
            }],
        }],
        metadata: (!context.without_metadata).then(|| Metadata {
            event_type: METADATA_EVENT_TYPE,
            event_payload: MetadataPayload {
                event_id: &event.id,
                rule: context.rule.unwrap_or(""),
                target: context.target,
            },
        }),
        unfurl_links: false,
        unfurl_media: false,
        thread_ts: None,
        reply_broadcast: false,
        ts: None,
    };
    if context.plain_text {
        message.plain_text()
    } else {
        message
    }
}

/// The colour bar of a resolved incident's messages.
pub const RESOLVED_COLOR: &str = "#2EB67D";

/// `✅ Acknowledged by <@U0LEAD> at <date>`: a user id is shown as the
/// user (no notification: updates do not notify), anything else as text.
fn status_line(status: Status<'_>) -> String {
    let when = |at: i64| {
        let fallback = chrono::DateTime::from_timestamp(at, 0)
            .map(|t| t.to_rfc3339())
            .unwrap_or_default();
        format!("<!date^{at}^{{date_short_pretty}} {{time}}|{fallback}>")
    };
    match status {
        Status::Acknowledged { by, at_unix } => {
            let who = match by {
                Some(id) if is_user_id(id) => format!(" by <@{id}>"),
                Some(name) if !name.trim().is_empty() => {
                    format!(" by {}", escape(&truncate(name, 200)))
                }
                _ => String::new(),
            };
            format!(
                ":white_check_mark: *Acknowledged*{who} at {}",
                when(at_unix)
            )
        }
        Status::Resolved { at_unix } => {
            format!(":large_green_circle: *Resolved* at {}", when(at_unix))
        }
    }
}

/// A Slack user id: `U` or `W` and upper-case letters and digits.
fn is_user_id(text: &str) -> bool {
    let mut bytes = text.bytes();
    matches!(bytes.next(), Some(b'U' | b'W'))
        && text.len() >= 3
        && text.len() <= 32
        && bytes.all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

/// The notification text: what phones and screen readers show.
pub fn fallback_text(event: &Event, context: &RenderContext<'_>) -> String {
    let mut text = ["[", &severity_label(event.severity), "] ", &event.title].concat();
    if let Some(number) = event.ticket.as_ref().and_then(|t| t.number.as_deref()) {
        text.push_str(" (");
        text.push_str(number);
        text.push(')');
    }
    if let Some(intended) = context.rerouted_from {
        text.push_str(" — meant for ");
        text.push_str(intended);
    }
    truncated(escape(&text), FALLBACK_LIMIT)
}

/// Escapes the three characters Slack's mrkdwn treats as control characters.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    // By bytes, copying the runs between: the three are ASCII, and no byte
    // of a multi-byte UTF-8 character can be taken for one.
    let mut copied = 0;
    for (at, byte) in text.bytes().enumerate() {
        let entity = match byte {
            b'&' => "&amp;",
            b'<' => "&lt;",
            b'>' => "&gt;",
            _ => continue,
        };
        out.push_str(&text[copied..at]);
        out.push_str(entity);
        copied = at + 1;
    }
    out.push_str(&text[copied..]);
    out
}

/// Makes event text safe for a `plain_text` object while showing it as written.
///
/// Slack parses no mentions in `plain_text` and shows it as sent (its docs
/// tie the `&amp;`/`&lt;`/`&gt;` escapes to mrkdwn's special parsing, and it
/// hands a raw `&` from a button's text back as `&amp;`, i.e. escapes it
/// itself), so mrkdwn escaping here risks a header reading `&lt;!channel&gt;`.
/// Instead every `<` is followed by U+2060 WORD JOINER: invisible, the text
/// stays readable, yet no `<!channel>`, `<!here>`, `<!everyone>`,
/// `<!subteam^…>`, `<@U…>`, `<#C…>` or `<url|…>` sequence is left for Slack
/// or for anything that later reads the text as mrkdwn. A word joiner, not a
/// zero-width joiner: that one would fuse a following emoji into another.
pub fn neutralise_plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        out.push(c);
        if c == '<' {
            out.push(WORD_JOINER);
        }
    }
    out
}

/// U+2060, zero width, "do not break here" and nothing else.
const WORD_JOINER: char = '\u{2060}';

/// Cuts `text` to at most `limit` characters, ending with `…` when cut. The
/// cut never leaves the start of an `&amp;`, `&lt;` or `&gt;` (escaped text
/// would show it as text) nor a `<` at the end (in plain text it would lose
/// its word joiner; in mrkdwn it would open a sequence nothing closes). A
/// `&` that starts no entity, as in plain text, is kept with what follows.
pub fn truncate(text: &str, limit: usize) -> String {
    if fits(text, limit) {
        return text.to_string();
    }
    let mut out: String = text.chars().take(limit.saturating_sub(1)).collect();
    if let Some(amp) = out.rfind('&')
        && ["&amp;", "&lt;", "&gt;"]
            .iter()
            .any(|entity| entity.len() > out.len() - amp && entity.starts_with(&out[amp..]))
    {
        out.truncate(amp);
    }
    if out.ends_with('<') {
        out.pop();
    }
    out.push('…');
    out
}

/// [`truncate`] for a string already owned: kept as it is when it fits.
fn truncated(text: String, limit: usize) -> String {
    if fits(&text, limit) {
        text
    } else {
        truncate(&text, limit)
    }
}

/// At most `limit` characters (counted only when the bytes could be more).
fn fits(text: &str, limit: usize) -> bool {
    text.len() <= limit || text.chars().count() <= limit
}

fn field(label: &str, value: &str) -> TextObject {
    TextObject::mrkdwn(truncated(field_text(label, value), FIELD_LIMIT))
}

fn field_text(label: &str, value: &str) -> String {
    ["*", label, "*\n", value].concat()
}

/// Whether a field shows `value` whole, uncut.
fn fits_field(label: &str, value: &str) -> bool {
    field_text(label, value).chars().count() <= FIELD_LIMIT
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
    use serde_json::Value;

    /// The message as Slack receives it.
    fn rendered(event: &Event, context: &RenderContext<'_>) -> Value {
        serde_json::from_slice(&render(event, context).to_json()).unwrap()
    }

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
        let message = rendered(&e, &RenderContext::default());
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

    /// Every way text can mention someone, or a channel, in Slack.
    const MENTIONS: &[&str] = &[
        "<!channel>",
        "<!here>",
        "<!everyone>",
        "<!subteam^S0ONCALL>",
        "<!subteam^S0ONCALL|@oncall>",
        "<@U0ALICE>",
        "<@U0ALICE|alice>",
        "<@W0ENTERPRISE>",
        "<#C0GENERAL>",
        "<#C0GENERAL|general>",
    ];

    /// Where a piece of text can land in a message.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Place {
        Mrkdwn,
        PlainText,
        /// The top-level `text`: notifications, and mrkdwn for Slack.
        Text,
    }

    /// Every text object of `kind` in the message, however deep.
    fn texts_of(value: &Value, kind: &str, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                if map.get("type").and_then(Value::as_str) == Some(kind)
                    && let Some(text) = map.get("text").and_then(Value::as_str)
                {
                    out.push(text.to_string());
                }
                map.values().for_each(|v| texts_of(v, kind, out));
            }
            Value::Array(items) => items.iter().for_each(|v| texts_of(v, kind, out)),
            _ => {}
        }
    }

    fn texts_in(message: &Value, place: Place) -> Vec<String> {
        let mut out = Vec::new();
        match place {
            Place::Mrkdwn => texts_of(message, "mrkdwn", &mut out),
            Place::PlainText => texts_of(message, "plain_text", &mut out),
            Place::Text => out.push(message["text"].as_str().unwrap().to_string()),
        }
        out
    }

    #[test]
    fn no_mention_in_any_event_field_is_live_in_any_kind_of_text() {
        use serde_json::json;
        // Each event field that reaches the message, the event carrying
        // `m` there, and every place it shows.
        type Carrier = (&'static str, fn(&str) -> Value, &'static [Place]);
        let carriers: &[Carrier] = &[
            (
                "title",
                |m| json!({"title": m}),
                &[Place::PlainText, Place::Text],
            ),
            ("summary", |m| json!({"summary": m}), &[Place::Mrkdwn]),
            ("comment", |m| json!({"comment": m}), &[Place::Mrkdwn]),
            (
                "ticket number",
                |m| json!({"ticket": {"number": m}}),
                &[Place::Mrkdwn, Place::Text],
            ),
            (
                "ticket form",
                |m| json!({"ticket": {"form": m}}),
                &[Place::Mrkdwn],
            ),
            (
                "assignee name",
                |m| json!({"assignee": {"name": m}}),
                &[Place::Mrkdwn],
            ),
            (
                "assignee email",
                |m| json!({"assignee": {"email": m}}),
                &[Place::Mrkdwn],
            ),
            ("source", |m| json!({"source": m}), &[Place::Mrkdwn]),
            ("id", |m| json!({"id": m}), &[Place::Mrkdwn]),
            // An event's own target Slack could not take, named in the repost.
            (
                "rerouted target",
                |m| json!({"targets": [{"slack_channel": m}]}),
                &[Place::Mrkdwn, Place::Text],
            ),
        ];
        for (field, carry, places) in carriers {
            for mention in MENTIONS {
                let mut body =
                    json!({"id": "e-1", "type": "t", "severity": "high", "title": "Disk full"});
                body.as_object_mut().unwrap().extend(
                    carry(&format!("ping {mention} now"))
                        .as_object()
                        .unwrap()
                        .clone(),
                );
                let e = event(&body.to_string());
                // As the deliverer names a target it reroutes.
                let intended = e
                    .targets
                    .iter()
                    .flatten()
                    .map(|t| format!("{t} (channel_not_found)"))
                    .next();
                let context = RenderContext {
                    rerouted_from: intended.as_deref(),
                    ..RenderContext::default()
                };
                let message = rendered(&e, &context);

                for place in [Place::Mrkdwn, Place::PlainText, Place::Text] {
                    for text in texts_in(&message, place) {
                        for live in ["<!", "<@", "<#"] {
                            assert!(
                                !text.contains(live),
                                "{field} with {mention}: {live} is live in {place:?} {text:?}"
                            );
                        }
                    }
                }
                for place in *places {
                    let shown = match place {
                        Place::Mrkdwn | Place::Text => escape(mention),
                        Place::PlainText => neutralise_plain(mention),
                    };
                    assert!(
                        texts_in(&message, *place)
                            .iter()
                            .any(|t| t.contains(&shown)),
                        "{field} with {mention} is not shown in {place:?}: {message}"
                    );
                }
            }
        }
    }

    #[test]
    fn labels_do_not_reach_the_message() {
        let e = event(
            r#"{"id":"x","type":"t","severity":"high","title":"t","labels":{"team":"<!channel>"}}"#,
        );
        let message = rendered(&e, &RenderContext::default()).to_string();
        assert!(!message.contains("channel"), "{message}");
    }

    #[test]
    fn plain_text_keeps_the_mention_readable_and_the_emoji_whole() {
        let header = neutralise_plain("<!here> 🔥 a<b");
        assert_eq!(header.replace(WORD_JOINER, ""), "<!here> 🔥 a<b");
        assert!(!header.contains("<!") && !header.contains("&lt;"));
        let e = event(r#"{"id":"x","type":"t","severity":"critical","title":"<@U1> & co"}"#);
        let message = rendered(&e, &RenderContext::default());
        assert_eq!(
            message["blocks"][0]["text"]["text"], "🔴 <\u{2060}@U1> & co",
            "shown as written, nothing escaped"
        );
        assert_eq!(message["text"], "[CRITICAL] &lt;@U1&gt; &amp; co");
    }

    #[test]
    fn the_message_carries_ticket_assignee_colour_button_and_metadata() {
        let e = event(
            r#"{"id":"esc-1","type":"escalation.escalated","severity":"critical","title":"Checkout down",
                "ticket":{"number":"TCK-2041","form":"Incident report","url":"https://support.example.com/t/2041"},
                "assignee":{"name":"Ana Ruiz","email":"ana@example.com"},"level":2}"#,
        );
        let message = rendered(
            &e,
            &RenderContext {
                rule: Some("payments-critical"),
                incident: Some(IncidentRef {
                    workspace: "T1",
                    key: "ticket:TCK-2041",
                    since_ms: None,
                }),
                ..RenderContext::default()
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
    fn the_plain_text_retry_keeps_only_text_metadata_and_channel() {
        let e = event(r#"{"id":"p-1","type":"t","severity":"low","title":"Disk full"}"#);
        let context = RenderContext {
            plain_text: true,
            ..RenderContext::default()
        };
        let message: Value =
            serde_json::from_slice(&render(&e, &context).to("C0OPS").to_json()).unwrap();
        assert_eq!(message["channel"], "C0OPS");
        assert_eq!(message["text"], "[LOW] Disk full");
        assert_eq!(message["metadata"]["event_payload"]["event_id"], "p-1");
        assert!(message.get("blocks").is_none());
        assert!(message.get("attachments").is_none());
    }

    #[test]
    fn long_text_is_cut_to_slack_limits() {
        let long = "x".repeat(1000);
        let summary = "&".repeat(5000);
        let e = event(&format!(
            r#"{{"id":"x","type":"t","severity":"info","title":"{long}","summary":"{summary}"}}"#
        ));
        let message = rendered(&e, &RenderContext::default());
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
    fn escaping_replaces_the_three_control_characters_and_keeps_everything_else() {
        assert_eq!(escape(""), "");
        assert_eq!(escape("plain"), "plain");
        assert_eq!(escape("<!here> & <@U1>"), "&lt;!here&gt; &amp; &lt;@U1&gt;");
        assert_eq!(escape("&&<<>>"), "&amp;&amp;&lt;&lt;&gt;&gt;");
        assert_eq!(escape("é<ü>漢&🔥"), "é&lt;ü&gt;漢&amp;🔥");
        assert_eq!(escape("&amp;"), "&amp;amp;");
    }

    #[test]
    fn an_owned_text_that_fits_is_kept_and_one_that_does_not_is_cut_like_a_borrowed_one() {
        assert_eq!(truncated("ééé".to_string(), 3), "ééé");
        assert_eq!(truncated("éééé".to_string(), 3), truncate("éééé", 3));
        assert_eq!(truncated("a &amp; b".to_string(), 5), "a …");
    }

    /// Found by `tests/properties` (the cut dropped everything after the
    /// last `&`, which in plain text starts no entity).
    #[test]
    fn a_plain_ampersand_does_not_make_a_cut_drop_the_text_after_it() {
        assert_eq!(truncate("R&D postmortem is due", 10), "R&D postm…");
        assert_eq!(truncate("&<!channel><!channel>", 7), "&<!cha…");
        let title = format!("R&D: {}", "x".repeat(200));
        let e = event(&format!(
            r#"{{"id":"x","type":"t","severity":"info","title":"{title}"}}"#
        ));
        let message = rendered(&e, &RenderContext::default());
        let header = message["blocks"][0]["text"]["text"].as_str().unwrap();
        assert_eq!(header.chars().count(), HEADER_LIMIT, "{header}");
        // Escaped text still loses a cut entity whole.
        assert_eq!(truncate("a &amp; b", 5), "a …");
        assert_eq!(truncate("a &amp; b", 8), "a &amp;…");
    }

    /// Found by `tests/properties`: a header cut right after a `<` lost the
    /// word joiner that keeps it from starting a mention.
    #[test]
    fn a_cut_never_ends_on_an_angle_bracket() {
        assert_eq!(truncate(&neutralise_plain("ab<!here>"), 4), "ab…");
        assert_eq!(truncate("ab&lt;", 4), "ab…");
    }

    /// Found by `tests/properties`: a ticket link longer than the field was
    /// cut, leaving `<https://…` markup that no `>` closes.
    #[test]
    fn a_ticket_link_too_long_for_its_field_shows_the_number_unlinked() {
        let url = format!("https://support.example.com/{}", "a&".repeat(500));
        let e = event(&format!(
            r#"{{"id":"x","type":"t","severity":"info","title":"t","ticket":{{"number":"TCK-1","url":"{url}"}}}}"#
        ));
        let message = rendered(&e, &RenderContext::default());
        assert_eq!(message["blocks"][1]["fields"][1]["text"], "*Ticket*\nTCK-1");
        let button = &message["blocks"][2]["elements"][0];
        assert_eq!(button["url"], url.as_str(), "the button still opens it");

        let short = event(
            r#"{"id":"x","type":"t","severity":"info","title":"t","ticket":{"number":"TCK-1","url":"https://t.example/1?a=1&b=2"}}"#,
        );
        assert_eq!(
            rendered(&short, &RenderContext::default())["blocks"][1]["fields"][1]["text"],
            "*Ticket*\n<https://t.example/1?a=1&amp;b=2|TCK-1>"
        );
    }

    #[test]
    fn a_ticket_url_that_is_not_a_web_link_is_not_linked() {
        let e = event(
            r#"{"id":"x","type":"t","severity":"info","title":"t","ticket":{"number":"1","url":"javascript:alert(1)"}}"#,
        );
        assert!(
            !rendered(&e, &RenderContext::default())
                .to_string()
                .contains("javascript")
        );
    }

    fn ack_button(message: &Value) -> Option<Value> {
        message["blocks"]
            .as_array()?
            .iter()
            .filter(|b| b["type"] == "actions")
            .flat_map(|b| b["elements"].as_array().cloned().unwrap_or_default())
            .find(|e| e["action_id"] == ACK_ACTION_ID)
    }

    #[test]
    fn an_open_incident_has_an_acknowledge_button_naming_it_and_an_update_does_not() {
        let e = event(
            r#"{"id":"e-1","type":"escalation.triggered","severity":"high","title":"Checkout down","dedup_key":"chk-1"}"#,
        );
        let incident = IncidentRef {
            workspace: "T0AEXY01",
            key: "chk-1",
            since_ms: Some(1_764_000_000_123),
        };
        let open = rendered(
            &e,
            &RenderContext {
                incident: Some(incident),
                ..RenderContext::default()
            },
        );
        let button = ack_button(&open).expect("an open incident can be acknowledged");
        let value: AckButtonValue =
            serde_json::from_str(button["value"].as_str().unwrap()).unwrap();
        assert_eq!(
            value,
            AckButtonValue {
                w: "T0AEXY01".into(),
                k: "chk-1".into(),
                f: Some(1_764_000_000_123),
            }
        );

        let acknowledged = rendered(
            &e,
            &RenderContext {
                incident: Some(incident),
                status: Some(Status::Acknowledged {
                    by: Some("U0LEAD"),
                    at_unix: 1_700_000_000,
                }),
                ..RenderContext::default()
            },
        );
        assert!(ack_button(&acknowledged).is_none(), "the button is gone");
        assert_eq!(
            acknowledged["attachments"][0]["color"],
            severity_color(Severity::High)
        );
        assert!(
            acknowledged["blocks"][0]["elements"][0]["text"]
                .as_str()
                .unwrap()
                .starts_with(
                    ":white_check_mark: *Acknowledged* by <@U0LEAD> at <!date^1700000000^"
                )
        );

        let resolved = rendered(
            &e,
            &RenderContext {
                incident: Some(incident),
                status: Some(Status::Resolved {
                    at_unix: 1_700_000_600,
                }),
                ..RenderContext::default()
            },
        );
        assert!(ack_button(&resolved).is_none());
        assert_eq!(resolved["attachments"][0]["color"], RESOLVED_COLOR);
    }

    #[test]
    fn an_acknowledger_named_by_the_producer_cannot_mention_anyone() {
        let line = status_line(Status::Acknowledged {
            by: Some("<!channel> Ana"),
            at_unix: 0,
        });
        assert!(line.contains("by &lt;!channel&gt; Ana"), "{line}");
    }

    #[test]
    fn a_thread_reply_and_an_update_carry_what_slack_needs() {
        let e = event(r#"{"id":"e-2","type":"issue.updated","severity":"low","title":"t"}"#);
        let reply: Value = serde_json::from_slice(
            &render(&e, &RenderContext::default())
                .to("C0PAY")
                .in_thread("1700000000.000100", true)
                .to_json(),
        )
        .unwrap();
        assert_eq!(reply["thread_ts"], "1700000000.000100");
        assert_eq!(reply["reply_broadcast"], true);
        let quiet: Value = serde_json::from_slice(
            &render(&e, &RenderContext::default())
                .to("C0PAY")
                .in_thread("1700000000.000100", false)
                .to_json(),
        )
        .unwrap();
        assert!(quiet.get("reply_broadcast").is_none());
        let update: Value = serde_json::from_slice(
            &render(&e, &RenderContext::default())
                .replacing("D0DM", "1700000000.000100")
                .to_json(),
        )
        .unwrap();
        assert_eq!(update["channel"], "D0DM");
        assert_eq!(update["ts"], "1700000000.000100");
        assert!(
            update.get("metadata").is_none(),
            "Slack keeps the original's"
        );
        assert!(update.get("thread_ts").is_none());
    }
}
