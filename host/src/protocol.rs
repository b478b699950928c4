//! The neutral language spoken between the scheduler, the store, the API and
//! the plugin runtime: tool specs, chat messages, planner actions.
//!
//! These mirror the WIT types of the newest `wit/` version but are plain
//! serde types, so nothing outside `plugins::bindings` depends on generated
//! code. Fields added in later WIT versions have serde defaults, so steps
//! journaled before them still read.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::errors::Code;
use crate::memory::MemoryHandle;

/// A tool as offered to planners and LLMs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    /// JSON Schema for the tool's input object.
    pub input_schema: Value,
}

/// A request to run one tool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: Value,
}

/// What a tool call produced, as handed back to a planner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolResult {
    pub call_id: String,
    pub name: String,
    pub content: String,
    pub is_error: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

/// An image in a message: an address the provider fetches, or inline bytes.
/// The JSON shape is the API's: `{"url": ...}` or `{"media_type": ...,
/// "data": <base64>}` (see [`crate::images`], which checks them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Image {
    Url {
        url: String,
    },
    Inline {
        media_type: String,
        #[serde(rename = "data")]
        base64: String,
    },
}

/// Opaque data a provider attached to a message (a thought signature, a
/// thinking block's signature, a reasoning item); kept and sent back as is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderDatum {
    pub key: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<Image>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub provider_data: Vec<ProviderDatum>,
}

/// Whether and which tools the model may call.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolChoice {
    #[default]
    Auto,
    None,
    Required,
    /// A call to the named tool.
    Named(String),
}

impl ToolChoice {
    fn is_auto(&self) -> bool {
        *self == Self::Auto
    }
}

/// Asks for a reply that is JSON matching `schema`: of an LLM call, or of a
/// whole task (its `response_format`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ResponseFormat {
    pub name: String,
    #[schema(value_type = Object)]
    pub schema: Value,
    #[serde(default)]
    pub strict: bool,
}

/// A provider-neutral chat request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub system: Option<String>,
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub tools: Vec<ToolSpec>,
    #[serde(default, skip_serializing_if = "ToolChoice::is_auto")]
    pub tool_choice: ToolChoice,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<ResponseFormat>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub stop: Vec<String>,
    /// Adapter-specific options: a JSON object.
    #[serde(default = "empty_object")]
    pub provider_options: Value,
}

pub fn empty_object() -> Value {
    Value::Object(Default::default())
}

/// `value` as compact JSON text, as the journal keeps it and plugins take it.
///
/// Not `Value::to_string`: its `Display` writes through a `fmt::Formatter`
/// a piece at a time, which took about 1.6 times as long for an LLM step's
/// input; on the slow-LLM benchmark's hot path that text took 4.5 % of the
/// server's CPU.
pub fn to_json_text<T: Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).expect("the runtime's types always serialize to JSON")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    ToolCalls,
    Length,
    ContentFilter,
    Other,
}

impl FinishReason {
    /// Its name on the wire (and in traces).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::ToolCalls => "tool_calls",
            Self::Length => "length",
            Self::ContentFilter => "content_filter",
            Self::Other => "other",
        }
    }
}

/// Tokens an LLM call (or a task, summed over its steps) used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

impl Usage {
    pub fn add(&mut self, other: Usage) {
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatResponse {
    pub message: ChatMessage,
    pub finish_reason: FinishReason,
    #[serde(default)]
    pub usage: Option<Usage>,
    pub model: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LlmErrorKind {
    Auth,
    InvalidRequest,
    RateLimited,
    Unavailable,
    Timeout,
    BadResponse,
    Other,
}

impl LlmErrorKind {
    /// The stable error code a failed LLM step carries.
    pub fn code(self) -> Code {
        match self {
            Self::Auth => Code::LlmAuth,
            Self::InvalidRequest => Code::LlmInvalidRequest,
            Self::RateLimited => Code::LlmRateLimited,
            Self::Unavailable => Code::LlmUnavailable,
            Self::Timeout => Code::LlmTimeout,
            Self::BadResponse => Code::LlmBadResponse,
            Self::Other => Code::LlmError,
        }
    }
}

/// An error reported by an LLM adapter (as opposed to the adapter crashing).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlmError {
    pub kind: LlmErrorKind,
    pub message: String,
    #[serde(default)]
    pub status: Option<u16>,
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default)]
    pub retry_after_ms: Option<u64>,
}

/// Identifies one step of one task; the idempotency key is stable across
/// re-runs of the same step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallContext {
    pub task_id: String,
    pub step: u32,
    pub idempotency_key: String,
    /// The tenant whose task this is. Never shown to the plugin: the host
    /// uses it to give each tenant writable folders of its own.
    #[serde(skip)]
    pub tenant: Option<String>,
    /// Where the tool's memory calls go (the step's journal), if it may
    /// make any.
    #[serde(skip)]
    pub memory: MemoryHandle,
}

impl CallContext {
    pub fn new(task_id: &str, step: u32) -> Self {
        Self {
            task_id: task_id.to_owned(),
            step,
            idempotency_key: format!("{task_id}:{step}"),
            tenant: None,
            memory: MemoryHandle::default(),
        }
    }

    /// The same context, for a task of `tenant`.
    pub fn for_tenant(mut self, tenant: &str) -> Self {
        self.tenant = Some(tenant.to_owned());
        self
    }
}

/// A finished step as a planner sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PlannerStep {
    LlmReply { response: ChatResponse },
    ToolResult { call: ToolCall, result: ToolResult },
    LlmFailed { message: String },
}

/// An earlier task of the same conversation thread, as a planner sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EarlierTask {
    pub goal: String,
    pub answer: Option<String>,
    pub steps: Vec<PlannerStep>,
}

/// Everything a planner is given to decide the next action. It borrows
/// from the task's run, so asking a planner copies only what crosses into
/// the plugin, not the journal or the tools' schemas.
#[derive(Debug, Clone)]
pub struct TaskState<'a> {
    /// The task's id: never shown to the planner, it scopes the planner's
    /// warm instances when they are kept per task.
    pub task_id: &'a str,
    pub goal: &'a str,
    pub tools: &'a [std::sync::Arc<ToolSpec>],
    pub steps: Vec<&'a PlannerStep>,
    pub history: &'a [EarlierTask],
    pub max_steps: u32,
    pub options: &'a Value,
    /// The tenant whose task this is (see [`CallContext::tenant`]).
    pub tenant: Option<&'a str>,
    /// Where the planner's memory calls go (see [`CallContext::memory`]).
    pub memory: MemoryHandle,
}

/// What a planner decided.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PlannerAction {
    CallLlm { request: Box<ChatRequest> },
    CallTools { calls: Vec<ToolCall> },
    Finish { answer: String },
    Fail { reason: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finish_reason_is_named_as_on_the_wire() {
        for reason in [
            FinishReason::Stop,
            FinishReason::ToolCalls,
            FinishReason::Length,
            FinishReason::ContentFilter,
            FinishReason::Other,
        ] {
            assert_eq!(serde_json::json!(reason), reason.as_str());
        }
    }
}
