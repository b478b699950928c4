//! Messages API responses and error objects.

use opspawn_plugin::llm_http::json::{self, count};
use opspawn_plugin::llm_http::wire::{Reply, ReplyContext};
use opspawn_plugin::llm_http::{ChatResponse, FinishReason, LlmError, LlmErrorKind, Usage};
use serde_json::Value;

use crate::PROVIDER;

/// Reads a whole `message` body.
pub fn parse(body: &[u8], context: ReplyContext) -> Result<ChatResponse, LlmError> {
    let json = json::body(&PROVIDER, body)?;
    if json["type"] == "error" {
        return Err(error_object(&json, body));
    }
    let blocks = json["content"]
        .as_array()
        .ok_or_else(|| PROVIDER.bad_response("it has no content", body))?;
    let mut reply = Reply::new(context);
    for (index, block) in blocks.iter().enumerate() {
        match block["type"].as_str() {
            Some("text") => reply
                .content
                .push_str(block["text"].as_str().unwrap_or_default()),
            Some("tool_use") => {
                let name = block["name"]
                    .as_str()
                    .ok_or_else(|| PROVIDER.bad_response("a tool_use block has no name", body))?;
                let input = match &block["input"] {
                    Value::Null => String::new(),
                    input => input.to_string(),
                };
                reply.push_call(block["id"].as_str(), name, input);
            }
            Some("thinking") => {
                let text = block["thinking"].as_str().unwrap_or_default();
                reply.keep(Thinking::Text.key(index), text.to_owned());
                let signature = block["signature"].as_str().unwrap_or_default();
                reply.keep(Thinking::Signature.key(index), signature.to_owned());
            }
            Some("redacted_thinking") => {
                let data = block["data"].as_str().unwrap_or_default();
                reply.keep(Thinking::Redacted.key(index), data.to_owned());
            }
            // Server tools and the like: the adapter offers none, and the
            // step could not keep them.
            other => {
                return Err(PROVIDER.bad_response(
                    &format!(
                        "it has a content block of type {}, which the adapter cannot keep",
                        other.unwrap_or("(none)")
                    ),
                    body,
                ));
            }
        }
    }
    reply.finish_reason = json["stop_reason"].as_str().map(stop_reason);
    let usage = &json["usage"];
    reply.usage = usage.is_object().then(|| Usage {
        input_tokens: input_tokens(usage),
        output_tokens: count(usage.get("output_tokens")),
    });
    reply.set_model(json["model"].as_str());
    Ok(reply.into_response())
}

/// The pieces of a thinking block a message keeps in its provider data, by
/// the block's index in the reply: Anthropic wants the blocks back
/// unchanged, signatures and all, before the tool use they led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Thinking {
    /// `anthropic:thinking:<index>`: the block's text.
    Text,
    /// `anthropic:signature:<index>`: its signature.
    Signature,
    /// `anthropic:redacted_thinking:<index>`: a redacted block's data.
    Redacted,
}

impl Thinking {
    const PREFIXES: [(Thinking, &'static str); 3] = [
        (Thinking::Text, "anthropic:thinking:"),
        (Thinking::Signature, "anthropic:signature:"),
        (Thinking::Redacted, "anthropic:redacted_thinking:"),
    ];

    pub fn key(self, index: usize) -> String {
        let prefix = Self::PREFIXES
            .iter()
            .find(|(piece, _)| *piece == self)
            .map_or("", |(_, prefix)| prefix);
        format!("{prefix}{index}")
    }

    /// Which piece of which block `key` holds, if it is one of these.
    pub fn parse(key: &str) -> Option<(Thinking, usize)> {
        Self::PREFIXES
            .iter()
            .find_map(|(piece, prefix)| Some((*piece, key.strip_prefix(prefix)?.parse().ok()?)))
    }
}

pub fn stop_reason(reason: &str) -> FinishReason {
    match reason {
        "end_turn" | "stop_sequence" => FinishReason::Stop,
        "tool_use" => FinishReason::ToolCalls,
        "max_tokens" | "model_context_window_exceeded" => FinishReason::Length,
        "refusal" => FinishReason::ContentFilter,
        _ => FinishReason::Other,
    }
}

/// Input tokens, counting those read from or written to the prompt cache,
/// which Anthropic reports apart.
pub fn input_tokens(usage: &Value) -> u32 {
    [
        "input_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
    ]
    .into_iter()
    .fold(0u32, |sum, key| sum.saturating_add(count(usage.get(key))))
}

/// `{"type": "error", "error": {"type": ..., "message": ...}}`, as a body
/// or a stream's `error` event, mapped by its type.
pub fn error_object(json: &Value, body: &[u8]) -> LlmError {
    let kind = match json["error"]["type"].as_str().unwrap_or_default() {
        "authentication_error" | "permission_error" => LlmErrorKind::Auth,
        "invalid_request_error" | "not_found_error" | "request_too_large" => {
            LlmErrorKind::InvalidRequest
        }
        "rate_limit_error" => LlmErrorKind::RateLimited,
        "overloaded_error" | "api_error" => LlmErrorKind::Unavailable,
        "timeout_error" => LlmErrorKind::Timeout,
        _ => LlmErrorKind::Other,
    };
    PROVIDER.error(kind, None, body)
}
