//! The dead-letter queue as operators work it: stats, list, show, replay, purge.
//!
//! Browsing takes messages with `basic.get` without acking them and returns
//! them by closing the channel, so messages that are only looked at stay in
//! the queue. It always takes the whole queue, so they stay in order (see
//! [`DeadLetterQueue::visit`]). A replay publishes the original body to the main
//! exchange with the producer's routing key, waits for the confirm, and only
//! then acks the dead letter: a crash mid-replay duplicates, never loses.
//!
//! A replay takes at most the messages the queue held when it started. With a
//! worker running, a poison message it replays is dead-lettered again at the
//! tail; reading until the queue is empty would chase it forever.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use serde::Serialize;

use super::dlq_ledger::{DeadLetterLedger, HEADER_LEDGER_ENTRY};
use super::{
    BrokerError, HEADER_ATTEMPTS, HEADER_DETAIL, HEADER_FAILED_AT, HEADER_REASON,
    HEADER_ROUTING_KEY, Publisher, Topology, header_str, header_u64,
};
use crate::event::{EventError, sniff_id};

/// One dead letter, as shown to an operator.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// 1-based position in the queue when it was browsed.
    pub position: usize,
    /// The event id, when the body has one.
    pub id: Option<String>,
    /// The routing key the producer used (normally the event type).
    pub routing_key: String,
    /// `x-alert-router-reason`, or the broker's own reason (e.g. `delivery_limit`).
    pub reason: String,
    pub detail: String,
    pub attempts: Option<u64>,
    /// The body itself is at fault (`invalid_json`, …): a replayed copy is
    /// dead-lettered again.
    pub poison: bool,
    pub failed_at: Option<String>,
    /// Seconds since `failed_at`.
    pub age_seconds: Option<i64>,
    #[serde(skip)]
    pub body: Vec<u8>,
    #[serde(skip)]
    pub properties: BasicProperties,
}

impl DeadLetter {
    /// The body as text (lossy), for `show`.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Every header as text, for `show`.
    pub fn headers(&self) -> BTreeMap<String, String> {
        self.properties
            .headers()
            .as_ref()
            .map(|table| {
                table
                    .inner()
                    .iter()
                    .map(|(k, v)| (k.as_str().to_string(), value_text(v)))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Counts for `dlq stats`.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub queue: String,
    pub messages: u32,
    pub by_reason: BTreeMap<String, usize>,
    /// Age of the oldest dead letter, in seconds.
    pub oldest_age_seconds: Option<i64>,
}

/// Whether a replay publishes or only shows what it would take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayMode {
    Publish,
    /// Takes nothing: every message is returned to the queue, in order.
    DryRun,
}

/// What a replay took (or, in a dry run, would take).
#[derive(Debug, Clone, Serialize)]
pub struct Replay {
    /// Messages in the queue when the replay started: the most it looks at.
    pub messages_at_start: u32,
    /// In queue order; bodies are not kept.
    pub letters: Vec<DeadLetter>,
    /// Why the dead-letter ledger could not be told (the age gauge corrects
    /// itself from the queue's depth later).
    pub ledger_error: Option<String>,
}

/// What a purge did.
pub struct Purged {
    pub messages: u32,
    /// As in [`Replay::ledger_error`].
    pub ledger_error: Option<String>,
}

impl Replay {
    /// Poison among the letters, by reason: these come straight back.
    pub fn poison_by_reason(&self) -> BTreeMap<&str, usize> {
        let mut by_reason = BTreeMap::new();
        for letter in self.letters.iter().filter(|l| l.poison) {
            *by_reason.entry(letter.reason.as_str()).or_insert(0) += 1;
        }
        by_reason
    }
}

/// Which dead letters a replay takes.
#[derive(Debug, Clone)]
pub enum Selector {
    /// Event id, or `#N` for the N-th message as listed.
    Id(String),
    Reason(String),
    All,
}

impl Selector {
    pub fn matches(&self, letter: &DeadLetter) -> bool {
        match self {
            Selector::All => true,
            Selector::Reason(reason) => &letter.reason == reason,
            Selector::Id(id) => match id.strip_prefix('#').and_then(|n| n.parse::<usize>().ok()) {
                Some(position) => letter.position == position,
                None => letter.id.as_deref() == Some(id.as_str()),
            },
        }
    }
}

/// The dead-letter queue of one topology.
pub struct DeadLetterQueue<'a> {
    connection: &'a Connection,
    topology: &'a Topology,
    /// Told what a replay or purge removed, for the oldest-age gauge.
    ledger: Option<DeadLetterLedger>,
}

impl<'a> DeadLetterQueue<'a> {
    pub fn new(connection: &'a Connection, topology: &'a Topology) -> DeadLetterQueue<'a> {
        DeadLetterQueue {
            connection,
            topology,
            ledger: None,
        }
    }

    pub fn with_ledger(mut self, ledger: DeadLetterLedger) -> DeadLetterQueue<'a> {
        self.ledger = Some(ledger);
        self
    }

    /// Messages in the queue, by reason, and the oldest one's age.
    pub async fn stats(&self) -> Result<Stats, BrokerError> {
        let channel = self.connection.create_channel().await?;
        let mut by_reason = BTreeMap::new();
        let mut messages = 0u32;
        let mut oldest = None;
        let result = self
            .visit(&channel, usize::MAX, |_, letter| {
                messages += 1;
                *by_reason.entry(letter.reason).or_insert(0) += 1;
                oldest = oldest.max(letter.age_seconds);
                true
            })
            .await;
        let _ = channel.close(200, "counted".into()).await;
        result?;
        Ok(Stats {
            queue: self.topology.dead_letter_queue.clone(),
            messages,
            by_reason,
            oldest_age_seconds: oldest,
        })
    }

    /// The first dead letter `selector` matches, leaving the queue as it was.
    pub async fn find(&self, selector: &Selector) -> Result<Option<DeadLetter>, BrokerError> {
        let channel = self.connection.create_channel().await?;
        let mut found = None;
        let result = self
            .visit(&channel, usize::MAX, |_, letter| {
                if selector.matches(&letter) {
                    found = Some(letter);
                    return false;
                }
                true
            })
            .await;
        let _ = channel.close(200, "browsed".into()).await;
        result?;
        Ok(found)
    }

    /// Up to `limit` dead letters, in queue order, leaving them all in place.
    pub async fn list(&self, limit: usize) -> Result<Vec<DeadLetter>, BrokerError> {
        let channel = self.connection.create_channel().await?;
        let letters = self.browse(&channel, limit).await;
        // Closing the channel returns every unacked message to the queue, in order.
        let _ = channel.close(200, "browsed".into()).await;
        Ok(letters?.into_iter().map(|(_, letter)| letter).collect())
    }

    /// Republishes the selected dead letters and removes them from the queue
    /// (or, in a dry run, only lists them), looking at no more messages than
    /// the queue held at the start.
    pub async fn replay(
        &self,
        selector: &Selector,
        mode: ReplayMode,
    ) -> Result<Replay, BrokerError> {
        let publisher = match mode {
            ReplayMode::Publish => Some(Publisher::open(self.connection).await?),
            ReplayMode::DryRun => None,
        };
        let channel = self.connection.create_channel().await?;
        let mut removed = Vec::new();
        let result = self
            .replay_on(&channel, publisher.as_ref(), selector, &mut removed)
            .await;
        // Returns what was not acked (skipped, or everything in a dry run) to
        // its place in the queue, in order; a crash or lost connection does
        // the same, so a dry run can never take anything.
        let _ = channel.close(200, "replayed".into()).await;
        if let Some(publisher) = &publisher {
            let _ = publisher.channel().close(200, "replayed".into()).await;
        }
        // Even after an error: what was acked has left the queue.
        let ledger_error = match &self.ledger {
            Some(ledger) if !removed.is_empty() => ledger.forget(&removed).await.err(),
            _ => None,
        };
        result.map(|mut replay| {
            replay.ledger_error = ledger_error.map(|e| e.to_string());
            replay
        })
    }

    async fn replay_on(
        &self,
        channel: &Channel,
        publisher: Option<&Publisher>,
        selector: &Selector,
        removed: &mut Vec<String>,
    ) -> Result<Replay, BrokerError> {
        let messages_at_start = self.message_count(channel).await?;
        let now = Utc::now();
        let mut letters = Vec::new();
        // Anything dead-lettered from now on (a replayed poison message
        // included) lands behind these and is not taken.
        for position in 1..=usize::try_from(messages_at_start).unwrap_or(usize::MAX) {
            // Empty early when someone else took messages meanwhile.
            let Some((tag, mut letter)) = self.next_letter(channel, position, now).await? else {
                break;
            };
            if !selector.matches(&letter) {
                continue;
            }
            if let Some(publisher) = publisher {
                publisher
                    .publish(
                        &self.topology.exchange,
                        &letter.routing_key,
                        &letter.body,
                        replay_properties(&letter.properties),
                    )
                    .await?;
                channel.basic_ack(tag, BasicAckOptions::default()).await?;
                removed.extend(header_str(&letter.properties, HEADER_LEDGER_ENTRY));
            }
            // Only the summary is kept: a replay of a big queue holds no bodies.
            letter.body = Vec::new();
            letters.push(letter);
        }
        Ok(Replay {
            messages_at_start,
            letters,
            ledger_error: None,
        })
    }

    /// Deletes every dead letter; says how many there were.
    pub async fn purge(&self) -> Result<Purged, BrokerError> {
        // Dead letters recorded from here on may survive the purge.
        let started = match &self.ledger {
            Some(ledger) => Some(ledger.now_ms().await),
            None => None,
        };
        let channel = self.connection.create_channel().await?;
        let messages = channel
            .queue_purge(
                self.topology.dead_letter_queue.as_str().into(),
                QueuePurgeOptions::default(),
            )
            .await?;
        let _ = channel.close(200, "purged".into()).await;
        let ledger_error = match (&self.ledger, started) {
            (Some(ledger), Some(Ok(started))) => ledger.forget_before(started).await.err(),
            (_, Some(Err(error))) => Some(error),
            _ => None,
        };
        Ok(Purged {
            messages,
            ledger_error: ledger_error.map(|e| e.to_string()),
        })
    }

    /// Messages in the queue right now (a passive declare: nothing is created).
    pub async fn count(&self) -> Result<u32, BrokerError> {
        let channel = self.connection.create_channel().await?;
        let count = self.message_count(&channel).await;
        let _ = channel.close(200, "counted".into()).await;
        count
    }

    /// Ready messages only: ones another client holds unacked are not counted.
    async fn message_count(&self, channel: &Channel) -> Result<u32, BrokerError> {
        let queue = channel
            .queue_declare(
                self.topology.dead_letter_queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(queue.message_count())
    }

    async fn browse(
        &self,
        channel: &Channel,
        limit: usize,
    ) -> Result<Vec<(u64, DeadLetter)>, BrokerError> {
        let mut letters = Vec::new();
        self.visit(channel, limit, |tag, letter| {
            letters.push((tag, letter));
            true
        })
        .await?;
        Ok(letters)
    }

    /// Hands the first `limit` messages to `visit` (which returns false to
    /// stop), without acking any. Only what `visit` keeps stays in memory;
    /// the broker holds the rest until the channel closes.
    ///
    /// Every message the queue held is taken all the same: a quorum queue
    /// without a delivery limit (as the dead-letter queue is) puts a message
    /// handed back *behind* the others, so looking at the first few would
    /// move them to the back, and `#1` would name another message next time.
    /// Taken whole, the queue goes back in its own order (behind anything
    /// dead-lettered meanwhile).
    async fn visit(
        &self,
        channel: &Channel,
        limit: usize,
        mut visit: impl FnMut(u64, DeadLetter) -> bool,
    ) -> Result<(), BrokerError> {
        let held = usize::try_from(self.message_count(channel).await?).unwrap_or(usize::MAX);
        let now = Utc::now();
        let mut visiting = true;
        for position in 1..=held {
            let Some((tag, letter)) = self.next_letter(channel, position, now).await? else {
                break;
            };
            if visiting && position <= limit {
                visiting = visit(tag, letter);
            }
        }
        Ok(())
    }

    /// Takes the next message without acking it, as the `position`-th letter.
    async fn next_letter(
        &self,
        channel: &Channel,
        position: usize,
        now: DateTime<Utc>,
    ) -> Result<Option<(u64, DeadLetter)>, BrokerError> {
        let Some(message) = channel
            .basic_get(
                self.topology.dead_letter_queue.as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await?
        else {
            return Ok(None);
        };
        let delivery = message.delivery;
        let properties = delivery.properties;
        let failed_at = header_str(&properties, HEADER_FAILED_AT).or_else(|| {
            properties
                .timestamp()
                .and_then(|t| DateTime::<Utc>::from_timestamp(i64::try_from(t).ok()?, 0))
                .map(|t| t.to_rfc3339())
        });
        let age_seconds = failed_at
            .as_deref()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| (now - t.with_timezone(&Utc)).num_seconds());
        let (reason, detail) = match header_str(&properties, HEADER_REASON) {
            Some(reason) => (
                reason,
                header_str(&properties, HEADER_DETAIL).unwrap_or_default(),
            ),
            None => broker_death(&properties),
        };
        let poison = EventError::REASON_CODES.contains(&reason.as_str());
        let letter = DeadLetter {
            position,
            id: sniff_id(&delivery.data),
            routing_key: header_str(&properties, HEADER_ROUTING_KEY)
                .unwrap_or_else(|| delivery.routing_key.as_str().to_string()),
            reason,
            detail,
            attempts: header_u64(&properties, HEADER_ATTEMPTS),
            poison,
            failed_at,
            age_seconds,
            body: delivery.data,
            properties,
        };
        Ok(Some((delivery.delivery_tag, letter)))
    }
}

/// The original properties without the dead-letter bookkeeping, so the
/// replayed event starts again with a fresh attempt count. The headers that
/// say what the event is (an escalation step, with its rule and step) stay:
/// without them the step would go through the rules again, to the first
/// step's targets, instead of to its own.
fn replay_properties(properties: &BasicProperties) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    let mut kept = FieldTable::default();
    for (name, value) in headers.inner() {
        let name = name.as_str();
        let describes_the_event = name.starts_with(crate::escalation::HEADER_PREFIX);
        if (name.starts_with("x-alert-router-") && !describes_the_event)
            || name == "x-death"
            || name.starts_with("x-first-death")
            || name.starts_with("x-last-death")
        {
            continue;
        }
        kept.insert(ShortString::from(name), value.clone());
    }
    headers = kept;
    properties
        .clone()
        .with_headers(headers)
        .with_delivery_mode(2)
}

/// The reason the broker itself gave when it dead-lettered a message (no
/// header of ours): e.g. `delivery_limit` when a message kept failing.
fn broker_death(properties: &BasicProperties) -> (String, String) {
    let death = properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(&ShortString::from("x-death")).cloned());
    if let Some(AMQPValue::FieldArray(entries)) = death
        && let Some(AMQPValue::FieldTable(first)) = entries.as_slice().first()
    {
        let field = |name: &str| first.inner().get(&ShortString::from(name)).map(value_text);
        let reason = field("reason").unwrap_or_else(|| "unknown".into());
        let detail = format!(
            "dead-lettered by RabbitMQ from queue {} ({reason}, count {}){}",
            field("queue").unwrap_or_default(),
            field("count").unwrap_or_default(),
            if reason == "delivery_limit" {
                ": it was handed out amqp.delivery_limit times without being settled: a worker crashed or stalled on it, or connections to RabbitMQ were lost again and again while it was in flight; replay it once the cause is gone"
            } else {
                ""
            }
        );
        return (reason, detail);
    }
    ("unknown".into(), "no reason recorded".into())
}

fn value_text(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_string(),
        AMQPValue::ShortShortInt(v) => v.to_string(),
        AMQPValue::ShortShortUInt(v) => v.to_string(),
        AMQPValue::ShortInt(v) => v.to_string(),
        AMQPValue::ShortUInt(v) => v.to_string(),
        AMQPValue::LongInt(v) => v.to_string(),
        AMQPValue::LongUInt(v) => v.to_string(),
        AMQPValue::LongLongInt(v) => v.to_string(),
        AMQPValue::Boolean(v) => v.to_string(),
        AMQPValue::Timestamp(v) => v.to_string(),
        other => format!("{other:?}"),
    }
}
