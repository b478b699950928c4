//! How tasks, steps and plugins look in API responses. Each view is also
//! its schema in the OpenAPI spec (`ToSchema`), so the two cannot differ.

use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

pub use crate::budgets::Period;
use crate::budgets::{PeriodSpan, PeriodUsage, TaskBudget, TenantCap, nanos_to_usd};
use crate::plugins::{CacheUsage, LoadFailure, LoadingFile, OldVersion, PluginInfo, PluginRuntime};
use crate::protocol::{Image, ResponseFormat, ToolCall, Usage};
use crate::store::{
    ErrorInfo, Millis, StepKind, StepRecord, StepStatus, TaskRecord, TaskStats, TaskStatus,
};

pub use crate::rfc3339::format as timestamp;

/// A task: what was asked, how far it got, and (in `GET /v1/tasks/{id}`)
/// its steps. Times are RFC 3339, UTC.
#[derive(Debug, Serialize, ToSchema)]
pub struct TaskView {
    pub id: String,
    pub tenant: String,
    pub status: TaskStatus,
    pub goal: String,
    /// Empty for a call task, which has no planner.
    pub planner: String,
    /// Empty for a call task, which has no LLM.
    pub llm: String,
    pub model: Option<String>,
    pub tools: Vec<String>,
    #[schema(value_type = Object)]
    pub options: Value,
    pub max_steps: u32,
    pub max_retries: u32,
    pub timeout_secs: f64,
    pub priority: i32,
    pub idempotency_key: Option<String>,
    pub run_at: Option<String>,
    pub deadline: Option<String>,
    pub result: Option<String>,
    pub error: Option<ErrorInfo>,
    /// How many times the task was claimed by a scheduler.
    pub attempt: i64,
    pub cancel_requested: bool,
    pub usage: Usage,
    /// What the usage cost in US dollars, from the configured prices;
    /// `null` when some of it was of a model with no price.
    pub cost_usd: Option<f64>,
    /// The task's own caps and what is left of them; `null` when it has
    /// none.
    pub budget: Option<BudgetView>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// The schedule that created the task, if one did.
    pub schedule_id: Option<String>,
    /// The tick of that schedule the task is the run of.
    pub scheduled_for: Option<String>,
    /// The conversation thread the task continues, if it names one.
    pub thread: Option<String>,
    /// The long-term memory namespace its plugins use, if it names one
    /// (`default` otherwise).
    pub memory_namespace: Option<String>,
    /// The JSON Schema the answer must match, if the task asked for
    /// structured output.
    pub response_format: Option<ResponseFormat>,
    /// A call task's one tool call; `null` for an agent task.
    pub call: Option<CallView>,
    /// The images that go with the goal, as submitted; left out when there
    /// are none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Option<Vec<Object>>, nullable = false)]
    pub images: Vec<Image>,
    /// Only in `GET /v1/tasks/{id}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub steps: Option<Vec<StepView>>,
}

impl TaskView {
    pub fn new(task: TaskRecord, steps: Option<Vec<StepRecord>>) -> Self {
        Self {
            id: task.id,
            tenant: task.tenant,
            status: task.status,
            goal: task.goal,
            planner: task.planner,
            llm: task.llm,
            model: task.model,
            tools: task.tools,
            options: task.options,
            max_steps: task.max_steps,
            max_retries: task.max_retries,
            timeout_secs: task.timeout_ms as f64 / 1000.0,
            priority: task.priority,
            idempotency_key: task.idempotency_key,
            run_at: task.run_at.map(timestamp),
            deadline: task.deadline_at.map(timestamp),
            result: task.result,
            error: task.error,
            attempt: task.attempt,
            cancel_requested: task.cancel_requested,
            usage: task.usage,
            cost_usd: task.cost_nanos.map(nanos_to_usd),
            budget: BudgetView::new(&task.budget, &task.usage, task.cost_nanos),
            created_at: timestamp(task.created_at),
            started_at: task.started_at.map(timestamp),
            finished_at: task.finished_at.map(timestamp),
            schedule_id: task.schedule_id,
            scheduled_for: task.scheduled_for.map(timestamp),
            thread: task.thread,
            memory_namespace: task.memory_namespace,
            response_format: task.response_format,
            call: task.call.map(CallView::from),
            images: task.images,
            steps: steps.map(|steps| steps.into_iter().map(StepView::from).collect()),
        }
    }
}

/// The one tool call a call task makes.
#[derive(Debug, Serialize, ToSchema)]
pub struct CallView {
    pub tool: String,
    #[schema(value_type = Object)]
    pub arguments: Value,
}

impl From<ToolCall> for CallView {
    fn from(call: ToolCall) -> Self {
        Self {
            tool: call.name,
            arguments: call.arguments,
        }
    }
}

/// A task's caps (`budget` when submitted) and what is left of them.
#[derive(Debug, Serialize, ToSchema)]
pub struct BudgetView {
    pub max_tokens: Option<u64>,
    pub max_cost_usd: Option<f64>,
    /// Tokens left under `max_tokens`; `null` without that cap.
    pub remaining_tokens: Option<u64>,
    /// Dollars left under `max_cost_usd`; `null` without that cap, or when
    /// the cost is unknown.
    pub remaining_cost_usd: Option<f64>,
}

impl BudgetView {
    fn new(budget: &TaskBudget, usage: &Usage, cost_nanos: Option<i64>) -> Option<Self> {
        if budget.is_empty() {
            return None;
        }
        let used = usage.input_tokens + usage.output_tokens;
        Some(Self {
            max_tokens: budget.max_tokens,
            max_cost_usd: budget.max_cost_nanos.map(nanos_to_usd),
            remaining_tokens: budget.max_tokens.map(|max| max.saturating_sub(used)),
            remaining_cost_usd: budget
                .max_cost_nanos
                .zip(cost_nanos)
                .map(|(max, cost)| nanos_to_usd((max - cost).max(0))),
        })
    }
}

/// `GET /v1/usage`: what the tenant spent in the current period of its
/// budget, its caps and what is left.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageView {
    pub tenant: String,
    /// Whether the tenant has a budget; only then is its usage counted per
    /// period, and the fields below but `tenant` are set.
    pub tracked: bool,
    pub period: Option<Period>,
    /// The period's first instant and the next period's, RFC 3339 (UTC).
    pub period_start: Option<String>,
    pub period_end: Option<String>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub tokens: Option<u64>,
    /// `null` when a call of a model with no price was counted.
    pub cost_usd: Option<f64>,
    pub max_tokens: Option<u64>,
    pub max_cost_usd: Option<f64>,
    pub remaining_tokens: Option<u64>,
    pub remaining_cost_usd: Option<f64>,
    /// Held by LLM calls in flight on the host that answered (their usage
    /// is counted once journaled).
    pub reserved_tokens: u64,
    pub reserved_cost_usd: f64,
}

impl UsageView {
    pub fn untracked(tenant: String) -> Self {
        Self {
            tenant,
            tracked: false,
            period: None,
            period_start: None,
            period_end: None,
            input_tokens: None,
            output_tokens: None,
            tokens: None,
            cost_usd: None,
            max_tokens: None,
            max_cost_usd: None,
            remaining_tokens: None,
            remaining_cost_usd: None,
            reserved_tokens: 0,
            reserved_cost_usd: 0.0,
        }
    }

    pub fn new(
        tenant: String,
        cap: &TenantCap,
        span: &PeriodSpan,
        used: PeriodUsage,
        reserved: (u64, i64),
    ) -> Self {
        Self {
            tenant,
            tracked: true,
            period: Some(cap.period),
            period_start: Some(timestamp(span.start)),
            period_end: Some(timestamp(span.end)),
            input_tokens: Some(used.input_tokens),
            output_tokens: Some(used.output_tokens),
            tokens: Some(used.tokens()),
            cost_usd: used.cost_nanos.map(nanos_to_usd),
            max_tokens: cap.max_tokens,
            max_cost_usd: cap.max_cost_nanos.map(nanos_to_usd),
            remaining_tokens: cap.max_tokens.map(|max| max.saturating_sub(used.tokens())),
            remaining_cost_usd: cap
                .max_cost_nanos
                .zip(used.cost_nanos)
                .map(|(max, cost)| nanos_to_usd((max - cost).max(0))),
            reserved_tokens: reserved.0,
            reserved_cost_usd: nanos_to_usd(reserved.1),
        }
    }
}

/// One step of a task: an LLM call or a tool call.
#[derive(Debug, Serialize, ToSchema)]
pub struct StepView {
    pub seq: u32,
    pub kind: StepKind,
    /// The plugin that ran it (`mcp:<server>` for an MCP server's tool).
    pub plugin: String,
    /// SHA-256 of the plugin version that ran it; `null` for an MCP
    /// server's tool.
    pub plugin_sha256: Option<String>,
    /// SHA-256 of the planner version that chose it.
    pub planner_sha256: Option<String>,
    pub status: StepStatus,
    pub input: Value,
    pub output: Option<Value>,
    pub error: Option<ErrorInfo>,
    /// Only on LLM steps.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub usage: Option<Usage>,
    pub attempt: i64,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub duration_ms: Option<i64>,
}

impl From<StepRecord> for StepView {
    fn from(step: StepRecord) -> Self {
        Self {
            seq: step.seq,
            kind: step.kind,
            plugin: step.plugin,
            plugin_sha256: step.versions.plugin_sha256,
            planner_sha256: step.versions.planner_sha256,
            status: step.status,
            input: step.input,
            output: step.output,
            error: step.error,
            usage: step.usage,
            attempt: step.attempt,
            started_at: timestamp(step.started_at),
            finished_at: step.finished_at.map(timestamp),
            duration_ms: step.finished_at.map(|end| end - step.started_at),
        }
    }
}

/// `GET /v1/tasks`: a page of tasks, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct TaskPage {
    pub tasks: Vec<TaskView>,
    /// Pass as `cursor` for the next page; `null` on the last one.
    pub next_cursor: Option<String>,
}

/// `GET /healthz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`: the server answers once it listens.
    #[schema(example = "ok")]
    pub status: &'static str,
    /// `sqlite` or `postgres`.
    #[schema(example = "sqlite")]
    pub store: &'static str,
    /// Plugins loaded.
    pub plugins: usize,
    /// Plugin files still loading in the background.
    pub loading: usize,
}

/// `GET /v1/plugins`: what is loaded, what failed to load, what is still
/// loading, and the configured MCP servers.
#[derive(Debug, Serialize, ToSchema)]
pub struct PluginsView {
    pub plugins: Vec<PluginView>,
    pub failures: Vec<LoadFailureView>,
    pub loading: Vec<LoadingView>,
    /// Each configured MCP server: `name`, `kind`, `status`, `error`,
    /// `restarts`, `pid`, `transport`, `call_timeout`,
    /// `max_concurrent_calls`, `allow_tools`, `deny_tools` and `tools` (see
    /// docs/api.md).
    #[schema(value_type = Vec<Object>)]
    pub mcp_servers: Vec<Value>,
    /// Replaced or removed plugin versions that running tasks still use:
    /// a task keeps the versions it started with until it ends.
    pub old_versions_in_use: Vec<OldVersion>,
    /// The compile cache: compiled components of the loaded versions and of
    /// a bounded history of others (`plugins.compile_cache_history`).
    pub compile_cache: CacheUsage,
}

impl PluginsView {
    pub fn new(runtime: &PluginRuntime) -> Self {
        let catalog = runtime.catalog();
        Self {
            old_versions_in_use: runtime.old_versions_in_use(),
            compile_cache: runtime.compile_cache_usage(),
            plugins: catalog.plugins().map(PluginView::from).collect(),
            failures: catalog
                .failures()
                .iter()
                .map(LoadFailureView::from)
                .collect(),
            loading: catalog.loading().iter().map(LoadingView::from).collect(),
            mcp_servers: catalog.external_sources().to_vec(),
        }
    }
}

/// A loaded plugin.
#[derive(Debug, Serialize, ToSchema)]
pub struct PluginView {
    pub name: String,
    /// `tool`, `planner` or `llm-adapter`.
    #[schema(example = "tool")]
    pub kind: &'static str,
    /// The WIT package version the component was built against.
    pub wit_version: String,
    /// SHA-256 of the component's bytes.
    pub sha256: String,
    pub file: String,
    pub size_bytes: u64,
    pub description: Option<String>,
    /// The tools a tool plugin offers; absent for other kinds.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<ToolView>,
    /// What the operator granted it (network, folders, variables).
    #[schema(value_type = Object)]
    pub grants: Value,
    /// Its memory, time and output limits.
    #[schema(value_type = Object)]
    pub limits: Value,
    /// What its manifest asked for that the operator's policy refused.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<String>,
    /// A tool plugin's own `[[approvals]]`: which of its calls wait for a
    /// person's approval (`tool`, and `when`, JSON pointers into the
    /// arguments to globs). The operator's rules apply besides.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<Object>)]
    pub approvals: Vec<crate::approvals::ApprovalRule>,
}

impl From<&PluginInfo> for PluginView {
    fn from(info: &PluginInfo) -> Self {
        Self {
            name: info.name.clone(),
            kind: info.kind.as_str(),
            wit_version: info.wit_version.clone(),
            sha256: info.sha256.clone(),
            file: info.file.display().to_string(),
            size_bytes: info.size_bytes,
            description: info.description.clone(),
            tools: info
                .tools
                .iter()
                .map(|tool| ToolView::from(&**tool))
                .collect(),
            grants: serde_json::to_value(&info.grants).unwrap_or_default(),
            limits: serde_json::to_value(info.limits).unwrap_or_default(),
            refused: info.refused.clone(),
            approvals: info.approvals.clone(),
        }
    }
}

/// A tool, as tasks name it in `tools`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ToolView {
    pub name: String,
    pub description: String,
    /// JSON Schema of the tool's input object.
    #[schema(value_type = Object)]
    pub input_schema: Value,
}

impl From<&crate::protocol::ToolSpec> for ToolView {
    fn from(spec: &crate::protocol::ToolSpec) -> Self {
        Self {
            name: spec.name.clone(),
            description: spec.description.clone(),
            input_schema: spec.input_schema.clone(),
        }
    }
}

/// A plugin file that did not load.
#[derive(Debug, Serialize, ToSchema)]
pub struct LoadFailureView {
    pub file: String,
    /// One of the plugin load failure codes of docs/api.md.
    #[schema(value_type = String, example = "plugin_load_failed")]
    pub code: crate::errors::Code,
    pub error: String,
}

impl From<&LoadFailure> for LoadFailureView {
    fn from(failure: &LoadFailure) -> Self {
        Self {
            file: failure.file.display().to_string(),
            code: failure.code,
            error: failure.error.clone(),
        }
    }
}

/// A plugin file still loading in the background.
#[derive(Debug, Serialize, ToSchema)]
pub struct LoadingView {
    pub file: String,
    /// RFC 3339.
    pub started_at: String,
}

impl From<&LoadingFile> for LoadingView {
    fn from(loading: &LoadingFile) -> Self {
        Self {
            file: loading.file.display().to_string(),
            started_at: loading.started_at.clone(),
        }
    }
}

/// `GET /v1/stats`: the tenant's tasks at a glance, for the dashboard's
/// overview.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatsView {
    /// The tenant's tasks in each status, each counted no further than
    /// `count_limit`.
    pub counts: std::collections::BTreeMap<String, u64>,
    /// A count equal to this means "this many or more".
    pub count_limit: u64,
    /// How long the tenant's longest-waiting runnable queued task has
    /// waited; `null` when none waits.
    pub oldest_queued_age_ms: Option<i64>,
    /// The last 60 minutes, oldest first, the current (partial) minute
    /// last: how many of the tenant's tasks finished in each, by outcome.
    pub finished_per_minute: Vec<MinuteView>,
}

/// The tasks that finished in one minute, by how they ended.
#[derive(Debug, Serialize, ToSchema)]
pub struct MinuteView {
    /// The minute's start, RFC 3339.
    pub minute: String,
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
}

/// Minutes in `GET /v1/stats`'s series.
pub const STATS_MINUTES: i64 = 60;

impl StatsView {
    /// The view of `stats`, read at `now` for the [`STATS_MINUTES`]
    /// minutes from `first_minute`, with counts up to `count_limit`.
    pub fn new(stats: TaskStats, now: Millis, first_minute: Millis, count_limit: u64) -> Self {
        let mut finished_per_minute: Vec<MinuteView> = (0..STATS_MINUTES)
            .map(|n| MinuteView {
                minute: timestamp(first_minute + n * 60_000),
                succeeded: 0,
                failed: 0,
                cancelled: 0,
            })
            .collect();
        for (minute, status, count) in stats.finished_by_minute {
            let index = (minute - first_minute).div_euclid(60_000);
            let Some(view) = usize::try_from(index)
                .ok()
                .and_then(|i| finished_per_minute.get_mut(i))
            else {
                continue;
            };
            match status {
                TaskStatus::Succeeded => view.succeeded += count,
                TaskStatus::Failed => view.failed += count,
                TaskStatus::Cancelled => view.cancelled += count,
                TaskStatus::Queued | TaskStatus::Running | TaskStatus::WaitingApproval => {}
            }
        }
        Self {
            counts: stats
                .counts
                .into_iter()
                .map(|(status, count)| (status.as_str().to_owned(), count))
                .collect(),
            count_limit,
            oldest_queued_age_ms: stats.oldest_queued_since.map(|since| (now - since).max(0)),
            finished_per_minute,
        }
    }
}
