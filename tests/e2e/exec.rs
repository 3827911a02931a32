//! `[[exec]]` task types: programs of the user's run by a real `warren up`
//! (the examples of examples/exec and small shell programs written by each
//! test), their results, failure classes, limits, cancel and kills, checked
//! in the process table.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use warren_client::TaskRequest;
use warren_core::event::ErrorKind;
use warren_core::TaskState;
use warren_e2e::{failure_of, final_event, result_of, until_final, Env, T_LONG};

/// A fresh directory for one test's programs and pid files.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "warren-exec-{name}-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes an executable shell program `name` in `dir`; returns its path.
fn program(dir: &Path, name: &str, body: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p.to_str().unwrap().to_owned()
}

/// The repository's examples/exec directory.
fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("examples")
        .join("exec")
}

/// A configuration file for `env` with these `[[exec]]` entries (TOML
/// text) and a route of every `ex.#` type to the cpu queue; the topology
/// is applied with it.
fn configure(env: &Env, entries: &str) -> String {
    let cfg = env.config_file(&format!(
        "{entries}\n[[routes]]\npattern = \"ex.#\"\nqueue = \"cpu\"\n"
    ));
    env.cli_ok(&["--config", &cfg, "topology", "apply"]);
    cfg
}

/// A TOML string literal.
fn lit(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// Peak resident memory of a process (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM in /proc status");
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// Live (not zombie) processes whose process group is `pgid`.
fn group_members(pgid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After "(comm)": state, ppid, pgrp.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 2 && f[0] != "Z" && f[2] == pgid.to_string() {
            out.push(pid);
        }
    }
    out
}

/// Waits (bounded) until no live process is left in group `pgid`.
async fn wait_group_gone(pgid: u32) {
    let deadline = tokio::time::Instant::now() + T_LONG;
    loop {
        let left = group_members(pgid);
        if left.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "processes {left:?} of group {pgid} still running"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (bounded) for a program to write its pid to `path`.
async fn read_pid(path: &Path) -> u32 {
    let deadline = tokio::time::Instant::now() + T_LONG;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if let Ok(pid) = text.trim().parse() {
                return pid;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no pid in {}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_examples_run_with_json_and_text_results() {
    let mut env = Env::new("exec-examples", &[]).await;
    let ex = examples();
    let cfg = configure(
        &env,
        &format!(
            "[[exec]]\ntype = \"ex.report\"\ncommand = [\"python3\", {}]\n\
             [[exec]]\ntype = \"ex.greet\"\ncommand = [{}]\n",
            lit(ex.join("report.py").to_str().unwrap()),
            lit(ex.join("greet.sh").to_str().unwrap()),
        ),
    );
    env.spawn(&["--config", &cfg, "up"], &[]);
    let got = env
        .run_named(
            0,
            vec![
                ("report", "ex.report", json!({"items": [1, 2, 3.5]})),
                ("greet", "ex.greet", json!({"name": "Ada"})),
                ("bad", "ex.report", json!({"items": [1, "two"]})),
            ],
        )
        .await;
    let r = result_of(&got["report"]);
    assert_eq!(r["count"], 3);
    assert_eq!(r["sum"], 6.5);
    assert_eq!(r["attempt"], 1);
    assert_eq!(r["task_id"], final_event(&got["report"]).task_id.as_str());
    let text = result_of(&got["greet"]).as_str().unwrap().to_owned();
    assert!(text.starts_with("hello, Ada ("), "{text}");
    let (kind, code, message) = failure_of(&got["bad"]);
    assert_eq!((kind, code.as_str()), (ErrorKind::Permanent, "exit_2"));
    assert!(message.contains("item 2 is not a number"), "{message}");
}

#[tokio::test]
async fn exit_codes_output_caps_and_environment() {
    let mut env = Env::new("exec-classes", &[]).await;
    let dir = scratch("classes");
    let retry = program(&dir, "retry.sh", "echo 'busy, try later' >&2\nexit 75");
    let fail = program(
        &dir,
        "fail.sh",
        "cat >/dev/null\necho 'first line' >&2\necho 'no such record: 42' >&2\nexit 1",
    );
    let binary = program(&dir, "binary.sh", "printf 'caf\\351 \\377ok'");
    // 100 MB on stdout; only 4096 bytes are kept.
    let flood = program(&dir, "flood.sh", "yes | head -c 104857600");
    let envp = program(
        &dir,
        "env.sh",
        "cat >/dev/null\nprintf '{\"fixed\":\"%s\",\"allowed\":\"%s\",\"home\":\"%s\",\"secret\":\"%s\"}' \
         \"$FIXED\" \"${WARREN_E2E_ALLOWED-}\" \"${HOME-unset}\" \"${WARREN_E2E_SECRET-unset}\"",
    );
    let cfg = configure(
        &env,
        &format!(
            "[[exec]]\ntype = \"ex.retry\"\ncommand = [{}]\n\
             [[exec]]\ntype = \"ex.fail\"\ncommand = [{}]\n\
             [[exec]]\ntype = \"ex.binary\"\ncommand = [{}]\n\
             [[exec]]\ntype = \"ex.flood\"\ncommand = [{}]\nmax_output_bytes = 4096\n\
             [[exec]]\ntype = \"ex.env\"\ncommand = [{}]\nenv_allow = [\"WARREN_E2E_ALLOWED\"]\n\
             env = {{ FIXED = \"v1\" }}\n",
            lit(&retry),
            lit(&fail),
            lit(&binary),
            lit(&flood),
            lit(&envp),
        ),
    );
    let up = env.spawn(
        &["--config", &cfg, "up"],
        &[
            ("WARREN__RETRY__DEFAULT__BASE_MS", "50"),
            ("WARREN_E2E_ALLOWED", "yes"),
            ("WARREN_E2E_SECRET", "s3cret"),
        ],
    );
    let got = env
        .run_named(
            1,
            vec![
                ("retry", "ex.retry", json!({})),
                ("fail", "ex.fail", json!({})),
                ("binary", "ex.binary", json!({})),
                ("env", "ex.env", json!({})),
            ],
        )
        .await;

    // Exit 75: retried, then dead once the retries ran out.
    let retry = &got["retry"];
    let failed: Vec<_> = retry
        .iter()
        .filter(|e| e.event.state == TaskState::Failed)
        .collect();
    assert_eq!(failed.len(), 2, "{retry:?}");
    let e = failed[0].event.error.as_ref().unwrap();
    assert_eq!((e.kind, e.code.as_str()), (ErrorKind::Retryable, "exit_75"));
    assert!(e.message.contains("busy, try later"), "{}", e.message);
    assert_eq!(final_event(retry).attempt, 2);
    assert_eq!(failure_of(retry).1, "exit_75");

    // Other codes: permanent, with the last lines of stderr, no retry.
    let (kind, code, message) = failure_of(&got["fail"]);
    assert_eq!((kind, code.as_str()), (ErrorKind::Permanent, "exit_1"));
    assert_eq!(message, "exited with 1: first line\nno such record: 42");
    assert_eq!(final_event(&got["fail"]).attempt, 1);

    assert_eq!(result_of(&got["binary"]), &json!("caf\u{fffd} \u{fffd}ok"));

    // 100 MB through the worker, which keeps 4096 bytes of it.
    let before = peak_rss(up.pid);
    let ev = env
        .call(
            &TaskRequest::new("ex.flood", json!({})).header_int("x-warren-max-retries", 0),
            T_LONG,
        )
        .await;
    assert_eq!(ev.state, TaskState::Succeeded, "{ev:?}");
    let rss = peak_rss(up.pid);
    assert!(
        rss < before + 32 * 1024 * 1024,
        "worker peak RSS {rss} bytes, {before} before the 100 MB output"
    );
    let r = ev.result.as_ref().unwrap();
    assert_eq!(r["truncated"], true);
    assert_eq!(r["bytes"], 104_857_600u64);
    assert_eq!(r["output"].as_str().unwrap(), "y\n".repeat(2048));

    let r = result_of(&got["env"]);
    assert_eq!(r["fixed"], "v1");
    assert_eq!(r["allowed"], "yes");
    assert_eq!(
        r["home"], "unset",
        "nothing else of the worker's environment"
    );
    assert_eq!(r["secret"], "unset");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_time_limit_and_a_cancel_kill_the_whole_group() {
    let mut env = Env::new("exec-kill", &[]).await;
    let dir = scratch("kill");
    let stubborn_pid = dir.join("stubborn.pid");
    let sleeper_pid = dir.join("sleeper.pid");
    // Ignores SIGTERM, and so does its child (an ignored signal stays
    // ignored across exec).
    let stubborn = program(
        &dir,
        "stubborn.sh",
        "trap '' TERM\necho $$ > \"$1\"\nsleep 600\necho late",
    );
    let sleeper = program(&dir, "sleeper.sh", "echo $$ > \"$1\"\nsleep 600\necho late");
    let cfg = configure(
        &env,
        &format!(
            "[[exec]]\ntype = \"ex.stubborn\"\ncommand = [{}, {}]\ntime_limit_ms = 1000\n\
             [[exec]]\ntype = \"ex.sleeper\"\ncommand = [{}, {}]\n",
            lit(&stubborn),
            lit(stubborn_pid.to_str().unwrap()),
            lit(&sleeper),
            lit(sleeper_pid.to_str().unwrap()),
        ),
    );
    env.spawn(&["--config", &cfg, "up"], &[]);
    let mut watch = env.watch(&["#"]).await;

    let stubborn_id = env
        .publish(&TaskRequest::new("ex.stubborn", json!({})).header_int("x-warren-max-retries", 0))
        .await;
    let sleeper_id = env
        .publish(&TaskRequest::new("ex.sleeper", json!({})).header_int("x-warren-max-retries", 0))
        .await;
    let sleeper_group = read_pid(&sleeper_pid).await;
    let stubborn_group = read_pid(&stubborn_pid).await;
    assert!(!group_members(sleeper_group).is_empty());
    env.client.cancel(&sleeper_id).await.unwrap();

    let got = until_final(&mut watch, &[&stubborn_id, &sleeper_id], T_LONG).await;
    let (kind, code, message) = failure_of(&got[&stubborn_id]);
    assert_eq!((kind, code.as_str()), (ErrorKind::Retryable, "timeout"));
    assert!(message.contains("time limit of 1000 ms"), "{message}");
    // The program and its sleep were killed, though both ignore SIGTERM.
    wait_group_gone(stubborn_group).await;

    assert_eq!(final_event(&got[&sleeper_id]).state, TaskState::Cancelled);
    wait_group_gone(sleeper_group).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_worker_killed_mid_task_leaves_no_program_and_the_task_runs_again() {
    let mut env = Env::new("exec-sigkill", &[]).await;
    let dir = scratch("sigkill");
    let pid_file = dir.join("first.pid");
    let marker = dir.join("ran-once");
    // The first run waits (its sleep replaces the shell: the worker's
    // direct child); the next one answers.
    let prog = program(
        &dir,
        "once.sh",
        "if [ -e \"$2\" ]; then echo again; exit 0; fi\n: > \"$2\"\necho $$ > \"$1\"\nexec sleep 600",
    );
    let cfg = configure(
        &env,
        &format!(
            "[[exec]]\ntype = \"ex.once\"\ncommand = [{}, {}, {}]\n",
            lit(&prog),
            lit(pid_file.to_str().unwrap()),
            lit(marker.to_str().unwrap()),
        ),
    );
    let first = env.spawn(&["--config", &cfg, "worker"], &[]);
    let mut watch = env.watch(&["#"]).await;
    let id = env.publish(&TaskRequest::new("ex.once", json!({}))).await;
    let pid = read_pid(&pid_file).await;
    assert!(!group_members(pid).is_empty());
    env.kill(&first, T_LONG).await;
    wait_group_gone(pid).await;

    env.spawn(&["--config", &cfg, "worker"], &[]);
    let got = until_final(&mut watch, &[&id], T_LONG).await;
    assert_eq!(result_of(&got[&id]), &json!("again\n"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_missing_program_stops_the_worker_at_start_up() {
    let env = Env::new("exec-missing", &[]).await;
    let cfg = configure(
        &env,
        "[[exec]]\ntype = \"ex.missing\"\ncommand = [\"/nonexistent/warren-exec-missing\", \"x\"]\n",
    );
    let stderr = env.cli_err(&["--config", &cfg, "worker"]);
    let line = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line: {stderr}"));
    assert_eq!(
        line,
        "error: exec type \"ex.missing\": program /nonexistent/warren-exec-missing: No such \
         file or directory (os error 2)"
    );

    let dir = scratch("missing");
    let plain = dir.join("plain.sh");
    std::fs::write(&plain, "#!/bin/sh\necho hi\n").unwrap();
    let cfg = configure(
        &env,
        &format!(
            "[[exec]]\ntype = \"ex.plain\"\ncommand = [{}]\n",
            lit(plain.to_str().unwrap())
        ),
    );
    let stderr = env.cli_err(&["--config", &cfg, "worker"]);
    assert!(
        stderr.contains(&format!(
            "error: exec type \"ex.plain\": program {} is not executable",
            plain.display()
        )),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn progress_lines_on_stderr_become_progress_events() {
    let mut env = Env::new("exec-progress", &[]).await;
    let dir = scratch("progress");
    let go = dir.join("go");
    // Reports 5 of 10, then waits (bounded) for the test to have seen it.
    let prog = program(
        &dir,
        "progress.sh",
        "echo 'warren:progress 5 10' >&2\necho 'warren:progress nonsense' >&2\n\
         i=0\nwhile [ ! -e \"$1\" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\n\
         echo 'last words' >&2\nexit 3",
    );
    let cfg = configure(
        &env,
        &format!(
            "[[exec]]\ntype = \"ex.progress\"\ncommand = [{}, {}]\n",
            lit(&prog),
            lit(go.to_str().unwrap())
        ),
    );
    env.spawn(&["--config", &cfg, "up"], &[]);
    let mut watch = env.watch(&["#"]).await;
    let id = env
        .publish(&TaskRequest::new("ex.progress", json!({})).header_int("x-warren-max-retries", 0))
        .await;
    let progress = loop {
        let e = watch.next(T_LONG).await.unwrap().expect("an event");
        assert!(!e.event.state.is_final(), "{:?}", e.event);
        if e.event.state == TaskState::Progress {
            break e.event.progress.unwrap();
        }
    };
    assert_eq!((progress.bytes, progress.total), (5, Some(10)));
    std::fs::write(&go, "").unwrap();
    let got = until_final(&mut watch, &[&id], T_LONG).await;
    let (kind, code, message) = failure_of(&got[&id]);
    assert_eq!((kind, code.as_str()), (ErrorKind::Permanent, "exit_3"));
    // A line that is not a valid report is kept as text; reports are not.
    assert_eq!(
        message,
        "exited with 3: warren:progress nonsense\nlast words"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
