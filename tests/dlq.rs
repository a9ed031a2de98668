//! `alert-router dlq …` against a real dead-letter queue: list without consuming, show, replay after a fix, dry runs, poison, purge.

mod support;

use std::process::{Output, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use support::{BASIC_RULES, TestEnv, WAIT};
use tokio::io::AsyncWriteExt;

/// The failure bound for a replay that must end: far beyond what it needs,
/// so a loaded machine cannot trip it, yet a replay that never ends fails.
const REPLAY_ENDS_WITHIN: Duration = Duration::from_secs(60);

/// Runs `dlq ARGS` to the end (text output), failing the test if it never ends.
async fn dlq_run(env: &TestEnv, args: &[&str]) -> Output {
    let run = env.command().arg("dlq").args(args).output();
    tokio::time::timeout(REPLAY_ENDS_WITHIN, run)
        .await
        .unwrap_or_else(|_| panic!("dlq {args:?} did not end"))
        .unwrap()
}

/// The ids in the dead-letter queue, in queue order (null for bodies without one).
async fn dead_letter_ids(env: &TestEnv) -> Vec<Value> {
    env.dlq_json(&["list"])
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["id"].clone())
        .collect()
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

    let listed = env.dlq_json(&["list"]).await;
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

    let shown = env.dlq_json(&["show", "no-title"]).await;
    assert_eq!(shown["body"]["id"], "no-title");
    assert_eq!(shown["headers"]["x-alert-router-reason"], "invalid_event");

    let stats = env.dlq_json(&["stats"]).await;
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
    let again = env.dlq_json(&["list"]).await;
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
    drop(letter);
    // Given back to the queue when the consumer's channel closes; the broker
    // requeues it after answering the close, so wait to see it there.
    dead.close().await;
    env.wait_until_ready(&env.settings.amqp.dead_letter_queue, 1, WAIT)
        .await;

    let listed = env.dlq_json(&["list"]).await;
    assert_eq!(listed[0]["id"], "outage-1");
    assert_eq!(listed[0]["reason"], "undeliverable");

    env.slack.set_outage(false);
    let replayed = env.dlq_json(&["replay", "--reason", "undeliverable"]).await;
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

    let replayed = env.dlq_json(&["replay", "b"]).await;
    assert_eq!(replayed[0]["id"], "b");
    let left: Vec<Value> = env
        .dlq_json(&["list"])
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

    let purged = env.dlq_json(&["purge", "--yes"]).await;
    assert_eq!(purged["purged"], 1);
    assert_eq!(
        env.ready_count(&env.settings.amqp.dead_letter_queue).await,
        0
    );
    env.cleanup().await;
}

#[tokio::test]
async fn replay_all_ends_while_a_worker_sends_replayed_poison_straight_back() {
    const POISON: usize = 20;
    let env = TestEnv::start(BASIC_RULES).await;
    let mut worker = env.start_worker_process();
    for n in 0..POISON {
        if n % 2 == 0 {
            env.publish_raw("issue.created", b"not json").await;
        } else {
            let no_title = json!({"id": format!("no-title-{n}"), "type": "issue.created"});
            env.publish(&no_title).await;
        }
    }
    worker.wait_for_log("dead-lettered", POISON).await;
    let dead_letter_queue = &env.settings.amqp.dead_letter_queue;
    assert_eq!(env.ready_count(dead_letter_queue).await, POISON as u32);

    // The worker keeps running: every replayed copy is dead-lettered again.
    let replay = dlq_run(&env, &["replay", "--all"]).await;
    let stdout = String::from_utf8_lossy(&replay.stdout);
    let stderr = String::from_utf8_lossy(&replay.stderr);
    assert!(replay.status.success(), "{stderr}");
    assert!(
        stdout.contains(&format!(
            "replayed {POISON} messages to exchange `{}` ({POISON} were in {dead_letter_queue} at the start)",
            env.settings.amqp.exchange
        )),
        "{stdout}"
    );
    assert!(
        stderr.contains(&format!(
            "warning: {POISON} of the replayed messages are poison (invalid_event: 10, invalid_json: 10)"
        )),
        "{stderr}"
    );

    // Each came back once, and none was taken twice.
    worker.wait_for_log("dead-lettered", 2 * POISON).await;
    worker.stop().await;
    assert_eq!(env.ready_count(dead_letter_queue).await, POISON as u32);
    env.cleanup().await;
}

#[tokio::test]
async fn a_dry_run_shows_what_would_be_replayed_and_leaves_the_queue_as_it_was() {
    let env = TestEnv::start(BASIC_RULES).await;
    let a = json!({"id": "a", "type": "issue.created", "severity": "low"}).to_string();
    let c = json!({"id": "c", "type": "issue.created", "severity": "low"}).to_string();
    dead_letter_through_worker(&env, &[a.as_bytes(), b"not json", c.as_bytes()]).await;
    let before = dead_letter_ids(&env).await;
    assert_eq!(before, [json!("a"), Value::Null, json!("c")]);

    let shown = env.dlq_json(&["replay", "--all", "--dry-run"]).await;
    let shown = shown.as_array().unwrap();
    let summary: Vec<Value> = shown
        .iter()
        .map(|l| json!([l["id"], l["reason"], l["routing_key"], l["attempts"]]))
        .collect();
    assert_eq!(
        summary,
        [
            json!(["a", "invalid_event", "issue.created", 1]),
            json!([null, "invalid_json", "issue.created", 1]),
            json!(["c", "invalid_event", "issue.created", 1]),
        ]
    );

    // A dry run that skips some messages returns those in place too.
    let only_json = env
        .dlq_json(&["replay", "--reason", "invalid_json", "--dry-run"])
        .await;
    assert_eq!(only_json.as_array().unwrap().len(), 1);

    let text = dlq_run(&env, &["replay", "--all", "--dry-run"]).await;
    assert!(text.status.success());
    let stdout = String::from_utf8_lossy(&text.stdout);
    assert!(
        stdout.contains("would replay a (issue.created, was invalid_event, attempts 1)"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "dry run: would replay 3 of the 3 messages in {}; nothing changed",
            env.settings.amqp.dead_letter_queue
        )),
        "{stdout}"
    );
    let stderr = String::from_utf8_lossy(&text.stderr);
    assert!(
        stderr.contains("warning: 3 of the messages to replay are poison"),
        "{stderr}"
    );

    // Nothing was published, nothing was removed, and the order is the same.
    assert_eq!(dead_letter_ids(&env).await, before);
    assert_eq!(
        env.ready_count(&env.settings.amqp.dead_letter_queue).await,
        3
    );
    assert_eq!(env.ready_count(&env.settings.amqp.queue).await, 0);
    env.cleanup().await;
}

#[tokio::test]
async fn replaying_a_poison_message_by_id_warns_that_it_will_come_back() {
    let env = TestEnv::start(BASIC_RULES).await;
    let no_title = json!({"id": "no-title", "type": "issue.created"}).to_string();
    dead_letter_through_worker(&env, &[no_title.as_bytes()]).await;

    let replay = dlq_run(&env, &["replay", "no-title"]).await;
    let stderr = String::from_utf8_lossy(&replay.stderr);
    // Warned, not refused: the operator may know better (e.g. a fixed validator).
    assert!(replay.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "warning: 1 of the replayed messages is poison (invalid_event: 1): their bodies \
             cannot be processed as they are, so a worker dead-letters them again and they \
             come back to {}",
            env.settings.amqp.dead_letter_queue
        )),
        "{stderr}"
    );
    assert_eq!(env.ready_count(&env.settings.amqp.queue).await, 1);
    assert_eq!(
        env.ready_count(&env.settings.amqp.dead_letter_queue).await,
        0
    );
    env.cleanup().await;
}

#[tokio::test]
async fn looking_at_part_of_the_queue_leaves_it_in_order() {
    let env = TestEnv::start(BASIC_RULES).await;
    let ids = ["a", "b", "c", "d", "e"];
    let bodies: Vec<String> = ids
        .iter()
        .map(|id| json!({"id": id, "type": "issue.created", "severity": "low"}).to_string())
        .collect();
    let poison: Vec<&[u8]> = bodies.iter().map(|b| b.as_bytes()).collect();
    dead_letter_through_worker(&env, &poison).await;
    let in_order: Vec<Value> = ids.iter().map(|id| json!(id)).collect();
    assert_eq!(dead_letter_ids(&env).await, in_order);

    // The first two listed, one shown from the middle: none of it moves.
    let first_two = env.dlq_json(&["list", "--limit", "2"]).await;
    assert_eq!(first_two.as_array().unwrap().len(), 2);
    let shown = env.dlq_json(&["show", "b"]).await;
    assert_eq!(shown["message"]["id"], "b");
    assert_eq!(
        dead_letter_ids(&env).await,
        in_order,
        "the queue's order after browsing"
    );

    // So `#1` is still the message listed first.
    let replayed = env.dlq_json(&["replay", "#1"]).await;
    assert_eq!(replayed[0]["id"], "a");
    env.cleanup().await;
}
