//! Chords (contract section 8): a callback that runs once when every member
//! is final, with their outcomes in member order; the join held by the
//! broker through SIGKILLs of the scheduler folding it, of a worker
//! mid-member and of the broker itself (a node of the test's own); a member that
//! fails permanently reaching the callback as a failure; hostile chord
//! starts and members refused dead `invalid` with their reason.

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::BasicProperties;
use serde_json::{json, Value};
use warren_client::{Chord, Step, TaskRequest};
use warren_core::chord::{member_headers, Final, Member, Outcome};
use warren_core::TaskState;
use warren_e2e::{
    final_event, result_of, states, until_final, Env, NodeOptions, TestNode, T, T_LONG,
};

/// Members of the big chord: `WARREN_E2E_CHORD_MEMBERS` (say 1000), else 200.
fn big_chord_size() -> usize {
    std::env::var("WARREN_E2E_CHORD_MEMBERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

/// Publishes a chord start to `P.chords` as any AMQP client would.
async fn publish_start(env: &Env, chord_id: &str, body: &[u8]) {
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(chord_id.into());
    env.publish_raw(&env.names().chords(), "", body, props)
        .await;
}

/// Whether a queue exists (AMQP passive declare).
async fn exists(env: &Env, queue: &str) -> bool {
    let (conn, ch) = env.open_channel().await;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let r = ch
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await;
    let _ = conn.close(200, "bye".into()).await;
    r.is_ok()
}

/// Waits (bounded) until `queue` is gone.
async fn wait_gone(env: &Env, queue: &str) {
    let deadline = tokio::time::Instant::now() + T;
    while exists(env, queue).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{queue} still exists after {T:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every outcome published so far to `queue` is held,
/// unacknowledged, by a folder (none ready).
async fn wait_folded(env: &Env, queue: &str) {
    env.wait_depth(queue, 0, T).await;
}

#[tokio::test]
async fn a_chord_callback_runs_once_with_every_result_through_killed_folders_and_a_killed_worker() {
    let n = big_chord_size();
    let mut env = Env::new("chord-kill", &[]).await;
    let mut watch = env.watch(&["#"]).await;
    let worker = env.spawn(&["worker", "--queues", "diag"], &[]);
    let first = env.spawn(&["scheduler"], &[]);
    env.wait_log(&first, "this scheduler folds chords", T).await;

    // Every member echoes its index but one, in the second part, which
    // sleeps long enough for its worker to be killed while it runs.
    let sleeper = n * 5 / 8;
    let chord = (0..n).fold(
        Chord::new("big", Step::new("diag.echo", json!({"joined": true}))),
        |c, i| {
            c.task(if i == sleeper {
                TaskRequest::new("diag.sleep", json!({"ms": 5_000}))
            } else {
                TaskRequest::new("diag.echo", json!({ "k": i }))
            })
        },
    );
    let members = chord.requests().unwrap();
    let ids: Vec<String> = members.iter().map(|r| r.id.clone().unwrap()).collect();
    let queue = env.names().chord_queue("big");
    publish_start(&env, "big", &chord.start().unwrap().encode()).await;
    let (half, three_quarters) = (n / 2, n * 3 / 4);

    // Part 1, folded (held unacknowledged) by the first scheduler, which
    // is killed: the join cannot be complete yet.
    env.client
        .publish_batch(&members[..half], 256, |_| {})
        .await
        .unwrap();
    until_final(&mut watch, &ids[..half], T_LONG).await;
    wait_folded(&env, &queue).await;
    env.kill(&first, T).await;
    let second = env.spawn(&["scheduler"], &[]);

    // An outcome delivered twice (at least once) counts once.
    let dup = Outcome::new(
        &Member {
            chord_id: "big".into(),
            index: 0,
        },
        &ids[0],
        Final::Succeeded,
        Some(json!({"k": 0})),
        None,
        None,
    );
    env.publish_raw(
        "",
        &queue,
        &dup.encode(),
        BasicProperties::default().with_delivery_mode(2),
    )
    .await;

    // Part 2: its worker is killed while the sleeper runs; another worker
    // runs it again.
    env.client
        .publish_batch(&members[half..three_quarters], 256, |_| {})
        .await
        .unwrap();
    // Members that end while the sleeper starts are counted here.
    let mut ended = std::collections::HashSet::new();
    loop {
        let e = watch.next(T).await.unwrap().expect("the sleeper starts");
        if e.event.state.is_final() {
            ended.insert(e.event.task_id.clone());
        }
        if e.event.task_id == ids[sleeper] && e.event.state == TaskState::Started {
            break;
        }
    }
    env.kill(&worker, T).await;
    env.spawn(&["worker", "--queues", "diag"], &[]);
    let open: Vec<&String> = ids[half..three_quarters]
        .iter()
        .filter(|id| !ended.contains(*id))
        .collect();
    until_final(&mut watch, &open, T_LONG).await;
    wait_folded(&env, &queue).await;
    env.kill(&second, T).await;
    let third = env.spawn(&["scheduler"], &[]);

    // Part 3, and the third scheduler completes the join.
    env.client
        .publish_batch(&members[three_quarters..], 256, |_| {})
        .await
        .unwrap();
    let got = until_final(&mut watch, &["big.callback"], T_LONG).await;
    let events = &got["big.callback"];
    assert_eq!(states(events), ["started", "succeeded"]);
    let result = result_of(events);
    assert_eq!(result["joined"], true);
    let results = result["results"].as_array().expect("results");
    assert_eq!(results.len(), n);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["task_id"], ids[i], "member {i}");
        assert_eq!(r["state"], "succeeded", "member {i}");
        if i != sleeper {
            assert_eq!(r["result"], json!({ "k": i }), "member {i}");
        }
    }
    assert_eq!(events[0].event.workflow_id.as_deref(), Some("big"));
    // Done: the start acknowledged and the chord's queue deleted (both only
    // after the callback's confirm), and a task published after that run
    // with no second callback seen.
    wait_gone(&env, &queue).await;
    env.wait_depth(&env.names().chords(), 0, T).await;
    env.publish(&TaskRequest::new("diag.echo", json!({})).id("after"))
        .await;
    let rest = until_final(&mut watch, &["after"], T).await;
    assert!(
        !rest.contains_key("big.callback"),
        "the callback ran twice: {:?}",
        rest["big.callback"]
    );
    assert!(env.log_of(&third).contains("callback published"));
}

#[tokio::test]
async fn a_member_that_fails_permanently_reaches_the_callback_as_a_failure() {
    let (env, mut watch) = Env::with_up_watching("chord-fail", &[]).await;
    let spec = json!({
        "chord": "cf",
        "tasks": [
            {"type": "diag.echo", "args": {"k": 0}},
            {"type": "diag.fail", "args": {"kind": "permanent", "message": "member broke"}},
            {"type": "diag.echo", "args": {"k": 2}, "id": "third"}
        ],
        "callback": {"type": "diag.echo"}
    });
    let file = std::env::temp_dir().join(format!("{}-chord.json", env.prefix));
    std::fs::write(&file, spec.to_string()).unwrap();
    let out = env.cli_ok(&["workflow", "start", file.to_str().unwrap()]);
    std::fs::remove_file(&file).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("workflow cf"), "{text}");
    assert!(text.contains("cf.0 cf.1 third"), "{text}");
    assert!(text.contains("callback cf.callback"), "{text}");
    let got = until_final(
        &mut watch,
        &["cf.0", "cf.1", "third", "cf.callback"],
        T_LONG,
    )
    .await;
    assert_eq!(final_event(&got["cf.1"]).state, TaskState::Dead);
    let results = result_of(&got["cf.callback"])["results"].clone();
    assert_eq!(results[0]["result"], json!({"k": 0}));
    assert_eq!(results[1]["task_id"], "cf.1");
    assert_eq!(results[1]["state"], "dead");
    assert_eq!(results[1]["reason"], "permanent_failure");
    assert_eq!(results[1]["error"]["message"], "member broke");
    assert_eq!(
        results[2],
        json!({"task_id": "third", "state": "succeeded", "result": {"k": 2}})
    );
}

#[tokio::test]
async fn hostile_chords_are_dead_invalid_with_their_reason() {
    let (env, mut watch) = Env::with_up_watching("chord-hostile", &[]).await;
    publish_start(
        &env,
        "huge",
        br#"{"size": 1000000, "callback": {"type": "diag.echo"}}"#,
    )
    .await;
    publish_start(&env, "garbled", b"{\"size\": 3, \"callback\": ").await;
    publish_start(
        &env,
        "badcb",
        br#"{"size": 2, "callback": {"type": "no spaces allowed"}}"#,
    )
    .await;
    // A member whose index is past any chord's bound.
    let mut bad = TaskRequest::new("diag.echo", json!({})).id("bad-member");
    member_headers(&mut bad.headers, "hm", 0);
    bad = bad.header_int(warren_core::chord::INDEX, 1_000_000);
    env.publish(&bad).await;
    let got = until_final(&mut watch, &["huge", "garbled", "badcb", "bad-member"], T).await;
    let expect = [
        ("huge", "1000000 members"),
        ("garbled", "chord start"),
        ("badcb", "callback"),
        ("bad-member", "x-warren-chord-index"),
    ];
    for (id, why) in expect {
        let ev = final_event(&got[id]);
        assert_eq!(ev.state, TaskState::Dead, "{id}");
        assert_eq!(ev.reason.as_deref(), Some("invalid"), "{id}");
        let e = ev.error.as_ref().expect("error");
        assert_eq!(e.code, "bad_workflow", "{id}");
        assert!(e.message.contains(why), "{id}: {}", e.message);
    }
    // Parked with their bodies, and a good chord after them still joins.
    let dead = env.drain(&env.names().dead()).await;
    let parked: Vec<String> = dead
        .iter()
        .filter_map(|(p, _)| p.message_id().as_ref().map(|m| m.to_string()))
        .collect();
    for id in ["huge", "garbled", "badcb", "bad-member"] {
        assert!(
            parked.contains(&id.to_owned()),
            "{id} not in P.dead: {parked:?}"
        );
    }
    // A member carrying a chain (which the client refuses to send) is dead
    // invalid and reaches its chord as such; the chord still joins.
    let chord = Chord::new("mix", Step::new("diag.echo", json!({})))
        .task(TaskRequest::new("diag.echo", json!({"k": 1})));
    publish_start(
        &env,
        "mix",
        &json!({"size": 2, "callback": {"type": "diag.echo"}})
            .to_string()
            .into_bytes(),
    )
    .await;
    env.client
        .publish_batch(&chord.requests().unwrap(), 16, |_| {})
        .await
        .unwrap();
    let mut chained = TaskRequest::new("diag.echo", json!({}))
        .id("mix.1")
        .header_str(warren_core::workflow::CHAIN, r#"[{"type":"diag.echo"}]"#);
    member_headers(&mut chained.headers, "mix", 1);
    env.publish(&chained).await;
    let got = until_final(&mut watch, &["mix.callback"], T_LONG).await;
    let r: &Value = result_of(&got["mix.callback"]);
    assert_eq!(r["results"][0]["result"], json!({"k": 1}));
    assert_eq!(r["results"][1]["state"], "dead");
    assert_eq!(r["results"][1]["reason"], "invalid");
    let why = r["results"][1]["error"]["message"].as_str().unwrap();
    assert!(why.contains("cannot carry a chain"), "{why}");
}

#[tokio::test]
async fn a_cancelled_chord_cancels_its_waiting_members_and_its_callback() {
    let mut env = Env::new("chord-cancel", &[]).await;
    let mut watch = env.watch(&["#"]).await;
    let chord = (0..3).fold(
        Chord::new("cc", Step::new("diag.echo", json!({}))),
        |c, i| c.task(TaskRequest::new("diag.echo", json!({ "k": i }))),
    );
    env.client.publish_chord(&chord).await.unwrap();
    // Nothing runs yet: the cancel reaches every member before a worker.
    env.client.cancel("cc").await.unwrap();
    env.up(&[]);
    let got = until_final(&mut watch, &["cc.0", "cc.1", "cc.2", "cc.callback"], T_LONG).await;
    for id in ["cc.0", "cc.1", "cc.2", "cc.callback"] {
        assert_eq!(states(&got[id]), ["cancelled"], "{id}");
        assert_eq!(
            final_event(&got[id]).workflow_id.as_deref(),
            Some("cc"),
            "{id}"
        );
    }
    // The join still completed: its queue is gone once the callback was
    // published.
    wait_gone(&env, &env.names().chord_queue("cc")).await;
}

#[tokio::test]
async fn a_chord_joins_once_through_a_broker_killed_mid_join() {
    let node = TestNode::start("chord-restart", NodeOptions::default()).await;
    let url = node.amqp_url();
    let mut env = Env::new("chord-restart", &[("WARREN__BROKER__URL", url.as_str())]).await;
    let mut watch = env.watch(&["#"]).await;
    env.spawn(&["worker", "--queues", "diag"], &[]);
    let scheduler = env.spawn(&["scheduler"], &[]);
    env.wait_log(&scheduler, "this scheduler folds chords", T)
        .await;
    let n = 20;
    let chord = (0..n).fold(
        Chord::new("br", Step::new("diag.echo", json!({}))),
        |c, i| c.task(TaskRequest::new("diag.echo", json!({ "k": i }))),
    );
    let members = chord.requests().unwrap();
    let ids: Vec<String> = members.iter().map(|r| r.id.clone().unwrap()).collect();
    publish_start(&env, "br", &chord.start().unwrap().encode()).await;
    env.client
        .publish_batch(&members[..n / 2], 256, |_| {})
        .await
        .unwrap();
    until_final(&mut watch, &ids[..n / 2], T_LONG).await;
    let queue = env.names().chord_queue("br");
    wait_folded(&env, &queue).await;
    drop(watch);

    // A crash of the broker: what it confirmed is on disk, and what the
    // folder held comes back to the next fold.
    node.kill().await;
    node.restart().await;
    let mut watch = env.watch(&["#"]).await;
    // The scheduler reconnected and folds again.
    let deadline = tokio::time::Instant::now() + T_LONG;
    while env
        .log_of(&scheduler)
        .matches("this scheduler folds chords")
        .count()
        < 2
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the scheduler did not fold again after the broker restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.client
        .publish_batch(&members[n / 2..], 256, |_| {})
        .await
        .unwrap();
    let got = until_final(&mut watch, &["br.callback"], T_LONG).await;
    assert_eq!(states(&got["br.callback"]), ["started", "succeeded"]);
    let results = result_of(&got["br.callback"])["results"].clone();
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(
            results[i],
            json!({"task_id": id, "state": "succeeded", "result": {"k": i}}),
            "member {i}"
        );
    }
    wait_gone(&env, &queue).await;
}

#[tokio::test]
async fn a_delayed_member_cancelled_by_the_scheduler_reaches_the_callback() {
    let mut env = Env::new("chord-delayed", &[]).await;
    let mut watch = env.watch(&["#"]).await;
    // Cancelled before it is published: the scheduler (which reads the
    // cancels before it takes anything from P.delay) drops it, and the
    // chord still joins.
    env.client.cancel("dl.0").await.unwrap();
    let chord = Chord::new("dl", Step::new("diag.echo", json!({})))
        .task(TaskRequest::new("diag.echo", json!({"k": 0})).delay_ms(600_000))
        .task(TaskRequest::new("diag.echo", json!({"k": 1})));
    env.client.publish_chord(&chord).await.unwrap();
    env.up(&[]);
    let got = until_final(&mut watch, &["dl.0", "dl.1", "dl.callback"], T_LONG).await;
    assert_eq!(states(&got["dl.0"]), ["cancelled"]);
    let results = result_of(&got["dl.callback"])["results"].clone();
    assert_eq!(
        results,
        json!([
            {"task_id": "dl.0", "state": "cancelled", "reason": "cancel command"},
            {"task_id": "dl.1", "state": "succeeded", "result": {"k": 1}}
        ])
    );
}
