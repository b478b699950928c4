-- Long-term memory (docs/architecture.md, "Long-term memory"): notes that
-- plugins (and clients) keep across tasks, per tenant and namespace, found
-- again by full-text search.
--
-- The memory namespace a task's plugins remember in; NULL is `default`.
ALTER TABLE tasks ADD COLUMN memory_namespace TEXT;

-- `seq` is the full-text index's rowid; `id` (a UUIDv7) is what clients
-- and plugins see.
CREATE TABLE memories (
    seq        INTEGER PRIMARY KEY,
    id         TEXT NOT NULL UNIQUE,
    tenant     TEXT NOT NULL,
    namespace  TEXT NOT NULL,
    text       TEXT NOT NULL,
    metadata   TEXT NOT NULL,   -- a JSON object
    bytes      INTEGER NOT NULL,
    task_id    TEXT,            -- the task whose plugin stored it, if one did
    created_at INTEGER NOT NULL
);
-- A tenant's memories, newest first, in one namespace or all.
CREATE INDEX memories_by_scope ON memories (tenant, namespace, seq);
CREATE INDEX memories_by_tenant ON memories (tenant, seq);

-- The words of each memory's text. External content: the text is stored
-- once, in `memories`; the triggers keep the index in step with it.
-- Accents are kept, as Postgres's 'simple' configuration keeps them.
CREATE VIRTUAL TABLE memories_fts USING fts5 (
    text, content = 'memories', content_rowid = 'seq',
    tokenize = 'unicode61 remove_diacritics 0'
);
CREATE TRIGGER memories_fts_insert AFTER INSERT ON memories BEGIN
    INSERT INTO memories_fts (rowid, text) VALUES (new.seq, new.text);
END;
CREATE TRIGGER memories_fts_delete AFTER DELETE ON memories BEGIN
    INSERT INTO memories_fts (memories_fts, rowid, text) VALUES ('delete', old.seq, old.text);
END;

-- What each tenant keeps, against the caps in `[memory]`.
CREATE TABLE memory_usage (
    tenant   TEXT PRIMARY KEY NOT NULL,
    memories INTEGER NOT NULL DEFAULT 0,
    bytes    INTEGER NOT NULL DEFAULT 0
);

-- Each memory call a plugin made, with its answer: a step that runs again
-- gets the same answers for the same calls in the same order
-- (`digest` tells a different call apart). Goes with its task.
CREATE TABLE memory_journal (
    task_id TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    step    INTEGER NOT NULL,
    site    TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    digest  INTEGER NOT NULL,
    reply   TEXT NOT NULL,   -- JSON
    PRIMARY KEY (task_id, step, site, seq)
);
