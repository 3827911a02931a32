//! Other clients than Warren's own: Python pika and the management console's
//! "Publish message" form (the HTTP API).

use serde_json::json;
use warren_core::TaskState;
use warren_e2e::{final_event, pika, states, until_final, Env, Mgmt, T};

#[tokio::test]
async fn a_task_published_with_python_pika_runs_and_its_events_arrive() {
    let (env, mut watch) = Env::with_up_watching("pika", &[]).await;
    let tasks = env.names().tasks();
    pika(&[
        "--exchange",
        &tasks,
        "--routing-key",
        "diag.echo",
        "--body",
        r#"{"from": "python"}"#,
        "--message-id",
        "py-1",
        "--priority",
        "5",
        "--header",
        "x-warren-max-retries=2",
    ]);
    let got = until_final(&mut watch, &["py-1"], T).await;
    assert_eq!(states(&got["py-1"]), ["started", "succeeded"]);
    assert_eq!(
        final_event(&got["py-1"]).result,
        Some(json!({"from": "python"}))
    );
}

#[tokio::test]
async fn pika_call_through_direct_reply_to_gets_the_final_event() {
    let env = Env::with_up("pika-reply", &[]).await;
    let tasks = env.names().tasks();
    let out = pika(&[
        "--exchange",
        &tasks,
        "--routing-key",
        "diag.echo",
        "--body",
        r#"{"n": 42}"#,
        "--message-id",
        "py-2",
        "--reply-to",
        "amq.rabbitmq.reply-to",
        "--wait-reply-timeout",
        "30",
    ]);
    let line = String::from_utf8_lossy(&out.stdout);
    let ev = warren_core::Event::from_json(line.trim().as_bytes()).expect("reply is an event");
    assert_eq!(ev.state, TaskState::Succeeded);
    assert_eq!(ev.task_id, "py-2");
    assert_eq!(ev.result, Some(json!({"n": 42})));
}

#[tokio::test]
async fn a_task_published_from_the_management_console_runs() {
    let (env, mut watch) = Env::with_up_watching("console", &[]).await;
    let routed = Mgmt::new()
        .publish(
            &env.names().tasks(),
            "diag.echo",
            r#"{"from": "console"}"#,
            json!({"content_type": "application/json", "message_id": "console-1", "delivery_mode": 2}),
        )
        .await;
    assert!(routed);
    let got = until_final(&mut watch, &["console-1"], T).await;
    assert_eq!(
        final_event(&got["console-1"]).result,
        Some(json!({"from": "console"}))
    );
    // The form's defaults (no properties at all) work too: the id is assigned.
    let routed = Mgmt::new()
        .publish(&env.names().tasks(), "diag.echo", "{}", json!({}))
        .await;
    assert!(routed);
    let ev = watch
        .next(T)
        .await
        .unwrap()
        .expect("events for the id-less task");
    assert_eq!(ev.event.task_type, "diag.echo");
}
