//! Fleet-wide flow control through the broker (contract section 9): a
//! global concurrency limit held across three workers, its permit given
//! back by a worker killed while holding it, and a unique key published 100
//! times at once running once (also set by Python pika), a hostile one
//! refused, and one dropped from a chord still reaching it.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;
use warren_client::{Chord, Client, Step, TaskRequest};
use warren_core::{Event, TaskState};
use warren_e2e::{final_event, http_get, metric, most_at_once, until_final, Env, Proc, T, T_LONG};

/// Three workers of four slots each, sharing `diag.sleep` limited to 2.
fn limited_config(env: &Env, limit: u32) -> String {
    env.config_file(&format!(
        "[flow.concurrency]\n\"diag.sleep\" = {limit}\n\n[worker]\nconcurrency = 4\nprefetch = 8\n"
    ))
}

fn start_worker(env: &mut Env, cfg: &str) -> Proc {
    env.spawn(&["--config", cfg, "worker", "--queues", "diag"], &[])
}

/// Unix ms of an event's `at`.
fn at_ms(e: &Event) -> i64 {
    warren_e2e::unix_ms(&e.at)
}

#[tokio::test]
async fn a_global_limit_holds_across_three_workers() {
    let mut env = Env::new("flowcap", &[]).await;
    let mut watch = env.watch(&["#"]).await;
    let cfg = limited_config(&env, 2);
    let workers: Vec<Proc> = (0..3).map(|_| start_worker(&mut env, &cfg)).collect();
    let ids: Vec<String> = (0..30).map(|i| format!("cap-{i}")).collect();
    for id in &ids {
        env.publish(&TaskRequest::new("diag.sleep", json!({"ms": 100})).id(id.as_str()))
            .await;
    }
    // An unlimited type on the same queue is not held back.
    env.publish(&TaskRequest::new("diag.echo", json!({})).id("free"))
        .await;
    let mut all = ids.clone();
    all.push("free".into());
    let got = until_final(&mut watch, &all, T_LONG).await;
    let mut runs = Vec::new();
    let mut ran_on = std::collections::HashSet::new();
    for id in &ids {
        let events = &got[id];
        let done = final_event(events);
        assert_eq!(done.state, TaskState::Succeeded, "{id}: {events:?}");
        let started: Vec<&Event> = events
            .iter()
            .map(|e| &e.event)
            .filter(|e| e.state == TaskState::Started)
            .collect();
        assert_eq!(started.len(), 1, "{id} started once: {events:?}");
        ran_on.insert(done.worker.clone());
        runs.push((at_ms(started[0]), at_ms(done)));
    }
    assert_eq!(final_event(&got["free"]).state, TaskState::Succeeded);
    let most = most_at_once(&runs);
    assert!(most <= 2, "{most} tasks of diag.sleep ran at once, limit 2");
    // The trade-off of polling for permits, for BENCHMARKS.md (printed, not
    // asserted): the share of the permits' time spent running tasks, from
    // the first start to the last end.
    let span = runs.iter().map(|r| r.1).max().unwrap() - runs.iter().map(|r| r.0).min().unwrap();
    let busy: i64 = runs.iter().map(|r| r.1 - r.0).sum();
    eprintln!(
        "permit use: {busy} ms of tasks over {span} ms with 2 permits = {:.0}%, most at once {most}",
        100.0 * busy as f64 / (2.0 * span as f64)
    );
    // What the workers show: no permit held once all is done, nothing
    // waiting.
    // (A permit is given back with its slot, when the handler returns.)
    for w in &workers {
        let addr = env.ops_addr(w, "worker", T).await;
        let deadline = tokio::time::Instant::now() + T;
        loop {
            let (status, text) = http_get(&addr, "/metrics").await;
            assert_eq!(status, 200);
            let held = metric(&text, "warren_worker_permits_held");
            let waiting = metric(&text, "warren_worker_limit_waiting");
            if held == Some(0.0) && waiting == Some(0.0) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "permits held {held:?}, waiting {waiting:?} after every task ended"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test]
async fn a_worker_killed_holding_a_permit_gives_it_back() {
    let mut env = Env::new("flowkill", &[]).await;
    let mut watch = env.watch(&["#"]).await;
    let cfg = limited_config(&env, 1);
    let holder = start_worker(&mut env, &cfg);
    env.publish(&TaskRequest::new("diag.sleep", json!({"ms": 600_000})).id("long"))
        .await;
    // The only permit is taken: `long` started.
    let mut seen: HashMap<String, Vec<TaskState>> = HashMap::new();
    let deadline = tokio::time::Instant::now() + T;
    while !seen
        .get("long")
        .is_some_and(|s| s.contains(&TaskState::Started))
    {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let e = watch
            .next(left)
            .await
            .expect("watch")
            .expect("long started");
        seen.entry(e.event.task_id.clone())
            .or_default()
            .push(e.event.state);
    }
    let others: Vec<Proc> = (0..2).map(|_| start_worker(&mut env, &cfg)).collect();
    for w in &others {
        env.wait_log(w, "worker consuming", T).await;
    }
    let ids: Vec<String> = (0..6).map(|i| format!("after-{i}")).collect();
    for id in &ids {
        env.publish(&TaskRequest::new("diag.sleep", json!({"ms": 50})).id(id.as_str()))
            .await;
    }
    // They wait for the permit, holding no slot, and none of them runs.
    let mut addrs = Vec::new();
    for w in std::iter::once(&holder).chain(&others) {
        addrs.push(env.ops_addr(w, "worker", T).await);
    }
    let deadline = tokio::time::Instant::now() + T;
    let waiting = loop {
        let (mut waiting, mut running) = (0.0, 0.0);
        for addr in &addrs {
            let (_, text) = http_get(addr, "/metrics").await;
            waiting += metric(&text, "warren_worker_limit_waiting").unwrap_or(0.0);
            running += metric(&text, "warren_worker_tasks_running").unwrap_or(0.0);
        }
        assert_eq!(running, 1.0, "only `long` runs while it holds the permit");
        if waiting > 0.0 || tokio::time::Instant::now() >= deadline {
            break waiting;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(waiting > 0.0, "no task was seen waiting for the permit");
    // `long` is cancelled, so its redelivery ends at once, and its worker
    // is killed holding the permit.
    env.client.cancel("long").await.expect("cancel");
    env.kill(&holder, T).await;
    let mut all = ids.clone();
    all.push("long".into());
    let got = until_final(&mut watch, &all, T).await;
    for id in &ids {
        assert_eq!(
            final_event(&got[id]).state,
            TaskState::Succeeded,
            "{id}: {:?}",
            got[id]
        );
    }
    assert_eq!(final_event(&got["long"]).state, TaskState::Cancelled);
}

#[tokio::test]
async fn a_unique_key_published_100_times_at_once_runs_once() {
    let mut env = Env::new("flowuniq", &[]).await;
    let mut watch = env.watch(&["#"]).await;
    for _ in 0..3 {
        env.spawn(&["worker", "--queues", "diag"], &[]);
    }
    // Ten connections publishing ten tasks each, all at once.
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(std::sync::Arc::new(
            Client::connect(&env.config).await.expect("connect"),
        ));
    }
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(100));
    let mut sends = Vec::new();
    for i in 0..100 {
        let client = clients[i % 10].clone();
        let start = start.clone();
        sends.push(tokio::spawn(async move {
            let req = TaskRequest::new("diag.echo", json!({"n": i}))
                .id(format!("u-{i}"))
                .header_str("x-warren-unique-key", "order-42")
                .header_int("x-warren-unique-ms", 120_000);
            start.wait().await;
            client.publish(&req).await.expect("publish")
        }));
    }
    let mut ids = Vec::new();
    for s in sends {
        ids.push(s.await.expect("publisher"));
    }
    let got = until_final(&mut watch, &ids, T_LONG).await;
    let finals: Vec<&Event> = ids.iter().map(|id| final_event(&got[id])).collect();
    let ran: Vec<&&Event> = finals
        .iter()
        .filter(|e| e.state == TaskState::Succeeded)
        .collect();
    assert_eq!(ran.len(), 1, "exactly one ran: {finals:?}");
    let first = ran[0].task_id.clone();
    for e in &finals {
        if e.task_id == first {
            continue;
        }
        assert_eq!(e.state, TaskState::Duplicate, "{e:?}");
        assert_eq!(e.duplicate_of.as_deref(), Some(first.as_str()), "{e:?}");
        assert!(
            !got[&e.task_id]
                .iter()
                .any(|r| r.event.state == TaskState::Started),
            "a duplicate started: {e:?}"
        );
    }
    // A task without the key, or with another key, runs as usual.
    let other = env
        .publish(
            &TaskRequest::new("diag.echo", json!({}))
                .id("u-other")
                .header_str("x-warren-unique-key", "order-43"),
        )
        .await;
    let got = until_final(&mut watch, &[&other], T).await;
    assert_eq!(final_event(&got[&other]).state, TaskState::Succeeded);
}

#[tokio::test]
async fn a_hostile_unique_key_makes_the_task_invalid() {
    let mut env = Env::new("flowbadkey", &[]).await;
    let mut watch = env.watch(&["#"]).await;
    env.spawn(&["worker", "--queues", "diag"], &[]);
    let long = "k".repeat(300);
    let id = env
        .publish(
            &TaskRequest::new("diag.echo", json!({}))
                .id("bad-key")
                .header_str("x-warren-unique-key", &long),
        )
        .await;
    let got = until_final(&mut watch, &[&id], T).await;
    let done = final_event(&got[&id]);
    assert_eq!(done.state, TaskState::Dead);
    assert_eq!(done.reason.as_deref(), Some("invalid"));
}

#[tokio::test]
async fn a_unique_key_set_by_python_pika_works_the_same() {
    let mut env = Env::new("flowpika", &[]).await;
    let mut watch = env.watch(&["#"]).await;
    env.spawn(&["worker", "--queues", "diag"], &[]);
    let tasks = env.names().tasks();
    warren_e2e::pika(&[
        "--exchange",
        &tasks,
        "--routing-key",
        "diag.echo",
        "--body",
        "{}",
        "--message-id",
        "py-u",
        "--count",
        "5",
        "--header",
        "x-warren-unique-key=py-order-7",
        "--header",
        "x-warren-unique-ms=60000",
    ]);
    let ids: Vec<String> = (1..=5).map(|i| format!("py-u-{i}")).collect();
    let got = until_final(&mut watch, &ids, T).await;
    let finals: Vec<&Event> = ids.iter().map(|id| final_event(&got[id])).collect();
    let ran: Vec<&&Event> = finals
        .iter()
        .filter(|e| e.state == TaskState::Succeeded)
        .collect();
    assert_eq!(ran.len(), 1, "{finals:?}");
    for e in finals.iter().filter(|e| e.state != TaskState::Succeeded) {
        assert_eq!(e.state, TaskState::Duplicate, "{e:?}");
        assert_eq!(e.duplicate_of.as_deref(), Some(ran[0].task_id.as_str()));
    }
}

#[tokio::test]
async fn a_chord_member_dropped_as_a_duplicate_reaches_its_chord() {
    let (env, mut watch) = Env::with_up_watching("flowchord", &[]).await;
    let unique = |req: TaskRequest| req.header_str("x-warren-unique-key", "chord-once");
    let chord = Chord::new("cd", Step::new("diag.echo", json!({})))
        .task(unique(
            TaskRequest::new("diag.echo", json!({"k": 0})).id("cd-first"),
        ))
        .task(TaskRequest::new("diag.echo", json!({"k": 1})))
        .task(unique(
            TaskRequest::new("diag.echo", json!({"k": 2})).id("cd-again"),
        ));
    let start = chord.start().unwrap().encode();
    let props = lapin::BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id("cd".into());
    env.publish_raw(&env.names().chords(), "", &start, props)
        .await;
    let members = chord.requests().unwrap();
    // The first is final before the second with its key is published.
    env.publish(&members[0]).await;
    until_final(&mut watch, &["cd-first"], T).await;
    env.publish(&members[1]).await;
    env.publish(&members[2]).await;
    let callback = chord.callback_id();
    let got = until_final(&mut watch, &["cd-again", callback.as_str()], T_LONG).await;
    let dup = final_event(&got["cd-again"]);
    assert_eq!(dup.state, TaskState::Duplicate);
    assert_eq!(dup.duplicate_of.as_deref(), Some("cd-first"));
    let results = warren_e2e::result_of(&got[&callback])["results"].clone();
    assert_eq!(results[0]["state"], "succeeded");
    assert_eq!(results[2]["task_id"], "cd-again");
    assert_eq!(results[2]["state"], "cancelled");
    assert_eq!(results[2]["reason"], "duplicate of cd-first");
}

#[tokio::test]
async fn a_delayed_task_takes_its_unique_key_only_when_it_comes_due() {
    let mut env = Env::new("flowuniqdelay", &[]).await;
    let mut watch = env.watch(&["#"]).await;
    env.spawn(&["scheduler"], &[]);
    env.spawn(&["worker", "--queues", "diag"], &[]);
    let key = |r: TaskRequest| {
        r.header_str("x-warren-unique-key", "report-7")
            .header_int("x-warren-unique-ms", 120_000)
    };
    // Published first, but due in 3 s: it holds no key while it waits.
    let delayed = env
        .publish(&key(TaskRequest::new(
            "diag.echo",
            json!({"which": "delayed"}),
        )
        .id("ud-delayed")
        .delay_ms(3_000)))
        .await;
    let now = env
        .publish(&key(
            TaskRequest::new("diag.echo", json!({"which": "now"})).id("ud-now")
        ))
        .await;
    let got = until_final(&mut watch, &[&delayed, &now], T_LONG).await;
    assert_eq!(final_event(&got[&now]).state, TaskState::Succeeded);
    let late = final_event(&got[&delayed]);
    assert_eq!(late.state, TaskState::Duplicate, "{late:?}");
    assert_eq!(late.duplicate_of.as_deref(), Some(now.as_str()));
    assert!(
        !got[&delayed]
            .iter()
            .any(|r| r.event.state == TaskState::Started),
        "the delayed duplicate started"
    );
}
