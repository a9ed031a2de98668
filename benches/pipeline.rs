//! End-to-end throughput and latency of alert-router on the real RabbitMQ and Redis.
//!
//! Two modes: the unlimited one (the default), the pipeline against the bare
//! broker loop with Slack's rate limits lifted; and the rate-limited one
//! (`--rate-limited`, below), draining a burst under Slack's limits.
//!
//! # Unlimited mode
//!
//! ```text
//! cargo bench --bench pipeline [-- --events N --rounds R --rate R --seconds S --channels K --prefetch P --log]
//! ```
//!
//! (or `BENCH_EVENTS` (default 20,000), `BENCH_RATE`, `BENCH_SECONDS`,
//! `BENCH_CHANNELS` (default 1), `BENCH_PREFETCH`, `BENCH_ROUNDS`,
//! `BENCH_LOG=1`). Phases 1 and 2 take turns for R rounds (default 5); the
//! verdict is the median of the rounds' worker/baseline ratios, so a slow
//! spell of a shared machine, which hits one round, does not decide the
//! comparison.
//! One run measures, side by side on the same broker:
//!
//! 1. **baseline**: a bare lapin loop on a fresh quorum work queue (a whole
//!    [`Topology`] with unique names): publish N persistent messages with
//!    confirms awaited concurrently, then consume with manual acks and the
//!    worker's prefetch; then (phase 1b) **the contract's floor** ([`floor`]): the least
//!    any worker keeping this project's delivery contract does per event
//!    (decode, render the same message, claim in Redis, post, record done,
//!    batched acks), in this process, on another fresh topology: how much
//!    of the gap to the baseline is the contract's and how much the worker's;
//! 2. **alert-router end to end**: N events pre-published into a fresh
//!    isolated topology, then the release `alert-router run` binary started
//!    as a child process (as a deployment runs it) against a fast,
//!    non-rate-limited fake Slack ([`FastSlack`]: real HTTP, the token checked,
//!    nothing else parsed) with a valid token in Redis and Slack's rate limits
//!    lifted; time until it has N posts;
//! 3. **latency**: with that worker idle, events published at a steady rate,
//!    publish → post arrival, p50/p90/p99/max; then, right after, the broker
//!    alone at the same rate (publish → a bare consumer), to tell the
//!    broker's share;
//! 4. **the test suite's fake Slack**: phase 2 again against the full fake
//!    the tests use (it records and checks every post), for comparison.
//!
//! Each row also shows the CPU time per message of this process (worker,
//! fake and bench together), RabbitMQ and Redis, read from `/proc`.
//! `BENCH_IDLE_SECS` (default 0.5) is the pause before phase 3;
//! `BENCH_LATENCY_DUMP=FILE` writes `index latency_ms` per event of phase 3.
//!
//! # Rate-limited mode
//!
//! ```text
//! cargo bench --bench pipeline -- --rate-limited [--events N --channels K --workspaces W --workers 1,3 --prefetch P --worker-logs DIR]
//! ```
//!
//! (or `BENCH_RATE_LIMITED=1`, `BENCH_EVENTS`, `BENCH_CHANNELS`,
//! `BENCH_WORKSPACES`, `BENCH_WORKERS`, `BENCH_PREFETCH`, `BENCH_WORKER_LOGS`).
//! The test suite's full fake Slack enforces Slack's limit per channel, one
//! post a second after a burst of three, and answers HTTP 429 with
//! `Retry-After` beyond it; the limit per workspace is raised to 6,000 a
//! minute (burst 100) in the fake and in the worker's settings alike, and the
//! worker's channel limit stays at its defaults (1 a second, burst 3), as do
//! its delay queues for deferred events (5 s, 30 s, …). N
//! events (default 1,500) go to K channels (default 120; event i to channel
//! i mod K, by the same rules as above) in W workspaces (default 3; channel
//! k in workspace k mod W, each with its own token record in Redis). For
//! each entry of `--workers` (default 1 and 3), in a namespace and a fake of
//! its own, that many release `alert-router run` processes start and
//! consume, then all N events are published at once (confirms awaited after
//! the last publish). Each run reports:
//!
//! - **drain**: the first publish → the last event's post;
//! - **ideal**: the busiest channel's (M − 3) / 1 s, what Slack's limit
//!   allows at best (the target is a drain within 1.2× of it);
//! - events/s (events posted / drain), publish → post latency p50 and p99 per event;
//! - the fake's 429s (the target is none), and the broker deferrals ("rate
//!   limited; deferred") and 429s ("slack rate-limited it", a channel or a method) counted
//!   in the workers' info logs (JSON; kept in `--worker-logs DIR`, else
//!   deleted);
//! - events posted, posts in all (a duplicate shows), the events each worker
//!   delivered, the slowest channel, what is left in the work queue and the
//!   dead-letter queue.
//!
//! Everything it creates (exchanges, queues, Redis keys) is deleted at the end.

// The same allocator as the alert-router binary, so the worker runs here as it does in production.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../tests/support/fake_slack.rs"]
mod fake_slack;
#[path = "support/fast_slack.rs"]
mod fast_slack;
#[path = "support/namespace.rs"]
mod namespace;
use namespace::{check_confirm, confirm_channel, publish_all, publish_one};
#[path = "../tests/support/worker_env.rs"]
mod worker_env;
#[path = "support/worker_process.rs"]
mod worker_process;

use std::time::{Duration, Instant};

use alert_router::broker::{self, Topology};
use alert_router::config::{DeliverySettings, LogFormat, Settings, SlackSettings};
use alert_router::deliver::slack::message::{self, IncidentRef, RenderContext};
use alert_router::event::{DEFAULT_MAX_BODY_BYTES, Event};
use anyhow::{Context as _, bail};
use fake_slack::{ChannelSpec, FakeSlack, RecordedPost};
use fast_slack::FastSlack;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use serde_json::json;

/// The rules name the channels `C0BENCH0`, `C0BENCH1`, …
const CHANNEL_PREFIX: &str = "C0BENCH";

struct Options {
    events: usize,
    rate: f64,
    seconds: f64,
    channels: usize,
    /// Prefetch of the worker and of the baseline consumer alike.
    prefetch: Option<u16>,
    /// Baseline and end-to-end runs, taking turns; the medians are reported.
    rounds: usize,
    log: bool,
    /// The rate-limited mode instead of the unlimited one.
    rate_limited: bool,
    /// Rate-limited mode: workspaces the channels are spread over.
    workspaces: usize,
    /// Rate-limited mode: one run per entry, with that many worker processes.
    workers: Vec<usize>,
    /// Rate-limited mode: keep the workers' info logs in this directory.
    worker_logs: Option<std::path::PathBuf>,
}

impl Options {
    fn parse() -> anyhow::Result<Options> {
        fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
            std::env::var(name).ok().and_then(|v| v.parse().ok())
        }
        fn list(value: &str) -> anyhow::Result<Vec<usize>> {
            value
                .split(',')
                .map(|v| {
                    v.trim()
                        .parse()
                        .with_context(|| format!("bad number {v:?}"))
                })
                .collect()
        }
        // The two modes have their own defaults for these.
        let mut events: Option<usize> = env("BENCH_EVENTS");
        let mut channels: Option<usize> = env("BENCH_CHANNELS");
        let mut options = Options {
            events: 0,
            rate: env("BENCH_RATE").unwrap_or(1_000.0),
            seconds: env("BENCH_SECONDS").unwrap_or(5.0),
            channels: 0,
            prefetch: env("BENCH_PREFETCH"),
            rounds: env("BENCH_ROUNDS").unwrap_or(5),
            log: std::env::var("BENCH_LOG").is_ok_and(|v| v == "1"),
            rate_limited: std::env::var("BENCH_RATE_LIMITED").is_ok_and(|v| v == "1"),
            workspaces: env("BENCH_WORKSPACES").unwrap_or(3),
            workers: list(&std::env::var("BENCH_WORKERS").unwrap_or_else(|_| "1,3".into()))?,
            worker_logs: std::env::var_os("BENCH_WORKER_LOGS").map(Into::into),
        };
        // `cargo bench` passes `--bench`; anything unknown is ignored likewise.
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (arg.clone(), None),
            };
            let mut value = || -> anyhow::Result<String> {
                inline
                    .clone()
                    .or_else(|| args.next())
                    .with_context(|| format!("{name} needs a value"))
            };
            match name.as_str() {
                "--events" => events = Some(value()?.parse()?),
                "--rate" => options.rate = value()?.parse()?,
                "--seconds" => options.seconds = value()?.parse()?,
                "--channels" => channels = Some(value()?.parse()?),
                "--prefetch" => options.prefetch = Some(value()?.parse()?),
                "--rounds" => options.rounds = value()?.parse()?,
                "--log" => options.log = true,
                "--rate-limited" => options.rate_limited = true,
                "--workspaces" => options.workspaces = value()?.parse()?,
                "--workers" => options.workers = list(&value()?)?,
                "--worker-logs" => options.worker_logs = Some(value()?.into()),
                _ => {}
            }
        }
        (options.events, options.channels) = if options.rate_limited {
            (events.unwrap_or(1_500), channels.unwrap_or(120))
        } else {
            (events.unwrap_or(20_000), channels.unwrap_or(1))
        };
        if options.events == 0
            || options.channels == 0
            || options.rate <= 0.0
            || options.rounds == 0
            || options.workspaces == 0
            || options.workers.is_empty()
            || options.workers.contains(&0)
        {
            bail!(
                "--events, --channels, --rate, --rounds, --workspaces and --workers must be positive"
            );
        }
        Ok(options)
    }
}

/// One isolated namespace: settings with unique names, its rules file.
struct Namespace {
    settings: Settings,
    workspace: String,
    token: String,
    _dir: tempfile::TempDir,
}

impl Namespace {
    fn new(tag: &str, rules: &str, slack_api_url: &str) -> anyhow::Result<Namespace> {
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let dir = tempfile::tempdir()?;
        let rules_path = dir.path().join("rules.yaml");
        std::fs::write(&rules_path, rules)?;
        let ns = format!("bench-{tag}-{id}");
        let mut settings = Settings::default();
        settings.amqp.exchange = format!("{ns}.alerts");
        settings.amqp.queue = format!("{ns}.router");
        settings.amqp.dead_letter_exchange = format!("{ns}.dlx");
        settings.amqp.dead_letter_queue = format!("{ns}.dead");
        settings.amqp.retry_queue_prefix = format!("{ns}.retry");
        settings.redis.key_prefix = ns;
        settings.slack.api_url = slack_api_url.to_string();
        let workspace = format!("T{}", id.to_uppercase());
        settings.slack.default_workspace = Some(workspace.clone());
        settings.rules.path = rules_path;
        settings.http.listen = "127.0.0.1:0".parse()?;
        settings.delivery.retry_delays = vec![Duration::from_secs(1); 3];
        settings.delivery.drain_timeout = Duration::from_secs(30);
        // The fake Slack here is "fast and not rate-limited": measure the
        // pipeline, not Slack's one-post-a-second channel limit.
        settings.slack.channel_rate_per_second = 1_000_000.0;
        settings.slack.channel_burst = 1_000_000;
        settings.slack.workspace_rate_per_minute = u32::MAX;
        settings.slack.workspace_burst = 1_000_000;
        Ok(Namespace {
            settings,
            workspace,
            token: format!("xoxb-bench-{id}"),
            _dir: dir,
        })
    }

    fn topology(&self) -> Topology {
        Topology::from_settings(&self.settings.amqp, &self.settings.delivery.retry_delays)
    }

    /// `count` workspaces with their bot tokens: the namespace's own, then others like it.
    fn workspaces(&self, count: usize) -> Vec<(String, String)> {
        (0..count)
            .map(|w| match w {
                0 => (self.workspace.clone(), self.token.clone()),
                _ => (
                    format!("{}W{w}", self.workspace),
                    format!("{}-w{w}", self.token),
                ),
            })
            .collect()
    }
}

/// Rules routing every event to one of `channels` channels by its `team` label.
fn rules(channels: usize) -> String {
    let mut yaml = format!(
        "version: 1\ndefaults:\n  slack_channel: \"{CHANNEL_PREFIX}0\"\nunmatched: default\nrules:\n"
    );
    // A rule that never matches, as real rules files have: it is evaluated for every event.
    yaml.push_str(
        "  - name: silence-staging\n    matchers:\n      - env=~\"staging|dev\"\n    notify: []\n",
    );
    for k in 1..channels {
        yaml.push_str(&format!(
            "  - name: team-{k}\n    matchers:\n      - type=~\"escalation\\\\..*\"\n      - team=\"t{k}\"\n    notify:\n      - slack_channel: {CHANNEL_PREFIX}{k}\n"
        ));
    }
    yaml
}

/// A valid event of realistic size (≈ 450 bytes).
fn event_body(id: &str, workspace: &str, seq: usize, channels: usize) -> Vec<u8> {
    json!({
        "id": id,
        "type": "escalation.triggered",
        "severity": "high",
        "title": format!("Checkout error rate above 5 % ({id})"),
        "workspace": workspace,
        "source": "bench",
        "occurred_at": "2025-01-01T00:00:00Z",
        "summary": "p99 error rate of the checkout service is 7.3 % over the last 5 minutes.",
        // The ticket (the incident key) comes from the event id, so every
        // round's events are new incidents, not thread replies to the last round's.
        "ticket": {"number": format!("TCK-{id}"), "form": "Incident report",
                   "url": format!("https://tickets.example.com/TCK-{id}")},
        "assignee": {"name": "Dana Lee", "email": "dana@example.com"},
        "level": 2,
        "labels": {"team": format!("t{}", seq % channels), "env": "prod"},
    })
    .to_string()
    .into_bytes()
}

struct Baseline {
    publish: Duration,
    consume: Duration,
    consume_cpu: Cpu,
}

/// A consumer on a fresh topology filled with `bodies`, timed from its start.
struct Consuming {
    publish: Duration,
    channel: Channel,
    consumer_channel: Channel,
    tag: &'static str,
    cpu: Cpu,
    started: Instant,
}

impl Consuming {
    /// Declares `ns`'s topology, publishes `bodies` with confirms, then
    /// starts consuming with the worker's prefetch.
    async fn start(
        connection: &Connection,
        ns: &Namespace,
        bodies: &[Vec<u8>],
        tag: &'static str,
    ) -> anyhow::Result<(Consuming, lapin::Consumer)> {
        let channel = confirm_channel(connection).await?;
        ns.topology().declare(&channel).await?;
        let publish = publish_all(&channel, &ns.settings.amqp.exchange, bodies).await?;
        let consumer_channel = connection.create_channel().await?;
        consumer_channel
            .basic_qos(ns.settings.amqp.prefetch, BasicQosOptions::default())
            .await?;
        let cpu = Cpu::now();
        let started = Instant::now();
        let deliveries = consumer_channel
            .basic_consume(
                ns.settings.amqp.queue.as_str().into(),
                tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let consuming = Consuming {
            publish,
            channel,
            consumer_channel,
            tag,
            cpu,
            started,
        };
        Ok((consuming, deliveries))
    }

    /// Stops the clock and the consumer once every message is acked.
    async fn finished(self) -> anyhow::Result<Baseline> {
        let consume = self.started.elapsed();
        let consume_cpu = Cpu::now().since(self.cpu);
        self.consumer_channel
            .basic_cancel(self.tag.into(), BasicCancelOptions::default())
            .await?;
        let _ = self.consumer_channel.close(200, "".into()).await;
        let _ = self.channel.close(200, "".into()).await;
        Ok(Baseline {
            publish: self.publish,
            consume,
            consume_cpu,
        })
    }
}

/// Phase 1: bare lapin publish with confirms, then consume + ack with the worker's prefetch.
async fn baseline(
    connection: &Connection,
    ns: &Namespace,
    bodies: &[Vec<u8>],
) -> anyhow::Result<Baseline> {
    let (consuming, mut deliveries) =
        Consuming::start(connection, ns, bodies, "bench-baseline").await?;
    for _ in 0..bodies.len() {
        let delivery = tokio::time::timeout(Duration::from_secs(30), deliveries.next())
            .await
            .context("baseline consumer stalled")?
            .context("baseline consumer cancelled")??;
        delivery.acker.ack(BasicAckOptions::default()).await?;
    }
    consuming.finished().await
}

/// What any worker that keeps this project's delivery contract does for an
/// event at the least, with nothing else: decode it and render its message
/// (the product's own `Event::decode` and `message::render`, so the post
/// and Slack's echo of it are the worker's size), claim it in Redis (`SET
/// NX PX`: no duplicate post across replicas), post it to the fast fake
/// Slack and read the answer, record it done in Redis, and ack in batches
/// as the worker does. No rules, no incident record, no rate limit. It runs
/// in this process (on a current-thread runtime, as the worker does),
/// concurrently up to the prefetch: what the contract's
/// own hops (a broker delivery, two Redis round trips, one HTTP round trip)
/// cost against the bare loop, and so how much of the gap is the worker's.
async fn floor(
    connection: &Connection,
    ns: &Namespace,
    slack: &FastSlack,
    bodies: &[Vec<u8>],
) -> anyhow::Result<Baseline> {
    #[derive(serde::Deserialize)]
    struct Answer {
        ok: bool,
    }
    // Its own connection, so that its driver runs on this runtime.
    let redis = redis::Client::open(ns.settings.redis.url.expose())?
        .get_multiplexed_async_connection()
        .await?;
    let http = reqwest::Client::new();
    let post_url = format!("{}/chat.postMessage", slack.api_url());
    let authorization = format!("Bearer {}", ns.token);
    let prefix = &ns.settings.redis.key_prefix;
    let channel_id = format!("{CHANNEL_PREFIX}0");
    let target = format!("slack_channel:{channel_id}");
    let prefetch = ns.settings.amqp.prefetch;
    let (consuming, deliveries) = Consuming::start(connection, ns, bodies, "bench-floor").await?;
    let handled = deliveries
        .take(bodies.len())
        .map(|delivery| {
            let (http, post_url, authorization) = (&http, &post_url, &authorization);
            let (channel_id, target) = (&channel_id, &target);
            let mut redis = redis.clone();
            async move {
                let delivery = delivery?;
                let event = Event::decode(&delivery.data, DEFAULT_MAX_BODY_BYTES)?;
                let key = format!("{prefix}:floor:{}", event.id);
                let claimed: Option<String> = redis::cmd("SET")
                    .arg(&key)
                    .arg("claimed")
                    .arg("NX")
                    .arg("PX")
                    .arg(60_000)
                    .query_async(&mut redis)
                    .await?;
                anyhow::ensure!(claimed.is_some(), "{} claimed twice", event.id);
                let context = RenderContext {
                    rule: Some("team-0"),
                    rerouted_from: None,
                    plain_text: false,
                    without_metadata: false,
                    target,
                    incident: Some(IncidentRef {
                        workspace: event.workspace.as_deref().unwrap_or_default(),
                        key: &event.id,
                        // The worker's buttons name when their incident began.
                        since_ms: Some(1_764_000_000_123),
                    }),
                    status: None,
                    escalation: None,
                    emailed_note: None,
                };
                let mut message = message::render(&event, &context);
                message.channel = Some(channel_id);
                let body = serde_json::to_vec(&message)?;
                let answer = http
                    .post(post_url)
                    .header("authorization", authorization)
                    .header("content-type", "application/json; charset=utf-8")
                    .body(body)
                    .send()
                    .await?
                    .bytes()
                    .await?;
                let answer: Answer = serde_json::from_slice(&answer)?;
                anyhow::ensure!(answer.ok, "the fast Slack refused a post");
                let () = redis::cmd("SET")
                    .arg(&key)
                    .arg("done")
                    .arg("PX")
                    .arg(86_400_000)
                    .query_async(&mut redis)
                    .await?;
                anyhow::Ok(delivery.delivery_tag)
            }
        })
        // In order, as the worker's acks go: everything up to a tag at once.
        .buffered(usize::from(prefetch));
    tokio::pin!(handled);
    let batch = usize::from(prefetch / 4).max(1);
    let mut done = 0;
    while let Some(tag) = tokio::time::timeout(Duration::from_secs(30), handled.next())
        .await
        .context("floor consumer stalled")?
    {
        let tag = tag?;
        done += 1;
        if done % batch == 0 || done == bodies.len() {
            consuming
                .consumer_channel
                .basic_ack(tag, BasicAckOptions { multiple: true })
                .await?;
        }
    }
    anyhow::ensure!(done == bodies.len(), "the floor consumer stopped at {done}");
    consuming.finished().await
}

/// A fake Slack with the workspaces' tokens and the bench channels.
fn prepare_slack(slack: &FakeSlack, workspaces: &[(String, String)], channels: usize) {
    for (workspace, token) in workspaces {
        slack.add_bot_token(token, workspace, "U0BOT");
    }
    for k in 0..channels {
        slack.add_channel(
            &format!("{CHANNEL_PREFIX}{k}"),
            &format!("bench-{k}"),
            ChannelSpec::member(),
        );
    }
}

/// The token record of `workspace` in the namespace's Redis keys.
async fn store_token(
    redis: &mut redis::aio::MultiplexedConnection,
    ns: &Namespace,
    (workspace, token): (&str, &str),
) -> anyhow::Result<()> {
    let record = json!({"access_token": token, "refresh_token": null, "expires_at": null,
                        "team_id": workspace, "bot_user_id": "U0BOT"});
    let key = format!("{}:slack:token:{workspace}", ns.settings.redis.key_prefix);
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg(record.to_string())
        .query_async(redis)
        .await?;
    Ok(())
}

/// The release `alert-router` binary, run as a deployment runs it: its own
/// process and runtime, configured through its environment.
struct Worker {
    child: tokio::process::Child,
    pid: u32,
}

impl Worker {
    fn spawn(settings: &Settings) -> anyhow::Result<Worker> {
        // `--log`: what a deployment pays, every info line as JSON (to /dev/null).
        let log = if settings.log.level == "warn" {
            std::process::Stdio::inherit()
        } else {
            std::process::Stdio::null()
        };
        Worker::spawn_logging_to(settings, log)
    }

    fn spawn_logging_to(
        settings: &Settings,
        log: impl Into<std::process::Stdio>,
    ) -> anyhow::Result<Worker> {
        let child = worker_process::command(settings, log.into()).spawn()?;
        let pid = child.id().context("the worker exited at once")?;
        Ok(Worker { child, pid })
    }

    /// CPU time the worker process has used so far.
    fn cpu(&self) -> Duration {
        proc_cpu(&self.pid.to_string())
    }

    async fn stop(self) -> anyhow::Result<()> {
        worker_process::stop(self.child).await
    }
}

struct EndToEnd {
    /// Worker start → N-th post.
    total: Duration,
    /// First post → N-th post.
    steady: Duration,
    /// Worker start → first post (connect, declare, first round trip).
    first: Duration,
    distinct_ids: usize,
    /// CPU from worker start to the N-th post.
    cpu: Cpu,
}

/// N events waiting in the queue, then the worker starts; time to N posts.
async fn end_to_end(
    slack: SlackUnderTest<'_>,
    ns: &Namespace,
    bodies: &[Vec<u8>],
    earlier_posts: usize,
) -> anyhow::Result<(Worker, EndToEnd)> {
    let cpu = Cpu::now();
    let started = Instant::now();
    let worker = Worker::spawn(&ns.settings)?;
    let timeout = Duration::from_secs(120) + Duration::from_millis(bodies.len() as u64 * 10);
    let mut posts = slack
        .wait_for_posts(earlier_posts + bodies.len(), timeout)
        .await?;
    let cpu = Cpu {
        worker: worker.cpu(),
        ..Cpu::now().since(cpu)
    };
    let recorded = posts.len();
    posts.drain(..earlier_posts.min(recorded));
    let first = posts.iter().map(|p| p.0).min().context("no posts")?;
    let last = posts.iter().map(|p| p.0).max().context("no posts")?;
    let distinct_ids = posts
        .iter()
        .map(|p| p.1.as_str())
        .collect::<std::collections::HashSet<_>>()
        .len();
    Ok((
        worker,
        EndToEnd {
            total: last.duration_since(started),
            steady: last.duration_since(first),
            first: first.duration_since(started),
            distinct_ids,
            cpu,
        },
    ))
}

struct Latency {
    sent: usize,
    publish_span: Duration,
    /// Sorted.
    samples: Vec<Duration>,
}

impl Latency {
    fn percentile(&self, p: f64) -> Duration {
        if self.samples.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * self.samples.len() as f64).ceil() as usize;
        self.samples[rank.clamp(1, self.samples.len()) - 1]
    }
}

/// Publishes `bodies` at `rate` per second; returns each publish time and the span.
async fn paced_publish(
    channel: &Channel,
    exchange: &str,
    bodies: &[Vec<u8>],
    rate: f64,
) -> anyhow::Result<(Vec<Instant>, Duration)> {
    let mut sent_at = Vec::with_capacity(bodies.len());
    let mut confirms = Vec::with_capacity(bodies.len());
    let start = tokio::time::Instant::now();
    for (i, body) in bodies.iter().enumerate() {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        if due > tokio::time::Instant::now() {
            tokio::time::sleep_until(due).await;
        }
        sent_at.push(Instant::now());
        confirms.push(publish_one(channel, exchange, body).await?);
    }
    let span = match (sent_at.first(), sent_at.last()) {
        (Some(first), Some(last)) => last.duration_since(*first),
        _ => Duration::ZERO,
    };
    for confirm in confirms {
        check_confirm(confirm.await?)?;
    }
    Ok((sent_at, span))
}

/// Phase 3b: the broker alone at the latency phase's rate: publish -> a bare consumer receives
/// (FIFO: the k-th delivery is the k-th publish), on the baseline's quorum queue.
async fn broker_latency(
    connection: &Connection,
    ns: &Namespace,
    options: &Options,
) -> anyhow::Result<Latency> {
    let count = (options.rate * options.seconds).round().max(1.0) as usize;
    let bodies: Vec<Vec<u8>> = (0..count)
        .map(|i| event_body(&format!("blat-{i}"), &ns.workspace, i, options.channels))
        .collect();
    let consumer_channel = connection.create_channel().await?;
    consumer_channel
        .basic_qos(ns.settings.amqp.prefetch, BasicQosOptions::default())
        .await?;
    let mut deliveries = consumer_channel
        .basic_consume(
            ns.settings.amqp.queue.as_str().into(),
            "bench-broker-latency".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let receiver = tokio::spawn(async move {
        let mut received = Vec::with_capacity(count);
        while received.len() < count {
            let delivery = tokio::time::timeout(Duration::from_secs(60), deliveries.next())
                .await
                .context("broker latency consumer stalled")?
                .context("broker latency consumer cancelled")??;
            received.push(Instant::now());
            delivery.acker.ack(BasicAckOptions::default()).await?;
        }
        Ok::<_, anyhow::Error>(received)
    });
    let channel = confirm_channel(connection).await?;
    let (sent_at, publish_span) =
        paced_publish(&channel, &ns.settings.amqp.exchange, &bodies, options.rate).await?;
    let received = receiver.await??;
    let mut samples: Vec<Duration> = received
        .iter()
        .zip(&sent_at)
        .map(|(r, s)| r.saturating_duration_since(*s))
        .collect();
    samples.sort();
    let _ = consumer_channel.close(200, "".into()).await;
    let _ = channel.close(200, "".into()).await;
    Ok(Latency {
        sent: count,
        publish_span,
        samples,
    })
}

/// Phase 3: with the worker idle, publish at `rate` for `seconds`; publish → post latency.
async fn latency(
    connection: &Connection,
    slack: SlackUnderTest<'_>,
    ns: &Namespace,
    options: &Options,
    recorded: usize,
) -> anyhow::Result<Latency> {
    let count = (options.rate * options.seconds).round().max(1.0) as usize;
    let bodies: Vec<Vec<u8>> = (0..count)
        .map(|i| event_body(&format!("lat-{i}"), &ns.workspace, i, options.channels))
        .collect();
    let channel = confirm_channel(connection).await?;
    let (sent_at, publish_span) =
        paced_publish(&channel, &ns.settings.amqp.exchange, &bodies, options.rate).await?;
    let posts = slack
        .wait_for_posts(recorded + count, Duration::from_secs(60))
        .await?;
    let indexed: Vec<(usize, Duration)> = posts
        .iter()
        .filter_map(|(received_at, id)| {
            let i: usize = id.strip_prefix("lat-")?.parse().ok()?;
            Some((i, received_at.saturating_duration_since(*sent_at.get(i)?)))
        })
        .collect();
    if let Ok(path) = std::env::var("BENCH_LATENCY_DUMP") {
        // `index latency_ms`, in publish order, to see when the slow ones happen.
        let mut sorted = indexed.clone();
        sorted.sort();
        let lines: Vec<String> = sorted
            .iter()
            .map(|(i, d)| format!("{i} {:.3}", d.as_secs_f64() * 1000.0))
            .collect();
        std::fs::write(path, lines.join("\n"))?;
    }
    let mut samples: Vec<Duration> = indexed.into_iter().map(|(_, d)| d).collect();
    samples.sort();
    let _ = channel.close(200, "".into()).await;
    Ok(Latency {
        sent: count,
        publish_span,
        samples,
    })
}

/// CPU time (user + system) of the worker, this process, the broker and Redis, from `/proc`.
#[derive(Clone, Copy, Default)]
struct Cpu {
    /// The worker process (zero where there is none).
    worker: Duration,
    /// This process: the bench loop, the fake Slack.
    bench: Duration,
    broker: Duration,
    redis: Duration,
}

impl Cpu {
    fn now() -> Cpu {
        Cpu {
            worker: Duration::ZERO,
            bench: proc_cpu("self"),
            broker: pids_named("beam.smp").iter().map(|p| proc_cpu(p)).sum(),
            redis: pids_named("redis-server").iter().map(|p| proc_cpu(p)).sum(),
        }
    }

    fn since(self, earlier: Cpu) -> Cpu {
        Cpu {
            worker: self.worker.saturating_sub(earlier.worker),
            bench: self.bench.saturating_sub(earlier.bench),
            broker: self.broker.saturating_sub(earlier.broker),
            redis: self.redis.saturating_sub(earlier.redis),
        }
    }
}

/// utime + stime of `/proc/<pid>/stat`, in clock ticks of 10 ms (Linux `USER_HZ`).
fn proc_cpu(pid: &str) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: u64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 10)
}

fn pids_named(name: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|pid| pid.bytes().all(|b| b.is_ascii_digit()))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name)
        })
        .collect()
}

/// Who answers the worker's posts in a phase: the fast stub or the test suite's full fake.
#[derive(Clone, Copy)]
enum SlackUnderTest<'a> {
    Fast(&'a FastSlack),
    Full(&'a FakeSlack),
}

impl SlackUnderTest<'_> {
    /// Waits until `n` posts arrived in all; returns each one's arrival time and event id.
    async fn wait_for_posts(
        self,
        n: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<(Instant, String)>> {
        match self {
            SlackUnderTest::Fast(slack) => slack.wait_for_posts(n, timeout).await,
            SlackUnderTest::Full(slack) => {
                let posts = slack
                    .wait_for_posts(n, timeout)
                    .await
                    .map_err(|e| anyhow::anyhow!("{}", e.lines().next().unwrap_or_default()))?;
                Ok(arrivals(&posts))
            }
        }
    }
}

/// Each post's arrival time and event id (from its metadata), as the full fake recorded them.
fn arrivals(posts: &[RecordedPost]) -> Vec<(Instant, String)> {
    posts
        .iter()
        .map(|post| {
            let id = post
                .metadata
                .as_ref()
                .and_then(|m| m.pointer("/event_payload/event_id"))
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default();
            (post.received_at, id.to_string())
        })
        .collect()
}

/// Messages ready in a queue (not counting unacked ones).
async fn ready_count(connection: &Connection, queue: &str) -> anyhow::Result<u32> {
    Ok(queue_state(connection, queue).await?.message_count())
}

/// A queue's ready messages and consumers, by a passive declare.
async fn queue_state(connection: &Connection, queue: &str) -> anyhow::Result<lapin::Queue> {
    let channel = connection.create_channel().await?;
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
    Ok(q)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(f64::MIN_POSITIVE)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "MET" } else { "NOT MET" }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = Options::parse()?;
    if options.rate_limited {
        return rate_limited(&options).await;
    }
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load_before = loadavg();

    let rules = rules(options.channels);
    let mut base = Namespace::new("base", &rules, "http://127.0.0.1:9/api")?;
    let mut fast_ns = Namespace::new("fast", &rules, "http://127.0.0.1:9/api")?;
    let mut floor_ns = Namespace::new("floor", &rules, "http://127.0.0.1:9/api")?;
    let fast = FastSlack::start(&fast_ns.token).await?;
    fast_ns.settings.slack.api_url = fast.api_url();
    // The floor posts as the fast Slack's one bot.
    floor_ns.token = fast_ns.token.clone();
    let full = FakeSlack::start().await;
    let mut full_ns = Namespace::new("full", &rules, &full.api_url())?;
    for ns in [&mut base, &mut fast_ns, &mut floor_ns, &mut full_ns] {
        if let Some(prefetch) = options.prefetch {
            ns.settings.amqp.prefetch = prefetch;
        }
        (ns.settings.log.format, ns.settings.log.level) = if options.log {
            (LogFormat::Json, "info".into())
        } else {
            (LogFormat::Text, "warn".into())
        };
    }
    prepare_slack(&full, &full_ns.workspaces(1), options.channels);

    let amqp_url = base.settings.amqp.url.expose().to_string();
    let connection = broker::connect(&amqp_url, "alert-router bench").await?;
    let mut redis = redis::Client::open(base.settings.redis.url.expose())?
        .get_multiplexed_async_connection()
        .await?;

    let result = run(
        &options,
        &connection,
        &mut redis,
        &base,
        &floor_ns,
        (&fast_ns, &fast),
        (&full_ns, &full),
    )
    .await;

    let mut cleaned = Ok(());
    for ns in [&base, &fast_ns, &floor_ns, &full_ns] {
        if let Err(e) = namespace::delete(&connection, &mut redis, &ns.settings).await {
            cleaned = Err(e);
        }
    }
    full.shutdown();
    let _ = connection.close(200, "".into()).await;
    let report = result?;
    cleaned.context("cleanup")?;

    let n = options.events;
    let base_consume = rate(n, report.baseline.consume);
    let e2e = &report.fast;
    let e2e_rate = rate(n, e2e.total);
    let e2e_steady = rate(n.saturating_sub(1), e2e.steady);
    let median = |mut values: Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    // Each round pairs a baseline with the worker run right after it, under
    // the same machine conditions: the median of those ratios is the verdict.
    let ratio = median(report.round_rates.iter().map(|(b, e, ..)| e / b).collect());
    let lat = &report.latency;
    let p99 = lat.percentile(99.0);
    println!();
    println!(
        "alert-router pipeline bench: {n} events, prefetch {}, {} channel(s), logging {}",
        fast_ns.settings.amqp.prefetch,
        options.channels,
        if options.log { "json→sink" } else { "off" }
    );
    println!(
        "machine: {cpus} CPUs; load average {load_before} (start), {} (end)",
        loadavg()
    );
    println!();
    println!(
        "| {:<50} | {:>6} | {:>7} | {:>7} | {:>32} |",
        "phase", "msgs", "seconds", "msgs/s", "CPU us/msg worker/bench/mq/redis"
    );
    println!("|{:-<52}|{:->8}|{:->9}|{:->9}|{:->34}|", "", "", "", "", "");
    let row = |name: &str, n: usize, d: Duration, cpu: Option<Cpu>| {
        let per = |c: Duration| c.as_secs_f64() * 1e6 / n.max(1) as f64;
        let cpu = cpu.map_or(String::new(), |c| {
            format!(
                "{:.0} / {:.0} / {:.0} / {:.0}",
                per(c.worker),
                per(c.bench),
                per(c.broker),
                per(c.redis)
            )
        });
        println!(
            "| {:<50} | {:>6} | {:>7.3} | {:>7.0} | {:>32} |",
            name,
            n,
            d.as_secs_f64(),
            rate(n, d),
            cpu
        );
    };
    row(
        "baseline: publish, confirms (concurrent)",
        n,
        report.baseline.publish,
        None,
    );
    row(
        "baseline: consume + ack (bare lapin)",
        n,
        report.baseline.consume,
        Some(report.baseline.consume_cpu),
    );
    row("alert-router: pre-publish", n, report.fast_publish, None);
    row(
        "alert-router: worker start -> N-th post (fast Slack)",
        n,
        e2e.total,
        Some(e2e.cpu),
    );
    row(
        "alert-router: 1st -> N-th post (fast Slack)",
        n.saturating_sub(1),
        e2e.steady,
        None,
    );
    row(
        "alert-router: start -> N-th post (test fake Slack)",
        n,
        report.full.total,
        Some(report.full.cpu),
    );
    println!();
    println!(
        "end to end: {:.1} % of the baseline consume+ack rate (median of the rounds' ratios); target >= 70 %: {}",
        ratio * 100.0,
        verdict(ratio >= 0.70)
    );
    println!(
        "            median rates: alert-router {e2e_rate:.0} events/s, baseline {base_consume:.0}/s"
    );
    let rounds: Vec<String> = report
        .round_rates
        .iter()
        .map(|(b, e, distinct, cpu)| {
            let short = if *distinct < n {
                format!(" ({} duplicate posts)", n - distinct)
            } else {
                String::new()
            };
            let per_msg = |d: Duration| d.as_micros() / n.max(1) as u128;
            format!(
                "{e:.0}/{b:.0} = {:.0} %{short} [{}/{}/{}]",
                e / b * 100.0,
                per_msg(cpu.worker),
                per_msg(cpu.broker),
                per_msg(cpu.redis)
            )
        })
        .collect();
    println!(
        "            rounds (alert-router/baseline) [worker/RabbitMQ/Redis CPU us per event]: {}",
        rounds.join(", ")
    );
    println!(
        "            steady state {e2e_steady:.0} events/s; first post {} after start; {} distinct event ids posted; {} left ready in the work queue, {} dead-lettered",
        ms(e2e.first),
        e2e.distinct_ids,
        report.left_ready,
        report.dead
    );
    // Each round's floor against that round's baseline and worker.
    let floor_of_base = median(
        report
            .floor_rates
            .iter()
            .zip(&report.round_rates)
            .map(|(f, (b, ..))| f / b)
            .collect(),
    );
    let worker_of_floor = median(
        report
            .floor_rates
            .iter()
            .zip(&report.round_rates)
            .map(|(f, (_, e, ..))| e / f)
            .collect(),
    );
    let per_msg = |d: Duration| d.as_micros() / n.max(1) as u128;
    let rounds: Vec<String> = report
        .floor_rates
        .iter()
        .zip(&report.floor_cpu)
        .map(|(f, cpu)| {
            format!(
                "{f:.0} [{}/{}/{}]",
                per_msg(cpu.bench),
                per_msg(cpu.broker),
                per_msg(cpu.redis)
            )
        })
        .collect();
    println!(
        "the contract's floor (decode, render, claim, post, done, acks; in this process): {:.1} % of the baseline; alert-router {:.1} % of the floor (medians of the rounds' ratios)",
        floor_of_base * 100.0,
        worker_of_floor * 100.0
    );
    println!(
        "            rounds (events/s) [floor/RabbitMQ/Redis CPU us per event]: {}",
        rounds.join(", ")
    );
    println!(
        "            against the test suite's full fake Slack (records and checks every post): {:.0} events/s = {:.1} % of baseline",
        rate(n, report.full.total),
        rate(n, report.full.total) / base_consume * 100.0
    );
    println!(
        "latency at {:.0} events/s for {:.1} s ({} events, published over {:.3} s = {:.0}/s), publish -> Slack post:",
        options.rate,
        options.seconds,
        lat.sent,
        lat.publish_span.as_secs_f64(),
        rate(lat.sent.saturating_sub(1), lat.publish_span)
    );
    println!(
        "            p50 {}  p90 {}  p99 {}  max {}  ({} samples); target p99 < 25 ms: {}",
        ms(lat.percentile(50.0)),
        ms(lat.percentile(90.0)),
        ms(p99),
        ms(lat.samples.last().copied().unwrap_or_default()),
        lat.samples.len(),
        verdict(p99 < Duration::from_millis(25) && lat.samples.len() == lat.sent)
    );
    let bl = &report.broker_latency;
    println!(
        "            broker alone (publish -> bare consumer, same rate, quorum queue): p50 {}  p90 {}  p99 {}  max {}",
        ms(bl.percentile(50.0)),
        ms(bl.percentile(90.0)),
        ms(bl.percentile(99.0)),
        ms(bl.samples.last().copied().unwrap_or_default()),
    );
    Ok(())
}

struct Report {
    /// Per round: baseline consume+ack rate, end-to-end rate, distinct events posted.
    /// Per round: baseline and worker rates, distinct events posted, the worker's CPU.
    round_rates: Vec<(f64, f64, usize, Cpu)>,
    /// Per round: the contract's floor's rate and the CPU it took.
    floor_rates: Vec<f64>,
    floor_cpu: Vec<Cpu>,
    baseline: Baseline,
    broker_latency: Latency,
    fast_publish: Duration,
    fast: EndToEnd,
    latency: Latency,
    left_ready: u32,
    dead: u32,
    full: EndToEnd,
}

async fn run(
    options: &Options,
    connection: &Connection,
    redis: &mut redis::aio::MultiplexedConnection,
    base: &Namespace,
    floor_ns: &Namespace,
    (fast_ns, fast): (&Namespace, &FastSlack),
    (full_ns, full): (&Namespace, &FakeSlack),
) -> anyhow::Result<Report> {
    let n = options.events;
    let bodies = |ns: &Namespace, tag: &str| -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| event_body(&format!("{tag}-{i}"), &ns.workspace, i, options.channels))
            .collect()
    };
    // Baseline and worker take turns, so a slow spell of the machine (other
    // tenants, the broker's own housekeeping) hits both; the medians count.
    let mut baselines = Vec::new();
    let mut floors = Vec::new();
    let mut rounds = Vec::new();
    let mut fast_publish = Duration::ZERO;
    let mut running = None;
    for round in 0..options.rounds {
        eprintln!(
            "[bench] round {}/{}: phase 1, baseline, {n} messages",
            round + 1,
            options.rounds
        );
        baselines.push(baseline(connection, base, &bodies(base, &format!("base{round}"))).await?);
        eprintln!(
            "[bench] round {}/{}: phase 1b, the contract's floor, {n} events",
            round + 1,
            options.rounds
        );
        let floor_bodies = bodies(floor_ns, &format!("floor{round}"));
        // On a current-thread runtime of its own, as the worker runs (the
        // fake Slack stays on this one).
        let floor_run = tokio::task::block_in_place(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(floor(connection, floor_ns, fast, &floor_bodies))
        });
        floors.push(floor_run?);
        eprintln!(
            "[bench] round {}/{}: phase 2, alert-router end to end, {n} events, fast Slack",
            round + 1,
            options.rounds
        );
        let fast_bodies = bodies(fast_ns, &format!("e2e{round}"));
        fast_publish = prepare_queue(connection, redis, fast_ns, &fast_bodies).await?;
        let earlier = fast.post_count();
        let (worker, result) =
            end_to_end(SlackUnderTest::Fast(fast), fast_ns, &fast_bodies, earlier).await?;
        if let Some(previous) = running.replace(worker) {
            previous.stop().await?;
        }
        // Stop each round's worker before the next baseline runs.
        if round + 1 < options.rounds
            && let Some(worker) = running.take()
        {
            worker.stop().await?;
        }
        rounds.push(result);
    }
    let worker = running.context("no rounds")?;
    let floor_rates = floors.iter().map(|f| rate(n, f.consume)).collect();
    let floor_cpu = floors.iter().map(|f| f.consume_cpu).collect();
    let round_rates = baselines
        .iter()
        .zip(&rounds)
        .map(|(b, r)| (rate(n, b.consume), rate(n, r.total), r.distinct_ids, r.cpu))
        .collect();
    let fast_result = median_round(&mut rounds);
    let baseline = median_baseline(&mut baselines);
    eprintln!(
        "[bench] phase 3: latency at {}/s for {} s",
        options.rate, options.seconds
    );
    // Let the last acks of phase 2 land so the worker is idle, and the
    // broker finish what a 20k burst leaves behind (BENCH_IDLE_SECS).
    let idle: f64 = std::env::var("BENCH_IDLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.5);
    tokio::time::sleep(Duration::from_secs_f64(idle)).await;
    // Counted now: the median round need not be the last one.
    let before = fast.post_count();
    let latency = latency(
        connection,
        SlackUnderTest::Fast(fast),
        fast_ns,
        options,
        before,
    )
    .await?;
    worker.stop().await?;
    // Right after, in the same state of the machine and the broker.
    eprintln!(
        "[bench] phase 3b: broker alone at {}/s for {} s",
        options.rate, options.seconds
    );
    let broker_latency = broker_latency(connection, base, options).await?;
    let left_ready = ready_count(connection, &fast_ns.settings.amqp.queue).await?;
    let dead = ready_count(connection, &fast_ns.settings.amqp.dead_letter_queue).await?;

    eprintln!("[bench] phase 4: alert-router end to end, {n} events, the test suite's fake Slack");
    let full_bodies = bodies(full_ns, "full");
    prepare_queue(connection, redis, full_ns, &full_bodies).await?;
    let (worker, full_result) =
        end_to_end(SlackUnderTest::Full(full), full_ns, &full_bodies, 0).await?;
    worker.stop().await?;

    Ok(Report {
        round_rates,
        floor_rates,
        floor_cpu,
        baseline,
        broker_latency,
        fast_publish,
        fast: fast_result,
        latency,
        left_ready,
        dead,
        full: full_result,
    })
}

/// The round with the median end-to-end time (the others are dropped).
fn median_round(rounds: &mut Vec<EndToEnd>) -> EndToEnd {
    rounds.sort_by_key(|r| r.total);
    let middle = rounds.len() / 2;
    rounds.swap_remove(middle)
}

/// The baseline round with the median consume time.
fn median_baseline(rounds: &mut Vec<Baseline>) -> Baseline {
    rounds.sort_by_key(|r| r.consume);
    let middle = rounds.len() / 2;
    rounds.swap_remove(middle)
}

/// Stores the namespace's token and fills its work queue; returns the publish time.
async fn prepare_queue(
    connection: &Connection,
    redis: &mut redis::aio::MultiplexedConnection,
    ns: &Namespace,
    bodies: &[Vec<u8>],
) -> anyhow::Result<Duration> {
    store_token(redis, ns, (&ns.workspace, &ns.token)).await?;
    let channel = confirm_channel(connection).await?;
    ns.topology().declare(&channel).await?;
    let took = publish_all(&channel, &ns.settings.amqp.exchange, bodies).await?;
    let _ = channel.close(200, "".into()).await;
    Ok(took)
}

// ---------------------------------------------------------------------------
// Rate-limited mode
// ---------------------------------------------------------------------------

/// Slack's limit per channel, as the rate-limited mode's fake enforces it:
/// one post a second…
const SLACK_CHANNEL_RATE: f64 = 1.0;
/// …after a burst of three.
const SLACK_CHANNEL_BURST: u32 = 3;
/// The limit per workspace, raised in the fake and in the worker's settings
/// alike, so that the channels' limit is the one that counts.
const WORKSPACE_RATE_PER_MINUTE: u32 = 6_000;
const WORKSPACE_BURST: u32 = 100;
/// The issue's target: drained within this multiple of the ideal, without a 429.
const DRAIN_TARGET: f64 = 1.2;

/// One run of the rate-limited mode.
struct RateRun {
    workers: usize,
    /// First publish → the last event's (first) post.
    drain: Duration,
    /// The busiest channel's (M − burst) / rate.
    ideal: Duration,
    /// Publish → first post, per event posted.
    latency: Latency,
    /// Distinct events posted, and posts in all.
    posted: usize,
    posts: usize,
    /// HTTP 429 answers of the fake, and on how many channels.
    too_many_requests: usize,
    channels_429: usize,
    /// Lines of the workers' info logs: broker deferrals ("rate limited;
    /// deferred") and the 429s they got ("slack rate-limited it", a channel or a method).
    deferrals: usize,
    logged_429s: usize,
    /// "delivered" lines of each worker's log.
    delivered: Vec<usize>,
    /// The channel whose last post came last, and when (after the first publish).
    slowest: (String, Duration),
    left_ready: u32,
    dead: u32,
}

impl RateRun {
    fn ratio(&self) -> f64 {
        self.drain.as_secs_f64() / self.ideal.as_secs_f64()
    }

    fn met(&self, events: usize) -> bool {
        self.ratio() <= DRAIN_TARGET
            && self.too_many_requests == 0
            && self.posted == events
            && self.posts == events
    }
}

/// `--rate-limited`: N events over K channels published at once, against the
/// full fake with Slack's limits; one run per entry of `--workers`.
async fn rate_limited(options: &Options) -> anyhow::Result<()> {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load_before = loadavg();
    let defaults = Settings::default();
    let connection = broker::connect(defaults.amqp.url.expose(), "alert-router bench").await?;
    let mut redis = redis::Client::open(defaults.redis.url.expose())?
        .get_multiplexed_async_connection()
        .await?;
    let rules = rules(options.channels);
    let mut runs = Vec::new();
    for &workers in &options.workers {
        eprintln!(
            "[bench] rate-limited: {} events over {} channels in {} workspaces, {workers} worker(s)",
            options.events, options.channels, options.workspaces
        );
        runs.push(rate_limited_run(options, &connection, &mut redis, &rules, workers).await?);
    }
    let _ = connection.close(200, "".into()).await;

    let n = options.events;
    println!();
    println!(
        "alert-router rate-limited bench: {n} events over {} channels in {} workspaces, published at once; prefetch {}",
        options.channels,
        options.workspaces,
        options.prefetch.unwrap_or(defaults.amqp.prefetch)
    );
    println!(
        "fake Slack: {SLACK_CHANNEL_RATE}/s per channel, burst {SLACK_CHANNEL_BURST}, HTTP 429 with Retry-After beyond; \
         {WORKSPACE_RATE_PER_MINUTE}/min per workspace, burst {WORKSPACE_BURST} (the worker's settings too)"
    );
    println!(
        "machine: {cpus} CPUs; load average {load_before} (start), {} (end)",
        loadavg()
    );
    println!();
    println!(
        "| workers | drain s | ideal s | drain/ideal | events/s | p50 s | p99 s | 429s | deferrals | target <= {DRAIN_TARGET}x, no 429 |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for run in &runs {
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} | {} | {} | {} |",
            run.workers,
            run.drain.as_secs_f64(),
            run.ideal.as_secs_f64(),
            run.ratio(),
            rate(run.posted, run.drain),
            run.latency.percentile(50.0).as_secs_f64(),
            run.latency.percentile(99.0).as_secs_f64(),
            run.too_many_requests,
            run.deferrals,
            verdict(run.met(n))
        );
    }
    println!();
    for run in &runs {
        println!(
            "{} worker(s): published in {}; {} of {n} events posted, {} posts in all; delivered per worker {}; \
             429s on {} channel(s), {} in the workers' logs; slowest channel {} (last post at {:.2} s); \
             {} left ready in the work queue, {} dead-lettered",
            run.workers,
            ms(run.latency.publish_span),
            run.posted,
            run.posts,
            run.delivered
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("/"),
            run.channels_429,
            run.logged_429s,
            run.slowest.0,
            run.slowest.1.as_secs_f64(),
            run.left_ready,
            run.dead
        );
    }
    Ok(())
}

/// One run with `workers` worker processes, in a namespace and a fake Slack of its own.
async fn rate_limited_run(
    options: &Options,
    connection: &Connection,
    redis: &mut redis::aio::MultiplexedConnection,
    rules: &str,
    workers: usize,
) -> anyhow::Result<RateRun> {
    let slack = FakeSlack::start().await;
    slack.set_channel_rate_limit(SLACK_CHANNEL_RATE, SLACK_CHANNEL_BURST);
    slack.set_workspace_rate_limit(f64::from(WORKSPACE_RATE_PER_MINUTE) / 60.0, WORKSPACE_BURST);
    let mut ns = Namespace::new(&format!("rate{workers}"), rules, &slack.api_url())?;
    let settings = &mut ns.settings;
    // The worker's channel limit at its defaults (Slack's); the workspace's raised as in the fake.
    let slack_defaults = SlackSettings::default();
    settings.slack.channel_rate_per_second = slack_defaults.channel_rate_per_second;
    settings.slack.channel_burst = slack_defaults.channel_burst;
    settings.slack.workspace_rate_per_minute = WORKSPACE_RATE_PER_MINUTE;
    settings.slack.workspace_burst = WORKSPACE_BURST;
    // A deferred event waits in the delay queues a deployment has.
    settings.delivery.retry_delays = DeliverySettings::default().retry_delays;
    if let Some(prefetch) = options.prefetch {
        settings.amqp.prefetch = prefetch;
    }
    // Info lines, to count the deferrals.
    (settings.log.format, settings.log.level) = (LogFormat::Json, "info".into());

    let result = rate_limited_measure(options, connection, redis, &slack, &ns, workers).await;
    let cleaned = namespace::delete(connection, redis, &ns.settings).await;
    slack.shutdown();
    let run = result?;
    cleaned.context("cleanup")?;
    Ok(run)
}

async fn rate_limited_measure(
    options: &Options,
    connection: &Connection,
    redis: &mut redis::aio::MultiplexedConnection,
    slack: &FakeSlack,
    ns: &Namespace,
    workers: usize,
) -> anyhow::Result<RateRun> {
    let (n, channels) = (options.events, options.channels);
    // Channel k is in workspace k mod W; event i goes to channel i mod K.
    let workspaces = ns.workspaces(options.workspaces);
    prepare_slack(slack, &workspaces, channels);
    for (workspace, token) in &workspaces {
        store_token(redis, ns, (workspace, token)).await?;
    }
    let channel = confirm_channel(connection).await?;
    ns.topology().declare(&channel).await?;

    let temp_logs = tempfile::tempdir()?;
    let log_dir = options.worker_logs.as_deref().unwrap_or(temp_logs.path());
    std::fs::create_dir_all(log_dir)?;
    let logs: Vec<std::path::PathBuf> = (1..=workers)
        .map(|k| log_dir.join(format!("{}-worker{k}.log", ns.settings.redis.key_prefix)))
        .collect();
    let mut running = Vec::new();
    for path in &logs {
        running.push(Worker::spawn_logging_to(
            &ns.settings,
            std::fs::File::create(path)?,
        )?);
    }
    // Every worker consumes before the first publish.
    let deadline = Instant::now() + Duration::from_secs(30);
    while queue_state(connection, &ns.settings.amqp.queue)
        .await?
        .consumer_count()
        < workers as u32
    {
        if Instant::now() > deadline {
            bail!("{workers} worker(s) not consuming after 30 s (their logs: --worker-logs)");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let bodies: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let workspace = &workspaces[i % channels % workspaces.len()].0;
            event_body(&format!("rl-{i}"), workspace, i, channels)
        })
        .collect();
    let busiest = (0..channels)
        .map(|k| (k..n).step_by(channels).count())
        .max()
        .unwrap_or(0);
    let ideal = Duration::from_secs_f64(
        busiest.saturating_sub(SLACK_CHANNEL_BURST as usize) as f64 / SLACK_CHANNEL_RATE,
    );
    let (sent_at, publish_span) =
        paced_publish(&channel, &ns.settings.amqp.exchange, &bodies, f64::INFINITY).await?;
    let _ = channel.close(200, "".into()).await;
    let timeout = ideal * 3 + Duration::from_secs(60);
    if let Err(e) = slack.wait_for_posts(n, timeout).await {
        // Report what did arrive.
        eprintln!("[bench] {}", e.lines().next().unwrap_or_default());
    }
    for worker in running {
        worker.stop().await?;
    }

    let posts = slack.posts();
    let started = sent_at.first().copied().context("nothing published")?;
    // Each event's first post.
    let mut first_posts: std::collections::HashMap<usize, Instant> = Default::default();
    for (at, id) in arrivals(&posts) {
        if let Some(i) = id.strip_prefix("rl-").and_then(|i| i.parse().ok()) {
            let first = first_posts.entry(i).or_insert(at);
            *first = (*first).min(at);
        }
    }
    let drain = first_posts
        .values()
        .max()
        .map_or(Duration::ZERO, |last| last.duration_since(started));
    let mut samples: Vec<Duration> = first_posts
        .iter()
        .filter_map(|(i, at)| Some(at.saturating_duration_since(*sent_at.get(*i)?)))
        .collect();
    samples.sort();
    let mut last_by_channel: std::collections::HashMap<&str, Instant> = Default::default();
    for post in &posts {
        let last = last_by_channel
            .entry(&post.channel_id)
            .or_insert(post.received_at);
        *last = (*last).max(post.received_at);
    }
    let slowest = last_by_channel
        .iter()
        .max_by_key(|(_, at)| **at)
        .map(|(c, at)| (c.to_string(), at.duration_since(started)))
        .unwrap_or_default();
    let refused: std::collections::HashSet<String> = slack
        .requests_for("chat.postMessage")
        .iter()
        .filter(|r| r.status == Some(429))
        .map(|r| r.params["channel"].to_string())
        .collect();
    // Per worker: its log's lines with this message.
    let count_lines = |message: &str| -> anyhow::Result<Vec<usize>> {
        let needle = format!("\"message\":\"{message}\"");
        logs.iter()
            .map(|path| Ok(std::fs::read_to_string(path)?.matches(&needle).count()))
            .collect()
    };
    Ok(RateRun {
        workers,
        drain,
        ideal,
        latency: Latency {
            sent: n,
            publish_span,
            samples,
        },
        posted: first_posts.len(),
        posts: posts.len(),
        too_many_requests: slack.rate_limited_count(),
        channels_429: refused.len(),
        deferrals: count_lines("rate limited; deferred")?.iter().sum(),
        logged_429s: count_lines("slack rate-limited it; pausing it for every replica")?
            .iter()
            .sum(),
        delivered: count_lines("delivered")?,
        slowest,
        left_ready: ready_count(connection, &ns.settings.amqp.queue).await?,
        dead: ready_count(connection, &ns.settings.amqp.dead_letter_queue).await?,
    })
}
