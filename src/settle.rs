//! Settles a delivery: ack, republish to a delayed-retry queue, or dead-letter — the only stage that answers the broker.
//!
//! Every republish waits for the broker's confirm before the original is
//! acked, so a crash at any point leaves the event in the work queue, a retry
//! queue or the dead-letter queue — never nowhere. Acks themselves are
//! batched per channel by [`crate::broker::acks`].

use lapin::message::Delivery;
use lapin::types::AMQPValue;
use tracing::{debug, info, warn};

use crate::broker::acks::Acks;
use crate::broker::dlq_ledger::{DeadLetterLedger, HEADER_LEDGER_ENTRY};
use crate::broker::{
    self, BrokerError, HEADER_ATTEMPTS, HEADER_DETAIL, HEADER_FAILED_AT, HEADER_REASON,
    HEADER_ROUTING_KEY, Publisher, Topology,
};

/// Header: how often the event waited for rate-limit slots (no attempt spent).
pub const HEADER_DEFERRALS: &str = "x-alert-router-deferrals";
/// Header: when the event was first deferred (Unix milliseconds), so
/// waiting for Slack's rate limits has an end (`delivery.max_rate_limit_deferral`).
pub const HEADER_DEFERRED_SINCE: &str = "x-alert-router-deferred-since";

/// How long the event has been waiting for rate-limit slots, if it has.
pub fn deferred_for(properties: &lapin::BasicProperties) -> Option<std::time::Duration> {
    let since = broker::header_u64(properties, HEADER_DEFERRED_SINCE)?;
    let now = u64::try_from(chrono::Utc::now().timestamp_millis()).ok()?;
    Some(std::time::Duration::from_millis(now.saturating_sub(since)))
}

/// What should become of a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done: every target settled, or nothing to do (`why` is for the log).
    Ack { why: &'static str },
    /// Some target could not be reached now; try the whole event again later
    /// (targets already served are skipped then).
    RetryLater { detail: String },
    /// Only waiting for rate-limit slots: come back after about `wait`
    /// without spending an attempt.
    Defer {
        wait: std::time::Duration,
        detail: String,
    },
    /// Never going to work as it is: park it for an operator.
    DeadLetter {
        reason: &'static str,
        detail: String,
    },
}

/// What was done with a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    Acked,
    Retried { queue: String, attempt: u64 },
    Deferred { queue: String },
    DeadLettered { reason: &'static str },
}

/// Longest `x-alert-router-detail` header: headers travel with every copy.
const DETAIL_LIMIT: usize = 1000;

/// Longest wait for the dead-letter ledger's write: the dead letter is safe
/// already, and the ledger squares itself with the queue later.
const LEDGER_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// Turns outcomes into broker actions.
#[derive(Clone)]
pub struct Settler {
    publisher: Publisher,
    topology: Topology,
    /// The consumer channel's acks and nacks, batched.
    acks: Acks,
    /// Dates each dead letter for the oldest-age gauge.
    ledger: Option<DeadLetterLedger>,
}

impl Settler {
    pub fn new(publisher: Publisher, topology: Topology, acks: Acks) -> Settler {
        Settler {
            publisher,
            topology,
            acks,
            ledger: None,
        }
    }

    /// Records every dead letter in `ledger` once the broker confirms it.
    pub fn with_ledger(mut self, ledger: DeadLetterLedger) -> Settler {
        self.ledger = Some(ledger);
        self
    }

    /// False once the confirm channel is closed: nothing can be retried or
    /// dead-lettered until the connection is rebuilt.
    pub fn is_usable(&self) -> bool {
        self.publisher.channel().status().connected()
    }

    /// Applies `outcome` to `delivery`. On error the delivery is not acked,
    /// so nothing is lost: it is nacked back to the queue, except after a
    /// confirm timeout ([`BrokerError::ConfirmTimeout`]), where it stays
    /// unacked until the caller rebuilds the connection and the broker
    /// redelivers it.
    pub async fn settle(
        &self,
        delivery: &Delivery,
        outcome: Outcome,
    ) -> Result<Settled, BrokerError> {
        let result = self.apply(delivery, outcome).await;
        match &result {
            // Requeueing now would only make it wait on the same stuck
            // connection again, spending a delivery attempt each time.
            Err(BrokerError::ConfirmTimeout { .. }) => {}
            // Requeue for another try; the quorum queue's delivery limit stops a loop.
            Err(_) => self.acks.nack(delivery, true),
            Ok(_) => {}
        }
        result
    }

    async fn apply(&self, delivery: &Delivery, outcome: Outcome) -> Result<Settled, BrokerError> {
        let attempts_so_far =
            broker::header_u64(&delivery.properties, HEADER_ATTEMPTS).unwrap_or(0);
        let routing_key = original_routing_key(delivery);
        match outcome {
            Outcome::Ack { why } => {
                self.acks.ack(delivery);
                info!(outcome = "acked", reason = why, "acked");
                Ok(Settled::Acked)
            }
            Outcome::RetryLater { detail } => {
                let attempt = attempts_so_far + 1;
                let queue = usize::try_from(attempts_so_far)
                    .ok()
                    .and_then(|i| self.topology.retry_queues.get(i));
                let Some(queue) = queue else {
                    let detail = format!("gave up after {attempt} attempts; last errors: {detail}");
                    return self
                        .dead_letter(delivery, "undeliverable", &detail, attempt, &routing_key)
                        .await;
                };
                let counter = (HEADER_ATTEMPTS, AMQPValue::LongLongInt(to_i64(attempt)));
                self.delay(delivery, &queue.name, vec![counter], &routing_key, &detail)
                    .await?;
                warn!(outcome = "retried", reason = "unsettled_targets", attempt, queue = %queue.name, delay = ?queue.delay, %detail, "not all targets reached; retrying later");
                Ok(Settled::Retried {
                    queue: queue.name.clone(),
                    attempt,
                })
            }
            Outcome::Defer { wait, detail } => {
                // The longest delay queue within the wait (else the shortest):
                // back a little early, an event waits its remaining time or
                // is deferred again; back late, its channel may sit idle (a
                // 16 s wait would otherwise take the 30 s queue).
                let Some(queue) = self
                    .topology
                    .retry_queues
                    .iter()
                    .filter(|q| q.delay <= wait)
                    .max_by_key(|q| q.delay)
                    .or_else(|| self.topology.retry_queues.iter().min_by_key(|q| q.delay))
                else {
                    // Settings require at least one delay queue; without one, let the broker redeliver.
                    self.acks.nack(delivery, true);
                    return Ok(Settled::Deferred {
                        queue: String::new(),
                    });
                };
                let deferrals =
                    broker::header_u64(&delivery.properties, HEADER_DEFERRALS).unwrap_or(0) + 1;
                let counter = (HEADER_DEFERRALS, AMQPValue::LongLongInt(to_i64(deferrals)));
                // The first deferral's time stays with every later copy.
                let since = broker::header_u64(&delivery.properties, HEADER_DEFERRED_SINCE)
                    .map_or_else(|| chrono::Utc::now().timestamp_millis(), to_i64);
                let since = (HEADER_DEFERRED_SINCE, AMQPValue::LongLongInt(since));
                self.delay(
                    delivery,
                    &queue.name,
                    vec![counter, since],
                    &routing_key,
                    &detail,
                )
                .await?;
                info!(outcome = "deferred", reason = "rate_limited", queue = %queue.name, ?wait, deferrals, "rate limited; deferred");
                Ok(Settled::Deferred {
                    queue: queue.name.clone(),
                })
            }
            Outcome::DeadLetter { reason, detail } => {
                self.dead_letter(delivery, reason, &detail, attempts_so_far + 1, &routing_key)
                    .await
            }
        }
    }

    /// Republishes the delivery to a delay queue with an updated counter
    /// header, waits for the confirm, then acks the original.
    async fn delay(
        &self,
        delivery: &Delivery,
        queue: &str,
        counters: Vec<(&'static str, AMQPValue)>,
        routing_key: &str,
        detail: &str,
    ) -> Result<(), BrokerError> {
        let properties = broker::with_headers(
            &persistent(&delivery.properties),
            counters.into_iter().chain([
                (HEADER_ROUTING_KEY, broker::long_string(routing_key)),
                (HEADER_DETAIL, broker::long_string(&clip(detail))),
            ]),
        );
        self.publisher
            .publish("", queue, &delivery.data, properties)
            .await?;
        self.acks.ack(delivery);
        Ok(())
    }

    async fn dead_letter(
        &self,
        delivery: &Delivery,
        reason: &'static str,
        detail: &str,
        attempts: u64,
        routing_key: &str,
    ) -> Result<Settled, BrokerError> {
        let entry = DeadLetterLedger::new_entry_id();
        let properties = broker::with_headers(
            &persistent(&delivery.properties),
            [
                (HEADER_LEDGER_ENTRY, broker::long_string(&entry)),
                (HEADER_REASON, broker::long_string(reason)),
                (HEADER_DETAIL, broker::long_string(&clip(detail))),
                (HEADER_ATTEMPTS, AMQPValue::LongLongInt(to_i64(attempts))),
                (
                    HEADER_FAILED_AT,
                    broker::long_string(
                        &chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    ),
                ),
                (HEADER_ROUTING_KEY, broker::long_string(routing_key)),
            ],
        );
        self.publisher
            .publish(
                &self.topology.dead_letter_exchange,
                routing_key,
                &delivery.data,
                properties,
            )
            .await?;
        self.acks.ack(delivery);
        warn!(outcome = "dead_lettered", reason, detail, "dead-lettered");
        if let Some(ledger) = &self.ledger {
            match tokio::time::timeout(LEDGER_WRITE_TIMEOUT, ledger.record(&entry)).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    debug!(%error, "dead-letter ledger not written; the next polls date the message")
                }
                Err(_) => {
                    debug!("dead-letter ledger write timed out; the next polls date the message")
                }
            }
        }
        Ok(Settled::DeadLettered { reason })
    }
}

/// The routing key the producer used: kept in a header once the message has
/// been through a retry queue (whose dead-lettering rewrites the key).
fn original_routing_key(delivery: &Delivery) -> String {
    broker::header_str(&delivery.properties, HEADER_ROUTING_KEY)
        .unwrap_or_else(|| delivery.routing_key.as_str().to_string())
}

fn persistent(properties: &lapin::BasicProperties) -> lapin::BasicProperties {
    properties.clone().with_delivery_mode(2)
}

fn clip(detail: &str) -> String {
    crate::deliver::slack::message::truncate(detail, DETAIL_LIMIT)
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}
