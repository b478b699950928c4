//! The single writer: a thread of its own with a direct SQLite connection,
//! applying whatever writes are waiting in one transaction (group commit).
//!
//! Why below sqlx here: sqlx's SQLite driver runs each connection on a
//! worker thread and hands every statement to it, and the answer back: two
//! thread wake-ups per statement, and a step costs about a dozen statements.
//! In profiles of the end-to-end benchmark those hand-offs were the largest
//! single cost of the hot path, far above SQLite's own work. So the writer
//! drives SQLite through rusqlite (the same `libsqlite3` sqlx links) on its
//! own thread: a whole batch costs one wake-up to start it and one answer per
//! write, and its statements are prepared once and kept. Migrations and the
//! pooled readers stay on sqlx.
//!
//! Each write is acknowledged only after its transaction commits, so no
//! caller ever sees a step as journaled before it is durable.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use super::rows::{approval_from_row, collect, schedule_from_row, step_from_row, task_from_row};
use crate::memory::{MemoryConfig, MemoryOp, MemoryRecord, MemoryReply, NewMemory};
use crate::protocol::to_json_text;
use crate::store::approvals::{self, ApprovalRequest, DecideOutcome, Decision};
use crate::store::memories::{self, MemoryCall};
use crate::store::schedules::{FireRules, Fired, NewSchedule, ScheduleRecord, queued_event_data};
use crate::store::{
    CancelOutcome, Claim, EventRecord, Fence, LeaseState, Millis, NewTask, Renewal, Result,
    StepEnd, StepRecord, StepStart, StepStatus, StoreError, TaskEnd, TaskRecord, TaskStatus,
    ThreadDeletion, event_kind, in_claim_order, now_millis, out_of_line_key, renewals,
    step_event_data, step_started_event,
};

/// The most writes one transaction carries.
const MAX_BATCH: usize = 512;
/// How many pages the WAL may hold before the commit that passes it copies
/// them into the database (a checkpoint, run on the writer's thread, with
/// an fsync). A page written in many commits between two checkpoints is
/// copied once, so rarer checkpoints copy less: with 10,000 tasks waiting on
/// a slow LLM, 16,384 pages (64 MiB) instead of SQLite's 1,000 cut the
/// writer's CPU by a fifth and the time to submit them from 13 s to 5.
pub(super) const WAL_AUTOCHECKPOINT_PAGES: u32 = 16_384;

/// How long the writer waits on a lock another process holds (a CLI
/// reading the same file never takes one in WAL mode; a second server would).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Statements the writer keeps prepared: every one it runs, with room.
const STATEMENT_CACHE: usize = 64;

pub(super) enum WriteOp {
    CreateTask(NewTask),
    Claim {
        worker: String,
        lease: Duration,
        max: usize,
    },
    Renew {
        fences: Vec<Fence>,
        lease: Duration,
    },
    ExpireAllLeases,
    PruneFinished {
        before: Millis,
    },
    StartStep {
        fence: Fence,
        step: StepStart,
    },
    FinishStep {
        fence: Fence,
        end: StepEnd,
    },
    FinishTask {
        fence: Fence,
        end: TaskEnd,
    },
    AppendEvent {
        fence: Fence,
        kind: &'static str,
        data: Value,
    },
    /// A step's end and what the planner chose after it, under one fence
    /// check (`Store::finish_step_then_start`).
    FinishStepThen {
        fence: Fence,
        end: StepEnd,
        then: Then,
    },
    Cancel {
        id: String,
    },
    CreateSchedule(NewSchedule),
    SetSchedulePaused {
        id: String,
        paused: bool,
        next_run_at: Option<Millis>,
    },
    DeleteSchedule {
        id: String,
    },
    DeleteThread {
        tenant: String,
        thread: String,
    },
    FireSchedules(FireRules),
    AwaitApproval {
        fence: Fence,
        requests: Vec<ApprovalRequest>,
    },
    DecideApproval {
        task_id: String,
        call_id: String,
        decision: Decision,
    },
    ExpireApprovals {
        now: Millis,
    },
    /// A plugin's memory call; a recall's finds are searched beforehand, on
    /// the readers, and only journaled here.
    Memory {
        fence: Fence,
        call: Box<MemoryCall>,
        recalled: Vec<MemoryRecord>,
    },
    CreateMemory {
        memory: NewMemory,
        config: MemoryConfig,
    },
    DeleteMemory {
        tenant: String,
        id: String,
    },
}

/// What follows a step's end in [`WriteOp::FinishStepThen`].
pub(super) enum Then {
    StartStep(StepStart),
    FinishTask(TaskEnd),
}

pub(super) enum Reply {
    Created(TaskRecord, Option<EventRecord>),
    Claimed(Vec<Claim>),
    Renewed(Vec<Renewal>),
    Count(u64),
    Event(EventRecord),
    Step(StepRecord, EventRecord),
    Steps([(StepRecord, EventRecord); 2]),
    StepAndEvent((StepRecord, EventRecord), EventRecord),
    Cancel(CancelOutcome),
    Schedule(Option<ScheduleRecord>),
    Fired(Fired),
    Decided(DecideOutcome),
    Events(Vec<EventRecord>),
    Thread(ThreadDeletion),
    Memory(MemoryReply),
    Memories(Vec<MemoryRecord>),
}

struct Job {
    op: WriteOp,
    reply: oneshot::Sender<Result<Reply>>,
}

/// The handle the store writes through; the thread stops when it is dropped.
pub(super) struct Writer {
    jobs: mpsc::Sender<Job>,
    /// Transactions the writer has finished, committed or not.
    batches: Arc<AtomicU64>,
}

/// A read-only connection to the database at `path`, for reads made
/// beside the writer (see `PointReads`).
pub(super) fn open_read_only(path: &Path) -> Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

impl Writer {
    /// Opens a connection to the (already migrated) database file and
    /// starts the writer thread on it.
    pub fn start(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // WAL is a property of the file (set when it was migrated); the rest
        // belong to the connection. The page cache (4 MiB, 1,024 pages) keeps
        // the pages writes touch, the tables' and indexes' latest, from being
        // read again. Not more: a commit after a b-tree split that swapped
        // two pages walks every cached page (SQLite parks one at the lock
        // page's number meanwhile, and the commit drops every page past the
        // end of the file), so a bigger cache costs more per commit than it
        // saves in reads: with 16 MiB that walk took 2.4 % of a server's CPU.
        // The WAL is checkpointed into the database at 64 MiB rather than
        // SQLite's 4 MiB (see `WAL_AUTOCHECKPOINT_PAGES`).
        conn.execute_batch(&format!(
            "PRAGMA synchronous = NORMAL;
             PRAGMA foreign_keys = ON;
             PRAGMA cache_size = -4096;
             PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES};"
        ))?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        let (jobs, queue) = mpsc::channel(4 * MAX_BATCH);
        let batches = Arc::new(AtomicU64::new(0));
        let counted = batches.clone();
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || run(conn, queue, &counted))
            .map_err(|e| StoreError::Config(format!("starting the SQLite writer thread: {e}")))?;
        Ok(Self { jobs, batches })
    }

    /// How many transactions the writer has finished so far.
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    pub async fn write(&self, op: WriteOp) -> Result<Reply> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job { op, reply })
            .await
            .map_err(|_| StoreError::WriterGone)?;
        answer.await.map_err(|_| StoreError::WriterGone)?
    }
}

fn run(mut conn: Connection, mut queue: mpsc::Receiver<Job>, batches: &AtomicU64) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    // Sleeps only when nothing waits; while a batch commits, the next one
    // gathers in the queue.
    while let Some(first) = queue.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        commit_batch(&mut conn, &mut batch);
        batches.fetch_add(1, Ordering::Relaxed);
    }
}

/// Applies every job in one transaction, then answers each.
///
/// Every write checks what it must (its fence, the step's state) before it
/// changes anything, so a job that fails a check has written nothing and
/// needs no savepoint of its own (savepoints copy each page they touch).
/// A job that fails after writing, which only a failing database does,
/// rolls the whole batch back, and every job in it gets the error.
fn commit_batch(conn: &mut Connection, batch: &mut Vec<Job>) {
    let run = |conn: &Connection, sql: &str| conn.prepare_cached(sql)?.execute([]);
    if let Err(error) = run(conn, "BEGIN IMMEDIATE") {
        for job in batch.drain(..) {
            let _ = job.reply.send(Err(copy_error(&error)));
        }
        return;
    }
    let mut done = Vec::with_capacity(batch.len());
    let mut broken = None;
    for Job { op, reply } in batch.drain(..) {
        if broken.is_some() {
            done.push((reply, Err(StoreError::WriterGone)));
            continue;
        }
        let changes_before = conn.total_changes();
        let result = apply(conn, op);
        if let Err(error) = &result
            && conn.total_changes() != changes_before
        {
            tracing::error!(%error, "a write failed halfway; rolling back its batch");
            // A full database stays `Full` for every write of the batch
            // (clients are told `store_full`, not a server fault).
            let code = match error {
                StoreError::Full(_) => rusqlite::ffi::SQLITE_FULL,
                _ => rusqlite::ffi::SQLITE_ABORT,
            };
            broken = Some((code, error.to_string()));
        }
        done.push((reply, result));
    }
    let committed = match broken {
        Some((code, error)) => Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(code),
            Some(format!(
                "the batch was rolled back: a write in it failed halfway: {error}"
            )),
        )),
        None => run(conn, "COMMIT").map(drop),
    };
    if let Err(error) = committed {
        if !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        tracing::error!(%error, "a batch of writes was not committed");
        for (reply, _) in done {
            let _ = reply.send(Err(copy_error(&error)));
        }
        return;
    }
    for (reply, result) in done {
        // The caller may have given up waiting; its write stands regardless.
        let _ = reply.send(result);
    }
}

/// The same failure, for each job of a batch that failed as a whole.
fn copy_error(error: &rusqlite::Error) -> StoreError {
    let code = match error {
        rusqlite::Error::SqliteFailure(code, _) => *code,
        _ => rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
    };
    StoreError::from(rusqlite::Error::SqliteFailure(
        code,
        Some(error.to_string()),
    ))
}

fn apply(conn: &Connection, op: WriteOp) -> Result<Reply> {
    match op {
        WriteOp::CreateTask(task) => create_task(conn, task),
        WriteOp::Claim { worker, lease, max } => {
            claim_batch(conn, &worker, lease, max).map(Reply::Claimed)
        }
        WriteOp::Renew { fences, lease } => renew_leases(conn, &fences, lease).map(Reply::Renewed),
        WriteOp::ExpireAllLeases => {
            let expired = conn
                .prepare_cached(
                    "UPDATE tasks SET lease_expires_at = 0, lease_owner = NULL
                      WHERE status = 'running'",
                )?
                .execute([])?;
            Ok(Reply::Count(expired as u64))
        }
        WriteOp::PruneFinished { before } => {
            // Steps and events go with their task (ON DELETE CASCADE).
            let pruned = conn
                .prepare_cached(
                    "DELETE FROM tasks
                      WHERE status IN ('succeeded', 'failed', 'cancelled') AND finished_at < ?1",
                )?
                .execute([before])?;
            conn.prepare_cached(PRUNE_ORPHAN_PAYLOADS)?.execute([])?;
            Ok(Reply::Count(pruned as u64))
        }
        WriteOp::StartStep { fence, step } => {
            check_fence(conn, &fence)?;
            let (record, event) = start_step(conn, &fence, step)?;
            Ok(Reply::Step(record, event))
        }
        WriteOp::FinishStep { fence, end } => {
            check_fence(conn, &fence)?;
            let (record, event) = finish_step(conn, &fence, end)?;
            Ok(Reply::Step(record, event))
        }
        WriteOp::FinishTask { fence, end } => {
            check_fence(conn, &fence)?;
            finish_task(conn, &fence, &end).map(Reply::Event)
        }
        WriteOp::AppendEvent { fence, kind, data } => {
            check_fence(conn, &fence)?;
            append_event(conn, &fence.task_id, kind, data).map(Reply::Event)
        }
        WriteOp::FinishStepThen { fence, end, then } => {
            check_fence(conn, &fence)?;
            let finished = finish_step(conn, &fence, end)?;
            match then {
                Then::StartStep(next) => {
                    Ok(Reply::Steps([finished, start_step(conn, &fence, next)?]))
                }
                Then::FinishTask(task_end) => Ok(Reply::StepAndEvent(
                    finished,
                    finish_task(conn, &fence, &task_end)?,
                )),
            }
        }
        WriteOp::Cancel { id } => cancel(conn, &id).map(Reply::Cancel),
        WriteOp::CreateSchedule(schedule) => create_schedule(conn, &schedule),
        WriteOp::SetSchedulePaused {
            id,
            paused,
            next_run_at,
        } => {
            let record = conn
                .prepare_cached(
                    "UPDATE schedules
                        SET paused = ?2, next_run_at = COALESCE(?3, next_run_at),
                            waiting_for_room = 0
                      WHERE id = ?1
                     RETURNING *",
                )?
                .query_row(params![id, paused, next_run_at], |row| {
                    Ok(schedule_from_row(row))
                })
                .optional()?
                .transpose()?;
            Ok(Reply::Schedule(record))
        }
        WriteOp::DeleteSchedule { id } => {
            let deleted = conn
                .prepare_cached("DELETE FROM schedules WHERE id = ?1")?
                .execute([id])?;
            Ok(Reply::Count(deleted as u64))
        }
        WriteOp::FireSchedules(rules) => fire_due_schedules(conn, &rules).map(Reply::Fired),
        WriteOp::AwaitApproval { fence, requests } => {
            check_fence(conn, &fence)?;
            await_approval(conn, &fence, &requests).map(Reply::Event)
        }
        WriteOp::DecideApproval {
            task_id,
            call_id,
            decision,
        } => decide_approval(conn, &task_id, &call_id, &decision).map(Reply::Decided),
        WriteOp::ExpireApprovals { now } => expire_approvals(conn, now).map(Reply::Events),
        WriteOp::DeleteThread { tenant, thread } => {
            delete_thread(conn, &tenant, &thread).map(Reply::Thread)
        }
        WriteOp::Memory {
            fence,
            call,
            recalled,
        } => {
            check_fence(conn, &fence)?;
            memory_call(conn, &call, recalled).map(Reply::Memory)
        }
        WriteOp::CreateMemory { memory, config } => {
            insert_memory(conn, memory, &config).map(|record| Reply::Memories(vec![record]))
        }
        WriteOp::DeleteMemory { tenant, id } => {
            delete_memory(conn, &tenant, &id, None).map(|existed| Reply::Count(existed as u64))
        }
    }
}

/// Performs a plugin's memory call once (`Store::memory_call`); the caller
/// has checked the fence. Every check reads before anything is written, so
/// a refused call writes nothing (see `commit_batch`).
fn memory_call(
    conn: &Connection,
    call: &MemoryCall,
    recalled: Vec<MemoryRecord>,
) -> Result<MemoryReply> {
    let key = &call.key;
    let site = key.site.as_str();
    let journaled = conn
        .prepare_cached(&approvals::sqlite(memories::JOURNALED))?
        .query_row(params![key.task_id, key.step, site, key.seq], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
        })
        .optional()?;
    if let Some(reply) = memories::replay(journaled, &call.op)? {
        return Ok(reply);
    }
    let reply = match &call.op {
        MemoryOp::Remember(_) => {
            let memory = call.new_memory().expect("a remember call stores a memory");
            let record = insert_memory(conn, memory, &call.config)?;
            MemoryReply::Remembered { id: record.id }
        }
        MemoryOp::Recall { .. } => MemoryReply::Recalled { memories: recalled },
        MemoryOp::Forget { id } => MemoryReply::Forgot {
            existed: delete_memory(conn, &call.tenant, id, Some(&call.namespace))?,
        },
    };
    let text = serde_json::to_string(&reply).expect("a memory reply is always JSON");
    conn.prepare_cached(&approvals::sqlite(memories::JOURNAL))?
        .execute(params![
            key.task_id,
            key.step,
            site,
            key.seq,
            call.op.digest(),
            text
        ])?;
    Ok(reply)
}

/// Stores a memory if its tenant has room for it.
fn insert_memory(
    conn: &Connection,
    memory: NewMemory,
    config: &MemoryConfig,
) -> Result<MemoryRecord> {
    let usage = conn
        .prepare_cached(&approvals::sqlite(memories::USAGE))?
        .query_row([&memory.tenant], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?
        .unwrap_or((0, 0));
    memories::check_room(usage, &memory, config)?;
    let id = uuid::Uuid::now_v7().to_string();
    let created_at = now_millis();
    let bytes = memory.bytes() as i64;
    conn.prepare_cached(&approvals::sqlite(memories::INSERT))?
        .execute(params![
            id,
            memory.tenant,
            memory.namespace,
            memory.text,
            memory.metadata,
            bytes,
            memory.task_id,
            created_at,
        ])?;
    conn.prepare_cached(&approvals::sqlite(memories::COUNT_IN))?
        .execute(params![memory.tenant, bytes])?;
    Ok(memories::stored(id, memory, created_at))
}

/// Deletes a tenant's memory (in `namespace` only, when given); whether it
/// existed.
fn delete_memory(
    conn: &Connection,
    tenant: &str,
    id: &str,
    namespace: Option<&str>,
) -> Result<bool> {
    let bytes: Option<i64> = conn
        .prepare_cached(&approvals::sqlite(memories::DELETE))?
        .query_row(params![id, tenant, namespace], |row| row.get(0))
        .optional()?;
    let Some(bytes) = bytes else {
        return Ok(false);
    };
    conn.prepare_cached(&approvals::sqlite(memories::COUNT_OUT))?
        .execute(params![tenant, bytes])?;
    Ok(true)
}

/// Journals the calls a task waits on and releases its claim; the caller
/// has checked the fence.
fn await_approval(
    conn: &Connection,
    fence: &Fence,
    requests: &[ApprovalRequest],
) -> Result<EventRecord> {
    let now = now_millis();
    for request in requests {
        conn.prepare_cached(&approvals::sqlite(approvals::INSERT))?
            .execute(params![
                fence.task_id,
                request.step,
                request.call_id,
                request.tool,
                to_json_text(&request.input),
                now,
                request.expires_at,
            ])?;
    }
    conn.prepare_cached(&approvals::sqlite(approvals::PARK))?
        .execute([&fence.task_id])?;
    append_event(
        conn,
        &fence.task_id,
        event_kind::TASK_WAITING_APPROVAL,
        approvals::waiting_event_data(requests),
    )
}

fn decide_approval(
    conn: &Connection,
    task_id: &str,
    call_id: &str,
    decision: &Decision,
) -> Result<DecideOutcome> {
    let now = now_millis();
    let status = if decision.approve {
        approvals::ApprovalStatus::Approved
    } else {
        approvals::ApprovalStatus::Rejected
    };
    let decided = conn
        .prepare_cached(&approvals::sqlite(approvals::DECIDE))?
        .query_row(
            params![
                task_id,
                call_id,
                status.as_str(),
                decision.input.as_ref().map(to_json_text),
                decision.comment,
                decision.by,
                now,
            ],
            |row| Ok(approval_from_row(row)),
        )
        .optional()?
        .transpose()?;
    let Some(approval) = decided else {
        let latest = conn
            .prepare_cached(&approvals::sqlite(approvals::LATEST_WITH_CALL_ID))?
            .query_row(params![task_id, call_id], |row| Ok(approval_from_row(row)))
            .optional()?
            .transpose()?;
        return Ok(match latest {
            Some(approval) => DecideOutcome::AlreadyDecided(approval),
            None => DecideOutcome::NotFound,
        });
    };
    let mut events = vec![append_event(
        conn,
        task_id,
        event_kind::APPROVAL_DECIDED,
        approvals::decided_event_data(&approval),
    )?];
    let requeued = requeue_if_answered(conn, task_id, now, &mut events)?;
    Ok(DecideOutcome::Decided {
        approval,
        events,
        requeued,
    })
}

/// Puts the task back in the queue if nothing of it is pending now.
fn requeue_if_answered(
    conn: &Connection,
    task_id: &str,
    now: Millis,
    events: &mut Vec<EventRecord>,
) -> Result<bool> {
    let requeued = conn
        .prepare_cached(&approvals::sqlite(approvals::REQUEUE))?
        .execute(params![task_id, now])?
        > 0;
    if requeued {
        events.push(append_event(
            conn,
            task_id,
            event_kind::TASK_QUEUED,
            json!({"status": "queued", "reason": "approvals_answered"}),
        )?);
    }
    Ok(requeued)
}

fn expire_approvals(conn: &Connection, now: Millis) -> Result<Vec<EventRecord>> {
    let tasks: Vec<String> = conn
        .prepare_cached(&approvals::sqlite(approvals::EXPIRED_TASKS))?
        .query_map(params![now, approvals::EXPIRE_BATCH], |row| row.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut events = Vec::new();
    for task_id in tasks {
        let expired = collect(
            conn.prepare_cached(&approvals::sqlite(approvals::EXPIRE))?
                .query_map(params![task_id, now], |row| Ok(approval_from_row(row)))?,
        )?;
        for approval in &expired {
            events.push(append_event(
                conn,
                &task_id,
                event_kind::APPROVAL_DECIDED,
                approvals::decided_event_data(approval),
            )?);
        }
        requeue_if_answered(conn, &task_id, now, &mut events)?;
    }
    Ok(events)
}

/// Deletes a thread's tasks unless one of them is queued or running. The
/// writer applies one write at a time, so nothing is claimed or added in
/// between the look and the delete.
fn delete_thread(conn: &Connection, tenant: &str, thread: &str) -> Result<ThreadDeletion> {
    // `thread IS NOT NULL` adds nothing to `thread = ?2` but states the
    // condition of `tasks_thread_unfinished`, which SQLite needs in order to
    // use that partial index (see `thread_is_free!`).
    let active: i64 = conn
        .prepare_cached(
            "SELECT COUNT(*) FROM tasks
              WHERE tenant = ?1 AND thread = ?2 AND thread IS NOT NULL
                AND (status = 'queued' OR status = 'running' OR status = 'waiting_approval')",
        )?
        .query_row((tenant, thread), |row| row.get(0))?;
    if active > 0 {
        return Ok(ThreadDeletion::Active(active as u64));
    }
    // Steps and events go with their task (ON DELETE CASCADE).
    let deleted = conn
        .prepare_cached("DELETE FROM tasks WHERE tenant = ?1 AND thread = ?2")?
        .execute((tenant, thread))?;
    if deleted > 0 {
        conn.prepare_cached(PRUNE_ORPHAN_PAYLOADS)?.execute([])?;
    }
    Ok(ThreadDeletion::Deleted(deleted as u64))
}

fn create_schedule(conn: &Connection, schedule: &NewSchedule) -> Result<Reply> {
    let record = conn
        .prepare_cached(
            "INSERT INTO schedules (id, tenant, name, cron, timezone, template, missed_ticks,
                                    next_run_at, created_at, paused)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
             RETURNING *",
        )?
        .query_row(
            params![
                uuid::Uuid::now_v7().to_string(),
                schedule.tenant,
                schedule.name,
                schedule.cron,
                schedule.timezone,
                schedule.template.to_json(),
                schedule.missed_ticks.as_str(),
                schedule.next_run_at,
                now_millis(),
                schedule.paused,
            ],
            |row| Ok(schedule_from_row(row)),
        )??;
    Ok(Reply::Schedule(Some(record)))
}

/// How many tasks are queued (of `tenant`, or of all), counting no further
/// than `at_most`.
fn queued_at_most(conn: &Connection, tenant: Option<&str>, at_most: u64) -> Result<u64> {
    let at_most = at_most.min(i64::MAX as u64) as i64;
    let count: i64 = match tenant {
        Some(tenant) => conn
            .prepare_cached(
                "SELECT COUNT(*) FROM (SELECT 1 FROM tasks INDEXED BY tasks_queued_by_tenant
                                        WHERE status = 'queued' AND tenant = ?1 LIMIT ?2)",
            )?
            .query_row(params![tenant, at_most], |row| row.get(0))?,
        None => conn
            .prepare_cached(
                "SELECT COUNT(*) FROM (SELECT 1 FROM tasks INDEXED BY tasks_queued_by_tenant
                                        WHERE status = 'queued' LIMIT ?1)",
            )?
            .query_row([at_most], |row| row.get(0))?,
    };
    Ok(count as u64)
}

/// Whether the queue has room for one more task of `tenant` under `rules`.
fn queue_has_room(conn: &Connection, tenant: &str, rules: &FireRules) -> Result<bool> {
    if queued_at_most(conn, None, rules.max_queued_tasks)? >= rules.max_queued_tasks {
        return Ok(false);
    }
    match rules.max_queued_per_tenant {
        Some(cap) => Ok(queued_at_most(conn, Some(tenant), cap)? < cap),
        None => Ok(true),
    }
}

/// The schedule loop's transaction (see `Store::fire_due_schedules`). The
/// single writer applies it alone, so no other host or write can fire the
/// same schedule meanwhile.
fn fire_due_schedules(conn: &Connection, rules: &FireRules) -> Result<Fired> {
    let due = {
        let mut statement = conn.prepare_cached(
            "SELECT * FROM schedules INDEXED BY schedules_due
              WHERE paused = 0 AND next_run_at IS NOT NULL AND next_run_at <= ?1
              ORDER BY next_run_at
              LIMIT ?2",
        )?;
        collect(
            statement.query_map(params![rules.now, rules.max as i64], |row| {
                Ok(schedule_from_row(row))
            })?,
        )?
    };
    let mut fired = Fired::default();
    for schedule in due {
        fired.taken += 1;
        let firing = schedule.firing(rules);
        if let Some(tick) = firing.run_for {
            if !queue_has_room(conn, &schedule.tenant, rules)? {
                conn.prepare_cached("UPDATE schedules SET waiting_for_room = 1 WHERE id = ?1")?
                    .execute([&schedule.id])?;
                fired.waiting += 1;
                continue;
            }
            let task = schedule.template.run(&schedule.tenant, &schedule.id, tick);
            match create_task(conn, task)? {
                Reply::Created(record, Some(event)) => fired.runs.push((record, event)),
                _ => unreachable!("a task without an idempotency key is always new"),
            }
        }
        conn.prepare_cached(
            "UPDATE schedules
                SET next_run_at = ?2, last_run_at = COALESCE(?3, last_run_at),
                    waiting_for_room = 0
              WHERE id = ?1",
        )?
        .execute(params![schedule.id, firing.next_run_at, firing.run_for])?;
    }
    Ok(fired)
}

/// Payloads no step refers to any more (their tasks were pruned).
const PRUNE_ORPHAN_PAYLOADS: &str = "DELETE FROM payloads
      WHERE NOT EXISTS (SELECT 1 FROM steps WHERE input_ref = payloads.sha256)
        AND NOT EXISTS (SELECT 1 FROM steps WHERE output_ref = payloads.sha256)";

/// A new, queued task: `create_task`'s insert.
pub(super) const INSERT_TASK: &str = "INSERT INTO tasks
    (id, tenant, idempotency_key, priority, run_at, deadline_at, status, goal, planner, llm,
     model, tools, options, max_steps, timeout_ms, created_at, max_retries, trace_parent,
     schedule_id, scheduled_for, cost_nanos, budget_max_tokens, budget_max_cost_nanos, thread,
     memory_namespace, response_format, tool_call, images)
  VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'queued', ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
          ?18, ?19, 0, ?20, ?21, ?22, ?23, ?24, ?25, ?26)";

fn create_task(conn: &Connection, task: NewTask) -> Result<Reply> {
    // The writer applies one write at a time, so look-then-insert cannot race.
    if let Some(key) = &task.idempotency_key {
        let existing = conn
            .prepare_cached("SELECT * FROM tasks WHERE tenant = ?1 AND idempotency_key = ?2")?
            .query_row((&task.tenant, key), |row| Ok(task_from_row(row)))
            .optional()?;
        if let Some(record) = existing {
            return Ok(Reply::Created(record?, None));
        }
    }
    let id = uuid::Uuid::now_v7().to_string();
    let created_at = now_millis();
    // Inserted without `RETURNING *` (see `append_event_stored`), and not
    // read back either: the row is what was inserted.
    conn.prepare_cached(INSERT_TASK)?.execute(params![
        id,
        task.tenant,
        task.idempotency_key,
        task.priority,
        task.run_at,
        task.deadline_at,
        task.goal,
        task.planner,
        task.llm,
        task.model,
        to_json_text(&task.tools),
        to_json_text(&task.options),
        task.max_steps,
        task.timeout.as_millis() as i64,
        created_at,
        task.max_retries,
        task.trace_parent,
        task.schedule.as_ref().map(|run| &run.schedule_id),
        task.schedule.as_ref().map(|run| run.tick),
        task.budget.max_tokens.map(|n| n as i64),
        task.budget.max_cost_nanos,
        task.thread,
        task.memory_namespace,
        task.response_format.as_ref().map(to_json_text),
        task.call.as_ref().map(to_json_text),
        (!task.images.is_empty()).then(|| to_json_text(&task.images)),
    ])?;
    let event = append_event(conn, &id, event_kind::TASK_QUEUED, queued_event_data(&task))?;
    Ok(Reply::Created(
        task.into_queued_record(id, created_at),
        Some(event),
    ))
}

/// Claims the running tasks whose lease expired, longest expired first
/// (`tasks_by_lease`), and bumps their attempt.
///
/// `INDEXED BY` in these statements: without statistics, SQLite's planner
/// rates the older `tasks_by_status` as good as the partial indexes, and
/// would then sort every queued or running task to find the first few. With
/// it, a statement whose index is missing fails rather than scans.
pub(super) const CLAIM_EXPIRED: &str = "UPDATE tasks
    SET attempt = attempt + 1, lease_owner = ?1, lease_expires_at = ?2,
        started_at = COALESCE(started_at, ?3)
  WHERE id IN (SELECT id FROM tasks
                  INDEXED BY tasks_by_lease
                WHERE status = 'running' AND lease_expires_at < ?3
                ORDER BY lease_expires_at
                LIMIT ?4)
 RETURNING *";

/// Claims queued tasks whose start time has come, in the order of
/// `tasks_queued`: the scan stops after `LIMIT` rows, however long the queue.
/// A thread's task is taken only when it is its thread's oldest unfinished
/// one (`thread_is_free!`).
pub(super) const CLAIM_QUEUED: &str = concat!(
    "UPDATE tasks
    SET status = 'running', attempt = attempt + 1, lease_owner = ?1, lease_expires_at = ?2,
        started_at = COALESCE(started_at, ?3)
  WHERE id IN (SELECT id FROM tasks
                  INDEXED BY tasks_queued
                WHERE status = 'queued' AND (run_at IS NULL OR run_at <= ?3)
                  AND ",
    thread_is_free!(),
    "
                ORDER BY priority DESC, id
                LIMIT ?4)
 RETURNING *"
);

fn claim_batch(conn: &Connection, worker: &str, lease: Duration, max: usize) -> Result<Vec<Claim>> {
    let now = now_millis();
    let expires = now + lease.as_millis() as i64;
    let claim = |query: &str, limit: usize| -> Result<Vec<TaskRecord>> {
        let mut statement = conn.prepare_cached(query)?;
        collect(
            statement.query_map(params![worker, expires, now, limit as i64], |row| {
                Ok(task_from_row(row))
            })?,
        )
    };
    let expired = claim(CLAIM_EXPIRED, max)?;
    let queued = match max - expired.len() {
        0 => Vec::new(),
        room => claim(CLAIM_QUEUED, room)?,
    };
    let tasks = in_claim_order(expired, queued);
    if tasks.is_empty() {
        return Ok(Vec::new());
    }

    // A fresh task has no journal: only resumed ones need the lookup.
    let mut journals: HashMap<String, Vec<StepRecord>> = HashMap::new();
    let resumed: Vec<&str> = tasks
        .iter()
        .filter(|t| t.attempt > 1)
        .map(|t| t.id.as_str())
        .collect();
    if !resumed.is_empty() {
        let mut statement = conn.prepare_cached(concat!(
            steps_with_payloads!(),
            " WHERE s.task_id IN (SELECT value FROM json_each(?1)) ORDER BY s.task_id, s.seq"
        ))?;
        let mut rows = statement.query([json!(resumed).to_string()])?;
        while let Some(row) = rows.next()? {
            let task_id: String = row.get("task_id")?;
            journals
                .entry(task_id)
                .or_default()
                .push(step_from_row(row)?);
        }
    }

    let mut claims = Vec::with_capacity(tasks.len());
    for task in tasks {
        let steps = journals.remove(&task.id).unwrap_or_default();
        let event = append_event(
            conn,
            &task.id,
            event_kind::TASK_STARTED,
            json!({"attempt": task.attempt, "resumed_steps": steps.len()}),
        )?;
        claims.push(Claim {
            fence: Fence {
                task_id: task.id.clone(),
                attempt: task.attempt,
                worker: worker.to_owned(),
            },
            task,
            steps,
            event,
        });
    }
    Ok(claims)
}

/// Fails with `Fenced` unless `fence` is the task's current, running claim.
fn check_fence(conn: &Connection, fence: &Fence) -> Result<LeaseState> {
    let cancel_requested: Option<bool> = conn
        .prepare_cached(
            "SELECT cancel_requested FROM tasks
              WHERE id = ?1 AND attempt = ?2 AND lease_owner = ?3 AND status = 'running'",
        )?
        .query_row(params![fence.task_id, fence.attempt, fence.worker], |row| {
            row.get(0)
        })
        .optional()?;
    match cancel_requested {
        Some(cancel_requested) => Ok(LeaseState { cancel_requested }),
        None => Err(StoreError::Fenced {
            task_id: fence.task_id.clone(),
            attempt: fence.attempt,
        }),
    }
}

/// The fences are one JSON array of `[task id, attempt, worker]`. The
/// row-value `IN` makes SQLite build the list once and look each task up by
/// id, rather than join every running task against every fence.
pub(super) const RENEW_LEASES: &str = "UPDATE tasks SET lease_expires_at = ?1
  WHERE status = 'running'
    AND (id, attempt, lease_owner) IN
        (SELECT value ->> 0, value ->> 1, value ->> 2 FROM json_each(?2))
 RETURNING id, attempt, cancel_requested";

/// Extends the leases of the claims in `fences` in one statement, the same
/// whatever their number.
fn renew_leases(conn: &Connection, fences: &[Fence], lease: Duration) -> Result<Vec<Renewal>> {
    let held = json!(
        fences
            .iter()
            .map(|f| json!([f.task_id, f.attempt, f.worker]))
            .collect::<Vec<_>>()
    );
    let mut statement = conn.prepare_cached(RENEW_LEASES)?;
    let renewed = statement
        .query_map(
            params![now_millis() + lease.as_millis() as i64, held.to_string()],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )?
        .collect::<rusqlite::Result<Vec<(String, i64, bool)>>>()?;
    Ok(renewals(fences, renewed))
}

/// A step's start. A step still marked running was in flight when an
/// earlier claim died: it runs again under the same sequence number (and
/// idempotency key); a finished one is left alone.
pub(super) const START_STEP: &str = "INSERT INTO steps
    (task_id, seq, kind, plugin, status, input, input_ref, attempt, started_at, plugin_sha256,
     planner_sha256)
  VALUES (?1, ?2, ?3, ?4, 'running', ?5, ?6, ?7, ?8, ?9, ?10)
  ON CONFLICT (task_id, seq) DO UPDATE
     SET kind = excluded.kind, plugin = excluded.plugin, input = excluded.input,
         input_ref = excluded.input_ref, attempt = excluded.attempt,
         started_at = excluded.started_at, plugin_sha256 = excluded.plugin_sha256,
         planner_sha256 = excluded.planner_sha256
   WHERE steps.status = 'running'";

/// Journals a step's start; the caller has checked the fence.
fn start_step(
    conn: &Connection,
    fence: &Fence,
    step: StepStart,
) -> Result<(StepRecord, EventRecord)> {
    let input_text = to_json_text(&step.input);
    let input_ref = out_of_line_key(&input_text);
    let stored_input = if input_ref.is_some() {
        "null"
    } else {
        &input_text
    };
    let started_at = now_millis();
    let written = conn.prepare_cached(START_STEP)?.execute(params![
        fence.task_id,
        step.seq,
        step.kind.as_str(),
        step.plugin,
        stored_input,
        input_ref,
        fence.attempt,
        started_at,
        step.versions.plugin_sha256,
        step.versions.planner_sha256,
    ])?;
    if written == 0 {
        return Err(StoreError::Config(format!(
            "step {} of task {} has already finished and cannot start again",
            step.seq, fence.task_id
        )));
    }
    if let Some(key) = &input_ref {
        spill(conn, key, &input_text)?;
    }
    // Everything in the row is known here: nothing is read back.
    let record = step.into_record(fence.attempt, started_at);
    let (stored, data) = step_started_event(&record);
    let event = append_event_stored(
        conn,
        &fence.task_id,
        event_kind::STEP_STARTED,
        &stored,
        data,
    )?;
    Ok((record, event))
}

/// Adds a step's usage to its tenant's period.
const CHARGE_TENANT: &str =
    "INSERT INTO tenant_usage (tenant, period, input_tokens, output_tokens, cost_nanos)
     VALUES (?1, ?2, ?3, ?4, ?5)
     ON CONFLICT (tenant, period) DO UPDATE
        SET input_tokens = tenant_usage.input_tokens + excluded.input_tokens,
            output_tokens = tenant_usage.output_tokens + excluded.output_tokens,
            cost_nanos = tenant_usage.cost_nanos + excluded.cost_nanos";

/// A running step's end.
pub(super) const FINISH_STEP: &str = "UPDATE steps
    SET status = ?1, output = ?2, output_ref = ?3, error_code = ?4, error_message = ?5,
        input_tokens = ?6, output_tokens = ?7, finished_at = ?8
  WHERE task_id = ?9 AND seq = ?10 AND status = 'running'";

/// Journals a step's end; the caller has checked the fence.
fn finish_step(
    conn: &Connection,
    fence: &Fence,
    end: StepEnd,
) -> Result<(StepRecord, EventRecord)> {
    let seq = end.started.seq;
    let output_text = end.output.as_ref().ok().map(to_json_text);
    let output_ref = output_text.as_deref().and_then(out_of_line_key);
    let stored_output = match (&output_ref, &output_text) {
        (Some(_), _) => Some("null"),
        (None, text) => text.as_deref(),
    };
    let error = end.output.as_ref().err();
    let finished_at = end.finished_at;
    let written = conn.prepare_cached(FINISH_STEP)?.execute(params![
        StepStatus::of(&end.output).as_str(),
        stored_output,
        output_ref,
        error.map(|e| &e.code),
        error.map(|e| &e.message),
        end.usage.map(|u| u.input_tokens as i64),
        end.usage.map(|u| u.output_tokens as i64),
        finished_at,
        fence.task_id,
        seq,
    ])?;
    if written == 0 {
        return Err(StoreError::Config(format!(
            "step {seq} of task {} is not running",
            fence.task_id
        )));
    }
    if let (Some(key), Some(text)) = (&output_ref, &output_text) {
        spill(conn, key, text)?;
    }
    if let Some(usage) = end.usage {
        // A NULL cost (an unpriced model) makes the sum NULL: unknown.
        conn.prepare_cached(
            "UPDATE tasks SET input_tokens = input_tokens + ?1, output_tokens = output_tokens + ?2,
                              cost_nanos = cost_nanos + ?3
              WHERE id = ?4",
        )?
        .execute(params![
            usage.input_tokens as i64,
            usage.output_tokens as i64,
            end.cost_nanos,
            fence.task_id
        ])?;
        if let Some(charge) = &end.charge {
            conn.prepare_cached(CHARGE_TENANT)?.execute(params![
                charge.tenant,
                charge.period,
                usage.input_tokens as i64,
                usage.output_tokens as i64,
                end.cost_nanos,
            ])?;
        }
    }
    let output_bytes = output_text.as_ref().map_or(0, String::len);
    // The rest of the row is what the step started with: nothing is read back.
    let record = end.into_record(finished_at);
    let data = step_event_data(&record, output_bytes);
    let event = append_event(conn, &fence.task_id, event_kind::STEP_FINISHED, data)?;
    Ok((record, event))
}

/// A task's end, which lets its claim go.
pub(super) const FINISH_TASK: &str = "UPDATE tasks
    SET status = ?1, result = ?2, error_code = ?3, error_message = ?4, finished_at = ?5,
        lease_owner = NULL, lease_expires_at = NULL
  WHERE id = ?6";

/// Journals the task's end; the caller has checked the fence.
fn finish_task(conn: &Connection, fence: &Fence, end: &TaskEnd) -> Result<EventRecord> {
    let (result, error) = match end {
        TaskEnd::Succeeded { result } => (Some(result.as_str()), None),
        TaskEnd::Failed { error } => (None, Some(error)),
        TaskEnd::AnswerRefused { answer, error } => (Some(answer.as_str()), Some(error)),
        TaskEnd::Cancelled => (None, None),
    };
    let status = end.status();
    conn.prepare_cached(FINISH_TASK)?.execute(params![
        status.as_str(),
        result,
        error.map(|e| &e.code),
        error.map(|e| &e.message),
        now_millis(),
        fence.task_id,
    ])?;
    append_event(
        conn,
        &fence.task_id,
        event_kind::TASK_FINISHED,
        json!({"status": status, "result": result, "error": error}),
    )
}

/// The task `id`, if there is one.
pub(super) fn find_task(conn: &Connection, id: &str) -> Result<Option<TaskRecord>> {
    conn.prepare_cached("SELECT * FROM tasks WHERE id = ?1")?
        .query_row([id], |row| Ok(task_from_row(row)))
        .optional()?
        .transpose()
}

fn cancel(conn: &Connection, id: &str) -> Result<CancelOutcome> {
    let task = find_task(conn, id)?.ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
    match task.status {
        TaskStatus::Queued | TaskStatus::WaitingApproval => {
            // A waiting task holds no claim: it ends here, like a queued one.
            conn.prepare_cached(&approvals::sqlite(approvals::REJECT_ON_CANCEL))?
                .execute(params![id, now_millis()])?;
            let task = conn
                .prepare_cached(
                    "UPDATE tasks SET status = 'cancelled', cancel_requested = 1, finished_at = ?1
                      WHERE id = ?2 RETURNING *",
                )?
                .query_row(params![now_millis(), id], |row| Ok(task_from_row(row)))??;
            let event = append_event(
                conn,
                id,
                event_kind::TASK_FINISHED,
                json!({"status": "cancelled", "result": null, "error": null}),
            )?;
            Ok(CancelOutcome::Cancelled(task, event))
        }
        TaskStatus::Running => {
            let task = conn
                .prepare_cached("UPDATE tasks SET cancel_requested = 1 WHERE id = ?1 RETURNING *")?
                .query_row([id], |row| Ok(task_from_row(row)))??;
            let event = append_event(conn, id, event_kind::TASK_CANCEL_REQUESTED, json!({}))?;
            Ok(CancelOutcome::Requested(task, event))
        }
        _ => Ok(CancelOutcome::AlreadyFinished(task)),
    }
}

/// An event of a task's history, numbered by `NEXT_EVENT_SEQ`.
pub(super) const INSERT_EVENT: &str =
    "INSERT INTO events (task_id, seq, kind, data, at) VALUES (?1, ?2, ?3, ?4, ?5)";
const NEXT_EVENT_SEQ: &str = "SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE task_id = ?1";

fn append_event(conn: &Connection, task_id: &str, kind: &str, data: Value) -> Result<EventRecord> {
    append_event_stored(conn, task_id, kind, &to_json_text(&data), data)
}

/// Appends an event stored as `stored` and published as `data`.
fn append_event_stored(
    conn: &Connection,
    task_id: &str,
    kind: &str,
    stored: &str,
    data: Value,
) -> Result<EventRecord> {
    let at = now_millis();
    // Two statements rather than one `INSERT ... RETURNING seq`: SQLite
    // gives every statement with RETURNING a temporary trigger and a table
    // for its rows, and an event is the writer's most frequent write. The
    // writer holds the write lock for the whole batch, so nothing can take
    // the sequence number between the two.
    let seq: i64 = conn
        .prepare_cached(NEXT_EVENT_SEQ)?
        .query_row(params![task_id], |row| row.get(0))?;
    conn.prepare_cached(INSERT_EVENT)?
        .execute(params![task_id, seq, kind, stored, at])?;
    Ok(EventRecord {
        task_id: task_id.to_owned(),
        seq,
        kind: kind.to_owned(),
        data,
        at,
    })
}

/// Stores a payload too big to keep inline under its key (`out_of_line_key`).
fn spill(conn: &Connection, key: &str, text: &str) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO payloads (sha256, body) VALUES (?1, ?2) ON CONFLICT (sha256) DO NOTHING",
    )?
    .execute(params![key, text])?;
    Ok(())
}
