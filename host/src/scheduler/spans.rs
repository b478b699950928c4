//! The spans of a task's trace, exported when traces are on (see
//! [`crate::telemetry`]): `invoke_agent` for each run of a task (a resumed
//! task's runs share the trace it was submitted in), and under it `chat`
//! for an LLM step and `execute_tool` for a tool step, named and attributed
//! as the OpenTelemetry GenAI conventions say. Plugin calls are spans of
//! their own beneath (`crate::plugins`).
//!
//! Prompts, replies, tool arguments and results are recorded only when the
//! operator asks (`[traces] record_content`).

use opentelemetry::{Array, StringValue, Value as OtelValue};
use serde_json::Value;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::protocol::{ChatRequest, ChatResponse, ToolCall};
use crate::store::{ErrorInfo, TaskEnd, TaskRecord};
use crate::telemetry::{self, TRACE_TARGET};

/// The span of one run of `task`, under the span that submitted it.
pub(super) fn task(task: &TaskRecord, attempt: i64) -> Span {
    if !telemetry::traces_on() {
        return Span::none();
    }
    let span = tracing::info_span!(
        target: TRACE_TARGET,
        parent: None,
        "invoke_agent",
        "otel.name" = format!("invoke_agent {}", task.planner),
        "gen_ai.operation.name" = "invoke_agent",
        "gen_ai.agent.id" = %task.id,
        "gen_ai.agent.name" = %task.planner,
        "gen_ai.request.model" = task.model.as_deref(),
        "opspawn.task.id" = %task.id,
        "opspawn.task.attempt" = attempt,
        "opspawn.tenant" = %task.tenant,
    );
    telemetry::continue_trace(&span, task.trace_parent.as_deref(), None);
    span
}

/// Records how a run ended its task.
pub(super) fn task_ended(span: &Span, end: &TaskEnd) {
    if span.is_disabled() {
        return;
    }
    span.set_attribute("opspawn.task.status", end.status().as_str());
    if let TaskEnd::Failed { error } | TaskEnd::AnswerRefused { error, .. } = end {
        failed(span, error);
    }
}

/// The span of an LLM step.
pub(super) fn chat(adapter: &str, seq: u32, request: &ChatRequest, record_content: bool) -> Span {
    if !telemetry::traces_on() {
        return Span::none();
    }
    let model = request.model.as_deref();
    let span = tracing::info_span!(
        target: TRACE_TARGET,
        "chat",
        "otel.name" = match model {
            Some(model) => format!("chat {model}"),
            None => "chat".to_owned(),
        },
        "otel.kind" = "client",
        "gen_ai.operation.name" = "chat",
        "gen_ai.provider.name" = adapter,
        "gen_ai.request.model" = model,
        "gen_ai.request.temperature" = request.temperature.map(f64::from),
        "gen_ai.request.max_tokens" = request.max_tokens.map(i64::from),
        "opspawn.step" = i64::from(seq),
    );
    if record_content {
        span.set_attribute("gen_ai.input.messages", json_text(&request.messages));
        if let Some(system) = &request.system {
            span.set_attribute("gen_ai.system_instructions", system.clone());
        }
    }
    span
}

/// The span of a tool step.
pub(super) fn execute_tool(plugin: &str, seq: u32, call: &ToolCall, record_content: bool) -> Span {
    if !telemetry::traces_on() {
        return Span::none();
    }
    let span = tracing::info_span!(
        target: TRACE_TARGET,
        "execute_tool",
        "otel.name" = format!("execute_tool {}", call.name),
        "gen_ai.operation.name" = "execute_tool",
        "gen_ai.tool.name" = %call.name,
        "gen_ai.tool.call.id" = %call.id,
        "gen_ai.tool.type" = "function",
        "opspawn.plugin.name" = plugin,
        "opspawn.step" = i64::from(seq),
    );
    if record_content {
        span.set_attribute("gen_ai.tool.call.arguments", call.arguments.to_string());
    }
    span
}

/// Records how a step ended: the reply's model, tokens and finish reason
/// for an LLM step, the error for a failed one, and the retries it took.
pub(super) fn step_ended(
    span: &Span,
    output: &Result<Value, ErrorInfo>,
    reply: Option<&ChatResponse>,
    retries: u32,
    record_content: bool,
) {
    if span.is_disabled() {
        return;
    }
    if retries > 0 {
        span.set_attribute("opspawn.step.retries", i64::from(retries));
    }
    if let Some(reply) = reply {
        span.set_attribute("gen_ai.response.model", reply.model.clone());
        let reason = serde_json::to_value(reply.finish_reason)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        span.set_attribute(
            "gen_ai.response.finish_reasons",
            OtelValue::Array(Array::String(vec![StringValue::from(reason)])),
        );
        if let Some(usage) = reply.usage {
            span.set_attribute("gen_ai.usage.input_tokens", usage.input_tokens as i64);
            span.set_attribute("gen_ai.usage.output_tokens", usage.output_tokens as i64);
        }
        if record_content {
            span.set_attribute("gen_ai.output.messages", json_text(&[&reply.message]));
        }
    } else if record_content && let Ok(result) = output {
        span.set_attribute("gen_ai.tool.call.result", result.to_string());
    }
    if let Err(error) = output {
        failed(span, error);
    }
}

fn failed(span: &Span, error: &ErrorInfo) {
    span.set_status(opentelemetry::trace::Status::error(error.message.clone()));
    span.set_attribute("error.type", error.code.clone());
}

fn json_text(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).unwrap_or_default()
}
