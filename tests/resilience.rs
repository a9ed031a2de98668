//! Failure paths through the real broker: SIGTERM with work in flight, kill -9 mid-batch, a dropped broker connection, a deleted retry queue.

mod support;

use std::time::Duration;

use serde_json::json;
use support::fake_slack::{ChannelSpec, Fault};
use support::{TestEnv, WAIT, topology};

const TWO_TEAMS: &str = r#"version: 1
defaults:
  slack_channel: C0ESCALATE
rules:
  - name: team-a
    matchers: ['team="a"']
    notify: [{slack_channel: C0TEAMA}]
  - name: team-b
    matchers: ['team="b"']
    notify: [{slack_channel: C0TEAMB}]
"#;

#[tokio::test]
async fn sigterm_with_events_in_flight_drains_them_and_exits_0() {
    let env = TestEnv::start(TWO_TEAMS).await;
    env.slack
        .add_channel("C0TEAMA", "team-a", ChannelSpec::member());
    // Slow answers keep the events in flight while the stop arrives.
    env.slack.fail_next(
        "chat.postMessage",
        3,
        Fault::Delay(Duration::from_millis(800)),
    );
    let mut worker = env.start_worker_process();

    for i in 0..3 {
        env.publish(&env.event(&format!("inflight-{i}"), json!({"labels": {"team": "a"}})))
            .await;
    }
    env.slack
        .wait_for_requests("chat.postMessage", 3, WAIT)
        .await
        .unwrap();
    worker.signal("TERM");
    worker
        .wait_for_log("stopping: no new deliveries; draining", 1)
        .await;
    let status = worker.stop().await;

    assert!(status.success(), "exit status {status}");
    assert_eq!(env.slack.posts().len(), 3, "every in-flight event finished");
    assert_eq!(
        env.ready_count(&env.settings.amqp.queue).await,
        0,
        "and was acked"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_worker_killed_mid_batch_delivers_every_event_exactly_once_after_restart() {
    let mut env = TestEnv::start(TWO_TEAMS).await;
    env.settings.slack.request_timeout = Duration::from_millis(500);
    env.settings.delivery.retry_delays = vec![Duration::from_secs(1); 30];
    env.slack
        .add_channel("C0TEAMA", "team-a", ChannelSpec::member());
    env.slack
        .add_channel("C0TEAMB", "team-b", ChannelSpec::member());
    // Team A's channel never answers while the first worker lives.
    env.slack.fail_channel("C0TEAMA", Fault::Hang);

    let mut first = env.start_worker_process();
    for i in 0..40 {
        let team = if i % 2 == 0 { "a" } else { "b" };
        env.publish(&env.event(&format!("batch-{i}"), json!({"labels": {"team": team}})))
            .await;
    }
    env.slack
        .wait_for_posts_to("C0TEAMB", 20, WAIT)
        .await
        .unwrap();
    // Kill once team A's posts have timed out and the worker has begun to
    // look for them in the history (about a second later), so no team B
    // post sits in the crash window between Slack accepting it and the
    // worker recording it (see README, "Outages").
    env.slack
        .wait_for_requests("chat.postMessage", 40, WAIT)
        .await
        .unwrap();
    env.slack
        .wait_for_requests("conversations.history", 1, WAIT)
        .await
        .unwrap();
    first.child.kill().await.unwrap(); // SIGKILL: nothing drained, nothing acked after this
    env.slack.clear_faults();

    let second = env.start_worker_process();
    env.slack
        .wait_for_posts_to("C0TEAMA", 20, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(second.stop().await.success());

    let delivered = support::posts_per_event(&env.slack.posts());
    assert_eq!(delivered.len(), 40, "every event arrived: {delivered:?}");
    assert!(
        delivered.values().all(|&n| n == 1),
        "none twice: {delivered:?}"
    );
    assert_eq!(env.ready_count(&env.settings.amqp.queue).await, 0);
    env.cleanup().await;
}

/// The broker-side id of the worker connection serving `queue`.
fn connection_pid(queue: &str) -> Option<String> {
    connection_column(queue, "pid")
}

/// `rabbitmqctl list_connections COLUMN` of the worker connection serving `queue`.
fn connection_column(queue: &str, column: &str) -> Option<String> {
    let output = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_connections", column, "client_properties"])
        .output()
        .expect("rabbitmqctl runs");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find(|line| line.contains(&format!("alert-router worker {queue}")))
        .and_then(|line| line.split_whitespace().next().map(str::to_string))
}

#[tokio::test]
async fn the_worker_asks_for_a_heartbeat_every_10_seconds() {
    let env = TestEnv::start(TWO_TEAMS).await;
    let mut worker = env.start_worker_process();
    worker.wait_for_log("consuming", 1).await;
    assert_eq!(
        connection_column(&env.settings.amqp.queue, "timeout").as_deref(),
        Some("10"),
        "a broker that vanishes is noticed within about 20 s, not RabbitMQ's default 2 minutes"
    );
    assert!(worker.stop().await.success());
    env.cleanup().await;
}

#[tokio::test]
async fn the_worker_reconnects_after_the_broker_drops_its_connection() {
    let env = TestEnv::start(TWO_TEAMS).await;
    let mut worker = env.start_worker_process();
    worker.wait_for_log("consuming", 1).await;
    env.publish(&env.event("before-drop", json!({}))).await;
    env.slack.wait_for_posts(1, WAIT).await.unwrap();

    let pid = connection_pid(&env.settings.amqp.queue).expect("the worker's connection is listed");
    let closed = std::process::Command::new("rabbitmqctl")
        .args(["close_connection", &pid, "test: simulated broker restart"])
        .status()
        .unwrap();
    assert!(closed.success());
    worker.wait_for_log("lost RabbitMQ; reconnecting", 1).await;
    worker.wait_for_log("consuming", 2).await;

    env.publish(&env.event("after-drop", json!({}))).await;
    env.slack.wait_for_posts(2, WAIT).await.unwrap();
    assert!(worker.stop().await.success());
    assert_eq!(env.slack.posts().len(), 2);
    env.cleanup().await;
}

#[tokio::test]
async fn a_queue_declared_with_other_arguments_stops_the_worker_with_a_clear_error() {
    let mut env = TestEnv::start(TWO_TEAMS).await;
    // The topology exists with the default delivery limit; ask for another one.
    env.settings.amqp.delivery_limit = 7;
    let result = alert_router::worker::run(
        env.settings.clone(),
        alert_router::config::Secrets::default(),
        tokio_util::sync::CancellationToken::new(),
    )
    .await;
    let message = result
        .expect_err("the worker must not loop on a topology it cannot use")
        .to_string();
    assert!(message.contains("x-delivery-limit"), "{message}");
    assert!(
        message.contains("declared with other arguments"),
        "{message}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_classic_retry_queue_left_by_an_older_version_stops_the_worker_with_the_migration_steps()
{
    let env = TestEnv::start(TWO_TEAMS).await;
    // What an older version declared: the same retry queue, as a classic queue.
    let retry_queue = support::topology(&env.settings).retry_queues[0]
        .name
        .clone();
    let connection =
        alert_router::broker::connect(env.settings.amqp.url.expose(), "alert-router tests")
            .await
            .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_delete(retry_queue.as_str().into(), Default::default())
        .await
        .unwrap();
    let mut old_args = lapin::types::FieldTable::default();
    old_args.insert(
        "x-message-ttl".into(),
        lapin::types::AMQPValue::LongLongInt(500),
    );
    old_args.insert(
        "x-dead-letter-exchange".into(),
        alert_router::broker::long_string(""),
    );
    old_args.insert(
        "x-dead-letter-routing-key".into(),
        alert_router::broker::long_string(&env.settings.amqp.queue),
    );
    channel
        .queue_declare(
            retry_queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            old_args,
        )
        .await
        .unwrap();
    let _ = connection.close(200, "".into()).await;

    let result = alert_router::worker::run(
        env.settings.clone(),
        alert_router::config::Secrets::default(),
        tokio_util::sync::CancellationToken::new(),
    )
    .await;
    let message = result
        .expect_err("the worker must not loop on a classic retry queue")
        .to_string();
    for expected in [
        format!("queue `{retry_queue}`"),
        "classic queue".to_string(),
        "quorum queues".to_string(),
        format!("rabbitmqctl delete_queue --if-empty {retry_queue}"),
        "Moving to quorum retry and dead-letter queues".to_string(),
    ] {
        assert!(
            message.contains(&expected),
            "{expected:?} missing: {message}"
        );
    }
    assert!(!message.contains("PRECONDITION_FAILED"), "{message}");
    env.cleanup().await;
}

/// Queue names in the default virtual host.
fn queue_names() -> Vec<String> {
    let output = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_queues", "name"])
        .output()
        .expect("rabbitmqctl runs");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| line.trim().to_string())
        .collect()
}

#[tokio::test]
async fn a_retry_queue_deleted_under_a_running_worker_is_declared_again_and_the_event_retried() {
    let env = TestEnv::start(TWO_TEAMS).await;
    let mut worker = env.start_worker_process();
    worker.wait_for_log("consuming", 1).await;
    let first_retry = topology(&env.settings).retry_queues[0].name.clone();
    let deleted = std::process::Command::new("rabbitmqctl")
        .args(["-q", "delete_queue", &first_retry])
        .status()
        .unwrap();
    assert!(deleted.success());

    // Slack keeps failing and there is no email to fall back to: the event
    // needs the retry queues, the first of which is gone.
    env.slack.fail_channel("C0ESCALATE", Fault::Http(503));
    env.publish(&env.event("needs-retries", json!({}))).await;
    worker
        .wait_for_log("connecting again to declare the topology", 1)
        .await;
    env.wait_until_ready(&env.settings.amqp.dead_letter_queue, 1, WAIT)
        .await;
    assert!(worker.stop().await.success());

    assert!(
        queue_names().contains(&first_retry),
        "{first_retry} was declared again"
    );
    let letters = env.dlq_json(&["list"]).await;
    assert_eq!(letters[0]["id"], "needs-retries");
    assert_eq!(
        letters[0]["reason"], "undeliverable",
        "dead-lettered by the worker after its retries, not by RabbitMQ's delivery limit after a loop on the missing queue"
    );
    env.cleanup().await;
}
