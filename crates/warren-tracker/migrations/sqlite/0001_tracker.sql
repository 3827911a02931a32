-- Warren tracker schema (SQLite). Times are Unix milliseconds, UTC.

-- One row per task: its state as merged from every event seen so far.
CREATE TABLE IF NOT EXISTS tasks (
    task_id      TEXT PRIMARY KEY NOT NULL,
    type         TEXT NOT NULL,
    state        TEXT NOT NULL,
    -- Sort key of the event that set `state` (final events first, then
    -- attempt, time, state rank, event id): the highest key wins.
    state_key    TEXT NOT NULL,
    attempts     INTEGER NOT NULL,
    queue        TEXT,
    worker       TEXT,
    first_seen   INTEGER NOT NULL,
    last_at      INTEGER NOT NULL,
    started_at   INTEGER,
    finished_at  INTEGER,
    duration_ms  INTEGER,
    error        TEXT,
    error_at     INTEGER,
    result       TEXT,
    reason       TEXT,
    due_at       TEXT,
    events       INTEGER NOT NULL,
    -- Sort keys of the events the other fields came from (JSON object).
    merge_keys   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_last_at ON tasks (last_at);
CREATE INDEX IF NOT EXISTS tasks_state_last_at ON tasks (state, last_at);
CREATE INDEX IF NOT EXISTS tasks_type_last_at ON tasks (type, last_at);
CREATE INDEX IF NOT EXISTS tasks_error_at ON tasks (error_at);

-- Every event, once (idempotency by event id), for a task's history.
CREATE TABLE IF NOT EXISTS events (
    event_id     TEXT PRIMARY KEY NOT NULL,
    task_id      TEXT NOT NULL,
    at           INTEGER NOT NULL,
    state        TEXT NOT NULL,
    type         TEXT NOT NULL,
    attempt      INTEGER NOT NULL,
    body         TEXT NOT NULL,
    ingested_at  INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS events_task_at ON events (task_id, at);

-- Tasks per state, kept in step with `tasks` in the same transactions.
CREATE TABLE IF NOT EXISTS state_counts (
    state        TEXT PRIMARY KEY NOT NULL,
    n            INTEGER NOT NULL
);
