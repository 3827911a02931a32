//! Handler failures: permanent, retryable with no retries left, panics, time limits.

use serde_json::json;
use warren_client::TaskRequest;
use warren_core::event::ErrorKind;
use warren_core::TaskState;
use warren_e2e::{states, until_final, Env, T};

#[tokio::test]
async fn permanent_failure_parks_dead_with_the_verbatim_message() {
    let (env, mut watch) = Env::with_up_watching("permanent", &[]).await;
    let id = env
        .publish(&TaskRequest::new(
            "diag.fail",
            json!({"kind": "permanent", "message": "card declined ✗"}),
        ))
        .await;
    let got = until_final(&mut watch, &[&id], T).await;
    let ev = &got[&id];
    assert_eq!(states(ev), ["started", "failed", "dead"]);
    let failed = &ev[1].event;
    assert_eq!(failed.retry, Some(false));
    let err = failed.error.as_ref().unwrap();
    assert_eq!(err.kind, ErrorKind::Permanent);
    assert_eq!(err.message, "card declined ✗");
    assert_eq!(ev[2].event.reason.as_deref(), Some("permanent_failure"));
    let dead = env.drain(&env.names().dead()).await;
    assert_eq!(dead.len(), 1);
}

#[tokio::test]
async fn retryable_failure_with_no_retries_left_is_retries_exhausted() {
    let (env, mut watch) = Env::with_up_watching("exhausted", &[]).await;
    let id = env
        .publish(
            &TaskRequest::new("diag.fail", json!({"kind": "retryable", "message": "503"}))
                .header_int("x-warren-max-retries", 0),
        )
        .await;
    let got = until_final(&mut watch, &[&id], T).await;
    let ev = &got[&id];
    assert_eq!(states(ev), ["started", "failed", "dead"]);
    assert_eq!(ev[1].event.retry, Some(false));
    assert_eq!(
        ev[1].event.error.as_ref().unwrap().kind,
        ErrorKind::Retryable
    );
    assert_eq!(ev[2].event.reason.as_deref(), Some("retries_exhausted"));
}

#[tokio::test]
async fn a_retryable_failure_with_retries_left_goes_to_the_delay_exchange() {
    let mut env = Env::new("retry-path", &[]).await;
    // A worker only: the retry must wait durably in the broker, not in a process.
    env.spawn(&["worker"], &[]);
    let mut watch = env.watch(&["#"]).await;
    let id = env
        .publish(
            &TaskRequest::new(
                "diag.fail",
                json!({"kind": "retryable", "message": "later"}),
            )
            .header_int("x-warren-max-retries", 2),
        )
        .await;
    let first = watch.next(T).await.unwrap().unwrap();
    assert_eq!(first.event.state, TaskState::Started);
    let failed = watch.next(T).await.unwrap().unwrap();
    assert_eq!(failed.event.state, TaskState::Failed);
    assert_eq!(failed.event.retry, Some(true));
    env.wait_depth(&env.names().delay_intake(), 1, T).await;
    let held = env.drain(&env.names().delay_intake()).await;
    let h = held[0].0.headers().clone().unwrap();
    assert_eq!(
        warren_core::headers::get_int(Some(&h), "x-warren-attempt").unwrap(),
        Some(2)
    );
    assert!(
        warren_core::headers::get_str(Some(&h), "x-warren-last-error")
            .unwrap()
            .contains("later")
    );
    assert!(warren_core::headers::get_int(Some(&h), "x-delay")
        .unwrap()
        .is_some());
    assert_eq!(held[0].0.message_id().as_ref().unwrap().as_str(), id);
}

#[tokio::test]
async fn a_panicking_handler_is_a_failure_and_the_worker_lives_on() {
    let env = Env::with_up("panic", &[]).await;
    let ev = env
        .call(
            &TaskRequest::new("diag.panic", json!({"message": "kaboom"})),
            T,
        )
        .await;
    assert_eq!(ev.state, TaskState::Dead);
    let err = ev.error.unwrap();
    assert_eq!(err.code, "panic");
    assert!(err.message.contains("kaboom"));
    let ok = env
        .call(&TaskRequest::new("diag.echo", json!({"n": 1})), T)
        .await;
    assert_eq!(ok.state, TaskState::Succeeded);
}

#[tokio::test]
async fn a_handler_over_its_time_limit_fails_with_timeout_and_the_worker_lives_on() {
    let (env, mut watch) = Env::with_up_watching(
        "timeout",
        &[
            ("WARREN__WORKER__CONCURRENCY", "1"),
            ("WARREN__WORKER__PREFETCH", "1"),
        ],
    )
    .await;
    let id = env
        .publish(
            &TaskRequest::new("diag.sleep", json!({"ms": 600000}))
                .header_int("x-warren-timeout-ms", 200)
                .header_int("x-warren-max-retries", 0),
        )
        .await;
    let got = until_final(&mut watch, &[&id], T).await;
    let ev = &got[&id];
    assert_eq!(states(ev), ["started", "failed", "dead"]);
    let err = ev[1].event.error.as_ref().unwrap();
    assert_eq!(err.code, "timeout");
    assert_eq!(err.kind, ErrorKind::Retryable);
    assert_eq!(ev[2].event.reason.as_deref(), Some("retries_exhausted"));
    // The single slot is free again.
    let ok = env
        .call(&TaskRequest::new("diag.echo", json!({"n": 2})), T)
        .await;
    assert_eq!(ok.state, TaskState::Succeeded);
}
