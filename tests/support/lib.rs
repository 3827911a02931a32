//! Shared harness for Warren's end-to-end tests.
//!
//! Each test makes an [`Env`] with its own topology prefix, starts real
//! `warren` processes against the real broker, observes events and queue
//! depths with bounded waits, and deletes every object of its prefix when
//! dropped.
//!
//! Most scenarios open in one line and bound every wait by [`T`] (or
//! [`T_LONG`]):
//!
//! ```ignore
//! let (env, mut watch) = Env::with_up_watching("echo", &[]).await;
//! let id = env.publish(&TaskRequest::new("diag.echo", json!({}))).await;
//! let got = until_final(&mut watch, &[&id], T).await;
//! let out = env.cli_ok(&["dead", "list", "--json"]);
//! ```

mod command;
mod mgmt;
mod node;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use warren_client::{Client, EventWatch, ReceivedEvent, TaskRequest};
use warren_core::{Config, Event};

pub use command::CommandExt;
pub use mgmt::Mgmt;
pub use node::{NodeOptions, TestCluster, TestNode};

/// The bound of a test's waits (events, queue depths, logs, exits).
pub const T: Duration = Duration::from_secs(30);

/// The bound of a slower test's waits: retries, delays, faults, large
/// transfers.
pub const T_LONG: Duration = Duration::from_secs(60);

/// The broker URL tests use.
pub fn broker_url() -> String {
    std::env::var("WARREN__BROKER__URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// The `warren` binary built by `cargo build` (scripts/test.sh builds it first).
pub fn warren_bin() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    let bin = target.join("debug").join("warren");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p warren` (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// The interop virtualenv's Python (scripts/test.sh creates it).
pub fn python() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("interop/.venv/bin/python");
    assert!(
        venv.exists(),
        "{} is missing: scripts/test.sh creates the interop venv",
        venv.display()
    );
    venv
}

/// Runs `interop/publish_pika.py` against the test broker with `args`
/// (see the script's `--help`); panics with its stderr when it fails.
pub fn pika(args: &[&str]) -> Output {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("interop/publish_pika.py");
    Command::new(python())
        .arg(script)
        .args(["--url", &broker_url()])
        .args(args)
        .succeeds()
}

/// One test's isolated Warren: prefix, settings, processes, cleanup.
pub struct Env {
    /// The topology prefix, unique to this test.
    pub prefix: String,
    /// Environment overrides passed to every `warren` process.
    pub vars: Vec<(String, String)>,
    /// The loaded configuration (with the overrides).
    pub config: Config,
    /// A producer client.
    pub client: Client,
    children: Vec<Child>,
    logs: PathBuf,
}

/// The `admin` bearer token of every test's tracker (`tracker.tokens`).
pub const TRACKER_ADMIN_TOKEN: &str = "e2e-admin-token-6b1f0c9a2d7e";

/// The `read` bearer token of every test's tracker.
pub const TRACKER_READ_TOKEN: &str = "e2e-read-token-93c4e8f1a05b";

/// The environment variable [`TRACKER_ADMIN_TOKEN`] is read from.
const TRACKER_ADMIN_TOKEN_VAR: &str = "WARREN_E2E_TRACKER_ADMIN_TOKEN";

/// The environment variable [`TRACKER_READ_TOKEN`] is read from.
const TRACKER_READ_TOKEN_VAR: &str = "WARREN_E2E_TRACKER_READ_TOKEN";

/// A `warren` process started by the test.
pub struct Proc {
    /// Index into the env's children.
    pub index: usize,
    /// OS process id.
    pub pid: u32,
}

impl Env {
    /// A fresh prefix `wt.<name>.<random>` with extra `WARREN__…` overrides;
    /// the topology is applied with `warren topology apply`.
    pub async fn new(name: &str, overrides: &[(&str, &str)]) -> Env {
        let env = Env::without_topology(name, overrides).await;
        env.cli_ok(&["topology", "apply"]);
        env
    }

    /// Like [`Env::new`], but the topology is left for the test (or a
    /// scheduler it starts) to apply.
    pub async fn without_topology(name: &str, overrides: &[(&str, &str)]) -> Env {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let prefix = format!("wt.{name}.{}", &suffix[..8]);
        let tracker_db = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("target")
            .join("e2e-tracker");
        std::fs::create_dir_all(&tracker_db).expect("create tracker dir");
        let mut vars = vec![
            ("WARREN__PREFIX".to_owned(), prefix.clone()),
            ("WARREN__BROKER__URL".to_owned(), broker_url()),
            // Each test's tracker (inside `warren up`) has its own database
            // and an ephemeral port; tests that care override these.
            (
                "WARREN__TRACKER__DATABASE_URL".to_owned(),
                format!("sqlite://{}/{prefix}.db", tracker_db.display()),
            ),
            (
                "WARREN__TRACKER__LISTEN".to_owned(),
                "127.0.0.1:0".to_owned(),
            ),
            // Every tracker accepts the tests' two bearer tokens
            // ([`TRACKER_ADMIN_TOKEN`], [`TRACKER_READ_TOKEN`]).
            (
                "WARREN__TRACKER__TOKENS".to_owned(),
                format!(
                    "e2e-admin:admin:env:{TRACKER_ADMIN_TOKEN_VAR},\
                     e2e-read:read:env:{TRACKER_READ_TOKEN_VAR}"
                ),
            ),
            (
                TRACKER_ADMIN_TOKEN_VAR.to_owned(),
                TRACKER_ADMIN_TOKEN.to_owned(),
            ),
            (
                TRACKER_READ_TOKEN_VAR.to_owned(),
                TRACKER_READ_TOKEN.to_owned(),
            ),
            // Metrics and health of workers and schedulers on ephemeral
            // ports too ([`Env::ops_addr`] reads them from the log).
            (
                "WARREN__WORKER__LISTEN".to_owned(),
                "127.0.0.1:0".to_owned(),
            ),
            (
                "WARREN__SCHEDULER__LISTEN".to_owned(),
                "127.0.0.1:0".to_owned(),
            ),
        ];
        for (k, v) in overrides {
            vars.push(((*k).to_owned(), (*v).to_owned()));
        }
        let config = Config::load_from(None, &vars).expect("test configuration is valid");
        let logs = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("target")
            .join("e2e-logs");
        std::fs::create_dir_all(&logs).expect("create log dir");
        let client = Client::connect(&config).await.expect("broker reachable");
        Env {
            prefix,
            vars,
            config,
            client,
            children: Vec::new(),
            logs,
        }
    }

    /// A new env ([`Env::new`]) with `warren up` running.
    pub async fn with_up(name: &str, overrides: &[(&str, &str)]) -> Env {
        let mut env = Env::new(name, overrides).await;
        env.up(&[]);
        env
    }

    /// A new env with `warren up` running ([`Env::with_up`]) and a watch on
    /// every event (`#`).
    pub async fn with_up_watching(name: &str, overrides: &[(&str, &str)]) -> (Env, EventWatch) {
        let env = Env::with_up(name, overrides).await;
        let watch = env.watch(&["#"]).await;
        (env, watch)
    }

    /// The topology names.
    pub fn names(&self) -> warren_core::Names {
        self.config.names()
    }

    /// Writes `toml` as this env's configuration file and returns its path
    /// (for `--config`). There is one per env, `<temp dir>/<prefix>.toml`:
    /// a second call replaces it. It is removed when the env is dropped.
    pub fn config_file(&self, toml: &str) -> String {
        let path = config_path(&self.prefix);
        std::fs::write(&path, toml).expect("write config file");
        path.to_str().expect("UTF-8 temp dir").to_owned()
    }

    /// A `warren` command with this env's overrides.
    pub fn warren(&self, args: &[&str]) -> Command {
        let mut c = Command::new(warren_bin());
        c.args(args);
        for (k, v) in &self.vars {
            c.env(k, v);
        }
        c.env("WARREN_LOG", "info,lapin=warn");
        c
    }

    /// Runs `warren <args>` and asserts it succeeded (see [`CommandExt`]).
    #[track_caller]
    pub fn cli_ok(&self, args: &[&str]) -> Output {
        self.warren(args).succeeds()
    }

    /// Runs `warren <args>` and asserts it failed; returns its stderr.
    #[track_caller]
    pub fn cli_err(&self, args: &[&str]) -> String {
        self.warren(args).fails()
    }

    /// Runs `warren <args>` and asserts it exited with `code`.
    #[track_caller]
    pub fn cli_exit(&self, args: &[&str], code: i32) -> Output {
        self.warren(args).exits_with(code)
    }

    /// Starts `warren <args>` in the background, its stderr in a log file.
    pub fn spawn(&mut self, args: &[&str], extra: &[(&str, &str)]) -> Proc {
        let n = self.children.len();
        let log_path = self.logs.join(format!("{}-{n}.log", self.prefix));
        let log = std::fs::File::create(&log_path).expect("create log");
        let mut cmd = self.warren(args);
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn warren");
        let pid = child.id();
        self.children.push(child);
        Proc { index: n, pid }
    }

    /// Starts `warren up` (scheduler and worker in one process).
    pub fn up(&mut self, extra: &[(&str, &str)]) -> Proc {
        self.spawn(&["up"], extra)
    }

    /// Sends a signal to a process.
    pub fn signal(&self, p: &Proc, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &p.pid.to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -{sig} {} failed", p.pid);
    }

    /// Waits (bounded) for a process to exit; returns its exit code.
    pub async fn wait_exit(&mut self, p: &Proc, timeout: Duration) -> Option<i32> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.children[p.index].try_wait().expect("try_wait") {
                return Some(status.code().unwrap_or(-1));
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills a process (SIGKILL) and waits (bounded) until it has exited.
    pub async fn kill(&mut self, p: &Proc, timeout: Duration) {
        self.signal(p, "KILL");
        let exited = self.wait_exit(p, timeout).await;
        assert!(
            exited.is_some(),
            "killed process {} did not exit within {timeout:?}",
            p.pid
        );
    }

    /// The log a process wrote so far.
    pub fn log_of(&self, p: &Proc) -> String {
        std::fs::read_to_string(self.logs.join(format!("{}-{}.log", self.prefix, p.index)))
            .unwrap_or_default()
    }

    /// Waits (bounded) until a process's log contains `needle`.
    pub async fn wait_log(&self, p: &Proc, needle: &str, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.log_of(p).contains(needle) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "process {} did not log {needle:?} within {timeout:?}: {}",
                p.pid,
                self.log_of(p)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The `host:port` of a process's metrics and health endpoint for
    /// `component` ("worker" or "scheduler"), read from its log (bounded wait).
    pub async fn ops_addr(&self, p: &Proc, component: &str, timeout: Duration) -> String {
        let needle = format!("{component} metrics on http://");
        self.wait_log(p, &needle, timeout).await;
        let log = self.log_of(p);
        let at = log.find(&needle).expect("logged") + needle.len();
        log[at..]
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
            .collect()
    }

    /// Publishes a task with the env's client (confirmed); returns its id.
    pub async fn publish(&self, req: &TaskRequest) -> String {
        self.client
            .publish(req)
            .await
            .unwrap_or_else(|e| panic!("publish {}: {e}", req.task_type))
    }

    /// Publishes a message as is (confirmed), as another client would.
    pub async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: lapin::BasicProperties,
    ) {
        self.client
            .publish_raw(exchange, routing_key, body, properties)
            .await
            .unwrap_or_else(|e| panic!("publish to {exchange} under {routing_key}: {e}"));
    }

    /// Publishes a task and waits (bounded) for its final event through
    /// direct reply-to.
    pub async fn call(&self, req: &TaskRequest, timeout: Duration) -> Event {
        self.client
            .call(req, timeout)
            .await
            .unwrap_or_else(|e| panic!("call {}: {e}", req.task_type))
    }

    /// Follows events matching `patterns`.
    pub async fn watch(&self, patterns: &[&str]) -> EventWatch {
        self.client.watch(patterns).await.expect("watch events")
    }

    /// A broker connection of the test's own and a channel on it; the
    /// channel lives as long as the connection is kept.
    pub async fn open_channel(&self) -> (lapin::Connection, lapin::Channel) {
        let conn = warren_client::runtime::connect(&self.config.broker, "test")
            .await
            .expect("connect");
        let ch = conn.create_channel().await.expect("channel");
        (conn, ch)
    }

    /// A queue's messages ready and its consumers right now (AMQP passive
    /// declare: exact), or `None` if it does not exist.
    pub async fn peek(&self, queue: &str) -> Option<(u32, u32)> {
        let (conn, ch) = self.open_channel().await;
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .ok();
        let _ = conn.close(200, "bye".into()).await;
        q.map(|q| (q.message_count(), q.consumer_count()))
    }

    /// Messages ready in a queue right now (AMQP passive declare: exact).
    pub async fn depth(&self, queue: &str) -> u32 {
        self.peek(queue).await.expect("queue exists").0
    }

    /// Waits until a queue holds `n` messages ready.
    pub async fn wait_depth(&self, queue: &str, n: u32, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let d = self.depth(queue).await;
            if d == n {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "queue {queue} holds {d} messages, expected {n} within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Takes every message from a queue (acking them): `(properties, body)`.
    pub async fn drain(&self, queue: &str) -> Vec<(lapin::BasicProperties, Vec<u8>)> {
        let (conn, ch) = self.open_channel().await;
        let mut out = Vec::new();
        while let Some(m) = ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
        {
            out.push((m.delivery.properties.clone(), m.delivery.data.clone()));
        }
        let _ = conn.close(200, "bye".into()).await;
        out
    }
}

/// A broker user of one test, with a random name and password, deleted
/// when dropped (even when the test fails).
pub struct BrokerUser {
    /// The user name, `wt-<role>-<random>`.
    pub name: String,
    password: String,
}

impl BrokerUser {
    /// Creates user `wt-<label>-<random>` on the `/` vhost with the
    /// `configure`, `write` and `read` regexes of `perms`.
    pub async fn create(label: &str, perms: &warren_core::permissions::Permissions) -> BrokerUser {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let user = BrokerUser {
            name: format!("wt-{label}-{}", &suffix[..8]),
            password: suffix[8..24].to_owned(),
        };
        Mgmt::new()
            .add_user(
                &user.name,
                &user.password,
                [&perms.configure, &perms.write, &perms.read],
            )
            .await;
        user
    }

    /// The test broker's URL ([`broker_url`]) with this user's credentials.
    pub fn url(&self) -> String {
        let base = broker_url();
        let (scheme, rest) = base.split_once("://").expect("an AMQP URI");
        let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        format!("{scheme}://{}:{}@{host}", self.name, self.password)
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        let name = self.name.clone();
        // As for [`Env`]: not on the test's runtime, which must not block.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(Mgmt::new().delete_user(&name));
        })
        .join();
    }
}

/// The path of an env's configuration file ([`Env::config_file`]).
fn config_path(prefix: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{prefix}.toml"))
}

/// Collects events until every id in `ids` has a final event; panics with
/// what is missing after `timeout`. Returns each task's events in order.
/// `ids` may be `String`s or `&str`s: `&[&id]`, `&["task-1"]`, `&ids`.
pub async fn until_final(
    watch: &mut EventWatch,
    ids: &[impl AsRef<str>],
    timeout: Duration,
) -> HashMap<String, Vec<ReceivedEvent>> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut by_id: HashMap<String, Vec<ReceivedEvent>> = HashMap::new();
    let mut open: std::collections::HashSet<&str> = ids.iter().map(|id| id.as_ref()).collect();
    while !open.is_empty() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(got) = watch.next(left).await.expect("watch") else {
            let missing: Vec<_> = open.iter().take(5).collect();
            panic!(
                "{} of {} tasks had no final event within {timeout:?}; e.g. {missing:?}",
                open.len(),
                ids.len()
            );
        };
        if got.event.state.is_final() {
            open.remove(got.event.task_id.as_str());
        }
        by_id
            .entry(got.event.task_id.clone())
            .or_default()
            .push(got);
    }
    by_id
}

/// The most tasks running at once, from `[started, final)` intervals in
/// ms (ends before starts at the same millisecond: half-open).
pub fn most_at_once(runs: &[(i64, i64)]) -> usize {
    let mut edges: Vec<(i64, i32)> = Vec::new();
    for &(s, f) in runs {
        edges.push((s, 1));
        edges.push((f, -1));
    }
    edges.sort();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    most as usize
}

/// Unix milliseconds of an RFC 3339 time, such as an event's `at` or `due_at`.
pub fn unix_ms(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .unwrap_or_else(|e| panic!("{rfc3339:?} is not an RFC 3339 time: {e}"))
        .timestamp_millis()
}

/// A TCP port of 127.0.0.1 that is free right now (nothing listens on it).
pub fn free_port() -> u16 {
    // Below the kernel's ephemeral range (32768-60999 here): a port picked
    // from it may be taken by an outgoing connection's local end before
    // the server that was to listen on it (a test node) binds it.
    use rand::Rng;
    let mut rng = rand::thread_rng();
    for _ in 0..1000 {
        let port = rng.gen_range(20_000..32_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000-31999 on 127.0.0.1");
}

/// The states of a task's events, in order.
pub fn states(events: &[ReceivedEvent]) -> Vec<&'static str> {
    events.iter().map(|e| e.event.state.as_str()).collect()
}

/// The value of one sample line (series name with its labels, exactly as
/// written) of a Prometheus text exposition.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// `GET http://{addr}{path}`: status and body.
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    let r = reqwest::get(format!("http://{addr}{path}"))
        .await
        .unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"));
    (r.status().as_u16(), r.text().await.expect("body"))
}

/// Polls `/metrics` on `addr` until `series` reaches `at_least` (bounded by
/// `timeout`); returns the text.
pub async fn wait_metric(addr: &str, series: &str, at_least: f64, timeout: Duration) -> String {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let (_, text) = http_get(addr, "/metrics").await;
        if metric(&text, series).is_some_and(|v| v >= at_least) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} did not reach {at_least} within {timeout:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The final event of a task.
pub fn final_event(events: &[ReceivedEvent]) -> &Event {
    &events
        .iter()
        .rev()
        .find(|e| e.event.state.is_final())
        .expect("a final event")
        .event
}

/// The result of a task that succeeded (panics otherwise).
pub fn result_of(events: &[ReceivedEvent]) -> &serde_json::Value {
    let ev = final_event(events);
    assert_eq!(ev.state, warren_core::TaskState::Succeeded, "{ev:?}");
    ev.result.as_ref().expect("a result")
}

/// The `(kind, code, message)` of a task that ended dead (panics otherwise).
pub fn failure_of(events: &[ReceivedEvent]) -> (warren_core::event::ErrorKind, String, String) {
    let ev = final_event(events);
    assert_eq!(ev.state, warren_core::TaskState::Dead, "{ev:?}");
    let e = ev.error.as_ref().expect("an error");
    (e.kind, e.code.clone(), e.message.clone())
}

impl Env {
    /// Publishes `(name, type, args)` tasks with `max_retries` retries each
    /// and waits (bounded) for their final events; returns each task's
    /// events by name.
    pub async fn run_named(
        &self,
        max_retries: i64,
        tasks: Vec<(&'static str, &'static str, serde_json::Value)>,
    ) -> HashMap<&'static str, Vec<ReceivedEvent>> {
        let mut watch = self.watch(&["#"]).await;
        let mut by_name = Vec::new();
        for (name, task_type, args) in tasks {
            let request =
                TaskRequest::new(task_type, args).header_int("x-warren-max-retries", max_retries);
            by_name.push((name, self.publish(&request).await));
        }
        let ids: Vec<String> = by_name.iter().map(|(_, id)| id.clone()).collect();
        let mut got = until_final(&mut watch, &ids, T_LONG).await;
        by_name
            .into_iter()
            .map(|(name, id)| (name, got.remove(&id).expect("events of each task")))
            .collect()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(config_path(&self.prefix));
        let prefix = self.prefix.clone();
        // Cleanup runs on its own thread and runtime: Drop may run inside the
        // test's runtime, which must not be blocked on.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(Mgmt::new().delete_prefix(&prefix));
        })
        .join();
    }
}
