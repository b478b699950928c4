//! What Opspawn's LLM adapters share.
//!
//! An adapter is a small component that only translates: it turns a neutral
//! `chat-request` into one provider's HTTP request, and the provider's answer
//! back. The host sends the request (outbound policy, credentials, timeouts,
//! retries, streaming), so nothing here performs I/O and everything is tested
//! natively. Enabled by the `llm-http` feature.
//!
//! An HTTP adapter is a [`wire::Wire`] (the provider's format), a
//! [`wire::Adapter`] (how settings configure it) and
//! [`register_llm_adapter!`](crate::register_llm_adapter): every
//! [`wire::Adapter`] is an [`LlmAdapter`](crate::llm::LlmAdapter). The parts
//! adapters have in common live here:
//!
//! - [`wire`]: what a wire format provides, and the three exports every
//!   adapter implements with it: [`wire::prepare`] (request in, method, path
//!   relative to the base URL, headers without credentials and body out, plus
//!   a small reply context), [`wire::read_response`] (a whole answer, any
//!   status) and [`wire::read_stream`] (a batch of server-sent events, framed
//!   by the host, into `stream-part`s). Stream decoders keep no state between
//!   batches: they say what each event adds (text, a piece of a tool call
//!   keyed by its index, usage, the finish reason, the model) and when the
//!   reply is `done`; the host assembles the parts.
//! - [`settings`]: the adapter's `[adapter.settings]` from its manifest
//!   (`default_model` and the like); adapters read no environment.
//! - [`options`]: `chat-request.provider-options` (`stream`, `api`, extra
//!   body keys).
//! - [`errors`]: HTTP statuses and provider error bodies mapped to
//!   `llm-error`, with `Retry-After` read from [`headers`].
//! - [`openai`]: the Chat Completions format, spoken by OpenAI, OpenRouter
//!   and OpenAI-compatible servers such as Ollama.
//! - [`responses`]: OpenAI's Responses API (items, function calls,
//!   reasoning items given back as they came, typed stream events).
//! - [`images`]: images in messages, as URLs or `data:` URLs.
//! - [`sse`] and [`fixtures`]: a server-sent events parser and a stream
//!   assembler like the host's, with which tests replay recorded bodies.

pub mod errors;
#[doc(hidden)]
pub mod fixtures;
pub mod headers;
pub mod images;
pub mod json;
pub mod openai;
pub mod options;
pub mod responses;
pub mod settings;
pub mod sse;
pub mod wire;

pub use crate::llm::{
    Exchange, HttpRequest, HttpResponse, Prepared, SseEvent, StreamPart, ToolCallPart, UsagePart,
};
pub use crate::types::{
    CallContext, ChatMessage, ChatRequest, ChatResponse, FinishReason, LlmError, LlmErrorKind,
    ProviderDatum, ResponseFormat, Role, ToolCall, ToolChoice, ToolSpec, Usage,
};
pub use errors::Provider;
pub use settings::Settings;

/// The opaque datum a message keeps under `key`, if any.
pub fn provider_datum<'a>(message: &'a ChatMessage, key: &str) -> Option<&'a str> {
    message
        .provider_data
        .iter()
        .find(|datum| datum.key == key)
        .map(|datum| datum.value.as_str())
}

/// The model the request names, else `default`.
pub fn model_or(request: &ChatRequest, default: &str) -> String {
    request
        .model
        .as_deref()
        .map(str::trim)
        .filter(|model| !model.is_empty())
        .unwrap_or(default)
        .to_owned()
}
