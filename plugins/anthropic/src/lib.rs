//! The Anthropic adapter: the Messages API at `/v1/messages` under the base
//! URL of its manifest (`https://api.anthropic.com` unless the operator sets
//! `ANTHROPIC_BASE_URL`), model `claude-sonnet-4-5` unless the request or the
//! `default_model` setting names another, API version `2023-06-01` unless
//! the `api_version` setting names another. The host adds the `x-api-key`
//! header.
//!
//! The request is shaped for the version in use: from `2026-10-21` on, the
//! API refuses `temperature`, `top_p` and `top_k`, so a request that sets
//! them is refused before it is sent, saying which version refuses them.
//!
//! A response format becomes structured output, `output_config.format`
//! (generally available, whatever the API version), with its schema
//! narrowed to the subset Anthropic takes (see `schema`).

mod request;
mod response;
mod schema;
mod stream;

use opspawn_plugin::llm_http::options::{Range, Ranges};
use opspawn_plugin::llm_http::wire::{Adapter, ReplyContext, Wire};
use opspawn_plugin::llm_http::{
    ChatRequest, ChatResponse, LlmError, Provider, Settings, SseEvent, StreamPart, model_or,
};
use serde_json::Value;

const PROVIDER: Provider = Provider::named("Anthropic");
const DEFAULT_MODEL: &str = "claude-sonnet-4-5";
const DEFAULT_API_VERSION: &str = "2023-06-01";
/// The first API version that refuses `temperature`, `top_p` and `top_k`.
const NO_SAMPLING_VERSION: &str = "2026-10-21";

pub struct Messages {
    default_model: String,
    /// Sent as `anthropic-version`.
    api_version: String,
}

impl Wire for Messages {
    fn provider(&self) -> Provider {
        PROVIDER
    }

    fn model(&self, request: &ChatRequest) -> String {
        model_or(request, &self.default_model)
    }

    fn ranges(&self) -> Ranges {
        // Versions are dates, so they sort as text.
        if self.api_version.as_str() >= NO_SAMPLING_VERSION {
            let why = format!(
                "Anthropic API version {} refuses temperature, top_p and top_k; leave them \
                 out, or set api_version = \"{DEFAULT_API_VERSION}\" in the adapter's \
                 [adapter.settings]",
                self.api_version
            );
            return Ranges {
                temperature: Range::Refused(why.clone()),
                top_p: Range::Refused(why.clone()),
                top_k: Range::Refused(why),
            };
        }
        Ranges {
            temperature: Range::Between(0.0, 1.0),
            top_p: Range::Between(0.0, 1.0),
            top_k: Range::Between(0.0, f64::from(u32::MAX)),
        }
    }

    fn path(&self, _model: &str, _stream: bool) -> String {
        "/v1/messages".into()
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
            ("anthropic-version", &self.api_version),
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

    fn decode(
        &self,
        event: &SseEvent,
        context: &ReplyContext,
        parts: &mut Vec<StreamPart>,
    ) -> Result<(), LlmError> {
        stream::decode(event, context, parts)
    }
}

/// The exported `translate` implementation.
pub struct Anthropic;

impl Adapter for Anthropic {
    type Wire = Messages;
    const PROVIDER: Provider = PROVIDER;

    fn wire(settings: &Settings) -> Result<Messages, LlmError> {
        Ok(Messages {
            default_model: settings.text_or(&PROVIDER, "default_model", DEFAULT_MODEL)?,
            api_version: settings.text_or(&PROVIDER, "api_version", DEFAULT_API_VERSION)?,
        })
    }
}

// Exported only in the component (the macro sees to it).
opspawn_plugin::register_llm_adapter!(Anthropic);

#[cfg(test)]
mod tests;
