//! RabbitMQ: the topology the worker declares, connections, and a publisher with confirms.
//!
//! Names come from settings; the defaults are the documented ones (`alerts`,
//! `alerts.router`, `alerts.retry.<delay>`, `alerts.dlx` → `alerts.dead`).

pub mod acks;
pub mod dlq;
pub mod dlq_gauges;
pub mod dlq_ledger;
pub mod watch;

use std::time::Duration;

use lapin::Confirmation;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::config::{AmqpSettings, redact_url};

/// Header: short machine-readable code for why a message was dead-lettered.
pub const HEADER_REASON: &str = "x-alert-router-reason";
/// Header: a sentence an operator can act on.
pub const HEADER_DETAIL: &str = "x-alert-router-detail";
/// Header: delivery attempts so far (broker-level retries).
pub const HEADER_ATTEMPTS: &str = "x-alert-router-attempts";
/// Header: when the message was dead-lettered (RFC 3339).
pub const HEADER_FAILED_AT: &str = "x-alert-router-failed-at";
/// Header: the routing key the producer used, kept across retry queues.
pub const HEADER_ROUTING_KEY: &str = "x-alert-router-routing-key";

/// Why a broker operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot connect to RabbitMQ at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: lapin::Error,
    },
    #[error(
        "cannot connect to RabbitMQ at {url}: no answer within {after:?} (amqp.connect_timeout)"
    )]
    ConnectTimeout { url: String, after: Duration },
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    #[error(
        "RabbitMQ refused (nack) a message published to exchange `{exchange}` with key `{routing_key}`"
    )]
    Nacked {
        exchange: String,
        routing_key: String,
    },
    /// The broker did not confirm in time: the message may or may not be
    /// stored, so whatever depended on it (an ack) must not happen.
    #[error(
        "RabbitMQ did not confirm a message published to exchange `{exchange}` with key `{routing_key}` within {after:?} (amqp.confirm_timeout){}",
        if *.blocked { "; it is blocking publishers (resource alarm)" } else { "" }
    )]
    ConfirmTimeout {
        exchange: String,
        routing_key: String,
        after: Duration,
        /// Whether the connection was blocked by the broker when it timed out.
        blocked: bool,
    },
    #[error("RabbitMQ connection lost: {0}")]
    ConnectionLost(String),
    /// Deliveries were left unacked by confirm timeouts; only new channels
    /// get them redelivered.
    #[error(
        "{deliveries} deliveries were left unacked after their republish was not confirmed; reconnecting so RabbitMQ redelivers them"
    )]
    Stranded { deliveries: usize },
    #[error(
        "RabbitMQ did not answer the topology declarations within {after:?} (amqp.connect_timeout)"
    )]
    DeclareTimeout { after: Duration },
    /// An existing queue or exchange does not match what the worker declares;
    /// retrying cannot fix it, an operator has to.
    #[error("RabbitMQ refused the topology: {entity} {detail}. {fix}")]
    Topology {
        /// e.g. "queue `alerts.retry.5s`".
        entity: String,
        /// What the broker said, without the protocol noise.
        detail: String,
        /// What to do about it.
        fix: String,
    },
    #[error(
        "no queue is bound to exchange `{exchange}` for key `{routing_key}`; has the worker declared its topology?"
    )]
    Unroutable {
        exchange: String,
        routing_key: String,
    },
    #[error(
        "a republish found no queue to go to (a retry or dead-letter queue deleted?); connecting again to declare the topology"
    )]
    TopologyMissing,
}

/// The exchanges and queues of one deployment.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Topic exchange producers publish to.
    pub exchange: String,
    /// The worker's input queue.
    pub queue: String,
    /// Fanout exchange that feeds the dead-letter queue.
    pub dead_letter_exchange: String,
    /// The dead-letter queue.
    pub dead_letter_queue: String,
    /// Delayed-retry queues, in the order they are used.
    pub retry_queues: Vec<RetryQueue>,
    /// Quorum queue redelivery limit before the broker dead-letters by itself.
    pub delivery_limit: u32,
    /// Limit on declaring everything (`amqp.connect_timeout`).
    pub declare_timeout: Duration,
}

/// One delayed-retry queue: messages wait `delay`, then return to the work queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryQueue {
    pub name: String,
    pub delay: Duration,
}

impl Topology {
    pub fn from_settings(amqp: &AmqpSettings, retry_delays: &[Duration]) -> Topology {
        Topology {
            exchange: amqp.exchange.clone(),
            queue: amqp.queue.clone(),
            dead_letter_exchange: amqp.dead_letter_exchange.clone(),
            dead_letter_queue: amqp.dead_letter_queue.clone(),
            retry_queues: retry_delays
                .iter()
                .map(|delay| RetryQueue {
                    name: format!("{}.{}", amqp.retry_queue_prefix, delay_label(*delay)),
                    delay: *delay,
                })
                .collect(),
            delivery_limit: amqp.delivery_limit,
            declare_timeout: amqp.connect_timeout,
        }
    }

    /// Declares everything, idempotently: safe on every start and reconnect.
    ///
    /// Every queue is a quorum queue that dead-letters at-least-once (which
    /// RabbitMQ only allows with `x-overflow: reject-publish`), so a message
    /// leaving a queue by TTL or delivery limit is never dropped on the way.
    /// The work queue dead-letters (after `delivery_limit` redeliveries) to the
    /// dead-letter exchange. Retry queues dead-letter through the default
    /// exchange straight to the work queue, so a retry never reaches other
    /// consumers of `alerts`.
    pub async fn declare(&self, channel: &Channel) -> Result<(), BrokerError> {
        tokio::time::timeout(self.declare_timeout, self.declare_all(channel))
            .await
            .map_err(|_| BrokerError::DeclareTimeout {
                after: self.declare_timeout,
            })?
    }

    async fn declare_all(&self, channel: &Channel) -> Result<(), BrokerError> {
        let durable_exchange = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        for (name, kind) in [
            (&self.exchange, ExchangeKind::Topic),
            (&self.dead_letter_exchange, ExchangeKind::Fanout),
        ] {
            channel
                .exchange_declare(
                    name.as_str().into(),
                    kind,
                    durable_exchange,
                    FieldTable::default(),
                )
                .await
                .map_err(|e| refused(&format!("exchange `{name}`"), false, e))?;
        }

        // No dead-letter exchange of its own: the end of the line.
        declare_queue(channel, &self.dead_letter_queue, quorum_args(None), true).await?;
        channel
            .queue_bind(
                self.dead_letter_queue.as_str().into(),
                self.dead_letter_exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;

        let mut work_args = quorum_args(Some(&self.dead_letter_exchange));
        work_args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
        );
        declare_queue(channel, &self.queue, work_args, false).await?;
        channel
            .queue_bind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;

        for retry in &self.retry_queues {
            let mut args = quorum_args(Some(""));
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(i64::try_from(retry.delay.as_millis()).unwrap_or(i64::MAX)),
            );
            args.insert("x-dead-letter-routing-key".into(), long_string(&self.queue));
            declare_queue(channel, &retry.name, args, true).await?;
        }
        Ok(())
    }
}

/// Declares a durable queue; `migrated_to_quorum` marks the retry and
/// dead-letter queues, which older versions declared as classic queues, so a
/// leftover one gets migration advice rather than just "delete it".
async fn declare_queue(
    channel: &Channel,
    name: &str,
    args: FieldTable,
    migrated_to_quorum: bool,
) -> Result<(), BrokerError> {
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .map(|_| ())
        .map_err(|e| refused(&format!("queue `{name}`"), migrated_to_quorum, e))
}

/// Arguments of a quorum queue that dead-letters at-least-once to `dead_letter_exchange`.
fn quorum_args(dead_letter_exchange: Option<&str>) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long_string("quorum"));
    if let Some(exchange) = dead_letter_exchange {
        args.insert("x-dead-letter-exchange".into(), long_string(exchange));
    }
    args.insert(
        "x-dead-letter-strategy".into(),
        long_string("at-least-once"),
    );
    args.insert("x-overflow".into(), long_string("reject-publish"));
    args
}

/// Turns a declaration refused with 406 PRECONDITION_FAILED (an existing
/// entity with other arguments) into an error naming it and the fix; other
/// errors pass through. Retrying cannot fix a 406, so the worker stops on it.
fn refused(entity: &str, migrated_to_quorum: bool, error: lapin::Error) -> BrokerError {
    let text = error.to_string();
    if !text.contains("PRECONDITION_FAILED") {
        return BrokerError::Amqp(error);
    }
    // The broker's own words, e.g. "inequivalent arg 'x-queue-type' for queue …".
    let detail = text
        .split_once("PRECONDITION_FAILED - ")
        .map_or(text.as_str(), |(_, rest)| rest)
        .trim_end_matches(['"', ')', ' '])
        .to_string();
    let name = entity.split('`').nth(1).unwrap_or(entity).to_string();
    // The broker names only the first argument that differs; any of the
    // quorum-only ones means the queue predates the move to quorum queues.
    let predates_quorum = ["'x-queue-type'", "'x-overflow'", "'x-dead-letter-strategy'"]
        .iter()
        .any(|arg| detail.contains(arg));
    let fix = if migrated_to_quorum && predates_quorum {
        format!(
            "It looks like the classic queue an older alert-router declared; retry and dead-letter queues are now quorum queues with at-least-once dead-lettering. \
             Stop the workers, empty it (retry queues empty themselves into the work queue within their delay; move dead letters out with a shovel), \
             delete it with `rabbitmqctl delete_queue --if-empty {name}` and start again: see \"Moving to quorum retry and dead-letter queues\" in the README"
        )
    } else {
        "It was declared with other arguments (e.g. a classic work queue, or a changed amqp.delivery_limit); \
         delete it (after draining) or keep the old settings"
            .to_string()
    };
    BrokerError::Topology {
        entity: entity.to_string(),
        detail: format!("exists with other arguments ({detail})"),
        fix,
    }
}

/// `Duration::from_secs(120)` → `2m`, `Duration::from_secs(90)` → `1m30s`.
pub fn delay_label(delay: Duration) -> String {
    humantime::format_duration(delay)
        .to_string()
        .replace(' ', "")
}

/// Largest AMQP frame the worker proposes (the broker's default is 128 KiB).
/// lapin keeps a receive and a send buffer of 32 frames per connection,
/// zero-filled: at 128 KiB that is 16 MiB resident for the worker's two
/// connections, for events of a few KiB. At 32 KiB it is 4 MiB; a larger
/// body is simply sent in more frames. A message's headers travel in one
/// frame and cannot be split: 32 KiB leaves producers' headers, `x-death` and
/// the worker's own ample room.
const FRAME_MAX: u32 = 32 * 1024;

/// Heartbeat interval the worker asks for, in seconds. RabbitMQ proposes 60,
/// and a connection is taken for dead after two silent intervals: a broker
/// gone without a word (a host lost, a network partition) would keep
/// `/readyz` green for two minutes. lapin sends heartbeats from its own I/O
/// thread, so a busy worker does not miss them.
const HEARTBEAT_SECS: u16 = 10;

/// Opens a connection named after this process, so `rabbitmqctl list_connections` tells who is who.
/// Gives up after the default `amqp.connect_timeout`.
pub async fn connect(url: &str, name: &str) -> Result<Connection, BrokerError> {
    connect_within(url, name, AmqpSettings::default().connect_timeout).await
}

/// [`connect`], giving up after `timeout`: a broker that takes the TCP
/// connection but never answers the handshake would otherwise hang forever.
pub async fn connect_within(
    url: &str,
    name: &str,
    timeout: Duration,
) -> Result<Connection, BrokerError> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let connecting = async {
        match url.parse::<AMQPUri>() {
            Ok(mut uri) => {
                // An operator's own `?frame_max=` and `?heartbeat=` win.
                uri.query.frame_max.get_or_insert(FRAME_MAX);
                uri.query.heartbeat.get_or_insert(HEARTBEAT_SECS);
                Connection::connect_uri(uri, properties).await
            }
            // lapin says what is wrong with it.
            Err(_) => Connection::connect(url, properties).await,
        }
    };
    match tokio::time::timeout(timeout, connecting).await {
        Ok(connected) => connected.map_err(|source| BrokerError::Connect {
            url: redact_url(url),
            source,
        }),
        Err(_) => Err(BrokerError::ConnectTimeout {
            url: redact_url(url),
            after: timeout,
        }),
    }
}

/// Closes `connection`, giving up after `timeout`. A connection the broker
/// blocks cannot even send `connection.close` (lapin holds every frame back),
/// so it is not tried: dropping it closes it once the broker unblocks.
pub async fn close_within(connection: &Connection, timeout: Duration, reason: &str) {
    if connection.status().connected() && !connection.status().blocked() {
        let _ = tokio::time::timeout(timeout, connection.close(200, reason.into())).await;
    }
}

/// A channel in confirm mode: every publish returns only once the broker has
/// the message, or fails after the confirm timeout.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
    /// Whether the connection is blocked (for the error message).
    connection_status: lapin::ConnectionStatus,
    confirm_timeout: Duration,
}

impl Publisher {
    /// Opens a confirm channel on `connection`, with the default `amqp.confirm_timeout`.
    pub async fn open(connection: &Connection) -> Result<Publisher, BrokerError> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Publisher {
            channel,
            connection_status: connection.status().clone(),
            confirm_timeout: AmqpSettings::default().confirm_timeout,
        })
    }

    /// The same publisher, waiting at most `timeout` for each confirm.
    pub fn with_confirm_timeout(mut self, timeout: Duration) -> Publisher {
        self.confirm_timeout = timeout;
        self
    }

    /// The underlying channel (for declarations and queue inspection).
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publishes `body` as mandatory and waits for the broker's confirm, at
    /// most the confirm timeout.
    ///
    /// Mandatory turns "no queue bound" into an error instead of a silent drop.
    /// On [`BrokerError::ConfirmTimeout`] the message may still be stored
    /// later (the frame may be waiting on a blocked connection): callers must
    /// treat it as "unknown", never as "not published" nor "published".
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BrokerError> {
        let confirmed = async {
            self.channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    body,
                    properties,
                )
                .await?
                .await
        };
        let confirm = match tokio::time::timeout(self.confirm_timeout, confirmed).await {
            Ok(confirm) => confirm?,
            Err(_) => {
                return Err(BrokerError::ConfirmTimeout {
                    exchange: exchange.to_string(),
                    routing_key: routing_key.to_string(),
                    after: self.confirm_timeout,
                    blocked: self.connection_status.blocked(),
                });
            }
        };
        match confirm {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(_)) => Err(BrokerError::Unroutable {
                exchange: exchange.to_string(),
                routing_key: routing_key.to_string(),
            }),
            Confirmation::Nack(_) => Err(BrokerError::Nacked {
                exchange: exchange.to_string(),
                routing_key: routing_key.to_string(),
            }),
        }
    }
}

/// A string header value.
pub fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

/// Reads a header as text, whatever string type the producer used.
pub fn header_str(properties: &BasicProperties, name: &str) -> Option<String> {
    let headers = properties.headers().as_ref()?;
    match headers.inner().get(&ShortString::from(name))? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// Reads a header as a non-negative integer, whatever integer type was used.
pub fn header_u64(properties: &BasicProperties, name: &str) -> Option<u64> {
    let headers = properties.headers().as_ref()?;
    let value = match headers.inner().get(&ShortString::from(name))? {
        AMQPValue::ShortShortInt(v) => i64::from(*v),
        AMQPValue::ShortShortUInt(v) => i64::from(*v),
        AMQPValue::ShortInt(v) => i64::from(*v),
        AMQPValue::ShortUInt(v) => i64::from(*v),
        AMQPValue::LongInt(v) => i64::from(*v),
        AMQPValue::LongUInt(v) => i64::from(*v),
        AMQPValue::LongLongInt(v) => *v,
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).parse().ok()?,
        _ => return None,
    };
    u64::try_from(value).ok()
}

/// `properties` with `headers` set (added to, or replacing, what was there).
pub fn with_headers(
    properties: &BasicProperties,
    headers: impl IntoIterator<Item = (&'static str, AMQPValue)>,
) -> BasicProperties {
    let mut table = properties.headers().clone().unwrap_or_default();
    for (name, value) in headers {
        table.insert(name.into(), value);
    }
    properties.clone().with_headers(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_queues_are_named_after_their_delay() {
        let topology = Topology::from_settings(
            &AmqpSettings::default(),
            &[5, 30, 90, 120, 1800].map(Duration::from_secs),
        );
        let names: Vec<_> = topology
            .retry_queues
            .iter()
            .map(|q| q.name.as_str())
            .collect();
        assert_eq!(
            names,
            [
                "alerts.retry.5s",
                "alerts.retry.30s",
                "alerts.retry.1m30s",
                "alerts.retry.2m",
                "alerts.retry.30m"
            ]
        );
    }

    #[test]
    fn headers_are_read_whatever_their_wire_type() {
        let props = with_headers(
            &BasicProperties::default(),
            [
                (HEADER_ATTEMPTS, AMQPValue::LongInt(3)),
                (HEADER_REASON, long_string("no_route")),
            ],
        );
        assert_eq!(header_u64(&props, HEADER_ATTEMPTS), Some(3));
        assert_eq!(
            header_str(&props, HEADER_REASON).as_deref(),
            Some("no_route")
        );
        assert_eq!(header_str(&props, "absent"), None);
    }
}
