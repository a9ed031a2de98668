//! JSON logs tell one event's whole story: every line of it carries the event id, and the lines that matter name the rule, the target, the outcome and the reason.

mod support;

use alert_router::config::LogFormat;
use serde_json::{Value, json};
use support::{BASIC_RULES, TestEnv};

fn json_lines(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .collect()
}

/// The line whose message is `message` for event `id`.
fn line_of<'a>(lines: &'a [Value], id: &str, message: &str) -> &'a Value {
    lines
        .iter()
        .find(|l| l["message"] == message && l["span"]["event_id"] == id)
        .unwrap_or_else(|| panic!("no {message:?} line for {id}: {lines:#?}"))
}

#[tokio::test]
async fn a_log_query_by_event_id_finds_the_rule_the_target_the_outcome_and_the_reason() {
    let mut env = TestEnv::start(BASIC_RULES).await;
    env.settings.log.format = LogFormat::Json;
    env.settings.log.level = "info".into();
    let mut worker = env.start_worker_process();

    env.publish(&env.event("paid", json!({"labels": {"team": "payments"}})))
        .await;
    env.publish_raw("escalation.triggered", b"{not json").await;
    worker.wait_for_log(r#""outcome":"acked""#, 1).await;
    worker.wait_for_log(r#""outcome":"dead_lettered""#, 1).await;
    let raw = worker.log_lines();
    let lines = json_lines(&raw);
    // One `target` key per line: tracing's own (the module) is left out, or
    // a JSON parser would keep one of the two at random.
    let delivered_raw = raw
        .iter()
        .find(|l| l.contains(r#""message":"delivered""#))
        .unwrap();
    assert_eq!(
        delivered_raw.matches(r#""target":"#).count(),
        1,
        "{delivered_raw}"
    );
    assert!(worker.stop().await.success());

    let delivered = line_of(&lines, "paid", "delivered");
    assert_eq!(delivered["rule"], "payments");
    assert_eq!(delivered["target"], "slack_channel:C0PAYMENTS");
    let acked = line_of(&lines, "paid", "acked");
    assert_eq!(acked["outcome"], "acked");
    assert_eq!(acked["reason"], "delivered");

    let poison = lines
        .iter()
        .find(|l| l["outcome"] == "dead_lettered")
        .unwrap();
    assert_eq!(poison["reason"], "invalid_json");
    env.cleanup().await;
}
