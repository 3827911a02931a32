//! Broker nodes going away and coming back, on nodes of the test's own
//! (tests/support/node.rs), never the shared default node:
//!
//! - Warren started while its broker is down waits, and works once it is up;
//! - a broker restart (`stop_app`, `start_app`) while 5,000 tasks flow loses
//!   nothing and every process carries on;
//! - on a three-node cluster, with `broker.url` listing every node, the
//!   node the worker is connected to is stopped: the worker and the
//!   publisher move to another node and every task ends.
//!
//! Every task's final events are counted from a durable tap queue bound to
//! `P.events`, which outlives the connections lost in the test: each id
//! must end `succeeded`, at least once; duplicates (at least once allows
//! them) are counted and printed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::json;
use warren_client::TaskRequest;
use warren_core::{Event, TaskState};
use warren_e2e::{Env, NodeOptions, Proc, TestCluster, TestNode, T, T_LONG};

/// Held by each test that starts nodes of its own, so that they run one at
/// a time: nodes booting and a few thousand tasks flowing at once on a small
/// machine would only stretch every bounded wait.
static OWN_NODES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs `rabbitmqctl` on `node` without stalling the test's other tasks
/// (a multi-threaded runtime), and asserts it succeeded.
fn ctl(node: &TestNode, args: &[&str]) {
    let out = tokio::task::block_in_place(|| node.rabbitmqctl(args));
    assert!(
        out.status.success(),
        "rabbitmqctl -n {} {}: {}{}",
        node.name(),
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A durable queue bound to `P.events` with `#`: every event, kept while
/// connections come and go (persistent events on a durable queue survive a
/// node restart; a quorum tap survives the loss of a cluster node).
struct Tap {
    queue: String,
}

impl Tap {
    /// Declares `<prefix>.tap` through `url`, quorum or classic.
    async fn declare(env: &Env, url: &str, quorum: bool) -> Tap {
        let queue = format!("{}.tap", env.prefix);
        let conn = lapin::Connection::connect(url, Default::default())
            .await
            .expect("connect for the tap");
        let ch = conn.create_channel().await.expect("channel");
        let mut args = FieldTable::default();
        if quorum {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
        ch.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .expect("declare the tap");
        ch.queue_bind(
            queue.as_str().into(),
            env.names().events().as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind the tap");
        let _ = conn.close(200, "tap declared".into()).await;
        Tap { queue }
    }

    /// Reads the tap through `url` into `outcomes` until every id of `ids`
    /// has a final event; panics with what is missing after `timeout`.
    async fn collect(&self, url: &str, ids: &[String], outcomes: &mut Outcomes, timeout: Duration) {
        let conn = lapin::Connection::connect(url, Default::default())
            .await
            .expect("connect to read the tap");
        let ch = conn.create_channel().await.expect("channel");
        ch.basic_qos(1000, Default::default()).await.expect("qos");
        let mut consumer = ch
            .basic_consume(
                self.queue.as_str().into(),
                "tap".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume the tap");
        let deadline = tokio::time::Instant::now() + timeout;
        while ids.iter().any(|id| !outcomes.finals.contains_key(id)) {
            match tokio::time::timeout_at(deadline, consumer.next()).await {
                Ok(Some(Ok(d))) => outcomes.add(&d.data),
                Ok(other) => panic!("the tap consumer ended: {other:?}"),
                Err(_) => {
                    let missing: Vec<&String> = ids
                        .iter()
                        .filter(|id| !outcomes.finals.contains_key(*id))
                        .collect();
                    panic!(
                        "{} of {} tasks had no final event within {timeout:?}; e.g. {:?}",
                        missing.len(),
                        ids.len(),
                        &missing[..missing.len().min(5)]
                    );
                }
            }
        }
        let _ = conn.close(200, "tap read".into()).await;
    }
}

/// The final events seen per task id.
#[derive(Default)]
struct Outcomes {
    finals: HashMap<String, Vec<TaskState>>,
}

impl Outcomes {
    fn add(&mut self, body: &[u8]) {
        let event = Event::from_json(body).expect("an event on P.events");
        if event.state.is_final() {
            self.finals
                .entry(event.task_id)
                .or_default()
                .push(event.state);
        }
    }

    /// Asserts that every id of `ids` ended `succeeded` (and never any other
    /// way); prints and returns how many ended more than once.
    fn check(&self, what: &str, ids: &[String]) -> usize {
        let mut duplicates = 0;
        for id in ids {
            let states = self.finals.get(id).expect("collected");
            assert!(
                states.iter().all(|s| *s == TaskState::Succeeded),
                "{what}: task {id} ended {states:?}"
            );
            duplicates += usize::from(states.len() > 1);
        }
        println!(
            "{what}: {} tasks, every one succeeded, none missing; {duplicates} ended more than \
             once (at least once)",
            ids.len()
        );
        duplicates
    }
}

/// `n` `diag.echo` tasks with ids `<label>-<i>`.
fn echo_batch(label: &str, n: usize) -> Vec<TaskRequest> {
    (0..n)
        .map(|i| TaskRequest::new("diag.echo", json!({ "i": i })).id(format!("{label}-{i}")))
        .collect()
}

/// Asserts that `p` is still running.
async fn alive(env: &mut Env, p: &Proc, what: &str) {
    assert_eq!(
        env.wait_exit(p, Duration::ZERO).await,
        None,
        "the {what} exited: {}",
        env.log_of(p)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warren_started_while_the_broker_is_down_connects_when_it_comes_up() {
    let _one_at_a_time = OWN_NODES.lock().await;
    let node = TestNode::start("nodes-late", NodeOptions::default()).await;
    let url = node.amqp_url();
    let mut env = Env::without_topology(
        "nodes-late",
        &[
            ("WARREN__BROKER__URL", &url),
            ("WARREN__BROKER__RECONNECT_MAX_MS", "1000"),
        ],
    )
    .await;
    // A client that gives a publication 1.5 s, connected while the node is up.
    let mut short = env.config.clone();
    short.broker.publish_timeout_ms = 1500;
    let short = warren_client::Client::connect(&short)
        .await
        .expect("connect");
    ctl(&node, &["stop_app"]);

    // A publication the broker cannot confirm fails, after its deadline,
    // with an error that says so; it is never reported done.
    let err = short
        .publish(&TaskRequest::new("diag.echo", json!({})).id("unconfirmed-1"))
        .await
        .expect_err("nothing confirms it while the broker is down");
    assert!(
        err.to_string()
            .starts_with("unconfirmed-1: not confirmed by the broker within 1.5s ("),
        "{err}"
    );

    // Started against a stopped broker: neither gives up.
    let scheduler = env.spawn(&["scheduler"], &[]);
    let worker = env.spawn(&["worker"], &[]);
    env.wait_log(
        &scheduler,
        "waiting for the broker to apply the topology",
        T,
    )
    .await;
    env.wait_log(&worker, "lost the broker; reconnecting", T)
        .await;
    alive(&mut env, &scheduler, "scheduler").await;
    alive(&mut env, &worker, "worker").await;

    ctl(&node, &["start_app"]);
    env.wait_log(&scheduler, "topology applied", T_LONG).await;
    env.wait_log(&scheduler, "scheduler consuming its intake queues", T_LONG)
        .await;
    env.wait_log(&worker, "worker consuming", T_LONG).await;

    // A batch runs, published through the client made before the broker
    // went down (its connection was lost with it).
    let tap = Tap::declare(&env, &url, false).await;
    let ids = env
        .client
        .publish_batch(&echo_batch("late", 100), 50, |_| {})
        .await
        .expect("publish after the broker came up");
    let mut outcomes = Outcomes::default();
    tap.collect(&url, &ids, &mut outcomes, T_LONG).await;
    outcomes.check("started while down", &ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_under_load_loses_no_task_and_every_process_carries_on() {
    let _one_at_a_time = OWN_NODES.lock().await;
    let node = TestNode::start("nodes-restart", NodeOptions::default()).await;
    let url = node.amqp_url();
    let mut env = Env::new(
        "nodes-restart",
        &[
            ("WARREN__BROKER__URL", &url),
            ("WARREN__BROKER__RECONNECT_MAX_MS", "1000"),
            ("WARREN__BROKER__PUBLISH_TIMEOUT_MS", "60000"),
        ],
    )
    .await;
    let tap = Tap::declare(&env, &url, false).await;
    let scheduler = env.spawn(&["scheduler"], &[]);
    let worker = env.spawn(&["worker"], &[]);
    let tracker = env.spawn(&["tracker"], &[]);
    env.wait_log(&scheduler, "scheduler consuming its intake queues", T)
        .await;
    env.wait_log(&worker, "worker consuming", T).await;

    // 5,000 tasks published while the broker restarts partway through.
    const N: usize = 5_000;
    let reqs = echo_batch("restart", N);
    let published = AtomicUsize::new(0);
    let publishing = env.client.publish_batch(&reqs, 200, |n| {
        published.store(n, Ordering::Relaxed);
    });
    let restart = async {
        let deadline = tokio::time::Instant::now() + T_LONG;
        while published.load(Ordering::Relaxed) < N / 3 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {} of {N} published within {T_LONG:?}",
                published.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let at = published.load(Ordering::Relaxed);
        ctl(&node, &["stop_app"]);
        ctl(&node, &["start_app"]);
        println!("broker restarted after {at} of {N} publications were confirmed");
    };
    let (ids, ()) = tokio::join!(publishing, restart);
    let ids = ids.expect("every publication confirmed across the restart");
    assert_eq!(ids.len(), N);

    let mut outcomes = Outcomes::default();
    tap.collect(&url, &ids, &mut outcomes, T_LONG * 3).await;
    outcomes.check("broker restart", &ids);

    // Every process is still running and working: a second batch runs.
    alive(&mut env, &scheduler, "scheduler").await;
    alive(&mut env, &worker, "worker").await;
    alive(&mut env, &tracker, "tracker").await;
    let again = env
        .client
        .publish_batch(&echo_batch("after", 20), 20, |_| {})
        .await
        .expect("publish after the restart");
    tap.collect(&url, &again, &mut outcomes, T_LONG).await;
    outcomes.check("after the restart", &again);
    env.wait_log(&tracker, "lost the broker; reconnecting", T)
        .await;
}

/// The configuration of the cluster test: one quorum work queue for every
/// task type.
const QUORUM_WORK: &str = r##"
[[queues]]
name = "work"
type = "quorum"

[[routes]]
pattern = "#"
queue = "work"
"##;

/// The index of the node whose AMQP listener holds the connection named
/// `warren <role> <host>/<pid>` (its `connection_name` client property), as
/// `rabbitmqctl list_connections` on the cluster's nodes reports it, leaving
/// out node `skip` (bounded wait).
async fn node_of(cluster: &TestCluster, role: &str, pid: u32, skip: Option<usize>) -> usize {
    let (prefix, suffix) = (format!("warren {role} "), format!("/{pid}"));
    let deadline = tokio::time::Instant::now() + T;
    loop {
        for (i, node) in cluster.nodes().iter().enumerate() {
            if Some(i) == skip {
                continue;
            }
            let out = tokio::task::block_in_place(|| {
                node.rabbitmqctl(&[
                    "list_connections",
                    "port",
                    "client_properties",
                    "--formatter",
                    "json",
                ])
            });
            let rows: Vec<serde_json::Value> =
                serde_json::from_slice(&out.stdout).unwrap_or_default();
            for row in rows {
                let named = row["client_properties"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|p| {
                        p[0] == "connection_name"
                            && p[2]
                                .as_str()
                                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(&suffix))
                    });
                let port = row["port"].as_u64().unwrap_or_default();
                let at = cluster
                    .nodes()
                    .iter()
                    .position(|n| u64::from(n.amqp_port()) == port);
                if let (true, Some(at)) = (named, at) {
                    return at;
                }
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no connection of the {role} {pid} found on the cluster"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The index of the node a process's log says it first connected to
/// (`connected to broker node … node=amqp://…:<port>/…`).
fn logged_node(log: &str, nodes: &[TestNode]) -> usize {
    let line = log
        .lines()
        .find(|l| l.contains("connected to broker node"))
        .expect("a connection logged");
    nodes
        .iter()
        .position(|n| line.contains(&format!("@127.0.0.1:{}/", n.amqp_port())))
        .unwrap_or_else(|| panic!("no node's port in {line:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_and_the_publisher_move_to_another_node_when_theirs_stops() {
    let _one_at_a_time = OWN_NODES.lock().await;
    let cluster = TestCluster::start("nodes-fo", 3, NodeOptions::default()).await;
    let nodes = cluster.nodes();
    let all: Vec<String> = nodes.iter().map(TestNode::amqp_url).collect();
    let list = all.join(",");
    let mut env = Env::without_topology(
        "nodes-fo",
        &[
            ("WARREN__BROKER__URL", &list),
            ("WARREN__BROKER__RECONNECT_MAX_MS", "1000"),
            ("WARREN__BROKER__PUBLISH_TIMEOUT_MS", "60000"),
        ],
    )
    .await;
    let config = env.config_file(QUORUM_WORK);

    // The worker first, to learn the node it picked (it logs it); the
    // topology is then declared through another node, which keeps Warren's
    // classic internal queues when the worker's node stops.
    let worker = env.spawn(&["--config", &config, "worker"], &[]);
    env.wait_log(&worker, "connected to broker node", T).await;
    let lost = logged_node(&env.log_of(&worker), nodes);
    let keep = (lost + 1) % nodes.len();
    env.warren(&["--config", &config, "topology", "apply"])
        .env("WARREN__BROKER__URL", &all[keep])
        .output()
        .map(|o| assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr)))
        .expect("run topology apply");
    let scheduler = env.spawn(&["--config", &config, "scheduler"], &[]);
    env.wait_log(&worker, "worker consuming", T_LONG).await;
    env.wait_log(&scheduler, "scheduler consuming its intake queues", T_LONG)
        .await;
    // The broker agrees on where the worker is.
    assert_eq!(node_of(&cluster, "worker", worker.pid, None).await, lost);
    let tap = Tap::declare(&env, &all[keep], true).await;
    println!(
        "worker on node {lost} ({}); topology declared through node {keep}",
        nodes[lost].name()
    );

    // 1,000 tasks; the worker's node stops partway through.
    const N: usize = 1_000;
    let reqs = echo_batch("fo", N);
    let published = AtomicUsize::new(0);
    let publishing = env.client.publish_batch(&reqs, 100, |n| {
        published.store(n, Ordering::Relaxed);
    });
    let stop = async {
        let deadline = tokio::time::Instant::now() + T_LONG;
        while published.load(Ordering::Relaxed) < N / 3 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {} of {N} published within {T_LONG:?}",
                published.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ctl(&nodes[lost], &["stop_app"]);
    };
    let (ids, ()) = tokio::join!(publishing, stop);
    let ids = ids.expect("every publication confirmed across the node loss");

    let mut outcomes = Outcomes::default();
    tap.collect(&all[keep], &ids, &mut outcomes, T_LONG * 2)
        .await;
    outcomes.check("node loss", &ids);

    // The worker went on on another node, and both processes still work.
    let now = node_of(&cluster, "worker", worker.pid, Some(lost)).await;
    assert_ne!(now, lost);
    alive(&mut env, &worker, "worker").await;
    alive(&mut env, &scheduler, "scheduler").await;
    let again = env
        .client
        .publish_batch(&echo_batch("fo-after", 20), 20, |_| {})
        .await
        .expect("publish after the node loss");
    tap.collect(&all[keep], &again, &mut outcomes, T_LONG).await;
    outcomes.check("after the node loss", &again);
}

#[tokio::test]
async fn a_node_list_skips_a_node_that_does_not_answer_and_names_each_failure() {
    let dead = |port: u16| format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let (a, b) = (warren_e2e::free_port(), warren_e2e::free_port());
    let mut config = warren_core::Config::load_from(
        None,
        &[(
            "WARREN__BROKER__URL".to_owned(),
            format!("{},{}", dead(a), warren_e2e::broker_url()),
        )],
    )
    .expect("a list of two nodes");
    // Whichever node this process starts at, the one that answers is used.
    for _ in 0..2 {
        let conn = warren_client::runtime::connect(&config.broker, "test")
            .await
            .expect("the node that answers");
        assert!(conn.status().connected());
        let _ = conn.close(200, "done".into()).await;
    }

    // No node answers: one error naming every node, passwords hidden.
    config.broker.url = warren_core::config::BrokerUrls::list([dead(a), dead(b)]);
    let err = warren_client::runtime::connect(&config.broker, "test")
        .await
        .expect_err("no node answers")
        .to_string();
    assert!(err.starts_with("no broker node reachable: "), "{err}");
    for port in [a, b] {
        assert!(
            err.contains(&format!("amqp://guest:***@127.0.0.1:{port}/%2f: ")),
            "{err}"
        );
    }
    assert!(!err.contains("guest:guest"), "{err}");
}
