-- The workflow a task belongs to and the task that published it
-- (contract section 8), from its events; NULL outside any workflow.
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS workflow_id TEXT;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS parent_id TEXT;
CREATE INDEX IF NOT EXISTS tasks_workflow ON tasks (workflow_id, first_seen);
