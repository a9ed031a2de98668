//! Workspace tokens: rotation through oauth.v2.access (one replica at a time), and secrets kept out of sight.

mod support;

use alert_router::config::{Secret, Secrets};
use serde_json::json;
use support::fake_slack::Fault;
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

/// Stores a rotating token that expires in `expires_in` seconds, with a
/// refresh token Slack knows; returns the refresh token.
async fn rotating_token(env: &TestEnv, expires_in: i64) -> String {
    let refresh = format!("xoxe-test-{}", env.id);
    env.slack.set_oauth_client(CLIENT_ID, CLIENT_SECRET);
    env.slack
        .add_refresh_token(&refresh, &env.workspace, "U0BOT");
    env.store_token_record(
        &env.workspace,
        &json!({"access_token": env.token, "refresh_token": refresh,
                "expires_at": chrono::Utc::now().timestamp() + expires_in,
                "team_id": env.workspace, "bot_user_id": "U0BOT"}),
    )
    .await;
    refresh
}

/// A rotating token record whose access token Slack now reports expired.
async fn expired_rotating_token(env: &TestEnv) -> String {
    let refresh = rotating_token(env, 30_000).await;
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

/// Events published at once, so that both workers hold many when the token
/// has to be replaced.
const IN_FLIGHT: usize = 40;

/// Publishes `ids` as events of this test.
async fn publish_events(env: &TestEnv, ids: impl IntoIterator<Item = String>) {
    for id in ids {
        env.publish(&env.event(&id, json!({}))).await;
    }
}

/// Asserts that every one of `expected` events was posted exactly once.
fn assert_each_posted_once(env: &TestEnv, expected: usize) {
    let mut ids: Vec<String> = env
        .slack
        .posts()
        .iter()
        .map(|p| p.metadata.as_ref().unwrap()["event_payload"]["event_id"].to_string())
        .collect();
    assert_eq!(ids.len(), expected, "posts: {ids:?}");
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), expected, "an event was posted twice");
}

/// Asserts that every `oauth.v2.access` call succeeded and exchanged the
/// refresh token issued by the one before it (the first: `initial`): no
/// refresh token was presented twice, and no call was wasted.
fn assert_one_unbroken_chain_of_refreshes(env: &TestEnv, initial: &str) {
    let calls = env.slack.requests_for("oauth.v2.access");
    let issued = env.slack.issued_tokens();
    assert_eq!(calls.len(), issued.len(), "{}", env.slack.describe());
    for (i, call) in calls.iter().enumerate() {
        assert_eq!(call.error, None, "refresh {i} failed");
        let expected = if i == 0 {
            initial
        } else {
            issued[i - 1].refresh_token.as_str()
        };
        assert_eq!(call.params["refresh_token"], expected, "refresh {i}");
    }
}

#[tokio::test]
async fn two_workers_with_many_events_in_flight_refresh_a_token_slack_reports_expired_once() {
    let mut env = TestEnv::start(BASIC_RULES).await;
    // Small enough that both workers get a share of the events.
    env.settings.amqp.prefetch = 10;
    // New tokens live one hour, less than the two hours Slack's SDKs refresh
    // ahead by: emulators issue such tokens, and so may Slack.
    env.slack.set_access_token_lifetime(3600);
    let initial = expired_rotating_token(&env).await;
    publish_events(&env, (0..IN_FLIGHT).map(|i| format!("expired-{i}"))).await;

    let workers = [
        env.spawn_worker_with(rotation_secrets()),
        env.spawn_worker_with(rotation_secrets()),
    ];
    env.slack.wait_for_posts(IN_FLIGHT, WAIT).await.unwrap();
    for worker in workers {
        worker.stop().await;
    }

    assert_eq!(
        env.slack.requests_for("oauth.v2.access").len(),
        1,
        "one refresh for one expiry\n{}",
        env.slack.describe()
    );
    assert_one_unbroken_chain_of_refreshes(&env, &initial);
    assert_each_posted_once(&env, IN_FLIGHT);
    let issued = env.slack.issued_tokens();
    assert!(
        env.slack
            .posts()
            .iter()
            .all(|p| p.token == issued[0].access_token),
        "every event went out with the one new token"
    );
    assert!(env.smtp.mails().is_empty());
    env.cleanup().await;
}

#[tokio::test]
async fn two_workers_replace_a_short_lived_token_once_each_time_it_nears_expiry() {
    const LIFETIME_SECS: u64 = 6;
    let mut env = TestEnv::start(BASIC_RULES).await;
    env.settings.amqp.prefetch = 10;
    env.slack.set_access_token_lifetime(LIFETIME_SECS);
    // Three seconds left: refreshed before its first use. The tokens Slack
    // mints then live six seconds each and expire while events keep coming.
    let initial = rotating_token(&env, 3).await;
    publish_events(&env, (0..IN_FLIGHT).map(|i| format!("short-{i}"))).await;
    let workers = [
        env.spawn_worker_with(rotation_secrets()),
        env.spawn_worker_with(rotation_secrets()),
    ];

    // Events keep arriving (a few every 100 ms: the load, not a wait) until
    // the first minted token has come near its expiry and been replaced.
    let mut published = IN_FLIGHT;
    let mut arrivals = tokio::time::interval(std::time::Duration::from_millis(100));
    tokio::time::timeout(WAIT, async {
        while env.slack.requests_for("oauth.v2.access").len() < 2 {
            arrivals.tick().await;
            publish_events(
                &env,
                (published..published + 3).map(|i| format!("short-{i}")),
            )
            .await;
            published += 3;
        }
    })
    .await
    .expect("the minted token was replaced before it expired");
    env.slack.wait_for_posts(published, WAIT).await.unwrap();
    for worker in workers {
        worker.stop().await;
    }

    assert_one_unbroken_chain_of_refreshes(&env, &initial);
    // A storm replaces a token the moment it was minted; one refresh per
    // expiry lets each live most of its life (a lower bound: load only
    // makes the gaps longer).
    let calls = env.slack.requests_for("oauth.v2.access");
    for pair in calls.windows(2) {
        let lived = pair[1].received_at - pair[0].received_at;
        assert!(
            lived >= std::time::Duration::from_secs(LIFETIME_SECS / 2),
            "a token was replaced {lived:?} after it was minted\n{}",
            env.slack.describe()
        );
    }
    assert_each_posted_once(&env, published);
    assert!(env.smtp.mails().is_empty());
    env.cleanup().await;
}

#[tokio::test]
async fn a_token_close_to_expiry_is_refreshed_before_it_is_used() {
    let env = TestEnv::start(BASIC_RULES).await;
    // Ten minutes left: inside the two hours before expiry when it is refreshed.
    rotating_token(&env, 600).await;
    let worker = env.spawn_worker_with(rotation_secrets());

    env.publish(&env.event("ahead", json!({}))).await;
    let posts = env.slack.wait_for_posts(1, WAIT).await.unwrap();
    worker.stop().await;
    assert_eq!(env.slack.refresh_count(), 1);
    assert_ne!(posts[0].token, env.token, "the old token was not used");
    env.cleanup().await;
}

/// A workspace whose token Slack reports expired and whose refresh token
/// Slack does not know (`invalid_refresh_token`), with an address to fall
/// back to.
async fn with_an_expired_token_and_a_refresh_token_slack_rejects() -> TestEnv {
    let mut env = TestEnv::start(CHANNEL_WITH_EMAIL_FALLBACK).await;
    env.settings.slack.token_cache_ttl = std::time::Duration::from_millis(1);
    env.slack.set_oauth_client(CLIENT_ID, CLIENT_SECRET);
    env.store_token_record(
        &env.workspace,
        &json!({"access_token": env.token, "refresh_token": "xoxe-test-unknown",
                "expires_at": chrono::Utc::now().timestamp() + 30_000,
                "team_id": env.workspace, "bot_user_id": null}),
    )
    .await;
    env.slack.expire(&env.token);
    env
}

#[tokio::test]
async fn a_refresh_token_slack_rejects_makes_the_workspace_fall_back_to_email() {
    let env = with_an_expired_token_and_a_refresh_token_slack_rejects().await;
    let worker = env.spawn_worker_with(rotation_secrets());

    env.publish(&env.event("bad-refresh", json!({}))).await;
    let mails = env.smtp.wait_for_mails(1, WAIT).await.unwrap();
    worker.stop().await;
    let body = mails[0].text_body().unwrap();
    assert!(body.contains("invalid_refresh_token"), "{body}");
    assert!(!body.contains("xoxe-test-unknown") && !body.contains(CLIENT_SECRET));
    env.cleanup().await;
}

#[tokio::test]
async fn a_channel_name_whose_listing_needs_a_refresh_slack_rejects_falls_back_to_email() {
    let env = with_an_expired_token_and_a_refresh_token_slack_rejects().await;
    let worker = env.spawn_worker_with(rotation_secrets());

    // The name is listed before anything is posted: the listing meets the
    // expired token first.
    env.publish(&env.event(
        "bad-refresh-by-name",
        json!({"targets": [{"slack_channel": "#payments"}]}),
    ))
    .await;
    let mails = env.smtp.wait_for_mails(1, WAIT).await.unwrap();
    worker.stop().await;
    let body = mails[0].text_body().unwrap();
    assert!(
        body.contains("cannot resolve #payments") && body.contains("invalid_refresh_token"),
        "{body}"
    );
    assert_eq!(
        env.slack.requests_for("conversations.list")[0]
            .error
            .as_deref(),
        Some("token_expired")
    );
    assert!(env.slack.posts().is_empty());
    env.assert_nothing_pending().await;
    env.cleanup().await;
}

/// The rules of the fallback tests: a channel, and an address to fall back to.
const CHANNEL_WITH_EMAIL_FALLBACK: &str = "version: 1\ndefaults:\n  slack_channel: C0ESCALATE\n  email: [oncall@example.com]\nrules: []\n";

/// Stores a rotating token that expired a minute ago, as after a night with
/// nothing to send: the first event must refresh it before anything is sent.
async fn lapsed_rotating_token(env: &TestEnv) {
    rotating_token(env, -60).await;
    env.slack.expire(&env.token);
}

fn rotation_vars() -> [(&'static str, &'static str); 2] {
    [
        ("SLACK_CLIENT_ID", CLIENT_ID),
        ("SLACK_CLIENT_SECRET", CLIENT_SECRET),
    ]
}

#[tokio::test]
async fn a_lapsed_token_whose_refresh_slack_rate_limits_waits_then_posts_without_spending_an_attempt()
 {
    let env = TestEnv::start(CHANNEL_WITH_EMAIL_FALLBACK).await;
    lapsed_rotating_token(&env).await;
    env.slack.fail_next(
        "oauth.v2.access",
        1,
        Fault::RateLimited {
            retry_after_secs: 1,
        },
    );
    let mut worker = env.start_worker_process_with(&rotation_vars());

    env.publish(&env.event("lapsed-429", json!({}))).await;
    let posts = env.slack.wait_for_posts(1, WAIT).await.unwrap();
    worker.wait_for_log("acked", 1).await;

    assert_eq!(
        env.slack.requests_for("oauth.v2.access").len(),
        2,
        "the exchange Slack rate-limited, then the one it took\n{}",
        env.slack.describe()
    );
    assert_eq!(posts[0].token, env.slack.issued_tokens()[0].access_token);
    assert_eq!(
        worker.log_count("token refresh rate limited; deferring"),
        1,
        "{:#?}",
        worker.log_lines()
    );
    assert_eq!(
        worker.log_count("retrying later"),
        0,
        "a rate limit is a wait, not a failed attempt: {:#?}",
        worker.log_lines()
    );
    assert!(env.smtp.mails().is_empty(), "a rate limit is no outage");
    worker.stop().await;
    env.assert_nothing_pending().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_lapsed_token_whose_refresh_slack_fails_falls_back_to_email_at_once() {
    let env = TestEnv::start(CHANNEL_WITH_EMAIL_FALLBACK).await;
    lapsed_rotating_token(&env).await;
    // Every exchange fails for the length of the test: Slack's OAuth is down.
    env.slack.fail_next(
        "oauth.v2.access",
        50,
        Fault::HttpJson(503, "service_unavailable".into()),
    );
    let mut worker = env.start_worker_process_with(&rotation_vars());

    env.publish(&env.event("lapsed-503", json!({}))).await;
    let mails = env.smtp.wait_for_mails(1, WAIT).await.unwrap();
    worker.wait_for_log("acked", 1).await;

    let body = mails[0].text_body().unwrap();
    assert!(
        body.contains("cannot refresh the token") && body.contains("oauth.v2.access: http_503"),
        "{body}"
    );
    assert!(env.slack.posts().is_empty());
    assert_eq!(
        worker.log_count("retrying later"),
        0,
        "delivered by email, nothing left to retry: {:#?}",
        worker.log_lines()
    );
    worker.stop().await;
    env.assert_nothing_pending().await;
    env.cleanup().await;
}

async fn run_cli(env: &TestEnv, args: &[&str], stdin: &str) -> std::process::Output {
    use tokio::io::AsyncWriteExt;
    let mut child = env
        .command()
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .await
        .unwrap();
    child.wait_with_output().await.unwrap()
}

#[tokio::test]
async fn the_tokens_command_sets_lists_checks_and_deletes_without_showing_secrets() {
    let env = TestEnv::start(BASIC_RULES).await;
    let workspace = format!("T2{}", env.id.to_uppercase());
    let token = format!("xoxb-test-cli-{}", env.id);
    env.slack.add_bot_token(&token, &workspace, "U0CLI");

    let set = run_cli(
        &env,
        &[
            "tokens",
            "set",
            "--workspace",
            &workspace,
            "--refresh-token-stdin",
            "--expires-in",
            "43200",
            "--bot-user-id",
            "U0CLI",
        ],
        &format!("{token}\nxoxe-test-refresh\n"),
    )
    .await;
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );

    let list = run_cli(&env, &["tokens", "list", "--json"], "").await;
    let listed: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let row = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["workspace"] == workspace.as_str())
        .unwrap()
        .clone();
    assert_eq!(row["bot_user_id"], "U0CLI");
    assert_eq!(row["rotating"], true);
    let everything = format!(
        "{}{}",
        String::from_utf8_lossy(&list.stdout),
        String::from_utf8_lossy(&set.stdout)
    );
    assert!(!everything.contains(&token) && !everything.contains("xoxe-test-refresh"));

    let check = run_cli(&env, &["tokens", "check", "--workspace", &workspace], "").await;
    assert!(check.status.success());
    assert!(String::from_utf8_lossy(&check.stdout).contains(&format!("{workspace}: valid")));

    // Slack failing the check says nothing about the token.
    env.slack.fail_next(
        "auth.test",
        100,
        Fault::HttpJson(503, "service_unavailable".into()),
    );
    let check = run_cli(&env, &["tokens", "check", "--workspace", &workspace], "").await;
    assert_eq!(check.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(
        stdout.contains(&format!(
            "{workspace}: unknown, Slack did not answer the check"
        )) && !stdout.contains("invalid"),
        "{stdout}"
    );
    env.slack.clear_faults();

    env.slack.revoke(&token);
    let check = run_cli(&env, &["tokens", "check", "--workspace", &workspace], "").await;
    assert_eq!(check.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(
        stdout.contains("invalid (auth.test: token_revoked)"),
        "{stdout}"
    );
    assert!(!stdout.contains(&token));

    let delete = run_cli(&env, &["tokens", "delete", "--workspace", &workspace], "").await;
    assert!(delete.status.success());
    let again = run_cli(&env, &["tokens", "delete", "--workspace", &workspace], "").await;
    assert_eq!(again.status.code(), Some(2));
    env.cleanup().await;
}

/// Payments falls back to email; everything else has no address and is dead-lettered.
const LEAK_RULES: &str = r#"version: 1
defaults:
  slack_channel: "C0ESCALATE"
unmatched: default
rules:
  - name: payments
    matchers:
      - team="payments"
    notify:
      - slack_channel: C0PAYMENTS
    email: ["payments-oncall@example.com"]
"#;

/// In the spirit of Alertmanager's AssertNotifyLeaksNoSecret: drive a worker
/// process logging at `debug` through a token refresh, an email fallback
/// over an SMTP URL with credentials, and a dead letter, then look for every
/// secret everywhere an operator can see.
#[tokio::test]
async fn tokens_never_leak_into_logs_dead_letters_or_emails() {
    let mut env = TestEnv::start(LEAK_RULES).await;
    env.settings.delivery.retry_delays = vec![std::time::Duration::from_millis(200)];
    let smtp_password = format!("smtp-secret-{}", env.id);
    env.settings.email.smtp_url = env
        .smtp
        .url_with_credentials("mailer", &smtp_password)
        .into();
    let old_refresh = expired_rotating_token(&env).await;
    let mut dead = env.dead_letters().await;
    let mut worker = {
        let mut command = env.command();
        command
            .env("RUST_LOG", "debug")
            .env("SLACK_CLIENT_ID", CLIENT_ID)
            .env("SLACK_CLIENT_SECRET", CLIENT_SECRET)
            .env("SLACK_BOT_TOKEN", "xoxb-test-env-secret")
            .arg("run")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        command.spawn().unwrap()
    };
    // Read the logs as they come: debug logging would fill the pipe and stall the worker.
    let logs = {
        let mut stderr = worker.stderr.take().unwrap();
        tokio::spawn(async move {
            let mut logs = String::new();
            let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut logs).await;
            logs
        })
    };

    // 1. The expired token is refreshed, and the post goes out with the new one.
    env.publish(&env.event("leak-refresh", json!({}))).await;
    env.slack.wait_for_posts(1, WAIT).await.unwrap();
    assert_eq!(env.slack.refresh_count(), 1, "the token was refreshed");
    let issued = env.slack.issued_tokens();

    // 2. The new token is revoked: payments falls back to email, with SMTP AUTH.
    env.slack.revoke(&issued[0].access_token);
    env.publish(&env.event("leak-email", json!({"labels": {"team": "payments"}})))
        .await;
    let mails = env.smtp.wait_for_mails(1, WAIT).await.unwrap();
    assert_eq!(mails[0].auth_user.as_deref(), Some("mailer"));

    // 3. Revoked and no address to email: after its retry, a dead letter.
    env.publish(&env.event("leak-dead", json!({}))).await;
    let letter = dead.next().await;
    assert!(String::from_utf8_lossy(&letter.body).contains("leak-dead"));

    let status = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(worker.id().unwrap().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let output = tokio::time::timeout(WAIT, async {
        worker.wait().await.unwrap();
        logs.await.unwrap()
    })
    .await
    .unwrap();

    assert!(
        output.contains("DEBUG"),
        "the worker logged at debug level:\n{output}"
    );
    let headers = format!("{:?}", letter.properties.headers());
    let mail = mails.iter().map(|m| m.data.as_str()).collect::<String>();
    for secret in [
        env.token.as_str(),
        old_refresh.as_str(),
        issued[0].access_token.as_str(),
        issued[0].refresh_token.as_str(),
        CLIENT_SECRET,
        "xoxb-test-env-secret",
        smtp_password.as_str(),
        // The broker's password, as it would appear in its URL.
        "guest:guest",
    ] {
        assert!(
            !output.contains(secret),
            "{secret} is in the logs:\n{output}"
        );
        assert!(
            !headers.contains(secret),
            "{secret} is in the dead-letter headers: {headers}"
        );
        assert!(!mail.contains(secret), "{secret} is in the email: {mail}");
    }
    assert!(
        output.contains("token refreshed"),
        "the logs do talk about the token:\n{output}"
    );
    env.cleanup().await;
}
