//! Chords (contract section 8): folds each chord's member outcomes, held in
//! the broker, into one callback.
//!
//! **One folder at a time.** Every scheduler keeps trying to consume
//! `P.chords` as its *exclusive* consumer; the broker refuses all but one
//! (`ACCESS_REFUSED`), and the others try again about every second. When the
//! folder's connection dies, the broker hands `P.chords` to the next one.
//!
//! **Folding.** For each chord start it holds (unacknowledged, up to
//! [`FOLDS`] chords at once), the folder declares the chord's queue
//! `P.chord.<id>` and consumes it on a channel of its own, again as its
//! exclusive consumer, acknowledging nothing but duplicates (a member's
//! outcome delivered twice, dropped by its index) and outcomes that are
//! not the chord's. Once every member is in it publishes the callback
//! (confirmed), acknowledges the start, and deletes the chord's queue.
//!
//! **Failures.** A folder killed at any point leaves the start and the
//! outcomes unacknowledged: the broker redelivers them to the next folder,
//! which folds again from the first outcome. Killed after the callback's
//! confirm and before the start's ack, the next folder publishes the
//! callback again, with the same id ([`callback_id`]). Killed after the ack
//! and before the delete, the queue is left to expire
//! ([`QUEUE_EXPIRES_MS`](warren_core::chord::QUEUE_EXPIRES_MS)).
//!
//! A chord start over its bounds or malformed is parked in `P.dead` with a
//! `dead` event (reason `invalid`, code `bad_workflow`, its reason in the
//! message), under the chord id and type [`CHORD_TYPE`].

use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::Connection;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use warren_client::runtime::{
    confirm_all, connect, connection_gone, process_identity, ConfirmChannel, Outbox, Reconnect,
};
use warren_client::ClientError;
use warren_core::chord::{Added, Fold, Start};
use warren_core::event::{new_id, ErrorKind, EventErrorInfo};
use warren_core::topology::{chord_queue_arguments, field_table};
use warren_core::{Config, DeadReason, Event, TaskState};

/// How many chords one folder folds at once (its prefetch on `P.chords`);
/// more wait in `P.chords` until one completes.
pub const FOLDS: u16 = 100;

/// The task type of the `dead` event of a chord start refused.
pub const CHORD_TYPE: &str = "warren.chord";

/// How long a standby waits between tries to become the folder.
const STANDBY_RETRY: Duration = Duration::from_secs(1);

/// Folds chords until `shutdown`, as the folder or a standby, reconnecting
/// when the broker goes away.
pub async fn run(config: Config, shutdown: CancellationToken) {
    let identity = process_identity();
    let max_backoff = Duration::from_millis(config.broker.reconnect_max_ms);
    let mut retry = Reconnect::new("scheduler chords", max_backoff);
    while retry.ready(&shutdown).await {
        match session(&config, &identity, &shutdown, &mut retry).await {
            Ok(()) => break,
            Err(e) => retry.lost(&e),
        }
    }
}

fn amqp(what: &str) -> impl FnOnce(lapin::Error) -> ClientError {
    let what = what.to_owned();
    move |source| ClientError::Amqp { what, source }
}

/// One connection's life: `Ok` on shutdown.
async fn session(
    config: &Config,
    identity: &str,
    shutdown: &CancellationToken,
    retry: &mut Reconnect,
) -> Result<(), ClientError> {
    let names = config.names();
    let conn = std::sync::Arc::new(connect(&config.broker, "scheduler chords").await?);
    retry.up();
    let gone = connection_gone(&conn);
    tokio::pin!(gone);
    // Standby: try to become the exclusive consumer of P.chords.
    let (ch, mut starts) = loop {
        let ch = conn
            .create_channel()
            .await
            .map_err(amqp("open chords channel"))?;
        ch.basic_qos(FOLDS, BasicQosOptions::default())
            .await
            .map_err(amqp("set chords prefetch"))?;
        let exclusive = BasicConsumeOptions {
            exclusive: true,
            ..Default::default()
        };
        let tag = names.per_process("chords", identity);
        match ch
            .basic_consume(
                names.chords().as_str().into(),
                tag.as_str().into(),
                exclusive,
                FieldTable::default(),
            )
            .await
        {
            Ok(c) => break (ch, c),
            Err(e) => {
                // Another scheduler folds (or the queue is missing: the
                // topology is not applied yet); the channel is closed.
                debug!(error = %e, "chords: standby");
                tokio::select! {
                    _ = tokio::time::sleep(STANDBY_RETRY) => {}
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = &mut gone => return Err(ClientError::Closed("the connection to the broker".into())),
                }
            }
        }
    };
    info!("chords: this scheduler folds chords");
    let out = Outbox {
        channel: ConfirmChannel::open(&conn).await?,
        names: names.clone(),
    };
    let args = field_table(&chord_queue_arguments(config));
    let folds = TaskTracker::new();
    let stop = CancellationToken::new();
    let _stop_guard = stop.clone().drop_guard();
    let failed = CancellationToken::new();
    let result = loop {
        let next = tokio::select! {
            n = starts.next() => n,
            _ = shutdown.cancelled() => break Ok(()),
            _ = failed.cancelled() => break Err(ClientError::Closed("a chord fold".into())),
            _ = &mut gone => break Err(ClientError::Closed("the connection to the broker".into())),
        };
        let d = match next {
            None => break Err(ClientError::Closed("the chords consumer".into())),
            Some(Err(source)) => {
                break Err(ClientError::Amqp {
                    what: "consume chords".into(),
                    source,
                })
            }
            Some(Ok(d)) => d,
        };
        let (conn, out, args, stop, failed, identity) = (
            conn.clone(),
            out.clone(),
            args.clone(),
            stop.clone(),
            failed.clone(),
            identity.to_owned(),
        );
        folds.spawn(async move {
            if let Err(e) = fold_one(&conn, &out, &args, &identity, d, &stop).await {
                warn!(error = %e, "chords: a fold failed; the folder reconnects and folds again");
                failed.cancel();
            }
        });
    };
    stop.cancel();
    folds.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), folds.wait()).await;
    drop(ch);
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        conn.close(200, "chords folder stopping".into()),
    )
    .await;
    result
}

/// Folds the chord whose start is `start`, then acknowledges it; returns
/// early (nothing acknowledged) on `stop`.
async fn fold_one(
    conn: &Connection,
    out: &Outbox,
    args: &FieldTable,
    identity: &str,
    d: Delivery,
    stop: &CancellationToken,
) -> Result<(), ClientError> {
    let id = d.properties.message_id().as_ref().map(|m| m.to_string());
    let start = match Start::parse(id.as_deref(), &d.data) {
        Ok(s) => s,
        Err(why) => return refuse(out, identity, &d, id, &why).await,
    };
    let chord_id = id.expect("a parsed start has an id");
    let queue = out.names.chord_queue(&chord_id);
    let ch = conn
        .create_channel()
        .await
        .map_err(amqp("open a chord channel"))?;
    let r = async {
        ch.basic_qos(start.size as u16, BasicQosOptions::default())
            .await
            .map_err(amqp("set a chord's prefetch"))?;
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.queue_declare(queue.as_str().into(), durable, args.clone())
            .await
            .map_err(amqp("declare a chord queue"))?;
        let exclusive = BasicConsumeOptions {
            exclusive: true,
            ..Default::default()
        };
        let mut outcomes = ch
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                exclusive,
                FieldTable::default(),
            )
            .await
            .map_err(amqp("consume a chord queue"))?;
        debug!(chord = %chord_id, size = start.size, "chords: folding");
        let mut fold = Fold::new(start.size);
        let mut last = 0;
        while !fold.is_complete() {
            let next = tokio::select! {
                n = outcomes.next() => n,
                _ = stop.cancelled() => return Ok(false),
            };
            let o = match next {
                None => return Err(ClientError::Closed(format!("the consumer of {queue}"))),
                Some(Err(source)) => {
                    return Err(ClientError::Amqp {
                        what: format!("consume {queue}"),
                        source,
                    })
                }
                Some(Ok(o)) => o,
            };
            match fold.add(&o.data) {
                Added::New => last = last.max(o.delivery_tag),
                dropped => {
                    if dropped == Added::Refused {
                        warn!(chord = %chord_id, "chords: an outcome not of this chord dropped");
                    }
                    o.acker
                        .ack(BasicAckOptions::default())
                        .await
                        .map_err(amqp("ack a duplicate outcome"))?;
                }
            }
        }
        let callback = fold.callback(&chord_id, &start);
        let c = out.next_task(&callback).await?;
        confirm_all(vec![c]).await?;
        info!(chord = %chord_id, callback = %callback.id, members = start.size, "chords: callback published");
        ch.basic_ack(
            last,
            BasicAckOptions {
                multiple: true,
            },
        )
        .await
        .map_err(amqp("ack a chord's outcomes"))?;
        Ok(true)
    }
    .await;
    match r {
        Ok(true) => {}
        Ok(false) => {
            let _ = ch.close(200, "chords folder stopping".into()).await;
            return Ok(());
        }
        Err(e) => {
            let _ = ch.close(200, "chord fold failed".into()).await;
            return Err(e);
        }
    }
    d.acker
        .ack(BasicAckOptions::default())
        .await
        .map_err(amqp("ack a chord start"))?;
    // The queue is deleted last: a folder killed before this leaves it to
    // expire, never a chord without its outcomes.
    if let Err(e) = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
    {
        warn!(error = %e, %queue, "chords: could not delete a completed chord's queue; it expires");
    }
    let _ = ch.close(200, "chord folded".into()).await;
    Ok(())
}

/// Parks a chord start that is over its bounds or malformed, with a `dead`
/// event saying why, and acknowledges it.
async fn refuse(
    out: &Outbox,
    identity: &str,
    d: &Delivery,
    id: Option<String>,
    why: &str,
) -> Result<(), ClientError> {
    let id = id
        .filter(|i| !i.is_empty() && i.len() <= 255)
        .unwrap_or_else(new_id);
    warn!(chord = %id, "chords: a chord start refused: {why}");
    let mut ev = Event::new(&id, CHORD_TYPE, TaskState::Dead, 0);
    ev.worker = Some(identity.to_owned());
    ev.reason = Some(DeadReason::Invalid.as_str().into());
    ev.workflow_id = Some(id.clone()).filter(|i| i.len() <= 200);
    ev.error = Some(EventErrorInfo {
        kind: ErrorKind::Permanent,
        code: "bad_workflow".into(),
        message: why.to_owned(),
    });
    let confirms = vec![
        out.dead(&d.data, &d.properties, &ev, DeadReason::Invalid, why, None)
            .await?,
        out.event(&ev).await?,
    ];
    confirm_all(confirms).await?;
    d.acker
        .ack(BasicAckOptions::default())
        .await
        .map(|_| ())
        .map_err(amqp("ack a refused chord start"))
}
