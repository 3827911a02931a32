//! Scenario `tracker`: how fast a real `warren tracker` stores a backlog of
//! status events in SQLite and in PostgreSQL, and how long `warren status ID`
//! takes when the database holds millions of tasks.
//!
//! Each measurement gets a database of its own (a SQLite file in a temporary
//! directory, or a PostgreSQL database created on the server of
//! [`TrackerOptions::postgres_url`]) and removes it afterwards. The schema is
//! always the tracker's own: [`Store::open`] applies its migrations before
//! anything is written.

use std::path::PathBuf;
use std::process::Stdio;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use lapin::options::{QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use rand::Rng;
use serde_json::json;
use sqlx::any::AnyConnectOptions;
use sqlx::{ConnectOptions, Connection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use warren_core::config::DatabaseUrl;
use warren_core::{Config, Event, TaskState};
use warren_tracker::{Backend, OpenMode, Store};

use crate::env::{BenchEnv, ConfirmWindow};
use crate::report::Row;
use crate::scenarios::bar;
use crate::stats::summarize;
use crate::{procstat, Options};

const MB: f64 = 1024.0 * 1024.0;

/// The task type of every generated task.
const TASK_TYPE: &str = "diag.echo";

/// The `worker` of every generated event (`host/pid`, as a worker writes it).
const WORKER: &str = "bench-host/4242";

/// Tasks written per transaction when filling a database.
const FILL_CHUNK: u64 = 250_000;

/// Options of the tracker scenario.
#[derive(Debug, Clone)]
pub struct TrackerOptions {
    /// Status events preloaded for the ingestion measurement (started and
    /// succeeded pairs of distinct tasks), per backend.
    pub events: usize,
    /// Tasks stored (each with its two events) before `warren status` is timed.
    pub tasks: u64,
    /// `warren status` runs timed per backend.
    pub status_runs: usize,
    /// A PostgreSQL server URL whose user may create and drop databases.
    pub postgres_url: String,
    /// Which backends to measure.
    pub backends: Vec<Backend>,
}

impl Default for TrackerOptions {
    fn default() -> Self {
        Self {
            events: 100_000,
            tasks: 10_000_000,
            status_runs: 50,
            postgres_url: "postgres://root@127.0.0.1:5432/postgres".into(),
            backends: vec![Backend::Sqlite, Backend::Postgres],
        }
    }
}

fn backend_name(b: Backend) -> &'static str {
    match b {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    }
}

/// Scenario `tracker`: ingestion rate per backend, then `warren status`
/// latency per backend over `tasks` stored tasks.
pub async fn tracker(base: &Config, opts: &Options) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &backend in &opts.tracker.backends {
        rows.extend(ingestion(base, opts, backend).await?);
    }
    for &backend in &opts.tracker.backends {
        rows.extend(status_latency(opts, backend).await?);
    }
    Ok(rows)
}

/// A connection without sqlx's statement logging: filling, creating and
/// dropping take seconds to minutes here, and that is expected.
async fn connect_quiet(url: &str) -> anyhow::Result<sqlx::AnyConnection> {
    Ok(AnyConnectOptions::from_str(url)?
        .disable_statement_logging()
        .connect()
        .await?)
}

/// A database of its own for one measurement.
struct ScratchDb {
    backend: Backend,
    url: DatabaseUrl,
    /// SQLite: the temporary directory holding the file.
    dir: Option<PathBuf>,
    /// PostgreSQL: the server URL to drop the database through, and its name.
    pg: Option<(String, String)>,
}

impl ScratchDb {
    async fn create(backend: Backend, opts: &TrackerOptions) -> anyhow::Result<Self> {
        sqlx::any::install_default_drivers();
        let tag = &uuid::Uuid::new_v4().simple().to_string()[..12];
        match backend {
            Backend::Sqlite => {
                let dir = std::env::temp_dir().join(format!("warren-bench-tracker-{tag}"));
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("create {}", dir.display()))?;
                let url = DatabaseUrl::new(format!("sqlite://{}/tracker.db", dir.display()));
                Ok(ScratchDb {
                    backend,
                    url,
                    dir: Some(dir),
                    pg: None,
                })
            }
            Backend::Postgres => {
                let server = opts.postgres_url.clone();
                let name = format!("warren_bench_{tag}");
                let mut admin = connect_quiet(&server).await.with_context(|| {
                    format!(
                        "connect to PostgreSQL at {} (set --tracker-postgres, or \
                             --tracker-backends sqlite)",
                        warren_core::config::redact_url(&server)
                    )
                })?;
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut admin)
                    .await
                    .context("create the bench database")?;
                let _ = admin.close().await;
                Ok(ScratchDb {
                    backend,
                    url: DatabaseUrl::new(database_url(&server, &name)?),
                    dir: None,
                    pg: Some((server, name)),
                })
            }
        }
    }

    /// Bytes on disk.
    async fn size(&self) -> anyhow::Result<u64> {
        if let Some(dir) = &self.dir {
            let mut total = 0;
            for e in std::fs::read_dir(dir)? {
                total += e?.metadata()?.len();
            }
            return Ok(total);
        }
        let mut conn = connect_quiet(self.url.expose()).await?;
        let row = sqlx::query("SELECT pg_database_size(current_database()) AS n")
            .fetch_one(&mut conn)
            .await?;
        let _ = conn.close().await;
        Ok(sqlx::Row::try_get::<i64, _>(&row, 0)? as u64)
    }

    async fn remove(self) -> anyhow::Result<()> {
        if let Some(dir) = &self.dir {
            std::fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))?;
        }
        if let Some((server, name)) = &self.pg {
            let mut admin = connect_quiet(server).await?;
            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut admin)
                .await
                .with_context(|| format!("drop database {name}"))?;
            let _ = admin.close().await;
        }
        Ok(())
    }
}

/// The server URL with its database replaced by `name` (query kept).
fn database_url(server: &str, name: &str) -> anyhow::Result<String> {
    let scheme_end = server.find("://").context("a postgres:// URL")? + 3;
    let (head, query) = match server.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (server, None),
    };
    let host_end = head[scheme_end..]
        .find('/')
        .map_or(head.len(), |p| scheme_end + p);
    let mut url = format!("{}/{name}", &head[..host_end]);
    if let Some(q) = query {
        url.push('?');
        url.push_str(q);
    }
    Ok(url)
}

/// The properties a worker publishes an event with.
fn event_props(e: &Event) -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(e.event_id.as_str().into())
        .with_correlation_id(e.task_id.as_str().into())
        .with_type(e.task_type.as_str().into())
}

/// The `started` and `succeeded` events of one task, as a worker sends them.
fn task_events(i: usize) -> [Event; 2] {
    let task_id = warren_core::event::new_id();
    let mut started = Event::new(&task_id, TASK_TYPE, TaskState::Started, 1);
    started.queue = Some("diag".into());
    started.worker = Some(WORKER.into());
    let mut done = Event::new(&task_id, TASK_TYPE, TaskState::Succeeded, 1);
    done.queue = started.queue.clone();
    done.worker = started.worker.clone();
    done.duration_ms = Some(1);
    done.result = Some(json!({ "i": i }));
    [started, done]
}

/// The environment variable the bench's tracker reads its token from.
const BENCH_TOKEN_VAR: &str = "WARREN_BENCH_TRACKER_TOKEN";

/// A free loopback port for the tracker's HTTP server.
fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("find a free port")?;
    Ok(l.local_addr()?.port())
}

/// Sum of `warren_tracker_events_ingested_total` on the tracker's /metrics.
async fn ingested(port: u16) -> anyhow::Result<u64> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut body)).await??;
    Ok(sum_ingested(&body))
}

fn sum_ingested(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("warren_tracker_events_ingested_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// One ingestion measurement.
struct Ingest {
    from_start_s: f64,
    after_first_s: f64,
    after_first_events: u64,
    cpu_s: f64,
    peak_rss: u64,
}

/// Preloads the tracker's queue with `events` status events, starts a real
/// `warren tracker` on a fresh database and times it until all are committed.
async fn ingestion(base: &Config, opts: &Options, backend: Backend) -> anyhow::Result<Vec<Row>> {
    let pairs = (opts.tracker.events / 2).max(1);
    let n = pairs * 2;
    let mut env = BenchEnv::new(base, opts.config_path.clone()).await?;
    let config = env.config.clone();
    let queue = warren_tracker::tracker_queue(&env.names());
    let db = match ScratchDb::create(backend, &opts.tracker).await {
        Ok(db) => db,
        Err(e) => {
            env.cleanup().await?;
            return Err(e);
        }
    };
    let measured = ingest_into(&mut env, &db, &queue, pairs).await;
    // The tracker stops first (it would declare its queue again), then the
    // prefix's topology goes, then the tracker's queue and the database.
    let cleaned = env.cleanup().await;
    let deleted = delete_queue(&config, &queue).await;
    let removed = db.remove().await;
    let m = measured?;
    cleaned?;
    deleted?;
    removed?;
    let s = format!("tracker {}", backend_name(backend));
    let rate = n as f64 / m.from_start_s;
    Ok(vec![
        Row::new(
            &s,
            &format!("ingest {n} queued events, from process start"),
            "events/s",
            rate,
        ),
        Row::new(
            &s,
            "ingest after the first commit",
            "events/s",
            m.after_first_events as f64 / m.after_first_s.max(1e-3),
        ),
        Row::new(
            &s,
            "tasks/s kept up with (2 events per task)",
            "tasks/s",
            rate / 2.0,
        ),
        Row::new(
            &s,
            "tracker CPU per 1000 events",
            "ms",
            m.cpu_s * 1e6 / n as f64,
        ),
        Row::new(&s, "tracker peak RSS", "MB", m.peak_rss as f64 / MB),
    ])
}

async fn ingest_into(
    env: &mut BenchEnv,
    db: &ScratchDb,
    queue: &str,
    pairs: usize,
) -> anyhow::Result<Ingest> {
    let n = pairs * 2;
    let names = env.names();
    let events_x = names.events();
    let ch = env.client.channel().await?;
    // The tracker's queue as the tracker declares it: durable, bound with `#`.
    ch.channel()
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    ch.channel()
        .queue_bind(
            queue.into(),
            events_x.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut confirms = ConfirmWindow::new(512, bar(n as u64, "tracker: preload"));
    for i in 0..pairs {
        for e in task_events(i) {
            let c = ch
                .send(&events_x, &e.routing_key(), &e.to_json(), event_props(&e))
                .await?;
            confirms.push(c).await?;
        }
    }
    confirms.finish().await?;
    let depth = env.depth(queue).await? as usize;
    if depth != n {
        bail!("{queue} holds {depth} events after preloading {n}");
    }

    let port = free_port()?;
    // The tracker refuses to serve without credentials; the bench reads
    // only /metrics, which needs none, so one random read token will do.
    let vars = vec![
        ("WARREN__TRACKER__DATABASE_URL", db.url.expose().to_owned()),
        ("WARREN__TRACKER__LISTEN", format!("127.0.0.1:{port}")),
        (
            "WARREN__TRACKER__TOKENS",
            format!("bench:read:env:{BENCH_TOKEN_VAR}"),
        ),
        (BENCH_TOKEN_VAR, uuid::Uuid::new_v4().simple().to_string()),
    ];
    let b = bar(n as u64, "tracker: ingest");
    let start = Instant::now();
    let pid = env.spawn(&["tracker"], &vars)?;
    let mut first: Option<(Instant, u64)> = None;
    let mut seen = 0;
    let mut progress_at = Instant::now();
    let mut peak_rss = 0;
    let done = loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Some(s) = procstat::sample(pid) {
            peak_rss = peak_rss.max(s.hwm);
        }
        let now = Instant::now();
        let got = ingested(port).await.unwrap_or(0);
        if got > 0 && first.is_none() {
            first = Some((now, got));
        }
        if got > seen {
            seen = got;
            progress_at = now;
            b.set_position(got);
        }
        if got >= n as u64 {
            break now;
        }
        if progress_at.elapsed() > Duration::from_secs(60) {
            bail!("the tracker stored {seen} of {n} events, then nothing for 60 s");
        }
    };
    b.finish_and_clear();
    let sample = procstat::sample(pid).context("sample the tracker")?;
    env.stop(pid).await;
    // Every event was acknowledged, and the tasks are all there.
    let left = env.depth(queue).await?;
    if left != 0 {
        bail!("{left} events left in {queue} after the tracker stored {n}");
    }
    let store = Store::open(&db.url, OpenMode::Existing).await?;
    let counts = store.state_counts().await?;
    store.close().await;
    let succeeded = counts.get("succeeded").copied().unwrap_or(0);
    if succeeded != pairs as i64 {
        bail!("the tracker stored {succeeded} succeeded tasks, expected {pairs}: {counts:?}");
    }
    let (first_at, first_n) = first.unwrap_or((done, 0));
    Ok(Ingest {
        from_start_s: (done - start).as_secs_f64(),
        after_first_s: (done - first_at).as_secs_f64(),
        after_first_events: n as u64 - first_n,
        cpu_s: sample.cpu_s,
        peak_rss: peak_rss.max(sample.hwm),
    })
}

pub(crate) async fn delete_queue(config: &Config, queue: &str) -> anyhow::Result<()> {
    let conn = warren_client::runtime::connect(&config.broker, "bench").await?;
    let ch = conn.create_channel().await?;
    ch.queue_delete(queue.into(), QueueDeleteOptions::default())
        .await?;
    let _ = conn.close(200, "cleaned".into()).await;
    Ok(())
}

/// The id of generated task `i` (UUID-shaped, ascending with `i`, as UUID v7
/// ids are in time).
pub fn fill_task_id(i: u64) -> String {
    format!("01938000-0000-7000-8000-{i:012x}")
}

/// SQL spellings that differ between the engines.
struct Dialect(Backend);

impl Dialect {
    fn hex12(&self, e: &str) -> String {
        match self.0 {
            Backend::Sqlite => format!("printf('%012x', {e})"),
            Backend::Postgres => format!("lpad(to_hex({e}), 12, '0')"),
        }
    }

    fn pad20(&self, e: &str) -> String {
        match self.0 {
            Backend::Sqlite => format!("printf('%020d', {e})"),
            Backend::Postgres => format!("lpad(CAST({e} AS TEXT), 20, '0')"),
        }
    }

    /// Unix ms as the contract writes times: `2026-11-24T10:00:00.123Z`.
    fn iso(&self, e: &str) -> String {
        match self.0 {
            Backend::Sqlite => format!(
                "strftime('%Y-%m-%dT%H:%M:%S', {e} / 1000, 'unixepoch') || '.' || \
                 printf('%03d', {e} % 1000) || 'Z'"
            ),
            Backend::Postgres => format!(
                "to_char(to_timestamp({e} / 1000) AT TIME ZONE 'UTC', \
                 'YYYY-MM-DD\"T\"HH24:MI:SS') || '.' || lpad(CAST({e} % 1000 AS TEXT), 3, '0') \
                 || 'Z'"
            ),
        }
    }

    /// `FROM` a series of integers `lo..hi` named `col`.
    fn series(&self, col: &str, lo: u64, hi: u64) -> (String, String) {
        match self.0 {
            Backend::Sqlite => (
                format!(
                    "WITH RECURSIVE s({col}) AS (SELECT {lo} UNION ALL SELECT {col} + 1 FROM s \
                     WHERE {col} + 1 < {hi}) "
                ),
                "s".to_owned(),
            ),
            Backend::Postgres => (
                String::new(),
                format!(
                    "generate_series(CAST({lo} AS BIGINT), {}) AS s({col})",
                    hi - 1
                ),
            ),
        }
    }
}

/// Tasks `lo..hi`: task `i` started at `base + i` ms and succeeded 2 ms later;
/// the rows are what the tracker stores for those two events.
fn fill_tasks_sql(d: &Dialect, lo: u64, hi: u64, base_ms: i64) -> String {
    let (with, from) = d.series("i", lo, hi);
    let tid = format!("'01938000-0000-7000-8000-' || {}", d.hex12("i"));
    let e0 = format!("'01938000-0001-7000-8000-' || {}", d.hex12("2 * i"));
    let e1 = format!("'01938000-0001-7000-8000-' || {}", d.hex12("2 * i + 1"));
    let v = format!(
        "SELECT i, {tid} AS tid, {e0} AS e0, {e1} AS e1, {base_ms} + i AS sa, \
         {base_ms} + i + 2 AS fa FROM {from}"
    );
    let w = format!(
        "SELECT v.*, {} || '|' || e0 AS ks, {} || '|' || e1 AS kf FROM ({v}) v",
        d.pad20("sa"),
        d.pad20("fa")
    );
    format!(
        "INSERT INTO tasks (task_id, type, state, state_key, attempts, queue, worker, \
         first_seen, last_at, started_at, finished_at, duration_ms, error, error_at, result, \
         reason, due_at, events, merge_keys) {with}\
         SELECT tid, '{TASK_TYPE}', 'succeeded', \
         '1|00000000000000000000|' || {fa20} || '|4|' || e1, 1, 'diag', '{WORKER}', \
         sa, fa, sa, fa, 2, NULL, NULL, '{{\"i\":' || CAST(i AS TEXT) || '}}', NULL, NULL, 2, \
         '{{\"duration\":\"' || kf || '\",\"queue\":\"' || kf || '\",\"result\":\"' || kf || \
         '\",\"started\":\"00000000000000000001|' || ks || '\",\"worker\":\"' || kf || '\"}}' \
         FROM ({w}) w",
        fa20 = d.pad20("fa"),
    )
}

/// The events of tasks `lo..hi` (event `j` belongs to task `j / 2`).
fn fill_events_sql(d: &Dialect, lo: u64, hi: u64, base_ms: i64, ingested_ms: i64) -> String {
    let (with, from) = d.series("j", 2 * lo, 2 * hi);
    let v = format!(
        "SELECT j / 2 AS i, j % 2 AS k, '01938000-0001-7000-8000-' || {eid} AS eid, \
         '01938000-0000-7000-8000-' || {tid} AS tid, {base_ms} + j / 2 + 2 * (j % 2) AS ts \
         FROM {from}",
        eid = d.hex12("j"),
        tid = d.hex12("j / 2"),
    );
    let state = "CASE k WHEN 0 THEN 'started' ELSE 'succeeded' END";
    format!(
        "INSERT INTO events (event_id, task_id, at, state, type, attempt, body, ingested_at) \
         {with}SELECT eid, tid, ts, {state}, '{TASK_TYPE}', 1, \
         '{{\"event_id\":\"' || eid || '\",\"task_id\":\"' || tid || \
         '\",\"type\":\"{TASK_TYPE}\",\"state\":\"' || {state} || \
         '\",\"attempt\":1,\"queue\":\"diag\",\"worker\":\"{WORKER}\",\"at\":\"' || {iso} || \
         '\",\"duration_ms\":' || CASE k WHEN 0 THEN 'null' ELSE '2' END || ',\"result\":' || \
         CASE k WHEN 0 THEN 'null' ELSE '{{\"i\":' || CAST(i AS TEXT) || '}}' END || \
         ',\"error\":null,\"reason\":null,\"due_at\":null}}', {ingested_ms} FROM ({v}) v",
        iso = d.iso("ts"),
    )
}

/// Fills an empty tracker database (schema applied) with `tasks` succeeded
/// tasks and their events, in transactions of [`FILL_CHUNK`] tasks.
pub async fn fill(
    backend: Backend,
    url: &DatabaseUrl,
    tasks: u64,
    base_ms: i64,
    mut progress: impl FnMut(u64),
) -> anyhow::Result<()> {
    sqlx::any::install_default_drivers();
    let d = Dialect(backend);
    let mut conn = connect_quiet(url.expose()).await?;
    let setup: &[&str] = match backend {
        // No journal while filling (the file is thrown away if this fails),
        // then back to the WAL the tracker uses.
        Backend::Sqlite => &[
            "PRAGMA journal_mode = OFF",
            "PRAGMA synchronous = OFF",
            "PRAGMA cache_size = -1048576",
        ],
        Backend::Postgres => &["SET synchronous_commit = off"],
    };
    for s in setup {
        sqlx::query(s).execute(&mut conn).await?;
    }
    let ingested_ms = chrono::Utc::now().timestamp_millis();
    let mut lo = 0;
    while lo < tasks {
        let hi = (lo + FILL_CHUNK).min(tasks);
        let mut tx = conn.begin().await?;
        sqlx::query(&fill_tasks_sql(&d, lo, hi, base_ms))
            .execute(&mut *tx)
            .await
            .context("fill tasks")?;
        sqlx::query(&fill_events_sql(&d, lo, hi, base_ms, ingested_ms))
            .execute(&mut *tx)
            .await
            .context("fill events")?;
        tx.commit().await?;
        lo = hi;
        progress(lo);
    }
    sqlx::query(
        "INSERT INTO state_counts (state, n) VALUES ('succeeded', $1) \
         ON CONFLICT (state) DO UPDATE SET n = state_counts.n + excluded.n",
    )
    .bind(tasks as i64)
    .execute(&mut conn)
    .await?;
    let finish: &[&str] = match backend {
        Backend::Sqlite => &["PRAGMA journal_mode = WAL", "ANALYZE"],
        Backend::Postgres => &["ANALYZE"],
    };
    for s in finish {
        sqlx::query(s).execute(&mut conn).await?;
    }
    let _ = conn.close().await;
    Ok(())
}

/// Fills a fresh database with `tasks` tasks, then times `warren status`
/// child processes and the store's own queries on random stored ids.
async fn status_latency(opts: &Options, backend: Backend) -> anyhow::Result<Vec<Row>> {
    let db = ScratchDb::create(backend, &opts.tracker).await?;
    let out = status_on(opts, &db).await;
    let removed = db.remove().await;
    let rows = out?;
    removed?;
    Ok(rows)
}

async fn status_on(opts: &Options, db: &ScratchDb) -> anyhow::Result<Vec<Row>> {
    let tasks = opts.tracker.tasks.max(1);
    // The tracker's own schema, through its migrations.
    Store::open(&db.url, OpenMode::Create).await?.close().await;
    let base_ms = chrono::Utc::now().timestamp_millis() - tasks as i64 - 60_000;
    let b = bar(tasks, "tracker: fill");
    let t = Instant::now();
    fill(db.backend, &db.url, tasks, base_ms, |k| b.set_position(k)).await?;
    let fill_s = t.elapsed().as_secs_f64();
    b.finish_and_clear();
    let size = db.size().await?;

    let exe = std::env::current_exe().context("locate the warren binary")?;
    let mut rng = rand::thread_rng();
    let mut wall = Vec::with_capacity(opts.tracker.status_runs);
    let b = bar(opts.tracker.status_runs as u64, "tracker: status");
    for _ in 0..opts.tracker.status_runs {
        let id = fill_task_id(rng.gen_range(0..tasks));
        let mut cmd = tokio::process::Command::new(&exe);
        if let Some(p) = &opts.config_path {
            cmd.arg("--config").arg(p);
        }
        cmd.args(["status", &id])
            .env("WARREN__TRACKER__DATABASE_URL", db.url.expose())
            .env("WARREN_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let t = Instant::now();
        let out = cmd.output().await.context("run warren status")?;
        wall.push(t.elapsed().as_secs_f64() * 1000.0);
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !text.contains("succeeded") {
            bail!(
                "warren status {id} failed ({}): {}{}",
                out.status,
                text,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        b.inc(1);
    }
    b.finish_and_clear();

    // The same two queries in this process, on an open pool.
    let store = Store::open(&db.url, OpenMode::Existing).await?;
    let mut inproc = Vec::new();
    for _ in 0..opts.tracker.status_runs.max(1) * 20 {
        let id = fill_task_id(rng.gen_range(0..tasks));
        let t = Instant::now();
        let task = store.task(&id).await?;
        let history = store.history(&id).await?;
        inproc.push(t.elapsed().as_secs_f64() * 1000.0);
        if task.is_none() || history.len() != 2 {
            bail!("task {id} is not stored as filled");
        }
    }
    store.close().await;

    let wall = summarize(wall);
    let inproc = summarize(inproc);
    let s = format!("status {} {tasks}", backend_name(db.backend));
    Ok(vec![
        Row::new(
            &s,
            "fill (tasks + 2 events each, bulk SQL)",
            "tasks/s",
            tasks as f64 / fill_s,
        ),
        Row::new(&s, "database size", "MB", size as f64 / MB),
        Row::new(&s, "`warren status ID` wall p50", "ms", wall.p50),
        Row::new(&s, "`warren status ID` wall p99", "ms", wall.p99),
        Row::new(&s, "store task + history p50", "ms", inproc.p50),
        Row::new(&s, "store task + history p99", "ms", inproc.p99),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_tracker::{IncomingEvent, TaskRow};

    /// The id of generated event `j` (task `j / 2`; even: started, odd: succeeded).
    fn fill_event_id(j: u64) -> String {
        format!("01938000-0001-7000-8000-{j:012x}")
    }

    #[test]
    fn urls_and_metrics() {
        assert_eq!(
            database_url("postgres://root@127.0.0.1:5432/postgres", "b").unwrap(),
            "postgres://root@127.0.0.1:5432/b"
        );
        assert_eq!(
            database_url("postgres://u:p@h/postgres?sslmode=disable", "b").unwrap(),
            "postgres://u:p@h/b?sslmode=disable"
        );
        assert_eq!(database_url("postgres://h", "b").unwrap(), "postgres://h/b");
        let m = "# TYPE warren_tracker_events_ingested_total counter\n\
                 warren_tracker_events_ingested_total{state=\"started\",type=\"a\"} 3\n\
                 warren_tracker_events_ingested_total{state=\"succeeded\",type=\"a\"} 2\n\
                 warren_tracker_events_duplicate_total 7\n";
        assert_eq!(sum_ingested(m), 5);
        assert!(fill_task_id(9) < fill_task_id(10));
        assert!(fill_event_id(255) < fill_event_id(256));
    }

    /// The task and history the tracker itself makes of task `i`'s events.
    fn expected(i: u64, base_ms: i64) -> (TaskRow, Vec<serde_json::Value>) {
        let tid = fill_task_id(i);
        let mut events = Vec::new();
        for (k, state) in [(0, TaskState::Started), (1, TaskState::Succeeded)] {
            let mut e = Event::new(&tid, TASK_TYPE, state, 1);
            e.event_id = fill_event_id(2 * i + k);
            e.queue = Some("diag".into());
            e.worker = Some(WORKER.into());
            e.at = warren_tracker::record::format_ms(base_ms + i as i64 + 2 * k as i64);
            if state == TaskState::Succeeded {
                e.duration_ms = Some(2);
                e.result = Some(json!({ "i": i }));
            }
            events.push(IncomingEvent::from_event(e, 0));
        }
        let mut row = TaskRow::empty(&tid, TASK_TYPE);
        for e in &events {
            row.apply(e);
        }
        let bodies = events
            .iter()
            .map(|e| serde_json::from_str(&e.body).unwrap())
            .collect();
        (row, bodies)
    }

    async fn fill_matches_the_tracker(backend: Backend, opts: &TrackerOptions) {
        let db = ScratchDb::create(backend, opts).await.unwrap();
        Store::open(&db.url, OpenMode::Create)
            .await
            .unwrap()
            .close()
            .await;
        let base_ms = 1_764_150_000_123;
        fill(backend, &db.url, 300, base_ms, |_| {}).await.unwrap();
        let store = Store::open(&db.url, OpenMode::Existing).await.unwrap();
        for i in [0, 7, 299] {
            let (row, bodies) = expected(i, base_ms);
            let id = fill_task_id(i);
            assert_eq!(store.task(&id).await.unwrap(), Some(row), "task {i}");
            let history: Vec<_> = store
                .history(&id)
                .await
                .unwrap()
                .into_iter()
                .map(|h| h.event)
                .collect();
            assert_eq!(history, bodies, "history of task {i}");
        }
        assert!(store.task(&fill_task_id(300)).await.unwrap().is_none());
        assert_eq!(
            store.state_counts().await.unwrap().get("succeeded"),
            Some(&300)
        );
        store.close().await;
        assert!(db.size().await.unwrap() > 0);
        db.remove().await.unwrap();
    }

    #[tokio::test]
    async fn sqlite_fill_matches_what_the_tracker_stores() {
        fill_matches_the_tracker(Backend::Sqlite, &TrackerOptions::default()).await;
    }

    /// PostgreSQL on 127.0.0.1:5432 (trust auth), or WARREN_TEST_POSTGRES.
    #[tokio::test]
    async fn postgres_fill_matches_what_the_tracker_stores() {
        let mut opts = TrackerOptions::default();
        if let Ok(url) = std::env::var("WARREN_TEST_POSTGRES") {
            opts.postgres_url = url;
        }
        fill_matches_the_tracker(Backend::Postgres, &opts).await;
    }
}
