//! The `llm-adapter` world: translates a neutral chat request into one
//! provider's HTTP request, and the provider's answer back. The host sends
//! the request. HTTP adapters are best written with the `llm-http` feature's
//! [`llm_http`](crate::llm_http) helpers.

use std::marker::PhantomData;

use crate::__private::llm_adapter::exports::opspawn::plugin::translate::Guest;
pub use crate::__private::llm_adapter::exports::opspawn::plugin::translate::{
    Exchange, Header, HttpRequest, HttpResponse, LocalReply, Prepared, SseEvent, StreamPart,
    ToolCallPart, UsagePart,
};
use crate::types::{CallContext, ChatRequest, ChatResponse, LlmError, LlmErrorKind};

/// An LLM adapter component. Exported with
/// [`register_llm_adapter!`](crate::register_llm_adapter).
///
/// Only [`prepare`](Self::prepare) is required: an adapter that answers
/// locally (a scripted or cached one) never has a response to read.
pub trait LlmAdapter {
    /// Translates a request into the exchange the host performs. `settings`
    /// is the manifest's `[adapter.settings]` as a JSON object.
    fn prepare(
        context: CallContext,
        request: ChatRequest,
        settings: String,
    ) -> Result<Prepared, LlmError>;

    /// Reads a whole answer to an `Exchange::Http` request, whatever its
    /// status.
    fn read_response(
        reply_context: String,
        response: HttpResponse,
    ) -> Result<ChatResponse, LlmError> {
        let _ = (reply_context, response);
        Err(answers_locally())
    }

    /// Reads the next events of a streamed answer.
    fn read_stream(
        reply_context: String,
        events: Vec<SseEvent>,
    ) -> Result<Vec<StreamPart>, LlmError> {
        let _ = (reply_context, events);
        Err(answers_locally())
    }
}

impl LlmError {
    /// An error of the adapter's own making: no provider status, body or
    /// `Retry-After` behind it.
    pub fn new(kind: LlmErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            status: None,
            body: None,
            retry_after_ms: None,
        }
    }
}

/// What the default readers answer: this adapter sends no HTTP request.
fn answers_locally() -> LlmError {
    LlmError::new(
        LlmErrorKind::Other,
        "this adapter answers locally, from prepare: it has no HTTP response to read",
    )
}

/// The bindings' view of an [`LlmAdapter`] (for the macro).
#[doc(hidden)]
pub struct LlmAdapterExport<A>(PhantomData<A>);

impl<A: LlmAdapter> Guest for LlmAdapterExport<A> {
    fn prepare(
        context: CallContext,
        request: ChatRequest,
        settings: String,
    ) -> Result<Prepared, LlmError> {
        A::prepare(context, request, settings)
    }

    fn read_response(
        reply_context: String,
        response: HttpResponse,
    ) -> Result<ChatResponse, LlmError> {
        A::read_response(reply_context, response)
    }

    fn read_stream(
        reply_context: String,
        events: Vec<SseEvent>,
    ) -> Result<Vec<StreamPart>, LlmError> {
        A::read_stream(reply_context, events)
    }
}
