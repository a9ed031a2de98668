//! The dead-letter queue's depth and its oldest message's age, for `/metrics`.
//!
//! Every worker polls the queue on its consuming connection every
//! `amqp.dead_letter_poll_interval`: a passive `queue.declare` gives the
//! depth and touches no message. The values are the queue's, not the
//! replica's: every replica reports the same numbers, so dashboards and
//! alerts aggregate them with `max()`, never `sum()`.
//!
//! The age is how long the queue has held messages without being emptied,
//! as this replica has watched it: from the first poll that found it
//! non-empty until one finds it empty. No message is read for it: RabbitMQ
//! 3.10's quorum queues put a message handed back with `basic.nack(requeue)`
//! at the tail, so peeking at the head would reorder the dead letters (and
//! `dlq replay` promises their order), and RabbitMQ 4.0 to 4.2 count each
//! return as a delivery. While messages only join the tail it is the oldest
//! message's age (from when this replica started, at most); after a partial
//! replay it overstates it. `max()` over the replicas takes the one that has
//! watched longest.

use std::time::Duration;

use lapin::Channel;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::telemetry;

/// Polls `queue` on `channel` until `stop` is cancelled or the channel dies
/// (the worker opens a new one when it reconnects).
pub async fn run(channel: Channel, queue: String, interval: Duration, stop: CancellationToken) {
    let mut gauges = Gauges {
        channel,
        queue,
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
        let age = if messages == 0 {
            self.held_since = None;
            Duration::ZERO
        } else {
            self.held_since
                .get_or_insert_with(tokio::time::Instant::now)
                .elapsed()
        };
        telemetry::record_dead_letters(messages, age);
        Ok(())
    }
}
