//! A running task's progress reports, published as `progress` events.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use warren_client::runtime::Outbox;
use warren_core::event::{format_time, new_id, ProgressInfo};
use warren_core::Event;

use crate::handler::ProgressWatch;

/// Publishes a running task's latest progress report as a `progress`
/// event, at most once a second. Started only once the handler first
/// reports progress (most handlers never do), so a task without progress
/// costs no task of its own.
pub(super) struct ProgressEvents {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl ProgressEvents {
    /// Publishes the report `latest` holds now, then each later one, at most
    /// once a second.
    pub(super) fn start(out: Outbox, template: Event, latest: ProgressWatch) -> Self {
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut sent = None;
            loop {
                let report = latest.latest();
                // A wake-up can stand for a report already sent.
                if let Some((bytes, total)) = report.filter(|_| report != sent) {
                    sent = report;
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
                tokio::select! {
                    _ = latest.changed() => {}
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

/// A running task's progress: nothing until its handler first reports
/// some, then a [`ProgressEvents`] publishing it.
pub(super) enum TaskProgress {
    /// No report yet: the watch to wait on.
    Quiet(ProgressWatch),
    /// Reports are being published.
    Publishing(ProgressEvents),
}

impl TaskProgress {
    /// Waits for the handler's first report; never returns once
    /// publishing started.
    pub(super) async fn first_report(&mut self) {
        match self {
            TaskProgress::Quiet(w) => w.changed().await,
            TaskProgress::Publishing(_) => std::future::pending().await,
        }
    }

    /// Starts publishing (after [`TaskProgress::first_report`] returned):
    /// `template` is the event each report fills in.
    pub(super) fn publish(&mut self, out: &Outbox, template: impl FnOnce() -> Event) {
        if let TaskProgress::Quiet(w) = self {
            let w = w.clone();
            *self = TaskProgress::Publishing(ProgressEvents::start(out.clone(), template(), w));
        }
    }

    /// Stops publishing, if it started (see [`ProgressEvents::finish`]).
    pub(super) async fn finish(self) {
        if let TaskProgress::Publishing(p) = self {
            p.finish().await;
        }
    }
}
