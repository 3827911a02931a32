//! The tracker's database: SQLite (one file, WAL) or PostgreSQL, through
//! sqlx's `Any` driver so both run the same statements.
//!
//! Writes are batched: [`Store::write_batch`] stores a batch of events in one
//! transaction: events new by id go to the history, the tasks they concern
//! are read, merged ([`TaskRow::apply`]) and written back, and the per-state
//! counts move with them. One process writes at a time (a lock here; on
//! PostgreSQL also a transaction-scoped advisory lock, so several trackers
//! may share one database). Pruning deletes old tasks in small transactions
//! that take the same lock, so ingestion waits at most one of them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, Row, Transaction};
use warren_core::config::DatabaseUrl;

use crate::record::{IncomingEvent, TaskRow};

/// Rows per multi-row statement on SQLite. With anonymous `?` parameters
/// (see [`Backend::params`]) binding is linear, and larger statements parse
/// less (`warren bench tracker`: 100 rows ~11.4k events/s against ~8.9k
/// with 16).
const SQLITE_ROWS_PER_STATEMENT: usize = 100;

/// Rows per multi-row statement on PostgreSQL, where each statement is a
/// round trip (measured: 100 rows ~12k events/s, 10 rows ~7k).
const POSTGRES_ROWS_PER_STATEMENT: usize = 100;

/// PostgreSQL advisory lock key that serializes tracker writes ("warren" in ASCII).
const PG_WRITE_LOCK: i64 = 0x7761_7272_656e;

/// Columns of `tasks`, in the order [`bind_task`] binds them.
const TASK_COLUMNS: [&str; 22] = [
    "task_id",
    "type",
    "state",
    "state_key",
    "attempts",
    "queue",
    "worker",
    "first_seen",
    "last_at",
    "started_at",
    "finished_at",
    "duration_ms",
    "error",
    "error_at",
    "result",
    "reason",
    "due_at",
    "events",
    "merge_keys",
    "priority",
    "workflow_id",
    "parent_id",
];

fn task_columns() -> &'static [&'static str] {
    &TASK_COLUMNS
}

/// Which database engine a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// One SQLite file.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

/// Whether opening may create the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// The tracker: create the SQLite file (and its directory) if missing.
    Create,
    /// Readers (`warren status`, `warren tasks`): the database must exist.
    Existing,
}

/// What went wrong with the database; each names it (password hidden).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A statement or connection failed.
    #[error("tracker database {url}: {source}")]
    Db {
        /// The database URL, password hidden.
        url: String,
        /// What sqlx said.
        source: sqlx::Error,
    },
    /// The schema could not be brought up to date.
    #[error("tracker database {url}: cannot apply the schema migrations: {source}")]
    Migrate {
        /// The database URL, password hidden.
        url: String,
        /// What the migrator said.
        source: sqlx::migrate::MigrateError,
    },
    /// The SQLite file's directory could not be created.
    #[error("tracker database {url}: cannot create directory {}: {source}", dir.display())]
    CreateDir {
        /// The database URL.
        url: String,
        /// The directory.
        dir: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// A reader asked for a SQLite file that does not exist.
    #[error(
        "no tracker database at {}: start `warren tracker` (or `warren up`) to create it, \
         or set tracker.database_url to the tracker's database",
        path.display()
    )]
    Missing {
        /// The file.
        path: PathBuf,
    },
}

/// What a batch write did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// New events by `(state, type)`.
    pub ingested: BTreeMap<(String, String), u64>,
    /// Events already stored (same event id), skipped.
    pub duplicates: u64,
    /// Distinct tasks written.
    pub tasks: usize,
    /// Attempt durations of new `succeeded` and `failed` events:
    /// `(type, outcome, milliseconds)`.
    pub durations: Vec<(String, &'static str, u64)>,
    /// New `failed` events that will be retried, by type.
    pub retries: BTreeMap<String, u64>,
    /// New `dead` events by `(type, reason)`.
    pub dead: BTreeMap<(String, String), u64>,
    /// Enqueue→start waits of first attempts whose `queued` or `scheduled`
    /// record came before their `started` event: `(type, milliseconds)`
    /// from publication (or the due time, if later) to the start.
    pub waits: Vec<(String, i64)>,
}

impl BatchReport {
    /// Counts what a new event says about the fleet's tasks.
    fn observe(&mut self, e: &warren_core::Event) {
        use warren_core::TaskState;
        let t = &e.task_type;
        match e.state {
            TaskState::Succeeded | TaskState::Failed => {
                if let Some(ms) = e.duration_ms {
                    self.durations.push((t.clone(), e.state.as_str(), ms));
                }
                if e.retry == Some(true) {
                    *self.retries.entry(t.clone()).or_default() += 1;
                }
            }
            TaskState::Dead => {
                let reason = e.reason.clone().unwrap_or_else(|| "unknown".into());
                *self.dead.entry((t.clone(), reason)).or_default() += 1;
            }
            _ => {}
        }
    }
}

/// The enqueue→start wait of a task's first attempt that `e` completes,
/// given what `row` held before it: a `started` event after the task's
/// `queued` or `scheduled` record (from publication, or the due time if
/// later, to the start), or a `queued` record read after a start that
/// was the first thing known of the task (the tracker reads the copies of
/// published tasks on their own queue, and may read a fast task's start
/// first). Never negative.
fn first_wait(row: &TaskRow, e: &IncomingEvent) -> Option<i64> {
    use warren_core::TaskState;
    if e.event.attempt != 1 || row.events == 0 {
        return None;
    }
    match e.event.state {
        TaskState::Started
            if row.started_at.is_none() && matches!(row.state.as_str(), "queued" | "scheduled") =>
        {
            let due = row.due_at.as_deref().and_then(crate::record::parse_time_ms);
            let ready = row.first_seen.max(due.unwrap_or(i64::MIN));
            Some((e.at_ms - ready).max(0))
        }
        TaskState::Queued if row.attempts <= 1 => {
            let started = row.started_at?;
            (row.first_seen >= started).then(|| (started - e.at_ms).max(0))
        }
        _ => None,
    }
}

/// Which tasks a listing shows.
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    /// Exact state, or several separated by commas (`queued,scheduled`).
    pub state: Option<String>,
    /// Exact task type.
    pub task_type: Option<String>,
    /// Exact short queue name.
    pub queue: Option<String>,
    /// Only tasks with an event at or after this time (Unix ms).
    pub since_ms: Option<i64>,
    /// At most this many, latest first.
    pub limit: i64,
}

/// An operator's action, to record.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAction {
    /// When (Unix ms).
    pub at_ms: i64,
    /// Who: the token's or dashboard user's name (`anonymous` when open).
    pub actor: String,
    /// Their role (`admin`).
    pub role: String,
    /// How they were authenticated: `session`, `token` or `open`.
    pub via: String,
    /// What: `cancel`, `priority`, `run_now`, `replay`, `pause`, `resume`.
    pub action: String,
    /// On what: a task id, `queue:<name>` or `type:<name>`.
    pub target: String,
    /// The request's particulars (new priority, replay filter, ...).
    pub detail: Value,
    /// How it ended: `sent`, `replayed 1`, or why it was refused or failed.
    pub outcome: String,
    /// Whether it was carried out.
    pub ok: bool,
}

/// A recorded action, as the API shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ActionRecord {
    /// Its number, in recording order.
    pub id: i64,
    /// When (RFC 3339, UTC).
    pub at: String,
    /// Who.
    pub actor: String,
    /// Their role.
    pub role: String,
    /// `session`, `token` or `open`.
    pub via: String,
    /// What.
    pub action: String,
    /// On what.
    pub target: String,
    /// Particulars.
    pub detail: Value,
    /// How it ended.
    pub outcome: String,
    /// Whether it was carried out.
    pub ok: bool,
}

/// One stored event of a task's history.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryEntry {
    /// The event as received (result capped).
    pub event: Value,
    /// When the tracker stored it (Unix ms).
    pub ingested_at: i64,
}

/// The tracker's database.
#[derive(Debug)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    url: String,
    write_lock: tokio::sync::Mutex<()>,
}

impl Store {
    /// Connects, creating the SQLite file with `OpenMode::Create`, and
    /// applies the schema migrations (idempotent).
    pub async fn open(url: &DatabaseUrl, mode: OpenMode) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let redacted = url.redacted();
        let (backend, connect_url) = match url.sqlite_path() {
            Some(path) => {
                if mode == OpenMode::Existing && !path.exists() {
                    return Err(StoreError::Missing { path });
                }
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
                        url: redacted.clone(),
                        dir: dir.to_owned(),
                        source,
                    })?;
                }
                (Backend::Sqlite, sqlite_connect_url(url.expose(), mode))
            }
            None => (Backend::Postgres, url.expose().to_owned()),
        };
        let db_err = |source| StoreError::Db {
            url: redacted.clone(),
            source,
        };
        let options = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 4 } else { 8 })
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        for pragma in [
                            "PRAGMA journal_mode = WAL",
                            "PRAGMA synchronous = NORMAL",
                            "PRAGMA busy_timeout = 10000",
                        ] {
                            sqlx::query(pragma).execute(&mut *conn).await?;
                        }
                    }
                    Ok(())
                })
            });
        let pool = options.connect(&connect_url).await.map_err(db_err)?;
        let store = Store {
            pool,
            backend,
            url: redacted,
            write_lock: tokio::sync::Mutex::new(()),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// The engine in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The URL, password hidden.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Rows per multi-row statement for this engine.
    fn rows_per_statement(&self) -> usize {
        match self.backend {
            Backend::Sqlite => SQLITE_ROWS_PER_STATEMENT,
            Backend::Postgres => POSTGRES_ROWS_PER_STATEMENT,
        }
    }

    fn err(&self, source: sqlx::Error) -> StoreError {
        StoreError::Db {
            url: self.url.clone(),
            source,
        }
    }

    /// Applies the migrations; several processes starting at once on one
    /// SQLite file may race, so a failure is retried a few times.
    async fn migrate(&self) -> Result<(), StoreError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let outcome = match self.backend {
                Backend::Sqlite => sqlx::migrate!("./migrations/sqlite").run(&self.pool).await,
                Backend::Postgres => {
                    sqlx::migrate!("./migrations/postgres")
                        .run(&self.pool)
                        .await
                }
            };
            match outcome {
                Ok(()) => return Ok(()),
                Err(_) if attempt < 5 => {
                    tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                }
                Err(source) => {
                    return Err(StoreError::Migrate {
                        url: self.url.clone(),
                        source,
                    })
                }
            }
        }
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// Closes every connection.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    async fn begin_write(&self) -> Result<Transaction<'static, Any>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(|e| self.err(e))?;
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT 1 AS locked FROM pg_advisory_xact_lock($1)")
                .bind(PG_WRITE_LOCK)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.err(e))?;
        }
        Ok(tx)
    }

    /// Stores a batch of events in one transaction (see the module docs).
    /// Nothing is written if it fails.
    pub async fn write_batch(&self, events: &[IncomingEvent]) -> Result<BatchReport, StoreError> {
        let _guard = self.write_lock.lock().await;
        let mut tx = self.begin_write().await?;
        let report = self
            .write_batch_in(&mut tx, events)
            .await
            .map_err(|e| self.err(e))?;
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(report)
    }

    async fn write_batch_in(
        &self,
        tx: &mut Transaction<'static, Any>,
        events: &[IncomingEvent],
    ) -> Result<BatchReport, sqlx::Error> {
        let per_statement = self.rows_per_statement();
        let mut report = BatchReport::default();
        let mut seen = HashSet::new();
        let unique: Vec<&IncomingEvent> = events
            .iter()
            .filter(|e| seen.insert(e.event.event_id.as_str()))
            .collect();

        let now = chrono::Utc::now().timestamp_millis();
        let mut fresh_ids: HashSet<String> = HashSet::new();
        for chunk in unique.chunks(per_statement) {
            let sql = format!(
                "INSERT INTO events (event_id, task_id, at, state, type, attempt, body, \
                 ingested_at) VALUES {} ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
                self.backend.placeholders(chunk.len(), 8)
            );
            let mut q = sqlx::query(&sql).persistent(false);
            for e in chunk {
                q = q
                    .bind(e.event.event_id.clone())
                    .bind(e.event.task_id.clone())
                    .bind(e.at_ms)
                    .bind(e.event.state.as_str())
                    .bind(e.event.task_type.clone())
                    .bind(e.event.attempt)
                    .bind(e.body.clone())
                    .bind(now);
            }
            for row in q.fetch_all(&mut **tx).await? {
                fresh_ids.insert(row.try_get::<String, _>(0)?);
            }
        }
        let fresh: Vec<&IncomingEvent> = unique
            .into_iter()
            .filter(|e| fresh_ids.contains(&e.event.event_id))
            .collect();
        report.duplicates = (events.len() - fresh.len()) as u64;
        if fresh.is_empty() {
            return Ok(report);
        }

        let mut task_ids: Vec<&str> = fresh.iter().map(|e| e.event.task_id.as_str()).collect();
        task_ids.sort_unstable();
        task_ids.dedup();
        let mut rows: HashMap<String, TaskRow> = HashMap::new();
        for chunk in task_ids.chunks(per_statement) {
            let sql = format!(
                "SELECT {} FROM tasks WHERE task_id IN ({})",
                task_columns().join(", "),
                self.backend.params(1, chunk.len())
            );
            let mut q = sqlx::query(&sql).persistent(false);
            for id in chunk {
                q = q.bind(*id);
            }
            for row in q.fetch_all(&mut **tx).await? {
                let task = read_task(&row)?;
                rows.insert(task.task_id.clone(), task);
            }
        }
        let before: HashMap<String, String> = rows
            .iter()
            .map(|(id, r)| (id.clone(), r.state.clone()))
            .collect();
        for e in &fresh {
            let row = rows
                .entry(e.event.task_id.clone())
                .or_insert_with(|| TaskRow::empty(&e.event.task_id, &e.event.task_type));
            if let Some(ms) = first_wait(row, e) {
                report.waits.push((e.event.task_type.clone(), ms));
            }
            row.apply(e);
            *report
                .ingested
                .entry((e.event.state.as_str().to_owned(), e.event.task_type.clone()))
                .or_default() += 1;
            report.observe(&e.event);
        }
        let mut deltas: BTreeMap<String, i64> = BTreeMap::new();
        for (id, row) in &rows {
            match before.get(id) {
                Some(old) if *old == row.state => {}
                Some(old) => {
                    *deltas.entry(old.clone()).or_default() -= 1;
                    *deltas.entry(row.state.clone()).or_default() += 1;
                }
                None => *deltas.entry(row.state.clone()).or_default() += 1,
            }
        }
        report.tasks = rows.len();

        let changed: Vec<&TaskRow> = rows.values().collect();
        let updates = task_columns()[1..]
            .iter()
            .map(|c| format!("{c} = excluded.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        for chunk in changed.chunks(per_statement) {
            let sql = format!(
                "INSERT INTO tasks ({}) VALUES {} ON CONFLICT (task_id) DO UPDATE SET {updates}",
                task_columns().join(", "),
                self.backend.placeholders(chunk.len(), task_columns().len())
            );
            let mut q = sqlx::query(&sql).persistent(false);
            for row in chunk {
                q = bind_task(q, row);
            }
            q.execute(&mut **tx).await?;
        }
        apply_deltas(tx, &deltas).await?;
        Ok(report)
    }

    /// One task, if known.
    pub async fn task(&self, task_id: &str) -> Result<Option<TaskRow>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(|e| self.err(e))?;
        self.task_in(&mut conn, task_id).await
    }

    /// One task, if known, and every stored event of it, read in one
    /// snapshot: the row counts exactly the events listed, whatever is
    /// ingested meanwhile.
    pub async fn task_with_history(
        &self,
        task_id: &str,
    ) -> Result<Option<(TaskRow, Vec<HistoryEntry>)>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(|e| self.err(e))?;
        if self.backend == Backend::Postgres {
            // Postgres' default (read committed) takes a snapshot per
            // statement; SQLite's read transaction keeps its first one.
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                .execute(&mut *tx)
                .await
                .map_err(|e| self.err(e))?;
        }
        let Some(row) = self.task_in(&mut tx, task_id).await? else {
            return Ok(None);
        };
        let history = self.history_in(&mut tx, task_id).await?;
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(Some((row, history)))
    }

    async fn task_in(
        &self,
        conn: &mut sqlx::AnyConnection,
        task_id: &str,
    ) -> Result<Option<TaskRow>, StoreError> {
        let sql = format!(
            "SELECT {} FROM tasks WHERE task_id = $1",
            task_columns().join(", ")
        );
        let row = sqlx::query(&sql)
            .bind(task_id)
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| self.err(e))?;
        row.map(|r| read_task(&r))
            .transpose()
            .map_err(|e| self.err(e))
    }

    /// The tasks of workflow `workflow_id` (contract section 8), first seen
    /// first, at most `limit`.
    pub async fn workflow(
        &self,
        workflow_id: &str,
        limit: i64,
    ) -> Result<Vec<TaskRow>, StoreError> {
        let sql = format!(
            "SELECT {} FROM tasks WHERE workflow_id = $1 ORDER BY first_seen, task_id LIMIT $2",
            task_columns().join(", ")
        );
        let rows = sqlx::query(&sql)
            .bind(workflow_id)
            .bind(limit.max(0))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        rows.iter()
            .map(read_task)
            .collect::<Result<_, _>>()
            .map_err(|e| self.err(e))
    }

    /// How many tasks of workflow `workflow_id` are in each state.
    pub async fn workflow_counts(
        &self,
        workflow_id: &str,
    ) -> Result<BTreeMap<String, i64>, StoreError> {
        let rows = sqlx::query(
            "SELECT state, COUNT(*) AS n FROM tasks WHERE workflow_id = $1 GROUP BY state",
        )
        .bind(workflow_id)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        let mut out = BTreeMap::new();
        for r in rows {
            let state: String = r.try_get(0).map_err(|e| self.err(e))?;
            let n: i64 = r.try_get(1).map_err(|e| self.err(e))?;
            out.insert(state, n);
        }
        Ok(out)
    }

    /// Every stored event of a task, oldest first.
    pub async fn history(&self, task_id: &str) -> Result<Vec<HistoryEntry>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(|e| self.err(e))?;
        self.history_in(&mut conn, task_id).await
    }

    async fn history_in(
        &self,
        conn: &mut sqlx::AnyConnection,
        task_id: &str,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT body, ingested_at FROM events WHERE task_id = $1 ORDER BY at, event_id",
        )
        .bind(task_id)
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| self.err(e))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let body: String = r.try_get(0).map_err(|e| self.err(e))?;
            out.push(HistoryEntry {
                event: serde_json::from_str(&body).unwrap_or(Value::String(body)),
                ingested_at: r.try_get(1).map_err(|e| self.err(e))?,
            });
        }
        let rank = |e: &HistoryEntry| {
            let state = e.event["state"].as_str().unwrap_or_default();
            ["queued", "scheduled", "started", "progress", "failed"]
                .iter()
                .position(|s| *s == state)
                .unwrap_or(5)
        };
        // Same millisecond: keep each attempt's life in order.
        out.sort_by_key(|e| {
            (
                e.event["at"].as_str().unwrap_or_default().to_owned(),
                e.event["attempt"].as_i64().unwrap_or(0),
                rank(e),
            )
        });
        Ok(out)
    }

    /// Tasks matching `filter`, latest event first.
    pub async fn list(&self, filter: &TaskFilter) -> Result<Vec<TaskRow>, StoreError> {
        let mut conditions = Vec::new();
        let mut n = 0;
        let mut next = || {
            n += 1;
            format!("${n}")
        };
        let states: Vec<&str> = filter
            .state
            .as_deref()
            .map(|s| {
                s.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        if !states.is_empty() {
            let list: Vec<String> = states.iter().map(|_| next()).collect();
            conditions.push(format!("state IN ({})", list.join(", ")));
        }
        if filter.task_type.is_some() {
            conditions.push(format!("type = {}", next()));
        }
        if filter.queue.is_some() {
            conditions.push(format!("queue = {}", next()));
        }
        if filter.since_ms.is_some() {
            conditions.push(format!("last_at >= {}", next()));
        }
        let limit = next();
        let sql = format!(
            "SELECT {} FROM tasks {} ORDER BY last_at DESC, task_id LIMIT {limit}",
            task_columns().join(", "),
            if conditions.is_empty() {
                String::new()
            } else {
                format!("WHERE {}", conditions.join(" AND "))
            }
        );
        let mut q = sqlx::query(&sql);
        for s in &states {
            q = q.bind(s.to_string());
        }
        if let Some(t) = &filter.task_type {
            q = q.bind(t.clone());
        }
        if let Some(queue) = &filter.queue {
            q = q.bind(queue.clone());
        }
        if let Some(since) = filter.since_ms {
            q = q.bind(since);
        }
        let rows = q
            .bind(filter.limit.max(0))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        rows.iter()
            .map(read_task)
            .collect::<Result<_, _>>()
            .map_err(|e| self.err(e))
    }

    /// Tasks with an error, latest error first.
    pub async fn recent_failures(&self, limit: i64) -> Result<Vec<TaskRow>, StoreError> {
        let sql = format!(
            "SELECT {} FROM tasks WHERE error_at IS NOT NULL ORDER BY error_at DESC, task_id \
             LIMIT $1",
            task_columns().join(", ")
        );
        let rows = sqlx::query(&sql)
            .bind(limit.max(0))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        rows.iter()
            .map(read_task)
            .collect::<Result<_, _>>()
            .map_err(|e| self.err(e))
    }

    /// How many tasks had their latest error at or after `since_ms` (Unix ms).
    pub async fn errors_since(&self, since_ms: i64) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) FROM tasks WHERE error_at >= $1")
            .bind(since_ms)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        row.try_get(0).map_err(|e| self.err(e))
    }

    /// How many tasks are in each state.
    pub async fn state_counts(&self) -> Result<BTreeMap<String, i64>, StoreError> {
        let rows = sqlx::query("SELECT state, n FROM state_counts WHERE n <> 0")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        let mut out = BTreeMap::new();
        for r in rows {
            let state: String = r.try_get(0).map_err(|e| self.err(e))?;
            let n: i64 = r.try_get(1).map_err(|e| self.err(e))?;
            out.insert(state, n);
        }
        Ok(out)
    }

    /// How many tasks of each of `types` are `queued` (published or
    /// released, not started), through the `(state, last_at)` index: the
    /// work grows with the queued tasks, not with the history.
    pub async fn queued_counts(
        &self,
        types: &[String],
    ) -> Result<BTreeMap<String, i64>, StoreError> {
        let mut out = BTreeMap::new();
        if types.is_empty() {
            return Ok(out);
        }
        let list: Vec<String> = (0..types.len()).map(|i| format!("${}", i + 1)).collect();
        let sql = format!(
            "SELECT type, COUNT(*) FROM tasks WHERE state = 'queued' AND type IN ({}) GROUP BY type",
            list.join(", ")
        );
        let mut q = sqlx::query(&sql).persistent(false);
        for t in types {
            q = q.bind(t.clone());
        }
        let rows = q.fetch_all(&self.pool).await.map_err(|e| self.err(e))?;
        for r in rows {
            let t: String = r.try_get(0).map_err(|e| self.err(e))?;
            let n: i64 = r.try_get(1).map_err(|e| self.err(e))?;
            out.insert(t, n);
        }
        Ok(out)
    }

    /// Records what an operator did (the audit trail of the API and
    /// dashboard); returns the record's id.
    pub async fn record_action(&self, a: &NewAction) -> Result<i64, StoreError> {
        let row = sqlx::query(
            "INSERT INTO actions (at, actor, role, via, action, target, detail, outcome, ok) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
        )
        .bind(a.at_ms)
        .bind(a.actor.clone())
        .bind(a.role.clone())
        .bind(a.via.clone())
        .bind(a.action.clone())
        .bind(a.target.clone())
        .bind(a.detail.to_string())
        .bind(a.outcome.clone())
        .bind(i64::from(a.ok))
        .fetch_one(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        row.try_get(0).map_err(|e| self.err(e))
    }

    /// The latest recorded actions, newest first; only those about `target`
    /// when given.
    pub async fn actions(
        &self,
        target: Option<&str>,
        limit: i64,
    ) -> Result<Vec<ActionRecord>, StoreError> {
        let sql = format!(
            "SELECT id, at, actor, role, via, action, target, detail, outcome, ok FROM actions \
             {} ORDER BY id DESC LIMIT {}",
            if target.is_some() {
                "WHERE target = $1"
            } else {
                ""
            },
            if target.is_some() { "$2" } else { "$1" }
        );
        let mut q = sqlx::query(&sql);
        if let Some(t) = target {
            q = q.bind(t.to_owned());
        }
        let rows = q
            .bind(limit.max(0))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        let read = |r: &AnyRow| -> Result<ActionRecord, sqlx::Error> {
            let detail: String = r.try_get("detail")?;
            Ok(ActionRecord {
                id: r.try_get("id")?,
                at: crate::record::format_ms(r.try_get("at")?),
                actor: r.try_get("actor")?,
                role: r.try_get("role")?,
                via: r.try_get("via")?,
                action: r.try_get("action")?,
                target: r.try_get("target")?,
                detail: serde_json::from_str(&detail).unwrap_or(Value::String(detail)),
                outcome: r.try_get("outcome")?,
                ok: r.try_get::<i64, _>("ok")? != 0,
            })
        };
        rows.iter()
            .map(read)
            .collect::<Result<_, _>>()
            .map_err(|e| self.err(e))
    }

    /// Deletes up to `chunk` tasks (and their events) whose last event is
    /// older than `cutoff_ms`, in one short transaction; returns how many.
    pub async fn prune_chunk(&self, cutoff_ms: i64, chunk: i64) -> Result<usize, StoreError> {
        let _guard = self.write_lock.lock().await;
        let mut tx = self.begin_write().await?;
        let n = prune_in(
            &mut tx,
            cutoff_ms,
            chunk,
            self.rows_per_statement(),
            self.backend,
        )
        .await
        .map_err(|e| self.err(e))?;
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(n)
    }
}

async fn prune_in(
    tx: &mut Transaction<'static, Any>,
    cutoff_ms: i64,
    chunk: i64,
    per_statement: usize,
    backend: Backend,
) -> Result<usize, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT task_id, state FROM tasks WHERE last_at < $1 ORDER BY last_at LIMIT $2",
    )
    .bind(cutoff_ms)
    .bind(chunk)
    .fetch_all(&mut **tx)
    .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut ids = Vec::with_capacity(rows.len());
    let mut deltas: BTreeMap<String, i64> = BTreeMap::new();
    for r in &rows {
        ids.push(r.try_get::<String, _>(0)?);
        *deltas.entry(r.try_get::<String, _>(1)?).or_default() -= 1;
    }
    for part in ids.chunks(per_statement) {
        let list = backend.params(1, part.len());
        for table in ["events", "tasks"] {
            let sql = format!("DELETE FROM {table} WHERE task_id IN ({list})");
            let mut q = sqlx::query(&sql).persistent(false);
            for id in part {
                q = q.bind(id.clone());
            }
            q.execute(&mut **tx).await?;
        }
    }
    apply_deltas(tx, &deltas).await?;
    Ok(ids.len())
}

async fn apply_deltas(
    tx: &mut Transaction<'static, Any>,
    deltas: &BTreeMap<String, i64>,
) -> Result<(), sqlx::Error> {
    for (state, delta) in deltas.iter().filter(|(_, d)| **d != 0) {
        sqlx::query(
            "INSERT INTO state_counts (state, n) VALUES ($1, $2) \
             ON CONFLICT (state) DO UPDATE SET n = state_counts.n + excluded.n",
        )
        .bind(state.clone())
        .bind(*delta)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// The sqlx URL of a SQLite database, with the open mode added unless the
/// URL sets one: `rwc` creates the file, `rw` requires it.
fn sqlite_connect_url(url: &str, mode: OpenMode) -> String {
    if url.contains("mode=") {
        return url.to_owned();
    }
    let mode = match mode {
        OpenMode::Create => "rwc",
        OpenMode::Existing => "rw",
    };
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}mode={mode}")
}

/// `($1, $2), ($3, $4)` for 2 rows of 2 columns.
impl Backend {
    /// Placeholders of parameters `first..first + n`, comma-separated.
    /// SQLite gets anonymous `?`: the driver looks every numbered parameter
    /// up by name, which costs time in the square of a statement's
    /// parameters; anonymous ones bind in order.
    fn params(self, first: usize, n: usize) -> String {
        (first..first + n)
            .map(|i| match self {
                Backend::Sqlite => "?".to_owned(),
                Backend::Postgres => format!("${i}"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `(…), (…)`: placeholders of `rows` rows of `cols` parameters.
    fn placeholders(self, rows: usize, cols: usize) -> String {
        (0..rows)
            .map(|r| format!("({})", self.params(r * cols + 1, cols)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

type AnyQuery<'q> = sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>;

fn bind_task<'q>(q: AnyQuery<'q>, t: &TaskRow) -> AnyQuery<'q> {
    q.bind(t.task_id.clone())
        .bind(t.task_type.clone())
        .bind(t.state.clone())
        .bind(t.state_key.clone())
        .bind(t.attempts)
        .bind(t.queue.clone())
        .bind(t.worker.clone())
        .bind(t.first_seen)
        .bind(t.last_at)
        .bind(t.started_at)
        .bind(t.finished_at)
        .bind(t.duration_ms)
        .bind(t.error.clone())
        .bind(t.error_at)
        .bind(t.result.clone())
        .bind(t.reason.clone())
        .bind(t.due_at.clone())
        .bind(t.events)
        .bind(t.merge_keys_json())
        .bind(t.priority)
        .bind(t.workflow_id.clone())
        .bind(t.parent_id.clone())
}

fn read_task(r: &AnyRow) -> Result<TaskRow, sqlx::Error> {
    let keys: String = r.try_get("merge_keys")?;
    Ok(TaskRow {
        task_id: r.try_get("task_id")?,
        task_type: r.try_get("type")?,
        state: r.try_get("state")?,
        state_key: r.try_get("state_key")?,
        attempts: r.try_get("attempts")?,
        queue: r.try_get("queue")?,
        worker: r.try_get("worker")?,
        first_seen: r.try_get("first_seen")?,
        last_at: r.try_get("last_at")?,
        started_at: r.try_get("started_at")?,
        finished_at: r.try_get("finished_at")?,
        duration_ms: r.try_get("duration_ms")?,
        error: r.try_get("error")?,
        error_at: r.try_get("error_at")?,
        result: r.try_get("result")?,
        reason: r.try_get("reason")?,
        due_at: r.try_get("due_at")?,
        events: r.try_get("events")?,
        merge_keys: TaskRow::parse_merge_keys(&keys),
        priority: r.try_get("priority")?,
        workflow_id: r.try_get("workflow_id")?,
        parent_id: r.try_get("parent_id")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_core::{Event, TaskState};

    fn temp_db(name: &str) -> (PathBuf, DatabaseUrl) {
        let dir = std::env::temp_dir().join(format!(
            "warren-tracker-{name}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        let url = DatabaseUrl::new(format!("sqlite://{}/t.db", dir.display()));
        (dir, url)
    }

    fn ev(task: &str, id: &str, state: TaskState, attempt: i64, at_ms: i64) -> IncomingEvent {
        let mut e = Event::new(task, "diag.echo", state, attempt);
        e.event_id = id.to_owned();
        e.at = crate::record::format_ms(at_ms);
        if state == TaskState::Succeeded {
            e.result = Some(serde_json::json!({"n": 1}));
        }
        IncomingEvent::from_event(e, 0)
    }

    #[test]
    fn placeholders_number_rows_and_columns() {
        assert_eq!(Backend::Postgres.placeholders(2, 2), "($1, $2), ($3, $4)");
        assert_eq!(Backend::Sqlite.placeholders(2, 2), "(?, ?), (?, ?)");
        assert_eq!(
            sqlite_connect_url("sqlite://a/b.db", OpenMode::Create),
            "sqlite://a/b.db?mode=rwc"
        );
        assert_eq!(
            sqlite_connect_url("sqlite://a/b.db?cache=shared", OpenMode::Existing),
            "sqlite://a/b.db?cache=shared&mode=rw"
        );
    }

    #[tokio::test]
    async fn sqlite_batches_are_idempotent_and_counted() {
        let (dir, url) = temp_db("batch");
        assert!(matches!(
            Store::open(&url, OpenMode::Existing).await,
            Err(StoreError::Missing { .. })
        ));
        let store = Store::open(&url, OpenMode::Create).await.unwrap();
        exercise(&store).await;
        store.close().await;

        // A reader opens the existing file.
        let reader = Store::open(&url, OpenMode::Existing).await.unwrap();
        assert!(reader.task("t2").await.unwrap().is_some());
        reader.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    /// PostgreSQL on 127.0.0.1:5432 (trust auth), in a database of its own
    /// that the test drops.
    #[tokio::test]
    async fn postgres_batches_are_idempotent_and_counted() {
        use sqlx::Connection;
        sqlx::any::install_default_drivers();
        let admin_url = std::env::var("WARREN_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/postgres".to_owned());
        let db = format!("wt_store_{}", uuid::Uuid::new_v4().simple());
        let mut admin = sqlx::AnyConnection::connect(&admin_url)
            .await
            .expect("PostgreSQL answers on 127.0.0.1:5432 (or set WARREN_TEST_POSTGRES)");
        sqlx::query(&format!("CREATE DATABASE {db}"))
            .execute(&mut admin)
            .await
            .unwrap();
        let base = admin_url.rsplit_once('/').unwrap().0;
        let url = DatabaseUrl::new(format!("{base}/{db}"));
        let store = Store::open(&url, OpenMode::Create).await.unwrap();
        assert_eq!(store.backend(), Backend::Postgres);
        exercise(&store).await;
        store.close().await;
        // Opening again finds the schema applied.
        let again = Store::open(&url, OpenMode::Existing).await.unwrap();
        assert!(again.task("t2").await.unwrap().is_some());
        again.close().await;
        sqlx::query(&format!("DROP DATABASE {db} WITH (FORCE)"))
            .execute(&mut admin)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn first_attempt_waits_are_measured_in_either_order() {
        let (dir, url) = temp_db("waits");
        let store = Store::open(&url, OpenMode::Create).await.unwrap();
        // Queued at 1_000, started at 1_250: waited 250 ms.
        let r = store
            .write_batch(&[ev("w1", "q1", TaskState::Queued, 1, 1_000)])
            .await
            .unwrap();
        assert!(r.waits.is_empty());
        let r = store
            .write_batch(&[ev("w1", "s1", TaskState::Started, 1, 1_250)])
            .await
            .unwrap();
        assert_eq!(r.waits, [("diag.echo".to_owned(), 250)]);
        // The start read before the copy: it waited no time measurable.
        store
            .write_batch(&[ev("w2", "s2", TaskState::Started, 1, 2_000)])
            .await
            .unwrap();
        let r = store
            .write_batch(&[ev("w2", "q2", TaskState::Queued, 1, 2_040)])
            .await
            .unwrap();
        assert_eq!(r.waits, [("diag.echo".to_owned(), 0)]);
        // The copy stored first, but read after the worker started it.
        store
            .write_batch(&[ev("w3", "q3", TaskState::Queued, 1, 2_500)])
            .await
            .unwrap();
        let r = store
            .write_batch(&[ev("w3", "s4", TaskState::Started, 1, 2_490)])
            .await
            .unwrap();
        assert_eq!(r.waits, [("diag.echo".to_owned(), 0)]);
        // A retry's start is not a first wait.
        let r = store
            .write_batch(&[ev("w1", "s3", TaskState::Started, 2, 3_000)])
            .await
            .unwrap();
        assert!(r.waits.is_empty());
        store.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    async fn exercise(store: &Store) {
        let a = [
            ev("t1", "e1", TaskState::Started, 1, 1_000),
            ev("t1", "e2", TaskState::Succeeded, 1, 1_100),
            ev("t2", "e3", TaskState::Started, 1, 1_200),
        ];
        let r = store.write_batch(&a).await.unwrap();
        assert_eq!(r.duplicates, 0);
        assert_eq!(r.tasks, 2);
        // The same events again, plus one duplicate inside the batch.
        let again = [a[1].clone(), a[1].clone(), a[0].clone()];
        let r = store.write_batch(&again).await.unwrap();
        assert_eq!(r.duplicates, 3);
        assert!(r.ingested.is_empty());
        let t1 = store.task("t1").await.unwrap().unwrap();
        assert_eq!(t1.state, "succeeded");
        assert_eq!(t1.events, 2);
        assert_eq!(t1.result.as_deref(), Some("{\"n\":1}"));
        assert_eq!(store.history("t1").await.unwrap().len(), 2);
        let (row, history) = store.task_with_history("t1").await.unwrap().unwrap();
        assert_eq!((row.events, history.len()), (2, 2));
        assert!(store.task_with_history("t9").await.unwrap().is_none());
        let counts = store.state_counts().await.unwrap();
        assert_eq!(counts.get("succeeded"), Some(&1));
        assert_eq!(counts.get("started"), Some(&1));

        // t2 finishes; a late started event does not move it back.
        store
            .write_batch(&[ev("t2", "e4", TaskState::Succeeded, 1, 1_300)])
            .await
            .unwrap();
        store
            .write_batch(&[ev("t2", "e5", TaskState::Started, 1, 1_400)])
            .await
            .unwrap();
        let counts = store.state_counts().await.unwrap();
        assert_eq!(counts.get("succeeded"), Some(&2));
        assert_eq!(counts.get("started"), None);

        let listed = store
            .list(&TaskFilter {
                state: Some("succeeded".into()),
                task_type: Some("diag.echo".into()),
                since_ms: Some(1_050),
                limit: 10,
                ..TaskFilter::default()
            })
            .await
            .unwrap();
        let ids: Vec<&str> = listed.iter().map(|t| t.task_id.as_str()).collect();
        assert_eq!(ids, ["t2", "t1"]);

        // Pruning everything last seen before 1_350 removes t1 only.
        assert_eq!(store.prune_chunk(1_350, 100).await.unwrap(), 1);
        assert!(store.task("t1").await.unwrap().is_none());
        assert!(store.history("t1").await.unwrap().is_empty());
        assert_eq!(
            store.state_counts().await.unwrap().get("succeeded"),
            Some(&1)
        );
        let failures = store.recent_failures(10).await.unwrap();
        assert!(failures.is_empty());

        // Several states at once, and the queue.
        let listed = store
            .list(&TaskFilter {
                state: Some("started, succeeded".into()),
                queue: Some("nowhere".into()),
                limit: 10,
                ..TaskFilter::default()
            })
            .await
            .unwrap();
        assert!(listed.is_empty());
        let listed = store
            .list(&TaskFilter {
                state: Some("started,succeeded".into()),
                limit: 10,
                ..TaskFilter::default()
            })
            .await
            .unwrap();
        assert_eq!(listed.len(), 1);

        // The audit trail: newest first, by target.
        for (i, target) in ["t2", "queue:io", "t2"].into_iter().enumerate() {
            let id = store
                .record_action(&NewAction {
                    at_ms: 5_000 + i as i64,
                    actor: "alice".into(),
                    role: "admin".into(),
                    via: "session".into(),
                    action: "cancel".into(),
                    target: target.into(),
                    detail: serde_json::json!({"n": i}),
                    outcome: "sent".into(),
                    ok: i != 1,
                })
                .await
                .unwrap();
            assert!(id > 0);
        }
        let all = store.actions(None, 10).await.unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].detail, serde_json::json!({"n": 2}));
        assert!(!all[1].ok && all[0].ok);
        assert_eq!(all[2].at, crate::record::format_ms(5_000));
        let t2 = store.actions(Some("t2"), 1).await.unwrap();
        assert_eq!(t2.len(), 1);
        assert_eq!(t2[0].actor, "alice");
    }
}
