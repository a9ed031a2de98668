//! `alert-router preview EVENT.json` as a process: the Block Kit JSON the
//! worker would post and a Block Kit Builder link that carries the same blocks.

use std::process::Output;

use serde_json::Value;

fn alert_router(args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write as _;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_alert-router"))
        .args(args)
        .current_dir(root)
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn preview_prints_the_message_the_rule_names_and_a_builder_link_with_the_same_blocks() {
    let output = alert_router(
        &[
            "preview",
            "examples/escalation.json",
            "--rules",
            "config/rules.yaml",
        ],
        None,
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    let (json, rest) = stdout.split_once("\n\n").unwrap();
    let message: Value = serde_json::from_str(json).unwrap();
    assert_eq!(
        message["text"],
        "[CRITICAL] Checkout API error rate above SLO (TCK-2041)"
    );
    assert_eq!(message["blocks"][0]["type"], "header");
    assert_eq!(
        message["metadata"]["event_payload"]["rule"], "payments-critical",
        "{json}"
    );
    // The Acknowledge button names the incident as the worker would.
    let buttons = message["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["type"] == "actions")
        .unwrap();
    let ack = &buttons["elements"][0];
    assert_eq!(ack["action_id"], "alert_router_ack");
    let value: Value = serde_json::from_str(ack["value"].as_str().unwrap()).unwrap();
    assert_eq!(value["w"], "T0AEXY01");
    assert_eq!(value["k"], "ticket:TCK-2041");

    assert!(rest.contains("would post to: slack_channel:"), "{rest}");
    let link = rest
        .lines()
        .find_map(|l| l.strip_prefix("Block Kit Builder: "))
        .unwrap();
    let fragment = link
        .strip_prefix("https://app.slack.com/block-kit-builder#")
        .unwrap();
    let decoded = percent_encoding::percent_decode_str(fragment)
        .decode_utf8()
        .unwrap();
    let shared: Value = serde_json::from_str(&decoded).unwrap();
    assert_eq!(shared["blocks"], message["blocks"]);
    assert_eq!(shared["attachments"], message["attachments"]);
}

#[test]
fn preview_reads_standard_input_and_exits_2_on_a_bad_event() {
    let output = alert_router(
        &["preview", "-", "--rules", "config/rules.yaml"],
        Some(r#"{"id":"e1","type":"escalation.escalated"}"#),
    );
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stdout));
    assert!(
        text(&output.stderr).contains("stdin: event field"),
        "{}",
        text(&output.stderr)
    );
    assert!(output.stdout.is_empty());

    let output = alert_router(
        &["preview", "-", "--rules", "config/rules.yaml"],
        Some("not json"),
    );
    assert_eq!(output.status.code(), Some(2));
}
