//! Wait tiers the scheduler reads itself, on the replicated topology.
//!
//! On the classic topology a wait tier's TTL dead-letters each task into
//! `P.wait.due` when its time is up. On a cluster that hop is not safe:
//! RabbitMQ 3.10's at-least-once dead-lettering into a quorum queue whose
//! leader has just died confirms, and then drops, the tasks it forwards for
//! a while (seen in the cluster fault tests). So the replicated tiers have
//! no TTL, and every scheduler takes tasks out of them itself:
//!
//! - a task enters tier `n` with [`TIER_EXIT`] = its entry time + `n` s, so
//!   within a tier (first in, first out) the exit times only grow;
//! - a tier shorter than half the broker's consumer timeout is consumed
//!   with a prefetch of [`PREFETCH`]: the reader holds each delivery,
//!   unacknowledged, until its exit time, then hands it to [`Delays::hop`]
//!   like one from `P.wait.due` (next tier, or release), which acknowledges
//!   it once its next copy is confirmed. Deliveries come in tier order, so
//!   the reader holds at most [`PREFETCH`] tasks of a tier;
//! - a longer tier cannot hold a delivery that long (the broker would close
//!   the channel): its reader takes the head with `basic.get`, hands it on
//!   when due, or else puts it back at the head (a quorum queue delivers
//!   returned messages first) and looks again at its exit time; an empty
//!   tier is read again after its own length (at most [`MAX_IDLE`]), since a
//!   task entering it meanwhile cannot be due sooner.
//!
//! A scheduler that dies holds nothing acknowledged, so it loses nothing;
//! several schedulers may read the same tiers.
//!
//! [`Delays::hop`]: crate::delays::Delays::hop

use std::time::Duration;

use futures::stream::{BoxStream, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicGetOptions, BasicNackOptions};
use lapin::types::FieldTable;
use lapin::Channel;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use warren_client::runtime::now_ms;
use warren_core::delay::TIER_EXIT;
use warren_core::headers;

/// The longest an empty tier goes unread.
const MAX_IDLE: Duration = Duration::from_secs(30);

/// Due deliveries waiting for a handler, across all tiers.
const BACKLOG: usize = 64;

/// Deliveries a consumed tier's reader holds at most.
pub(crate) const PREFETCH: u16 = 256;

/// A due task taken out of its tier, or the error that ended a reader.
pub(crate) type Due = Result<Delivery, lapin::Error>;

/// Starts a reader for each tier `(queue, seconds)` on `ch` and returns
/// the stream of due deliveries. The readers stop when `stop` is cancelled,
/// when the stream is dropped, or after sending an error (the channel is
/// gone: the session ends and starts again).
/// Tiers of `consume_below` or longer are read with `basic.get`; the
/// channel's prefetch must be [`PREFETCH`] per consumer.
pub(crate) fn read_tiers(
    ch: &Channel,
    tiers: Vec<(String, u64)>,
    consume_below: Duration,
    stop: &CancellationToken,
) -> BoxStream<'static, Due> {
    let (tx, rx) = mpsc::channel(BACKLOG);
    for (queue, secs) in tiers {
        let (ch, tx, stop) = (ch.clone(), tx.clone(), stop.clone());
        if Duration::from_secs(secs) < consume_below {
            tokio::spawn(consume_tier(ch, queue, secs, tx, stop));
        } else {
            tokio::spawn(read_tier(ch, queue, secs, tx, stop));
        }
    }
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|d| (d, rx)) }).boxed()
}

/// Consumes a short tier: holds each delivery until its exit time.
async fn consume_tier(
    ch: Channel,
    queue: String,
    secs: u64,
    tx: mpsc::Sender<Due>,
    stop: CancellationToken,
) {
    // An empty tag: the broker names the consumer.
    let consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await;
    let mut consumer = match consumer {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.send(Err(e)).await;
            return;
        }
    };
    loop {
        let next = tokio::select! {
            n = consumer.next() => n,
            _ = stop.cancelled() => return,
            _ = tx.closed() => return,
        };
        let d = match next {
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
            // Cancelled by the broker (the tier was deleted): read it the
            // other way, which reports a channel that is gone.
            None => return read_tier(ch, queue, secs, tx, stop).await,
        };
        let wait = exit_of(&d).saturating_sub(now_ms());
        if wait > 0 {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(wait as u64)) => {}
                _ = stop.cancelled() => return,
                _ = tx.closed() => return,
            }
        }
        if tx.send(Ok(d)).await.is_err() {
            return;
        }
    }
}

/// When a task's time in its tier is up (Unix ms; 0 when not marked).
fn exit_of(d: &Delivery) -> i64 {
    headers::get_int(d.properties.headers().as_ref(), TIER_EXIT)
        .ok()
        .flatten()
        .unwrap_or(0)
}

async fn read_tier(
    ch: Channel,
    queue: String,
    secs: u64,
    tx: mpsc::Sender<Due>,
    stop: CancellationToken,
) {
    let idle = Duration::from_secs(secs).clamp(Duration::from_secs(1), MAX_IDLE);
    loop {
        let got = tokio::select! {
            g = ch.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false }) => g,
            _ = stop.cancelled() => return,
        };
        let pause = match got {
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
            Ok(None) => idle,
            Ok(Some(m)) => {
                let d = m.delivery;
                let wait = exit_of(&d).saturating_sub(now_ms());
                if wait <= 0 {
                    if tx.send(Ok(d)).await.is_err() {
                        return;
                    }
                    continue;
                }
                // Not yet: back to the head of the tier until its time.
                let back = BasicNackOptions {
                    multiple: false,
                    requeue: true,
                };
                if let Err(e) = d.acker.nack(back).await {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                Duration::from_millis(wait as u64).min(idle)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.cancelled() => return,
            _ = tx.closed() => return,
        }
    }
}
