-- The status checks of `tasks` and `steps`, written without `IN` lists.
--
-- SQLite evaluates `x IN (three or more constants)` by building a temporary
-- b-tree of the constants, with its own page cache, each time the statement
-- runs, and a CHECK runs on every insert or update of its row: about ten
-- such b-trees per task, opened and freed on the single writer's thread
-- (docs/architecture.md, "The store"). The same rules as comparisons joined
-- by OR cost a few string compares. The definitions are edited in place,
-- as 0012 did: the rules accept exactly what they accepted, so nothing on
-- disk changes (sqlite.org/lang_altertable.html, section 7).
PRAGMA writable_schema = ON;
UPDATE sqlite_schema
   SET sql = replace(sql,
       'CHECK (status IN (''queued'', ''running'', ''succeeded'', ''failed'', ''cancelled'', ''waiting_approval''))',
       'CHECK (status = ''queued'' OR status = ''running'' OR status = ''succeeded''
                                   OR status = ''failed'' OR status = ''cancelled'' OR status = ''waiting_approval'')')
 WHERE type = 'table' AND name = 'tasks';
UPDATE sqlite_schema
   SET sql = replace(sql,
       'CHECK (status IN (''running'', ''succeeded'', ''failed''))',
       'CHECK (status = ''running'' OR status = ''succeeded'' OR status = ''failed'')')
 WHERE type = 'table' AND name = 'steps';
PRAGMA writable_schema = RESET;

-- The same for the condition of the partial index of a thread's unfinished
-- tasks, which every insert or update of a thread's task evaluates. A
-- partial index serves only queries that state its condition, so the
-- claim's check (`thread_is_free!`) and the thread's deletion spell it the
-- same way.
DROP INDEX tasks_thread_unfinished;
CREATE INDEX tasks_thread_unfinished ON tasks (tenant, thread, id)
    WHERE thread IS NOT NULL
      AND (status = 'queued' OR status = 'running' OR status = 'waiting_approval');
