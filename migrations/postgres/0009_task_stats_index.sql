-- A tenant's tasks by when they finished: the dashboard's overview
-- (`GET /v1/stats`) counts the last hour's finished tasks by the minute from
-- this index alone, reading only those rows however many older tasks there
-- are. Partial, so a task costs an index entry only once it finishes, and
-- queued and running tasks are never in it.
CREATE INDEX tasks_finished_by_tenant ON tasks (tenant, finished_at, status)
    WHERE finished_at IS NOT NULL;
