//! A bench's own namespace on the broker: filling its queue with confirms, deleting what it created.

use std::time::{Duration, Instant};

use alert_router::config::Settings;
use anyhow::bail;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeleteOptions,
};
use lapin::{BasicProperties, Channel, Confirmation, Connection, PublisherConfirm};

/// Most publisher confirms outstanding at once.
const CONFIRM_WINDOW: usize = 2_000;

/// Every bench event is an escalation.
pub const ROUTING_KEY: &str = "escalation.triggered";

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

pub fn check_confirm(confirmation: Confirmation) -> anyhow::Result<()> {
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => bail!("message returned unroutable"),
        Confirmation::Nack(_) => bail!("message nacked by the broker"),
        Confirmation::NotRequested => bail!("channel is not in confirm mode"),
    }
}

/// Publishes `body` persistently and mandatory; the confirm comes later.
pub async fn publish_one(
    channel: &Channel,
    exchange: &str,
    body: &[u8],
) -> lapin::Result<PublisherConfirm> {
    channel
        .basic_publish(
            exchange.into(),
            ROUTING_KEY.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            persistent(),
        )
        .await
}

/// Publishes every body persistently, confirms awaited concurrently (at most
/// [`CONFIRM_WINDOW`] outstanding). Returns the time it took.
pub async fn publish_all(
    channel: &Channel,
    exchange: &str,
    bodies: &[Vec<u8>],
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    for body in bodies {
        pending.push(publish_one(channel, exchange, body).await?);
        while pending.len() >= CONFIRM_WINDOW {
            if let Some(confirmation) = pending.next().await {
                check_confirm(confirmation?)?;
            }
        }
    }
    while let Some(confirmation) = pending.next().await {
        check_confirm(confirmation?)?;
    }
    Ok(started.elapsed())
}

pub async fn confirm_channel(connection: &Connection) -> anyhow::Result<Channel> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// Deletes the topology named by `settings` and every Redis key under its prefix.
pub async fn delete(
    connection: &Connection,
    redis: &mut redis::aio::MultiplexedConnection,
    settings: &Settings,
) -> anyhow::Result<()> {
    let channel = connection.create_channel().await?;
    let topology = alert_router::broker::Topology::from_settings(
        &settings.amqp,
        &settings.delivery.retry_delays,
    );
    let mut queues = vec![topology.queue.clone(), topology.dead_letter_queue.clone()];
    queues.extend(topology.retry_queues.iter().map(|q| q.name.clone()));
    for queue in queues {
        channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await?;
    }
    for exchange in [&topology.exchange, &topology.dead_letter_exchange] {
        channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await?;
    }
    let _ = channel.close(200, "".into()).await;
    let pattern = format!("{}:*", settings.redis.key_prefix);
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(redis)
            .await?;
        if !keys.is_empty() {
            let _: () = redis::cmd("UNLINK").arg(keys).query_async(redis).await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}
