//! Responses API request bodies: the conversation as input items.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::OUTPUT_KEY;
use crate::llm_http::images::{check_placement, url_or_data};
use crate::llm_http::json::{sampling, schema};
use crate::llm_http::openai::function_tools;
use crate::llm_http::options::options_error;
use crate::llm_http::{ChatMessage, ChatRequest, LlmError, Provider, Role, ToolCall};

/// The fewest output tokens the Responses API lets a request ask for.
pub const MIN_OUTPUT_TOKENS: u32 = 16;

/// The request body for `POST /responses`.
pub fn build(
    provider: &Provider,
    request: &ChatRequest,
    model: &str,
    stream: bool,
) -> Result<Value, LlmError> {
    let mut input = Vec::new();
    for message in &request.messages {
        items(provider, message, &mut input)?;
    }
    let mut body = json!({
        "model": model,
        "input": input,
        "stream": stream,
        // The journal keeps the conversation; reasoning comes back sealed
        // so that it can be given back (see the module's documentation).
        "store": false,
        "include": ["reasoning.encrypted_content"],
    });
    if let Some(system) = request.system.as_deref().filter(|s| !s.is_empty()) {
        body["instructions"] = json!(system);
    }
    // Tools and a named tool choice are flat, `{"type": "function",
    // "name": …}`, unlike Chat Completions'.
    function_tools(
        provider,
        request,
        &mut body,
        |tool, parameters| {
            json!({
                "type": "function",
                "name": tool.name,
                "description": tool.description,
                "parameters": parameters,
                // The Responses API makes function tools strict unless told
                // otherwise, which refuses most schemas as tools write them;
                // Chat Completions' default is kept.
                "strict": false,
            })
        },
        |name| json!({"type": "function", "name": name}),
    )?;
    if let Some(format) = &request.response_format {
        body["text"] = json!({"format": {
            "type": "json_schema",
            "name": format.name,
            "schema": schema(provider, &format.name, &format.schema)?,
            "strict": format.strict,
        }});
    }
    sampling(&mut body, request);
    if let Some(max_tokens) = request.max_tokens {
        if max_tokens < MIN_OUTPUT_TOKENS {
            return Err(options_error(format!(
                "max_tokens {max_tokens} is below the {MIN_OUTPUT_TOKENS} output tokens the \
                 {} Responses API asks for at least; ask for {MIN_OUTPUT_TOKENS} or more",
                provider.name
            )));
        }
        body["max_output_tokens"] = json!(max_tokens);
    }
    // `request.stop` is not sent: the Responses API has no stop sequences.
    Ok(body)
}

/// Appends the input items `message` stands for.
fn items(
    provider: &Provider,
    message: &ChatMessage,
    input: &mut Vec<Value>,
) -> Result<(), LlmError> {
    check_placement(provider, message)?;
    // Text, then the images, as input parts.
    let parts = || -> Vec<Value> {
        std::iter::once(json!({"type": "input_text", "text": message.content}))
            .chain(
                message
                    .images
                    .iter()
                    .map(|image| json!({"type": "input_image", "image_url": url_or_data(image)})),
            )
            .collect()
    };
    let text = |role: &str| json!({"type": "message", "role": role, "content": parts()});
    match message.role {
        Role::System => input.push(text("system")),
        Role::User => input.push(text("user")),
        Role::Tool => {
            let id = message.tool_call_id.as_deref().ok_or_else(|| {
                provider.invalid_request("a tool message has no tool-call-id".into())
            })?;
            // A result with images is a list of input parts; one without,
            // its text.
            let output = if message.images.is_empty() {
                json!(message.content)
            } else {
                json!(parts())
            };
            input.push(json!({
                "type": "function_call_output",
                "call_id": id,
                "output": output,
            }));
        }
        Role::Assistant => turn(provider, message, input)?,
    }
    Ok(())
}

/// An assistant turn's items: the ones its provider data recorded, in their
/// order (reasoning as given, the message's text and calls where their items
/// were, with their ids), then whatever the data did not place: the text,
/// then the calls.
fn turn(
    provider: &Provider,
    message: &ChatMessage,
    input: &mut Vec<Value>,
) -> Result<(), LlmError> {
    let mut recorded = BTreeMap::new();
    for datum in &message.provider_data {
        let Some(index) = datum.key.strip_prefix(OUTPUT_KEY) else {
            continue; // another adapter's, or another API's
        };
        let (Ok(index), Ok(item)) = (
            index.parse::<u32>(),
            serde_json::from_str::<Value>(&datum.value),
        ) else {
            return Err(not_ours(provider, &datum.key));
        };
        recorded.insert(index, (datum.key.as_str(), item));
    }
    let mut text_placed = message.content.is_empty();
    let mut placed: Vec<&str> = Vec::new();
    for (key, item) in recorded.into_values() {
        match item["type"].as_str() {
            Some("reasoning") => input.push(item),
            Some("message") => {
                if !text_placed {
                    input.push(assistant_text(&message.content, item["id"].as_str()));
                    text_placed = true;
                }
            }
            Some("function_call") => {
                let call_id = item["call_id"]
                    .as_str()
                    .ok_or_else(|| not_ours(provider, key))?;
                // A call the planner left out of the turn is not sent.
                if let Some(call) = message.tool_calls.iter().find(|call| call.id == call_id) {
                    input.push(function_call(call, item["id"].as_str()));
                    placed.push(&call.id);
                }
            }
            _ => return Err(not_ours(provider, key)),
        }
    }
    if !text_placed {
        input.push(assistant_text(&message.content, None));
    }
    for call in &message.tool_calls {
        if !placed.contains(&call.id.as_str()) {
            input.push(function_call(call, None));
        }
    }
    Ok(())
}

/// The model's text as a message item, with the id it came with, if known.
fn assistant_text(text: &str, id: Option<&str>) -> Value {
    let mut item = json!({
        "type": "message",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    });
    if let Some(id) = id {
        item["id"] = json!(id);
        item["status"] = json!("completed");
    }
    item
}

fn function_call(call: &ToolCall, id: Option<&str>) -> Value {
    let mut item = json!({
        "type": "function_call",
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments,
    });
    if let Some(id) = id {
        item["id"] = json!(id);
        item["status"] = json!("completed");
    }
    item
}

/// Provider data under this adapter's key that it did not write: kept by
/// the planner from elsewhere, or changed on the way.
fn not_ours(provider: &Provider, key: &str) -> LlmError {
    provider.invalid_request(format!(
        "the provider data {key:?} of an assistant message is not an output item this adapter \
         kept; give the message back with its provider data unchanged"
    ))
}
