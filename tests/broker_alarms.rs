//! A RabbitMQ memory alarm with events in flight: `/readyz`, the metric and the log say so, nothing is lost or acked early.
//!
//! An alarm blocks publishing for every client of the shared broker, so the
//! one test that raises it lives alone in this binary (cargo runs test
//! binaries one after another, so no other test of this suite publishes
//! meanwhile), keeps the alarm only as long as the proof needs (a few
//! seconds), and restores the watermark in a guard's `Drop`, so a failing
//! assertion does not leave the broker blocked.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;
use support::{BASIC_RULES, TestEnv, WAIT, rabbitmqctl};

/// The broker's memory alarm, raised for as long as this lives.
struct MemoryAlarm {
    watermark: String,
}

impl MemoryAlarm {
    /// Sets a watermark no broker can stay under, and waits until the alarm is on.
    fn raise() -> MemoryAlarm {
        let current = rabbitmqctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."]);
        // A run killed mid-alarm leaves the tiny watermark behind: never "restore" that.
        let watermark = match current.trim().parse::<f64>() {
            Ok(value) if value >= 0.01 => current.trim().to_string(),
            _ => "0.4".to_string(),
        };
        let alarm = MemoryAlarm { watermark };
        rabbitmqctl(&["set_vm_memory_high_watermark", "0.0000001"]);
        wait_for_memory_alarm(true);
        alarm
    }
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        rabbitmqctl(&["set_vm_memory_high_watermark", &self.watermark]);
        if !std::thread::panicking() {
            wait_for_memory_alarm(false);
        }
    }
}

fn wait_for_memory_alarm(on: bool) {
    let deadline = std::time::Instant::now() + WAIT;
    while rabbitmqctl(&["eval", "rabbit_alarm:get_alarms()."]).contains("memory") != on {
        assert!(
            std::time::Instant::now() < deadline,
            "the memory alarm did not turn {}",
            if on { "on" } else { "off" }
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Messages in each queue, ready or delivered and unacked (from the broker's
/// statistics, which may lag a few seconds: only ever waited on).
fn queue_totals(queues: &[&str]) -> Vec<u64> {
    let listing = rabbitmqctl(&["list_queues", "name", "messages"]);
    let totals: BTreeMap<&str, u64> = listing
        .lines()
        .filter_map(|line| {
            let (name, count) = line.split_once('\t')?;
            Some((name, count.trim().parse().ok()?))
        })
        .collect();
    queues
        .iter()
        .map(|q| *totals.get(q).unwrap_or(&0))
        .collect()
}

/// Polls until `check` holds for the queue totals; returns them.
async fn wait_for_totals(queues: &[&str], what: &str, check: impl Fn(&[u64]) -> bool) -> Vec<u64> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let queues: Vec<String> = queues.iter().map(|q| q.to_string()).collect();
        let totals = tokio::task::spawn_blocking(move || {
            let names: Vec<&str> = queues.iter().map(String::as_str).collect();
            queue_totals(&names)
        })
        .await
        .unwrap();
        if check(&totals) {
            return totals;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: queue totals stayed {totals:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `/readyz` until it answers `status`; returns the body.
async fn wait_for_readiness(base: &str, status: u16) -> String {
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(answer) = http.get(format!("{base}/readyz")).send().await
            && answer.status() == status
        {
            return answer.text().await.unwrap();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz never answered {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn metrics(base: &str) -> String {
    reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_alarm_blocks_republishing_without_losing_or_acking_anything_early() {
    let mut env = TestEnv::start(BASIC_RULES).await;
    // Shorter than the alarm lasts, so the test sees confirms time out.
    env.settings.amqp.confirm_timeout = Duration::from_millis(500);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    env.settings.http.listen = format!("127.0.0.1:{port}").parse().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let work = env.settings.amqp.queue.clone();
    let dead = env.settings.amqp.dead_letter_queue.clone();
    let queues = [work.as_str(), dead.as_str()];

    // Published before the alarm (which would block this publisher too), and
    // taken by the worker only once the alarm is on. Poison needs a
    // dead-letter republish; the good events only a post and an ack.
    let poison: Vec<String> = (0..3).map(|i| format!("poison-{i}")).collect();
    for id in &poison {
        let body = json!({"id": id, "type": "escalation.triggered"}).to_string();
        env.publish_raw("escalation.triggered", body.as_bytes())
            .await;
    }
    for i in 0..2 {
        env.publish(&env.event(&format!("good-{i}"), json!({})))
            .await;
    }

    let alarm = tokio::task::spawn_blocking(MemoryAlarm::raise)
        .await
        .unwrap();
    let mut worker = env.start_worker_process();

    worker
        .wait_for_log("RabbitMQ blocked the connection", 1)
        .await;
    let why = wait_for_readiness(&base, 503).await;
    assert!(why.contains("blocking publishes"), "{why}");
    assert!(
        metrics(&base)
            .await
            .contains("alert_router_broker_blocked 1"),
        "the blocked gauge is raised"
    );
    env.slack.wait_for_posts(2, WAIT).await.unwrap();
    worker
        .wait_for_log("confirm timed out; the delivery stays unacked", 1)
        .await;
    // The good events are acked through the consuming connection even though
    // the publishing one is blocked; every poison event is still somewhere.
    wait_for_totals(&queues, "good events acked while blocked", |t| {
        t[0] + t[1] == 3
    })
    .await;
    // Exact (a passive declare, not the broker's periodic statistics): at
    // most the first republish got in before the broker blocked the connection.
    let dead_lettered = env.ready_count(&dead).await;
    assert!(
        dead_lettered < 3,
        "poison events whose dead letter is not confirmed stay unacked in the work queue ({dead_lettered} dead-lettered)"
    );

    tokio::task::spawn_blocking(move || drop(alarm))
        .await
        .unwrap();
    worker
        .wait_for_log("RabbitMQ unblocked the connection", 1)
        .await;
    wait_for_readiness(&base, 200).await;

    // At least once: a dead letter whose confirm timed out may arrive twice.
    let mut dead_letters = env.dead_letters().await;
    let mut seen = BTreeMap::new();
    while seen.len() < poison.len() {
        let letter = dead_letters.next().await;
        assert_eq!(
            letter.header("x-alert-router-reason").as_deref(),
            Some("invalid_event")
        );
        let id = serde_json::from_slice::<serde_json::Value>(&letter.body).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(poison.contains(&id), "{id}");
        *seen.entry(id).or_insert(0) += 1;
    }
    wait_for_totals(&[work.as_str()], "the work queue drains", |t| t[0] == 0).await;
    assert_eq!(env.slack.posts().len(), 2, "each good event posted once");
    assert!(
        metrics(&base)
            .await
            .contains("alert_router_broker_blocked 0"),
        "the blocked gauge is lowered"
    );

    assert!(worker.stop().await.success());
    drop(dead_letters);
    env.cleanup().await;
}
