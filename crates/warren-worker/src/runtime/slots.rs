//! The concurrency a running task holds.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::flow::Permit;
use super::session::Session;
use crate::metrics::WorkerMetrics;

/// One of `worker.concurrency`'s slots and, for a type capped by
/// `worker.type_concurrency`, one of its type's; for a type with a global
/// concurrency limit, its permit too. Dropped as soon as the handler
/// returns.
pub(super) struct Slot {
    pool: Arc<Semaphore>,
    general: Option<OwnedSemaphorePermit>,
    typed: Option<OwnedSemaphorePermit>,
    /// The global concurrency permit and the session whose connection
    /// owns it: given back first when the slot is dropped, so that the
    /// next task the freed slot starts finds it kept idle.
    flow: Option<(Permit, Arc<Session>)>,
}

impl Slot {
    /// A slot holding `general`, one of `pool`'s permits.
    pub(super) fn new(pool: Arc<Semaphore>, general: OwnedSemaphorePermit) -> Self {
        Slot {
            pool,
            general: Some(general),
            typed: None,
            flow: None,
        }
    }

    /// The slot holding the global concurrency permit `permit` too, if any.
    pub(super) fn with_permit(mut self, permit: Option<Permit>, session: &Arc<Session>) -> Self {
        self.flow = permit.map(|p| (p, session.clone()));
        self
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

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some((permit, session)) = self.flow.take() {
            permit.release(&session);
        }
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
