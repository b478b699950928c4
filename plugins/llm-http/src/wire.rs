//! What a provider's wire format supplies to the [`driver`](crate::driver):
//! where to send a request and how, the request body, and how to read the
//! answer, whole or streamed. All of it is pure, so it is tested natively.

use serde_json::Value;

use crate::http::Headers;
use crate::sse::SseEvent;
use crate::{
    ChatMessage, ChatRequest, ChatResponse, FinishReason, LlmError, Provider, Role, ToolCall, Usage,
};

pub trait Wire {
    type Decoder: StreamDecoder;

    fn provider(&self) -> Provider;
    /// The model to ask for: the request's, else the adapter's default.
    fn model(&self, request: &ChatRequest) -> String;
    fn url(&self, model: &str, stream: bool) -> String;
    /// Every request header; the host adds the credential.
    fn headers(&self, stream: bool) -> Vec<(String, String)>;
    fn body(&self, request: &ChatRequest, model: &str, stream: bool) -> Result<Value, LlmError>;
    /// Reads a whole (not streamed) response body.
    fn parse(&self, body: &[u8], context: &ReplyContext) -> Result<ChatResponse, LlmError>;
    fn decoder(&self, context: ReplyContext) -> Self::Decoder;

    /// The error for a response with a failure status.
    fn error(&self, status: u16, headers: &Headers, body: &[u8]) -> LlmError {
        self.provider().status_error(status, headers, body)
    }
}

/// Whether a stream has more to say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    More,
    Done,
}

/// Reads a streamed response one server-sent event at a time.
pub trait StreamDecoder {
    /// Handles one event, passing any new text to `emit`.
    fn event(&mut self, event: &SseEvent, emit: &mut dyn FnMut(&str)) -> Result<Flow, LlmError>;
    /// The assembled response, once the stream is done or the body ended.
    fn finish(self) -> Result<ChatResponse, LlmError>;
}

/// What reading a response needs to know about its request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyContext {
    /// The model asked for, reported when the provider does not say.
    pub model: String,
    /// Tool calls the provider leaves without an id get `call-<n>`, counting
    /// on from the calls already in the conversation, so that ids stay unique
    /// within a task and the same on a replay.
    pub first_call_number: usize,
}

impl ReplyContext {
    pub fn new(request: &ChatRequest, model: &str) -> Self {
        let earlier: usize = request
            .messages
            .iter()
            .map(|message| message.tool_calls.len())
            .sum();
        Self {
            model: model.to_owned(),
            first_call_number: earlier + 1,
        }
    }
}

/// A reply being assembled from a response or a stream.
#[derive(Debug, Clone)]
pub struct Reply {
    pub content: String,
    pub tool_calls: Vec<ToolCall>,
    pub finish_reason: Option<FinishReason>,
    pub usage: Option<Usage>,
    /// The model the provider reported, if it did.
    pub model: Option<String>,
    context: ReplyContext,
}

impl Reply {
    pub fn new(context: ReplyContext) -> Self {
        Self {
            content: String::new(),
            tool_calls: Vec::new(),
            finish_reason: None,
            usage: None,
            model: None,
            context,
        }
    }

    /// Adds a tool call, minting an id when the provider gave none; empty
    /// arguments become `{}`.
    pub fn push_call(&mut self, id: Option<&str>, name: &str, arguments: String) {
        let id = match id.map(str::trim) {
            Some(id) if !id.is_empty() => id.to_owned(),
            _ => format!(
                "call-{}",
                self.context.first_call_number + self.tool_calls.len()
            ),
        };
        let arguments = if arguments.trim().is_empty() {
            "{}".to_owned()
        } else {
            arguments
        };
        self.tool_calls.push(ToolCall {
            id,
            name: name.to_owned(),
            arguments,
        });
    }

    /// Records the model the provider reported, ignoring blanks.
    pub fn set_model(&mut self, model: Option<&str>) {
        if let Some(model) = model.filter(|model| !model.is_empty()) {
            self.model = Some(model.to_owned());
        }
    }

    pub fn into_response(self) -> ChatResponse {
        let mut finish_reason = self.finish_reason.unwrap_or(FinishReason::Other);
        // Some providers (Gemini, some OpenAI-compatible servers) say "stop"
        // when they stop to call tools.
        if finish_reason == FinishReason::Stop && !self.tool_calls.is_empty() {
            finish_reason = FinishReason::ToolCalls;
        }
        ChatResponse {
            message: ChatMessage {
                role: Role::Assistant,
                content: self.content,
                tool_calls: self.tool_calls,
                tool_call_id: None,
            },
            finish_reason,
            usage: self.usage,
            model: self.model.unwrap_or(self.context.model),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> ReplyContext {
        ReplyContext {
            model: "asked".into(),
            first_call_number: 3,
        }
    }

    #[test]
    fn calls_without_ids_get_numbered_ones() {
        let mut reply = Reply::new(context());
        reply.push_call(None, "a", String::new());
        reply.push_call(Some("given"), "b", "{\"x\":1}".into());
        reply.push_call(Some(" "), "c", "{}".into());
        let ids: Vec<_> = reply.tool_calls.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["call-3", "given", "call-5"]);
        assert_eq!(reply.tool_calls[0].arguments, "{}");
    }

    #[test]
    fn tool_calls_with_stop_mean_tool_calls() {
        let mut reply = Reply::new(context());
        reply.finish_reason = Some(FinishReason::Stop);
        reply.push_call(None, "a", String::new());
        let response = reply.into_response();
        assert_eq!(response.finish_reason, FinishReason::ToolCalls);
        assert_eq!(response.model, "asked");
        assert_eq!(response.message.role, Role::Assistant);
    }

    #[test]
    fn the_context_counts_earlier_calls() {
        let call = |id: &str| ToolCall {
            id: id.into(),
            name: "t".into(),
            arguments: "{}".into(),
        };
        let request = ChatRequest {
            model: None,
            system: None,
            messages: vec![ChatMessage {
                role: Role::Assistant,
                content: String::new(),
                tool_calls: vec![call("a"), call("b")],
                tool_call_id: None,
            }],
            tools: Vec::new(),
            temperature: None,
            max_tokens: None,
            stop: Vec::new(),
            provider_options: String::new(),
        };
        assert_eq!(ReplyContext::new(&request, "m").first_call_number, 3);
    }
}
