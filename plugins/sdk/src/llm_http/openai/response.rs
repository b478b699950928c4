//! Chat Completions responses, and errors reported inside a body.

use serde_json::Value;

use crate::llm_http::errors::kind_for_status;
use crate::llm_http::json::{self, count};
use crate::llm_http::wire::{Reply, ReplyContext};
use crate::llm_http::{ChatResponse, FinishReason, LlmError, LlmErrorKind, Provider, Usage};

/// Reads a whole `chat.completion` body.
pub fn parse(
    provider: &Provider,
    body: &[u8],
    context: ReplyContext,
) -> Result<ChatResponse, LlmError> {
    let json = json::body(provider, body)?;
    if let Some(error) = body_error(provider, &json, body) {
        return Err(error);
    }
    let choices = json["choices"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let choice = match choices {
        [] => return Err(provider.bad_response("it has no choices", body)),
        [choice] => choice,
        more => return Err(several_choices(provider, more.len(), body)),
    };
    let message = choice
        .get("message")
        .ok_or_else(|| provider.bad_response("its choice has no message", body))?;

    let mut reply = Reply::new(context);
    reply.content = content(provider, &message["content"], body)?;
    // A refusal is the model's answer, kept as its text.
    if let Some(refusal) = message["refusal"].as_str() {
        reply.content.push_str(refusal);
    }
    for call in message["tool_calls"].as_array().into_iter().flatten() {
        let function = &call["function"];
        let name = function["name"]
            .as_str()
            .ok_or_else(|| provider.bad_response("a tool call has no function name", body))?;
        reply.push_call(call["id"].as_str(), name, arguments(&function["arguments"]));
    }
    reply.finish_reason = choice["finish_reason"].as_str().map(finish_reason);
    reply.usage = usage(&json["usage"]);
    reply.set_model(json["model"].as_str());
    Ok(reply.into_response())
}

/// A step takes one reply: a body with several choices (a request's `n`
/// above 1) is refused rather than cut to its first.
pub(super) fn several_choices(provider: &Provider, count: usize, body: &[u8]) -> LlmError {
    provider.bad_response(
        &format!("it has {count} choices, and a step takes one: leave `n` out of the options"),
        body,
    )
}

/// A message's content: text, or (as some compatible servers send it) a
/// list of text parts, all of them read. Parts of any other kind are refused,
/// since the step could not keep them.
fn content(provider: &Provider, content: &Value, body: &[u8]) -> Result<String, LlmError> {
    match content {
        Value::Null => Ok(String::new()),
        Value::String(text) => Ok(text.clone()),
        Value::Array(parts) => {
            let mut text = String::new();
            for part in parts {
                text.push_str(&text_part(provider, part, "text", body)?);
            }
            Ok(text)
        }
        other => Err(provider.bad_response(
            &format!("its message content is neither text nor a list of parts: {other}"),
            body,
        )),
    }
}

/// The text of one part of a message's content: a part of type
/// `text_type` (`text` here, `output_text` in the Responses API), or a
/// `refusal`, which is the model's answer and kept as its text. A part of
/// any other kind is refused, since the step could not keep it.
pub(crate) fn text_part(
    provider: &Provider,
    part: &Value,
    text_type: &str,
    body: &[u8],
) -> Result<String, LlmError> {
    match (part["type"].as_str(), part["text"].as_str()) {
        (Some(kind), Some(text)) if kind == text_type => Ok(text.to_owned()),
        (Some("refusal"), _) => Ok(part["refusal"].as_str().unwrap_or_default().to_owned()),
        (kind, _) => Err(provider.bad_response(
            &format!(
                "its message has a content part of type {}, which the adapter cannot keep",
                kind.unwrap_or("(none)")
            ),
            body,
        )),
    }
}

pub fn finish_reason(reason: &str) -> FinishReason {
    match reason {
        "stop" => FinishReason::Stop,
        "tool_calls" | "function_call" => FinishReason::ToolCalls,
        "length" => FinishReason::Length,
        "content_filter" => FinishReason::ContentFilter,
        _ => FinishReason::Other,
    }
}

pub(super) fn usage(usage: &Value) -> Option<Usage> {
    usage.is_object().then(|| Usage {
        input_tokens: count(usage.get("prompt_tokens")),
        output_tokens: count(usage.get("completion_tokens")),
    })
}

/// Arguments are a JSON string; a few compatible servers send the object.
pub(crate) fn arguments(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// An `error` object in a body that came with a success status, as
/// OpenRouter sends when a request fails after it was accepted (and OpenAI
/// in a broken stream). Its numeric `code` says what kind of failure it is,
/// and stands in for the status.
pub fn body_error(provider: &Provider, json: &Value, body: &[u8]) -> Option<LlmError> {
    let error = json.get("error").filter(|error| !error.is_null())?;
    let code = error.get("code").and_then(|code| match code {
        Value::Number(number) => number.as_u64(),
        Value::String(text) => text.parse().ok(),
        _ => None,
    });
    let code = code.and_then(|code| u16::try_from(code).ok());
    let kind = match code {
        Some(code) => kind_for_status(code),
        // Without a code it is the provider failing mid-answer.
        None => LlmErrorKind::Unavailable,
    };
    Some(provider.error(kind, code, body))
}
