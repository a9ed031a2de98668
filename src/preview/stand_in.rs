//! `run --dry-run`: an in-process stand-in for the Slack Web API.
//!
//! The worker's whole pipeline runs (rules, rate limits, idempotency,
//! incidents, retries, dead letters); only Slack is answered here. It is a
//! real HTTP server on `127.0.0.1:0` that `slack.api_url` points at, rather
//! than a switch inside the Slack client: the client, its error handling
//! and the JSON it sends stay exactly the code that talks to Slack, so a
//! dry run exercises them too and nothing in the delivery path needs to know.
//!
//! Answers are plausible rather than faithful: every post succeeds, a
//! `#name` gets a stable channel id, a user a `D…` conversation, and each
//! post a fresh `ts`. Each post and update is logged as one line and kept
//! in [`Recent`] for the `/preview` page.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Json;
use axum::routing::any;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// How many messages the `/preview` page keeps.
pub const KEEP: usize = 100;

/// A message as the stand-in received it.
#[derive(Debug, Clone)]
pub struct Posted {
    /// Where, as people would see it: `#payments`, a channel id, or a DM.
    pub destination: String,
    pub ts: String,
    /// The plain-text fallback (`[HIGH] Title (TCK-1)`).
    pub text: String,
    pub blocks: Value,
    pub attachments: Value,
    /// Set for a reply in a thread.
    pub thread_ts: Option<String>,
    /// How many times `chat.update` replaced it.
    pub updates: u32,
}

/// The last [`KEEP`] messages, oldest first.
#[derive(Debug, Clone, Default)]
pub struct Recent(Arc<Mutex<VecDeque<Posted>>>);

impl Recent {
    /// The kept messages, newest first.
    pub fn newest_first(&self) -> Vec<Posted> {
        self.lock().iter().rev().cloned().collect()
    }

    fn push(&self, posted: Posted) {
        let mut kept = self.lock();
        if kept.len() == KEEP {
            kept.pop_front();
        }
        kept.push_back(posted);
    }

    /// Replaces the blocks of a kept message; false when it is no longer kept.
    fn update(&self, ts: &str, text: String, blocks: Value, attachments: Value) -> bool {
        let mut kept = self.lock();
        match kept.iter_mut().find(|p| p.ts == ts) {
            Some(posted) => {
                posted.text = text;
                posted.blocks = blocks;
                posted.attachments = attachments;
                posted.updates += 1;
                true
            }
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Posted>> {
        // A panic while holding the lock leaves a consistent deque: keep going.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

struct StandIn {
    recent: Recent,
    /// Channel names the rules file mentions, so `conversations.list`
    /// answers with them (`name` → id).
    channels: HashMap<String, String>,
    /// For fresh, increasing `ts` values.
    sequence: AtomicU64,
}

/// A running stand-in: where it listens and what it received.
pub struct Running {
    pub api_url: String,
    pub recent: Recent,
}

/// Starts the stand-in on a free loopback port until `shutdown`.
///
/// `rules_text` is the rules file: the `#names` in it are the channels
/// `conversations.list` knows, so a rule naming `#payments` resolves to an
/// id as with real Slack, and an unknown name is `channel_not_found` (the
/// worker then reroutes to the default channel, as it would for real).
pub async fn start(rules_text: &str, shutdown: CancellationToken) -> std::io::Result<Running> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr: SocketAddr = listener.local_addr()?;
    let recent = Recent::default();
    let state = Arc::new(StandIn {
        recent: recent.clone(),
        channels: channel_names(rules_text)
            .into_iter()
            .map(|name| {
                let id = stable_id('C', &name);
                (name, id)
            })
            .collect(),
        sequence: AtomicU64::new(0),
    });
    let app = Router::new()
        .route("/{method}", any(answer))
        .with_state(state);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
        {
            tracing::error!(error = %e, "the dry-run Slack stand-in stopped");
        }
    });
    tracing::info!(%addr, "dry run: Slack is answered locally; nothing is sent to Slack");
    Ok(Running {
        api_url: format!("http://{addr}"),
        recent,
    })
}

/// `#names` in the rules file, lower-cased as Slack stores them.
fn channel_names(rules_text: &str) -> Vec<String> {
    let Ok(pattern) = regex::Regex::new(r"#([a-z0-9][a-z0-9._-]{0,79})") else {
        return Vec::new();
    };
    let mut names: Vec<String> = pattern
        .captures_iter(&rules_text.to_lowercase())
        .filter_map(|c| c.get(1).map(|m| m.as_str().to_string()))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// A stable Slack-looking id for a name: the same name gets the same id in
/// every run, so threads and links stay consistent across restarts.
fn stable_id(prefix: char, name: &str) -> String {
    // FNV-1a: tiny and stable across Rust versions, unlike `DefaultHasher`.
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{prefix}0DRY{:08X}", hash & 0xFFFF_FFFF)
}

/// The request's fields: JSON for write methods, a form (body or query) for the rest.
fn fields(headers: &HeaderMap, query: Option<&str>, body: &[u8]) -> Value {
    let is_json = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return serde_json::from_slice(body).unwrap_or(Value::Null);
    }
    let mut map = serde_json::Map::new();
    for source in [query.unwrap_or("").as_bytes(), body] {
        for (k, v) in url::form_urlencoded::parse(source) {
            map.insert(k.into_owned(), Value::String(v.into_owned()));
        }
    }
    Value::Object(map)
}

fn field<'a>(fields: &'a Value, name: &str) -> &'a str {
    fields.get(name).and_then(Value::as_str).unwrap_or("")
}

async fn answer(
    State(state): State<Arc<StandIn>>,
    Path(method): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Json<Value> {
    let fields = fields(&headers, query.as_deref(), &body);
    Json(state.answer(&method, &fields))
}

impl StandIn {
    fn answer(&self, method: &str, fields: &Value) -> Value {
        match method {
            "auth.test" => json!({
                "ok": true, "url": "https://dry-run.invalid/", "team": "dry run",
                "user": "alert-router", "team_id": "T0DRYRUN", "user_id": "U0DRYRUN",
                "bot_id": "B0DRYRUN",
            }),
            "chat.postMessage" => self.post(fields),
            "chat.update" => {
                let channel = field(fields, "channel");
                let ts = field(fields, "ts");
                let text = field(fields, "text").to_string();
                tracing::info!("dry run: would update {ts} in {channel}: {text}");
                self.recent.update(
                    ts,
                    text.clone(),
                    fields.get("blocks").cloned().unwrap_or(Value::Null),
                    fields.get("attachments").cloned().unwrap_or(Value::Null),
                );
                json!({"ok": true, "channel": channel, "ts": ts, "text": text})
            }
            "conversations.list" => {
                let channels: Vec<Value> = self
                    .channels
                    .iter()
                    .map(|(name, id)| {
                        json!({"id": id, "name": name, "is_member": true,
                               "is_archived": false, "is_private": false, "is_channel": true})
                    })
                    .collect();
                json!({"ok": true, "channels": channels, "response_metadata": {"next_cursor": ""}})
            }
            "conversations.join" => {
                json!({"ok": true, "channel": {"id": field(fields, "channel"), "is_member": true}})
            }
            "conversations.open" => {
                let user = field(fields, "users");
                json!({"ok": true, "channel": {"id": self.conversation_id(user)}})
            }
            "conversations.history" => {
                // Nothing was lost in a stand-in: the lost-post check finds no post.
                json!({"ok": true, "messages": [], "has_more": false})
            }
            "users.lookupByEmail" => {
                json!({"ok": true, "user": {"id": stable_id('U', field(fields, "email"))}})
            }
            _ => json!({"ok": true}),
        }
    }

    fn post(&self, fields: &Value) -> Value {
        let asked = field(fields, "channel");
        let channel = self.conversation_id(asked);
        let destination = self
            .channels
            .iter()
            .find(|(_, id)| **id == channel)
            .map(|(name, _)| format!("#{name}"))
            .unwrap_or_else(|| asked.to_string());
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        let ts = format!(
            "{}.{:06}",
            chrono::Utc::now().timestamp(),
            sequence % 1_000_000
        );
        let text = field(fields, "text").to_string();
        // The log shows the text as people read it, not Slack-escaped.
        let shown = text
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&");
        let thread_ts = fields
            .get("thread_ts")
            .and_then(Value::as_str)
            .map(str::to_string);
        match &thread_ts {
            Some(parent) => {
                tracing::info!("dry run: would reply in {destination} (thread {parent}): {shown}")
            }
            None => tracing::info!("dry run: would post to {destination}: {shown}"),
        }
        self.recent.push(Posted {
            destination,
            ts: ts.clone(),
            text: text.clone(),
            blocks: fields.get("blocks").cloned().unwrap_or(Value::Null),
            attachments: fields.get("attachments").cloned().unwrap_or(Value::Null),
            thread_ts,
            updates: 0,
        });
        json!({"ok": true, "channel": channel, "ts": ts, "message": {"text": text, "ts": ts}})
    }

    /// The conversation a post to `asked` lands in: a user's DM, a named
    /// channel's id, or the id as given.
    fn conversation_id(&self, asked: &str) -> String {
        if let Some(name) = asked.strip_prefix('#') {
            let name = name.to_lowercase();
            return self
                .channels
                .get(&name)
                .cloned()
                .unwrap_or_else(|| stable_id('C', &name));
        }
        if asked.starts_with(['U', 'W']) {
            return stable_id('D', asked);
        }
        asked.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_come_from_the_rules_text_and_ids_are_stable() {
        let names = channel_names(
            "notify:\n  - slack_channel: \"#Payments\"\n  - slack_channel: C1 # a comment\n",
        );
        assert_eq!(names, ["payments"]);
        assert_eq!(stable_id('C', "payments"), stable_id('C', "payments"));
        assert_ne!(stable_id('C', "payments"), stable_id('C', "ops"));
    }

    #[test]
    fn the_last_messages_are_kept_newest_first() {
        let recent = Recent::default();
        for i in 0..KEEP + 5 {
            recent.push(Posted {
                destination: "#x".into(),
                ts: i.to_string(),
                text: String::new(),
                blocks: Value::Null,
                attachments: Value::Null,
                thread_ts: None,
                updates: 0,
            });
        }
        let kept = recent.newest_first();
        assert_eq!(kept.len(), KEEP);
        assert_eq!(kept[0].ts, (KEEP + 4).to_string());
    }
}
