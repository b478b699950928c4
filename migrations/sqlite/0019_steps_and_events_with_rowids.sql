-- `steps` and `events` as ordinary (rowid) tables, keyed by an index on
-- (task_id, seq), instead of WITHOUT ROWID tables clustered on that key.
--
-- A WITHOUT ROWID table keeps whole rows in the b-tree of its key, and a
-- step's row carries its input and output inline up to 16 KiB (an LLM
-- step's transcript is several). Rows that large spill to overflow pages,
-- and every comparison on the way down the key's b-tree that lands on one
-- reads the whole row, overflow pages included (sqlite.org/withoutrowid.html,
-- section 4: such tables suit rows under about a twentieth of a page). With
-- thousands of tasks running at once their rows are spread over more pages
-- than the writer caches, so each step's insert and update read pages back
-- from disk and dirtied pages all over the table, each written whole to the
-- WAL and again by the checkpoint. In a rowid table new rows go to its end,
-- together, and the key's index holds only the key: about 40 bytes a step.
--
-- Same columns in the same order, same rows; the indexes on the payload
-- references are made again with the table. Nothing refers to either
-- table, so dropping the old one checks no foreign key.
CREATE TABLE steps_with_rowids (
    task_id        TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    seq            INTEGER NOT NULL,
    kind           TEXT NOT NULL CHECK (kind = 'llm' OR kind = 'tool'),
    plugin         TEXT NOT NULL,
    status         TEXT NOT NULL CHECK (status = 'running' OR status = 'succeeded' OR status = 'failed'),
    input          TEXT NOT NULL,
    output         TEXT,
    error_code     TEXT,
    error_message  TEXT,
    input_tokens   INTEGER,
    output_tokens  INTEGER,
    attempt        INTEGER NOT NULL,
    started_at     INTEGER NOT NULL,
    finished_at    INTEGER,
    input_ref      TEXT,
    output_ref     TEXT,
    plugin_sha256  TEXT,
    planner_sha256 TEXT,
    PRIMARY KEY (task_id, seq)
);
INSERT INTO steps_with_rowids
    (task_id, seq, kind, plugin, status, input, output, error_code, error_message,
     input_tokens, output_tokens, attempt, started_at, finished_at, input_ref,
     output_ref, plugin_sha256, planner_sha256)
SELECT task_id, seq, kind, plugin, status, input, output, error_code, error_message,
       input_tokens, output_tokens, attempt, started_at, finished_at, input_ref,
       output_ref, plugin_sha256, planner_sha256
  FROM steps
 ORDER BY task_id, seq;
DROP TABLE steps;
ALTER TABLE steps_with_rowids RENAME TO steps;
CREATE INDEX steps_by_input_ref ON steps (input_ref) WHERE input_ref IS NOT NULL;
CREATE INDEX steps_by_output_ref ON steps (output_ref) WHERE output_ref IS NOT NULL;

CREATE TABLE events_with_rowids (
    task_id TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    seq     INTEGER NOT NULL,
    kind    TEXT NOT NULL,
    data    TEXT NOT NULL,
    at      INTEGER NOT NULL,
    PRIMARY KEY (task_id, seq)
);
INSERT INTO events_with_rowids (task_id, seq, kind, data, at)
SELECT task_id, seq, kind, data, at
  FROM events
 ORDER BY task_id, seq;
DROP TABLE events;
ALTER TABLE events_with_rowids RENAME TO events;
