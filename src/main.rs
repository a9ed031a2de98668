//! Command line: parses arguments and calls into the library. Exit codes: 0 ok, 1 runtime failure, 2 bad usage or input.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use alert_router::broker::{self, Publisher, Topology};
use alert_router::config::{Secrets, Settings};
use alert_router::event::Event;
use alert_router::rules::Rules;
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
            print!("{}", settings.redacted_yaml());
            Ok(())
        }
        Command::Publish { file } => publish(&settings, file).await,
        Command::Rules {
            command: RulesCommand::Check { path },
        } => {
            let path = path.unwrap_or_else(|| settings.rules.path.clone());
            rules_check(&path)
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
            println!(
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
    println!(
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
