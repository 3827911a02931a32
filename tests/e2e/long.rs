//! Tasks that run longer than the broker's consumer timeout (contract
//! section 3, "Long tasks"): on a node of their own whose
//! `consumer_timeout` is 10 s, checked every second, a 30 s task runs once;
//! when its worker is killed after the task went into escrow, a second
//! worker runs it again to its end; and when its worker is stopped past the
//! grace period, the task is put back at once for another worker.

use std::time::Duration;

use serde_json::json;
use warren_client::TaskRequest;
use warren_e2e::{states, until_final, Env, NodeOptions, TestNode, T, T_LONG};

/// The broker's consumer timeout on the test nodes, in milliseconds.
const CONSUMER_TIMEOUT_MS: u64 = 10_000;

/// The escrow lease of the tests: a copy returns 4 s after it was sent.
const LEASE_MS: &str = "4000";

/// How long the long task runs: three consumer timeouts.
const TASK_MS: u64 = 30_000;

/// Worker logs with the escrow's debug lines.
const LOG: &str = "info,warren_worker=debug,lapin=warn";

/// A node that closes the channel of a consumer holding a delivery
/// unacknowledged for 10 s, and checks every second (RabbitMQ checks once
/// a minute by default, which a 30 s task could slip through).
async fn strict_node(name: &str) -> TestNode {
    TestNode::start(
        name,
        NodeOptions {
            config: format!("consumer_timeout = {CONSUMER_TIMEOUT_MS}"),
            start_args: "-rabbit channel_tick_interval 1000".into(),
            ..NodeOptions::default()
        },
    )
    .await
}

/// An env on `node`, told its consumer timeout, with short escrow leases.
async fn env_on(node: &TestNode, name: &str) -> Env {
    let url = node.amqp_url();
    let timeout = CONSUMER_TIMEOUT_MS.to_string();
    Env::new(
        name,
        &[
            ("WARREN__BROKER__URL", url.as_str()),
            ("WARREN__BROKER__CONSUMER_TIMEOUT_MS", timeout.as_str()),
            ("WARREN__WORKER__ESCROW_LEASE_MS", LEASE_MS),
        ],
    )
    .await
}

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

#[tokio::test]
async fn a_task_longer_than_the_consumer_timeout_runs_once() {
    let node = strict_node("long-once").await;
    let mut env = env_on(&node, "long-once").await;
    let mut watch = env.watch(&["#"]).await;
    let worker = env.spawn(&["worker"], &[("WARREN_LOG", LOG)]);
    let id = env
        .publish(&TaskRequest::new("diag.sleep", json!({ "ms": TASK_MS })))
        .await;
    let got = until_final(&mut watch, &[&id], T_LONG).await;
    assert_eq!(
        states(&got[&id]),
        ["started", "succeeded"],
        "{}",
        env.log_of(&worker)
    );
    assert_eq!(
        got[&id][1].event.result,
        Some(json!({ "slept_ms": TASK_MS }))
    );

    // Every escrow copy sent (the first and one per renewal) comes back to
    // the work queue and is dropped: wait for the last one.
    let escrow = env.names().escrow();
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let log = env.log_of(&worker);
        let sent = count(&log, "in escrow: acknowledged") + count(&log, "escrow lease renewed");
        let back = count(&log, "escrow copy back while its task is held or done");
        if sent > 0 && back == sent && env.depth(&escrow).await == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{back} of {sent} escrow copies came back within {T:?}: {log}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = env.log_of(&worker);
    assert_eq!(count(&log, "in escrow: acknowledged"), 1, "{log}");
    assert!(
        count(&log, "escrow lease renewed") >= 5,
        "a 30 s task renews a 4 s lease every 2 s: {log}"
    );
    // The broker never timed the consumer out: the worker kept its first
    // connection, and nothing ran again.
    assert!(!log.contains("connection lost"), "{log}");
    assert!(!log.contains("the task runs again"), "{log}");
    assert!(!log.contains("redeliver"), "{log}");
    assert_eq!(env.depth(&env.names().work_queue("diag")).await, 0);

    // The last copy was settled after the outcome: no event came since.
    let late = watch.next(Duration::from_millis(500)).await.expect("watch");
    assert!(late.is_none(), "an event after the outcome: {late:?}");
    env.kill(&worker, T).await;
}

#[tokio::test]
async fn a_task_in_escrow_whose_worker_dies_runs_again_and_ends() {
    let node = strict_node("long-kill").await;
    let mut env = env_on(&node, "long-kill").await;
    let mut watch = env.watch(&["#"]).await;
    let workers = [
        env.spawn(&["worker"], &[("WARREN_LOG", LOG)]),
        env.spawn(&["worker"], &[("WARREN_LOG", LOG)]),
    ];
    for w in &workers {
        env.wait_log(w, "worker consuming", T).await;
    }
    let id = env
        .publish(&TaskRequest::new("diag.sleep", json!({ "ms": TASK_MS })))
        .await;
    let started = watch.next(T).await.expect("watch").expect("started");
    assert_eq!(started.event.task_id, id);
    assert_eq!(started.event.state.as_str(), "started");
    let holder_identity = started.event.worker.clone().expect("worker named");
    let (holder, other) = if holder_identity.ends_with(&format!("/{}", workers[0].pid)) {
        (&workers[0], &workers[1])
    } else {
        (&workers[1], &workers[0])
    };
    assert!(
        holder_identity.ends_with(&format!("/{}", holder.pid)),
        "{holder_identity}"
    );
    env.wait_log(holder, "in escrow: acknowledged", T).await;
    env.kill(holder, T).await;

    // The last copy returns once the lease has ended, and the other worker
    // runs the task again, as a redelivery, to its end.
    let got = until_final(&mut watch, &[&id], T_LONG + T).await;
    let events = &got[&id];
    assert_eq!(
        states(events),
        ["started", "succeeded"],
        "after the kill: {}",
        env.log_of(other)
    );
    let other_identity = events[0].event.worker.clone().expect("worker named");
    assert!(
        other_identity.ends_with(&format!("/{}", other.pid)),
        "{other_identity}"
    );
    let log = env.log_of(other);
    assert_eq!(count(&log, "the task runs again"), 1, "{log}");
    // The second run went into escrow too, and nothing else runs after it.
    assert!(log.contains("in escrow: acknowledged"), "{log}");
    let escrow = env.names().escrow();
    env.wait_depth(&escrow, 0, T).await;
    env.wait_depth(&env.names().work_queue("diag"), 0, T).await;
    let late = watch.next(Duration::from_millis(500)).await.expect("watch");
    assert!(late.is_none(), "an event after the outcome: {late:?}");
    drop(env);
    drop(node);
}

#[tokio::test]
async fn a_task_in_escrow_aborted_at_shutdown_runs_again_at_once_elsewhere() {
    let node = strict_node("long-stop").await;
    let mut env = env_on(&node, "long-stop").await;
    let mut watch = env.watch(&["#"]).await;
    let first = env.spawn(
        &["worker"],
        &[
            ("WARREN_LOG", LOG),
            ("WARREN__WORKER__GRACE_PERIOD_MS", "500"),
        ],
    );
    env.wait_log(&first, "worker consuming", T).await;
    let id = env
        .publish(&TaskRequest::new("diag.sleep", json!({ "ms": 12_000 })))
        .await;
    env.wait_log(&first, "in escrow: acknowledged", T).await;
    // Only now a second worker, so the task cannot have started there.
    let second = env.spawn(&["worker"], &[("WARREN_LOG", LOG)]);
    env.wait_log(&second, "worker consuming", T).await;
    env.signal(&first, "TERM");
    assert_eq!(
        env.wait_exit(&first, T).await,
        Some(0),
        "{}",
        env.log_of(&first)
    );

    // Put back on its queue as a redelivery, with its escrow done: it runs
    // on the second worker, and the first run's copies are dropped.
    let got = until_final(&mut watch, &[&id], T_LONG).await;
    let events = &got[&id];
    assert_eq!(
        states(events),
        ["started", "started", "succeeded"],
        "{}",
        env.log_of(&second)
    );
    let ran_on = |e: &warren_client::ReceivedEvent, p: &warren_e2e::Proc| {
        e.event
            .worker
            .as_deref()
            .is_some_and(|w| w.ends_with(&format!("/{}", p.pid)))
    };
    assert!(ran_on(&events[0], &first));
    assert!(ran_on(&events[1], &second) && ran_on(&events[2], &second));
    let log = env.log_of(&second);
    assert!(!log.contains("the task runs again"), "{log}");
    env.wait_depth(&env.names().escrow(), 0, T).await;
    env.wait_depth(&env.names().work_queue("diag"), 0, T).await;
    let late = watch.next(Duration::from_millis(500)).await.expect("watch");
    assert!(late.is_none(), "an event after the outcome: {late:?}");
    env.kill(&second, T).await;
}
