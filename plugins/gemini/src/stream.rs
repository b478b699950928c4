//! Streamed responses (`alt=sse`): each event is a whole
//! `GenerateContentResponse` carrying the next piece of the answer; the last
//! one has the finish reason, and the body simply ends, so that chunk is
//! where the reply is `done`.
//!
//! Gemini sends each function call whole and does not number them. A chunk
//! is translated without knowing the chunks before it, so a call's index is
//! its position among the calls of its own chunk. The host starts a new call
//! whenever a part names a call at an index already named, so two chunks
//! with one call each still make two calls; their minted ids would repeat,
//! which is why the ids count from the reply context's first number plus
//! the index only within one chunk. Gemini sends all of a reply's calls in
//! one chunk in practice.

use opspawn_plugin::llm_http::wire::{ReplyContext, usage_part};
use opspawn_plugin::llm_http::{LlmError, SseEvent, StreamPart};
use serde_json::Value;

use crate::PROVIDER;
use crate::response::{Piece, TEXT_SIGNATURE_KEY, call_signature_key, finish, pieces, usage};

pub fn decode(
    event: &SseEvent,
    context: &ReplyContext,
    parts: &mut Vec<StreamPart>,
) -> Result<(), LlmError> {
    let data = event.data.as_bytes();
    let json: Value = serde_json::from_slice(data).map_err(|error| {
        PROVIDER.bad_response(&format!("a stream chunk is not JSON: {error}"), data)
    })?;
    let mut calls = 0;
    for piece in pieces(&json, data)? {
        match piece {
            Piece::Text(text) => parts.push(StreamPart::Text(text.to_owned())),
            Piece::Call {
                id,
                name,
                args,
                signature,
            } => {
                let index = calls;
                calls += 1;
                if let Some(signature) = signature {
                    let key = call_signature_key(&context.piece_id(index, id));
                    parts.push(StreamPart::ProviderData((key, signature.to_owned())));
                }
                parts.push(context.first_piece(index, id, name, args));
            }
            Piece::TextSignature(signature) => parts.push(StreamPart::ProviderData((
                TEXT_SIGNATURE_KEY.to_owned(),
                signature.to_owned(),
            ))),
        }
    }
    if let Some(model) = json["modelVersion"]
        .as_str()
        .filter(|model| !model.is_empty())
    {
        parts.push(StreamPart::Model(model.to_owned()));
    }
    if let Some(usage) = usage(&json) {
        parts.push(usage_part(usage));
    }
    if let Some(reason) = finish(&json) {
        parts.push(StreamPart::Finish(reason));
        parts.push(StreamPart::Done);
    }
    Ok(())
}
