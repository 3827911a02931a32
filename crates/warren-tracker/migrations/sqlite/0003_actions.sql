-- What operators did through the tracker's API and dashboard: who (the
-- token's or user's name), when (Unix ms), what (action, target, details)
-- and how it ended.
CREATE TABLE IF NOT EXISTS actions (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    at       INTEGER NOT NULL,
    actor    TEXT NOT NULL,
    role     TEXT NOT NULL,
    via      TEXT NOT NULL,
    action   TEXT NOT NULL,
    target   TEXT NOT NULL,
    detail   TEXT NOT NULL,
    outcome  TEXT NOT NULL,
    -- 1 when the action was carried out, 0 when refused or failed.
    ok       INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS actions_at ON actions (at);
