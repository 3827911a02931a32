//! Tenant fairness (contract section 9): tasks with `x-warren-tenant` on a
//! work queue with `tenants = true` are served round-robin across tenants.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use serde_json::json;
use warren_client::{EventWatch, TaskRequest};
use warren_core::tenants::{hash_tenant, tenant_queue, OVERFLOW, TENANT};
use warren_core::TaskState;
use warren_e2e::{final_event, until_final, Env, Proc, T};

/// Tenant A's backlog, queued first.
const A_TASKS: usize = 10_000;
/// Tenant B's tasks, queued behind A's.
const B_TASKS: usize = 100;
/// How long each task sleeps.
const TASK_MS: u64 = 50;
/// Workers, and the slots of each.
const WORKERS: usize = 3;
const CONCURRENCY: usize = 4;
/// The slowest rate at which three workers read the work queue past A's
/// backlog, moving each task to its tenant queue (a confirmed publish and
/// an ack), on the shared two-core test machine: measured at about
/// 1,700-2,400 per second, taken at 500.
const MOVES_PER_S_FLOOR: f64 = 500.0;

/// The bound on B's last start after the workers start: reading past A's
/// backlog (`A_TASKS / MOVES_PER_S_FLOOR`), then B's tasks, served at least
/// every other turn, started at half the fleet's rate (`2 * B_TASKS *
/// TASK_MS / slots`), plus 5 s for the workers to start and learn the
/// tenant queues.
fn bound() -> Duration {
    let slots = (WORKERS * CONCURRENCY) as f64;
    let read_past = A_TASKS as f64 / MOVES_PER_S_FLOOR;
    let b_turns = 2.0 * B_TASKS as f64 * TASK_MS as f64 / 1000.0 / slots;
    Duration::from_secs_f64(read_past + b_turns + 5.0)
}

/// Replaces the default `diag` queue with `tq` (tenants on, at most `max`
/// tenant queues) taking `diag.*`; returns the configuration file.
async fn tenant_queue_config(env: &Env, max: u32) -> String {
    let (conn, ch) = env.open_channel().await;
    ch.queue_delete(
        env.names().work_queue("diag").as_str().into(),
        QueueDeleteOptions::default(),
    )
    .await
    .expect("delete the diag queue");
    let _ = conn.close(200, "bye".into()).await;
    let cfg = env.config_file(&format!(
        "[[queues]]\nname = \"tq\"\ntenants = true\ntenants_max = {max}\n\n\
         [[routes]]\npattern = \"diag.*\"\nqueue = \"tq\"\n"
    ));
    env.cli_ok(&["--config", &cfg, "topology", "apply"]);
    cfg
}

fn task(id: String, tenant: &str, ms: u64) -> TaskRequest {
    TaskRequest::new("diag.sleep", json!({ "ms": ms }))
        .id(id)
        .header_str(TENANT, tenant)
}

/// True if the queue exists.
async fn exists(env: &Env, queue: &str) -> bool {
    env.peek(queue).await.is_some()
}

/// What the events of `n` tasks told: each id's first start (as seen here)
/// in start order, and how many times each succeeded.
struct Followed {
    starts: Vec<(String, Instant)>,
    succeeded: BTreeMap<String, usize>,
}

/// Follows events until `n` distinct tasks succeeded (bounded); fails on
/// any other final state.
async fn follow(watch: &mut EventWatch, n: usize) -> Followed {
    let mut starts = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut succeeded: BTreeMap<String, usize> = BTreeMap::new();
    while succeeded.len() < n {
        let e = watch.next(T).await.unwrap().unwrap_or_else(|| {
            panic!(
                "no event within {T:?}; {} of {n} succeeded, {} started",
                succeeded.len(),
                starts.len()
            )
        });
        let id = e.event.task_id.clone();
        match e.event.state {
            TaskState::Started if seen.insert(id.clone()) => starts.push((id, Instant::now())),
            TaskState::Succeeded => *succeeded.entry(id).or_default() += 1,
            s if s.is_final() => panic!("task {id} ended {s:?}: {e:?}"),
            _ => {}
        }
    }
    Followed { starts, succeeded }
}

#[tokio::test]
async fn a_tenant_behind_a_backlog_of_another_starts_within_the_bound() {
    let mut env = Env::new(
        "tenants",
        &[
            ("WARREN__WORKER__CONCURRENCY", "4"),
            ("WARREN__WORKER__PREFETCH", "64"),
        ],
    )
    .await;
    let cfg = tenant_queue_config(&env, 1000).await;
    let names = env.names();
    let entry = names.work_queue("tq");
    assert!(exists(&env, &format!("{entry}.tenants")).await, "directory");

    let mut reqs: Vec<TaskRequest> = (0..A_TASKS)
        .map(|i| task(format!("a-{i}"), "tenant-a", TASK_MS))
        .collect();
    reqs.extend((0..B_TASKS).map(|i| task(format!("b-{i}"), "tenant-b", TASK_MS)));
    env.client.publish_batch(&reqs, 256, |_| {}).await.unwrap();
    env.wait_depth(&entry, reqs.len() as u32, T).await;

    let mut watch = env
        .watch(&["started.#", "succeeded.#", "failed.#", "dead.#"])
        .await;
    let t0 = Instant::now();
    let workers: Vec<Proc> = (0..WORKERS)
        .map(|_| env.spawn(&["--config", &cfg, "worker"], &[]))
        .collect();
    let f = follow(&mut watch, reqs.len()).await;

    let order = |prefix: &str| -> Vec<(usize, Duration)> {
        f.starts
            .iter()
            .enumerate()
            .filter(|(_, (id, _))| id.starts_with(prefix))
            .map(|(i, (_, at))| (i, at.duration_since(t0)))
            .collect()
    };
    let a = order("a-");
    let b = order("b-");
    assert_eq!((a.len(), b.len()), (A_TASKS, B_TASKS), "every task started");
    let (b_last_pos, b_last_at) = *b.last().unwrap();
    let (a_median_pos, a_median_at) = a[A_TASKS / 2];
    let (_, a_last_at) = *a.last().unwrap();
    eprintln!(
        "B's first start at {:?} (position {}), B's last at {b_last_at:?} (position \
         {b_last_pos}); A's median start at {a_median_at:?} (position {a_median_pos}), A's last \
         at {a_last_at:?}; bound {:?}",
        b[0].1,
        b[0].0,
        bound()
    );
    assert!(
        b_last_at <= bound(),
        "B's last task started {b_last_at:?} after the workers, over the bound {:?}",
        bound()
    );
    assert!(
        b_last_pos < a_median_pos,
        "B's tasks interleave with A's: B's last start (position {b_last_pos}) comes before \
         A's median start (position {a_median_pos})"
    );
    let twice: Vec<_> = f.succeeded.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "succeeded more than once: {twice:?}");

    let mut moved = 0.0;
    for w in &workers {
        let addr = env.ops_addr(w, "worker", T).await;
        let (_, text) = warren_e2e::http_get(&addr, "/metrics").await;
        moved += warren_e2e::metric(&text, "warren_worker_moved_to_tenant_total").unwrap_or(0.0);
        assert_eq!(
            warren_e2e::metric(&text, "warren_worker_tenant_queues"),
            Some(2.0),
            "every worker consumes both tenant queues: {text}"
        );
    }
    assert!(moved >= reqs.len() as f64, "every task was moved: {moved}");
    for t in ["tenant-a", "tenant-b"] {
        let q = tenant_queue(&names, "tq", &hash_tenant(t.as_bytes()));
        env.wait_depth(&q, 0, T).await;
    }
    env.wait_depth(&entry, 0, T).await;
}

#[tokio::test]
async fn nothing_is_lost_when_workers_are_killed_and_all_restart() {
    const N: usize = 600;
    let mut env = Env::new(
        "tenantkill",
        &[
            ("WARREN__WORKER__CONCURRENCY", "4"),
            ("WARREN__WORKER__PREFETCH", "32"),
        ],
    )
    .await;
    let cfg = tenant_queue_config(&env, 1000).await;
    let reqs: Vec<TaskRequest> = (0..N)
        .map(|i| task(format!("k-{i}"), ["x", "y", "z"][i % 3], 30))
        .collect();
    env.client.publish_batch(&reqs, 256, |_| {}).await.unwrap();
    let mut watch = env.watch(&["#"]).await;
    let mut workers: Vec<Proc> = (0..3)
        .map(|_| env.spawn(&["--config", &cfg, "worker"], &[]))
        .collect();
    // One worker killed a third of the way in, the two others at two
    // thirds; two new ones start with nothing but the broker to go on.
    let mut started: HashSet<String> = HashSet::new();
    let mut phase = 0;
    let mut killed: Vec<u32> = Vec::new();
    let mut finals: BTreeMap<String, Vec<(TaskState, Option<String>)>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while finals.len() < N {
        assert!(Instant::now() < deadline, "{} of {N} ended", finals.len());
        let e = watch
            .next(T)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{} of {N} ended; no event within {T:?}", finals.len()));
        if e.event.state == TaskState::Started {
            started.insert(e.event.task_id.clone());
        }
        if e.event.state.is_final() {
            finals
                .entry(e.event.task_id.clone())
                .or_default()
                .push((e.event.state, e.event.worker.clone()));
        }
        if phase == 0 && started.len() >= N / 3 {
            // Every task has left the work queue for its tenant queue
            // (moves are fast): the kills below interrupt runs, not moves.
            let mut addrs = Vec::new();
            for w in &workers {
                addrs.push(env.ops_addr(w, "worker", T).await);
            }
            let moved_by = Instant::now() + T;
            loop {
                let mut moved = 0.0;
                for a in &addrs {
                    let (_, text) = warren_e2e::http_get(a, "/metrics").await;
                    moved += warren_e2e::metric(&text, "warren_worker_moved_to_tenant_total")
                        .unwrap_or(0.0);
                }
                if moved >= N as f64 {
                    break;
                }
                assert!(Instant::now() < moved_by, "{moved} of {N} moved");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let w = workers.remove(0);
            env.kill(&w, T).await;
            killed.push(w.pid);
            phase = 1;
        } else if phase == 1 && started.len() >= 2 * N / 3 {
            for w in std::mem::take(&mut workers) {
                env.kill(&w, T).await;
                killed.push(w.pid);
            }
            for _ in 0..2 {
                workers.push(env.spawn(&["--config", &cfg, "worker"], &[]));
            }
            phase = 2;
        }
    }
    assert_eq!(phase, 2, "the workers were killed mid-way");
    let not_ok: Vec<_> = finals
        .iter()
        .filter(|(_, s)| s.iter().any(|(s, _)| *s != TaskState::Succeeded))
        .collect();
    assert!(not_ok.is_empty(), "every task succeeded: {not_ok:?}");
    // A task ends twice only when the worker that recorded its first
    // success was killed before its ack (at least once, contract section
    // 3): every move was over before the first kill.
    let was_killed = |w: &Option<String>| {
        w.as_deref()
            .is_some_and(|w| killed.iter().any(|pid| w.ends_with(&format!("/{pid}"))))
    };
    let twice: Vec<_> = finals.iter().filter(|(_, s)| s.len() > 1).collect();
    eprintln!("tasks that ended twice: {}", twice.len());
    let unexplained: Vec<_> = twice.iter().filter(|(_, s)| !was_killed(&s[0].1)).collect();
    assert!(
        unexplained.is_empty(),
        "ended twice, the first time on a worker that lived: {unexplained:?}"
    );
    let names = env.names();
    for t in ["x", "y", "z"] {
        let q = tenant_queue(&names, "tq", &hash_tenant(t.as_bytes()));
        env.wait_depth(&q, 0, T).await;
    }
    env.wait_depth(&names.work_queue("tq"), 0, T).await;
}

#[tokio::test]
async fn a_bad_tenant_is_dead_invalid_and_tenants_past_the_cap_share_the_overflow() {
    let mut env = Env::new("tenantbad", &[]).await;
    let cfg = tenant_queue_config(&env, 2).await;
    let worker = env.spawn(&["--config", &cfg, "worker"], &[]);
    let mut watch = env.watch(&["#"]).await;
    let long = "t".repeat(257);
    let bad = [
        TaskRequest::new("diag.echo", json!({}))
            .id("bad-int")
            .header_int(TENANT, 7),
        TaskRequest::new("diag.echo", json!({}))
            .id("bad-empty")
            .header_str(TENANT, ""),
        TaskRequest::new("diag.echo", json!({}))
            .id("bad-long")
            .header_str(TENANT, &long),
    ];
    for r in &bad {
        env.publish(r).await;
    }
    let got = until_final(&mut watch, &["bad-int", "bad-empty", "bad-long"], T).await;
    for id in ["bad-int", "bad-empty", "bad-long"] {
        let ev = final_event(&got[id]);
        assert_eq!(ev.state, TaskState::Dead, "{id}: {ev:?}");
        assert_eq!(ev.reason.as_deref(), Some("invalid"), "{id}: {ev:?}");
        let err = ev.error.as_ref().expect("an error");
        assert_eq!(err.code, "tenant", "{id}: {err:?}");
        assert!(err.message.contains("x-warren-tenant"), "{err:?}");
    }

    // Five tenants, at most two tenant queues: the others share the
    // overflow, and every task runs.
    let ids: Vec<String> = (0..5)
        .flat_map(|t| (0..4).map(move |i| format!("t{t}-{i}")))
        .collect();
    for id in &ids {
        let tenant = id.split('-').next().unwrap();
        env.publish(&task(id.clone(), tenant, 1)).await;
    }
    let got = until_final(&mut watch, &ids, T).await;
    for id in &ids {
        assert_eq!(final_event(&got[id]).state, TaskState::Succeeded, "{id}");
    }
    let names = env.names();
    let mut own = 0;
    for t in 0..5 {
        let q = tenant_queue(&names, "tq", &hash_tenant(format!("t{t}").as_bytes()));
        own += usize::from(exists(&env, &q).await);
    }
    assert_eq!(own, 2, "tenants_max = 2 tenant queues");
    assert!(exists(&env, &tenant_queue(&names, "tq", OVERFLOW)).await);
    let addr = env.ops_addr(&worker, "worker", T).await;
    let (_, text) = warren_e2e::http_get(&addr, "/metrics").await;
    assert_eq!(
        warren_e2e::metric(&text, "warren_worker_tenant_queues"),
        Some(3.0),
        "two tenant queues and the overflow: {text}"
    );
    // A worker started now reads the same directory and agrees.
    let second = env.spawn(&["--config", &cfg, "worker"], &[]);
    let addr = env.ops_addr(&second, "worker", T).await;
    warren_e2e::wait_metric(&addr, "warren_worker_tenant_queues", 3.0, T).await;
}

/// Consumers of a queue right now.
async fn consumers(env: &Env, queue: &str) -> u32 {
    env.peek(queue).await.expect("queue exists").1
}

/// Waits (bounded) until a queue has `n` consumers.
async fn wait_consumers(env: &Env, queue: &str, n: u32) {
    let deadline = Instant::now() + T;
    loop {
        let got = consumers(env, queue).await;
        if got == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{queue}: {got} consumers, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn pausing_the_work_queue_stops_its_tenant_queues() {
    let mut env = Env::new("tenantpause", &[]).await;
    let cfg = tenant_queue_config(&env, 10).await;
    let worker = env.spawn(&["--config", &cfg, "worker"], &[]);
    let mut watch = env.watch(&["#"]).await;
    env.publish(&task("first".into(), "p", 1)).await;
    let got = until_final(&mut watch, &["first"], T).await;
    assert_eq!(final_event(&got["first"]).state, TaskState::Succeeded);
    let names = env.names();
    let q = tenant_queue(&names, "tq", &hash_tenant(b"p"));
    wait_consumers(&env, &q, 1).await;

    env.cli_ok(&["--config", &cfg, "pause", "queue", "tq"]);
    let addr = env.ops_addr(&worker, "worker", T).await;
    let series = "warren_worker_fleet_paused{kind=\"queue\",name=\"tq\"}";
    warren_e2e::wait_metric(&addr, series, 1.0, T).await;
    wait_consumers(&env, &q, 0).await;
    wait_consumers(&env, &names.work_queue("tq"), 0).await;

    let ids: Vec<String> = (0..5).map(|i| format!("later-{i}")).collect();
    for id in &ids {
        env.publish(&task(id.clone(), "p", 1)).await;
    }
    env.wait_depth(&names.work_queue("tq"), 5, T).await;
    env.cli_ok(&["--config", &cfg, "resume", "queue", "tq"]);
    let got = until_final(&mut watch, &ids, T).await;
    for id in &ids {
        assert_eq!(final_event(&got[id]).state, TaskState::Succeeded, "{id}");
    }
    wait_consumers(&env, &q, 1).await;
}

#[tokio::test]
async fn a_quorum_work_queue_gets_quorum_tenant_queues() {
    let mut env = Env::new("tenantqq", &[]).await;
    let (conn, ch) = env.open_channel().await;
    ch.queue_delete(
        env.names().work_queue("diag").as_str().into(),
        QueueDeleteOptions::default(),
    )
    .await
    .expect("delete the diag queue");
    let _ = conn.close(200, "bye".into()).await;
    let cfg = env.config_file(
        "[[queues]]\nname = \"tq\"\ntype = \"quorum\"\ntenants = true\n\n\
         [[routes]]\npattern = \"diag.*\"\nqueue = \"tq\"\n",
    );
    env.cli_ok(&["--config", &cfg, "topology", "apply"]);
    env.spawn(&["--config", &cfg, "worker"], &[]);
    let mut watch = env.watch(&["#"]).await;
    let ids: Vec<String> = (0..10).map(|i| format!("q-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        env.publish(&task(id.clone(), ["m", "n"][i % 2], 1).priority(9))
            .await;
    }
    let got = until_final(&mut watch, &ids, T).await;
    for id in &ids {
        assert_eq!(final_event(&got[id]).state, TaskState::Succeeded, "{id}");
    }
    // Declared as its work queue is: a passive declare finds it, and a
    // declaration as a classic queue is refused.
    let names = env.names();
    let q = tenant_queue(&names, "tq", &hash_tenant(b"m"));
    assert!(exists(&env, &q).await);
    let (conn, ch) = env.open_channel().await;
    let classic = ch
        .queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    assert!(classic.is_err(), "the tenant queue is a quorum queue");
    let _ = conn.close(200, "bye".into()).await;
}
