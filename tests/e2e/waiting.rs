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
