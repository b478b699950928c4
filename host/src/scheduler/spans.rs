//! The spans of a task's trace, exported when traces are on (see
//! [`crate::telemetry`]): `invoke_agent` for each run of a task (a resumed
//! task's runs share the trace it was submitted in), and under it `chat`
//! for an LLM step and `execute_tool` for a tool step, named and attributed
//! as the OpenTelemetry GenAI conventions say. Plugin calls are spans of
//! their own beneath (`crate::plugins`).
//!
//! Prompts, replies, tool arguments and results are recorded only when the
//! operator asks (`[traces] record_content`).

use std::sync::Arc;

use opentelemetry::trace::SpanKind;
use opentelemetry::{Array, KeyValue, StringValue, Value as OtelValue};
use serde_json::Value;

use crate::protocol::{ChatRequest, ChatResponse, ToolCall};
use crate::store::{ErrorInfo, TaskEnd, TaskRecord};
use crate::telemetry::{self, TraceSpan};

/// The span of one run of `task`, under the span that submitted it.
pub(super) fn task(task: &TaskRecord, attempt: i64) -> TraceSpan {
    if !telemetry::traces_on() {
        return TraceSpan::none();
    }
    let id: Arc<str> = task.id.as_str().into();
    let mut attributes = vec![
        KeyValue::new("gen_ai.operation.name", "invoke_agent"),
        KeyValue::new("gen_ai.agent.id", id.clone()),
        KeyValue::new("gen_ai.agent.name", task.planner.clone()),
        KeyValue::new("opspawn.task.id", id),
        KeyValue::new("opspawn.task.attempt", attempt),
        KeyValue::new("opspawn.tenant", task.tenant.clone()),
    ];
    if let Some(model) = &task.model {
        attributes.push(KeyValue::new("gen_ai.request.model", model.clone()));
    }
    TraceSpan::continuing(
        task.trace_parent.as_deref(),
        None,
        format!("invoke_agent {}", task.planner),
        SpanKind::Internal,
        attributes,
    )
}

/// Records how a run ended its task.
pub(super) fn task_ended(span: &TraceSpan, end: &TaskEnd) {
    if !span.is_recording() {
        return;
    }
    span.set_attribute(KeyValue::new("opspawn.task.status", end.status().as_str()));
    if let TaskEnd::Failed { error } | TaskEnd::AnswerRefused { error, .. } = end {
        failed(span, error);
    }
}

/// The span of an LLM step, under its task's.
pub(super) fn chat(
    task: &TraceSpan,
    adapter: &str,
    seq: u32,
    request: &ChatRequest,
    record_content: bool,
) -> TraceSpan {
    if !task.is_recording() {
        return TraceSpan::none();
    }
    let model = request.model.as_deref();
    let mut attributes = vec![
        KeyValue::new("gen_ai.operation.name", "chat"),
        KeyValue::new("gen_ai.provider.name", adapter.to_owned()),
        KeyValue::new("opspawn.step", i64::from(seq)),
    ];
    if let Some(model) = model {
        attributes.push(KeyValue::new("gen_ai.request.model", model.to_owned()));
    }
    if let Some(temperature) = request.temperature {
        attributes.push(KeyValue::new(
            "gen_ai.request.temperature",
            f64::from(temperature),
        ));
    }
    if let Some(max_tokens) = request.max_tokens {
        attributes.push(KeyValue::new(
            "gen_ai.request.max_tokens",
            i64::from(max_tokens),
        ));
    }
    if record_content {
        attributes.push(KeyValue::new(
            "gen_ai.input.messages",
            json_text(&request.messages),
        ));
        if let Some(system) = &request.system {
            attributes.push(KeyValue::new("gen_ai.system_instructions", system.clone()));
        }
    }
    let name = match model {
        Some(model) => format!("chat {model}"),
        None => "chat".to_owned(),
    };
    task.child_of(name, SpanKind::Client, attributes)
}

/// The span of a tool step, under its task's.
pub(super) fn execute_tool(
    task: &TraceSpan,
    plugin: &str,
    seq: u32,
    call: &ToolCall,
    record_content: bool,
) -> TraceSpan {
    if !task.is_recording() {
        return TraceSpan::none();
    }
    let mut attributes = vec![
        KeyValue::new("gen_ai.operation.name", "execute_tool"),
        KeyValue::new("gen_ai.tool.name", call.name.clone()),
        KeyValue::new("gen_ai.tool.call.id", call.id.clone()),
        KeyValue::new("gen_ai.tool.type", "function"),
        KeyValue::new("opspawn.plugin.name", plugin.to_owned()),
        KeyValue::new("opspawn.step", i64::from(seq)),
    ];
    if record_content {
        attributes.push(KeyValue::new(
            "gen_ai.tool.call.arguments",
            call.arguments.to_string(),
        ));
    }
    task.child_of(
        format!("execute_tool {}", call.name),
        SpanKind::Internal,
        attributes,
    )
}

/// Records how a step ended: the reply's model, tokens and finish reason
/// for an LLM step, the error for a failed one, and the retries it took.
pub(super) fn step_ended(
    span: &TraceSpan,
    output: &Result<Value, ErrorInfo>,
    reply: Option<&ChatResponse>,
    retries: u32,
    record_content: bool,
) {
    if !span.is_recording() {
        return;
    }
    if retries > 0 {
        span.set_attribute(KeyValue::new("opspawn.step.retries", i64::from(retries)));
    }
    if let Some(reply) = reply {
        span.set_attribute(KeyValue::new("gen_ai.response.model", reply.model.clone()));
        span.set_attribute(KeyValue::new(
            "gen_ai.response.finish_reasons",
            OtelValue::Array(Array::String(vec![StringValue::from(
                reply.finish_reason.as_str(),
            )])),
        ));
        if let Some(usage) = reply.usage {
            span.set_attribute(KeyValue::new(
                "gen_ai.usage.input_tokens",
                usage.input_tokens as i64,
            ));
            span.set_attribute(KeyValue::new(
                "gen_ai.usage.output_tokens",
                usage.output_tokens as i64,
            ));
        }
        if record_content {
            span.set_attribute(KeyValue::new(
                "gen_ai.output.messages",
                json_text(&[&reply.message]),
            ));
        }
    } else if record_content && let Ok(result) = output {
        span.set_attribute(KeyValue::new("gen_ai.tool.call.result", result.to_string()));
    }
    if let Err(error) = output {
        failed(span, error);
    }
}

fn failed(span: &TraceSpan, error: &ErrorInfo) {
    span.set_error(error.message.clone());
    span.set_attribute(KeyValue::new("error.type", error.code.clone()));
}

fn json_text(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).unwrap_or_default()
}
