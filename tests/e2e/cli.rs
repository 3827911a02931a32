//! The `warren` command as a user meets it: help, errors, publish, topology.

use warren_e2e::{warren_bin, Env};

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
