//! `alert-router send-test` as a process against the fake Slack, the real Redis and the SMTP sink:
//! where each kind of `--to` lands, Slack's errors, no token, an outage, and bad input.
//!
//! The command delivers in its own process and exits when done, so what the
//! fakes recorded is complete once the process has exited: nothing to wait for.

mod support;

use serde_json::Value;
use support::fake_slack::{ChannelSpec, RecordedPost};
use support::{BASIC_RULES, ESCALATIONS, PAYMENTS, RULES_WITH_EMAIL, TestEnv};

/// What one `send-test` run printed and how it exited.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `alert-router send-test --workspace WORKSPACE ARGS…` with the test's settings.
async fn send_test(env: &TestEnv, workspace: &str, args: &[&str]) -> Run {
    let output = env
        .command()
        .args(["send-test", "--workspace", workspace])
        .args(args)
        .output()
        .await
        .unwrap();
    let run = Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    eprintln!("stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    assert!(
        !run.stdout.contains(&env.token) && !run.stderr.contains(&env.token),
        "the token was printed"
    );
    run
}

/// The one post the fake Slack got; fails if there were none or several.
fn only_post(env: &TestEnv) -> RecordedPost {
    let posts = env.slack.posts();
    assert_eq!(posts.len(), 1, "exactly one post: {posts:?}");
    posts.into_iter().next().unwrap()
}

fn event_id(post: &RecordedPost) -> String {
    support::event_id(post)
}

#[tokio::test]
async fn a_channel_id_gets_one_post_and_the_line_names_it() {
    let env = TestEnv::start(BASIC_RULES).await;
    let run = send_test(&env, &env.workspace, &["--to", PAYMENTS]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.stdout, format!("delivered to slack:{PAYMENTS}\n"));

    let post = only_post(&env);
    assert_eq!(post.channel, PAYMENTS);
    assert_eq!(post.token, env.token, "the workspace's token from Redis");
    assert!(event_id(&post).starts_with("send-test-"), "{post:?}");
    assert!(
        post.text
            .as_deref()
            .unwrap_or_default()
            .contains("alert-router test notification"),
        "{post:?}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_channel_name_is_resolved_to_its_id_and_the_line_names_both() {
    let env = TestEnv::start(BASIC_RULES).await;
    let run = send_test(
        &env,
        &env.workspace,
        &["--to", "#payments", "--message", "Hello from the install"],
    )
    .await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(
        run.stdout,
        format!("delivered to slack:{PAYMENTS} (#payments)\n")
    );
    let post = only_post(&env);
    assert_eq!(post.channel, PAYMENTS, "posted by id, not by name");
    assert!(
        post.text
            .as_deref()
            .unwrap_or_default()
            .contains("Hello from the install"),
        "{post:?}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_user_id_gets_a_direct_message() {
    let env = TestEnv::start(BASIC_RULES).await;
    env.slack.add_user("U0ANA", "ana@example.com");
    let run = send_test(&env, &env.workspace, &["--to", "U0ANA"]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let dm = env.slack.dm_channel_id("U0ANA");
    assert_eq!(
        run.stdout,
        format!("delivered to slack:{dm} (direct message to U0ANA)\n")
    );
    let post = only_post(&env);
    assert_eq!(post.channel, "U0ANA");
    assert_eq!(post.channel_id, dm);
    env.cleanup().await;
}

#[tokio::test]
async fn the_email_of_a_slack_user_is_looked_up_and_messaged_directly() {
    let env = TestEnv::start(BASIC_RULES).await;
    env.slack.add_user("U0ANA", "ana@example.com");
    let run = send_test(&env, &env.workspace, &["--to", "ana@example.com"]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let dm = env.slack.dm_channel_id("U0ANA");
    // Addresses are shown as the worker's logs show them (log.show_addresses: false).
    assert_eq!(
        run.stdout,
        format!("delivered to slack:{dm} (direct message to a***@example.com)\n")
    );
    assert!(!run.stdout.contains("ana@"), "{}", run.stdout);
    let post = only_post(&env);
    assert_eq!(
        post.channel, "U0ANA",
        "posted to the user the email belongs to"
    );
    assert_eq!(env.slack.requests_for("users.lookupByEmail").len(), 1);
    assert!(env.smtp.mails().is_empty());
    env.cleanup().await;
}

#[tokio::test]
async fn the_email_of_nobody_on_slack_is_emailed_instead() {
    let mut env = TestEnv::start(BASIC_RULES).await;
    env.settings.log.show_addresses = true;
    let run = send_test(&env, &env.workspace, &["--to", "nobody@example.com"]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(
        run.stdout,
        "emailed nobody@example.com (Slack could not take it: no Slack user has the email nobody@example.com)\n"
    );
    assert!(env.slack.posts().is_empty(), "nothing posted");
    let lookups = env.slack.requests_for("users.lookupByEmail");
    assert_eq!(lookups.len(), 1);
    assert_eq!(lookups[0].error.as_deref(), Some("users_not_found"));
    let mails = env.smtp.mails();
    assert_eq!(mails.len(), 1, "{mails:?}");
    assert_eq!(mails[0].to, ["nobody@example.com"]);
    env.cleanup().await;
}

#[tokio::test]
async fn an_archived_channel_lands_in_the_default_channel_and_says_why() {
    let env = TestEnv::start(BASIC_RULES).await;
    env.slack
        .add_channel("C0OLDSTUFF", "old-stuff", ChannelSpec::archived());
    let run = send_test(&env, &env.workspace, &["--to", "C0OLDSTUFF"]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(
        run.stdout,
        format!(
            "delivered to slack:{ESCALATIONS}, the default channel, instead of C0OLDSTUFF (chat.postMessage: is_archived)\n"
        )
    );
    let post = only_post(&env);
    assert_eq!(post.channel, ESCALATIONS);
    let refused = env.slack.requests_for("chat.postMessage");
    assert_eq!(refused.len(), 2, "the archived channel, then the default");
    assert_eq!(refused[0].error.as_deref(), Some("is_archived"));
    env.cleanup().await;
}

#[tokio::test]
async fn a_workspace_without_a_token_says_so_and_exits_1() {
    let env = TestEnv::start(BASIC_RULES).await;
    let run = send_test(&env, "T0NOTOKEN", &["--to", PAYMENTS]).await;
    assert_eq!(run.code, Some(1));
    assert!(
        run.stdout.starts_with(&format!(
            "not delivered to {PAYMENTS}: no Slack token for workspace T0NOTOKEN; store one with `alert-router tokens set`"
        )),
        "{}",
        run.stdout
    );
    assert!(run.stderr.contains("was not delivered"), "{}", run.stderr);
    assert!(env.slack.requests().is_empty(), "Slack was not called");
    assert!(env.smtp.mails().is_empty());
    env.cleanup().await;
}

#[tokio::test]
async fn a_workspace_without_a_token_is_emailed_when_the_rules_give_a_fallback() {
    let env = TestEnv::start(RULES_WITH_EMAIL).await;
    let run = send_test(&env, "T0NOTOKEN", &["--to", PAYMENTS]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stdout.starts_with(
            "emailed o***@example.com (Slack could not take it: no Slack token for workspace T0NOTOKEN;"
        ),
        "{}",
        run.stdout
    );
    assert!(env.slack.posts().is_empty());
    let mails = env.smtp.mails();
    assert_eq!(mails.len(), 1, "{mails:?}");
    assert_eq!(mails[0].to, ["oncall@example.com"]);
    env.cleanup().await;
}

#[tokio::test]
async fn a_slack_outage_falls_back_to_the_rules_default_email() {
    let env = TestEnv::start(RULES_WITH_EMAIL).await;
    env.slack.set_outage(true);
    let run = send_test(&env, &env.workspace, &["--to", PAYMENTS]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(
        run.stdout,
        "emailed o***@example.com (Slack could not take it: chat.postMessage: http_503)\n"
    );
    assert!(env.slack.posts().is_empty());
    assert!(
        env.slack.requests_for("chat.postMessage").len() > 1,
        "retried before giving up on Slack"
    );
    let mails = env.smtp.mails();
    assert_eq!(mails.len(), 1, "{mails:?}");
    assert_eq!(mails[0].to, ["oncall@example.com"]);
    env.cleanup().await;
}

#[tokio::test]
async fn a_slack_outage_without_a_fallback_email_exits_1_with_the_reason() {
    let env = TestEnv::start(BASIC_RULES).await;
    env.slack.set_outage(true);
    let run = send_test(&env, &env.workspace, &["--to", "#payments"]).await;
    assert_eq!(run.code, Some(1));
    // The name is resolved first, and that is where the outage shows.
    assert!(
        run.stdout.starts_with(
            "not delivered to #payments: Slack is unavailable: conversations.list: http_503;"
        ),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("no email address to fall back to"),
        "{}",
        run.stdout
    );
    assert!(env.slack.posts().is_empty());
    assert!(env.smtp.mails().is_empty());
    env.cleanup().await;
}

#[tokio::test]
async fn json_prints_the_report_for_scripts() {
    let env = TestEnv::start(BASIC_RULES).await;
    let run = send_test(&env, &env.workspace, &["--to", "#payments", "--json"]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let report: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(report["delivered"], true);
    assert_eq!(report["workspace"], env.workspace.as_str());
    assert_eq!(report["rules_loaded"], true);
    let id = report["event_id"].as_str().unwrap();
    assert!(id.starts_with("send-test-"), "{id}");
    let targets = report["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 1);
    assert_eq!(targets[0]["target"], "slack_channel:#payments");
    assert_eq!(targets[0]["status"], "delivered");
    assert_eq!(targets[0]["to"], format!("slack:{PAYMENTS}"));
    assert_eq!(event_id(&only_post(&env)), id);
    env.cleanup().await;
}

#[tokio::test]
async fn a_bad_to_or_workspace_exits_2_with_a_sentence_and_sends_nothing() {
    let env = TestEnv::start(BASIC_RULES).await;
    for (workspace, to, says) in [
        (
            env.workspace.as_str(),
            "payments",
            "for the channel named payments, write #payments",
        ),
        (env.workspace.as_str(), "ana@", "is not an email address"),
        (
            env.workspace.as_str(),
            "#not a name",
            "is not a Slack channel name",
        ),
        (
            env.workspace.as_str(),
            "D0DIRECT",
            "name the person by user id (U…) or email",
        ),
        ("payments", PAYMENTS, "is not a Slack workspace id"),
    ] {
        let run = send_test(&env, workspace, &["--to", to]).await;
        assert_eq!(run.code, Some(2), "--to {to}");
        assert!(run.stdout.is_empty(), "{}", run.stdout);
        assert!(
            run.stderr.contains("nothing sent") && run.stderr.contains(says),
            "--to {to}: {}",
            run.stderr
        );
    }
    assert!(env.slack.requests().is_empty(), "Slack was not called");
    env.cleanup().await;
}

#[tokio::test]
async fn the_trust_policy_refuses_what_it_would_refuse_in_a_published_event() {
    let mut env = TestEnv::start(BASIC_RULES).await;
    env.settings.email.allowed_domains = vec!["example.com".into()];
    env.settings.slack.allowed_workspaces = vec![env.workspace.clone()];
    let outside = send_test(&env, &env.workspace, &["--to", "ana@elsewhere.org"]).await;
    assert_eq!(outside.code, Some(2));
    assert!(
        outside.stderr.contains("is outside email.allowed_domains"),
        "{}",
        outside.stderr
    );
    let other = send_test(&env, "T0OTHER", &["--to", PAYMENTS]).await;
    assert_eq!(other.code, Some(2));
    assert!(
        other.stderr.contains("not in slack.allowed_workspaces"),
        "{}",
        other.stderr
    );
    assert!(env.slack.requests().is_empty(), "Slack was not called");
    env.cleanup().await;
}
