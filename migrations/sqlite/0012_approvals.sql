-- Human approval of tool calls (docs/architecture.md, "Approvals").

-- A task whose planner asked for calls that need approval waits in
-- `waiting_approval`: no lease, no worker. SQLite cannot alter a CHECK
-- constraint, and rebuilding `tasks` would need foreign keys off (its
-- DROP would cascade to the journal). The constraint only widens, which
-- changes nothing on disk, so the stored definition is edited in place:
-- the documented way for such changes (sqlite.org/lang_altertable.html,
-- section 7). `RESET` makes this connection read the new definition at
-- once: a later ALTER TABLE on it (ADD COLUMN splices the stored text at
-- an offset taken from the definition in memory) would corrupt it otherwise.
PRAGMA writable_schema = ON;
UPDATE sqlite_schema
   SET sql = replace(sql, '''cancelled'')', '''cancelled'', ''waiting_approval'')')
 WHERE type = 'table' AND name = 'tasks';
PRAGMA writable_schema = RESET;

-- One row per tool call that needs approval, keyed by the step the call
-- becomes (call ids are the planner's and may repeat across turns).
CREATE TABLE approvals (
    task_id      TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    step         INTEGER NOT NULL,               -- the step number the call runs as
    call_id      TEXT NOT NULL,
    tool         TEXT NOT NULL,
    input        TEXT NOT NULL,                  -- the arguments the planner asked for (JSON)
    status       TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'rejected')),
    edited_input TEXT,                           -- the arguments the approver gave instead (JSON)
    comment      TEXT,
    decided_by   TEXT,
    decided_at   INTEGER,
    requested_at INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,               -- rejected as timed out from then on
    PRIMARY KEY (task_id, step)
) WITHOUT ROWID;
CREATE INDEX approvals_by_call ON approvals (task_id, call_id);
-- The timeout sweep's one query: pending calls by expiry.
CREATE INDEX approvals_pending ON approvals (expires_at) WHERE status = 'pending';
