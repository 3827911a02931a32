-- What operators did through the tracker's API and dashboard: who (the
-- token's or user's name), when (Unix ms), what (action, target, details)
-- and how it ended.
CREATE TABLE IF NOT EXISTS actions (
    id       BIGSERIAL PRIMARY KEY,
    at       BIGINT NOT NULL,
    actor    TEXT NOT NULL,
    role     TEXT NOT NULL,
    via      TEXT NOT NULL,
    action   TEXT NOT NULL,
    target   TEXT NOT NULL,
    detail   TEXT NOT NULL,
    outcome  TEXT NOT NULL,
    -- 1 when the action was carried out, 0 when refused or failed.
    ok       BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS actions_at ON actions (at);
