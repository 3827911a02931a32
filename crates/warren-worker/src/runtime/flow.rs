//! Fleet-wide flow control through the broker (contract section 9).
//!
//! Global concurrency: the `k`-th permit of a type limited to `N` is the
//! exclusive queue `P.permits.<type>.<k>`, `k < N` (of a key of a type
//! limited per key, `P.permits.<type>.<hash>.<k>`). A worker holds a permit
//! while its connection owns that queue: declaring it succeeds for one
//! connection only (another gets `RESOURCE_LOCKED`), and the broker deletes
//! it when that connection closes, so the permit of a worker that dies comes
//! back by itself. Nothing is seeded, so nothing can be over-filled: there
//! are never more than `N` such names. The worker frees the permit with the
//! task's slot, when the handler returns: it hands it to its next waiting
//! task of the type on the same connection, or keeps it idle a moment for
//! the next task to come, then deletes the queue. While the limit does not
//! bind, a task finding no permit idle declares one holding its slot; while
//! it binds, within a worker one task per type at a time tries the names
//! (the others queue behind it, first come first served), with a bounded
//! backoff between rounds, so waiting costs the broker a few declarations
//! a second per type and worker, and no slot.
//!
//! Unique tasks: the lock of a key is the queue `P.unique.<hash>`
//! (`x-max-length` 1, `x-overflow` `reject-publish`, `x-expires` = the
//! window); the first task seen publishes a marker with its id there,
//! expiring after the window. The broker accepts one marker: a second
//! publication is refused (`basic.nack`), whatever process sent it and
//! whenever. The winner also leaves its id in `P.unique.<hash>.first` for
//! the losers to read and name in their `duplicate` event.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::{
    BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use rand::Rng;
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use warren_client::ClientError;
use warren_core::config::FlowConfig;
use warren_core::flow::{permit_base, KeySource, UniqueKey};
use warren_core::Names;

use super::session::Session;
use crate::metrics::WorkerMetrics;

/// The global concurrency limits this worker enforces, one per limited type.
pub(super) struct Limits {
    by_type: BTreeMap<String, Arc<TypeLimits>>,
    backoff: Duration,
    backoff_max: Duration,
}

/// The limit of one type: one for the whole type, or one per key.
pub(super) struct TypeLimits {
    /// Where a task's key comes from, for a limit per key.
    pub(super) key: Option<KeySource>,
    /// The limit of the type, or of its tasks without a key.
    shared: Arc<TypeLimit>,
    /// The limits of the keys seen, by hash; those no task of this worker
    /// uses are forgotten once there are [`KEYS_KEPT`].
    keyed: Mutex<HashMap<String, Arc<TypeLimit>>>,
}

/// How many keys of a type a worker keeps state for before it forgets
/// those no task of its uses now (their permits, if any, are in the broker).
pub(super) const KEYS_KEPT: usize = 1024;

impl TypeLimits {
    /// The limit of a task with the key of hash `key` (`None`: the type's).
    pub(super) fn for_key(&self, key: Option<String>) -> Arc<TypeLimit> {
        let Some(hash) = key else {
            return self.shared.clone();
        };
        let mut keyed = self.keyed.lock().expect("keys lock");
        if let Some(l) = keyed.get(&hash) {
            return l.clone();
        }
        if keyed.len() >= KEYS_KEPT {
            keyed.retain(|_, l| Arc::strong_count(l) > 1);
        }
        let l = Arc::new(TypeLimit::new(
            &self.shared.task_type,
            Some(hash.clone()),
            self.shared.n,
        ));
        keyed.insert(hash, l.clone());
        l
    }
}

/// One limited type, or one key of a type limited per key.
pub(super) struct TypeLimit {
    task_type: String,
    /// The hash of the key, for a limit per key.
    key: Option<String>,
    n: u32,
    /// Held by the task of this worker trying the permits now.
    turn: tokio::sync::Mutex<()>,
    /// The permits this worker holds (or is declaring).
    held: Mutex<BTreeSet<u32>>,
    /// Told when this worker gives a permit back.
    freed: Notify,
    /// Where the task trying the permits now takes one this worker frees
    /// on the same connection, as it is, with no trip to the broker: the
    /// connection's address and the sender.
    handoff: Mutex<Option<(usize, oneshot::Sender<Permit>)>>,
    /// Permits freed with no task waiting, kept [`PERMIT_LINGER`] for the
    /// next task of the type on the same connection: the permit, the
    /// session whose connection owns its queue, and when it was freed.
    idle: Mutex<Vec<(Permit, Arc<Session>, tokio::time::Instant)>>,
    /// A task gives back the permits that stayed idle [`PERMIT_LINGER`]
    /// (one per limit while some are idle, not one per permit freed).
    reaping: std::sync::atomic::AtomicBool,
    /// The last round of tries found every permit held: the limit binds.
    starved: std::sync::atomic::AtomicBool,
}

/// How long a freed permit no task waits for stays with its worker before
/// its queue is deleted: a stream of tasks of a type whose limit does not
/// bind then costs no broker operation per task, while a permit another
/// worker waits for reaches it at most this much later.
pub(super) const PERMIT_LINGER: Duration = Duration::from_millis(100);

/// How waiting for a permit ended without one.
pub(super) enum NoPermit {
    /// Shutdown, or `flow.permit_handback_ms` passed.
    GaveUp,
    /// The connection is gone.
    Lost(ClientError),
}

/// A permit held: given back by [`Permit::release`].
pub(super) struct Permit {
    limit: Arc<TypeLimit>,
    k: u32,
    queue: String,
    metrics: Arc<WorkerMetrics>,
}

impl Limits {
    pub(super) fn new(flow: &FlowConfig) -> Self {
        let by_type = flow
            .concurrency
            .iter()
            .map(|(t, c)| {
                let limits = TypeLimits {
                    key: c.key_source(),
                    shared: Arc::new(TypeLimit::new(t, None, c.limit())),
                    keyed: Mutex::new(HashMap::new()),
                };
                (t.clone(), Arc::new(limits))
            })
            .collect();
        Limits {
            by_type,
            backoff: Duration::from_millis(flow.permit_backoff_ms.max(1)),
            backoff_max: Duration::from_millis(flow.permit_backoff_max_ms.max(1)),
        }
    }

    /// The limit of `task_type`, if it has one.
    pub(super) fn of(&self, task_type: &str) -> Option<Arc<TypeLimits>> {
        self.by_type.get(task_type).cloned()
    }

    /// Waits for a permit of `limit`, trying the broker in rounds with a
    /// backoff (sooner when this worker frees one), until `stop` or
    /// `give_up` (if any) passes.
    pub(super) async fn acquire(
        &self,
        limit: &Arc<TypeLimit>,
        conn: &Connection,
        names: &Names,
        metrics: &Arc<WorkerMetrics>,
        stop: &CancellationToken,
        give_up: Option<tokio::time::Instant>,
    ) -> Result<Permit, NoPermit> {
        let deadline = async {
            match give_up {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let wait = async {
            let _turn = limit.turn.lock().await;
            let (tx, mut handed) = oneshot::channel();
            let mut tx = Some(tx);
            let mut backoff = self.backoff;
            loop {
                if let Some(permit) = limit.take_idle(conn) {
                    limit.withdraw(&mut handed, conn).await;
                    return Ok(permit);
                }
                if let Some(permit) = limit.try_once(conn, names, metrics).await? {
                    limit.withdraw(&mut handed, conn).await;
                    return Ok(permit);
                }
                if let Some(tx) = tx.take() {
                    *limit.handoff.lock().expect("handoff lock") = Some((conn_id(conn), tx));
                }
                // Jittered, so the workers of a fleet do not try in step.
                let pause = backoff.mul_f64(rand::thread_rng().gen_range(0.5..1.0));
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = limit.freed.notified() => {}
                    p = &mut handed => if let Ok(permit) = p {
                        return Ok(permit);
                    },
                }
                backoff = (backoff * 2).min(self.backoff_max);
            }
        };
        tokio::select! {
            r = wait => r.map_err(NoPermit::Lost),
            _ = stop.cancelled() => Err(NoPermit::GaveUp),
            _ = deadline => Err(NoPermit::GaveUp),
        }
    }
}

impl Limits {
    /// A permit declared at once while the limit does not bind (the last
    /// round of tries found one free): this worker needs one more than it
    /// keeps. Tasks in that case declare one each, side by side, holding
    /// their slot: permits are freed with slots, so a worker never keeps
    /// more than its slots, and this happens only while it grows to them.
    /// `None` while the limit binds: wait with [`Limits::acquire`].
    pub(super) async fn declare_now(
        &self,
        limit: &Arc<TypeLimit>,
        conn: &Connection,
        names: &Names,
        metrics: &Arc<WorkerMetrics>,
    ) -> Result<Option<Permit>, ClientError> {
        if limit.starved.load(Ordering::Relaxed) {
            return Ok(None);
        }
        limit.try_once(conn, names, metrics).await
    }
}

impl TypeLimit {
    fn new(task_type: &str, key: Option<String>, n: u32) -> Self {
        TypeLimit {
            task_type: task_type.to_owned(),
            key,
            n,
            turn: tokio::sync::Mutex::new(()),
            held: Mutex::new(BTreeSet::new()),
            freed: Notify::new(),
            handoff: Mutex::new(None),
            idle: Mutex::new(Vec::new()),
            reaping: std::sync::atomic::AtomicBool::new(false),
            starved: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The limited type.
    pub(super) fn task_type(&self) -> &str {
        &self.task_type
    }

    /// Withdraws the hand-over offer of the task that got a permit another
    /// way; one handed over meanwhile is given back.
    async fn withdraw(&self, handed: &mut oneshot::Receiver<Permit>, conn: &Connection) {
        self.handoff.lock().expect("handoff lock").take();
        if let Ok(extra) = handed.try_recv() {
            extra.give_back(conn).await;
        }
    }

    /// One round: tries each permit this worker does not hold, from a random
    /// one on; `None` when every one is held.
    async fn try_once(
        self: &Arc<Self>,
        conn: &Connection,
        names: &Names,
        metrics: &Arc<WorkerMetrics>,
    ) -> Result<Option<Permit>, ClientError> {
        let start = rand::thread_rng().gen_range(0..self.n);
        let mut ch: Option<Channel> = None;
        for i in 0..self.n {
            let k = (start + i) % self.n;
            if !self.held.lock().expect("held lock").insert(k) {
                continue;
            }
            let channel = match &ch {
                Some(c) if c.status().connected() => c.clone(),
                _ => {
                    let c = conn.create_channel().await.map_err(|e| {
                        self.forget(k);
                        ClientError::amqp("open a channel for a permit")(e)
                    })?;
                    ch = Some(c.clone());
                    c
                }
            };
            let queue = format!(
                "{}.{k}",
                permit_base(names, &self.task_type, self.key.as_deref())
            );
            let declared = channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        exclusive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await;
            match declared {
                Ok(_) => {
                    self.starved.store(false, Ordering::Relaxed);
                    let _ = channel.close(200, "permit taken".into()).await;
                    metrics.permits_held(1);
                    debug!(permit = %queue, "permit taken");
                    return Ok(Some(Permit {
                        limit: self.clone(),
                        k,
                        queue,
                        metrics: metrics.clone(),
                    }));
                }
                Err(e) => {
                    self.forget(k);
                    if !conn.status().connected() {
                        return Err(ClientError::amqp("take a permit")(e));
                    }
                    if !is_resource_locked(&e) {
                        // Not held elsewhere: refused (permissions, a queue
                        // of that name declared otherwise). Waiting goes on
                        // with its backoff, and the task is handed back
                        // after flow.permit_handback_ms.
                        warn!(permit = %queue, error = %e, "cannot take a permit");
                    }
                    // The broker closed the channel either way.
                }
            }
        }
        if let Some(c) = ch.filter(|c| c.status().connected()) {
            let _ = c.close(200, "no permit free".into()).await;
        }
        self.starved.store(true, Ordering::Relaxed);
        Ok(None)
    }

    /// A permit kept idle on this connection, if any.
    pub(super) fn take_idle(&self, conn: &Connection) -> Option<Permit> {
        let mut idle = self.idle.lock().expect("idle lock");
        if idle.is_empty() || !conn.status().connected() {
            return None;
        }
        // The one idle longest: the permits kept take turns, so none
        // reaches PERMIT_LINGER while tasks of the type come faster than
        // that (declaring one again costs the broker tens of ms).
        let at = idle
            .iter()
            .position(|(_, s, _)| conn_id(&s.conn) == conn_id(conn))?;
        Some(idle.remove(at).0)
    }

    /// Gives back the permits idle for [`PERMIT_LINGER`], until none is
    /// idle.
    async fn reap(self: Arc<Self>) {
        loop {
            let now = tokio::time::Instant::now();
            let (over, next) = {
                let mut idle = self.idle.lock().expect("idle lock");
                let mut over = Vec::new();
                let mut i = 0;
                while i < idle.len() {
                    if idle[i].2 + PERMIT_LINGER <= now {
                        over.push(idle.swap_remove(i));
                    } else {
                        i += 1;
                    }
                }
                let next = idle.iter().map(|(_, _, at)| *at).min();
                if next.is_none() {
                    // Set again by the next permit freed, which starts a
                    // task like this one.
                    self.reaping.store(false, Ordering::SeqCst);
                }
                (over, next)
            };
            for (p, session, _) in over {
                p.give_back(&session.conn).await;
            }
            match next {
                Some(at) => tokio::time::sleep_until(at + PERMIT_LINGER).await,
                None => return,
            }
        }
    }

    fn forget(&self, k: u32) {
        self.held.lock().expect("held lock").remove(&k);
    }
}

impl Permit {
    /// Gives the permit back: to this worker's next task of the type
    /// waiting for one, else it stays idle [`PERMIT_LINGER`] for the next
    /// one to come, then its queue is deleted (if that fails, the broker
    /// deletes it when the connection closes; until then this worker may
    /// take it again, being its owner).
    pub(super) fn release(self, session: &Arc<Session>) {
        let conn = &session.conn;
        // Handed over to this worker's next task of the type when it waits
        // on this same connection (whose ownership of the queue goes on).
        let waiter = self.limit.handoff.lock().expect("handoff lock").take();
        let mut permit = self;
        if let Some((id, tx)) = waiter {
            if id == conn_id(conn) && conn.status().connected() {
                match tx.send(permit) {
                    Ok(()) => {
                        debug!("permit handed over");
                        return;
                    }
                    Err(back) => permit = back,
                }
            }
        }
        if !conn.status().connected() {
            let session = session.clone();
            tokio::spawn(async move { permit.give_back(&session.conn).await });
            return;
        }
        // Kept a moment for the next task of the type, then given back.
        let limit = permit.limit.clone();
        limit.idle.lock().expect("idle lock").push((
            permit,
            session.clone(),
            tokio::time::Instant::now(),
        ));
        if !limit.reaping.swap(true, Ordering::SeqCst) {
            tokio::spawn(limit.reap());
        }
    }

    async fn give_back(self, conn: &Connection) {
        let deleted = async {
            let ch = conn.create_channel().await?;
            ch.queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
                .await?;
            let _ = ch.close(200, "permit given back".into()).await;
            Ok::<_, lapin::Error>(())
        }
        .await;
        match deleted {
            Ok(()) => {}
            // Closing: the broker frees it with the connection.
            Err(e) if !conn.status().connected() => {
                debug!(permit = %self.queue, error = %e, "permit freed with the connection");
            }
            Err(e) => {
                warn!(permit = %self.queue, error = %e, "could not give a permit back; the broker frees it with the connection");
            }
        }
        self.limit.forget(self.k);
        self.metrics.permits_held(-1);
        self.limit.freed.notify_one();
    }
}

/// Tells connections apart while both live: permits are handed over only
/// within the connection that owns their queue.
fn conn_id(conn: &Connection) -> usize {
    conn as *const Connection as usize
}

/// AMQP reply code of a queue that another connection holds exclusively.
const RESOURCE_LOCKED: u16 = 405;

fn is_resource_locked(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p) if p.get_id() == RESOURCE_LOCKED)
}

/// What a task's unique key found.
pub(super) enum Claim {
    /// The key was free: this task holds it now (or held it already).
    Won,
    /// Another task holds it: its id, if it could be read.
    Lost(Option<String>),
}

/// How long a loser tries to read the first task's id.
const READ_FIRST_FOR: Duration = Duration::from_secs(5);

/// Takes the unique key for task `id`, or finds who holds it.
pub(super) async fn claim(
    conn: &Connection,
    names: &Names,
    key: &UniqueKey,
    id: &str,
) -> Result<Claim, ClientError> {
    let lock = key.lock_queue(names);
    let first = key.first_queue(names);
    let ch = declare_lock(conn, &lock, key.window_ms, true).await?;
    let window = key.window_ms.to_string();
    let props = BasicProperties::default()
        .with_expiration(ShortString::from(window.clone()))
        .with_delivery_mode(2);
    let won = publish_confirmed(&ch, &lock, id.as_bytes(), props.clone()).await?;
    let _ = ch.close(200, "claimed".into()).await;
    if won {
        let ch = declare_lock(conn, &first, key.window_ms, false).await?;
        publish_confirmed(&ch, &first, id.as_bytes(), props).await?;
        let _ = ch.close(200, "named".into()).await;
        return Ok(Claim::Won);
    }
    let holder = read_first(conn, &first, key.window_ms).await?;
    if holder.as_deref() == Some(id) {
        // This very task took the key before (a redelivery, a retry).
        return Ok(Claim::Won);
    }
    Ok(Claim::Lost(holder))
}

/// Declares a lock queue (`reject`: refusing a second marker) or the queue
/// naming its holder, on a fresh confirming channel. A queue declared with
/// another window (another producer's `x-warren-unique-ms`) is used as it is.
async fn declare_lock(
    conn: &Connection,
    queue: &str,
    window_ms: i64,
    reject: bool,
) -> Result<Channel, ClientError> {
    let open = || async {
        let ch = conn
            .create_channel()
            .await
            .map_err(ClientError::amqp("open a channel for a unique key"))?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(ClientError::amqp("enable publisher confirms"))?;
        Ok::<_, ClientError>(ch)
    };
    let ch = open().await?;
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
    if reject {
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString(LongString::from("reject-publish")),
        );
    }
    args.insert("x-expires".into(), AMQPValue::LongLongInt(window_ms));
    let opts = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    if ch.queue_declare(queue.into(), opts, args).await.is_ok() {
        return Ok(ch);
    }
    if !conn.status().connected() {
        return Err(ClientError::Closed(format!("declare {queue}")));
    }
    let ch = open().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    ch.queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .map_err(ClientError::amqp(format!("declare {queue}")))?;
    Ok(ch)
}

/// Publishes to `queue` through the default exchange; whether the broker
/// took it (a refusal is a `basic.nack`).
async fn publish_confirmed(
    ch: &Channel,
    queue: &str,
    body: &[u8],
    props: BasicProperties,
) -> Result<bool, ClientError> {
    let confirm = ch
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .map_err(ClientError::amqp(format!("publish to {queue}")))?;
    let c = tokio::time::timeout(Duration::from_secs(30), confirm)
        .await
        .map_err(|_| ClientError::Closed(format!("no confirm from {queue}")))?
        .map_err(ClientError::amqp(format!("confirm from {queue}")))?;
    Ok(!matches!(c, Confirmation::Nack(_)))
}

/// Reads the id of the task holding a key, putting it back at once; other
/// losers reading at the same moment may find the queue empty, so it tries
/// again a few times.
async fn read_first(
    conn: &Connection,
    first: &str,
    window_ms: i64,
) -> Result<Option<String>, ClientError> {
    let ch = declare_lock(conn, first, window_ms, false).await?;
    let until = tokio::time::Instant::now() + READ_FIRST_FOR;
    let mut pause = Duration::from_millis(5);
    let found = loop {
        let got = ch
            .basic_get(first.into(), BasicGetOptions { no_ack: false })
            .await
            .map_err(ClientError::amqp(format!("get from {first}")))?;
        if let Some(m) = got {
            let id = String::from_utf8_lossy(&m.delivery.data).into_owned();
            let _ = m
                .delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await;
            break Some(id);
        }
        if tokio::time::Instant::now() >= until {
            break None;
        }
        let jittered = pause.mul_f64(rand::thread_rng().gen_range(0.5..1.5));
        tokio::time::sleep(jittered).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    };
    let _ = ch.close(200, "read".into()).await;
    Ok(found)
}
