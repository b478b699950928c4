//! What Opspawn's LLM adapters share.
//!
//! Each adapter is a small component that turns a neutral `chat-request`
//! into one provider's wire format and back. The parts they have in common
//! live here:
//!
//! - [`bindings`]: the `llm-adapter` world, generated once so that every
//!   adapter speaks the same types; an adapter exports its implementation
//!   with `llm_http::bindings::export_adapter!`.
//! - [`http`]: a blocking POST over `wasi:http/outgoing-handler` whose
//!   response body is read chunk by chunk.
//! - [`sse`]: a server-sent events parser fed with arbitrary chunks.
//! - [`errors`]: HTTP statuses, provider error bodies and transport failures
//!   mapped to `llm-error`.
//! - [`wire`] and [`driver`]: what a wire format provides, and the one
//!   request/response exchange every adapter runs.
//! - [`openai`]: the Chat Completions format, spoken by OpenAI, OpenRouter
//!   and OpenAI-compatible servers such as Ollama.
//!
//! Everything but [`http`] and [`driver`] is pure and tested natively.

pub mod bindings {
    wit_bindgen::generate!({
        world: "llm-adapter",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "export_adapter",
        default_bindings_module: "llm_http::bindings",
        additional_derives: [PartialEq],
    });
}

pub mod driver;
pub mod errors;
#[doc(hidden)]
pub mod fixtures;
pub mod http;
pub mod json;
pub mod openai;
pub mod options;
pub mod sse;
pub mod wire;

pub use bindings::exports::opspawn::plugin::chat::Guest;
pub use bindings::opspawn::plugin::types::{
    CallContext, ChatMessage, ChatRequest, ChatResponse, FinishReason, LlmError, LlmErrorKind,
    Role, ToolCall, ToolSpec, Usage,
};
pub use errors::Provider;

/// The value of the environment variable `name`, or `default` when it is
/// unset or blank. Adapters read only variables their manifest grants.
pub fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .map(|value| value.trim().to_owned())
        .filter(|value| !value.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

/// A base URL from the environment, without a trailing slash.
pub fn base_url(name: &str, default: &str) -> String {
    env_or(name, default).trim_end_matches('/').to_owned()
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
