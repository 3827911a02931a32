//! The dashboard acts (issue 16 item 4): an operator logged in to the
//! dashboard cancels a queued task and pauses and resumes a work queue by
//! clicking, each after the page's confirmation dialog; the tracker sends
//! the same control records as the CLI and records who did what. The task
//! actions of the API are refused to a read credential. Through the real
//! broker, tracker and worker; headless Chromium over the DevTools protocol.

#[path = "cdp.rs"]
mod cdp;
#[path = "tracker_support.rs"]
mod support;

use cdp::{Browser, ALICE_PW, RITA_PW, USERS};
use serde_json::{json, Value};
use support::{tracker_env, TestDb};
use warren_client::TaskRequest;
use warren_e2e::TRACKER_READ_TOKEN;

/// The newest recorded action, from `GET /api/actions` of `actions`.
fn newest(actions: &Value) -> &Value {
    &actions["actions"][0]
}

/// A queued task, cancelled from the waiting list (after dismissing the
/// dialog once, which does nothing), ends `cancelled` once a worker sees
/// it; the cancel is recorded with alice as its author, in the API and on
/// the page; the other task runs; the state filter shows the cancelled one.
#[tokio::test]
async fn cancel_a_queued_task_by_clicking_recorded_with_the_user() {
    let db = TestDb::postgres(None).await;
    let (mut env, api) = tracker_env("dact-cancel", &db, USERS).await;
    // Only the tracker runs: the tasks wait in their queue.
    let _tracker = env.spawn(&["tracker"], &[]);
    api.wait_ready().await;
    for id in ["dact-doomed", "dact-kept"] {
        env.publish(&TaskRequest::new("diag.echo", json!({"id": id})).id(id))
            .await;
        api.wait_for(&format!("/api/tasks/{id}"), "the task queued", |v| {
            v["task"]["state"] == "queued"
        })
        .await;
    }

    let mut b = Browser::launch(&env.prefix, 1400, 1400).await;
    b.log_in(&api.base, "alice", ALICE_PW).await;
    let cancel = "tr[data-waiting=\"dact-doomed\"] button.act-cancel";
    b.wait_for(
        "both tasks in the waiting list, with their buttons",
        &format!(
            "document.querySelector('{cancel}') && \
             document.querySelector('tr[data-waiting=\"dact-kept\"] button.act-run-now')"
        ),
    )
    .await;

    // Dismissed: nothing is sent, nothing recorded.
    b.eval(&format!("document.querySelector('{cancel}').click(); true"))
        .await;
    b.wait_for(
        "the confirmation dialog, naming the task",
        "document.getElementById('confirm-dialog').open && \
         document.getElementById('confirm-text').textContent.includes('dact-doomed')",
    )
    .await;
    b.eval("document.getElementById('confirm-cancel').click(); true")
        .await;
    b.wait_for(
        "the dialog closed",
        "!document.getElementById('confirm-dialog').open",
    )
    .await;
    assert_eq!(api.ok("/api/actions").await["actions"], json!([]));

    // Confirmed: sent and recorded.
    b.click_and_confirm(cancel).await;
    b.wait_for(
        "the cancel reported",
        "document.getElementById('action-message').textContent === 'cancel dact-doomed: sent'",
    )
    .await;
    let actions = api.ok("/api/actions").await;
    let a = newest(&actions);
    assert_eq!(a["actor"], "alice", "{actions}");
    assert_eq!(a["role"], "admin");
    assert_eq!(a["via"], "session");
    assert_eq!(a["action"], "cancel");
    assert_eq!(a["target"], "dact-doomed");
    assert_eq!(a["outcome"], "sent");
    assert_eq!(a["ok"], true);
    assert!(a["at"].as_str().is_some_and(|t| t.ends_with('Z')), "{a}");
    b.wait_for(
        "the cancel in the page's actions list, by alice",
        "document.querySelector('#actions tr[data-target=\"dact-doomed\"] .actor')?.textContent === 'alice'",
    )
    .await;

    // A new priority for the other one, typed into the dialog.
    b.eval(
        "document.querySelector('tr[data-waiting=\"dact-kept\"] button.act-priority').click(); true",
    )
    .await;
    b.wait_for(
        "the priority dialog",
        "document.getElementById('confirm-dialog').open && !document.getElementById('confirm-priority-label').hidden",
    )
    .await;
    b.eval(
        "document.getElementById('confirm-priority').value = '7'; \
         document.getElementById('confirm-ok').click(); true",
    )
    .await;
    b.wait_for(
        "the priority change reported",
        "document.getElementById('action-message').textContent === 'priority 7 for dact-kept: sent'",
    )
    .await;
    let kept = api.ok("/api/actions?target=dact-kept").await;
    assert_eq!(newest(&kept)["action"], "priority", "{kept}");
    assert_eq!(newest(&kept)["detail"], json!({"priority": 7}));
    assert_eq!(newest(&kept)["actor"], "alice");

    // A worker takes both: the cancelled one ends cancelled, the other runs.
    let _worker = env.spawn(&["worker"], &[]);
    let doomed = api
        .wait_for("/api/tasks/dact-doomed", "the task cancelled", |v| {
            v["task"]["state"] == "cancelled"
        })
        .await;
    assert!(
        doomed["events"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["state"] != "started" && e["state"] != "succeeded"),
        "the cancelled task never ran: {doomed}"
    );
    api.wait_for("/api/tasks/dact-kept", "the other task run", |v| {
        v["task"]["state"] == "succeeded"
    })
    .await;

    // The list follows without a reload: the cancelled task leaves the
    // waiting list; the state filter shows it with no buttons.
    b.wait_for(
        "the cancelled task gone from the waiting list",
        "!document.querySelector('tr[data-waiting=\"dact-doomed\"]')",
    )
    .await;
    b.eval(
        "const s = document.getElementById('filter-state'); s.value = 'cancelled'; \
         s.dispatchEvent(new Event('change')); true",
    )
    .await;
    b.wait_for(
        "the cancelled task under the cancelled filter",
        "document.querySelector('tr[data-waiting=\"dact-doomed\"][data-state=\"cancelled\"]') && \
         !document.querySelector('tr[data-waiting=\"dact-kept\"]')",
    )
    .await;
    assert_eq!(
        b.eval("document.querySelectorAll('tr[data-waiting=\"dact-doomed\"] button').length")
            .await,
        0
    );

    // Cancelling it again through the API is refused, and recorded so.
    let (status, v) = api.post("/api/tasks/dact-doomed/cancel", &json!({})).await;
    assert_eq!(status, 409, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("ended cancelled"),
        "{v}"
    );
    let actions = api.ok("/api/actions?target=dact-doomed").await;
    assert_eq!(actions["actions"].as_array().unwrap().len(), 2, "{actions}");
    assert_eq!(newest(&actions)["ok"], false);
    assert_eq!(newest(&actions)["actor"], "e2e-admin");
    assert_eq!(newest(&actions)["via"], "token");
}

/// alice pauses the diag work queue by clicking its Pause button and
/// confirming: the fleet reads the pause (the tracker's `/api/paused`, the
/// paused mark on the page), then she resumes it the same way; both are
/// recorded. rita (read) sees no Pause button.
#[tokio::test]
async fn pause_and_resume_a_queue_by_clicking() {
    let db = TestDb::sqlite("dact-pause");
    let (mut env, api) = tracker_env("dact-pause", &db, USERS).await;
    env.up(&[]);
    api.wait_ready().await;
    let diag = env.names().work_queue("diag");
    let row = format!("#queues tr[data-queue=\"{diag}\"]");

    let mut b = Browser::launch(&format!("{}-rita", env.prefix), 1400, 1200).await;
    b.log_in(&api.base, "rita", RITA_PW).await;
    b.wait_for(
        "the diag queue",
        &format!("document.querySelector('{row}')"),
    )
    .await;
    assert_eq!(
        b.eval(&format!(
            "document.querySelectorAll('{row} button.pause').length"
        ))
        .await,
        0
    );
    drop(b);

    let mut b = Browser::launch(&format!("{}-alice", env.prefix), 1400, 1200).await;
    b.log_in(&api.base, "alice", ALICE_PW).await;
    // Work queues come before the internal ones.
    b.wait_for(
        "the queues, grouped",
        "document.querySelector('#queues tr.group') && document.querySelector('#queues tbody tr[data-queue]')",
    )
    .await;
    let order = b
        .eval(
            "[...document.querySelectorAll('#queues tbody tr')].map((r) => r.classList.contains('group') ? 'group' : r.cells[1].textContent)",
        )
        .await;
    let order: Vec<&str> = order
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let group = order.iter().position(|k| *k == "group").unwrap();
    assert!(
        order[..group].iter().all(|k| *k == "work")
            && order[group + 1..].iter().all(|k| *k != "work")
            && group > 0,
        "work queues first: {order:?}"
    );

    b.click_and_confirm(&format!("{row} button.pause[data-name=\"diag\"]"))
        .await;
    api.wait_for("/api/paused", "the pause read by the tracker", |v| {
        v["paused"].as_array().is_some_and(|p| {
            p.iter()
                .any(|p| p["kind"] == "queue" && p["name"] == "diag")
        })
    })
    .await;
    b.wait_for(
        "the queue marked paused, with a Resume button",
        &format!(
            "document.querySelector('{row} .paused') && \
             document.querySelector('{row} button.pause')?.textContent === 'Resume'"
        ),
    )
    .await;

    b.click_and_confirm(&format!("{row} button.pause[data-name=\"diag\"]"))
        .await;
    api.wait_for("/api/paused", "the resume read by the tracker", |v| {
        v["paused"].as_array().is_some_and(|p| p.is_empty())
    })
    .await;
    b.wait_for(
        "the queue no longer marked paused",
        &format!(
            "!document.querySelector('{row} .paused') && \
             document.querySelector('{row} button.pause')?.textContent === 'Pause'"
        ),
    )
    .await;

    let actions = api.ok("/api/actions?target=queue:diag").await;
    let list = actions["actions"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{actions}");
    assert_eq!(list[0]["action"], "resume");
    assert_eq!(list[1]["action"], "pause");
    for a in list {
        assert_eq!(a["actor"], "alice");
        assert_eq!(a["ok"], true);
        assert_eq!(a["detail"], json!({"kind": "queue", "name": "diag"}));
    }
}

/// Changing a task's priority or running it now through the API: refused
/// (and not recorded) without a credential or with a read one; refused
/// with its reason for an unknown task, a bad priority, or a task that
/// has ended; sent and recorded for a waiting task with the admin token,
/// after which the task runs.
#[tokio::test]
async fn change_priority_and_run_now_need_an_admin() {
    let db = TestDb::sqlite("dact-api");
    let (mut env, api) = tracker_env("dact-api", &db, &[]).await;
    let _tracker = env.spawn(&["tracker"], &[]);
    api.wait_ready().await;
    let id = env
        .publish(
            &TaskRequest::new("diag.echo", json!({"n": 1}))
                .id("dact-wait")
                .priority(1),
        )
        .await;
    api.wait_for(&format!("/api/tasks/{id}"), "the task queued", |v| {
        v["task"]["state"] == "queued"
    })
    .await;

    let read = api.with_token(Some(TRACKER_READ_TOKEN));
    let anonymous = api.with_token(None);
    for (path, body) in [
        ("/api/tasks/dact-wait/priority", json!({"priority": 9})),
        ("/api/tasks/dact-wait/run-now", json!({})),
        ("/api/tasks/dact-wait/cancel", json!({})),
    ] {
        let (status, v) = read.post(path, &body).await;
        assert_eq!(status, 403, "read token on {path}: {v}");
        assert!(v["error"].as_str().unwrap().contains("read role"), "{v}");
        let (status, _) = anonymous.post(path, &body).await;
        assert_eq!(status, 401, "no credential on {path}");
    }
    assert_eq!(
        api.ok("/api/actions").await["actions"],
        json!([]),
        "a refused credential records nothing"
    );

    // Bad requests: a priority out of range, an unknown task.
    let (status, v) = api
        .post("/api/tasks/dact-wait/priority", &json!({"priority": 300}))
        .await;
    assert_eq!(status, 400, "{v}");
    let (status, v) = api.post("/api/tasks/ghost/run-now", &json!({})).await;
    assert_eq!(status, 404, "{v}");

    // The admin token: both changes sent, and recorded.
    let (status, v) = api
        .post("/api/tasks/dact-wait/priority", &json!({"priority": 9}))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["sent"], true);
    assert_eq!(v["action"]["by"], "e2e-admin");
    let (status, v) = api.post("/api/tasks/dact-wait/run-now", &json!({})).await;
    assert_eq!(status, 200, "{v}");
    let actions = api.ok("/api/actions?target=dact-wait").await;
    let list = actions["actions"].as_array().unwrap();
    let verbs: Vec<&str> = list.iter().map(|a| a["action"].as_str().unwrap()).collect();
    assert_eq!(verbs, ["run_now", "priority"], "{actions}");
    assert_eq!(list[1]["detail"], json!({"priority": 9}));
    assert!(list
        .iter()
        .all(|a| a["actor"] == "e2e-admin" && a["ok"] == true));
    // The unknown task was refused and recorded so.
    let ghost = api.ok("/api/actions?target=ghost").await;
    assert_eq!(ghost["actions"][0]["ok"], false, "{ghost}");

    // A worker runs it; a change after its end is refused with its state.
    let _worker = env.spawn(&["worker"], &[]);
    api.wait_for(&format!("/api/tasks/{id}"), "the task run", |v| {
        v["task"]["state"] == "succeeded"
    })
    .await;
    let (status, v) = api
        .post("/api/tasks/dact-wait/priority", &json!({"priority": 3}))
        .await;
    assert_eq!(status, 409, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("has ended succeeded"),
        "{v}"
    );
}
