-- Warren tracker schema (PostgreSQL). Times are Unix milliseconds, UTC.

-- One row per task: its state as merged from every event seen so far.
CREATE TABLE IF NOT EXISTS tasks (
    task_id      TEXT PRIMARY KEY NOT NULL,
    type         TEXT NOT NULL,
    state        TEXT NOT NULL,
    -- Sort key of the event that set `state` (final events first, then
    -- attempt, time, state rank, event id): the highest key wins.
    state_key    TEXT NOT NULL,
    attempts     BIGINT NOT NULL,
    queue        TEXT,
    worker       TEXT,
    first_seen   BIGINT NOT NULL,
    last_at      BIGINT NOT NULL,
    started_at   BIGINT,
    finished_at  BIGINT,
    duration_ms  BIGINT,
    error        TEXT,
    error_at     BIGINT,
    result       TEXT,
    reason       TEXT,
    due_at       TEXT,
    events       BIGINT NOT NULL,
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
    at           BIGINT NOT NULL,
    state        TEXT NOT NULL,
    type         TEXT NOT NULL,
    attempt      BIGINT NOT NULL,
    body         TEXT NOT NULL,
    ingested_at  BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_task_at ON events (task_id, at);

-- Tasks per state, kept in step with `tasks` in the same transactions.
CREATE TABLE IF NOT EXISTS state_counts (
    state        TEXT PRIMARY KEY NOT NULL,
    n            BIGINT NOT NULL
);
