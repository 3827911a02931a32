//! Priorities on quorum work queues through priority lanes, and classic
//! queues still sorted by the broker.

use std::collections::BTreeMap;

use lapin::options::QueueDeleteOptions;
use serde_json::json;
use warren_client::{EventWatch, TaskRequest};
use warren_core::TaskState;
use warren_e2e::{final_event, until_final, Env, T, T_LONG};

/// Tasks queued at priority 0 before the high ones.
const LOW: usize = 200;
/// Tasks queued at priority 9 behind them.
const HIGH: usize = 20;
/// Where every high task must be among the started ones: the low tasks
/// were queued first, so without sorting most of them would start first.
/// The worker's prefetch ([`PREFETCH`]) is far below the backlog, so what
/// it sorts among its own deliveries is not enough.
const HIGH_WITHIN: usize = 2 * HIGH;
/// The workers' `worker.prefetch`.
const PREFETCH: &str = "10";

/// `LOW` tasks at priority 0, then `HIGH` at priority 9, each sleeping
/// 150 ms: ids `low-<n>` and `high-<n>`.
fn backlog() -> Vec<TaskRequest> {
    let task = |id: String, p: u8| {
        TaskRequest::new("diag.sleep", json!({"ms": 150}))
            .id(id)
            .priority(p)
    };
    let mut reqs: Vec<TaskRequest> = (0..LOW).map(|i| task(format!("low-{i}"), 0)).collect();
    reqs.extend((0..HIGH).map(|i| task(format!("high-{i}"), 9)));
    reqs
}

/// Follows every task to its end: the ids in the order they first started,
/// and how many `succeeded` events each id got. Fails on any other final
/// state.
async fn follow(watch: &mut EventWatch, n: usize) -> (Vec<String>, BTreeMap<String, usize>) {
    let mut started: Vec<String> = Vec::new();
    let mut succeeded: BTreeMap<String, usize> = BTreeMap::new();
    while succeeded.values().sum::<usize>() < n {
        let e = watch
            .next(T)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("every task ends; ended so far: {}", succeeded.len()));
        let id = e.event.task_id.clone();
        match e.event.state {
            TaskState::Started if !started.contains(&id) => started.push(id),
            TaskState::Succeeded => *succeeded.entry(id).or_default() += 1,
            s if s.is_final() => panic!("task {id} ended {s:?}: {e:?}"),
            _ => {}
        }
    }
    (started, succeeded)
}

/// Asserts every high task started among the first [`HIGH_WITHIN`], and
/// every task succeeded exactly once.
fn assert_sorted_and_once(started: &[String], succeeded: &BTreeMap<String, usize>) {
    let positions: Vec<usize> = started
        .iter()
        .enumerate()
        .filter(|(_, id)| id.starts_with("high-"))
        .map(|(i, _)| i)
        .collect();
    eprintln!("priority-9 tasks started at positions {positions:?}");
    let late: Vec<(usize, &String)> = started
        .iter()
        .enumerate()
        .filter(|(i, id)| id.starts_with("high-") && *i >= HIGH_WITHIN)
        .collect();
    assert!(
        late.is_empty(),
        "priority-9 tasks started after the first {HIGH_WITHIN}: {late:?}; order: {started:?}"
    );
    assert_eq!(started.len(), LOW + HIGH, "every task started");
    assert_eq!(succeeded.len(), LOW + HIGH, "every task succeeded");
    let twice: Vec<_> = succeeded.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        twice.is_empty(),
        "tasks that succeeded more than once: {twice:?}"
    );
}

/// True if the queue exists.
async fn exists(env: &Env, queue: &str) -> bool {
    env.peek(queue).await.is_some()
}

/// Replaces the default classic `diag` queue with the quorum queue `qq`
/// (3 lanes) taking `diag.*`; returns the configuration file saying so.
async fn quorum_queue(env: &Env) -> String {
    // The default topology binds diag.* to the classic diag queue: remove
    // it, so every task goes to the quorum queue only.
    let (conn, ch) = env.open_channel().await;
    ch.queue_delete(
        env.names().work_queue("diag").as_str().into(),
        QueueDeleteOptions::default(),
    )
    .await
    .expect("delete the classic diag queue");
    let _ = conn.close(200, "bye".into()).await;
    env.config_file(
        "[[queues]]\nname = \"qq\"\ntype = \"quorum\"\n\n\
         [[routes]]\npattern = \"diag.*\"\nqueue = \"qq\"\n",
    )
}

#[tokio::test]
async fn a_quorum_queue_with_lanes_starts_high_priorities_first() {
    let mut env = Env::new(
        "lanes",
        &[
            ("WARREN__WORKER__CONCURRENCY", "2"),
            ("WARREN__WORKER__PREFETCH", PREFETCH),
        ],
    )
    .await;
    let cfg = quorum_queue(&env).await;
    let shown = env.cli_ok(&["--config", &cfg, "topology", "show"]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    let names = env.names();
    for k in 0..3 {
        assert!(
            shown.contains(&format!("queue {} ", names.lane_queue("qq", k))),
            "{shown}"
        );
    }
    assert!(!shown.contains(&names.lane_queue("qq", 3)), "{shown}");
    env.cli_ok(&["--config", &cfg, "topology", "apply"]);
    let entry = names.work_queue("qq");
    for k in 0..3 {
        assert!(exists(&env, &names.lane_queue("qq", k)).await, "lane {k}");
    }

    let reqs = backlog();
    env.client.publish_batch(&reqs, 64, |_| {}).await.unwrap();
    env.wait_depth(&entry, reqs.len() as u32, T).await;
    let mut watch = env
        .watch(&["started.#", "succeeded.#", "failed.#", "dead.#"])
        .await;
    let worker = env.spawn(&["--config", &cfg, "worker"], &[]);
    let (started, succeeded) = follow(&mut watch, reqs.len()).await;
    assert_sorted_and_once(&started, &succeeded);

    let addr = env.ops_addr(&worker, "worker", T).await;
    let (_, text) = warren_e2e::http_get(&addr, "/metrics").await;
    let moved = warren_e2e::metric(&text, "warren_worker_moved_to_lane_total").unwrap_or(0.0);
    assert!(
        moved >= HIGH as f64,
        "the backlog went through the lanes: {text}"
    );
    for queue in [
        entry.clone(),
        names.lane_queue("qq", 0),
        names.lane_queue("qq", 1),
        names.lane_queue("qq", 2),
    ] {
        env.wait_depth(&queue, 0, T).await;
    }
}

#[tokio::test]
async fn a_classic_queue_keeps_broker_priorities_and_has_no_lanes() {
    let mut env = Env::new(
        "lanesclassic",
        &[
            ("WARREN__WORKER__CONCURRENCY", "2"),
            ("WARREN__WORKER__PREFETCH", PREFETCH),
        ],
    )
    .await;
    let names = env.names();
    let work = names.work_queue("diag");
    assert!(exists(&env, &work).await);
    assert!(!exists(&env, &names.lane_queue("diag", 0)).await);
    let shown = env.cli_ok(&["topology", "show"]);
    assert!(
        !String::from_utf8_lossy(&shown.stdout).contains(".lane."),
        "classic queues have no lanes"
    );

    let reqs = backlog();
    env.client.publish_batch(&reqs, 64, |_| {}).await.unwrap();
    env.wait_depth(&work, reqs.len() as u32, T_LONG).await;
    let mut watch = env
        .watch(&["started.#", "succeeded.#", "failed.#", "dead.#"])
        .await;
    let worker = env.spawn(&["worker", "--queues", "diag"], &[]);
    let (started, succeeded) = follow(&mut watch, reqs.len()).await;
    assert_sorted_and_once(&started, &succeeded);
    let addr = env.ops_addr(&worker, "worker", T).await;
    let (_, text) = warren_e2e::http_get(&addr, "/metrics").await;
    assert_eq!(
        warren_e2e::metric(&text, "warren_worker_moved_to_lane_total"),
        Some(0.0),
        "{text}"
    );
}

#[tokio::test]
async fn lane_tasks_behind_a_long_one_are_handed_back_to_their_lane() {
    // One slot, a long task running: what the worker moved into the lanes
    // and took from them waits, is handed back to its lane after
    // worker.handback_ms, and runs on a second worker long before the long
    // task ends. Nothing is lost or run twice.
    let mut env = Env::new(
        "laneback",
        &[
            ("WARREN__WORKER__CONCURRENCY", "1"),
            ("WARREN__WORKER__PREFETCH", "20"),
            ("WARREN__WORKER__HANDBACK_MS", "300"),
        ],
    )
    .await;
    let (conn, ch) = env.open_channel().await;
    ch.queue_delete(
        env.names().work_queue("diag").as_str().into(),
        QueueDeleteOptions::default(),
    )
    .await
    .expect("delete the classic diag queue");
    let _ = conn.close(200, "bye".into()).await;
    let cfg = env.config_file(
        "[[queues]]\nname = \"qq\"\ntype = \"quorum\"\n\n\
         [[routes]]\npattern = \"diag.*\"\nqueue = \"qq\"\n",
    );
    env.cli_ok(&["--config", &cfg, "topology", "apply"]);
    let names = env.names();
    let mut reqs = vec![TaskRequest::new("diag.sleep", json!({"ms": 8000})).id("long")];
    for i in 0..30 {
        reqs.push(
            TaskRequest::new("diag.sleep", json!({"ms": 20}))
                .id(format!("short-{i}"))
                .priority(if i % 2 == 0 { 0 } else { 9 }),
        );
    }
    env.client.publish_batch(&reqs, 32, |_| {}).await.unwrap();
    env.wait_depth(&names.work_queue("qq"), 31, T).await;
    let mut watch = env.watch(&["#"]).await;
    let first = env.spawn(&["--config", &cfg, "worker"], &[]);
    loop {
        let e = watch.next(T).await.unwrap().expect("the long task starts");
        if e.event.task_id == "long" && e.event.state == TaskState::Started {
            break;
        }
    }
    // Everything else leaves the entry for the lanes while the long task runs.
    env.wait_depth(&names.work_queue("qq"), 0, T).await;
    env.spawn(&["--config", &cfg, "worker"], &[]);
    let mut finals: Vec<(String, TaskState)> = Vec::new();
    while finals.len() < reqs.len() {
        let e = watch.next(T).await.unwrap().expect("every task ends");
        if e.event.state.is_final() {
            finals.push((e.event.task_id, e.event.state));
        }
    }
    assert!(
        finals.iter().all(|(_, s)| *s == TaskState::Succeeded),
        "{finals:?}"
    );
    let mut ids: Vec<&str> = finals.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        ids.last(),
        Some(&"long"),
        "no short task waited for it: {ids:?}"
    );
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), reqs.len(), "each task ended once");
    let addr = env.ops_addr(&first, "worker", T).await;
    let (_, text) = warren_e2e::http_get(&addr, "/metrics").await;
    let moved = warren_e2e::metric(&text, "warren_worker_moved_to_lane_total").unwrap_or(0.0);
    assert!(
        moved >= 1.0,
        "the first worker moved tasks to lanes: {text}"
    );
    let handed = warren_e2e::metric(&text, "warren_worker_handed_back_total").unwrap_or(0.0);
    assert!(
        handed >= 1.0,
        "the first worker handed lane tasks back: {text}"
    );
}

#[tokio::test]
async fn a_task_that_expires_in_a_lane_ends_dead_expired_naming_its_queue() {
    // One slot, held by a long task: the next task is moved to its lane
    // with its expiration, waits in the worker, is handed back to the lane
    // while the worker takes nothing more, and expires there. The lane
    // dead-letters like its work queue: `dead`, `expired`, queue "qq".
    let mut env = Env::new("laneexp", &[("WARREN__WORKER__CONCURRENCY", "1")]).await;
    let (conn, ch) = env.open_channel().await;
    ch.queue_delete(
        env.names().work_queue("diag").as_str().into(),
        QueueDeleteOptions::default(),
    )
    .await
    .expect("delete the classic diag queue");
    let _ = conn.close(200, "bye".into()).await;
    let cfg = env.config_file(
        "[[queues]]\nname = \"qq\"\ntype = \"quorum\"\n\n\
         [[routes]]\npattern = \"diag.*\"\nqueue = \"qq\"\n",
    );
    env.cli_ok(&["--config", &cfg, "topology", "apply"]);
    env.spawn(&["--config", &cfg, "scheduler"], &[]);
    let worker = env.spawn(&["--config", &cfg, "worker"], &[]);
    let mut watch = env.watch(&["#"]).await;
    env.publish(&TaskRequest::new("diag.sleep", json!({"ms": 60_000})).id("long"))
        .await;
    loop {
        let e = watch.next(T).await.unwrap().expect("the long task starts");
        if e.event.task_id == "long" && e.event.state == TaskState::Started {
            break;
        }
    }
    env.publish(
        &TaskRequest::new("diag.echo", json!({}))
            .id("exp-1")
            .priority(9)
            .expiration_ms(1000),
    )
    .await;
    let got = until_final(&mut watch, &["exp-1"], T).await;
    let ev = final_event(&got["exp-1"]);
    assert_eq!(ev.state, TaskState::Dead, "{ev:?}");
    assert_eq!(ev.reason.as_deref(), Some("expired"));
    assert_eq!(ev.attempt, 0);
    assert_eq!(ev.queue.as_deref(), Some("qq"));
    let addr = env.ops_addr(&worker, "worker", T).await;
    let (_, text) = warren_e2e::http_get(&addr, "/metrics").await;
    assert_eq!(
        warren_e2e::metric(&text, "warren_worker_moved_to_lane_total"),
        Some(1.0),
        "{text}"
    );
    env.client.cancel("long").await.unwrap();
    let got = until_final(&mut watch, &["long"], T).await;
    assert_eq!(final_event(&got["long"]).state, TaskState::Cancelled);
}

/// Short tasks: a worker that knows its tasks take little time keeps what
/// it reads from the entry while its slot is busy, sorted by priority,
/// rather than moving each to its lane, so the backlog costs no extra hop.
#[tokio::test]
async fn short_tasks_wait_in_the_worker_sorted_not_moved() {
    const LOW_SHORT: usize = 60;
    const HIGH_SHORT: usize = 5;
    let mut env = Env::new("lanes-short", &[("WARREN__WORKER__CONCURRENCY", "1")]).await;
    let cfg = quorum_queue(&env).await;
    env.cli_ok(&["--config", &cfg, "topology", "apply"]);
    let mut watch = env
        .watch(&["started.#", "succeeded.#", "failed.#", "dead.#"])
        .await;
    let worker = env.spawn(&["--config", &cfg, "worker"], &[]);
    // A few tasks first: the worker learns how long they take.
    let warm: Vec<TaskRequest> = (0..5)
        .map(|i| TaskRequest::new("diag.echo", json!({})).id(format!("warm-{i}")))
        .collect();
    env.client.publish_batch(&warm, 64, |_| {}).await.unwrap();
    follow(&mut watch, warm.len()).await;
    let addr = env.ops_addr(&worker, "worker", T).await;
    let moved = |text: &str| warren_e2e::metric(text, "warren_worker_moved_to_lane_total");
    let (_, text) = warren_e2e::http_get(&addr, "/metrics").await;
    let moved_before = moved(&text).unwrap_or(0.0);

    // The backlog builds while the queue is paused, then comes at once.
    env.cli_ok(&["--config", &cfg, "pause", "queue", "qq"]);
    let series = "warren_worker_fleet_paused{kind=\"queue\",name=\"qq\"}";
    warren_e2e::wait_metric(&addr, series, 1.0, T).await;
    let task = |id: String, p: u8| TaskRequest::new("diag.echo", json!({})).id(id).priority(p);
    let mut reqs: Vec<TaskRequest> = (0..LOW_SHORT)
        .map(|i| task(format!("low-{i}"), 0))
        .collect();
    reqs.extend((0..HIGH_SHORT).map(|i| task(format!("high-{i}"), 9)));
    env.client.publish_batch(&reqs, 64, |_| {}).await.unwrap();
    env.wait_depth(&env.names().work_queue("qq"), reqs.len() as u32, T)
        .await;
    env.cli_ok(&["--config", &cfg, "resume", "queue", "qq"]);
    let (started, succeeded) = follow(&mut watch, reqs.len()).await;

    assert_eq!(succeeded.len(), reqs.len(), "every task succeeded");
    assert!(succeeded.values().all(|n| *n == 1), "{succeeded:?}");
    // Queued last, the priority-9 tasks were read while priority-0 ones
    // waited in the worker, and went ahead of them.
    let last = &started[started.len() - HIGH_SHORT..];
    assert!(
        last.iter().any(|id| id.starts_with("low-")),
        "the priority-9 tasks started last, as queued: {started:?}"
    );
    let (_, text) = warren_e2e::http_get(&addr, "/metrics").await;
    assert_eq!(
        moved(&text).unwrap_or(0.0),
        moved_before,
        "no task moved to a lane: {text}"
    );
}
