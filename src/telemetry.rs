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
        // Flattened, an event's own `target` field (where it went) would
        // clash with tracing's (the module): the module is left out.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_target(false)
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
        register_series();
        handle
    })
}

fn describe() {
    describe_counter!(
        EVENTS,
        "Events settled, by outcome (acked, retried, deferred, dead_lettered) and reason."
    );
    describe_histogram!(
        EVENT_SECONDS,
        metrics::Unit::Seconds,
        "Time from delivery to settlement of one event."
    );
    describe_counter!(
        TARGETS,
        "Targets of events, by kind and result; kind slack_update is an incident's first message updated in place."
    );
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
        "Requests to /slack/interactions, by result (acknowledged, already, not_tracked, accepted, bad_signature, stale, replayed, bad_request, publish_failed, store_failed, not_configured)."
    );
    describe_counter!(
        CONFIRM_TIMEOUTS,
        "Republishes the broker did not confirm within amqp.confirm_timeout; their deliveries were left for redelivery."
    );
    describe_gauge!(
        DEAD_LETTERS,
        "Messages in the dead-letter queue (queue-wide: every replica reports the same value, so aggregate with max, not sum)."
    );
    describe_gauge!(
        DEAD_LETTER_AGE,
        metrics::Unit::Seconds,
        "Age of the oldest dead letter, from the dead-letter ledger in Redis; 0 when the queue is empty (queue-wide, like the depth)."
    );
    describe_counter!(
        TOKEN_REFRESHES,
        "Slack token refreshes (oauth.v2.access, or a token another replica refreshed), by result (ok, failed_transient, failed)."
    );
}

/// Creates the series alerts and dashboards rely on at zero, before anything
/// happens. `describe_*` only attaches help text: the exporter renders a
/// metric once it has a value, so without this a counter would first appear
/// already at 1, and `rate()`/`increase()` would miss that first event (an
/// alert on the first dead letter would never fire).
fn register_series() {
    for (outcome, reason) in [
        ("acked", "ok"),
        ("retried", "unsettled_targets"),
        ("deferred", "rate_limited"),
        ("dead_lettered", "undeliverable"),
        ("dead_lettered", "no_route"),
        ("dead_lettered", "forbidden_target"),
        ("dead_lettered", "invalid_json"),
        ("dead_lettered", "invalid_event"),
        ("dead_lettered", "too_large"),
    ] {
        counter!(EVENTS, "outcome" => outcome, "reason" => reason).increment(0);
    }
    // Registered with no sample: rendered as empty buckets.
    let _ = histogram!(EVENT_SECONDS);
    for result in [
        "delivered",
        "emailed",
        "deferred",
        "failed",
        "failed_retryable",
    ] {
        counter!(TARGETS, "kind" => "slack_channel", "result" => result).increment(0);
    }
    counter!(SLACK_CALLS, "method" => "chat.postMessage", "result" => "ok").increment(0);
    counter!(SLACK_CALLS, "method" => "chat.postMessage", "result" => "ratelimited").increment(0);
    for result in ["ok", "invalid"] {
        counter!(RULES_RELOADS, "result" => result).increment(0);
    }
    for result in ["ok", "failed_transient", "failed"] {
        counter!(TOKEN_REFRESHES, "result" => result).increment(0);
    }
    counter!(CONFIRM_TIMEOUTS).increment(0);
    // Not connected until the worker says so; not blocked until RabbitMQ says so.
    gauge!(BROKER_CONNECTED).set(0.0);
    gauge!(BROKER_BLOCKED).set(0.0);
    counter!(INSTALLS, "result" => "installed").increment(0);
    counter!(INTERACTIONS, "result" => "acknowledged").increment(0);
    // The dead-letter gauges are left out on purpose: a 0 before the first
    // poll would be a claim about the queue nobody made.
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
const DEAD_LETTERS: &str = "alert_router_dead_letter_queue_messages";
const DEAD_LETTER_AGE: &str = "alert_router_dead_letter_oldest_age_seconds";
const TOKEN_REFRESHES: &str = "alert_router_token_refreshes_total";

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

/// The dead-letter queue as last polled: its depth, and its oldest
/// message's age (zero when it is empty).
pub fn record_dead_letters(messages: u32, oldest_age: Duration) {
    gauge!(DEAD_LETTERS).set(f64::from(messages));
    gauge!(DEAD_LETTER_AGE).set(oldest_age.as_secs_f64());
}

/// One token refresh (per refresh, not per caller waiting on it): `ok`,
/// `failed_transient` (may work on the next try) or `failed` (needs a new token).
pub fn record_token_refresh(result: &'static str) {
    counter!(TOKEN_REFRESHES, "result" => result).increment(1);
}
