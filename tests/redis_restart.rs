//! Redis stopped and restarted with its data, events in flight: each event is posted once, none is emailed or dead-lettered.
//!
//! The shared Redis keeps no data across a restart (`--save ""`) and other
//! test binaries use it, so the test runs its own `redis-server` on a free
//! loopback port with its own directory, stops it with `SHUTDOWN SAVE` and
//! starts it again on the same port and directory, from `dump.rdb`.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use support::{ESCALATIONS, RULES_WITH_EMAIL, TestEnv, WAIT, WorkerProcess};

/// Events published before Redis stops.
const BEFORE: usize = 100;
/// Events published while Redis is down.
const DURING: usize = 50;
/// Deliveries the worker holds at once (`amqp.prefetch`).
const PREFETCH: usize = 10;
/// Posts answered before Redis stops; the next `PREFETCH` are held by Slack
/// until it is down.
const POSTED_BEFORE: usize = 30;
/// Generous: retries wait in delay queues on a loaded 2-core machine.
const LONG_WAIT: Duration = Duration::from_secs(180);

/// A `redis-server` of the test's own; killed when dropped.
struct OwnRedis {
    port: u16,
    dir: tempfile::TempDir,
    server: Option<tokio::process::Child>,
}

impl OwnRedis {
    async fn start() -> OwnRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut redis = OwnRedis {
            port,
            dir: tempfile::tempdir().unwrap(),
            server: None,
        };
        redis.start_again().await;
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server on the same port and directory (loading `dump.rdb`
    /// if there is one) and waits until it answers.
    async fn start_again(&mut self) {
        assert!(self.server.is_none(), "already running");
        let server = tokio::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server runs");
        self.server = Some(server);
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.ping().await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server on port {} did not answer",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn ping(&self) -> redis::RedisResult<String> {
        let client = redis::Client::open(self.url())?;
        let mut connection = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async(&mut connection).await
    }

    /// `SHUTDOWN SAVE`: writes `dump.rdb`, then exits; waits for the exit.
    async fn shutdown_saving(&mut self) {
        let status = tokio::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "shutdown", "save"])
            .stdout(Stdio::null())
            .status()
            .await
            .unwrap();
        assert!(status.success(), "redis-cli shutdown save: {status}");
        let mut server = self.server.take().expect("running");
        let exited = tokio::time::timeout(WAIT, server.wait())
            .await
            .expect("redis-server exits after SHUTDOWN")
            .unwrap();
        assert!(exited.success(), "redis-server exit: {exited}");
        assert!(dump_exists(self.dir.path()), "dump.rdb written");
    }

    /// Reads a key (from a fresh connection).
    async fn get(&self, key: &str) -> Option<String> {
        let client = redis::Client::open(self.url()).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("GET")
            .arg(key)
            .query_async(&mut connection)
            .await
            .unwrap()
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        if let Some(server) = self.server.as_mut() {
            let _ = server.start_kill();
        }
    }
}

fn dump_exists(dir: &Path) -> bool {
    dir.join("dump.rdb").exists()
}

/// Waits until every event in `ids` has been sent to a delay queue at least
/// once (the worker logs `event{event_id=…}: … retrying later`).
async fn wait_until_retried(worker: &WorkerProcess, ids: &BTreeSet<String>) {
    let deadline = tokio::time::Instant::now() + LONG_WAIT;
    loop {
        let retried: BTreeSet<String> = worker
            .log_lines()
            .iter()
            .filter(|line| line.contains("retrying later"))
            .filter_map(|line| line.split("event{event_id=").nth(1)?.split(' ').next())
            .map(str::to_string)
            .collect();
        let missing: Vec<&String> = ids.difference(&retried).collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never retried: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_with_its_data_delays_events_without_emailing_or_posting_twice() {
    let mut redis = OwnRedis::start().await;
    let mut env = TestEnv::start(RULES_WITH_EMAIL).await;
    env.use_redis(&redis.url()).await;
    env.settings.amqp.prefetch = PREFETCH as u16;
    // The held posts outlast the outage: no timeout may resend them.
    env.settings.slack.request_timeout = Duration::from_secs(120);
    // Every event reads its token from Redis, so an outage meets the token
    // read too (an absent token would send the event to email).
    env.settings.slack.token_cache_ttl = Duration::ZERO;
    // Events wait for Redis through the delay queues; far more attempts
    // than the outage needs, so none is dead-lettered for running out.
    env.settings.delivery.retry_delays = vec![Duration::from_secs(1); 30];

    let before: Vec<String> = (0..BEFORE).map(|i| format!("before-{i:03}")).collect();
    let during: Vec<String> = (0..DURING).map(|i| format!("during-{i:03}")).collect();
    for id in &before {
        env.publish(&env.event(id, json!({}))).await;
    }
    // The first posts are answered at once; the next ones fill the whole
    // prefetch window and are held until Redis is down, so their outcome
    // cannot be recorded there.
    let release = env.slack.answer_then_hold(POSTED_BEFORE, PREFETCH);

    let mut worker = env.start_worker_process();
    env.slack
        .wait_for_requests("chat.postMessage", POSTED_BEFORE + PREFETCH, WAIT)
        .await
        .unwrap();
    assert_eq!(env.slack.posts().len(), POSTED_BEFORE, "the rest are held");

    redis.shutdown_saving().await;
    release.cancel();
    env.slack
        .wait_for_posts(POSTED_BEFORE + PREFETCH, WAIT)
        .await
        .unwrap();
    // Sent, so acked even though Redis could not record it.
    worker
        .wait_for_log("sent, but could not record it in Redis", PREFETCH)
        .await;
    for id in &during {
        env.publish(&env.event(id, json!({}))).await;
    }
    // Redis stays down until the worker has met every waiting event at least once.
    let waiting: BTreeSet<String> = before[POSTED_BEFORE + PREFETCH..]
        .iter()
        .chain(&during)
        .cloned()
        .collect();
    wait_until_retried(&worker, &waiting).await;
    assert_eq!(
        env.slack.posts().len(),
        POSTED_BEFORE + PREFETCH,
        "nothing is posted without Redis"
    );

    redis.start_again().await;
    let token_key = format!(
        "{}:slack:token:{}",
        env.settings.redis.key_prefix, env.workspace
    );
    assert!(
        redis.get(&token_key).await.is_some(),
        "the restarted Redis has its data"
    );
    env.slack
        .wait_for_posts_to(ESCALATIONS, BEFORE + DURING, LONG_WAIT)
        .await
        .unwrap();
    env.wait_until_drained(&env.settings.amqp.queue, LONG_WAIT)
        .await;
    assert!(worker.stop().await.success());

    let delivered = support::posts_per_event(&env.slack.posts());
    let mut expected: Vec<String> = before.iter().chain(&during).cloned().collect();
    expected.sort();
    assert_eq!(
        delivered.keys().cloned().collect::<Vec<_>>(),
        expected,
        "every event arrived"
    );
    assert!(
        delivered.values().all(|&n| n == 1),
        "none twice: {:?}",
        delivered
            .iter()
            .filter(|(_, n)| **n > 1)
            .collect::<Vec<_>>()
    );
    assert!(
        env.smtp.mails().is_empty(),
        "no email because Redis blinked: {:?}",
        env.smtp
            .mails()
            .iter()
            .map(|m| m.subject.clone())
            .collect::<Vec<_>>()
    );
    env.assert_nothing_pending().await;
    env.cleanup().await;
}
