//! Conversions between the neutral protocol types and the WIT bindings.
//!
//! JSON crosses the boundary as text. Text a plugin produces that should be
//! JSON but is not is kept as a JSON string rather than dropped, so the step
//! journal shows exactly what the plugin said.

use serde_json::Value;

use super::bindings::planner::exports::opspawn::plugin::planning as wit_planning;
use super::bindings::types as wit;
use crate::protocol::{
    CallContext, ChatMessage, ChatRequest, ChatResponse, FinishReason, LlmError, LlmErrorKind,
    PlannerAction, PlannerStep, Role, TaskState, ToolCall, ToolResult, ToolSpec, Usage,
};

/// Parses JSON a plugin produced, keeping unparseable text as a string.
pub fn lenient_json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
}

pub fn context_to_wit(ctx: &CallContext) -> wit::CallContext {
    wit::CallContext {
        task_id: ctx.task_id.clone(),
        step: ctx.step,
        idempotency_key: ctx.idempotency_key.clone(),
    }
}

pub fn tool_spec_from_wit(spec: wit::ToolSpec) -> Result<ToolSpec, String> {
    let input_schema: Value = serde_json::from_str(&spec.input_schema).map_err(|e| {
        format!(
            "tool {:?} has an input schema that is not JSON: {e}",
            spec.name
        )
    })?;
    if !input_schema.is_object() {
        return Err(format!(
            "tool {:?} has an input schema that is not a JSON object",
            spec.name
        ));
    }
    Ok(ToolSpec {
        name: spec.name,
        description: spec.description,
        input_schema,
    })
}

fn tool_spec_to_wit(spec: &ToolSpec) -> wit::ToolSpec {
    wit::ToolSpec {
        name: spec.name.clone(),
        description: spec.description.clone(),
        input_schema: spec.input_schema.to_string(),
    }
}

fn tool_call_to_wit(call: &ToolCall) -> wit::ToolCall {
    wit::ToolCall {
        id: call.id.clone(),
        name: call.name.clone(),
        arguments: json_text(&call.arguments),
    }
}

fn tool_call_from_wit(call: wit::ToolCall) -> ToolCall {
    ToolCall {
        id: call.id,
        name: call.name,
        arguments: lenient_json(&call.arguments),
    }
}

/// A JSON value as text, where a string that holds unparseable arguments
/// goes back out verbatim.
fn json_text(value: &Value) -> String {
    match value {
        Value::String(raw) if serde_json::from_str::<Value>(raw).is_err() => raw.clone(),
        other => other.to_string(),
    }
}

fn role_to_wit(role: Role) -> wit::Role {
    match role {
        Role::System => wit::Role::System,
        Role::User => wit::Role::User,
        Role::Assistant => wit::Role::Assistant,
        Role::Tool => wit::Role::Tool,
    }
}

fn role_from_wit(role: wit::Role) -> Role {
    match role {
        wit::Role::System => Role::System,
        wit::Role::User => Role::User,
        wit::Role::Assistant => Role::Assistant,
        wit::Role::Tool => Role::Tool,
    }
}

fn message_to_wit(message: &ChatMessage) -> wit::ChatMessage {
    wit::ChatMessage {
        role: role_to_wit(message.role),
        content: message.content.clone(),
        tool_calls: message.tool_calls.iter().map(tool_call_to_wit).collect(),
        tool_call_id: message.tool_call_id.clone(),
    }
}

fn message_from_wit(message: wit::ChatMessage) -> ChatMessage {
    ChatMessage {
        role: role_from_wit(message.role),
        content: message.content,
        tool_calls: message
            .tool_calls
            .into_iter()
            .map(tool_call_from_wit)
            .collect(),
        tool_call_id: message.tool_call_id,
    }
}

pub fn request_to_wit(request: &ChatRequest) -> wit::ChatRequest {
    wit::ChatRequest {
        model: request.model.clone(),
        system: request.system.clone(),
        messages: request.messages.iter().map(message_to_wit).collect(),
        tools: request.tools.iter().map(tool_spec_to_wit).collect(),
        temperature: request.temperature,
        max_tokens: request.max_tokens,
        stop: request.stop.clone(),
        provider_options: request.provider_options.to_string(),
    }
}

fn request_from_wit(request: wit::ChatRequest) -> ChatRequest {
    ChatRequest {
        model: request.model,
        system: request.system,
        messages: request.messages.into_iter().map(message_from_wit).collect(),
        tools: request
            .tools
            .into_iter()
            .map(|spec| ToolSpec {
                input_schema: lenient_json(&spec.input_schema),
                name: spec.name,
                description: spec.description,
            })
            .collect(),
        temperature: request.temperature,
        max_tokens: request.max_tokens,
        stop: request.stop,
        provider_options: lenient_json(&request.provider_options),
    }
}

fn finish_reason_to_wit(reason: FinishReason) -> wit::FinishReason {
    match reason {
        FinishReason::Stop => wit::FinishReason::Stop,
        FinishReason::ToolCalls => wit::FinishReason::ToolCalls,
        FinishReason::Length => wit::FinishReason::Length,
        FinishReason::ContentFilter => wit::FinishReason::ContentFilter,
        FinishReason::Other => wit::FinishReason::Other,
    }
}

fn finish_reason_from_wit(reason: wit::FinishReason) -> FinishReason {
    match reason {
        wit::FinishReason::Stop => FinishReason::Stop,
        wit::FinishReason::ToolCalls => FinishReason::ToolCalls,
        wit::FinishReason::Length => FinishReason::Length,
        wit::FinishReason::ContentFilter => FinishReason::ContentFilter,
        wit::FinishReason::Other => FinishReason::Other,
    }
}

fn response_to_wit(response: &ChatResponse) -> wit::ChatResponse {
    wit::ChatResponse {
        message: message_to_wit(&response.message),
        finish_reason: finish_reason_to_wit(response.finish_reason),
        usage: response.usage.map(|u| wit::Usage {
            input_tokens: u.input_tokens.min(u32::MAX as u64) as u32,
            output_tokens: u.output_tokens.min(u32::MAX as u64) as u32,
        }),
        model: response.model.clone(),
    }
}

pub fn response_from_wit(response: wit::ChatResponse) -> ChatResponse {
    ChatResponse {
        message: message_from_wit(response.message),
        finish_reason: finish_reason_from_wit(response.finish_reason),
        usage: response.usage.map(|u| Usage {
            input_tokens: u.input_tokens.into(),
            output_tokens: u.output_tokens.into(),
        }),
        model: response.model,
    }
}

pub fn llm_error_from_wit(error: wit::LlmError) -> LlmError {
    LlmError {
        kind: match error.kind {
            wit::LlmErrorKind::Auth => LlmErrorKind::Auth,
            wit::LlmErrorKind::InvalidRequest => LlmErrorKind::InvalidRequest,
            wit::LlmErrorKind::RateLimited => LlmErrorKind::RateLimited,
            wit::LlmErrorKind::Unavailable => LlmErrorKind::Unavailable,
            wit::LlmErrorKind::Timeout => LlmErrorKind::Timeout,
            wit::LlmErrorKind::BadResponse => LlmErrorKind::BadResponse,
            wit::LlmErrorKind::Other => LlmErrorKind::Other,
        },
        message: error.message,
        status: error.status,
        body: error.body,
        retry_after_ms: error.retry_after_ms,
    }
}

pub fn state_to_wit(state: &TaskState) -> wit_planning::TaskState {
    wit_planning::TaskState {
        goal: state.goal.clone(),
        tools: state.tools.iter().map(tool_spec_to_wit).collect(),
        steps: state.steps.iter().map(step_to_wit).collect(),
        max_steps: state.max_steps,
        options: state.options.to_string(),
    }
}

fn step_to_wit(step: &PlannerStep) -> wit_planning::Step {
    match step {
        PlannerStep::LlmReply { response } => {
            wit_planning::Step::LlmReply(response_to_wit(response))
        }
        PlannerStep::ToolResult { call, result } => {
            wit_planning::Step::ToolResult(wit_planning::ToolCallOutcome {
                call: tool_call_to_wit(call),
                result: tool_result_to_wit(result),
            })
        }
        PlannerStep::LlmFailed { message } => wit_planning::Step::LlmFailed(message.clone()),
    }
}

fn tool_result_to_wit(result: &ToolResult) -> wit::ToolResult {
    wit::ToolResult {
        call_id: result.call_id.clone(),
        name: result.name.clone(),
        content: result.content.clone(),
        is_error: result.is_error,
    }
}

pub fn action_from_wit(action: wit_planning::Action) -> PlannerAction {
    match action {
        wit_planning::Action::CallLlm(request) => PlannerAction::CallLlm {
            request: request_from_wit(request),
        },
        wit_planning::Action::CallTools(calls) => PlannerAction::CallTools {
            calls: calls.into_iter().map(tool_call_from_wit).collect(),
        },
        wit_planning::Action::Finish(answer) => PlannerAction::Finish { answer },
        wit_planning::Action::Fail(reason) => PlannerAction::Fail { reason },
    }
}
