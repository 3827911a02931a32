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
//! - a reader per tier takes the tier's head with `basic.get`; when its exit
//!   time has passed, the delivery goes to [`Delays::hop`] like one from
//!   `P.wait.due` (next tier, or release), acknowledged once its next copy is
//!   confirmed; otherwise it goes back to the head of its tier (a quorum
//!   queue delivers returned messages first) and the reader sleeps until
//!   then;
//! - an empty tier is read again after its own length (at most
//!   [`MAX_IDLE`]): a task entering it meanwhile cannot be due sooner.
//!
//! A task is held unacknowledged only while it is due and on its way, so a
//! scheduler that dies loses nothing; several schedulers may read the same
//! tiers.
//!
//! [`Delays::hop`]: crate::delays::Delays::hop

use std::time::Duration;

use futures::stream::{BoxStream, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicGetOptions, BasicNackOptions};
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

/// A due task taken out of its tier, or the error that ended a reader.
pub(crate) type Due = Result<Delivery, lapin::Error>;

/// Starts a reader for each tier `(queue, seconds)` on `ch` and returns
/// the stream of due deliveries. The readers stop when `stop` is cancelled,
/// when the stream is dropped, or after sending an error (the channel is
/// gone: the session ends and starts again).
pub(crate) fn read_tiers(
    ch: &Channel,
    tiers: Vec<(String, u64)>,
    stop: &CancellationToken,
) -> BoxStream<'static, Due> {
    let (tx, rx) = mpsc::channel(BACKLOG);
    for (queue, secs) in tiers {
        tokio::spawn(read_tier(ch.clone(), queue, secs, tx.clone(), stop.clone()));
    }
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|d| (d, rx)) }).boxed()
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
                let exit = headers::get_int(d.properties.headers().as_ref(), TIER_EXIT)
                    .ok()
                    .flatten()
                    .unwrap_or(0);
                let wait = exit.saturating_sub(now_ms());
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
