-- How many times a task's steps may be retried after transient failures.
ALTER TABLE tasks ADD COLUMN max_retries INTEGER NOT NULL DEFAULT 2;
