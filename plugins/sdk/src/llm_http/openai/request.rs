//! Chat Completions request bodies.

use serde_json::{Value, json};

use crate::llm_http::images::{check_placement, tool_images_caption, url_or_data};
use crate::llm_http::json::{sampling, schema, tools};
use crate::llm_http::{ChatMessage, ChatRequest, LlmError, Provider, Role, ToolChoice, ToolSpec};
use crate::types::Image;

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
    // A tool message takes text only: the images of a run of tool results
    // follow it in one user message, after the last result (a user message
    // between two results would break the run the provider expects).
    let mut tool_images: Vec<Value> = Vec::new();
    for message in &request.messages {
        if message.role != Role::Tool && !tool_images.is_empty() {
            messages.push(json!({"role": "user", "content": std::mem::take(&mut tool_images)}));
        }
        messages.push(self::message(provider, message)?);
        if message.role == Role::Tool && !message.images.is_empty() {
            let call_id = message.tool_call_id.as_deref().unwrap_or_default();
            tool_images.push(text_part(&tool_images_caption(
                call_id,
                message.images.len(),
            )));
            tool_images.extend(message.images.iter().map(image_part));
        }
    }
    if !tool_images.is_empty() {
        messages.push(json!({"role": "user", "content": tool_images}));
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

fn text_part(text: &str) -> Value {
    json!({"type": "text", "text": text})
}

fn image_part(image: &Image) -> Value {
    json!({"type": "image_url", "image_url": {"url": url_or_data(image)}})
}

fn message(provider: &Provider, message: &ChatMessage) -> Result<Value, LlmError> {
    check_placement(provider, message)?;
    Ok(match message.role {
        Role::System => json!({"role": "system", "content": message.content}),
        Role::User if message.images.is_empty() => {
            json!({"role": "user", "content": message.content})
        }
        // Text first, then the images, as parts of one message.
        Role::User => {
            let text = (!message.content.is_empty()).then(|| text_part(&message.content));
            let parts: Vec<Value> = text
                .into_iter()
                .chain(message.images.iter().map(image_part))
                .collect();
            json!({"role": "user", "content": parts})
        }
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
