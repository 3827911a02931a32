//! Cancellations: the set of cancelled task ids every process keeps, fed
//! from the `P.cancels` stream (bound to `P.control`).
//!
//! The stream is durable and kept for `scheduler.cancel_ttl_ms`, and each
//! process reads it from its start when it boots, so a cancel is remembered
//! across restarts of any process. On boot a process publishes a marker to
//! `P.control` and reads until it sees it, so every cancel published before
//! the process started is known before it takes its first task.
//!
//! The same stream carries the pause and resume records of work queues and
//! task types ([`warren_core::pauses`]): the set keeps the latest of each
//! target and tells whoever subscribed ([`CancelSet::pause_changes`]) when
//! one changes.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use warren_core::changes::{ChangeBook, TaskChange};
use warren_core::config::BrokerConfig;
use warren_core::control::ControlMessage;
use warren_core::escrow::{EscrowTimes, LeaseBook, Returned};
use warren_core::event::new_id;
use warren_core::pauses::{Change, PauseBook};
use warren_core::Names;

use crate::connect::{connect, ConfirmChannel};
use crate::reconnect::Reconnect;
use crate::ClientError;

/// The cancelled task ids this process knows, and the tokens of tasks it
/// runs; for a worker, also the escrow leases ([`CancelSet::keep_leases`]).
#[derive(Clone, Default, Debug)]
pub struct CancelSet {
    ids: Arc<Mutex<HashSet<String>>>,
    running: Arc<Mutex<HashMap<String, CancellationToken>>>,
    leases: Arc<Mutex<Leases>>,
    pauses: Arc<Pauses>,
    changes: Arc<Mutex<ChangeBook>>,
}

/// The pause records read, and a counter bumped on every change.
#[derive(Debug)]
struct Pauses {
    book: Mutex<PauseBook>,
    changed: watch::Sender<u64>,
    /// Whether any work queue is paused, and whether any task type is:
    /// written under `book`'s lock, read without it, so a worker checks
    /// each delivery without a lock or a lookup while nothing is paused.
    any_queue: AtomicBool,
    any_type: AtomicBool,
}

impl Default for Pauses {
    fn default() -> Self {
        Pauses {
            book: Mutex::default(),
            changed: watch::channel(0).0,
            any_queue: AtomicBool::new(false),
            any_type: AtomicBool::new(false),
        }
    }
}

/// The escrow lease and done records read, when kept.
#[derive(Default, Debug)]
struct Leases {
    /// `None`: lease records are skipped (a process that takes no task).
    times: Option<EscrowTimes>,
    book: LeaseBook,
    /// Records taken in since the book was last pruned.
    since_prune: usize,
}

/// Records between two prunings of the lease book.
const PRUNE_EVERY: usize = 1024;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Keeps a running task abortable by a cancel command until dropped.
#[derive(Debug)]
pub struct RunningGuard {
    running: Arc<Mutex<HashMap<String, CancellationToken>>>,
    id: String,
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.running.lock().expect("not poisoned").remove(&self.id);
    }
}

/// The body of a cancel command.
pub fn cancel_command(task_id: &str) -> Vec<u8> {
    ControlMessage::Cancel(task_id.to_owned()).to_json()
}

impl CancelSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Keeps the escrow lease and done records read from the stream (a
    /// worker that puts tasks in escrow with `times`); a set not told so
    /// skips them.
    pub fn keep_leases(self, times: EscrowTimes) -> Self {
        self.leases.lock().expect("not poisoned").times = Some(times);
        self
    }

    /// What to do with an escrow copy of the escrow `escrow_id` that came
    /// back to its work queue now, by the records read so far.
    pub fn escrow_returned(&self, escrow_id: &str) -> Returned {
        self.leases
            .lock()
            .expect("not poisoned")
            .book
            .returned(escrow_id, now_ms())
    }

    /// Takes in an escrow lease or done record, when leases are kept.
    pub fn record_escrow(&self, m: &ControlMessage) {
        let mut l = self.leases.lock().expect("not poisoned");
        let Some(times) = l.times else {
            return;
        };
        let now = now_ms();
        l.book.record(m, now);
        l.since_prune += 1;
        if l.since_prune >= PRUNE_EVERY {
            l.since_prune = 0;
            l.book.prune(&times, now);
        }
    }

    /// Takes in a pause or resume record; tells the subscribers when it
    /// changed a target's state.
    pub fn record_pause(&self, m: &ControlMessage) -> Change {
        let change = {
            let mut book = self.pauses.book.lock().expect("not poisoned");
            let change = book.record(m);
            let p = &self.pauses;
            p.any_queue
                .store(book.any_queue_paused(), Ordering::Release);
            p.any_type.store(book.any_type_paused(), Ordering::Release);
            change
        };
        if change != Change::None {
            self.pauses.changed.send_modify(|n| *n += 1);
        }
        change
    }

    /// What is paused now (a copy).
    pub fn pauses(&self) -> PauseBook {
        self.pauses.book.lock().expect("not poisoned").clone()
    }

    /// Whether the work queue `short` is paused.
    pub fn queue_paused(&self, short: &str) -> bool {
        if !self.pauses.any_queue.load(Ordering::Acquire) {
            return false;
        }
        self.pauses
            .book
            .lock()
            .expect("not poisoned")
            .queue_paused(short)
    }

    /// Whether the task type `t` is paused.
    pub fn type_paused(&self, t: &str) -> bool {
        if !self.pauses.any_type.load(Ordering::Acquire) {
            return false;
        }
        self.pauses
            .book
            .lock()
            .expect("not poisoned")
            .type_paused(t)
    }

    /// Whether any task type is paused.
    pub fn any_type_paused(&self) -> bool {
        self.pauses.any_type.load(Ordering::Acquire)
    }

    /// A receiver that sees a change each time a pause or resume record
    /// changes what is paused.
    pub fn pause_changes(&self) -> watch::Receiver<u64> {
        self.pauses.changed.subscribe()
    }

    /// Takes in a change record of a waiting task.
    pub fn record_change(&self, m: &ControlMessage) -> bool {
        self.changes.lock().expect("not poisoned").record(m)
    }

    /// The change a copy of `task_id` carrying `applied_ms` (its
    /// `x-warren-changed`, 0 if absent) has not had yet, if any.
    pub fn change_pending(&self, task_id: &str, applied_ms: i64) -> Option<TaskChange> {
        self.changes
            .lock()
            .expect("not poisoned")
            .pending(task_id, applied_ms)
    }

    /// What is known of changes now (a copy).
    pub fn changes(&self) -> ChangeBook {
        self.changes.lock().expect("not poisoned").clone()
    }

    /// Whether a cancel command for this task was seen.
    pub fn contains(&self, task_id: &str) -> bool {
        self.ids.lock().expect("not poisoned").contains(task_id)
    }

    /// Records a cancel; aborts the task if this process is running it.
    pub fn insert(&self, task_id: &str) {
        self.ids
            .lock()
            .expect("not poisoned")
            .insert(task_id.to_owned());
        if let Some(t) = self.running.lock().expect("not poisoned").get(task_id) {
            t.cancel();
        }
    }

    /// Registers a running task: a cancel for it cancels `token`. If the task
    /// is already cancelled, `token` is cancelled at once.
    pub fn running(&self, task_id: &str, token: CancellationToken) -> RunningGuard {
        if self.contains(task_id) {
            token.cancel();
        }
        self.running
            .lock()
            .expect("not poisoned")
            .insert(task_id.to_owned(), token);
        RunningGuard {
            running: Arc::clone(&self.running),
            id: task_id.to_owned(),
        }
    }

    /// Reads `P.cancels` from its start up to now, once (within `timeout`),
    /// for a command that reports what is paused.
    pub async fn read_once(
        broker: BrokerConfig,
        names: Names,
        timeout: Duration,
    ) -> Result<CancelSet, ClientError> {
        let set = CancelSet::new();
        let (ready_tx, ready_rx) = oneshot::channel();
        let stop = CancellationToken::new();
        let follower = {
            let (set, stop) = (set.clone(), stop.clone());
            tokio::spawn(async move { set.follow(broker, names, timeout, stop, ready_tx).await })
        };
        let read = tokio::time::timeout(timeout, ready_rx).await;
        stop.cancel();
        let _ = follower.await;
        match read {
            Ok(Ok(())) => Ok(set),
            _ => Err(ClientError::Closed(format!(
                "the cancels stream was not read within {} s",
                timeout.as_secs()
            ))),
        }
    }

    /// Follows `P.cancels` until `shutdown`, reconnecting with backoff of at
    /// most `max_backoff`. `ready` fires once every cancel published before
    /// the call is known (or after a bounded wait, if the broker is slow).
    pub async fn follow(
        &self,
        broker: BrokerConfig,
        names: Names,
        max_backoff: Duration,
        shutdown: CancellationToken,
        ready: oneshot::Sender<()>,
    ) {
        let mut ready = Some(ready);
        let mut retry = Reconnect::new("cancel stream", max_backoff);
        while retry.ready(&shutdown).await {
            match self
                .follow_once(&broker, &names, &shutdown, &mut ready, &mut retry)
                .await
            {
                Ok(()) => return,
                Err(e) => retry.lost(&e),
            }
        }
    }

    async fn follow_once(
        &self,
        broker: &BrokerConfig,
        names: &Names,
        shutdown: &CancellationToken,
        ready: &mut Option<oneshot::Sender<()>>,
        retry: &mut Reconnect,
    ) -> Result<(), ClientError> {
        let amqp = |what: &'static str| {
            move |source| ClientError::Amqp {
                what: what.into(),
                source,
            }
        };
        let conn = connect(broker, "cancels").await?;
        let ch = conn.create_channel().await.map_err(amqp("open channel"))?;
        ch.basic_qos(1000, BasicQosOptions::default())
            .await
            .map_err(amqp("set prefetch"))?;
        let mut args = FieldTable::default();
        args.insert(
            "x-stream-offset".into(),
            AMQPValue::LongString("first".into()),
        );
        let mut stream = ch
            .basic_consume(
                names.cancels().as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                args,
            )
            .await
            .map_err(amqp("consume the cancel stream"))?;
        retry.up();
        let marker = new_id();
        if ready.is_some() {
            let pc = ConfirmChannel::open(&conn).await?;
            let body = ControlMessage::Marker(marker.clone()).to_json();
            let props = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2);
            pc.publish(&names.control(), "", &body, props, "boot marker")
                .await?;
        }
        let boot_deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let next = tokio::select! {
                n = stream.next() => n,
                _ = tokio::time::sleep_until(boot_deadline), if ready.is_some() => {
                    warn!("cancel stream not read to its end within 10 s; going on");
                    if let Some(r) = ready.take() { let _ = r.send(()); }
                    continue;
                }
                _ = shutdown.cancelled() => {
                    let _ = conn.close(200, "bye".into()).await;
                    return Ok(());
                }
            };
            let d = match next {
                None => return Err(ClientError::Closed("cancel stream".into())),
                Some(r) => r.map_err(amqp("read the cancel stream"))?,
            };
            match ControlMessage::parse(&d.data) {
                Some(ControlMessage::Cancel(id)) => {
                    info!(task_id = %id, "cancel received");
                    self.insert(&id);
                }
                Some(ControlMessage::Marker(m)) if m == marker => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Some(m @ (ControlMessage::Lease { .. } | ControlMessage::EscrowDone { .. })) => {
                    self.record_escrow(&m);
                }
                Some(m @ ControlMessage::Change { .. }) if self.record_change(&m) => {
                    info!(record = ?m, "task change received");
                }
                Some(m @ (ControlMessage::Pause { .. } | ControlMessage::Resume { .. })) => {
                    match self.record_pause(&m) {
                        Change::Paused => info!(record = ?m, "paused"),
                        Change::Resumed => info!(record = ?m, "resumed"),
                        Change::None => {}
                    }
                }
                _ => {}
            }
            d.acker
                .ack(BasicAckOptions::default())
                .await
                .map_err(amqp("ack the cancel stream"))?;
        }
    }
}
