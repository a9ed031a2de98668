//! The dead-letter queue's depth and its oldest message's age, for `/metrics`.
//!
//! Every worker polls the queue on its consuming connection every
//! `amqp.dead_letter_poll_interval`: a passive `queue.declare` gives the
//! depth and touches no message. The age comes from the dead-letter ledger
//! in Redis ([`super::dlq_ledger`]), which dates every dead letter, so it is
//! the oldest message's age on every replica alike, across restarts and
//! partial replays. The values are the queue's, not the replica's:
//! dashboards and alerts aggregate them with `max()`, never `sum()`.
//!
//! While Redis cannot be read, or before the ledger knows any of the
//! messages, the age is how long this replica has watched the queue hold
//! messages: the oldest message's age while messages only join the tail.

use std::time::Duration;

use lapin::Channel;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::dlq_ledger::DeadLetterLedger;
use crate::telemetry;

/// Where the gauges read the queue and its ledger.
pub struct Source {
    pub channel: Channel,
    pub queue: String,
    pub ledger: DeadLetterLedger,
    /// See [`super::dlq_ledger::settle_time`].
    pub settle: Duration,
}

/// Polls the queue every `interval` until `stop` is cancelled or the
/// channel dies (the worker opens a new one when it reconnects).
pub async fn run(source: Source, interval: Duration, stop: CancellationToken) {
    let mut gauges = Gauges {
        channel: source.channel,
        queue: source.queue,
        ledger: source.ledger,
        settle: source.settle,
        held_since: None,
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
    ledger: DeadLetterLedger,
    settle: Duration,
    /// Since when the queue has held messages, as far as this replica saw.
    held_since: Option<tokio::time::Instant>,
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
        let watched = if messages == 0 {
            self.held_since = None;
            Duration::ZERO
        } else {
            self.held_since
                .get_or_insert_with(tokio::time::Instant::now)
                .elapsed()
        };
        let age = match self.ledger.oldest_age(messages, self.settle).await {
            Ok(Some(age)) => age,
            Ok(None) => watched,
            Err(error) => {
                debug!(queue = %self.queue, %error, "cannot read the dead-letter ledger; the age is this replica's watch");
                watched
            }
        };
        telemetry::record_dead_letters(messages, age);
        Ok(())
    }
}
