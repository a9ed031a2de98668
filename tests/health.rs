//! The worker's HTTP endpoint: liveness, readiness that follows the broker, Prometheus metrics.

mod support;

use serde_json::json;
use support::{BASIC_RULES, TestEnv, WAIT};

#[tokio::test]
async fn health_readiness_and_metrics_are_served() {
    let env = TestEnv::start(BASIC_RULES).await;
    // A free port for the worker process (released just before it binds).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut command = env.command();
    command
        .env("ALERT_ROUTER__HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .arg("run")
        .stdout(std::process::Stdio::null());
    let mut worker = command.spawn().unwrap();

    env.publish(&env.event("metered", json!({}))).await;
    env.slack.wait_for_posts(1, WAIT).await.unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();

    let health = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "consuming, so ready");
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "alert_router_events_total{outcome=\"acked\"",
        "alert_router_targets_total{kind=\"slack_channel\",result=\"delivered\"}",
        "alert_router_slack_requests_total{method=\"chat.postMessage\",result=\"ok\"}",
        "alert_router_rules_valid 1",
        "alert_router_broker_connected 1",
        "# HELP alert_router_events_total",
    ] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }
    assert!(!metrics.contains(&env.token));

    let pid = worker.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    assert!(worker.wait().await.unwrap().success());
    env.cleanup().await;
}
