//! Immediate tasks end to end: events, reply_to, routing, priorities, expiry.

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use serde_json::json;
use warren_client::TaskRequest;
use warren_core::TaskState;
use warren_e2e::{final_event, states, until_final, Env, T};

#[tokio::test]
async fn echo_emits_started_then_succeeded_with_every_contract_field() {
    let (env, mut watch) = Env::with_up_watching("echo", &[]).await;
    let id = env
        .publish(&TaskRequest::new("diag.echo", json!({"hello": "world"})).id("echo-1"))
        .await;
    assert_eq!(id, "echo-1");
    let got = until_final(&mut watch, &[&id], T).await;
    let events = &got[&id];
    assert_eq!(states(events), ["started", "succeeded"]);
    let done = &events[1];
    assert_eq!(done.routing_key, "succeeded.diag.echo");
    assert_eq!(done.event.result, Some(json!({"hello": "world"})));
    assert_eq!(done.event.queue.as_deref(), Some("diag"));
    assert_eq!(done.event.attempt, 1);
    assert!(done.event.duration_ms.is_some());
    assert!(done.event.worker.as_deref().unwrap().contains('/'));
    let p = &done.properties;
    assert_eq!(
        p.message_id().as_ref().unwrap().as_str(),
        done.event.event_id
    );
    assert_eq!(p.correlation_id().as_ref().unwrap().as_str(), "echo-1");
    assert_eq!(
        p.content_type().as_ref().unwrap().as_str(),
        "application/json"
    );
    assert_ne!(events[0].event.event_id, done.event.event_id);
}

#[tokio::test]
async fn call_through_direct_reply_to_returns_the_final_event() {
    let env = Env::with_up("call", &[]).await;
    let ev = env
        .call(&TaskRequest::new("diag.echo", json!({"n": [1, 2, 3]})), T)
        .await;
    assert_eq!(ev.state, TaskState::Succeeded);
    assert_eq!(ev.result, Some(json!({"n": [1, 2, 3]})));
    let ev = env
        .call(
            &TaskRequest::new("diag.fail", json!({"kind": "permanent", "message": "nope"})),
            T,
        )
        .await;
    assert_eq!(ev.state, TaskState::Dead);
    assert_eq!(ev.reason.as_deref(), Some("permanent_failure"));
}

#[tokio::test]
async fn reply_to_a_named_queue_carries_the_producers_correlation_id() {
    let env = Env::with_up("named-reply", &[]).await;
    let reply_queue = format!("{}.replies", env.prefix);
    let (_conn, ch) = env.open_channel().await;
    ch.queue_declare(
        reply_queue.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut replies = ch
        .basic_consume(
            reply_queue.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id("named-1".into())
        .with_reply_to(reply_queue.as_str().into())
        .with_correlation_id("my-corr".into());
    env.publish_raw(&env.names().tasks(), "diag.echo", b"{\"x\":1}", props)
        .await;
    let d = tokio::time::timeout(T, replies.next())
        .await
        .expect("a reply within the timeout")
        .unwrap()
        .unwrap();
    assert_eq!(
        d.properties.correlation_id().as_ref().unwrap().as_str(),
        "my-corr"
    );
    let ev = warren_core::Event::from_json(&d.data).unwrap();
    assert_eq!(ev.state, TaskState::Succeeded);
    assert_eq!(ev.task_id, "named-1");
    assert_eq!(ev.result, Some(json!({"x": 1})));
}

#[tokio::test]
async fn an_unrouted_type_is_parked_in_unroutable_never_dropped() {
    let env = Env::new("unroutable", &[]).await;
    env.publish(&TaskRequest::new("nobody.handles.this", json!({})))
        .await;
    env.wait_depth(&env.names().unroutable(), 1, T).await;
    let msgs = env.drain(&env.names().unroutable()).await;
    assert_eq!(msgs.len(), 1);
}

#[tokio::test]
async fn a_task_without_message_id_gets_one_that_every_event_reports() {
    let (env, mut watch) = Env::with_up_watching("no-id", &[]).await;
    let props = BasicProperties::default().with_content_type("application/json".into());
    env.publish_raw(&env.names().tasks(), "diag.echo", b"{\"n\":1}", props)
        .await;
    let first = watch.next(T).await.unwrap().expect("an event");
    let id = first.event.task_id.clone();
    assert!(
        uuid::Uuid::parse_str(&id).is_ok(),
        "assigned id {id} is a UUID"
    );
    let got = until_final(&mut watch, &[&id], T).await;
    assert!(got[&id].iter().all(|e| e.event.task_id == id));
}

#[tokio::test]
async fn higher_priority_runs_first_with_concurrency_one() {
    let mut env = Env::new(
        "priority",
        &[
            ("WARREN__WORKER__CONCURRENCY", "1"),
            ("WARREN__WORKER__PREFETCH", "1"),
        ],
    )
    .await;
    // Queue everything before any worker runs, so order is the broker's choice.
    let mut reqs = Vec::new();
    for (i, p) in [0u8, 9, 3, 9, 0, 5, 1, 7].into_iter().enumerate() {
        reqs.push(
            TaskRequest::new("diag.echo", json!({"p": p}))
                .id(format!("p{i}"))
                .priority(p),
        );
    }
    env.client.publish_batch(&reqs, 16, |_| {}).await.unwrap();
    env.wait_depth(&env.names().work_queue("diag"), 8, T).await;
    let mut watch = env.watch(&["started.#"]).await;
    env.spawn(&["worker", "--queues", "diag"], &[]);
    let mut order = Vec::new();
    while order.len() < 8 {
        let e = watch.next(T).await.unwrap().expect("started events");
        order.push(e.event.task_id);
    }
    let prio = |id: &String| {
        reqs.iter()
            .find(|r| r.id.as_ref() == Some(id))
            .unwrap()
            .priority
            .unwrap()
    };
    let seen: Vec<u8> = order.iter().map(prio).collect();
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(seen, sorted, "tasks started in priority order");
}

#[tokio::test]
async fn a_batch_arrives_in_request_order_and_a_bad_request_sends_none_of_it() {
    let env = Env::new("batch", &[]).await;
    let work = env.names().work_queue("diag");
    let echo = |i: usize| TaskRequest::new("diag.echo", json!({ "i": i }));
    // A bad request at the end of a batch is refused before any is sent.
    let mut bad: Vec<TaskRequest> = (0..100).map(echo).collect();
    bad.push(TaskRequest::new("not a type", json!({})));
    let err = env
        .client
        .publish_batch(&bad, 16, |_| {})
        .await
        .unwrap_err();
    assert!(err.to_string().contains("task type"), "{err}");
    // Sends and confirms pipelined 64 deep keep the request order.
    let reqs: Vec<TaskRequest> = (0..500).map(echo).collect();
    let mut confirmed = 0;
    let ids = env
        .client
        .publish_batch(&reqs, 64, |n| confirmed = n)
        .await
        .unwrap();
    assert_eq!(confirmed, 500);
    assert_eq!(env.depth(&work).await, 500, "confirmed means queued");
    let got = env.drain(&work).await;
    let got_ids: Vec<String> = got
        .iter()
        .map(|(p, _)| p.message_id().as_ref().expect("id").to_string())
        .collect();
    assert_eq!(got_ids, ids, "queued in request order");
    for (i, (_, body)) in got.iter().enumerate() {
        let args: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(args, json!({ "i": i }));
    }
}

#[tokio::test]
async fn a_task_that_expires_in_its_queue_ends_dead_expired() {
    let mut env = Env::new("expiry", &[]).await;
    // Only the scheduler runs: no worker takes the task before it expires.
    env.spawn(&["scheduler"], &[]);
    let mut watch = env.watch(&["dead.#"]).await;
    env.publish(
        &TaskRequest::new("diag.echo", json!({}))
            .id("exp-1")
            .expiration_ms(50),
    )
    .await;
    let got = until_final(&mut watch, &["exp-1"], T).await;
    let ev = final_event(&got["exp-1"]);
    assert_eq!(ev.reason.as_deref(), Some("expired"));
    assert_eq!(ev.attempt, 0);
    assert_eq!(ev.queue.as_deref(), Some("diag"));
    let dead = env.drain(&env.names().dead()).await;
    assert_eq!(dead.len(), 1);
    let h = dead[0].0.headers().clone().unwrap();
    assert_eq!(
        warren_core::headers::get_str(Some(&h), "x-warren-dead-reason").as_deref(),
        Some("expired")
    );
    assert!(
        dead[0].0.expiration().is_none(),
        "a parked task does not expire again"
    );
}

#[tokio::test]
async fn a_forged_type_property_is_overwritten_and_charset_parameters_are_ignored() {
    let (env, mut watch) = Env::with_up_watching("forged", &[]).await;
    let props = BasicProperties::default()
        .with_content_type("Application/JSON; charset=utf-8".into())
        .with_message_id("forged-1".into())
        .with_type("something.else".into());
    env.publish_raw(&env.names().tasks(), "diag.echo", b"{\"a\":1}", props)
        .await;
    let got = until_final(&mut watch, &["forged-1"], T).await;
    let ev = final_event(&got["forged-1"]);
    assert_eq!(ev.state, TaskState::Succeeded);
    assert_eq!(ev.task_type, "diag.echo", "the routing key is the type");
    assert_eq!(got["forged-1"][1].routing_key, "succeeded.diag.echo");
}

#[tokio::test]
async fn a_large_result_is_truncated_and_says_so() {
    let env = Env::with_up(
        "big-result",
        &[
            ("WARREN__LIMITS__MAX_RESULT_BYTES", "200"),
            ("WARREN__HTTP__MAX_RESPONSE_BYTES", "100"),
        ],
    )
    .await;
    let ev = env
        .call(
            &TaskRequest::new("diag.echo", json!({"pad": "x".repeat(5000)})),
            T,
        )
        .await;
    let result = ev.result.unwrap();
    assert_eq!(result["truncated"], true);
    assert!(result["bytes"].as_u64().unwrap() > 5000);
    assert!(result["preview"]
        .as_str()
        .unwrap()
        .starts_with("{\"pad\":\"xxx"));
}

#[tokio::test]
async fn with_a_default_queue_an_unrouted_type_goes_there() {
    let env = Env::new("default-queue", &[]).await;
    let cfg = env.config_file(
        "[[queues]]\nname = \"diag\"\n\n[[queues]]\nname = \"main\"\ndefault = true\n\n\
         [[routes]]\npattern = \"diag.*\"\nqueue = \"diag\"\n",
    );
    env.cli_ok(&["--config", &cfg, "topology", "apply"]);
    env.publish(&TaskRequest::new("report.monthly", json!({})))
        .await;
    env.wait_depth(&env.names().work_queue("main"), 1, T).await;
    assert_eq!(env.depth(&env.names().unroutable()).await, 0);
}

#[tokio::test]
async fn a_quorum_work_queue_runs_tasks() {
    let mut env = Env::new("quorum", &[]).await;
    let cfg = env.config_file(
        "[[queues]]\nname = \"qq\"\ntype = \"quorum\"\n\n[[routes]]\npattern = \"diag.*\"\nqueue = \"qq\"\n",
    );
    env.cli_ok(&["--config", &cfg, "topology", "apply"]);
    env.spawn(&["--config", &cfg, "worker"], &[]);
    let ev = env
        .call(&TaskRequest::new("diag.echo", json!({"q": "quorum"})), T)
        .await;
    assert_eq!(ev.state, TaskState::Succeeded);
    assert_eq!(ev.queue.as_deref(), Some("qq"));
}

#[tokio::test]
async fn tasks_waiting_behind_a_long_one_go_to_a_worker_with_a_free_slot() {
    // Two workers of one slot each; the first takes a long task and, with
    // a prefetch of 20, the short tasks queued behind it. Those are handed
    // back after worker.handback_ms and run on the second worker long
    // before the long task ends.
    let mut env = Env::new(
        "handback",
        &[
            ("WARREN__WORKER__CONCURRENCY", "1"),
            ("WARREN__WORKER__PREFETCH", "20"),
            ("WARREN__WORKER__HANDBACK_MS", "300"),
        ],
    )
    .await;
    let mut reqs = vec![TaskRequest::new("diag.sleep", json!({"ms": 8000})).id("long")];
    for i in 0..30 {
        reqs.push(TaskRequest::new("diag.sleep", json!({"ms": 20})).id(format!("short-{i}")));
    }
    env.client.publish_batch(&reqs, 32, |_| {}).await.unwrap();
    env.wait_depth(&env.names().work_queue("diag"), 31, T).await;
    let mut watch = env.watch(&["#"]).await;
    let first = env.spawn(&["worker", "--queues", "diag"], &[]);
    loop {
        let e = watch.next(T).await.unwrap().expect("the long task starts");
        if e.event.task_id == "long" && e.event.state == TaskState::Started {
            break;
        }
    }
    env.spawn(&["worker", "--queues", "diag"], &[]);
    let mut finals: Vec<(String, TaskState)> = Vec::new();
    while finals.len() < reqs.len() {
        let e = watch.next(T).await.unwrap().expect("every task ends");
        if e.event.state.is_final() {
            finals.push((e.event.task_id, e.event.state));
        }
    }
    assert!(
        finals.iter().all(|(_, s)| *s == TaskState::Succeeded),
        "{finals:?}"
    );
    let mut ids: Vec<&str> = finals.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        ids.last(),
        Some(&"long"),
        "no short task waited for it: {ids:?}"
    );
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), reqs.len(), "each task ended once");
    let addr = env.ops_addr(&first, "worker", T).await;
    let (_, text) = warren_e2e::http_get(&addr, "/metrics").await;
    let handed = warren_e2e::metric(&text, "warren_worker_handed_back_total").unwrap_or(0.0);
    assert!(handed >= 1.0, "the first worker handed tasks back: {text}");
    // Having seen an 8 s task, the first worker consumes again with only
    // what it can start within half of handback_ms: its one slot.
    let mgmt = warren_e2e::Mgmt::new();
    let work = env.names().work_queue("diag");
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let prefetches = mgmt.consumer_prefetches(&work).await;
        if prefetches.contains(&1) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no consumer of {work} with prefetch 1: {prefetches:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_worker_holding_max_held_bytes_of_bodies_stops_taking_more_and_loses_nothing() {
    // 20 tasks of 300 KiB each (diag.sleep's arguments padded with JSON
    // whitespace), 6 MiB in all, to a worker that may hold 1 MiB of them.
    let mut env = Env::new(
        "heldbytes",
        &[
            ("WARREN__WORKER__CONCURRENCY", "2"),
            ("WARREN__WORKER__PREFETCH", "50"),
            ("WARREN__WORKER__MAX_HELD_BYTES", "1048576"),
        ],
    )
    .await;
    let mut body = br#"{"ms": 20}"#.to_vec();
    body.resize(body.len() + 300 * 1024, b' ');
    let ids: Vec<String> = (0..20).map(|i| format!("big-{i}")).collect();
    for id in &ids {
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(id.as_str().into());
        env.publish_raw(&env.names().tasks(), "diag.sleep", &body, props)
            .await;
    }
    let mut watch = env.watch(&["#"]).await;
    let worker = env.spawn(&["worker", "--queues", "diag"], &[]);
    let got = until_final(&mut watch, &ids, T).await;
    for id in &ids {
        assert_eq!(
            final_event(&got[id]).state,
            TaskState::Succeeded,
            "{id}: {:?}",
            states(&got[id])
        );
    }
    let addr = env.ops_addr(&worker, "worker", T).await;
    let (_, text) = warren_e2e::http_get(&addr, "/metrics").await;
    let pauses = warren_e2e::metric(&text, r#"warren_worker_pauses_total{reason="bytes"}"#);
    assert!(
        pauses.unwrap_or(0.0) >= 1.0,
        "it stopped at the bound: {text}"
    );
}
