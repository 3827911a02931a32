//! `warren tracker`.

use warren_core::Config;

pub async fn run(config: Config) -> anyhow::Result<i32> {
    let shutdown = crate::shutdown::on_signal()?;
    super::check_tls(&config, "tracker").await?;
    warren_tracker::Tracker::new(config).run(shutdown).await?;
    Ok(0)
}
