//! The dead-letter queue's depth and oldest age on `/metrics`, through a real worker process.

mod support;

use support::metrics::{free_port, wait_for_sample};
use support::{BASIC_RULES, TestEnv, WorkerProcess};

const DEPTH: &str = "alert_router_dead_letter_queue_messages";
const AGE: &str = "alert_router_dead_letter_oldest_age_seconds";

/// A worker process serving `/metrics` on a port of its own, polling the
/// dead-letter queue every 200 ms.
fn start_polling_worker(env: &TestEnv) -> (WorkerProcess, u16) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let worker = env.start_worker_process_with(&[
        ("ALERT_ROUTER__HTTP__LISTEN", listen.as_str()),
        ("ALERT_ROUTER__AMQP__DEAD_LETTER_POLL_INTERVAL", "200ms"),
    ]);
    (worker, port)
}

#[tokio::test]
async fn a_poison_message_shows_as_depth_one_and_an_age_that_grows() {
    let env = TestEnv::start(BASIC_RULES).await;
    let (worker, port) = start_polling_worker(&env);

    // Before anything fails the queue is polled and empty: 0 and 0, not absent.
    assert_eq!(wait_for_sample(port, DEPTH, |v| v == 0.0).await, 0.0);
    assert_eq!(wait_for_sample(port, AGE, |v| v == 0.0).await, 0.0);

    env.publish_raw("issue.created", b"{not json").await;
    wait_for_sample(port, DEPTH, |v| v == 1.0).await;
    let first = wait_for_sample(port, AGE, |v| v > 0.0).await;
    // The head is not consumed by the poll: the age keeps growing while the
    // depth stays 1.
    let later = wait_for_sample(port, AGE, |v| v >= first + 1.0).await;
    assert!(later > first);
    assert_eq!(wait_for_sample(port, DEPTH, |_| true).await, 1.0);
    // The by-reason counter the dashboard and rules use.
    wait_for_sample(
        port,
        "alert_router_events_total{outcome=\"dead_lettered\",reason=\"invalid_json\"",
        |v| v == 1.0,
    )
    .await;

    assert!(worker.stop().await.success());
    // Still there, in one piece, for an operator: peeking consumed nothing.
    let mut letters = env.dead_letters().await;
    let letter = letters.next().await;
    assert_eq!(letter.body, b"{not json");
    assert_eq!(
        letter.header("x-alert-router-reason").as_deref(),
        Some("invalid_json")
    );
    env.cleanup().await;
}

#[tokio::test]
async fn emptying_the_queue_brings_depth_and_age_to_zero() {
    let env = TestEnv::start(BASIC_RULES).await;
    let (worker, port) = start_polling_worker(&env);
    env.publish_raw("issue.created", b"{not json").await;
    wait_for_sample(port, DEPTH, |v| v == 1.0).await;
    wait_for_sample(port, AGE, |v| v > 0.0).await;

    let purge = env
        .command()
        .args(["dlq", "purge", "--yes"])
        .output()
        .await
        .unwrap();
    assert!(purge.status.success());
    wait_for_sample(port, DEPTH, |v| v == 0.0).await;
    wait_for_sample(port, AGE, |v| v == 0.0).await;

    assert!(worker.stop().await.success());
    env.cleanup().await;
}

/// A poison event with an id, so `dlq replay ID` can pick it.
fn poison_with_id(id: &str) -> Vec<u8> {
    // Valid JSON, but no `type`: dead-lettered as a schema violation.
    serde_json::to_vec(&serde_json::json!({"id": id, "workspace": "T1"})).unwrap()
}

#[tokio::test]
async fn the_age_is_the_oldest_dead_letters_across_a_partial_replay_a_restart_and_replicas() {
    let env = TestEnv::start(BASIC_RULES).await;
    let (worker_a, port_a) = start_polling_worker(&env);

    env.publish_raw("issue.created", &poison_with_id("older"))
        .await;
    wait_for_sample(port_a, DEPTH, |v| v == 1.0).await;
    wait_for_sample(port_a, AGE, |v| v >= 2.0).await;
    // "older" is now at least 2 s older than anything published from here.
    let newer_published = std::time::Instant::now();
    env.publish_raw("issue.created", &poison_with_id("newer"))
        .await;
    wait_for_sample(port_a, DEPTH, |v| v == 2.0).await;

    // Replaying the head leaves "newer" at the head (the worker dead-letters
    // the replayed poison again, at the tail): the age drops to "newer"'s,
    // which is never more than the time since it was published.
    let replay = env
        .command()
        .args(["dlq", "replay", "older"])
        .output()
        .await
        .unwrap();
    assert!(replay.status.success(), "{replay:?}");
    assert!(
        !String::from_utf8_lossy(&replay.stderr).contains("ledger"),
        "{replay:?}"
    );
    wait_for_sample(port_a, AGE, |v| {
        v <= newer_published.elapsed().as_secs_f64() + 0.5
    })
    .await;
    wait_for_sample(port_a, DEPTH, |v| v == 2.0).await;
    let head_age = wait_for_sample(port_a, AGE, |v| v >= 2.0).await;

    // A second replica reports the same age from its first poll on: it is
    // the queue's, not how long the replica has watched it.
    let (worker_b, port_b) = start_polling_worker(&env);
    let first_on_b = wait_for_sample(port_b, AGE, |v| v > 0.0).await;
    assert!(
        first_on_b >= head_age,
        "a new replica's first age {first_on_b} is below the head's age {head_age}"
    );
    let on_a = wait_for_sample(port_a, AGE, |_| true).await;
    let on_b = wait_for_sample(port_b, AGE, |_| true).await;
    assert!(
        (on_a - on_b).abs() < 2.0,
        "replicas disagree: {on_a} and {on_b}"
    );

    // Restarting every replica keeps it too.
    assert!(worker_a.stop().await.success());
    assert!(worker_b.stop().await.success());
    let (worker_c, port_c) = start_polling_worker(&env);
    let first_on_c = wait_for_sample(port_c, AGE, |v| v > 0.0).await;
    assert!(
        first_on_c >= head_age,
        "{first_on_c} after a restart, {head_age} before"
    );

    // Emptying the queue through the CLI empties the ledger with it.
    let purge = env
        .command()
        .args(["dlq", "purge", "--yes"])
        .output()
        .await
        .unwrap();
    assert!(purge.status.success(), "{purge:?}");
    wait_for_sample(port_c, AGE, |v| v == 0.0).await;
    let mut redis = support::redis_connection(&env.settings).await;
    let ledger = format!(
        "{}:dead-letters:{}",
        env.settings.redis.key_prefix, env.settings.amqp.dead_letter_queue
    );
    let entries: u64 = redis::cmd("ZCARD")
        .arg(&ledger)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(entries, 0);

    assert!(worker_c.stop().await.success());
    env.cleanup().await;
}
