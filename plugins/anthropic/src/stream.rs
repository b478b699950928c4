//! Streamed Messages API responses: `message_start`, then per content block
//! `content_block_start`, `content_block_delta`s and `content_block_stop`,
//! then `message_delta` and `message_stop`; `ping` and `error` may come
//! anywhere. Each event is translated on its own: a tool-use block's index
//! keys its call, and the host joins the `input_json_delta` pieces.

use opspawn_plugin::llm_http::json::count;
use opspawn_plugin::llm_http::wire::{ReplyContext, more_arguments};
use opspawn_plugin::llm_http::{LlmError, SseEvent, StreamPart, UsagePart};
use serde_json::Value;

use crate::PROVIDER;
use crate::response::{Thinking, error_object, input_tokens, stop_reason};

pub fn decode(
    event: &SseEvent,
    context: &ReplyContext,
    parts: &mut Vec<StreamPart>,
) -> Result<(), LlmError> {
    let data = event.data.as_bytes();
    let json: Value = serde_json::from_slice(data).map_err(|error| {
        PROVIDER.bad_response(&format!("a stream event is not JSON: {error}"), data)
    })?;
    let index = json["index"].as_u64().unwrap_or(0);
    let index = u32::try_from(index).unwrap_or(u32::MAX);
    let keep = |parts: &mut Vec<StreamPart>, piece: Thinking, value: Option<&str>| {
        parts.push(StreamPart::ProviderData((
            piece.key(index as usize),
            value.unwrap_or_default().to_owned(),
        )));
    };
    let text = |parts: &mut Vec<StreamPart>, text: Option<&str>| {
        if let Some(text) = text.filter(|text| !text.is_empty()) {
            parts.push(StreamPart::Text(text.to_owned()));
        }
    };
    match json["type"].as_str().or(event.event.as_deref()) {
        Some("message_start") => {
            let message = &json["message"];
            let model = message["model"].as_str().filter(|model| !model.is_empty());
            parts.push(StreamPart::Model(
                model.map_or_else(|| context.model.clone(), str::to_owned),
            ));
            let usage = &message["usage"];
            parts.push(StreamPart::Usage(UsagePart {
                input_tokens: Some(input_tokens(usage)),
                output_tokens: Some(count(usage.get("output_tokens"))),
            }));
        }
        Some("content_block_start") => {
            let block = &json["content_block"];
            match block["type"].as_str() {
                Some("text") => text(parts, block["text"].as_str()),
                Some("tool_use") => parts.push(context.first_piece(
                    index,
                    block["id"].as_str(),
                    block["name"].as_str().unwrap_or_default(),
                    String::new(),
                )),
                // Kept even when empty, so that the block goes back whole.
                Some("thinking") => {
                    keep(parts, Thinking::Text, block["thinking"].as_str());
                    keep(parts, Thinking::Signature, block["signature"].as_str());
                }
                Some("redacted_thinking") => {
                    keep(parts, Thinking::Redacted, block["data"].as_str())
                }
                other => {
                    return Err(PROVIDER.bad_response(
                        &format!(
                            "it streamed a content block of type {}, which the adapter cannot \
                             keep",
                            other.unwrap_or("(none)")
                        ),
                        data,
                    ));
                }
            }
        }
        Some("content_block_delta") => {
            let delta = &json["delta"];
            match delta["type"].as_str() {
                Some("text_delta") => text(parts, delta["text"].as_str()),
                Some("input_json_delta") => parts.push(more_arguments(
                    index,
                    delta["partial_json"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                )),
                Some("thinking_delta") => keep(parts, Thinking::Text, delta["thinking"].as_str()),
                Some("signature_delta") => {
                    keep(parts, Thinking::Signature, delta["signature"].as_str());
                }
                _ => {} // deltas of blocks the adapter does not offer
            }
        }
        Some("message_delta") => {
            if let Some(reason) = json["delta"]["stop_reason"].as_str() {
                parts.push(StreamPart::Finish(stop_reason(reason)));
            }
            if let Some(output) = json["usage"].get("output_tokens") {
                parts.push(StreamPart::Usage(UsagePart {
                    input_tokens: None,
                    output_tokens: Some(count(Some(output))),
                }));
            }
        }
        Some("message_stop") => parts.push(StreamPart::Done),
        Some("error") => return Err(error_object(&json, data)),
        _ => {} // ping, content_block_stop and events added later
    }
    Ok(())
}
