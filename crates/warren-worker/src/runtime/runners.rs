//! Long-lived tasks that run attempts one after another.
//!
//! A task spawned per delivery costs, per task, an allocation the size of
//! an attempt's future (several kilobytes: past the allocator's fast bins),
//! the copy of that future into it, and its freeing. A runner is spawned
//! once and runs each attempt it is handed in place, inside its own future:
//! starting a task costs a hand-over instead (an idle runner taken from a
//! stack, its job set, one wake). The pool grows to the most attempts that
//! ran at once (the worker's concurrency, more while a type waits for its
//! cap in [`Slot::take_typed`](super::slots::Slot::take_typed)); idle runners
//! end when the pool is closed, busy ones once their attempt is settled.
//!
//! A job holds a token of the worker's task tracker from its hand-over to
//! its end, so the drain waits for attempts run here as for spawned ones.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TaskTrackerToken;

use super::attempt::Attempt;
use super::session::Session;
use super::slots::Slot;
use super::{Held, Shared};

/// One attempt to run: a held delivery, the session it came on and the
/// slot it holds.
pub(super) struct Job {
    pub(super) session: Arc<Session>,
    pub(super) held: Held,
    pub(super) slot: Slot,
    /// Counts the job as running in the worker's tracker until dropped.
    pub(super) token: TaskTrackerToken,
}

/// The runners of one [`Worker::run`](super::Worker::run) (see the module's
/// documentation).
pub(super) struct Runners {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    /// Aborts the attempts at the end of the grace period.
    abort: CancellationToken,
    idle: Mutex<Idle>,
}

#[derive(Default)]
struct Idle {
    runners: Vec<Arc<Runner>>,
    /// Set by [`Runners::close`]: a runner done with its job ends instead of
    /// waiting for another.
    closed: bool,
}

/// What the pool holds of one runner: where its next job is put, and how
/// it is woken.
#[derive(Default)]
struct Runner {
    job: Mutex<Option<Job>>,
    wake: Notify,
}

impl Runners {
    /// An empty pool whose attempts run with `shared` and are aborted by
    /// `abort`.
    pub(super) fn new(shared: Arc<Shared>, abort: CancellationToken) -> Self {
        Runners {
            inner: Arc::new(Inner {
                shared,
                abort,
                idle: Mutex::new(Idle::default()),
            }),
        }
    }

    /// Runs `job` on an idle runner, or on a new one if none is idle.
    pub(super) fn run(&self, job: Job) {
        let idle = lock(&self.inner.idle).runners.pop();
        let runner = idle.unwrap_or_else(|| {
            let runner = Arc::new(Runner::default());
            // Boxed: the runner's future holds an attempt's; spawned as it
            // is, it would be copied whole into the task.
            tokio::spawn(Box::pin(run(self.inner.clone(), runner.clone())));
            runner
        });
        *lock(&runner.job) = Some(job);
        runner.wake.notify_one();
    }

    /// Ends the idle runners, and each busy one once its job is done.
    pub(super) fn close(&self) {
        let idle = {
            let mut idle = lock(&self.inner.idle);
            idle.closed = true;
            std::mem::take(&mut idle.runners)
        };
        for runner in idle {
            runner.wake.notify_one();
        }
    }
}

impl Drop for Runners {
    fn drop(&mut self) {
        self.close();
    }
}

/// A runner's life: each job it is handed, then back to the idle stack,
/// until the pool is closed.
async fn run(inner: Arc<Inner>, me: Arc<Runner>) {
    loop {
        me.wake.notified().await;
        let Some(job) = lock(&me.job).take() else {
            if lock(&inner.idle).closed {
                return;
            }
            continue;
        };
        let Job {
            session,
            held,
            slot,
            token,
        } = job;
        let Held {
            source,
            delivery,
            since,
            release,
            ..
        } = held;
        let delivery: (_, Instant) = (delivery, since);
        Attempt::run(
            &inner.shared,
            &session,
            &source,
            delivery,
            &inner.abort,
            slot,
        )
        .await;
        drop(release);
        drop(token);
        drop(session);
        let mut idle = lock(&inner.idle);
        if idle.closed {
            return;
        }
        idle.runners.push(me.clone());
    }
}

/// Locks `m`; a poisoned lock (a panic while it was held) is taken as it
/// is: what it guards stays consistent at every await-free step.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
