-- A tenant's tasks in one status, newest first: the task list filtered by
-- tenant and status (every list with tokens on) walks this index and stops
-- after one page, however many of the tenant's tasks are in other statuses.
CREATE INDEX tasks_by_tenant_status ON tasks (tenant, status, id);
