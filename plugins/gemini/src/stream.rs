//! Streamed responses (`alt=sse`): each event is a whole
//! `GenerateContentResponse` carrying the next piece; the last one has the
//! finish reason, and the body simply ends.

use llm_http::sse::SseEvent;
use llm_http::wire::{Flow, Reply, ReplyContext, StreamDecoder};
use llm_http::{ChatResponse, LlmError};
use serde_json::Value;

use crate::PROVIDER;
use crate::response::read;

pub struct GeminiStream {
    reply: Reply,
}

impl GeminiStream {
    pub fn new(context: ReplyContext) -> Self {
        Self {
            reply: Reply::new(context),
        }
    }
}

impl StreamDecoder for GeminiStream {
    fn event(&mut self, event: &SseEvent, emit: &mut dyn FnMut(&str)) -> Result<Flow, LlmError> {
        let data = event.data.as_bytes();
        let json: Value = serde_json::from_slice(data).map_err(|error| {
            PROVIDER.bad_response(&format!("a stream chunk is not JSON: {error}"), data)
        })?;
        read(&mut self.reply, &json, data, emit)?;
        Ok(Flow::More)
    }

    fn finish(self) -> Result<ChatResponse, LlmError> {
        if self.reply.finish_reason.is_none() {
            return Err(PROVIDER.cut_short());
        }
        Ok(self.reply.into_response())
    }
}
