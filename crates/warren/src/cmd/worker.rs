//! `warren worker`.

use warren_core::Config;
use warren_worker::{Registry, Worker};

pub async fn run(config: Config) -> anyhow::Result<i32> {
    let shutdown = crate::shutdown::on_signal()?;
    super::check_tls(&config, "worker").await?;
    let worker = Worker::new(
        config.clone(),
        Registry::with_builtins()
            .with_exec(&config)?
            .with_webhooks(&config)?,
    )?;
    super::serve_ops(
        "worker.listen",
        &config.worker.listen,
        worker.probe(),
        &shutdown,
    )
    .await?;
    worker.run(shutdown).await?;
    Ok(0)
}
