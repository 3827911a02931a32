//! Delays and retries through the broker (contract sections 2 and 3).

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use serde_json::json;
use warren_client::TaskRequest;
use warren_core::event::ErrorKind;
use warren_core::TaskState;
use warren_e2e::{final_event, states, unix_ms, until_final, Env, T_LONG};

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn delayed(id: &str, header: &str, value: AMQPValue) -> BasicProperties {
    let mut h = FieldTable::default();
    h.insert(header.into(), value);
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id(id.into())
        .with_headers(h)
}

#[tokio::test]
async fn delayed_tasks_are_never_early_with_x_delay_and_both_eta_forms() {
    let (env, mut watch) = Env::with_up_watching("delay", &[]).await;
    let now = now_ms();
    let rfc = DateTime::<Utc>::from_timestamp_millis(now + 2600)
        .unwrap()
        .to_rfc3339();
    // (id, header, value, earliest start in Unix ms)
    let cases = vec![
        ("d-1500", "x-delay", AMQPValue::LongInt(1500), now + 1500),
        (
            "d-3300",
            "x-delay",
            AMQPValue::LongString("3300".into()),
            now + 3300,
        ),
        (
            "eta-rfc",
            "x-warren-eta",
            AMQPValue::LongString(rfc.as_str().into()),
            now + 2600,
        ),
        (
            "eta-ms",
            "x-warren-eta",
            AMQPValue::LongLongInt(now + 1200),
            now + 1200,
        ),
        ("d-zero", "x-delay", AMQPValue::LongInt(0), now),
        ("d-negative", "x-delay", AMQPValue::LongInt(-5000), now),
        (
            "eta-past",
            "x-warren-eta",
            AMQPValue::LongLongInt(now - 60_000),
            now,
        ),
    ];
    for (id, h, v, _) in &cases {
        env.publish_raw(
            &env.names().delay(),
            "diag.echo",
            b"{}",
            delayed(id, h, v.clone()),
        )
        .await;
    }
    let ids: Vec<String> = cases.iter().map(|c| c.0.to_owned()).collect();
    let got = until_final(&mut watch, &ids, T_LONG).await;
    for (id, _, _, earliest) in &cases {
        let evs = &got[*id];
        assert_eq!(states(evs), ["scheduled", "started", "succeeded"], "{id}");
        let scheduled = &evs[0].event;
        assert_eq!(scheduled.attempt, 1);
        let due = unix_ms(scheduled.due_at.as_deref().expect("due_at"));
        assert!(due >= *earliest, "{id}: due_at {due} before {earliest}");
        let started = unix_ms(&evs[1].event.at);
        assert!(
            started >= *earliest,
            "{id} started {} ms early",
            earliest - started
        );
        assert!(started >= due, "{id} started before its due_at");
    }
}

#[tokio::test]
async fn bad_delay_headers_are_parked_invalid_nothing_lost() {
    let mut env = Env::new(
        "delay-bad",
        &[("WARREN__SCHEDULER__MAX_DELAY_MS", "3600000")],
    )
    .await;
    env.spawn(&["scheduler"], &[]);
    let mut watch = env.watch(&["#"]).await;
    let cases = vec![
        (
            "no-header",
            delayed("no-header", "x-other", AMQPValue::LongInt(1)),
        ),
        (
            "not-int",
            delayed("not-int", "x-delay", AMQPValue::LongString("soon".into())),
        ),
        (
            "fraction",
            delayed("fraction", "x-delay", AMQPValue::Double(1.5)),
        ),
        (
            "bad-eta",
            delayed(
                "bad-eta",
                "x-warren-eta",
                AMQPValue::LongString("tomorrow".into()),
            ),
        ),
        (
            "too-far",
            delayed("too-far", "x-delay", AMQPValue::LongLongInt(7_200_000)),
        ),
    ];
    for (_, p) in &cases {
        env.publish_raw(&env.names().delay(), "diag.echo", b"{}", p.clone())
            .await;
    }
    let ids: Vec<String> = cases.iter().map(|c| c.0.to_owned()).collect();
    let got = until_final(&mut watch, &ids, T_LONG).await;
    for id in &ids {
        let ev = final_event(&got[id]);
        assert_eq!(ev.state, TaskState::Dead, "{id}");
        assert_eq!(ev.reason.as_deref(), Some("invalid"), "{id}");
    }
    assert_eq!(env.drain(&env.names().dead()).await.len(), cases.len());
}

#[tokio::test]
async fn delayed_tasks_wait_while_no_scheduler_runs_and_each_is_released_once() {
    let mut env = Env::new("delay-down", &[]).await;
    let mut watch = env.watch(&["#"]).await;
    let ids: Vec<String> = (0..30).map(|i| format!("held-{i}")).collect();
    for id in &ids {
        env.publish_raw(
            &env.names().delay(),
            "diag.echo",
            b"{}",
            delayed(id, "x-delay", AMQPValue::LongInt(300)),
        )
        .await;
    }
    env.wait_depth(&env.names().delay_intake(), 30, T_LONG)
        .await;
    env.up(&[]);
    let got = until_final(&mut watch, &ids, T_LONG).await;
    // Nothing more arrives for them: no duplicate release.
    let mut extra = 0;
    while let Some(e) = watch.next(Duration::from_millis(1500)).await.unwrap() {
        if ids.contains(&e.event.task_id) {
            extra += 1;
        }
    }
    assert_eq!(extra, 0, "a task was released twice");
    for id in &ids {
        assert_eq!(
            states(&got[id]),
            ["scheduled", "started", "succeeded"],
            "{id}"
        );
    }
}

/// Waits (bounded) until `queues` hold `n` messages between them.
async fn wait_sum(env: &Env, queues: &[String], n: u32) {
    let deadline = tokio::time::Instant::now() + T_LONG;
    loop {
        let mut sum = 0;
        for q in queues {
            sum += env.depth(q).await;
        }
        if sum == n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{queues:?} hold {sum} messages, expected {n} within {T_LONG:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_scheduler_killed_mid_hop_loses_nothing() {
    let mut env = Env::new("delay-kill", &[]).await;
    let first = env.spawn(&["scheduler"], &[]);
    let mut watch = env.watch(&["succeeded.#", "dead.#"]).await;
    // Half keep an expiration, which only the scheduler can restore on
    // release: they hop through wait tier 2 and back to the scheduler. The
    // other half go to release tier 2, which the broker empties when due.
    let ids: Vec<String> = (0..40).map(|i| format!("hop-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let mut props = delayed(id, "x-warren-eta", AMQPValue::LongLongInt(now_ms() + 2999));
        if i % 2 == 0 {
            props = props.with_expiration("60000".into());
        }
        env.publish_raw(&env.names().delay(), "diag.echo", b"{}", props)
            .await;
    }
    // All 40 are waiting in the broker's 2 s tiers; kill the scheduler while
    // they wait, then start a worker and a new scheduler.
    // (Tier 1 rather than 2 when the machine is slow to take them in.)
    let n = env.names();
    wait_sum(&env, &[n.wait_tier(1), n.wait_tier(2)], 20).await;
    wait_sum(&env, &[n.release_tier(1), n.release_tier(2)], 20).await;
    env.kill(&first, T_LONG).await;
    // With no scheduler at all, the broker releases the release tier's half.
    env.spawn(&["worker"], &[]);
    let by_broker: Vec<String> = ids.iter().skip(1).step_by(2).cloned().collect();
    let got = until_final(&mut watch, &by_broker, T_LONG).await;
    // The other half need a scheduler for their release.
    env.spawn(&["scheduler"], &[]);
    let rest: Vec<String> = ids.iter().step_by(2).cloned().collect();
    let mut got_rest = until_final(&mut watch, &rest, T_LONG).await;
    got_rest.extend(got);
    for id in &ids {
        assert_eq!(
            final_event(&got_rest[id]).state,
            TaskState::Succeeded,
            "{id}"
        );
    }
}

#[tokio::test]
async fn a_scheduler_killed_while_it_waits_the_last_fraction_loses_nothing() {
    let mut env = Env::new("delay-kill-hold", &[]).await;
    let first = env.spawn(&["scheduler"], &[]);
    let mut watch = env.watch(&["succeeded.#"]).await;
    // 1.9 s: the scheduler holds each (unacknowledged) for 0.9 s in process
    // before release tier 1.
    let ids: Vec<String> = (0..40).map(|i| format!("frac-{i}")).collect();
    let due = now_ms() + 1900;
    for id in &ids {
        let props = delayed(id, "x-warren-eta", AMQPValue::LongLongInt(due));
        env.publish_raw(&env.names().delay(), "diag.echo", b"{}", props)
            .await;
    }
    let ops = env.ops_addr(&first, "scheduler", T_LONG).await;
    warren_e2e::wait_metric(&ops, "warren_scheduler_held_tasks", 40.0, T_LONG).await;
    env.kill(&first, T_LONG).await;
    env.up(&[]);
    let got = until_final(&mut watch, &ids, T_LONG).await;
    for id in &ids {
        let succeeded = got[id]
            .iter()
            .find(|e| e.event.state == TaskState::Succeeded)
            .expect("succeeded");
        assert!(unix_ms(&succeeded.event.at) >= due, "{id} early");
    }
}

#[tokio::test]
async fn two_scheduler_replicas_release_each_delayed_task_once() {
    let mut env = Env::new("delay-replicas", &[]).await;
    env.spawn(&["scheduler"], &[]);
    env.spawn(&["scheduler"], &[]);
    env.spawn(&["worker"], &[]);
    let mut watch = env.watch(&["#"]).await;
    let ids: Vec<String> = (0..200).map(|i| format!("rep-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let ms = 1100 + (i as i32 % 10) * 100;
        env.publish_raw(
            &env.names().delay(),
            "diag.echo",
            b"{}",
            delayed(id, "x-delay", AMQPValue::LongInt(ms)),
        )
        .await;
    }
    let got = until_final(&mut watch, &ids, T_LONG).await;
    let mut extra: HashMap<String, usize> = HashMap::new();
    while let Some(e) = watch.next(Duration::from_millis(1500)).await.unwrap() {
        *extra.entry(e.event.task_id).or_default() += 1;
    }
    assert!(extra.is_empty(), "late duplicates: {extra:?}");
    for id in &ids {
        assert_eq!(
            states(&got[id]),
            ["scheduled", "started", "succeeded"],
            "{id}"
        );
    }
}

#[tokio::test]
async fn retries_back_off_with_attempts_and_events_then_end_retries_exhausted() {
    let (env, mut watch) = Env::with_up_watching(
        "retries",
        &[
            ("WARREN__RETRY__DEFAULT__BASE_MS", "200"),
            ("WARREN__RETRY__DEFAULT__CAP_MS", "400"),
        ],
    )
    .await;
    let id = env
        .publish(
            &TaskRequest::new(
                "diag.fail",
                json!({"kind": "retryable", "message": "flaky"}),
            )
            .header_int("x-warren-max-retries", 2),
        )
        .await;
    let got = until_final(&mut watch, &[&id], T_LONG).await;
    let evs = &got[&id];
    assert_eq!(
        states(evs),
        [
            "started",
            "failed",
            "scheduled",
            "started",
            "failed",
            "scheduled",
            "started",
            "failed",
            "dead"
        ]
    );
    let attempts: Vec<i64> = evs.iter().map(|e| e.event.attempt).collect();
    assert_eq!(attempts, [1, 1, 2, 2, 2, 3, 3, 3, 3]);
    let retry: Vec<Option<bool>> = evs
        .iter()
        .filter(|e| e.event.state == TaskState::Failed)
        .map(|e| e.event.retry)
        .collect();
    assert_eq!(retry, [Some(true), Some(true), Some(false)]);
    let dead = final_event(evs);
    assert_eq!(dead.reason.as_deref(), Some("retries_exhausted"));
    assert_eq!(dead.error.as_ref().unwrap().kind, ErrorKind::Retryable);
    assert!(evs[2].event.due_at.is_some());
    let parked = env.drain(&env.names().dead()).await;
    assert_eq!(parked.len(), 1);
    let h = parked[0].0.headers().clone().unwrap();
    assert_eq!(
        warren_core::headers::get_int(Some(&h), "x-warren-attempt").unwrap(),
        Some(3)
    );
    assert!(
        warren_core::headers::get_str(Some(&h), "x-warren-last-error")
            .unwrap()
            .contains("flaky")
    );
}

#[tokio::test]
async fn expiration_counts_from_release_not_while_waiting() {
    let (env, mut watch) = Env::with_up_watching("delay-expiry", &[]).await;
    let p =
        delayed("exp-later", "x-delay", AMQPValue::LongInt(5000)).with_expiration("2500".into());
    env.publish_raw(&env.names().delay(), "diag.echo", b"{}", p)
        .await;
    let got = until_final(&mut watch, &["exp-later"], T_LONG).await;
    assert_eq!(final_event(&got["exp-later"]).state, TaskState::Succeeded);
}
