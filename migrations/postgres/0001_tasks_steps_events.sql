-- Tasks, their step journal and their event history: the tables and columns
-- of the SQLite schema. Times are milliseconds since the Unix epoch.
--
-- JSON documents are `json`, not `jsonb`: `json` keeps the text as written and,
-- unlike `jsonb`, accepts the escape \u0000, which plugin output may contain.
-- Ids are compared byte by byte (COLLATE "C"), as in SQLite: UUIDv7 text then
-- sorts by creation time whatever the database's collation.

CREATE TABLE tasks (
    id               TEXT COLLATE "C" PRIMARY KEY,  -- UUIDv7: sorts by creation time
    status           TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    goal             TEXT NOT NULL,
    planner          TEXT NOT NULL,
    llm              TEXT NOT NULL,
    model            TEXT,
    tools            JSON NOT NULL,                 -- array of tool names
    options          JSON NOT NULL,                 -- object
    max_steps        BIGINT NOT NULL,
    timeout_ms       BIGINT NOT NULL,
    result           TEXT,
    error_code       TEXT,
    error_message    TEXT,
    attempt          BIGINT NOT NULL DEFAULT 0,     -- fencing token: bumped by every claim
    lease_owner      TEXT,
    lease_expires_at BIGINT,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
    input_tokens     BIGINT NOT NULL DEFAULT 0,
    output_tokens    BIGINT NOT NULL DEFAULT 0,
    created_at       BIGINT NOT NULL,
    started_at       BIGINT,
    finished_at      BIGINT
);

CREATE INDEX tasks_by_status ON tasks (status, id);

CREATE TABLE steps (
    task_id       TEXT COLLATE "C" NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    seq           BIGINT NOT NULL,
    kind          TEXT NOT NULL CHECK (kind IN ('llm', 'tool')),
    plugin        TEXT NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('running', 'succeeded', 'failed')),
    input         JSON NOT NULL,
    output        JSON,
    error_code    TEXT,
    error_message TEXT,
    input_tokens  BIGINT,
    output_tokens BIGINT,
    attempt       BIGINT NOT NULL,
    started_at    BIGINT NOT NULL,
    finished_at   BIGINT,
    PRIMARY KEY (task_id, seq)
);

CREATE TABLE events (
    task_id TEXT COLLATE "C" NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    seq     BIGINT NOT NULL,
    kind    TEXT NOT NULL,
    data    JSON NOT NULL,
    at      BIGINT NOT NULL,
    PRIMARY KEY (task_id, seq)
);
