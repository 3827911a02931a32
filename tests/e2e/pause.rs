//! Pausing and resuming a work queue or a task type across the fleet:
//! nothing of it starts while paused, its tasks wait in the broker, other
//! queues and types keep running, the pause outlives restarts, and on
//! resume every task runs exactly once.

#[path = "tracker_support.rs"]
mod tracker_support;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};
use warren_client::{EventWatch, TaskRequest};
use warren_core::TaskState;
use warren_e2e::{unix_ms, wait_metric, Env, Proc, T, T_LONG};

/// Two work queues: `held` (diag.sleep), which the tests pause, and
/// `free` (diag.echo), which keeps running.
const TWO_QUEUES: &str = "[[queues]]\nname = \"held\"\n\n[[queues]]\nname = \"free\"\n\n\
     [[routes]]\npattern = \"diag.sleep\"\nqueue = \"held\"\n\n\
     [[routes]]\npattern = \"diag.echo\"\nqueue = \"free\"\n";

/// One work queue carrying every diag type.
const ONE_QUEUE: &str =
    "[[queues]]\nname = \"shared\"\n\n[[routes]]\npattern = \"diag.*\"\nqueue = \"shared\"\n";

/// Tasks of the paused queue.
const HELD: usize = 60;

/// What the events said so far.
#[derive(Default)]
struct Seen {
    started: BTreeMap<String, usize>,
    succeeded: BTreeMap<String, usize>,
    /// Tasks whose `started` event is later than the moment the pause was
    /// seen on the worker: each breaks the pause.
    started_while_paused: Vec<String>,
}

impl Seen {
    fn count(map: &BTreeMap<String, usize>, prefix: &str) -> usize {
        map.keys().filter(|id| id.starts_with(prefix)).count()
    }
}

/// Reads events until `done`; `paused` = (prefix of the ids a pause holds
/// back, the Unix ms at which the pause was seen on every worker).
async fn pump(
    watch: &mut EventWatch,
    seen: &mut Seen,
    paused: Option<(&str, i64)>,
    done: impl Fn(&Seen) -> bool,
) {
    while !done(seen) {
        let e =
            watch.next(T_LONG).await.unwrap().unwrap_or_else(|| {
                panic!("no event within {T_LONG:?}; so far {:?}", seen.succeeded)
            });
        let id = e.event.task_id.clone();
        match e.event.state {
            TaskState::Started => {
                *seen.started.entry(id.clone()).or_default() += 1;
                if let Some((prefix, since)) = paused {
                    if id.starts_with(prefix) && unix_ms(&e.event.at) > since {
                        seen.started_while_paused.push(id);
                    }
                }
            }
            TaskState::Succeeded => *seen.succeeded.entry(id).or_default() += 1,
            s if s.is_final() => panic!("task {id} ended {s:?}: {:?}", e.event),
            _ => {}
        }
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The series of the worker's gauge for one paused target.
fn paused_series(kind: &str, name: &str) -> String {
    format!("warren_worker_fleet_paused{{kind=\"{kind}\",name=\"{name}\"}}")
}

/// Waits until the worker `p` knows that `kind name` is paused.
async fn wait_paused_on(env: &Env, p: &Proc, kind: &str, name: &str) {
    let addr = env.ops_addr(p, "worker", T).await;
    wait_metric(&addr, &paused_series(kind, name), 1.0, T).await;
}

/// Messages in `queues`, summed.
async fn total_depth(env: &Env, queues: &[String]) -> u32 {
    let mut n = 0;
    for q in queues {
        n += env.depth(q).await;
    }
    n
}

async fn wait_total_depth(env: &Env, queues: &[String], n: u32) {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let d = total_depth(env, queues).await;
        if d == n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{queues:?} hold {d} messages, expected {n} within {T:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The paused queues and types `warren status --json` reports.
fn status_paused(env: &Env, cfg: &str) -> Value {
    let out = env.cli_ok(&["--config", cfg, "status", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    v["paused"].clone()
}

/// Stops `p` with SIGTERM and waits for it to exit.
async fn stop(env: &mut Env, p: &Proc) {
    env.signal(p, "TERM");
    assert!(env.wait_exit(p, T_LONG).await.is_some(), "{} stops", p.pid);
}

/// Pauses the queue `held` while its tasks run, checks that none starts
/// after the pause is seen while `free` keeps running, restarts the worker
/// and the scheduler while paused, then resumes: every task runs once.
async fn pause_a_queue(name: &str, overrides: &[(&str, &str)], lanes: u8) {
    let mut env = Env::without_topology(name, overrides).await;
    let cfg = env.config_file(TWO_QUEUES);
    env.cli_ok(&["--config", &cfg, "topology", "apply"]);
    let names = env.names();
    let mut held_queues = vec![names.work_queue("held")];
    held_queues.extend((0..lanes).map(|k| names.lane_queue("held", k)));
    let mut watch = env.watch(&["#"]).await;
    let mut worker = env.spawn(&["--config", &cfg, "worker"], &[]);
    let mut scheduler = env.spawn(&["--config", &cfg, "scheduler"], &[]);

    let held: Vec<TaskRequest> = (0..HELD)
        .map(|i| {
            TaskRequest::new("diag.sleep", json!({"ms": 100}))
                .id(format!("held-{i}"))
                .priority((i % 10) as u8)
        })
        .collect();
    env.client.publish_batch(&held, 64, |_| {}).await.unwrap();
    let mut seen = Seen::default();
    pump(&mut watch, &mut seen, None, |s| {
        Seen::count(&s.started, "held-") >= 4
    })
    .await;

    env.cli_ok(&["--config", &cfg, "pause", "queue", "held"]);
    wait_paused_on(&env, &worker, "queue", "held").await;
    let since = now_ms();
    let paused = Some(("held-", since));
    // The other queue keeps running.
    let free: Vec<TaskRequest> = (0..20)
        .map(|i| TaskRequest::new("diag.echo", json!({"i": i})).id(format!("free-{i}")))
        .collect();
    env.client.publish_batch(&free, 64, |_| {}).await.unwrap();
    pump(&mut watch, &mut seen, paused, |s| {
        Seen::count(&s.succeeded, "free-") == 20
            && Seen::count(&s.succeeded, "held-") == Seen::count(&s.started, "held-")
    })
    .await;
    let started = Seen::count(&seen.started, "held-");
    assert!(
        started < HELD,
        "the pause held tasks back: {started} started"
    );
    // What did not start waits in the broker, none of it in the worker.
    wait_total_depth(&env, &held_queues, (HELD - started) as u32).await;
    assert_eq!(
        status_paused(&env, &cfg),
        json!([{"kind": "queue", "name": "held"}]),
        "warren status --json"
    );
    let text = env.cli_ok(&["--config", &cfg, "status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("held (paused)"), "{text}");

    // Restart every process: still paused.
    stop(&mut env, &worker).await;
    stop(&mut env, &scheduler).await;
    scheduler = env.spawn(&["--config", &cfg, "scheduler"], &[]);
    worker = env.spawn(&["--config", &cfg, "worker"], &[]);
    wait_paused_on(&env, &worker, "queue", "held").await;
    // The new scheduler re-published the pause, so the stream keeps it
    // past its retention.
    let addr = env.ops_addr(&scheduler, "scheduler", T).await;
    wait_metric(
        &addr,
        "warren_scheduler_pause_records_renewed_total",
        1.0,
        T,
    )
    .await;
    let more: Vec<TaskRequest> = (20..25)
        .map(|i| TaskRequest::new("diag.echo", json!({"i": i})).id(format!("free-{i}")))
        .collect();
    env.client.publish_batch(&more, 64, |_| {}).await.unwrap();
    pump(&mut watch, &mut seen, paused, |s| {
        Seen::count(&s.succeeded, "free-") == 25
    })
    .await;
    assert_eq!(
        total_depth(&env, &held_queues).await,
        (HELD - started) as u32
    );
    assert!(
        seen.started_while_paused.is_empty(),
        "started after the pause was seen: {:?}",
        seen.started_while_paused
    );

    env.cli_ok(&["--config", &cfg, "resume", "queue", "held"]);
    pump(&mut watch, &mut seen, None, |s| {
        Seen::count(&s.succeeded, "held-") == HELD
    })
    .await;
    let twice: Vec<_> = seen.succeeded.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "ran more than once: {twice:?}");
    wait_total_depth(&env, &held_queues, 0).await;
    assert_eq!(status_paused(&env, &cfg), json!([]));
    stop(&mut env, &worker).await;
    stop(&mut env, &scheduler).await;
}

#[tokio::test]
async fn a_paused_queue_holds_its_tasks_across_restarts_and_resumes() {
    pause_a_queue(
        "pauseq",
        &[
            ("WARREN__WORKER__CONCURRENCY", "2"),
            ("WARREN__WORKER__PREFETCH", "10"),
        ],
        0,
    )
    .await;
}

#[tokio::test]
async fn a_paused_queue_with_lanes_on_a_replicated_topology_stops_its_lanes_too() {
    pause_a_queue(
        "pauselanes",
        &[
            ("WARREN__TOPOLOGY__REPLICATED", "true"),
            ("WARREN__WORKER__CONCURRENCY", "2"),
            ("WARREN__WORKER__PREFETCH", "10"),
        ],
        3,
    )
    .await;
}

#[tokio::test]
async fn a_paused_type_waits_parked_while_other_types_of_its_queue_run() {
    let mut env = Env::without_topology(
        "pausetype",
        &[
            ("WARREN__WORKER__CONCURRENCY", "2"),
            ("WARREN__WORKER__PREFETCH", "10"),
        ],
    )
    .await;
    let cfg = env.config_file(ONE_QUEUE);
    env.cli_ok(&["--config", &cfg, "topology", "apply"]);
    let names = env.names();
    let parked = names.paused_type("diag.echo");
    let mut watch = env.watch(&["#"]).await;
    let mut worker = env.spawn(&["--config", &cfg, "worker"], &[]);

    env.cli_ok(&["--config", &cfg, "pause", "type", "diag.echo"]);
    wait_paused_on(&env, &worker, "type", "diag.echo").await;
    let paused = Some(("echo-", now_ms()));
    let mut reqs = Vec::new();
    for i in 0..20 {
        reqs.push(TaskRequest::new("diag.echo", json!({"i": i})).id(format!("echo-{i}")));
        reqs.push(TaskRequest::new("diag.sleep", json!({"ms": 10})).id(format!("sleep-{i}")));
    }
    env.client.publish_batch(&reqs, 64, |_| {}).await.unwrap();
    let mut seen = Seen::default();
    pump(&mut watch, &mut seen, paused, |s| {
        Seen::count(&s.succeeded, "sleep-") == 20
    })
    .await;
    // The paused type waits in the broker, parked out of its queue.
    env.wait_depth(&parked, 20, T).await;
    env.wait_depth(&names.work_queue("shared"), 0, T).await;
    assert_eq!(
        status_paused(&env, &cfg),
        json!([{"kind": "type", "name": "diag.echo"}])
    );

    stop(&mut env, &worker).await;
    worker = env.spawn(&["--config", &cfg, "worker"], &[]);
    wait_paused_on(&env, &worker, "type", "diag.echo").await;
    let more: Vec<TaskRequest> = (20..25)
        .map(|i| TaskRequest::new("diag.echo", json!({"i": i})).id(format!("echo-{i}")))
        .collect();
    env.client.publish_batch(&more, 64, |_| {}).await.unwrap();
    env.wait_depth(&parked, 25, T).await;
    assert!(
        seen.started.keys().all(|id| !id.starts_with("echo-")),
        "a paused type started: {:?}",
        seen.started
    );

    env.cli_ok(&["--config", &cfg, "resume", "type", "diag.echo"]);
    pump(&mut watch, &mut seen, None, |s| {
        Seen::count(&s.succeeded, "echo-") == 25
    })
    .await;
    let twice: Vec<_> = seen.succeeded.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "ran more than once: {twice:?}");
    assert!(seen.started_while_paused.is_empty());
    env.wait_depth(&parked, 0, T).await;
    stop(&mut env, &worker).await;
}

#[tokio::test]
async fn pausing_an_unknown_queue_or_a_bad_type_is_a_one_line_error() {
    let env = Env::new("pausebad", &[]).await;
    let err = env.cli_err(&["pause", "queue", "nosuch"]);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("unknown queue \"nosuch\""), "{err}");
    let err = env.cli_err(&["resume", "type", "diag.*"]);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("invalid task type"), "{err}");
}

#[tokio::test]
async fn the_tracker_api_pauses_resumes_and_shows_what_is_paused() {
    let db = tracker_support::TestDb::sqlite("pauseapi");
    let (mut env, api) = tracker_support::tracker_env("pauseapi", &db, &[]).await;
    let _tracker = env.spawn(&["tracker"], &[]);
    api.wait_ready().await;
    let pause = json!({"kind": "queue", "name": "diag", "paused": true});
    let read = api.with_token(Some(warren_e2e::TRACKER_READ_TOKEN));
    let (status, _) = read.post("/api/pause", &pause).await;
    assert_eq!(status, 403, "the read role cannot pause");
    let (status, v) = api
        .post(
            "/api/pause",
            &json!({"kind": "queue", "name": "nosuch", "paused": true}),
        )
        .await;
    assert_eq!(status, 400, "{v}");
    let (status, v) = api.post("/api/pause", &pause).await;
    assert_eq!(status, 200, "{v}");
    api.wait_for("/api/paused", "the pause shows", |v| {
        v["paused"][0]["kind"] == "queue" && v["paused"][0]["name"] == "diag"
    })
    .await;
    let (_, text) = api.get_text("/metrics").await;
    assert_eq!(
        warren_e2e::metric(
            &text,
            "warren_tracker_fleet_paused{kind=\"queue\",name=\"diag\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        status_paused(&env, &env.config_file("")),
        json!([{"kind": "queue", "name": "diag"}])
    );
    let (status, _) = api
        .post(
            "/api/pause",
            &json!({"kind": "queue", "name": "diag", "paused": false}),
        )
        .await;
    assert_eq!(status, 200);
    api.wait_for("/api/paused", "the resume shows", |v| {
        v["paused"] == json!([])
    })
    .await;
}
