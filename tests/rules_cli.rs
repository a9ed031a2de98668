//! `alert-router rules check|test|schema` as processes, and hot reload through a running worker.

mod support;

use std::process::Output;

use serde_json::{Value, json};
use support::{BASIC_RULES, ESCALATIONS, PAYMENTS, TestEnv, WAIT};

fn alert_router(args: &[&str], dir: &std::path::Path) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_alert-router"))
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn rules_check_accepts_the_shipped_rules_file() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = alert_router(&["rules", "check", "config/rules.yaml"], root);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(
        text(&output.stdout),
        "config/rules.yaml: ok, 6 rules, 10 targets\n"
    );
}

#[test]
fn rules_check_reports_every_error_with_line_and_column_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rules.yaml"),
        r#"version: 1
defaults:
  slack_channel: C1
rules:
  - name: one
    matchers:
      - team="payments
    notify:
      - slack_channel: C2
  - name: one
    matchers:
      - code=~"5(("
    notify:
      - slack_channel: C3
"#,
    )
    .unwrap();
    let output = alert_router(&["rules", "check", "rules.yaml"], dir.path());
    assert_eq!(output.status.code(), Some(2));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("rules.yaml:7:9: error:"), "{stderr}");
    assert!(
        stderr.contains("rules.yaml:10:11: error: duplicate rule name `one`"),
        "{stderr}"
    );
    assert!(stderr.contains("rules.yaml:12:9: error:"), "{stderr}");
    assert!(stdout_is_empty(&output));
}

fn stdout_is_empty(output: &Output) -> bool {
    output.stdout.is_empty()
}

#[test]
fn rules_test_explains_each_rule_and_lists_the_targets() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = alert_router(&["rules", "test", "examples/escalation.json"], root);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    assert!(
        stdout.contains("✗ silence-staging     not matched: env=~\"staging|dev\" failed"),
        "{stdout}"
    );
    assert!(stdout.contains("✓ payments-critical   matched"), "{stdout}");
    assert!(
        stdout.contains("- payments            not evaluated (stopped by payments-critical)"),
        "{stdout}"
    );
    assert!(stdout.contains("slack_channel:C0PAYMENTS"), "{stdout}");
    assert!(
        stdout.contains("slack_email:ana@example.com"),
        "the assignee, resolved by email: {stdout}"
    );
}

#[test]
fn rules_test_json_is_machine_readable() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = alert_router(
        &["rules", "test", "--json", "examples/escalation.json"],
        root,
    );
    assert!(output.status.success());
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["event_id"], "esc-2041-2");
    assert_eq!(
        report["routing"]["matched_rules"],
        json!(["payments-critical"])
    );
    assert_eq!(
        report["routing"]["targets"][0]["target"],
        json!({"slack_channel": "C0PAYMENTS"})
    );
    assert_eq!(report["steps"][0]["failed_matcher"], "env=~\"staging|dev\"");
}

#[test]
fn rules_test_rejects_an_invalid_event_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let event = dir.path().join("event.json");
    std::fs::write(&event, r#"{"id":"x","type":"t","title":"no severity"}"#).unwrap();
    let rules = root.join("config/rules.yaml");
    let output = alert_router(
        &[
            "rules",
            "test",
            "--rules",
            rules.to_str().unwrap(),
            event.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("event field `severity` missing field `severity`"));
}

#[test]
fn rules_schema_is_a_json_schema() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = alert_router(&["rules", "schema"], root);
    assert!(output.status.success());
    let schema: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(
        schema["$schema"]
            .as_str()
            .unwrap()
            .contains("json-schema.org")
    );
}

const ALL_TO_PAYMENTS: &str =
    "version: 1\ndefaults:\n  slack_channel: C0PAYMENTS\nunmatched: default\nrules: []\n";

#[tokio::test]
async fn a_running_worker_takes_a_valid_rules_change_and_refuses_an_invalid_one() {
    let env = TestEnv::start(BASIC_RULES).await;
    let mut worker = env.start_worker_process();

    env.publish(&env.event("before", json!({}))).await;
    env.slack
        .wait_for_posts_to(ESCALATIONS, 1, WAIT)
        .await
        .unwrap();

    env.replace_rules(ALL_TO_PAYMENTS);
    worker.wait_for_log("rules reloaded", 1).await;
    env.publish(&env.event("after-valid", json!({}))).await;
    env.slack
        .wait_for_posts_to(PAYMENTS, 1, WAIT)
        .await
        .unwrap();

    env.replace_rules("version: 1\nrules:\n  - name: broken\n    matchers: ['team=\"x']\n");
    worker
        .wait_for_log("rules file is invalid; keeping the last good rules", 1)
        .await;
    env.publish(&env.event("after-invalid", json!({}))).await;
    env.slack
        .wait_for_posts_to(PAYMENTS, 2, WAIT)
        .await
        .unwrap();

    // SIGHUP re-reads the file even when nothing changed on disk.
    env.replace_rules(BASIC_RULES);
    worker.wait_for_log("rules reloaded", 2).await;
    worker.signal("HUP");
    worker.wait_for_log("rules reloaded", 3).await;
    env.publish(&env.event("after-hup", json!({}))).await;
    env.slack
        .wait_for_posts_to(ESCALATIONS, 2, WAIT)
        .await
        .unwrap();

    assert!(worker.stop().await.success());
    assert_eq!(env.slack.posts().len(), 4);
    env.cleanup().await;
}

#[test]
fn the_committed_schema_file_matches_the_command() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = alert_router(&["rules", "schema"], root);
    let committed = std::fs::read_to_string(root.join("config/rules.schema.json")).unwrap();
    assert_eq!(
        text(&output.stdout),
        committed,
        "regenerate it: alert-router rules schema > config/rules.schema.json"
    );
}
