//! A running task's progress reports, published as `progress` events.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use warren_client::runtime::Outbox;
use warren_core::event::{format_time, new_id, ProgressInfo};
use warren_core::Event;

use crate::handler::ProgressReport;

/// Publishes a running task's latest progress report as a `progress`
/// event, at most once a second.
pub(super) struct ProgressEvents {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl ProgressEvents {
    pub(super) fn start(
        out: Outbox,
        template: Event,
        mut latest: watch::Receiver<ProgressReport>,
    ) -> Self {
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = latest.changed() => if changed.is_err() { return },
                    _ = stopped.cancelled() => return,
                }
                let Some((bytes, total)) = *latest.borrow_and_update() else {
                    continue;
                };
                let mut ev = template.clone();
                ev.event_id = new_id();
                ev.at = format_time(chrono::Utc::now());
                ev.progress = Some(ProgressInfo { bytes, total });
                match out.event(&ev).await {
                    Ok(confirm) => {
                        let _ = confirm.await;
                    }
                    Err(_) => return,
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stopped.cancelled() => return,
                }
            }
        });
        ProgressEvents { stop, task }
    }

    /// Stops publishing and waits for a publication in flight, so no
    /// progress event follows the attempt's outcome.
    pub(super) async fn finish(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}
