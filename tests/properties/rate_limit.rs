//! The shared rate limiter on the real Redis: three clients (three limiters
//! on their own connections, as three replicas) hammer one workspace with
//! interleavings proptest chooses, and in no window do the admissions exceed
//! rate × elapsed + burst, per channel and per workspace.
//!
//! The limiter decides on Redis's clock (`TIME` inside its script), so each
//! admission's moment is bracketed by `TIME` read just before and just after
//! the call, on the same millisecond scale the script uses: a window's
//! elapsed time is taken at its widest (first bracket's start to last
//! bracket's end), which can only loosen the bound by a round trip, never
//! make a correct limiter fail on a slow machine.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use alert_router::config::SlackSettings;
use alert_router::deliver::limit::RateLimiter;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use redis::aio::{ConnectionManager, MultiplexedConnection};
use tokio::runtime::Runtime;
use tokio::sync::Barrier;
use tokio::time::Instant;

const REDIS: &str = "redis://127.0.0.1:6379";
const WORKSPACE: &str = "T0PROPS";
/// How long the three clients keep asking, per case.
const HAMMERING: Duration = Duration::from_millis(300);
/// ... and at least this many times each.
const MIN_ATTEMPTS: usize = 12;

#[derive(Debug, Clone)]
struct Scenario {
    channel_rate_per_second: f64,
    channel_burst: u32,
    workspace_rate_per_minute: u32,
    workspace_burst: u32,
    /// The channel (0–2) each client posts to: shared, or not.
    channels: [usize; 3],
    /// Each client's pauses between attempts, in ms, repeated.
    gaps: [Vec<u64>; 3],
}

fn scenario() -> impl Strategy<Value = Scenario> {
    let gaps = || prop::collection::vec(0u64..=6, 1..=6);
    (
        20.0f64..=100.0,
        1u32..=5,
        1200u32..=9000,
        1u32..=8,
        [0usize..3, 0usize..3, 0usize..3],
        [gaps(), gaps(), gaps()],
    )
        .prop_map(
            |(
                channel_rate_per_second,
                channel_burst,
                workspace_rate_per_minute,
                workspace_burst,
                channels,
                gaps,
            )| Scenario {
                channel_rate_per_second,
                channel_burst,
                workspace_rate_per_minute,
                workspace_burst,
                channels,
                gaps,
            },
        )
}

/// A slot granted by Redis at some moment in `[before_ms, after_ms]`.
#[derive(Debug, Clone, Copy)]
struct Admission {
    before_ms: u64,
    after_ms: u64,
}

/// Redis's clock in whole milliseconds, as the limiter's script reads it.
async fn redis_ms(redis: &mut MultiplexedConnection) -> u64 {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(redis).await.unwrap();
    secs * 1000 + micros / 1000
}

/// What a client asks a slot of.
#[derive(Debug, Clone)]
enum Slot {
    /// `chat.postMessage` to a channel: its bucket and the workspace's.
    Post { channel: String },
    /// Another Web API method: the workspace's bucket for its tier.
    Method(&'static str),
}

/// One replica: asks for a slot, pauses as its schedule says, until `stop`.
async fn client(
    limiter: RateLimiter,
    mut clock: MultiplexedConnection,
    slot: Slot,
    gaps: Vec<u64>,
    start: std::sync::Arc<Barrier>,
) -> (Vec<Admission>, usize) {
    start.wait().await;
    let stop = Instant::now() + HAMMERING;
    let (mut admitted, mut refused) = (Vec::new(), 0);
    for (attempt, gap) in gaps.iter().cycle().enumerate() {
        // At least a few asks each, however slow the machine.
        if Instant::now() >= stop && attempt >= MIN_ATTEMPTS {
            break;
        }
        let before_ms = redis_ms(&mut clock).await;
        let wait = match &slot {
            Slot::Post { channel } => limiter.try_acquire(WORKSPACE, channel).await,
            Slot::Method(method) => limiter.try_acquire_method(WORKSPACE, method).await,
        }
        .unwrap();
        let after_ms = redis_ms(&mut clock).await;
        match wait {
            None => admitted.push(Admission {
                before_ms,
                after_ms,
            }),
            Some(_) => refused += 1,
        }
        // Pacing that shapes the interleaving, not a wait for anything.
        if *gap > 0 {
            tokio::time::sleep(Duration::from_millis(*gap)).await;
        } else {
            tokio::task::yield_now().await;
        }
    }
    (admitted, refused)
}

/// Checks every window that starts at one admission's bracket and ends at
/// another's: the admissions wholly inside it are at most
/// `elapsed_ms × per_ms + burst`. `None` when it holds, else the window.
fn first_overrun(admissions: &[Admission], per_ms: f64, burst: u32) -> Option<String> {
    for first in admissions {
        for last in admissions {
            if last.after_ms < first.before_ms {
                continue;
            }
            let elapsed_ms = last.after_ms - first.before_ms;
            let inside = admissions
                .iter()
                .filter(|a| a.before_ms >= first.before_ms && a.after_ms <= last.after_ms)
                .count();
            let bound = elapsed_ms as f64 * per_ms + f64::from(burst);
            if inside as f64 > bound {
                return Some(format!(
                    "{inside} admissions within {elapsed_ms} ms, bound {bound:.2}"
                ));
            }
        }
    }
    None
}

fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(3)
            .enable_all()
            .build()
            .unwrap()
    })
}

async fn delete_keys(prefix: &str) {
    let client = redis::Client::open(REDIS).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut redis)
        .await
        .unwrap();
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(keys)
            .query_async(&mut redis)
            .await
            .unwrap();
    }
}

/// Runs one scenario: the admissions per channel (or, with `method`, all in
/// the first), how many were refused, and the limiter's own interval between
/// two posts to a channel.
async fn hammer(
    scenario: &Scenario,
    method: Option<&'static str>,
) -> (Vec<Vec<Admission>>, usize, Duration) {
    let prefix = format!("test-props-rate-{}", uuid::Uuid::new_v4().simple());
    let settings = SlackSettings {
        channel_rate_per_second: scenario.channel_rate_per_second,
        channel_burst: scenario.channel_burst,
        workspace_rate_per_minute: scenario.workspace_rate_per_minute,
        workspace_burst: scenario.workspace_burst,
        ..SlackSettings::default()
    };
    let client_of_redis = redis::Client::open(REDIS).unwrap();
    let start = std::sync::Arc::new(Barrier::new(3));
    let mut tasks = Vec::new();
    let mut interval = Duration::ZERO;
    for (channel, gaps) in scenario.channels.iter().zip(&scenario.gaps) {
        let manager = ConnectionManager::new(client_of_redis.clone())
            .await
            .unwrap();
        let limiter = RateLimiter::new(manager, &prefix, &settings);
        interval = limiter.channel_interval();
        let clock = client_of_redis
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        tasks.push(tokio::spawn(client(
            limiter,
            clock,
            match method {
                Some(method) => Slot::Method(method),
                None => Slot::Post {
                    channel: format!("C{channel}"),
                },
            },
            gaps.clone(),
            start.clone(),
        )));
    }
    let mut per_channel = vec![Vec::new(); 3];
    let mut refused = 0;
    let channels = match method {
        Some(_) => [0; 3],
        None => scenario.channels,
    };
    for (task, channel) in tasks.into_iter().zip(channels) {
        let (admitted, refusals) = task.await.unwrap();
        per_channel[channel].extend(admitted);
        refused += refusals;
    }
    delete_keys(&prefix).await;
    (per_channel, refused, interval)
}

#[test]
fn three_clients_never_get_more_than_rate_times_time_plus_burst() {
    let cases_with_refusals = AtomicUsize::new(0);
    let config = Config {
        cases: 14,
        source_file: Some(file!()),
        ..Config::default()
    };
    let mut runner = TestRunner::new(config.clone());
    let result = runner.run(&scenario(), |scenario| {
        let (per_channel, refused, interval) = runtime().block_on(hammer(&scenario, None));
        let all: Vec<Admission> = per_channel.iter().flatten().copied().collect();
        prop_assert!(!all.is_empty(), "nothing was admitted");
        if refused > 0 {
            cases_with_refusals.fetch_add(1, Ordering::Relaxed);
        }
        let configured_per_ms = scenario.channel_rate_per_second / 1000.0;
        let own_per_ms = 1.0 / interval.as_millis() as f64;
        for (channel, admitted) in per_channel.iter().enumerate() {
            // As configured, and as the limiter runs (a little under it).
            for (per_ms, which) in [(configured_per_ms, "configured"), (own_per_ms, "own")] {
                let overrun = first_overrun(admitted, per_ms, scenario.channel_burst);
                prop_assert!(
                    overrun.is_none(),
                    "channel C{channel} at its {which} rate: {}",
                    overrun.unwrap_or_default()
                );
            }
        }
        let workspace_per_ms = f64::from(scenario.workspace_rate_per_minute) / 60_000.0;
        let overrun = first_overrun(&all, workspace_per_ms, scenario.workspace_burst);
        prop_assert!(
            overrun.is_none(),
            "workspace: {}",
            overrun.unwrap_or_default()
        );
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}\n{runner}");
    }
    // The bound means something only if the clients asked for more than it.
    assert!(
        cases_with_refusals.load(Ordering::Relaxed) * 2 > config.cases as usize,
        "the limiter refused in only {} of {} cases",
        cases_with_refusals.load(Ordering::Relaxed),
        config.cases
    );
}

/// The other Web API methods' buckets, at Slack's documented tier limits
/// (Tier 2: 20 a minute, Tier 3: 50): a short run sees only the burst, which
/// three clients must not overdraw between them.
#[test]
fn three_clients_never_overdraw_a_methods_tier() {
    let config = Config {
        cases: 6,
        source_file: Some(file!()),
        ..Config::default()
    };
    let tiers = prop::sample::select(vec![
        ("conversations.list", 20.0, 4),
        ("users.lookupByEmail", 50.0, 10),
        ("conversations.history", 50.0, 10),
    ]);
    let mut runner = TestRunner::new(config);
    let result = runner.run(
        &(scenario(), tiers),
        |(scenario, (method, per_minute, burst))| {
            let (admitted, refused, _) = runtime().block_on(hammer(&scenario, Some(method)));
            let admitted = &admitted[0];
            prop_assert!(!admitted.is_empty(), "nothing was admitted");
            prop_assert!(
                refused > 0,
                "three clients asked {method} for more than its burst"
            );
            let overrun = first_overrun(admitted, per_minute / 60_000.0, burst);
            prop_assert!(
                overrun.is_none(),
                "{method}: {}",
                overrun.unwrap_or_default()
            );
            Ok(())
        },
    );
    if let Err(e) = result {
        panic!("{e}\n{runner}");
    }
}
