//! Whole Responses API answers (`"object": "response"`), and failures
//! reported inside one.

use serde_json::{Value, json};

use super::OUTPUT_KEY;
use crate::llm_http::json::{self, count};
use crate::llm_http::openai::{arguments, text_part};
use crate::llm_http::wire::{Reply, ReplyContext};
use crate::llm_http::{ChatResponse, FinishReason, LlmError, LlmErrorKind, Provider, Usage};

/// Reads a whole `response` object.
pub fn parse(
    provider: &Provider,
    body: &[u8],
    context: ReplyContext,
) -> Result<ChatResponse, LlmError> {
    let json = json::body(provider, body)?;
    if let Some(error) = failure(provider, &json, body) {
        return Err(error);
    }
    let status = json["status"].as_str();
    unfinished(provider, status, body)?;
    let output = json["output"]
        .as_array()
        .ok_or_else(|| provider.bad_response("it has no output items", body))?;
    let mut reply = Reply::new(context);
    for (index, item) in output.iter().enumerate() {
        let index = u32::try_from(index).unwrap_or(u32::MAX);
        read_item(provider, index, item, &mut reply, body)?;
    }
    reply.finish_reason = Some(finish_reason(status, &json["incomplete_details"]));
    reply.usage = usage(&json["usage"]);
    reply.set_model(json["model"].as_str());
    Ok(reply.into_response())
}

/// Adds output item `index` to the reply: a message's text, a function
/// call, or a reasoning item kept whole; each also recorded as provider data
/// so that the next request can give the items back in their order.
fn read_item(
    provider: &Provider,
    index: u32,
    item: &Value,
    reply: &mut Reply,
    body: &[u8],
) -> Result<(), LlmError> {
    let key = format!("{OUTPUT_KEY}{index}");
    match item["type"].as_str() {
        Some("message") => {
            for part in item["content"].as_array().into_iter().flatten() {
                reply
                    .content
                    .push_str(&text_part(provider, part, "output_text", body)?);
            }
            reply.keep(key, skeleton(item, None).to_string());
        }
        Some("function_call") => {
            let name = item["name"]
                .as_str()
                .ok_or_else(|| provider.bad_response("a function call has no name", body))?;
            let arguments = arguments(&item["arguments"]);
            let call_id = reply
                .push_call(item["call_id"].as_str(), name, arguments)
                .to_owned();
            reply.keep(key, skeleton(item, Some(&call_id)).to_string());
        }
        Some("reasoning") => reply.keep(key, item.to_string()),
        other => return Err(unknown_item(provider, other, body)),
    }
    Ok(())
}

/// What the next request needs of a message or function call item besides
/// its text or arguments: its type, its item id, and a call's id.
pub(super) fn skeleton(item: &Value, call_id: Option<&str>) -> Value {
    let mut skeleton = json!({"type": item["type"]});
    if let Some(id) = item["id"].as_str() {
        skeleton["id"] = json!(id);
    }
    if let Some(call_id) = call_id {
        skeleton["call_id"] = json!(call_id);
    }
    skeleton
}

/// An output item the adapter cannot keep: refused, not dropped.
pub(super) fn unknown_item(provider: &Provider, kind: Option<&str>, body: &[u8]) -> LlmError {
    provider.bad_response(
        &format!(
            "its output has an item of type {}, which the adapter cannot keep (it reads \
             messages, function calls and reasoning; offer no built-in tools)",
            kind.unwrap_or("(none)")
        ),
        body,
    )
}

/// A response that is not finished is not an answer: background mode
/// (`queued`, `in_progress`) would need polling, and a cancelled one has
/// nothing to give.
fn unfinished(provider: &Provider, status: Option<&str>, body: &[u8]) -> Result<(), LlmError> {
    match status {
        None | Some("completed") | Some("incomplete") => Ok(()),
        Some(status @ ("queued" | "in_progress")) => Err(provider.bad_response(
            &format!(
                "the response is still {status}, as in background mode, which a step cannot \
                 wait for: leave background out of options.llm"
            ),
            body,
        )),
        Some(status) => Err(provider.bad_response(
            &format!("the response ended with status {status}, without an answer"),
            body,
        )),
    }
}

/// The finish reason of a response with `status`: `incomplete` says why in
/// its details.
pub(super) fn finish_reason(status: Option<&str>, details: &Value) -> FinishReason {
    match status {
        Some("completed") => FinishReason::Stop,
        Some("incomplete") => match details["reason"].as_str() {
            Some("max_output_tokens") => FinishReason::Length,
            Some("content_filter") => FinishReason::ContentFilter,
            _ => FinishReason::Other,
        },
        _ => FinishReason::Other,
    }
}

pub(super) fn usage(usage: &Value) -> Option<Usage> {
    usage.is_object().then(|| Usage {
        input_tokens: count(usage.get("input_tokens")),
        output_tokens: count(usage.get("output_tokens")),
    })
}

/// A response that failed after it was accepted (`status: failed`, with its
/// `error`), or an `error` object in a body: the kind follows its code.
pub fn failure(provider: &Provider, json: &Value, body: &[u8]) -> Option<LlmError> {
    let error = json.get("error").filter(|error| !error.is_null());
    if error.is_none() && json["status"] != "failed" {
        return None;
    }
    let code = error.and_then(|error| error["code"].as_str());
    Some(provider.error(kind_for_code(code), None, body))
}

/// The kind of failure an error code means. Without a code (or with one not
/// known) it is the provider failing mid-answer.
pub(super) fn kind_for_code(code: Option<&str>) -> LlmErrorKind {
    match code.unwrap_or_default() {
        "rate_limit_exceeded" => LlmErrorKind::RateLimited,
        // The prompt or an image in it: sending it again cannot help.
        code if code.starts_with("invalid_") || code.contains("image") => {
            LlmErrorKind::InvalidRequest
        }
        code if code.ends_with("timeout") => LlmErrorKind::Timeout,
        _ => LlmErrorKind::Unavailable,
    }
}
