//! Every `alert_router_*` metric the Grafana dashboard and the Prometheus
//! alert rules query is one a freshly started worker exports.
//!
//! A renamed or dropped metric fails here instead of leaving a panel empty
//! or an alert silently unable to fire. The worker creates its series at
//! zero when it starts (`describe_*` alone exports nothing), so no traffic
//! is needed; the dead-letter gauges appear after the first poll.

mod support;

use std::collections::BTreeSet;
use std::path::Path;

use regex::Regex;
use serde_json::Value;
use support::metrics::{exported_names, free_port, scrape, wait_for_sample};
use support::{BASIC_RULES, TestEnv};

const DASHBOARD: &str = "deploy/grafana/alert-router.json";
const RULES: &str = "deploy/prometheus/alert-router.rules.yml";

/// Every PromQL string in a dashboard or rules document: `expr` fields,
/// and template variable queries (`definition`, `query`).
fn queries(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(fields) => {
            for (key, field) in fields {
                match (key.as_str(), field) {
                    ("expr" | "definition" | "query", Value::String(text)) => {
                        out.push(text.clone());
                    }
                    _ => queries(field, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| queries(item, out)),
        _ => {}
    }
}

/// The `alert_router_*` metric names a set of queries reads.
fn queried_names(file: &str) -> BTreeSet<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    let document: Value = if file.ends_with(".json") {
        serde_json::from_str(&text).unwrap()
    } else {
        serde_saphyr::from_str(&text).unwrap()
    };
    let mut found = Vec::new();
    queries(&document, &mut found);
    assert!(!found.is_empty(), "no queries found in {file}");
    let name = Regex::new(r"\balert_router_[A-Za-z0-9_:]+").unwrap();
    found
        .iter()
        .flat_map(|query| name.find_iter(query).map(|m| m.as_str().to_string()))
        .collect()
}

/// A histogram is exported as `_bucket`, `_sum` and `_count` series; its
/// base name counts as exported when they are.
fn is_exported(name: &str, exported: &BTreeSet<String>) -> bool {
    exported.contains(name)
        || ["_bucket", "_sum", "_count"]
            .iter()
            .all(|suffix| exported.contains(&format!("{name}{suffix}")))
}

#[test]
fn the_dashboard_and_the_rules_query_metrics() {
    // A parse that finds nothing would make the contract below vacuous.
    let dashboard = queried_names(DASHBOARD);
    let rules = queried_names(RULES);
    assert!(dashboard.len() >= 10, "dashboard: {dashboard:?}");
    assert!(rules.len() >= 8, "rules: {rules:?}");
}

#[tokio::test]
async fn every_metric_the_dashboard_and_the_rules_query_is_exported() {
    let env = TestEnv::start(BASIC_RULES).await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let worker = env.start_worker_process_with(&[
        ("ALERT_ROUTER__HTTP__LISTEN", listen.as_str()),
        ("ALERT_ROUTER__AMQP__DEAD_LETTER_POLL_INTERVAL", "200ms"),
    ]);
    wait_for_sample(port, "alert_router_broker_connected", |v| v == 1.0).await;
    wait_for_sample(port, "alert_router_dead_letter_queue_messages", |_| true).await;
    let text = scrape(port).await.unwrap();
    let exported = exported_names(&text);

    for (file, names) in [
        (DASHBOARD, queried_names(DASHBOARD)),
        (RULES, queried_names(RULES)),
    ] {
        let missing: Vec<&String> = names
            .iter()
            .filter(|name| !is_exported(name, &exported))
            .collect();
        assert!(
            missing.is_empty(),
            "{file} queries metrics the worker does not export: {missing:?}\nexported: {exported:?}"
        );
    }

    assert!(worker.stop().await.success());
    env.cleanup().await;
}
