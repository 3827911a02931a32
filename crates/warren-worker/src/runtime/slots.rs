//! The concurrency a running task holds.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::metrics::WorkerMetrics;

/// One of `worker.concurrency`'s slots and, for a type capped by
/// `worker.type_concurrency`, one of its type's. Dropped as soon as the
/// handler returns.
pub(super) struct Slot {
    pool: Arc<Semaphore>,
    general: Option<OwnedSemaphorePermit>,
    typed: Option<OwnedSemaphorePermit>,
}

impl Slot {
    /// A slot holding `general`, one of `pool`'s permits.
    pub(super) fn new(pool: Arc<Semaphore>, general: OwnedSemaphorePermit) -> Self {
        Slot {
            pool,
            general: Some(general),
            typed: None,
        }
    }

    /// Takes one of the type's slots. While the type is at its cap, the
    /// general slot is given back so other types keep running, and taken
    /// again once the type has room. False if aborted while waiting.
    pub(super) async fn take_typed(
        &mut self,
        cap: &Arc<Semaphore>,
        abort: &CancellationToken,
    ) -> bool {
        if let Ok(p) = cap.clone().try_acquire_owned() {
            self.typed = Some(p);
            return true;
        }
        self.general = None;
        debug!("task type at its concurrency cap: waiting for a slot");
        tokio::select! {
            p = cap.clone().acquire_owned() => self.typed = Some(p.expect("the semaphore is never closed")),
            _ = abort.cancelled() => return false,
        }
        tokio::select! {
            p = self.pool.clone().acquire_owned() => self.general = Some(p.expect("the semaphore is never closed")),
            _ = abort.cancelled() => return false,
        }
        true
    }
}

/// Counts a handler as running until dropped.
pub(super) struct Running<'a>(&'a WorkerMetrics);

impl<'a> Running<'a> {
    /// Counts one more running handler.
    pub(super) fn start(metrics: &'a WorkerMetrics) -> Self {
        metrics.running(1);
        Running(metrics)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running(-1);
    }
}
