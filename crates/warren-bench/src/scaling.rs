//! Scenario `scaling`: the aggregate drain of 1, 2 and 4 workers on one
//! preloaded queue, beside the broker's own ceiling on the same machine.
//!
//! The ceiling is what RabbitMQ alone moves with nothing asked of it:
//! transient messages published without confirms into a queue, then taken
//! by one consumer with automatic acknowledgement. Warren's drains are
//! reported as a fraction of it, so a reader sees where the broker (or the
//! machine) rather than Warren sets the limit.

use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use serde_json::json;
use warren_client::TaskRequest;
use warren_core::Config;

use crate::env::{queue_depth, BenchEnv};
use crate::scenarios::{bar, count_events, worker_vars};
use crate::{Options, Row};

/// Worker counts measured.
const WORKERS: [usize; 3] = [1, 2, 4];

/// Runs the scenario: one ceiling, then one drain per worker count.
pub async fn scaling(base: &Config, opts: &Options) -> anyhow::Result<Vec<Row>> {
    let ceiling = broker_ceiling(base, opts.n).await?;
    let s = "scaling";
    let mut rows = vec![Row::new(
        s,
        "broker ceiling: transient, no confirms, auto-ack",
        "msgs/s",
        ceiling,
    )];
    for k in WORKERS {
        let rate = drain(base, opts, k).await?;
        rows.push(Row::vs(
            s,
            &format!("drain with {k} worker(s), ratio to the ceiling"),
            "tasks/s",
            rate,
            ceiling,
        ));
    }
    Ok(rows)
}

/// Preloads `n` tasks, starts `workers` workers, and returns tasks/s
/// between the first and the last `succeeded` event.
async fn drain(base: &Config, opts: &Options, workers: usize) -> anyhow::Result<f64> {
    let n = opts.n;
    let mut env = BenchEnv::new(base, opts.config_path.clone()).await?;
    let mut watch = env.client.watch(&["succeeded.diag.echo"]).await?;
    let reqs: Vec<TaskRequest> = (0..n)
        .map(|i| TaskRequest::new("diag.echo", json!({ "i": i })))
        .collect();
    let b = bar(n as u64, "scaling: publish");
    env.client
        .publish_batch(&reqs, 512, |k| b.set_position(k as u64))
        .await?;
    b.finish_and_clear();
    for _ in 0..workers {
        env.spawn(&["worker", "--queues", "diag"], &worker_vars(opts))?;
    }
    let b = bar(n as u64, "scaling: drain");
    let (first, last) = count_events(&mut watch, n, Duration::from_secs(30), &b).await?;
    drop(watch);
    env.cleanup().await?;
    Ok((n.max(2) - 1) as f64 / (last - first).as_secs_f64().max(1e-9))
}

/// Messages/s one auto-ack consumer takes from a queue preloaded with `n`
/// transient messages published without confirms.
async fn broker_ceiling(base: &Config, n: usize) -> anyhow::Result<f64> {
    let conn = warren_client::runtime::connect(&base.broker, "bench ceiling").await?;
    let ch = conn.create_channel().await?;
    let queue = format!(
        "{}-bench-ceiling-{}",
        base.prefix,
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    let body = serde_json::to_vec(&json!({ "i": 0 }))?;
    let b = bar(n as u64, "ceiling: publish");
    for i in 0..n {
        ch.basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default().with_delivery_mode(1),
        )
        .await?;
        b.set_position(i as u64);
    }
    b.finish_and_clear();
    // Without confirms the last publications may still be in flight: wait
    // until the queue holds them all.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let depth = queue_depth(&ch, &queue).await?;
        if depth as usize >= n {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {depth} of {n} messages reached {queue}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "ceiling".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let b = bar(n as u64, "ceiling: consume");
    let mut first = None;
    let mut last = Instant::now();
    for _ in 0..n {
        match tokio::time::timeout(Duration::from_secs(30), consumer.next()).await {
            Ok(Some(d)) => {
                d?;
                last = Instant::now();
                first.get_or_insert(last);
                b.inc(1);
            }
            _ => anyhow::bail!("the ceiling consumer stopped receiving"),
        }
    }
    b.finish_and_clear();
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = conn.close(200, "measured".into()).await;
    let first = first.unwrap_or(last);
    Ok((n.max(2) - 1) as f64 / (last - first).as_secs_f64().max(1e-9))
}
