//! Deleting what a bench created: its exchanges, queues and Redis keys.

use alert_router::config::Settings;
use lapin::Connection;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};

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
