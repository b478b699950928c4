//! The embedded store: one SQLite file in WAL mode.
//!
//! SQLite admits one writer at a time, so all writes go through a single
//! writer (`writer.rs`) that groups whatever is waiting into one transaction
//! (group commit). Reads use a separate pool of read-only connections, which
//! WAL lets run alongside the writer.
//!
//! A task read by its id, the most frequent read (a client asking after a
//! task, a request that waited for one to finish), is made at once on the
//! calling thread instead ([`PointReads`]): through sqlx each query is handed
//! to its connection's own thread and the rows handed back, two thread
//! wake-ups that cost several times the query itself, which is a lookup
//! by primary key in pages the writer keeps cached.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::Connection;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};

use super::approvals::{self, ApprovalRecord, ApprovalRequest, DecideOutcome, Decision};
use super::memories::{self, MemoryCall};
use super::schedules::{
    FireRules, Fired, NewSchedule, SchedulePage, ScheduleQuery, ScheduleRecord,
};
use super::{
    CancelOutcome, Claim, EventRecord, Fence, HistoryStep, Millis, NewTask, PeriodUsage,
    QueueGauges, Renewal, Result, SqlDialect, StepEnd, StepRecord, StepStart, Store, TaskEnd,
    TaskPage, TaskQuery, TaskRecord, TaskStats, TaskStatus, ThreadDeletion, lack_step_inputs,
    restore_step_inputs,
};
use crate::memory::{MemoryConfig, MemoryOp, MemoryQuery, MemoryRecord, MemoryReply, NewMemory};

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

mod rows;
mod writer;

use rows::{
    approval_from_row, event_from_row, memory_from_row, schedule_from_row, step_from_row,
    task_from_row,
};
use writer::{Reply, Then, WriteOp, Writer};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

/// SQLite's spelling of the task list's filters. `lower` folds ASCII
/// letters only, so the goal filter ignores the case of those alone.
pub const DIALECT: SqlDialect = SqlDialect {
    placeholder: |n| format!("?{n}"),
    tools_hold: |p| format!("EXISTS (SELECT 1 FROM json_each(tools) WHERE value = {p})"),
    goal_holds: |p| format!("instr(lower(goal), lower({p})) > 0"),
    finished_tasks_index: " INDEXED BY tasks_finished_by_tenant",
};

pub struct SqliteStore {
    reads: SqlitePool,
    point_reads: PointReads,
    writer: Writer,
}

/// Read-only connections for reads by primary key, made on the calling
/// thread: a connection is taken from the idle ones (or opened), used, and
/// put back. Such a read takes microseconds: the pages it needs are the
/// ones writes keep touching, and in WAL mode a reader never waits on the
/// writer.
struct PointReads {
    path: std::path::PathBuf,
    idle: std::sync::Mutex<Vec<rusqlite::Connection>>,
}

/// Idle point-read connections kept open; more are opened when as many
/// reads run at once, and closed after.
const POINT_READ_CONNECTIONS: usize = 4;

impl PointReads {
    fn new(path: &std::path::Path) -> Self {
        Self {
            path: path.to_owned(),
            idle: std::sync::Mutex::default(),
        }
    }

    fn read<T>(&self, read: impl FnOnce(&rusqlite::Connection) -> Result<T>) -> Result<T> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let conn = match idle {
            Some(conn) => conn,
            None => writer::open_read_only(&self.path)?,
        };
        let result = read(&conn);
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < POINT_READ_CONNECTIONS {
            idle.push(conn);
        }
        result
    }
}

impl SqliteStore {
    /// Opens (creating if needed) and migrates the database at `url`.
    pub async fn open(url: &str) -> Result<Self> {
        skip_memory_statistics();
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));

        let mut migrating = SqliteConnection::connect_with(&options).await?;
        MIGRATOR.run(&mut migrating).await?;
        migrating.close().await?;
        let writer = Writer::start(options.get_filename())?;
        let point_reads = PointReads::new(options.get_filename());

        let reads = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await?;
        Ok(Self {
            reads,
            point_reads,
            writer,
        })
    }

    async fn write(&self, op: WriteOp) -> Result<Reply> {
        self.writer.write(op).await
    }

    /// How many transactions (group commits) the writer has finished: with
    /// the number of writes, how well they are being grouped.
    pub fn write_batches(&self) -> u64 {
        self.writer.batches()
    }
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

    async fn await_approval(
        &self,
        fence: &Fence,
        requests: Vec<ApprovalRequest>,
    ) -> Result<EventRecord> {
        let op = WriteOp::AwaitApproval {
            fence: fence.clone(),
            requests,
        };
        match self.write(op).await? {
            Reply::Event(event) => Ok(event),
            _ => unreachable!("await_approval answers Event"),
        }
    }

    async fn approvals(&self, task_id: &str) -> Result<Vec<ApprovalRecord>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(approvals::sqlite(approvals::LIST)))
            .bind(task_id)
            .fetch_all(&self.reads)
            .await?;
        rows.iter().map(approval_from_row).collect()
    }

    async fn decide_approval(
        &self,
        task_id: &str,
        call_id: &str,
        decision: &Decision,
    ) -> Result<DecideOutcome> {
        let op = WriteOp::DecideApproval {
            task_id: task_id.to_owned(),
            call_id: call_id.to_owned(),
            decision: decision.clone(),
        };
        match self.write(op).await? {
            Reply::Decided(outcome) => Ok(outcome),
            _ => unreachable!("decide_approval answers Decided"),
        }
    }

    async fn expire_approvals(&self, now: Millis) -> Result<Vec<EventRecord>> {
        match self.write(WriteOp::ExpireApprovals { now }).await? {
            Reply::Events(events) => Ok(events),
            _ => unreachable!("expire_approvals answers Events"),
        }
    }

    async fn create_schedule(&self, schedule: NewSchedule) -> Result<ScheduleRecord> {
        match self.write(WriteOp::CreateSchedule(schedule)).await? {
            Reply::Schedule(Some(record)) => Ok(record),
            _ => unreachable!("create_schedule answers Schedule"),
        }
    }

    async fn get_schedule(&self, id: &str) -> Result<Option<ScheduleRecord>> {
        let row = sqlx::query("SELECT * FROM schedules WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.reads)
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
            .fetch_all(&self.reads)
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
        let op = WriteOp::SetSchedulePaused {
            id: id.to_owned(),
            paused,
            next_run_at,
        };
        match self.write(op).await? {
            Reply::Schedule(record) => Ok(record),
            _ => unreachable!("set_schedule_paused answers Schedule"),
        }
    }

    async fn delete_schedule(&self, id: &str) -> Result<bool> {
        let op = WriteOp::DeleteSchedule { id: id.to_owned() };
        match self.write(op).await? {
            Reply::Count(n) => Ok(n > 0),
            _ => unreachable!("delete_schedule answers Count"),
        }
    }

    async fn earliest_schedule_due(&self) -> Result<Option<Millis>> {
        Ok(sqlx::query_scalar(
            "SELECT next_run_at FROM schedules INDEXED BY schedules_due
              WHERE paused = 0 AND next_run_at IS NOT NULL
              ORDER BY next_run_at LIMIT 1",
        )
        .fetch_optional(&self.reads)
        .await?)
    }

    async fn fire_due_schedules(&self, rules: &FireRules) -> Result<Fired> {
        match self.write(WriteOp::FireSchedules(rules.clone())).await? {
            Reply::Fired(fired) => Ok(fired),
            _ => unreachable!("fire_due_schedules answers Fired"),
        }
    }

    async fn get_task(&self, id: &str) -> Result<Option<TaskRecord>> {
        self.point_reads.read(|conn| writer::find_task(conn, id))
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

    async fn queue_gauges(&self, now: Millis) -> Result<QueueGauges> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT tenant, status, COUNT(*) FROM tasks
              WHERE status IN ('queued', 'running')
              GROUP BY tenant, status",
        )
        .fetch_all(&self.reads)
        .await?;
        let active = rows
            .into_iter()
            .filter_map(|(tenant, status, count)| {
                Some((tenant, TaskStatus::parse(&status)?, count as u64))
            })
            .collect();
        let oldest_runnable_since: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(COALESCE(run_at, created_at)) FROM tasks
              WHERE status = 'queued' AND (run_at IS NULL OR run_at <= ?1)",
        )
        .bind(now)
        .fetch_one(&self.reads)
        .await?;
        Ok(QueueGauges {
            active,
            oldest_runnable_since,
        })
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
                .fetch_one(&self.reads)
                .await?;
            counts.push((status, count as u64));
        }
        let oldest_queued_since: Option<i64> =
            sqlx::query_scalar(sqlx::AssertSqlSafe(TaskStats::oldest_queued(&DIALECT)))
                .bind(tenant)
                .bind(now)
                .fetch_one(&self.reads)
                .await?;
        let finished: Vec<(i64, String, i64)> =
            sqlx::query_as(sqlx::AssertSqlSafe(TaskStats::finished_by_minute(&DIALECT)))
                .bind(tenant)
                .bind(since)
                .fetch_all(&self.reads)
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
            .fetch_all(&self.reads)
            .await?;
        let tasks = rows.iter().map(task_from_row).collect::<Result<Vec<_>>>()?;
        Ok(query.page(tasks))
    }

    async fn steps(&self, task_id: &str) -> Result<Vec<StepRecord>> {
        load_steps(&self.reads, task_id).await
    }

    async fn history_steps(&self, task_ids: &[String]) -> Result<Vec<HistoryStep>> {
        if task_ids.is_empty() {
            return Ok(Vec::new());
        }
        // The ids travel as one JSON array: one statement, whatever their number.
        let ids = serde_json::to_string(task_ids).expect("strings serialize");
        let rows = sqlx::query(
            "SELECT s.task_id, s.seq, s.kind,
                    CASE WHEN s.kind = 'tool' THEN COALESCE(pi.body, s.input) END AS call,
                    COALESCE(po.body, s.output) AS output, s.error_code, s.error_message
               FROM steps s
               LEFT JOIN payloads pi ON pi.sha256 = s.input_ref AND s.kind = 'tool'
               LEFT JOIN payloads po ON po.sha256 = s.output_ref
              WHERE s.task_id IN (SELECT value FROM json_each(?)) AND s.status <> 'running'
              ORDER BY s.task_id, s.seq",
        )
        .bind(ids)
        .fetch_all(&self.reads)
        .await?;
        rows.iter().map(rows::history_step_from_row).collect()
    }

    async fn events_after(&self, task_id: &str, after: i64) -> Result<Vec<EventRecord>> {
        let rows = sqlx::query("SELECT * FROM events WHERE task_id = ? AND seq > ? ORDER BY seq")
            .bind(task_id)
            .bind(after)
            .fetch_all(&self.reads)
            .await?;
        let mut events = rows
            .iter()
            .map(event_from_row)
            .collect::<Result<Vec<_>>>()?;
        if lack_step_inputs(&events) {
            restore_step_inputs(&mut events, &load_steps(&self.reads, task_id).await?);
        }
        Ok(events)
    }

    async fn period_usage(&self, tenant: &str, period: &str) -> Result<PeriodUsage> {
        let row: Option<(i64, i64, Option<i64>)> = sqlx::query_as(
            "SELECT input_tokens, output_tokens, cost_nanos FROM tenant_usage
              WHERE tenant = ? AND period = ?",
        )
        .bind(tenant)
        .bind(period)
        .fetch_optional(&self.reads)
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
        match self.write(WriteOp::Cancel { id: id.to_owned() }).await? {
            Reply::Cancel(outcome) => Ok(outcome),
            _ => unreachable!("cancel answers Cancel"),
        }
    }

    async fn delete_thread(&self, tenant: &str, thread: &str) -> Result<ThreadDeletion> {
        let op = WriteOp::DeleteThread {
            tenant: tenant.to_owned(),
            thread: thread.to_owned(),
        };
        match self.write(op).await? {
            Reply::Thread(deletion) => Ok(deletion),
            _ => unreachable!("deleting a thread answers Thread"),
        }
    }

    async fn memory_call(&self, fence: &Fence, call: &MemoryCall) -> Result<MemoryReply> {
        let mut recalled = Vec::new();
        if let MemoryOp::Recall { terms, limit } = &call.op {
            // A recall journaled before is answered from the journal, with
            // no search; a new one is searched here, on the readers, and
            // only its answer goes through the writer.
            let key = &call.key;
            let journaled: Option<(i64, String)> =
                sqlx::query_as(sqlx::AssertSqlSafe(approvals::sqlite(memories::JOURNALED)))
                    .bind(&key.task_id)
                    .bind(key.step)
                    .bind(key.site.as_str())
                    .bind(key.seq)
                    .fetch_optional(&self.reads)
                    .await?;
            if let Some(reply) = memories::replay(journaled, &call.op)? {
                return Ok(reply);
            }
            recalled = self
                .search_memories(&MemoryQuery {
                    tenant: call.tenant.clone(),
                    namespace: Some(call.namespace.clone()),
                    terms: terms.clone(),
                    limit: *limit,
                    before: None,
                })
                .await?;
        }
        let op = WriteOp::Memory {
            fence: fence.clone(),
            call: Box::new(call.clone()),
            recalled,
        };
        match self.write(op).await? {
            Reply::Memory(reply) => Ok(reply),
            _ => unreachable!("a memory call answers Memory"),
        }
    }

    async fn create_memory(
        &self,
        memory: NewMemory,
        config: &MemoryConfig,
    ) -> Result<MemoryRecord> {
        let op = WriteOp::CreateMemory {
            memory,
            config: config.clone(),
        };
        match self.write(op).await? {
            Reply::Memories(mut stored) if stored.len() == 1 => Ok(stored.remove(0)),
            _ => unreachable!("creating a memory answers the one memory"),
        }
    }

    async fn get_memory(&self, tenant: &str, id: &str) -> Result<Option<MemoryRecord>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {}, 0.0 AS score FROM memories WHERE id = ? AND tenant = ?",
            memories::COLUMNS
        )))
        .bind(id)
        .bind(tenant)
        .fetch_optional(&self.reads)
        .await?;
        row.as_ref().map(memory_from_row).transpose()
    }

    async fn search_memories(&self, query: &MemoryQuery) -> Result<Vec<MemoryRecord>> {
        // Written from fixed fragments only; every value is bound, and the
        // MATCH expression is built from plain words (`memory::fts5_match`).
        let mut sql;
        let mut values: Vec<String> = Vec::new();
        if query.terms.is_empty() {
            sql = format!(
                "SELECT {}, 0.0 AS score FROM memories WHERE tenant = ?",
                memories::COLUMNS
            );
            values.push(query.tenant.clone());
            if let Some(namespace) = &query.namespace {
                sql.push_str(" AND namespace = ?");
                values.push(namespace.clone());
            }
            if let Some(before) = &query.before {
                sql.push_str(" AND seq < (SELECT seq FROM memories WHERE id = ?)");
                values.push(before.clone());
            }
            sql.push_str(" ORDER BY seq DESC LIMIT ?");
        } else {
            sql = "SELECT m.id, m.namespace, m.text, m.metadata, m.created_at, m.task_id,
                          -bm25(memories_fts) AS score
                     FROM memories_fts JOIN memories m ON m.seq = memories_fts.rowid
                    WHERE memories_fts MATCH ? AND m.tenant = ?"
                .to_owned();
            values.push(crate::memory::fts5_match(&query.terms));
            values.push(query.tenant.clone());
            if let Some(namespace) = &query.namespace {
                sql.push_str(" AND m.namespace = ?");
                values.push(namespace.clone());
            }
            sql.push_str(" ORDER BY bm25(memories_fts), m.seq DESC LIMIT ?");
        }
        let mut statement = sqlx::query(sqlx::AssertSqlSafe(sql));
        for value in values {
            statement = statement.bind(value);
        }
        let rows = statement
            .bind(i64::from(query.limit))
            .fetch_all(&self.reads)
            .await?;
        rows.iter().map(memory_from_row).collect()
    }

    async fn delete_memory(&self, tenant: &str, id: &str) -> Result<bool> {
        let op = WriteOp::DeleteMemory {
            tenant: tenant.to_owned(),
            id: id.to_owned(),
        };
        match self.write(op).await? {
            Reply::Count(n) => Ok(n > 0),
            _ => unreachable!("deleting a memory answers Count"),
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

    async fn append_event(
        &self,
        fence: &Fence,
        kind: &'static str,
        data: serde_json::Value,
    ) -> Result<EventRecord> {
        let op = WriteOp::AppendEvent {
            fence: fence.clone(),
            kind,
            data,
        };
        match self.write(op).await? {
            Reply::Event(event) => Ok(event),
            _ => unreachable!("append_event answers Event"),
        }
    }

    async fn finish_step_then_start(
        &self,
        fence: &Fence,
        end: StepEnd,
        next: StepStart,
    ) -> Result<[(StepRecord, EventRecord); 2]> {
        let op = WriteOp::FinishStepThen {
            fence: fence.clone(),
            end,
            then: Then::StartStep(next),
        };
        match self.write(op).await? {
            Reply::Steps(steps) => Ok(steps),
            _ => unreachable!("finish_step_then_start answers Steps"),
        }
    }

    async fn finish_step_then_task(
        &self,
        fence: &Fence,
        end: StepEnd,
        task_end: TaskEnd,
    ) -> Result<((StepRecord, EventRecord), EventRecord)> {
        let op = WriteOp::FinishStepThen {
            fence: fence.clone(),
            end,
            then: Then::FinishTask(task_end),
        };
        match self.write(op).await? {
            Reply::StepAndEvent(step, event) => Ok((step, event)),
            _ => unreachable!("finish_step_then_task answers StepAndEvent"),
        }
    }
}

/// Tells SQLite not to keep memory statistics, which nothing here reads:
/// kept, every allocation SQLite makes, on every connection, takes one
/// process-wide mutex. It must be said before SQLite's first use in the
/// process; said later (a second store in the same process) SQLite refuses
/// it harmlessly and keeps counting.
fn skip_memory_statistics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: SQLITE_CONFIG_MEMSTATUS takes one int. sqlite3_config must
        // not run while another thread uses SQLite: in the server this is
        // the first SQLite call of the process, and once SQLite is
        // initialised it returns SQLITE_MISUSE having touched nothing.
        unsafe {
            rusqlite::ffi::sqlite3_config(rusqlite::ffi::SQLITE_CONFIG_MEMSTATUS, 0);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::writer::{
        CLAIM_EXPIRED, CLAIM_QUEUED, FINISH_STEP, FINISH_TASK, INSERT_EVENT, INSERT_TASK,
        RENEW_LEASES, START_STEP,
    };
    use super::*;
    use crate::store::conformance;
    use crate::store::event_kind;

    async fn open_temporary() -> (SqliteStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("opspawn.db").display());
        (SqliteStore::open(&url).await.unwrap(), dir)
    }

    /// A new task, claimed by `host-a`.
    async fn claimed_task(store: &SqliteStore, goal: &str) -> (TaskRecord, Claim) {
        let (task, _) = store
            .create_task(conformance::new_task(goal, 0, None))
            .await
            .unwrap();
        let claim = store
            .claim_next("host-a", Duration::from_secs(30))
            .await
            .unwrap()
            .unwrap();
        (task, claim)
    }

    fn step(seq: u32) -> StepStart {
        StepStart {
            seq,
            kind: crate::store::StepKind::Tool,
            plugin: "calculator".into(),
            input: serde_json::json!({"name": "calculator", "seq": seq}),
            versions: Default::default(),
        }
    }

    /// Writes waiting together commit together, and one that fails its
    /// check (a stale fence) fails alone, having written nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiting_writes_share_a_transaction_and_a_failed_check_fails_alone() {
        let (store, _dir) = open_temporary().await;
        let store = std::sync::Arc::new(store);
        let (task, claim) = claimed_task(&store, "batch").await;
        let stale = crate::store::Fence {
            attempt: claim.fence.attempt + 1,
            ..claim.fence.clone()
        };
        let before = store.write_batches();
        let writes: Vec<_> = (1..=200)
            .map(|seq| {
                let store = store.clone();
                let fence = if seq == 100 {
                    stale.clone()
                } else {
                    claim.fence.clone()
                };
                tokio::spawn(async move { store.start_step(&fence, step(seq)).await })
            })
            .collect();
        let mut failed = Vec::new();
        for (seq, write) in (1..=200).zip(writes) {
            if let Err(error) = write.await.unwrap() {
                failed.push((seq, error.to_string()));
            }
        }
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert_eq!(failed[0].0, 100);
        let batches = store.write_batches() - before;
        assert!(
            batches < 100,
            "200 waiting writes took {batches} transactions"
        );

        let steps = store.steps(&task.id).await.unwrap();
        assert_eq!(steps.len(), 199, "the fenced write wrote nothing");
        assert!(steps.iter().all(|s| s.seq != 100));
        // Every event numbered once, with no gap where the fenced write was.
        let events = store.events_after(&task.id, 0).await.unwrap();
        let numbers: Vec<i64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(numbers, (1..=numbers.len() as i64).collect::<Vec<_>>());
        assert_eq!(events.len(), 2 + 199);
        // Stored without their inputs, read back with them.
        for event in events.iter().filter(|e| e.kind == event_kind::STEP_STARTED) {
            assert_eq!(event.data["input"]["seq"], event.data["seq"], "{event:?}");
        }
    }

    /// Makes the writer's batches fail (`refuse`, SQL run on a connection
    /// of its own), starts a step, and checks that the write fails with an
    /// error containing `expected` and that nothing of it was kept; then
    /// undoes that (`allow`) and checks that the writer goes on.
    async fn a_failed_batch_keeps_nothing(refuse: &str, allow: &str, expected: &str) {
        let (store, dir) = open_temporary().await;
        let (task, claim) = claimed_task(&store, "refused").await;
        let url = format!("sqlite://{}", dir.path().join("opspawn.db").display());
        let mut conn = SqliteConnection::connect(&url).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(refuse))
            .execute(&mut conn)
            .await
            .unwrap();
        let error = store.start_step(&claim.fence, step(1)).await.unwrap_err();
        assert!(
            error.to_string().to_lowercase().contains(expected),
            "the failure reaches the caller: {error}"
        );
        assert!(
            store.steps(&task.id).await.unwrap().is_empty(),
            "the step's row was rolled back with its batch"
        );

        sqlx::raw_sql(sqlx::AssertSqlSafe(allow))
            .execute(&mut conn)
            .await
            .unwrap();
        let (started, _) = store.start_step(&claim.fence, step(1)).await.unwrap();
        assert_eq!(started.seq, 1);
        assert_eq!(store.steps(&task.id).await.unwrap().len(), 1);
    }

    /// A write that fails after it has written (the database refusing the
    /// second statement: the step's row goes in, then its event is refused)
    /// takes its whole batch back; the writer goes on.
    #[tokio::test]
    async fn a_write_failing_halfway_rolls_back_and_the_writer_goes_on() {
        a_failed_batch_keeps_nothing(
            "CREATE TRIGGER refuse_step_events BEFORE INSERT ON events
              WHEN NEW.kind = 'step.started'
             BEGIN SELECT RAISE(ABORT, 'refused for the test'); END",
            "DROP TRIGGER refuse_step_events",
            "refused for the test",
        )
        .await;
    }

    /// A batch whose every write succeeded but whose COMMIT fails (here a
    /// deferred foreign key, checked only at commit) answers every write
    /// with the error, keeps none of them, and the writer goes on.
    #[tokio::test]
    async fn a_failed_commit_fails_every_write_in_it_and_keeps_none() {
        a_failed_batch_keeps_nothing(
            "CREATE TABLE refuse_at_commit (
                task_id TEXT REFERENCES tasks(id) DEFERRABLE INITIALLY DEFERRED);
             CREATE TRIGGER refuse_step_commits AFTER INSERT ON steps
             BEGIN INSERT INTO refuse_at_commit VALUES ('no such task'); END",
            "DROP TRIGGER refuse_step_commits",
            "foreign key",
        )
        .await;
    }

    #[tokio::test]
    async fn a_due_schedule_gets_one_run_per_tick() {
        let (store, _dir) = open_temporary().await;
        conformance::a_due_schedule_gets_one_run_per_tick(&store).await;
    }

    #[tokio::test]
    async fn missed_ticks_follow_the_schedules_policy() {
        let (store, _dir) = open_temporary().await;
        conformance::missed_ticks_follow_the_schedules_policy(&store).await;
    }

    #[tokio::test]
    async fn memories_are_ranked_scoped_and_capped() {
        let (store, _dir) = open_temporary().await;
        conformance::memories_are_ranked_scoped_and_capped(&store).await;
    }

    #[tokio::test]
    async fn a_journaled_memory_call_is_not_performed_twice() {
        let (store, _dir) = open_temporary().await;
        conformance::a_journaled_memory_call_is_not_performed_twice(&store).await;
    }

    #[tokio::test]
    async fn history_steps_read_finished_steps_as_text() {
        let (store, _dir) = open_temporary().await;
        conformance::history_steps_read_finished_steps_as_text(&store).await;
    }

    #[tokio::test]
    async fn a_threads_tasks_run_one_after_another() {
        let (store, _dir) = open_temporary().await;
        conformance::a_threads_tasks_run_one_after_another(&store).await;
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

    #[tokio::test]
    async fn a_tasks_images_are_kept() {
        let (store, _dir) = open_temporary().await;
        conformance::a_tasks_images_are_kept(&store).await;
    }

    #[tokio::test]
    async fn a_response_format_is_kept_and_a_refused_answer_too() {
        let (store, _dir) = open_temporary().await;
        conformance::a_response_format_is_kept_and_a_refused_answer_too(&store).await;
    }

    #[tokio::test]
    async fn usage_and_cost_add_up() {
        let (store, _dir) = open_temporary().await;
        conformance::usage_and_cost_add_up(&store).await;
    }

    #[tokio::test]
    async fn a_steps_end_is_written_with_what_follows() {
        let (store, _dir) = open_temporary().await;
        conformance::a_steps_end_is_written_with_what_follows(&store).await;
    }

    #[tokio::test]
    async fn the_task_list_filters_and_pages() {
        let (store, _dir) = open_temporary().await;
        conformance::the_task_list_filters_and_pages(&store).await;
    }

    #[tokio::test]
    async fn the_task_list_filters_by_plugin_and_goal_text() {
        let (store, _dir) = open_temporary().await;
        conformance::the_task_list_filters_by_plugin_and_goal_text(&store).await;
    }

    #[tokio::test]
    async fn task_stats_count_by_status_and_minute() {
        let (store, _dir) = open_temporary().await;
        conformance::task_stats_count_by_status_and_minute(&store).await;
    }

    #[tokio::test]
    async fn a_new_task_is_answered_as_it_is_stored() {
        let (store, _dir) = open_temporary().await;
        conformance::a_new_task_is_answered_as_it_is_stored(&store).await;
    }

    #[tokio::test]
    async fn approvals_are_answered_once_and_requeue_when_all_are() {
        let (store, _dir) = open_temporary().await;
        conformance::approvals_are_answered_once_and_requeue_when_all_are(&store).await;
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
            if query == CLAIM_QUEUED {
                assert!(
                    plan.iter()
                        .any(|step| step.contains("USING INDEX tasks_thread_unfinished")),
                    "a thread's check reads its unfinished tasks only: {plan:#?}"
                );
            }
        }
    }

    /// The writes every step makes build no temporary b-tree: SQLite opens
    /// one (with a page cache of its own) whenever it runs a CHECK written
    /// as `IN` three or more constants, so the status checks are written
    /// with OR (migration 0018).
    #[tokio::test]
    async fn a_step_s_writes_open_no_temporary_b_tree() {
        let (store, dir) = open_temporary().await;
        drop(store);
        let conn = rusqlite::Connection::open(dir.path().join("opspawn.db")).unwrap();
        conn.execute_batch("PRAGMA foreign_keys = ON").unwrap();
        for statement in [
            INSERT_TASK,
            START_STEP,
            FINISH_STEP,
            FINISH_TASK,
            INSERT_EVENT,
        ] {
            let mut explain = conn.prepare(&format!("EXPLAIN {statement}")).unwrap();
            let mut rows = explain.raw_query();
            let mut opcodes = Vec::new();
            while let Some(row) = rows.next().unwrap() {
                opcodes.push(row.get::<_, String>(1).unwrap());
            }
            assert!(
                !opcodes.iter().any(|opcode| opcode == "OpenEphemeral"),
                "{statement}\nopens a temporary b-tree: {opcodes:?}"
            );
        }
    }

    /// Migration 0019 rebuilds `steps` and `events` as rowid tables (see
    /// docs/architecture.md, "The store"): a database made before it keeps
    /// every row, column for column, and the store reads them.
    #[tokio::test]
    async fn steps_and_events_keep_their_rows_when_they_become_rowid_tables() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("opspawn.db");
        let url = format!("sqlite://{}", path.display());
        let mut conn = SqliteConnection::connect_with(
            &SqliteConnectOptions::from_str(&url)
                .unwrap()
                .create_if_missing(true),
        )
        .await
        .unwrap();
        MIGRATOR.run_to(18, &mut conn).await.unwrap();
        conn.close().await.unwrap();

        let rows = |conn: &rusqlite::Connection, table: &str| -> Vec<Vec<rusqlite::types::Value>> {
            let mut select = conn
                .prepare(&format!("SELECT * FROM {table} ORDER BY task_id, seq"))
                .unwrap();
            let columns = select.column_count();
            select
                .query_map([], |row| (0..columns).map(|i| row.get(i)).collect())
                .unwrap()
                .map(Result::unwrap)
                .collect()
        };
        let schema = |conn: &rusqlite::Connection, table: &str| -> String {
            conn.query_row(
                "SELECT sql FROM sqlite_schema WHERE name = ?1",
                [table],
                |row| row.get(0),
            )
            .unwrap()
        };
        let old = rusqlite::Connection::open(&path).unwrap();
        old.execute_batch(
            "INSERT INTO tasks (id, status, goal, planner, llm, tools, options, max_steps,
                                timeout_ms, created_at)
             VALUES ('t1', 'running', 'What is 6*7?', 'react', 'scripted', '[\"calculator\"]',
                     '{}', 10, 60000, 1);
             INSERT INTO steps (task_id, seq, kind, plugin, status, input, output, attempt,
                                started_at, finished_at, input_tokens, output_tokens,
                                plugin_sha256, planner_sha256)
             VALUES ('t1', 2, 'tool', 'calculator', 'running', '{\"expression\":\"6*7\"}',
                     NULL, 1, 20, NULL, NULL, NULL, 'abc', 'def'),
                    ('t1', 1, 'llm', 'scripted', 'succeeded', '{\"messages\":[]}',
                     '{\"tool_calls\":[]}', 1, 10, 15, 12, 34, 'fed', 'def');
             INSERT INTO steps (task_id, seq, kind, plugin, status, input, error_code,
                                error_message, attempt, started_at, input_ref)
             VALUES ('t1', 3, 'llm', 'scripted', 'failed', '{}', 'llm_error', 'no', 1, 30,
                     'cafe');
             INSERT INTO events (task_id, seq, kind, data, at)
             VALUES ('t1', 1, 'task.created', '{}', 1),
                    ('t1', 3, 'step.finished', '{\"seq\":1}', 15),
                    ('t1', 2, 'step.started', '{\"seq\":1}', 10);",
        )
        .unwrap();
        assert!(schema(&old, "steps").contains("WITHOUT ROWID"));
        let (steps_before, events_before) = (rows(&old, "steps"), rows(&old, "events"));
        drop(old);

        let store = SqliteStore::open(&url).await.unwrap();
        assert_eq!(store.steps("t1").await.unwrap().len(), 3);
        drop(store);
        let new = rusqlite::Connection::open(&path).unwrap();
        for table in ["steps", "events"] {
            assert!(!schema(&new, table).contains("WITHOUT ROWID"), "{table}");
        }
        assert_eq!(rows(&new, "steps"), steps_before);
        assert_eq!(rows(&new, "events"), events_before);
        let indexes: Vec<String> = new
            .prepare("SELECT name FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'steps' ORDER BY name")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert!(
            indexes.contains(&"steps_by_input_ref".to_owned()),
            "{indexes:?}"
        );
        assert!(
            indexes.contains(&"steps_by_output_ref".to_owned()),
            "{indexes:?}"
        );
    }

    /// The writer checkpoints the WAL at 16,384 pages, not at SQLite's
    /// 1,000: 60 commits of about 25 pages each (a task with a 100 KB goal)
    /// are all still in the WAL, where the default would have copied them
    /// into the database once the WAL passed 1,000 pages.
    #[tokio::test]
    async fn the_wal_is_checkpointed_only_past_its_own_threshold() {
        let (store, dir) = open_temporary().await;
        let goal = "x".repeat(100_000);
        for _ in 0..60 {
            store
                .create_task(conformance::new_task(&goal, 0, None))
                .await
                .unwrap();
        }
        // While the store is open: its last connection checkpoints on close.
        let conn = rusqlite::Connection::open(dir.path().join("opspawn.db")).unwrap();
        let (busy, frames_in_wal): (i64, i64) = conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .unwrap();
        assert_eq!(busy, 0);
        assert!(
            (1_500..super::writer::WAL_AUTOCHECKPOINT_PAGES as i64).contains(&frames_in_wal),
            "{frames_in_wal} frames in the WAL"
        );
        drop(store);
    }

    /// Every filtered list walks an index that starts with its filters, so
    /// it stops after one page: never a scan of every task, never a sort.
    #[tokio::test]
    async fn task_lists_walk_an_index_of_their_filters() {
        let (store, dir) = open_temporary().await;
        drop(store);
        let url = format!("sqlite://{}", dir.path().join("opspawn.db").display());
        let mut conn = SqliteConnection::connect(&url).await.unwrap();
        let query = |tenant: bool, status: bool, before: bool| TaskQuery {
            tenant: tenant.then(|| "a".to_owned()),
            status: status.then_some(crate::store::TaskStatus::Queued),
            before: before.then(|| "z".to_owned()),
            limit: 10,
            ..TaskQuery::default()
        };
        // The plugin and goal filters are checked on the rows the same
        // index walks.
        let dashboard = |before: bool| TaskQuery {
            plugin: Some("calculator".to_owned()),
            goal_contains: Some("What".to_owned()),
            ..query(true, true, before)
        };
        // A thread's tasks (GET /v1/threads/{id}, and a planner's history).
        let thread = |before: bool| TaskQuery {
            thread: Some("t".to_owned()),
            ..query(true, false, before)
        };
        let cases = [
            (query(false, true, false), "tasks_by_status"),
            (query(false, true, true), "tasks_by_status"),
            (query(true, false, false), "tasks_by_tenant"),
            (query(true, true, false), "tasks_by_tenant_status"),
            (query(true, true, true), "tasks_by_tenant_status"),
            (dashboard(false), "tasks_by_tenant_status"),
            (dashboard(true), "tasks_by_tenant_status"),
            (thread(false), "tasks_by_thread"),
            (thread(true), "tasks_by_thread"),
        ];
        for (query, index) in cases {
            let sql = query.list_statement(&DIALECT);
            let mut explain =
                sqlx::query_as(sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}")));
            for value in query.list_parameters() {
                explain = explain.bind(value);
            }
            let rows: Vec<(i64, i64, i64, String)> =
                explain.bind(11_i64).fetch_all(&mut conn).await.unwrap();
            let plan: Vec<&str> = rows.iter().map(|row| row.3.as_str()).collect();
            assert!(
                plan.iter().all(|step| !step.contains("TEMP B-TREE"))
                    && plan
                        .iter()
                        .any(|step| step.starts_with("SEARCH tasks USING INDEX")
                            && step.contains(&format!("{index} "))),
                "{sql} does not search {index}: {plan:#?}"
            );
        }
    }
}
