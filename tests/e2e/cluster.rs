//! Fault tests on a three-node RabbitMQ cluster (tests/support/node.rs
//! `TestCluster`: nodes `wt-cl…@localhost` of the test's own, removed on
//! drop, also when a test fails), with Warren's replicated topology
//! (`topology.replicated = true`: every queue quorum) and the node list in
//! `broker.url`.
//!
//! Each load test publishes immediate tasks, delayed tasks due over the
//! next 30 s and tasks that fail once, are retried once through the delay
//! path and end dead; then it breaks a node while they flow and counts every
//! task id to exactly one final outcome of the expected kind: nothing
//! missing, duplicates (at-least-once) allowed, counted and printed. It also
//! checks that no delayed task started before its due time and that every
//! dead letter is in `P.dead` at the end, and prints the time from the fault
//! to the next final event (tasks flowing again).
//!
//! Scale: the issue asks for 10,000 immediate and 2,000 delayed tasks. On
//! this 2-core machine, with three nodes and a debug build beside other
//! builds, that takes minutes per test, so the tests run [`IMMEDIATE`]
//! immediate, [`DELAYED`] delayed and [`RETRIED`] retried tasks; set
//! `WARREN_E2E_CLUSTER_SCALE` (a multiplier, e.g. 5) for the full size.
//! The tests of this file run one at a time (each owns a cluster of three
//! nodes; several at once would only compete for the two cores).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicGetOptions};
use lapin::types::FieldTable;
use serde_json::json;
use tokio::time::Instant;
use warren_client::{Client, EventWatch, TaskRequest};
use warren_core::{Config, Event, TaskState};
use warren_e2e::{unix_ms, Env, NodeOptions, Proc, TestCluster, T, T_LONG};

/// Immediate tasks (`diag.echo`) per load test, before the scale factor.
const IMMEDIATE: usize = 2_000;
/// Delayed tasks (`diag.sleep` of 1 ms), due over the next [`DELAY_SPAN_MS`].
const DELAYED: usize = 400;
/// Tasks that fail retryably (`diag.fail`), are retried once and end dead.
const RETRIED: usize = 200;
/// Delayed tasks are due from 2 s to this many ms after publishing.
const DELAY_SPAN_MS: i64 = 30_000;
/// Bound of a load test's wait for every final outcome.
const DRAIN_BOUND: Duration = Duration::from_secs(240);

/// One test of this file at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The scale factor of the load (`WARREN_E2E_CLUSTER_SCALE`, default 1).
fn scale() -> usize {
    match std::env::var("WARREN_E2E_CLUSTER_SCALE") {
        Ok(v) => v.parse().ok().filter(|n| *n >= 1).unwrap_or_else(|| {
            panic!("WARREN_E2E_CLUSTER_SCALE must be a whole number >= 1, got {v:?}")
        }),
        Err(_) => 1,
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

/// `text` without its ANSI colour sequences (`ESC [ … m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A cluster with a replicated Warren topology on it. The env drops first
/// (its processes end before the nodes stop).
struct Rig {
    env: Env,
    cluster: TestCluster,
    /// The Warren processes started, for [`Rig::diagnose`].
    procs: Vec<Proc>,
}

impl Rig {
    /// Three clustered nodes `wt-cl<name><i>-…`, and an env whose processes
    /// get every node in `broker.url` and a replicated topology, with
    /// retries after 0.2-1 s so that retried tasks flow during the test.
    async fn start(name: &str, extra: &[(&str, &str)]) -> Rig {
        let cluster = TestCluster::start(&format!("cl{name}"), 3, NodeOptions::default()).await;
        let urls = cluster.urls();
        let mut overrides = vec![
            ("WARREN__BROKER__URL", urls.as_str()),
            ("WARREN__TOPOLOGY__REPLICATED", "true"),
            ("WARREN__RETRY__DEFAULT__BASE_MS", "200"),
            ("WARREN__RETRY__DEFAULT__CAP_MS", "1000"),
            ("WARREN__WORKER__CONCURRENCY", "32"),
        ];
        overrides.extend_from_slice(extra);
        let env = Env::new(&format!("cl-{name}"), &overrides).await;
        Rig {
            env,
            cluster,
            procs: Vec::new(),
        }
    }

    /// The env's configuration with `broker.url` naming node `index` alone.
    fn config_on(&self, index: usize) -> Config {
        let mut vars = self.env.vars.clone();
        vars.retain(|(k, _)| k != "WARREN__BROKER__URL");
        vars.push((
            "WARREN__BROKER__URL".into(),
            self.cluster.nodes()[index].amqp_url(),
        ));
        Config::load_from(None, &vars).expect("valid configuration")
    }

    /// A producer and observer connected to node `index` alone (a node the
    /// test keeps up), so that what it sees does not depend on the fault.
    async fn observer(&self, index: usize) -> Client {
        Client::connect(&self.config_on(index))
            .await
            .expect("observer connects")
    }

    /// The nodes holding a connection of Warren process `p` (its connection
    /// names end in `/<pid>`), once it has one (bounded wait).
    async fn nodes_of(&self, via: usize, p: &Proc) -> Vec<usize> {
        let needle = format!("/{}\"", p.pid);
        let deadline = Instant::now() + T_LONG;
        loop {
            let found = self.cluster.nodes_with_connection(via, &needle);
            if !found.is_empty() {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "process {} has no connection to the cluster after {T_LONG:?}:\n{}",
                p.pid,
                self.env.log_of(p)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// What a failure message shows: this env's queues as node `via` sees
    /// them, and the warnings and errors each process logged last.
    fn diagnose(&self, via: usize, missing: &[&String]) -> String {
        let items = [
            "name",
            "type",
            "leader",
            "online",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
        ];
        let mut args = vec!["list_queues"];
        args.extend_from_slice(&items);
        let out = self.cluster.nodes()[via].rabbitmqctl(&args);
        let queues: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with(&self.env.prefix))
            .map(str::to_owned)
            .collect();
        // The processes' lines first: a long queue list would push them out
        // of a truncated report.
        let queues = format!("queues ({}):\n{}\n", items.join(" "), queues.join("\n"));
        // Each consumer with its channel's process: the node in the pid
        // tells a consumer of a live process from one left by a dead node
        // (which keeps the deliveries checked out to it).
        let columns = [
            "queue_name",
            "channel_pid",
            "consumer_tag",
            "prefetch_count",
            "active",
        ];
        let mut args = vec!["list_consumers"];
        args.extend_from_slice(&columns);
        let out = self.cluster.nodes()[via].rabbitmqctl(&args);
        let consumers: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with(&self.env.prefix))
            .map(str::to_owned)
            .collect();
        let queues = format!(
            "{queues}consumers ({}):\n{}\n",
            columns.join(" "),
            consumers.join("\n")
        );
        let mut text = String::new();
        // Dead letters a quorum queue still holds for at-least-once
        // forwarding count in none of the columns above (3.10 has no
        // list_queues column for them).
        let expr = "[{element(4, amqqueue:get_name(Q)), rabbit_amqqueue:info(Q, \
                    [messages_dlx])} || Q <- rabbit_amqqueue:list(<<\"/\">>), \
                    amqqueue:get_type(Q) == rabbit_quorum_queue].";
        let out = self.cluster.nodes()[via].rabbitmqctl(&["eval", expr]);
        let held: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split("},{")
            .filter(|q| q.contains(&self.env.prefix) && !q.contains("{messages_dlx,0}"))
            .map(str::to_owned)
            .collect();
        text.push_str(&format!(
            "dead letters held for forwarding (messages_dlx > 0): {}\n",
            if held.is_empty() {
                "none".to_string()
            } else {
                held.join("; ")
            }
        ));
        // What each Warren process logged of the missing tasks.
        for (i, p) in self.procs.iter().enumerate() {
            let log = self.env.log_of(p);
            // Without colours; `=<id>` as a field or in a span, not a longer id.
            let plain = strip_ansi(&log);
            for id in missing.iter().take(4) {
                let needle = format!("={id}");
                let names = |l: &&str| {
                    l.match_indices(&needle).any(|(at, _)| {
                        !l[at + needle.len()..].starts_with(|c: char| c.is_ascii_digit())
                    })
                };
                let seen: Vec<&str> = plain.lines().filter(names).take(12).collect();
                text.push_str(&format!(
                    "process {i}, lines naming {id}:\n{}\n",
                    seen.join("\n")
                ));
            }
            let notable: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("consuming"))
                .collect();
            let tail = &notable[notable.len().saturating_sub(20)..];
            text.push_str(&format!(
                "process {i} (pid {}), last warnings and (re)starts:\n{}\n",
                p.pid,
                tail.join("\n")
            ));
        }
        // What the brokers said (warnings and errors).
        for node in self.cluster.nodes() {
            let log = node.log_text();
            let notable: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("[warning]") || l.contains("[error]"))
                .filter(|l| !l.contains("closing AMQP connection"))
                .collect();
            let tail = &notable[notable.len().saturating_sub(20)..];
            text.push_str(&format!(
                "broker log of {}:\n{}\n",
                node.name(),
                tail.join("\n")
            ));
        }
        text.push_str(&queues);
        text
    }

    /// The node leading the quorum work queue `diag` (bounded wait).
    async fn work_queue_leader(&self, via: usize) -> usize {
        let queue = self.env.names().work_queue("diag");
        let deadline = Instant::now() + T;
        loop {
            if let Some(i) = self.cluster.queue_leader(via, &queue) {
                return i;
            }
            assert!(
                Instant::now() < deadline,
                "{queue} has no quorum leader (is the topology replicated?)"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Another handle on process `p`.
fn copy(p: &Proc) -> Proc {
    Proc {
        index: p.index,
        pid: p.pid,
    }
}

/// The first node other than `victim`.
fn other_than(victim: usize) -> usize {
    usize::from(victim == 0)
}

/// What a load test published, and the outcome each task must reach.
struct Load {
    /// Task id -> the final state it must end in.
    expected: HashMap<String, TaskState>,
    /// Delayed task id -> its due time (Unix ms).
    due: HashMap<String, i64>,
    /// The ids of the tasks that end dead.
    retried: Vec<String>,
}

impl Load {
    /// Publishes the load through `client`, delayed and retried tasks
    /// first (so they are in the delay path when the immediate ones run).
    async fn publish(client: &Client, tag: &str) -> Load {
        let k = scale();
        let (immediate, delayed, retried) = (IMMEDIATE * k, DELAYED * k, RETRIED * k);
        let mut load = Load {
            expected: HashMap::new(),
            due: HashMap::new(),
            retried: Vec::new(),
        };
        let start = now_ms() + 2_000;
        let step = (DELAY_SPAN_MS - 2_000) / delayed as i64;
        let reqs: Vec<TaskRequest> = (0..delayed)
            .map(|i| {
                let id = format!("{tag}-delayed-{i}");
                let due = start + step * i as i64;
                load.due.insert(id.clone(), due);
                load.expected.insert(id.clone(), TaskState::Succeeded);
                TaskRequest::new("diag.sleep", json!({"ms": 1}))
                    .id(id)
                    .eta(due.to_string())
            })
            .collect();
        client
            .publish_batch(&reqs, 256, |_| {})
            .await
            .expect("publish delayed");
        let reqs: Vec<TaskRequest> = (0..retried)
            .map(|i| {
                let id = format!("{tag}-retried-{i}");
                load.expected.insert(id.clone(), TaskState::Dead);
                load.retried.push(id.clone());
                TaskRequest::new(
                    "diag.fail",
                    json!({"kind": "retryable", "message": "cluster"}),
                )
                .id(id)
                .header_int("x-warren-max-retries", 1)
            })
            .collect();
        client
            .publish_batch(&reqs, 256, |_| {})
            .await
            .expect("publish retried");
        let reqs: Vec<TaskRequest> = (0..immediate)
            .map(|i| {
                let id = format!("{tag}-now-{i}");
                load.expected.insert(id.clone(), TaskState::Succeeded);
                TaskRequest::new("diag.echo", json!({"i": i})).id(id)
            })
            .collect();
        client
            .publish_batch(&reqs, 256, |_| {})
            .await
            .expect("publish immediate");
        load
    }

    fn len(&self) -> usize {
        self.expected.len()
    }
}

/// The events seen of a load: final ones per task, and the start times
/// of delayed tasks.
#[derive(Default)]
struct Tally {
    finals: HashMap<String, Vec<Event>>,
    started_ms: HashMap<String, Vec<i64>>,
    /// The latest `at` (Unix ms) of a final event, of any worker (key
    /// `None`) and of each worker process by its id (`Some(pid)`).
    last_final_ms: HashMap<Option<u32>, i64>,
}

/// The patterns a [`Tally`] needs.
const PATTERNS: [&str; 3] = ["succeeded.#", "dead.#", "started.diag.sleep"];

impl Tally {
    /// Tasks with at least one final event.
    fn finished(&self) -> usize {
        self.finals.len()
    }

    /// Takes events until `n` tasks of `load` have a final event; panics
    /// with what is missing when `timeout` passes first.
    async fn until(
        &mut self,
        (watch, rig, via): (&mut EventWatch, &Rig, usize),
        load: &Load,
        n: usize,
        timeout: Duration,
    ) {
        let deadline = Instant::now() + timeout;
        while self.finished() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(got) = watch.next(left).await.expect("watch") else {
                let missing: Vec<&String> = load
                    .expected
                    .keys()
                    .filter(|id| !self.finals.contains_key(*id))
                    .take(8)
                    .collect();
                panic!(
                    "{} of {} tasks ended within {timeout:?} (waiting for {n}); missing e.g. {missing:?}\n{}",
                    self.finished(),
                    load.len(),
                    rig.diagnose(via, &missing)
                );
            };
            let ev = got.event;
            if !load.expected.contains_key(&ev.task_id) {
                continue;
            }
            if ev.state == TaskState::Started {
                self.started_ms
                    .entry(ev.task_id.clone())
                    .or_default()
                    .push(unix_ms(&ev.at));
            } else if ev.state.is_final() {
                let at = unix_ms(&ev.at);
                let pid = ev
                    .worker
                    .as_deref()
                    .and_then(|w| w.rsplit('/').next())
                    .and_then(|p| p.parse().ok());
                for key in [None, pid] {
                    let last = self.last_final_ms.entry(key).or_insert(at);
                    *last = (*last).max(at);
                }
                self.finals.entry(ev.task_id.clone()).or_default().push(ev);
            }
        }
    }

    /// Waits for a task that ended after `since_ms` (Unix ms) by its
    /// final event's time, run by worker process `pid` (any worker for
    /// `None`): the load flows again. Returns how long after `since_ms` the
    /// first such task ended. (Events that were on their way at the fault
    /// arrive later, but carry an earlier time.)
    async fn flowing_after(
        &mut self,
        (watch, rig, via): (&mut EventWatch, &Rig, usize),
        load: &Load,
        (since_ms, pid): (i64, Option<u32>),
        what: &str,
    ) -> Duration {
        let deadline = Instant::now() + T_LONG;
        let last = |t: &Tally| t.last_final_ms.get(&pid).copied().unwrap_or(0);
        while last(self) <= since_ms {
            assert!(
                self.finished() < load.len(),
                "{what}: every task ended before the flow could be seen again"
            );
            let n = self.finished() + 1;
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "{what}: no task ended within {T_LONG:?}");
            self.until((&mut *watch, rig, via), load, n, left).await;
        }
        Duration::from_millis((last(self) - since_ms) as u64)
    }

    /// Every task ended exactly as expected; no delayed task started early.
    /// Returns the ids with more than one final event.
    fn check(&self, load: &Load, what: &str) -> Vec<String> {
        assert_eq!(self.finished(), load.len(), "{what}: tasks with an outcome");
        let mut duplicates = Vec::new();
        for (id, finals) in &self.finals {
            let want = load.expected[id];
            for ev in finals {
                assert_eq!(ev.state, want, "{what}: {id} ended {:?}", ev);
                if want == TaskState::Dead {
                    assert_eq!(
                        ev.reason.as_deref(),
                        Some("retries_exhausted"),
                        "{what}: {id}"
                    );
                }
            }
            if finals.len() > 1 {
                duplicates.push(id.clone());
            }
        }
        let mut early = Vec::new();
        for (id, due) in &load.due {
            let starts = self.started_ms.get(id);
            assert!(starts.is_some(), "{what}: no started event of {id}");
            for &at in starts.into_iter().flatten() {
                if at < *due {
                    early.push(format!("{id} started {} ms early", due - at));
                }
            }
        }
        assert!(
            early.is_empty(),
            "{what}: delayed tasks started early: {early:?}"
        );
        duplicates.sort();
        duplicates
    }
}

/// Every id of `load.retried` is in `P.dead`, read through node `via`.
/// Returns how many dead letters `P.dead` held.
async fn check_dead_letters(rig: &Rig, via: usize, load: &Load, what: &str) -> usize {
    let conn = lapin::Connection::connect(&rig.cluster.nodes()[via].amqp_url(), Default::default())
        .await
        .expect("AMQP on a surviving node");
    let ch = conn.create_channel().await.expect("channel");
    let dead = rig.env.names().dead();
    let mut ids: HashMap<String, usize> = HashMap::new();
    let mut total = 0;
    while let Some(m) = ch
        .basic_get(dead.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get from P.dead")
    {
        total += 1;
        if let Some(id) = m.delivery.properties.message_id() {
            *ids.entry(id.to_string()).or_default() += 1;
        }
    }
    let _ = conn.close(200, "done".into()).await;
    let missing: Vec<&String> = load
        .retried
        .iter()
        .filter(|id| !ids.contains_key(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{what}: {} of {} dead letters missing from {dead}, e.g. {:?}\n{}",
        missing.len(),
        load.retried.len(),
        &missing[..missing.len().min(8)],
        rig.diagnose(via, &missing)
    );
    total
}

/// The report line of a load test.
fn report(what: &str, load: &Load, duplicates: &[String], dead: usize, recovery: &[Duration]) {
    println!(
        "{what}: {} tasks ({} delayed, {} dead letters expected), every one ended; \
         {} with more than one final event {:?}; {dead} messages in P.dead; \
         tasks flowing again {recovery:?} after each fault",
        load.len(),
        load.due.len(),
        load.retried.len(),
        duplicates.len(),
        &duplicates[..duplicates.len().min(10)],
    );
}

/// How a load test breaks the cluster.
#[derive(Clone, Copy, PartialEq)]
enum Fault {
    /// SIGKILL of the node leading the work queue.
    KillLeader,
    /// SIGKILL of the node `warren up` is connected to.
    KillConnected,
    /// `stop_app`, then `start_app`, twice, of the node `warren up` is
    /// connected to.
    StopStartTwice,
}

/// A load test: `warren up` and a second worker on the cluster, the load
/// published through a node that stays up, `fault` applied once a quarter
/// of the tasks ended, then every outcome counted.
async fn load_under_fault(name: &str, fault: Fault) {
    let _one = SERIAL.lock().await;
    let mut rig = Rig::start(name, &[]).await;
    // Delays and moves logged per task, for what a failure reports.
    let log = [(
        "WARREN_LOG",
        "info,lapin=warn,warren_scheduler::delays=debug,warren_worker::runtime=debug",
    )];
    let up = rig.env.up(&log);
    let worker = rig.env.spawn(&["worker"], &log);
    rig.procs = vec![copy(&up), copy(&worker)];
    rig.env.wait_log(&up, "worker consuming", T_LONG).await;
    let connected = rig.nodes_of(0, &up).await;
    rig.nodes_of(0, &worker).await;
    let victim = match fault {
        Fault::KillLeader => rig.work_queue_leader(0).await,
        Fault::KillConnected | Fault::StopStartTwice => connected[0],
    };
    let keep = other_than(victim);
    let observer = rig.observer(keep).await;
    let mut watch = observer.watch(&PATTERNS).await.expect("watch");
    let load = Load::publish(&observer, name).await;
    let mut tally = Tally::default();
    tally
        .until((&mut watch, &rig, keep), &load, load.len() / 4, DRAIN_BOUND)
        .await;

    let node = &rig.cluster.nodes()[victim];
    let what = format!("{name} (node {} of 3 broken)", victim + 1);
    // Recovery: when `warren up` (which lost its node) runs tasks again; for
    // the leader's loss, when any worker does (the queue elects a new
    // leader, and every consumer waits for it).
    let whose = match fault {
        Fault::KillLeader => None,
        Fault::KillConnected | Fault::StopStartTwice => Some(up.pid),
    };
    let mut recovery = Vec::new();
    match fault {
        Fault::KillLeader | Fault::KillConnected => {
            let at = now_ms();
            node.kill().await;
            let took = tally
                .flowing_after((&mut watch, &rig, keep), &load, (at, whose), &what)
                .await;
            println!("{what}: tasks flowing again {took:?} after the kill");
            recovery.push(took);
        }
        Fault::StopStartTwice => {
            for round in 1..=2 {
                let at = now_ms();
                node.stop_app();
                let what = format!("{what}, stop {round}");
                let took = tally
                    .flowing_after((&mut watch, &rig, keep), &load, (at, whose), &what)
                    .await;
                println!("{what}: tasks flowing again {took:?} after the stop");
                recovery.push(took);
                node.start_app().await;
                // Some tasks end with the node back before the next stop.
                let n = (tally.finished() + load.len() / 20).min(load.len());
                tally
                    .until((&mut watch, &rig, keep), &load, n, DRAIN_BOUND)
                    .await;
            }
        }
    }
    tally
        .until((&mut watch, &rig, keep), &load, load.len(), DRAIN_BOUND)
        .await;
    let duplicates = tally.check(&load, &what);
    let dead = check_dead_letters(&rig, keep, &load, &what).await;
    report(&what, &load, &duplicates, dead, &recovery);
    // Every Warren process carried on (none exited).
    for p in [&up, &worker] {
        assert_eq!(
            rig.env.wait_exit(p, Duration::ZERO).await,
            None,
            "{what}: process {} exited:\n{}",
            p.pid,
            rig.env.log_of(p)
        );
    }
    drop(rig);
}

/// SIGKILL of the node leading the work queue while immediate, delayed and
/// retried tasks flow: every task ends as expected (duplicates counted), no
/// delayed task starts early, every dead letter is still in `P.dead`.
///
/// This test found the loss that made the replicated topology stop
/// dead-lettering delayed tasks: on RabbitMQ 3.10.8, in about half of its
/// runs, 23 to 70 delayed tasks confirmed into the release tier
/// `P.release.2s` never reached the work queue whose leader had died
/// (docs/topology.md, "Delays on the replicated topology").
#[tokio::test]
async fn the_work_queue_leader_killed_under_load_loses_nothing() {
    load_under_fault("lead", Fault::KillLeader).await;
}

/// The same with the node `warren up` is connected to: its connections move
/// to another node of `broker.url`, unconfirmed publishes are retried.
#[tokio::test]
async fn the_node_warren_is_connected_to_killed_under_load_loses_nothing() {
    load_under_fault("conn", Fault::KillConnected).await;
}

/// The node `warren up` is connected to stopped (`rabbitmqctl stop_app`)
/// and started again, twice in a row, under load: nothing lost, the
/// processes carry on.
#[tokio::test]
async fn a_node_stopped_and_started_twice_under_load_loses_nothing() {
    load_under_fault("bounce", Fault::StopStartTwice).await;
}

/// The fire time (Unix seconds) in a `cron:<name>:<YYYY-MM-DDTHH:MM:SSZ>` id.
fn fire_time(name: &str, id: &str) -> i64 {
    let text = id
        .strip_prefix(&format!("cron:{name}:"))
        .unwrap_or_else(|| panic!("{id} is not a task id of schedule {name}"));
    unix_ms(text) / 1000
}

const LEADER_LOG: &str = "cron leader";

/// Two schedulers with a schedule firing every second; the node holding the
/// cron leader's connection is killed: a scheduler takes over, fires go on,
/// and each fire time is published once (before, across and after the
/// kill).
#[tokio::test]
async fn the_cron_leader_node_killed_the_next_fire_happens_once() {
    let _one = SERIAL.lock().await;
    let mut rig = Rig::start("cron", &[]).await;
    let file = rig.env.config_file(
        "[[cron]]\nname = \"tick\"\nschedule = \"* * * * * *\"\ntask_type = \"diag.echo\"\n",
    );
    let a = rig.env.spawn(&["--config", &file, "scheduler"], &[]);
    let b = rig.env.spawn(&["--config", &file, "scheduler"], &[]);
    let deadline = Instant::now() + T_LONG;
    let leader = loop {
        if rig.env.log_of(&a).contains(LEADER_LOG) {
            break &a;
        }
        if rig.env.log_of(&b).contains(LEADER_LOG) {
            break &b;
        }
        assert!(
            Instant::now() < deadline,
            "no cron leader within {T_LONG:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let victim = rig.nodes_of(0, leader).await[0];
    let keep = other_than(victim);

    // Follow the fires in the work queue through a node that stays up.
    let conn =
        lapin::Connection::connect(&rig.cluster.nodes()[keep].amqp_url(), Default::default())
            .await
            .expect("AMQP on a surviving node");
    let ch = conn.create_channel().await.expect("channel");
    let mut consumer = ch
        .basic_consume(
            rig.env.names().work_queue("diag").as_str().into(),
            "cl-fires".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume the work queue");
    let mut fires: BTreeMap<i64, usize> = BTreeMap::new();
    // Two fires before the kill.
    while fires.len() < 2 {
        let t = recv_fire(&mut consumer, "fires before the kill").await;
        *fires.entry(t).or_default() += 1;
    }
    rig.cluster.nodes()[victim].kill().await;
    let killed_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let killed = Instant::now();
    // Fires go on: at least five fire times after the kill.
    let mut first_after = None;
    while fires.range(killed_at + 1..).count() < 5 {
        let t = recv_fire(&mut consumer, "fires after the kill").await;
        if t > killed_at && first_after.is_none() {
            first_after = Some(killed.elapsed());
        }
        *fires.entry(t).or_default() += 1;
    }
    let twice: Vec<(&i64, &usize)> = fires.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "fire times published more than once: {twice:?}"
    );
    println!(
        "cron leader's node (node {} of 3) killed: fires {:?} (Unix s), each once; \
         the first fire after the kill came {:?} after it",
        victim + 1,
        fires.keys().collect::<Vec<_>>(),
        first_after
    );
    let _ = conn.close(200, "done".into()).await;
    for p in [&a, &b] {
        assert_eq!(
            rig.env.wait_exit(p, Duration::ZERO).await,
            None,
            "scheduler {} exited:\n{}",
            p.pid,
            rig.env.log_of(p)
        );
    }
    drop(rig);
}

/// The fire time of the next task taken from `consumer`.
async fn recv_fire(consumer: &mut lapin::Consumer, what: &str) -> i64 {
    let got = tokio::time::timeout(T_LONG, consumer.next()).await;
    let Ok(Some(Ok(d))) = got else {
        panic!("{what}: no fire within {T_LONG:?}");
    };
    let id = d
        .properties
        .message_id()
        .as_ref()
        .expect("a task id")
        .to_string();
    fire_time("tick", &id)
}
