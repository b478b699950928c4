//! How tasks, steps and plugins look in API responses.

use serde::Serialize;
use serde_json::{Value, json};

use crate::plugins::PluginInfo;
use crate::protocol::Usage;
use crate::store::{ErrorInfo, StepKind, StepRecord, StepStatus, TaskRecord, TaskStatus};

pub use crate::rfc3339::format as timestamp;

#[derive(Debug, Serialize)]
pub struct TaskView {
    pub id: String,
    pub tenant: String,
    pub status: TaskStatus,
    pub goal: String,
    pub planner: String,
    pub llm: String,
    pub model: Option<String>,
    pub tools: Vec<String>,
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
    pub attempt: i64,
    pub cancel_requested: bool,
    pub usage: Usage,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
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
            created_at: timestamp(task.created_at),
            started_at: task.started_at.map(timestamp),
            finished_at: task.finished_at.map(timestamp),
            steps: steps.map(|steps| steps.into_iter().map(StepView::from).collect()),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct StepView {
    pub seq: u32,
    pub kind: StepKind,
    pub plugin: String,
    pub status: StepStatus,
    pub input: Value,
    pub output: Option<Value>,
    pub error: Option<ErrorInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
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

pub fn plugin_view(info: &PluginInfo) -> Value {
    json!(info)
}
