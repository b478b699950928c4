//! The persistent store: tasks, the step journal and task events.
//!
//! One interface, [`Store`], with an implementation per engine. The store
//! knows nothing of HTTP or of plugins: it keeps JSON documents and enforces
//! the lease-and-fence rules that make a run durable.
//!
//! Every write a worker makes carries a [`Fence`] (task id, attempt, worker).
//! A write whose fence no longer matches the task's current claim fails with
//! [`StoreError::Fenced`] and changes nothing.

pub mod approvals;
/// The claim's condition on a queued task (the row named `tasks`) that
/// makes a thread's tasks run one after the other: a task without a thread
/// passes at once (one test of a column, the hot path's whole cost); a
/// thread's task passes only while no other task of its thread is running
/// or waiting for approval and none older is queued: only the oldest unfinished task of a thread is
/// ever claimable. Both engines spell it alike. It reads the thread's
/// queued and running tasks only (`tasks_thread_unfinished`, whose condition
/// it repeats word for word: SQLite uses a partial index only for a query
/// that says what its condition says). Why this holds
/// with several hosts claiming at once: docs/architecture.md, "Threads".
macro_rules! thread_is_free {
    () => {
        "(tasks.thread IS NULL OR NOT EXISTS (
             SELECT 1 FROM tasks AS earlier
              WHERE earlier.tenant = tasks.tenant AND earlier.thread = tasks.thread
                AND (earlier.status = 'queued' OR earlier.status = 'running'
                     OR earlier.status = 'waiting_approval')
                AND earlier.id <> tasks.id
                AND (earlier.status <> 'queued' OR earlier.id < tasks.id)))"
    };
}

pub mod memories;
mod metered;
mod postgres;
pub mod schedules;
mod sqlite;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use approvals::{ApprovalRecord, ApprovalRequest, ApprovalStatus, DecideOutcome, Decision};
pub use memories::MemoryCall;
pub use metered::Metered;
pub use postgres::PgStore;
pub use schedules::{
    FireRules, Fired, NewSchedule, SchedulePage, ScheduleQuery, ScheduleRecord, ScheduledRun,
    TaskTemplate,
};
pub use sqlite::SqliteStore;

pub use crate::budgets::{PeriodUsage, TaskBudget, TenantCharge};
pub use crate::errors::ErrorInfo;
use crate::memory::{MemoryConfig, MemoryQuery, MemoryRecord, MemoryReply, NewMemory};
use crate::protocol::{Image, ResponseFormat, ToolCall, Usage};

/// Milliseconds since the Unix epoch: the store's one clock unit.
pub type Millis = i64;

pub fn now_millis() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or_default()
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("task {0} not found")]
    NotFound(String),
    /// The worker's claim on the task was superseded; nothing was written.
    #[error("the claim on task {task_id} (attempt {attempt}) is no longer held")]
    Fenced { task_id: String, attempt: i64 },
    #[error("the stored {what} is not valid JSON: {source}")]
    Corrupt {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("database error: {0}")]
    Database(sqlx::Error),
    /// From the SQLite writer, which drives SQLite directly (`sqlite/writer.rs`).
    #[error("database error: {0}")]
    Sqlite(rusqlite::Error),
    /// The database has no room left (its disk, or a size limit); nothing
    /// was written. Reads still work, and writes once room is made.
    #[error("the database is full: {0}")]
    Full(String),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("the store's writer has stopped")]
    WriterGone,
    /// A memory would take its tenant past a `[memory]` cap; nothing was
    /// written.
    #[error("{0}")]
    MemoryFull(String),
    #[error("{0}")]
    Config(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// SQLite's `SQLITE_FULL`, as sqlx reports a database error's code.
const SQLITE_FULL: &str = "13";
/// Postgres's `disk_full` SQLSTATE.
const PG_DISK_FULL: &str = "53100";

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        let full = error
            .as_database_error()
            .and_then(|e| e.code())
            .is_some_and(|code| code == SQLITE_FULL || code == PG_DISK_FULL);
        if full {
            Self::Full(error.to_string())
        } else {
            Self::Database(error)
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> Self {
        match error.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull) => Self::Full(error.to_string()),
            _ => Self::Sqlite(error),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    /// Waiting for answers to tool calls that need approval; holds no
    /// worker, lease or plugin instance.
    WaitingApproval,
}

impl TaskStatus {
    pub const ALL: [TaskStatus; 6] = [
        Self::Queued,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
        Self::WaitingApproval,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::WaitingApproval => "waiting_approval",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    Llm,
    Tool,
}

impl StepKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Llm => "llm",
            Self::Tool => "tool",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "llm" => Some(Self::Llm),
            "tool" => Some(Self::Tool),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    Running,
    Succeeded,
    Failed,
}

impl StepStatus {
    /// How a step whose effect gave `output` ended.
    pub fn of(output: &Result<Value, ErrorInfo>) -> Self {
        match output {
            Ok(_) => Self::Succeeded,
            Err(_) => Self::Failed,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "running" => Some(Self::Running),
            "succeeded" => Some(Self::Succeeded),
            "failed" => Some(Self::Failed),
            _ => None,
        }
    }
}

/// What a client asked for, after validation and defaults.
#[derive(Debug, Clone)]
pub struct NewTask {
    /// Who owns the task; `default` when authentication is off.
    pub tenant: String,
    /// The same key from the same tenant names the same task.
    pub idempotency_key: Option<String>,
    /// Higher runs first.
    pub priority: i32,
    /// Not before this time.
    pub run_at: Option<Millis>,
    /// Fails with `deadline_exceeded` if not finished by this time.
    pub deadline_at: Option<Millis>,
    pub goal: String,
    pub planner: String,
    pub llm: String,
    pub model: Option<String>,
    pub tools: Vec<String>,
    /// Options for the planner and the LLM adapter: `{"planner": {...}, "llm": {...}}`.
    pub options: Value,
    pub max_steps: u32,
    /// Retries of steps that fail with a transient error, over the task.
    pub max_retries: u32,
    pub timeout: Duration,
    /// The W3C `traceparent` of the span that submitted the task, when
    /// traces are on: every run of the task continues that trace.
    pub trace_parent: Option<String>,
    /// The schedule and tick this task is a run of; `None` for a task
    /// submitted directly.
    pub schedule: Option<ScheduledRun>,
    /// The task's own token and cost caps.
    pub budget: TaskBudget,
    /// The conversation thread the task continues, if any: a client-chosen
    /// id, scoped to the tenant (see docs/architecture.md, "Threads").
    pub thread: Option<String>,
    /// The memory namespace the task's plugins remember in; `None` is
    /// [`crate::memory::DEFAULT_NAMESPACE`].
    pub memory_namespace: Option<String>,
    /// The JSON Schema the task's answer must match, if it asks for
    /// structured output (validated at submission).
    pub response_format: Option<ResponseFormat>,
    /// A call task's one tool call: the task makes it, with no planner or
    /// LLM (`planner` and `llm` are empty), and ends with its outcome.
    pub call: Option<ToolCall>,
    /// Images that go with the goal (checked at submission; see
    /// [`crate::images`]).
    pub images: Vec<Image>,
}

impl NewTask {
    /// The task as the store holds it right after inserting it under `id`
    /// at `created_at`: what reading the row back would give, without the
    /// read.
    pub fn into_queued_record(self, id: String, created_at: Millis) -> TaskRecord {
        let (schedule_id, scheduled_for) = match self.schedule {
            Some(run) => (Some(run.schedule_id), Some(run.tick)),
            None => (None, None),
        };
        TaskRecord {
            id,
            tenant: self.tenant,
            idempotency_key: self.idempotency_key,
            priority: self.priority,
            run_at: self.run_at,
            deadline_at: self.deadline_at,
            status: TaskStatus::Queued,
            goal: self.goal,
            planner: self.planner,
            llm: self.llm,
            model: self.model,
            tools: self.tools,
            options: self.options,
            max_steps: self.max_steps,
            max_retries: self.max_retries,
            timeout_ms: self.timeout.as_millis() as i64,
            result: None,
            error: None,
            attempt: 0,
            cancel_requested: false,
            usage: Usage::default(),
            cost_nanos: Some(0),
            budget: self.budget,
            created_at,
            started_at: None,
            finished_at: None,
            trace_parent: self.trace_parent,
            schedule_id,
            scheduled_for,
            thread: self.thread,
            memory_namespace: self.memory_namespace,
            response_format: self.response_format,
            call: self.call,
            images: self.images,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskRecord {
    pub id: String,
    pub tenant: String,
    pub idempotency_key: Option<String>,
    pub priority: i32,
    pub run_at: Option<Millis>,
    pub deadline_at: Option<Millis>,
    pub status: TaskStatus,
    pub goal: String,
    pub planner: String,
    pub llm: String,
    pub model: Option<String>,
    pub tools: Vec<String>,
    pub options: Value,
    pub max_steps: u32,
    pub max_retries: u32,
    pub timeout_ms: i64,
    pub result: Option<String>,
    pub error: Option<ErrorInfo>,
    /// How many times the task has been claimed; the fencing token.
    pub attempt: i64,
    pub cancel_requested: bool,
    pub usage: Usage,
    /// What the usage cost, in nano-dollars; `None` when some of it was of
    /// a model with no price.
    pub cost_nanos: Option<i64>,
    pub budget: TaskBudget,
    pub created_at: Millis,
    pub started_at: Option<Millis>,
    pub finished_at: Option<Millis>,
    /// See [`NewTask::trace_parent`].
    pub trace_parent: Option<String>,
    /// The schedule that created it, if one did (the id stays after the
    /// schedule is deleted).
    pub schedule_id: Option<String>,
    /// The tick of its schedule it is the run of.
    pub scheduled_for: Option<Millis>,
    /// See [`NewTask::thread`].
    pub thread: Option<String>,
    /// See [`NewTask::memory_namespace`].
    pub memory_namespace: Option<String>,
    /// See [`NewTask::response_format`].
    pub response_format: Option<ResponseFormat>,
    /// See [`NewTask::call`].
    pub call: Option<ToolCall>,
    /// See [`NewTask::images`].
    pub images: Vec<Image>,
}

/// A finished step of an earlier task of a thread, as the journal holds it
/// ([`Store::history_steps`]).
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryStep {
    pub task_id: String,
    pub seq: u32,
    pub kind: StepKind,
    /// A tool step's call (its input), as JSON text; `None` for LLM steps.
    pub call: Option<String>,
    /// The step's output as JSON text, if it succeeded.
    pub output: Option<String>,
    pub error: Option<ErrorInfo>,
}

impl HistoryStep {
    /// What the step weighs against a history's byte budget: the journal
    /// text a planner is given of it.
    pub fn journal_bytes(&self) -> usize {
        self.call.as_ref().map_or(0, String::len)
            + self.output.as_ref().map_or(0, String::len)
            + self
                .error
                .as_ref()
                .map_or(0, |e| e.code.len() + e.message.len())
    }
}

/// One journaled step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepRecord {
    pub seq: u32,
    pub kind: StepKind,
    pub plugin: String,
    pub status: StepStatus,
    pub input: Value,
    pub output: Option<Value>,
    pub error: Option<ErrorInfo>,
    pub usage: Option<Usage>,
    /// The attempt (claim) under which this step last ran.
    pub attempt: i64,
    pub started_at: Millis,
    pub finished_at: Option<Millis>,
    pub versions: StepVersions,
}

/// The plugin versions behind a step, by SHA-256 of their components: the
/// plugin that ran it and the planner that chose it. `None` for a tool of
/// an external source (an MCP server), and for steps journaled before
/// versions were recorded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StepVersions {
    pub plugin_sha256: Option<String>,
    pub planner_sha256: Option<String>,
}

/// A worker's proof of its claim on a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub task_id: String,
    pub attempt: i64,
    pub worker: String,
}

/// A step about to run, journaled before its effect happens.
#[derive(Debug, Clone)]
pub struct StepStart {
    pub seq: u32,
    pub kind: StepKind,
    pub plugin: String,
    pub input: Value,
    pub versions: StepVersions,
}

impl StepStart {
    /// The step's record once journaled as running under claim `attempt`.
    fn into_record(self, attempt: i64, started_at: Millis) -> StepRecord {
        StepRecord {
            seq: self.seq,
            kind: self.kind,
            plugin: self.plugin,
            status: StepStatus::Running,
            input: self.input,
            output: None,
            error: None,
            usage: None,
            attempt,
            started_at,
            finished_at: None,
            versions: self.versions,
        }
    }
}

/// How a step ended.
#[derive(Debug, Clone)]
pub struct StepEnd {
    /// The step as it was journaled when it started: the store writes only
    /// what changed and reads nothing back. (Its input is not written
    /// again, so the run may have dropped it: it keeps no LLM step's.)
    pub started: StepRecord,
    pub output: Result<Value, ErrorInfo>,
    pub usage: Option<Usage>,
    /// What `usage` cost, in nano-dollars; `None` when the model has no
    /// price (the task's cost becomes unknown).
    pub cost_nanos: Option<i64>,
    /// The tenant's period the usage is added to, when the tenant has a
    /// budget; `None` costs no write.
    pub charge: Option<TenantCharge>,
    /// When the step ended, which can be a little before its end is
    /// written (`Store::finish_step_then_start`).
    pub finished_at: Millis,
}

impl StepEnd {
    /// The finished step's record, as journaled at `finished_at`.
    fn into_record(self, finished_at: Millis) -> StepRecord {
        let status = StepStatus::of(&self.output);
        let (output, error) = match self.output {
            Ok(output) => (Some(output), None),
            Err(error) => (None, Some(error)),
        };
        StepRecord {
            status,
            output,
            error,
            usage: self.usage,
            finished_at: Some(finished_at),
            ..self.started
        }
    }
}

/// How a task ended.
#[derive(Debug, Clone)]
pub enum TaskEnd {
    Succeeded {
        result: String,
    },
    Failed {
        error: ErrorInfo,
    },
    /// The planner answered, and the answer was refused (it does not match
    /// the task's response format): the task failed with `error`, and the
    /// answer is kept as its result, so nothing the model said is lost.
    AnswerRefused {
        answer: String,
        error: ErrorInfo,
    },
    Cancelled,
}

impl TaskEnd {
    pub fn status(&self) -> TaskStatus {
        match self {
            Self::Succeeded { .. } => TaskStatus::Succeeded,
            Self::Failed { .. } | Self::AnswerRefused { .. } => TaskStatus::Failed,
            Self::Cancelled => TaskStatus::Cancelled,
        }
    }
}

/// A persisted event in a task's history, numbered from 1 per task.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventRecord {
    pub task_id: String,
    pub seq: i64,
    pub kind: String,
    pub data: Value,
    pub at: Millis,
}

impl EventRecord {
    /// `task.finished` is always a task's last event.
    pub fn is_final(&self) -> bool {
        self.kind == event_kind::TASK_FINISHED
    }
}

/// The kinds of task event. Stable: clients match on them.
pub mod event_kind {
    pub const TASK_QUEUED: &str = "task.queued";
    pub const TASK_STARTED: &str = "task.started";
    pub const TASK_CANCEL_REQUESTED: &str = "task.cancel_requested";
    pub const STEP_STARTED: &str = "step.started";
    pub const STEP_FINISHED: &str = "step.finished";
    pub const TASK_FINISHED: &str = "task.finished";
    /// The task waits for answers to the calls it names.
    pub const TASK_WAITING_APPROVAL: &str = "task.waiting_approval";
    /// A call that needed approval was answered (or timed out).
    pub const APPROVAL_DECIDED: &str = "approval.decided";
    /// Streamed LLM text, coalesced (`[events]`): `{step, text}`,
    /// and `truncated: true` on the last one a step journals when its text
    /// ran past `delta_bytes_per_step`.
    pub const LLM_DELTA: &str = "llm.delta";

    /// Every kind, in the order a task's events come (the API spec lists them).
    pub const ALL: &[&str] = &[
        TASK_QUEUED,
        TASK_STARTED,
        STEP_STARTED,
        LLM_DELTA,
        STEP_FINISHED,
        TASK_WAITING_APPROVAL,
        APPROVAL_DECIDED,
        TASK_CANCEL_REQUESTED,
        TASK_FINISHED,
    ];
}

/// A page of the task list, newest first.
#[derive(Debug, Clone, Default)]
pub struct TaskQuery {
    /// Only this tenant's tasks, if set.
    pub tenant: Option<String>,
    pub status: Option<TaskStatus>,
    /// Only tasks that use this plugin: as their planner, their LLM
    /// adapter, or one of their tools.
    pub plugin: Option<String>,
    /// Only tasks whose goal contains this text, ignoring case.
    pub goal_contains: Option<String>,
    /// Only the runs of this schedule.
    pub schedule: Option<String>,
    /// Only the tasks of this thread (with `tenant`, the walk of
    /// `tasks_by_thread`).
    pub thread: Option<String>,
    /// Return tasks older than this task id (ids sort by creation time).
    pub before: Option<String>,
    pub limit: u32,
}

/// How an engine writes the parts of [`TaskQuery::list_statement`] that
/// SQL does not spell alike everywhere.
pub struct SqlDialect {
    /// The n-th parameter (`?n`, `$n`).
    pub placeholder: fn(usize) -> String,
    /// A condition: the task's `tools` (a JSON array) holds the value of
    /// the given parameter.
    pub tools_hold: fn(&str) -> String,
    /// A condition: `goal` holds the value of the given parameter, ignoring
    /// case.
    pub goal_holds: fn(&str) -> String,
    /// Written after `FROM tasks` in [`TaskStats::finished_by_minute`]:
    /// SQLite's planner needs telling to walk the partial index of finished
    /// tasks rather than the tenant index.
    pub finished_tasks_index: &'static str,
}

impl TaskQuery {
    /// The page size asked for, within what one page may hold.
    pub fn page_size(&self) -> u32 {
        self.limit.clamp(1, 500)
    }

    /// The statement listing this page, written with only the filters set,
    /// so that each combination walks its own index (`tasks_by_status`,
    /// `tasks_by_tenant`, `tasks_by_tenant_status`, or the primary key) and
    /// stops after one page. One statement with `(? IS NULL OR ...)` for
    /// every filter is planned once for all of them: it walks every task
    /// newest first and filters, which reads the whole table whenever fewer
    /// than a page match (the queued tasks among a million finished ones).
    ///
    /// The plugin and goal filters have no index (a goal is free text, a
    /// plugin may be any of three columns): they are checked on the rows
    /// the tenant and status index walks, which still stops after a page.
    ///
    /// The values to bind, in order, are [`TaskQuery::list_parameters`]
    /// and then one more than the page size.
    pub fn list_statement(&self, dialect: &SqlDialect) -> String {
        let mut conditions = Vec::new();
        let mut n = 0;
        let mut next = || {
            n += 1;
            (dialect.placeholder)(n)
        };
        if self.tenant.is_some() {
            conditions.push(format!("tenant = {}", next()));
        }
        if self.status.is_some() {
            conditions.push(format!("status = {}", next()));
        }
        if self.plugin.is_some() {
            // One parameter, named three times.
            let plugin = next();
            conditions.push(format!(
                "(planner = {plugin} OR llm = {plugin} OR {})",
                (dialect.tools_hold)(&plugin)
            ));
        }
        if self.goal_contains.is_some() {
            conditions.push((dialect.goal_holds)(&next()));
        }
        if self.schedule.is_some() {
            conditions.push(format!("schedule_id = {}", next()));
        }
        if self.thread.is_some() {
            conditions.push(format!("thread = {}", next()));
        }
        if self.before.is_some() {
            conditions.push(format!("id < {}", next()));
        }
        let filter = if conditions.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conditions.join(" AND "))
        };
        format!(
            "SELECT * FROM tasks{filter} ORDER BY id DESC LIMIT {}",
            next()
        )
    }

    /// The values of the filters [`TaskQuery::list_statement`] wrote, in
    /// its order.
    pub fn list_parameters(&self) -> impl Iterator<Item = &str> {
        [
            self.tenant.as_deref(),
            self.status.map(TaskStatus::as_str),
            self.plugin.as_deref(),
            self.goal_contains.as_deref(),
            self.schedule.as_deref(),
            self.thread.as_deref(),
            self.before.as_deref(),
        ]
        .into_iter()
        .flatten()
    }

    /// Turns the rows of one more than a page into the page and its cursor.
    pub fn page(&self, mut tasks: Vec<TaskRecord>) -> TaskPage {
        let next_cursor = cut_page(&mut tasks, self.page_size(), |task| &task.id);
        TaskPage { tasks, next_cursor }
    }
}

/// Cuts the rows of one more than a page (newest first, by id) to the page,
/// and returns the cursor of the next one: the last id kept, or `None` when
/// there is nothing more.
pub(crate) fn cut_page<T>(rows: &mut Vec<T>, size: u32, id: impl Fn(&T) -> &str) -> Option<String> {
    let size = size as usize;
    if rows.len() <= size {
        return None;
    }
    rows.truncate(size);
    rows.last().map(|row| id(row).to_owned())
}

#[derive(Debug, Clone)]
pub struct TaskPage {
    pub tasks: Vec<TaskRecord>,
    /// Pass as `before` to get the next page; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// How far [`Store::task_stats`] counts the tasks in one status: a count
/// costs no more than this however many tasks a tenant has.
pub const STATS_COUNT_LIMIT: u64 = 10_000;

/// A tenant's tasks at a glance: what the dashboard's overview shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskStats {
    /// The tenant's tasks in each status (every status, in
    /// [`TaskStatus::ALL`]'s order), each counted no further than the limit
    /// asked for.
    pub counts: Vec<(TaskStatus, u64)>,
    /// The `run_at` (or, without one, the creation time) of the tenant's
    /// queued task that has waited longest among those that may run now.
    pub oldest_queued_since: Option<Millis>,
    /// The tasks that finished since the time asked for, by the minute
    /// they finished in (its first millisecond) and how they ended, oldest
    /// minute first; a minute and status with none is left out.
    pub finished_by_minute: Vec<(Millis, TaskStatus, u64)>,
}

/// The first millisecond of the minute `at` falls in.
pub fn minute_of(at: Millis) -> Millis {
    at - at.rem_euclid(60_000)
}

impl TaskStats {
    /// The tenant's tasks in one status, counted no further than a limit,
    /// so the count walks at most that many index entries. Parameters:
    /// tenant, status, limit.
    pub fn count_in_status(dialect: &SqlDialect) -> String {
        let p = dialect.placeholder;
        format!(
            "SELECT COUNT(*) FROM (SELECT 1 FROM tasks WHERE tenant = {} AND status = {} LIMIT {}) AS counted",
            p(1),
            p(2),
            p(3)
        )
    }

    /// When the queued task that has waited longest among those that may
    /// run now became runnable. Parameters: tenant, now.
    pub fn oldest_queued(dialect: &SqlDialect) -> String {
        let p = dialect.placeholder;
        format!(
            "SELECT MIN(COALESCE(run_at, created_at)) FROM tasks
              WHERE tenant = {} AND status = 'queued' AND (run_at IS NULL OR run_at <= {})",
            p(1),
            p(2)
        )
    }

    /// Rows of (minute, status, count) of the tasks that finished since a
    /// time, read from the partial index of finished tasks only.
    /// Parameters: tenant, since.
    pub fn finished_by_minute(dialect: &SqlDialect) -> String {
        let p = dialect.placeholder;
        format!(
            "SELECT finished_at - finished_at % 60000 AS minute, status, COUNT(*)
               FROM tasks{}
              WHERE tenant = {} AND finished_at IS NOT NULL AND finished_at >= {}
              GROUP BY minute, status",
            dialect.finished_tasks_index,
            p(1),
            p(2)
        )
    }

    /// The stats from what an engine read: `finished` rows are (minute,
    /// status, count) in any order.
    fn from_rows(
        counts: Vec<(TaskStatus, u64)>,
        oldest_queued_since: Option<Millis>,
        finished: Vec<(i64, String, i64)>,
    ) -> Self {
        let mut finished_by_minute: Vec<(Millis, TaskStatus, u64)> = finished
            .into_iter()
            .filter_map(|(minute, status, count)| {
                Some((minute, TaskStatus::parse(&status)?, count as u64))
            })
            .collect();
        finished_by_minute.sort_by_key(|&(minute, status, _)| (minute, status.as_str()));
        Self {
            counts,
            oldest_queued_since,
            finished_by_minute,
        }
    }
}

/// The outcome of a cancel request.
#[derive(Debug, Clone)]
pub enum CancelOutcome {
    /// The task was queued and is now cancelled.
    Cancelled(TaskRecord, EventRecord),
    /// The task is running; its worker stops at the next step boundary.
    Requested(TaskRecord, EventRecord),
    /// Already finished: nothing to do.
    AlreadyFinished(TaskRecord),
}

/// A claimed task, with the journal to resume from.
#[derive(Debug, Clone)]
pub struct Claim {
    pub task: TaskRecord,
    pub fence: Fence,
    pub steps: Vec<StepRecord>,
    pub event: EventRecord,
}

/// What [`Store::delete_thread`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadDeletion {
    /// The thread's tasks (this many; none when the tenant has no such
    /// thread) are deleted, with their journals and events.
    Deleted(u64),
    /// This many of the thread's tasks are queued or running: nothing was
    /// deleted.
    Active(u64),
}

/// The state of a claim as seen by a fenced write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseState {
    pub cancel_requested: bool,
}

/// What renewing one lease found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// The claim still holds, for another lease.
    Renewed { cancel_requested: bool },
    /// The task is no longer claimed under this fence: another worker took
    /// it over after the lease expired, or it ended. Nothing was written.
    Lost,
}

/// The queue as [`Store::queue_gauges`] sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueGauges {
    /// Tasks queued or running, by tenant and status; a pair with none is
    /// left out.
    pub active: Vec<(String, TaskStatus, u64)>,
    /// The `run_at` (or, without one, the creation time) of the queued task
    /// that has waited longest among those that may run now.
    pub oldest_runnable_since: Option<Millis>,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// A short name for logs: `sqlite` or `postgres`.
    fn engine(&self) -> &'static str;

    /// Creates a task, or, when the tenant already has a task with the same
    /// idempotency key, returns that one (and no event).
    async fn create_task(&self, task: NewTask) -> Result<(TaskRecord, Option<EventRecord>)>;
    /// Deletes tasks that finished before `before`, with their journals and
    /// events; returns how many.
    async fn prune_finished(&self, before: Millis) -> Result<u64>;
    /// How many of a tenant's tasks are queued or running.
    async fn count_active(&self, tenant: &str) -> Result<u64>;
    /// How many tasks are queued, of one tenant or of all, counting no
    /// further than `at_most`: a cap only needs to know whether it is
    /// reached, and the count then costs no more than the cap however long
    /// the queue. Index-backed: it reads queued rows only, however many tasks
    /// are running or finished.
    async fn count_queued(&self, tenant: Option<&str>, at_most: u64) -> Result<u64>;
    /// What the queue holds now, for metrics: queued and running tasks by
    /// tenant and status, and when the oldest queued task that may run at
    /// `now` became runnable. Reads the partial indexes of queued and
    /// running tasks only.
    async fn queue_gauges(&self, now: Millis) -> Result<QueueGauges>;
    /// A tenant's tasks at a glance ([`TaskStats`]): counts by status, each
    /// stopping at `count_limit`, the oldest runnable queued task at `now`,
    /// and what finished from `since` on, by the minute. Bounded: each
    /// count reads at most `count_limit` index entries, the queue reads the
    /// tenant's queued tasks (partial index), and the series reads only the
    /// tasks that finished since `since` (`tasks_finished_by_tenant`).
    async fn task_stats(
        &self,
        tenant: &str,
        since: Millis,
        now: Millis,
        count_limit: u64,
    ) -> Result<TaskStats>;
    async fn get_task(&self, id: &str) -> Result<Option<TaskRecord>>;
    async fn list_tasks(&self, query: &TaskQuery) -> Result<TaskPage>;
    async fn steps(&self, task_id: &str) -> Result<Vec<StepRecord>>;
    /// The finished steps of `task_ids` as a thread's history needs them,
    /// in one read: by task, oldest first, with their JSON left as the text
    /// the journal holds, so that a caller parses only what it keeps. An
    /// LLM step's request is not read at all.
    async fn history_steps(&self, task_ids: &[String]) -> Result<Vec<HistoryStep>>;
    /// Events of a task with `seq > after`, oldest first.
    async fn events_after(&self, task_id: &str, after: i64) -> Result<Vec<EventRecord>>;
    async fn request_cancel(&self, id: &str) -> Result<CancelOutcome>;
    /// Deletes the tasks of a tenant's thread with their journals and
    /// events, in one transaction; or, when any of them is queued or
    /// running, nothing.
    async fn delete_thread(&self, tenant: &str, thread: &str) -> Result<ThreadDeletion>;
    /// What `tenant` spent in `period` (a key such as `month:2026-12`), as
    /// the LLM steps journaled with a [`TenantCharge`] added it up; zero
    /// when nothing was.
    async fn period_usage(&self, tenant: &str, period: &str) -> Result<PeriodUsage>;

    /// Claims up to `max` runnable tasks for `worker`, bumping each one's
    /// attempt number, and loads their journals. Running tasks whose lease
    /// expired (their host died) come first (the longest expired, when there
    /// are more than `max`), so a dead host's work moves ahead of fresh
    /// work; then queued tasks whose `run_at` has come, by priority (higher
    /// first) and then age. The answer lists the expired ones first, then
    /// the queued ones, each by priority and age.
    async fn claim_batch(&self, worker: &str, lease: Duration, max: usize) -> Result<Vec<Claim>>;
    /// Claims the single most urgent runnable task ([`Store::claim_batch`]
    /// with a batch of one).
    async fn claim_next(&self, worker: &str, lease: Duration) -> Result<Option<Claim>> {
        Ok(self.claim_batch(worker, lease, 1).await?.into_iter().next())
    }
    /// Extends the leases of every claim in `fences` by `lease` from now, in
    /// one statement, and says for each (in the same order) whether it still
    /// holds and whether its cancellation was requested. A fence that no
    /// longer matches its task's claim is [`Renewal::Lost`] and nothing is
    /// written for it.
    async fn renew_leases(&self, fences: &[Fence], lease: Duration) -> Result<Vec<Renewal>>;
    /// Makes every lease claimable at once. Only for an engine that a single
    /// host owns exclusively (SQLite), after that host restarts.
    async fn expire_all_leases(&self) -> Result<u64>;

    async fn start_step(&self, fence: &Fence, step: StepStart)
    -> Result<(StepRecord, EventRecord)>;
    async fn finish_step(&self, fence: &Fence, end: StepEnd) -> Result<(StepRecord, EventRecord)>;
    async fn finish_task(&self, fence: &Fence, end: TaskEnd) -> Result<EventRecord>;
    /// Appends an event to a running task's journal, under its fence: what
    /// happens within a step, such as streamed LLM text (`llm.delta`).
    async fn append_event(
        &self,
        fence: &Fence,
        kind: &'static str,
        data: Value,
    ) -> Result<EventRecord>;

    /// Journals a step's end and the start of the step the planner chose
    /// from it, in one write (one transaction, one fence check): the agent
    /// loop holds a finished step's end back while its planner decides, and
    /// writes it with what comes next. Nothing the step did is lost by the
    /// wait: until the pair commits the step is journaled as running, and a
    /// claim that dies meanwhile leaves it to run again as in flight, under
    /// the same number, as if the claim had died just before its end.
    async fn finish_step_then_start(
        &self,
        fence: &Fence,
        end: StepEnd,
        next: StepStart,
    ) -> Result<[(StepRecord, EventRecord); 2]>;

    /// Journals a step's end and the task's end in one write, as
    /// [`Store::finish_step_then_start`] does for a step that follows.
    async fn finish_step_then_task(
        &self,
        fence: &Fence,
        end: StepEnd,
        task_end: TaskEnd,
    ) -> Result<((StepRecord, EventRecord), EventRecord)>;

    /// Journals the calls in `requests` as waiting for approval and sets
    /// the task `waiting_approval`, releasing the claim (no lease, no
    /// worker), in one fenced write; answers `task.waiting_approval`.
    async fn await_approval(
        &self,
        fence: &Fence,
        requests: Vec<ApprovalRequest>,
    ) -> Result<EventRecord>;
    /// Every call of the task that needed approval, by step.
    async fn approvals(&self, task_id: &str) -> Result<Vec<ApprovalRecord>>;
    /// Answers a pending call, in one transaction: the conditional update
    /// (only a pending call changes, so one answer of any number wins), its
    /// `approval.decided` event, and, when nothing of the task is pending
    /// any more, its return to the queue.
    async fn decide_approval(
        &self,
        task_id: &str,
        call_id: &str,
        decision: &Decision,
    ) -> Result<DecideOutcome>;
    /// Rejects pending calls whose time ran out (`now`), requeueing the
    /// tasks left with nothing pending; answers the events written.
    async fn expire_approvals(&self, now: Millis) -> Result<Vec<EventRecord>>;

    /// Creates a schedule.
    async fn create_schedule(&self, schedule: NewSchedule) -> Result<ScheduleRecord>;
    async fn get_schedule(&self, id: &str) -> Result<Option<ScheduleRecord>>;
    /// A tenant's schedules, newest first, a page at a time.
    async fn list_schedules(&self, query: &ScheduleQuery) -> Result<SchedulePage>;
    /// Pauses a schedule (`paused`), or resumes it due at `next_run_at`
    /// (`None` keeps the due time it had). `None` when there is no such
    /// schedule.
    async fn set_schedule_paused(
        &self,
        id: &str,
        paused: bool,
        next_run_at: Option<Millis>,
    ) -> Result<Option<ScheduleRecord>>;
    /// Deletes a schedule (its runs stay); whether there was one.
    async fn delete_schedule(&self, id: &str) -> Result<bool>;
    /// When the earliest unpaused schedule is due: one read of the
    /// `schedules_due` index, all the schedule loop costs while nothing is
    /// due.
    async fn earliest_schedule_due(&self) -> Result<Option<Millis>>;
    /// In one transaction: takes up to `rules.max` unpaused schedules due
    /// by `rules.now` (on Postgres, rows no other host has locked: `FOR
    /// UPDATE SKIP LOCKED`), creates the run each one's [`firing`] asks for
    /// through the ordinary task insert (unless the queue is at a cap: the
    /// schedule then stays due, marked waiting for room), and moves each one
    /// to its next due time. The unique index on (schedule, tick) refuses a
    /// second run of a tick, whatever happens.
    ///
    /// [`firing`]: ScheduleRecord::firing
    async fn fire_due_schedules(&self, rules: &FireRules) -> Result<Fired>;

    /// Performs a plugin's memory call once: the answer is journaled under
    /// the call's key in the same transaction as its effect, and a call
    /// journaled there before (the same call of the same step, run again)
    /// gets its journaled answer instead of acting again. Fenced like every
    /// write of a run; `MemoryFull` when a cap refuses it.
    async fn memory_call(&self, fence: &Fence, call: &MemoryCall) -> Result<MemoryReply>;
    /// Stores a memory a client gave (not journaled: the request is the
    /// effect); `MemoryFull` when a cap refuses it.
    async fn create_memory(&self, memory: NewMemory, config: &MemoryConfig)
    -> Result<MemoryRecord>;
    async fn get_memory(&self, tenant: &str, id: &str) -> Result<Option<MemoryRecord>>;
    /// A tenant's memories: those matching any of the query's terms, best
    /// first, or without terms the newest first (before `before`, an id).
    async fn search_memories(&self, query: &MemoryQuery) -> Result<Vec<MemoryRecord>>;
    /// Deletes a tenant's memory; whether it existed.
    async fn delete_memory(&self, tenant: &str, id: &str) -> Result<bool>;

    /// Signalled when other hosts sharing the store may have made work this
    /// host was not told of (a task submitted to another host). Idle workers
    /// wait on it beside their own wake-ups and the poll interval, which
    /// still finds expired leases. `None`, the default, for an engine that
    /// one host owns alone.
    fn wakeups(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        None
    }

    /// Ids of tasks whose cancellation another host accepted, so the host
    /// running one stops it at its next step boundary rather than at its
    /// next lease renewal. `None`, the default, for an engine one host owns.
    fn cancellations(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        None
    }
}

/// Puts the claims of a batch in claim order: the tasks whose leases had
/// expired first, then the rest by priority (higher first) and age (ids sort
/// by creation time). `RETURNING` gives rows in no particular order.
fn in_claim_order(mut expired: Vec<TaskRecord>, mut queued: Vec<TaskRecord>) -> Vec<TaskRecord> {
    let urgency =
        |a: &TaskRecord, b: &TaskRecord| b.priority.cmp(&a.priority).then(a.id.cmp(&b.id));
    expired.sort_by(urgency);
    queued.sort_by(urgency);
    expired.extend(queued);
    expired
}

/// The answer to a batch renewal: for each fence, in order, whether one of
/// the `renewed` rows (task id, attempt, cancel requested) is its claim.
fn renewals(fences: &[Fence], renewed: Vec<(String, i64, bool)>) -> Vec<Renewal> {
    let renewed: std::collections::HashMap<(String, i64), bool> = renewed
        .into_iter()
        .map(|(id, attempt, cancel_requested)| ((id, attempt), cancel_requested))
        .collect();
    fences
        .iter()
        .map(
            |fence| match renewed.get(&(fence.task_id.clone(), fence.attempt)) {
                Some(&cancel_requested) => Renewal::Renewed { cancel_requested },
                None => Renewal::Lost,
            },
        )
        .collect()
}

/// Opens the store a database URL names, creating and migrating it.
pub async fn open(database_url: &str) -> Result<std::sync::Arc<dyn Store>> {
    if database_url.starts_with("sqlite:") {
        Ok(std::sync::Arc::new(SqliteStore::open(database_url).await?))
    } else if database_url.starts_with("postgres://") || database_url.starts_with("postgresql://") {
        Ok(std::sync::Arc::new(PgStore::open(database_url).await?))
    } else {
        Err(StoreError::Config(format!(
            "unsupported database URL {database_url:?}: use sqlite://PATH or postgres://USER@HOST/DATABASE"
        )))
    }
}

/// Step inputs and outputs whose JSON is longer than this are stored out of
/// line (in `payloads`, by content hash) and left out of step events.
pub const INLINE_PAYLOAD_BYTES: usize = 16 * 1024;

/// The SHA-256 a payload is stored under, if it is too big to keep inline.
fn out_of_line_key(text: &str) -> Option<String> {
    use sha2::Digest;
    (text.len() > INLINE_PAYLOAD_BYTES).then(|| hex::encode(sha2::Sha256::digest(text.as_bytes())))
}

/// A step as its events carry it. `step.started` carries the input and
/// `step.finished` how the step ended (output or error, usage): each payload
/// once, never both in one event. A payload stored out of line is replaced
/// by a note of its size (`GET /v1/tasks/{id}` has it whole);
/// `payload_bytes` is the length of its JSON, which the caller has encoded.
fn step_event_data(step: &StepRecord, payload_bytes: usize) -> Value {
    let mut data = step_event_base(step);
    if step.status == StepStatus::Running {
        data["input"] = payload_or_note(&step.input, payload_bytes);
    } else {
        data["output"] = match &step.output {
            Some(output) => payload_or_note(output, payload_bytes),
            None => Value::Null,
        };
        data["error"] = serde_json::json!(step.error);
        data["usage"] = serde_json::json!(step.usage);
        data["finished_at"] = serde_json::json!(step.finished_at);
    }
    data
}

/// The fields every step event has.
fn step_event_base(step: &StepRecord) -> Value {
    serde_json::json!({
        "seq": step.seq,
        "kind": step.kind,
        "plugin": step.plugin,
        "status": step.status,
        "attempt": step.attempt,
        "started_at": step.started_at,
    })
}

fn payload_or_note(payload: &Value, bytes: usize) -> Value {
    if bytes > INLINE_PAYLOAD_BYTES {
        serde_json::json!({"out_of_line": true, "bytes": bytes})
    } else {
        payload.clone()
    }
}

/// A `step.started` event as it is stored (as text, and as the event's
/// data): without the input. The step's own row holds it, and the input of
/// an LLM step is the whole conversation so far, which the journal would
/// otherwise write twice. [`restore_step_inputs`] puts it back when events
/// are read, and [`restore_step_input`] before one is published to a
/// subscriber.
fn step_started_event(step: &StepRecord) -> (String, Value) {
    let mut data = step_event_base(step);
    data["plugin_sha256"] = serde_json::json!(step.versions.plugin_sha256);
    data["planner_sha256"] = serde_json::json!(step.versions.planner_sha256);
    (crate::protocol::to_json_text(&data), data)
}

/// Puts each stored `step.started` event's input back, from the task's
/// steps.
fn restore_step_inputs(events: &mut [EventRecord], steps: &[StepRecord]) {
    for event in events {
        if event.kind != event_kind::STEP_STARTED || event.data.get("input").is_some() {
            continue;
        }
        let seq = event.data["seq"].as_u64();
        if let Some(step) = steps.iter().find(|s| Some(u64::from(s.seq)) == seq) {
            restore_step_input(event, step);
        }
    }
}

/// Puts the input of `step` into its `step.started` event, inline, or as a
/// note of its size when it is kept out of line.
pub fn restore_step_input(event: &mut EventRecord, step: &StepRecord) {
    let bytes = if step.input.is_null() {
        0
    } else {
        step.input.to_string().len()
    };
    event.data["input"] = payload_or_note(&step.input, bytes);
}

/// Whether any of `events` was stored without its step's input.
fn lack_step_inputs(events: &[EventRecord]) -> bool {
    events
        .iter()
        .any(|e| e.kind == event_kind::STEP_STARTED && e.data.get("input").is_none())
}

fn parse_json(text: &str, what: &'static str) -> Result<Value> {
    serde_json::from_str(text).map_err(|source| StoreError::Corrupt { what, source })
}

/// What a real SQLite database answers when it has no room left (one
/// capped with `max_page_count`, as a full disk would refuse it), as the
/// SQLite writer's driver (rusqlite) reports it.
#[cfg(test)]
pub(crate) fn full_sqlite_error() -> StoreError {
    let conn = rusqlite::Connection::open_in_memory().expect("an in-memory database");
    conn.execute_batch("CREATE TABLE t (b BLOB); PRAGMA max_page_count = 2;")
        .expect("capping the database");
    let refused = conn
        .execute("INSERT INTO t VALUES (zeroblob(100000))", [])
        .expect_err("a row larger than the cap is refused");
    StoreError::from(refused)
}

#[cfg(test)]
mod full_tests {
    use sqlx::Connection;

    use super::*;

    #[test]
    fn sqlite_out_of_room_through_rusqlite_is_full() {
        let error = full_sqlite_error();
        assert!(matches!(error, StoreError::Full(_)), "{error:?}");
    }

    /// The same refusal through sqlx (migrations and reads).
    #[tokio::test]
    async fn sqlite_out_of_room_through_sqlx_is_full() {
        let mut conn = sqlx::SqliteConnection::connect("sqlite::memory:")
            .await
            .unwrap();
        sqlx::raw_sql("CREATE TABLE t (b BLOB); PRAGMA max_page_count = 2;")
            .execute(&mut conn)
            .await
            .unwrap();
        let refused = sqlx::query("INSERT INTO t VALUES (zeroblob(100000))")
            .execute(&mut conn)
            .await
            .expect_err("a row larger than the cap is refused");
        let error = StoreError::from(refused);
        assert!(matches!(error, StoreError::Full(_)), "{error:?}");
        let other = StoreError::from(sqlx::Error::RowNotFound);
        assert!(matches!(other, StoreError::Database(_)), "{other:?}");
    }
}

/// Behaviour both engines must show, run by each engine's tests.
#[cfg(test)]
pub(crate) mod conformance {
    use super::*;

    pub fn new_task(goal: &str, priority: i32, run_at: Option<Millis>) -> NewTask {
        NewTask {
            tenant: "default".into(),
            idempotency_key: None,
            priority,
            run_at,
            deadline_at: None,
            goal: goal.to_owned(),
            planner: "react".into(),
            llm: "scripted".into(),
            model: None,
            tools: vec!["calculator".into()],
            options: serde_json::json!({}),
            max_steps: 20,
            max_retries: 0,
            timeout: Duration::from_secs(60),
            trace_parent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            schedule: None,
            budget: TaskBudget::default(),
            thread: None,
            memory_namespace: None,
            response_format: None,
            call: None,
            images: Vec::new(),
        }
    }

    /// A new task is answered as the store holds it: the record
    /// `create_task` gives (which SQLite's writer builds without reading
    /// the row back) is the one `get_task` reads, every field set.
    pub async fn a_new_task_is_answered_as_it_is_stored(store: &dyn Store) {
        let task = NewTask {
            tenant: "acme".into(),
            idempotency_key: Some("key-1".into()),
            run_at: Some(now_millis() + 60_000),
            deadline_at: Some(now_millis() + 120_000),
            model: Some("gpt-test".into()),
            tools: vec!["calculator".into(), "word-count".into()],
            options: serde_json::json!({"planner": {"max_steps": 3}, "llm": {"temperature": 0.5}}),
            schedule: Some(super::schedules::ScheduledRun {
                schedule_id: "schedule-1".into(),
                tick: 1_700_000_000_000,
            }),
            budget: TaskBudget {
                max_tokens: Some(1000),
                max_cost_nanos: Some(5_000_000),
            },
            thread: Some("thread-1".into()),
            memory_namespace: Some("notes".into()),
            response_format: Some(ResponseFormat {
                name: "answer".into(),
                schema: serde_json::json!({"type": "object"}),
                strict: true,
            }),
            call: Some(ToolCall {
                id: "call-1".into(),
                name: "calculator".into(),
                arguments: serde_json::json!({"expression": "1+1"}),
            }),
            images: vec![Image::Url {
                url: "https://example.com/a.png".into(),
            }],
            ..new_task("every field", 7, None)
        };
        let (created, event) = store.create_task(task).await.unwrap();
        assert!(event.is_some(), "a new task has its task.queued event");
        let stored = store.get_task(&created.id).await.unwrap().unwrap();
        assert_eq!(created, stored);
        let plain = store
            .create_task(new_task("plain", 0, None))
            .await
            .unwrap()
            .0;
        assert_eq!(plain, store.get_task(&plain.id).await.unwrap().unwrap());
    }

    /// A schedule in UTC ticking every second, due at `due`.
    async fn every_second(
        store: &dyn Store,
        due: Millis,
        missed_ticks: crate::schedules::MissedTicks,
    ) -> ScheduleRecord {
        let template = TaskTemplate::of(&new_task("tick", 0, None));
        store
            .create_schedule(NewSchedule {
                tenant: "default".into(),
                name: Some("every second".into()),
                cron: "* * * * * *".into(),
                timezone: "UTC".into(),
                template,
                missed_ticks,
                paused: false,
                next_run_at: Some(due),
            })
            .await
            .unwrap()
    }

    fn rules(now: Millis) -> FireRules {
        FireRules {
            now,
            max: 16,
            grace: Duration::from_secs(5),
            max_queued_tasks: 1000,
            max_queued_per_tenant: None,
        }
    }

    /// A due schedule gets one run for its tick, through the ordinary task
    /// insert (a `task.queued` event naming the schedule), and moves to its
    /// next tick; firing again before that tick creates nothing; a second
    /// run of a tick is refused by the store whatever asks for it. A full
    /// queue keeps the run waiting, and it is created once there is room.
    pub async fn a_due_schedule_gets_one_run_per_tick(store: &dyn Store) {
        use crate::schedules::MissedTicks;
        // A whole second, a little in the past.
        let t = (now_millis() / 1000 - 2) * 1000;
        let schedule = every_second(store, t, MissedTicks::Skip).await;
        assert_eq!(store.earliest_schedule_due().await.unwrap(), Some(t));

        let fired = store.fire_due_schedules(&rules(t + 100)).await.unwrap();
        assert_eq!((fired.taken, fired.waiting, fired.runs.len()), (1, 0, 1));
        let (run, event) = &fired.runs[0];
        assert_eq!(run.schedule_id.as_deref(), Some(schedule.id.as_str()));
        assert_eq!(run.scheduled_for, Some(t));
        assert_eq!(run.goal, "tick");
        assert_eq!(run.status, TaskStatus::Queued);
        assert_eq!(event.kind, event_kind::TASK_QUEUED);
        assert_eq!(event.data["schedule_id"], schedule.id.as_str());
        let after = store.get_schedule(&schedule.id).await.unwrap().unwrap();
        assert_eq!(
            (after.next_run_at, after.last_run_at),
            (Some(t + 1000), Some(t))
        );

        let again = store.fire_due_schedules(&rules(t + 200)).await.unwrap();
        assert_eq!(again.taken, 0, "not due again before its next tick");
        let next = store.fire_due_schedules(&rules(t + 1100)).await.unwrap();
        assert_eq!(next.runs.len(), 1);
        assert_eq!(next.runs[0].0.scheduled_for, Some(t + 1000));

        // The unique index: a second run of a tick cannot be stored.
        let duplicate = schedule.template.run("default", &schedule.id, t);
        assert!(
            store.create_task(duplicate).await.is_err(),
            "a second task for the same tick is refused"
        );

        // The runs are listed by schedule.
        let runs = store
            .list_tasks(&TaskQuery {
                tenant: Some("default".into()),
                schedule: Some(schedule.id.clone()),
                limit: 10,
                ..TaskQuery::default()
            })
            .await
            .unwrap();
        assert_eq!(
            runs.tasks
                .iter()
                .map(|t| t.scheduled_for)
                .collect::<Vec<_>>(),
            [Some(t + 1000), Some(t)]
        );

        // A full queue: the run waits, the schedule stays due.
        let queued = store.count_queued(None, 1000).await.unwrap();
        let full = FireRules {
            max_queued_tasks: queued,
            ..rules(t + 2100)
        };
        let waited = store.fire_due_schedules(&full).await.unwrap();
        assert_eq!((waited.taken, waited.waiting, waited.runs.len()), (1, 1, 0));
        let waiting = store.get_schedule(&schedule.id).await.unwrap().unwrap();
        assert!(waiting.waiting_for_room);
        assert_eq!(waiting.next_run_at, Some(t + 2000), "still due");
        let tenant_full = FireRules {
            max_queued_per_tenant: Some(queued),
            ..rules(t + 2100)
        };
        assert_eq!(
            store
                .fire_due_schedules(&tenant_full)
                .await
                .unwrap()
                .waiting,
            1
        );
        // Room again, ticks later: the waiting run is created for its tick,
        // and the ticks it waited through fold into it.
        let later = store.fire_due_schedules(&rules(t + 9500)).await.unwrap();
        assert_eq!(later.runs.len(), 1);
        assert_eq!(later.runs[0].0.scheduled_for, Some(t + 2000));
        let moved = store.get_schedule(&schedule.id).await.unwrap().unwrap();
        assert_eq!(moved.next_run_at, Some(t + 10_000));
        assert!(!moved.waiting_for_room);

        // Paused, it is never due; deleted, its runs stay.
        store
            .set_schedule_paused(&schedule.id, true, None)
            .await
            .unwrap();
        assert_eq!(store.earliest_schedule_due().await.unwrap(), None);
        assert_eq!(
            store
                .fire_due_schedules(&rules(t + 60_000))
                .await
                .unwrap()
                .taken,
            0
        );
        assert!(store.delete_schedule(&schedule.id).await.unwrap());
        assert!(!store.delete_schedule(&schedule.id).await.unwrap());
        assert!(store.get_schedule(&schedule.id).await.unwrap().is_none());
        assert!(store.get_task(&runs.tasks[0].id).await.unwrap().is_some());
    }

    /// Ticks reached past the grace were missed: `skip` creates no run for
    /// them, `run_once` exactly one; both continue at the next tick to come.
    pub async fn missed_ticks_follow_the_schedules_policy(store: &dyn Store) {
        use crate::schedules::MissedTicks;
        let t = (now_millis() / 1000 - 100) * 1000;
        let skip = every_second(store, t, MissedTicks::Skip).await;
        let once = every_second(store, t, MissedTicks::RunOnce).await;
        let now = t + 60_500;
        let fired = store.fire_due_schedules(&rules(now)).await.unwrap();
        assert_eq!(fired.taken, 2);
        assert_eq!(
            fired
                .runs
                .iter()
                .map(|(task, _)| (task.schedule_id.clone().unwrap(), task.scheduled_for))
                .collect::<Vec<_>>(),
            [(once.id.clone(), Some(t + 60_000))],
            "one run, for the latest missed tick, and none for skip"
        );
        for id in [&skip.id, &once.id] {
            let schedule = store.get_schedule(id).await.unwrap().unwrap();
            assert_eq!(schedule.next_run_at, Some(t + 61_000));
        }
        assert_eq!(
            store.fire_due_schedules(&rules(now)).await.unwrap().taken,
            0,
            "and nothing more for the gap"
        );
    }

    /// A thread's tasks run one after the other: only the oldest unfinished
    /// task of a tenant's thread is claimable, whatever the priorities, while
    /// another tenant's thread of the same name and tasks without a thread
    /// are not held up. The list filters by thread; deleting a thread is
    /// refused while one of its tasks is unfinished, then takes them all.
    pub async fn a_threads_tasks_run_one_after_another(store: &dyn Store) {
        let in_thread = |goal: &str, tenant: &str, priority: i32| NewTask {
            tenant: tenant.into(),
            thread: Some("chat-1".into()),
            ..new_task(goal, priority, None)
        };
        let (first, _) = store
            .create_task(in_thread("first", "default", 0))
            .await
            .unwrap();
        let (second, _) = store
            .create_task(in_thread("second", "default", 5))
            .await
            .unwrap();
        let (others, _) = store
            .create_task(in_thread("another tenant's", "other", 0))
            .await
            .unwrap();
        let (loose, _) = store
            .create_task(new_task("no thread", 0, None))
            .await
            .unwrap();
        assert_eq!(second.thread.as_deref(), Some("chat-1"));
        assert_eq!(loose.thread, None);

        let lease = Duration::from_secs(30);
        let claimed = store.claim_batch("host-a", lease, 10).await.unwrap();
        let mut ids: Vec<&str> = claimed.iter().map(|c| c.task.id.as_str()).collect();
        ids.sort();
        let mut expected = vec![first.id.as_str(), others.id.as_str(), loose.id.as_str()];
        expected.sort();
        assert_eq!(
            ids, expected,
            "the second task of the thread waits for the first, despite its priority"
        );
        assert!(
            store
                .claim_batch("host-b", lease, 10)
                .await
                .unwrap()
                .is_empty(),
            "not while the first runs"
        );
        assert_eq!(
            store.delete_thread("default", "chat-1").await.unwrap(),
            ThreadDeletion::Active(2)
        );

        let threaded = TaskQuery {
            tenant: Some("default".into()),
            thread: Some("chat-1".into()),
            limit: 10,
            ..TaskQuery::default()
        };
        let page = store.list_tasks(&threaded).await.unwrap();
        assert_eq!(
            page.tasks
                .iter()
                .map(|t| t.goal.as_str())
                .collect::<Vec<_>>(),
            ["second", "first"]
        );

        let fence_of = |id: &str| {
            claimed
                .iter()
                .find(|c| c.task.id == id)
                .unwrap()
                .fence
                .clone()
        };
        store
            .finish_task(
                &fence_of(&first.id),
                TaskEnd::Succeeded {
                    result: "one".into(),
                },
            )
            .await
            .unwrap();
        let next = store.claim_batch("host-b", lease, 10).await.unwrap();
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].task.id, second.id, "once the first finished");
        store
            .finish_task(&next[0].fence, TaskEnd::Cancelled)
            .await
            .unwrap();

        assert_eq!(
            store.delete_thread("default", "chat-1").await.unwrap(),
            ThreadDeletion::Deleted(2)
        );
        assert!(store.get_task(&first.id).await.unwrap().is_none());
        assert!(store.events_after(&first.id, 0).await.unwrap().is_empty());
        assert!(store.list_tasks(&threaded).await.unwrap().tasks.is_empty());
        assert!(
            store.get_task(&others.id).await.unwrap().is_some(),
            "another tenant's thread of the same name stays"
        );
        assert_eq!(
            store.delete_thread("default", "chat-1").await.unwrap(),
            ThreadDeletion::Deleted(0)
        );
    }

    /// A running task whose lease expired is claimed before a queued task
    /// that is older and more urgent; queued tasks then go by priority and
    /// age, and not before their `run_at`. The dead claim is fenced off, and
    /// a batch renewal tells a held claim from a lost one.
    pub async fn claims_take_expired_leases_first(store: &dyn Store) {
        let lease = Duration::from_secs(30);
        // Held back until the orphan below is running, so it is older than
        // the orphan, and more urgent.
        let soon = now_millis() + 300;
        let (older, _) = store
            .create_task(new_task("older", 5, Some(soon)))
            .await
            .unwrap();
        let (orphan, _) = store
            .create_task(new_task("orphan", 0, None))
            .await
            .unwrap();
        let (urgent, _) = store
            .create_task(new_task("urgent", 9, Some(soon)))
            .await
            .unwrap();
        let (later, _) = store
            .create_task(new_task("later", 9, Some(now_millis() + 3_600_000)))
            .await
            .unwrap();

        // The orphan is the only runnable task; its host then dies.
        let dead = store
            .claim_batch("dead-host", Duration::ZERO, 10)
            .await
            .unwrap();
        assert_eq!(
            dead.iter().map(|c| &c.task.id).collect::<Vec<_>>(),
            [&orphan.id]
        );
        tokio::time::sleep(Duration::from_millis(400)).await;

        let first = store.claim_batch("host-b", lease, 1).await.unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(
            (first[0].task.id.as_str(), first[0].task.attempt),
            (orphan.id.as_str(), 2),
            "the expired lease goes before the older, more urgent queued tasks"
        );
        assert_eq!(first[0].event.kind, event_kind::TASK_STARTED);
        assert_eq!(first[0].event.data["attempt"], 2);

        let rest = store.claim_batch("host-b", lease, 10).await.unwrap();
        assert_eq!(
            rest.iter().map(|c| &c.task.id).collect::<Vec<_>>(),
            [&urgent.id, &older.id],
            "then by priority; a task whose run_at is to come waits"
        );
        assert!(rest.iter().all(|c| c.task.status == TaskStatus::Running));
        assert_eq!(
            store.get_task(&later.id).await.unwrap().unwrap().status,
            TaskStatus::Queued
        );
        assert_eq!(store.count_queued(None, 100).await.unwrap(), 1);
        assert_eq!(store.count_queued(Some("default"), 100).await.unwrap(), 1);
        assert_eq!(store.count_queued(Some("nobody"), 100).await.unwrap(), 0);
        assert_eq!(
            store.count_queued(None, 0).await.unwrap(),
            0,
            "counts stop at the cap"
        );

        // The dead host's claim is fenced; the batch renewal says so.
        let end = TaskEnd::Succeeded {
            result: "late".into(),
        };
        assert!(matches!(
            store.finish_task(&dead[0].fence, end).await,
            Err(StoreError::Fenced { attempt: 1, .. })
        ));
        store.request_cancel(&urgent.id).await.unwrap();
        let fences = [
            dead[0].fence.clone(),
            first[0].fence.clone(),
            rest[0].fence.clone(),
        ];
        assert_eq!(
            store.renew_leases(&fences, lease).await.unwrap(),
            [
                Renewal::Lost,
                Renewal::Renewed {
                    cancel_requested: false
                },
                Renewal::Renewed {
                    cancel_requested: true
                },
            ]
        );
    }

    /// A claim resumes from the whole journal, loaded for the batch at once.
    pub async fn a_batch_claim_loads_each_journal(store: &dyn Store) {
        let mut ids = Vec::new();
        for n in 0..3 {
            let (task, _) = store
                .create_task(new_task(&format!("t{n}"), 0, None))
                .await
                .unwrap();
            ids.push(task.id);
        }
        let claims = store
            .claim_batch("dead-host", Duration::ZERO, 3)
            .await
            .unwrap();
        assert_eq!(claims.len(), 3);
        // A claim carries the trace the task was submitted in.
        let submitted_in = new_task("", 0, None).trace_parent;
        assert!(submitted_in.is_some());
        assert!(claims.iter().all(|c| c.task.trace_parent == submitted_in));
        // Task n journals n steps before its host dies.
        for (n, claim) in claims.iter().enumerate() {
            for seq in 1..=n as u32 {
                let step = StepStart {
                    seq,
                    kind: StepKind::Tool,
                    plugin: "calculator".into(),
                    input: serde_json::json!({"n": n, "seq": seq}),
                    versions: Default::default(),
                };
                store.start_step(&claim.fence, step).await.unwrap();
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        let resumed = store
            .claim_batch("host-b", Duration::from_secs(30), 10)
            .await
            .unwrap();
        assert_eq!(resumed.len(), 3);
        for claim in &resumed {
            let n = ids.iter().position(|id| *id == claim.task.id).unwrap();
            let inputs: Vec<&Value> = claim.steps.iter().map(|s| &s.input).collect();
            let expected: Vec<Value> = (1..=n)
                .map(|seq| serde_json::json!({"n": n, "seq": seq}))
                .collect();
            assert_eq!(inputs, expected.iter().collect::<Vec<_>>(), "task {n}");
            assert_eq!(claim.event.data["resumed_steps"], n);
        }
    }

    /// A thread's history reads the finished steps of several tasks in one
    /// go, their JSON as text: a tool step's call (joined from `payloads`
    /// when it was stored out of line), never an LLM step's request, the
    /// output, the error; a step still running is left out.
    fn memory(tenant: &str, namespace: &str, text: &str) -> crate::memory::NewMemory {
        crate::memory::NewMemory {
            tenant: tenant.into(),
            namespace: namespace.into(),
            text: text.into(),
            metadata: "{}".into(),
            task_id: None,
        }
    }

    fn memory_query(
        tenant: &str,
        namespace: Option<&str>,
        query: &str,
    ) -> crate::memory::MemoryQuery {
        crate::memory::MemoryQuery {
            tenant: tenant.into(),
            namespace: namespace.map(str::to_owned),
            terms: crate::memory::search_terms(query),
            limit: 10,
            before: None,
        }
    }

    fn texts(memories: &[crate::memory::MemoryRecord]) -> Vec<&str> {
        memories.iter().map(|m| m.text.as_str()).collect()
    }

    pub async fn memories_are_ranked_scoped_and_capped(store: &dyn Store) {
        let config = crate::memory::MemoryConfig {
            max_memories_per_tenant: 4,
            ..crate::memory::MemoryConfig::default()
        };
        for (tenant, namespace, text) in [
            ("a", "default", "the user likes green tea"),
            ("a", "default", "tea tea tea: the user drinks tea at noon"),
            ("a", "work", "the build server is called tea-kettle"),
            ("b", "default", "tenant b also likes tea"),
        ] {
            store
                .create_memory(memory(tenant, namespace, text), &config)
                .await
                .unwrap();
        }
        // Ranked: more of the query's words first; scoped to a tenant, and
        // to a namespace when one is named.
        let found = store
            .search_memories(&memory_query("a", Some("default"), "tea noon"))
            .await
            .unwrap();
        assert_eq!(
            texts(&found),
            [
                "tea tea tea: the user drinks tea at noon",
                "the user likes green tea"
            ]
        );
        assert!(found[0].score > found[1].score && found[1].score > 0.0);
        let everywhere = store
            .search_memories(&memory_query("a", None, "TEA"))
            .await
            .unwrap();
        assert_eq!(everywhere.len(), 3, "{everywhere:?}");
        assert!(texts(&everywhere).iter().all(|t| !t.contains("tenant b")));
        assert!(
            store
                .search_memories(&memory_query("a", None, "coffee"))
                .await
                .unwrap()
                .is_empty()
        );
        // Listed without words: the newest first, a page at a time.
        let mut listing = memory_query("a", None, "");
        listing.limit = 2;
        let page = store.search_memories(&listing).await.unwrap();
        assert_eq!(
            texts(&page),
            [
                "the build server is called tea-kettle",
                "tea tea tea: the user drinks tea at noon"
            ]
        );
        listing.before = Some(page[1].id.clone());
        let next = store.search_memories(&listing).await.unwrap();
        assert_eq!(texts(&next), ["the user likes green tea"]);

        // Another tenant's memory is not there to read or delete.
        let theirs = store
            .search_memories(&memory_query("b", None, "tea"))
            .await
            .unwrap();
        assert_eq!(store.get_memory("a", &theirs[0].id).await.unwrap(), None);
        assert!(!store.delete_memory("a", &theirs[0].id).await.unwrap());
        assert!(
            store
                .get_memory("b", &theirs[0].id)
                .await
                .unwrap()
                .is_some()
        );

        // Capped per tenant: a fifth memory of tenant a is refused, until
        // one is deleted.
        store
            .create_memory(memory("a", "default", "four"), &config)
            .await
            .unwrap();
        let refused = store
            .create_memory(memory("a", "default", "five"), &config)
            .await;
        assert!(
            matches!(refused, Err(StoreError::MemoryFull(_))),
            "{refused:?}"
        );
        assert!(store.delete_memory("a", &page[0].id).await.unwrap());
        store
            .create_memory(memory("a", "default", "five"), &config)
            .await
            .unwrap();
        let bytes_capped = crate::memory::MemoryConfig {
            max_bytes_per_tenant: 10,
            ..crate::memory::MemoryConfig::default()
        };
        let refused = store
            .create_memory(memory("c", "default", "eleven bytes"), &bytes_capped)
            .await;
        assert!(
            matches!(refused, Err(StoreError::MemoryFull(_))),
            "{refused:?}"
        );
    }

    pub async fn a_journaled_memory_call_is_not_performed_twice(store: &dyn Store) {
        use crate::memory::{MemoryKey, MemoryOp, MemoryReply, NewMemoryText, Site};
        let (task, _) = store.create_task(new_task("m", 0, None)).await.unwrap();
        let claim = store
            .claim_next("host", Duration::from_secs(30))
            .await
            .unwrap()
            .unwrap();
        let config = crate::memory::MemoryConfig::default();
        let call = |step: u32, site: Site, seq: u32, op: MemoryOp| MemoryCall {
            key: MemoryKey {
                task_id: task.id.clone(),
                step,
                site,
                seq,
            },
            tenant: "default".into(),
            namespace: "notes".into(),
            op,
            config: config.clone(),
        };
        let remember = |text: &str| {
            MemoryOp::Remember(NewMemoryText {
                text: text.into(),
                metadata: "{}".into(),
            })
        };
        let recall = MemoryOp::Recall {
            terms: crate::memory::search_terms("ada"),
            limit: 5,
        };
        let fence = &claim.fence;

        let first = call(2, Site::Tool, 0, remember("the user is called Ada"));
        let stored = store.memory_call(fence, &first).await.unwrap();
        // The same call of the same step, run again: the same answer, and
        // still one memory.
        assert_eq!(store.memory_call(fence, &first).await.unwrap(), stored);
        let all = memory_query("default", Some("notes"), "");
        assert_eq!(store.search_memories(&all).await.unwrap().len(), 1);
        let MemoryReply::Remembered { id } = stored.clone() else {
            panic!("{stored:?}")
        };
        let memories = store.search_memories(&all).await.unwrap();
        assert_eq!(memories[0].id, id);
        assert_eq!(memories[0].task_id.as_deref(), Some(task.id.as_str()));

        // A recall's answer is journaled too: run again, it answers what
        // it answered the first time, not what is stored since.
        let recalled = call(2, Site::Tool, 1, recall.clone());
        let before = store.memory_call(fence, &recalled).await.unwrap();
        let MemoryReply::Recalled { memories } = &before else {
            panic!("{before:?}")
        };
        assert_eq!(texts(memories), ["the user is called Ada"]);
        store
            .memory_call(fence, &call(3, Site::Planner, 0, remember("Ada likes tea")))
            .await
            .unwrap();
        assert_eq!(store.memory_call(fence, &recalled).await.unwrap(), before);
        let fresh = store
            .memory_call(fence, &call(4, Site::Planner, 0, recall))
            .await
            .unwrap();
        let MemoryReply::Recalled { memories } = &fresh else {
            panic!("{fresh:?}")
        };
        assert_eq!(memories.len(), 2);

        // A different call in a journaled place acts anew.
        let other = call(2, Site::Tool, 0, remember("something else"));
        assert_ne!(store.memory_call(fence, &other).await.unwrap(), stored);
        assert_eq!(store.search_memories(&all).await.unwrap().len(), 3);

        // Forgetting: journaled like the rest.
        let forget = call(5, Site::Tool, 0, MemoryOp::Forget { id: id.clone() });
        let existed = MemoryReply::Forgot { existed: true };
        assert_eq!(store.memory_call(fence, &forget).await.unwrap(), existed);
        assert_eq!(store.memory_call(fence, &forget).await.unwrap(), existed);
        let again = call(5, Site::Tool, 1, MemoryOp::Forget { id });
        assert_eq!(
            store.memory_call(fence, &again).await.unwrap(),
            MemoryReply::Forgot { existed: false }
        );

        // Only the claim's holder may call.
        let stale = Fence {
            attempt: fence.attempt + 1,
            ..fence.clone()
        };
        let fenced = store
            .memory_call(&stale, &call(6, Site::Tool, 0, remember("x")))
            .await;
        assert!(
            matches!(fenced, Err(StoreError::Fenced { .. })),
            "{fenced:?}"
        );
    }

    pub async fn history_steps_read_finished_steps_as_text(store: &dyn Store) {
        let (a, _) = store.create_task(new_task("a", 0, None)).await.unwrap();
        let (b, _) = store.create_task(new_task("b", 0, None)).await.unwrap();
        let claims = store
            .claim_batch("host", Duration::from_secs(30), 2)
            .await
            .unwrap();
        let fence_of = |id: &str| {
            claims
                .iter()
                .find(|c| c.task.id == id)
                .map(|c| c.fence.clone())
                .unwrap()
        };
        let long = "x".repeat(INLINE_PAYLOAD_BYTES + 1);
        let call = serde_json::json!({"id": "c1", "name": "echo", "arguments": {"text": long}});
        let steps = [
            (
                &a.id,
                1,
                StepKind::Llm,
                serde_json::json!({"messages": [long]}),
                Some(Ok(serde_json::json!({"reply": 1}))),
            ),
            (
                &a.id,
                2,
                StepKind::Tool,
                call.clone(),
                Some(Ok(serde_json::json!(long))),
            ),
            (
                &a.id,
                3,
                StepKind::Tool,
                serde_json::json!({"id": "c2"}),
                None,
            ),
            (
                &b.id,
                1,
                StepKind::Tool,
                serde_json::json!({"id": "c3"}),
                Some(Err(ErrorInfo::new("tool_failed", "no"))),
            ),
        ];
        for (task, seq, kind, input, end) in steps {
            let fence = fence_of(task);
            let (started, _) = store
                .start_step(
                    &fence,
                    StepStart {
                        seq,
                        kind,
                        plugin: "p".into(),
                        input,
                        versions: Default::default(),
                    },
                )
                .await
                .unwrap();
            if let Some(output) = end {
                let end = StepEnd {
                    started,
                    output,
                    usage: None,
                    cost_nanos: None,
                    charge: None,
                    finished_at: now_millis(),
                };
                store.finish_step(&fence, end).await.unwrap();
            }
        }
        let read = store
            .history_steps(&[a.id.clone(), b.id.clone(), "no-such-task".into()])
            .await
            .unwrap();
        let json = |text: &Option<String>| {
            text.as_deref()
                .map(|t| serde_json::from_str::<Value>(t).unwrap())
        };
        let mut of_a: Vec<&HistoryStep> = read.iter().filter(|s| s.task_id == a.id).collect();
        of_a.sort_by_key(|s| s.seq);
        assert_eq!(of_a.len(), 2, "the running step is left out: {read:?}");
        assert_eq!(
            (of_a[0].seq, of_a[0].kind, &of_a[0].call),
            (1, StepKind::Llm, &None)
        );
        assert_eq!(json(&of_a[0].output), Some(serde_json::json!({"reply": 1})));
        assert_eq!(json(&of_a[1].call), Some(call), "joined from payloads");
        assert_eq!(json(&of_a[1].output), Some(serde_json::json!(long)));
        let of_b: Vec<&HistoryStep> = read.iter().filter(|s| s.task_id == b.id).collect();
        assert_eq!(of_b.len(), 1);
        assert_eq!(of_b[0].output, None);
        assert_eq!(
            of_b[0].error.as_ref().map(|e| e.message.as_str()),
            Some("no")
        );
        assert!(store.history_steps(&[]).await.unwrap().is_empty());
    }

    /// A task's response format is kept as submitted (a NUL in its schema
    /// too), and a refused answer ends the task failed with its error and
    /// the answer kept as the result, in the row and in `task.finished`.
    pub async fn a_response_format_is_kept_and_a_refused_answer_too(store: &dyn Store) {
        let format = ResponseFormat {
            name: "calc".into(),
            schema: serde_json::json!({
                "type": "object",
                "properties": {"answer": {"type": "integer", "description": "a\u{0}b"}},
            }),
            strict: true,
        };
        let (task, _) = store
            .create_task(NewTask {
                response_format: Some(format.clone()),
                ..new_task("structured", 0, None)
            })
            .await
            .unwrap();
        assert_eq!(task.response_format.as_ref(), Some(&format));
        let (plain, _) = store.create_task(new_task("plain", 0, None)).await.unwrap();
        assert_eq!(plain.response_format, None);
        let claim = store
            .claim_batch("host-a", Duration::from_secs(30), 1)
            .await
            .unwrap()
            .remove(0);
        assert_eq!(claim.task.id, task.id);
        assert_eq!(
            claim.task.response_format.as_ref(),
            Some(&format),
            "a claim reads it back"
        );
        let error = ErrorInfo::new(
            crate::errors::Code::AnswerSchemaMismatch.as_str(),
            "at /answer: \"x\" is not of type \"integer\"",
        );
        let event = store
            .finish_task(
                &claim.fence,
                TaskEnd::AnswerRefused {
                    answer: r#"{"answer": "x"}"#.into(),
                    error: error.clone(),
                },
            )
            .await
            .unwrap();
        assert_eq!(event.data["status"], "failed");
        assert_eq!(event.data["result"], r#"{"answer": "x"}"#);
        assert_eq!(event.data["error"]["code"], "answer_schema_mismatch");
        let task = store.get_task(&task.id).await.unwrap().unwrap();
        assert_eq!(task.status, TaskStatus::Failed);
        assert_eq!(task.error, Some(error));
        assert_eq!(task.result.as_deref(), Some(r#"{"answer": "x"}"#));
    }

    /// A task's images are kept as submitted, in order; a task without
    /// any has none.
    pub async fn a_tasks_images_are_kept(store: &dyn Store) {
        let images = vec![
            Image::Url {
                url: "https://example.com/cat.jpg".into(),
            },
            Image::Inline {
                media_type: "image/png".into(),
                base64: "iVBORw0KGgo=".into(),
            },
        ];
        let (task, _) = store
            .create_task(NewTask {
                images: images.clone(),
                ..new_task("look", 0, None)
            })
            .await
            .unwrap();
        assert_eq!(task.images, images);
        let (plain, _) = store.create_task(new_task("plain", 0, None)).await.unwrap();
        assert_eq!(plain.images, []);
        assert_eq!(
            store.get_task(&task.id).await.unwrap().unwrap().images,
            images
        );
        let claim = store
            .claim_batch("host-a", Duration::from_secs(30), 2)
            .await
            .unwrap();
        let claimed = claim
            .iter()
            .find(|c| c.task.id == task.id)
            .expect("claimed");
        assert_eq!(claimed.task.images, images);
    }

    /// An LLM step's usage adds to its task's tokens and cost in the same
    /// write as its end, and, when the step carries a charge, to its
    /// tenant's period; a step of an unpriced model makes the task's cost
    /// unknown. The task's budget is kept as submitted.
    pub async fn usage_and_cost_add_up(store: &dyn Store) {
        let budget = TaskBudget {
            max_tokens: Some(1_000),
            max_cost_nanos: Some(2_500),
        };
        let (task, _) = store
            .create_task(NewTask {
                tenant: "acme".into(),
                budget,
                ..new_task("costs", 0, None)
            })
            .await
            .unwrap();
        assert_eq!((task.budget, task.cost_nanos), (budget, Some(0)));
        let claim = store
            .claim_batch("host-a", Duration::from_secs(30), 1)
            .await
            .unwrap()
            .remove(0);
        let llm = |seq: u32| StepStart {
            seq,
            kind: StepKind::Llm,
            plugin: "openai".into(),
            input: serde_json::json!({"seq": seq}),
            versions: Default::default(),
        };
        let charge = TenantCharge {
            tenant: "acme".into(),
            period: "month:2026-12".into(),
        };
        let end = |started: StepRecord, tokens: (u64, u64), cost, charge| StepEnd {
            started,
            output: Ok(serde_json::json!({})),
            usage: Some(Usage {
                input_tokens: tokens.0,
                output_tokens: tokens.1,
            }),
            cost_nanos: cost,
            charge,
            finished_at: now_millis(),
        };
        let (first, _) = store.start_step(&claim.fence, llm(1)).await.unwrap();
        let [_, (second, _)] = store
            .finish_step_then_start(
                &claim.fence,
                end(first, (100, 20), Some(700), Some(charge.clone())),
                llm(2),
            )
            .await
            .unwrap();
        store
            .finish_step(
                &claim.fence,
                end(second, (10, 5), Some(50), Some(charge.clone())),
            )
            .await
            .unwrap();
        let task_now = store.get_task(&task.id).await.unwrap().unwrap();
        assert_eq!(
            (task_now.usage.input_tokens, task_now.usage.output_tokens),
            (110, 25)
        );
        assert_eq!(task_now.cost_nanos, Some(750));
        assert_eq!(
            store.period_usage("acme", "month:2026-12").await.unwrap(),
            PeriodUsage {
                input_tokens: 110,
                output_tokens: 25,
                cost_nanos: Some(750),
            }
        );
        assert_eq!(
            store.period_usage("acme", "month:2026-11").await.unwrap(),
            PeriodUsage::default(),
            "another period is apart"
        );

        // Without a charge the tenant's figures stay; an unpriced step
        // makes the task's cost unknown.
        let (third, _) = store.start_step(&claim.fence, llm(3)).await.unwrap();
        store
            .finish_step(&claim.fence, end(third, (1, 1), None, None))
            .await
            .unwrap();
        let task_now = store.get_task(&task.id).await.unwrap().unwrap();
        assert_eq!(task_now.cost_nanos, None);
        assert_eq!(task_now.usage.input_tokens, 111);
        assert_eq!(
            store
                .period_usage("acme", "month:2026-12")
                .await
                .unwrap()
                .input_tokens,
            110
        );
        // An unpriced step charged to the tenant makes its period's cost
        // unknown too.
        let (fourth, _) = store.start_step(&claim.fence, llm(4)).await.unwrap();
        store
            .finish_step(&claim.fence, end(fourth, (1, 1), None, Some(charge)))
            .await
            .unwrap();
        let period = store.period_usage("acme", "month:2026-12").await.unwrap();
        assert_eq!((period.input_tokens, period.cost_nanos), (111, None));
    }

    /// A step's end is written with the next step's start, or with the
    /// task's end, in one write under one fence check: both land, in order,
    /// or (under a stale fence) neither does.
    pub async fn a_steps_end_is_written_with_what_follows(store: &dyn Store) {
        let (task, _) = store.create_task(new_task("pairs", 0, None)).await.unwrap();
        let claim = store
            .claim_batch("host-a", Duration::from_secs(30), 1)
            .await
            .unwrap()
            .remove(0);
        let step = |seq: u32| StepStart {
            seq,
            kind: StepKind::Tool,
            plugin: "calculator".into(),
            input: serde_json::json!({"seq": seq}),
            versions: Default::default(),
        };
        let end = |started: StepRecord, finished_at: Millis| StepEnd {
            started,
            output: Ok(serde_json::json!({"result": started_seq_answer(finished_at)})),
            usage: None,
            cost_nanos: None,
            charge: None,
            finished_at,
        };
        fn started_seq_answer(at: Millis) -> Millis {
            at % 1000
        }
        let (first, first_started) = store.start_step(&claim.fence, step(1)).await.unwrap();
        let ended_at = now_millis() - 50;
        let [(first, first_finished), (second, second_started)] = store
            .finish_step_then_start(&claim.fence, end(first, ended_at), step(2))
            .await
            .unwrap();
        assert_eq!(
            (first.status, first.finished_at),
            (StepStatus::Succeeded, Some(ended_at)),
            "the step ends when it ended, not when its end was written"
        );
        assert_eq!(second.status, StepStatus::Running);
        let kinds = |events: &[&EventRecord]| {
            events
                .iter()
                .map(|e| (e.seq, e.kind.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            kinds(&[&first_started, &first_finished, &second_started]),
            [
                (first_started.seq, event_kind::STEP_STARTED.to_owned()),
                (first_started.seq + 1, event_kind::STEP_FINISHED.to_owned()),
                (first_started.seq + 2, event_kind::STEP_STARTED.to_owned()),
            ]
        );

        // Under a fence that no longer holds, neither half is written.
        let stale = Fence {
            attempt: claim.fence.attempt - 1,
            ..claim.fence.clone()
        };
        let done = TaskEnd::Succeeded {
            result: "42".into(),
        };
        assert!(matches!(
            store
                .finish_step_then_task(&stale, end(second.clone(), now_millis()), done.clone())
                .await,
            Err(StoreError::Fenced { .. })
        ));
        let steps = store.steps(&task.id).await.unwrap();
        assert_eq!(
            steps.iter().map(|s| s.status).collect::<Vec<_>>(),
            [StepStatus::Succeeded, StepStatus::Running]
        );
        assert_eq!(
            store.get_task(&task.id).await.unwrap().unwrap().status,
            TaskStatus::Running
        );

        let ((second, second_finished), task_finished) = store
            .finish_step_then_task(&claim.fence, end(second, now_millis()), done)
            .await
            .unwrap();
        assert_eq!(second.status, StepStatus::Succeeded);
        assert_eq!(
            (second_finished.seq + 1, task_finished.kind.as_str()),
            (task_finished.seq, event_kind::TASK_FINISHED)
        );
        let task = store.get_task(&task.id).await.unwrap().unwrap();
        assert_eq!(
            (task.status, task.result.as_deref()),
            (TaskStatus::Succeeded, Some("42"))
        );
        let events = store.events_after(&task.id, 0).await.unwrap();
        assert_eq!(events.last().unwrap().seq, task_finished.seq);
    }

    /// Each combination of list filters pages through its tasks newest
    /// first, and the cursor continues where the page ended.
    pub async fn the_task_list_filters_and_pages(store: &dyn Store) {
        let mut made = Vec::new();
        for (n, tenant) in ["a", "b", "a", "a", "b"].iter().enumerate() {
            let mut task = new_task(&format!("t{n}"), 0, None);
            task.tenant = (*tenant).into();
            made.push(store.create_task(task).await.unwrap().0);
        }
        // The oldest task of tenant a runs; the rest stay queued.
        let claimed = store
            .claim_batch("host-a", Duration::from_secs(30), 1)
            .await
            .unwrap();
        assert_eq!(claimed[0].task.id, made[0].id);
        let list =
            |tenant: Option<&str>, status: Option<TaskStatus>, before: Option<&str>| TaskQuery {
                tenant: tenant.map(str::to_owned),
                status,
                before: before.map(str::to_owned),
                limit: 2,
                ..TaskQuery::default()
            };
        let goals = |page: &TaskPage| {
            page.tasks
                .iter()
                .map(|t| t.goal.clone())
                .collect::<Vec<_>>()
        };
        let everything = store.list_tasks(&list(None, None, None)).await.unwrap();
        assert_eq!(goals(&everything), ["t4", "t3"]);
        let rest = store
            .list_tasks(&list(None, None, everything.next_cursor.as_deref()))
            .await
            .unwrap();
        assert_eq!(goals(&rest), ["t2", "t1"]);
        let queued = store
            .list_tasks(&list(None, Some(TaskStatus::Queued), None))
            .await
            .unwrap();
        assert_eq!(goals(&queued), ["t4", "t3"]);
        let of_a = store
            .list_tasks(&list(Some("a"), None, None))
            .await
            .unwrap();
        assert_eq!(goals(&of_a), ["t3", "t2"]);
        let queued_of_a = store
            .list_tasks(&list(Some("a"), Some(TaskStatus::Queued), None))
            .await
            .unwrap();
        assert_eq!(goals(&queued_of_a), ["t3", "t2"]);
        assert_eq!(
            queued_of_a.next_cursor, None,
            "a's queued tasks fit one page"
        );
        let running_of_a = store
            .list_tasks(&list(
                Some("a"),
                Some(TaskStatus::Running),
                Some(&made[4].id),
            ))
            .await
            .unwrap();
        assert_eq!(goals(&running_of_a), ["t0"]);
        let running_of_b = store
            .list_tasks(&list(Some("b"), Some(TaskStatus::Running), None))
            .await
            .unwrap();
        assert!(running_of_b.tasks.is_empty());
    }

    /// `plugin` matches a task's planner, LLM adapter or any of its tools;
    /// `goal_contains` a piece of its goal in any case; both combine with
    /// the other filters and the cursor.
    pub async fn the_task_list_filters_by_plugin_and_goal_text(store: &dyn Store) {
        let specs = [
            ("Add two numbers", "react", "scripted", vec!["calculator"]),
            ("Search the web", "react", "openai", vec!["search", "fetch"]),
            ("ADD a row", "plan-execute", "scripted", vec![]),
            ("Fetch and add", "react", "scripted", vec!["fetch"]),
        ];
        for (goal, planner, llm, tools) in specs {
            let mut task = new_task(goal, 0, None);
            task.planner = planner.into();
            task.llm = llm.into();
            task.tools = tools.into_iter().map(str::to_owned).collect();
            store.create_task(task).await.unwrap();
        }
        let mut other_tenant = new_task("add for another tenant", 0, None);
        other_tenant.tenant = "other".into();
        store.create_task(other_tenant).await.unwrap();

        let goals = |query: TaskQuery| async move {
            let page = store.list_tasks(&query).await.unwrap();
            (
                page.tasks.into_iter().map(|t| t.goal).collect::<Vec<_>>(),
                page.next_cursor,
            )
        };
        let of_default = |plugin: Option<&str>, text: Option<&str>| TaskQuery {
            tenant: Some("default".into()),
            plugin: plugin.map(str::to_owned),
            goal_contains: text.map(str::to_owned),
            limit: 10,
            ..TaskQuery::default()
        };
        assert_eq!(
            goals(of_default(Some("fetch"), None)).await.0,
            ["Fetch and add", "Search the web"],
            "a tool"
        );
        assert_eq!(
            goals(of_default(Some("plan-execute"), None)).await.0,
            ["ADD a row"],
            "a planner"
        );
        assert_eq!(
            goals(of_default(Some("openai"), None)).await.0,
            ["Search the web"],
            "an LLM adapter"
        );
        assert!(goals(of_default(Some("fetc"), None)).await.0.is_empty());
        assert_eq!(
            goals(of_default(None, Some("add"))).await.0,
            ["Fetch and add", "ADD a row", "Add two numbers"],
            "any case, this tenant only"
        );
        assert_eq!(
            goals(of_default(Some("scripted"), Some("AdD"))).await.0,
            ["Fetch and add", "ADD a row", "Add two numbers"]
        );
        assert!(goals(of_default(None, Some("50%_"))).await.0.is_empty());
        let (first, cursor) = goals(TaskQuery {
            limit: 1,
            ..of_default(Some("scripted"), Some("add"))
        })
        .await;
        assert_eq!(first, ["Fetch and add"]);
        let (second, _) = goals(TaskQuery {
            limit: 1,
            before: cursor,
            ..of_default(Some("scripted"), Some("add"))
        })
        .await;
        assert_eq!(second, ["ADD a row"], "the cursor keeps the filters");
        let queued = goals(TaskQuery {
            status: Some(TaskStatus::Queued),
            ..of_default(Some("react"), Some("search"))
        })
        .await;
        assert_eq!(queued.0, ["Search the web"]);
    }

    /// Counts by status stop at the limit; the oldest runnable queued task
    /// is found; finished tasks are counted by the minute they finished in,
    /// from `since` on, for the tenant only.
    pub async fn task_stats_count_by_status_and_minute(store: &dyn Store) {
        let start = now_millis();
        let empty = store
            .task_stats("default", start, start, 100)
            .await
            .unwrap();
        assert_eq!(
            empty.counts,
            TaskStatus::ALL.map(|s| (s, 0)).to_vec(),
            "every status, even with no tasks"
        );
        assert_eq!(empty.oldest_queued_since, None);
        assert!(empty.finished_by_minute.is_empty());

        let mut ids = Vec::new();
        for n in 0..4 {
            let (task, _) = store
                .create_task(new_task(&format!("t{n}"), 0, None))
                .await
                .unwrap();
            ids.push(task);
        }
        store
            .create_task(new_task("later", 0, Some(start + 3_600_000)))
            .await
            .unwrap();
        let mut others = new_task("another tenant's", 0, None);
        others.tenant = "other".into();
        store.create_task(others).await.unwrap();

        // t0 succeeds, t1 fails, t2 is left running; t3 and the task held
        // back stay queued.
        let claims = store
            .claim_batch("host-a", Duration::from_secs(30), 3)
            .await
            .unwrap();
        let claim_of = |id: &str| {
            claims
                .iter()
                .find(|c| c.task.id == id)
                .expect("the oldest tasks are claimed first")
        };
        store
            .finish_task(
                &claim_of(&ids[0].id).fence,
                TaskEnd::Succeeded {
                    result: "ok".into(),
                },
            )
            .await
            .unwrap();
        store
            .finish_task(
                &claim_of(&ids[1].id).fence,
                TaskEnd::Failed {
                    error: ErrorInfo::new(crate::errors::Code::InternalError.as_str(), "no"),
                },
            )
            .await
            .unwrap();
        let after_claims = now_millis();
        let stats = store
            .task_stats("default", start, after_claims, 100)
            .await
            .unwrap();
        let count = |stats: &TaskStats, status: TaskStatus| {
            stats
                .counts
                .iter()
                .find(|(s, _)| *s == status)
                .map(|(_, n)| *n)
                .unwrap()
        };
        assert_eq!(count(&stats, TaskStatus::Succeeded), 1);
        assert_eq!(count(&stats, TaskStatus::Failed), 1);
        assert_eq!(count(&stats, TaskStatus::Running), 1, "t2 runs");
        assert_eq!(count(&stats, TaskStatus::Queued), 2, "t3 and later");
        assert_eq!(
            stats.oldest_queued_since,
            Some(ids[3].created_at),
            "the task held back until later is not runnable yet"
        );
        let finished: u64 = stats.finished_by_minute.iter().map(|(_, _, n)| n).sum();
        assert_eq!(finished, 2);
        for (minute, status, _) in &stats.finished_by_minute {
            assert_eq!(*minute, minute_of(*minute));
            assert!(*minute >= minute_of(start) && *minute <= after_claims);
            assert!(status.is_terminal());
        }
        let limited = store
            .task_stats("default", start, after_claims, 1)
            .await
            .unwrap();
        assert_eq!(
            count(&limited, TaskStatus::Queued),
            1,
            "counts stop at the limit"
        );
        let from_later = store
            .task_stats("default", after_claims + 60_000, after_claims, 100)
            .await
            .unwrap();
        assert!(
            from_later.finished_by_minute.is_empty(),
            "only from since on"
        );
        let of_nobody = store
            .task_stats("nobody", start, after_claims, 100)
            .await
            .unwrap();
        assert_eq!(of_nobody, empty, "nothing of another tenant's");
    }

    fn request(step: u32, call: &str, expires_at: Millis) -> ApprovalRequest {
        ApprovalRequest {
            step,
            call_id: call.into(),
            tool: "calculator".into(),
            input: serde_json::json!({"expression": format!("{step}+{step}")}),
            expires_at,
        }
    }

    fn decision(approve: bool, by: &str) -> Decision {
        Decision {
            approve,
            input: approve.then(|| serde_json::json!({"expression": "9*9"})),
            comment: Some(format!("from {by}")),
            by: by.into(),
        }
    }

    /// A task that waits holds no claim; of answers racing for one call
    /// exactly one wins; the task goes back to the queue only when its last
    /// pending call is answered. An expired call is rejected and requeues its task.
    pub async fn approvals_are_answered_once_and_requeue_when_all_are(store: &dyn Store) {
        let (task, _) = store
            .create_task(new_task("approve", 0, None))
            .await
            .unwrap();
        let lease = Duration::from_secs(30);
        let claim = store.claim_next("host-a", lease).await.unwrap().unwrap();
        let far = now_millis() + 3_600_000;
        let event = store
            .await_approval(
                &claim.fence,
                vec![request(2, "a", far), request(3, "b", far)],
            )
            .await
            .unwrap();
        assert_eq!(event.kind, event_kind::TASK_WAITING_APPROVAL);
        assert_eq!(event.data["pending"][1]["call_id"], "b");
        let waiting = store.get_task(&task.id).await.unwrap().unwrap();
        assert_eq!(waiting.status, TaskStatus::WaitingApproval);
        assert!(
            store.claim_next("host-b", lease).await.unwrap().is_none(),
            "a waiting task is not claimable"
        );
        assert_eq!(
            store
                .renew_leases(std::slice::from_ref(&claim.fence), lease)
                .await
                .unwrap(),
            [Renewal::Lost],
            "its claim is released"
        );
        assert!(matches!(
            store
                .decide_approval(&task.id, "zzz", &decision(true, "x"))
                .await,
            Ok(DecideOutcome::NotFound)
        ));

        // Eight answers to one call at once: one wins.
        let id = task.id.as_str();
        let racing = (0..8).map(|n| {
            let by = format!("racer-{n}");
            async move {
                store
                    .decide_approval(id, "b", &decision(n % 2 == 0, &by))
                    .await
                    .unwrap()
            }
        });
        let outcomes = futures::future::join_all(racing).await;
        let winners: Vec<&ApprovalRecord> = outcomes
            .iter()
            .filter_map(|o| match o {
                DecideOutcome::Decided {
                    approval, requeued, ..
                } => {
                    assert!(!requeued, "call a is still pending");
                    Some(approval)
                }
                _ => None,
            })
            .collect();
        assert_eq!(winners.len(), 1, "{outcomes:?}");
        let winner = winners[0].clone();
        for outcome in &outcomes {
            if let DecideOutcome::AlreadyDecided(seen) = outcome {
                assert_eq!(*seen, winner, "the losers see the winner's answer");
            }
        }
        assert_eq!(
            store.get_task(&task.id).await.unwrap().unwrap().status,
            TaskStatus::WaitingApproval
        );

        let outcome = store
            .decide_approval(&task.id, "a", &decision(false, "last"))
            .await
            .unwrap();
        let DecideOutcome::Decided {
            approval,
            events,
            requeued,
        } = outcome
        else {
            panic!("{outcome:?}")
        };
        assert!(requeued);
        assert_eq!(approval.status, ApprovalStatus::Rejected);
        assert_eq!(approval.decided_by.as_deref(), Some("last"));
        let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(
            kinds,
            [event_kind::APPROVAL_DECIDED, event_kind::TASK_QUEUED]
        );
        let listed = store.approvals(&task.id).await.unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[1], winner);

        let resumed = store.claim_next("host-b", lease).await.unwrap().unwrap();
        assert_eq!(resumed.task.id, task.id);
        assert_eq!(resumed.task.attempt, 2);

        // A second wait whose call expires: the sweep rejects it and
        // requeues the task.
        store
            .await_approval(&resumed.fence, vec![request(5, "c", now_millis() - 1)])
            .await
            .unwrap();
        let events = store.expire_approvals(now_millis()).await.unwrap();
        let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(
            kinds,
            [event_kind::APPROVAL_DECIDED, event_kind::TASK_QUEUED]
        );
        assert_eq!(events[0].data["decided_by"], "timeout");
        assert!(
            store
                .expire_approvals(now_millis())
                .await
                .unwrap()
                .is_empty()
        );
        assert!(matches!(
            store
                .decide_approval(&task.id, "c", &decision(true, "late"))
                .await,
            Ok(DecideOutcome::AlreadyDecided(_))
        ));
        assert_eq!(
            store.get_task(&task.id).await.unwrap().unwrap().status,
            TaskStatus::Queued
        );

        // Cancelling a waiting task ends it and rejects what was pending.
        let claim = store.claim_next("host-b", lease).await.unwrap().unwrap();
        store
            .await_approval(&claim.fence, vec![request(7, "d", far)])
            .await
            .unwrap();
        assert!(matches!(
            store.request_cancel(&task.id).await.unwrap(),
            CancelOutcome::Cancelled(..)
        ));
        assert!(matches!(
            store
                .decide_approval(&task.id, "d", &decision(true, "late"))
                .await,
            Ok(DecideOutcome::AlreadyDecided(_))
        ));
    }
}
