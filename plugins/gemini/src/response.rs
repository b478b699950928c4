//! `GenerateContentResponse` bodies and chunks, and Gemini's error objects.

use llm_http::errors::kind_for_status;
use llm_http::http::Headers;
use llm_http::json::count;
use llm_http::wire::{Reply, ReplyContext};
use llm_http::{ChatResponse, FinishReason, LlmError, LlmErrorKind, Usage};
use serde_json::Value;

use crate::PROVIDER;

/// Reads a whole response body.
pub fn parse(body: &[u8], context: ReplyContext) -> Result<ChatResponse, LlmError> {
    let json: Value = serde_json::from_slice(body)
        .map_err(|error| PROVIDER.bad_response(&error.to_string(), body))?;
    let mut reply = Reply::new(context);
    read(&mut reply, &json, body, &mut |_| {})?;
    if json["candidates"].as_array().is_none_or(Vec::is_empty) && reply.finish_reason.is_none() {
        return Err(PROVIDER.bad_response("it has no candidates", body));
    }
    Ok(reply.into_response())
}

/// Adds one response (or streamed chunk) to `reply`; new text goes to `emit`.
pub fn read(
    reply: &mut Reply,
    json: &Value,
    body: &[u8],
    emit: &mut dyn FnMut(&str),
) -> Result<(), LlmError> {
    if let Some(error) = json.get("error").filter(|error| error.is_object()) {
        let status = error["code"]
            .as_u64()
            .and_then(|code| u16::try_from(code).ok());
        return Err(api_error(status, error, None, body));
    }
    let candidate = &json["candidates"][0];
    for part in candidate["content"]["parts"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(text) = part["text"].as_str() {
            // Thought summaries are not part of the answer.
            if part["thought"] != true && !text.is_empty() {
                reply.content.push_str(text);
                emit(text);
            }
        } else if let Some(call) = part.get("functionCall") {
            let name = call["name"]
                .as_str()
                .ok_or_else(|| PROVIDER.bad_response("a functionCall has no name", body))?;
            let args = match &call["args"] {
                Value::Null => String::new(),
                args => args.to_string(),
            };
            reply.push_call(call["id"].as_str(), name, args);
        }
    }
    if let Some(reason) = candidate["finishReason"].as_str() {
        reply.finish_reason = Some(finish_reason(reason));
    } else if json["promptFeedback"]["blockReason"].is_string() {
        reply.finish_reason = Some(FinishReason::ContentFilter);
    }
    let usage = &json["usageMetadata"];
    if usage.is_object() {
        // Thinking tokens are billed as output.
        let output = count(usage.get("candidatesTokenCount"))
            .saturating_add(count(usage.get("thoughtsTokenCount")));
        reply.usage = Some(Usage {
            input_tokens: count(usage.get("promptTokenCount")),
            output_tokens: output,
        });
    }
    reply.set_model(json["modelVersion"].as_str());
    Ok(())
}

pub fn finish_reason(reason: &str) -> FinishReason {
    match reason {
        "STOP" => FinishReason::Stop,
        "MAX_TOKENS" => FinishReason::Length,
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY" => {
            FinishReason::ContentFilter
        }
        _ => FinishReason::Other,
    }
}

/// The error for a response with a failure status.
pub fn status_error(status: u16, headers: &Headers, body: &[u8]) -> LlmError {
    let json: Value = serde_json::from_slice(body).unwrap_or_default();
    match json.get("error").filter(|error| error.is_object()) {
        Some(error) => api_error(Some(status), error, Some(headers), body),
        None => PROVIDER.status_error(status, headers, body),
    }
}

/// `{"code": 400, "message": ..., "status": "INVALID_ARGUMENT", "details": [...]}`,
/// mapped by its status name, else by its code.
fn api_error(
    status: Option<u16>,
    error: &Value,
    headers: Option<&Headers>,
    body: &[u8],
) -> LlmError {
    let kind = match error["status"].as_str().unwrap_or_default() {
        "UNAUTHENTICATED" | "PERMISSION_DENIED" => LlmErrorKind::Auth,
        // A bad key is reported as a bad argument.
        "INVALID_ARGUMENT" if has_reason(error, "API_KEY_INVALID") => LlmErrorKind::Auth,
        "INVALID_ARGUMENT" | "FAILED_PRECONDITION" | "NOT_FOUND" | "OUT_OF_RANGE" => {
            LlmErrorKind::InvalidRequest
        }
        "RESOURCE_EXHAUSTED" => LlmErrorKind::RateLimited,
        "UNAVAILABLE" | "INTERNAL" => LlmErrorKind::Unavailable,
        "DEADLINE_EXCEEDED" => LlmErrorKind::Timeout,
        _ => status.map_or(LlmErrorKind::Other, kind_for_status),
    };
    let mut llm_error = PROVIDER.error(kind, status, body);
    if kind == LlmErrorKind::RateLimited {
        llm_error.retry_after_ms = headers
            .and_then(llm_http::errors::retry_after_ms)
            .or_else(|| retry_delay_ms(error));
    }
    llm_error
}

fn details(error: &Value) -> impl Iterator<Item = &Value> {
    error["details"].as_array().into_iter().flatten()
}

fn has_reason(error: &Value, reason: &str) -> bool {
    details(error).any(|detail| detail["reason"] == reason)
}

/// `RetryInfo.retryDelay`, such as `"32s"` or `"1.5s"`.
fn retry_delay_ms(error: &Value) -> Option<u64> {
    details(error).find_map(|detail| {
        let seconds: f64 = detail["retryDelay"]
            .as_str()?
            .strip_suffix('s')?
            .parse()
            .ok()?;
        (seconds.is_finite() && seconds >= 0.0).then(|| (seconds * 1000.0).round() as u64)
    })
}
