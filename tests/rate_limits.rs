//! Slack's per-channel limit, held across replicas through Redis; 429s pause the channel for everyone.

mod support;

use std::time::Duration;

use alert_router::config::SlackSettings;
use serde_json::json;
use support::fake_slack::Fault;
use support::{BASIC_RULES, ESCALATIONS, RULES_WITH_EMAIL, TestEnv, WAIT};

/// A test namespace with the worker's default (Slack-sized) rate limits.
async fn env_with_default_limits() -> TestEnv {
    env_with_default_limits_and(BASIC_RULES).await
}

async fn env_with_default_limits_and(rules: &str) -> TestEnv {
    let mut env = TestEnv::start(rules).await;
    let defaults = SlackSettings::default();
    env.settings.slack.channel_rate_per_second = defaults.channel_rate_per_second;
    env.settings.slack.channel_burst = defaults.channel_burst;
    env.settings.slack.workspace_rate_per_minute = defaults.workspace_rate_per_minute;
    env.settings.slack.workspace_burst = defaults.workspace_burst;
    env
}

#[tokio::test]
async fn three_workers_on_one_hot_channel_stay_under_its_limit() {
    let env = env_with_default_limits().await;
    // Slack's documented limit: about one post a second per channel, short bursts.
    env.slack.set_channel_rate_limit(1.0, 3);
    let workers = [env.spawn_worker(), env.spawn_worker(), env.spawn_worker()];

    for i in 0..8 {
        env.publish(&env.event(&format!("hot-{i}"), json!({})))
            .await;
    }
    let posts = env
        .slack
        .wait_for_posts_to(ESCALATIONS, 8, Duration::from_secs(30))
        .await
        .unwrap();
    for worker in workers {
        worker.stop().await;
    }

    assert_eq!(env.slack.rate_limited_count(), 0, "no 429 from Slack");
    assert!(
        env.slack
            .max_posts_in_window(ESCALATIONS, Duration::from_millis(999))
            <= 3
    );
    // Still close to the allowed rate: 3 at once, then about one a second
    // (5.3 s at the limiter's pace); the slack is for a loaded 2-core runner.
    let span = posts[7].received_at - posts[0].received_at;
    assert!(span < Duration::from_secs(10), "took {span:?}");
    assert_eq!(env.slack.posts().len(), 8, "each once");
    assert!(
        env.smtp.mails().is_empty(),
        "waiting for a slot is not a reason to email"
    );
    env.cleanup().await;
}

/// The on-call lead gets every database incident as a direct message.
const DM_RULES: &str = r#"version: 1
defaults:
  slack_channel: "C0ESCALATE"
unmatched: default
rules:
  - name: database
    matchers:
      - team="database"
    notify:
      - slack_user: U0LEAD
"#;

#[tokio::test]
async fn direct_messages_by_user_id_and_replies_by_dm_id_spend_one_channel_budget() {
    let env = env_with_default_limits_and(DM_RULES).await;
    env.slack.add_user("U0LEAD", "lead@example.com");
    env.slack.set_channel_rate_limit(1.0, 3);
    let worker = env.spawn_worker();
    let incident = |id: &str, key: &str| {
        env.event(
            id,
            json!({"dedup_key": key, "labels": {"team": "database"}}),
        )
    };

    // The incident's first message goes to the user id; Slack answers
    // with the DM's `D…` id, where its later events reply.
    env.publish(&incident("first", "replica-lag")).await;
    let first = env.slack.wait_for_posts(1, WAIT).await.unwrap().remove(0);
    let dm = first.channel_id.clone();
    assert_eq!(first.channel, "U0LEAD");
    assert!(dm.starts_with('D'), "Slack answered {dm}");

    // At once: three replies (to `D…`) and three new incidents (to `U0LEAD`),
    // all one conversation to Slack.
    for i in 0..3 {
        env.publish(&incident(&format!("reply-{i}"), "replica-lag"))
            .await;
        env.publish(&incident(&format!("new-{i}"), &format!("disk-full-{i}")))
            .await;
    }
    let posts = env
        .slack
        .wait_for_posts(7, Duration::from_secs(30))
        .await
        .unwrap();
    worker.stop().await;

    assert_eq!(env.slack.rate_limited_count(), 0, "no 429 from Slack");
    assert!(posts.iter().all(|p| p.channel_id == dm));
    let sent_to = |prefix: &str| {
        posts
            .iter()
            .filter(|p| p.text.as_deref().is_some_and(|t| t.contains(prefix)))
            .map(|p| (p.channel.as_str(), p.thread_ts.is_some()))
            .collect::<Vec<_>>()
    };
    assert_eq!(sent_to("Test event reply-"), vec![(dm.as_str(), true); 3]);
    assert_eq!(sent_to("Test event new-"), vec![("U0LEAD", false); 3]);
    assert!(
        env.slack
            .max_posts_in_window(&dm, Duration::from_millis(999))
            <= 3
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_429_pauses_the_channel_and_the_event_still_arrives_once_on_slack() {
    let env = env_with_default_limits().await;
    env.slack.fail_next(
        "chat.postMessage",
        1,
        Fault::RateLimited {
            retry_after_secs: 1,
        },
    );
    let worker = env.spawn_worker();

    env.publish(&env.event("limited", json!({}))).await;
    let posts = env
        .slack
        .wait_for_posts(1, Duration::from_secs(20))
        .await
        .unwrap();
    worker.stop().await;

    let requests = env.slack.requests_for("chat.postMessage");
    assert_eq!(requests.len(), 2);
    // As Slack measures it, plus the worker's margin of at least 50 ms.
    let gap = posts[0].received_at - requests[0].received_at;
    assert!(
        gap >= Duration::from_millis(1000 + 50),
        "Retry-After obeyed with a margin, waited {gap:?}"
    );
    assert!(env.smtp.mails().is_empty());
    env.cleanup().await;
}

#[tokio::test]
async fn a_long_retry_after_defers_the_event_through_the_broker_without_spending_attempts() {
    let mut env = env_with_default_limits().await;
    env.settings.slack.max_rate_limit_wait = Duration::from_secs(2);
    // Longer than the 2 s the worker may wait while holding a delivery.
    env.slack.fail_next(
        "chat.postMessage",
        1,
        Fault::RateLimited {
            retry_after_secs: 3,
        },
    );
    let worker = env.spawn_worker();

    env.publish(&env.event("deferred", json!({}))).await;
    let posts = env
        .slack
        .wait_for_posts(1, Duration::from_secs(30))
        .await
        .unwrap();
    worker.stop().await;

    // As Slack measures it (from the 429 to the next call), plus the worker's
    // margin of at least 50 ms: calling exactly on time can be early for Slack.
    let first = env.slack.requests_for("chat.postMessage")[0].received_at;
    let gap = posts[0].received_at - first;
    assert!(
        gap >= Duration::from_millis(3000 + 50),
        "Retry-After obeyed with a margin, waited {gap:?}"
    );
    assert_eq!(env.slack.posts().len(), 1);
    assert_eq!(
        env.ready_count(&env.settings.amqp.dead_letter_queue).await,
        0
    );
    env.cleanup().await;
}

#[tokio::test]
async fn rate_limited_in_an_ok_http_answer_pauses_the_channel_like_a_429() {
    let env = env_with_default_limits().await;
    // `chat.postMessage` documents `rate_limited` as an API error: HTTP 200,
    // no Retry-After.
    env.slack
        .fail_next("chat.postMessage", 1, Fault::Api("rate_limited".into()));
    let worker = env.spawn_worker();

    env.publish(&env.event("slowed", json!({}))).await;
    let posts = env.slack.wait_for_posts(1, WAIT).await.unwrap();
    worker.stop().await;

    let requests = env.slack.requests_for("chat.postMessage");
    assert_eq!(requests.len(), 2, "refused once, then posted");
    assert_eq!(requests[0].error.as_deref(), Some("rate_limited"));
    // Without a Retry-After, the second's pause Slack's 429s usually ask for.
    let gap = posts[0].received_at - requests[0].received_at;
    assert!(
        gap >= Duration::from_secs(1),
        "paused before calling again, waited {gap:?}"
    );
    assert_eq!(env.slack.posts().len(), 1);
    env.cleanup().await;
}

#[tokio::test]
async fn a_channel_rate_limited_past_the_deferral_limit_falls_back_to_email() {
    let mut env = TestEnv::start(RULES_WITH_EMAIL).await;
    env.settings.delivery.max_rate_limit_deferral = Duration::from_secs(1);
    // Slack keeps saying "later": every post gets a long Retry-After.
    env.slack.fail_next(
        "chat.postMessage",
        1000,
        Fault::RateLimited {
            retry_after_secs: 30,
        },
    );
    let worker = env.spawn_worker();

    env.publish(&env.event("starved", json!({}))).await;
    let mails = env.smtp.wait_for_mails(1, WAIT).await.unwrap();
    worker.stop().await;

    assert_eq!(mails[0].to, ["oncall@example.com"]);
    assert!(env.slack.posts().is_empty());
    assert_eq!(
        env.slack.requests_for("chat.postMessage").len(),
        1,
        "the pause is honoured by every later attempt: one call, one 429"
    );
    assert_eq!(env.ready_count(&env.settings.amqp.queue).await, 0);
    assert_eq!(
        env.ready_count(&env.settings.amqp.dead_letter_queue).await,
        0
    );
    env.cleanup().await;
}

#[tokio::test]
async fn lookups_by_email_stay_within_slacks_tier_3_budget_for_the_workspace() {
    let env = env_with_default_limits().await;
    // users.lookupByEmail is Tier 3: 50 a minute, with short bursts.
    env.slack
        .set_method_rate_limit("users.lookupByEmail", 50, 10);
    let people = 15;
    for i in 0..people {
        env.slack.add_user(
            &format!("U0PERSON{i:02}"),
            &format!("person{i}@example.com"),
        );
    }
    let worker = env.spawn_worker();

    for i in 0..people {
        env.publish(&env.event(
            &format!("dm-{i}"),
            json!({"targets": [{"slack_email": format!("person{i}@example.com")}]}),
        ))
        .await;
    }
    env.slack
        .wait_for_posts(people, Duration::from_secs(60))
        .await
        .unwrap();
    worker.stop().await;

    assert_eq!(env.slack.rate_limited_count(), 0, "no 429 from Slack");
    assert_eq!(
        env.slack.requests_for("users.lookupByEmail").len(),
        people,
        "one lookup per address"
    );
    assert!(
        env.smtp.mails().is_empty(),
        "waiting for the lookup budget is not a reason to email"
    );
    env.cleanup().await;
}
