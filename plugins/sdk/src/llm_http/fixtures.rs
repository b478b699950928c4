//! Test support for every wire format's tests: a request with a system
//! prompt, a question, an assistant turn with two parallel tool calls, both
//! results (one an error) and one tool; and a stream replayer that frames a
//! recorded SSE body, hands it to `read-stream` in batches, and assembles
//! the parts into a reply the way the host does.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::llm_http::wire::{ReplyContext, Wire, finish_reason, read_stream};
use crate::llm_http::{
    ChatMessage, ChatRequest, ChatResponse, Exchange, HttpRequest, LlmError, LlmErrorKind,
    ResponseFormat, Role, StreamPart, ToolCall, ToolChoice, ToolSpec, Usage,
};

pub const WEATHER_SCHEMA: &str = r#"{
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {"city": {"type": "string", "description": "City name"}},
    "required": ["city"],
    "additionalProperties": false
}"#;

pub fn message(role: Role, content: &str) -> ChatMessage {
    ChatMessage {
        role,
        content: content.into(),
        images: Vec::new(),
        tool_calls: Vec::new(),
        tool_call_id: None,
        provider_data: Vec::new(),
    }
}

pub fn call(id: &str, city: &str) -> ToolCall {
    ToolCall {
        id: id.into(),
        name: "get_weather".into(),
        arguments: format!(r#"{{"city":"{city}"}}"#),
    }
}

pub fn tool_result(id: &str, content: &str) -> ChatMessage {
    ChatMessage {
        tool_call_id: Some(id.into()),
        ..message(Role::Tool, content)
    }
}

/// A one-pixel PNG, base64: what the image fixtures carry inline.
pub const PIXEL_PNG: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==";

/// [`weather_request`] with images: the question carries a URL and an
/// inline PNG, and the first tool result an inline PNG.
pub fn image_request() -> ChatRequest {
    let pixel = || {
        crate::types::Image::Inline(crate::types::InlineImage {
            media_type: "image/png".into(),
            base64: PIXEL_PNG.into(),
        })
    };
    let mut request = weather_request();
    request.messages[0].images = vec![
        crate::types::Image::Url("https://example.com/paris.jpg".into()),
        pixel(),
    ];
    request.messages[2].images = vec![pixel()];
    request
}

pub fn weather_request() -> ChatRequest {
    ChatRequest {
        model: None,
        system: Some("You are terse.".into()),
        messages: vec![
            message(Role::User, "Weather in Paris and Rome?"),
            ChatMessage {
                tool_calls: vec![call("call_1", "Paris"), call("call_2", "Rome")],
                ..message(Role::Assistant, "")
            },
            tool_result("call_1", r#"{"temp_c":18}"#),
            tool_result("call_2", "Error: the weather service timed out"),
        ],
        tools: vec![ToolSpec {
            name: "get_weather".into(),
            description: "Current weather for a city".into(),
            input_schema: WEATHER_SCHEMA.into(),
        }],
        tool_choice: ToolChoice::Auto,
        parallel_tool_calls: None,
        response_format: None,
        temperature: Some(0.2),
        top_p: None,
        max_tokens: Some(256),
        stop: vec!["END".into()],
        provider_options: String::new(),
    }
}

/// [`weather_request`] with the options a body carries besides the
/// conversation: `top_p` 0.9, no parallel tool calls, and a strict response
/// format named `weather`.
pub fn options_request() -> ChatRequest {
    ChatRequest {
        top_p: Some(0.9),
        parallel_tool_calls: Some(false),
        response_format: Some(ResponseFormat {
            name: "weather".into(),
            schema: r#"{"type":"object","properties":{"temp_c":{"type":"number"}}}"#.into(),
            strict: true,
        }),
        ..weather_request()
    }
}

/// Every tool choice, with the `tool_choice` a body gives for it (none for
/// `auto`, the default); `named` is the choice of `get_weather` as the wire
/// format shapes it.
pub fn tool_choices(named: Value) -> [(ToolChoice, Option<Value>); 4] {
    [
        (ToolChoice::Auto, None),
        (ToolChoice::None, Some(json!("none"))),
        (ToolChoice::Required, Some(json!("required"))),
        (ToolChoice::Named("get_weather".into()), Some(named)),
    ]
}

/// The HTTP request of an exchange `prepare` made, and its body as JSON;
/// any other exchange fails the test.
pub fn http_request(exchange: Exchange) -> (HttpRequest, Value) {
    let Exchange::Http(http) = exchange else {
        panic!("expected an HTTP exchange");
    };
    let body = serde_json::from_slice(&http.body).expect("a JSON body");
    (http, body)
}

/// Checks that `error` is of `kind` and its message mentions `needle`.
pub fn expect_error(error: &LlmError, kind: LlmErrorKind, needle: &str) {
    assert_eq!(error.kind, kind);
    assert!(error.message.contains(needle), "{}", error.message);
}

/// Checks that `http` posts to `path` for a whole (not streamed) answer
/// in JSON.
pub fn expect_unstreamed_post(http: &HttpRequest, path: &str) {
    assert_eq!(http.method, "POST");
    assert_eq!(http.path, path);
    assert!(!http.stream);
    assert!(
        http.headers
            .contains(&("accept".into(), "application/json".into()))
    );
}

/// Replays a whole SSE body cut into `size`-byte chunks: each chunk's
/// complete events go to `read-stream` as one batch, as the host would send
/// them, until a batch says `done`. Returns the assembled reply and the text
/// parts in order.
pub fn decode_stream<W: Wire>(
    wire: &W,
    context: &ReplyContext,
    body: &str,
    size: usize,
) -> (Result<ChatResponse, LlmError>, Vec<String>) {
    let reply_context = context.encode();
    let mut parser = crate::llm_http::sse::SseParser::new();
    let mut parts = Vec::new();
    let batches = body
        .as_bytes()
        .chunks(size)
        .map(|chunk| parser.push(chunk))
        .collect::<Vec<_>>()
        .into_iter()
        .chain(std::iter::once(parser.finish().into_iter().collect()));
    for events in batches.filter(|events: &Vec<_>| !events.is_empty()) {
        match read_stream(wire, &reply_context, &events) {
            Ok(more) => parts.extend(more),
            Err(error) => return (Err(error), texts(&parts)),
        }
        if parts.contains(&StreamPart::Done) {
            break;
        }
    }
    let finished = parts
        .iter()
        .any(|part| matches!(part, StreamPart::Done | StreamPart::Finish(_)));
    let result = if finished {
        Ok(assemble(&parts))
    } else {
        Err(LlmError::new(
            LlmErrorKind::Unavailable,
            "the stream ended before the reply was complete",
        ))
    };
    (result, texts(&parts))
}

fn texts(parts: &[StreamPart]) -> Vec<String> {
    parts
        .iter()
        .filter_map(|part| match part {
            StreamPart::Text(text) => Some(text.clone()),
            _ => None,
        })
        .collect()
}

/// The reply the parts of a stream make, assembled as the host does: text
/// appended, tool calls by index (the first piece names the call, arguments
/// are appended, empty ones become `{}`), provider data appended by key, the
/// latest count of each kind of token, the last finish reason (with "stop"
/// and tool calls meaning tool calls) and the last model named.
pub fn assemble(parts: &[StreamPart]) -> ChatResponse {
    let mut reply = message(Role::Assistant, "");
    let mut calls: BTreeMap<u32, ToolCall> = BTreeMap::new();
    let mut usage: Option<Usage> = None;
    let mut finish = None;
    let mut model = String::new();
    for part in parts {
        match part {
            StreamPart::Text(text) => reply.content.push_str(text),
            StreamPart::ToolCall(piece) => {
                let call = calls.entry(piece.index).or_insert_with(|| ToolCall {
                    id: piece.id.clone().unwrap_or_default(),
                    name: piece.name.clone().unwrap_or_default(),
                    arguments: String::new(),
                });
                call.arguments.push_str(&piece.arguments);
            }
            StreamPart::ProviderData((key, value)) => {
                match reply
                    .provider_data
                    .iter_mut()
                    .find(|datum| &datum.key == key)
                {
                    Some(datum) => datum.value.push_str(value),
                    None => reply.provider_data.push(crate::llm_http::ProviderDatum {
                        key: key.clone(),
                        value: value.clone(),
                    }),
                }
            }
            StreamPart::Usage(counts) => {
                let usage = usage.get_or_insert(Usage {
                    input_tokens: 0,
                    output_tokens: 0,
                });
                if let Some(input) = counts.input_tokens {
                    usage.input_tokens = input;
                }
                if let Some(output) = counts.output_tokens {
                    usage.output_tokens = output;
                }
            }
            StreamPart::Finish(reason) => finish = Some(*reason),
            StreamPart::Model(name) => name.clone_into(&mut model),
            StreamPart::Done => break,
        }
    }
    reply.tool_calls = calls
        .into_values()
        .map(|mut call| {
            if call.arguments.trim().is_empty() {
                call.arguments = "{}".into();
            }
            call
        })
        .collect();
    ChatResponse {
        finish_reason: finish_reason(finish, !reply.tool_calls.is_empty()),
        message: reply,
        usage,
        model,
    }
}
