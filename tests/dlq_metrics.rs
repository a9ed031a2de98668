//! The dead-letter queue's depth and oldest age on `/metrics`, through a real worker process.

mod support;

use support::metrics::{free_port, wait_for_sample};
use support::{BASIC_RULES, TestEnv};

const DEPTH: &str = "alert_router_dead_letter_queue_messages";
const AGE: &str = "alert_router_dead_letter_oldest_age_seconds";

#[tokio::test]
async fn a_poison_message_shows_as_depth_one_and_an_age_that_grows() {
    let env = TestEnv::start(BASIC_RULES).await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let worker = env.start_worker_process_with(&[
        ("ALERT_ROUTER__HTTP__LISTEN", listen.as_str()),
        ("ALERT_ROUTER__AMQP__DEAD_LETTER_POLL_INTERVAL", "200ms"),
    ]);

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
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let worker = env.start_worker_process_with(&[
        ("ALERT_ROUTER__HTTP__LISTEN", listen.as_str()),
        ("ALERT_ROUTER__AMQP__DEAD_LETTER_POLL_INTERVAL", "200ms"),
    ]);
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
