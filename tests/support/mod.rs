//! Test support: an isolated broker/Redis namespace per test, a fake Slack, and workers to drive.
//!
//! Every test gets its own exchange, queues and Redis key prefix (suffixed
//! with a random id) so tests run in parallel against the one real RabbitMQ
//! and Redis, and `cleanup` removes what the test created.
#![allow(dead_code)]

pub mod fake_slack;
pub mod metrics;
pub mod smtp_sink;
pub mod worker_env;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use alert_router::broker::{self, Publisher, Topology};
use alert_router::config::{Secrets, Settings};
use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeleteOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use fake_slack::{ChannelSpec, FakeSlack};
use smtp_sink::SmtpSink;

/// How long a test waits for something that should happen promptly.
pub const WAIT: Duration = Duration::from_secs(20);

/// The default escalation channel in the fake workspace.
pub const ESCALATIONS: &str = "C0ESCALATE";
/// A second channel, for rules that route elsewhere.
pub const PAYMENTS: &str = "C0PAYMENTS";

/// Rules that send everything to the escalations channel, and payments to its own.
/// No rules: the default channel, and the on-call list to fall back to by email.
pub const RULES_WITH_EMAIL: &str = r#"version: 1
defaults:
  slack_channel: C0ESCALATE
  email: ["oncall@example.com"]
unmatched: default
rules: []
"#;

pub const BASIC_RULES: &str = r#"version: 1
defaults:
  slack_channel: "C0ESCALATE"
unmatched: default
rules:
  - name: payments
    matchers:
      - team="payments"
    notify:
      - slack_channel: C0PAYMENTS
"#;

pub struct TestEnv {
    pub id: String,
    pub settings: Settings,
    pub slack: FakeSlack,
    pub smtp: SmtpSink,
    pub workspace: String,
    pub token: String,
    pub dir: tempfile::TempDir,
    connection: lapin::Connection,
    publisher: Publisher,
    /// Retry queues declared by `start`; a test that changes the delays
    /// afterwards gets others from its workers, and `cleanup` removes both.
    declared_retry_queues: Vec<String>,
    redis: redis::aio::MultiplexedConnection,
}

impl TestEnv {
    /// A fresh namespace with `rules` as the rules file, a fake Slack with
    /// a valid token for the workspace, and the topology declared.
    pub async fn start(rules: &str) -> TestEnv {
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let dir = tempfile::tempdir().unwrap();
        let rules_path = dir.path().join("rules.yaml");
        std::fs::write(&rules_path, rules).unwrap();

        let slack = FakeSlack::start().await;
        let smtp = SmtpSink::start().await;
        let workspace = format!("T{}", id.to_uppercase());
        let token = format!("xoxb-test-{id}");
        slack.add_bot_token(&token, &workspace, "U0BOT");
        slack.add_channel(ESCALATIONS, "escalations", ChannelSpec::member());
        slack.add_channel(PAYMENTS, "payments", ChannelSpec::member());

        let mut settings = Settings::default();
        let ns = format!("test-{id}");
        settings.amqp.exchange = format!("{ns}.alerts");
        settings.amqp.queue = format!("{ns}.router");
        settings.amqp.dead_letter_exchange = format!("{ns}.dlx");
        settings.amqp.dead_letter_queue = format!("{ns}.dead");
        settings.amqp.retry_queue_prefix = format!("{ns}.retry");
        settings.redis.key_prefix = ns.clone();
        settings.slack.api_url = slack.api_url();
        settings.email.smtp_url = smtp.url().into();
        settings.slack.default_workspace = Some(workspace.clone());
        settings.slack.request_timeout = Duration::from_secs(2);
        settings.slack.retry_base_delay = Duration::from_millis(20);
        settings.slack.retry_budget = Duration::from_secs(1);
        // Functional tests are not about rate limits (tests/rate_limits.rs is).
        settings.slack.channel_rate_per_second = 1000.0;
        settings.slack.channel_burst = 1000;
        settings.slack.workspace_rate_per_minute = 1_000_000;
        settings.slack.workspace_burst = 1000;
        settings.rules.path = rules_path;
        settings.http.listen = "127.0.0.1:0".parse().unwrap();
        settings.delivery.retry_delays = vec![Duration::from_millis(500); 3];
        settings.delivery.drain_timeout = Duration::from_secs(10);

        let connection = broker::connect(settings.amqp.url.expose(), "alert-router tests")
            .await
            .unwrap();
        let publisher = Publisher::open(&connection).await.unwrap();
        topology(&settings)
            .declare(publisher.channel())
            .await
            .unwrap();
        let redis = redis_connection(&settings).await;
        let declared_retry_queues = topology(&settings)
            .retry_queues
            .into_iter()
            .map(|q| q.name)
            .collect();

        let env = TestEnv {
            id,
            settings,
            slack,
            smtp,
            workspace,
            token,
            dir,
            connection,
            publisher,
            declared_retry_queues,
            redis,
        };
        env.store_token(&env.workspace.clone(), &env.token.clone())
            .await;
        env
    }

    /// Writes a workspace token record the way an OAuth install flow would.
    pub async fn store_token(&self, workspace: &str, token: &str) {
        let record = json!({"access_token": token, "refresh_token": null, "expires_at": null,
                            "team_id": workspace, "bot_user_id": "U0BOT"});
        self.store_token_record(workspace, &record).await;
    }

    /// A valid event in this test's workspace, with `extra` fields merged in.
    pub fn event(&self, id: &str, extra: Value) -> Value {
        let mut event = json!({"id": id, "type": "escalation.triggered", "severity": "high",
                               "title": format!("Test event {id}"), "workspace": self.workspace});
        if let (Some(base), Value::Object(extra)) = (event.as_object_mut(), extra) {
            base.extend(extra);
        }
        event
    }

    /// An event of the payments team's `checkout-down` incident: one
    /// incident for every call, as its `dedup_key` says.
    pub fn checkout_incident(&self, id: &str, extra: Value) -> Value {
        let mut event = self.event(
            id,
            json!({"dedup_key": "checkout-down", "labels": {"team": "payments"}}),
        );
        if let (Some(base), Value::Object(extra)) = (event.as_object_mut(), extra) {
            base.extend(extra);
        }
        event
    }

    /// Publishes raw bytes to the test's exchange, persistent, with confirms.
    pub async fn publish_raw(&self, routing_key: &str, body: &[u8]) {
        self.try_publish_raw(routing_key, body).await.unwrap();
    }

    /// [`TestEnv::publish_raw`], or why the broker did not confirm it.
    pub async fn try_publish_raw(
        &self,
        routing_key: &str,
        body: &[u8],
    ) -> Result<(), broker::BrokerError> {
        self.publisher
            .publish(
                &self.settings.amqp.exchange,
                routing_key,
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
    }

    pub async fn publish(&self, event: &Value) {
        let key = event["type"].as_str().unwrap_or("unknown").to_string();
        self.publish_raw(&key, event.to_string().as_bytes()).await;
    }

    /// Messages ready in a queue (not counting unacked ones).
    pub async fn ready_count(&self, queue: &str) -> u32 {
        self.try_ready_count(queue).await.unwrap()
    }

    /// [`TestEnv::ready_count`], or the broker's error (a restart closed the connection).
    pub async fn try_ready_count(&self, queue: &str) -> Result<u32, lapin::Error> {
        let channel = self.connection.create_channel().await?;
        let q = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let _ = channel.close(200, "".into()).await;
        Ok(q.message_count())
    }

    /// Starts consuming the dead-letter queue; take messages with `next`.
    pub async fn dead_letters(&self) -> DeadLetters {
        let channel = self.connection.create_channel().await.unwrap();
        let consumer = channel
            .basic_consume(
                self.settings.amqp.dead_letter_queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        DeadLetters { consumer, channel }
    }

    /// Runs a worker in this process until the handle is stopped.
    pub fn spawn_worker(&self) -> InProcessWorker {
        let shutdown = CancellationToken::new();
        let secrets = Secrets {
            slack_bot_token: None,
            ..Secrets::default()
        };
        let task = tokio::spawn(alert_router::worker::run(
            self.settings.clone(),
            secrets,
            shutdown.clone(),
        ));
        InProcessWorker { shutdown, task }
    }

    /// The settings as `ALERT_ROUTER__…` variables, for worker processes.
    pub fn env_vars(&self) -> Vec<(String, String)> {
        worker_env::worker_env(&self.settings)
    }

    /// `alert-router dlq ARGS --json`, which must succeed, as JSON.
    pub async fn dlq_json(&self, args: &[&str]) -> serde_json::Value {
        let output = self
            .command()
            .arg("dlq")
            .args(args)
            .arg("--json")
            .output()
            .await
            .unwrap();
        assert!(
            output.status.success(),
            "dlq {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    }

    /// The `alert-router` binary with this test's settings in its environment.
    pub fn command(&self) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_alert-router"));
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .envs(self.env_vars())
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    /// Starts `alert-router run` as a child process.
    pub fn spawn_worker_process(&self) -> tokio::process::Child {
        self.command()
            .arg("run")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap()
    }

    /// Starts `alert-router run` as a child process whose log lines the test can wait for.
    pub fn start_worker_process(&self) -> WorkerProcess {
        self.start_worker_process_with(&[])
    }

    /// [`TestEnv::start_worker_process`] with more variables in its environment
    /// (secrets, settings `worker_env` does not carry).
    pub fn start_worker_process_with(&self, vars: &[(&str, &str)]) -> WorkerProcess {
        self.start_worker_process_args(&["run"], vars)
    }

    /// [`TestEnv::start_worker_process_with`] with other arguments than `run`
    /// (e.g. `run --dry-run`).
    pub fn start_worker_process_args(&self, args: &[&str], vars: &[(&str, &str)]) -> WorkerProcess {
        let mut child = self
            .command()
            .envs(vars.iter().copied())
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (lines_tx, lines) = tokio::sync::watch::channel(Vec::<String>::new());
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt;
            let mut reader = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                eprintln!("[worker] {line}");
                lines_tx.send_modify(|all| all.push(line));
            }
        });
        WorkerProcess { child, lines }
    }

    /// Replaces the rules file the way editors do: write a new file, rename it over.
    pub fn replace_rules(&self, yaml: &str) {
        let tmp = self.dir.path().join(".rules.yaml.tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, self.rules_path()).unwrap();
    }

    pub fn rules_path(&self) -> PathBuf {
        self.settings.rules.path.clone()
    }

    /// Deletes the test's queues, exchanges and Redis keys.
    pub async fn cleanup(self) {
        let channel = self.connection.create_channel().await.unwrap();
        let topology = topology(&self.settings);
        let mut queues = vec![topology.queue.clone(), topology.dead_letter_queue.clone()];
        queues.extend(topology.retry_queues.iter().map(|q| q.name.clone()));
        queues.extend(self.declared_retry_queues.iter().cloned());
        queues.sort();
        queues.dedup();
        for queue in queues {
            let _ = channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for exchange in [&topology.exchange, &topology.dead_letter_exchange] {
            let _ = channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
        let mut redis = self.redis.clone();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.settings.redis.key_prefix))
            .query_async(&mut redis)
            .await
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<(), _> = redis::cmd("DEL").arg(keys).query_async(&mut redis).await;
        }
        let _ = self.connection.close(200, "".into()).await;
        self.slack.shutdown();
        self.smtp.shutdown();
    }
}

/// A connection to the test's Redis. The client's default 500 ms response
/// timeout is shorter than the worker's own (2 s) and trips on a loaded
/// machine, failing a test in its setup; tests wait on events with [`WAIT`].
pub async fn redis_connection(settings: &Settings) -> redis::aio::MultiplexedConnection {
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(WAIT));
    redis::Client::open(settings.redis.url.expose())
        .unwrap()
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap()
}

pub fn topology(settings: &Settings) -> Topology {
    Topology::from_settings(&settings.amqp, &settings.delivery.retry_delays)
}

/// A worker child process and its log lines.
pub struct WorkerProcess {
    pub child: tokio::process::Child,
    lines: tokio::sync::watch::Receiver<Vec<String>>,
}

impl WorkerProcess {
    /// Waits for the `n`-th log line (counting from 1) that contains `needle`.
    pub async fn wait_for_log(&mut self, needle: &str, n: usize) -> String {
        let found = tokio::time::timeout(
            WAIT,
            self.lines
                .wait_for(|lines| lines.iter().filter(|l| l.contains(needle)).count() >= n),
        )
        .await;
        match found {
            Ok(Ok(lines)) => lines
                .iter()
                .filter(|l| l.contains(needle))
                .nth(n - 1)
                .cloned()
                .unwrap_or_default(),
            _ => panic!("the worker did not log {needle:?} (x{n}) in time"),
        }
    }

    /// Every log line so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.lines.borrow().clone()
    }

    /// How many log lines so far contain `needle` (without copying them).
    pub fn log_count(&self, needle: &str) -> usize {
        self.lines
            .borrow()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("worker is running");
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// SIGTERM, then the exit status.
    pub async fn stop(mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("worker did not stop in time")
            .unwrap()
    }
}

/// A worker task in the test process.
pub struct InProcessWorker {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), alert_router::worker::WorkerError>>,
}

impl InProcessWorker {
    /// Asks for a graceful stop and waits for the drain.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// A consumer on the dead-letter queue.
pub struct DeadLetters {
    consumer: lapin::Consumer,
    channel: lapin::Channel,
}

/// A dead-lettered message as the test sees it.
pub struct DeadLetter {
    pub body: Vec<u8>,
    pub properties: BasicProperties,
}

impl DeadLetter {
    pub fn header(&self, name: &str) -> Option<String> {
        broker::header_str(&self.properties, name)
    }
    pub fn attempts(&self) -> Option<u64> {
        broker::header_u64(&self.properties, broker::HEADER_ATTEMPTS)
    }
}

impl DeadLetters {
    /// Waits for the next dead letter without acking it: it goes back to the
    /// queue when this consumer is dropped.
    /// Closes the consumer's channel: the broker takes back what it holds unacked.
    pub async fn close(self) {
        let _ = self.channel.close(200, "done".into()).await;
    }

    pub async fn next_unacked(&mut self) -> lapin::message::Delivery {
        tokio::time::timeout(WAIT, self.consumer.next())
            .await
            .expect("no dead letter arrived in time")
            .expect("dead-letter consumer ended")
            .expect("dead-letter consumer failed")
    }

    /// The next dead letter, acked; panics after [`WAIT`].
    pub async fn next(&mut self) -> DeadLetter {
        let delivery = tokio::time::timeout(WAIT, self.consumer.next())
            .await
            .expect("no dead letter arrived in time")
            .expect("dead-letter consumer ended")
            .expect("dead-letter consumer failed");
        delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .unwrap();
        DeadLetter {
            body: delivery.data,
            properties: delivery.properties,
        }
    }
}

impl TestEnv {
    /// Writes a whole token record (e.g. with a refresh token and an expiry).
    pub async fn store_token_record(&self, workspace: &str, record: &Value) {
        let key = format!("{}:slack:token:{workspace}", self.settings.redis.key_prefix);
        let mut redis = self.redis.clone();
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(record.to_string())
            .query_async(&mut redis)
            .await
            .unwrap();
    }

    /// Reads the workspace's token record back.
    pub async fn token_record(&self, workspace: &str) -> Value {
        let key = format!("{}:slack:token:{workspace}", self.settings.redis.key_prefix);
        let mut redis = self.redis.clone();
        let raw: String = redis::cmd("GET")
            .arg(key)
            .query_async(&mut redis)
            .await
            .unwrap();
        serde_json::from_str(&raw).unwrap()
    }

    /// Runs a worker in this process with the given secrets.
    pub fn spawn_worker_with(&self, secrets: Secrets) -> InProcessWorker {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(alert_router::worker::run(
            self.settings.clone(),
            secrets,
            shutdown.clone(),
        ));
        InProcessWorker { shutdown, task }
    }

    /// Opens the test's broker connection and publisher again, after a
    /// broker restart closed them (queue counts and `cleanup` need them).
    pub async fn reconnect_broker(&mut self) {
        self.try_reconnect_broker().await.unwrap();
    }

    /// [`TestEnv::reconnect_broker`], or why the broker cannot be reached yet.
    pub async fn try_reconnect_broker(&mut self) -> Result<(), broker::BrokerError> {
        self.connection =
            broker::connect(self.settings.amqp.url.expose(), "alert-router tests").await?;
        self.publisher = Publisher::open(&self.connection).await?;
        Ok(())
    }

    /// Moves this test to the Redis at `url` (e.g. one the test runs itself):
    /// the workers' setting, the test's connection and the workspace token.
    pub async fn use_redis(&mut self, url: &str) {
        self.delete_token(&self.workspace).await;
        self.settings.redis.url = url.into();
        self.redis = redis_connection(&self.settings).await;
        self.store_token(&self.workspace, &self.token).await;
    }

    /// Deletes the workspace's token record, as if the app were never installed.
    pub async fn delete_token(&self, workspace: &str) {
        let key = format!("{}:slack:token:{workspace}", self.settings.redis.key_prefix);
        let mut redis = self.redis.clone();
        let _: () = redis::cmd("DEL")
            .arg(key)
            .query_async(&mut redis)
            .await
            .unwrap();
    }
}

/// The event id a post carries in its message metadata.
pub fn event_id(post: &fake_slack::RecordedPost) -> String {
    post.metadata.as_ref().unwrap()["event_payload"]["event_id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// How many posts each event id got: "each once" is every count being 1.
pub fn posts_per_event(
    posts: &[fake_slack::RecordedPost],
) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for post in posts {
        *counts.entry(event_id(post)).or_insert(0) += 1;
    }
    counts
}

/// Runs `rabbitmqctl -q ARGS` and returns its output; a failure fails the test.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let output = std::process::Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

impl TestEnv {
    /// Nothing waits in the work, retry or dead-letter queues. With the
    /// workers stopped, an unacked delivery would be ready again, so this
    /// also says nothing was left unsettled.
    pub async fn assert_nothing_pending(&self) {
        let topology = topology(&self.settings);
        assert_eq!(self.ready_count(&topology.queue).await, 0, "work queue");
        assert_eq!(
            self.ready_count(&topology.dead_letter_queue).await,
            0,
            "dead letters"
        );
        for queue in &topology.retry_queues {
            assert_eq!(self.ready_count(&queue.name).await, 0, "{}", queue.name);
        }
    }

    /// Polls until `queue` has no ready messages, failing after `within`.
    pub async fn wait_until_drained(&self, queue: &str, within: Duration) {
        self.wait_until_ready(queue, 0, within).await;
    }

    /// Polls until `queue` has exactly `count` ready messages, failing after `within`.
    pub async fn wait_until_ready(&self, queue: &str, count: u32, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let ready = self.ready_count(queue).await;
            if ready == count {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{queue} has {ready} ready messages, not {count}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The RabbitMQ application, stopped for as long as this lives: the guard
/// starts it again when dropped, so a failing assertion does not leave the
/// broker down for the rest of the suite.
pub struct BrokerStopped {
    started: bool,
}

impl BrokerStopped {
    /// Stops the application (every connection is closed; the node stays up).
    pub fn stop() -> BrokerStopped {
        // Made before the stop, so even a stop that half-failed is undone.
        let stopped = BrokerStopped { started: false };
        rabbitmqctl(&["stop_app"]);
        stopped
    }

    /// Starts the application again and waits until it serves.
    pub fn start(mut self) {
        self.started = true;
        rabbitmqctl(&["start_app"]);
        rabbitmqctl(&["await_startup"]);
    }
}

impl Drop for BrokerStopped {
    fn drop(&mut self) {
        if !self.started {
            for args in [["-q", "start_app"], ["-q", "await_startup"]] {
                let _ = std::process::Command::new("rabbitmqctl")
                    .args(args)
                    .status();
            }
        }
    }
}
