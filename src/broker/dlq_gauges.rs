//! The dead-letter queue's depth and its oldest message's age, for `/metrics`.
//!
//! Every worker polls the queue on its consuming connection every
//! `amqp.dead_letter_poll_interval`: a passive `queue.declare` gives the
//! depth and touches no message. The values are the queue's, not the
//! replica's: every replica reports the same numbers, so dashboards and
//! alerts aggregate them with `max()`, never `sum()`.
//!
//! The age comes from the head message's `x-alert-router-failed-at` header,
//! read with `basic.get` and handed straight back with `basic.nack(requeue)`,
//! which returns it to the head. The head is read only when the depth has
//! changed since the last look: new dead letters join the tail, so the
//! oldest one changes only when messages leave, and leaving changes the
//! depth. Reading it rarely matters because a quorum queue may count each
//! return as a delivery (RabbitMQ 4.0 to 4.2 do, and drop a message
//! returned more often than the queue's delivery limit, 20 by default);
//! in between, the age is computed from the timestamp already read.

use std::time::Duration;

use chrono::{DateTime, Utc};
use lapin::Channel;
use lapin::options::{BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{HEADER_FAILED_AT, header_str};
use crate::telemetry;

/// Polls `queue` on `channel` until `stop` is cancelled or the channel dies
/// (the worker opens a new one when it reconnects).
pub async fn run(channel: Channel, queue: String, interval: Duration, stop: CancellationToken) {
    let mut gauges = Gauges {
        channel,
        queue,
        looked_at: None,
        head_failed_at: None,
    };
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticks.tick() => {}
        }
        if let Err(error) = gauges.poll().await {
            if !gauges.channel.status().connected() {
                warn!(queue = %gauges.queue, %error, "cannot read the dead-letter queue; its metrics stay as they were until the worker reconnects");
                break;
            }
            debug!(queue = %gauges.queue, %error, "dead-letter queue poll failed; trying again");
        }
    }
    let _ = gauges.channel.close(200, "stopping".into()).await;
}

struct Gauges {
    channel: Channel,
    queue: String,
    /// The depth when the head was last read.
    looked_at: Option<u32>,
    /// When the head message was dead-lettered.
    head_failed_at: Option<DateTime<Utc>>,
}

impl Gauges {
    async fn poll(&mut self) -> Result<(), lapin::Error> {
        let messages = self
            .channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?
            .message_count();
        if messages == 0 {
            self.looked_at = Some(0);
            self.head_failed_at = None;
        } else if self.looked_at != Some(messages) || self.head_failed_at.is_none() {
            // None: someone (a `dlq` command) holds the head right now; look
            // again next time rather than guess.
            if let Some(failed_at) = self.peek_head().await? {
                self.head_failed_at = Some(failed_at);
                self.looked_at = Some(messages);
            }
        }
        let age = self
            .head_failed_at
            .and_then(|at| (Utc::now() - at).to_std().ok())
            .unwrap_or_default();
        telemetry::record_dead_letters(messages, age);
        Ok(())
    }

    /// When the head message was dead-lettered, leaving it at the head.
    async fn peek_head(&self) -> Result<Option<DateTime<Utc>>, lapin::Error> {
        let Some(message) = self
            .channel
            .basic_get(
                self.queue.as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await?
        else {
            return Ok(None);
        };
        let properties = &message.delivery.properties;
        let failed_at = header_str(properties, HEADER_FAILED_AT)
            .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
            .map(|t| t.with_timezone(&Utc))
            // Dead-lettered by the broker itself (no header of ours): the
            // publish timestamp if the producer set one, else first seen now,
            // so the age is at least a lower bound that keeps growing.
            .or_else(|| {
                properties
                    .timestamp()
                    .and_then(|t| DateTime::<Utc>::from_timestamp(i64::try_from(t).ok()?, 0))
            })
            .unwrap_or_else(Utc::now);
        self.channel
            .basic_nack(
                message.delivery.delivery_tag,
                BasicNackOptions {
                    multiple: false,
                    requeue: true,
                },
            )
            .await?;
        Ok(Some(failed_at))
    }
}
