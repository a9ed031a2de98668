//! A RabbitMQ restart with events in flight: every event is posted exactly once, nothing is dead-lettered or left pending.
//!
//! Restarting the broker closes every client's connections, so the one test
//! that does it lives alone in this binary (cargo runs test binaries one
//! after another, so no other test of this suite uses the broker meanwhile)
//! and starts the broker again in a guard's `Drop`, so a failing assertion
//! does not leave it stopped.

mod support;

use std::time::Duration;

use serde_json::json;
use support::{BASIC_RULES, BrokerStopped, ESCALATIONS, TestEnv, WAIT};

/// Events in the batch.
const EVENTS: usize = 200;
/// Deliveries the worker holds at once (`amqp.prefetch`).
const PREFETCH: usize = 10;
/// Posts answered before the restart; the next `PREFETCH` are held by Slack
/// until the broker is down.
const POSTED_BEFORE: usize = 50;
/// Generous: reconnect backoff on a loaded 2-core machine.
const LONG_WAIT: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_batch_loses_nothing_and_posts_nothing_twice() {
    let mut env = TestEnv::start(BASIC_RULES).await;
    env.settings.amqp.prefetch = PREFETCH as u16;
    // The held posts outlast the restart: no timeout may resend them.
    env.settings.slack.request_timeout = Duration::from_secs(120);
    env.settings.delivery.retry_delays = vec![Duration::from_secs(1); 10];

    let ids: Vec<String> = (0..EVENTS).map(|i| format!("restart-{i:03}")).collect();
    for id in &ids {
        env.publish(&env.event(id, json!({}))).await;
    }
    // The first posts are answered at once; the next ones fill the whole
    // prefetch window and are held until the broker is down, so their acks
    // cannot reach it: it must redeliver them, and they must not post twice.
    let release = env.slack.answer_then_hold(POSTED_BEFORE, PREFETCH);

    let mut worker = env.start_worker_process();
    env.slack
        .wait_for_requests("chat.postMessage", POSTED_BEFORE + PREFETCH, WAIT)
        .await
        .unwrap();
    assert_eq!(env.slack.posts().len(), POSTED_BEFORE, "the rest are held");

    let stopped = tokio::task::spawn_blocking(BrokerStopped::stop)
        .await
        .unwrap();
    // Slack accepts the held posts while no ack can reach the broker.
    release.cancel();
    env.slack
        .wait_for_posts(POSTED_BEFORE + PREFETCH, WAIT)
        .await
        .unwrap();
    // Logged once the held deliveries are finished with.
    worker.wait_for_log("lost RabbitMQ; reconnecting", 1).await;
    tokio::task::spawn_blocking(move || stopped.start())
        .await
        .unwrap();
    env.reconnect_broker().await;

    env.slack
        .wait_for_posts_to(ESCALATIONS, EVENTS, LONG_WAIT)
        .await
        .unwrap();
    worker.wait_for_log("consuming", 2).await;
    env.wait_until_drained(&env.settings.amqp.queue, LONG_WAIT)
        .await;
    let redelivered_and_skipped = worker
        .log_lines()
        .iter()
        .filter(|line| line.contains("already delivered; not sending again"))
        .count();
    assert!(worker.stop().await.success());

    let delivered = support::posts_per_event(&env.slack.posts());
    assert_eq!(
        delivered.keys().cloned().collect::<Vec<_>>(),
        ids,
        "every event arrived"
    );
    assert!(
        delivered.values().all(|&n| n == 1),
        "none twice: {:?}",
        delivered
            .iter()
            .filter(|(_, n)| **n > 1)
            .collect::<Vec<_>>()
    );
    assert!(
        redelivered_and_skipped >= PREFETCH,
        "the held events were redelivered and recognised as sent ({redelivered_and_skipped})"
    );
    env.assert_nothing_pending().await;
    env.cleanup().await;
}
