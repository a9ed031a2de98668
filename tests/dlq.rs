//! `alert-router dlq …` against a real dead-letter queue: list without consuming, show, replay after a fix, purge.

mod support;

use std::process::Stdio;

use serde_json::{Value, json};
use support::{BASIC_RULES, TestEnv, WAIT};
use tokio::io::AsyncWriteExt;

async fn dlq_json(env: &TestEnv, args: &[&str]) -> Value {
    let output = env
        .command()
        .arg("dlq")
        .args(args)
        .arg("--json")
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "dlq {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Publishes `poison`, then a valid marker event, and waits for the marker's
/// post: the queue is FIFO, so by then the poison reached the worker too, and
/// the graceful stop settles it.
async fn dead_letter_through_worker(env: &TestEnv, poison: &[&[u8]]) {
    let worker = env.spawn_worker();
    for body in poison {
        env.publish_raw("issue.created", body).await;
    }
    env.publish(&env.event("marker", json!({}))).await;
    env.slack.wait_for_posts(1, WAIT).await.unwrap();
    worker.stop().await;
}

#[tokio::test]
async fn list_and_show_describe_dead_letters_without_removing_them() {
    let env = TestEnv::start(BASIC_RULES).await;
    let missing_title =
        json!({"id": "no-title", "type": "issue.created", "severity": "low"}).to_string();
    dead_letter_through_worker(&env, &[b"not json at all", missing_title.as_bytes()]).await;

    let listed = dlq_json(&env, &["list"]).await;
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["reason"], "invalid_json");
    assert_eq!(listed[0]["id"], Value::Null);
    assert_eq!(listed[1]["id"], "no-title");
    assert_eq!(listed[1]["reason"], "invalid_event");
    assert_eq!(
        listed[1]["detail"],
        "event field `title` missing field `title`"
    );
    assert_eq!(listed[1]["routing_key"], "issue.created");
    assert_eq!(listed[1]["attempts"], 1);

    let shown = dlq_json(&env, &["show", "no-title"]).await;
    assert_eq!(shown["body"]["id"], "no-title");
    assert_eq!(shown["headers"]["x-alert-router-reason"], "invalid_event");

    let stats = dlq_json(&env, &["stats"]).await;
    assert_eq!(stats["messages"], 2);
    assert_eq!(
        stats["by_reason"],
        json!({"invalid_event": 1, "invalid_json": 1})
    );

    // Browsing consumed nothing, and the order is unchanged.
    assert_eq!(
        env.ready_count(&env.settings.amqp.dead_letter_queue).await,
        2
    );
    let again = dlq_json(&env, &["list"]).await;
    assert_eq!(again[0]["reason"], "invalid_json");

    let text = env.command().args(["dlq", "list"]).output().await.unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("no-title") && text.contains("invalid_event"),
        "{text}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn an_undeliverable_event_is_replayed_after_the_fault_is_fixed() {
    let env = TestEnv::start(BASIC_RULES).await;
    env.slack.set_outage(true);
    let worker = env.spawn_worker();
    let event = env.event("outage-1", json!({}));
    env.publish(&event).await;
    // One try plus three broker retries, each with up to three Slack attempts.
    let mut dead = env.dead_letters().await;
    let letter = dead.next_unacked().await;
    worker.stop().await;
    drop(letter); // returned to the queue when the consumer goes
    drop(dead);

    let listed = dlq_json(&env, &["list"]).await;
    assert_eq!(listed[0]["id"], "outage-1");
    assert_eq!(listed[0]["reason"], "undeliverable");

    env.slack.set_outage(false);
    let replayed = dlq_json(&env, &["replay", "--reason", "undeliverable"]).await;
    assert_eq!(replayed.as_array().unwrap().len(), 1);
    assert_eq!(
        env.ready_count(&env.settings.amqp.dead_letter_queue).await,
        0
    );

    let worker = env.spawn_worker();
    let posts = env.slack.wait_for_posts(1, WAIT).await.unwrap();
    assert_eq!(
        posts[0].metadata.as_ref().unwrap()["event_payload"]["event_id"],
        "outage-1"
    );
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn replay_by_id_takes_only_that_message_and_keeps_the_others_in_order() {
    let env = TestEnv::start(BASIC_RULES).await;
    let a = json!({"id": "a", "type": "issue.created", "severity": "low"}).to_string();
    let b = json!({"id": "b", "type": "issue.created", "severity": "low"}).to_string();
    let c = json!({"id": "c", "type": "issue.created", "severity": "low"}).to_string();
    dead_letter_through_worker(&env, &[a.as_bytes(), b.as_bytes(), c.as_bytes()]).await;

    let replayed = dlq_json(&env, &["replay", "b"]).await;
    assert_eq!(replayed[0]["id"], "b");
    let left: Vec<Value> = dlq_json(&env, &["list"])
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["id"].clone())
        .collect();
    assert_eq!(left, [json!("a"), json!("c")]);
    // The replayed copy is back in the work queue, without the old verdict.
    assert_eq!(env.ready_count(&env.settings.amqp.queue).await, 1);

    let missing = env
        .command()
        .args(["dlq", "replay", "nope"])
        .output()
        .await
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    env.cleanup().await;
}

#[tokio::test]
async fn purge_asks_first_unless_told_yes() {
    let env = TestEnv::start(BASIC_RULES).await;
    dead_letter_through_worker(&env, &[b"junk"]).await;

    let mut child = env
        .command()
        .args(["dlq", "purge"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"no\n")
        .await
        .unwrap();
    let refused = child.wait_with_output().await.unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("Delete all 1 messages"));
    assert_eq!(
        env.ready_count(&env.settings.amqp.dead_letter_queue).await,
        1
    );

    let purged = dlq_json(&env, &["purge", "--yes"]).await;
    assert_eq!(purged["purged"], 1);
    assert_eq!(
        env.ready_count(&env.settings.amqp.dead_letter_queue).await,
        0
    );
    env.cleanup().await;
}
