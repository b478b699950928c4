//! The Anthropic adapter: the Messages API at `{ANTHROPIC_BASE_URL}/v1/messages`
//! (default `https://api.anthropic.com`), model `claude-sonnet-4-5` unless the
//! request names one. The host adds the `x-api-key` header.

mod request;
mod response;
mod stream;

use llm_http::wire::{ReplyContext, Wire};
use llm_http::{
    CallContext, ChatRequest, ChatResponse, Guest, LlmError, Provider, base_url, model_or,
};
use serde_json::Value;

pub use stream::MessagesStream;

const PROVIDER: Provider = Provider {
    name: "Anthropic",
    key_env: "ANTHROPIC_API_KEY",
};
const DEFAULT_MODEL: &str = "claude-sonnet-4-5";
const API_VERSION: &str = "2023-06-01";

pub struct Messages {
    base_url: String,
}

impl Messages {
    fn from_env() -> Self {
        Self {
            base_url: base_url("ANTHROPIC_BASE_URL", "https://api.anthropic.com"),
        }
    }
}

impl Wire for Messages {
    type Decoder = MessagesStream;

    fn provider(&self) -> Provider {
        PROVIDER
    }

    fn model(&self, request: &ChatRequest) -> String {
        model_or(request, DEFAULT_MODEL)
    }

    fn url(&self, _model: &str, _stream: bool) -> String {
        format!("{}/v1/messages", self.base_url)
    }

    fn headers(&self, stream: bool) -> Vec<(String, String)> {
        let accept = if stream {
            "text/event-stream"
        } else {
            "application/json"
        };
        [
            ("content-type", "application/json"),
            ("accept", accept),
            ("anthropic-version", API_VERSION),
        ]
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .to_vec()
    }

    fn body(&self, request: &ChatRequest, model: &str, stream: bool) -> Result<Value, LlmError> {
        request::build(request, model, stream)
    }

    fn parse(&self, body: &[u8], context: &ReplyContext) -> Result<ChatResponse, LlmError> {
        response::parse(body, context.clone())
    }

    fn decoder(&self, context: ReplyContext) -> MessagesStream {
        MessagesStream::new(context)
    }
}

/// The exported `chat` implementation.
pub struct Anthropic;

impl Guest for Anthropic {
    fn complete(_context: CallContext, request: ChatRequest) -> Result<ChatResponse, LlmError> {
        llm_http::driver::run(&Messages::from_env(), &request)
    }
}

// Exported only in the component: see the scripted adapter for why.
#[cfg(target_arch = "wasm32")]
llm_http::bindings::export_adapter!(Anthropic);

#[cfg(test)]
mod tests;
