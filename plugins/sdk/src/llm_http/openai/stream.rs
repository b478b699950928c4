//! Streamed Chat Completions: `chat.completion.chunk` events ending with
//! `data: [DONE]`, tool calls arriving in fragments keyed by their index.
//! Each chunk is translated on its own; the host joins the fragments.

use serde_json::Value;

use super::response::{arguments, body_error, finish_reason, usage};
use crate::llm_http::json;
use crate::llm_http::wire::{ReplyContext, more_arguments, usage_part};
use crate::llm_http::{LlmError, Provider, SseEvent, StreamPart};

pub fn decode(
    provider: &Provider,
    event: &SseEvent,
    context: &ReplyContext,
    parts: &mut Vec<StreamPart>,
) -> Result<(), LlmError> {
    let data = event.data.trim();
    if data == "[DONE]" {
        parts.push(StreamPart::Done);
        return Ok(());
    }
    let chunk = json::event(provider, data, "a stream chunk")?;
    if let Some(error) = body_error(provider, &chunk, data.as_bytes()) {
        return Err(error);
    }
    match chunk["model"].as_str().filter(|model| !model.is_empty()) {
        Some(model) => parts.push(StreamPart::Model(model.to_owned())),
        // Servers that never name the model still open with the role.
        None if opens_the_reply(&chunk) => parts.push(StreamPart::Model(context.model.clone())),
        None => {}
    }
    let choices = chunk["choices"].as_array().into_iter().flatten();
    for choice in choices {
        // A step takes one reply: a second choice (`n` above 1) is refused.
        if choice["index"].as_u64().unwrap_or(0) != 0 {
            return Err(super::response::several_choices(
                provider,
                choice["index"].as_u64().unwrap_or(0) as usize + 1,
                data.as_bytes(),
            ));
        }
        let delta = &choice["delta"];
        if let Some(text) = delta["content"].as_str().filter(|text| !text.is_empty()) {
            parts.push(StreamPart::Text(text.to_owned()));
        }
        // A refusal is the model's answer, kept as its text.
        if let Some(refusal) = delta["refusal"].as_str().filter(|text| !text.is_empty()) {
            parts.push(StreamPart::Text(refusal.to_owned()));
        }
        let fragments = delta["tool_calls"].as_array().into_iter().flatten();
        for (position, fragment) in fragments.enumerate() {
            let index = fragment["index"].as_u64().unwrap_or(position as u64);
            let index = u32::try_from(index).unwrap_or(u32::MAX);
            let function = &fragment["function"];
            let arguments = arguments(&function["arguments"]);
            // The first fragment of a call names it; later ones only add
            // arguments.
            parts.push(match function["name"].as_str() {
                Some(name) => context.first_piece(index, fragment["id"].as_str(), name, arguments),
                None => more_arguments(index, arguments),
            });
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            parts.push(StreamPart::Finish(finish_reason(reason)));
        }
    }
    if let Some(usage) = usage(&chunk["usage"]) {
        parts.push(usage_part(usage));
    }
    Ok(())
}

/// The first chunk of a reply, which gives the assistant role.
fn opens_the_reply(chunk: &Value) -> bool {
    chunk["choices"][0]["delta"]["role"].is_string()
}
