-- Schedules: recurring tasks from a cron expression in a time zone. Each
-- run is an ordinary task that names its schedule and the tick it is for.
CREATE TABLE schedules (
    id               TEXT PRIMARY KEY,             -- UUIDv7: sorts by creation time
    tenant           TEXT NOT NULL,
    name             TEXT,
    cron             TEXT NOT NULL,
    timezone         TEXT NOT NULL,
    template         TEXT NOT NULL,                -- the task to create, resolved (JSON)
    missed_ticks     TEXT NOT NULL CHECK (missed_ticks IN ('skip', 'run_once')),
    paused           INTEGER NOT NULL DEFAULT 0,
    next_run_at      INTEGER,                      -- NULL: the expression matches no later time
    last_run_at      INTEGER,                      -- the tick of the last run created
    -- A due run found the queue full and waits for room: it is created
    -- late, not dropped as a missed tick.
    waiting_for_room INTEGER NOT NULL DEFAULT 0,
    created_at       INTEGER NOT NULL
);
-- The schedule loop's one query when idle: the earliest due, unpaused one.
CREATE INDEX schedules_due ON schedules (next_run_at) WHERE paused = 0 AND next_run_at IS NOT NULL;
CREATE INDEX schedules_by_tenant ON schedules (tenant, id);

ALTER TABLE tasks ADD COLUMN schedule_id TEXT;
ALTER TABLE tasks ADD COLUMN scheduled_for INTEGER;
-- The second guard of "one run per tick": whatever the loop does, no
-- schedule gets two tasks for the same tick. Partial, so a task no schedule
-- made costs no index entry.
CREATE UNIQUE INDEX tasks_one_per_tick ON tasks (schedule_id, scheduled_for)
    WHERE schedule_id IS NOT NULL;
