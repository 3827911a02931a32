//! Rate limits through the broker (contract section 9).
//!
//! The window of a limited type (or of one key of it) is the classic queue
//! `P.rate.<type>` (`P.rate.<type>.<hash>`) with `x-max-length-bytes` (and
//! `x-max-length`) = the burst and `x-overflow` = `reject-publish`. Tokens
//! are the bytes of markers published there with confirms and `expiration`
//! = `per_ms * burst / limit`: acknowledged, the task starts; refused
//! (`basic.nack`, the window has no room for them), it waits until a marker
//! expires. At most `burst` bytes of markers are alive at once, so the
//! broker alone keeps the rate, with no leader and nothing to refill.
//!
//! While the window has room, a worker takes several tokens in one marker
//! (a batch, doubled each time the last one was used up, at most an eighth
//! of the burst and [`MAX_BATCH`]) and starts its next tasks from them with
//! no trip to the broker; tokens not used within an eighth of the hold are
//! dropped, and a refusal brings the batch back to one. So a limit that
//! does not bind costs a publication per batch, not per task.
//!
//! A waiting task tries again every `min(hold / burst, hold / 50)` (the
//! spacing of tokens at the sustained rate, at most 2% of the hold, within
//! 5..=500 ms, jittered); within a worker one waiting
//! task per window tries at a time, the others queue behind it. It does not
//! read the head marker to learn when it expires: a `basic.get` takes the
//! marker out of the queue's length until it is put back, and a publication
//! from another worker in that moment would be accepted past the burst.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use rand::Rng;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use warren_client::ClientError;
use warren_core::config::FlowConfig;
use warren_core::flow::{rate_poll_ms, rate_queue, rate_queue_expires_ms, KeySource};
use warren_core::Names;

use super::flow::KEYS_KEPT;
use crate::metrics::WorkerMetrics;

/// The rate limits this worker enforces, one per limited type.
pub(super) struct Rates {
    by_type: BTreeMap<String, Arc<TypeRate>>,
    /// The confirming channel tokens are published on, with the address of
    /// its connection.
    channel: tokio::sync::Mutex<Option<(usize, Channel)>>,
}

/// The rate limit of one type.
pub(super) struct TypeRate {
    pub(super) task_type: String,
    /// Where a task's key comes from, for a limit per key.
    pub(super) key: Option<KeySource>,
    burst: u32,
    /// How long a token stays taken: the markers' `expiration`.
    hold_ms: u64,
    /// The pause between two tries of a waiting task, before jitter.
    poll: Duration,
    /// The most tokens taken in one marker.
    max_batch: u32,
    /// How long tokens taken in a batch may be used after their marker was
    /// sent: an eighth of the hold.
    batch_life: Duration,
    /// The windows of the keys seen (`None`: the type's), forgotten once
    /// there are [`KEYS_KEPT`] and no task of this worker uses them.
    windows: Mutex<HashMap<Option<String>, Arc<Window>>>,
}

/// One window: a type's, or one key's.
pub(super) struct Window {
    queue: String,
    /// Held by the task of this worker trying for a token while the window
    /// is full.
    turn: tokio::sync::Mutex<()>,
    /// The last try found the window full.
    full: AtomicBool,
    /// Tasks of this worker waiting for a token of the window.
    waiters: std::sync::atomic::AtomicUsize,
    /// When this worker last declared the queue: declared again after a
    /// quarter of its `x-expires`, so the broker never deletes a window in
    /// use (publications do not count as use).
    declared: Mutex<Option<Instant>>,
    /// The window counts bytes (declared here with `x-max-length-bytes`):
    /// a marker may carry several tokens. False for a window declared
    /// otherwise elsewhere, used as it is: one token per marker.
    counts_bytes: AtomicBool,
    /// Tokens taken in a batch and not used yet.
    local: Mutex<Batch>,
}

/// The tokens of a window a worker took in one marker and has not used.
struct Batch {
    /// Tokens left.
    left: u32,
    /// Until when they may be used.
    until: Instant,
    /// How many tokens the next batch takes.
    size: u32,
    /// A task is taking a batch now: the others take one token each
    /// meanwhile.
    taking: bool,
}

/// The most tokens a worker takes in one marker.
pub(super) const MAX_BATCH: u32 = 256;

/// Marker bodies: a marker of `k` tokens is `k` bytes.
static MARKER: [u8; MAX_BATCH as usize] = [0; MAX_BATCH as usize];

/// The longest pause between two tries refused by the broker.
const REFUSED_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How waiting for a token ended without one.
pub(super) enum NoToken {
    /// Shutdown, or `flow.permit_handback_ms` passed.
    GaveUp,
    /// The connection is gone.
    Lost(ClientError),
}

impl Rates {
    pub(super) fn new(flow: &FlowConfig) -> Self {
        let by_type = flow
            .rate
            .iter()
            .map(|(t, r)| {
                let rate = TypeRate {
                    task_type: t.clone(),
                    key: r.key_source(),
                    burst: r.burst(),
                    hold_ms: r.hold_ms(),
                    poll: Duration::from_millis(rate_poll_ms(r.hold_ms(), r.burst())),
                    max_batch: (r.burst() / 8).clamp(1, MAX_BATCH),
                    batch_life: Duration::from_millis(r.hold_ms() / 8),
                    windows: Mutex::new(HashMap::new()),
                };
                (t.clone(), Arc::new(rate))
            })
            .collect();
        Rates {
            by_type,
            channel: tokio::sync::Mutex::new(None),
        }
    }

    /// Whether no type has a rate limit.
    pub(super) fn is_empty(&self) -> bool {
        self.by_type.is_empty()
    }

    /// The rate limit of `task_type`, if it has one.
    pub(super) fn of(&self, task_type: &str) -> Option<Arc<TypeRate>> {
        self.by_type.get(task_type).cloned()
    }

    /// A token left from a batch this worker took, with no trip to the
    /// broker.
    pub(super) fn take_local(
        &self,
        rate: &TypeRate,
        window: &Window,
        metrics: &WorkerMetrics,
    ) -> bool {
        let mut b = window.local.lock().expect("batch lock");
        if b.left == 0 || Instant::now() >= b.until {
            return false;
        }
        b.left -= 1;
        drop(b);
        metrics.rate_token(&rate.task_type);
        true
    }

    /// A token at once if the window has one and no task of this worker
    /// waits for it; `false`: wait with [`Rates::wait`] (also when the
    /// broker refused the try while the connection is up).
    pub(super) async fn try_now(
        &self,
        rate: &TypeRate,
        window: &Window,
        conn: &Connection,
        metrics: &WorkerMetrics,
    ) -> Result<bool, ClientError> {
        if self.take_local(rate, window, metrics) {
            return Ok(true);
        }
        // While the window has room, tasks try side by side (their markers
        // pipelined on one channel); while it is full, in line.
        let _turn = if window.full.load(Ordering::Relaxed) {
            match window.turn.try_lock() {
                Ok(turn) => Some(turn),
                Err(_) => return Ok(false),
            }
        } else {
            None
        };
        let size = window.batch_to_take(rate.max_batch);
        let r = self.try_once(rate, window, conn, metrics, size, true).await;
        if size > 1 {
            window.local.lock().expect("batch lock").taking = false;
        }
        match r {
            Err(e) if conn.status().connected() => {
                warn!(window = %window.queue, error = %e, "cannot take a rate token");
                Ok(false)
            }
            r => r,
        }
    }

    /// Waits for a token, trying in turn with the other waiting tasks of
    /// this worker, until `stop` or `give_up` (if any) passes.
    pub(super) async fn wait(
        &self,
        rate: &TypeRate,
        window: &Window,
        conn: &Connection,
        metrics: &WorkerMetrics,
        stop: &CancellationToken,
        give_up: Option<tokio::time::Instant>,
    ) -> Result<(), NoToken> {
        let deadline = async {
            match give_up {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let _waiting = Waiter::new(window);
        let wait = async {
            let _turn = window.turn.lock().await;
            let mut refused = rate.poll;
            loop {
                let mut pause = rate.poll;
                if self.take_local(rate, window, metrics) {
                    return Ok(());
                }
                match self.try_once(rate, window, conn, metrics, 1, true).await {
                    Ok(true) => return Ok(()),
                    Ok(false) => refused = rate.poll,
                    Err(e) if conn.status().connected() => {
                        // Refused while connected (permissions, the
                        // window's node down on a cluster): no token can be
                        // taken; tried again with a backoff, and the task
                        // is handed back after flow.permit_handback_ms.
                        warn!(window = %window.queue, error = %e, "cannot take a rate token");
                        refused = (refused * 2).min(REFUSED_BACKOFF_MAX);
                        pause = refused;
                    }
                    Err(e) => return Err(e),
                }
                // Jittered, so the workers of a fleet do not try in step.
                let pause = pause.mul_f64(rand::thread_rng().gen_range(0.5..1.0));
                tokio::time::sleep(pause).await;
            }
        };
        tokio::select! {
            r = wait => r.map_err(NoToken::Lost),
            _ = stop.cancelled() => Err(NoToken::GaveUp),
            _ = deadline => Err(NoToken::GaveUp),
        }
    }

    /// Whether a task that just took a token left from a batch should take
    /// the next batch (see [`Rates::refill`]): half or less of it is
    /// left, no task of this worker waits for the window and none takes a
    /// batch now. If so, the next batch is doubled and marked as being
    /// taken.
    pub(super) fn refill_due(&self, rate: &TypeRate, window: &Window) -> bool {
        if rate.max_batch <= 1 || window.waiters.load(Ordering::Relaxed) > 0 {
            return false;
        }
        let mut b = window.local.lock().expect("batch lock");
        if b.taking || b.left > b.size / 2 {
            return false;
        }
        b.size = b.size.saturating_mul(2).min(rate.max_batch);
        b.taking = true;
        true
    }

    /// Takes the next batch of tokens ahead of the tasks that will use
    /// them, so that a limit that does not bind never makes a task wait
    /// for the broker (see [`Rates::refill_due`]).
    pub(super) async fn refill(
        &self,
        rate: &TypeRate,
        window: &Window,
        conn: &Connection,
        metrics: &WorkerMetrics,
    ) {
        let size = window.local.lock().expect("batch lock").size;
        if let Err(e) = self
            .try_once(rate, window, conn, metrics, size, false)
            .await
        {
            debug!(window = %window.queue, error = %e, "could not take a batch of rate tokens ahead");
        }
        window.local.lock().expect("batch lock").taking = false;
    }

    /// One try: publishes a marker of `size` tokens to the window (one if
    /// the window does not count bytes); whether the broker took it. With
    /// `for_task`, the task uses one of its tokens; the rest are kept for
    /// the next tasks (see [`Batch`]). A window deleted meanwhile (the
    /// marker came back unroutable) is declared again and tried once more.
    async fn try_once(
        &self,
        rate: &TypeRate,
        window: &Window,
        conn: &Connection,
        metrics: &WorkerMetrics,
        size: u32,
        for_task: bool,
    ) -> Result<bool, ClientError> {
        for _ in 0..2 {
            self.declare(rate, window, conn).await?;
            let size = if window.counts_bytes.load(Ordering::Relaxed) {
                size.clamp(1, MAX_BATCH)
            } else {
                1
            };
            let ch = self.channel(conn).await?;
            let sent = Instant::now();
            let props = BasicProperties::default()
                .with_expiration(ShortString::from(rate.hold_ms.to_string()))
                .with_delivery_mode(1);
            let confirm = ch
                .basic_publish(
                    "".into(),
                    window.queue.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &MARKER[..size as usize],
                    props,
                )
                .await
                .map_err(ClientError::amqp(format!(
                    "take a token from {}",
                    window.queue
                )))?;
            let c = tokio::time::timeout(Duration::from_secs(30), confirm)
                .await
                .map_err(|_| ClientError::Closed(format!("no confirm from {}", window.queue)))?
                .map_err(ClientError::amqp(format!("confirm from {}", window.queue)))?;
            match c {
                Confirmation::Ack(None) | Confirmation::NotRequested => {
                    window.full.store(false, Ordering::Relaxed);
                    if for_task {
                        window.keep(size - 1, sent + rate.batch_life);
                        metrics.rate_token(&rate.task_type);
                    } else {
                        window.keep(size, sent + rate.batch_life);
                    }
                    return Ok(true);
                }
                Confirmation::Ack(Some(_)) => {
                    // Unroutable: the window is gone (expired, or the
                    // broker restarted). Declared again on the next try.
                    debug!(window = %window.queue, "rate window gone: declaring it again");
                    *window.declared.lock().expect("declared lock") = None;
                }
                Confirmation::Nack(_) => {
                    window.full.store(true, Ordering::Relaxed);
                    window.local.lock().expect("batch lock").size = 1;
                    return Ok(false);
                }
            }
        }
        Err(ClientError::Closed(format!(
            "rate window {} deleted again as it was declared",
            window.queue
        )))
    }

    /// Declares the window unless this worker did within a quarter of its
    /// `x-expires`, on a channel of its own (a refusal closes it). A window
    /// declared with other arguments (another worker's configuration) is
    /// used as it is.
    async fn declare(
        &self,
        rate: &TypeRate,
        window: &Window,
        conn: &Connection,
    ) -> Result<(), ClientError> {
        let expires = rate_queue_expires_ms(rate.hold_ms);
        let fresh = window
            .declared
            .lock()
            .expect("declared lock")
            .is_some_and(|at| at.elapsed() < Duration::from_millis(expires / 4));
        if fresh {
            return Ok(());
        }
        let open = || async {
            conn.create_channel()
                .await
                .map_err(ClientError::amqp("open a channel for a rate window"))
        };
        let mut args = FieldTable::default();
        args.insert(
            "x-max-length".into(),
            AMQPValue::LongLongInt(rate.burst.into()),
        );
        args.insert(
            "x-max-length-bytes".into(),
            AMQPValue::LongLongInt(rate.burst.into()),
        );
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString(LongString::from("reject-publish")),
        );
        args.insert(
            "x-expires".into(),
            AMQPValue::LongLongInt(i64::try_from(expires).unwrap_or(i64::MAX)),
        );
        let opts = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let ch = open().await?;
        let queue = window.queue.as_str();
        if let Err(e) = ch.queue_declare(queue.into(), opts, args).await {
            if !conn.status().connected() {
                return Err(ClientError::amqp(format!("declare {queue}"))(e));
            }
            warn!(window = queue, error = %e, "rate window declared with other arguments elsewhere: using it as it is, one token per marker");
            window.counts_bytes.store(false, Ordering::Relaxed);
            let ch = open().await?;
            let passive = QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            ch.queue_declare(queue.into(), passive, FieldTable::default())
                .await
                .map_err(ClientError::amqp(format!("declare {queue}")))?;
            let _ = ch.close(200, "declared".into()).await;
        } else {
            window.counts_bytes.store(true, Ordering::Relaxed);
            let _ = ch.close(200, "declared".into()).await;
        }
        *window.declared.lock().expect("declared lock") = Some(Instant::now());
        Ok(())
    }

    /// The confirming channel of `conn` for tokens, opened on first use and
    /// again when closed.
    async fn channel(&self, conn: &Connection) -> Result<Channel, ClientError> {
        let id = conn as *const Connection as usize;
        let mut held = self.channel.lock().await;
        if let Some((at, ch)) = held.as_ref() {
            if *at == id && ch.status().connected() {
                return Ok(ch.clone());
            }
        }
        let ch = conn
            .create_channel()
            .await
            .map_err(ClientError::amqp("open a channel for rate tokens"))?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(ClientError::amqp("enable publisher confirms"))?;
        *held = Some((id, ch.clone()));
        Ok(ch)
    }
}

impl TypeRate {
    /// The window of a task with the key of hash `key` (`None`: the type's).
    pub(super) fn window(&self, names: &Names, key: Option<String>) -> Arc<Window> {
        let mut windows = self.windows.lock().expect("windows lock");
        if let Some(w) = windows.get(&key) {
            return w.clone();
        }
        if windows.len() >= KEYS_KEPT {
            windows.retain(|_, w| Arc::strong_count(w) > 1);
        }
        let w = Arc::new(Window {
            queue: rate_queue(names, &self.task_type, key.as_deref()),
            turn: tokio::sync::Mutex::new(()),
            full: AtomicBool::new(false),
            waiters: std::sync::atomic::AtomicUsize::new(0),
            declared: Mutex::new(None),
            counts_bytes: AtomicBool::new(false),
            local: Mutex::new(Batch {
                left: 0,
                until: Instant::now(),
                size: 1,
                taking: false,
            }),
        });
        windows.insert(key, w.clone());
        w
    }
}

impl Window {
    /// How many tokens the next marker takes: a batch if no other task of
    /// this worker is taking one (it then is), else one. A batch doubles
    /// when the last was used up, and halves when tokens of it were
    /// dropped unused.
    fn batch_to_take(&self, max: u32) -> u32 {
        let mut b = self.local.lock().expect("batch lock");
        if self.waiters.load(Ordering::Relaxed) > 0 {
            // The limit binds: one token at a time, none left unused.
            b.size = 1;
            return 1;
        }
        if b.taking || max <= 1 {
            return 1;
        }
        if b.left > 0 {
            // Only reached once they can no longer be used.
            b.size = (b.size / 2).max(1);
        } else {
            b.size = b.size.saturating_mul(2).min(max);
        }
        b.left = 0;
        b.taking = b.size > 1;
        b.size
    }

    /// Keeps `n` tokens of a marker just taken, usable until `until`.
    fn keep(&self, n: u32, until: Instant) {
        if n == 0 {
            return;
        }
        let mut b = self.local.lock().expect("batch lock");
        if Instant::now() >= b.until {
            if b.left > 0 {
                // Dropped unused: batches were larger than the demand.
                b.size = (b.size / 2).max(1);
            }
            b.left = 0;
        }
        b.left += n;
        b.until = until;
    }
}

/// Counts a task among its window's waiters while it lives.
struct Waiter<'a>(&'a Window);

impl<'a> Waiter<'a> {
    fn new(w: &'a Window) -> Self {
        w.waiters.fetch_add(1, Ordering::Relaxed);
        Waiter(w)
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, Ordering::Relaxed);
    }
}
