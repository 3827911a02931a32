//! Workflows (contract section 8): chains passing results along, a failure
//! stopping a chain, hostile chain descriptions, groups and their cancel.

use serde_json::{json, Value};
use warren_client::TaskRequest;
use warren_core::workflow::{encode_chain, After, Step, CHAIN, WORKFLOW};
use warren_core::TaskState;
use warren_e2e::{final_event, result_of, states, until_final, Env, T, T_LONG};

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
