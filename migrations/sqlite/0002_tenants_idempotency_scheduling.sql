-- Tenants own tasks; a tenant's Idempotency-Key names one task; tasks can be
-- prioritised, held until a time, and given a deadline.
ALTER TABLE tasks ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default';
ALTER TABLE tasks ADD COLUMN idempotency_key TEXT;
ALTER TABLE tasks ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN run_at INTEGER;
ALTER TABLE tasks ADD COLUMN deadline_at INTEGER;

CREATE UNIQUE INDEX tasks_by_idempotency_key ON tasks (tenant, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX tasks_by_tenant ON tasks (tenant, id);
CREATE INDEX tasks_runnable ON tasks (status, priority DESC, id);
