//! Streamed Messages API responses: `message_start`, then per content block
//! `content_block_start`, `content_block_delta`s and `content_block_stop`,
//! then `message_delta` and `message_stop`; `ping` and `error` may come
//! anywhere.

use std::collections::BTreeMap;

use llm_http::json::count;
use llm_http::sse::SseEvent;
use llm_http::wire::{Flow, Reply, ReplyContext, StreamDecoder};
use llm_http::{ChatResponse, LlmError, Usage};
use serde_json::Value;

use crate::PROVIDER;
use crate::response::{error_object, input_tokens, stop_reason};

pub struct MessagesStream {
    reply: Reply,
    /// Tool-use blocks being assembled, by block index.
    tools: BTreeMap<u64, ToolUse>,
    usage: Usage,
    stopped: bool,
}

struct ToolUse {
    id: String,
    name: String,
    /// The `input_json_delta` pieces so far.
    input: String,
}

impl MessagesStream {
    pub fn new(context: ReplyContext) -> Self {
        Self {
            reply: Reply::new(context),
            tools: BTreeMap::new(),
            usage: Usage {
                input_tokens: 0,
                output_tokens: 0,
            },
            stopped: false,
        }
    }

    fn text(&mut self, text: Option<&str>, emit: &mut dyn FnMut(&str)) {
        if let Some(text) = text.filter(|text| !text.is_empty()) {
            self.reply.content.push_str(text);
            emit(text);
        }
    }
}

impl StreamDecoder for MessagesStream {
    fn event(&mut self, event: &SseEvent, emit: &mut dyn FnMut(&str)) -> Result<Flow, LlmError> {
        let data = event.data.as_bytes();
        let json: Value = serde_json::from_slice(data).map_err(|error| {
            PROVIDER.bad_response(&format!("a stream event is not JSON: {error}"), data)
        })?;
        let index = json["index"].as_u64().unwrap_or(0);
        match json["type"].as_str().or(event.event.as_deref()) {
            Some("message_start") => {
                let message = &json["message"];
                self.reply.set_model(message["model"].as_str());
                self.usage.input_tokens = input_tokens(&message["usage"]);
                self.usage.output_tokens = count(message["usage"].get("output_tokens"));
                self.reply.usage = Some(self.usage);
            }
            Some("content_block_start") => {
                let block = &json["content_block"];
                match block["type"].as_str() {
                    Some("text") => self.text(block["text"].as_str(), emit),
                    Some("tool_use") => {
                        let tool = ToolUse {
                            id: block["id"].as_str().unwrap_or_default().to_owned(),
                            name: block["name"].as_str().unwrap_or_default().to_owned(),
                            input: String::new(),
                        };
                        self.tools.insert(index, tool);
                    }
                    _ => {}
                }
            }
            Some("content_block_delta") => {
                let delta = &json["delta"];
                match delta["type"].as_str() {
                    Some("text_delta") => self.text(delta["text"].as_str(), emit),
                    Some("input_json_delta") => {
                        if let Some(tool) = self.tools.get_mut(&index) {
                            tool.input
                                .push_str(delta["partial_json"].as_str().unwrap_or_default());
                        }
                    }
                    _ => {} // thinking and signature deltas
                }
            }
            Some("message_delta") => {
                if let Some(reason) = json["delta"]["stop_reason"].as_str() {
                    self.reply.finish_reason = Some(stop_reason(reason));
                }
                if let Some(output) = json["usage"].get("output_tokens") {
                    self.usage.output_tokens = count(Some(output));
                    self.reply.usage = Some(self.usage);
                }
            }
            Some("message_stop") => {
                self.stopped = true;
                return Ok(Flow::Done);
            }
            Some("error") => return Err(error_object(&json, data)),
            _ => {} // ping, content_block_stop and events added later
        }
        Ok(Flow::More)
    }

    fn finish(mut self) -> Result<ChatResponse, LlmError> {
        if !self.stopped && self.reply.finish_reason.is_none() {
            return Err(PROVIDER.cut_short());
        }
        for tool in std::mem::take(&mut self.tools).into_values() {
            self.reply.push_call(Some(&tool.id), &tool.name, tool.input);
        }
        Ok(self.reply.into_response())
    }
}
