//! Workspace tokens: rotation through oauth.v2.access (one replica at a time), and secrets kept out of sight.

mod support;

use alert_router::config::{Secret, Secrets};
use serde_json::json;
use support::{BASIC_RULES, TestEnv, WAIT};

const CLIENT_ID: &str = "1234.5678";
const CLIENT_SECRET: &str = "test-client-secret";

fn rotation_secrets() -> Secrets {
    Secrets {
        slack_client_id: Some(CLIENT_ID.into()),
        slack_client_secret: Some(Secret::new(CLIENT_SECRET)),
        ..Secrets::default()
    }
}

/// A rotating token record whose access token Slack now reports expired.
async fn expired_rotating_token(env: &TestEnv) -> String {
    let refresh = format!("xoxe-1-test-{}", env.id);
    env.slack.set_oauth_client(CLIENT_ID, CLIENT_SECRET);
    env.slack
        .add_refresh_token(&refresh, &env.workspace, "U0BOT");
    env.store_token_record(
        &env.workspace,
        &json!({"access_token": env.token, "refresh_token": refresh,
                "expires_at": chrono::Utc::now().timestamp() + 30_000,
                "team_id": env.workspace, "bot_user_id": "U0BOT"}),
    )
    .await;
    env.slack.expire(&env.token);
    refresh
}

#[tokio::test]
async fn an_expired_token_is_refreshed_once_and_the_new_pair_is_stored() {
    let env = TestEnv::start(BASIC_RULES).await;
    let old_refresh = expired_rotating_token(&env).await;
    let worker = env.spawn_worker_with(rotation_secrets());

    env.publish(&env.event("rotated", json!({}))).await;
    let posts = env.slack.wait_for_posts(1, WAIT).await.unwrap();
    worker.stop().await;

    assert_eq!(env.slack.refresh_count(), 1);
    let issued = env.slack.issued_tokens();
    assert_eq!(
        posts[0].token, issued[0].access_token,
        "posted with the new token"
    );
    let record = env.token_record(&env.workspace).await;
    assert_eq!(record["access_token"], issued[0].access_token);
    assert_eq!(record["refresh_token"], issued[0].refresh_token);
    assert_ne!(record["refresh_token"], old_refresh.as_str());
    assert!(record["expires_at"].as_i64().unwrap() > chrono::Utc::now().timestamp() + 40_000);
    env.cleanup().await;
}

#[tokio::test]
async fn three_workers_hitting_an_expired_token_refresh_it_once() {
    let env = TestEnv::start(BASIC_RULES).await;
    expired_rotating_token(&env).await;
    let workers = [
        env.spawn_worker_with(rotation_secrets()),
        env.spawn_worker_with(rotation_secrets()),
        env.spawn_worker_with(rotation_secrets()),
    ];
    for i in 0..9 {
        env.publish(&env.event(&format!("many-{i}"), json!({})))
            .await;
    }
    env.slack.wait_for_posts(9, WAIT).await.unwrap();
    for worker in workers {
        worker.stop().await;
    }
    // A second refresh with the already-used refresh token would fail: Slack revokes it.
    assert_eq!(env.slack.refresh_count(), 1);
    assert!(env.smtp.mails().is_empty());
    env.cleanup().await;
}

#[tokio::test]
async fn a_token_close_to_expiry_is_refreshed_before_it_is_used() {
    let env = TestEnv::start(BASIC_RULES).await;
    let refresh = format!("xoxe-1-test-{}", env.id);
    env.slack.set_oauth_client(CLIENT_ID, CLIENT_SECRET);
    env.slack
        .add_refresh_token(&refresh, &env.workspace, "U0BOT");
    env.store_token_record(
        &env.workspace,
        &json!({"access_token": env.token, "refresh_token": refresh,
                "expires_at": chrono::Utc::now().timestamp() + 600,
                "team_id": env.workspace, "bot_user_id": "U0BOT"}),
    )
    .await;
    let worker = env.spawn_worker_with(rotation_secrets());

    env.publish(&env.event("ahead", json!({}))).await;
    let posts = env.slack.wait_for_posts(1, WAIT).await.unwrap();
    worker.stop().await;
    assert_eq!(env.slack.refresh_count(), 1);
    assert_ne!(posts[0].token, env.token, "the old token was not used");
    env.cleanup().await;
}

#[tokio::test]
async fn a_refresh_token_slack_rejects_makes_the_workspace_fall_back_to_email() {
    let mut env = TestEnv::start(
        "version: 1\ndefaults:\n  slack_channel: C0ESCALATE\n  email: [oncall@example.com]\nrules: []\n",
    )
    .await;
    env.settings.slack.token_cache_ttl = std::time::Duration::from_millis(1);
    env.slack.set_oauth_client(CLIENT_ID, CLIENT_SECRET);
    env.store_token_record(
        &env.workspace,
        &json!({"access_token": env.token, "refresh_token": "xoxe-1-test-unknown",
                "expires_at": chrono::Utc::now().timestamp() + 30_000,
                "team_id": env.workspace, "bot_user_id": null}),
    )
    .await;
    env.slack.expire(&env.token);
    let worker = env.spawn_worker_with(rotation_secrets());

    env.publish(&env.event("bad-refresh", json!({}))).await;
    let mails = env.smtp.wait_for_mails(1, WAIT).await.unwrap();
    worker.stop().await;
    let body = mails[0].text_body().unwrap();
    assert!(body.contains("invalid_refresh_token"), "{body}");
    assert!(!body.contains("xoxe-1-test-unknown") && !body.contains(CLIENT_SECRET));
    env.cleanup().await;
}
