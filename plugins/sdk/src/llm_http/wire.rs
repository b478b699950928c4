//! What a provider's wire format supplies, and the three `translate` exports
//! every HTTP adapter runs with it: [`prepare`], [`read_response`] and
//! [`read_stream`]. All of it is pure, so it is tested natively.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::llm_http::headers::Headers;
use crate::llm_http::options::{ProviderOptions, Ranges};
use crate::llm_http::{
    CallContext, ChatMessage, ChatRequest, ChatResponse, Exchange, FinishReason, HttpRequest,
    HttpResponse, LlmError, Prepared, Provider, ProviderDatum, Role, Settings, SseEvent,
    StreamPart, ToolCall, ToolCallPart, ToolChoice, Usage, UsagePart, json,
};

pub trait Wire {
    fn provider(&self) -> Provider;
    /// The model to ask for: the request's, else the adapter's default.
    fn model(&self, request: &ChatRequest) -> String;
    /// The sampling options the provider accepts, checked before sending.
    fn ranges(&self) -> Ranges;
    /// Puts `top_k` where the provider wants it (top level by default).
    fn set_top_k(&self, body: &mut Value, top_k: u64) {
        body["top_k"] = json!(top_k);
    }
    /// The option in a finished body that asks for several replies, with its
    /// value, if it asks for more than one (`n` by default).
    fn several_replies(&self, body: &Value) -> Option<(&'static str, u64)> {
        body["n"].as_u64().filter(|n| *n > 1).map(|n| ("n", n))
    }
    /// Path and query, relative to the base URL the operator configured.
    fn path(&self, model: &str, stream: bool) -> String;
    /// Every request header but the credential, which the host adds.
    fn headers(&self, stream: bool) -> Vec<(String, String)>;
    fn body(&self, request: &ChatRequest, model: &str, stream: bool) -> Result<Value, LlmError>;
    /// Reads a whole (not streamed) response body that came with a success
    /// status.
    fn parse(&self, body: &[u8], context: &ReplyContext) -> Result<ChatResponse, LlmError>;
    /// Translates one server-sent event of a streamed answer into the parts
    /// it adds, ending with [`StreamPart::Done`] when the provider says the
    /// reply is complete. Keeps no state: the events before it were handed
    /// to another instance, perhaps.
    fn decode(
        &self,
        event: &SseEvent,
        context: &ReplyContext,
        parts: &mut Vec<StreamPart>,
    ) -> Result<(), LlmError>;

    /// The error for a response with a failure status.
    fn error(&self, status: u16, headers: &Headers, body: &[u8]) -> LlmError {
        self.provider().status_error(status, headers, body)
    }

    /// This wire speaking `api`, for a request whose options name one
    /// (`options.llm.api`). A wire that speaks several APIs (OpenAI's Chat
    /// Completions and Responses) returns itself set to that one, or refuses
    /// a name it does not know, listing the ones it does. By default a wire
    /// speaks one API, and the option is refused rather than sent as a body
    /// key the provider would not know.
    fn for_api(&self, api: &str) -> Result<Self, LlmError>
    where
        Self: Sized,
    {
        Err(crate::llm_http::options::options_error(format!(
            "api {api:?} is not accepted: the {} adapter speaks one API; leave api out",
            self.provider().name
        )))
    }

    /// The API this wire speaks, when its adapter speaks several: it travels
    /// in the reply context ([`ReplyContext::api`]), so that the answer is
    /// read as an answer of the API that was asked.
    fn api(&self) -> Option<&'static str> {
        None
    }
}

/// An HTTP adapter: a wire format configured from the manifest's settings.
/// Every adapter type implements the exported `translate` interface through
/// it, so an adapter crate is its [`Wire`], this, and
/// [`register_llm_adapter!`](crate::register_llm_adapter).
pub trait Adapter {
    type Wire: Wire;
    /// Who settings errors are about.
    const PROVIDER: Provider;
    fn wire(settings: &Settings) -> Result<Self::Wire, LlmError>;
}

impl<A: Adapter> crate::llm::LlmAdapter for A {
    fn prepare(
        _context: CallContext,
        request: ChatRequest,
        settings: String,
    ) -> Result<Prepared, LlmError> {
        let settings = Settings::parse(&A::PROVIDER, &settings)?;
        prepare_owned(&A::wire(&settings)?, request)
    }

    fn read_response(
        reply_context: String,
        response: HttpResponse,
    ) -> Result<ChatResponse, LlmError> {
        let context = ReplyContext::decode(&A::PROVIDER, &reply_context)?;
        read_response_in(&reading_wire::<A>(&context)?, &context, &response)
    }

    fn read_stream(
        reply_context: String,
        events: Vec<SseEvent>,
    ) -> Result<Vec<StreamPart>, LlmError> {
        // Decoded once for the batch: a reply streams many.
        let context = ReplyContext::decode(&A::PROVIDER, &reply_context)?;
        read_stream_in(&reading_wire::<A>(&context)?, &context, &events)
    }
}

/// The wire that reads an answer. Reading depends on nothing configurable
/// but the name the adapter goes by in messages (its `provider` setting,
/// for an adapter that takes one): what it needs of the request, that name
/// included, travels in the reply context.
fn reading_wire<A: Adapter>(context: &ReplyContext) -> Result<A::Wire, LlmError> {
    let settings = match &context.provider {
        Some(name) => Settings::default().with(PROVIDER_SETTING, Value::String(name.clone())),
        None => Settings::default(),
    };
    A::wire(&settings)
}

/// The setting that names the provider in messages, for an adapter that
/// serves several endpoints (see [`ReplyContext::provider`]).
pub const PROVIDER_SETTING: &str = "provider";

/// `prepare`: the HTTP request for `request`, and what reading its answer
/// will need to know.
pub fn prepare<W: Wire>(wire: &W, request: &ChatRequest) -> Result<Prepared, LlmError> {
    prepare_owned(wire, request.clone())
}

/// [`prepare`] of a request the caller hands over: the options' sampling
/// keys are written into it rather than into a copy.
fn prepare_owned<W: Wire>(wire: &W, mut request: ChatRequest) -> Result<Prepared, LlmError> {
    let options = ProviderOptions::parse(&wire.provider(), &request.provider_options)?;
    let chosen;
    let wire = match &options.api {
        Some(api) => {
            chosen = wire.for_api(api)?;
            &chosen
        }
        None => wire,
    };
    let sampling = options.sampling(&request);
    wire.ranges().check(&wire.provider(), &sampling)?;
    // The options' sampling keys win over the request's own fields.
    request.temperature = sampling.temperature.map(|t| t as f32);
    request.top_p = sampling.top_p.map(|p| p as f32);
    request.max_tokens = sampling
        .max_tokens
        .map(|m| u32::try_from(m).unwrap_or(u32::MAX));
    if let Some(choice) = &options.tool_choice {
        if let ToolChoice::Named(name) = choice
            && !request.tools.is_empty()
            && !request.tools.iter().any(|tool| &tool.name == name)
        {
            return Err(crate::llm_http::options::options_error(format!(
                "tool_choice names {name:?}, which is not one of the request's tools"
            )));
        }
        request.tool_choice = choice.clone();
    }
    if options.parallel_tool_calls.is_some() {
        request.parallel_tool_calls = options.parallel_tool_calls;
    }
    let request = &request;
    let model = wire.model(request);
    let mut body = wire.body(request, &model, options.stream)?;
    if let Some(top_k) = sampling.top_k {
        wire.set_top_k(&mut body, top_k);
    }
    json::merge(&mut body, Value::Object(options.extra));
    // A step takes one reply: asking for several is refused, not cut short.
    if let Some((option, count)) = wire.several_replies(&body) {
        return Err(crate::llm_http::options::options_error(format!(
            "{option} {count} asks for {count} replies, and a step takes one"
        )));
    }
    Ok(Prepared {
        exchange: Exchange::Http(HttpRequest {
            method: "POST".into(),
            path: wire.path(&model, options.stream),
            headers: wire.headers(options.stream),
            // Not `body.to_string()`: `Display` writes through a formatter
            // a piece at a time, about 1.6 times as slow.
            body: serde_json::to_vec(&body).expect("a JSON value always serializes"),
            stream: options.stream,
        }),
        reply_context: ReplyContext {
            api: wire.api().map(str::to_owned),
            provider: Some(wire.provider().name.into_owned()),
            ..ReplyContext::new(request, &model)
        }
        .encode(),
    })
}

/// `read-response`: a whole answer, whatever its status.
pub fn read_response<W: Wire>(
    wire: &W,
    reply_context: &str,
    response: &HttpResponse,
) -> Result<ChatResponse, LlmError> {
    let context = ReplyContext::decode(&wire.provider(), reply_context)?;
    read_response_in(wire, &context, response)
}

fn read_response_in<W: Wire>(
    wire: &W,
    context: &ReplyContext,
    response: &HttpResponse,
) -> Result<ChatResponse, LlmError> {
    let status = response.status;
    if !(200..300).contains(&status) {
        let headers = Headers::from_pairs(response.headers.iter().cloned());
        return Err(wire.error(status, &headers, &response.body));
    }
    wire.parse(&response.body, context).map_err(|mut error| {
        error.status.get_or_insert(status);
        error
    })
}

/// `read-stream`: the parts a batch of events adds. Events after the one
/// that completes the reply are ignored.
pub fn read_stream<W: Wire>(
    wire: &W,
    reply_context: &str,
    events: &[SseEvent],
) -> Result<Vec<StreamPart>, LlmError> {
    let context = ReplyContext::decode(&wire.provider(), reply_context)?;
    read_stream_in(wire, &context, events)
}

fn read_stream_in<W: Wire>(
    wire: &W,
    context: &ReplyContext,
    events: &[SseEvent],
) -> Result<Vec<StreamPart>, LlmError> {
    let mut parts = Vec::new();
    for event in events {
        wire.decode(event, context, &mut parts)?;
        if parts.last() == Some(&StreamPart::Done) {
            break;
        }
    }
    Ok(parts)
}

/// A request that insists on a tool call but offers no tool cannot be met.
pub fn no_tools_to_choose(provider: &Provider, choice: &ToolChoice) -> Result<(), LlmError> {
    match choice {
        ToolChoice::Auto | ToolChoice::None => Ok(()),
        ToolChoice::Required => Err(provider.invalid_request(
            "the tool choice requires a tool call, but the request offers no tools".into(),
        )),
        ToolChoice::Named(name) => Err(provider.invalid_request(format!(
            "the tool choice names {name:?}, but the request offers no tools"
        ))),
    }
}

/// What reading a response needs to know about its request. It travels
/// through the host as `reply-context`, a small JSON object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyContext {
    /// The model asked for, reported when the provider does not say.
    pub model: String,
    /// Tool calls the provider leaves without an id get `call-<n>`, counting
    /// on from the calls already in the conversation, so that ids stay unique
    /// within a task and the same on a replay.
    pub first_call_number: usize,
    /// The API the request was sent to, for an adapter that speaks several
    /// (see [`Wire::api`]); `None` for the others, and in contexts made
    /// before there was a choice.
    pub api: Option<String>,
    /// The name the adapter went by when it prepared the request (its
    /// `provider` setting, say "OpenRouter"), so that errors read from the
    /// answer use it too; `None` in contexts made before it travelled.
    pub provider: Option<String>,
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
            api: None,
            provider: None,
        }
    }

    pub fn encode(&self) -> String {
        serde_json::to_string(&EncodedContext {
            api: self.api.as_deref().map(Cow::Borrowed),
            first_call: self.first_call_number as u64,
            model: Cow::Borrowed(&self.model),
            provider: self.provider.as_deref().map(Cow::Borrowed),
        })
        .expect("a reply context is always JSON")
    }

    pub fn decode(provider: &Provider, text: &str) -> Result<Self, LlmError> {
        // Read typed first (every translation of an answer decodes it);
        // what that refuses is read as a tree, which says what is wrong.
        if let Ok(encoded) = serde_json::from_str::<EncodedContext>(text) {
            return Ok(Self {
                model: encoded.model.into_owned(),
                first_call_number: usize::try_from(encoded.first_call).unwrap_or(usize::MAX),
                api: encoded.api.map(Cow::into_owned),
                provider: encoded.provider.map(Cow::into_owned),
            });
        }
        let json: Value =
            serde_json::from_str(text).map_err(|error| provider.bad_context(&error.to_string()))?;
        let model = json["model"].as_str();
        let first = json["first_call"].as_u64();
        let text_field = |name: &str| match &json[name] {
            Value::Null => Ok(None),
            Value::String(text) => Ok(Some(text.clone())),
            other => Err(provider.bad_context(&format!("its {name} is {other}"))),
        };
        let api = text_field("api")?;
        let named = text_field("provider")?;
        match (model, first) {
            (Some(model), Some(first)) => Ok(Self {
                model: model.to_owned(),
                first_call_number: usize::try_from(first).unwrap_or(usize::MAX),
                api,
                provider: named,
            }),
            _ => Err(provider.bad_context("it lacks the model or the first call number")),
        }
    }

    /// The id for the tool call at `position` of the reply (counting from
    /// 0), when the provider gave none.
    pub fn call_id(&self, position: usize) -> String {
        format!("call-{}", self.first_call_number.saturating_add(position))
    }

    /// The id of streamed call `index`: the provider's, else a minted one.
    pub fn piece_id(&self, index: u32, id: Option<&str>) -> String {
        match id.map(str::trim) {
            Some(id) if !id.is_empty() => id.to_owned(),
            _ => self.call_id(index as usize),
        }
    }

    /// The `tool-call` part for the first piece of call `index`: the
    /// provider's id, else a minted one (see [`Self::piece_id`]).
    pub fn first_piece(
        &self,
        index: u32,
        id: Option<&str>,
        name: &str,
        arguments: String,
    ) -> StreamPart {
        let id = self.piece_id(index, id);
        StreamPart::ToolCall(ToolCallPart {
            index,
            id: Some(id),
            name: Some(name.to_owned()),
            arguments,
        })
    }
}

/// A [`ReplyContext`] as it travels: its keys in this order, those
/// without a value left out.
#[derive(Serialize, Deserialize)]
struct EncodedContext<'a> {
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    api: Option<Cow<'a, str>>,
    first_call: u64,
    #[serde(borrow)]
    model: Cow<'a, str>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    provider: Option<Cow<'a, str>>,
}

/// The usage a streamed reply reports, both counts known.
pub fn usage_part(usage: Usage) -> StreamPart {
    StreamPart::Usage(UsagePart {
        input_tokens: Some(usage.input_tokens),
        output_tokens: Some(usage.output_tokens),
    })
}

/// More arguments for tool call `index`.
pub fn more_arguments(index: u32, arguments: String) -> StreamPart {
    StreamPart::ToolCall(ToolCallPart {
        index,
        id: None,
        name: None,
        arguments,
    })
}

/// A whole (not streamed) reply being assembled from a response body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub content: String,
    pub tool_calls: Vec<ToolCall>,
    pub finish_reason: Option<FinishReason>,
    pub usage: Option<Usage>,
    /// The model the provider reported, if it did.
    pub model: Option<String>,
    /// What must go back to the provider with this reply (see
    /// `chat-message.provider-data`).
    pub provider_data: Vec<ProviderDatum>,
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
            provider_data: Vec::new(),
            context,
        }
    }

    /// Keeps an opaque datum of the provider's with the reply.
    pub fn keep(&mut self, key: String, value: String) {
        self.provider_data.push(ProviderDatum { key, value });
    }

    /// Adds a tool call, minting an id when the provider gave none; empty
    /// arguments become `{}`. Returns the call's id.
    pub fn push_call(&mut self, id: Option<&str>, name: &str, arguments: String) -> &str {
        let id = match id.map(str::trim) {
            Some(id) if !id.is_empty() => id.to_owned(),
            _ => self.context.call_id(self.tool_calls.len()),
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
        &self.tool_calls.last().expect("just pushed").id
    }

    /// Records the model the provider reported, ignoring blanks.
    pub fn set_model(&mut self, model: Option<&str>) {
        if let Some(model) = model.filter(|model| !model.is_empty()) {
            self.model = Some(model.to_owned());
        }
    }

    pub fn into_response(self) -> ChatResponse {
        ChatResponse {
            finish_reason: finish_reason(self.finish_reason, !self.tool_calls.is_empty()),
            message: ChatMessage {
                role: Role::Assistant,
                content: self.content,
                images: Vec::new(),
                tool_calls: self.tool_calls,
                tool_call_id: None,
                provider_data: self.provider_data,
            },
            usage: self.usage,
            model: self.model.unwrap_or(self.context.model),
        }
    }
}

/// The finish reason of a reply: `other` when the provider gave none, and
/// `tool-calls` when it said "stop" but asked for tools, as Gemini and some
/// OpenAI-compatible servers do. Whoever assembles a streamed reply applies
/// the same rule.
pub fn finish_reason(given: Option<FinishReason>, has_tool_calls: bool) -> FinishReason {
    match given.unwrap_or(FinishReason::Other) {
        FinishReason::Stop if has_tool_calls => FinishReason::ToolCalls,
        reason => reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm_http::fixtures::{message, weather_request};

    fn context() -> ReplyContext {
        ReplyContext {
            model: "asked".into(),
            first_call_number: 3,
            api: None,
            provider: None,
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

        let part = |id| match context().first_piece(1, id, "t", String::new()) {
            StreamPart::ToolCall(part) => part.id,
            other => panic!("expected a tool call part, got {other:?}"),
        };
        assert_eq!(part(None).as_deref(), Some("call-4"));
        assert_eq!(part(Some("")).as_deref(), Some("call-4"));
        assert_eq!(part(Some("toolu_1")).as_deref(), Some("toolu_1"));
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
        assert_eq!(finish_reason(None, false), FinishReason::Other);
        assert_eq!(
            finish_reason(Some(FinishReason::Length), true),
            FinishReason::Length
        );
    }

    #[test]
    fn the_context_counts_earlier_calls_and_survives_the_host() {
        let call = |id: &str| ToolCall {
            id: id.into(),
            name: "t".into(),
            arguments: "{}".into(),
        };
        let mut request = weather_request();
        request.messages = vec![ChatMessage {
            tool_calls: vec![call("a"), call("b")],
            ..message(Role::Assistant, "")
        }];
        let context = ReplyContext::new(&request, "m");
        assert_eq!(context.first_call_number, 3);
        let provider = Provider::named("P");
        assert_eq!(
            ReplyContext::decode(&provider, &context.encode()).unwrap(),
            context
        );
        for text in [
            "",
            "{}",
            r#"{"model": "m"}"#,
            r#"{"model": "m", "first_call": 1, "api": 3}"#,
            r#"{"model": "m", "first_call": 1, "provider": ["OpenRouter"]}"#,
        ] {
            let error = ReplyContext::decode(&provider, text).unwrap_err();
            assert_eq!(error.kind, crate::llm_http::LlmErrorKind::Other, "{text}");
        }
        let chosen = ReplyContext {
            api: Some("responses".into()),
            provider: Some("OpenRouter".into()),
            ..context
        };
        // Escaped text and a null read as the tree reads them.
        let escaped = ReplyContext::decode(
            &provider,
            r#"{"model": "m\"1\u00e9", "first_call": 2, "api": null}"#,
        )
        .unwrap();
        assert_eq!((escaped.model.as_str(), escaped.api), ("m\"1é", None));
        assert!(chosen.encode().contains(r#""api":"responses""#));
        assert!(chosen.encode().contains(r#""provider":"OpenRouter""#));
        assert_eq!(
            ReplyContext::decode(&provider, &chosen.encode()).unwrap(),
            chosen
        );
    }

    /// A wire with one API refuses the option that would choose another,
    /// before anything is sent.
    #[test]
    fn a_wire_of_one_api_refuses_the_api_option() {
        let wire = crate::llm_http::openai::ChatCompletions {
            provider: Provider::named("P"),
            default_model: "m".into(),
            extra_headers: Vec::new(),
            max_tokens_field: "max_tokens",
            ranges: crate::llm_http::options::Ranges::openai_compatible(),
        };
        let mut request = weather_request();
        request.provider_options = r#"{"api": "responses"}"#.into();
        let error = prepare(&wire, &request).unwrap_err();
        assert_eq!(error.kind, crate::llm_http::LlmErrorKind::InvalidRequest);
        assert_eq!(
            error.message,
            "invalid LLM options: api \"responses\" is not accepted: the P adapter speaks one \
             API; leave api out"
        );
        request.provider_options = String::new();
        let prepared = prepare(&wire, &request).unwrap();
        let context = ReplyContext::decode(&wire.provider, &prepared.reply_context).unwrap();
        assert_eq!(context.api, None);
    }
}
