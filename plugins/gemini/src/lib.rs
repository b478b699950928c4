//! The Gemini adapter: the Gemini API's `generateContent` (streamed:
//! `streamGenerateContent?alt=sse`) at `/v1beta/models/{model}` under the
//! base URL of its manifest (`https://generativelanguage.googleapis.com`
//! unless the operator sets `GEMINI_BASE_URL`), model `gemini-2.5-flash`
//! unless the request or the `default_model` setting names another. The
//! host adds the `x-goog-api-key` header.

mod request;
mod response;
mod schema;
mod stream;

use opspawn_plugin::llm_http::headers::Headers;
use opspawn_plugin::llm_http::options::{Range, Ranges};
use opspawn_plugin::llm_http::wire::{Adapter, ReplyContext, Wire};
use opspawn_plugin::llm_http::{
    ChatRequest, ChatResponse, LlmError, Provider, Settings, SseEvent, StreamPart, model_or,
};
use serde_json::Value;

const PROVIDER: Provider = Provider::named("Gemini");
const DEFAULT_MODEL: &str = "gemini-2.5-flash";

pub struct GenerateContent {
    default_model: String,
}

impl Wire for GenerateContent {
    fn provider(&self) -> Provider {
        PROVIDER
    }

    fn model(&self, request: &ChatRequest) -> String {
        let model = model_or(request, &self.default_model);
        // Gemini names models `models/gemini-…`; the path adds the prefix.
        match model.strip_prefix("models/") {
            Some(name) => name.to_owned(),
            None => model,
        }
    }

    fn ranges(&self) -> Ranges {
        Ranges {
            temperature: Range::Between(0.0, 2.0),
            top_p: Range::Between(0.0, 1.0),
            top_k: Range::Between(1.0, f64::from(u32::MAX)),
        }
    }

    fn several_replies(&self, body: &Value) -> Option<(&'static str, u64)> {
        body["generationConfig"]["candidateCount"]
            .as_u64()
            .filter(|n| *n > 1)
            .map(|n| ("candidateCount", n))
    }

    fn set_top_k(&self, body: &mut Value, top_k: u64) {
        body["generationConfig"]["topK"] = serde_json::json!(top_k);
    }

    fn path(&self, model: &str, stream: bool) -> String {
        let method = if stream {
            "streamGenerateContent?alt=sse"
        } else {
            "generateContent"
        };
        format!("/v1beta/models/{model}:{method}")
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

    fn decode(
        &self,
        event: &SseEvent,
        context: &ReplyContext,
        parts: &mut Vec<StreamPart>,
    ) -> Result<(), LlmError> {
        stream::decode(event, context, parts)
    }

    fn error(&self, status: u16, headers: &Headers, body: &[u8]) -> LlmError {
        response::status_error(status, headers, body)
    }
}

/// The exported `translate` implementation.
pub struct Gemini;

impl Adapter for Gemini {
    type Wire = GenerateContent;
    const PROVIDER: Provider = PROVIDER;

    fn wire(settings: &Settings) -> Result<GenerateContent, LlmError> {
        Ok(GenerateContent {
            default_model: settings.text_or(&PROVIDER, "default_model", DEFAULT_MODEL)?,
        })
    }
}

// Exported only in the component (the macro sees to it).
opspawn_plugin::register_llm_adapter!(Gemini);

#[cfg(test)]
mod tests;
