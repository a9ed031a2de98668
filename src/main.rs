//! Command line: parses arguments and calls into the library. Exit codes: 0 ok, 1 runtime failure, 2 bad usage or input.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use alert_router::broker::{self, Publisher, Topology};
use alert_router::config::{Secrets, Settings};
use alert_router::event::Event;
use alert_router::rules::{Disposition, Rules};
use alert_router::{telemetry, worker};
use anyhow::Context;
use clap::{Parser, Subcommand};
use futures_util::future::join_all;
use lapin::BasicProperties;
use tokio_util::sync::CancellationToken;

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
    Run,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {:#}", failure.error);
            ExitCode::from(failure.code)
        }
    }
}

async fn dispatch(cli: Cli) -> Result<(), Failure> {
    let settings = Settings::load(cli.config.as_deref()).map_err(|e| bad_input(e.into()))?;
    match cli.command {
        Command::Run => run(settings).await,
        Command::Settings => {
            outln!("{}", settings.redacted_yaml().trim_end());
            Ok(())
        }
        Command::Publish { file } => publish(&settings, file).await,
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
            worker::WorkerError::Rules(_) => bad_input(e.into()),
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

/// Explains the routing of one event without sending anything.
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

    let connection = broker::connect(&settings.amqp.url, "alert-router publish")
        .await
        .context("cannot publish")?;
    let publisher = Publisher::open(&connection)
        .await
        .context("cannot open a channel")?;
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
