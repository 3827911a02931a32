//! Hostile messages, published from Python as an attacker with only publish
//! rights would: each ends in exactly one place with exactly one final
//! event, and valid tasks published behind them still run.

use std::collections::HashMap;

use serde_json::json;
use warren_client::ReceivedEvent;
use warren_core::headers::{get_int, get_str, HEADERS_DROPPED};
use warren_core::TaskState;
use warren_e2e::{final_event, pika, until_final, Env, T_LONG};

/// Publishes one message with pika to `exchange` under `routing_key`.
fn publish(exchange: &str, routing_key: &str, body: &str, id: &str, extra: &[&str]) {
    let mut args = vec![
        "--exchange",
        exchange,
        "--routing-key",
        routing_key,
        "--body",
        body,
        "--message-id",
        id,
    ];
    args.extend_from_slice(extra);
    pika(&args);
}

/// Publishes `n` valid `diag.echo` tasks `<prefix>-<i>`; returns their ids.
fn valid_behind(exchange: &str, prefix: &str, n: usize) -> Vec<String> {
    let ids: Vec<String> = (1..=n).map(|i| format!("{prefix}-{i}")).collect();
    for id in &ids {
        publish(exchange, "diag.echo", r#"{"valid": true}"#, id, &[]);
    }
    ids
}

/// Every final event of each task among `events`.
fn finals(events: &HashMap<String, Vec<ReceivedEvent>>, id: &str) -> usize {
    events[id]
        .iter()
        .filter(|e| e.event.state.is_final())
        .count()
}

/// Checks that each of `ids` succeeded, with one final event.
fn all_succeeded(got: &HashMap<String, Vec<ReceivedEvent>>, ids: &[String]) {
    for id in ids {
        assert_eq!(final_event(&got[id]).state, TaskState::Succeeded, "{id}");
        assert_eq!(finals(got, id), 1, "{id}");
    }
}

#[tokio::test]
async fn headers_too_large_or_deep_are_parked_once_and_the_queue_keeps_moving() {
    let (env, mut watch) = Env::with_up_watching("hostile-hdr", &[]).await;
    let (tasks, delay) = (env.names().tasks(), env.names().delay());
    // 100 KiB in one value: over the header limit, under the broker's frame.
    publish(
        &tasks,
        "diag.echo",
        "{}",
        "big-value",
        &["--header-bytes", "pad=102400"],
    );
    // As deep as RabbitMQ's 128 KiB frame allows, and deep but small.
    publish(
        &tasks,
        "diag.echo",
        "{}",
        "deepest",
        &["--nested-header", "n=18000"],
    );
    publish(
        &tasks,
        "diag.echo",
        "{}",
        "deep",
        &["--nested-header", "n=40"],
    );
    // The same through P.delay: the scheduler parks it.
    publish(
        &delay,
        "diag.echo",
        "{}",
        "big-delayed",
        &["--header", "x-delay=50", "--header-bytes", "pad=102400"],
    );
    // 2,000 small headers (about 24 KiB) are within the limits: the task runs.
    publish(
        &tasks,
        "diag.echo",
        r#"{"many": true}"#,
        "many",
        &["--many-headers", "2000"],
    );
    let behind = valid_behind(&tasks, "behind", 20);

    let parked = [
        ("big-value", "headers_too_large"),
        ("deepest", "headers_too_large"),
        ("deep", "headers_too_deep"),
        ("big-delayed", "headers_too_large"),
    ];
    let mut ids: Vec<String> = parked.iter().map(|(id, _)| id.to_string()).collect();
    ids.push("many".into());
    ids.extend(behind.iter().cloned());
    let got = until_final(&mut watch, &ids, T_LONG).await;

    all_succeeded(&got, &behind);
    let many = final_event(&got["many"]);
    assert_eq!(many.state, TaskState::Succeeded);
    assert_eq!(many.result, Some(json!({"many": true})));
    for (id, code) in parked {
        let ev = final_event(&got[id]);
        assert_eq!(ev.state, TaskState::Dead, "{id}");
        assert_eq!(ev.reason.as_deref(), Some("invalid"), "{id}");
        assert_eq!(ev.error.as_ref().unwrap().code, code, "{id}");
        assert_eq!(got[id].len(), 1, "{id}: only the dead event");
    }
    // Exactly one copy of each in P.dead, body kept, headers left behind.
    env.wait_depth(&env.names().dead(), 4, T_LONG).await;
    let dead = env.drain(&env.names().dead()).await;
    assert_eq!(dead.len(), 4);
    for (p, body) in &dead {
        let h = p.headers().clone().unwrap();
        assert_eq!(body, b"{}");
        assert_eq!(
            get_str(Some(&h), "x-warren-dead-reason").as_deref(),
            Some("invalid")
        );
        assert!(get_int(Some(&h), HEADERS_DROPPED).unwrap().unwrap() > 200);
        assert!(h.inner().get("pad").is_none() && h.inner().get("n").is_none());
    }
    assert_eq!(env.depth(&env.names().work_queue("diag")).await, 0);
}

/// The header the scheduler keeps a task's own `expiration` in, forged by a
/// producer: a value over 255 bytes panicked the release, leaving the task
/// unacknowledged in the scheduler for good; one that is not a number made
/// the broker close the channel on every try.
#[tokio::test]
async fn a_forged_saved_expiration_is_ignored_and_the_delayed_task_runs() {
    let (env, mut watch) = Env::with_up_watching("hostile-exp", &[]).await;
    let delay = env.names().delay();
    publish(
        &delay,
        "diag.echo",
        "{}",
        "exp-long",
        &[
            "--header",
            "x-delay=50",
            "--header-bytes",
            "x-warren-original-expiration=300",
        ],
    );
    publish(
        &delay,
        "diag.echo",
        "{}",
        "exp-text",
        &[
            "--header",
            "x-delay=50",
            "--header",
            "x-warren-original-expiration=soon",
        ],
    );
    let mut ids = vec!["exp-long".to_string(), "exp-text".to_string()];
    for i in 1..=5 {
        let id = format!("behind-{i}");
        publish(&delay, "diag.echo", "{}", &id, &["--header", "x-delay=50"]);
        ids.push(id);
    }
    let got = until_final(&mut watch, &ids, T_LONG).await;
    all_succeeded(&got, &ids);
}

#[tokio::test]
async fn a_task_type_too_long_to_route_its_events_is_parked_with_one_dead_event() {
    let (env, mut watch) = Env::with_up_watching("hostile-type", &[]).await;
    let tasks = env.names().tasks();
    // 255 bytes, AMQP's limit for a routing key: `succeeded.<type>` would not fit.
    let long_type = format!("diag.{}", "x".repeat(250));
    publish(&tasks, &long_type, "{}", "long-type", &[]);
    let behind = valid_behind(&tasks, "behind", 5);
    let mut ids = vec!["long-type".to_owned()];
    ids.extend(behind.iter().cloned());
    let got = until_final(&mut watch, &ids, T_LONG).await;

    all_succeeded(&got, &behind);
    let events = &got["long-type"];
    assert_eq!(events.len(), 1, "only the dead event");
    let ev = &events[0];
    assert_eq!(ev.event.state, TaskState::Dead);
    assert_eq!(ev.event.task_type, long_type, "the body names the type");
    assert_eq!(ev.routing_key, "dead._type_too_long");
    assert_eq!(ev.event.reason.as_deref(), Some("invalid"));
    assert_eq!(ev.event.error.as_ref().unwrap().code, "type_too_long");
    env.wait_depth(&env.names().dead(), 1, T_LONG).await;
    assert_eq!(env.depth(&env.names().work_queue("diag")).await, 0);
}

#[tokio::test]
async fn echo_fails_permanently_on_arguments_that_are_not_an_object() {
    let (env, mut watch) = Env::with_up_watching("hostile-args", &[]).await;
    let tasks = env.names().tasks();
    let bodies = [
        ("array", "[1,2,3]"),
        ("string", r#""a string""#),
        ("number", "42"),
        ("null", "null"),
        ("bool", "true"),
    ];
    for (id, body) in bodies {
        publish(&tasks, "diag.echo", body, id, &[]);
    }
    let behind = valid_behind(&tasks, "behind", 5);
    let mut ids: Vec<String> = bodies.iter().map(|(id, _)| id.to_string()).collect();
    ids.extend(behind.iter().cloned());
    let got = until_final(&mut watch, &ids, T_LONG).await;

    all_succeeded(&got, &behind);
    for (id, _) in bodies {
        let states: Vec<_> = got[id].iter().map(|e| e.event.state).collect();
        assert_eq!(
            states,
            [TaskState::Started, TaskState::Failed, TaskState::Dead],
            "{id}"
        );
        let ev = final_event(&got[id]);
        assert_eq!(ev.reason.as_deref(), Some("permanent_failure"), "{id}");
        let err = ev.error.as_ref().unwrap();
        assert_eq!(err.code, "invalid_args", "{id}");
        assert!(
            err.message.contains("must be a JSON object"),
            "{id}: {}",
            err.message
        );
    }
    env.wait_depth(&env.names().dead(), bodies.len() as u32, T_LONG)
        .await;
}
