//! `warren up`: topology, scheduler, a worker and the task tracker in one process.

use warren_core::Config;
use warren_worker::{Registry, Worker};

pub async fn run(config: Config) -> anyhow::Result<i32> {
    let shutdown = crate::shutdown::on_signal()?;
    super::scheduler::apply_topology(&config, &shutdown).await?;
    let worker = Worker::new(
        config.clone(),
        Registry::with_builtins()
            .with_exec(&config)?
            .with_webhooks(&config)?,
    )?;
    let scheduler = warren_scheduler::Scheduler::new(config.clone());
    // Like the tracker, the endpoints only report: a taken address is logged
    // and the tasks run on.
    for (key, listen, probe) in [
        ("worker.listen", &config.worker.listen, worker.probe()),
        (
            "scheduler.listen",
            &config.scheduler.listen,
            scheduler.probe(),
        ),
    ] {
        if let Err(e) = super::serve_ops(key, listen, probe, &shutdown).await {
            tracing::error!(error = %e, "metrics and health not served");
        }
    }
    // The tracker only watches: a taken HTTP address or an unusable database
    // is reported, and tasks keep running without it.
    let tracker = warren_tracker::Tracker::new(config).http_optional(true);
    let (w, s, ()) = tokio::join!(
        worker.run(shutdown.clone()),
        async {
            let r = scheduler.run(shutdown.clone()).await;
            // If the scheduler fails, stop the worker too rather than run half a system.
            shutdown.cancel();
            r
        },
        async {
            if let Err(e) = tracker.run(shutdown.clone()).await {
                tracing::error!(error = %e, "task tracker not running; tasks run without it");
            }
        }
    );
    w?;
    s?;
    Ok(0)
}
