//! `GET /preview` in a dry run: the last messages as people would see them.
//!
//! Block Kit rendered approximately in plain HTML (header, fields, sections,
//! context, buttons, the severity colour bar), newest first. Every piece of
//! event text is HTML-escaped: events come from producers, and the page is
//! served on the worker's own origin.

use std::fmt::Write as _;

use axum::Router;
use axum::response::Html;
use axum::routing::get;
use serde_json::Value;

use super::stand_in::{Posted, Recent};

/// The `/preview` route over `recent`.
pub fn router(recent: Recent) -> Router {
    Router::new().route(
        "/preview",
        get(move || {
            let messages = recent.newest_first();
            async move { Html(page(&messages)) }
        }),
    )
}

/// The whole page.
pub fn page(messages: &[Posted]) -> String {
    let mut html = String::from(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>alert-router preview</title>\
         <style>\
         body{font-family:system-ui,sans-serif;max-width:48rem;margin:2rem auto;color:#1d1c1d}\
         .msg{display:flex;margin:1rem 0;border:1px solid #ddd;border-radius:6px;overflow:hidden}\
         .bar{width:6px;flex:none}.body{padding:.6rem .9rem;flex:1}\
         .dest{color:#616061;font-size:.8rem}.header{font-size:1.15rem;font-weight:700;margin:.3rem 0}\
         .fields{display:grid;grid-template-columns:1fr 1fr;gap:.3rem 1rem;margin:.4rem 0}\
         .section{margin:.4rem 0;white-space:pre-wrap}.context{color:#616061;font-size:.8rem;margin:.3rem 0}\
         .actions button{margin:.3rem .4rem 0 0;padding:.25rem .7rem;border:1px solid #bbb;border-radius:4px;background:#fff}\
         .actions button.primary{background:#007a5a;color:#fff;border-color:#007a5a}\
         .actions button.danger{background:#e01e5a;color:#fff;border-color:#e01e5a}\
         </style></head><body>\n<h1>alert-router preview</h1>\n\
         <p>Dry run: nothing was sent to Slack. The last messages the worker would have posted, newest first.</p>\n",
    );
    if messages.is_empty() {
        html.push_str("<p class=\"empty\">No messages yet: publish an event.</p>\n");
    }
    for message in messages {
        render_message(&mut html, message);
    }
    html.push_str("</body></html>\n");
    html
}

fn render_message(html: &mut String, message: &Posted) {
    let color = message
        .attachments
        .get(0)
        .and_then(|a| a.get("color"))
        .and_then(Value::as_str)
        .filter(|c| c.starts_with('#') && c[1..].chars().all(|ch| ch.is_ascii_hexdigit()))
        .unwrap_or("#dddddd");
    let _ = writeln!(
        html,
        "<div class=\"msg\"><div class=\"bar\" style=\"background:{color}\"></div><div class=\"body\">\
         <div class=\"dest\">{}{}{} · ts {}</div>",
        escape(&message.destination),
        message
            .thread_ts
            .as_deref()
            .map(|t| format!(" · reply in thread {}", escape(t)))
            .unwrap_or_default(),
        if message.updates > 0 {
            " · updated"
        } else {
            ""
        },
        escape(&message.ts),
    );
    let blocks = message.blocks.as_array().map(Vec::as_slice).unwrap_or(&[]);
    if blocks.is_empty() {
        let _ = writeln!(
            html,
            "<div class=\"section\">{}</div>",
            escape(&message.text)
        );
    }
    for block in blocks {
        render_block(html, block);
    }
    // The colour bar's own blocks (event type, id, rule).
    for attachment in message
        .attachments
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        for block in attachment
            .get("blocks")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            render_block(html, block);
        }
    }
    html.push_str("</div></div>\n");
}

fn render_block(html: &mut String, block: &Value) {
    let text_of = |v: &Value| {
        let text = v.get("text").and_then(Value::as_str).unwrap_or("");
        if v.get("type").and_then(Value::as_str) == Some("mrkdwn") {
            mrkdwn(text)
        } else {
            escape(text)
        }
    };
    match block.get("type").and_then(Value::as_str) {
        Some("header") => {
            let _ = writeln!(
                html,
                "<div class=\"header\">{}</div>",
                text_of(&block["text"])
            );
        }
        Some("section") => {
            if let Some(text) = block.get("text") {
                let _ = writeln!(html, "<div class=\"section\">{}</div>", text_of(text));
            }
            if let Some(fields) = block.get("fields").and_then(Value::as_array) {
                html.push_str("<div class=\"fields\">");
                for field in fields {
                    let _ = write!(html, "<div>{}</div>", text_of(field));
                }
                html.push_str("</div>\n");
            }
        }
        Some("context") => {
            let elements: Vec<String> = block
                .get("elements")
                .and_then(Value::as_array)
                .map(|e| e.iter().map(text_of).collect())
                .unwrap_or_default();
            let _ = writeln!(html, "<div class=\"context\">{}</div>", elements.join(" "));
        }
        Some("actions") => {
            html.push_str("<div class=\"actions\">");
            for button in block
                .get("elements")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or(&[])
            {
                let style = match button.get("style").and_then(Value::as_str) {
                    Some("primary") => " class=\"primary\"",
                    Some("danger") => " class=\"danger\"",
                    _ => "",
                };
                let label = text_of(&button["text"]);
                match button.get("url").and_then(Value::as_str) {
                    // Only web links are followed from the page.
                    Some(url) if url.starts_with("https://") || url.starts_with("http://") => {
                        let _ = write!(
                            html,
                            "<a href=\"{}\" rel=\"noopener noreferrer\"><button{style}>{label}</button></a>",
                            escape(url)
                        );
                    }
                    _ => {
                        let _ = write!(html, "<button{style} disabled>{label}</button>");
                    }
                }
            }
            html.push_str("</div>\n");
        }
        _ => {}
    }
}

/// Slack mrkdwn as HTML, approximately: links (`<https://…|label>`) and
/// `*bold*`; Slack's own escapes (`&lt;` …) shown as the characters they
/// stand for, then everything HTML-escaped again.
fn mrkdwn(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('<') {
        out.push_str(&mrkdwn_plain(&rest[..start]));
        let after = &rest[start + 1..];
        let Some(end) = after.find('>') else {
            rest = &rest[start..];
            break;
        };
        let inner = &after[..end];
        let (target, label) = inner.split_once('|').unwrap_or((inner, inner));
        if target.starts_with("https://") || target.starts_with("http://") {
            let _ = write!(
                out,
                "<a href=\"{}\" rel=\"noopener noreferrer\">{}</a>",
                escape(&unescape_slack(target)),
                escape(&unescape_slack(label))
            );
        } else {
            // Mentions and the like: shown as written.
            out.push_str(&escape(&unescape_slack(label)));
        }
        rest = &after[end + 1..];
    }
    out.push_str(&mrkdwn_plain(rest));
    out
}

fn mrkdwn_plain(text: &str) -> String {
    let escaped = escape(&unescape_slack(text));
    match regex::Regex::new(r"\*([^*\n]+)\*") {
        Ok(bold) => bold
            .replace_all(&escaped, "<strong>$1</strong>")
            .into_owned(),
        Err(_) => escaped,
    }
}

/// Undoes Slack's three escapes in mrkdwn.
fn unescape_slack(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// HTML-escapes text for element content and quoted attributes.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(ch),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_page_shows_blocks_newest_first_and_escapes_event_text() {
        let posted = |ts: &str, title: &str| Posted {
            destination: "#payments".into(),
            ts: ts.into(),
            text: title.into(),
            blocks: json!([
                {"type": "header", "text": {"type": "plain_text", "text": title}},
                {"type": "section", "fields": [{"type": "mrkdwn", "text": "*Severity*\nhigh"}]},
                {"type": "actions", "elements": [
                    {"type": "button", "text": {"type": "plain_text", "text": "Acknowledge"}, "style": "primary"},
                    {"type": "button", "text": {"type": "plain_text", "text": "Open ticket"}, "url": "javascript:alert(1)"}
                ]}
            ]),
            attachments: json!([{"color": "#E01E5A", "blocks": []}]),
            thread_ts: None,
            updates: 0,
        };
        let html = page(&[
            posted("2", "second <script>x</script>"),
            posted("1", "older one"),
        ]);
        assert!(
            html.contains("second &lt;script&gt;x&lt;/script&gt;"),
            "{html}"
        );
        assert!(!html.contains("<script>"));
        assert!(html.find("second").unwrap() < html.find("older one").unwrap());
        assert!(html.contains("background:#E01E5A"));
        assert!(html.contains("<button class=\"primary\" disabled>Acknowledge</button>"));
        assert!(!html.contains("javascript:"));
        assert!(html.contains("<strong>Severity</strong>"), "{html}");
    }

    #[test]
    fn mrkdwn_shows_links_and_slack_escapes_as_people_see_them() {
        assert_eq!(
            mrkdwn("*Ticket*\n<https://x.example/t?a=1&amp;b=2|TCK-1> &lt;b&gt; <!channel>"),
            "<strong>Ticket</strong>\n<a href=\"https://x.example/t?a=1&amp;b=2\" rel=\"noopener noreferrer\">TCK-1</a> &lt;b&gt; !channel"
        );
        assert_eq!(mrkdwn("<javascript:alert(1)|x>"), "x");
    }
}
