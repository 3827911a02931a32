//! The dead-letter CLI: `warren dead list|replay|purge` on a real `P.dead`.

use std::time::Duration;

use lapin::types::{AMQPValue, FieldArray, FieldTable};
use lapin::BasicProperties;
use serde_json::{json, Value};
use warren_client::{TaskRequest, ORIGINAL_EXPIRATION};
use warren_core::headers::{get_int, get_str};
use warren_core::TaskState;
use warren_e2e::{final_event, states, until_final, Env, T};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `dead list --json` with extra flags, parsed line by line.
fn list_json(env: &Env, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["dead", "list", "--json"];
    args.extend_from_slice(extra);
    let out = env.cli_ok(&args);
    text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?} is not JSON: {e}")))
        .collect()
}

fn ids_of(rows: &[Value]) -> Vec<&str> {
    let mut ids: Vec<&str> = rows.iter().map(|r| r["id"].as_str().unwrap()).collect();
    ids.sort();
    ids
}

/// Publishes a message straight into `P.dead`, as a dead copy would look.
async fn park(env: &Env, body: &[u8], props: BasicProperties) {
    env.publish_raw("", &env.names().dead(), body, props).await;
}

#[tokio::test]
async fn list_shows_dead_tasks_without_removing_them_and_purge_deletes_them() {
    let env = Env::with_up("deadlist", &[]).await;
    let dead = env.names().dead();
    for id in ["fail-1", "fail-2"] {
        let ev = env
            .call(
                &TaskRequest::new(
                    "diag.fail",
                    json!({"kind": "permanent", "message": "card declined\non two lines"}),
                )
                .id(id),
                T,
            )
            .await;
        assert_eq!(ev.state, TaskState::Dead, "{id}");
    }
    let props = BasicProperties::default()
        .with_message_id("oops-1".into())
        .with_content_type("application/json".into());
    env.publish_raw(&env.names().tasks(), "diag.echo", b"{oops", props)
        .await;
    env.wait_depth(&dead, 3, T).await;

    // Text listing: one line per task, a header and a count line.
    let out = env.cli_ok(&["dead", "list"]);
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 5, "header, 3 tasks, count: {stdout}");
    assert!(lines[0].starts_with("ID"), "{stdout}");
    for id in ["fail-1", "fail-2"] {
        let line = lines.iter().find(|l| l.starts_with(id)).expect(id);
        for word in [
            "diag.fail",
            "permanent_failure",
            "card declined on two lines",
        ] {
            assert!(line.contains(word), "{line:?} shows {word}");
        }
    }
    let oops = lines.iter().find(|l| l.starts_with("oops-1")).unwrap();
    assert!(
        oops.contains("diag.echo") && oops.contains("invalid"),
        "{oops}"
    );
    assert!(oops.contains(" 5  "), "body size 5: {oops}");
    assert_eq!(lines[4], format!("3 dead tasks in {dead}"));
    assert_eq!(env.depth(&dead).await, 3, "list leaves the queue as it was");

    // JSON listing: every field, headers as JSON, body as JSON or as text.
    let rows = list_json(&env, &[]);
    assert_eq!(ids_of(&rows), ["fail-1", "fail-2", "oops-1"]);
    let fail = rows.iter().find(|r| r["id"] == "fail-1").unwrap();
    assert_eq!(fail["type"], "diag.fail");
    assert_eq!(fail["reason"], "permanent_failure");
    assert!(fail["queue"].as_str().unwrap().contains("diag"), "{fail}");
    assert_eq!(
        fail["body"],
        json!({"kind": "permanent", "message": "card declined\non two lines"})
    );
    assert_eq!(
        fail["headers"]["x-warren-dead-reason"], "permanent_failure",
        "{fail}"
    );
    assert!(fail["detail"].as_str().unwrap().contains("card declined"));
    let oops = rows.iter().find(|r| r["id"] == "oops-1").unwrap();
    assert_eq!(oops["reason"], "invalid");
    assert_eq!(oops["body"], "{oops");
    assert_eq!(oops["attempt"], 0, "no attempt started");

    // Filters and the limit.
    assert_eq!(
        ids_of(&list_json(&env, &["--reason", "invalid"])),
        ["oops-1"]
    );
    assert_eq!(
        ids_of(&list_json(&env, &["--type", "diag.fail"])),
        ["fail-1", "fail-2"]
    );
    assert!(
        list_json(&env, &["--type", "diag"]).is_empty(),
        "type is exact"
    );
    assert_eq!(list_json(&env, &["--limit", "1"]).len(), 1);
    // An unknown reason is refused.
    env.cli_err(&["dead", "list", "--reason", "bogus"]);
    assert_eq!(env.depth(&dead).await, 3, "listing never removes anything");

    // Replaying an unknown id fails, names it, and changes nothing.
    let out = env.cli_exit(&["dead", "replay", "no-such-task"], 1);
    let err = text(&out.stderr);
    assert!(err.contains("no-such-task"), "{err}");
    assert_eq!(env.depth(&dead).await, 3);

    // Purge without --yes and without a terminal refuses and deletes nothing.
    let out = env.cli_exit(&["dead", "purge"], 1);
    let err = text(&out.stderr);
    assert!(err.contains("--yes"), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert_eq!(env.depth(&dead).await, 3);

    // Purge with a filter deletes only what matches; then the rest.
    let out = env.cli_ok(&["dead", "purge", "--reason", "invalid", "--yes"]);
    assert!(text(&out.stdout).contains("deleted 1 dead task"));
    assert_eq!(ids_of(&list_json(&env, &[])), ["fail-1", "fail-2"]);
    let out = env.cli_ok(&["dead", "purge", "--yes"]);
    assert!(text(&out.stdout).contains("deleted 2 dead tasks"));
    assert_eq!(env.depth(&dead).await, 0);
    let out = env.warren(&["dead", "list"]).output().expect("run warren");
    assert_eq!(text(&out.stdout).trim(), format!("0 dead tasks in {dead}"));
}

#[tokio::test]
async fn replay_by_id_resets_the_attempt_and_keeps_everything_else() {
    // No worker runs: the replayed copy stays in the work queue to be inspected.
    let env = Env::new("deadreplay", &[]).await;
    let dead = env.names().dead();
    let work = env.names().work_queue("diag");

    let mut h = FieldTable::default();
    h.insert("x-warren-attempt".into(), AMQPValue::LongLongInt(4));
    h.insert("x-warren-republished".into(), AMQPValue::Boolean(true));
    for (k, v) in [
        ("x-warren-dead-reason", "retries_exhausted"),
        ("x-warren-dead-detail", "gave up after 4 attempts"),
        ("x-warren-dead-queue", "diag"),
        ("x-warren-last-error", "timeout"),
        (ORIGINAL_EXPIRATION, "600000"),
        ("x-custom", "kept"),
    ] {
        h.insert(k.into(), AMQPValue::LongString(v.into()));
    }
    h.insert("x-warren-max-retries".into(), AMQPValue::LongInt(2));
    h.insert(
        "x-death".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(
            FieldTable::default(),
        )])),
    );
    let crafted = BasicProperties::default()
        .with_message_id("crafted".into())
        .with_type("diag.echo".into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_priority(7)
        .with_correlation_id("corr-9".into())
        .with_app_id("billing".into())
        .with_headers(h);
    park(&env, br#"{"n": 1}"#, crafted).await;
    let mut other = FieldTable::default();
    other.insert(
        "x-warren-dead-reason".into(),
        AMQPValue::LongString("invalid".into()),
    );
    let other_props = BasicProperties::default()
        .with_message_id("other".into())
        .with_type("diag.echo".into())
        .with_headers(other);
    park(&env, b"{}", other_props.clone()).await;
    park(
        &env,
        b"{}",
        BasicProperties::default().with_message_id("untyped".into()),
    )
    .await;
    env.wait_depth(&dead, 3, T).await;

    // One id found, one not: the found one is replayed, the exit says which is missing.
    let out = env.cli_exit(&["dead", "replay", "crafted", "ghost"], 1);
    assert!(text(&out.stdout).contains("replayed 1 dead task"));
    let err = text(&out.stderr);
    assert!(err.contains("ghost") && !err.contains("crafted"), "{err}");
    env.wait_depth(&work, 1, T).await;

    let copies = env.drain(&work).await;
    let (p, body) = &copies[0];
    assert_eq!(body, br#"{"n": 1}"#, "body intact");
    assert_eq!(p.message_id().as_ref().unwrap().as_str(), "crafted");
    assert_eq!(p.kind().as_ref().unwrap().as_str(), "diag.echo");
    assert_eq!(p.priority(), &Some(7));
    assert_eq!(p.delivery_mode(), &Some(2));
    assert_eq!(p.correlation_id().as_ref().unwrap().as_str(), "corr-9");
    assert_eq!(p.app_id().as_ref().unwrap().as_str(), "billing");
    assert_eq!(
        p.content_type().as_ref().unwrap().as_str(),
        "application/json"
    );
    assert_eq!(
        p.expiration().as_ref().unwrap().as_str(),
        "600000",
        "expiration restored"
    );
    let h = p.headers().clone().unwrap();
    let keys: Vec<&str> = h.inner().keys().map(|k| k.as_str()).collect();
    assert_eq!(keys, ["x-custom", "x-warren-max-retries"], "attempt reset");
    assert_eq!(get_str(Some(&h), "x-custom").as_deref(), Some("kept"));
    assert_eq!(get_int(Some(&h), "x-warren-max-retries").unwrap(), Some(2));

    // What was not asked for is still there, untouched.
    let rows = list_json(&env, &[]);
    assert_eq!(ids_of(&rows), ["other", "untyped"]);

    // A task without a type cannot be routed: it stays, with a warning.
    let out = env.cli_ok(&["dead", "replay", "--all", "--reason", "invalid"]);
    assert!(text(&out.stdout).contains("replayed 1 dead task"));
    let out = env.cli_exit(&["dead", "replay", "untyped"], 1);
    assert!(text(&out.stderr).contains("warning: dead task untyped"));
    let left = env.drain(&dead).await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].0.message_id().as_ref().unwrap().as_str(), "untyped");
    let copies = env.drain(&work).await;
    assert_eq!(copies.len(), 1);
    assert_eq!(copies[0].0.message_id().as_ref().unwrap().as_str(), "other");
    let h = copies[0].0.headers().clone();
    assert!(h.as_ref().is_none_or(|h| h.inner().is_empty()), "{h:?}");
}

#[tokio::test]
async fn an_expired_task_replayed_runs_again_from_attempt_one() {
    let mut env = Env::new("deadexpired", &[]).await;
    let dead = env.names().dead();
    // Only the scheduler runs: the task expires in its work queue and is parked.
    let scheduler = env.spawn(&["scheduler"], &[]);
    let id = env
        .publish(
            &TaskRequest::new("diag.echo", json!({"late": true}))
                .id("late-1")
                .expiration_ms(500),
        )
        .await;
    env.wait_depth(&dead, 1, T).await;
    let rows = list_json(&env, &[]);
    assert_eq!(rows[0]["id"], "late-1");
    assert_eq!(rows[0]["reason"], "expired");

    env.signal(&scheduler, "TERM");
    assert!(env.wait_exit(&scheduler, T).await.is_some());
    env.up(&[]);
    let mut watch = env.watch(&["#"]).await;
    let out = env.cli_ok(&["dead", "replay", "--all"]);
    assert!(text(&out.stdout).contains("replayed 1 dead task"));
    let got = until_final(&mut watch, &[&id], T).await;
    let events = &got[&id];
    assert_eq!(states(events), ["started", "succeeded"]);
    let ev = final_event(events);
    assert_eq!(ev.attempt, 1);
    assert_eq!(ev.result, Some(json!({"late": true})));
    assert_eq!(env.depth(&dead).await, 0);
}

#[tokio::test]
async fn a_replay_killed_midway_loses_nothing_and_a_second_replay_finishes() {
    use futures::StreamExt;
    use std::collections::HashSet;

    // No worker runs: replayed copies stay in the work queue to be counted.
    let mut env = Env::new("deadkill", &[]).await;
    let (dead, work) = (env.names().dead(), env.names().work_queue("diag"));
    const N: u32 = 3_000;
    // Copies confirmed but not yet acknowledged in P.dead when the replay
    // dies come back on the second replay: at most the replay's window.
    const WINDOW: u32 = 64;
    let ch = env.client.channel().await.unwrap();
    let mut parked = futures::stream::iter(0..N)
        .map(|i| {
            let (ch, dead) = (&ch, &dead);
            async move {
                let mut h = FieldTable::default();
                h.insert(
                    "x-warren-dead-reason".into(),
                    AMQPValue::LongString("permanent_failure".into()),
                );
                let props = BasicProperties::default()
                    .with_message_id(format!("r{i}").into())
                    .with_type("diag.echo".into())
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2)
                    .with_headers(h);
                ch.publish("", dead, b"{}", props, "parked").await.unwrap();
            }
        })
        .buffered(256);
    while parked.next().await.is_some() {}
    env.wait_depth(&dead, N, T).await;

    let replay = env.spawn(&["dead", "replay", "--all"], &[]);
    let deadline = tokio::time::Instant::now() + T;
    while env.depth(&work).await < N / 10 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "replay never started"
        );
    }
    env.kill(&replay, T).await;

    // The broker returns what the replay held unacknowledged to P.dead: every
    // task is in one queue or the other (or, inside the window, both).
    let deadline = tokio::time::Instant::now() + T;
    let (moved, left) = loop {
        let (moved, left) = (env.depth(&work).await, env.depth(&dead).await);
        if moved + left >= N {
            break (moved, left);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{moved} replayed + {left} still dead < {N}: tasks were lost"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(left > 0, "the kill came after the replay had finished");
    assert!(moved + left <= N + WINDOW, "{moved} + {left}");

    env.cli_ok(&["dead", "replay", "--all"]);
    assert_eq!(env.depth(&dead).await, 0);
    let copies = env.drain(&work).await;
    let ids: HashSet<String> = copies
        .iter()
        .map(|(p, _)| p.message_id().as_ref().expect("id").to_string())
        .collect();
    assert_eq!(ids.len() as u32, N, "every task replayed");
    let duplicates = copies.len() as u32 - N;
    assert!(duplicates <= WINDOW, "{duplicates} duplicates");
}
