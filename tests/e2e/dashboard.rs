//! The tracker's dashboard in headless Chromium (Debian's `chromium`;
//! scripts/test.sh installs it), driven over the DevTools protocol: a user
//! logs in, the page, after its scripts ran against a real run, shows the
//! queues, the task counts, the failures with their errors, the dead letters
//! with a replay button, and a task looked up by id; Replay works through
//! the session (with its CSRF token); logging out ends the session. A
//! screenshot is kept as target/dashboard/dashboard.png. A workflow entered
//! in the Workflow panel fills in live as its chain runs, its steps in
//! order with their states, and a step's task view links back to it.

#[path = "cdp.rs"]
mod cdp;
#[path = "tracker_support.rs"]
mod support;

use std::path::PathBuf;

use cdp::{Browser, ALICE_PW, RITA_PW, USERS};
use serde_json::json;
use support::{tracker_env, Api, TestDb};
use warren_client::TaskRequest;
use warren_core::workflow::{encode_chain, Step, CHAIN};
use warren_e2e::{until_final, T, T_LONG};

/// Logs in through the login page.
async fn log_in(b: &mut Browser, api: &Api, user: &str, password: &str) {
    b.log_in(&api.base, user, password).await;
}

#[tokio::test]
async fn dashboard_shows_queues_counts_failures_dead_letters_and_a_task() {
    let db = TestDb::sqlite("dashboard");
    let (mut env, api) = tracker_env("dash", &db, USERS).await;
    env.up(&[]);
    api.wait_ready().await;

    let mut watch = env.watch(&["#"]).await;
    let mut reqs: Vec<TaskRequest> = (0..8)
        .map(|i| TaskRequest::new("diag.echo", json!({"n": i})).id(format!("dash-ok-{i}")))
        .collect();
    reqs.push(
        TaskRequest::new(
            "diag.fail",
            json!({"kind": "permanent", "message": "disk on fire"}),
        )
        .id("dash-bad"),
    );
    let ids = env.client.publish_batch(&reqs, 16, |_| {}).await.unwrap();
    until_final(&mut watch, &ids, T).await;
    api.wait_for("/api/stats", "the batch tracked", |v| {
        v["states"]["succeeded"] == 8 && v["states"]["dead"] == 1
    })
    .await;
    // The charts' data: outcomes per type, and enqueue->start waits once
    // the copies of the published tasks are read too.
    api.wait_for("/api/timeline", "the batch in the timeline", |v| {
        let buckets = v["buckets"].as_array().cloned().unwrap_or_default();
        let sum = |t: &str, s: &str| {
            buckets
                .iter()
                .map(|b| b["types"][t][s].as_u64().unwrap_or(0))
                .sum::<u64>()
        };
        sum("diag.echo", "succeeded") == 8
            && sum("diag.fail", "dead") == 1
            && buckets.iter().any(|b| b["wait_ms"]["p50"].is_u64())
    })
    .await;
    // The management API's statistics lag a few seconds behind.
    let diag = env.names().work_queue("diag");
    api.wait_for("/api/queues", "the diag queue consumed", |v| {
        v["queues"].as_array().is_some_and(|qs| {
            qs.iter()
                .any(|q| q["name"] == diag.as_str() && q["consumers"].as_u64() >= Some(1))
        })
    })
    .await;

    let mut b = Browser::launch(&env.prefix, 1400, 1700).await;
    log_in(&mut b, &api, "alice", ALICE_PW).await;
    b.goto(&format!("{}/?task=dash-ok-3", api.base)).await;
    b.wait_for(
        "the task, the counts, the queues and a dead letter",
        "document.getElementById('task-facts') && document.querySelector('tr[data-dead=\"dash-bad\"]') \
         && document.querySelector('[data-state=\"succeeded\"] b')?.textContent === '8' \
         && document.querySelectorAll('#queues tr[data-queue]').length > 1 \
         && document.getElementById('status').classList.contains('ok')",
    )
    .await;
    b.wait_for(
        "the charts drawn: throughput, failures, queue depth, latency",
        "document.querySelector('#chart-throughput polyline[data-series=\"diag.echo\"]') \
         && document.querySelector('#chart-failures polyline[data-series=\"diag.fail\"]') \
         && document.querySelector('#chart-depth polyline[data-series=\"diag\"]') \
         && document.querySelector('#chart-latency polyline[data-series=\"p99\"]')",
    )
    .await;
    let dom = b.html().await;

    // Queues, with the work queue and its consumer.
    assert!(dom.contains(&format!("data-queue=\"{diag}\"")), "{dom}");
    assert!(dom.contains(&format!("data-queue=\"{}\"", env.names().dead())));
    // Tasks per state: the counts and the chart's lines.
    assert!(
        dom.contains("data-state=\"succeeded\">succeeded <b>8</b>"),
        "{dom}"
    );
    assert!(dom.contains("data-state=\"dead\">dead <b>1</b>"), "{dom}");
    assert!(dom.contains("<polyline"), "the chart is drawn: {dom}");
    // Recent failures, with the error.
    assert!(dom.contains("<tr data-task=\"dash-bad\">"), "{dom}");
    assert!(dom.contains("diag_fail: disk on fire"), "{dom}");
    // Dead letters, with a replay button.
    assert!(dom.contains("<tr data-dead=\"dash-bad\">"), "{dom}");
    assert!(dom.contains("class=\"replay\">Replay</button>"), "{dom}");
    // The task looked up by id (the search box's ?task= link).
    assert!(
        dom.contains("<table id=\"task-facts\" data-state=\"succeeded\">"),
        "{dom}"
    );
    assert!(dom.contains("{\"n\":3}"), "the result is shown: {dom}");
    assert!(
        dom.contains("id=\"status\" class=\"pill ok\">tracking"),
        "{dom}"
    );

    // A few samples for the chart, then the screenshot.
    b.wait_for("three samples of the chart", "samples.length >= 3")
        .await;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    let png = b.screenshot().await;
    std::fs::write(dir.join("dashboard.png"), &png).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
}

/// A read-only user sees no Replay button; an admin replays a dead task
/// from the page (the request carries the session's CSRF token), then logs
/// out, after which the page's API calls are refused.
#[tokio::test]
async fn dashboard_login_replay_and_logout() {
    let db = TestDb::sqlite("dash-login");
    let (mut env, api) = tracker_env("dash-login", &db, USERS).await;
    env.up(&[]);
    api.wait_ready().await;
    let mut watch = env.watch(&["#"]).await;
    let id = env
        .publish(
            &TaskRequest::new(
                "diag.fail",
                json!({"kind": "permanent", "message": "replay me"}),
            )
            .id("dash-replay"),
        )
        .await;
    until_final(&mut watch, &[&id], T).await;
    api.wait_for("/api/dead", "the task in P.dead", |v| v["depth"] == 1)
        .await;
    let row = "tr[data-dead=\"dash-replay\"]";

    // rita (read): the dead letter is listed, without a Replay button.
    let mut b = Browser::launch(&format!("{}-rita", env.prefix), 1200, 900).await;
    log_in(&mut b, &api, "rita", RITA_PW).await;
    b.wait_for(
        "the dead letter",
        &format!("document.querySelector('{row}')"),
    )
    .await;
    assert_eq!(
        b.eval(&format!(
            "document.querySelectorAll('{row} button.replay').length"
        ))
        .await,
        0
    );
    // The session cookie is out of the page's reach (HttpOnly).
    assert_eq!(
        b.eval("document.cookie.includes('warren_session')").await,
        false
    );
    drop(b);

    // alice (admin): Replay, then the task runs (and fails) again.
    let mut b = Browser::launch(&format!("{}-alice", env.prefix), 1200, 900).await;
    log_in(&mut b, &api, "alice", ALICE_PW).await;
    b.wait_for(
        "the Replay button",
        &format!("document.querySelector('{row} button.replay')"),
    )
    .await;
    b.eval(&format!(
        "document.querySelector('{row} button.replay').click(); true"
    ))
    .await;
    // The page asks first, in its own dialog.
    b.wait_for(
        "the confirmation dialog",
        "document.getElementById('confirm-dialog').open",
    )
    .await;
    b.eval("document.getElementById('confirm-ok').click(); true")
        .await;
    b.wait_for(
        "the replay reported",
        "document.getElementById('dead-message').textContent === 'replayed dash-replay'",
    )
    .await;
    let again = api.wait_events("dash-replay", 6).await;
    assert_eq!(again["task"]["state"], "dead");
    // The replay is recorded with the user who clicked.
    let actions = api.ok("/api/actions?target=dash-replay").await;
    assert_eq!(actions["actions"][0]["actor"], "alice", "{actions}");
    assert_eq!(actions["actions"][0]["action"], "replay");
    assert_eq!(actions["actions"][0]["outcome"], "replayed 1");

    // Log out: back on the login page; the old session no longer reads.
    b.eval("document.getElementById('logout-submit').click(); true")
        .await;
    b.wait_for(
        "the login page after logging out",
        "location.pathname === '/login' && document.getElementById('login-submit')",
    )
    .await;
    assert_eq!(
        b.eval("fetch('/api/stats').then((r) => r.status)").await,
        401
    );
    b.goto(&format!("{}/", api.base)).await;
    b.wait_for(
        "the dashboard sends a logged-out browser to the login page",
        "location.pathname === '/login' && document.getElementById('login-submit')",
    )
    .await;
}

/// The Workflow panel: a workflow id entered before the workflow exists
/// shows why it is missing; once a chain of 3 `diag.add` steps is
/// published, the page's polling fills it in: the counts per state, then
/// the 3 steps in chain order, each succeeded once, with its type and its
/// parent. A step opened from the panel links back to its workflow.
#[tokio::test]
async fn dashboard_shows_a_workflows_steps_and_their_states() {
    let db = TestDb::sqlite("dash-wf");
    let (mut env, api) = tracker_env("dash-wf", &db, USERS).await;
    env.up(&[]);
    api.wait_ready().await;

    let mut b = Browser::launch(&env.prefix, 1400, 1200).await;
    log_in(&mut b, &api, "rita", RITA_PW).await;
    b.eval(
        "document.getElementById('workflow-id').value = 'dwf'; \
         document.querySelector('#workflow-search button[type=submit]').click(); true",
    )
    .await;
    b.wait_for(
        "the workflow not known yet",
        "document.getElementById('workflow-missing')?.textContent.includes('no workflow')",
    )
    .await;
    assert_eq!(
        b.eval("new URLSearchParams(location.search).get('workflow')")
            .await,
        "dwf"
    );

    // A chain of 3: n 0 +1 → 1, +2 → 3, +3 → 6.
    let mut watch = env.watch(&["#"]).await;
    let steps = [
        Step::new("diag.add", json!({"add": 2})),
        Step::new("diag.add", json!({"add": 3})),
    ];
    env.publish(
        &TaskRequest::new("diag.add", json!({"n": 0, "add": 1}))
            .id("dwf")
            .header_str(CHAIN, &encode_chain(&steps)),
    )
    .await;
    let ids = ["dwf", "dwf.1", "dwf.2"];
    until_final(&mut watch, &ids, T_LONG).await;

    // No click since: the page's polling fills the panel in.
    b.wait_for(
        "3 steps, all succeeded",
        "document.querySelectorAll('#workflow-tasks tr[data-state=\"succeeded\"]').length === 3 \
         && document.getElementById('workflow-counts').dataset.done === 'true'",
    )
    .await;
    let rows = b
        .eval(
            "[...document.querySelectorAll('#workflow-tasks tbody tr')].map((tr) => [\
               tr.dataset.step, tr.dataset.task, tr.querySelector('.type').textContent, \
               tr.querySelector('.state').textContent, tr.querySelector('.attempts').textContent, \
               tr.cells[5].textContent, tr.querySelector('a').getAttribute('href')])",
        )
        .await;
    assert_eq!(
        rows,
        json!([
            ["1", "dwf", "diag.add", "succeeded", "1", "", "?task=dwf"],
            [
                "2",
                "dwf.1",
                "diag.add",
                "succeeded",
                "1",
                "dwf",
                "?task=dwf.1"
            ],
            [
                "3",
                "dwf.2",
                "diag.add",
                "succeeded",
                "1",
                "dwf.1",
                "?task=dwf.2"
            ],
        ])
    );
    let counts = b
        .eval("[...document.querySelectorAll('#workflow-counts .count')].map((c) => c.textContent)")
        .await;
    assert_eq!(counts, json!(["total 3", "succeeded 3"]));
    assert_eq!(
        b.eval("document.getElementById('workflow-body').textContent.includes('null')")
            .await,
        false
    );
    assert_eq!(
        b.eval("document.querySelector('#workflow-counts .wf-done').textContent")
            .await,
        "done"
    );

    // A step's link opens the task, whose view names its workflow and
    // parent; closing the panel and following the task's workflow link
    // opens the workflow again.
    b.eval("document.querySelector('#workflow-tasks tr[data-task=\"dwf.2\"] a').click(); true")
        .await;
    b.wait_for(
        "the step's task view with its workflow",
        "document.getElementById('task-title').textContent === 'dwf.2' \
         && document.querySelector('#task-facts a.workflow-link')?.textContent === 'dwf'",
    )
    .await;
    let facts = b
        .eval(
            "Object.fromEntries([...document.querySelectorAll('#task-facts tr')]\
               .map((tr) => [tr.cells[0].textContent, tr.cells[1].textContent]))",
        )
        .await;
    assert_eq!(facts["workflow"], "dwf", "{facts}");
    assert_eq!(facts["parent"], "dwf.1", "{facts}");
    assert_eq!(facts["result"], "{\"n\":6}", "{facts}");
    assert_eq!(b.eval("location.search").await, "?task=dwf.2&workflow=dwf");
    b.eval("document.getElementById('workflow-close').click(); true")
        .await;
    b.wait_for(
        "the workflow panel closed",
        "!document.getElementById('workflow-tasks') && location.search === '?task=dwf.2'",
    )
    .await;
    b.eval("document.querySelector('#task-facts a.workflow-link').click(); true")
        .await;
    b.wait_for(
        "the workflow again, from the task's link",
        "document.querySelectorAll('#workflow-tasks tr[data-state=\"succeeded\"]').length === 3 \
         && document.getElementById('workflow-title').textContent === 'dwf'",
    )
    .await;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("workflow.png"), b.screenshot().await).unwrap();
}
