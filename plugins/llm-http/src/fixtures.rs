//! A request every wire format's tests build: a system prompt, a question,
//! an assistant turn with two parallel tool calls, both results (one an
//! error) and one tool.

use crate::{ChatMessage, ChatRequest, Role, ToolCall, ToolSpec};

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
        tool_calls: Vec::new(),
        tool_call_id: None,
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
        temperature: Some(0.2),
        max_tokens: Some(256),
        stop: vec!["END".into()],
        provider_options: String::new(),
    }
}

/// Runs a stream decoder over a whole SSE body cut into `size`-byte chunks,
/// collecting what it emitted.
pub fn decode_stream<D: crate::wire::StreamDecoder>(
    mut decoder: D,
    body: &str,
    size: usize,
) -> (Result<crate::ChatResponse, crate::LlmError>, Vec<String>) {
    use crate::wire::Flow;
    let mut emitted = Vec::new();
    let mut parser = crate::sse::SseParser::new();
    let mut emit = |text: &str| emitted.push(text.to_owned());
    for chunk in body.as_bytes().chunks(size) {
        for event in parser.push(chunk) {
            match decoder.event(&event, &mut emit) {
                Ok(Flow::More) => {}
                Ok(Flow::Done) => return (decoder.finish(), emitted),
                Err(error) => return (Err(error), emitted),
            }
        }
    }
    if let Some(event) = parser.finish()
        && let Err(error) = decoder.event(&event, &mut emit)
    {
        return (Err(error), emitted);
    }
    (decoder.finish(), emitted)
}
