//! One benchmark run's private topology and child processes.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use lapin::options::{ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use warren_client::Client;
use warren_core::topology::TopologyPlan;
use warren_core::Config;

use crate::procstat::{self, ProcSample};

/// A private prefix with its topology applied, and the processes started on it.
pub struct BenchEnv {
    /// The configuration with the bench prefix.
    pub config: Config,
    /// A producer client on the bench prefix.
    pub client: Client,
    config_path: Option<PathBuf>,
    children: Vec<Child>,
    plan: TopologyPlan,
}

impl BenchEnv {
    /// Applies the topology under a fresh prefix derived from `base`.
    pub async fn new(base: &Config, config_path: Option<PathBuf>) -> anyhow::Result<Self> {
        let mut config = base.clone();
        let tag = uuid::Uuid::new_v4().simple().to_string();
        config.prefix = format!("{}-bench-{}", base.prefix, &tag[..8]);
        let plan = TopologyPlan::from_config(&config);
        let conn = warren_client::runtime::connect(&config.broker, "bench").await?;
        warren_scheduler::apply(&conn, &plan).await?;
        let _ = conn.close(200, "applied".into()).await;
        let client = Client::connect(&config).await?;
        Ok(BenchEnv {
            config,
            client,
            config_path,
            children: Vec::new(),
            plan,
        })
    }

    /// The topology names.
    pub fn names(&self) -> warren_core::Names {
        self.config.names()
    }

    /// Starts `warren <args>` on the bench prefix; returns its pid.
    pub fn spawn(&mut self, args: &[&str], vars: &[(&str, String)]) -> anyhow::Result<u32> {
        let exe = std::env::current_exe().context("locate the warren binary")?;
        let mut cmd = Command::new(exe);
        if let Some(p) = &self.config_path {
            cmd.arg("--config").arg(p);
        }
        cmd.args(args)
            .env("WARREN__PREFIX", &self.config.prefix)
            .env("WARREN__BROKER__URL", self.config.broker.url.expose_all())
            .env("WARREN_LOG", "warn")
            // Metrics endpoints stay on (as in production) on free ports,
            // so a Warren already running on this host does not clash.
            .env("WARREN__WORKER__LISTEN", "127.0.0.1:0")
            .env("WARREN__SCHEDULER__LISTEN", "127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let child = cmd.spawn().context("start a child process")?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }

    /// Stops a child with SIGTERM (then SIGKILL after 10 s) and returns its last sample.
    pub async fn stop(&mut self, pid: u32) -> Option<ProcSample> {
        let last = procstat::sample(pid);
        let idx = self.children.iter().position(|c| c.id() == pid)?;
        let mut child = self.children.remove(idx);
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        for _ in 0..200 {
            if child.try_wait().ok().flatten().is_some() {
                return last;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        last
    }

    /// Messages ready in a queue.
    pub async fn depth(&self, queue: &str) -> anyhow::Result<u32> {
        let ch = self.client.channel().await?;
        queue_depth(ch.channel(), queue).await
    }

    /// Stops every child and deletes every queue and exchange of the prefix.
    pub async fn cleanup(mut self) -> anyhow::Result<()> {
        let pids: Vec<u32> = self.children.iter().map(Child::id).collect();
        for pid in pids {
            self.stop(pid).await;
        }
        let conn = warren_client::runtime::connect(&self.config.broker, "bench").await?;
        let ch = conn.create_channel().await?;
        for q in &self.plan.queues {
            ch.queue_delete(q.name.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        for x in &self.plan.exchanges {
            ch.exchange_delete(x.name.as_str().into(), ExchangeDeleteOptions::default())
                .await?;
        }
        // The rate windows of a run with rate limits (declared by the
        // workers, not in the plan; they would expire by themselves).
        let names = self.config.names();
        for t in self.config.flow.rate.keys() {
            let window = warren_core::flow::rate_queue(&names, t, None);
            ch.queue_delete(window.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        let _ = conn.close(200, "cleaned".into()).await;
        Ok(())
    }
}

/// Messages ready in `queue` (a passive declare on `ch`).
pub(crate) async fn queue_depth(ch: &lapin::Channel, queue: &str) -> anyhow::Result<u32> {
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(q.message_count())
}

impl Drop for BenchEnv {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Publisher confirms awaited in publishing order with at most `window` of
/// them outstanding, each counted on a progress bar as it arrives.
pub(crate) struct ConfirmWindow {
    in_flight: futures::stream::FuturesOrdered<lapin::PublisherConfirm>,
    window: usize,
    bar: indicatif::ProgressBar,
}

impl ConfirmWindow {
    pub(crate) fn new(window: usize, bar: indicatif::ProgressBar) -> Self {
        ConfirmWindow {
            in_flight: futures::stream::FuturesOrdered::new(),
            window: window.max(1),
            bar,
        }
    }

    /// Adds a confirm; when the window is full, waits for the oldest.
    pub(crate) async fn push(&mut self, confirm: lapin::PublisherConfirm) -> anyhow::Result<()> {
        use futures::StreamExt;
        self.in_flight.push_back(confirm);
        if self.in_flight.len() >= self.window {
            if let Some(c) = self.in_flight.next().await {
                c?;
            }
            self.bar.inc(1);
        }
        Ok(())
    }

    /// Waits for every outstanding confirm and clears the bar.
    pub(crate) async fn finish(mut self) -> anyhow::Result<()> {
        use futures::StreamExt;
        while let Some(c) = self.in_flight.next().await {
            c?;
            self.bar.inc(1);
        }
        self.bar.finish_and_clear();
        Ok(())
    }
}
