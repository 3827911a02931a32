//! One file per subcommand.

mod bench;
mod dead;
mod health;
mod overview;
mod pause;
mod publish;
mod scheduler;
mod status;
mod task;
mod tasks;
mod topology;
mod tracker;
mod up;
mod worker;
mod workflow;

use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use warren_core::Config;
use warren_ops::Probe;

use crate::cli::{Cli, Command, WorkerArgs};

/// Runs the chosen command; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    let mut config = Config::load(cli.config.as_deref())?;
    for warning in config.warnings() {
        eprintln!("warning: {warning}");
    }
    match cli.command {
        Command::Topology { action } => topology::run(&config, action).await,
        Command::Publish(args) => publish::run(&config, args).await,
        Command::Bench(args) => bench::run(&config, cli.config.clone(), args).await,
        Command::BenchBaselineWorker {
            queue,
            events,
            prefetch,
        } => {
            warren_bench::baseline::worker(config.broker.url.expose(), &queue, &events, prefetch)
                .await?;
            Ok(0)
        }
        Command::Cancel { task_id } => {
            let client = warren_client::Client::connect(&config).await?;
            client.cancel(&task_id).await?;
            println!("cancel sent for task {task_id}");
            Ok(0)
        }
        Command::Task { action } => task::run(&config, action).await,
        Command::Pause(args) => pause::run(&config, args, true).await,
        Command::Resume(args) => pause::run(&config, args, false).await,
        Command::Dead { action } => dead::run(&config, action).await,
        Command::Scheduler => scheduler::run(&config).await,
        Command::Tracker => tracker::run(config).await,
        Command::Status(args) => status::run(&config, args).await,
        Command::Tasks(args) => tasks::run(&config, args).await,
        Command::Health(args) => health::run(&config, args).await,
        Command::Workflow { action } => workflow::run(&config, action).await,
        Command::Worker(args) => {
            apply_worker_args(&mut config, args)?;
            worker::run(config).await
        }
        Command::Up(args) => {
            apply_worker_args(&mut config, args)?;
            up::run(config).await
        }
    }
}

/// Command-line worker flags override the configuration, then it is validated again.
fn apply_worker_args(config: &mut Config, args: WorkerArgs) -> anyhow::Result<()> {
    if !args.queues.is_empty() {
        config.worker.queues = args.queues;
    }
    if let Some(c) = args.concurrency {
        config.worker.concurrency = c;
    }
    if let Some(p) = args.prefetch {
        config.worker.prefetch = p;
    }
    config.validate().context("command-line flags")?;
    Ok(())
}

/// Serves one component's `/metrics`, `/healthz` and `/readyz` on `listen`
/// (the value of config key `key`; empty serves nothing) until `shutdown`.
pub async fn serve_ops(
    key: &str,
    listen: &str,
    probe: Arc<dyn Probe>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    if let Some(addr) = warren_ops::serve(key, listen, probe, shutdown.clone()).await? {
        let component = key.split('.').next().unwrap_or(key);
        tracing::info!(
            "{component} metrics on http://{addr}/metrics, health on /healthz and /readyz"
        );
    }
    Ok(())
}

/// With an `amqps://` URL, opens and closes one connection first, so that a
/// TLS problem only a setting can fix (the CA, the host name, the client
/// certificate) stops a long-running command with its one line, rather than
/// being logged by its reconnect loop forever. Any other error is left to
/// that loop, which waits for a broker that is not up yet.
pub async fn check_tls(config: &Config, role: &str) -> anyhow::Result<()> {
    if !config.broker.uses_tls() {
        return Ok(());
    }
    match warren_client::runtime::connect(&config.broker, role).await {
        Ok(conn) => {
            let _ = conn.close(200, "TLS checked".into()).await;
            Ok(())
        }
        Err(e) if e.is_setting_problem() => Err(e.into()),
        Err(_) => Ok(()),
    }
}

/// Connects one named connection, retrying for up to `connect_timeout_ms`
/// while the broker starts; a TLS problem, which only a setting can fix, is
/// reported at once.
pub async fn connect(config: &Config, role: &str) -> anyhow::Result<lapin::Connection> {
    let deadline = std::time::Instant::now()
        + std::time::Duration::from_millis(config.broker.connect_timeout_ms);
    loop {
        match warren_client::runtime::connect(&config.broker, role).await {
            Ok(c) => return Ok(c),
            Err(e) if e.is_setting_problem() || std::time::Instant::now() >= deadline => {
                return Err(e.into())
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(250)).await,
        }
    }
}
