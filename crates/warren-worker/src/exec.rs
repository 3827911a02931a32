//! `[[exec]]` task types: a program of the user's, in any language, runs
//! each attempt (README "Handlers in any language (exec)").
//!
//! The protocol with the program:
//!
//! - **stdin**: one JSON object `{"id", "type", "attempt", "args"}`, then
//!   end of file.
//! - **stdout**: the result, JSON when the whole output parses as JSON,
//!   else text (invalid UTF-8 replaced). Only `max_output_bytes` are kept;
//!   the rest is read and dropped so the program never blocks, and the
//!   result is then `{"output": <text kept>, "truncated": true, "bytes": <total>}`.
//! - **exit status**: 0 success; [`RETRY_EXIT_CODE`] (75, `EX_TEMPFAIL`) a
//!   retryable failure; any other code a permanent failure; death by a
//!   signal not sent by Warren a retryable failure. The failure's message is
//!   the last lines of stderr.
//! - **stderr**: free text, except lines `warren:progress <done> [<total>]`
//!   (whole numbers), which report progress and are not kept.
//!
//! The program runs in a process group of its own, with only the allowed
//! and fixed environment variables. Its time limit, a cancel and the
//! runtime's own limits end the whole group: SIGTERM, then SIGKILL after
//! [`KILL_GRACE`]. The program gets SIGKILL from the kernel when the worker
//! dies (`PR_SET_PDEATHSIG`), so a worker killed with SIGKILL leaves it not
//! running; the task, never acknowledged, is redelivered.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use warren_core::config::ExecConfig;
use warren_core::Config;

use crate::{ExecSetupError, Handler, Registry, TaskContext, TaskError};

/// The exit code of a retryable failure (`EX_TEMPFAIL` of sysexits.h).
pub const RETRY_EXIT_CODE: i32 = 75;

/// How long a program has between SIGTERM and SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(5);

/// The prefix of a progress line on stderr.
pub const PROGRESS_PREFIX: &str = "warren:progress ";

/// Lines of stderr kept for a failure's message.
const TAIL_LINES: usize = 20;
/// Bytes of stderr kept for a failure's message.
const TAIL_BYTES: usize = 2048;
/// Longest stderr line looked at; the rest of a longer line is dropped.
const LINE_BYTES: usize = 4096;
/// How long the pipes may stay open after the program ended (a process
/// that left its group may hold them).
const PIPE_GRACE: Duration = Duration::from_secs(2);

/// Registers one handler per `[[exec]]` entry of `config`, after checking
/// that each program exists and is executable and each working directory
/// exists.
pub fn register(r: &mut Registry, config: &Config) -> Result<(), ExecSetupError> {
    for entry in &config.exec {
        let exec = Exec::new(entry).map_err(|problem| ExecSetupError {
            task_type: entry.task_type.clone(),
            problem,
        })?;
        r.register(&entry.task_type, exec);
    }
    Ok(())
}

/// The handler of one `[[exec]]` task type.
pub struct Exec {
    program: PathBuf,
    args: Vec<String>,
    workdir: Option<PathBuf>,
    env: Vec<(OsString, OsString)>,
    time_limit: Option<Duration>,
    max_output: usize,
}

impl Exec {
    /// Resolves the program and working directory and reads the allowed
    /// variables of the worker's environment.
    fn new(e: &ExecConfig) -> Result<Self, String> {
        let cwd = std::env::current_dir()
            .map_err(|err| format!("cannot read the working directory: {err}"))?;
        let workdir = match &e.workdir {
            Some(w) => {
                let w = cwd.join(w);
                if !w.is_dir() {
                    return Err(format!("workdir {} is not a directory", w.display()));
                }
                Some(w)
            }
            None => None,
        };
        let first = e
            .command
            .first()
            .ok_or_else(|| "command is empty".to_owned())?;
        let program = resolve(first, workdir.as_deref().unwrap_or(&cwd))?;
        let mut env: Vec<(OsString, OsString)> = e
            .env_allow
            .iter()
            .filter(|name| !e.env.contains_key(*name))
            .filter_map(|name| std::env::var_os(name).map(|v| (OsString::from(name), v)))
            .collect();
        env.extend(
            e.env
                .iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v))),
        );
        Ok(Exec {
            program,
            args: e.command[1..].to_vec(),
            workdir,
            env,
            time_limit: (e.time_limit_ms > 0).then(|| Duration::from_millis(e.time_limit_ms)),
            max_output: e.max_output_bytes,
        })
    }
}

/// The absolute path of a program: a path (relative to `base`) when it
/// holds a '/', else the first executable of that name in `PATH`.
fn resolve(program: &str, base: &Path) -> Result<PathBuf, String> {
    if program.contains('/') {
        let p = base.join(program);
        check_executable(&p)?;
        return Ok(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(program);
        if check_executable(&p).is_ok() {
            return Ok(if p.is_absolute() { p } else { base.join(p) });
        }
    }
    Err(format!(
        "program {program:?} is not found in PATH ({})",
        path.to_string_lossy()
    ))
}

fn check_executable(p: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(p).map_err(|e| format!("program {}: {e}", p.display()))?;
    if !meta.is_file() {
        return Err(format!("program {} is not a file", p.display()));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(format!("program {} is not executable", p.display()));
    }
    Ok(())
}

#[async_trait::async_trait]
impl Handler for Exec {
    async fn handle(&self, ctx: TaskContext) -> Result<Value, TaskError> {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some(w) = &self.workdir {
            cmd.current_dir(w);
        }
        die_with_worker(&mut cmd);
        let mut child = cmd.spawn().map_err(|e| {
            TaskError::retryable(
                "spawn",
                format!("cannot start {}: {e}", self.program.display()),
            )
        })?;
        let (Some(mut stdin), Some(stdout), Some(stderr), Some(pid)) = (
            child.stdin.take(),
            child.stdout.take(),
            child.stderr.take(),
            child.id(),
        ) else {
            return Err(TaskError::retryable(
                "spawn",
                "the program's pipes are missing",
            ));
        };
        let mut group = Group {
            pgid: pid as i32,
            child: Some(child),
        };
        let input = json!({
            "id": ctx.id,
            "type": ctx.task_type,
            "attempt": ctx.attempt,
            "args": ctx.args,
        })
        .to_string();
        let mut output = Capped::new(self.max_output);
        let mut tail = Tail::default();
        let ended = CancellationToken::new();
        let io = async {
            let feed = async {
                // A program that does not read its input closes the pipe:
                // not an error.
                let _ = stdin.write_all(input.as_bytes()).await;
                drop(stdin);
            };
            let readers =
                async { tokio::join!(feed, output.read_all(stdout), tail.read_all(stderr, &ctx)) };
            tokio::select! {
                _ = readers => {}
                _ = async { ended.cancelled().await; tokio::time::sleep(PIPE_GRACE).await } => {}
            }
        };
        let run = async {
            let limit = async {
                match self.time_limit {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            let child = group.child.as_mut().expect("not reaped yet");
            let outcome = tokio::select! {
                s = child.wait() => Outcome::Exited(s),
                _ = limit => Outcome::TimedOut,
                _ = ctx.cancel.cancelled() => Outcome::Cancelled,
            };
            let outcome = match outcome {
                Outcome::Exited(s) => Outcome::Exited(s),
                other => {
                    group.stop().await;
                    other
                }
            };
            // Whatever the program left running in its group ends with it.
            group.signal(libc::SIGKILL);
            group.child = None;
            ended.cancel();
            outcome
        };
        let ((), outcome) = tokio::join!(io, run);
        match outcome {
            Outcome::TimedOut => Err(TaskError::retryable(
                "timeout",
                format!(
                    "killed after its time limit of {} ms{}",
                    self.time_limit.map_or(0, |d| d.as_millis()),
                    tail.suffix()
                ),
            )),
            Outcome::Cancelled => Err(TaskError::retryable("aborted", "stopped by the worker")),
            Outcome::Exited(Err(e)) => Err(TaskError::retryable(
                "wait",
                format!("cannot wait for the program: {e}"),
            )),
            Outcome::Exited(Ok(status)) => self.settle(status, output, &tail),
        }
    }
}

impl Exec {
    /// The outcome of a program that exited.
    fn settle(&self, status: ExitStatus, output: Capped, tail: &Tail) -> Result<Value, TaskError> {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(0), _) => Ok(output.into_result()),
            (Some(RETRY_EXIT_CODE), _) => Err(TaskError::retryable(
                format!("exit_{RETRY_EXIT_CODE}"),
                tail.message(&format!("exited with {RETRY_EXIT_CODE} (retry)")),
            )),
            (Some(code), _) => Err(TaskError::permanent(
                format!("exit_{code}"),
                tail.message(&format!("exited with {code}")),
            )),
            (None, Some(sig)) => Err(TaskError::retryable(
                format!("signal_{sig}"),
                tail.message(&format!("killed by signal {sig}")),
            )),
            (None, None) => Err(TaskError::retryable(
                "exit",
                tail.message("ended without a status"),
            )),
        }
    }
}

/// How the wait for the program ended.
enum Outcome {
    Exited(std::io::Result<ExitStatus>),
    TimedOut,
    Cancelled,
}

/// The program's process group; dropping it before the program was reaped
/// (the runtime aborted the attempt) ends the group: SIGTERM now, SIGKILL
/// after [`KILL_GRACE`].
struct Group {
    pgid: i32,
    child: Option<Child>,
}

impl Group {
    fn signal(&self, sig: i32) {
        signal_group(self.pgid, sig);
    }

    /// SIGTERM to the group, SIGKILL after the grace period; reaps the program.
    async fn stop(&mut self) {
        self.signal(libc::SIGTERM);
        let Some(child) = self.child.as_mut() else {
            return;
        };
        if tokio::time::timeout(KILL_GRACE, child.wait())
            .await
            .is_err()
        {
            signal_group(self.pgid, libc::SIGKILL);
            let _ = child.wait().await;
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        let Some(child) = self.child.take() else {
            return;
        };
        self.signal(libc::SIGTERM);
        let mut rest = Group {
            pgid: self.pgid,
            child: Some(child),
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(async move {
                    rest.stop().await;
                    rest.signal(libc::SIGKILL);
                    rest.child.take();
                });
            }
            Err(_) => {
                rest.signal(libc::SIGKILL);
                if let Some(mut c) = rest.child.take() {
                    let _ = c.start_kill();
                }
            }
        }
    }
}

/// Sends `sig` to the process group `pgid`.
#[allow(unsafe_code)] // the workspace's exception: see the SAFETY note
fn signal_group(pgid: i32, sig: i32) {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours; a
    // group already gone (ESRCH) is what we want anyway. The negative pid
    // names the group the program leads (process_group(0)).
    unsafe {
        libc::kill(-pgid, sig);
    }
}

/// Makes the kernel send SIGKILL to the program when the worker thread
/// that started it dies (worker threads live as long as the worker).
#[allow(unsafe_code)] // the workspace's exception: see the SAFETY note
fn die_with_worker(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the child between fork and exec and
    // calls only async-signal-safe functions (prctl, getppid), allocating
    // nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The worker died before the prctl: nobody waits for us.
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// stdout, kept up to a cap and counted beyond it.
struct Capped {
    cap: usize,
    kept: Vec<u8>,
    total: u64,
}

impl Capped {
    fn new(cap: usize) -> Self {
        Capped {
            cap,
            kept: Vec::new(),
            total: 0,
        }
    }

    async fn read_all(&mut self, mut r: impl AsyncRead + Unpin) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    self.total += n as u64;
                    let room = self.cap.saturating_sub(self.kept.len());
                    self.kept.extend_from_slice(&buf[..n.min(room)]);
                }
            }
        }
    }

    fn into_result(self) -> Value {
        if self.total > self.kept.len() as u64 {
            return json!({
                "output": String::from_utf8_lossy(&self.kept),
                "truncated": true,
                "bytes": self.total,
            });
        }
        match serde_json::from_slice::<Value>(&self.kept) {
            Ok(v) => v,
            Err(_) => Value::String(String::from_utf8_lossy(&self.kept).into_owned()),
        }
    }
}

/// The last lines of stderr; progress lines go to the task's reporter.
#[derive(Default)]
struct Tail {
    lines: VecDeque<String>,
    bytes: usize,
}

impl Tail {
    async fn read_all(&mut self, mut r: impl AsyncRead + Unpin, ctx: &TaskContext) {
        let mut buf = vec![0u8; 16 * 1024];
        let mut line: Vec<u8> = Vec::new();
        loop {
            let n = match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            for &b in &buf[..n] {
                if b == b'\n' {
                    self.line(&line, ctx);
                    line.clear();
                } else if line.len() < LINE_BYTES {
                    line.push(b);
                }
            }
        }
        if !line.is_empty() {
            self.line(&line, ctx);
        }
    }

    fn line(&mut self, raw: &[u8], ctx: &TaskContext) {
        let text = String::from_utf8_lossy(raw);
        let text = text.trim_end_matches('\r');
        if let Some(rest) = text.strip_prefix(PROGRESS_PREFIX) {
            if let Some((done, total)) = parse_progress(rest) {
                ctx.progress.report(done, total);
                return;
            }
        }
        if text.trim().is_empty() {
            return;
        }
        self.bytes += text.len();
        self.lines.push_back(text.to_owned());
        while self.lines.len() > TAIL_LINES || (self.bytes > TAIL_BYTES && self.lines.len() > 1) {
            if let Some(l) = self.lines.pop_front() {
                self.bytes -= l.len();
            }
        }
    }

    /// `what`, then the last lines of stderr.
    fn message(&self, what: &str) -> String {
        format!("{what}{}", self.suffix())
    }

    fn suffix(&self) -> String {
        if self.lines.is_empty() {
            return String::new();
        }
        let mut text = self.lines.iter().cloned().collect::<Vec<_>>().join("\n");
        if text.len() > TAIL_BYTES {
            let mut cut = text.len() - TAIL_BYTES;
            while !text.is_char_boundary(cut) {
                cut += 1;
            }
            text = format!("…{}", &text[cut..]);
        }
        format!(": {text}")
    }
}

/// `<done> [<total>]` of a progress line.
fn parse_progress(rest: &str) -> Option<(u64, Option<u64>)> {
    let mut words = rest.split_whitespace();
    let done = words.next()?.parse().ok()?;
    let total = match words.next() {
        Some(t) => Some(t.parse().ok()?),
        None => None,
    };
    if words.next().is_some() {
        return None;
    }
    Some((done, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines() {
        assert_eq!(parse_progress("10"), Some((10, None)));
        assert_eq!(parse_progress("10 200"), Some((10, Some(200))));
        assert_eq!(parse_progress("x"), None);
        assert_eq!(parse_progress("1 2 3"), None);
        assert_eq!(parse_progress(""), None);
    }

    #[test]
    fn output_is_json_text_or_capped() {
        let mut c = Capped::new(100);
        c.kept = b"{\"a\": 1}\n".to_vec();
        c.total = c.kept.len() as u64;
        assert_eq!(c.into_result(), json!({"a": 1}));
        let mut c = Capped::new(100);
        c.kept = b"hello \xff".to_vec();
        c.total = c.kept.len() as u64;
        assert_eq!(c.into_result(), json!("hello \u{fffd}"));
        let mut c = Capped::new(3);
        c.kept = b"abc".to_vec();
        c.total = 10;
        assert_eq!(
            c.into_result(),
            json!({"output": "abc", "truncated": true, "bytes": 10})
        );
    }

    #[test]
    fn a_missing_program_is_named() {
        let e = resolve("no-such-program-warren", Path::new("/")).unwrap_err();
        assert!(
            e.contains("\"no-such-program-warren\" is not found in PATH"),
            "{e}"
        );
        let e = resolve("./nope.sh", Path::new("/tmp")).unwrap_err();
        assert!(e.starts_with("program /tmp/./nope.sh: "), "{e}");
        assert!(resolve("sh", Path::new("/")).unwrap().is_absolute());
    }
}
