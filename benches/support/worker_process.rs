//! The release `alert-router run` binary as a child process, configured through its environment.

use alert_router::config::{LogFormat, Settings};

/// `alert-router run` with `settings` passed as `ALERT_ROUTER__…` variables
/// (only the fields the benches change); its log goes to `log`.
pub fn command(settings: &Settings, log: std::process::Stdio) -> tokio::process::Command {
    let s = settings;
    let delays: Vec<String> = s
        .delivery
        .retry_delays
        .iter()
        .map(|d| format!("{}ms", d.as_millis()))
        .collect();
    let vars = [
        ("AMQP__URL", s.amqp.url.clone()),
        ("AMQP__EXCHANGE", s.amqp.exchange.clone()),
        ("AMQP__QUEUE", s.amqp.queue.clone()),
        (
            "AMQP__DEAD_LETTER_EXCHANGE",
            s.amqp.dead_letter_exchange.clone(),
        ),
        ("AMQP__DEAD_LETTER_QUEUE", s.amqp.dead_letter_queue.clone()),
        (
            "AMQP__RETRY_QUEUE_PREFIX",
            s.amqp.retry_queue_prefix.clone(),
        ),
        ("AMQP__PREFETCH", s.amqp.prefetch.to_string()),
        ("REDIS__URL", s.redis.url.clone()),
        ("REDIS__KEY_PREFIX", s.redis.key_prefix.clone()),
        ("SLACK__API_URL", s.slack.api_url.clone()),
        (
            "SLACK__DEFAULT_WORKSPACE",
            s.slack.default_workspace.clone().unwrap_or_default(),
        ),
        (
            "SLACK__CHANNEL_RATE_PER_SECOND",
            s.slack.channel_rate_per_second.to_string(),
        ),
        ("SLACK__CHANNEL_BURST", s.slack.channel_burst.to_string()),
        (
            "SLACK__WORKSPACE_RATE_PER_MINUTE",
            s.slack.workspace_rate_per_minute.to_string(),
        ),
        (
            "SLACK__WORKSPACE_BURST",
            s.slack.workspace_burst.to_string(),
        ),
        ("RULES__PATH", s.rules.path.display().to_string()),
        ("HTTP__LISTEN", s.http.listen.to_string()),
        ("LOG__LEVEL", s.log.level.clone()),
        (
            "LOG__FORMAT",
            match s.log.format {
                LogFormat::Json => "json".to_string(),
                LogFormat::Text => "text".to_string(),
            },
        ),
        ("DELIVERY__RETRY_DELAYS", delays.join(",")),
        (
            "DELIVERY__DRAIN_TIMEOUT",
            format!("{}ms", s.delivery.drain_timeout.as_millis()),
        ),
    ];
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_alert-router"));
    command
        .arg("run")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(
            vars.into_iter()
                .map(|(k, v)| (format!("ALERT_ROUTER__{k}"), v)),
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true);
    command
}

/// SIGTERM, then waits for a clean exit.
pub async fn stop(mut child: tokio::process::Child) -> anyhow::Result<()> {
    if let Some(pid) = child.id() {
        std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()?;
    }
    let status = tokio::time::timeout(std::time::Duration::from_secs(60), child.wait()).await??;
    anyhow::ensure!(status.success(), "the worker exited with {status}");
    Ok(())
}
