//! `warren status` without an id: the fleet at a glance.
//!
//! Queues, running and delayed tasks and the workers alive come from the
//! RabbitMQ management API (`broker.management_url`); failures in the last
//! hour from the tracker's database, when it can be opened; the paused
//! queues and types from the cancels stream.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use warren_client::runtime::CancelSet;
use warren_core::pauses::{PauseKind, PauseTarget};
use warren_core::Config;
use warren_tracker::mgmt::{self, ConsumerInfo, QueueInfo};
use warren_tracker::{OpenMode, Store};

/// How long the management API and the tracker's database get to answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// One work queue, its priority lanes summed in.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
struct WorkQueue {
    /// Short name (`io`).
    name: String,
    /// Whether the broker has it (a configured queue may not be declared yet).
    declared: bool,
    ready: u64,
    unacked: u64,
    consumers: u64,
    publish_rate: f64,
    deliver_rate: f64,
    /// Paused fleet-wide (`warren pause queue`).
    paused: bool,
}

/// The internal queues, grouped.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
struct Internal {
    /// Delay intake, wait and release tiers, summed.
    delay: u64,
    dead: u64,
    unroutable: u64,
    tracker: u64,
    /// Tasks of paused types, parked in `P.paused.<type>`.
    paused: u64,
    /// Every other queue of the prefix (cancels, escrow, control, ...).
    other: u64,
}

/// One process consuming work queues.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct Worker {
    /// Its connection's name (`warren worker host/pid`).
    connection: String,
    /// The work queues it consumes (short names).
    queues: Vec<String>,
}

/// The whole overview.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct Overview {
    queues: Vec<WorkQueue>,
    internal: Internal,
    /// Delivered and not acknowledged on the work queues.
    running: u64,
    /// Waiting in the delay intake and tiers.
    delayed: u64,
    /// Tasks whose latest error is less than an hour old; `None` when the
    /// tracker's database could not be read.
    failures_last_hour: Option<i64>,
    /// Why the tracker's database could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    tracker_error: Option<String>,
    workers: Vec<Worker>,
    /// The work queues and task types paused fleet-wide, queues first.
    paused: Vec<PauseTarget>,
}

pub async fn run(config: &Config, json: bool) -> anyhow::Result<i32> {
    let http = reqwest::Client::builder()
        .timeout(ASK_TIMEOUT)
        .build()
        .context("HTTP client")?;
    let queues = mgmt::queues(&http, config)
        .await
        .map_err(anyhow::Error::msg)?;
    let consumers = mgmt::work_consumers(&http, config)
        .await
        .map_err(anyhow::Error::msg)?;
    let failures = failures_last_hour(config).await;
    let pauses = CancelSet::read_once(config.broker.clone(), config.names(), ASK_TIMEOUT)
        .await
        .context("read what is paused")?
        .pauses()
        .paused()
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    let overview = build(config, &queues, &consumers, failures, pauses);
    if json {
        println!("{}", serde_json::to_string(&overview)?);
    } else {
        print!("{}", render(&overview));
    }
    std::io::Write::flush(&mut std::io::stdout()).context("write to stdout")?;
    Ok(0)
}

/// Tasks whose latest error is less than an hour old, or why the tracker's
/// database could not tell.
async fn failures_last_hour(config: &Config) -> Result<i64, String> {
    let ask = async {
        let store = Store::open(&config.tracker.database_url, OpenMode::Existing)
            .await
            .map_err(|e| e.to_string())?;
        let since = now_ms() - 3_600_000;
        let n = store.errors_since(since).await.map_err(|e| e.to_string());
        store.close().await;
        n
    };
    match tokio::time::timeout(ASK_TIMEOUT, ask).await {
        Ok(r) => r.map_err(|e| e.lines().next().unwrap_or_default().to_owned()),
        Err(_) => Err(format!("no answer within {} s", ASK_TIMEOUT.as_secs())),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Groups what the management API said.
fn build(
    config: &Config,
    queues: &[QueueInfo],
    consumers: &[ConsumerInfo],
    failures: Result<i64, String>,
    paused: Vec<PauseTarget>,
) -> Overview {
    let mut work: BTreeMap<String, WorkQueue> = BTreeMap::new();
    for q in &config.queues {
        work.insert(
            q.name.clone(),
            WorkQueue {
                name: q.name.clone(),
                ..WorkQueue::default()
            },
        );
    }
    let mut internal = Internal::default();
    for q in queues {
        match (q.kind, &q.short) {
            ("work", Some(short)) => {
                let w = work.entry(short.clone()).or_insert_with(|| WorkQueue {
                    name: short.clone(),
                    ..WorkQueue::default()
                });
                w.declared = true;
                w.ready += q.ready;
                w.unacked += q.unacked;
                w.consumers += q.consumers;
                w.publish_rate += q.publish_rate;
                w.deliver_rate += q.deliver_rate;
            }
            ("delay", _) => internal.delay += q.messages,
            ("dead", _) => internal.dead += q.messages,
            ("unroutable", _) => internal.unroutable += q.messages,
            ("tracker", _) => internal.tracker += q.messages,
            ("paused", _) => internal.paused += q.messages,
            _ => internal.other += q.messages,
        }
    }
    let mut by_connection: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for c in consumers {
        let list = by_connection.entry(c.connection.clone()).or_default();
        if !list.contains(&c.short) {
            list.push(c.short.clone());
        }
    }
    for t in &paused {
        if let Some(w) = work.get_mut(&t.name).filter(|_| t.kind == PauseKind::Queue) {
            w.paused = true;
        }
    }
    let queues: Vec<WorkQueue> = work.into_values().collect();
    let (failures_last_hour, tracker_error) = match failures {
        Ok(n) => (Some(n), None),
        Err(e) => (None, Some(e)),
    };
    Overview {
        running: queues.iter().map(|q| q.unacked).sum(),
        delayed: internal.delay,
        queues,
        internal,
        failures_last_hour,
        tracker_error,
        workers: by_connection
            .into_iter()
            .map(|(connection, mut queues)| {
                queues.sort();
                Worker { connection, queues }
            })
            .collect(),
        paused,
    }
}

/// The text form: work queues first, then the internal ones and the totals.
fn render(o: &Overview) -> String {
    let mut out = format!(
        "{:<24}  {:>8}  {:>8}  {:>10}  {:>10}  {:>9}\n",
        "QUEUE", "READY", "UNACKED", "PUBLISH/S", "DELIVER/S", "CONSUMERS"
    );
    for q in &o.queues {
        let name = match (q.declared, q.paused) {
            (true, false) => q.name.clone(),
            (true, true) => format!("{} (paused)", q.name),
            (false, _) => format!("{} (not declared)", q.name),
        };
        out.push_str(&format!(
            "{:<24}  {:>8}  {:>8}  {:>10.1}  {:>10.1}  {:>9}\n",
            name, q.ready, q.unacked, q.publish_rate, q.deliver_rate, q.consumers
        ));
    }
    if o.queues.is_empty() {
        out.push_str("(no work queues)\n");
    }
    out.push('\n');
    let i = &o.internal;
    out.push_str(&format!(
        "internal  delay {}  dead {}  unroutable {}  tracker events {}  paused types {}  other {}\n",
        i.delay, i.dead, i.unroutable, i.tracker, i.paused, i.other
    ));
    let names = |kind| {
        let v: Vec<&str> = o
            .paused
            .iter()
            .filter(|t| t.kind == kind)
            .map(|t| t.name.as_str())
            .collect();
        if v.is_empty() {
            "none".to_owned()
        } else {
            v.join(", ")
        }
    };
    out.push_str(&format!(
        "paused    queues: {}  types: {}\n",
        names(PauseKind::Queue),
        names(PauseKind::Type)
    ));
    out.push_str(&format!("running   {}\n", o.running));
    out.push_str(&format!("delayed   {}\n", o.delayed));
    match (&o.failures_last_hour, &o.tracker_error) {
        (Some(n), _) => out.push_str(&format!("failures  {n} in the last hour\n")),
        (None, e) => out.push_str(&format!(
            "failures  tracker not reachable ({})\n",
            e.as_deref().unwrap_or("unknown")
        )),
    }
    out.push_str(&format!("workers   {} alive\n", o.workers.len()));
    for w in &o.workers {
        out.push_str(&format!("  {}  {}\n", w.connection, w.queues.join(", ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(name: &str, kind: &'static str, short: Option<&str>, ready: u64) -> QueueInfo {
        QueueInfo {
            name: name.into(),
            kind,
            short: short.map(str::to_owned),
            messages: ready + 1,
            ready,
            unacked: 1,
            consumers: 1,
            publish_rate: 0.5,
            deliver_rate: 0.25,
            ack_rate: 0.0,
        }
    }

    #[test]
    fn lanes_sum_into_their_queue_and_internal_queues_group() {
        // The built-in queues, less `diag`, which the broker lacks here too.
        let mut config = Config::from_toml("").unwrap();
        config.queues.retain(|q| q.name == "io" || q.name == "cpu");
        let queues = [
            queue("warren.q.io", "work", Some("io"), 3),
            queue("warren.q.io.lane.1", "work", Some("io"), 4),
            queue("warren.wait.16s", "delay", None, 2),
            queue("warren.release.2s", "delay", None, 1),
            queue("warren.dead", "dead", None, 0),
            queue("warren.cancels", "internal", None, 0),
        ];
        let consumers = [
            ConsumerInfo {
                queue: "warren.q.io".into(),
                short: "io".into(),
                connection: "warren worker a/1".into(),
            },
            ConsumerInfo {
                queue: "warren.q.io.lane.1".into(),
                short: "io".into(),
                connection: "warren worker a/1".into(),
            },
        ];
        let o = build(
            &config,
            &queues,
            &consumers,
            Err("no database".into()),
            vec![
                PauseTarget::queue("io"),
                PauseTarget::task_type("email.send"),
            ],
        );
        let io = o.queues.iter().find(|q| q.name == "io").unwrap();
        assert_eq!((io.ready, io.unacked, io.consumers), (7, 2, 2));
        let cpu = o.queues.iter().find(|q| q.name == "cpu").unwrap();
        assert!(!cpu.declared);
        assert_eq!(o.running, 2);
        assert_eq!(o.delayed, 3 + 2);
        assert_eq!(o.internal.dead, 1);
        assert_eq!(o.workers.len(), 1);
        assert_eq!(o.workers[0].queues, ["io"]);
        let text = render(&o);
        assert!(text.contains("cpu (not declared)"), "{text}");
        assert!(
            text.contains("tracker not reachable (no database)"),
            "{text}"
        );
        assert!(text.contains("warren worker a/1  io"), "{text}");
        assert!(text.contains("io (paused)"), "{text}");
        assert!(
            text.contains("paused    queues: io  types: email.send"),
            "{text}"
        );
    }
}
