//! Fault tests: kill -9 mid-task, connection force-closed under load, SIGTERM drain.

use std::time::Duration;

use serde_json::json;
use warren_client::TaskRequest;
use warren_core::TaskState;
use warren_e2e::{final_event, until_final, Env, Mgmt, T_LONG};

#[tokio::test]
async fn a_worker_killed_mid_task_loses_nothing_the_task_is_redelivered_and_succeeds() {
    let mut env = Env::new("sigkill", &[]).await;
    let first = env.spawn(&["worker"], &[]);
    let mut watch = env.watch(&["#"]).await;
    let id = env
        .publish(&TaskRequest::new("diag.sleep", json!({"ms": 2000})))
        .await;
    let started = watch.next(T_LONG).await.unwrap().expect("started");
    assert_eq!(started.event.state, TaskState::Started);
    env.kill(&first, T_LONG).await;
    env.spawn(&["worker"], &[]);
    let got = until_final(&mut watch, &[&id], T_LONG).await;
    let ev = final_event(&got[&id]);
    assert_eq!(ev.state, TaskState::Succeeded);
    assert_ne!(
        ev.worker, started.event.worker,
        "another worker finished it"
    );
    assert_eq!(env.depth(&env.names().work_queue("diag")).await, 0);
}

#[tokio::test]
async fn connection_force_closed_under_load_every_task_of_2000_succeeds() {
    let mut env = Env::new(
        "forceclose",
        &[
            ("WARREN__WORKER__CONCURRENCY", "16"),
            ("WARREN__WORKER__PREFETCH", "64"),
        ],
    )
    .await;
    let worker = env.spawn(&["worker"], &[]);
    let mgmt = Mgmt::new();
    // The worker's connection is named "warren worker <host>/<pid>".
    let suffix = format!("/{}", worker.pid);
    let mut closed: Vec<String> = Vec::new();
    let first = mgmt
        .wait_connection("worker", &suffix, &closed, T_LONG)
        .await;
    let mut watch = env.watch(&["succeeded.#", "dead.#"]).await;
    let reqs: Vec<TaskRequest> = (0..2000)
        .map(|i| TaskRequest::new("diag.sleep", json!({"ms": 50})).id(format!("load-{i}")))
        .collect();
    let ids = env.client.publish_batch(&reqs, 256, |_| {}).await.unwrap();
    let mut finished = std::collections::HashSet::new();
    let mut open: std::collections::HashSet<String> = ids.iter().cloned().collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    while !open.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of 2000 tasks unfinished after {} forced closes",
            open.len(),
            closed.len()
        );
        let Some(e) = watch.next(Duration::from_secs(5)).await.unwrap() else {
            continue;
        };
        assert_eq!(e.event.state, TaskState::Succeeded, "{:?}", e.event);
        open.remove(&e.event.task_id);
        finished.insert(e.event.task_id.clone());
        // Force-close the worker's connection twice while the batch runs.
        if closed.is_empty() && finished.len() >= 300 {
            mgmt.close_connection(&first).await;
            closed.push(first.clone());
        } else if closed.len() == 1 && finished.len() >= 800 {
            let second = mgmt
                .wait_connection("worker", &suffix, &closed, T_LONG)
                .await;
            mgmt.close_connection(&second).await;
            closed.push(second);
        }
    }
    let closes = closed.len();
    assert_eq!(closes, 2);
    assert_eq!(env.depth(&env.names().work_queue("diag")).await, 0);
    assert_eq!(env.depth(&env.names().dead()).await, 0);
    assert!(
        env.log_of(&worker).contains("reconnecting"),
        "worker reconnected"
    );
}

#[tokio::test]
async fn sigterm_lets_the_running_task_finish_then_exits_zero() {
    let mut env = Env::new("sigterm", &[]).await;
    let worker = env.spawn(&["worker"], &[]);
    let mut watch = env.watch(&["#"]).await;
    let id = env
        .publish(&TaskRequest::new("diag.sleep", json!({"ms": 1500})))
        .await;
    let started = watch.next(T_LONG).await.unwrap().expect("started");
    assert_eq!(started.event.state, TaskState::Started);
    env.signal(&worker, "TERM");
    let got = until_final(&mut watch, &[&id], T_LONG).await;
    assert_eq!(final_event(&got[&id]).state, TaskState::Succeeded);
    assert_eq!(env.wait_exit(&worker, T_LONG).await, Some(0), "exit code 0");
    assert_eq!(env.depth(&env.names().work_queue("diag")).await, 0);
}

#[tokio::test]
async fn past_the_grace_period_a_running_task_is_returned_unacknowledged() {
    let mut env = Env::new("grace", &[("WARREN__WORKER__GRACE_PERIOD_MS", "300")]).await;
    let worker = env.spawn(&["worker"], &[]);
    let mut watch = env.watch(&["#"]).await;
    env.publish(&TaskRequest::new("diag.sleep", json!({"ms": 600000})))
        .await;
    let started = watch.next(T_LONG).await.unwrap().expect("started");
    assert_eq!(started.event.state, TaskState::Started);
    env.signal(&worker, "TERM");
    assert_eq!(env.wait_exit(&worker, T_LONG).await, Some(0), "exit code 0");
    env.wait_depth(&env.names().work_queue("diag"), 1, T_LONG)
        .await;
}

#[tokio::test]
async fn a_task_that_keeps_killing_its_worker_is_parked_poison() {
    let mut env = Env::new("poison", &[("WARREN__SCHEDULER__POISON_REDELIVERIES", "2")]).await;
    let mut watch = env.watch(&["#"]).await;
    let id = env
        .publish(&TaskRequest::new("diag.sleep", json!({"ms": 600000})))
        .await;
    // Three workers die with the task running: one crash never parks a task,
    // but more than two redeliveries without an outcome do.
    for round in 0..3 {
        let w = env.spawn(&["worker"], &[]);
        let e = watch.next(T_LONG).await.unwrap().expect("started");
        assert_eq!(e.event.state, TaskState::Started, "round {round}");
        env.kill(&w, T_LONG).await;
    }
    env.spawn(&["worker"], &[]);
    let got = until_final(&mut watch, &[&id], T_LONG).await;
    let ev = final_event(&got[&id]);
    assert_eq!(ev.state, TaskState::Dead);
    assert_eq!(ev.reason.as_deref(), Some("poison"));
    let dead = env.drain(&env.names().dead()).await;
    assert_eq!(dead.len(), 1);
    let h = dead[0].0.headers().clone().unwrap();
    assert_eq!(
        warren_core::headers::get_str(Some(&h), "x-warren-dead-reason").as_deref(),
        Some("poison")
    );
}
