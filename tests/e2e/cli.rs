//! The `warren` command as a user meets it: help, errors, publish, topology.

use warren_e2e::{warren_bin, CommandExt, Env};

fn run(args: &[&str], vars: &[(&str, &str)]) -> (i32, String, String) {
    let mut c = std::process::Command::new(warren_bin());
    c.args(args);
    for (k, v) in vars {
        c.env(k, v);
    }
    let out = c.output().expect("run warren");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_lists_every_command() {
    let (code, out, _) = run(&["--help"], &[]);
    assert_eq!(code, 0);
    for cmd in ["up", "worker", "scheduler", "topology", "publish"] {
        assert!(out.contains(cmd), "help mentions {cmd}: {out}");
    }
}

#[test]
fn bad_input_is_one_line_and_non_zero_never_a_panic() {
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec!["publish", "diag.echo", "{oops"],
            vec![],
            "not valid JSON",
        ),
        (
            vec!["--config", "/nonexistent.toml", "topology", "show"],
            vec![],
            "/nonexistent.toml",
        ),
        (
            vec!["topology", "show"],
            vec![("WARREN__WORKER__CONCURRENCY", "abc")],
            "worker.concurrency",
        ),
        (
            vec!["topology", "show"],
            vec![("WARREN__WORKER__PREFETCH", "0")],
            "worker.prefetch",
        ),
        (
            vec!["publish", "diag.echo", "{}"],
            vec![
                ("WARREN__BROKER__URL", "amqp://guest:secret@127.0.0.1:1/%2f"),
                ("WARREN__BROKER__CONNECT_TIMEOUT_MS", "300"),
            ],
            "127.0.0.1:1",
        ),
    ];
    for (args, vars, needle) in cases {
        let (code, _, err) = run(&args, &vars);
        assert_ne!(code, 0, "{args:?} fails");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
        assert_eq!(lines.len(), 1, "{args:?}: one error line: {err}");
        assert!(lines[0].contains(needle), "{args:?}: {err}");
        assert!(!err.contains("secret"), "password never printed: {err}");
    }
}

#[test]
fn topology_show_prints_the_plan_without_a_broker() {
    let (code, out, err) = run(
        &["topology", "show"],
        &[
            ("WARREN__PREFIX", "acme"),
            ("WARREN__BROKER__URL", "amqp://127.0.0.1:1/%2f"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    for name in [
        "acme.tasks",
        "acme.delay",
        "acme.events",
        "acme.control",
        "acme.unroutable",
        "acme.dead",
        "acme.q.diag",
    ] {
        assert!(out.contains(name), "plan shows {name}: {out}");
    }
}

#[tokio::test]
async fn topology_apply_is_idempotent_and_conflicts_name_the_fix() {
    let env = Env::new("topo", &[]).await;
    // Re-applying the same topology succeeds.
    env.cli_ok(&["topology", "apply"]);
    let cfg = env.config_file(
        "[[queues]]\nname = \"diag\"\nmax_priority = 5\n\n[[routes]]\npattern = \"diag.*\"\nqueue = \"diag\"\n",
    );
    let err = env.cli_err(&["--config", &cfg, "topology", "apply"]);
    assert!(err.contains(&env.names().work_queue("diag")), "{err}");
    assert!(err.contains("x-max-priority"), "{err}");
    assert!(err.contains("max_priority = 10"), "names the fix: {err}");
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error")).count(),
        1,
        "{err}"
    );
}

#[tokio::test]
async fn publish_wait_prints_the_final_event_and_count_shows_progress() {
    let env = Env::with_up("cli-publish", &[]).await;
    let out = env.cli_ok(&[
        "publish",
        "diag.echo",
        r#"{"a":1}"#,
        "--wait",
        "--timeout-ms",
        "30000",
    ]);
    let ev = warren_core::Event::from_json(String::from_utf8_lossy(&out.stdout).trim().as_bytes())
        .unwrap();
    assert_eq!(ev.result, Some(serde_json::json!({"a": 1})));
    let out = env.cli_ok(&[
        "publish",
        "diag.sleep",
        r#"{"ms":1}"#,
        "--count",
        "200",
        "--wait",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("all 200 tasks finished"), "{err}");
    // A dead task exits 1.
    env.cli_exit(
        &["publish", "diag.fail", r#"{"kind":"permanent"}"#, "--wait"],
        1,
    );
}

/// `warren status --json` until `done` holds for it (the management API
/// refreshes its figures every few seconds), bounded by `timeout`.
async fn status_until(
    env: &Env,
    timeout: std::time::Duration,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let out = env.cli_ok(&["status", "--json"]);
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("status --json prints one JSON object");
        if done(&v) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "warren status never showed {what}: {v}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn status_without_an_id_shows_queue_depths_and_workers() {
    let mut env = Env::new("cli-status", &[]).await;
    // No worker consumes `io`: its tasks wait there.
    for _ in 0..3 {
        env.publish(&warren_client::TaskRequest::new(
            "http.request",
            serde_json::json!({}),
        ))
        .await;
    }
    env.wait_depth(
        &env.names().work_queue("io"),
        3,
        std::time::Duration::from_secs(10),
    )
    .await;
    let io_ready = |v: &serde_json::Value| {
        v["queues"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|q| q["name"] == "io")
            .and_then(|q| q["ready"].as_u64())
    };
    status_until(
        &env,
        std::time::Duration::from_secs(30),
        "io with 3 ready",
        |v| io_ready(v) == Some(3),
    )
    .await;
    let out = env.cli_ok(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let io_line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some("io"))
        .unwrap_or_else(|| panic!("a line for queue io: {text}"));
    let cols: Vec<&str> = io_line.split_whitespace().collect();
    assert_eq!(cols[1], "3", "io has 3 ready: {text}");
    assert!(text.contains("failures  tracker not reachable"), "{text}");

    // A worker on `diag` shows as alive, by its connection name; `io` keeps its tasks.
    env.spawn(&["worker", "--queues", "diag"], &[]);
    // The API lists a consumer a moment before its channel's details.
    let v = status_until(&env, std::time::Duration::from_secs(30), "a worker", |v| {
        v["workers"][0]["connection"]
            .as_str()
            .is_some_and(|c| c != "unknown")
    })
    .await;
    let worker = &v["workers"][0];
    assert!(
        worker["connection"]
            .as_str()
            .is_some_and(|c| c.starts_with("warren worker")),
        "{v}"
    );
    assert_eq!(worker["queues"], serde_json::json!(["diag"]), "{v}");
    assert_eq!(io_ready(&v), Some(3), "{v}");
}

#[tokio::test]
async fn status_without_an_id_names_an_unreachable_management_api() {
    let env = Env::new("cli-status-mgmt", &[]).await;
    let err = env
        .warren(&["status"])
        .env("WARREN__BROKER__MANAGEMENT_URL", "http://127.0.0.1:1")
        .fails();
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one error line: {err}");
    assert!(lines[0].contains("management API not reachable"), "{err}");
    assert!(lines[0].contains("rabbitmq_management"), "{err}");
    assert!(lines[0].contains("broker.management_url"), "{err}");
}
