//! Memory of the `alert-router` binary while it drains a backlog, for several backlog sizes and workspace counts.
//!
//! ```text
//! cargo bench --bench backlog [-- --events 10000,100000 --workspaces 1,10000]
//! ```
//!
//! For each size N (default 10,000 and 100,000; `BENCH_BACKLOG` or
//! `--events` take a comma-separated list) and each workspace count W
//! (default 1 and 10,000; `--workspaces`): N events, event i naming
//! workspace i mod W (each with its token record in Redis), are published
//! into a fresh, isolated topology, then the release `alert-router run`
//! binary is started as a child process against a fast fake Slack with
//! Slack's rate limits lifted. Its resident memory is sampled from `/proc`
//! every 20 ms until the fake has N posts. Prefetch bounds what the worker
//! holds and its caches are bounded, so the peak should grow neither with N
//! nor with W: that is the claim this bench checks.
//!
//! Everything it creates (exchanges, queues, Redis keys) is deleted at the end.

// Shared with the pipeline bench, which uses all of it.
#[allow(dead_code)]
#[path = "support/fast_slack.rs"]
mod fast_slack;
#[path = "support/namespace.rs"]
mod namespace;
#[path = "../tests/support/worker_env.rs"]
mod worker_env;
#[path = "support/worker_process.rs"]
mod worker_process;

use std::time::{Duration, Instant};

use alert_router::broker::{self, Topology};
use alert_router::config::Settings;
use anyhow::{Context as _, bail};
use fast_slack::FastSlack;
use serde_json::json;

struct Sample {
    events: usize,
    workspaces: usize,
    publish: Duration,
    drain: Duration,
    /// Resident set when the first post arrived (connected, rules loaded).
    rss_first_post: u64,
    /// Resident set when half the backlog was posted.
    rss_half: u64,
    /// Highest resident set seen while draining.
    rss_peak: u64,
    rss_end: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let sizes = list_arg("events", "BENCH_BACKLOG", "10000,100000")?;
    let workspace_counts = list_arg("workspaces", "BENCH_WORKSPACES", "1,10000")?;
    let mut samples = Vec::new();
    for &workspaces in &workspace_counts {
        for &events in &sizes {
            eprintln!("[backlog] {events} events naming {workspaces} workspaces");
            samples.push(run(events, workspaces).await?);
        }
    }
    println!();
    println!(
        "alert-router backlog bench: the release binary draining a backlog, fast fake Slack, prefetch {}",
        Settings::default().amqp.prefetch
    );
    println!(
        "machine: {} CPUs",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!(
        "| {:>8} | {:>10} | {:>9} | {:>9} | {:>8} | {:>18} | {:>15} | {:>11} | {:>10} |",
        "backlog",
        "workspaces",
        "publish s",
        "drain s",
        "events/s",
        "RSS at 1st post MB",
        "RSS at half MB",
        "RSS peak MB",
        "RSS end MB"
    );
    println!(
        "|{:->10}|{:->12}|{:->11}|{:->11}|{:->10}|{:->20}|{:->17}|{:->13}|{:->12}|",
        "", "", "", "", "", "", "", "", ""
    );
    for s in &samples {
        println!(
            "| {:>8} | {:>10} | {:>9.2} | {:>9.2} | {:>8.0} | {:>18.1} | {:>15.1} | {:>11.1} | {:>10.1} |",
            s.events,
            s.workspaces,
            s.publish.as_secs_f64(),
            s.drain.as_secs_f64(),
            s.events as f64 / s.drain.as_secs_f64(),
            mb(s.rss_first_post),
            mb(s.rss_half),
            mb(s.rss_peak),
            mb(s.rss_end)
        );
    }
    let smallest = samples.iter().min_by_key(|s| (s.events, s.workspaces));
    let largest = samples.iter().max_by_key(|s| (s.events, s.workspaces));
    if let (Some(small), Some(large)) = (smallest, largest)
        && samples.len() > 1
    {
        println!();
        println!(
            "peak RSS with {} events naming {} workspaces is {:.2}x the peak with {} events naming {}",
            large.events,
            large.workspaces,
            large.rss_peak as f64 / small.rss_peak.max(1) as f64,
            small.events,
            small.workspaces,
        );
    }
    Ok(())
}

/// A comma-separated list of positive numbers from `--name`, else the
/// environment variable `env`, else `default`.
fn list_arg(name: &str, env: &str, default: &str) -> anyhow::Result<Vec<usize>> {
    let flag = format!("--{name}");
    let mut list = std::env::var(env).ok();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if let Some(value) = arg.strip_prefix(&format!("{flag}=")) {
            list = Some(value.to_string());
        } else if arg == flag {
            list = Some(
                args.next()
                    .with_context(|| format!("{flag} needs a value"))?,
            );
        }
    }
    let numbers: Vec<usize> = list
        .as_deref()
        .unwrap_or(default)
        .split(',')
        .map(|n| n.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("{flag} takes numbers separated by commas"))?;
    if numbers.is_empty() || numbers.contains(&0) {
        bail!("{flag} must be positive");
    }
    Ok(numbers)
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// `VmRSS` and `VmHWM` of a process, in bytes.
fn rss(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

async fn run(events: usize, workspaces: usize) -> anyhow::Result<Sample> {
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
    let ns = format!("backlog-{id}");
    let workspace_ids: Vec<String> = (0..workspaces)
        .map(|w| format!("T{}W{w}", id.to_uppercase()))
        .collect();
    let token = format!("xoxb-bench-{id}");
    let dir = tempfile::tempdir()?;
    let rules_path = dir.path().join("rules.yaml");
    std::fs::write(
        &rules_path,
        "version: 1\ndefaults:\n  slack_channel: \"C0BACKLOG\"\nunmatched: default\nrules: []\n",
    )?;
    let slack = FastSlack::start(&token).await?;

    let mut settings = Settings::default();
    settings.amqp.exchange = format!("{ns}.alerts");
    settings.amqp.queue = format!("{ns}.router");
    settings.amqp.dead_letter_exchange = format!("{ns}.dlx");
    settings.amqp.dead_letter_queue = format!("{ns}.dead");
    settings.amqp.retry_queue_prefix = format!("{ns}.retry");
    settings.redis.key_prefix = ns.clone();
    let topology = Topology::from_settings(&settings.amqp, &settings.delivery.retry_delays);

    let connection =
        broker::connect(settings.amqp.url.expose(), "alert-router backlog bench").await?;
    let mut redis = redis::Client::open(settings.redis.url.expose())?
        .get_multiplexed_async_connection()
        .await?;
    // The fake checks one token; the worker keys everything by workspace.
    for chunk in workspace_ids.chunks(1000) {
        let mut pipe = redis::pipe();
        for workspace in chunk {
            let record = json!({"access_token": token, "refresh_token": null, "expires_at": null,
                                "team_id": workspace, "bot_user_id": "U0BOT"});
            pipe.cmd("SET")
                .arg(format!("{ns}:slack:token:{workspace}"))
                .arg(record.to_string())
                .ignore();
        }
        let _: () = pipe.query_async(&mut redis).await?;
    }

    let channel = namespace::confirm_channel(&connection).await?;
    topology.declare(&channel).await?;
    let bodies: Vec<Vec<u8>> = (0..events)
        .map(|i| {
            json!({
                "id": format!("{ns}-{i}"), "type": "escalation.triggered", "severity": "high",
                "title": format!("Checkout error rate above 5 % ({i})"),
                "summary": "p99 error rate of the checkout service is 7.3 % over the last 5 minutes.",
                "ticket": {"number": format!("TCK-{i}"), "url": format!("https://tickets.example.com/TCK-{i}")},
                "labels": {"team": "checkout", "env": "prod"},
                "workspace": workspace_ids[i % workspaces],
            })
            .to_string()
            .into_bytes()
        })
        .collect();
    let publish = namespace::publish_all(&channel, &settings.amqp.exchange, &bodies).await?;
    drop(bodies);

    settings.slack.api_url = slack.api_url();
    settings.slack.default_workspace = workspace_ids.first().cloned();
    settings.rules.path = rules_path.clone();
    settings.http.listen = "127.0.0.1:0".parse()?;
    settings.log.level = "warn".into();
    // A fast Slack without rate limits: measure the worker, not Slack's pace.
    settings.slack.channel_rate_per_second = 1_000_000.0;
    settings.slack.channel_burst = 1_000_000;
    settings.slack.workspace_rate_per_minute = u32::MAX;
    settings.slack.workspace_burst = 1_000_000;
    let mut child = worker_process::command(&settings, std::process::Stdio::inherit()).spawn()?;
    let pid = child.id().context("the worker exited at once")?;

    let started = Instant::now();
    let deadline = started + Duration::from_secs(60) + Duration::from_millis(events as u64 * 5);
    let mut rss_first_post = 0;
    let mut rss_half = 0;
    let mut rss_peak = 0;
    loop {
        let posts = slack.post_count();
        if let Some((now, high_water)) = rss(pid) {
            rss_peak = rss_peak.max(high_water).max(now);
            if posts > 0 && rss_first_post == 0 {
                rss_first_post = now;
            }
            if posts >= events / 2 && rss_half == 0 {
                rss_half = now;
            }
        }
        if posts >= events {
            break;
        }
        if let Some(status) = child.try_wait()? {
            bail!("the worker exited with {status} after {posts} of {events} posts");
        }
        if Instant::now() > deadline {
            bail!("the worker posted {posts} of {events} in time");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drain = started.elapsed();
    let rss_end = rss(pid).map_or(0, |(now, _)| now);
    worker_process::stop(child).await?;

    let _ = channel.close(200, "".into()).await;
    namespace::delete(&connection, &mut redis, &settings).await?;
    let _ = connection.close(200, "".into()).await;
    Ok(Sample {
        events,
        workspaces,
        publish,
        drain,
        rss_first_post,
        rss_half,
        rss_peak,
        rss_end,
    })
}
