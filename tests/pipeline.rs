//! End to end through the real RabbitMQ and Redis: publish → worker → fake Slack → ack or dead-letter.

mod support;

use std::time::Duration;

use alert_router::broker::{
    HEADER_ATTEMPTS, HEADER_DETAIL, HEADER_FAILED_AT, HEADER_REASON, HEADER_ROUTING_KEY,
};
use serde_json::json;
use support::fake_slack::Fault;
use support::{BASIC_RULES, ESCALATIONS, PAYMENTS, TestEnv, WAIT};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn a_published_event_becomes_one_slack_post_and_is_acked() {
    let env = TestEnv::start(BASIC_RULES).await;
    let worker = env.spawn_worker();

    let event = env.event(
        "evt-1",
        json!({"ticket": {"number": "TCK-1", "form": "Incident report"}}),
    );
    env.publish(&event).await;

    let posts = env.slack.wait_for_posts(1, WAIT).await.unwrap();
    let post = &posts[0];
    assert_eq!(post.channel_id, ESCALATIONS);
    assert_eq!(post.token, env.token);
    assert_eq!(
        post.text.as_deref(),
        Some("[HIGH] Test event evt-1 (TCK-1)")
    );
    assert!(
        post.blocks
            .as_ref()
            .unwrap()
            .to_string()
            .contains("Incident report")
    );
    let metadata = post.metadata.as_ref().unwrap();
    assert_eq!(metadata["event_type"], "alert_router_notification");
    assert_eq!(metadata["event_payload"]["event_id"], "evt-1");

    worker.stop().await;
    // Stopping closes the channel: an unacked message would be back in the queue now.
    assert_eq!(env.ready_count(&env.settings.amqp.queue).await, 0);
    assert_eq!(
        env.ready_count(&env.settings.amqp.dead_letter_queue).await,
        0
    );
    assert_eq!(env.slack.posts().len(), 1);
    env.cleanup().await;
}

#[tokio::test]
async fn an_event_stuck_on_a_slow_channel_does_not_hold_up_the_acks_of_later_ones() {
    let mut env = TestEnv::start(BASIC_RULES).await;
    // Three deliveries in flight at most: acks of finished events must go out
    // while the first is still being sent, or the window fills and all wait.
    env.settings.amqp.prefetch = 3;
    // Slack holds the first post until the test has seen the later ones.
    env.settings.slack.request_timeout = Duration::from_secs(60);
    let release_slow_post = CancellationToken::new();
    env.slack
        .fail_channel(PAYMENTS, Fault::HoldUntil(release_slow_post.clone()));
    let worker = env.spawn_worker();

    env.publish(&env.event("slow", json!({"labels": {"team": "payments"}})))
        .await;
    env.slack
        .wait_for_requests("chat.postMessage", 1, WAIT)
        .await
        .unwrap();
    for i in 0..12 {
        env.publish(&env.event(&format!("fast-{i}"), json!({})))
            .await;
    }
    env.slack
        .wait_for_posts_to(ESCALATIONS, 12, WAIT)
        .await
        .expect("the 12 later events went through while the first was still being sent");
    assert!(env.slack.posts_to(PAYMENTS).is_empty(), "still held");
    release_slow_post.cancel();
    env.slack
        .wait_for_posts_to(PAYMENTS, 1, WAIT)
        .await
        .unwrap();
    worker.stop().await;

    assert_eq!(env.ready_count(&env.settings.amqp.queue).await, 0);
    assert_eq!(env.slack.posts().len(), 13, "each once");
    env.cleanup().await;
}

#[tokio::test]
async fn bad_json_is_dead_lettered_at_once_with_its_body_and_reason() {
    let env = TestEnv::start(BASIC_RULES).await;
    let mut dead = env.dead_letters().await;
    let worker = env.spawn_worker();

    let body = b"{\"id\": \"broken\", \"type\": ";
    env.publish_raw("escalation.triggered", body).await;

    let letter = dead.next().await;
    assert_eq!(letter.body, body, "the original body, byte for byte");
    assert_eq!(
        letter.header(HEADER_REASON).as_deref(),
        Some("invalid_json")
    );
    assert!(
        letter
            .header(HEADER_DETAIL)
            .unwrap()
            .starts_with("event body is not valid JSON")
    );
    assert_eq!(letter.attempts(), Some(1));
    assert_eq!(
        letter.header(HEADER_ROUTING_KEY).as_deref(),
        Some("escalation.triggered")
    );
    let failed_at = letter.header(HEADER_FAILED_AT).unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(&failed_at).is_ok(),
        "{failed_at}"
    );

    worker.stop().await;
    assert!(env.slack.posts().is_empty());
    assert_eq!(
        env.ready_count(&env.settings.amqp.queue).await,
        0,
        "not requeued"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn an_event_missing_a_required_field_is_dead_lettered_naming_the_field() {
    let env = TestEnv::start(BASIC_RULES).await;
    let mut dead = env.dead_letters().await;
    let worker = env.spawn_worker();

    let body = json!({"id": "no-severity", "type": "issue.created", "title": "x"}).to_string();
    env.publish_raw("issue.created", body.as_bytes()).await;

    let letter = dead.next().await;
    assert_eq!(letter.body, body.as_bytes());
    assert_eq!(
        letter.header(HEADER_REASON).as_deref(),
        Some("invalid_event")
    );
    assert_eq!(
        letter.header(HEADER_DETAIL).as_deref(),
        Some("event field `severity` missing field `severity`")
    );

    // A good event behind the poison still goes through.
    env.publish(&env.event("after-poison", json!({}))).await;
    env.slack.wait_for_posts(1, WAIT).await.unwrap();
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn slack_down_sends_the_event_through_every_retry_queue_then_to_the_dead_letter_queue() {
    let env = TestEnv::start(BASIC_RULES).await;
    let mut dead = env.dead_letters().await;
    env.slack.set_outage(true);
    let worker = env.spawn_worker();

    let event = env.event("during-outage", json!({}));
    env.publish(&event).await;

    let letter = dead.next().await;
    assert_eq!(letter.body, event.to_string().as_bytes());
    assert_eq!(
        letter.header(HEADER_REASON).as_deref(),
        Some("undeliverable")
    );
    assert_eq!(
        letter.attempts(),
        Some(4),
        "the first try and three retries"
    );
    let detail = letter.header(HEADER_DETAIL).unwrap();
    assert!(detail.contains("slack_channel:C0ESCALATE"), "{detail}");
    assert!(detail.contains("http_503"), "{detail}");
    assert_eq!(
        letter.header(HEADER_ROUTING_KEY).as_deref(),
        Some("escalation.triggered")
    );
    assert!(env.slack.posts().is_empty());
    let _ = HEADER_ATTEMPTS;
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_transient_slack_error_is_retried_and_delivered_once() {
    let env = TestEnv::start(BASIC_RULES).await;
    env.slack.fail_next("chat.postMessage", 1, Fault::Http(503));
    env.slack
        .fail_next("chat.postMessage", 1, Fault::api("internal_error"));
    let worker = env.spawn_worker();

    env.publish(&env.event("flaky", json!({}))).await;
    env.slack.wait_for_posts(1, WAIT).await.unwrap();

    worker.stop().await;
    assert_eq!(env.slack.posts().len(), 1);
    assert_eq!(env.slack.requests_for("chat.postMessage").len(), 3);
    env.cleanup().await;
}

#[tokio::test]
async fn a_slack_call_that_hangs_is_cut_off_by_the_request_timeout_and_the_retry_delivers_once() {
    let mut env = TestEnv::start(BASIC_RULES).await;
    env.settings.slack.request_timeout = Duration::from_secs(1);
    // Slack takes the connection and never answers (nor processes the post).
    env.slack.fail_next("chat.postMessage", 1, Fault::Hang);
    let worker = env.spawn_worker();

    env.publish(&env.event("hung", json!({}))).await;
    env.slack.wait_for_posts(1, WAIT).await.unwrap();
    worker.stop().await;

    assert_eq!(env.slack.posts().len(), 1);
    assert_eq!(env.slack.requests_for("chat.postMessage").len(), 2);
    assert!(
        env.smtp.mails().is_empty(),
        "one hung call is not an outage"
    );
    assert_eq!(env.ready_count(&env.settings.amqp.queue).await, 0);
    env.cleanup().await;
}

#[tokio::test]
async fn a_redelivered_event_is_not_posted_twice() {
    let env = TestEnv::start(BASIC_RULES).await;
    let worker = env.spawn_worker();
    let event = env.event("twice", json!({}));
    env.publish(&event).await;
    env.slack.wait_for_posts(1, WAIT).await.unwrap();

    // The producer (or the broker after a crash) delivers the same event again.
    env.publish(&event).await;
    env.publish(&env.event("marker", json!({}))).await;
    env.slack.wait_for_posts(2, WAIT).await.unwrap();
    worker.stop().await;

    let ids: Vec<String> = env
        .slack
        .posts()
        .iter()
        .map(|p| {
            p.metadata.as_ref().unwrap()["event_payload"]["event_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(ids, ["twice", "marker"]);
    env.cleanup().await;
}

#[tokio::test]
async fn a_worker_killed_mid_delivery_loses_nothing() {
    let mut env = TestEnv::start(BASIC_RULES).await;
    // The dead worker's idempotency claim must lapse quickly for the survivor.
    env.settings.slack.request_timeout = Duration::from_millis(500);
    // Enough broker retries to outwait that claim (about 4 s here).
    env.settings.delivery.retry_delays = vec![Duration::from_secs(1); 20];
    env.slack.fail_next("chat.postMessage", 100, Fault::Hang);

    let mut first = env.spawn_worker_process();
    env.publish(&env.event("killed", json!({}))).await;
    env.slack
        .wait_for_requests("chat.postMessage", 1, WAIT)
        .await
        .unwrap();
    first.kill().await.unwrap(); // SIGKILL: no drain, no ack
    env.slack.clear_faults();

    let mut second = env.spawn_worker_process();
    let posts = env
        .slack
        .wait_for_posts(1, Duration::from_secs(40))
        .await
        .unwrap();
    assert_eq!(
        posts[0].metadata.as_ref().unwrap()["event_payload"]["event_id"],
        "killed"
    );

    send_sigterm(&second);
    let status = second.wait().await.unwrap();
    assert!(status.success(), "graceful stop exits 0, got {status}");
    assert_eq!(env.slack.posts().len(), 1);
    assert_eq!(env.ready_count(&env.settings.amqp.queue).await, 0);
    env.cleanup().await;
}

fn send_sigterm(child: &tokio::process::Child) {
    let pid = child.id().expect("child is running");
    let status = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn rules_route_by_label_and_unmatched_events_go_to_the_default_channel() {
    let env = TestEnv::start(BASIC_RULES).await;
    let worker = env.spawn_worker();

    env.publish(&env.event("pay-1", json!({"labels": {"team": "payments"}})))
        .await;
    env.slack
        .wait_for_posts_to(support::PAYMENTS, 1, WAIT)
        .await
        .unwrap();
    env.publish(&env.event("other-1", json!({"labels": {"team": "search"}})))
        .await;
    env.slack
        .wait_for_posts_to(ESCALATIONS, 1, WAIT)
        .await
        .unwrap();

    worker.stop().await;
    let posts = env.slack.posts();
    assert_eq!(posts.len(), 2);
    assert_eq!(
        posts[0].metadata.as_ref().unwrap()["event_payload"]["rule"],
        "payments"
    );
    assert_eq!(
        posts[1].metadata.as_ref().unwrap()["event_payload"]["rule"],
        "",
        "Slack metadata has no null: an empty rule means the unmatched default"
    );
    env.cleanup().await;
}
