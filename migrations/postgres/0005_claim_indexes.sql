-- Claims are two index range scans instead of one OR over the whole table:
-- expired leases among running tasks, then queued tasks in claim order. Both
-- indexes are partial, so their size follows the running and queued tasks
-- alone, never the finished ones. The queued index also answers the queue
-- counts behind back-pressure (`queue_full`), overall and per tenant.
CREATE INDEX tasks_by_lease ON tasks (lease_expires_at) WHERE status = 'running';
CREATE INDEX tasks_queued ON tasks (priority DESC, id) WHERE status = 'queued';
CREATE INDEX tasks_queued_by_tenant ON tasks (tenant) WHERE status = 'queued';
-- Superseded by tasks_queued: it covered every status, finished ones included.
DROP INDEX tasks_runnable;
