//! Workflows (contract section 8): chains passing results along, a failure
//! stopping a chain, hostile chain descriptions, groups and their cancel,
//! the state of a group from the tracker, and `warren workflow`.

#[path = "tracker_support.rs"]
mod support;

use serde_json::{json, Value};
use support::{tracker_env, TestDb};
use warren_client::{Group, TaskRequest};
use warren_core::workflow::{encode_chain, After, Step, CHAIN, WORKFLOW};
use warren_core::TaskState;
use warren_e2e::{final_event, pika, result_of, states, until_final, Env, T, T_LONG};

/// A task of `task_type` with `args` carrying `steps` as its chain.
fn chained(id: &str, task_type: &str, args: Value, steps: &[Step]) -> TaskRequest {
    TaskRequest::new(task_type, args)
        .id(id)
        .header_str(CHAIN, &encode_chain(steps))
}

#[tokio::test]
async fn a_chain_of_five_passes_each_result_to_the_next_step() {
    let (env, mut watch) = Env::with_up_watching("wf-chain", &[]).await;
    // n: 0 +1 → 1, +2 → 3, +3 → 6, +4 → 10, +5 → 15: each step sees the
    // result of the one before.
    let steps: Vec<Step> = (2..=5)
        .map(|k| Step::new("diag.add", json!({ "add": k })))
        .collect();
    env.publish(&chained(
        "c5",
        "diag.add",
        json!({"n": 0, "add": 1}),
        &steps,
    ))
    .await;
    let ids = ["c5", "c5.1", "c5.2", "c5.3", "c5.4"];
    let got = until_final(&mut watch, &ids, T_LONG).await;
    for (k, (id, n)) in ids.iter().zip([1, 3, 6, 10, 15]).enumerate() {
        let events = &got[*id];
        assert_eq!(states(events), ["started", "succeeded"], "{id}");
        assert_eq!(result_of(events), &json!({ "n": n }), "{id}");
        for e in events {
            // Every event of every step names the workflow and the parent.
            assert_eq!(e.event.workflow_id.as_deref(), Some("c5"), "{id}");
            let parent = (k > 0).then(|| ids[k - 1]);
            assert_eq!(e.event.parent_id.as_deref(), parent, "{id}");
        }
    }
}

#[tokio::test]
async fn a_failing_middle_step_cancels_the_rest_with_its_reason() {
    let (env, mut watch) = Env::with_up_watching("wf-fail", &[]).await;
    let mut cleanup = Step::new("diag.echo", json!({"cleanup": true}));
    cleanup.after = After::Always;
    // diag.fail refuses unknown arguments: it takes no result.
    let mut fail = Step::new(
        "diag.fail",
        json!({"kind": "permanent", "message": "middle broke"}),
    );
    fail.pass_result = false;
    let steps = vec![
        Step::new("diag.add", json!({})),
        fail,
        Step::new("diag.add", json!({})),
        Step::new("diag.add", json!({})),
        cleanup,
    ];
    env.publish(&chained("cf", "diag.add", json!({}), &steps))
        .await;
    let ids = ["cf", "cf.1", "cf.2", "cf.3", "cf.4", "cf.5"];
    let got = until_final(&mut watch, &ids, T_LONG).await;
    assert_eq!(result_of(&got["cf.1"]), &json!({"n": 2}));
    let dead = final_event(&got["cf.2"]);
    assert_eq!(dead.state, TaskState::Dead);
    assert_eq!(dead.reason.as_deref(), Some("permanent_failure"));
    for id in ["cf.3", "cf.4"] {
        // Never ran: one `cancelled` event, naming the step that failed.
        assert_eq!(states(&got[id]), ["cancelled"], "{id}");
        let ev = final_event(&got[id]);
        assert_eq!(ev.attempt, 0);
        assert_eq!(
            ev.reason.as_deref(),
            Some("chain stopped: step 2 (cf.2, diag.fail) ended dead (permanent_failure)")
        );
        assert_eq!(ev.task_type, "diag.add");
        assert_eq!(ev.workflow_id.as_deref(), Some("cf"));
        assert_eq!(ev.parent_id.as_deref(), Some("cf.2"));
    }
    // The step marked "after": "always" runs, with the failure.
    let r = result_of(&got["cf.5"]);
    assert_eq!(r["cleanup"], json!(true));
    assert_eq!(r["previous_failure"]["task_id"], json!("cf.2"));
    assert_eq!(r["previous_failure"]["reason"], json!("permanent_failure"));
    assert_eq!(
        r["previous_failure"]["error"]["message"],
        json!("middle broke")
    );
    assert_eq!(final_event(&got["cf.5"]).parent_id.as_deref(), Some("cf.2"));
}

#[tokio::test]
async fn hostile_chain_descriptions_are_dead_invalid_and_nothing_else_is_lost() {
    let (env, mut watch) = Env::with_up_watching("wf-hostile", &[]).await;
    let too_many = format!("[{}]", vec![r#"{"type":"diag.echo"}"#; 101].join(","));
    let too_deep = format!(
        r#"[{{"type":"diag.echo","args":{{"x":{}1{}}}}}]"#,
        "[".repeat(40),
        "]".repeat(40)
    );
    let too_big = format!(
        r#"[{{"type":"diag.echo","args":{{"x":"{}"}}}}]"#,
        "y".repeat(40_000)
    );
    let cases = [
        ("h-many", too_many.as_str(), "101 steps"),
        ("h-deep", too_deep.as_str(), "nested"),
        ("h-big", too_big.as_str(), "bytes"),
        ("h-json", "[{\"type\":", "not JSON"),
        ("h-type", r#"[{"type":"no such type!"}]"#, "step 1"),
        (
            "h-cycle",
            r#"{"type":"diag.echo","then":"h-cycle"}"#,
            "array",
        ),
    ];
    for (id, chain, _) in &cases {
        env.publish(
            &TaskRequest::new("diag.echo", json!({}))
                .id(*id)
                .header_str(CHAIN, chain),
        )
        .await;
    }
    let fine = env
        .publish(&TaskRequest::new("diag.echo", json!({"still": "runs"})))
        .await;
    let mut ids: Vec<&str> = cases.iter().map(|c| c.0).collect();
    ids.push(&fine);
    let got = until_final(&mut watch, &ids, T_LONG).await;
    for (id, _, says) in &cases {
        let ev = final_event(&got[*id]);
        assert_eq!(states(&got[*id]), ["dead"], "{id}: never started");
        assert_eq!(ev.reason.as_deref(), Some("invalid"), "{id}");
        let err = ev.error.as_ref().unwrap();
        assert_eq!(err.code, "bad_workflow", "{id}");
        assert!(err.message.contains(says), "{id}: {}", err.message);
    }
    assert_eq!(result_of(&got[&fine]), &json!({"still": "runs"}));
    // Each is kept in P.dead, with its description, for inspection.
    env.wait_depth(&env.names().dead(), cases.len() as u32, T)
        .await;
}

#[tokio::test]
async fn cancelling_a_workflow_id_cancels_its_waiting_tasks() {
    let mut env = Env::new("wf-cancel", &[]).await;
    let mut watch = env.watch(&["#"]).await;
    let members: Vec<String> = (1..=3).map(|k| format!("g-{k}")).collect();
    for id in &members {
        env.publish(
            &TaskRequest::new("diag.echo", json!({}))
                .id(id)
                .header_str(WORKFLOW, "grp-cancel"),
        )
        .await;
    }
    // A chain whose first task is cancelled by its own id stops whole.
    env.publish(&chained(
        "cc",
        "diag.echo",
        json!({}),
        &[Step::new("diag.echo", json!({}))],
    ))
    .await;
    env.client.cancel("grp-cancel").await.unwrap();
    env.client.cancel("cc").await.unwrap();
    env.spawn(&["worker"], &[]);
    let mut ids = members.clone();
    ids.extend(["cc".to_owned(), "cc.1".to_owned()]);
    let got = until_final(&mut watch, &ids, T_LONG).await;
    for id in &ids {
        assert_eq!(states(&got[id]), ["cancelled"], "{id}");
    }
    assert_eq!(
        final_event(&got["cc.1"]).reason.as_deref(),
        Some("chain stopped: step 0 (cc, diag.echo) was cancelled")
    );
    assert_eq!(
        final_event(&got["g-2"]).workflow_id.as_deref(),
        Some("grp-cancel")
    );
}

#[tokio::test]
async fn a_groups_counts_per_outcome_are_queryable_from_the_api_and_the_cli() {
    let db = TestDb::postgres(None).await;
    let (mut env, api) = tracker_env("wf-group", &db, &[]).await;
    env.up(&[]);
    api.wait_ready().await;
    let mut fail = Step::new("diag.fail", json!({"kind": "permanent", "message": "no"}));
    fail.pass_result = false;
    let mut group = Group::new("grp-1");
    for k in 0..4 {
        group = group.task(TaskRequest::new("diag.echo", json!({ "k": k })));
    }
    group = group
        .task(TaskRequest::new(
            "diag.fail",
            json!({"kind": "permanent", "message": "no"}),
        ))
        .chain(
            TaskRequest::new("diag.add", json!({}))
                .id("grp-1-chain")
                .then(Step::new("diag.add", json!({}))),
        );
    let ids = env.client.publish_group(&group).await.unwrap();
    assert_eq!(ids.len(), 6);
    let done = api
        .wait_for("/api/workflows/grp-1", "the group done", |v| {
            v["done"] == json!(true) && v["total"] == json!(7)
        })
        .await;
    assert_eq!(done["counts"], json!({"succeeded": 6, "dead": 1}));
    let tasks = done["tasks"].as_array().unwrap();
    let step = tasks
        .iter()
        .find(|t| t["task_id"] == "grp-1-chain.1")
        .expect("the chain's second step is a task of the group");
    assert_eq!(step["parent_id"], json!("grp-1-chain"));
    assert_eq!(step["result"], json!({"n": 2}));
    assert!(tasks.iter().all(|t| t["workflow_id"] == json!("grp-1")));
    // The CLI reads the same from the tracker's database.
    let out = env.cli_ok(&["workflow", "status", "grp-1", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["counts"], json!({"succeeded": 6, "dead": 1}));
    let (status, _) = api.get("/api/workflows/no-such-workflow").await;
    assert_eq!(status, 404);
    env.cli_exit(&["workflow", "status", "no-such-workflow"], 1);
}

#[tokio::test]
async fn the_cli_starts_a_chain_from_json_and_follows_it() {
    let (env, mut watch) = Env::with_up_watching("wf-cli", &[]).await;
    let spec = std::env::temp_dir().join(format!("{}-chain.json", env.prefix));
    std::fs::write(
        &spec,
        r#"{"chain": [
            {"type": "diag.add", "id": "cli-c", "args": {"n": 10}},
            {"type": "diag.add", "args": {"add": 5}},
            {"type": "diag.echo"}
        ]}"#,
    )
    .unwrap();
    let out = env.cli_ok(&["workflow", "start", spec.to_str().unwrap()]);
    std::fs::remove_file(&spec).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text, "workflow cli-c\ncli-c cli-c.1 cli-c.2\n");
    let got = until_final(&mut watch, &["cli-c", "cli-c.1", "cli-c.2"], T_LONG).await;
    assert_eq!(result_of(&got["cli-c.2"]), &json!({"previous": {"n": 16}}));
    // Its state, from the tracker's database, once every task is recorded.
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let out = env
            .warren(&["workflow", "status", "cli-c", "--json"])
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if out.status.code() == Some(0) && v["counts"] == json!({"succeeded": 3}) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "workflow status never showed 3 succeeded: {v}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // A chain over its bounds is refused before anything is sent.
    let steps: Vec<String> = (0..102)
        .map(|_| r#"{"type":"diag.echo"}"#.to_owned())
        .collect();
    let spec = std::env::temp_dir().join(format!("{}-long.json", env.prefix));
    std::fs::write(&spec, format!(r#"{{"chain": [{}]}}"#, steps.join(","))).unwrap();
    let err = env.cli_err(&["workflow", "start", spec.to_str().unwrap()]);
    std::fs::remove_file(&spec).unwrap();
    assert!(err.contains("101 steps"), "{err}");
}

#[tokio::test]
async fn a_chain_published_with_python_pika_runs_to_its_end() {
    let (env, mut watch) = Env::with_up_watching("wf-pika", &[]).await;
    let tasks = env.names().tasks();
    // Nothing of Warren's library: the chain is JSON text in a string header.
    let chain =
        r#"[{"type": "diag.add", "args": {"add": 10}}, {"type": "diag.add", "id": "py-last"}]"#;
    pika(&[
        "--exchange",
        &tasks,
        "--routing-key",
        "diag.add",
        "--body",
        r#"{"n": 1}"#,
        "--message-id",
        "py-chain",
        "--header",
        &format!("x-warren-chain={chain}"),
    ]);
    let got = until_final(&mut watch, &["py-chain", "py-chain.1", "py-last"], T_LONG).await;
    assert_eq!(result_of(&got["py-chain"]), &json!({"n": 2}));
    assert_eq!(result_of(&got["py-chain.1"]), &json!({"n": 12}));
    assert_eq!(result_of(&got["py-last"]), &json!({"n": 13}));
    let last = final_event(&got["py-last"]);
    assert_eq!(last.workflow_id.as_deref(), Some("py-chain"));
    assert_eq!(last.parent_id.as_deref(), Some("py-chain.1"));
}

#[tokio::test]
async fn a_step_that_expires_in_its_queue_stops_its_chain_from_the_scheduler() {
    let mut env = Env::new("wf-expired", &[]).await;
    let mut watch = env.watch(&["#"]).await;
    // No worker: the first task expires in its queue, and the scheduler
    // parks it dead `expired` from the dead-letter intake.
    env.publish(
        &chained(
            "ce",
            "diag.echo",
            json!({}),
            &[Step::new("diag.echo", json!({}))],
        )
        .expiration_ms(1),
    )
    .await;
    env.spawn(&["scheduler"], &[]);
    let got = until_final(&mut watch, &["ce", "ce.1"], T_LONG).await;
    let dead = final_event(&got["ce"]);
    assert_eq!(dead.reason.as_deref(), Some("expired"));
    assert_eq!(dead.workflow_id.as_deref(), Some("ce"));
    assert_eq!(
        final_event(&got["ce.1"]).reason.as_deref(),
        Some("chain stopped: step 0 (ce, diag.echo) ended dead (expired)")
    );
}
