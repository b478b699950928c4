//! Chat Completions request bodies.

use serde_json::{Value, json};

use crate::llm_http::json::{sampling, schema, tools};
use crate::llm_http::{ChatMessage, ChatRequest, LlmError, Provider, Role, ToolChoice, ToolSpec};

/// The request body for `POST /chat/completions`.
pub fn build(
    provider: &Provider,
    request: &ChatRequest,
    model: &str,
    stream: bool,
    max_tokens_field: &str,
) -> Result<Value, LlmError> {
    let mut messages = Vec::new();
    if let Some(system) = request.system.as_deref().filter(|s| !s.is_empty()) {
        messages.push(json!({"role": "system", "content": system}));
    }
    for message in &request.messages {
        messages.push(self::message(provider, message)?);
    }
    let mut body = json!({"model": model, "messages": messages, "stream": stream});
    if stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    function_tools(
        provider,
        request,
        &mut body,
        |tool, parameters| {
            json!({
                "type": "function",
                "function": {
                    "name": tool.name,
                    "description": tool.description,
                    "parameters": parameters,
                },
            })
        },
        |name| json!({"type": "function", "function": {"name": name}}),
    )?;
    if let Some(format) = &request.response_format {
        body["response_format"] = json!({
            "type": "json_schema",
            "json_schema": {
                "name": format.name,
                "schema": schema(provider, &format.name, &format.schema)?,
                "strict": format.strict,
            },
        });
    }
    sampling(&mut body, request);
    if let Some(max_tokens) = request.max_tokens {
        body[max_tokens_field] = json!(max_tokens);
    }
    if !request.stop.is_empty() {
        body["stop"] = json!(request.stop);
    }
    Ok(body)
}

/// The request's tools, as both OpenAI APIs take them: `tools`, each shaped
/// by `function` from the tool and its input schema, then `tool_choice`
/// (left out for `auto`, the default; `named` shapes the choice of one
/// tool) and `parallel_tool_calls`. Both are refused in a request without
/// tools, so they are sent only with some.
pub(crate) fn function_tools(
    provider: &Provider,
    request: &ChatRequest,
    body: &mut Value,
    function: impl Fn(&ToolSpec, Value) -> Value,
    named: impl Fn(&str) -> Value,
) -> Result<(), LlmError> {
    if request.tools.is_empty() {
        return crate::llm_http::wire::no_tools_to_choose(provider, &request.tool_choice);
    }
    body["tools"] = tools(provider, &request.tools, function)?;
    let choice = match &request.tool_choice {
        ToolChoice::Auto => None,
        ToolChoice::None => Some(json!("none")),
        ToolChoice::Required => Some(json!("required")),
        ToolChoice::Named(name) => Some(named(name)),
    };
    if let Some(choice) = choice {
        body["tool_choice"] = choice;
    }
    if let Some(parallel) = request.parallel_tool_calls {
        body["parallel_tool_calls"] = json!(parallel);
    }
    Ok(())
}

fn message(provider: &Provider, message: &ChatMessage) -> Result<Value, LlmError> {
    Ok(match message.role {
        Role::System => json!({"role": "system", "content": message.content}),
        Role::User => json!({"role": "user", "content": message.content}),
        Role::Assistant => {
            // With tool calls and no text, content is null rather than "".
            let content = if message.content.is_empty() && !message.tool_calls.is_empty() {
                Value::Null
            } else {
                json!(message.content)
            };
            let mut value = json!({"role": "assistant", "content": content});
            if !message.tool_calls.is_empty() {
                let calls: Vec<Value> = message
                    .tool_calls
                    .iter()
                    .map(|call| {
                        json!({
                            "id": call.id,
                            "type": "function",
                            "function": {"name": call.name, "arguments": call.arguments},
                        })
                    })
                    .collect();
                value["tool_calls"] = Value::Array(calls);
            }
            value
        }
        Role::Tool => {
            let id = message.tool_call_id.as_deref().ok_or_else(|| {
                provider.invalid_request("a tool message has no tool-call-id".into())
            })?;
            json!({"role": "tool", "tool_call_id": id, "content": message.content})
        }
    })
}
