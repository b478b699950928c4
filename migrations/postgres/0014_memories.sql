-- Long-term memory (docs/architecture.md, "Long-term memory"): notes that
-- plugins (and clients) keep across tasks, per tenant and namespace, found
-- again by full-text search.
--
-- The memory namespace a task's plugins remember in; NULL is `default`.
ALTER TABLE tasks ADD COLUMN memory_namespace TEXT;

-- `seq` orders a tenant's memories; `id` (a UUIDv7) is what clients and
-- plugins see. `search` holds the text's words ('simple': lowercased,
-- neither stemmed nor stop-worded, as SQLite's FTS5 does).
CREATE TABLE memories (
    seq        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id         TEXT NOT NULL UNIQUE,
    tenant     TEXT NOT NULL,
    namespace  TEXT NOT NULL,
    text       TEXT NOT NULL,
    metadata   TEXT NOT NULL,   -- a JSON object
    bytes      BIGINT NOT NULL,
    task_id    TEXT,            -- the task whose plugin stored it, if one did
    created_at BIGINT NOT NULL,
    search     TSVECTOR GENERATED ALWAYS AS (to_tsvector('simple', text)) STORED
);
-- A tenant's memories, newest first, in one namespace or all.
CREATE INDEX memories_by_scope ON memories (tenant, namespace, seq);
CREATE INDEX memories_by_tenant ON memories (tenant, seq);
CREATE INDEX memories_search ON memories USING GIN (search);

-- What each tenant keeps, against the caps in `[memory]`.
CREATE TABLE memory_usage (
    tenant   TEXT PRIMARY KEY NOT NULL,
    memories BIGINT NOT NULL DEFAULT 0,
    bytes    BIGINT NOT NULL DEFAULT 0
);

-- Each memory call a plugin made, with its answer: a step that runs again
-- gets the same answers for the same calls in the same order
-- (`digest` tells a different call apart). Goes with its task.
CREATE TABLE memory_journal (
    task_id TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    step    INTEGER NOT NULL,
    site    TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    digest  BIGINT NOT NULL,
    reply   TEXT NOT NULL,   -- JSON
    PRIMARY KEY (task_id, step, site, seq)
);
