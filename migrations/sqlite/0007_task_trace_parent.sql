-- The W3C traceparent of the request that submitted a task, kept when
-- traces are on, so that every run of the task (after a restart, on another
-- host) continues the same trace.
ALTER TABLE tasks ADD COLUMN trace_parent TEXT;
