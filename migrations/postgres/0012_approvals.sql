-- Human approval of tool calls (docs/architecture.md, "Approvals").

-- A task whose planner asked for calls that need approval waits in
-- `waiting_approval`: no lease, no worker.
ALTER TABLE tasks DROP CONSTRAINT tasks_status_check;
ALTER TABLE tasks ADD CONSTRAINT tasks_status_check
    CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'waiting_approval'));

-- One row per tool call that needs approval, keyed by the step the call
-- becomes (call ids are the planner's and may repeat across turns).
CREATE TABLE approvals (
    task_id      TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    step         BIGINT NOT NULL,                -- the step number the call runs as
    call_id      TEXT NOT NULL,
    tool         TEXT NOT NULL,
    input        TEXT NOT NULL,                  -- the arguments the planner asked for (JSON)
    status       TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'rejected')),
    edited_input TEXT,                           -- the arguments the approver gave instead (JSON)
    comment      TEXT,
    decided_by   TEXT,
    decided_at   BIGINT,
    requested_at BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL,                -- rejected as timed out from then on
    PRIMARY KEY (task_id, step)
);
CREATE INDEX approvals_by_call ON approvals (task_id, call_id);
-- The timeout sweep's one query: pending calls by expiry.
CREATE INDEX approvals_pending ON approvals (expires_at) WHERE status = 'pending';
