//! Conversions between the neutral protocol types and the WIT bindings of
//! each version.
//!
//! JSON crosses the boundary as text. Text a plugin produces that should be
//! JSON but is not is kept as a JSON string rather than dropped, so the step
//! journal shows exactly what the plugin said.
//!
//! Types whose shape is the same in every version (tool specs and calls,
//! roles, usage, errors) are converted by [`shared_conversions!`], expanded
//! once per version against that version's generated `wit` module.

pub mod v0_1;
pub mod v0_2;

use serde_json::Value;

use crate::protocol::to_json_text;

/// Parses JSON a plugin produced, keeping unparseable text as a string.
pub fn lenient_json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
}

/// How many bytes `value` takes as JSON, counted without writing it out.
pub fn json_size(value: &impl serde::Serialize) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing to a counter cannot fail, nor can serializing protocol types.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

/// A JSON value as text, where a string that holds unparseable arguments
/// goes back out verbatim.
fn json_text(value: &Value) -> String {
    match value {
        Value::String(raw) if serde_json::from_str::<Value>(raw).is_err() => raw.clone(),
        other => to_json_text(other),
    }
}

/// Conversions for the types every WIT version shares, against the `wit`
/// and `wit_planning` modules (that version's `types` and `planning`) in
/// scope where it is expanded, and its own `message_to_wit`,
/// `message_from_wit` and `request_from_wit`, which differ by version.
macro_rules! shared_conversions {
    () => {
        use crate::protocol::{
            CallContext, FinishReason, LlmError, LlmErrorKind, Role, ToolCall, ToolResult,
            ToolSpec, Usage,
        };
        use $crate::plugins::convert::{json_text, lenient_json};

        pub fn context_to_wit(ctx: &CallContext) -> wit::CallContext {
            wit::CallContext {
                task_id: ctx.task_id.clone(),
                step: ctx.step,
                idempotency_key: ctx.idempotency_key.clone(),
            }
        }

        pub fn tool_spec_from_wit(spec: wit::ToolSpec) -> Result<ToolSpec, String> {
            let input_schema: serde_json::Value = serde_json::from_str(&spec.input_schema)
                .map_err(|e| {
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
                input_schema: to_json_text(&spec.input_schema),
            }
        }

        fn tool_spec_from_planner(spec: wit::ToolSpec) -> ToolSpec {
            ToolSpec {
                input_schema: lenient_json(&spec.input_schema),
                name: spec.name,
                description: spec.description,
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

        fn tool_result_to_wit(result: &ToolResult) -> wit::ToolResult {
            wit::ToolResult {
                call_id: result.call_id.clone(),
                name: result.name.clone(),
                content: result.content.clone(),
                is_error: result.is_error,
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

        fn finish_reason_to_wit(reason: FinishReason) -> wit::FinishReason {
            match reason {
                FinishReason::Stop => wit::FinishReason::Stop,
                FinishReason::ToolCalls => wit::FinishReason::ToolCalls,
                FinishReason::Length => wit::FinishReason::Length,
                FinishReason::ContentFilter => wit::FinishReason::ContentFilter,
                FinishReason::Other => wit::FinishReason::Other,
            }
        }

        pub fn finish_reason_from_wit(reason: wit::FinishReason) -> FinishReason {
            match reason {
                wit::FinishReason::Stop => FinishReason::Stop,
                wit::FinishReason::ToolCalls => FinishReason::ToolCalls,
                wit::FinishReason::Length => FinishReason::Length,
                wit::FinishReason::ContentFilter => FinishReason::ContentFilter,
                wit::FinishReason::Other => FinishReason::Other,
            }
        }

        fn usage_to_wit(usage: Usage) -> wit::Usage {
            wit::Usage {
                input_tokens: u32::try_from(usage.input_tokens).unwrap_or(u32::MAX),
                output_tokens: u32::try_from(usage.output_tokens).unwrap_or(u32::MAX),
            }
        }

        fn usage_from_wit(usage: wit::Usage) -> Usage {
            Usage {
                input_tokens: usage.input_tokens.into(),
                output_tokens: usage.output_tokens.into(),
            }
        }

        fn response_to_wit(response: &crate::protocol::ChatResponse) -> wit::ChatResponse {
            wit::ChatResponse {
                message: message_to_wit(&response.message),
                finish_reason: finish_reason_to_wit(response.finish_reason),
                usage: response.usage.map(usage_to_wit),
                model: response.model.clone(),
            }
        }

        pub fn response_from_wit(response: wit::ChatResponse) -> crate::protocol::ChatResponse {
            crate::protocol::ChatResponse {
                message: message_from_wit(response.message),
                finish_reason: finish_reason_from_wit(response.finish_reason),
                usage: response.usage.map(usage_from_wit),
                model: response.model,
            }
        }

        fn step_to_wit(step: &crate::protocol::PlannerStep) -> wit_planning::Step {
            use crate::protocol::PlannerStep;
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
                PlannerStep::LlmFailed { message } => {
                    wit_planning::Step::LlmFailed(message.clone())
                }
            }
        }

        pub fn action_from_wit(action: wit_planning::Action) -> crate::protocol::PlannerAction {
            use crate::protocol::PlannerAction;
            match action {
                wit_planning::Action::CallLlm(request) => PlannerAction::CallLlm {
                    request: Box::new(request_from_wit(request)),
                },
                wit_planning::Action::CallTools(calls) => PlannerAction::CallTools {
                    calls: calls.into_iter().map(tool_call_from_wit).collect(),
                },
                wit_planning::Action::Finish(answer) => PlannerAction::Finish { answer },
                wit_planning::Action::Fail(reason) => PlannerAction::Fail { reason },
            }
        }

        /// The action, unless it asks for more than `max_calls` tool calls:
        /// then how many it asks for, counted before anything is converted.
        pub fn action_from_wit_bounded(
            action: wit_planning::Action,
            max_calls: u64,
        ) -> Result<crate::protocol::PlannerAction, usize> {
            match &action {
                wit_planning::Action::CallTools(calls) if calls.len() as u64 > max_calls => {
                    Err(calls.len())
                }
                _ => Ok(action_from_wit(action)),
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
    };
}
pub(crate) use shared_conversions;
