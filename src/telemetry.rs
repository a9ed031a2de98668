//! Logs and metrics: tracing setup, the Prometheus recorder, and one function per thing worth counting.
//!
//! Each `record_*` function below is the single place a given fact is both
//! counted and (where useful) logged, so logs and metrics never disagree.
//! Labels are low-cardinality codes; never ids, channels or anything secret.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// Installs the global log subscriber once; later calls (tests) are ignored.
pub fn init(settings: &LogSettings) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match settings.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
        LogFormat::Text => builder.with_target(false).try_init(),
    };
}

/// The process-wide Prometheus recorder, installed on first use.
pub fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets(&[
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ])
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Fails only if another recorder is installed (an embedding program): then ours stays empty.
        let _ = metrics::set_global_recorder(recorder);
        describe();
        handle
    })
}

fn describe() {
    describe_counter!(
        EVENTS,
        "Events settled, by outcome (acked, retried, dead_lettered) and reason."
    );
    describe_histogram!(
        EVENT_SECONDS,
        metrics::Unit::Seconds,
        "Time from delivery to settlement of one event."
    );
    describe_counter!(TARGETS, "Targets of events, by kind and result.");
    describe_counter!(
        SLACK_CALLS,
        "Slack Web API calls, by method and result (ok or the Slack error code)."
    );
    describe_counter!(
        RULES_RELOADS,
        "Rules file reloads, by result (ok, invalid)."
    );
    describe_gauge!(
        RULES_VALID,
        "1 when the rules file on disk is the one in use, 0 when the last reload was refused."
    );
    describe_gauge!(RULES_COUNT, "Rules in the routing table in use.");
    describe_gauge!(BROKER_CONNECTED, "1 while consuming from RabbitMQ.");
    describe_gauge!(
        BROKER_BLOCKED,
        "1 while RabbitMQ blocks the worker's connection (memory or disk alarm)."
    );
    describe_counter!(
        INSTALLS,
        "Slack install pages served, by result (started, installed, denied, bad_state, slack_error, refused, store_failed, not_configured)."
    );
    describe_counter!(
        INTERACTIONS,
        "Requests to /slack/interactions, by result (acknowledged, already, not_tracked, accepted, bad_signature, stale, bad_request, publish_failed, store_failed, not_configured)."
    );
    describe_counter!(
        CONFIRM_TIMEOUTS,
        "Republishes the broker did not confirm within amqp.confirm_timeout; their deliveries were left for redelivery."
    );
}

const EVENTS: &str = "alert_router_events_total";
const EVENT_SECONDS: &str = "alert_router_event_duration_seconds";
const TARGETS: &str = "alert_router_targets_total";
const SLACK_CALLS: &str = "alert_router_slack_requests_total";
const RULES_RELOADS: &str = "alert_router_rules_reloads_total";
const RULES_VALID: &str = "alert_router_rules_valid";
const RULES_COUNT: &str = "alert_router_rules";
const BROKER_CONNECTED: &str = "alert_router_broker_connected";
const BROKER_BLOCKED: &str = "alert_router_broker_blocked";
const CONFIRM_TIMEOUTS: &str = "alert_router_broker_confirm_timeouts_total";
const INSTALLS: &str = "alert_router_slack_installs_total";
const INTERACTIONS: &str = "alert_router_slack_interactions_total";

/// An event left the worker: `outcome` is `acked`, `retried` or `dead_lettered`.
pub fn record_event(outcome: &'static str, reason: &'static str, took: Duration) {
    counter!(EVENTS, "outcome" => outcome, "reason" => reason).increment(1);
    histogram!(EVENT_SECONDS).record(took.as_secs_f64());
}

/// One target's result: `kind` is the target kind, `result` e.g. `delivered`.
pub fn record_target(kind: &'static str, result: &'static str) {
    counter!(TARGETS, "kind" => kind, "result" => result).increment(1);
}

/// One Slack call's result: `ok` or the error code (a short, bounded set).
pub fn record_slack_call(method: &'static str, result: &str) {
    // Only codes we know (or our own transport codes) become label values, so
    // a misbehaving proxy cannot create unbounded series.
    let known = result == "ok"
        || result.starts_with("http_")
        || crate::deliver::slack::client::classify(result)
            != crate::deliver::slack::SlackFailure::Other
        || matches!(
            result,
            "timeout" | "connect_error" | "network_error" | "invalid_response"
        );
    let label = if known {
        result.to_string()
    } else {
        "other".to_string()
    };
    counter!(SLACK_CALLS, "method" => method, "result" => label).increment(1);
}

/// A rules (re)load: valid ones replace the table in use, invalid ones do not.
pub fn record_rules_load(valid: bool, rule_count: Option<usize>) {
    counter!(RULES_RELOADS, "result" => if valid { "ok" } else { "invalid" }).increment(1);
    gauge!(RULES_VALID).set(if valid { 1.0 } else { 0.0 });
    if let Some(count) = rule_count {
        gauge!(RULES_COUNT).set(count as f64);
    }
}

/// Whether the worker is consuming from the broker.
pub fn record_broker_connected(connected: bool) {
    gauge!(BROKER_CONNECTED).set(if connected { 1.0 } else { 0.0 });
}

/// Whether RabbitMQ is blocking one of the worker's connections.
pub fn record_broker_blocked(blocked: bool) {
    gauge!(BROKER_BLOCKED).set(if blocked { 1.0 } else { 0.0 });
}

/// A republish whose confirm did not come in time.
pub fn record_confirm_timeout() {
    counter!(CONFIRM_TIMEOUTS).increment(1);
}

/// One step of a Slack install: `started` (sent to Slack), `installed`, or why not.
pub fn record_install(result: &'static str) {
    counter!(INSTALLS, "result" => result).increment(1);
}

/// One request to the interactivity endpoint: what a click came to, or why it was refused.
pub fn record_interaction(result: &'static str) {
    counter!(INTERACTIONS, "result" => result).increment(1);
}
