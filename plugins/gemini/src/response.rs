//! `GenerateContentResponse` bodies and chunks, and Gemini's error objects.

use opspawn_plugin::llm_http::errors::kind_for_status;
use opspawn_plugin::llm_http::headers::Headers;
use opspawn_plugin::llm_http::json::{self, count};
use opspawn_plugin::llm_http::wire::{Reply, ReplyContext};
use opspawn_plugin::llm_http::{ChatResponse, FinishReason, LlmError, LlmErrorKind, Usage};
use serde_json::Value;

use crate::PROVIDER;

/// Reads a whole response body.
pub fn parse(body: &[u8], context: ReplyContext) -> Result<ChatResponse, LlmError> {
    let json = json::body(&PROVIDER, body)?;
    let mut reply = Reply::new(context);
    read(&mut reply, &json, body)?;
    if json["candidates"].as_array().is_none_or(Vec::is_empty) && reply.finish_reason.is_none() {
        return Err(PROVIDER.bad_response("it has no candidates", body));
    }
    Ok(reply.into_response())
}

/// Adds one whole response to `reply`.
fn read(reply: &mut Reply, json: &Value, body: &[u8]) -> Result<(), LlmError> {
    for piece in pieces(json, body)? {
        match piece {
            Piece::Text(text) => reply.content.push_str(text),
            Piece::Call {
                id,
                name,
                args,
                signature,
            } => {
                let id = reply.push_call(id, name, args).to_owned();
                if let Some(signature) = signature {
                    reply.keep(call_signature_key(&id), signature.to_owned());
                }
            }
            Piece::TextSignature(signature) => {
                reply.keep(TEXT_SIGNATURE_KEY.to_owned(), signature.to_owned());
            }
        }
    }
    reply.finish_reason = finish(json);
    reply.usage = usage(json);
    reply.set_model(json["modelVersion"].as_str());
    Ok(())
}

/// Where a message keeps the thought signature of its text (Gemini puts
/// one on the last part of a reply without calls).
pub const TEXT_SIGNATURE_KEY: &str = "gemini:thought_signature";

/// Where a message keeps the thought signature of its call `id`. Gemini 3
/// refuses a conversation whose current turn holds a call without the
/// signature it came with.
pub fn call_signature_key(id: &str) -> String {
    format!("{TEXT_SIGNATURE_KEY}:{id}")
}

/// What one part of the answer says.
pub enum Piece<'a> {
    Text(&'a str),
    Call {
        id: Option<&'a str>,
        name: &'a str,
        args: String,
        /// The opaque `thoughtSignature` that came with the call.
        signature: Option<&'a str>,
    },
    /// The `thoughtSignature` of a part that is not a call.
    TextSignature(&'a str),
}

/// The answer's parts in a response or a streamed chunk, or the error it
/// carries instead.
pub fn pieces<'a>(json: &'a Value, body: &[u8]) -> Result<Vec<Piece<'a>>, LlmError> {
    if let Some(error) = json.get("error").filter(|error| error.is_object()) {
        let status = error["code"]
            .as_u64()
            .and_then(|code| u16::try_from(code).ok());
        return Err(api_error(status, error, None, body));
    }
    // A step takes one reply: several candidates are refused, not cut short.
    if let Some(count) = json["candidates"]
        .as_array()
        .map(Vec::len)
        .filter(|n| *n > 1)
    {
        return Err(PROVIDER.bad_response(
            &format!("it has {count} candidates, and a step takes one"),
            body,
        ));
    }
    let mut pieces = Vec::new();
    let parts = json["candidates"][0]["content"]["parts"].as_array();
    for part in parts.into_iter().flatten() {
        let signature = part["thoughtSignature"]
            .as_str()
            .filter(|signature| !signature.is_empty());
        if let Some(text) = part["text"].as_str() {
            // Thought summaries are not part of the answer.
            if part["thought"] != true && !text.is_empty() {
                pieces.push(Piece::Text(text));
            }
            if let Some(signature) = signature {
                pieces.push(Piece::TextSignature(signature));
            }
        } else if let Some(call) = part.get("functionCall") {
            let name = call["name"]
                .as_str()
                .ok_or_else(|| PROVIDER.bad_response("a functionCall has no name", body))?;
            let args = match &call["args"] {
                Value::Null => String::new(),
                args => args.to_string(),
            };
            pieces.push(Piece::Call {
                id: call["id"].as_str(),
                name,
                args,
                signature,
            });
        } else if let Some(kind) = part.as_object().and_then(|part| {
            part.keys()
                .find(|key| !matches!(key.as_str(), "thoughtSignature" | "thought"))
        }) {
            // Code execution, inline data, files: the adapter offers none of
            // it, and the step could not keep it.
            return Err(PROVIDER.bad_response(
                &format!("a part holds {kind}, which the adapter cannot keep"),
                body,
            ));
        } else if let Some(signature) = signature {
            pieces.push(Piece::TextSignature(signature));
        }
    }
    Ok(pieces)
}

/// The finish reason a response or chunk gives, if any: a blocked prompt
/// ends the answer as filtered.
pub fn finish(json: &Value) -> Option<FinishReason> {
    if let Some(reason) = json["candidates"][0]["finishReason"].as_str() {
        Some(finish_reason(reason))
    } else if json["promptFeedback"]["blockReason"].is_string() {
        Some(FinishReason::ContentFilter)
    } else {
        None
    }
}

pub fn usage(json: &Value) -> Option<Usage> {
    let usage = &json["usageMetadata"];
    usage.is_object().then(|| Usage {
        input_tokens: count(usage.get("promptTokenCount")),
        // Thinking tokens are billed as output.
        output_tokens: count(usage.get("candidatesTokenCount"))
            .saturating_add(count(usage.get("thoughtsTokenCount"))),
    })
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
            .and_then(opspawn_plugin::llm_http::errors::retry_after_ms)
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
