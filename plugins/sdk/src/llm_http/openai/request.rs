//! Chat Completions request bodies.

use serde_json::{Value, json};

use crate::llm_http::json::{input_schema, number, schema};
use crate::llm_http::{ChatMessage, ChatRequest, LlmError, Provider, Role, ToolChoice};

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
    if !request.tools.is_empty() {
        let tools = request
            .tools
            .iter()
            .map(|tool| {
                Ok(json!({
                    "type": "function",
                    "function": {
                        "name": tool.name,
                        "description": tool.description,
                        "parameters": input_schema(provider, tool)?,
                    },
                }))
            })
            .collect::<Result<Vec<_>, LlmError>>()?;
        body["tools"] = Value::Array(tools);
        // Both are refused in a request without tools.
        if let Some(choice) = tool_choice(&request.tool_choice) {
            body["tool_choice"] = choice;
        }
        if let Some(parallel) = request.parallel_tool_calls {
            body["parallel_tool_calls"] = json!(parallel);
        }
    } else {
        crate::llm_http::wire::no_tools_to_choose(provider, &request.tool_choice)?;
    }
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
    if let Some(temperature) = request.temperature {
        body["temperature"] = number(temperature);
    }
    if let Some(top_p) = request.top_p {
        body["top_p"] = number(top_p);
    }
    if let Some(max_tokens) = request.max_tokens {
        body[max_tokens_field] = json!(max_tokens);
    }
    if !request.stop.is_empty() {
        body["stop"] = json!(request.stop);
    }
    Ok(body)
}

/// `tool_choice`, left out for `auto`, the default.
fn tool_choice(choice: &ToolChoice) -> Option<Value> {
    match choice {
        ToolChoice::Auto => None,
        ToolChoice::None => Some(json!("none")),
        ToolChoice::Required => Some(json!("required")),
        ToolChoice::Named(name) => Some(json!({"type": "function", "function": {"name": name}})),
    }
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
