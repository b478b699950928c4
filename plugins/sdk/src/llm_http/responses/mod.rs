//! The OpenAI Responses API (`POST /responses`), OpenAI's default API since
//! the Assistants API shut down on 2026-08-26. A conversation is a list of
//! *items*: messages (`input_text` parts from the user, `output_text` parts
//! from the model), `function_call` items and the `function_call_output`
//! items answering them, and `reasoning` items; a reply is the list of items
//! the model produced, streamed as events about each item.
//!
//! **Stateless, so the journal keeps the conversation.** Requests say
//! `store: false` and ask for `include: ["reasoning.encrypted_content"]`:
//! nothing depends on what OpenAI keeps, a replay after 30 days works, and
//! so does an organisation with zero data retention. (A task's options may
//! set `store` or `include` otherwise; they are merged over these.)
//!
//! **Opaque items go back as they came.** What the neutral message cannot
//! hold travels as the adapter's provider data (`chat-message.provider-data`,
//! journaled with the reply and copied by planners), one datum per output
//! item under [`OUTPUT_KEY`]`<output index>`: a reasoning item whole, as
//! given (id, summary, `encrypted_content`), and for a message or a function
//! call a skeleton with its item id (and call id), whose text and arguments
//! are the message's own. The next request rebuilds the turn's items from
//! them in their original order, so a reasoning model gets its reasoning
//! back before the calls it led to, as the API requires. A turn without
//! them (another API's, another adapter's) is sent as its text, then its
//! calls.
//!
//! **Every output item is read, or refused.** Messages (`output_text` and
//! `refusal` parts; a refusal is kept as the text), function calls and
//! reasoning; an item of any other type (a built-in tool's call, which this
//! adapter never offers) fails the step with `llm_bad_response` naming the
//! type, rather than being dropped.
//!
//! **Not carried: stop sequences.** The Responses API has no `stop`, so a
//! request's stop sequences are not sent (the ReAct planner, which asks for
//! one, does not rely on it: it reads up to its `Observation:` marker).

mod request;
mod response;
mod stream;
#[cfg(test)]
mod tests;

use serde_json::Value;

pub use request::{MIN_OUTPUT_TOKENS, build};
pub use response::{failure, parse};
pub use stream::decode;

use crate::llm_http::options::Ranges;
use crate::llm_http::wire::{ReplyContext, Wire};
use crate::llm_http::{
    ChatRequest, ChatResponse, LlmError, Provider, SseEvent, StreamPart, model_or,
};

/// The provider-data key of output item `<index>` of a reply: the item
/// whole for reasoning, a skeleton (`type`, `id`, `call_id`) for the others.
pub const OUTPUT_KEY: &str = "openai:output:";

/// One service speaking the Responses API at `/responses` under the base
/// URL the operator configured.
#[derive(Debug, Clone)]
pub struct Responses {
    pub provider: Provider,
    pub default_model: String,
    /// Sent with every request besides the content type.
    pub extra_headers: Vec<(String, String)>,
    /// The sampling options it accepts.
    pub ranges: Ranges,
}

impl Wire for Responses {
    fn provider(&self) -> Provider {
        self.provider.clone()
    }

    fn model(&self, request: &ChatRequest) -> String {
        model_or(request, &self.default_model)
    }

    fn path(&self, _model: &str, _stream: bool) -> String {
        "/responses".into()
    }

    fn ranges(&self) -> Ranges {
        self.ranges.clone()
    }

    fn headers(&self, stream: bool) -> Vec<(String, String)> {
        crate::llm_http::openai::headers(stream, &self.extra_headers)
    }

    fn body(&self, request: &ChatRequest, model: &str, stream: bool) -> Result<Value, LlmError> {
        build(&self.provider, request, model, stream)
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
