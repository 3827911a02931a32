//! The tracker's view of fleet-wide flow limits (contract section 9):
//! `GET /api/limits`, its gauges on `/metrics` and the dashboard's Limits
//! panel, against real workers holding permits of a global concurrency
//! limit with a backlog waiting; and against rate windows, tenant queues
//! and a unique lock declared by hand as the contract names them (their
//! features live on other branches), whose numbers must come out as the
//! queues say: tokens left = burst (`x-max-length-bytes`) - the markers'
//! bytes, or in a window declared without it, burst (`x-max-length`) -
//! markers.

#[path = "cdp.rs"]
mod cdp;
#[path = "tracker_support.rs"]
mod support;

use std::time::Duration;

use cdp::{Browser, RITA_PW, USERS};
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use serde_json::{json, Value};
use support::{tracker_env, Api, TestDb};
use warren_client::TaskRequest;
use warren_e2e::{metric, T};

/// The entry of `types` for `task_type`.
fn type_of<'a>(v: &'a Value, task_type: &str) -> &'a Value {
    v["types"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["type"] == task_type))
        .unwrap_or(&Value::Null)
}

/// Waits (bounded) until the tracker's `/metrics` has `series` and `check`
/// holds of its value; returns the text.
async fn wait_metric(api: &Api, series: &str, check: impl Fn(f64) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let (status, text) = api.get_text("/metrics").await;
        assert_eq!(status, 200, "{text}");
        if metric(&text, series).is_some_and(&check) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} did not come within {T:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn limits_show_permits_held_and_tasks_waiting() {
    let db = TestDb::sqlite("limits");
    let (mut env, api) = tracker_env("limits", &db, USERS).await;
    let cfg = env.config_file(
        "[flow.concurrency]\n\"diag.sleep\" = 2\n\n[worker]\nconcurrency = 4\nprefetch = 8\n",
    );
    // Two processes with workers: `warren up` (with the tracker) and one more.
    env.spawn(&["--config", &cfg, "up"], &[]);
    env.spawn(&["--config", &cfg, "worker", "--queues", "diag"], &[]);
    api.wait_ready().await;

    // Nothing held yet: the configured limit is listed with 0.
    let v = api
        .wait_for("/api/limits", "the configured limit", |v| {
            type_of(v, "diag.sleep")["concurrency_limit"] == 2
        })
        .await;
    assert!(v["error"].is_null(), "{v}");

    // A backlog: 16 sleeps of 2.5 s, 2 at a time, about 20 s in all.
    let reqs: Vec<TaskRequest> = (0..16)
        .map(|i| TaskRequest::new("diag.sleep", json!({"ms": 2500})).id(format!("lim-{i}")))
        .collect();
    env.client.publish_batch(&reqs, 16, |_| {}).await.unwrap();

    let v = api
        .wait_for("/api/limits", "2 permits held and tasks waiting", |v| {
            let t = type_of(v, "diag.sleep");
            t["permits_held"] == 2 && t["waiting"].as_i64() > Some(0)
        })
        .await;
    let t = type_of(&v, "diag.sleep");
    assert!(t["waiting"].as_i64() <= Some(14), "{v}");
    let group = &v["permits"][0];
    assert_eq!(group["type"], "diag.sleep", "{v}");
    assert!(group["key"].is_null(), "{v}");
    assert_eq!(group["limit"], 2, "{v}");
    let permits = group["permits"].as_array().unwrap();
    let mut numbers: Vec<u64> = permits
        .iter()
        .map(|p| p["permit"].as_u64().unwrap())
        .collect();
    numbers.sort();
    assert_eq!(numbers, [0, 1], "{v}");
    // The holder's connection is given only where the management API
    // reports a queue's owner (RabbitMQ 3.10's queue list does not).
    assert!(
        permits
            .iter()
            .all(|p| p["connection"].is_null() || p["connection"].is_string()),
        "{v}"
    );

    // The tracker's gauges agree.
    let series = "warren_flow_permits_held{type=\"diag.sleep\"}";
    let text = wait_metric(&api, series, |n| n == 2.0).await;
    assert_eq!(
        metric(&text, "warren_flow_concurrency_limit{type=\"diag.sleep\"}"),
        Some(2.0),
        "{text}"
    );
    wait_metric(
        &api,
        "warren_flow_tasks_waiting{type=\"diag.sleep\"}",
        |n| n > 0.0,
    )
    .await;

    // The dashboard's Limits panel shows the same.
    let mut b = Browser::launch(&env.prefix, 1400, 1200).await;
    b.log_in(&api.base, "rita", RITA_PW).await;
    let row = "#limits tr[data-limit-type=\"diag.sleep\"]";
    b.wait_for(
        "the Limits panel: limit 2, 2 permits held, tasks waiting",
        &format!(
            "(() => {{ const r = document.querySelector('{row}'); return r \
               && r.querySelector('.limit').textContent === '2' \
               && r.querySelector('.held').textContent === '2' \
               && Number(r.querySelector('.waiting').textContent) > 0 \
               && r.querySelector('.holders').textContent.includes('#0') \
               && r.querySelector('.holders').textContent.includes('#1'); }})()"
        ),
    )
    .await;
    assert_eq!(
        b.eval("document.getElementById('limits-error').hidden")
            .await,
        true
    );
    b.eval("document.getElementById('limits-section').scrollIntoView(); true")
        .await;
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("limits.png"), b.screenshot().await).unwrap();
}

/// Declares `queue` with `args` and puts `n` messages in it (each
/// expiring after 10 minutes, as a marker would).
async fn queue_with(ch: &lapin::Channel, queue: &str, args: FieldTable, durable: bool, n: usize) {
    queue_with_body(ch, queue, args, durable, n, b"marker").await
}

/// [`queue_with`], each message `body`.
async fn queue_with_body(
    ch: &lapin::Channel,
    queue: &str,
    args: FieldTable,
    durable: bool,
    n: usize,
    body: &[u8],
) {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap_or_else(|e| panic!("declare {queue}: {e}"));
    for _ in 0..n {
        ch.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_expiration("600000".into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
}

fn rate_args(burst: i32) -> FieldTable {
    let mut a = FieldTable::default();
    a.insert("x-max-length".into(), AMQPValue::LongInt(burst));
    a.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    a
}

const H1: &str = "0123456789abcdef0123456789abcdef";
const H2: &str = "fedcba9876543210fedcba9876543210";

#[tokio::test]
async fn limits_show_rate_windows_tenant_queues_and_unique_locks() {
    let db = TestDb::sqlite("limits-hand");
    let (mut env, api) = tracker_env("limits-hand", &db, USERS).await;
    env.spawn(&["tracker"], &[]);
    api.wait_ready().await;

    let p = env.prefix.clone();
    let (conn, ch) = env.open_channel().await;
    ch.confirm_select(Default::default()).await.unwrap();
    // A rate window of the type counting bytes (burst 5, one marker of 2
    // tokens), and one of a key declared without bytes (burst 3, three
    // markers: all used).
    let mut by_bytes = rate_args(5);
    by_bytes.insert("x-max-length-bytes".into(), AMQPValue::LongInt(5));
    queue_with_body(
        &ch,
        &format!("{p}.rate.api.call"),
        by_bytes,
        false,
        1,
        b"\0\0",
    )
    .await;
    queue_with(
        &ch,
        &format!("{p}.rate.api.call.{H1}"),
        rate_args(3),
        false,
        3,
    )
    .await;
    // Two tenants of the diag queue (4 and 1 tasks), and its directory.
    queue_with(
        &ch,
        &format!("{p}.q.diag.tenant.{H1}"),
        FieldTable::default(),
        true,
        4,
    )
    .await;
    queue_with(
        &ch,
        &format!("{p}.q.diag.tenant.{H2}"),
        FieldTable::default(),
        true,
        1,
    )
    .await;
    let mut stream = FieldTable::default();
    stream.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("stream".into()),
    );
    queue_with(&ch, &format!("{p}.q.diag.tenants"), stream, true, 0).await;
    // A unique lock held (its marker there) and its first-id queue.
    let mut lock = FieldTable::default();
    lock.insert("x-max-length".into(), AMQPValue::LongInt(1));
    queue_with(&ch, &format!("{p}.unique.{H2}"), lock.clone(), false, 1).await;
    queue_with(&ch, &format!("{p}.unique.{H2}.first"), lock, false, 1).await;

    // The management API's message counts lag a few seconds.
    let v = api
        .wait_for("/api/limits", "the hand-made queues counted", |v| {
            v["rate"].as_array().is_some_and(|r| r.len() == 2)
                && v["rate"][0]["used"] == 2
                && v["rate"][1]["used"] == 3
                && v["tenants"][0]["depth"] == 5
                && v["unique"]["held"] == 1
        })
        .await;
    assert_eq!(
        v["rate"],
        json!([
            {"type": "api.call", "key": null, "burst": 5, "used": 2, "tokens_left": 3},
            {"type": "api.call", "key": H1, "burst": 3, "used": 3, "tokens_left": 0},
        ])
    );
    let t = type_of(&v, "api.call");
    assert_eq!(t["rate_windows"], 2, "{v}");
    assert_eq!(t["rate_tokens_left"], 3, "the type's own window: {v}");
    assert_eq!(t["permits_held"], 0, "{v}");
    assert!(t["concurrency_limit"].is_null(), "{v}");
    assert_eq!(
        v["tenants"],
        json!([{"queue": "diag", "tenants": 2, "depth": 5,
                "top": [{"tenant": H1, "depth": 4}, {"tenant": H2, "depth": 1}]}])
    );
    assert_eq!(v["unique"], json!({"held": 1, "queues": 1}));
    assert_eq!(v["truncated"], json!([]));

    let text = wait_metric(
        &api,
        "warren_flow_rate_tokens_left{type=\"api.call\"}",
        |n| n == 3.0,
    )
    .await;
    assert_eq!(
        metric(&text, "warren_tenant_queue_depth{queue=\"diag\"}"),
        Some(5.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "warren_tenant_queues{queue=\"diag\"}"),
        Some(2.0)
    );
    assert_eq!(metric(&text, "warren_flow_unique_locks_held"), Some(1.0));
    assert!(
        !text.contains(H1) && !text.contains(H2),
        "no key in a label"
    );

    // The panel lists the windows and the tenants.
    let mut b = Browser::launch(&env.prefix, 1400, 1200).await;
    b.log_in(&api.base, "rita", RITA_PW).await;
    b.wait_for(
        "the rate windows, the tenants and the lock in the Limits panel",
        &format!(
            "(() => {{ const k = document.querySelector('#limits-rate tr[data-rate-key=\"{H1}\"]'); \
               const own = document.querySelector('#limits-rate tr[data-rate-type=\"api.call\"][data-rate-key=\"\"]'); \
               const ten = document.querySelector('#limits-tenants tr[data-tenant-queue=\"diag\"]'); \
               return k && own && ten \
               && k.querySelector('.tokens').textContent === '0' \
               && own.querySelector('.burst').textContent === '5' \
               && own.querySelector('.tokens').textContent === '3' \
               && ten.querySelector('.tenants').textContent === '2' \
               && ten.querySelector('.depth').textContent === '5' \
               && document.querySelector('#limits tr[data-limit-type=\"api.call\"] .tokens').textContent === '3' \
               && document.getElementById('limits-unique').textContent.includes('held: 1'); }})()"
        ),
    )
    .await;
    let _ = conn.close(200, "bye".into()).await;
}
