//! Worker and scheduler `/metrics`, `/healthz` and `/readyz` against the real
//! broker: values checked after a known batch, readiness across a lost
//! connection.

use std::time::Duration;

use serde_json::{json, Value};
use warren_client::TaskRequest;
use warren_e2e::{
    free_port, http_get as get, metric, until_final, wait_metric, CommandExt, Env, Mgmt, T,
};

/// Every sample line is `series value` with a number for value, and every
/// family has HELP and TYPE.
fn assert_parses(text: &str) {
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            assert!(
                rest.starts_with("HELP ") || rest.starts_with("TYPE "),
                "{line}"
            );
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("series and value");
        assert!(value.parse::<f64>().is_ok(), "not a number: {line}");
        let name = series.split('{').next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|f| text.contains(&format!("# TYPE {f} histogram")))
            .unwrap_or(name);
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "no TYPE for {family}"
        );
    }
}

/// Polls `/readyz` until it answers 200 (bounded); returns its JSON.
async fn wait_ready(addr: &str) -> Value {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let (status, body) = get(addr, "/readyz").await;
        if status == 200 {
            return serde_json::from_str(&body).expect("JSON");
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "not ready within {T:?}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn worker_and_scheduler_metrics_count_a_known_batch() {
    let mut env = Env::new("ops-batch", &[]).await;
    let worker = env.spawn(&["worker", "--queues", "diag"], &[]);
    let scheduler = env.spawn(&["scheduler"], &[]);
    let w = env.ops_addr(&worker, "worker", T).await;
    let s = env.ops_addr(&scheduler, "scheduler", T).await;
    for addr in [&w, &s] {
        assert_eq!(get(addr, "/healthz").await, (200, "ok\n".to_owned()));
        let ready = wait_ready(addr).await;
        assert_eq!(ready["ready"], true, "{ready}");
        assert_eq!(ready["checks"]["broker"], true, "{ready}");
        assert_eq!(ready["checks"]["cancels"], true, "{ready}");
    }

    // The image's HEALTHCHECK command, against both processes.
    for (component, key, addr, flag) in [
        ("worker", "WARREN__WORKER__LISTEN", &w, "--ready"),
        (
            "scheduler",
            "WARREN__SCHEDULER__LISTEN",
            &s,
            "--timeout-ms=2000",
        ),
    ] {
        env.warren(&["health", component, flag])
            .env(key, addr)
            .succeeds();
    }

    let mut watch = env.watch(&["#"]).await;
    let mut reqs: Vec<TaskRequest> = (0..10)
        .map(|i| TaskRequest::new("diag.echo", json!({"i": i})))
        .collect();
    reqs.extend((0..3).map(|i| {
        TaskRequest::new(
            "diag.fail",
            json!({"kind": "permanent", "message": format!("bad {i}")}),
        )
    }));
    reqs.extend((0..2).map(|i| TaskRequest::new("diag.echo", json!({"late": i})).delay_ms(300)));
    // Over a second: through release tier 1, which the broker empties.
    reqs.push(TaskRequest::new("diag.echo", json!({"later": 1})).delay_ms(1500));
    // Routed to the diag queue by `diag.*`, but no handler: dead invalid.
    reqs.push(TaskRequest::new("diag.nothing", json!({})));
    let ids = env.client.publish_batch(&reqs, 64, |_| {}).await.unwrap();
    until_final(&mut watch, &ids, T).await;

    let text = wait_metric(
        &w,
        "warren_worker_tasks_total{type=\"diag.echo\",outcome=\"succeeded\"}",
        13.0,
        T,
    )
    .await;
    assert_parses(&text);
    let m = |series: &str| metric(&text, series).unwrap_or_else(|| panic!("{series} in\n{text}"));
    assert_eq!(
        m("warren_worker_tasks_total{type=\"diag.echo\",outcome=\"succeeded\"}"),
        13.0
    );
    assert_eq!(
        m("warren_worker_tasks_total{type=\"diag.fail\",outcome=\"dead\"}"),
        3.0
    );
    assert_eq!(
        m("warren_worker_dead_total{type=\"diag.fail\",reason=\"permanent_failure\"}"),
        3.0
    );
    assert_eq!(
        m("warren_worker_dead_total{type=\"_unregistered\",reason=\"invalid\"}"),
        1.0
    );
    assert_eq!(
        m("warren_worker_task_duration_seconds_count{type=\"diag.echo\",result=\"succeeded\"}"),
        13.0
    );
    assert_eq!(
        m("warren_worker_task_duration_seconds_bucket{type=\"diag.echo\",result=\"succeeded\",le=\"+Inf\"}"),
        13.0
    );
    assert_eq!(
        m("warren_worker_task_duration_seconds_count{type=\"diag.fail\",result=\"failed\"}"),
        3.0
    );
    // Every delayed task's start, measured against its due time.
    assert_eq!(m("warren_worker_delay_lateness_seconds_count"), 3.0);
    assert_eq!(m("warren_worker_retries_total"), 0.0);
    assert_eq!(m("warren_worker_tasks_running"), 0.0);
    assert_eq!(m("warren_worker_concurrency"), 8.0);
    assert_eq!(m("warren_worker_up"), 1.0);
    assert_eq!(m("warren_worker_reconnects_total"), 0.0);

    let text = wait_metric(&s, "warren_scheduler_released_total", 2.0, T).await;
    assert_parses(&text);
    let m = |series: &str| metric(&text, series).unwrap_or_else(|| panic!("{series} in\n{text}"));
    assert_eq!(m("warren_scheduler_delayed_total"), 3.0);
    assert_eq!(m("warren_scheduler_released_total"), 2.0);
    assert_eq!(m("warren_scheduler_release_lateness_seconds_count"), 2.0);
    assert_eq!(
        m("warren_scheduler_release_lateness_seconds_bucket{le=\"+Inf\"}"),
        2.0
    );
    assert_eq!(m("warren_scheduler_release_tier_total"), 1.0);
    assert_eq!(m("warren_scheduler_held_tasks"), 0.0);
    assert_eq!(m("warren_scheduler_cron_leader"), 0.0);
    assert_eq!(m("warren_scheduler_up"), 1.0);
}

#[tokio::test]
async fn a_force_closed_connection_is_counted_and_readiness_returns() {
    let mut env = Env::new("ops-reconnect", &[]).await;
    let worker = env.spawn(&["worker", "--queues", "diag"], &[]);
    let w = env.ops_addr(&worker, "worker", T).await;
    wait_ready(&w).await;
    let mgmt = Mgmt::new();
    // The worker's connection is named "warren worker <host>/<pid>".
    let suffix = format!("/{}", worker.pid);
    let first = mgmt.wait_connection("worker", &suffix, &[], T).await;
    mgmt.close_connection(&first).await;
    let text = wait_metric(&w, "warren_worker_reconnects_total", 1.0, T).await;
    assert_eq!(metric(&text, "warren_worker_reconnects_total"), Some(1.0));
    let ready = wait_ready(&w).await;
    assert_eq!(ready["checks"]["broker"], true, "{ready}");
    // Tasks run on the new connection.
    let mut watch = env.watch(&["#"]).await;
    let ids = env
        .client
        .publish_batch(&[TaskRequest::new("diag.echo", json!({}))], 8, |_| {})
        .await
        .unwrap();
    until_final(&mut watch, &ids, T).await;
    wait_metric(
        &w,
        "warren_worker_tasks_total{type=\"diag.echo\",outcome=\"succeeded\"}",
        1.0,
        T,
    )
    .await;
}

#[tokio::test]
async fn health_fails_in_one_line_when_nothing_answers() {
    let addr = format!("127.0.0.1:{}", free_port());
    let env = Env::new("ops-health", &[]).await;
    let out = env
        .warren(&["health", "tracker"])
        .env("WARREN__TRACKER__LISTEN", &addr)
        .exits_with(1);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains(&addr), "{err}");
}

#[tokio::test]
async fn a_taken_metrics_address_is_a_one_line_error_naming_the_key() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = held.local_addr().unwrap().to_string();
    let env = Env::new("ops-taken", &[]).await;
    let err = env
        .warren(&["worker", "--queues", "diag"])
        .env("WARREN__WORKER__LISTEN", &taken)
        .fails();
    let last = err.lines().last().unwrap_or_default();
    assert!(last.contains("worker.listen"), "{err}");
    assert!(last.contains(&taken), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[tokio::test]
async fn json_logs_carry_task_id_type_and_attempt_on_a_tasks_lines() {
    let mut env = Env::new("ops-logs", &[]).await;
    let worker = env.spawn(&["--log-format", "json", "worker", "--queues", "diag"], &[]);
    let w = env.ops_addr(&worker, "worker", T).await;
    wait_ready(&w).await;
    let mut watch = env.watch(&["#"]).await;
    let reqs = [
        TaskRequest::new("diag.echo", json!({"n": 1})).id("log-ok"),
        TaskRequest::new("diag.fail", json!({"kind": "permanent", "message": "no"})).id("log-bad"),
    ];
    let ids = env.client.publish_batch(&reqs, 8, |_| {}).await.unwrap();
    until_final(&mut watch, &ids, T).await;
    wait_metric(
        &w,
        "warren_worker_dead_total{type=\"diag.fail\",reason=\"permanent_failure\"}",
        1.0,
        T,
    )
    .await;
    let log = env.log_of(&worker);
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let of_task = |id: &str| -> Vec<&Value> {
        lines
            .iter()
            .filter(|l| l["span"]["task_id"] == id)
            .collect()
    };
    for (id, task_type, message) in [
        ("log-ok", "diag.echo", "succeeded"),
        ("log-bad", "diag.fail", "failed: no"),
    ] {
        let task_lines = of_task(id);
        assert!(
            task_lines.iter().any(|l| l["fields"]["message"] == message),
            "no {message:?} line for {id} in\n{log}"
        );
        for l in task_lines {
            assert_eq!(l["span"]["type"], task_type, "{l}");
            assert_eq!(l["span"]["attempt"], 1, "{l}");
        }
    }
}
