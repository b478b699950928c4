-- Threads (docs/architecture.md, "Threads"): a task may name a thread, a
-- client-chosen id scoped to its tenant. The planner of a thread's task sees
-- the thread's earlier tasks, and a thread's tasks run one after the other.
ALTER TABLE tasks ADD COLUMN thread TEXT;
-- A thread's tasks, newest first: GET /v1/threads/{id}, the list filtered
-- by thread, and the history a task's planner is given. Partial, so a task
-- without a thread costs no index entry.
CREATE INDEX tasks_by_thread ON tasks (tenant, thread, id) WHERE thread IS NOT NULL;
-- The claim's check that a thread's task is its oldest unfinished one: it
-- reads the thread's unfinished tasks only (queued, running, or waiting for
-- approval), however long the thread's past.
CREATE INDEX tasks_thread_unfinished ON tasks (tenant, thread, id)
    WHERE thread IS NOT NULL AND status IN ('queued', 'running', 'waiting_approval');
