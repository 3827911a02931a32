-- The priority a task was published (or last changed) with, read from its
-- copy in P.tracker.published; NULL when unknown.
ALTER TABLE tasks ADD COLUMN priority INTEGER;
