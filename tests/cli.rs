//! The command line as a user runs it: exit codes, messages, and what reaches the broker.

mod support;

use std::process::Stdio;

use serde_json::json;
use support::{BASIC_RULES, TestEnv, WAIT};
use tokio::io::AsyncWriteExt;

async fn run_with_stdin(mut command: tokio::process::Command, stdin: &str) -> std::process::Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    child.wait_with_output().await.unwrap()
}

#[tokio::test]
async fn publish_sends_ndjson_lines_that_the_worker_delivers() {
    let env = TestEnv::start(BASIC_RULES).await;
    let worker = env.spawn_worker();
    let lines = format!(
        "{}\n\n{}\n",
        env.event("cli-1", json!({})),
        env.event("cli-2", json!({}))
    );

    let mut command = env.command();
    command.args(["publish", "-"]);
    let output = run_with_stdin(command, &lines).await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("published 2 of 2 events"), "{stdout}");

    env.slack.wait_for_posts(2, WAIT).await.unwrap();
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn publish_refuses_a_batch_with_a_bad_line_and_publishes_nothing() {
    let env = TestEnv::start(BASIC_RULES).await;
    let lines = format!(
        "{}\n{}\n",
        env.event("fine", json!({})),
        json!({"id": "bad", "type": "issue.created", "severity": "urgent", "title": "x"})
    );

    let mut command = env.command();
    command.args(["publish", "-"]);
    let output = run_with_stdin(command, &lines).await;
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("nothing published"), "{stderr}");
    assert!(
        stderr.contains("line 2: event field `severity` unknown variant `urgent`"),
        "{stderr}"
    );
    assert_eq!(env.ready_count(&env.settings.amqp.queue).await, 0);
    env.cleanup().await;
}

#[tokio::test]
async fn publish_accepts_a_pretty_printed_event_file() {
    let env = TestEnv::start(BASIC_RULES).await;
    let path = env.dir.path().join("event.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&env.event("pretty", json!({}))).unwrap(),
    )
    .unwrap();

    let output = env
        .command()
        .arg("publish")
        .arg(&path)
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(env.ready_count(&env.settings.amqp.queue).await, 1);
    env.cleanup().await;
}

#[tokio::test]
async fn settings_shows_the_effective_values_without_passwords() {
    let env = TestEnv::start(BASIC_RULES).await;
    let output = env
        .command()
        .arg("settings")
        .env(
            "ALERT_ROUTER__AMQP__URL",
            "amqp://app:s3cret@broker.internal:5672/%2f",
        )
        .env("SLACK_BOT_TOKEN", "xoxb-test-never-shown")
        .output()
        .await
        .unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("amqp://app:***@broker.internal:5672/%2f"),
        "{stdout}"
    );
    assert!(stdout.contains(&env.settings.amqp.queue), "{stdout}");
    assert!(
        !stdout.contains("s3cret") && !stdout.contains("xoxb"),
        "{stdout}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_bad_setting_is_exit_code_2_naming_the_key() {
    let env = TestEnv::start(BASIC_RULES).await;
    let output = env
        .command()
        .arg("settings")
        .env("ALERT_ROUTER__AMQP__PREFETCH", "0")
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("setting `amqp.prefetch` must be at least 1")
    );
    env.cleanup().await;
}
