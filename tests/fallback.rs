//! When Slack cannot take a target: reroutes, plain-text retries, and email through a real SMTP server.

mod support;

use std::time::Duration;

use alert_router::broker::{HEADER_DETAIL, HEADER_REASON};
use serde_json::json;
use support::fake_slack::{ChannelSpec, Fault, TokenSpec};
use support::{ESCALATIONS, TestEnv, WAIT};

const RULES: &str = r#"version: 1
defaults:
  slack_channel: C0ESCALATE
  email: ["oncall@example.com"]
unmatched: default
rules:
  - name: payments
    matchers: ['team="payments"']
    notify:
      - slack_channel: C0PAYMENTS
    email: ["payments-oncall@example.com"]
"#;

#[tokio::test]
async fn a_revoked_token_sends_the_event_by_email_to_the_rule_fallback() {
    let env = TestEnv::start(RULES).await;
    env.slack.revoke(&env.token);
    let worker = env.spawn_worker();

    env.publish(&env.event(
        "revoked",
        json!({"labels": {"team": "payments"}, "ticket": {"number": "TCK-9"}}),
    ))
    .await;
    let mails = env.smtp.wait_for_mails(1, WAIT).await.unwrap();
    assert_eq!(mails[0].to, ["payments-oncall@example.com"]);
    assert_eq!(
        mails[0].subject.as_deref(),
        Some("[HIGH] Test event revoked (TCK-9)")
    );
    let body = mails[0].text_body().unwrap();
    assert!(body.contains("token_revoked"), "the email says why: {body}");
    assert!(!body.contains(&env.token), "no token in the email");

    worker.stop().await;
    assert!(env.slack.posts().is_empty());
    assert_eq!(
        env.ready_count(&env.settings.amqp.queue).await,
        0,
        "settled by email"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_workspace_without_any_token_falls_back_to_the_default_email() {
    let env = TestEnv::start(RULES).await;
    env.delete_token(&env.workspace).await;
    let worker = env.spawn_worker();

    env.publish(&env.event("no-token", json!({}))).await;
    let mails = env.smtp.wait_for_mails(1, WAIT).await.unwrap();
    assert_eq!(mails[0].to, ["oncall@example.com"]);
    assert!(
        mails[0]
            .text_body()
            .unwrap()
            .contains("no Slack token for workspace")
    );
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn slack_down_through_the_retry_budget_falls_back_to_email() {
    let env = TestEnv::start(RULES).await;
    env.slack.set_outage(true);
    let worker = env.spawn_worker();

    env.publish(&env.event("outage", json!({}))).await;
    let mails = env.smtp.wait_for_mails(1, WAIT).await.unwrap();
    assert_eq!(mails[0].to, ["oncall@example.com"]);
    worker.stop().await;
    assert_eq!(
        env.slack.requests_for("chat.postMessage").len(),
        3,
        "the short retry budget first"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn an_unknown_slack_email_is_emailed_directly() {
    let env = TestEnv::start(RULES).await;
    env.slack.add_user("U0KNOWN", "known@example.com");
    let worker = env.spawn_worker();

    let targets = json!({"targets": [{"slack_email": "known@example.com"}, {"slack_email": "stranger@example.com"}]});
    env.publish(&env.event("lookup", targets)).await;
    let mails = env.smtp.wait_for_mails(1, WAIT).await.unwrap();
    assert_eq!(mails[0].to, ["stranger@example.com"]);
    let dm = env
        .slack
        .wait_for_posts_to(&env.slack.dm_channel_id("U0KNOWN"), 1, WAIT)
        .await
        .unwrap();
    assert_eq!(dm[0].channel, "U0KNOWN", "a DM is a post to the user id");
    worker.stop().await;
    // The event has no rule-matched targets of its own besides these two.
    assert_eq!(env.slack.posts().len(), 1);
    assert_eq!(env.smtp.mails().len(), 1);
    env.cleanup().await;
}

#[tokio::test]
async fn an_archived_channel_reroutes_to_the_default_channel_naming_the_target() {
    let env = TestEnv::start(RULES).await;
    env.slack
        .add_channel("C0OLD", "old-team", ChannelSpec::archived());
    let worker = env.spawn_worker();

    env.publish(&env.event("archived", json!({"targets": [{"slack_channel": "C0OLD"}]})))
        .await;
    let posts = env
        .slack
        .wait_for_posts_to(ESCALATIONS, 1, WAIT)
        .await
        .unwrap();
    let blocks = posts[0].blocks.as_ref().unwrap().to_string();
    assert!(
        blocks.contains("slack_channel:C0OLD (is_archived)"),
        "{blocks}"
    );
    assert!(
        posts[0]
            .text
            .as_deref()
            .unwrap()
            .contains("meant for slack_channel:C0OLD")
    );
    worker.stop().await;
    assert_eq!(env.slack.posts().len(), 1);
    env.cleanup().await;
}

#[tokio::test]
async fn not_in_channel_joins_the_public_channel_and_posts_again() {
    let env = TestEnv::start(RULES).await;
    let token = format!("xoxb-test-scoped-{}", env.id);
    env.slack.add_token(
        &token,
        TokenSpec::bot(&env.workspace, "U0BOT").with_scopes(&[
            "chat:write",
            "channels:join",
            "users:read.email",
        ]),
    );
    env.store_token(&env.workspace, &token).await;
    env.slack
        .add_channel("C0PUBLIC", "public", ChannelSpec::not_member());
    let worker = env.spawn_worker();

    env.publish(&env.event("join", json!({"targets": [{"slack_channel": "C0PUBLIC"}]})))
        .await;
    env.slack
        .wait_for_posts_to("C0PUBLIC", 1, WAIT)
        .await
        .unwrap();
    worker.stop().await;
    assert!(env.slack.bot_is_member("C0PUBLIC"));
    assert_eq!(env.slack.requests_for("conversations.join").len(), 1);
    env.cleanup().await;
}

#[tokio::test]
async fn a_refused_layout_is_posted_again_as_plain_text() {
    let env = TestEnv::start(RULES).await;
    env.slack
        .fail_next("chat.postMessage", 1, Fault::api("invalid_blocks"));
    let worker = env.spawn_worker();

    env.publish(&env.event("layout", json!({}))).await;
    let posts = env.slack.wait_for_posts(1, WAIT).await.unwrap();
    assert!(posts[0].blocks.is_none());
    assert_eq!(posts[0].text.as_deref(), Some("[HIGH] Test event layout"));
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn two_targets_falling_back_to_one_address_send_one_email() {
    let env = TestEnv::start(RULES).await;
    env.slack.revoke(&env.token);
    let worker = env.spawn_worker();

    let targets = json!({"targets": [{"slack_channel": "C0A"}, {"slack_channel": "C0B"}, {"email": "oncall@example.com"}]});
    env.publish(&env.event("shared-fallback", targets)).await;
    let mails = env.smtp.wait_for_mails(1, WAIT).await.unwrap();
    worker.stop().await;
    assert_eq!(env.smtp.mails().len(), 1, "{mails:?}");
    let body = mails[0].text_body().unwrap();
    assert!(
        body.contains("slack_channel:C0A") && body.contains("slack_channel:C0B"),
        "{body}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn slack_and_smtp_both_down_retry_through_the_broker_then_dead_letter() {
    let mut env = TestEnv::start(RULES).await;
    env.settings.delivery.retry_delays = vec![Duration::from_millis(200); 2];
    env.slack.set_outage(true);
    env.smtp.set_reject_all(451);
    let mut dead = env.dead_letters().await;
    let worker = env.spawn_worker();

    env.publish(&env.event("all-down", json!({}))).await;
    let letter = dead.next().await;
    assert_eq!(
        letter.header(HEADER_REASON).as_deref(),
        Some("undeliverable")
    );
    let detail = letter.header(HEADER_DETAIL).unwrap();
    assert!(
        detail.contains("http_503") && detail.contains("451"),
        "{detail}"
    );
    assert_eq!(letter.attempts(), Some(3));
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn an_email_is_looked_up_once_and_then_served_from_the_shared_cache() {
    let env = TestEnv::start(RULES).await;
    env.slack.add_user("U0CACHED", "cached@example.com");
    let worker = env.spawn_worker();

    for i in 0..3 {
        env.publish(&env.event(
            &format!("cached-{i}"),
            json!({"targets": [{"slack_email": "Cached@Example.com"}]}),
        ))
        .await;
        env.slack.wait_for_posts(i + 1, WAIT).await.unwrap();
    }
    worker.stop().await;
    assert_eq!(env.slack.requests_for("users.lookupByEmail").len(), 1);
    env.cleanup().await;
}

#[tokio::test]
async fn an_email_no_slack_user_has_is_looked_up_once_and_every_event_for_it_is_emailed() {
    let env = TestEnv::start(RULES).await;
    let worker = env.spawn_worker();

    for i in 0..3 {
        env.publish(&env.event(
            &format!("stranger-{i}"),
            json!({"targets": [{"slack_email": "Stranger@Example.com"}]}),
        ))
        .await;
        env.smtp.wait_for_mails(i + 1, WAIT).await.unwrap();
    }
    worker.stop().await;
    assert_eq!(
        env.slack.requests_for("users.lookupByEmail").len(),
        1,
        "the miss is remembered for a few minutes: a flood of events for an unknown address does not spend the lookup budget"
    );
    assert!(env.slack.posts().is_empty());
    assert!(
        env.smtp
            .mails()
            .iter()
            .all(|m| m.to == ["Stranger@Example.com"] || m.to == ["stranger@example.com"])
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_direct_message_that_cannot_be_delivered_is_emailed_not_posted_in_a_channel() {
    let env = TestEnv::start(RULES).await;
    let worker = env.spawn_worker();

    // U0GONE is not a user of the workspace: Slack answers channel_not_found.
    let event = json!({"targets": [{"slack_user": "U0GONE"}],
                       "assignee": {"slack_user": "U0GONE", "email": "gone@example.com"}});
    env.publish(&env.event("private", event)).await;
    let mails = env.smtp.wait_for_mails(1, WAIT).await.unwrap();
    worker.stop().await;
    assert_eq!(
        mails[0].to,
        ["gone@example.com"],
        "the assignee's own address"
    );
    assert!(
        env.slack.posts().is_empty(),
        "nothing in the default channel"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn an_address_the_mail_server_refuses_for_good_is_dead_lettered_without_waiting() {
    let env = TestEnv::start(RULES).await;
    env.smtp.set_reject_all(550);
    let mut dead = env.dead_letters().await;
    let worker = env.spawn_worker();

    env.publish(&env.event(
        "refused",
        json!({"targets": [{"email": "nobody@example.com"}]}),
    ))
    .await;
    let letter = dead.next().await;
    worker.stop().await;
    assert_eq!(
        letter.header(HEADER_REASON).as_deref(),
        Some("undeliverable")
    );
    assert_eq!(
        letter.attempts(),
        Some(1),
        "a permanent refusal is not retried"
    );
    assert!(letter.header(HEADER_DETAIL).unwrap().contains("550"));
    env.cleanup().await;
}
