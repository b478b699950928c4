//! Streamed Responses API answers: typed events about the response and
//! each output item, ending with `response.completed` (or `incomplete`,
//! `failed`, or an `error` event); there is no `[DONE]`. Each event is
//! translated on its own; the host joins the pieces:
//!
//! - `response.created`: the model.
//! - `response.output_item.added`: a function call's first piece (call id
//!   and name), keyed by its output index; an item of a type the adapter
//!   cannot keep is refused here.
//! - `response.output_text.delta`, `response.refusal.delta`: text.
//! - `response.function_call_arguments.delta`: more arguments.
//! - `response.output_item.done`: the item whole, kept as provider data
//!   (a reasoning item's `encrypted_content` arrives only here).
//! - `response.completed` / `response.incomplete`: usage, the finish reason
//!   and the end.
//!
//! The other events (content parts, texts and arguments done, reasoning
//! summaries, annotations) repeat what those carry, and add nothing.

use serde_json::Value;

use super::OUTPUT_KEY;
use super::response::{failure, finish_reason, kind_for_code, skeleton, unknown_item, usage};
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
    let bytes = data.as_bytes();
    let json = json::event(provider, data, "a stream event")?;
    // The type is in the data; the SSE event name repeats it.
    let kind = json["type"]
        .as_str()
        .or(event.event.as_deref())
        .unwrap_or_default();
    match kind {
        "response.created" | "response.in_progress" | "response.queued" => {
            if let Some(model) = json["response"]["model"].as_str().filter(|m| !m.is_empty()) {
                parts.push(StreamPart::Model(model.to_owned()));
            }
        }
        "response.output_item.added" => {
            let index = output_index(provider, &json, bytes)?;
            let item = &json["item"];
            match item["type"].as_str() {
                Some("function_call") => {
                    let name = item["name"].as_str().ok_or_else(|| {
                        provider.bad_response("a function call has no name", bytes)
                    })?;
                    let arguments = item["arguments"].as_str().unwrap_or_default().to_owned();
                    parts.push(context.first_piece(
                        index,
                        item["call_id"].as_str(),
                        name,
                        arguments,
                    ));
                }
                Some("message" | "reasoning") => {}
                other => return Err(unknown_item(provider, other, bytes)),
            }
        }
        "response.output_text.delta" | "response.refusal.delta" => {
            if let Some(text) = json["delta"].as_str().filter(|text| !text.is_empty()) {
                parts.push(StreamPart::Text(text.to_owned()));
            }
        }
        "response.function_call_arguments.delta" => {
            let index = output_index(provider, &json, bytes)?;
            if let Some(piece) = json["delta"].as_str().filter(|piece| !piece.is_empty()) {
                parts.push(more_arguments(index, piece.to_owned()));
            }
        }
        "response.output_item.done" => {
            let index = output_index(provider, &json, bytes)?;
            let item = &json["item"];
            let kept = match item["type"].as_str() {
                Some("reasoning") => item.clone(),
                Some("message") => skeleton(item, None),
                Some("function_call") => {
                    let call_id = context.piece_id(index, item["call_id"].as_str());
                    skeleton(item, Some(&call_id))
                }
                other => return Err(unknown_item(provider, other, bytes)),
            };
            parts.push(StreamPart::ProviderData((
                format!("{OUTPUT_KEY}{index}"),
                kept.to_string(),
            )));
        }
        "response.completed" | "response.incomplete" => {
            let response = &json["response"];
            if let Some(model) = response["model"].as_str().filter(|m| !m.is_empty()) {
                parts.push(StreamPart::Model(model.to_owned()));
            }
            if let Some(usage) = usage(&response["usage"]) {
                parts.push(usage_part(usage));
            }
            let status = response["status"].as_str().or(match kind {
                "response.completed" => Some("completed"),
                _ => Some("incomplete"),
            });
            parts.push(StreamPart::Finish(finish_reason(
                status,
                &response["incomplete_details"],
            )));
            parts.push(StreamPart::Done);
        }
        "response.failed" => {
            let response = &json["response"];
            return Err(failure(provider, response, bytes)
                .unwrap_or_else(|| provider.error(kind_for_code(None), None, bytes)));
        }
        "error" => {
            let code = json["code"].as_str().or(json["error"]["code"].as_str());
            return Err(provider.error(kind_for_code(code), None, bytes));
        }
        _ => {}
    }
    Ok(())
}

/// The output index an item event is about: the call's index for the host.
fn output_index(provider: &Provider, json: &Value, bytes: &[u8]) -> Result<u32, LlmError> {
    json["output_index"]
        .as_u64()
        .map(|index| u32::try_from(index).unwrap_or(u32::MAX))
        .ok_or_else(|| {
            provider.bad_response(
                &format!(
                    "its {} event has no output_index",
                    json["type"].as_str().unwrap_or("item")
                ),
                bytes,
            )
        })
}
