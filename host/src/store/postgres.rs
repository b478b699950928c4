//! The shared store: a Postgres database that several hosts may use at once.
//!
//! Unlike SQLite there is no single writer: every write is its own
//! transaction on a pooled connection, and row locks keep concurrent writers
//! apart. Each write that concerns a task first locks the task's row (`FOR
//! UPDATE`), which both fences it (the claim is checked on the locked row, so
//! a superseded worker cannot write) and serialises the numbering of the
//! task's events.
//!
//! Wake-ups: creating a task sends a notification on `opspawn_tasks` (or
//! `opspawn_tasks_<schema>` with `opspawn_schema`: channels are global to
//! the database) when its transaction commits, payload the task id. Every
//! host listens on a connection of its own and wakes an idle worker per
//! notification ([`Store::wakeups`]), so a task submitted to one host starts
//! at once on whichever host has a worker free. A notification is only a
//! hint: one sent while a listener was reconnecting is lost, so after each
//! (re)connect every idle worker looks once, and the scheduler's poll still
//! finds expired leases and tasks whose start time has come.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::types::Json;
use sqlx::{AssertSqlSafe, Row};
use tokio::sync::Notify;

use super::approvals::{
    self, ApprovalColumns, ApprovalRecord, ApprovalRequest, ApprovalStatus, DecideOutcome, Decision,
};
use super::memories::{self, MemoryCall, MemoryColumns};
use super::schedules::{
    FireRules, Fired, NewSchedule, SchedulePage, ScheduleQuery, ScheduleRecord, TaskTemplate,
};
use super::{
    CancelOutcome, Claim, ErrorInfo, EventRecord, Fence, HistoryStep, LeaseState, Millis, NewTask,
    PeriodUsage, QueueGauges, Renewal, Result, SqlDialect, StepEnd, StepKind, StepRecord,
    StepStart, StepStatus, StepVersions, Store, StoreError, TaskBudget, TaskEnd, TaskPage,
    TaskQuery, TaskRecord, TaskStats, TaskStatus, ThreadDeletion, event_kind, in_claim_order,
    lack_step_inputs, now_millis, parse_json, renewals, restore_step_inputs, step_event_data,
    step_started_event,
};
use crate::memory::{MemoryConfig, MemoryOp, MemoryQuery, MemoryRecord, MemoryReply, NewMemory};
use crate::protocol::{Image, ResponseFormat, ToolCall, Usage, to_json_text};
use crate::schedules::MissedTicks;

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

/// The most connections one host opens.
const MAX_CONNECTIONS: u32 = 16;

/// The channel task creation is announced on (suffixed with the schema).
const TASKS_CHANNEL: &str = "opspawn_tasks";

/// Longer identifiers are truncated by Postgres, and refused by `pg_notify`.
const MAX_IDENTIFIER: usize = 63;

/// How long the listener waits before reconnecting, doubling up to the most.
const LISTEN_BACKOFF: Duration = Duration::from_millis(100);
const LISTEN_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How long a transaction may sit idle before Postgres ends its session. A
/// host that stalls in the middle of a write (stopped, swapped out, cut off)
/// holds its task's row lock: no other host could claim the task, or even
/// cancel it, however long ago its lease expired. Every transaction here is
/// a few statements sent back to back, so only a stalled host waits this long.
const IDLE_IN_TRANSACTION_TIMEOUT: &str = "10s";

/// The URL query parameter naming the schema to keep the tables in.
const SCHEMA_PARAMETER: &str = "opspawn_schema";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

/// Postgres's spelling of the task list's filters (`tools` is `json`).
pub const DIALECT: SqlDialect = SqlDialect {
    placeholder: |n| format!("${n}"),
    tools_hold: |p| {
        format!("EXISTS (SELECT 1 FROM json_array_elements_text(tools) AS tool WHERE tool = {p})")
    },
    goal_holds: |p| format!("strpos(lower(goal), lower({p})) > 0"),
    finished_tasks_index: "",
};

pub struct PgStore {
    pool: PgPool,
    /// Where this store's tasks are announced.
    channel: String,
    /// Signalled for every task announced on the channel.
    wakeups: Arc<Notify>,
    /// Ids of tasks whose cancellation was requested on any host.
    cancellations: tokio::sync::broadcast::Sender<String>,
    /// The task listening on the channel; stopped with the store.
    listener: tokio::task::AbortHandle,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

impl PgStore {
    /// Connects to the database at `url` and migrates it.
    ///
    /// `url` may carry `opspawn_schema=NAME` (`[a-z0-9_]+`): the tables then
    /// live in that schema, created if needed, so that several stores (tests,
    /// say) can share one database without seeing each other.
    pub async fn open(url: &str) -> Result<Self> {
        let (url, schema) = take_schema(url)?;
        let options = PgConnectOptions::from_str(&url)?;
        let channel = tasks_channel(schema.as_deref());
        let mut session =
            format!("SET idle_in_transaction_session_timeout = '{IDLE_IN_TRANSACTION_TIMEOUT}';");
        if let Some(schema) = &schema {
            // Safe to splice: the name was checked to be [a-z0-9_]+. Setting
            // a search_path that does not exist yet is allowed; the schema is
            // created below, before any table is used.
            session.push_str(&format!(" SET search_path TO \"{schema}\";"));
        }
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .after_connect(move |conn, _| {
                let session = session.clone();
                Box::pin(async move {
                    sqlx::raw_sql(AssertSqlSafe(session))
                        .execute(conn)
                        .await
                        .map(drop)
                })
            })
            .connect_with(options.clone())
            .await?;
        if let Some(schema) = &schema {
            create_schema(&pool, schema).await?;
        }
        // Unqualified, like the migrations' tables, so the search_path puts
        // `_sqlx_migrations` in the schema as well.
        MIGRATOR.run(&pool).await?;
        let wakeups = Arc::new(Notify::new());
        let cancellations = tokio::sync::broadcast::channel(1024).0;
        let signals = Signals {
            wakeups: wakeups.clone(),
            cancellations: cancellations.clone(),
        };
        let listener = tokio::spawn(listen(options, channel.clone(), signals)).abort_handle();
        Ok(Self {
            pool,
            channel,
            wakeups,
            cancellations,
            listener,
        })
    }
}

/// The channel for the tasks in `schema`: notifications are global to the
/// database, and hosts using different schemas must not wake each other.
/// Cut to the longest identifier: two schemas whose names share their first
/// 49 characters then share a channel, which costs only idle wake-ups.
fn tasks_channel(schema: Option<&str>) -> String {
    let mut channel = match schema {
        Some(schema) => format!("{TASKS_CHANNEL}_{schema}"),
        None => TASKS_CHANNEL.to_owned(),
    };
    channel.truncate(MAX_IDENTIFIER); // ASCII: the schema is [a-z0-9_]+
    channel
}

/// Listens on `channel` for as long as the store lives, waking an idle
/// worker per notification. Reconnects when the connection is lost or fails,
/// after a backoff that doubles from 100 ms up to 5 s and resets once
/// listening again.
/// What a notification on the channel can say: a new task (its id), or
/// `cancel:<id>`, a cancellation requested on some host.
struct Signals {
    wakeups: Arc<Notify>,
    cancellations: tokio::sync::broadcast::Sender<String>,
}

/// The payload prefix of a cancellation notice.
const CANCEL_PREFIX: &str = "cancel:";

async fn listen(options: PgConnectOptions, channel: String, signals: Signals) {
    // A pool of one connection of its own, so listening never takes one of
    // the store's and the connection is never retired while it listens.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .max_lifetime(None)
        .idle_timeout(None)
        .connect_lazy_with(options);
    let mut backoff = LISTEN_BACKOFF;
    loop {
        match listen_until_lost(&pool, &channel, &signals, &mut backoff).await {
            Ok(()) => tracing::warn!(%channel, "lost the connection listening for new tasks"),
            Err(error) => tracing::warn!(%channel, %error, "listening for new tasks failed"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(LISTEN_BACKOFF_MAX);
    }
}

/// Listens on one connection until it is lost (`Ok`) or fails (`Err`).
async fn listen_until_lost(
    pool: &PgPool,
    channel: &str,
    signals: &Signals,
    backoff: &mut Duration,
) -> std::result::Result<(), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.ignore_pool_close_event(true);
    // Reconnecting is this loop's business, with its backoff.
    listener.eager_reconnect(false);
    listener.listen(channel).await?;
    tracing::debug!(%channel, "listening for new tasks");
    *backoff = LISTEN_BACKOFF;
    // Tasks announced while nobody listened: every idle worker looks once.
    signals.wakeups.notify_waiters();
    while let Some(notification) = listener.try_recv().await? {
        match notification.payload().strip_prefix(CANCEL_PREFIX) {
            // No host running the task is listening: fine, renewal finds it.
            Some(task_id) => drop(signals.cancellations.send(task_id.to_owned())),
            None => signals.wakeups.notify_one(),
        }
    }
    Ok(())
}

/// Splits `opspawn_schema=NAME` off the URL's query; the rest of the URL goes
/// to the driver, which does not know the parameter.
fn take_schema(url: &str) -> Result<(String, Option<String>)> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), None));
    };
    let mut schema = None;
    let mut kept = Vec::new();
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some((SCHEMA_PARAMETER, name)) => schema = Some(name.to_owned()),
            _ => kept.push(pair),
        }
    }
    if let Some(name) = &schema {
        let valid = !name.is_empty()
            && name.len() <= 63 // longer identifiers are silently truncated
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !valid {
            return Err(StoreError::Config(format!(
                "invalid {SCHEMA_PARAMETER} {name:?}: use 1 to 63 of a-z, 0-9 and _"
            )));
        }
    }
    let url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((url, schema))
}

async fn create_schema(pool: &PgPool, schema: &str) -> Result<()> {
    let created = sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE SCHEMA IF NOT EXISTS \"{schema}\""
    )))
    .execute(pool)
    .await;
    match created {
        // Two hosts creating the schema at once: IF NOT EXISTS does not
        // cover the race, and the loser gets a unique violation. The schema
        // exists either way.
        Err(sqlx::Error::Database(error)) if error.is_unique_violation() => Ok(()),
        Err(error) => Err(error.into()),
        Ok(_) => Ok(()),
    }
}

async fn create_task(
    conn: &mut PgConnection,
    task: &NewTask,
    channel: &str,
) -> Result<(TaskRecord, Option<EventRecord>)> {
    let id = uuid::Uuid::now_v7().to_string();
    let now = now_millis();
    // JSON goes in as text cast to `json`: a `jsonb` parameter would refuse
    // the escape \u0000. A second task with a tenant's idempotency key
    // conflicts on the unique index and inserts nothing.
    let row = sqlx::query(
        "INSERT INTO tasks (id, status, goal, planner, llm, model, tools, options, max_steps,
                            timeout_ms, created_at, tenant, idempotency_key, priority, run_at,
                            deadline_at, max_retries, trace_parent, schedule_id, scheduled_for,
                            cost_nanos, budget_max_tokens, budget_max_cost_nanos, thread,
                            memory_namespace, response_format, tool_call, images)
         VALUES ($1, 'queued', $2, $3, $4, $5, $6::json, $7::json, $8, $9, $10, $11, $12, $13,
                 $14, $15, $16, $17, $18, $19, 0, $20, $21, $22, $23, $24::json, $25::json,
                 $26::json)
         ON CONFLICT (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
         RETURNING *",
    )
    .bind(&id)
    .bind(&task.goal)
    .bind(&task.planner)
    .bind(&task.llm)
    .bind(&task.model)
    .bind(to_json_text(&task.tools))
    .bind(to_json_text(&task.options))
    .bind(task.max_steps as i64)
    .bind(task.timeout.as_millis() as i64)
    .bind(now)
    .bind(&task.tenant)
    .bind(&task.idempotency_key)
    .bind(task.priority)
    .bind(task.run_at)
    .bind(task.deadline_at)
    .bind(task.max_retries as i32)
    .bind(&task.trace_parent)
    .bind(task.schedule.as_ref().map(|run| &run.schedule_id))
    .bind(task.schedule.as_ref().map(|run| run.tick))
    .bind(task.budget.max_tokens.map(|n| n as i64))
    .bind(task.budget.max_cost_nanos)
    .bind(&task.thread)
    .bind(&task.memory_namespace)
    .bind(task.response_format.as_ref().map(to_json_text))
    .bind(task.call.as_ref().map(to_json_text))
    .bind((!task.images.is_empty()).then(|| to_json_text(&task.images)))
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        let existing =
            sqlx::query("SELECT * FROM tasks WHERE tenant = $1 AND idempotency_key = $2")
                .bind(&task.tenant)
                .bind(&task.idempotency_key)
                .fetch_one(&mut *conn)
                .await?;
        return Ok((task_from_row(&existing)?, None));
    };
    let record = task_from_row(&row)?;
    let event = append_event(
        conn,
        &id,
        event_kind::TASK_QUEUED,
        super::schedules::queued_event_data(task),
    )
    .await?;
    // Delivered when the transaction commits, never for a task rolled back.
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(channel)
        .bind(&id)
        .execute(&mut *conn)
        .await?;
    Ok((record, Some(event)))
}

/// Claims the running tasks whose lease expired, longest expired first: a
/// range scan of the partial index `tasks_by_lease`, which holds running
/// tasks only. SKIP LOCKED: hosts claiming at once take different tasks
/// instead of queueing on the same rows, and a task whose row a writer holds
/// (a cancel, a step of the host that still has it) is left for next time.
const CLAIM_EXPIRED: &str = "UPDATE tasks
    SET attempt = attempt + 1, lease_owner = $1, lease_expires_at = $2,
        started_at = COALESCE(started_at, $3)
  WHERE id IN (SELECT id FROM tasks
                WHERE status = 'running' AND lease_expires_at < $3
                ORDER BY lease_expires_at
                LIMIT $4
                FOR UPDATE SKIP LOCKED)
 RETURNING *";

/// Claims queued tasks whose start time has come, walking the partial index
/// `tasks_queued` in claim order (priority, then age) and stopping after
/// `LIMIT` rows: no sort, and a cost that does not grow with the queue. A
/// thread's task is taken only when it is its thread's oldest unfinished
/// one (`thread_is_free!`): a host that skips the oldest, locked by another
/// host's claim, still sees it queued, so never takes the next one.
const CLAIM_QUEUED: &str = concat!(
    "UPDATE tasks
    SET status = 'running', attempt = attempt + 1, lease_owner = $1, lease_expires_at = $2,
        started_at = COALESCE(started_at, $3)
  WHERE id IN (SELECT id FROM tasks
                WHERE status = 'queued' AND (run_at IS NULL OR run_at <= $3)
                  AND ",
    thread_is_free!(),
    "
                ORDER BY priority DESC, id
                LIMIT $4
                FOR UPDATE SKIP LOCKED)
 RETURNING *"
);

/// Appends `task.started` to each claimed task's history in one statement.
/// The claim holds every one of these rows locked until it commits, so no
/// other writer can number an event of these tasks meanwhile.
const APPEND_STARTED: &str = "INSERT INTO events (task_id, seq, kind, data, at)
 SELECT started.id,
        COALESCE((SELECT MAX(seq) FROM events WHERE events.task_id = started.id), 0) + 1,
        $3, started.data::json, $4
   FROM unnest($1::text[], $2::text[]) AS started(id, data)
 RETURNING task_id, seq";

async fn claim_batch(
    conn: &mut PgConnection,
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

    let ids: Vec<String> = tasks.iter().map(|t| t.id.clone()).collect();
    let rows = sqlx::query(concat!(
        steps_with_payloads!(),
        " WHERE s.task_id = ANY($1) ORDER BY s.task_id, s.seq"
    ))
    .bind(&ids)
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

    let at = now_millis();
    let started: Vec<(TaskRecord, Vec<StepRecord>, Value)> = tasks
        .into_iter()
        .map(|task| {
            let steps = journals.remove(&task.id).unwrap_or_default();
            let data = json!({"attempt": task.attempt, "resumed_steps": steps.len()});
            (task, steps, data)
        })
        .collect();
    let texts: Vec<String> = started
        .iter()
        .map(|(_, _, data)| to_json_text(data))
        .collect();
    let numbered: HashMap<String, i64> = sqlx::query_as::<_, (String, i64)>(APPEND_STARTED)
        .bind(&ids)
        .bind(&texts)
        .bind(event_kind::TASK_STARTED)
        .bind(at)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .collect();

    started
        .into_iter()
        .map(|(task, steps, data)| {
            let seq = *numbered.get(&task.id).ok_or_else(|| {
                StoreError::Config(format!(
                    "no task.started event was numbered for {}",
                    task.id
                ))
            })?;
            Ok(Claim {
                fence: Fence {
                    task_id: task.id.clone(),
                    attempt: task.attempt,
                    worker: worker.to_owned(),
                },
                event: EventRecord {
                    task_id: task.id.clone(),
                    seq,
                    kind: event_kind::TASK_STARTED.to_owned(),
                    data,
                    at,
                },
                task,
                steps,
            })
        })
        .collect()
}

/// Locks the task's row and fails with `Fenced` unless `fence` is its
/// current, running claim. The lock is held until the transaction ends, so
/// no claim can supersede this one while the caller writes.
async fn check_fence(conn: &mut PgConnection, fence: &Fence) -> Result<LeaseState> {
    let row = sqlx::query(
        "SELECT cancel_requested FROM tasks
          WHERE id = $1 AND attempt = $2 AND lease_owner = $3 AND status = 'running'
            FOR UPDATE",
    )
    .bind(&fence.task_id)
    .bind(fence.attempt)
    .bind(&fence.worker)
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        Some(row) => Ok(LeaseState {
            cancel_requested: row.try_get("cancel_requested")?,
        }),
        None => Err(StoreError::Fenced {
            task_id: fence.task_id.clone(),
            attempt: fence.attempt,
        }),
    }
}

/// Extends the leases of the claims in `fences` in one statement: the
/// fences go in as three arrays, joined to `tasks` by primary key, so the
/// statement is the same whatever their number. A row a writer holds makes
/// the renewal wait for that write (a few statements), never skip the row.
async fn renew_leases(
    conn: &mut PgConnection,
    fences: &[Fence],
    lease: Duration,
) -> Result<Vec<Renewal>> {
    let ids: Vec<&str> = fences.iter().map(|f| f.task_id.as_str()).collect();
    let attempts: Vec<i64> = fences.iter().map(|f| f.attempt).collect();
    let workers: Vec<&str> = fences.iter().map(|f| f.worker.as_str()).collect();
    let renewed: Vec<(String, i64, bool)> = sqlx::query_as(
        "UPDATE tasks SET lease_expires_at = $1
           FROM unnest($2::text[], $3::bigint[], $4::text[]) AS held(id, attempt, worker)
          WHERE tasks.id = held.id AND tasks.attempt = held.attempt
            AND tasks.lease_owner = held.worker AND tasks.status = 'running'
         RETURNING tasks.id, tasks.attempt, tasks.cancel_requested",
    )
    .bind(now_millis() + lease.as_millis() as i64)
    .bind(&ids)
    .bind(&attempts)
    .bind(&workers)
    .fetch_all(&mut *conn)
    .await?;
    Ok(renewals(fences, renewed))
}

/// The end of a statement that appends an event, numbered after the task's
/// last, for each row of `$source` (a CTE of the statement). `$1` is the
/// task id; the other arguments name the parameters holding the event's
/// kind, data and time. As for [`append_event`], the caller holds the task's
/// row lock from an earlier statement, so the number is free.
macro_rules! append_event_from {
    ($source:literal, $kind:literal, $data:literal, $at:literal) => {
        concat!(
            "INSERT INTO events (task_id, seq, kind, data, at)
             SELECT $1, COALESCE((SELECT MAX(seq) FROM events WHERE task_id = $1), 0) + 1, ",
            $kind,
            ", ",
            $data,
            "::json, ",
            $at,
            " FROM ",
            $source,
            " RETURNING seq"
        )
    };
}

/// Journals a step's start and its event in one statement.
const START_STEP: &str = concat!(
    "WITH step AS (
        INSERT INTO steps (task_id, seq, kind, plugin, status, input, attempt, started_at,
                           input_ref, plugin_sha256, planner_sha256)
        VALUES ($1, $2, $3, $4, 'running', $5::json, $6, $7, $8, $11, $12)
        ON CONFLICT (task_id, seq) DO UPDATE
           SET kind = excluded.kind, plugin = excluded.plugin, input = excluded.input,
               input_ref = excluded.input_ref, attempt = excluded.attempt,
               started_at = excluded.started_at, plugin_sha256 = excluded.plugin_sha256,
               planner_sha256 = excluded.planner_sha256
         WHERE steps.status = 'running'
        RETURNING seq
     ) ",
    append_event_from!("step", "$9", "$10", "$7")
);

async fn start_step(
    conn: &mut PgConnection,
    fence: &Fence,
    step: StepStart,
) -> Result<(StepRecord, EventRecord)> {
    let input_text = to_json_text(&step.input);
    let input_ref = super::out_of_line_key(&input_text);
    let stored_input = if input_ref.is_some() {
        "null"
    } else {
        &input_text
    };
    let started_at = now_millis();
    // Everything in the row is known here: nothing is read back.
    let record = step.into_record(fence.attempt, started_at);
    let (stored, data) = step_started_event(&record);
    // A step still marked running was in flight when an earlier claim died:
    // it runs again under the same sequence number (and idempotency key).
    let event_seq: Option<i64> = sqlx::query_scalar(START_STEP)
        .bind(&fence.task_id)
        .bind(record.seq as i64)
        .bind(record.kind.as_str())
        .bind(&record.plugin)
        .bind(stored_input)
        .bind(fence.attempt)
        .bind(started_at)
        .bind(&input_ref)
        .bind(event_kind::STEP_STARTED)
        .bind(stored)
        .bind(&record.versions.plugin_sha256)
        .bind(&record.versions.planner_sha256)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(event_seq) = event_seq else {
        return Err(StoreError::Config(format!(
            "step {} of task {} has already finished and cannot start again",
            record.seq, fence.task_id
        )));
    };
    if let Some(key) = &input_ref {
        spill(conn, key, &input_text).await?;
    }
    let event = event_record(
        &fence.task_id,
        event_seq,
        event_kind::STEP_STARTED,
        data,
        started_at,
    );
    Ok((record, event))
}

/// Journals a step's end, the task's token count and the event in one
/// statement.
const FINISH_STEP: &str = concat!(
    "WITH step AS (
        UPDATE steps
           SET status = $2, output = $3::json, error_code = $4, error_message = $5,
               input_tokens = $6, output_tokens = $7, finished_at = $8, output_ref = $10
         WHERE task_id = $1 AND seq = $9 AND status = 'running'
        RETURNING seq
     ), tokens AS (
        UPDATE tasks
           SET input_tokens = input_tokens + $6, output_tokens = output_tokens + $7,
               cost_nanos = cost_nanos + $13
         WHERE id = $1 AND $6 IS NOT NULL AND EXISTS (SELECT 1 FROM step)
     ) ",
    append_event_from!("step", "$11", "$12", "$8")
);

/// Adds a step's usage to its tenant's period (a NULL cost, of an
/// unpriced model, makes the period's cost NULL: unknown).
const CHARGE_TENANT: &str =
    "INSERT INTO tenant_usage (tenant, period, input_tokens, output_tokens, cost_nanos)
     VALUES ($1, $2, $3, $4, $5)
     ON CONFLICT (tenant, period) DO UPDATE
        SET input_tokens = tenant_usage.input_tokens + excluded.input_tokens,
            output_tokens = tenant_usage.output_tokens + excluded.output_tokens,
            cost_nanos = tenant_usage.cost_nanos + excluded.cost_nanos";

async fn finish_step(
    conn: &mut PgConnection,
    fence: &Fence,
    end: StepEnd,
) -> Result<(StepRecord, EventRecord)> {
    let seq = end.started.seq;
    let output = end.output.as_ref().ok().map(to_json_text);
    let error = end.output.as_ref().err();
    let output_ref = output.as_deref().and_then(super::out_of_line_key);
    let stored_output = match (&output_ref, &output) {
        (Some(_), _) => Some("null"),
        (None, text) => text.as_deref(),
    };
    let finished_at = end.finished_at;
    let status = StepStatus::of(&end.output);
    let (error_code, error_message) = (
        error.map(|e| e.code.clone()),
        error.map(|e| e.message.clone()),
    );
    let usage = end.usage;
    let cost_nanos = end.cost_nanos;
    let charge = end.charge.clone();
    let output_bytes = output.as_ref().map_or(0, String::len);
    // The rest of the row is what the step started with: nothing is read back.
    let record = end.into_record(finished_at);
    let data = step_event_data(&record, output_bytes);
    let event_seq: Option<i64> = sqlx::query_scalar(FINISH_STEP)
        .bind(&fence.task_id)
        .bind(status.as_str())
        .bind(stored_output)
        .bind(error_code)
        .bind(error_message)
        .bind(usage.map(|u| u.input_tokens as i64))
        .bind(usage.map(|u| u.output_tokens as i64))
        .bind(finished_at)
        .bind(seq as i64)
        .bind(&output_ref)
        .bind(event_kind::STEP_FINISHED)
        .bind(to_json_text(&data))
        .bind(cost_nanos)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(event_seq) = event_seq else {
        return Err(StoreError::Config(format!(
            "step {seq} of task {} is not running",
            fence.task_id
        )));
    };
    if let (Some(charge), Some(usage)) = (&charge, usage) {
        sqlx::query(CHARGE_TENANT)
            .bind(&charge.tenant)
            .bind(&charge.period)
            .bind(usage.input_tokens as i64)
            .bind(usage.output_tokens as i64)
            .bind(cost_nanos)
            .execute(&mut *conn)
            .await?;
    }
    if let (Some(key), Some(text)) = (&output_ref, &output) {
        spill(conn, key, text).await?;
    }
    let event = event_record(
        &fence.task_id,
        event_seq,
        event_kind::STEP_FINISHED,
        data,
        finished_at,
    );
    Ok((record, event))
}

async fn finish_task(conn: &mut PgConnection, fence: &Fence, end: &TaskEnd) -> Result<EventRecord> {
    let (result, error) = match end {
        TaskEnd::Succeeded { result } => (Some(result.as_str()), None),
        TaskEnd::Failed { error } => (None, Some(error)),
        TaskEnd::AnswerRefused { answer, error } => (Some(answer.as_str()), Some(error)),
        TaskEnd::Cancelled => (None, None),
    };
    let status = end.status();
    sqlx::query(
        "UPDATE tasks
            SET status = $1, result = $2, error_code = $3, error_message = $4, finished_at = $5,
                lease_owner = NULL, lease_expires_at = NULL
          WHERE id = $6",
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

async fn cancel(conn: &mut PgConnection, id: &str) -> Result<CancelOutcome> {
    // The lock orders the cancel against a claim of the same task: whichever
    // comes second sees what the first wrote.
    let row = sqlx::query("SELECT * FROM tasks WHERE id = $1 FOR UPDATE")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
    let task = task_from_row(&row)?;
    match task.status {
        TaskStatus::Queued | TaskStatus::WaitingApproval => {
            // A waiting task holds no claim: it ends here, like a queued one.
            sqlx::query(approvals::REJECT_ON_CANCEL)
                .bind(id)
                .bind(now_millis())
                .execute(&mut *conn)
                .await?;
            let row = sqlx::query(
                "UPDATE tasks SET status = 'cancelled', cancel_requested = TRUE, finished_at = $1
                  WHERE id = $2 RETURNING *",
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
            let row =
                sqlx::query("UPDATE tasks SET cancel_requested = TRUE WHERE id = $1 RETURNING *")
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

fn approval_from_row(row: &PgRow) -> Result<ApprovalRecord> {
    ApprovalColumns {
        task_id: row.try_get("task_id")?,
        step: row.try_get("step")?,
        call_id: row.try_get("call_id")?,
        tool: row.try_get("tool")?,
        input: row.try_get("input")?,
        status: row.try_get("status")?,
        edited_input: row.try_get("edited_input")?,
        comment: row.try_get("comment")?,
        decided_by: row.try_get("decided_by")?,
        decided_at: row.try_get("decided_at")?,
        requested_at: row.try_get("requested_at")?,
        expires_at: row.try_get("expires_at")?,
    }
    .into_record()
}

/// Journals the calls a task waits on and releases its claim; the caller
/// has checked (and locked) the fence.
async fn await_approval(
    conn: &mut PgConnection,
    fence: &Fence,
    requests: &[ApprovalRequest],
) -> Result<EventRecord> {
    let now = now_millis();
    for request in requests {
        sqlx::query(approvals::INSERT)
            .bind(&fence.task_id)
            .bind(i64::from(request.step))
            .bind(&request.call_id)
            .bind(&request.tool)
            .bind(to_json_text(&request.input))
            .bind(now)
            .bind(request.expires_at)
            .execute(&mut *conn)
            .await?;
    }
    sqlx::query(approvals::PARK)
        .bind(&fence.task_id)
        .execute(&mut *conn)
        .await?;
    append_event(
        conn,
        &fence.task_id,
        event_kind::TASK_WAITING_APPROVAL,
        approvals::waiting_event_data(requests),
    )
    .await
}

/// Locks the task's row: answers (and timeouts) of one task take turns, so
/// the last of them sees every other's and requeues the task, and events
/// are numbered under the lock (see [`append_event`]). `false` when there
/// is no such task.
async fn lock_task(conn: &mut PgConnection, task_id: &str) -> Result<bool> {
    Ok(sqlx::query("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE")
        .bind(task_id)
        .fetch_optional(&mut *conn)
        .await?
        .is_some())
}

async fn decide_approval(
    conn: &mut PgConnection,
    task_id: &str,
    call_id: &str,
    decision: &Decision,
    channel: &str,
) -> Result<DecideOutcome> {
    if !lock_task(conn, task_id).await? {
        return Ok(DecideOutcome::NotFound);
    }
    let now = now_millis();
    let status = if decision.approve {
        ApprovalStatus::Approved
    } else {
        ApprovalStatus::Rejected
    };
    let decided = sqlx::query(approvals::DECIDE)
        .bind(task_id)
        .bind(call_id)
        .bind(status.as_str())
        .bind(decision.input.as_ref().map(to_json_text))
        .bind(&decision.comment)
        .bind(&decision.by)
        .bind(now)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(row) = decided else {
        let latest = sqlx::query(approvals::LATEST_WITH_CALL_ID)
            .bind(task_id)
            .bind(call_id)
            .fetch_optional(&mut *conn)
            .await?;
        return Ok(match latest {
            Some(row) => DecideOutcome::AlreadyDecided(approval_from_row(&row)?),
            None => DecideOutcome::NotFound,
        });
    };
    let approval = approval_from_row(&row)?;
    let mut events = vec![
        append_event(
            conn,
            task_id,
            event_kind::APPROVAL_DECIDED,
            approvals::decided_event_data(&approval),
        )
        .await?,
    ];
    let requeued = requeue_if_answered(conn, task_id, now, channel, &mut events).await?;
    Ok(DecideOutcome::Decided {
        approval,
        events,
        requeued,
    })
}

/// Puts the task back in the queue if nothing of it is pending now, and
/// wakes the hosts sharing the store (on commit).
async fn requeue_if_answered(
    conn: &mut PgConnection,
    task_id: &str,
    now: Millis,
    channel: &str,
    events: &mut Vec<EventRecord>,
) -> Result<bool> {
    let requeued = sqlx::query(approvals::REQUEUE)
        .bind(task_id)
        .bind(now)
        .execute(&mut *conn)
        .await?
        .rows_affected()
        > 0;
    if requeued {
        events.push(
            append_event(
                conn,
                task_id,
                event_kind::TASK_QUEUED,
                json!({"status": "queued", "reason": "approvals_answered"}),
            )
            .await?,
        );
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(channel)
            .bind(task_id)
            .execute(&mut *conn)
            .await?;
    }
    Ok(requeued)
}

/// Rejects the expired pending calls of one task and requeues it if that
/// leaves nothing pending.
async fn expire_task_approvals(
    conn: &mut PgConnection,
    task_id: &str,
    now: Millis,
    channel: &str,
    events: &mut Vec<EventRecord>,
) -> Result<()> {
    if !lock_task(conn, task_id).await? {
        return Ok(());
    }
    let expired = sqlx::query(approvals::EXPIRE)
        .bind(task_id)
        .bind(now)
        .fetch_all(&mut *conn)
        .await?;
    for row in &expired {
        let approval = approval_from_row(row)?;
        events.push(
            append_event(
                conn,
                task_id,
                event_kind::APPROVAL_DECIDED,
                approvals::decided_event_data(&approval),
            )
            .await?,
        );
    }
    requeue_if_answered(conn, task_id, now, channel, events).await?;
    Ok(())
}

/// Appends an event to a task's history. The caller holds the task's row
/// lock (it fenced, claimed or cancelled the task, or inserted it in this
/// transaction): two transactions appending to one task would otherwise both
/// read the same `MAX(seq)`. This statement, newer than the lock, sees every
/// event committed before it.
async fn append_event(
    conn: &mut PgConnection,
    task_id: &str,
    kind: &str,
    data: Value,
) -> Result<EventRecord> {
    let at = now_millis();
    let seq: i64 = sqlx::query_scalar(
        "INSERT INTO events (task_id, seq, kind, data, at)
         SELECT $1, COALESCE(MAX(seq), 0) + 1, $2, $3::json, $4 FROM events WHERE task_id = $1
         RETURNING seq",
    )
    .bind(task_id)
    .bind(kind)
    .bind(to_json_text(&data))
    .bind(at)
    .fetch_one(&mut *conn)
    .await?;
    Ok(event_record(task_id, seq, kind, data, at))
}

fn event_record(task_id: &str, seq: i64, kind: &str, data: Value, at: Millis) -> EventRecord {
    EventRecord {
        task_id: task_id.to_owned(),
        seq,
        kind: kind.to_owned(),
        data,
        at,
    }
}

async fn load_steps<'c, E>(executor: E, task_id: &str) -> Result<Vec<StepRecord>>
where
    E: sqlx::Executor<'c, Database = sqlx::Postgres>,
{
    let rows = sqlx::query(concat!(
        steps_with_payloads!(),
        " WHERE s.task_id = $1 ORDER BY s.seq"
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

/// Stores a payload too big to keep inline; returns the key it is under.
/// Stores a payload too big to keep inline under its key (`out_of_line_key`).
async fn spill(conn: &mut PgConnection, key: &str, text: &str) -> Result<()> {
    sqlx::query(
        "INSERT INTO payloads (sha256, body) VALUES ($1, $2) ON CONFLICT (sha256) DO NOTHING",
    )
    .bind(key)
    .bind(text)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

fn task_from_row(row: &PgRow) -> Result<TaskRecord> {
    let status: String = row.try_get("status")?;
    Ok(TaskRecord {
        id: row.try_get("id")?,
        tenant: row.try_get("tenant")?,
        idempotency_key: row.try_get("idempotency_key")?,
        priority: row.try_get("priority")?,
        run_at: row.try_get("run_at")?,
        deadline_at: row.try_get("deadline_at")?,
        status: TaskStatus::parse(&status).ok_or_else(|| corrupt_enum("task status", &status))?,
        goal: row.try_get("goal")?,
        planner: row.try_get("planner")?,
        llm: row.try_get("llm")?,
        model: row.try_get("model")?,
        tools: row.try_get::<Json<Vec<String>>, _>("tools")?.0,
        options: row.try_get("options")?,
        max_steps: row.try_get::<i64, _>("max_steps")? as u32,
        max_retries: row.try_get::<i32, _>("max_retries")? as u32,
        timeout_ms: row.try_get("timeout_ms")?,
        result: row.try_get("result")?,
        error: error_from_row(row)?,
        attempt: row.try_get("attempt")?,
        cancel_requested: row.try_get("cancel_requested")?,
        usage: Usage {
            input_tokens: row.try_get::<i64, _>("input_tokens")? as u64,
            output_tokens: row.try_get::<i64, _>("output_tokens")? as u64,
        },
        cost_nanos: row.try_get("cost_nanos")?,
        budget: TaskBudget {
            max_tokens: row
                .try_get::<Option<i64>, _>("budget_max_tokens")?
                .map(|n| n as u64),
            max_cost_nanos: row.try_get("budget_max_cost_nanos")?,
        },
        created_at: row.try_get("created_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
        trace_parent: row.try_get("trace_parent")?,
        schedule_id: row.try_get("schedule_id")?,
        scheduled_for: row.try_get("scheduled_for")?,
        thread: row.try_get("thread")?,
        memory_namespace: row.try_get("memory_namespace")?,
        response_format: row
            .try_get::<Option<Json<ResponseFormat>>, _>("response_format")?
            .map(|format| format.0),
        call: row
            .try_get::<Option<Json<ToolCall>>, _>("tool_call")?
            .map(|call| call.0),
        images: row
            .try_get::<Option<Json<Vec<Image>>>, _>("images")?
            .map_or_else(Vec::new, |images| images.0),
    })
}

/// A tenant's memories matching any of the query's terms, best first
/// (`ts_rank` over the GIN-indexed `tsvector`), or without terms the newest
/// first. Written from fixed fragments only; every value is bound, and the
/// `to_tsquery` expression is built from plain words (`memory::tsquery`).
async fn search_memories(
    conn: &mut PgConnection,
    query: &MemoryQuery,
) -> Result<Vec<MemoryRecord>> {
    let mut values: Vec<String> = Vec::new();
    let next = |value: String, values: &mut Vec<String>| {
        values.push(value);
        format!("${}", values.len())
    };
    let sql = if query.terms.is_empty() {
        let tenant = next(query.tenant.clone(), &mut values);
        let mut sql = format!(
            "SELECT {}, 0::float8 AS score FROM memories WHERE tenant = {tenant}",
            memories::COLUMNS
        );
        if let Some(namespace) = &query.namespace {
            let p = next(namespace.clone(), &mut values);
            sql.push_str(&format!(" AND namespace = {p}"));
        }
        if let Some(before) = &query.before {
            let p = next(before.clone(), &mut values);
            sql.push_str(&format!(
                " AND seq < (SELECT seq FROM memories WHERE id = {p})"
            ));
        }
        sql.push_str(&format!(" ORDER BY seq DESC LIMIT {}", query.limit));
        sql
    } else {
        let terms = next(crate::memory::tsquery(&query.terms), &mut values);
        let tenant = next(query.tenant.clone(), &mut values);
        let mut sql = format!(
            "SELECT {}, ts_rank(search, q)::float8 AS score
               FROM memories, to_tsquery('simple', {terms}) AS q
              WHERE search @@ q AND tenant = {tenant}",
            memories::COLUMNS
        );
        if let Some(namespace) = &query.namespace {
            let p = next(namespace.clone(), &mut values);
            sql.push_str(&format!(" AND namespace = {p}"));
        }
        sql.push_str(&format!(
            " ORDER BY score DESC, seq DESC LIMIT {}",
            query.limit
        ));
        sql
    };
    let mut statement = sqlx::query(AssertSqlSafe(sql));
    for value in values {
        statement = statement.bind(value);
    }
    let rows = statement.fetch_all(&mut *conn).await?;
    rows.iter().map(memory_from_row).collect()
}

fn memory_from_row(row: &PgRow) -> Result<MemoryRecord> {
    Ok(MemoryColumns {
        id: row.try_get("id")?,
        namespace: row.try_get("namespace")?,
        text: row.try_get("text")?,
        metadata: row.try_get("metadata")?,
        created_at: row.try_get("created_at")?,
        task_id: row.try_get("task_id")?,
        score: row.try_get("score")?,
    }
    .into())
}

/// Stores a memory if its tenant has room for it. The tenant's usage row
/// is locked first, so two hosts storing at once cannot both take the last
/// room.
async fn insert_memory(
    conn: &mut PgConnection,
    memory: NewMemory,
    config: &MemoryConfig,
) -> Result<MemoryRecord> {
    sqlx::query("INSERT INTO memory_usage (tenant) VALUES ($1) ON CONFLICT (tenant) DO NOTHING")
        .bind(&memory.tenant)
        .execute(&mut *conn)
        .await?;
    let usage: (i64, i64) =
        sqlx::query_as(AssertSqlSafe(format!("{} FOR UPDATE", memories::USAGE)))
            .bind(&memory.tenant)
            .fetch_one(&mut *conn)
            .await?;
    memories::check_room(usage, &memory, config)?;
    let id = uuid::Uuid::now_v7().to_string();
    let created_at = now_millis();
    let bytes = memory.bytes() as i64;
    sqlx::query(memories::INSERT)
        .bind(&id)
        .bind(&memory.tenant)
        .bind(&memory.namespace)
        .bind(&memory.text)
        .bind(&memory.metadata)
        .bind(bytes)
        .bind(&memory.task_id)
        .bind(created_at)
        .execute(&mut *conn)
        .await?;
    sqlx::query(memories::COUNT_IN)
        .bind(&memory.tenant)
        .bind(bytes)
        .execute(&mut *conn)
        .await?;
    Ok(memories::stored(id, memory, created_at))
}

/// Deletes a tenant's memory (in `namespace` only, when given); whether it
/// existed.
async fn delete_memory(
    conn: &mut PgConnection,
    tenant: &str,
    id: &str,
    namespace: Option<&str>,
) -> Result<bool> {
    let bytes: Option<i64> = sqlx::query_scalar(memories::DELETE)
        .bind(id)
        .bind(tenant)
        .bind(namespace)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(bytes) = bytes else {
        return Ok(false);
    };
    sqlx::query(memories::COUNT_OUT)
        .bind(tenant)
        .bind(bytes)
        .execute(&mut *conn)
        .await?;
    Ok(true)
}

fn schedule_from_row(row: &PgRow) -> Result<ScheduleRecord> {
    let missed: String = row.try_get("missed_ticks")?;
    let template: String = row.try_get("template")?;
    Ok(ScheduleRecord {
        id: row.try_get("id")?,
        tenant: row.try_get("tenant")?,
        name: row.try_get("name")?,
        cron: row.try_get("cron")?,
        timezone: row.try_get("timezone")?,
        template: TaskTemplate::from_json(&template)?,
        missed_ticks: MissedTicks::parse(&missed)
            .ok_or_else(|| corrupt_enum("missed-tick policy", &missed))?,
        paused: row.try_get("paused")?,
        next_run_at: row.try_get("next_run_at")?,
        last_run_at: row.try_get("last_run_at")?,
        waiting_for_room: row.try_get("waiting_for_room")?,
        created_at: row.try_get("created_at")?,
    })
}

/// How many tasks are queued (of `tenant`, or of all), counting no further
/// than `at_most`, on the connection of the transaction asking.
async fn queued_at_most(
    conn: &mut PgConnection,
    tenant: Option<&str>,
    at_most: u64,
) -> Result<u64> {
    let at_most = at_most.min(i64::MAX as u64) as i64;
    let count: i64 = match tenant {
        Some(tenant) => {
            sqlx::query_scalar(
                "SELECT COUNT(*) FROM (SELECT 1 FROM tasks
                                        WHERE status = 'queued' AND tenant = $1 LIMIT $2) q",
            )
            .bind(tenant)
            .bind(at_most)
            .fetch_one(&mut *conn)
            .await?
        }
        None => {
            sqlx::query_scalar(
                "SELECT COUNT(*) FROM (SELECT 1 FROM tasks WHERE status = 'queued' LIMIT $1) q",
            )
            .bind(at_most)
            .fetch_one(&mut *conn)
            .await?
        }
    };
    Ok(count as u64)
}

/// Whether the queue has room for one more task of `tenant` under `rules`.
async fn queue_has_room(conn: &mut PgConnection, tenant: &str, rules: &FireRules) -> Result<bool> {
    if queued_at_most(conn, None, rules.max_queued_tasks).await? >= rules.max_queued_tasks {
        return Ok(false);
    }
    if let Some(cap) = rules.max_queued_per_tenant
        && queued_at_most(conn, Some(tenant), cap).await? >= cap
    {
        return Ok(false);
    }
    Ok(true)
}

fn step_from_row(row: &PgRow) -> Result<StepRecord> {
    let kind: String = row.try_get("kind")?;
    let status: String = row.try_get("status")?;
    let input_tokens: Option<i64> = row.try_get("input_tokens")?;
    let output_tokens: Option<i64> = row.try_get("output_tokens")?;
    Ok(StepRecord {
        seq: row.try_get::<i64, _>("seq")? as u32,
        kind: StepKind::parse(&kind).ok_or_else(|| corrupt_enum("step kind", &kind))?,
        plugin: row.try_get("plugin")?,
        status: StepStatus::parse(&status).ok_or_else(|| corrupt_enum("step status", &status))?,
        input: match body(row, "input_body") {
            Some(body) => parse_json(&body, "step input")?,
            None => row.try_get("input")?,
        },
        output: match body(row, "output_body") {
            Some(body) => Some(parse_json(&body, "step output")?),
            None => row.try_get("output")?,
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
        versions: StepVersions {
            plugin_sha256: row.try_get("plugin_sha256")?,
            planner_sha256: row.try_get("planner_sha256")?,
        },
    })
}

/// An out-of-line payload joined into the row, if any.
fn body(row: &PgRow, column: &str) -> Option<String> {
    row.try_get::<Option<String>, _>(column).ok().flatten()
}

fn error_from_row(row: &PgRow) -> Result<Option<ErrorInfo>> {
    let code: Option<String> = row.try_get("error_code")?;
    let message: Option<String> = row.try_get("error_message")?;
    Ok(code.map(|code| ErrorInfo {
        code,
        message: message.unwrap_or_default(),
    }))
}

fn event_from_row(row: &PgRow) -> Result<EventRecord> {
    Ok(EventRecord {
        task_id: row.try_get("task_id")?,
        seq: row.try_get("seq")?,
        kind: row.try_get("kind")?,
        data: row.try_get("data")?,
        at: row.try_get::<Millis, _>("at")?,
    })
}

fn corrupt_enum(what: &str, value: &str) -> StoreError {
    StoreError::Config(format!("unknown {what} {value:?} in the database"))
}

#[async_trait]
impl Store for PgStore {
    fn engine(&self) -> &'static str {
        "postgres"
    }

    async fn create_task(&self, task: NewTask) -> Result<(TaskRecord, Option<EventRecord>)> {
        let mut tx = self.pool.begin().await?;
        let created = create_task(&mut tx, &task, &self.channel).await?;
        tx.commit().await?;
        Ok(created)
    }

    async fn prune_finished(&self, before: Millis) -> Result<u64> {
        // Steps and events go with their task (ON DELETE CASCADE).
        let done = sqlx::query(
            "DELETE FROM tasks
              WHERE status IN ('succeeded', 'failed', 'cancelled') AND finished_at < $1",
        )
        .bind(before)
        .execute(&self.pool)
        .await?;
        sqlx::query(PRUNE_ORPHAN_PAYLOADS)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn count_active(&self, tenant: &str) -> Result<u64> {
        let count: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM tasks WHERE tenant = $1 AND status IN ('queued', 'running')",
        )
        .bind(tenant)
        .fetch_one(&self.pool)
        .await?;
        Ok(count as u64)
    }

    async fn queue_gauges(&self, now: Millis) -> Result<QueueGauges> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT tenant, status, COUNT(*) FROM tasks
              WHERE status IN ('queued', 'running')
              GROUP BY tenant, status",
        )
        .fetch_all(&self.pool)
        .await?;
        let active = rows
            .into_iter()
            .filter_map(|(tenant, status, count)| {
                Some((tenant, TaskStatus::parse(&status)?, count as u64))
            })
            .collect();
        let oldest_runnable_since: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(COALESCE(run_at, created_at)) FROM tasks
              WHERE status = 'queued' AND (run_at IS NULL OR run_at <= $1)",
        )
        .bind(now)
        .fetch_one(&self.pool)
        .await?;
        Ok(QueueGauges {
            active,
            oldest_runnable_since,
        })
    }

    async fn count_queued(&self, tenant: Option<&str>, at_most: u64) -> Result<u64> {
        let at_most = at_most.min(i64::MAX as u64) as i64;
        // Two static statements, so each is planned on its own partial index.
        let count: i64 = match tenant {
            Some(tenant) => {
                sqlx::query_scalar(
                    "SELECT COUNT(*) FROM (SELECT 1 FROM tasks
                                            WHERE status = 'queued' AND tenant = $1
                                            LIMIT $2) AS queued",
                )
                .bind(tenant)
                .bind(at_most)
                .fetch_one(&self.pool)
                .await?
            }
            None => {
                sqlx::query_scalar(
                    "SELECT COUNT(*) FROM (SELECT 1 FROM tasks WHERE status = 'queued'
                                            LIMIT $1) AS queued",
                )
                .bind(at_most)
                .fetch_one(&self.pool)
                .await?
            }
        };
        Ok(count as u64)
    }

    async fn get_task(&self, id: &str) -> Result<Option<TaskRecord>> {
        let row = sqlx::query("SELECT * FROM tasks WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(task_from_row).transpose()
    }

    async fn task_stats(
        &self,
        tenant: &str,
        since: Millis,
        now: Millis,
        count_limit: u64,
    ) -> Result<TaskStats> {
        let count_limit = count_limit.min(i64::MAX as u64) as i64;
        let count_in_status = TaskStats::count_in_status(&DIALECT);
        let mut counts = Vec::new();
        for status in TaskStatus::ALL {
            let count: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(count_in_status.as_str()))
                .bind(tenant)
                .bind(status.as_str())
                .bind(count_limit)
                .fetch_one(&self.pool)
                .await?;
            counts.push((status, count as u64));
        }
        let oldest_queued_since: Option<i64> =
            sqlx::query_scalar(sqlx::AssertSqlSafe(TaskStats::oldest_queued(&DIALECT)))
                .bind(tenant)
                .bind(now)
                .fetch_one(&self.pool)
                .await?;
        let finished: Vec<(i64, String, i64)> =
            sqlx::query_as(sqlx::AssertSqlSafe(TaskStats::finished_by_minute(&DIALECT)))
                .bind(tenant)
                .bind(since)
                .fetch_all(&self.pool)
                .await?;
        Ok(TaskStats::from_rows(counts, oldest_queued_since, finished))
    }

    async fn list_tasks(&self, query: &TaskQuery) -> Result<TaskPage> {
        let sql = query.list_statement(&DIALECT);
        // Written from fixed fragments only; every value is bound.
        let mut statement = sqlx::query(sqlx::AssertSqlSafe(sql));
        for value in query.list_parameters() {
            statement = statement.bind(value);
        }
        let rows = statement
            .bind(i64::from(query.page_size()) + 1)
            .fetch_all(&self.pool)
            .await?;
        let tasks = rows.iter().map(task_from_row).collect::<Result<Vec<_>>>()?;
        Ok(query.page(tasks))
    }

    async fn steps(&self, task_id: &str) -> Result<Vec<StepRecord>> {
        load_steps(&self.pool, task_id).await
    }

    async fn history_steps(&self, task_ids: &[String]) -> Result<Vec<HistoryStep>> {
        if task_ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(
            "SELECT s.task_id, s.seq, s.kind,
                    CASE WHEN s.kind = 'tool' THEN COALESCE(pi.body, s.input::text) END AS call,
                    COALESCE(po.body, s.output::text) AS output, s.error_code, s.error_message
               FROM steps s
               LEFT JOIN payloads pi ON pi.sha256 = s.input_ref AND s.kind = 'tool'
               LEFT JOIN payloads po ON po.sha256 = s.output_ref
              WHERE s.task_id = ANY($1) AND s.status <> 'running'
              ORDER BY s.task_id, s.seq",
        )
        .bind(task_ids)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let kind: String = row.try_get("kind")?;
                Ok(HistoryStep {
                    task_id: row.try_get("task_id")?,
                    seq: row.try_get::<i64, _>("seq")? as u32,
                    kind: StepKind::parse(&kind).ok_or_else(|| corrupt_enum("step kind", &kind))?,
                    call: row.try_get("call")?,
                    output: row.try_get("output")?,
                    error: error_from_row(row)?,
                })
            })
            .collect()
    }

    async fn events_after(&self, task_id: &str, after: i64) -> Result<Vec<EventRecord>> {
        let rows = sqlx::query("SELECT * FROM events WHERE task_id = $1 AND seq > $2 ORDER BY seq")
            .bind(task_id)
            .bind(after)
            .fetch_all(&self.pool)
            .await?;
        let mut events = rows
            .iter()
            .map(event_from_row)
            .collect::<Result<Vec<_>>>()?;
        if lack_step_inputs(&events) {
            restore_step_inputs(&mut events, &load_steps(&self.pool, task_id).await?);
        }
        Ok(events)
    }

    async fn period_usage(&self, tenant: &str, period: &str) -> Result<PeriodUsage> {
        let row: Option<(i64, i64, Option<i64>)> = sqlx::query_as(
            "SELECT input_tokens, output_tokens, cost_nanos FROM tenant_usage
              WHERE tenant = $1 AND period = $2",
        )
        .bind(tenant)
        .bind(period)
        .fetch_optional(&self.pool)
        .await?;
        Ok(
            row.map_or_else(PeriodUsage::default, |(input, output, cost)| PeriodUsage {
                input_tokens: input as u64,
                output_tokens: output as u64,
                cost_nanos: cost,
            }),
        )
    }

    async fn request_cancel(&self, id: &str) -> Result<CancelOutcome> {
        let mut tx = self.pool.begin().await?;
        let outcome = cancel(&mut tx, id).await?;
        if matches!(outcome, CancelOutcome::Requested(..)) {
            // Tells the host running the task now, not at its next renewal.
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(&self.channel)
                .bind(format!("{CANCEL_PREFIX}{id}"))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(outcome)
    }

    async fn memory_call(&self, fence: &Fence, call: &MemoryCall) -> Result<MemoryReply> {
        let key = &call.key;
        let mut tx = self.pool.begin().await?;
        check_fence(&mut tx, fence).await?;
        let journaled: Option<(i64, String)> = sqlx::query_as(memories::JOURNALED)
            .bind(&key.task_id)
            .bind(key.step as i32)
            .bind(key.site.as_str())
            .bind(key.seq as i32)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(reply) = memories::replay(journaled, &call.op)? {
            return Ok(reply);
        }
        let reply = match &call.op {
            MemoryOp::Remember(_) => {
                let memory = call.new_memory().expect("a remember call stores a memory");
                let record = insert_memory(&mut tx, memory, &call.config).await?;
                MemoryReply::Remembered { id: record.id }
            }
            MemoryOp::Recall { terms, limit } => MemoryReply::Recalled {
                memories: search_memories(
                    &mut tx,
                    &MemoryQuery {
                        tenant: call.tenant.clone(),
                        namespace: Some(call.namespace.clone()),
                        terms: terms.clone(),
                        limit: *limit,
                        before: None,
                    },
                )
                .await?,
            },
            MemoryOp::Forget { id } => MemoryReply::Forgot {
                existed: delete_memory(&mut tx, &call.tenant, id, Some(&call.namespace)).await?,
            },
        };
        sqlx::query(memories::JOURNAL)
            .bind(&key.task_id)
            .bind(key.step as i32)
            .bind(key.site.as_str())
            .bind(key.seq as i32)
            .bind(call.op.digest())
            .bind(serde_json::to_string(&reply).expect("a memory reply is always JSON"))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(reply)
    }

    async fn create_memory(
        &self,
        memory: NewMemory,
        config: &MemoryConfig,
    ) -> Result<MemoryRecord> {
        let mut tx = self.pool.begin().await?;
        let record = insert_memory(&mut tx, memory, config).await?;
        tx.commit().await?;
        Ok(record)
    }

    async fn get_memory(&self, tenant: &str, id: &str) -> Result<Option<MemoryRecord>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {}, 0::float8 AS score FROM memories WHERE id = $1 AND tenant = $2",
            memories::COLUMNS
        )))
        .bind(id)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(memory_from_row).transpose()
    }

    async fn search_memories(&self, query: &MemoryQuery) -> Result<Vec<MemoryRecord>> {
        let mut conn = self.pool.acquire().await?;
        search_memories(&mut conn, query).await
    }

    async fn delete_memory(&self, tenant: &str, id: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let existed = delete_memory(&mut tx, tenant, id, None).await?;
        tx.commit().await?;
        Ok(existed)
    }

    async fn delete_thread(&self, tenant: &str, thread: &str) -> Result<ThreadDeletion> {
        let mut tx = self.pool.begin().await?;
        let active: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM tasks
              WHERE tenant = $1 AND thread = $2 AND status IN ('queued', 'running', 'waiting_approval')",
        )
        .bind(tenant)
        .bind(thread)
        .fetch_one(&mut *tx)
        .await?;
        if active > 0 {
            return Ok(ThreadDeletion::Active(active as u64));
        }
        // Finished tasks only: one submitted meanwhile (after the count's
        // snapshot) stays. Steps and events go with their task (ON DELETE
        // CASCADE).
        let deleted = sqlx::query(
            "DELETE FROM tasks WHERE tenant = $1 AND thread = $2
                AND status IN ('succeeded', 'failed', 'cancelled')",
        )
        .bind(tenant)
        .bind(thread)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if deleted > 0 {
            sqlx::query(PRUNE_ORPHAN_PAYLOADS).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(ThreadDeletion::Deleted(deleted))
    }

    async fn claim_batch(&self, worker: &str, lease: Duration, max: usize) -> Result<Vec<Claim>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin().await?;
        let claims = claim_batch(&mut tx, worker, lease, max).await?;
        tx.commit().await?;
        Ok(claims)
    }

    async fn renew_leases(&self, fences: &[Fence], lease: Duration) -> Result<Vec<Renewal>> {
        if fences.is_empty() {
            return Ok(Vec::new());
        }
        // One statement is its own transaction.
        let mut conn = self.pool.acquire().await?;
        renew_leases(&mut conn, fences, lease).await
    }

    /// Does nothing: hosts share the database, and the claims of one that
    /// restarts may belong to another that is still running. The restarted
    /// host's old claims are taken over when their leases expire.
    async fn expire_all_leases(&self) -> Result<u64> {
        Ok(0)
    }

    async fn start_step(
        &self,
        fence: &Fence,
        step: StepStart,
    ) -> Result<(StepRecord, EventRecord)> {
        let mut tx = self.pool.begin().await?;
        check_fence(&mut tx, fence).await?;
        let started = start_step(&mut tx, fence, step).await?;
        tx.commit().await?;
        Ok(started)
    }

    async fn finish_step(&self, fence: &Fence, end: StepEnd) -> Result<(StepRecord, EventRecord)> {
        let mut tx = self.pool.begin().await?;
        check_fence(&mut tx, fence).await?;
        let finished = finish_step(&mut tx, fence, end).await?;
        tx.commit().await?;
        Ok(finished)
    }

    async fn finish_task(&self, fence: &Fence, end: TaskEnd) -> Result<EventRecord> {
        let mut tx = self.pool.begin().await?;
        check_fence(&mut tx, fence).await?;
        let event = finish_task(&mut tx, fence, &end).await?;
        tx.commit().await?;
        Ok(event)
    }

    async fn append_event(
        &self,
        fence: &Fence,
        kind: &'static str,
        data: Value,
    ) -> Result<EventRecord> {
        let mut tx = self.pool.begin().await?;
        check_fence(&mut tx, fence).await?;
        let event = append_event(&mut tx, &fence.task_id, kind, data).await?;
        tx.commit().await?;
        Ok(event)
    }

    async fn finish_step_then_start(
        &self,
        fence: &Fence,
        end: StepEnd,
        next: StepStart,
    ) -> Result<[(StepRecord, EventRecord); 2]> {
        let mut tx = self.pool.begin().await?;
        check_fence(&mut tx, fence).await?;
        let finished = finish_step(&mut tx, fence, end).await?;
        let started = start_step(&mut tx, fence, next).await?;
        tx.commit().await?;
        Ok([finished, started])
    }

    async fn finish_step_then_task(
        &self,
        fence: &Fence,
        end: StepEnd,
        task_end: TaskEnd,
    ) -> Result<((StepRecord, EventRecord), EventRecord)> {
        let mut tx = self.pool.begin().await?;
        check_fence(&mut tx, fence).await?;
        let finished = finish_step(&mut tx, fence, end).await?;
        let event = finish_task(&mut tx, fence, &task_end).await?;
        tx.commit().await?;
        Ok((finished, event))
    }

    async fn await_approval(
        &self,
        fence: &Fence,
        requests: Vec<ApprovalRequest>,
    ) -> Result<EventRecord> {
        let mut tx = self.pool.begin().await?;
        check_fence(&mut tx, fence).await?;
        let event = await_approval(&mut tx, fence, &requests).await?;
        tx.commit().await?;
        Ok(event)
    }

    async fn approvals(&self, task_id: &str) -> Result<Vec<ApprovalRecord>> {
        let rows = sqlx::query(approvals::LIST)
            .bind(task_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(approval_from_row).collect()
    }

    async fn decide_approval(
        &self,
        task_id: &str,
        call_id: &str,
        decision: &Decision,
    ) -> Result<DecideOutcome> {
        let mut tx = self.pool.begin().await?;
        let outcome = decide_approval(&mut tx, task_id, call_id, decision, &self.channel).await?;
        tx.commit().await?;
        Ok(outcome)
    }

    async fn expire_approvals(&self, now: Millis) -> Result<Vec<EventRecord>> {
        let tasks: Vec<String> = sqlx::query_scalar(approvals::EXPIRED_TASKS)
            .bind(now)
            .bind(approvals::EXPIRE_BATCH)
            .fetch_all(&self.pool)
            .await?;
        let mut events = Vec::new();
        for task_id in tasks {
            // One transaction per task: a task's lock is held briefly.
            let mut tx = self.pool.begin().await?;
            expire_task_approvals(&mut tx, &task_id, now, &self.channel, &mut events).await?;
            tx.commit().await?;
        }
        Ok(events)
    }

    async fn create_schedule(&self, schedule: NewSchedule) -> Result<ScheduleRecord> {
        let row = sqlx::query(
            "INSERT INTO schedules (id, tenant, name, cron, timezone, template, missed_ticks,
                                    next_run_at, created_at, paused)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             RETURNING *",
        )
        .bind(uuid::Uuid::now_v7().to_string())
        .bind(&schedule.tenant)
        .bind(&schedule.name)
        .bind(&schedule.cron)
        .bind(&schedule.timezone)
        .bind(schedule.template.to_json())
        .bind(schedule.missed_ticks.as_str())
        .bind(schedule.next_run_at)
        .bind(now_millis())
        .bind(schedule.paused)
        .fetch_one(&self.pool)
        .await?;
        schedule_from_row(&row)
    }

    async fn get_schedule(&self, id: &str) -> Result<Option<ScheduleRecord>> {
        let row = sqlx::query("SELECT * FROM schedules WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(schedule_from_row).transpose()
    }

    async fn list_schedules(&self, query: &ScheduleQuery) -> Result<SchedulePage> {
        // Written from fixed fragments only; every value is bound.
        let mut statement = sqlx::query(sqlx::AssertSqlSafe(query.list_statement(&DIALECT)));
        for value in query.list_parameters() {
            statement = statement.bind(value);
        }
        let rows = statement
            .bind(i64::from(query.page_size()) + 1)
            .fetch_all(&self.pool)
            .await?;
        let schedules = rows
            .iter()
            .map(schedule_from_row)
            .collect::<Result<Vec<_>>>()?;
        Ok(query.page(schedules))
    }

    async fn set_schedule_paused(
        &self,
        id: &str,
        paused: bool,
        next_run_at: Option<Millis>,
    ) -> Result<Option<ScheduleRecord>> {
        let row = sqlx::query(
            "UPDATE schedules
                SET paused = $2, next_run_at = COALESCE($3, next_run_at), waiting_for_room = FALSE
              WHERE id = $1
             RETURNING *",
        )
        .bind(id)
        .bind(paused)
        .bind(next_run_at)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(schedule_from_row).transpose()
    }

    async fn delete_schedule(&self, id: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM schedules WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn earliest_schedule_due(&self) -> Result<Option<Millis>> {
        Ok(sqlx::query_scalar(
            "SELECT next_run_at FROM schedules
              WHERE NOT paused AND next_run_at IS NOT NULL
              ORDER BY next_run_at LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn fire_due_schedules(&self, rules: &FireRules) -> Result<Fired> {
        let mut tx = self.pool.begin().await?;
        // Rows another host is firing are locked: skip them rather than
        // wait, and rows it fired while this statement waited are checked
        // again against the WHERE clause (their next_run_at has moved on).
        let rows = sqlx::query(
            "SELECT * FROM schedules
              WHERE NOT paused AND next_run_at IS NOT NULL AND next_run_at <= $1
              ORDER BY next_run_at
              LIMIT $2
                FOR UPDATE SKIP LOCKED",
        )
        .bind(rules.now)
        .bind(rules.max as i64)
        .fetch_all(&mut *tx)
        .await?;
        let mut fired = Fired::default();
        for row in &rows {
            let schedule = schedule_from_row(row)?;
            fired.taken += 1;
            let firing = schedule.firing(rules);
            if let Some(tick) = firing.run_for {
                if !queue_has_room(&mut tx, &schedule.tenant, rules).await? {
                    sqlx::query("UPDATE schedules SET waiting_for_room = TRUE WHERE id = $1")
                        .bind(&schedule.id)
                        .execute(&mut *tx)
                        .await?;
                    fired.waiting += 1;
                    continue;
                }
                let task = schedule.template.run(&schedule.tenant, &schedule.id, tick);
                let (record, event) = create_task(&mut tx, &task, &self.channel).await?;
                fired.runs.push((
                    record,
                    event.expect("a task without an idempotency key is always new"),
                ));
            }
            sqlx::query(
                "UPDATE schedules
                    SET next_run_at = $2, last_run_at = COALESCE($3, last_run_at),
                        waiting_for_room = FALSE
                  WHERE id = $1",
            )
            .bind(&schedule.id)
            .bind(firing.next_run_at)
            .bind(firing.run_for)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(fired)
    }

    fn wakeups(&self) -> Option<Arc<Notify>> {
        Some(self.wakeups.clone())
    }

    fn cancellations(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        Some(self.cancellations.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::future::join_all;

    #[test]
    fn the_schema_parameter_is_taken_off_the_url() {
        let (url, schema) = take_schema("postgres://u@h/db?opspawn_schema=t_1a").unwrap();
        assert_eq!(url, "postgres://u@h/db");
        assert_eq!(schema.as_deref(), Some("t_1a"));

        let (url, schema) =
            take_schema("postgres://u@h/db?sslmode=disable&opspawn_schema=s&port=1").unwrap();
        assert_eq!(url, "postgres://u@h/db?sslmode=disable&port=1");
        assert_eq!(schema.as_deref(), Some("s"));

        let (url, schema) = take_schema("postgres://u@h/db?sslmode=disable").unwrap();
        assert_eq!(url, "postgres://u@h/db?sslmode=disable");
        assert_eq!(schema, None);
    }

    #[test]
    fn only_plain_schema_names_are_accepted() {
        for bad in ["", "Public", "a-b", "a\"b", "a;drop", &"x".repeat(64)] {
            let url = format!("postgres://h/db?opspawn_schema={bad}");
            assert!(
                matches!(take_schema(&url), Err(StoreError::Config(_))),
                "{bad:?}"
            );
        }
    }

    fn new_task(goal: &str) -> NewTask {
        NewTask {
            tenant: "default".into(),
            idempotency_key: None,
            priority: 0,
            run_at: None,
            deadline_at: None,
            goal: goal.to_owned(),
            planner: "react".into(),
            llm: "scripted".into(),
            model: None,
            tools: vec!["calculator".into()],
            options: json!({"llm": {"nul": "a\u{0}b"}}),
            max_steps: 20,
            max_retries: 0,
            timeout: Duration::from_secs(60),
            trace_parent: None,
            schedule: None,
            budget: TaskBudget::default(),
            thread: None,
            memory_namespace: None,
            response_format: None,
            call: None,
            images: Vec::new(),
        }
    }

    /// Why the tests that need a server are ignored unless asked for.
    const NEEDS_POSTGRES: &str = "needs Postgres: run with OPSPAWN_TEST_DATABASE=postgres";

    /// The Postgres URL of the tests; a test asked for without Postgres
    /// fails rather than passing unrun.
    fn test_url() -> String {
        assert_eq!(
            std::env::var("OPSPAWN_TEST_DATABASE").as_deref(),
            Ok("postgres"),
            "{NEEDS_POSTGRES}"
        );
        std::env::var("OPSPAWN_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
    }

    async fn drop_schema(store: &PgStore, schema: &str) {
        sqlx::raw_sql(AssertSqlSafe(format!("DROP SCHEMA \"{schema}\" CASCADE")))
            .execute(&store.pool)
            .await
            .unwrap();
    }

    #[test]
    fn each_schema_has_its_own_channel() {
        assert_eq!(tasks_channel(None), "opspawn_tasks");
        assert_eq!(tasks_channel(Some("t_1a")), "opspawn_tasks_t_1a");
        let long = tasks_channel(Some(&"x".repeat(63)));
        assert_eq!(long.len(), MAX_IDENTIFIER);
        assert!(long.starts_with("opspawn_tasks_xxx"));
    }

    /// A task created through one store wakes the other stores on the same
    /// schema, and only those.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs Postgres: run with OPSPAWN_TEST_DATABASE=postgres"]
    async fn a_new_task_wakes_the_hosts_sharing_its_schema() {
        let base = test_url();
        let shared = format!("t_unit_{}", uuid::Uuid::now_v7().simple());
        let other = format!("t_unit_{}", uuid::Uuid::now_v7().simple());
        let url = |schema: &str| format!("{base}?opspawn_schema={schema}");
        let a = PgStore::open(&url(&shared)).await.unwrap();
        let b = PgStore::open(&url(&shared)).await.unwrap();
        let c = PgStore::open(&url(&other)).await.unwrap();
        // Let the listeners connect: a wake-up on connecting would prove nothing.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (b_wakeups, c_wakeups) = (b.wakeups().unwrap(), c.wakeups().unwrap());
        let (b_woken, c_woken) = (b_wakeups.notified(), c_wakeups.notified());
        tokio::pin!(b_woken, c_woken);
        b_woken.as_mut().enable();
        c_woken.as_mut().enable();

        a.create_task(new_task("wake up")).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), b_woken)
            .await
            .expect("the host on the same schema is woken");
        assert!(
            tokio::time::timeout(Duration::from_millis(500), c_woken)
                .await
                .is_err(),
            "the host on another schema is not"
        );

        drop_schema(&a, &shared).await;
        drop_schema(&c, &other).await;
    }

    /// A store in a schema of its own.
    async fn temporary_store() -> (PgStore, String) {
        let base = test_url();
        let schema = format!("t_unit_{}", uuid::Uuid::now_v7().simple());
        let store = PgStore::open(&format!("{base}?opspawn_schema={schema}"))
            .await
            .unwrap();
        (store, schema)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs Postgres: run with OPSPAWN_TEST_DATABASE=postgres"]
    async fn a_new_task_is_answered_as_it_is_stored() {
        let (store, schema) = temporary_store().await;
        crate::store::conformance::a_new_task_is_answered_as_it_is_stored(&store).await;
        drop_schema(&store, &schema).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs Postgres: run with OPSPAWN_TEST_DATABASE=postgres"]
    async fn a_due_schedule_gets_one_run_per_tick() {
        let (store, schema) = temporary_store().await;
        crate::store::conformance::a_due_schedule_gets_one_run_per_tick(&store).await;
        drop_schema(&store, &schema).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs Postgres: run with OPSPAWN_TEST_DATABASE=postgres"]
    async fn missed_ticks_follow_the_schedules_policy() {
        let (store, schema) = temporary_store().await;
        crate::store::conformance::missed_ticks_follow_the_schedules_policy(&store).await;
        drop_schema(&store, &schema).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs Postgres: run with OPSPAWN_TEST_DATABASE=postgres"]
    async fn memories_are_ranked_scoped_and_capped() {
        let (store, schema) = temporary_store().await;
        crate::store::conformance::memories_are_ranked_scoped_and_capped(&store).await;
        drop_schema(&store, &schema).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs Postgres: run with OPSPAWN_TEST_DATABASE=postgres"]
    async fn a_journaled_memory_call_is_not_performed_twice() {
        let (store, schema) = temporary_store().await;
        crate::store::conformance::a_journaled_memory_call_is_not_performed_twice(&store).await;
        drop_schema(&store, &schema).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs Postgres: run with OPSPAWN_TEST_DATABASE=postgres"]
    async fn history_steps_read_finished_steps_as_text() {
        let (store, schema) = temporary_store().await;
        crate::store::conformance::history_steps_read_finished_steps_as_text(&store).await;
        drop_schema(&store, &schema).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs Postgres: run with OPSPAWN_TEST_DATABASE=postgres"]
    async fn a_threads_tasks_run_one_after_another() {
        let (store, schema) = temporary_store().await;
        crate::store::conformance::a_threads_tasks_run_one_after_another(&store).await;
        drop_schema(&store, &schema).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs Postgres: run with OPSPAWN_TEST_DATABASE=postgres"]
    async fn claims_take_expired_leases_first() {
        let (store, schema) = temporary_store().await;
        crate::store::conformance::claims_take_expired_leases_first(&store).await;
        drop_schema(&store, &schema).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs Postgres: run with OPSPAWN_TEST_DATABASE=postgres"]
    async fn a_batch_claim_loads_each_journal() {
        let (store, schema) = temporary_store().await;
        crate::store::conformance::a_batch_claim_loads_each_journal(&store).await;
        drop_schema(&store, &schema).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs Postgres: run with OPSPAWN_TEST_DATABASE=postgres"]
    async fn a_tasks_images_are_kept() {
        let (store, schema) = temporary_store().await;
        crate::store::conformance::a_tasks_images_are_kept(&store).await;
        drop_schema(&store, &schema).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs Postgres: run with OPSPAWN_TEST_DATABASE=postgres"]
    async fn a_response_format_is_kept_and_a_refused_answer_too() {
        let (store, schema) = temporary_store().await;
        crate::store::conformance::a_response_format_is_kept_and_a_refused_answer_too(&store).await;
        drop_schema(&store, &schema).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs Postgres: run with OPSPAWN_TEST_DATABASE=postgres"]
    async fn usage_and_cost_add_up() {
        let (store, schema) = temporary_store().await;
        crate::store::conformance::usage_and_cost_add_up(&store).await;
        drop_schema(&store, &schema).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs Postgres: run with OPSPAWN_TEST_DATABASE=postgres"]
    async fn a_steps_end_is_written_with_what_follows() {
        let (store, schema) = temporary_store().await;
        crate::store::conformance::a_steps_end_is_written_with_what_follows(&store).await;
        drop_schema(&store, &schema).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs Postgres: run with OPSPAWN_TEST_DATABASE=postgres"]
    async fn the_task_list_filters_and_pages() {
        let (store, schema) = temporary_store().await;
        crate::store::conformance::the_task_list_filters_and_pages(&store).await;
        drop_schema(&store, &schema).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs Postgres: run with OPSPAWN_TEST_DATABASE=postgres"]
    async fn the_task_list_filters_by_plugin_and_goal_text() {
        let (store, schema) = temporary_store().await;
        crate::store::conformance::the_task_list_filters_by_plugin_and_goal_text(&store).await;
        drop_schema(&store, &schema).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs Postgres: run with OPSPAWN_TEST_DATABASE=postgres"]
    async fn task_stats_count_by_status_and_minute() {
        let (store, schema) = temporary_store().await;
        crate::store::conformance::task_stats_count_by_status_and_minute(&store).await;
        drop_schema(&store, &schema).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs Postgres: run with OPSPAWN_TEST_DATABASE=postgres"]
    async fn approvals_are_answered_once_and_requeue_when_all_are() {
        let (store, schema) = temporary_store().await;
        crate::store::conformance::approvals_are_answered_once_and_requeue_when_all_are(&store)
            .await;
        drop_schema(&store, &schema).await;
    }

    /// With 100,000 queued tasks (and running and finished ones beside
    /// them), each claim query walks its partial index and stops after the
    /// batch: no sequential scan, no sort. Prints the plans
    /// (`--nocapture`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs Postgres: run with OPSPAWN_TEST_DATABASE=postgres"]
    async fn the_claim_walks_an_index_on_100000_queued_tasks() {
        let (store, schema) = temporary_store().await;
        let now = now_millis();
        // Ids in the UUIDv7 text shape, so they sort by creation as real ones do.
        sqlx::query(
            "INSERT INTO tasks (id, status, goal, planner, llm, tools, options, max_steps,
                                timeout_ms, created_at, priority, lease_owner,
                                lease_expires_at, finished_at)
             SELECT lpad(to_hex(n), 32, '0'),
                    CASE WHEN n <= 100000 THEN 'queued'
                         WHEN n <= 110000 THEN 'running'
                         ELSE 'succeeded' END,
                    'g', 'react', 'scripted', '[]', '{}', 20, 60000, $1, n % 7,
                    CASE WHEN n > 100000 AND n <= 110000 THEN 'host-a' END,
                    CASE WHEN n > 100000 AND n <= 110000 THEN $1 + n END,
                    CASE WHEN n > 110000 THEN $1 END
               FROM generate_series(1, 200000) AS n",
        )
        .bind(now)
        .execute(&store.pool)
        .await
        .unwrap();
        sqlx::query("ANALYZE tasks")
            .execute(&store.pool)
            .await
            .unwrap();

        let mut tx = store.pool.begin().await.unwrap();
        for (query, index) in [
            (CLAIM_EXPIRED, "tasks_by_lease"),
            (CLAIM_QUEUED, "tasks_queued"),
        ] {
            let explain = format!("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {query}");
            let lines: Vec<String> = sqlx::query_scalar(AssertSqlSafe(explain))
                .bind("host-b")
                .bind(now + 30_000)
                // Ten leases expired (ids 100001 to 100010).
                .bind(now + 100_011)
                .bind(100_i64)
                .fetch_all(&mut *tx)
                .await
                .unwrap();
            let plan = lines.join("\n");
            println!("{plan}\n");
            assert!(plan.contains(index), "{plan}");
            assert!(!plan.contains("Seq Scan on tasks"), "{plan}");
            assert!(!plan.contains("Sort"), "{plan}");
        }
        tx.rollback().await.unwrap();
        drop_schema(&store, &schema).await;
    }

    /// Runs only with `OPSPAWN_TEST_DATABASE=postgres`, against
    /// `OPSPAWN_TEST_POSTGRES_URL` (default: the local `test` database), in a
    /// schema of its own that it drops at the end.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    #[ignore = "needs Postgres: run with OPSPAWN_TEST_DATABASE=postgres"]
    async fn concurrent_writers_claim_fence_and_number_events_correctly() {
        let base = test_url();
        let schema = format!("t_unit_{}", uuid::Uuid::now_v7().simple());
        let store = PgStore::open(&format!("{base}?opspawn_schema={schema}"))
            .await
            .unwrap();
        let lease = Duration::from_secs(30);

        // Many workers claiming at once each get a different task.
        let created =
            join_all((0..20).map(|i| store.create_task(new_task(&format!("t{i}"))))).await;
        let mut ids: Vec<String> = created.into_iter().map(|r| r.unwrap().0.id).collect();
        let claims = join_all((0..8).map(|w| {
            let store = &store;
            async move {
                let mut mine = Vec::new();
                while let Some(claim) = store.claim_next(&format!("w{w}"), lease).await.unwrap() {
                    mine.push(claim);
                }
                mine
            }
        }))
        .await;
        let mut claimed: Vec<Claim> = claims.into_iter().flatten().collect();
        let mut claimed_ids: Vec<String> = claimed.iter().map(|c| c.task.id.clone()).collect();
        ids.sort();
        claimed_ids.sort();
        assert_eq!(claimed_ids, ids, "every task claimed exactly once");
        assert!(
            claimed
                .iter()
                .all(|c| c.task.attempt == 1 && c.event.seq == 2)
        );
        assert_eq!(claimed[0].task.options, json!({"llm": {"nul": "a\u{0}b"}}));

        // Steps and cancel requests appended at once number events 1..=n.
        let claim = claimed.pop().unwrap();
        let fence = &claim.fence;
        let steps = join_all((1..=10).map(|seq| {
            store.start_step(
                fence,
                StepStart {
                    seq,
                    kind: StepKind::Tool,
                    plugin: "calculator".into(),
                    input: json!({"expression": "1+1"}),
                    versions: Default::default(),
                },
            )
        }));
        let cancels = join_all((0..5).map(|_| store.request_cancel(&fence.task_id)));
        let (steps, cancels) = tokio::join!(steps, cancels);
        assert!(steps.iter().all(Result::is_ok), "{steps:?}");
        assert!(cancels.iter().all(Result::is_ok));
        let events = store.events_after(&fence.task_id, 0).await.unwrap();
        let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=17).collect::<Vec<_>>());
        assert_eq!(
            store
                .renew_leases(std::slice::from_ref(fence), lease)
                .await
                .unwrap(),
            [Renewal::Renewed {
                cancel_requested: true
            }]
        );

        // A claim whose lease expired is taken over, and the old one is fenced.
        let (task, _) = store.create_task(new_task("expiring")).await.unwrap();
        let first = store
            .claim_next("old", Duration::ZERO)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first.task.id, task.id);
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(store.expire_all_leases().await.unwrap(), 0);
        let second = store.claim_next("new", lease).await.unwrap().unwrap();
        assert_eq!(
            (second.task.id.as_str(), second.task.attempt),
            (task.id.as_str(), 2)
        );
        let end = TaskEnd::Succeeded {
            result: "stale".into(),
        };
        assert!(matches!(
            store.finish_task(&first.fence, end).await,
            Err(StoreError::Fenced { attempt: 1, .. })
        ));
        assert_eq!(
            store
                .renew_leases(&[first.fence.clone(), second.fence.clone()], lease)
                .await
                .unwrap(),
            [
                Renewal::Lost,
                Renewal::Renewed {
                    cancel_requested: false
                }
            ],
            "the superseded claim is lost, the current one renewed"
        );
        let end = TaskEnd::Succeeded {
            result: "fresh".into(),
        };
        let finished = store.finish_task(&second.fence, end).await.unwrap();
        assert!(finished.is_final());
        let task = store.get_task(&task.id).await.unwrap().unwrap();
        assert_eq!(
            (task.status, task.result.as_deref()),
            (TaskStatus::Succeeded, Some("fresh"))
        );

        drop_schema(&store, &schema).await;
    }
}
