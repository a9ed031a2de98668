//! The release `alert-router run` binary as a child process, configured through its environment.

use alert_router::config::Settings;

/// `alert-router run` with `settings` passed as `ALERT_ROUTER__…` variables
/// (only the fields the benches change); its log goes to `log`.
pub fn command(settings: &Settings, log: std::process::Stdio) -> tokio::process::Command {
    // BENCH_WORKER_BIN: another build to compare against this one.
    let binary = std::env::var_os("BENCH_WORKER_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_alert-router").into());
    let mut command = tokio::process::Command::new(binary);
    command
        .arg("run")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(crate::worker_env::worker_env(settings))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true);
    // The runtime's thread count, as a deployment may set it.
    if let Some(threads) = std::env::var_os("TOKIO_WORKER_THREADS") {
        command.env("TOKIO_WORKER_THREADS", threads);
    }
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
