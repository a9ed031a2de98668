//! Reading a worker process's `/metrics`: a free port to serve it on, scrapes, and waits on a value.

use std::collections::BTreeSet;
use std::time::Duration;

use super::WAIT;

/// A free loopback port for a worker's `http.listen` (released just before it binds).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The worker's `/metrics` text, or `None` while it does not answer yet.
pub async fn scrape(port: u16) -> Option<String> {
    let response = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?;
    response.text().await.ok()
}

/// The value of the first sample whose series starts with `series` (name and
/// any labels as exported, e.g. `alert_router_rules_valid` or
/// `alert_router_events_total{outcome="acked"`).
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find(|line| {
            line.strip_prefix(series)
                .is_some_and(|rest| rest.starts_with([' ', '{', ',', '}']))
        })
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// Scrapes until `series` has a value `accept` takes (bounded by [`WAIT`]),
/// and returns it; panics with the last scrape otherwise.
pub async fn wait_for_sample(port: u16, series: &str, accept: impl Fn(f64) -> bool) -> f64 {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut last = String::new();
    loop {
        if let Some(text) = scrape(port).await {
            if let Some(value) = sample(&text, series).filter(|v| accept(*v)) {
                return value;
            }
            last = text;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("{series} never reached the expected value; last /metrics:\n{last}");
        }
        // Polling interval of the scrape, not a wait for the outcome.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The metric names in a `/metrics` text (from its samples, not its comments).
pub fn exported_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}
