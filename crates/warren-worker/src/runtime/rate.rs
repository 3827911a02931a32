//! Rate limits through the broker (contract section 9).
//!
//! The window of a limited type (or of one key of it) is the classic queue
//! `P.rate.<type>` (`P.rate.<type>.<hash>`) with `x-max-length` = the burst
//! and `x-overflow` = `reject-publish`. A token is a marker published there
//! with confirms and `expiration` = `per_ms * burst / limit`: acknowledged,
//! the task starts; refused (`basic.nack`, the window is full), it waits
//! until a marker expires. At most `burst` markers are alive at once, so the
//! broker alone keeps the rate, with no leader and nothing to refill.
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
    /// When this worker last declared the queue: declared again after a
    /// quarter of its `x-expires`, so the broker never deletes a window in
    /// use (publications do not count as use).
    declared: Mutex<Option<Instant>>,
}

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
        match self.try_once(rate, window, conn, metrics).await {
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
        let wait = async {
            let _turn = window.turn.lock().await;
            let mut refused = rate.poll;
            loop {
                let mut pause = rate.poll;
                match self.try_once(rate, window, conn, metrics).await {
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

    /// One try: publishes a marker to the window; whether the broker took
    /// it. A window deleted meanwhile (the marker came back unroutable) is
    /// declared again and tried once more.
    async fn try_once(
        &self,
        rate: &TypeRate,
        window: &Window,
        conn: &Connection,
        metrics: &WorkerMetrics,
    ) -> Result<bool, ClientError> {
        for _ in 0..2 {
            self.declare(rate, window, conn).await?;
            let ch = self.channel(conn).await?;
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
                    b"",
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
                    metrics.rate_token(&rate.task_type);
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
            warn!(window = queue, error = %e, "rate window declared with other arguments elsewhere: using it as it is");
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
            declared: Mutex::new(None),
        });
        windows.insert(key, w.clone());
        w
    }
}
