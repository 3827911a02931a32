//! Consuming, running and acknowledging: the worker's main loop.
//!
//! - this module: the worker, its reconnect loop, the consume loop and the
//!   drain at shutdown;
//! - [`session`]: one connection's channels and consumers;
//! - [`attempt`]: one delivery from triage to its ack, and what each
//!   outcome confirms first;
//! - [`slots`]: the concurrency a running task holds;
//! - [`waiting`]: the deliveries waiting for a slot, highest priority first;
//! - [`progress`]: a running task's `progress` events;
//! - [`pausing`]: paused work queues and task types;
//! - [`flow`]: global concurrency permits and unique keys, in the broker;
//! - [`rate`]: rate limits' tokens, in the broker.
//! - [`tenants`]: tenant queues and their directories (tenant fairness).

mod acks;
mod attempt;
mod flow;
mod pausing;
mod progress;
mod rate;
mod runners;
mod session;
mod slots;
mod tenants;
mod waiting;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::StreamExt;
use futures::FutureExt;
use lapin::message::Delivery;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use warren_client::runtime::{now_ms, process_identity, CancelSet, Reconnect};
use warren_core::escrow::EscrowTimes;
use warren_core::lanes::Bands;
use warren_core::pauses::PauseKind;
use warren_core::{headers, Config, Names};

use crate::metrics::WorkerMetrics;
use crate::Registry;
use attempt::Attempt;
use session::{Deliveries, Session};
use slots::Slot;
use waiting::Waiting;

/// Why a worker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The configuration names no queue to consume.
    #[error("worker has no queues to consume: set worker.queues or add [[queues]]")]
    NoQueues,
}

/// Runs handlers for tasks from the configured work queues.
pub struct Worker {
    shared: Arc<Shared>,
}

/// What every attempt of this worker reads.
struct Shared {
    config: Arc<Config>,
    names: Names,
    registry: Registry,
    identity: String,
    /// Every queue consumed: work queues, and the lanes of those sorted
    /// by lanes.
    sources: Vec<Arc<Source>>,
    routing_exchanges: [String; 2],
    cancels: CancelSet,
    /// When tasks go into escrow; `None`: the broker has no consumer timeout.
    escrow: Option<EscrowTimes>,
    /// Semaphores of the types capped by `worker.type_concurrency`.
    type_caps: BTreeMap<String, Arc<Semaphore>>,
    /// Global concurrency limits (`flow.concurrency`).
    limits: flow::Limits,
    /// Rate limits (`flow.rate`).
    rates: rate::Rates,
    /// The tenant queues of the work queues with `tenants = true`.
    tenants: tenants::Tenants,
    metrics: Arc<WorkerMetrics>,
    /// Moving average of handler run times, in microseconds (0: none yet).
    task_time_us: AtomicU64,
}

/// A queue the worker consumes.
pub(super) struct Source {
    /// The short name of its work queue (`io`), as events and metrics name it.
    short: String,
    /// The full name of the queue consumed; hand-backs go back to it.
    full: String,
    /// The highest priority its work queue honours.
    max_priority: u8,
    /// Its part in its work queue's lanes.
    kind: SourceKind,
}

/// What a consumed queue is to its work queue.
enum SourceKind {
    /// A work queue without lanes (classic, or quorum with one lane).
    Plain,
    /// The entry of a quorum work queue with lanes: what cannot start at
    /// once moves to `lanes[bands.lane_of(priority)]`.
    Entry {
        /// Which lane each priority goes to.
        bands: Bands,
        /// The full names of the lanes, lowest first.
        lanes: Vec<String>,
    },
    /// Lane `k` of a quorum work queue.
    Lane(u8),
    /// A tenant queue (or the overflow) of a work queue with tenants: run
    /// as it comes, never moved again.
    Tenant,
    /// The directory stream of a work queue's tenant queues: read, never
    /// run.
    Directory,
}

impl Source {
    /// The sources of one work queue: itself, then its lanes if it has any.
    fn of(
        config: &Config,
        names: &Names,
        q: &warren_core::config::QueueConfig,
    ) -> Vec<Arc<Source>> {
        let source = |full: String, kind| {
            Arc::new(Source {
                short: q.name.clone(),
                full,
                max_priority: q.max_priority,
                kind,
            })
        };
        let Some(bands) = config.queue_bands(q) else {
            return vec![source(names.work_queue(&q.name), SourceKind::Plain)];
        };
        let lanes: Vec<String> = (0..bands.lanes())
            .map(|k| names.lane_queue(&q.name, k))
            .collect();
        let mut out = vec![source(
            names.work_queue(&q.name),
            SourceKind::Entry {
                bands,
                lanes: lanes.clone(),
            },
        )];
        for (k, full) in (0u8..).zip(lanes) {
            out.push(source(full, SourceKind::Lane(k)));
        }
        out
    }

    /// Which consumers it opens with: 0 work queues and lane entries (the
    /// worker's prefetch), 1 lanes, 2 tenant queues (both
    /// [`Shared::lane_prefetch`]), 3 a directory (on its own channel).
    fn group(&self) -> u8 {
        match self.kind {
            SourceKind::Plain | SourceKind::Entry { .. } => 0,
            SourceKind::Lane(_) => 1,
            SourceKind::Tenant => 2,
            SourceKind::Directory => 3,
        }
    }

    /// True for a work queue itself (not a lane, tenant queue or
    /// directory): where tasks with a tenant move from.
    fn is_entry(&self) -> bool {
        self.group() == 0
    }

    /// True for the entry of a work queue with lanes, whose deliveries
    /// that cannot start at once move to their lane.
    fn sorts(&self) -> bool {
        matches!(self.kind, SourceKind::Entry { .. })
    }

    /// The queue as logs and consumer tags name it: `io`, `io.lane.2`.
    fn label(&self) -> String {
        match self.kind {
            SourceKind::Lane(k) => format!("{}.lane.{k}", self.short),
            SourceKind::Tenant | SourceKind::Directory => self
                .full
                .rsplit_once(".q.")
                .map_or(self.full.clone(), |(_, tail)| tail.to_owned()),
            _ => self.short.clone(),
        }
    }

    /// Where a delivery waits among others: its priority (unset: 0), at
    /// most its queue's highest. Lanes split priorities in ascending bands,
    /// so a higher rank is never in a lower lane.
    fn rank(&self, d: &Delivery) -> u8 {
        d.properties.priority().unwrap_or(0).min(self.max_priority)
    }

    /// The lane a delivery from this entry moves to; `None` unless it is an
    /// entry.
    fn lane_for(&self, d: &Delivery) -> Option<&str> {
        match &self.kind {
            SourceKind::Entry { bands, lanes } => {
                let k = usize::from(bands.lane_of(*d.properties.priority()));
                lanes.get(k).map(String::as_str)
            }
            _ => None,
        }
    }
}

/// How much work, at the average run time seen, the tasks waiting in a
/// worker may amount to for one more task from a lane entry to wait with
/// them rather than move to its lane (see [`Shared::holds_entry`]).
const HOLD_ENTRY_WORK: Duration = Duration::from_millis(50);

impl Shared {
    /// The prefetch of lane consumers: about what the slots can start
    /// (twice `concurrency`, so a slot finds the next task already there),
    /// at most `prefetch`. The rest of a backlog stays in the broker,
    /// sorted by lane, for any worker to take.
    fn lane_prefetch(&self, prefetch: u16) -> u16 {
        let two_rounds = self.config.worker.concurrency.saturating_mul(2);
        prefetch
            .min(u16::try_from(two_rounds).unwrap_or(u16::MAX))
            .max(1)
    }

    /// Adds one handler's run time to the moving average.
    fn note_task_time(&self, took: Duration) {
        let x = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
        let old = self.task_time_us.load(Ordering::Relaxed);
        let new = if old == 0 { x } else { old - old / 8 + x / 8 };
        self.task_time_us.store(new.max(1), Ordering::Relaxed);
    }

    /// Whether a task from a lane entry that cannot start at once waits in
    /// the worker rather than moving to its lane: while the tasks waiting
    /// here, it included, amount to under [`HOLD_ENTRY_WORK`] at the
    /// average run time seen (never before one is known). The worker then
    /// reads the entry as fast as its slots run tasks, so a high priority
    /// behind a backlog of short tasks is read sooner than moving each one
    /// would (a move is a confirmed publish and an ack on a quorum queue),
    /// and is sorted among what waits here; tasks that take longer move, so
    /// the entry is read at the pace of the moves.
    fn holds_entry(&self, waiting: usize) -> bool {
        let t = self.task_time_us.load(Ordering::Relaxed);
        if t == 0 {
            return false;
        }
        let slots = self.config.worker.concurrency.max(1) as u128;
        let work_us = (waiting as u128 + 1) * u128::from(t) / slots;
        work_us < HOLD_ENTRY_WORK.as_micros()
    }

    /// The prefetch to consume with again after handing tasks back: enough
    /// to keep every slot busy for half of `worker.handback_ms` at the
    /// average run time seen, at least `concurrency`, at most `prefetch`.
    /// So a worker whose tasks take long keeps only what it can start soon,
    /// and one whose tasks are short keeps its whole prefetch.
    fn resume_prefetch(&self) -> u16 {
        let w = &self.config.worker;
        let t = u128::from(self.task_time_us.load(Ordering::Relaxed));
        if t == 0 || w.handback_ms == 0 {
            return w.prefetch;
        }
        let slots = w.concurrency as u128;
        let soon = slots * u128::from(w.handback_ms) * 500 / t;
        (slots + soon).clamp(slots, u128::from(w.prefetch)) as u16
    }
    /// The type as a metrics label: types without a handler share one label,
    /// so hostile routing keys cannot grow the metrics without bound.
    fn label<'a>(&self, task_type: &'a str) -> &'a str {
        if self.registry.get(task_type).is_some() {
            task_type
        } else {
            "_unregistered"
        }
    }
}

/// Tasks in flight and how to stop them, across sessions.
struct InFlight {
    tracker: TaskTracker,
    /// Where attempts started in a free slot run.
    runners: runners::Runners,
    abort: CancellationToken,
    /// The worker's shutdown: tasks waiting for a permit or a token stop
    /// waiting.
    stop: CancellationToken,
    permits: Arc<Semaphore>,
    /// Bytes of the bodies of the deliveries held, waiting or in flight.
    held: Arc<AtomicUsize>,
    /// Told each time a delivery is settled and its bytes released.
    freed: Arc<Notify>,
}

impl InFlight {
    /// Counts `delivery`'s body in `held` until the guard is dropped.
    fn hold(&self, delivery: Delivery, source: Arc<Source>) -> Held {
        let bytes = delivery.data.len();
        self.held.fetch_add(bytes, Ordering::Relaxed);
        Held {
            rank: source.rank(&delivery),
            source,
            delivery,
            since: Instant::now(),
            release: Release {
                bytes,
                held: self.held.clone(),
                freed: self.freed.clone(),
            },
        }
    }
}

/// A delivery taken from a work queue, its body counted in
/// [`InFlight::held`] until it is settled (or dropped unstarted, when it
/// returns to the queue with the channel).
struct Held {
    /// The queue it came from.
    source: Arc<Source>,
    /// Its place among the waiting: see [`Source::rank`].
    rank: u8,
    delivery: Delivery,
    /// When it arrived.
    since: Instant,
    release: Release,
}

/// A delivery's share of [`InFlight::held`], given back on drop.
struct Release {
    bytes: usize,
    held: Arc<AtomicUsize>,
    freed: Arc<Notify>,
}

impl Drop for Release {
    fn drop(&mut self) {
        self.held.fetch_sub(self.bytes, Ordering::Relaxed);
        self.freed.notify_one();
    }
}

/// Why the worker is not consuming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pause {
    /// It is consuming.
    No,
    /// Every slot is held by a long task.
    Slots,
    /// Its deliveries' bodies reached `worker.max_held_bytes`.
    Bytes,
}

impl Worker {
    /// A worker for `config`, running the handlers of `registry`.
    pub fn new(config: Config, registry: Registry) -> Result<Self, WorkerError> {
        let names = config.names();
        let sources: Vec<Arc<Source>> = config
            .worker_queues()
            .into_iter()
            .flat_map(|q| Source::of(&config, &names, q))
            .collect();
        if sources.is_empty() {
            return Err(WorkerError::NoQueues);
        }
        let routing_exchanges = [names.tasks(), names.unroutable()];
        let config_concurrency = config.worker.concurrency;
        let escrow = EscrowTimes::from_config(&config);
        // Escrow copies of other workers may come back here whether or not
        // this worker puts tasks in escrow itself: keep their leases.
        let cancels = CancelSet::new().keep_leases(EscrowTimes {
            after_ms: escrow.map_or(0, |t| t.after_ms),
            lease_ms: config.worker.escrow_lease_ms,
        });
        let limits = flow::Limits::new(&config.flow);
        let rates = rate::Rates::new(&config.flow);
        let tenants = tenants::Tenants::new(&config, &names);
        let type_caps = config
            .worker
            .type_concurrency
            .iter()
            .map(|(t, &n)| (t.clone(), Arc::new(Semaphore::new(n))))
            .collect();
        Ok(Worker {
            shared: Arc::new(Shared {
                config: Arc::new(config),
                names,
                registry,
                identity: process_identity(),
                sources,
                routing_exchanges,
                cancels: cancels.clone(),
                escrow,
                type_caps,
                limits,
                rates,
                tenants,
                metrics: Arc::new(WorkerMetrics::new(config_concurrency, cancels.clone())),
                task_time_us: AtomicU64::new(0),
            }),
        })
    }

    /// What this worker reports on `/metrics` and `/readyz`.
    pub fn probe(&self) -> Arc<dyn warren_ops::Probe> {
        self.shared.metrics.clone()
    }

    /// Consumes until `shutdown` is cancelled, reconnecting with backoff when
    /// the broker goes away, then drains: running tasks get the grace period
    /// to finish; the rest are aborted and returned unacknowledged.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), WorkerError> {
        let sh = &self.shared;
        let max_backoff = Duration::from_millis(sh.config.broker.reconnect_max_ms);
        // Know every cancel published so far before taking a task.
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let follower = {
            let cancels = sh.cancels.clone();
            let (broker, names, stop) =
                (sh.config.broker.clone(), sh.names.clone(), shutdown.clone());
            tokio::spawn(async move {
                cancels
                    .follow(broker, names, max_backoff, stop, ready_tx)
                    .await
            })
        };
        tokio::select! {
            r = ready_rx => if r.is_ok() { sh.metrics.link.cancels_known() },
            _ = shutdown.cancelled() => {}
        }
        let abort = CancellationToken::new();
        let in_flight = InFlight {
            tracker: TaskTracker::new(),
            runners: runners::Runners::new(self.shared.clone(), abort.clone()),
            abort,
            stop: shutdown.clone(),
            permits: Arc::new(Semaphore::new(sh.config.worker.concurrency)),
            held: Arc::new(AtomicUsize::new(0)),
            freed: Arc::new(Notify::new()),
        };
        // Kept alive until the drain is over: dropping the consumers or the
        // channel would return running tasks to the queue before they ack.
        let mut kept: Option<(Arc<Session>, Deliveries)> = None;
        let mut retry = Reconnect::new("worker", max_backoff);
        while retry.ready(&shutdown).await {
            let (session, mut stream) = match Session::open(sh).await {
                Ok(opened) => opened,
                Err(e) => {
                    retry.lost(&e);
                    continue;
                }
            };
            retry.up();
            sh.metrics.link.consuming(true);
            let session = Arc::new(session);
            info!(
                queues = ?sh.sources.iter().map(|q| q.label()).collect::<Vec<_>>(),
                concurrency = sh.config.worker.concurrency,
                prefetch = sh.config.worker.prefetch,
                "worker consuming"
            );
            let ended = self
                .consume(&session, &mut stream, &shutdown, &in_flight)
                .await;
            sh.metrics.link.consuming(false);
            if shutdown.is_cancelled() {
                kept = Some((session, stream));
                break;
            }
            sh.metrics.link.reconnect();
            retry.lost(&format!("connection lost: {ended}"));
        }
        self.drain(in_flight, kept).await;
        let _ = follower.await;
        Ok(())
    }

    async fn drain(&self, in_flight: InFlight, kept: Option<(Arc<Session>, Deliveries)>) {
        if let Some((s, _)) = &kept {
            s.stop_consuming().await;
        }
        let InFlight {
            tracker,
            abort,
            runners,
            ..
        } = in_flight;
        let grace = Duration::from_millis(self.shared.config.worker.grace_period_ms);
        tracker.close();
        if !tracker.is_empty() {
            info!(running = tracker.len(), ?grace, "draining running tasks");
        }
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            warn!(
                running = tracker.len(),
                "grace period over: aborting running tasks, returning them unacknowledged"
            );
            abort.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
        }
        runners.close();
        if let Some((s, stream)) = kept {
            drop(stream);
            s.close().await;
        }
        info!("worker stopped");
    }

    /// Takes deliveries until the connection dies (returns why) or shutdown.
    ///
    /// A delivery waits here for a slot; a free slot takes the highest
    /// priority waiting first (see [`Waiting`]). A delivery from the entry of
    /// a work queue with lanes never waits: it starts at once if a slot is
    /// free and nothing of its priority or higher waits, else it moves to
    /// the lane of its priority (see [`Attempt::move_to_lane`]).
    ///
    /// A work queue paused fleet-wide is not consumed (nor its lanes), and
    /// a delivery of a paused queue or task type never starts: see
    /// [`Worker::apply_pauses`].
    ///
    /// The worker stops consuming in two cases, and consumes again once the
    /// case is over:
    ///
    /// - the oldest waiting delivery has waited `worker.handback_ms` with
    ///   every slot busy (long tasks): every waiting delivery is handed back
    ///   to its queue, so a worker with a free slot takes them; over once a
    ///   slot is free and nothing waits. Lane entries are still consumed
    ///   meanwhile, their deliveries sorted into lanes;
    /// - the bodies of the deliveries it holds (waiting, running or being
    ///   recorded) reach `worker.max_held_bytes`: over once they are below
    ///   half of it.
    async fn consume(
        &self,
        session: &Arc<Session>,
        stream: &mut Deliveries,
        shutdown: &CancellationToken,
        in_flight: &InFlight,
    ) -> String {
        let sh = &self.shared;
        let handback = Duration::from_millis(sh.config.worker.handback_ms);
        let budget = sh.config.worker.max_held_bytes;
        let held = || in_flight.held.load(Ordering::Relaxed);
        let mut waiting = Waiting::default();
        let mut paused = Pause::No;
        // The prefetch of the open consumers (RabbitMQ applies one when a
        // consumer opens).
        let mut prefetch = sh.config.worker.prefetch;
        let mut pause_changes = sh.cancels.pause_changes();
        // Pauses read before this session's consumers opened are applied;
        // those read since then too.
        let mut known = sh.cancels.pauses();
        if let Err(e) = self
            .apply_pauses(session, stream, in_flight, &mut waiting, paused, prefetch)
            .await
        {
            return e.to_string();
        }
        // Tasks parked while their type was paused, resumed while this
        // worker was away, go back to their queues.
        for t in known.resumed_types() {
            self.move_back(session, in_flight, t, shutdown);
        }
        loop {
            while !waiting.is_empty() {
                let Ok(permit) = in_flight.permits.clone().try_acquire_owned() else {
                    break;
                };
                let next = waiting.pop().expect("not empty");
                self.start(session, in_flight, next, permit);
            }
            let slots_free = waiting.is_empty() && in_flight.permits.available_permits() > 0;
            if paused == Pause::Slots && slots_free && held() >= budget {
                // A slot is free, but the bytes held are still too many:
                // wait for them to be released instead.
                paused = Pause::Bytes;
            }
            let over = match paused {
                Pause::No => false,
                Pause::Slots => !slots_free,
                Pause::Bytes => held() >= budget / 2,
            };
            if paused != Pause::No && !over {
                prefetch = if paused == Pause::Slots {
                    sh.resume_prefetch()
                } else {
                    sh.config.worker.prefetch
                };
                if let Err(e) = session.resume(sh, stream, prefetch).await {
                    return e.to_string();
                }
                paused = Pause::No;
                sh.metrics.paused(false);
                debug!(prefetch, "consuming again");
            }
            if paused == Pause::No && prefetch < sh.config.worker.prefetch {
                // Consuming with less after long tasks, and they got
                // shorter: take the larger prefetch again.
                let want = sh.resume_prefetch();
                if want >= prefetch.saturating_mul(2) {
                    session.stop_consuming().await;
                    if let Err(e) = session.resume(sh, stream, want).await {
                        return e.to_string();
                    }
                    debug!(
                        from = prefetch,
                        to = want,
                        "tasks got shorter: prefetch raised"
                    );
                    prefetch = want;
                }
            }
            let hand_back_at = match waiting.oldest() {
                Some(since) if !handback.is_zero() => Some(since + handback),
                _ => None,
            };
            // Returning drops what still waits: never started, it goes back
            // to the queue with the channel.
            tokio::select! {
                _ = shutdown.cancelled() => return "shutdown".into(),
                p = in_flight.permits.clone().acquire_owned(), if !waiting.is_empty() || paused == Pause::Slots => {
                    let permit = p.expect("the semaphore is never closed");
                    if let Some(next) = waiting.pop() {
                        self.start(session, in_flight, next, permit);
                    }
                }
                _ = in_flight.freed.notified(), if paused == Pause::Bytes => {}
                r = pause_changes.changed() => {
                    if r.is_err() {
                        return "pause records no longer followed".into();
                    }
                    if let Err(e) = self
                        .apply_pauses(session, stream, in_flight, &mut waiting, paused, prefetch)
                        .await
                    {
                        return e.to_string();
                    }
                    let now = sh.cancels.pauses();
                    for (t, _) in known.paused() {
                        if t.kind == PauseKind::Type && !now.is_paused(&t) {
                            self.move_back(session, in_flight, t.name, shutdown);
                        }
                    }
                    known = now;
                }
                next = stream.next(), if !stream.is_empty() => {
                    // What the connection has already read is taken in
                    // this turn of the loop, not one turn per delivery.
                    let mut next = next;
                    loop {
                        let more = matches!(next, Some((_, Ok(_))));
                        match next {
                            None if paused != Pause::No || self.some_queue_paused() => {}
                            None => return "consumers ended".into(),
                            Some((_, Err(e))) => return e.to_string(),
                            Some((source, Ok(d))) if matches!(source.kind, SourceKind::Directory) => {
                                if let Err(e) = self.learn(session, stream, &source, d, paused, prefetch).await {
                                    return e.to_string();
                                }
                            }
                            Some((source, Ok(d))) => {
                                session.acks.delivered(d.delivery_tag);
                                let d = in_flight.hold(d, source);
                                if self.changed(&d) {
                                    // Its change is applied at once, not when its
                                    // turn comes: its new place may be ahead.
                                    self.hand_back(session, in_flight, d);
                                } else if self.held_by_pause(&d) {
                                    // Sent before its consumer stopped, or its type
                                    // is paused.
                                    self.hold_back(session, in_flight, d);
                                } else if self.to_tenant(&d) {
                                    self.move_to_tenant(session, in_flight, d);
                                } else if d.source.sorts() {
                                    self.sort(session, in_flight, &mut waiting, d);
                                } else if paused == Pause::Slots {
                                    // Sent before the consumers stopped.
                                    self.hand_back(session, in_flight, d);
                                } else {
                                    waiting.push(d);
                                }
                                // Also while paused for slots: lane entries are
                                // still consumed then.
                                if paused != Pause::Bytes && held() >= budget {
                                    session.stop_consuming().await;
                                    paused = Pause::Bytes;
                                    sh.metrics.paused(true);
                                    sh.metrics.pause(false);
                                    debug!(held = held(), "worker.max_held_bytes reached: not consuming");
                                }
                            }
                        }
                        if !more || paused == Pause::Bytes {
                            break;
                        }
                        match stream.next().now_or_never() {
                            Some(n) => next = n,
                            None => break,
                        }
                    }
                }
                _ = sleep_until_some(hand_back_at) => {
                    if paused == Pause::No {
                        session.stop_running().await;
                        sh.metrics.paused(true);
                    }
                    if paused != Pause::Slots {
                        sh.metrics.pause(true);
                    }
                    paused = Pause::Slots;
                    debug!(waiting = waiting.len(), "every slot busy: handing back what waits");
                    for d in waiting.drain() {
                        self.hand_back(session, in_flight, d);
                    }
                }
                _ = tokio::time::sleep(Duration::from_secs(1)), if stream.is_empty() => {
                    if !session.connected() {
                        return "connection lost while paused".into();
                    }
                }
            }
        }
    }

    /// Applies what is paused now: stops the consumers of paused work
    /// queues, holds back what waits of a paused queue or type (see
    /// [`Attempt::hold_back`]), and consumes again the queues resumed,
    /// unless the worker is not consuming for another reason (it consumes
    /// them too once that is over).
    async fn apply_pauses(
        &self,
        session: &Arc<Session>,
        stream: &mut Deliveries,
        in_flight: &InFlight,
        waiting: &mut Waiting,
        paused: Pause,
        prefetch: u16,
    ) -> Result<(), warren_client::ClientError> {
        let sh = &self.shared;
        session.stop_paused(sh).await;
        for d in waiting.take_where(|d| self.held_by_pause(d)) {
            self.hold_back(session, in_flight, d);
        }
        if paused == Pause::No {
            session.resume(sh, stream, prefetch).await?;
        }
        Ok(())
    }

    /// Reads one record of a tenant directory (and acknowledges it, as a
    /// stream wants): a tenant queue not known before is consumed from now
    /// on, unless the worker is not consuming (it is then consumed on
    /// resume, as every queue).
    async fn learn(
        &self,
        session: &Arc<Session>,
        stream: &mut Deliveries,
        source: &Source,
        d: Delivery,
        paused: Pause,
        prefetch: u16,
    ) -> Result<(), warren_client::ClientError> {
        let sh = &self.shared;
        let _ = d
            .acker
            .ack(lapin::options::BasicAckOptions::default())
            .await;
        if !sh.tenants.learn(&sh.names, &source.short, &d.data) {
            return Ok(());
        }
        sh.metrics.tenant_queues(sh.tenants.known());
        if paused == Pause::No {
            session.resume(sh, stream, prefetch).await?;
        }
        Ok(())
    }

    /// Whether a held delivery moves to its tenant's queue: it came from a
    /// work queue with tenants and carries `x-warren-tenant` (valid or not:
    /// the move parks a bad one dead `invalid`).
    fn to_tenant(&self, d: &Held) -> bool {
        d.source.is_entry()
            && self.shared.tenants.of(&d.source.short).is_some()
            && warren_core::tenants::has_tenant(d.delivery.properties.headers().as_ref())
    }

    /// Moves a held delivery to its tenant's queue (see
    /// [`Attempt::move_to_tenant`]).
    fn move_to_tenant(&self, session: &Arc<Session>, in_flight: &InFlight, d: Held) {
        let shared = self.shared.clone();
        let session = session.clone();
        in_flight.tracker.spawn(async move {
            Attempt::move_to_tenant(&shared, &session, &d.source, d.delivery).await;
            drop(d.release);
        });
    }

    /// Whether a pause applies to a held delivery: its work queue or its
    /// task type is paused.
    fn held_by_pause(&self, d: &Held) -> bool {
        let c = &self.shared.cancels;
        c.queue_paused(&d.source.short)
            || (c.any_type_paused() && c.type_paused(&pausing::type_of(&self.shared, &d.delivery)))
    }

    /// Whether one of the work queues this worker consumes is paused.
    fn some_queue_paused(&self) -> bool {
        let sh = &self.shared;
        sh.sources.iter().any(|s| sh.cancels.queue_paused(&s.short))
    }

    /// Holds back a delivery a pause applies to (see [`Attempt::hold_back`]).
    fn hold_back(&self, session: &Arc<Session>, in_flight: &InFlight, d: Held) {
        let shared = self.shared.clone();
        let session = session.clone();
        in_flight.tracker.spawn(async move {
            Attempt::hold_back(&shared, &session, &d.source, d.delivery).await;
            drop(d.release);
        });
    }

    /// Moves the parked tasks of the resumed type `t` back to their queues
    /// (see [`pausing::move_back`]).
    fn move_back(
        &self,
        session: &Arc<Session>,
        in_flight: &InFlight,
        t: String,
        shutdown: &CancellationToken,
    ) {
        let shared = self.shared.clone();
        let session = session.clone();
        let stop = shutdown.clone();
        in_flight.tracker.spawn(async move {
            pausing::move_back(&shared, &session, &t, Some(&stop)).await;
        });
    }

    /// Runs a held delivery in a slot. One of a type with flow limits runs
    /// at once if what it needs is at hand in this worker (a permit kept
    /// idle, a token left from a batch), else it waits for it (see
    /// [`run_limited`]).
    fn start(
        &self,
        session: &Arc<Session>,
        in_flight: &InFlight,
        d: Held,
        permit: OwnedSemaphorePermit,
    ) {
        let mut flow_permit = None;
        if let Some(gate) = self.limited(&d) {
            match self.at_hand(session, &d, &gate) {
                Some(p) => flow_permit = p,
                None => return self.start_limited(session, in_flight, d, gate, permit),
            }
        }
        let slot = Slot::new(in_flight.permits.clone(), permit).with_permit(flow_permit, session);
        in_flight.runners.run(runners::Job {
            session: session.clone(),
            held: d,
            slot,
            token: in_flight.tracker.token(),
        });
    }

    /// What a limited delivery needs, if this worker has it at hand with
    /// no trip to the broker: `Some` with its permit (if its type has a
    /// concurrency limit); `None` if it must wait (or its key cannot be
    /// used: [`run_limited`] then sends it to triage).
    fn at_hand(
        &self,
        session: &Arc<Session>,
        d: &Held,
        gate: &Gate,
    ) -> Option<Option<flow::Permit>> {
        let sh = &self.shared;
        let (permit_key, rate_key) = gate.keys(&d.delivery).ok()?;
        let permit = match &gate.permits {
            Some(p) => Some(p.for_key(permit_key).take_idle(&session.conn)?),
            None => None,
        };
        if let Some(rate) = &gate.rate {
            let w = rate.window(&sh.names, rate_key);
            if !sh.rates.take_local(rate, &w, &sh.metrics) {
                release(permit, session);
                return None;
            }
            if sh.rates.refill_due(rate, &w) {
                let (sh, session, rate) = (self.shared.clone(), session.clone(), rate.clone());
                tokio::spawn(async move {
                    sh.rates.refill(&rate, &w, &session.conn, &sh.metrics).await;
                });
            }
        }
        Some(permit)
    }

    /// The flow limits of a held delivery's type (global concurrency, rate),
    /// if it has any.
    fn limited(&self, d: &Held) -> Option<Gate> {
        let sh = &self.shared;
        if sh.config.flow.concurrency.is_empty() && sh.rates.is_empty() {
            return None;
        }
        let task_type = pausing::type_of(sh, &d.delivery);
        let gate = Gate {
            permits: sh.limits.of(&task_type),
            rate: sh.rates.of(&task_type),
        };
        (gate.permits.is_some() || gate.rate.is_some()).then_some(gate)
    }

    /// Runs a delivery of a type with flow limits, holding the slot
    /// `slot` (see [`run_limited`]).
    fn start_limited(
        &self,
        session: &Arc<Session>,
        in_flight: &InFlight,
        d: Held,
        gate: Gate,
        slot: OwnedSemaphorePermit,
    ) {
        let shared = self.shared.clone();
        let session = session.clone();
        let abort = in_flight.abort.clone();
        let stop = in_flight.stop.clone();
        let pool = in_flight.permits.clone();
        in_flight.tracker.spawn(Box::pin(async move {
            run_limited(&shared, &session, d, gate, &abort, &stop, pool, slot).await;
        }));
    }

    /// Whether a change record names this task, its copy has not had that
    /// change yet, and applying it moves the task (a due time ahead, or
    /// another priority).
    fn changed(&self, d: &Held) -> bool {
        let p = &d.delivery.properties;
        let Some(id) = p.message_id().as_ref() else {
            return false;
        };
        let applied = headers::get_int(p.headers().as_ref(), headers::CHANGED)
            .ok()
            .flatten()
            .unwrap_or(0);
        let Some(c) = self.shared.cancels.change_pending(id.as_str(), applied) else {
            return false;
        };
        c.due_ms().is_some_and(|due| due > now_ms())
            || c.priority().is_some_and(|q| q != p.priority().unwrap_or(0))
    }

    /// Hands a held delivery back to its queue (see [`Attempt::hand_back`]).
    fn hand_back(&self, session: &Arc<Session>, in_flight: &InFlight, d: Held) {
        let shared = self.shared.clone();
        let session = session.clone();
        in_flight.tracker.spawn(async move {
            Attempt::hand_back(&shared, &session, &d.source, d.delivery).await;
            drop(d.release);
        });
    }

    /// A delivery from the entry of a work queue with lanes: starts at once
    /// if a slot is free and nothing of its priority or higher waits (no
    /// extra hop); else waits here if what waits is short work (see
    /// [`Shared::holds_entry`]); else moves to its lane.
    fn sort(&self, session: &Arc<Session>, in_flight: &InFlight, waiting: &mut Waiting, d: Held) {
        if waiting.highest().is_none_or(|r| r < d.rank) {
            if let Ok(permit) = in_flight.permits.clone().try_acquire_owned() {
                self.start(session, in_flight, d, permit);
                return;
            }
        }
        if self.shared.holds_entry(waiting.len()) {
            waiting.push(d);
            return;
        }
        let shared = self.shared.clone();
        let session = session.clone();
        in_flight.tracker.spawn(async move {
            Attempt::move_to_lane(&shared, &session, &d.source, d.delivery).await;
            drop(d.release);
        });
    }
}

/// The flow limits of a task type (contract section 9).
struct Gate {
    /// Its global concurrency limit.
    permits: Option<Arc<flow::TypeLimits>>,
    /// Its rate limit.
    rate: Option<Arc<rate::TypeRate>>,
}

/// The hashes of a task's keys: for its concurrency limit, for its rate
/// limit (`None`: the type's own limit).
type Keys = (Option<String>, Option<String>);

impl Gate {
    /// The keys of delivery `d`; an error if one cannot be used.
    fn keys(&self, d: &Delivery) -> Result<Keys, ()> {
        let headers = d.properties.headers().as_ref();
        let key_of = |src: Option<&warren_core::flow::KeySource>| match src {
            Some(src) => src.key_of(headers, &d.data).map_err(|_| ()),
            None => Ok(None),
        };
        Ok((
            key_of(self.permits.as_ref().and_then(|p| p.key.as_ref()))?,
            key_of(self.rate.as_ref().and_then(|r| r.key.as_ref()))?,
        ))
    }
}

/// Runs a delivery of a type with flow limits, holding the slot `slot`.
/// With a rate limit alone: a token (if none is free at once, it gives the
/// slot back and waits for one, see [`rate`]), then a slot again. Else, in
/// order: the slot; then a permit if one is free at once, else
/// it gives the slot back, waits for a permit holding no slot (see
/// [`flow`]) and takes a slot again; then, with a rate limit too, a token
/// if one is free at once, else it gives the slot back (keeping the
/// permit), waits for a token and takes a slot again. The permit comes
/// before the token so that no token is spent on a task that then waits
/// for a permit. It runs, and gives the permit back with its slot (see
/// [`Slot`]). One that waited `flow.permit_handback_ms` in all goes back
/// to its queue; one still waiting at shutdown, or when the connection is
/// lost, returns unacknowledged. A task whose key cannot be used runs
/// unlimited into triage, which makes it invalid.
/// Its slow paths' futures are boxed, so that this future stays small:
/// it is created and moved per task.
#[allow(clippy::too_many_arguments)]
async fn run_limited(
    sh: &Shared,
    session: &Arc<Session>,
    d: Held,
    gate: Gate,
    abort: &CancellationToken,
    stop: &CancellationToken,
    pool: Arc<Semaphore>,
    slot: OwnedSemaphorePermit,
) {
    let Ok((permit_key, rate_key)) = gate.keys(&d.delivery) else {
        return run_held(sh, session, d, abort, pool, slot, None).await;
    };
    let mut slot = Some(slot);
    let limit = gate.permits.map(|p| p.for_key(permit_key));
    let window = gate.rate.map(|r| {
        let w = r.window(&sh.names, rate_key);
        (r, w)
    });
    let wait_ms = sh.config.flow.permit_handback_ms;
    // One deadline for every wait of the task, from the first.
    let mut first_wait: Option<tokio::time::Instant> = None;
    let mut give_up = || {
        (wait_ms > 0).then(|| {
            *first_wait
                .get_or_insert_with(|| tokio::time::Instant::now() + Duration::from_millis(wait_ms))
        })
    };
    if let (None, Some((rate, w))) = (&limit, &window) {
        // A rate limit alone: the token, in the slot if one is free at
        // once, else waiting for it holding no slot.
        match Box::pin(take_token(
            sh,
            session,
            rate,
            w,
            slot.take(),
            stop,
            &mut give_up,
        ))
        .await
        {
            Ok(g) => slot = g,
            Err(rate::NoToken::GaveUp) => {
                return Box::pin(gave_up(sh, session, d, None, stop)).await
            }
            Err(rate::NoToken::Lost(e)) => {
                debug!(error = %e, "connection lost taking a rate token: the task returns to its queue");
                drop(d.release);
                return;
            }
        }
    }
    let slot = match slot {
        Some(g) => Some(g),
        None => take_slot(&pool, stop).await,
    };
    let Some(mut general) = slot else {
        drop(d.release);
        return;
    };
    let mut permit = None;
    if let Some(limit) = &limit {
        let now = match limit.take_idle(&session.conn) {
            Some(p) => Ok(Some(p)),
            None => {
                Box::pin(
                    sh.limits
                        .declare_now(limit, &session.conn, &sh.names, &sh.metrics),
                )
                .await
            }
        };
        match now {
            Ok(Some(p)) => permit = Some(p),
            Err(e) => {
                debug!(error = %e, "connection lost taking a permit: the task returns to its queue");
                drop(d.release);
                return;
            }
            Ok(None) => {
                // Over the limit: wait for a permit holding no slot.
                drop(general);
                let task_type = limit.task_type();
                sh.metrics.permit_waiting(task_type, 1);
                let got = Box::pin(sh.limits.acquire(
                    limit,
                    &session.conn,
                    &sh.names,
                    &sh.metrics,
                    stop,
                    give_up(),
                ))
                .await;
                sh.metrics.permit_waiting(task_type, -1);
                match got {
                    Ok(p) => permit = Some(p),
                    Err(flow::NoPermit::GaveUp) => {
                        return Box::pin(gave_up(sh, session, d, None, stop)).await;
                    }
                    Err(flow::NoPermit::Lost(e)) => {
                        debug!(error = %e, "connection lost waiting for a permit: the task returns to its queue");
                        drop(d.release);
                        return;
                    }
                }
                let Some(g) = take_slot(&pool, stop).await else {
                    release(permit, session);
                    drop(d.release);
                    return;
                };
                general = g;
            }
        }
    }
    if let (Some(_), Some((rate, w))) = (&limit, &window) {
        match Box::pin(take_token(
            sh,
            session,
            rate,
            w,
            Some(general),
            stop,
            &mut give_up,
        ))
        .await
        {
            Ok(Some(g)) => general = g,
            Ok(None) => {
                let Some(g) = take_slot(&pool, stop).await else {
                    release(permit, session);
                    drop(d.release);
                    return;
                };
                general = g;
            }
            Err(rate::NoToken::GaveUp) => {
                return Box::pin(gave_up(sh, session, d, permit, stop)).await
            }
            Err(rate::NoToken::Lost(e)) => {
                debug!(error = %e, "connection lost taking a rate token: the task returns to its queue");
                release(permit, session);
                drop(d.release);
                return;
            }
        }
    }
    run_held(sh, session, d, abort, pool, general, permit).await;
}

/// Runs a held delivery in the slot `general` of `pool`, holding `permit`
/// (given back with the slot). Its attempt's future is boxed: several
/// kilobytes, inline it would make the caller's future that large, copied
/// as it is created and moved.
async fn run_held(
    sh: &Shared,
    session: &Arc<Session>,
    d: Held,
    abort: &CancellationToken,
    pool: Arc<Semaphore>,
    general: OwnedSemaphorePermit,
    permit: Option<flow::Permit>,
) {
    let slot = Slot::new(pool, general).with_permit(permit, session);
    let delivery = (d.delivery, d.since);
    Box::pin(Attempt::run(sh, session, &d.source, delivery, abort, slot)).await;
    drop(d.release);
}

/// Takes a token of rate window `w`: at once if the window has room, else
/// it gives `slot` up (if it holds one) and waits for a token holding no
/// slot. The slot if it is still held.
async fn take_token(
    sh: &Shared,
    session: &Arc<Session>,
    rate: &rate::TypeRate,
    w: &rate::Window,
    slot: Option<OwnedSemaphorePermit>,
    stop: &CancellationToken,
    give_up: &mut (dyn FnMut() -> Option<tokio::time::Instant> + Send),
) -> Result<Option<OwnedSemaphorePermit>, rate::NoToken> {
    match sh.rates.try_now(rate, w, &session.conn, &sh.metrics).await {
        Ok(true) => return Ok(slot),
        Ok(false) => {}
        Err(e) => return Err(rate::NoToken::Lost(e)),
    }
    drop(slot);
    sh.metrics.rate_waiting(&rate.task_type, 1);
    let got = sh
        .rates
        .wait(rate, w, &session.conn, &sh.metrics, stop, give_up())
        .await;
    sh.metrics.rate_waiting(&rate.task_type, -1);
    got.map(|()| None)
}

/// Gives a permit back, if the task holds one.
fn release(permit: Option<flow::Permit>, session: &Arc<Session>) {
    if let Some(p) = permit {
        p.release(session);
    }
}

/// A task that waited `flow.permit_handback_ms` for a permit or a token
/// goes back to its queue (at shutdown it returns unacknowledged).
async fn gave_up(
    sh: &Shared,
    session: &Arc<Session>,
    d: Held,
    permit: Option<flow::Permit>,
    stop: &CancellationToken,
) {
    release(permit, session);
    if !stop.is_cancelled() {
        sh.metrics.limit_handed_back();
        Attempt::hand_back(sh, session, &d.source, d.delivery).await;
    }
    drop(d.release);
}

/// One of the worker's slots, unless `stop` comes first.
async fn take_slot(
    pool: &Arc<Semaphore>,
    stop: &CancellationToken,
) -> Option<OwnedSemaphorePermit> {
    tokio::select! {
        p = pool.clone().acquire_owned() => Some(p.expect("the semaphore is never closed")),
        _ = stop.cancelled() => None,
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
