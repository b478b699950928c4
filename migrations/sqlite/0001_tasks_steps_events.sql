-- Tasks, their step journal and their event history.
-- Times are milliseconds since the Unix epoch; JSON is stored as text.

CREATE TABLE tasks (
    id               TEXT PRIMARY KEY NOT NULL,  -- UUIDv7: sorts by creation time
    status           TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    goal             TEXT NOT NULL,
    planner          TEXT NOT NULL,
    llm              TEXT NOT NULL,
    model            TEXT,
    tools            TEXT NOT NULL,              -- JSON array of tool names
    options          TEXT NOT NULL,              -- JSON object
    max_steps        INTEGER NOT NULL,
    timeout_ms       INTEGER NOT NULL,
    result           TEXT,
    error_code       TEXT,
    error_message    TEXT,
    attempt          INTEGER NOT NULL DEFAULT 0, -- fencing token: bumped by every claim
    lease_owner      TEXT,
    lease_expires_at INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    input_tokens     INTEGER NOT NULL DEFAULT 0,
    output_tokens    INTEGER NOT NULL DEFAULT 0,
    created_at       INTEGER NOT NULL,
    started_at       INTEGER,
    finished_at      INTEGER
);

CREATE INDEX tasks_by_status ON tasks (status, id);

CREATE TABLE steps (
    task_id       TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    seq           INTEGER NOT NULL,
    kind          TEXT NOT NULL CHECK (kind IN ('llm', 'tool')),
    plugin        TEXT NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('running', 'succeeded', 'failed')),
    input         TEXT NOT NULL,
    output        TEXT,
    error_code    TEXT,
    error_message TEXT,
    input_tokens  INTEGER,
    output_tokens INTEGER,
    attempt       INTEGER NOT NULL,
    started_at    INTEGER NOT NULL,
    finished_at   INTEGER,
    PRIMARY KEY (task_id, seq)
) WITHOUT ROWID;

CREATE TABLE events (
    task_id TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    seq     INTEGER NOT NULL,
    kind    TEXT NOT NULL,
    data    TEXT NOT NULL,
    at      INTEGER NOT NULL,
    PRIMARY KEY (task_id, seq)
) WITHOUT ROWID;
