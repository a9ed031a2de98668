//! Command line: parses arguments and calls into the library. Exit codes: 0 ok, 1 runtime failure, 2 bad usage or input.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use alert_router::broker::dlq::{DeadLetterQueue, Replay, ReplayMode, Selector};
use alert_router::broker::dlq_ledger::DeadLetterLedger;
use alert_router::broker::{self, Publisher, Topology};
use alert_router::config::{Secret, Secrets, Settings};
use alert_router::deliver::slack::tokens::{TokenRecord, admin};
use alert_router::deliver::slack::{Body, SlackClient};
use alert_router::event::Event;
use alert_router::rules::{Disposition, Rules};
use alert_router::{send_test, telemetry, worker};
use anyhow::Context;
use clap::{Parser, Subcommand};
use futures_util::future::join_all;
use lapin::BasicProperties;
use tokio_util::sync::CancellationToken;

// glibc malloc showed up as about a third of the worker's CPU in profiles.
// `--features system-allocator` keeps the system's, for heap profilers
// (heaptrack, massif) that only see malloc.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "alert-router",
    version,
    about = "Routes escalation and issue events from RabbitMQ to Slack, with email fallback"
)]
struct Cli {
    /// Settings file (default: config/alert-router.yaml when it exists).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker: consume, route, deliver, settle; serve /healthz and /readyz.
    Run {
        /// Answer Slack locally (no token needed): log each message and show
        /// the last ones at /preview on http.listen. Same as `slack.dry_run: true`.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print the effective settings (defaults ← file ← environment), secrets redacted.
    Settings,
    /// Publish one JSON event, or NDJSON lines, with publisher confirms.
    Publish {
        /// File to read; `-` or nothing reads standard input.
        #[arg(value_name = "FILE|-")]
        file: Option<PathBuf>,
    },
    /// Check or try routing rules.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// Manage workspace tokens in Redis.
    Tokens {
        #[command(subcommand)]
        command: TokensCommand,
        /// Print JSON for scripts.
        #[arg(long, global = true)]
        json: bool,
    },
    /// Send a test notification through the whole delivery path and say where it landed.
    ///
    /// Delivers in this process as the worker would (token, channel or user
    /// lookup, idempotency, rate limits, Slack's errors, email fallback),
    /// without the broker. Exit 0 when it reached Slack or email, 1 when not.
    SendTest {
        /// Workspace (team) id whose token to use, e.g. T0AEXY01.
        #[arg(long)]
        workspace: String,
        /// Where: a channel id (C…, G…), #channel-name, user id (U…, W…) or email address.
        #[arg(long, value_name = "C…|#name|U…|EMAIL")]
        to: String,
        /// The message's title (default: "alert-router test notification").
        #[arg(long, value_name = "TEXT")]
        message: Option<String>,
        /// Print the delivery report as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Print the Slack message the worker would post for an event, and a Block Kit Builder link.
    ///
    /// Routes the event with the rules (the first matched rule is named in
    /// the message, as the worker would) and sends nothing. Exit 2 on a bad event.
    Preview {
        /// The event: a JSON file, or `-` for standard input.
        #[arg(value_name = "EVENT.json|-")]
        event: PathBuf,
        /// Rules file (default: rules.path from settings).
        #[arg(long, value_name = "PATH")]
        rules: Option<PathBuf>,
    },
    /// Inspect and replay the dead-letter queue.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
        /// Print JSON for scripts.
        #[arg(long, global = true)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TokensCommand {
    /// Store a workspace's bot token, read from standard input (never from the command line).
    Set {
        /// Workspace (team) id, e.g. T0AEXY01.
        #[arg(long)]
        workspace: String,
        /// Read a refresh token from the second line of standard input (token rotation).
        #[arg(long)]
        refresh_token_stdin: bool,
        /// Seconds until the access token expires (rotating tokens: 43200).
        #[arg(long, value_name = "SECONDS")]
        expires_in: Option<i64>,
        /// Bot user id, e.g. U0BOT (optional).
        #[arg(long)]
        bot_user_id: Option<String>,
    },
    /// List stored workspaces: team, bot user, expiry. No secrets.
    List,
    /// Ask Slack (`auth.test`) whether stored tokens work.
    Check {
        /// Only this workspace (default: every stored one, and SLACK_BOT_TOKEN).
        #[arg(long)]
        workspace: Option<String>,
    },
    /// Delete a workspace's token.
    Delete {
        #[arg(long)]
        workspace: String,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Messages in the dead-letter queue, by reason, and the oldest one's age.
    Stats,
    /// List dead letters (id, type, reason, detail, attempts, age) without removing them.
    List {
        /// Show at most this many, from the head of the queue.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Show one dead letter in full: headers and body.
    Show {
        /// Event id, or `#N` for the N-th message as listed.
        id: String,
    },
    /// Republish dead letters to the exchange with their original routing key, then remove them.
    ///
    /// Looks at no more messages than the queue held at the start, so it ends
    /// even while a worker dead-letters replayed poison again.
    Replay {
        /// Event id, or `#N` for the N-th message as listed.
        #[arg(required_unless_present_any = ["all", "reason"], conflicts_with_all = ["all", "reason"])]
        id: Option<String>,
        /// Replay every dead letter.
        #[arg(long, conflicts_with = "reason")]
        all: bool,
        /// Replay the dead letters with this reason code (e.g. `undeliverable`).
        #[arg(long, value_name = "REASON")]
        reason: Option<String>,
        /// Show what would be replayed (id, reason, routing key, attempts); change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete every dead letter.
    Purge {
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand)]
enum RulesCommand {
    /// Validate a rules file (default: rules.path from settings).
    Check {
        #[arg(value_name = "PATH")]
        path: Option<PathBuf>,
    },
    /// Show which rules match an event and where it would go; sends nothing.
    Test {
        /// Rules file (default: rules.path from settings).
        #[arg(long, value_name = "PATH")]
        rules: Option<PathBuf>,
        /// The event: a JSON file, or `-` for standard input.
        #[arg(value_name = "EVENT.json|-")]
        event: PathBuf,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Print the JSON Schema of the rules file, for editors.
    Schema,
}

/// `println!` that does not panic when stdout is a closed pipe (`… | head`).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// A failure with the exit code it deserves.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Failure { code: 1, error }
    }
}

fn bad_input(error: anyhow::Error) -> Failure {
    Failure { code: 2, error }
}

/// mimalloc 3's index of its `purge_delay` option (the `mi_option_t` enum),
/// and that option's default, by which the index is checked before use.
#[cfg(not(feature = "system-allocator"))]
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
#[cfg(not(feature = "system-allocator"))]
const MI_PURGE_DELAY_DEFAULT_MS: std::ffi::c_long = 1000;
/// How long freed memory stays mapped before mimalloc returns it to the
/// system. Its default, a second, let a 20,000-event backlog over 10,000
/// workspaces peak at 41–45 MiB resident; at 100 ms the peak was 38.6–39.9
/// MiB, with no CPU cost the pipeline bench could tell from its noise.
#[cfg(not(feature = "system-allocator"))]
const PURGE_DELAY_MS: std::ffi::c_long = 100;

/// Shortens mimalloc's purge delay to [`PURGE_DELAY_MS`], unless
/// `MIMALLOC_PURGE_DELAY` is set (mimalloc reads it itself) or the option is
/// not where this mimalloc version is expected to keep it.
fn return_freed_memory_sooner() {
    #[cfg(not(feature = "system-allocator"))]
    // SAFETY: called first thing in `main`, before any thread of ours
    // exists (mimalloc's option setters are not thread-safe); both calls
    // take an option index and a plain integer.
    unsafe {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none()
            && libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) == MI_PURGE_DELAY_DEFAULT_MS
        {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS);
        }
    }
}

/// Opts this process out of transparent huge pages. On kernels with THP set
/// to `always`, the allocator's arenas are backed by 2 MiB pages as soon as
/// one byte of each is touched: an idle worker then holds 48 MB instead of 34.
/// The worker's heap is small and its hot data fits the TLB either way.
fn keep_memory_in_small_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes one integer argument and changes only
    // how this process's future page faults are served.
    unsafe {
        // Best effort: a kernel without it (before 3.15) keeps THP.
        let _ = libc::prctl(
            libc::PR_SET_THP_DISABLE,
            1 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        );
    }
}

fn main() -> ExitCode {
    keep_memory_in_small_pages();
    return_freed_memory_sooner();
    let cli = Cli::parse();
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    // The command runs as a task on the runtime, not as the future
    // `block_on` drives: with a pool (`TOKIO_WORKER_THREADS`) the tasks it
    // spawns (one per delivery) then start in that worker's own queue
    // instead of waking another thread each time.
    let command = runtime.spawn(dispatch(cli));
    match runtime.block_on(command) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(failure)) => {
            eprintln!("error: {:#}", failure.error);
            ExitCode::from(failure.code)
        }
        Err(panicked) => {
            eprintln!("error: the command stopped unexpectedly: {panicked}");
            ExitCode::from(1)
        }
    }
}

/// The async runtime: a current-thread scheduler unless
/// `TOKIO_WORKER_THREADS` asks for a pool. A delivery is I/O from end to
/// end, so a second thread mostly adds cross-thread wakeups (README,
/// Performance); more throughput comes from more replicas. The
/// current-thread scheduler also runs a woken task after the ones already
/// queued, never at once as the pool's "LIFO slot" does: the Redis
/// connection's writer then runs once after a round of deliveries and sends
/// all their commands in one write, instead of one write per command.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match std::env::var_os("TOKIO_WORKER_THREADS") {
        Some(_) => tokio::runtime::Builder::new_multi_thread(),
        None => tokio::runtime::Builder::new_current_thread(),
    };
    builder.enable_all().build()
}

async fn dispatch(cli: Cli) -> Result<(), Failure> {
    let settings = Settings::load(cli.config.as_deref()).map_err(|e| bad_input(e.into()))?;
    match cli.command {
        Command::Run { dry_run } => {
            let mut settings = settings;
            settings.slack.dry_run |= dry_run;
            run(settings).await
        }
        Command::Settings => {
            outln!("{}", settings.redacted_yaml().trim_end());
            Ok(())
        }
        Command::Publish { file } => publish(&settings, file).await,
        Command::Dlq { command, json } => dlq(&settings, command, json).await,
        Command::Preview { event, rules } => {
            let path = rules.unwrap_or_else(|| settings.rules.path.clone());
            preview(&settings, &path, event)
        }
        Command::SendTest {
            workspace,
            to,
            message,
            json,
        } => {
            let request = send_test::Request {
                workspace,
                to,
                message,
            };
            send_test(&settings, &request, json).await
        }
        Command::Tokens { command, json } => tokens(&settings, command, json).await,
        Command::Rules {
            command: RulesCommand::Check { path },
        } => {
            let path = path.unwrap_or_else(|| settings.rules.path.clone());
            rules_check(&path)
        }
        Command::Rules {
            command: RulesCommand::Test { rules, event, json },
        } => {
            let path = rules.unwrap_or_else(|| settings.rules.path.clone());
            rules_test(&path, event, json, settings.amqp.max_body_bytes)
        }
        Command::Rules {
            command: RulesCommand::Schema,
        } => {
            let schema = serde_json::to_string_pretty(&Rules::json_schema())
                .context("cannot render the schema")?;
            outln!("{schema}");
            Ok(())
        }
    }
}

async fn run(settings: Settings) -> Result<(), Failure> {
    telemetry::init(&settings.log);
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        wait_for_stop_signal().await;
        tracing::info!("stop requested; finishing in-flight events");
        signals.cancel();
    });
    worker::run(settings, Secrets::from_env(), shutdown)
        .await
        .map_err(|e| match e {
            worker::WorkerError::Rules(_)
            | worker::WorkerError::Email(_)
            | worker::WorkerError::Topology(_) => bad_input(e.into()),
            other => Failure::from(anyhow::Error::from(other)),
        })
}

async fn wait_for_stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn rules_check(path: &std::path::Path) -> Result<(), Failure> {
    match Rules::load(path) {
        Ok(loaded) => {
            for warning in &loaded.warnings {
                eprintln!("{warning}");
            }
            outln!(
                "{}: ok, {} rules, {} targets",
                path.display(),
                loaded.rules.rule_count(),
                loaded.rules.target_count()
            );
            Ok(())
        }
        Err(errors) => Err(bad_input(anyhow::anyhow!(
            "{} is not valid:\n{errors}",
            path.display()
        ))),
    }
}

async fn dlq(settings: &Settings, command: DlqCommand, json: bool) -> Result<(), Failure> {
    let topology = Topology::from_settings(&settings.amqp, &settings.delivery.retry_delays);
    let connection = broker::connect_within(
        settings.amqp.url.expose(),
        "alert-router dlq",
        settings.amqp.connect_timeout,
    )
    .await
    .context("cannot reach the dead-letter queue")?;
    let mut queue = DeadLetterQueue::new(&connection, &topology);
    match dead_letter_ledger(settings) {
        Ok(ledger) => queue = queue.with_ledger(ledger),
        Err(error) => eprintln!("warning: {error:#}"),
    }
    let result = dlq_command(&queue, &topology, command, json).await;
    let _ = connection.close(200, "done".into()).await;
    result
}

/// The ledger that dates dead letters for the oldest-age gauge; Redis is
/// reached lazily, so `dlq` works without it (with a warning on changes).
fn dead_letter_ledger(settings: &Settings) -> anyhow::Result<DeadLetterLedger> {
    let redis = worker::redis_connection(settings)
        .context("cannot use Redis for the dead-letter ledger")?;
    Ok(DeadLetterLedger::new(
        redis,
        &settings.redis.key_prefix,
        &settings.amqp.dead_letter_queue,
    ))
}

async fn dlq_command(
    queue: &DeadLetterQueue<'_>,
    topology: &Topology,
    command: DlqCommand,
    json: bool,
) -> Result<(), Failure> {
    let name = &topology.dead_letter_queue;
    match command {
        DlqCommand::Stats => {
            let stats = queue
                .stats()
                .await
                .context("cannot read the dead-letter queue")?;
            if json {
                outln!("{}", to_json(&stats)?);
            } else {
                outln!("{}: {} messages", stats.queue, stats.messages);
                for (reason, count) in &stats.by_reason {
                    outln!("  {reason:<16} {count}");
                }
                if let Some(age) = stats.oldest_age_seconds {
                    outln!("oldest: {}", human_age(age));
                }
            }
        }
        DlqCommand::List { limit } => {
            let letters = queue
                .list(limit)
                .await
                .context("cannot read the dead-letter queue")?;
            if json {
                outln!("{}", to_json(&letters)?);
            } else if letters.is_empty() {
                outln!("{name} is empty");
            } else {
                outln!(
                    "{:>4}  {:<24} {:<24} {:<14} {:>8} {:>8}  DETAIL",
                    "#",
                    "ID",
                    "TYPE",
                    "REASON",
                    "ATTEMPTS",
                    "AGE"
                );
                for l in &letters {
                    outln!(
                        "{:>4}  {:<24} {:<24} {:<14} {:>8} {:>8}  {}",
                        l.position,
                        clip(l.id.as_deref().unwrap_or("-"), 24),
                        clip(&l.routing_key, 24),
                        clip(&l.reason, 14),
                        l.attempts.map_or("-".to_string(), |a| a.to_string()),
                        l.age_seconds.map_or("-".to_string(), human_age),
                        clip(&l.detail, 120)
                    );
                }
            }
        }
        DlqCommand::Show { id } => {
            let found = queue
                .find(&Selector::Id(id.clone()))
                .await
                .context("cannot read the dead-letter queue")?;
            let Some(letter) = found else {
                return Err(bad_input(anyhow::anyhow!(
                    "no dead letter with id {id} in {name}"
                )));
            };
            if json {
                let body: serde_json::Value = serde_json::from_slice(&letter.body)
                    .unwrap_or_else(|_| serde_json::Value::String(letter.body_text()));
                outln!(
                    "{}",
                    to_json(
                        &serde_json::json!({"message": letter, "headers": letter.headers(), "body": body})
                    )?
                );
            } else {
                outln!("position: {}", letter.position);
                for (header, value) in letter.headers() {
                    outln!("{header}: {value}");
                }
                outln!();
                outln!("{}", letter.body_text());
            }
        }
        DlqCommand::Replay {
            id,
            all,
            reason,
            dry_run,
        } => {
            let selector = match (id, all, reason) {
                (Some(id), _, _) => Selector::Id(id),
                (None, _, Some(reason)) => Selector::Reason(reason),
                _ => Selector::All,
            };
            let mode = if dry_run {
                ReplayMode::DryRun
            } else {
                ReplayMode::Publish
            };
            let replay = queue
                .replay(&selector, mode)
                .await
                .context("replay stopped")?;
            if json {
                outln!("{}", to_json(&replay.letters)?);
            } else {
                print_replay(&replay, mode, topology);
            }
            warn_about_poison(&replay, mode, name);
            warn_about_ledger(replay.ledger_error.as_deref());
            if replay.letters.is_empty() && matches!(selector, Selector::Id(_)) {
                return Err(bad_input(anyhow::anyhow!("no dead letter matched")));
            }
        }
        DlqCommand::Purge { yes } => {
            let count = queue
                .count()
                .await
                .context("cannot read the dead-letter queue")?;
            if !yes
                && !confirm(&format!(
                    "Delete all {count} messages in {name}? Type `yes` to confirm: "
                ))?
            {
                return Err(bad_input(anyhow::anyhow!("not confirmed; nothing deleted")));
            }
            let purged = queue.purge().await.context("cannot purge")?;
            if json {
                outln!(
                    "{}",
                    to_json(&serde_json::json!({"purged": purged.messages}))?
                );
            } else {
                outln!("purged {} messages from {name}", purged.messages);
            }
            warn_about_ledger(purged.ledger_error.as_deref());
        }
    }
    Ok(())
}

fn warn_about_ledger(error: Option<&str>) {
    if let Some(error) = error {
        eprintln!(
            "warning: the dead-letter ledger in Redis was not updated ({error}); \
             alert_router_dead_letter_oldest_age_seconds is squared with the queue's depth within a minute (exact again once the queue is next emptied)"
        );
    }
}

fn print_replay(replay: &Replay, mode: ReplayMode, topology: &Topology) {
    let name = &topology.dead_letter_queue;
    let verb = match mode {
        ReplayMode::Publish => "replayed",
        ReplayMode::DryRun => "would replay",
    };
    for l in &replay.letters {
        outln!(
            "{verb} {} ({}, was {}, attempts {})",
            l.id.as_deref().unwrap_or("-"),
            l.routing_key,
            l.reason,
            l.attempts.map_or("-".to_string(), |a| a.to_string())
        );
    }
    let count = replay.letters.len();
    let at_start = replay.messages_at_start;
    match mode {
        ReplayMode::Publish => outln!(
            "replayed {count} messages to exchange `{}` ({at_start} were in {name} at the start)",
            topology.exchange
        ),
        ReplayMode::DryRun => outln!(
            "dry run: would replay {count} of the {at_start} messages in {name}; nothing changed"
        ),
    }
}

/// Poison fails the same way every time: replaying it only feeds it back to
/// the dead-letter queue. Said on stderr so `--json` output stays clean.
fn warn_about_poison(replay: &Replay, mode: ReplayMode, queue: &str) {
    let poison = replay.poison_by_reason();
    let count: usize = poison.values().sum();
    if count == 0 {
        return;
    }
    let reasons = poison
        .iter()
        .map(|(reason, n)| format!("{reason}: {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    let verb = if count == 1 { "is" } else { "are" };
    match mode {
        ReplayMode::Publish => eprintln!(
            "warning: {count} of the replayed messages {verb} poison ({reasons}): their bodies \
             cannot be processed as they are, so a worker dead-letters them again and they \
             come back to {queue}"
        ),
        ReplayMode::DryRun => eprintln!(
            "warning: {count} of the messages to replay {verb} poison ({reasons}): their bodies \
             cannot be processed as they are, so replaying them would bring them back to {queue}"
        ),
    }
}

async fn tokens(settings: &Settings, command: TokensCommand, json: bool) -> Result<(), Failure> {
    let mut redis = redis::Client::open(settings.redis.url.expose())
        .context("bad redis.url")?
        .get_connection_manager()
        .await
        .with_context(|| format!("cannot reach Redis at {}", settings.redis.url))?;
    let prefix = settings.redis.key_prefix.as_str();
    match command {
        TokensCommand::Set {
            workspace,
            refresh_token_stdin,
            expires_in,
            bot_user_id,
        } => {
            let mut input = String::new();
            std::io::stdin()
                .read_to_string(&mut input)
                .context("cannot read the token from standard input")?;
            let mut lines = input.lines().map(str::trim).filter(|l| !l.is_empty());
            let access_token = lines
                .next()
                .ok_or_else(|| bad_input(anyhow::anyhow!("no token on standard input")))?
                .to_string();
            let refresh_token = if refresh_token_stdin {
                Some(
                    lines
                        .next()
                        .ok_or_else(|| {
                            bad_input(anyhow::anyhow!(
                                "--refresh-token-stdin: no second line with the refresh token"
                            ))
                        })?
                        .to_string(),
                )
            } else {
                None
            };
            if !access_token.starts_with("xox") {
                eprintln!("warning: that does not look like a Slack token (they start with xox)");
            }
            let record = TokenRecord {
                access_token: Secret::new(access_token),
                refresh_token: refresh_token.map(Secret::new),
                expires_at: expires_in.map(|s| chrono::Utc::now().timestamp() + s),
                team_id: workspace.clone(),
                bot_user_id,
            };
            admin::store(&mut redis, prefix, &workspace, &record)
                .await
                .map_err(|e| anyhow::anyhow!("cannot store the token: {e}"))?;
            outln!("stored the token of workspace {workspace}");
        }
        TokensCommand::List => {
            let stored = admin::list(&mut redis, prefix)
                .await
                .map_err(|e| anyhow::anyhow!("cannot list tokens: {e}"))?;
            let rows: Vec<serde_json::Value> = stored
                .iter()
                .map(|(workspace, record)| match record {
                    Ok(r) => serde_json::json!({
                        "workspace": workspace, "team_id": r.team_id, "bot_user_id": r.bot_user_id,
                        "expires_at": r.expires_at, "rotating": r.refresh_token.is_some(),
                    }),
                    Err(problem) => serde_json::json!({"workspace": workspace, "error": problem}),
                })
                .collect();
            if json {
                outln!("{}", to_json(&rows)?);
            } else if rows.is_empty() {
                outln!("no tokens stored under {prefix}:slack:token:*");
            } else {
                for (workspace, record) in &stored {
                    match record {
                        Ok(r) => outln!(
                            "{workspace}  team {}  bot {}  {}",
                            r.team_id,
                            r.bot_user_id.as_deref().unwrap_or("-"),
                            match r.expires_at {
                                Some(at) => format!(
                                    "expires {}{}",
                                    chrono::DateTime::<chrono::Utc>::from_timestamp(at, 0)
                                        .map_or(at.to_string(), |t| t.to_rfc3339()),
                                    if r.refresh_token.is_some() {
                                        " (rotating)"
                                    } else {
                                        ""
                                    }
                                ),
                                None => "does not expire".to_string(),
                            }
                        ),
                        Err(problem) => outln!("{workspace}  unreadable: {problem}"),
                    }
                }
            }
        }
        TokensCommand::Check { workspace } => {
            let slack =
                SlackClient::new(&settings.slack).context("cannot build the HTTP client")?;
            let mut candidates: Vec<(String, Secret)> = Vec::new();
            for (ws, record) in admin::list(&mut redis, prefix)
                .await
                .map_err(|e| anyhow::anyhow!("cannot list tokens: {e}"))?
            {
                if workspace.as_deref().is_none_or(|w| w == ws)
                    && let Ok(record) = record
                {
                    candidates.push((ws, record.access_token));
                }
            }
            if let Some(token) = Secrets::from_env().slack_bot_token
                && workspace.is_none()
            {
                candidates.push(("SLACK_BOT_TOKEN".into(), token));
            }
            if candidates.is_empty() {
                return Err(bad_input(anyhow::anyhow!("no token to check")));
            }
            let mut results = Vec::new();
            for (ws, token) in candidates {
                let verdict = match slack
                    // A form: auth.test does not list JSON among the
                    // content types it takes.
                    .call("auth.test", Some(&token), &Body::Form(&[]))
                    .await
                {
                    Ok(reply) => serde_json::json!({"workspace": ws, "valid": true,
                        "team": reply.get("team"), "team_id": reply.get("team_id"), "user_id": reply.get("user_id")}),
                    // Slack failing or rate-limiting the check says nothing
                    // about the token: `valid` is unknown (null).
                    Err(e) if e.is_transient() => {
                        serde_json::json!({"workspace": ws, "valid": null, "error": e.code, "detail": e.to_string()})
                    }
                    Err(e) => {
                        serde_json::json!({"workspace": ws, "valid": false, "error": e.code, "detail": e.to_string()})
                    }
                };
                results.push(verdict);
            }
            if json {
                outln!("{}", to_json(&results)?);
            } else {
                for r in &results {
                    if r["valid"] == true {
                        outln!(
                            "{}: valid (team {}, bot user {})",
                            r["workspace"].as_str().unwrap_or("?"),
                            r["team_id"].as_str().unwrap_or("?"),
                            r["user_id"].as_str().unwrap_or("?")
                        );
                    } else if r["valid"].is_null() {
                        outln!(
                            "{}: unknown, Slack did not answer the check ({}); check again",
                            r["workspace"].as_str().unwrap_or("?"),
                            r["detail"].as_str().unwrap_or("?")
                        );
                    } else {
                        outln!(
                            "{}: invalid ({})",
                            r["workspace"].as_str().unwrap_or("?"),
                            r["detail"].as_str().unwrap_or("?")
                        );
                    }
                }
            }
            if results.iter().any(|r| r["valid"] == false) {
                return Err(anyhow::anyhow!("some tokens do not work").into());
            }
            if results.iter().any(|r| r["valid"].is_null()) {
                return Err(
                    anyhow::anyhow!("Slack did not answer for some tokens; check again").into(),
                );
            }
        }
        TokensCommand::Delete { workspace } => {
            if admin::delete(&mut redis, prefix, &workspace)
                .await
                .map_err(|e| anyhow::anyhow!("cannot delete: {e}"))?
            {
                outln!("deleted the token of workspace {workspace}");
            } else {
                return Err(bad_input(anyhow::anyhow!(
                    "no token stored for workspace {workspace}"
                )));
            }
        }
    }
    Ok(())
}

/// Sends one test notification and prints where it landed, one line per
/// target (or the report as JSON).
async fn send_test(
    settings: &Settings,
    request: &send_test::Request,
    json: bool,
) -> Result<(), Failure> {
    // Warnings only: the printed lines say what happened; RUST_LOG=info
    // shows every step the delivery took.
    telemetry::init(&alert_router::config::LogSettings {
        level: "warn".into(),
        ..settings.log.clone()
    });
    let sent = send_test::send(settings, &Secrets::from_env(), request)
        .await
        .map_err(|e| {
            let code = if e.is_bad_input() { 2 } else { 1 };
            Failure {
                code,
                error: anyhow::Error::from(e).context("nothing sent"),
            }
        })?;
    if let send_test::RulesUsed::NotLoaded { why, .. } = &sent.rules {
        eprintln!("warning: {why}; sent without a default channel or fallback email");
    }
    if json {
        outln!("{}", to_json(&sent.to_json())?);
    } else {
        for line in sent.lines() {
            outln!("{line}");
        }
    }
    if sent.delivered() {
        Ok(())
    } else {
        Err(anyhow::anyhow!("the test notification {} was not delivered", sent.event.id).into())
    }
}

fn confirm(prompt: &str) -> Result<bool, Failure> {
    use std::io::Write as _;
    eprint!("{prompt}");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin()
        .read_line(&mut answer)
        .context("cannot read the answer")?;
    Ok(answer.trim() == "yes")
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, Failure> {
    Ok(serde_json::to_string_pretty(value).context("cannot render JSON")?)
}

fn clip(text: &str, width: usize) -> String {
    let single_line = text.replace(['\n', '\r'], " ");
    if single_line.chars().count() <= width {
        single_line
    } else {
        let mut out: String = single_line.chars().take(width.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

fn human_age(seconds: i64) -> String {
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// Explains the routing of one event without sending anything.
fn preview(
    settings: &Settings,
    path: &std::path::Path,
    event_file: PathBuf,
) -> Result<(), Failure> {
    let loaded = Rules::load(path).map_err(|errors| {
        bad_input(anyhow::anyhow!(
            "{} is not valid:\n{errors}",
            path.display()
        ))
    })?;
    let (source, text) = read_input(Some(event_file)).map_err(bad_input)?;
    let event = Event::decode(text.trim().as_bytes(), settings.amqp.max_body_bytes)
        .map_err(|e| bad_input(anyhow::anyhow!("{source}: {e}")))?;
    let preview = alert_router::preview::Preview::of(
        &event,
        &loaded.rules,
        settings.slack.default_workspace.as_deref(),
    );
    let message = preview.render(&event);
    let json = serde_json::to_string_pretty(&message).context("cannot render JSON")?;
    outln!("{json}");
    outln!();
    match &preview.target {
        Some(target) => outln!("would post to: {target}"),
        None => outln!("the rules send this event nowhere: nothing would be posted"),
    }
    outln!(
        "Block Kit Builder: {}",
        alert_router::preview::builder_url(&message)
    );
    Ok(())
}

fn rules_test(
    path: &std::path::Path,
    event_file: PathBuf,
    json: bool,
    max_bytes: usize,
) -> Result<(), Failure> {
    let loaded = Rules::load(path).map_err(|errors| {
        bad_input(anyhow::anyhow!(
            "{} is not valid:\n{errors}",
            path.display()
        ))
    })?;
    let (source, text) = read_input(Some(event_file)).map_err(bad_input)?;
    let event = Event::decode(text.trim().as_bytes(), max_bytes)
        .map_err(|e| bad_input(anyhow::anyhow!("{source}: {e}")))?;
    let explanation = loaded.rules.explain(&event);
    if json {
        let out = serde_json::json!({
            "rules_file": path.display().to_string(),
            "event_id": event.id,
            "steps": explanation.steps,
            "routing": explanation.routing,
        });
        outln!(
            "{}",
            serde_json::to_string_pretty(&out).context("cannot render JSON")?
        );
        return Ok(());
    }
    for warning in &loaded.warnings {
        eprintln!("{warning}");
    }
    outln!(
        "rules: {} ({} rules)",
        path.display(),
        loaded.rules.rule_count()
    );
    outln!("event: {} ({}, {})", event.id, event.kind, event.severity);
    outln!();
    let width = explanation
        .steps
        .iter()
        .map(|s| s.rule.len())
        .max()
        .unwrap_or(0);
    let mut stopped_by: Option<&str> = None;
    for step in &explanation.steps {
        let verdict = if !step.evaluated {
            format!(
                "not evaluated (stopped by {})",
                stopped_by.unwrap_or("an earlier rule")
            )
        } else if step.matched {
            "matched".to_string()
        } else {
            match &step.failed_matcher {
                Some(matcher) => format!("not matched: {matcher} failed"),
                None => "not matched".to_string(),
            }
        };
        let mark = match (step.evaluated, step.matched) {
            (true, true) => "✓",
            (true, false) => "✗",
            (false, _) => "-",
        };
        outln!("  {mark} {:width$}  {verdict}", step.rule);
        if step.evaluated && step.matched {
            stopped_by = Some(&step.rule);
        }
    }
    outln!();
    let routing = &explanation.routing;
    match &routing.disposition {
        Disposition::Deliver => {
            outln!("targets:");
            for routed in &routing.targets {
                let from = routed
                    .rule
                    .as_deref()
                    .map_or("event or default".to_string(), |r| format!("rule {r}"));
                let fallback = if routed.fallback_emails.is_empty() {
                    "no fallback email".to_string()
                } else {
                    format!("fallback email: {}", routed.fallback_emails.join(", "))
                };
                outln!("  {}  ({from}; {fallback})", routed.target);
            }
        }
        Disposition::Silenced { rule } => {
            outln!("silenced by rule {rule} (notify: []): nothing is sent")
        }
        Disposition::Dropped => outln!("no rule matches and unmatched: drop: nothing is sent"),
        Disposition::DeadLetter => {
            outln!("no rule matches: the event would be dead-lettered (no_route)")
        }
    }
    if routing.disposition == Disposition::Deliver && !routing.escalations.is_empty() {
        outln!();
        outln!(
            "escalation (if incident {} is neither acknowledged nor resolved; the first event of an incident starts it):",
            event.incident_key()
        );
        for chain in &routing.escalations {
            for (i, step) in chain.steps.iter().enumerate() {
                let targets: Vec<String> = step.notify.iter().map(ToString::to_string).collect();
                outln!(
                    "  {}. after {:>6}  {}  (rule {})",
                    i + 1,
                    step.after_text,
                    targets.join(", "),
                    chain.rule
                );
            }
        }
    }
    Ok(())
}

/// Validates every event first, so a bad line publishes nothing; then publishes
/// all of them and awaits the confirms together.
async fn publish(settings: &Settings, file: Option<PathBuf>) -> Result<(), Failure> {
    let (source, text) = read_input(file).map_err(bad_input)?;
    let events = parse_events(&text, settings.amqp.max_body_bytes).map_err(|problems| {
        bad_input(anyhow::anyhow!(
            "{source}: nothing published:\n{}",
            problems.join("\n")
        ))
    })?;
    if events.is_empty() {
        return Err(bad_input(anyhow::anyhow!("{source}: no events to publish")));
    }

    let connection = broker::connect_within(
        settings.amqp.url.expose(),
        "alert-router publish",
        settings.amqp.connect_timeout,
    )
    .await
    .context("cannot publish")?;
    let publisher = Publisher::open(&connection)
        .await
        .context("cannot open a channel")?
        .with_confirm_timeout(settings.amqp.confirm_timeout);
    // Declaring is idempotent; it makes "publish before the first run" safe.
    Topology::from_settings(&settings.amqp, &settings.delivery.retry_delays)
        .declare(publisher.channel())
        .await
        .context("cannot declare the RabbitMQ topology")?;
    let exchange = settings.amqp.exchange.as_str();
    let results = join_all(events.iter().map(|(event, body)| {
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(event.id.as_str().into())
            .with_timestamp(u64::try_from(chrono::Utc::now().timestamp()).unwrap_or(0));
        publisher.publish(exchange, &event.kind, body, properties)
    }))
    .await;
    let failed: Vec<String> = results
        .iter()
        .zip(&events)
        .filter_map(|(r, (event, _))| r.as_ref().err().map(|e| format!("event {}: {e}", event.id)))
        .collect();
    let _ = connection.close(200, "done".into()).await;
    let published = events.len() - failed.len();
    outln!(
        "published {published} of {} events to exchange `{exchange}`",
        events.len()
    );
    if failed.is_empty() {
        Ok(())
    } else {
        Err(anyhow::anyhow!("not confirmed by RabbitMQ:\n{}", failed.join("\n")).into())
    }
}

fn read_input(file: Option<PathBuf>) -> anyhow::Result<(String, String)> {
    match file {
        Some(path) if path.as_os_str() != "-" => {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            Ok((path.display().to_string(), text))
        }
        _ => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("cannot read standard input")?;
            Ok(("stdin".into(), text))
        }
    }
}

/// One JSON document (possibly pretty-printed), or NDJSON: one event per line.
fn parse_events(text: &str, max_bytes: usize) -> Result<Vec<(Event, Vec<u8>)>, Vec<String>> {
    if let Ok(event) = Event::decode(text.trim().as_bytes(), max_bytes) {
        return Ok(vec![(event, text.trim().as_bytes().to_vec())]);
    }
    let mut events = Vec::new();
    let mut problems = Vec::new();
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match Event::decode(line.trim().as_bytes(), max_bytes) {
            Ok(event) => events.push((event, line.trim().as_bytes().to_vec())),
            Err(e) => problems.push(format!("line {}: {e}", number + 1)),
        }
    }
    if problems.is_empty() {
        Ok(events)
    } else {
        Err(problems)
    }
}
