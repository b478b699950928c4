//! The embedded store: one SQLite file in WAL mode.
//!
//! SQLite admits one writer at a time, so all writes go through a single
//! writer task that groups whatever is waiting into one transaction (group
//! commit). Each write is acknowledged only after its transaction commits,
//! so no caller ever sees a step as journaled before it is durable. Reads use
//! a separate pool of read-only connections, which WAL lets run alongside the
//! writer.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{Connection, Row};
use tokio::sync::{mpsc, oneshot};

use super::{
    CancelOutcome, Claim, ErrorInfo, EventRecord, Fence, LeaseState, Millis, NewTask, Renewal,
    Result, StepEnd, StepKind, StepRecord, StepStart, StepStatus, Store, StoreError, TaskEnd,
    TaskPage, TaskQuery, TaskRecord, TaskStatus, event_kind, in_claim_order, now_millis,
    parse_json, renewals, step_event_data,
};
use crate::protocol::Usage;

/// Steps with their out-of-line payloads joined in (a macro, so queries
/// built from it stay static strings).
macro_rules! steps_with_payloads {
    () => {
        "SELECT s.*, pi.body AS input_body, po.body AS output_body
           FROM steps s
           LEFT JOIN payloads pi ON pi.sha256 = s.input_ref
           LEFT JOIN payloads po ON po.sha256 = s.output_ref"
    };
}

/// The most writes one transaction carries.
const MAX_BATCH: usize = 512;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

pub struct SqliteStore {
    reads: SqlitePool,
    writer: mpsc::Sender<Job>,
}

impl SqliteStore {
    /// Opens (creating if needed) and migrates the database at `url`.
    pub async fn open(url: &str) -> Result<Self> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));

        let mut writer_conn = SqliteConnection::connect_with(&options).await?;
        MIGRATOR.run(&mut writer_conn).await?;

        let reads = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await?;

        let (writer, jobs) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(run_writer(writer_conn, jobs));
        Ok(Self { reads, writer })
    }

    async fn write(&self, op: WriteOp) -> Result<Reply> {
        let (reply, response) = oneshot::channel();
        self.writer
            .send(Job { op, reply })
            .await
            .map_err(|_| StoreError::WriterGone)?;
        response.await.map_err(|_| StoreError::WriterGone)?
    }
}

enum WriteOp {
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
    Cancel {
        id: String,
    },
}

enum Reply {
    Created(TaskRecord, Option<EventRecord>),
    Claimed(Vec<Claim>),
    Renewed(Vec<Renewal>),
    Count(u64),
    Event(EventRecord),
    Step(StepRecord, EventRecord),
    Cancel(CancelOutcome),
}

struct Job {
    op: WriteOp,
    reply: oneshot::Sender<Result<Reply>>,
}

async fn run_writer(mut conn: SqliteConnection, mut jobs: mpsc::Receiver<Job>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while jobs.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let results = commit_batch(&mut conn, &batch).await;
        for (job, result) in batch.drain(..).zip(results) {
            // The caller may have given up waiting; its write stands regardless.
            let _ = job.reply.send(result);
        }
    }
}

/// Applies every job in one transaction. A job that fails is rolled back to
/// its savepoint alone; if the commit itself fails, every job fails.
async fn commit_batch(conn: &mut SqliteConnection, batch: &[Job]) -> Vec<Result<Reply>> {
    let mut results = Vec::with_capacity(batch.len());
    if let Err(error) = sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await {
        return batch.iter().map(|_| Err(clone_error(&error))).collect();
    }
    for job in batch {
        let outcome = async {
            sqlx::query("SAVEPOINT job").execute(&mut *conn).await?;
            let result = apply(conn, &job.op).await;
            if result.is_err() {
                sqlx::query("ROLLBACK TO job").execute(&mut *conn).await?;
            }
            sqlx::query("RELEASE job").execute(&mut *conn).await?;
            Ok::<_, sqlx::Error>(result)
        }
        .await;
        results.push(outcome.unwrap_or_else(|e| Err(e.into())));
    }
    if let Err(error) = sqlx::query("COMMIT").execute(&mut *conn).await {
        tracing::error!(%error, "committing a batch of writes failed");
        let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
        return batch.iter().map(|_| Err(clone_error(&error))).collect();
    }
    results
}

fn clone_error(error: &sqlx::Error) -> StoreError {
    StoreError::Database(sqlx::Error::Protocol(error.to_string()))
}

async fn apply(conn: &mut SqliteConnection, op: &WriteOp) -> Result<Reply> {
    match op {
        WriteOp::CreateTask(task) => create_task(conn, task).await,
        WriteOp::Claim { worker, lease, max } => claim_batch(conn, worker, *lease, *max)
            .await
            .map(Reply::Claimed),
        WriteOp::Renew { fences, lease } => {
            renew_leases(conn, fences, *lease).await.map(Reply::Renewed)
        }
        WriteOp::ExpireAllLeases => {
            let done = sqlx::query(
                "UPDATE tasks SET lease_expires_at = 0, lease_owner = NULL WHERE status = 'running'",
            )
            .execute(&mut *conn)
            .await?;
            Ok(Reply::Count(done.rows_affected()))
        }
        WriteOp::PruneFinished { before } => {
            // Steps and events go with their task (ON DELETE CASCADE).
            let done = sqlx::query(
                "DELETE FROM tasks
                  WHERE status IN ('succeeded', 'failed', 'cancelled') AND finished_at < ?",
            )
            .bind(before)
            .execute(&mut *conn)
            .await?;
            sqlx::query(PRUNE_ORPHAN_PAYLOADS)
                .execute(&mut *conn)
                .await?;
            Ok(Reply::Count(done.rows_affected()))
        }
        WriteOp::StartStep { fence, step } => start_step(conn, fence, step).await,
        WriteOp::FinishStep { fence, end } => finish_step(conn, fence, end).await,
        WriteOp::FinishTask { fence, end } => finish_task(conn, fence, end).await.map(Reply::Event),
        WriteOp::Cancel { id } => cancel(conn, id).await.map(Reply::Cancel),
    }
}

async fn create_task(conn: &mut SqliteConnection, task: &NewTask) -> Result<Reply> {
    // The writer applies one write at a time, so look-then-insert cannot race.
    if let Some(key) = &task.idempotency_key {
        let existing = sqlx::query("SELECT * FROM tasks WHERE tenant = ? AND idempotency_key = ?")
            .bind(&task.tenant)
            .bind(key)
            .fetch_optional(&mut *conn)
            .await?;
        if let Some(row) = existing {
            return Ok(Reply::Created(task_from_row(&row)?, None));
        }
    }
    let id = uuid::Uuid::now_v7().to_string();
    let now = now_millis();
    let row = sqlx::query(
        "INSERT INTO tasks (id, tenant, idempotency_key, priority, run_at, deadline_at, status,
                            goal, planner, llm, model, tools, options, max_steps, timeout_ms,
                            created_at, max_retries)
         VALUES (?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
         RETURNING *",
    )
    .bind(&id)
    .bind(&task.tenant)
    .bind(&task.idempotency_key)
    .bind(task.priority)
    .bind(task.run_at)
    .bind(task.deadline_at)
    .bind(&task.goal)
    .bind(&task.planner)
    .bind(&task.llm)
    .bind(&task.model)
    .bind(json!(task.tools).to_string())
    .bind(task.options.to_string())
    .bind(task.max_steps as i64)
    .bind(task.timeout.as_millis() as i64)
    .bind(now)
    .bind(task.max_retries as i64)
    .fetch_one(&mut *conn)
    .await?;
    let record = task_from_row(&row)?;
    let event = append_event(
        conn,
        &id,
        event_kind::TASK_QUEUED,
        json!({"status": "queued"}),
    )
    .await?;
    Ok(Reply::Created(record, Some(event)))
}

/// Claims the running tasks whose lease expired, longest expired first
/// (`tasks_by_lease`), and bumps their attempt.
///
/// `INDEXED BY` in these statements: without statistics, SQLite's planner
/// rates the older `tasks_by_status` as good as the partial indexes, and
/// would then sort every queued or running task to find the first few. With
/// it, a statement whose index is missing fails rather than scans.
const CLAIM_EXPIRED: &str = "UPDATE tasks
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
const CLAIM_QUEUED: &str = "UPDATE tasks
    SET status = 'running', attempt = attempt + 1, lease_owner = ?1, lease_expires_at = ?2,
        started_at = COALESCE(started_at, ?3)
  WHERE id IN (SELECT id FROM tasks
                  INDEXED BY tasks_queued
                WHERE status = 'queued' AND (run_at IS NULL OR run_at <= ?3)
                ORDER BY priority DESC, id
                LIMIT ?4)
 RETURNING *";

async fn claim_batch(
    conn: &mut SqliteConnection,
    worker: &str,
    lease: Duration,
    max: usize,
) -> Result<Vec<Claim>> {
    let now = now_millis();
    let expires = now + lease.as_millis() as i64;
    let claim = |query: &'static str, limit: usize| {
        sqlx::query(query)
            .bind(worker)
            .bind(expires)
            .bind(now)
            .bind(limit as i64)
    };
    let expired = claim(CLAIM_EXPIRED, max).fetch_all(&mut *conn).await?;
    let queued = match max - expired.len() {
        0 => Vec::new(),
        room => claim(CLAIM_QUEUED, room).fetch_all(&mut *conn).await?,
    };
    let tasks = in_claim_order(
        expired.iter().map(task_from_row).collect::<Result<_>>()?,
        queued.iter().map(task_from_row).collect::<Result<_>>()?,
    );
    if tasks.is_empty() {
        return Ok(Vec::new());
    }

    let ids = json!(tasks.iter().map(|t| &t.id).collect::<Vec<_>>()).to_string();
    let rows = sqlx::query(concat!(
        steps_with_payloads!(),
        " WHERE s.task_id IN (SELECT value FROM json_each(?)) ORDER BY s.task_id, s.seq"
    ))
    .bind(ids)
    .fetch_all(&mut *conn)
    .await?;
    let mut journals: HashMap<String, Vec<StepRecord>> = HashMap::new();
    for row in &rows {
        let task_id: String = row.try_get("task_id")?;
        journals
            .entry(task_id)
            .or_default()
            .push(step_from_row(row)?);
    }

    let mut claims = Vec::with_capacity(tasks.len());
    for task in tasks {
        let steps = journals.remove(&task.id).unwrap_or_default();
        let event = append_event(
            conn,
            &task.id,
            event_kind::TASK_STARTED,
            json!({"attempt": task.attempt, "resumed_steps": steps.len()}),
        )
        .await?;
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
async fn check_fence(conn: &mut SqliteConnection, fence: &Fence) -> Result<LeaseState> {
    let row = sqlx::query(
        "SELECT cancel_requested FROM tasks
          WHERE id = ? AND attempt = ? AND lease_owner = ? AND status = 'running'",
    )
    .bind(&fence.task_id)
    .bind(fence.attempt)
    .bind(&fence.worker)
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        Some(row) => Ok(LeaseState {
            cancel_requested: row.get::<i64, _>(0) != 0,
        }),
        None => Err(fenced(fence)),
    }
}

fn fenced(fence: &Fence) -> StoreError {
    StoreError::Fenced {
        task_id: fence.task_id.clone(),
        attempt: fence.attempt,
    }
}

/// The fences are one JSON array of `[task id, attempt, worker]`. The
/// row-value `IN` makes SQLite build the list once and look each task up by
/// id, rather than join every running task against every fence.
const RENEW_LEASES: &str = "UPDATE tasks SET lease_expires_at = ?1
  WHERE status = 'running'
    AND (id, attempt, lease_owner) IN
        (SELECT value ->> 0, value ->> 1, value ->> 2 FROM json_each(?2))
 RETURNING id, attempt, cancel_requested";

/// Extends the leases of the claims in `fences` in one statement, the same
/// whatever their number.
async fn renew_leases(
    conn: &mut SqliteConnection,
    fences: &[Fence],
    lease: Duration,
) -> Result<Vec<Renewal>> {
    let held = json!(
        fences
            .iter()
            .map(|f| json!([f.task_id, f.attempt, f.worker]))
            .collect::<Vec<_>>()
    );
    let renewed: Vec<(String, i64, bool)> = sqlx::query_as(RENEW_LEASES)
        .bind(now_millis() + lease.as_millis() as i64)
        .bind(held.to_string())
        .fetch_all(&mut *conn)
        .await?;
    Ok(renewals(fences, renewed))
}

async fn start_step(conn: &mut SqliteConnection, fence: &Fence, step: &StepStart) -> Result<Reply> {
    check_fence(conn, fence).await?;
    let input_text = step.input.to_string();
    let input_ref = spill(conn, &input_text).await?;
    let stored_input = if input_ref.is_some() {
        "null"
    } else {
        &input_text
    };
    // A step still marked running was in flight when an earlier claim died:
    // it runs again under the same sequence number (and idempotency key).
    let row = sqlx::query(
        "INSERT INTO steps (task_id, seq, kind, plugin, status, input, input_ref, attempt,
                            started_at)
         VALUES (?, ?, ?, ?, 'running', ?, ?, ?, ?)
         ON CONFLICT (task_id, seq) DO UPDATE
            SET kind = excluded.kind, plugin = excluded.plugin, input = excluded.input,
                input_ref = excluded.input_ref, attempt = excluded.attempt,
                started_at = excluded.started_at
          WHERE steps.status = 'running'
         RETURNING *",
    )
    .bind(&fence.task_id)
    .bind(step.seq as i64)
    .bind(step.kind.as_str())
    .bind(&step.plugin)
    .bind(stored_input)
    .bind(&input_ref)
    .bind(fence.attempt)
    .bind(now_millis())
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        return Err(StoreError::Config(format!(
            "step {} of task {} has already finished and cannot start again",
            step.seq, fence.task_id
        )));
    };
    let mut record = step_from_row(&row)?;
    record.input = step.input.clone();
    let event = append_event(
        conn,
        &fence.task_id,
        event_kind::STEP_STARTED,
        step_event_data(&record),
    )
    .await?;
    Ok(Reply::Step(record, event))
}

async fn finish_step(conn: &mut SqliteConnection, fence: &Fence, end: &StepEnd) -> Result<Reply> {
    check_fence(conn, fence).await?;
    let (status, output, error) = match &end.output {
        Ok(output) => (StepStatus::Succeeded, Some(output.to_string()), None),
        Err(error) => (StepStatus::Failed, None, Some(error)),
    };
    let output_ref = match &output {
        Some(text) => spill(conn, text).await?,
        None => None,
    };
    let stored_output = if output_ref.is_some() {
        Some("null".to_owned())
    } else {
        output
    };
    let row = sqlx::query(
        "UPDATE steps
            SET status = ?, output = ?, output_ref = ?, error_code = ?, error_message = ?,
                input_tokens = ?, output_tokens = ?, finished_at = ?
          WHERE task_id = ? AND seq = ? AND status = 'running'
         RETURNING seq",
    )
    .bind(status.as_str())
    .bind(stored_output)
    .bind(&output_ref)
    .bind(error.map(|e| &e.code))
    .bind(error.map(|e| &e.message))
    .bind(end.usage.map(|u| u.input_tokens as i64))
    .bind(end.usage.map(|u| u.output_tokens as i64))
    .bind(now_millis())
    .bind(&fence.task_id)
    .bind(end.seq as i64)
    .fetch_optional(&mut *conn)
    .await?;
    if row.is_none() {
        return Err(StoreError::Config(format!(
            "step {} of task {} is not running",
            end.seq, fence.task_id
        )));
    }
    if let Some(usage) = end.usage {
        sqlx::query(
            "UPDATE tasks SET input_tokens = input_tokens + ?, output_tokens = output_tokens + ?
              WHERE id = ?",
        )
        .bind(usage.input_tokens as i64)
        .bind(usage.output_tokens as i64)
        .bind(&fence.task_id)
        .execute(&mut *conn)
        .await?;
    }
    let record = load_step(&mut *conn, &fence.task_id, end.seq).await?;
    let event = append_event(
        conn,
        &fence.task_id,
        event_kind::STEP_FINISHED,
        step_event_data(&record),
    )
    .await?;
    Ok(Reply::Step(record, event))
}

async fn finish_task(
    conn: &mut SqliteConnection,
    fence: &Fence,
    end: &TaskEnd,
) -> Result<EventRecord> {
    check_fence(conn, fence).await?;
    let (result, error) = match end {
        TaskEnd::Succeeded { result } => (Some(result.as_str()), None),
        TaskEnd::Failed { error } => (None, Some(error)),
        TaskEnd::Cancelled => (None, None),
    };
    let status = end.status();
    sqlx::query(
        "UPDATE tasks
            SET status = ?, result = ?, error_code = ?, error_message = ?, finished_at = ?,
                lease_owner = NULL, lease_expires_at = NULL
          WHERE id = ?",
    )
    .bind(status.as_str())
    .bind(result)
    .bind(error.map(|e| &e.code))
    .bind(error.map(|e| &e.message))
    .bind(now_millis())
    .bind(&fence.task_id)
    .execute(&mut *conn)
    .await?;
    append_event(
        conn,
        &fence.task_id,
        event_kind::TASK_FINISHED,
        json!({"status": status, "result": result, "error": error}),
    )
    .await
}

async fn cancel(conn: &mut SqliteConnection, id: &str) -> Result<CancelOutcome> {
    let row = sqlx::query("SELECT * FROM tasks WHERE id = ?")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
    let task = task_from_row(&row)?;
    match task.status {
        TaskStatus::Queued => {
            let row = sqlx::query(
                "UPDATE tasks SET status = 'cancelled', cancel_requested = 1, finished_at = ?
                  WHERE id = ? RETURNING *",
            )
            .bind(now_millis())
            .bind(id)
            .fetch_one(&mut *conn)
            .await?;
            let event = append_event(
                conn,
                id,
                event_kind::TASK_FINISHED,
                json!({"status": "cancelled", "result": null, "error": null}),
            )
            .await?;
            Ok(CancelOutcome::Cancelled(task_from_row(&row)?, event))
        }
        TaskStatus::Running => {
            let row = sqlx::query("UPDATE tasks SET cancel_requested = 1 WHERE id = ? RETURNING *")
                .bind(id)
                .fetch_one(&mut *conn)
                .await?;
            let event =
                append_event(conn, id, event_kind::TASK_CANCEL_REQUESTED, json!({})).await?;
            Ok(CancelOutcome::Requested(task_from_row(&row)?, event))
        }
        _ => Ok(CancelOutcome::AlreadyFinished(task)),
    }
}

async fn append_event(
    conn: &mut SqliteConnection,
    task_id: &str,
    kind: &str,
    data: Value,
) -> Result<EventRecord> {
    let at = now_millis();
    let seq: i64 = sqlx::query_scalar(
        "INSERT INTO events (task_id, seq, kind, data, at)
         SELECT ?1, COALESCE(MAX(seq), 0) + 1, ?2, ?3, ?4 FROM events WHERE task_id = ?1
         RETURNING seq",
    )
    .bind(task_id)
    .bind(kind)
    .bind(data.to_string())
    .bind(at)
    .fetch_one(&mut *conn)
    .await?;
    Ok(EventRecord {
        task_id: task_id.to_owned(),
        seq,
        kind: kind.to_owned(),
        data,
        at,
    })
}

async fn load_steps<'c, E>(executor: E, task_id: &str) -> Result<Vec<StepRecord>>
where
    E: sqlx::Executor<'c, Database = sqlx::Sqlite>,
{
    let rows = sqlx::query(concat!(
        steps_with_payloads!(),
        " WHERE s.task_id = ? ORDER BY s.seq"
    ))
    .bind(task_id)
    .fetch_all(executor)
    .await?;
    rows.iter().map(step_from_row).collect()
}

/// Payloads no step refers to any more (their tasks were pruned).
const PRUNE_ORPHAN_PAYLOADS: &str = "DELETE FROM payloads
      WHERE NOT EXISTS (SELECT 1 FROM steps WHERE input_ref = payloads.sha256)
        AND NOT EXISTS (SELECT 1 FROM steps WHERE output_ref = payloads.sha256)";

async fn load_step(conn: &mut SqliteConnection, task_id: &str, seq: u32) -> Result<StepRecord> {
    let row = sqlx::query(concat!(
        steps_with_payloads!(),
        " WHERE s.task_id = ? AND s.seq = ?"
    ))
    .bind(task_id)
    .bind(seq as i64)
    .fetch_one(&mut *conn)
    .await?;
    step_from_row(&row)
}

/// Stores a payload too big to keep inline; returns the key it is under.
async fn spill(conn: &mut SqliteConnection, text: &str) -> Result<Option<String>> {
    let Some(key) = super::out_of_line_key(text) else {
        return Ok(None);
    };
    sqlx::query(
        "INSERT INTO payloads (sha256, body) VALUES (?, ?) ON CONFLICT (sha256) DO NOTHING",
    )
    .bind(&key)
    .bind(text)
    .execute(&mut *conn)
    .await?;
    Ok(Some(key))
}

fn task_from_row(row: &SqliteRow) -> Result<TaskRecord> {
    let status: String = row.try_get("status")?;
    let tools: String = row.try_get("tools")?;
    let options: String = row.try_get("options")?;
    Ok(TaskRecord {
        id: row.try_get("id")?,
        tenant: row.try_get("tenant")?,
        idempotency_key: row.try_get("idempotency_key")?,
        priority: row.try_get::<i64, _>("priority")? as i32,
        run_at: row.try_get("run_at")?,
        deadline_at: row.try_get("deadline_at")?,
        status: TaskStatus::parse(&status).ok_or_else(|| corrupt_enum("task status", &status))?,
        goal: row.try_get("goal")?,
        planner: row.try_get("planner")?,
        llm: row.try_get("llm")?,
        model: row.try_get("model")?,
        tools: serde_json::from_str(&tools).map_err(|source| StoreError::Corrupt {
            what: "task tools",
            source,
        })?,
        options: parse_json(&options, "task options")?,
        max_steps: row.try_get::<i64, _>("max_steps")? as u32,
        max_retries: row.try_get::<i64, _>("max_retries")? as u32,
        timeout_ms: row.try_get("timeout_ms")?,
        result: row.try_get("result")?,
        error: error_from_row(row)?,
        attempt: row.try_get("attempt")?,
        cancel_requested: row.try_get::<i64, _>("cancel_requested")? != 0,
        usage: Usage {
            input_tokens: row.try_get::<i64, _>("input_tokens")? as u64,
            output_tokens: row.try_get::<i64, _>("output_tokens")? as u64,
        },
        created_at: row.try_get("created_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
    })
}

fn step_from_row(row: &SqliteRow) -> Result<StepRecord> {
    let kind: String = row.try_get("kind")?;
    let status: String = row.try_get("status")?;
    let input: String = row.try_get("input")?;
    let output: Option<String> = row.try_get("output")?;
    let input_tokens: Option<i64> = row.try_get("input_tokens")?;
    let output_tokens: Option<i64> = row.try_get("output_tokens")?;
    Ok(StepRecord {
        seq: row.try_get::<i64, _>("seq")? as u32,
        kind: StepKind::parse(&kind).ok_or_else(|| corrupt_enum("step kind", &kind))?,
        plugin: row.try_get("plugin")?,
        status: StepStatus::parse(&status).ok_or_else(|| corrupt_enum("step status", &status))?,
        input: match body(row, "input_body") {
            Some(body) => parse_json(&body, "step input")?,
            None => parse_json(&input, "step input")?,
        },
        output: match body(row, "output_body") {
            Some(body) => Some(parse_json(&body, "step output")?),
            None => output.map(|o| parse_json(&o, "step output")).transpose()?,
        },
        error: error_from_row(row)?,
        usage: match (input_tokens, output_tokens) {
            (None, None) => None,
            (i, o) => Some(Usage {
                input_tokens: i.unwrap_or(0) as u64,
                output_tokens: o.unwrap_or(0) as u64,
            }),
        },
        attempt: row.try_get("attempt")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
    })
}

/// An out-of-line payload joined into the row, if any.
fn body(row: &SqliteRow, column: &str) -> Option<String> {
    row.try_get::<Option<String>, _>(column).ok().flatten()
}

fn error_from_row(row: &SqliteRow) -> Result<Option<ErrorInfo>> {
    let code: Option<String> = row.try_get("error_code")?;
    let message: Option<String> = row.try_get("error_message")?;
    Ok(code.map(|code| ErrorInfo {
        code,
        message: message.unwrap_or_default(),
    }))
}

fn event_from_row(row: &SqliteRow) -> Result<EventRecord> {
    let data: String = row.try_get("data")?;
    Ok(EventRecord {
        task_id: row.try_get("task_id")?,
        seq: row.try_get("seq")?,
        kind: row.try_get("kind")?,
        data: parse_json(&data, "event data")?,
        at: row.try_get::<Millis, _>("at")?,
    })
}

fn corrupt_enum(what: &str, value: &str) -> StoreError {
    StoreError::Config(format!("unknown {what} {value:?} in the database"))
}

#[async_trait]
impl Store for SqliteStore {
    fn engine(&self) -> &'static str {
        "sqlite"
    }

    async fn create_task(&self, task: NewTask) -> Result<(TaskRecord, Option<EventRecord>)> {
        match self.write(WriteOp::CreateTask(task)).await? {
            Reply::Created(task, event) => Ok((task, event)),
            _ => unreachable!("create_task answers Created"),
        }
    }

    async fn get_task(&self, id: &str) -> Result<Option<TaskRecord>> {
        let row = sqlx::query("SELECT * FROM tasks WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.reads)
            .await?;
        row.as_ref().map(task_from_row).transpose()
    }

    async fn prune_finished(&self, before: Millis) -> Result<u64> {
        match self.write(WriteOp::PruneFinished { before }).await? {
            Reply::Count(n) => Ok(n),
            _ => unreachable!("prune answers Count"),
        }
    }

    async fn count_active(&self, tenant: &str) -> Result<u64> {
        let count: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM tasks WHERE tenant = ? AND status IN ('queued', 'running')",
        )
        .bind(tenant)
        .fetch_one(&self.reads)
        .await?;
        Ok(count as u64)
    }

    async fn count_queued(&self, tenant: Option<&str>, at_most: u64) -> Result<u64> {
        let at_most = at_most.min(i64::MAX as u64) as i64;
        // Static statements, each on the partial index of queued tasks.
        let count: i64 =
            match tenant {
                Some(tenant) => sqlx::query_scalar(
                    "SELECT COUNT(*) FROM (SELECT 1 FROM tasks INDEXED BY tasks_queued_by_tenant
                                            WHERE status = 'queued' AND tenant = ?1
                                            LIMIT ?2)",
                )
                .bind(tenant)
                .bind(at_most)
                .fetch_one(&self.reads)
                .await?,
                None => sqlx::query_scalar(
                    "SELECT COUNT(*) FROM (SELECT 1 FROM tasks INDEXED BY tasks_queued_by_tenant
                                            WHERE status = 'queued'
                                            LIMIT ?1)",
                )
                .bind(at_most)
                .fetch_one(&self.reads)
                .await?,
            };
        Ok(count as u64)
    }

    async fn list_tasks(&self, query: &TaskQuery) -> Result<TaskPage> {
        let limit = query.limit.clamp(1, 500);
        let rows = sqlx::query(
            "SELECT * FROM tasks
              WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR id < ?2)
                AND (?4 IS NULL OR tenant = ?4)
              ORDER BY id DESC
              LIMIT ?3",
        )
        .bind(query.status.map(TaskStatus::as_str))
        .bind(&query.before)
        .bind(limit as i64 + 1)
        .bind(&query.tenant)
        .fetch_all(&self.reads)
        .await?;
        let mut tasks = rows.iter().map(task_from_row).collect::<Result<Vec<_>>>()?;
        let next_cursor = if tasks.len() > limit as usize {
            tasks.truncate(limit as usize);
            tasks.last().map(|t| t.id.clone())
        } else {
            None
        };
        Ok(TaskPage { tasks, next_cursor })
    }

    async fn steps(&self, task_id: &str) -> Result<Vec<StepRecord>> {
        load_steps(&self.reads, task_id).await
    }

    async fn events_after(&self, task_id: &str, after: i64) -> Result<Vec<EventRecord>> {
        let rows = sqlx::query("SELECT * FROM events WHERE task_id = ? AND seq > ? ORDER BY seq")
            .bind(task_id)
            .bind(after)
            .fetch_all(&self.reads)
            .await?;
        rows.iter().map(event_from_row).collect()
    }

    async fn request_cancel(&self, id: &str) -> Result<CancelOutcome> {
        match self.write(WriteOp::Cancel { id: id.to_owned() }).await? {
            Reply::Cancel(outcome) => Ok(outcome),
            _ => unreachable!("cancel answers Cancel"),
        }
    }

    async fn claim_batch(&self, worker: &str, lease: Duration, max: usize) -> Result<Vec<Claim>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let op = WriteOp::Claim {
            worker: worker.to_owned(),
            lease,
            max,
        };
        match self.write(op).await? {
            Reply::Claimed(claims) => Ok(claims),
            _ => unreachable!("claim answers Claimed"),
        }
    }

    async fn renew_leases(&self, fences: &[Fence], lease: Duration) -> Result<Vec<Renewal>> {
        if fences.is_empty() {
            return Ok(Vec::new());
        }
        let op = WriteOp::Renew {
            fences: fences.to_vec(),
            lease,
        };
        match self.write(op).await? {
            Reply::Renewed(renewals) => Ok(renewals),
            _ => unreachable!("renew answers Renewed"),
        }
    }

    async fn expire_all_leases(&self) -> Result<u64> {
        match self.write(WriteOp::ExpireAllLeases).await? {
            Reply::Count(n) => Ok(n),
            _ => unreachable!("expire answers Count"),
        }
    }

    async fn start_step(
        &self,
        fence: &Fence,
        step: StepStart,
    ) -> Result<(StepRecord, EventRecord)> {
        let op = WriteOp::StartStep {
            fence: fence.clone(),
            step,
        };
        match self.write(op).await? {
            Reply::Step(step, event) => Ok((step, event)),
            _ => unreachable!("start_step answers Event"),
        }
    }

    async fn finish_step(&self, fence: &Fence, end: StepEnd) -> Result<(StepRecord, EventRecord)> {
        let op = WriteOp::FinishStep {
            fence: fence.clone(),
            end,
        };
        match self.write(op).await? {
            Reply::Step(step, event) => Ok((step, event)),
            _ => unreachable!("finish_step answers Event"),
        }
    }

    async fn finish_task(&self, fence: &Fence, end: TaskEnd) -> Result<EventRecord> {
        let op = WriteOp::FinishTask {
            fence: fence.clone(),
            end,
        };
        match self.write(op).await? {
            Reply::Event(event) => Ok(event),
            _ => unreachable!("finish_task answers Event"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance;

    async fn open_temporary() -> (SqliteStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("opspawn.db").display());
        (SqliteStore::open(&url).await.unwrap(), dir)
    }

    #[tokio::test]
    async fn claims_take_expired_leases_first() {
        let (store, _dir) = open_temporary().await;
        conformance::claims_take_expired_leases_first(&store).await;
    }

    #[tokio::test]
    async fn a_batch_claim_loads_each_journal() {
        let (store, _dir) = open_temporary().await;
        conformance::a_batch_claim_loads_each_journal(&store).await;
    }

    /// The claim and the renewal look rows up through indexes, never by
    /// scanning the table or sorting it.
    #[tokio::test]
    async fn claims_and_renewals_use_indexes() {
        let (store, dir) = open_temporary().await;
        drop(store);
        let url = format!("sqlite://{}", dir.path().join("opspawn.db").display());
        let mut conn = SqliteConnection::connect(&url).await.unwrap();
        let cases = [
            (CLAIM_EXPIRED, "tasks_by_lease"),
            (CLAIM_QUEUED, "tasks_queued"),
            (RENEW_LEASES, "id=?"),
        ];
        for (query, index) in cases {
            let explain =
                sqlx::query_as(sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {query}")));
            let explain = if query == RENEW_LEASES {
                explain.bind(0_i64).bind(r#"[["id", 1, "w"]]"#)
            } else {
                explain.bind("w").bind(0_i64).bind(0_i64).bind(10_i64)
            };
            let rows: Vec<(i64, i64, i64, String)> = explain.fetch_all(&mut conn).await.unwrap();
            let plan: Vec<&str> = rows.iter().map(|row| row.3.as_str()).collect();
            assert!(
                plan.iter()
                    .all(|step| step.trim() != "SCAN tasks" && !step.contains("TEMP B-TREE")),
                "{query}\n{plan:#?}"
            );
            assert!(
                plan.iter().any(|step| step.contains(index)),
                "{query} does not use {index}: {plan:#?}"
            );
        }
    }
}
