//! The task tracker end to end: events from `P.events` into SQLite and
//! PostgreSQL, in any order and twice, through kills; the CLI queries, the
//! JSON API, `/metrics`, and secrets kept out of logs and answers.

#[path = "tracker_support.rs"]
mod support;

use std::collections::BTreeSet;

use serde_json::{json, Value};
use support::{event, publish_event, tracker_env, TestDb};
use warren_client::TaskRequest;
use warren_core::TaskState;
use warren_e2e::{metric, until_final, CommandExt, T, TRACKER_ADMIN_TOKEN};

/// The fields that must not depend on the order events arrived in.
fn comparable(task: &Value) -> Value {
    let mut t = task.clone();
    t.as_object_mut().unwrap().remove("task_id");
    if let Some(r) = t.get_mut("result") {
        if r["task"].is_string() {
            r["task"] = json!("<id>");
        }
    }
    if let Some(e) = t.get_mut("error") {
        if e["message"].is_string() {
            e["message"] = json!("<message>");
        }
    }
    t
}

/// Tasks A and B get the same events, A shuffled and with duplicates, B in
/// order; C succeeds and then sees a late `started`. Their stored states
/// must agree, and `warren status` / `warren tasks` must read them.
async fn out_of_order_and_duplicates(db: TestDb, name: &str) {
    let (mut env, api) = tracker_env(name, &db, &[]).await;
    let tracker = env.spawn(&["tracker"], &[]);
    api.wait_ready().await;

    let t0 = chrono::Utc::now().timestamp_millis() - 60_000;
    let life = |task: &str| {
        vec![
            event(task, &format!("{task}-1"), TaskState::Started, 1, t0),
            event(task, &format!("{task}-2"), TaskState::Failed, 1, t0 + 10),
            event(task, &format!("{task}-3"), TaskState::Scheduled, 2, t0 + 10),
            event(task, &format!("{task}-4"), TaskState::Started, 2, t0 + 500),
            event(task, &format!("{task}-5"), TaskState::Failed, 2, t0 + 510),
            event(task, &format!("{task}-6"), TaskState::Dead, 2, t0 + 511),
        ]
    };
    let a = life("ooo-a");
    let b = life("ooo-b");
    // A: final first, then the rest backwards, with two events repeated.
    for i in [5, 3, 1, 4, 0, 2, 1, 5] {
        publish_event(&env, &a[i]).await;
    }
    for e in &b {
        publish_event(&env, e).await;
    }
    let c_done = event("ooo-c", "ooo-c-2", TaskState::Succeeded, 1, t0 + 100);
    let c_late = event("ooo-c", "ooo-c-1", TaskState::Started, 1, t0 + 900);
    publish_event(&env, &c_done).await;
    publish_event(&env, &c_late).await;

    let got_a = api.wait_events("ooo-a", 6).await;
    let got_b = api.wait_events("ooo-b", 6).await;
    let got_c = api.wait_events("ooo-c", 2).await;
    assert_eq!(got_a["task"]["state"], "dead", "{got_a}");
    assert_eq!(comparable(&got_a["task"]), comparable(&got_b["task"]));
    let task = &got_a["task"];
    assert_eq!(task["attempts"], 2);
    assert_eq!(task["reason"], "permanent_failure");
    assert_eq!(task["error"]["message"], "crafted failure of ooo-a");
    assert_eq!(task["worker"], "crafted/2");
    // The history is in event order whatever the arrival order.
    let history: Vec<&str> = got_a["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        history,
        ["ooo-a-1", "ooo-a-2", "ooo-a-3", "ooo-a-4", "ooo-a-5", "ooo-a-6"]
    );
    // Final state wins over the late non-final event.
    assert_eq!(got_c["task"]["state"], "succeeded", "{got_c}");
    assert_eq!(got_c["task"]["result"], json!({"task": "ooo-c"}));

    let metrics = api.get_text("/metrics").await.1;
    assert_eq!(
        metric(&metrics, "warren_tracker_events_duplicate_total"),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &metrics,
            "warren_tracker_events_ingested_total{state=\"dead\",type=\"test.crafted\"}"
        ),
        Some(2.0)
    );

    // The CLI reads the same database.
    let out = env.cli_ok(&["status", "ooo-a", "--json"]);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["task"], got_a["task"]);
    assert_eq!(status["events"].as_array().unwrap().len(), 6);
    let out = env.warren(&["status", "ooo-a"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("state     dead (permanent_failure)"),
        "{text}"
    );
    assert!(
        text.contains("crafted: crafted failure of ooo-a (no retry left)"),
        "{text}"
    );
    assert_eq!(
        text.lines().filter(|l| l.contains("  started  ")).count(),
        2,
        "{text}"
    );

    let out = env.cli_ok(&[
        "tasks",
        "--state",
        "dead",
        "--type",
        "test.crafted",
        "--since",
        "1h",
        "--json",
    ]);
    let ids: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["task_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        ids,
        BTreeSet::from(["ooo-a".to_owned(), "ooo-b".to_owned()])
    );
    let out = env.warren(&["tasks", "--since", "1s"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("0 task(s)"),
        "events are a minute old: {text}"
    );

    let err = env.cli_err(&["status", "nope"]);
    assert!(err.contains("no task \"nope\""));

    env.signal(&tracker, "TERM");
    assert_eq!(
        env.wait_exit(&tracker, T).await,
        Some(0),
        "{}",
        env.log_of(&tracker)
    );
}

#[tokio::test]
async fn sqlite_state_is_the_same_whatever_the_order_and_duplicates() {
    out_of_order_and_duplicates(TestDb::sqlite("order"), "trk-order-sqlite").await;
}

#[tokio::test]
async fn postgres_state_is_the_same_whatever_the_order_and_duplicates() {
    out_of_order_and_duplicates(TestDb::postgres(None).await, "trk-order-pg").await;
}

/// `warren up` with the tracker on PostgreSQL: a known batch, then the API
/// and `/metrics` agree with it.
#[tokio::test]
async fn postgres_tracker_in_up_counts_a_known_batch() {
    let db = TestDb::postgres(None).await;
    let (mut env, api) = tracker_env("trk-batch", &db, &[]).await;
    env.up(&[]);
    api.wait_ready().await;
    let mut watch = env.watch(&["#"]).await;
    let mut reqs: Vec<TaskRequest> = (0..20)
        .map(|i| TaskRequest::new("diag.echo", json!({"i": i})))
        .collect();
    reqs.extend((0..5).map(|i| {
        TaskRequest::new(
            "diag.fail",
            json!({"kind": "permanent", "message": format!("bad {i}")}),
        )
    }));
    let ids = env.client.publish_batch(&reqs, 64, |_| {}).await.unwrap();
    until_final(&mut watch, &ids, T).await;
    let stats = api
        .wait_for("/api/stats", "the batch tracked", |v| {
            v["states"]["succeeded"] == 20 && v["states"]["dead"] == 5
        })
        .await;
    assert_eq!(stats["tasks"], 25, "{stats}");
    let (status, metrics) = api.get_text("/metrics").await;
    assert_eq!(status, 200);
    let m =
        |series: &str| metric(&metrics, series).unwrap_or_else(|| panic!("{series} in\n{metrics}"));
    let ingested = |state: &str, t: &str| {
        m(&format!(
            "warren_tracker_events_ingested_total{{state=\"{state}\",type=\"{t}\"}}"
        ))
    };
    assert_eq!(ingested("started", "diag.echo"), 20.0);
    assert_eq!(ingested("succeeded", "diag.echo"), 20.0);
    assert_eq!(ingested("started", "diag.fail"), 5.0);
    assert_eq!(ingested("failed", "diag.fail"), 5.0);
    assert_eq!(ingested("dead", "diag.fail"), 5.0);
    assert_eq!(m("warren_tracker_tasks{state=\"succeeded\"}"), 20.0);
    assert_eq!(m("warren_tracker_tasks{state=\"dead\"}"), 5.0);
    assert_eq!(m("warren_tracker_ready"), 1.0);
    assert_eq!(m("warren_tracker_events_duplicate_total"), 0.0);
    let lag = m("warren_tracker_ingest_lag_seconds");
    assert!((0.0..30.0).contains(&lag), "lag {lag}");
    assert!(m("warren_tracker_batch_write_seconds_count") >= 1.0);
    assert!(metrics.contains("# TYPE warren_tracker_batch_write_seconds histogram"));
    // Fleet metrics, from the events of every worker and scheduler.
    assert_eq!(
        m("warren_task_duration_seconds_count{type=\"diag.echo\",outcome=\"succeeded\"}"),
        20.0
    );
    assert_eq!(
        m("warren_task_duration_seconds_bucket{type=\"diag.echo\",outcome=\"succeeded\",le=\"+Inf\"}"),
        20.0
    );
    assert_eq!(
        m("warren_tasks_dead_total{type=\"diag.fail\",reason=\"permanent_failure\"}"),
        5.0
    );

    let listed = api.ok("/api/tasks?state=dead&type=diag.fail&limit=3").await;
    assert_eq!(listed["tasks"].as_array().unwrap().len(), 3, "{listed}");
}

/// Tracker SIGKILLed while events pour in, then restarted: every published
/// event is stored exactly once.
#[tokio::test]
async fn tracker_killed_under_load_loses_no_event() {
    const TASKS: usize = 1500;
    let db = TestDb::sqlite("kill");
    let (mut env, api) = tracker_env("trk-kill", &db, &[]).await;
    let first = env.spawn(&["tracker"], &[]);
    api.wait_ready().await;

    let t0 = chrono::Utc::now().timestamp_millis();
    let mut published = 0;
    let mut killed = false;
    for i in 0..TASKS {
        let id = format!("load-{i}");
        publish_event(
            &env,
            &event(
                &id,
                &format!("{id}-s"),
                TaskState::Started,
                1,
                t0 + i as i64,
            ),
        )
        .await;
        publish_event(
            &env,
            &event(
                &id,
                &format!("{id}-d"),
                TaskState::Succeeded,
                1,
                t0 + i as i64 + 1,
            ),
        )
        .await;
        published += 2;
        if !killed && i >= TASKS / 3 {
            // Mid-load, once some batches have committed.
            api.wait_for("/api/stats", "some tasks stored", |v| {
                v["tasks"].as_i64() > Some(0)
            })
            .await;
            env.kill(&first, T).await;
            killed = true;
            env.spawn(&["tracker"], &[]);
        }
    }
    assert!(killed);
    api.wait_ready().await;
    let stats = api
        .wait_for("/api/stats", "every task tracked", |v| {
            v["states"]["succeeded"].as_u64() == Some(TASKS as u64)
        })
        .await;
    assert_eq!(stats["tasks"].as_u64(), Some(TASKS as u64), "{stats}");
    // Every event stored exactly once: the events counts add up.
    let out = env.cli_ok(&["tasks", "--json", "--limit", "100000"]);
    let rows: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), TASKS);
    let stored: i64 = rows.iter().map(|r| r["events"].as_i64().unwrap()).sum();
    assert_eq!(stored, published);
    assert!(rows
        .iter()
        .all(|r| r["state"] == "succeeded" && r["events"] == 2));
    // Nothing is left unacknowledged on the tracker queue.
    let queue = format!("{}.tracker.events", env.prefix);
    env.wait_depth(&queue, 0, T).await;
}

/// The JSON API over a real run: one task, listings, failures, queues,
/// dead letters and their replay, health, and errors for bad requests.
#[tokio::test]
async fn api_answers_task_queue_and_dead_letter_queries() {
    let db = TestDb::sqlite("api");
    let (mut env, api) = tracker_env("trk-api", &db, &[]).await;
    env.up(&[]);
    api.wait_ready().await;
    let mut watch = env.watch(&["#"]).await;
    let ok = env
        .publish(&TaskRequest::new("diag.echo", json!({"hi": 1})).id("api-ok"))
        .await;
    let bad = env
        .publish(
            &TaskRequest::new(
                "diag.fail",
                json!({"kind": "permanent", "message": "api says no"}),
            )
            .id("api-bad"),
        )
        .await;
    until_final(&mut watch, &[&ok, &bad], T).await;

    let got = api.wait_events("api-bad", 3).await;
    let states: Vec<&str> = got["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["state"].as_str().unwrap())
        .filter(|s| *s != "queued")
        .collect();
    assert_eq!(states, ["started", "failed", "dead"]);
    assert_eq!(got["task"]["state"], "dead");
    assert_eq!(got["task"]["queue"], "diag");
    assert_eq!(got["task"]["error"]["message"], "api says no");
    let got = api.wait_events("api-ok", 2).await;
    assert_eq!(got["task"]["result"], json!({"hi": 1}));
    assert!(got["task"]["finished_at"].is_string());

    let listed = api.ok("/api/tasks?state=dead&type=diag.fail").await;
    let ids: Vec<&str> = listed["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["task_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["api-bad"]);
    let listed = api.ok("/api/tasks?limit=1").await;
    assert_eq!(listed["tasks"].as_array().unwrap().len(), 1);
    let failures = api.ok("/api/failures").await;
    assert_eq!(failures["tasks"][0]["task_id"], "api-bad");

    // The management API refreshes its statistics every few seconds.
    let diag_name = env.names().work_queue("diag");
    let queues = api
        .wait_for("/api/queues", "a consumer on the diag queue", |v| {
            v["queues"].as_array().is_some_and(|qs| {
                qs.iter()
                    .any(|q| q["name"] == diag_name.as_str() && q["consumers"].as_u64() >= Some(1))
            })
        })
        .await;
    let by_name = |n: String| {
        queues["queues"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["name"] == n.as_str())
            .cloned()
            .unwrap_or_else(|| panic!("{n} in {queues}"))
    };
    let diag = by_name(env.names().work_queue("diag"));
    assert_eq!(diag["kind"], "work");
    assert_eq!(diag["short"], "diag");
    assert_eq!(
        by_name(format!("{}.tracker.events", env.prefix))["kind"],
        "tracker"
    );
    assert_eq!(by_name(env.names().dead())["kind"], "dead");

    let dead = api.ok("/api/dead").await;
    assert_eq!(dead["depth"], 1, "{dead}");
    assert_eq!(dead["tasks"][0]["id"], "api-bad");
    assert_eq!(dead["tasks"][0]["reason"], "permanent_failure");

    // Replay: the task runs again (and fails again), which the tracker sees.
    let (status, replayed) = api
        .post("/api/dead/replay", &json!({"ids": ["api-bad", "ghost"]}))
        .await;
    assert_eq!(status, 200, "{replayed}");
    assert_eq!(replayed["replayed"], 1);
    assert_eq!(replayed["not_found"], json!(["ghost"]));
    let again = api.wait_events("api-bad", 6).await;
    assert_eq!(again["task"]["state"], "dead");

    let (status, _) = api.post("/api/dead/replay", &json!({})).await;
    assert_eq!(status, 400);
    let (status, body) = api.get("/api/tasks/never-seen").await;
    assert_eq!(status, 404);
    assert!(body["error"].as_str().unwrap().contains("never-seen"));
    let (status, body) = api.get("/api/tasks?since=someday").await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("15m"));
    assert_eq!(api.get_text("/healthz").await, (200, "ok\n".to_owned()));
    assert_eq!(api.ok("/readyz").await["ready"], true);
    let (status, page) = api.get_text("/").await;
    assert_eq!(status, 200);
    assert!(page.contains("<script src=\"app.js\">"));
}

/// Old tasks go after `tracker.retention_ms`, pruned in the background
/// (every tenth of the retention, at least a second); recent ones stay.
#[tokio::test]
async fn retention_prunes_old_tasks_in_the_background() {
    let db = TestDb::sqlite("retention");
    let (mut env, api) = tracker_env(
        "trk-prune",
        &db,
        &[("WARREN__TRACKER__RETENTION_MS", "20000")],
    )
    .await;
    env.spawn(&["tracker"], &[]);
    api.wait_ready().await;
    let now = chrono::Utc::now().timestamp_millis();
    publish_event(
        &env,
        &event("old-1", "old-1-a", TaskState::Succeeded, 1, now - 3_600_000),
    )
    .await;
    publish_event(
        &env,
        &event("new-1", "new-1-a", TaskState::Succeeded, 1, now),
    )
    .await;
    api.wait_events("new-1", 1).await;
    api.wait_for("/api/stats", "the old task pruned", |v| v["tasks"] == 1)
        .await;
    let (status, _) = api.get("/api/tasks/old-1").await;
    assert_eq!(status, 404);
    let metrics = api.get_text("/metrics").await.1;
    assert_eq!(
        metric(&metrics, "warren_tracker_tasks_pruned_total"),
        Some(1.0)
    );
    assert_eq!(
        api.ok("/api/tasks/new-1").await["task"]["state"],
        "succeeded"
    );
}

/// Deletes a RabbitMQ user when dropped.
struct BrokerUser {
    mgmt: String,
    name: String,
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        let url = format!("{}/api/users/{}", self.mgmt, self.name);
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let _ = reqwest::Client::new()
                    .delete(url)
                    .basic_auth("guest", Some("guest"))
                    .send()
                    .await;
            });
        })
        .join();
    }
}

/// Secrets in the broker, management and database URLs reach no log line
/// and no API answer.
#[tokio::test]
async fn secrets_stay_out_of_logs_and_answers() {
    const AMQP_SECRET: &str = "amqp-s3cret-pw";
    const PG_SECRET: &str = "pg-s3cret-pw";
    let user = format!(
        "wt-tracker-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mgmt = reqwest::Client::new();
    let base = std::env::var("WARREN__BROKER__MANAGEMENT_URL")
        .unwrap_or_else(|_| "http://127.0.0.1:15672".to_owned());
    let r = mgmt
        .put(format!("{base}/api/users/{user}"))
        .basic_auth("guest", Some("guest"))
        .json(&json!({"password": AMQP_SECRET, "tags": "monitoring"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "create user: {}", r.status());
    let _user = BrokerUser {
        mgmt: base.clone(),
        name: user.clone(),
    };
    let r = mgmt
        .put(format!("{base}/api/permissions/%2F/{user}"))
        .basic_auth("guest", Some("guest"))
        .json(&json!({"configure": ".*", "write": ".*", "read": ".*"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "set permissions: {}", r.status());

    let db = TestDb::postgres(Some(PG_SECRET)).await;
    let broker_url = format!("amqp://{user}:{AMQP_SECRET}@127.0.0.1:5672/%2f");
    let mgmt_url = base.replacen("://", &format!("://{user}:{AMQP_SECRET}@"), 1);
    {
        let (mut env, api) = tracker_env(
            "trk-secret",
            &db,
            &[
                ("WARREN__BROKER__URL", &broker_url),
                ("WARREN__BROKER__MANAGEMENT_URL", &mgmt_url),
            ],
        )
        .await;
        let up = env.up(&[(
            "WARREN_LOG",
            "debug,lapin=info,sqlx=debug,hyper=info,reqwest=debug",
        )]);
        api.wait_ready().await;
        let id = env
            .publish(&TaskRequest::new("diag.echo", json!({"x": 1})))
            .await;
        api.wait_events(&id, 2).await;
        let mut answers = String::new();
        for path in [
            "/api/queues",
            "/metrics",
            "/api/tasks",
            "/api/stats",
            "/readyz",
        ] {
            let (status, text) = api.get_text(path).await;
            assert_eq!(status, 200, "{path}: {text}");
            answers.push_str(&text);
        }
        assert!(
            answers.contains(&env.names().work_queue("diag")),
            "queues listed with the URL's credentials"
        );
        // A second tracker on the same port fails, naming the address, not the secrets.
        let second = env.spawn(&["tracker"], &[]);
        assert_eq!(env.wait_exit(&second, T).await, Some(1));
        let second_log = env.log_of(&second);
        assert!(
            second_log.contains("cannot listen on tracker.listen"),
            "{second_log}"
        );
        // A status query against an unreachable database names it, without its password.
        let stderr = env
            .warren(&["status", "x"])
            .env(
                "WARREN__TRACKER__DATABASE_URL",
                format!("postgres://root:{PG_SECRET}@127.0.0.1:1/nowhere"),
            )
            .fails();
        assert!(
            stderr.contains("postgres://root:***@127.0.0.1:1/nowhere"),
            "{stderr}"
        );
        env.signal(&up, "TERM");
        env.wait_exit(&up, T).await;
        let logs = format!("{}{second_log}{stderr}{answers}", env.log_of(&up));
        for secret in [AMQP_SECRET, PG_SECRET, TRACKER_ADMIN_TOKEN] {
            assert!(!logs.contains(secret), "{secret} leaked:\n{logs}");
        }
        assert!(env.log_of(&up).contains("tracker database open"));
    }
}
