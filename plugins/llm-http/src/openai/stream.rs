//! Streamed Chat Completions: `chat.completion.chunk` events ending with
//! `data: [DONE]`, tool calls arriving in fragments keyed by their index.

use std::collections::BTreeMap;

use serde_json::Value;

use super::response::{arguments, body_error, finish_reason, usage};
use crate::sse::SseEvent;
use crate::wire::{Flow, Reply, ReplyContext, StreamDecoder};
use crate::{ChatResponse, LlmError, Provider};

pub struct OpenAiStream {
    provider: Provider,
    reply: Reply,
    /// Tool calls being assembled, by `index`.
    calls: BTreeMap<u64, PartialCall>,
    done: bool,
}

#[derive(Debug, Default)]
struct PartialCall {
    id: String,
    name: String,
    arguments: String,
}

impl OpenAiStream {
    pub fn new(provider: Provider, context: ReplyContext) -> Self {
        Self {
            provider,
            reply: Reply::new(context),
            calls: BTreeMap::new(),
            done: false,
        }
    }

    fn chunk(&mut self, chunk: &Value, emit: &mut dyn FnMut(&str)) {
        self.reply.set_model(chunk["model"].as_str());
        if let Some(usage) = usage(&chunk["usage"]) {
            self.reply.usage = Some(usage);
        }
        // Only the first choice is read: requests never ask for more.
        let choices = chunk["choices"].as_array().into_iter().flatten();
        for choice in choices.filter(|choice| choice["index"].as_u64().unwrap_or(0) == 0) {
            let delta = &choice["delta"];
            if let Some(text) = delta["content"].as_str().filter(|text| !text.is_empty()) {
                self.reply.content.push_str(text);
                emit(text);
            }
            let fragments = delta["tool_calls"].as_array().into_iter().flatten();
            for (position, fragment) in fragments.enumerate() {
                let index = fragment["index"].as_u64().unwrap_or(position as u64);
                let call = self.calls.entry(index).or_default();
                if let Some(id) = fragment["id"].as_str().filter(|id| !id.is_empty()) {
                    id.clone_into(&mut call.id);
                }
                let function = &fragment["function"];
                if let Some(name) = function["name"].as_str() {
                    call.name.push_str(name);
                }
                call.arguments.push_str(&arguments(&function["arguments"]));
            }
            if let Some(reason) = choice["finish_reason"].as_str() {
                self.reply.finish_reason = Some(finish_reason(reason));
            }
        }
    }
}

impl StreamDecoder for OpenAiStream {
    fn event(&mut self, event: &SseEvent, emit: &mut dyn FnMut(&str)) -> Result<Flow, LlmError> {
        let data = event.data.trim();
        if data == "[DONE]" {
            self.done = true;
            return Ok(Flow::Done);
        }
        let chunk: Value = serde_json::from_str(data).map_err(|error| {
            self.provider.bad_response(
                &format!("a stream chunk is not JSON: {error}"),
                data.as_bytes(),
            )
        })?;
        if let Some(error) = body_error(&self.provider, &chunk, data.as_bytes()) {
            return Err(error);
        }
        self.chunk(&chunk, emit);
        Ok(Flow::More)
    }

    fn finish(mut self) -> Result<ChatResponse, LlmError> {
        if !self.done && self.reply.finish_reason.is_none() {
            return Err(self.provider.cut_short());
        }
        for call in std::mem::take(&mut self.calls).into_values() {
            self.reply
                .push_call(Some(&call.id), &call.name, call.arguments);
        }
        Ok(self.reply.into_response())
    }
}
