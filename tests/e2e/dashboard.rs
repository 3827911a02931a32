//! The tracker's dashboard in headless Chromium (Debian's `chromium`;
//! scripts/test.sh installs it): the page, after its scripts ran against a
//! real run, shows the queues, the task counts, the failures with their
//! errors, the dead letters with a replay button, and a task looked up by
//! id. A screenshot is kept as target/dashboard/dashboard.png.

#[path = "tracker_support.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;
use support::{tracker_env, TestDb};
use warren_client::TaskRequest;
use warren_e2e::{until_final, CommandExt, T};

/// The Chromium binary: `WARREN_CHROMIUM`, else `chromium` on the PATH.
fn chromium() -> PathBuf {
    if let Ok(p) = std::env::var("WARREN_CHROMIUM") {
        return PathBuf::from(p);
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        for name in ["chromium", "chromium-browser"] {
            let p = Path::new(dir).join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!("chromium not found: install Debian's chromium package (scripts/test.sh does), or set WARREN_CHROMIUM");
}

/// Runs headless Chromium on `url` with `args`, letting the page's scripts
/// run for a few seconds of virtual time; returns stdout.
fn headless(url: &str, profile: &Path, args: &[&str]) -> String {
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--no-first-run",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--virtual-time-budget=6000",
            "--window-size=1400,1700",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .succeeds();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn dashboard_shows_queues_counts_failures_dead_letters_and_a_task() {
    let db = TestDb::sqlite("dashboard");
    let (mut env, api) = tracker_env("dash", &db, &[]).await;
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
    // The management API's statistics lag a few seconds behind.
    let diag = env.names().work_queue("diag");
    api.wait_for("/api/queues", "the diag queue consumed", |v| {
        v["queues"].as_array().is_some_and(|qs| {
            qs.iter()
                .any(|q| q["name"] == diag.as_str() && q["consumers"].as_u64() >= Some(1))
        })
    })
    .await;

    let profile = std::env::temp_dir().join(format!("warren-chromium-{}", env.prefix));
    let url = format!("{}/?task=dash-ok-3", api.base);
    let dom = tokio::task::spawn_blocking({
        let (url, profile) = (url.clone(), profile.clone());
        move || headless(&url, &profile, &["--dump-dom"])
    })
    .await
    .unwrap();

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

    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    let shot = dir.join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    tokio::task::spawn_blocking({
        let (url, profile, shot) = (url.clone(), profile.clone(), shot.clone());
        move || {
            headless(
                &url,
                &profile,
                &[&format!("--screenshot={}", shot.display())],
            )
        }
    })
    .await
    .unwrap();
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    let _ = std::fs::remove_dir_all(&profile);
}
