//! Escalation chains: an incident nobody acknowledges reaches the next step once, across replicas and a killed worker; an acknowledged or resolved one does not.

mod support;

use std::time::Duration;

use serde_json::json;
use support::fake_slack::RecordedPost;
use support::{TestEnv, WAIT, event_id, redis_connection};

const HEAD: &str = "U0HEAD";
const LEAD: &str = "U0LEAD";

/// Payments incidents go to the lead; unacknowledged after 2 s, to the head.
const RULES: &str = r#"version: 1
defaults:
  slack_channel: "C0ESCALATE"
unmatched: default
rules:
  - name: payments
    matchers:
      - team="payments"
    notify:
      - slack_user: U0LEAD
    escalate:
      - after: 2s
        notify:
          - slack_user: U0HEAD
"#;

async fn env() -> TestEnv {
    let env = TestEnv::start(RULES).await;
    env.slack.add_user(LEAD, "lead@example.com");
    env.slack.add_user(HEAD, "head@example.com");
    env
}

fn posts_to(env: &TestEnv, user: &str) -> Vec<RecordedPost> {
    env.slack
        .posts()
        .into_iter()
        .filter(|p| p.channel == user)
        .collect()
}

/// Steps still scheduled (due or not).
async fn scheduled(env: &TestEnv) -> usize {
    let mut redis = redis_connection(&env.settings).await;
    redis::cmd("ZCARD")
        .arg(format!("{}:escalations", env.settings.redis.key_prefix))
        .query_async(&mut redis)
        .await
        .unwrap()
}

/// Waits until no step is scheduled any more (fired or dropped).
async fn wait_until_no_step_is_scheduled(env: &TestEnv) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while scheduled(env).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the escalation step is still scheduled after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn an_unacknowledged_incident_escalates_once_even_when_the_worker_that_started_it_was_killed()
{
    let env = env().await;
    let mut first = env.start_worker_process();
    env.publish(&env.checkout_incident("started", json!({})))
        .await;
    env.slack.wait_for_posts(1, WAIT).await.unwrap();
    assert_eq!(scheduled(&env).await, 1, "the step is scheduled in Redis");
    // Killed once its event is settled, before the step is due: the step
    // lives in Redis, not in the dead process.
    first.wait_for_log("acked", 1).await;
    first.child.kill().await.unwrap();

    // Two replicas take over; either may fire the step, only one does.
    let second = env.start_worker_process();
    let third = env.start_worker_process();
    env.slack.wait_for_posts(2, WAIT).await.unwrap();
    wait_until_no_step_is_scheduled(&env).await;
    assert!(second.stop().await.success());
    assert!(third.stop().await.success());

    let escalated = posts_to(&env, HEAD);
    assert_eq!(escalated.len(), 1, "escalated once: {escalated:#?}");
    let post = &escalated[0];
    assert!(event_id(post).starts_with("escalation-"));
    let text = post.blocks.as_ref().unwrap().to_string();
    assert!(
        text.contains("Escalated") && text.contains("2s"),
        "the message says it is an escalation and after how long: {text}"
    );
    assert_eq!(
        posts_to(&env, LEAD).len(),
        1,
        "the lead is not notified again"
    );
    env.assert_nothing_pending().await;
    env.cleanup().await;
}

#[tokio::test]
async fn an_acknowledged_incident_does_not_escalate() {
    let env = env().await;
    let mut worker = env.start_worker_process();
    env.publish(&env.checkout_incident("started", json!({})))
        .await;
    env.slack.wait_for_posts(1, WAIT).await.unwrap();
    env.publish(&env.checkout_incident(
        "acked",
        json!({"type": "escalation.acknowledged", "acknowledged_by": {"slack_user": LEAD}}),
    ))
    .await;
    worker.wait_for_log("escalation step not needed", 1).await;
    assert_eq!(scheduled(&env).await, 0);
    assert!(worker.stop().await.success());
    assert!(posts_to(&env, HEAD).is_empty(), "nobody else was notified");
    env.assert_nothing_pending().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_resolved_incident_does_not_escalate() {
    let env = env().await;
    let mut worker = env.start_worker_process();
    env.publish(&env.checkout_incident("started", json!({})))
        .await;
    env.slack.wait_for_posts(1, WAIT).await.unwrap();
    env.publish(&env.checkout_incident(
        "resolved",
        json!({"type": "escalation.resolved", "severity": "info"}),
    ))
    .await;
    worker.wait_for_log("escalation step not needed", 1).await;
    assert!(worker.stop().await.success());
    assert!(posts_to(&env, HEAD).is_empty());
    env.cleanup().await;
}

#[tokio::test]
async fn a_dead_lettered_escalation_step_replayed_goes_to_that_steps_targets_only() {
    let env = env().await;
    let worker = env.spawn_worker();
    env.publish(&env.checkout_incident("started", json!({})))
        .await;
    env.slack.wait_for_posts(1, WAIT).await.unwrap();
    // Slack is down when the step comes due, and there is no email to fall
    // back to: the step is dead-lettered.
    env.slack.set_outage(true);
    env.wait_until_ready(&env.settings.amqp.dead_letter_queue, 1, WAIT)
        .await;
    env.slack.set_outage(false);

    env.dlq_json(&["replay", "--all"]).await;
    env.slack.wait_for_posts(2, WAIT).await.unwrap();
    worker.stop().await;

    let escalated = posts_to(&env, HEAD);
    assert_eq!(
        escalated.len(),
        1,
        "the step reached its own target: {escalated:#?}"
    );
    assert!(event_id(&escalated[0]).starts_with("escalation-"));
    let text = escalated[0].blocks.as_ref().unwrap().to_string();
    assert!(
        text.contains("Escalated") && text.contains("2s"),
        "the replayed message still says it is an escalation, after how long: {text}"
    );
    // By the user's id or, as a reply in the incident's thread, by the DM's.
    let lead_dm = env.slack.dm_channel_id(LEAD);
    let to_lead: Vec<_> = env
        .slack
        .posts()
        .into_iter()
        .filter(|p| p.channel_id == lead_dm)
        .collect();
    assert_eq!(
        to_lead.len(),
        1,
        "the replayed step did not go through the rules to the lead again: {to_lead:#?}"
    );
    env.assert_nothing_pending().await;
    env.cleanup().await;
}
