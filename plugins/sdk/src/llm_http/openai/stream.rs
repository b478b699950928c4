//! Streamed Chat Completions: `chat.completion.chunk` events ending with
//! `data: [DONE]`, tool calls arriving in fragments keyed by their index.
//! Each chunk is translated on its own; the host joins the fragments.

use std::borrow::Cow;

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::Value;

use super::response::{arguments, body_error, finish_reason, usage};
use crate::llm_http::json;
use crate::llm_http::wire::{ReplyContext, more_arguments, usage_part};
use crate::llm_http::{LlmError, Provider, SseEvent, StreamPart, Usage};

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
    match PlainChunk::read(data) {
        Some(chunk) => {
            chunk.decode(context, parts);
            Ok(())
        }
        None => decode_tree(provider, data, context, parts),
    }
}

/// A chunk of any shape, read as a JSON tree.
pub(super) fn decode_tree(
    provider: &Provider,
    data: &str,
    context: &ReplyContext,
    parts: &mut Vec<StreamPart>,
) -> Result<(), LlmError> {
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

/// The chunks nearly every event of a reply is: text, a tool call's
/// fragment or a finish reason for choice 0, or the closing usage, with no
/// error. They are read straight into borrowed text, without a JSON tree,
/// since a reply streams one such chunk every few characters (a tool call's
/// arguments too). Anything else, or anything typed otherwise, is not a
/// plain chunk and goes the general way ([`decode_tree`]), which reads the
/// same chunk to the same parts.
#[derive(Deserialize)]
pub(super) struct PlainChunk<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    choices: Vec<PlainChoice<'a>>,
    #[serde(default)]
    usage: Option<PlainUsage>,
    #[serde(default)]
    error: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct PlainChoice<'a> {
    #[serde(default)]
    index: Option<u64>,
    #[serde(borrow, default)]
    delta: PlainDelta<'a>,
    #[serde(borrow, default)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize, Default)]
struct PlainDelta<'a> {
    #[serde(borrow, default)]
    role: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    refusal: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    tool_calls: Option<Vec<PlainToolCall<'a>>>,
}

/// A fragment of a tool call: the first names the call, later ones add
/// arguments (as text: the few servers that send an object go the general
/// way).
#[derive(Deserialize)]
struct PlainToolCall<'a> {
    #[serde(default)]
    index: Option<u64>,
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    function: PlainFunction<'a>,
}

#[derive(Deserialize, Default)]
struct PlainFunction<'a> {
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    arguments: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct PlainUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
}

impl<'a> PlainChunk<'a> {
    /// `data` as a plain chunk, if it is one.
    pub(super) fn read(data: &'a str) -> Option<Self> {
        let chunk: Self = serde_json::from_str(data).ok()?;
        let plain = chunk.error.is_none()
            && chunk
                .choices
                .iter()
                .all(|choice| choice.index.unwrap_or(0) == 0);
        plain.then_some(chunk)
    }

    /// The parts [`decode_tree`] would make of it.
    fn decode(self, context: &ReplyContext, parts: &mut Vec<StreamPart>) {
        match self.model.filter(|model| !model.is_empty()) {
            Some(model) => parts.push(StreamPart::Model(model.into_owned())),
            None if self
                .choices
                .first()
                .is_some_and(|choice| choice.delta.role.is_some()) =>
            {
                parts.push(StreamPart::Model(context.model.clone()));
            }
            None => {}
        }
        for choice in self.choices {
            let delta = choice.delta;
            for text in [delta.content, delta.refusal].into_iter().flatten() {
                if !text.is_empty() {
                    parts.push(StreamPart::Text(text.into_owned()));
                }
            }
            let fragments = delta.tool_calls.into_iter().flatten();
            for (position, fragment) in fragments.enumerate() {
                let index = fragment.index.unwrap_or(position as u64);
                let index = u32::try_from(index).unwrap_or(u32::MAX);
                let function = fragment.function;
                let arguments = function.arguments.map(Cow::into_owned).unwrap_or_default();
                parts.push(match function.name {
                    Some(name) => {
                        context.first_piece(index, fragment.id.as_deref(), &name, arguments)
                    }
                    None => more_arguments(index, arguments),
                });
            }
            if let Some(reason) = choice.finish_reason {
                parts.push(StreamPart::Finish(finish_reason(&reason)));
            }
        }
        if let Some(usage) = self.usage {
            let count = |n: Option<u64>| n.map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX));
            parts.push(usage_part(Usage {
                input_tokens: count(usage.prompt_tokens),
                output_tokens: count(usage.completion_tokens),
            }));
        }
    }
}
