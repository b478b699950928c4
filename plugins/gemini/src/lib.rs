//! The Gemini adapter: the Gemini API's `generateContent` (streamed:
//! `streamGenerateContent?alt=sse`) at `{GEMINI_BASE_URL}/v1beta/models/{model}`
//! (default `https://generativelanguage.googleapis.com`), model
//! `gemini-2.5-flash` unless the request names one. The host adds the
//! `x-goog-api-key` header.

mod request;
mod response;
mod schema;
mod stream;

use llm_http::http::Headers;
use llm_http::wire::{ReplyContext, Wire};
use llm_http::{
    CallContext, ChatRequest, ChatResponse, Guest, LlmError, Provider, base_url, model_or,
};
use serde_json::Value;

pub use stream::GeminiStream;

const PROVIDER: Provider = Provider {
    name: "Gemini",
    key_env: "GEMINI_API_KEY",
};
const DEFAULT_MODEL: &str = "gemini-2.5-flash";

pub struct GenerateContent {
    base_url: String,
}

impl GenerateContent {
    fn from_env() -> Self {
        Self {
            base_url: base_url(
                "GEMINI_BASE_URL",
                "https://generativelanguage.googleapis.com",
            ),
        }
    }
}

impl Wire for GenerateContent {
    type Decoder = GeminiStream;

    fn provider(&self) -> Provider {
        PROVIDER
    }

    fn model(&self, request: &ChatRequest) -> String {
        let model = model_or(request, DEFAULT_MODEL);
        // Gemini names models `models/gemini-…`; the path adds the prefix.
        match model.strip_prefix("models/") {
            Some(name) => name.to_owned(),
            None => model,
        }
    }

    fn url(&self, model: &str, stream: bool) -> String {
        let method = if stream {
            "streamGenerateContent?alt=sse"
        } else {
            "generateContent"
        };
        format!("{}/v1beta/models/{model}:{method}", self.base_url)
    }

    fn headers(&self, stream: bool) -> Vec<(String, String)> {
        let accept = if stream {
            "text/event-stream"
        } else {
            "application/json"
        };
        vec![
            ("content-type".to_owned(), "application/json".to_owned()),
            ("accept".to_owned(), accept.to_owned()),
        ]
    }

    fn body(&self, request: &ChatRequest, _model: &str, _stream: bool) -> Result<Value, LlmError> {
        request::build(request)
    }

    fn parse(&self, body: &[u8], context: &ReplyContext) -> Result<ChatResponse, LlmError> {
        response::parse(body, context.clone())
    }

    fn decoder(&self, context: ReplyContext) -> GeminiStream {
        GeminiStream::new(context)
    }

    fn error(&self, status: u16, headers: &Headers, body: &[u8]) -> LlmError {
        response::status_error(status, headers, body)
    }
}

/// The exported `chat` implementation.
pub struct Gemini;

impl Guest for Gemini {
    fn complete(_context: CallContext, request: ChatRequest) -> Result<ChatResponse, LlmError> {
        llm_http::driver::run(&GenerateContent::from_env(), &request)
    }
}

// Exported only in the component: see the scripted adapter for why.
#[cfg(target_arch = "wasm32")]
llm_http::bindings::export_adapter!(Gemini);

#[cfg(test)]
mod tests;
