//! The scheduler process: consumes its intake queues with reconnect and backoff.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;

use futures::stream::{select_all, StreamExt};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};
use warren_client::runtime::{
    connect, connection_gone, process_identity, publish_timeout, CancelSet, ConfirmChannel, Outbox,
    Reconnect,
};
use warren_client::ClientError;
use warren_core::Config;

use crate::delays::Delays;
use crate::intake::park_dead_lettered;
use crate::metrics::SchedulerMetrics;
use crate::tiers::{read_tiers, PREFETCH as TIER_PREFETCH};

/// Why the scheduler stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// A broker operation failed in a way reconnecting cannot fix.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A `[[cron]]` entry cannot run (unknown time zone, schedule that never fires).
    #[error(transparent)]
    Cron(#[from] crate::cron::CronError),
}

/// Applies the time and failure rules of the contract through the broker.
#[derive(Debug)]
pub struct Scheduler {
    config: Config,
    identity: String,
    metrics: Arc<SchedulerMetrics>,
}

/// Which intake a delivery came from.
#[derive(Clone, Copy, Debug)]
enum Intake {
    DeadLetters,
    Delayed,
    Due,
}

/// How many delayed tasks one scheduler may hold unacknowledged: hops in
/// flight, and tasks waiting (under a second) for their release or release
/// tier. At 1,000 delayed tasks/s about 500 wait at once. Memory grows with
/// this bound when many tasks share a due time (peak RSS with 100,000 due at
/// once: 35 MB at 1,000, 42 MB at 1,500, 75 MB at 5,000; 52 MB with
/// 1,000,000 at 1,500), not with the tasks held in tiers.
const DELAY_PREFETCH: u16 = 1000;

/// How many deliveries are being handled (publish, confirm, ack) at once.
const HANDLERS_IN_FLIGHT: usize = 256;

fn take(failure: &Mutex<Option<ClientError>>) -> ClientError {
    failure
        .lock()
        .expect("not poisoned")
        .take()
        .unwrap_or_else(|| ClientError::Closed("scheduler session".into()))
}

impl Scheduler {
    /// A scheduler for `config` (its topology must have been applied).
    pub fn new(config: Config) -> Self {
        Scheduler {
            config,
            identity: process_identity(),
            metrics: Arc::default(),
        }
    }

    /// What this scheduler reports on `/metrics` and `/readyz`.
    pub fn probe(&self) -> Arc<dyn warren_ops::Probe> {
        self.metrics.clone()
    }

    /// Runs until `shutdown`, reconnecting with backoff when the broker goes away.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), SchedulerError> {
        let max_backoff = Duration::from_millis(self.config.broker.reconnect_max_ms);
        let cancels = CancelSet::new();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let follower = {
            let cancels = cancels.clone();
            let broker = self.config.broker.clone();
            let names = self.config.names();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                cancels
                    .follow(broker, names, max_backoff, shutdown, ready_tx)
                    .await
            })
        };
        tokio::select! {
            r = ready_rx => if r.is_ok() { self.metrics.link.cancels_known() },
            _ = shutdown.cancelled() => {}
        }
        // Pauses outlive the cancels stream's retention (see `pauses`).
        let renewer = tokio::spawn(crate::pauses::renew(
            self.config.clone(),
            cancels.clone(),
            self.metrics.clone(),
            shutdown.clone(),
        ));
        let delays = Delays::new(
            &self.config,
            self.identity.clone(),
            cancels,
            self.metrics.clone(),
        );
        let chords = tokio::spawn(crate::chords::run(self.config.clone(), shutdown.clone()));
        let cron =
            crate::cron::run_counted(self.config.clone(), shutdown.clone(), self.metrics.clone());
        let main = async {
            let mut retry = Reconnect::new("scheduler", max_backoff);
            while retry.ready(&shutdown).await {
                let r = self.session(&delays, &shutdown, &mut retry).await;
                self.metrics.link.consuming(false);
                match r {
                    Ok(()) => break,
                    Err(e) => {
                        self.metrics.link.reconnect();
                        retry.lost(&e);
                    }
                }
            }
        };
        let main = async {
            main.await;
            Ok::<(), SchedulerError>(())
        };
        let cron = async {
            // A bad schedule stops the whole scheduler rather than run without cron.
            let r = cron.await;
            if r.is_err() {
                shutdown.cancel();
            }
            r.map_err(SchedulerError::from)
        };
        let joined = tokio::try_join!(main, cron);
        let _ = follower.await;
        let _ = renewer.await;
        let _ = chords.await;
        info!("scheduler stopped");
        joined.map(|_| ())
    }

    /// One connection's life: returns `Ok` on shutdown, `Err` when it died.
    async fn session(
        &self,
        delays: &Delays,
        shutdown: &CancellationToken,
        retry: &mut Reconnect,
    ) -> Result<(), ClientError> {
        let names = self.config.names();
        let conn = connect(&self.config.broker, "scheduler").await?;
        let amqp = |what: &str| {
            let what = what.to_owned();
            move |source| ClientError::Amqp { what, source }
        };
        let ch = conn.create_channel().await.map_err(amqp("open channel"))?;
        ch.basic_qos(DELAY_PREFETCH, BasicQosOptions::default())
            .await
            .map_err(amqp("set prefetch"))?;
        let out = Outbox {
            channel: ConfirmChannel::open(&conn).await?,
            names: names.clone(),
        };
        let tag_base = names.per_process("scheduler", &self.identity);
        let chord_args = warren_core::topology::field_table(
            &warren_core::topology::chord_queue_arguments(&self.config),
        );
        let mut consumers = Vec::new();
        for (queue, kind) in [
            (names.dead_letter_intake(), Intake::DeadLetters),
            (names.delay_intake(), Intake::Delayed),
            (names.wait_due(), Intake::Due),
        ] {
            let c = ch
                .basic_consume(
                    queue.as_str().into(),
                    format!("{tag_base}.{queue}").into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(amqp(&format!("consume {queue}")))?;
            consumers.push(c.map(move |d| (kind, d)).boxed());
        }
        // Replicated: the wait tiers have no TTL; this session reads them.
        let stop_tiers = CancellationToken::new();
        let _stop_tiers = stop_tiers.clone().drop_guard();
        if self.config.topology.replicated {
            let tier_ch = conn
                .create_channel()
                .await
                .map_err(amqp("open wait tier channel"))?;
            let tiers = delays
                .tiers
                .iter()
                .map(|&t| (names.wait_tier(t), t))
                .collect();
            tier_ch
                .basic_qos(TIER_PREFETCH, BasicQosOptions { global: false })
                .await
                .map_err(amqp("set wait tier prefetch"))?;
            // A consumer may hold a delivery this long before the broker
            // closes its channel.
            let consume_below = Duration::from_millis(self.config.broker.consumer_timeout_ms / 2);
            let due = read_tiers(&tier_ch, tiers, consume_below, &stop_tiers);
            consumers.push(due.map(|d| (Intake::Due, d)).boxed());
        }
        let mut deliveries = select_all(consumers);
        info!("scheduler consuming its intake queues");
        retry.up();
        self.metrics.link.consuming(true);
        // Tasks in their final second; stopped (left unacknowledged) when the
        // session ends, so the broker redelivers them to the next scheduler.
        let holds = TaskTracker::new();
        let stop_holds = CancellationToken::new();
        // Deliveries are handled concurrently so confirms pipeline; a failed
        // handler (the connection is going) ends the session, and whatever
        // was not acknowledged returns to the broker.
        let handlers = TaskTracker::new();
        let slots = Arc::new(Semaphore::new(HANDLERS_IN_FLIGHT));
        let failed = CancellationToken::new();
        let failure: Arc<Mutex<Option<ClientError>>> = Arc::default();
        // The connection's loss ends the session even while every handler
        // slot is taken by a handler waiting on it.
        let gone = connection_gone(&conn);
        tokio::pin!(gone);
        let lost = || ClientError::Closed("the connection to the broker".into());
        let result = loop {
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => p.expect("never closed"),
                _ = shutdown.cancelled() => break Ok(()),
                _ = failed.cancelled() => break Err(take(&failure)),
                _ = &mut gone => break Err(lost()),
            };
            let next = tokio::select! {
                n = deliveries.next() => n,
                _ = shutdown.cancelled() => break Ok(()),
                _ = failed.cancelled() => break Err(take(&failure)),
                _ = &mut gone => break Err(lost()),
            };
            let (kind, d) = match next {
                None => break Err(ClientError::Closed("scheduler consumers".into())),
                Some((_, Err(source))) => {
                    break Err(ClientError::Amqp {
                        what: "consume".into(),
                        source,
                    })
                }
                Some((kind, Ok(d))) => (kind, d),
            };
            let chord_args = chord_args.clone();
            let (out, names, identity, delays, metrics) = (
                out.clone(),
                names.clone(),
                self.identity.clone(),
                delays.clone(),
                self.metrics.clone(),
            );
            let (holds, stop_holds, failed, failure) = (
                holds.clone(),
                stop_holds.clone(),
                failed.clone(),
                failure.clone(),
            );
            handlers.spawn(async move {
                let r = match kind {
                    Intake::DeadLetters => {
                        match park_dead_lettered(&out, &names, &identity, &d, &chord_args).await {
                            Ok(reason) => d
                                .acker
                                .ack(BasicAckOptions::default())
                                .await
                                .map(|_| metrics.dead(reason.as_str()))
                                .map_err(|source| ClientError::Amqp {
                                    what: "ack dead letter".into(),
                                    source,
                                }),
                            Err(e) => Err(e),
                        }
                    }
                    Intake::Delayed => delays.intake(&out, d, &holds, &stop_holds).await,
                    Intake::Due => delays.hop(&out, d, &holds, &stop_holds).await,
                };
                if let Err(e) = r {
                    failure.lock().expect("not poisoned").get_or_insert(e);
                    failed.cancel();
                }
                drop(permit);
            });
        };
        // Every wait below is bounded: an operation on a connection that is
        // gone may never finish, and what it held unacknowledged goes back
        // to the broker with the connection anyway.
        let grace = publish_timeout() + Duration::from_secs(1);
        handlers.close();
        if tokio::time::timeout(grace, handlers.wait()).await.is_err() {
            warn!(
                ?grace,
                "scheduler handlers still busy; leaving them to the closed connection"
            );
        }
        stop_holds.cancel();
        holds.close();
        if tokio::time::timeout(grace, holds.wait()).await.is_err() {
            warn!(
                ?grace,
                "scheduler releases still busy; leaving them to the closed connection"
            );
        }
        let close = conn.close(200, "scheduler stopping".into());
        let _ = tokio::time::timeout(Duration::from_secs(5), close).await;
        result
    }
}
