//! Waiting tasks (issue 16 items 1 and 2): visible in the tracker from
//! their publication on, and changed while they wait (priority, due time,
//! run now), through the real binaries and broker.

#[path = "tracker_support.rs"]
mod support;

use serde_json::json;
use support::{tracker_env, TestDb};
use warren_client::TaskRequest;
use warren_e2e::{until_final, T};

#[tokio::test]
async fn tasks_are_visible_from_publication_with_type_priority_and_queue() {
    let db = TestDb::sqlite("visible");
    let (mut env, api) = tracker_env("wait-vis", &db, &[]).await;
    // Only the tracker runs: nothing takes the tasks yet.
    let _tracker = env.spawn(&["tracker"], &[]);
    api.wait_ready().await;
    let now = env
        .publish(
            &TaskRequest::new("diag.echo", json!({"n": 1}))
                .id("vis-now")
                .priority(6),
        )
        .await;
    let later = env
        .publish(
            &TaskRequest::new("diag.echo", json!({"n": 2}))
                .id("vis-later")
                .delay_ms(600_000),
        )
        .await;
    // A producer that is not Warren's client: a raw AMQP publish.
    let (_conn, ch) = env.open_channel().await;
    ch.basic_publish(
        env.names().tasks().as_str().into(),
        "diag.echo".into(),
        Default::default(),
        br#"{"n": 3}"#,
        lapin::BasicProperties::default()
            .with_message_id("vis-raw".into())
            .with_priority(2),
    )
    .await
    .expect("publish")
    .await
    .expect("confirm");

    let task = api
        .wait_for(
            &format!("/api/tasks/{now}"),
            "the immediate task queued",
            |v| v["task"]["state"] == "queued",
        )
        .await;
    assert_eq!(task["task"]["type"], "diag.echo");
    assert_eq!(task["task"]["queue"], "diag");
    assert_eq!(task["task"]["priority"], 6);
    assert_eq!(task["events"][0]["state"], "queued");
    let raw = api
        .wait_for("/api/tasks/vis-raw", "the raw task queued", |v| {
            v["task"]["state"] == "queued"
        })
        .await;
    assert_eq!(raw["task"]["priority"], 2);
    let delayed = api
        .wait_for(
            &format!("/api/tasks/{later}"),
            "the delayed task scheduled",
            |v| v["task"]["state"] == "scheduled",
        )
        .await;
    let due = warren_e2e::unix_ms(delayed["task"]["due_at"].as_str().expect("a due time"));
    let published_ms = chrono::Utc::now().timestamp_millis();
    assert!(
        (published_ms + 500_000..published_ms + 700_000).contains(&due),
        "due about 10 min after publication: {delayed}"
    );
    assert_eq!(delayed["task"]["queue"], "diag");

    // Workers run them: the state moves on and stays there.
    let mut watch = env.watch(&["#"]).await;
    let _worker = env.spawn(&["worker", "--queues", "diag"], &[]);
    until_final(&mut watch, &[&now, "vis-raw"], T).await;
    for id in [now.as_str(), "vis-raw"] {
        let t = api
            .wait_for(&format!("/api/tasks/{id}"), "succeeded", |v| {
                v["task"]["state"] == "succeeded"
            })
            .await;
        assert_eq!(t["task"]["state"], "succeeded");
    }
    // The copies were all read: none wait in P.tracker.published.
    env.wait_depth(&env.names().tracker_published(), 0, T).await;
}

/// Index of the first `started` event of `id` among the `started` events.
fn start_order(order: &[String], id: &str) -> usize {
    order
        .iter()
        .position(|s| s == id)
        .unwrap_or_else(|| panic!("{id} never started: {order:?}"))
}

#[tokio::test]
async fn a_reprioritized_task_runs_before_those_ahead_and_a_second_change_wins() {
    let db = TestDb::sqlite("reprio");
    let (mut env, api) =
        tracker_env("wait-prio", &db, &[("WARREN__WORKER__CONCURRENCY", "1")]).await;
    let _tracker = env.spawn(&["tracker"], &[]);
    api.wait_ready().await;
    let mut ahead = Vec::new();
    for i in 0..6 {
        ahead.push(
            env.publish(
                &TaskRequest::new("diag.sleep", json!({"ms": 300})).id(format!("ahead-{i}")),
            )
            .await,
        );
    }
    let x = env
        .publish(&TaskRequest::new("diag.sleep", json!({"ms": 1})).id("prio-x"))
        .await;
    // Changed twice: sent to wait an hour, then run now; the last holds.
    let y = env
        .publish(&TaskRequest::new("diag.echo", json!({"y": 1})).id("twice-y"))
        .await;
    for id in [&x, &y] {
        api.wait_for(&format!("/api/tasks/{id}"), "queued", |v| {
            v["task"]["state"] == "queued"
        })
        .await;
    }
    let out = env.cli_ok(&["task", "reprioritize", &x, "9"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("priority 9"),
        "{out:?}"
    );
    env.cli_ok(&["task", "reschedule", &y, "--in", "1h"]);
    env.cli_ok(&["task", "run-now", &y]);
    // Unknown ids and bad values: one line each, nothing sent.
    let err = env.cli_err(&["task", "run-now", "no-such-task"]);
    assert!(err.contains("no task \"no-such-task\""), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let err = env.cli_err(&["task", "reschedule", &y, "--in", "soon"]);
    assert!(err.contains("not a duration"), "{err}");
    let err = env.cli_err(&["task", "reprioritize", &x, "300"]);
    assert!(err.contains("300"), "{err}");

    let mut watch = env.watch(&["#"]).await;
    let _worker = env.spawn(&["worker", "--queues", "diag"], &[]);
    let mut all = ahead.clone();
    all.push(x.clone());
    all.push(y.clone());
    let got = until_final(&mut watch, &all, T).await;
    for id in &all {
        assert_eq!(
            got[id].last().unwrap().event.state,
            warren_core::TaskState::Succeeded,
            "{id}"
        );
        let starts = got[id]
            .iter()
            .filter(|e| e.event.state == warren_core::TaskState::Started)
            .count();
        assert_eq!(starts, 1, "{id} ran once");
    }
    let mut starts: Vec<(i64, String)> = got
        .values()
        .flatten()
        .filter(|e| e.event.state == warren_core::TaskState::Started)
        .map(|e| (warren_e2e::unix_ms(&e.event.at), e.event.task_id.clone()))
        .collect();
    starts.sort();
    let order: Vec<String> = starts.into_iter().map(|(_, id)| id).collect();
    // The first task may start before the worker sees the changed one.
    assert!(
        start_order(&order, &x) <= 2,
        "the reprioritized task ran before those ahead of it: {order:?}"
    );

    // A started task cannot be changed: the CLI says why.
    let long = env
        .publish(&TaskRequest::new("diag.sleep", json!({"ms": 60_000})).id("long-l"))
        .await;
    api.wait_for(&format!("/api/tasks/{long}"), "started", |v| {
        v["task"]["state"] == "started"
    })
    .await;
    let err = env.cli_err(&["task", "reprioritize", &long, "5"]);
    assert!(err.contains("has started"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    env.cli_ok(&["cancel", &long]);
    until_final(&mut watch, &[&long], T).await;
}

#[tokio::test]
async fn delayed_and_retry_waiting_tasks_move_and_changes_survive_a_scheduler_restart() {
    let db = TestDb::sqlite("resched");
    let (mut env, api) = tracker_env(
        "wait-sched",
        &db,
        &[
            ("WARREN__RETRY__DEFAULT__MAX_RETRIES", "1"),
            // The retry's draw lies anywhere in a day: run-now must beat it.
            ("WARREN__RETRY__DEFAULT__BASE_MS", "86400000"),
            ("WARREN__RETRY__DEFAULT__CAP_MS", "86400000"),
        ],
    )
    .await;
    let _tracker = env.spawn(&["tracker"], &[]);
    api.wait_ready().await;
    let mut watch = env.watch(&["#"]).await;
    let _worker = env.spawn(&["worker", "--queues", "diag"], &[]);
    // A scheduler ran before and is gone while the changes are sent.
    let first = env.spawn(&["scheduler"], &[]);
    let late = env
        .publish(
            &TaskRequest::new("diag.echo", json!({"l": 1}))
                .id("later-d")
                .delay_ms(2_000),
        )
        .await;
    let retried = env
        .publish(
            &TaskRequest::new(
                "diag.fail",
                json!({"kind": "retryable", "message": "again"}),
            )
            .id("retry-r"),
        )
        .await;
    api.wait_for(&format!("/api/tasks/{late}"), "scheduled", |v| {
        v["task"]["state"] == "scheduled"
    })
    .await;
    env.kill(&first, T).await;
    let early = env
        .publish(
            &TaskRequest::new("diag.echo", json!({"e": 1}))
                .id("earlier-d")
                .delay_ms(3_600_000),
        )
        .await;
    // The retry waits in P.delay (no scheduler): its due time, from the copy.
    let waiting = api
        .wait_for(&format!("/api/tasks/{retried}"), "the retry waiting", |v| {
            v["task"]["state"] == "scheduled" && v["task"]["attempts"] == 2
        })
        .await;
    let retry_due = warren_e2e::unix_ms(waiting["task"]["due_at"].as_str().unwrap());
    api.wait_for(&format!("/api/tasks/{early}"), "scheduled", |v| {
        v["task"]["state"] == "scheduled"
    })
    .await;

    let now = chrono::Utc::now().timestamp_millis();
    let late_due = now + 8_000;
    env.cli_ok(&["task", "reschedule", &late, "--in", "8s"]);
    let early_due = chrono::Utc::now().timestamp_millis() + 3_000;
    env.cli_ok(&["task", "reschedule", &early, "--in", "3s"]);
    env.cli_ok(&["task", "run-now", &retried]);
    let run_now_at = chrono::Utc::now().timestamp_millis();

    let _second = env.spawn(&["scheduler"], &[]);
    let got = until_final(&mut watch, &[&late, &early, &retried], T).await;
    let started_at = |id: &str, attempt: i64| {
        got[id]
            .iter()
            .find(|e| {
                e.event.state == warren_core::TaskState::Started && e.event.attempt == attempt
            })
            .map(|e| warren_e2e::unix_ms(&e.event.at))
            .unwrap_or_else(|| panic!("{id} attempt {attempt} never started: {:?}", got[id]))
    };
    let l = started_at(&late, 1);
    assert!(
        l >= late_due,
        "moved later, never early: started {l}, due {late_due}"
    );
    let e = started_at(&early, 1);
    assert!(
        e >= early_due,
        "never before its new time: started {e}, due {early_due}"
    );
    assert!(e < now + 3_600_000, "not at the old time");
    let r = started_at(&retried, 2);
    assert!(r >= run_now_at - 1_000, "the retry ran after run-now");
    if retry_due > run_now_at + 20_000 {
        assert!(
            r < retry_due,
            "run now beat the retry's own time: {r} vs {retry_due}"
        );
    }
    for id in [&late, &early] {
        assert_eq!(
            got[id].last().unwrap().event.state,
            warren_core::TaskState::Succeeded,
            "{id}"
        );
    }
}
