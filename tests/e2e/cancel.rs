//! Cancellation (contract section 5): queued, delayed and running tasks.

use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use serde_json::json;
use warren_client::TaskRequest;
use warren_core::TaskState;
use warren_e2e::{final_event, states, unix_ms, until_final, Env, T_LONG};

#[tokio::test]
async fn a_queued_task_is_dropped_with_a_cancelled_event() {
    let mut env = Env::new("cancel-queued", &[]).await;
    let mut watch = env.watch(&["#"]).await;
    let id = env
        .publish(&TaskRequest::new("diag.echo", json!({})).id("queued-1"))
        .await;
    env.client.cancel(&id).await.unwrap();
    // The worker starts after the cancel: it must know it before its first task.
    env.spawn(&["worker"], &[]);
    let got = until_final(&mut watch, &[&id], T_LONG).await;
    assert_eq!(states(&got[&id]), ["cancelled"]);
    assert_eq!(final_event(&got[&id]).attempt, 0);
    env.wait_depth(&env.names().work_queue("diag"), 0, T_LONG)
        .await;
}

#[tokio::test]
async fn a_delayed_task_is_cancelled_no_later_than_its_due_time() {
    let (env, mut watch) = Env::with_up_watching("cancel-delayed", &[]).await;
    // 18 s: the task waits 16 s in a wait tier, and the scheduler's look
    // when it leaves it comes 2 s before the due time. A shorter delay goes
    // straight to a release tier, whose look comes within a second of the
    // publish: a cancel sent later than that (a slow CLI start on a loaded
    // machine) is applied by the worker, after the due time (contract,
    // "Delays").
    let mut h = FieldTable::default();
    h.insert("x-delay".into(), AMQPValue::LongInt(18_000));
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id("delayed-1".into())
        .with_headers(h);
    env.publish_raw(&env.names().delay(), "diag.echo", b"{}", props)
        .await;
    let scheduled = watch.next(T_LONG).await.unwrap().expect("scheduled");
    assert_eq!(scheduled.event.state, TaskState::Scheduled);
    // The CLI sends the cancel, as an operator would.
    env.cli_ok(&["cancel", "delayed-1"]);
    let got = until_final(&mut watch, &["delayed-1"], T_LONG).await;
    assert_eq!(states(&got["delayed-1"]), ["cancelled"]);
    let cancelled = final_event(&got["delayed-1"]);
    let due = scheduled.event.due_at.clone().unwrap();
    assert!(
        unix_ms(&cancelled.at) <= unix_ms(&due) + 50,
        "cancelled by its due time: scheduled {scheduled:?}, cancelled {cancelled:?}"
    );
}

#[tokio::test]
async fn a_running_task_is_aborted_and_the_worker_lives_on() {
    let (env, mut watch) = Env::with_up_watching("cancel-running", &[]).await;
    let id = env
        .publish(&TaskRequest::new("diag.sleep", json!({"ms": 600000})))
        .await;
    let started = watch.next(T_LONG).await.unwrap().expect("started");
    assert_eq!(started.event.state, TaskState::Started);
    env.client.cancel(&id).await.unwrap();
    let got = until_final(&mut watch, &[&id], T_LONG).await;
    assert_eq!(states(&got[&id]), ["cancelled"]);
    assert_eq!(final_event(&got[&id]).attempt, 1);
    let ok = env
        .call(&TaskRequest::new("diag.echo", json!({"n": 1})), T_LONG)
        .await;
    assert_eq!(ok.state, TaskState::Succeeded);
    assert_eq!(env.depth(&env.names().work_queue("diag")).await, 0);
}

#[tokio::test]
async fn a_cancel_is_remembered_across_restarts() {
    let mut env = Env::new("cancel-restart", &[]).await;
    let first = env.spawn(&["worker"], &[]);
    env.wait_log(&first, "worker consuming", T_LONG).await;
    env.client.cancel("later-1").await.unwrap();
    env.signal(&first, "TERM");
    assert_eq!(env.wait_exit(&first, T_LONG).await, Some(0));
    let mut watch = env.watch(&["#"]).await;
    env.publish(&TaskRequest::new("diag.echo", json!({})).id("later-1"))
        .await;
    // A new worker reads the cancel from the stream on boot.
    env.spawn(&["worker"], &[]);
    let got = until_final(&mut watch, &["later-1"], T_LONG).await;
    assert_eq!(states(&got["later-1"]), ["cancelled"]);
}
