//! The OpenAI Chat Completions wire format, as OpenAI, OpenRouter and
//! OpenAI-compatible servers (Ollama, vLLM, llama.cpp) speak it.

mod request;
mod response;
mod stream;
#[cfg(test)]
mod tests;

use serde_json::Value;

pub use request::build;
pub(crate) use request::function_tools;
pub(crate) use response::{arguments, text_part};
pub use response::{body_error, finish_reason, parse};
pub use stream::decode;

use crate::llm_http::options::Ranges;
use crate::llm_http::wire::{ReplyContext, Wire};
use crate::llm_http::{
    ChatRequest, ChatResponse, LlmError, Provider, SseEvent, StreamPart, model_or,
};

/// The headers of an OpenAI request (Chat Completions or Responses): a JSON
/// body, the answer wanted as JSON or as server-sent events, and `extra`.
pub fn headers(stream: bool, extra: &[(String, String)]) -> Vec<(String, String)> {
    let accept = if stream {
        "text/event-stream"
    } else {
        "application/json"
    };
    let mut headers = vec![
        ("content-type".to_owned(), "application/json".to_owned()),
        ("accept".to_owned(), accept.to_owned()),
    ];
    headers.extend(extra.iter().cloned());
    headers
}

/// One service speaking Chat Completions at `/chat/completions` under the
/// base URL the operator configured.
#[derive(Debug, Clone)]
pub struct ChatCompletions {
    pub provider: Provider,
    pub default_model: String,
    /// Sent with every request besides the content type (OpenRouter's
    /// attribution headers).
    pub extra_headers: Vec<(String, String)>,
    /// `max_completion_tokens` for OpenAI, whose newer models refuse
    /// `max_tokens`; `max_tokens` for everyone else.
    pub max_tokens_field: &'static str,
    /// The sampling options it accepts.
    pub ranges: Ranges,
}

impl Wire for ChatCompletions {
    fn provider(&self) -> Provider {
        self.provider.clone()
    }

    fn model(&self, request: &ChatRequest) -> String {
        model_or(request, &self.default_model)
    }

    fn path(&self, _model: &str, _stream: bool) -> String {
        "/chat/completions".into()
    }

    fn ranges(&self) -> Ranges {
        self.ranges.clone()
    }

    fn headers(&self, stream: bool) -> Vec<(String, String)> {
        headers(stream, &self.extra_headers)
    }

    fn body(&self, request: &ChatRequest, model: &str, stream: bool) -> Result<Value, LlmError> {
        build(
            &self.provider,
            request,
            model,
            stream,
            self.max_tokens_field,
        )
    }

    fn parse(&self, body: &[u8], context: &ReplyContext) -> Result<ChatResponse, LlmError> {
        parse(&self.provider, body, context.clone())
    }

    fn decode(
        &self,
        event: &SseEvent,
        context: &ReplyContext,
        parts: &mut Vec<StreamPart>,
    ) -> Result<(), LlmError> {
        decode(&self.provider, event, context, parts)
    }
}
