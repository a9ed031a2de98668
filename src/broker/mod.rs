//! RabbitMQ: the topology the worker declares, connections, and a publisher with confirms.
//!
//! Names come from settings; the defaults are the documented ones (`alerts`,
//! `alerts.router`, `alerts.retry.<delay>`, `alerts.dlx` → `alerts.dead`).

pub mod acks;
pub mod dlq;

use std::time::Duration;

use lapin::Confirmation;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
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
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    #[error(
        "RabbitMQ refused (nack) a message published to exchange `{exchange}` with key `{routing_key}`"
    )]
    Nacked {
        exchange: String,
        routing_key: String,
    },
    #[error(
        "RabbitMQ refused the topology: {0}. An existing queue or exchange was declared with other arguments (e.g. a classic `alerts.router`, or a changed amqp.delivery_limit); delete it (after draining) or keep the old settings"
    )]
    Topology(String),
    #[error(
        "no queue is bound to exchange `{exchange}` for key `{routing_key}`; has the worker declared its topology?"
    )]
    Unroutable {
        exchange: String,
        routing_key: String,
    },
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
        }
    }

    /// Declares everything, idempotently: safe on every start and reconnect.
    ///
    /// The work queue is a quorum queue whose own dead-lettering (after
    /// `delivery_limit` redeliveries) goes at-least-once to the dead-letter
    /// exchange. Retry queues dead-letter through the default exchange straight
    /// to the work queue, so a retry never reaches other consumers of `alerts`.
    pub async fn declare(&self, channel: &Channel) -> Result<(), BrokerError> {
        self.declare_all(channel).await.map_err(|e| match e {
            // 406: an existing entity has other arguments; retrying cannot fix it.
            BrokerError::Amqp(inner) if inner.to_string().contains("PRECONDITION_FAILED") => {
                BrokerError::Topology(inner.to_string())
            }
            other => other,
        })
    }

    async fn declare_all(&self, channel: &Channel) -> Result<(), BrokerError> {
        let durable_exchange = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        let durable_queue = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .exchange_declare(
                self.exchange.as_str().into(),
                ExchangeKind::Topic,
                durable_exchange,
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                self.dead_letter_exchange.as_str().into(),
                ExchangeKind::Fanout,
                durable_exchange,
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_declare(
                self.dead_letter_queue.as_str().into(),
                durable_queue,
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                self.dead_letter_queue.as_str().into(),
                self.dead_letter_exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;

        let mut work_args = FieldTable::default();
        work_args.insert("x-queue-type".into(), long_string("quorum"));
        work_args.insert(
            "x-dead-letter-exchange".into(),
            long_string(&self.dead_letter_exchange),
        );
        work_args.insert(
            "x-dead-letter-strategy".into(),
            long_string("at-least-once"),
        );
        work_args.insert("x-overflow".into(), long_string("reject-publish"));
        work_args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
        );
        channel
            .queue_declare(self.queue.as_str().into(), durable_queue, work_args)
            .await?;
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
            let mut args = FieldTable::default();
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(i64::try_from(retry.delay.as_millis()).unwrap_or(i64::MAX)),
            );
            args.insert("x-dead-letter-exchange".into(), long_string(""));
            args.insert("x-dead-letter-routing-key".into(), long_string(&self.queue));
            channel
                .queue_declare(retry.name.as_str().into(), durable_queue, args)
                .await?;
        }
        Ok(())
    }
}

/// `Duration::from_secs(120)` → `2m`, `Duration::from_secs(90)` → `1m30s`.
pub fn delay_label(delay: Duration) -> String {
    humantime::format_duration(delay)
        .to_string()
        .replace(' ', "")
}

/// Opens a connection named after this process, so `rabbitmqctl list_connections` tells who is who.
pub async fn connect(url: &str, name: &str) -> Result<Connection, BrokerError> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(url, properties)
        .await
        .map_err(|source| BrokerError::Connect {
            url: redact_url(url),
            source,
        })
}

/// A channel in confirm mode: every publish returns only once the broker has the message.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
}

impl Publisher {
    pub async fn open(connection: &Connection) -> Result<Publisher, BrokerError> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Publisher { channel })
    }

    /// The underlying channel (for declarations and queue inspection).
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publishes `body` as mandatory and waits for the broker's confirm.
    ///
    /// Mandatory turns "no queue bound" into an error instead of a silent drop.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BrokerError> {
        let confirm = self
            .channel
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
            .await?;
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
