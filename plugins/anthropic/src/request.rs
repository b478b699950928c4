//! Messages API request bodies.
//!
//! Anthropic wants strictly alternating user and assistant turns made of
//! content blocks, so consecutive messages of one role (two tool results,
//! say) are merged into one turn, and the system prompt is a top-level field.

use opspawn_plugin::llm_http::images::check_placement;
use opspawn_plugin::llm_http::json::{arguments_object, sampling, schema, tools};
use opspawn_plugin::llm_http::wire::no_tools_to_choose;
use opspawn_plugin::llm_http::{ChatMessage, ChatRequest, LlmError, Role, ToolChoice};
use opspawn_plugin::types::{Image, InlineImage};
use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::PROVIDER;
use crate::response::Thinking;

/// What `max_tokens`, which Anthropic requires, is when the request leaves it out.
const DEFAULT_MAX_TOKENS: u32 = 4096;

/// The prefix the planners put on a failed tool's output.
const ERROR_PREFIX: &str = "Error: ";

pub fn build(request: &ChatRequest, model: &str, stream: bool) -> Result<Value, LlmError> {
    let mut system: Vec<&str> = request.system.iter().map(String::as_str).collect();
    let mut turns: Vec<(&str, Vec<Value>)> = Vec::new();
    for message in &request.messages {
        check_placement(&PROVIDER, message)?;
        let (role, blocks) = match message.role {
            Role::System => {
                system.push(&message.content);
                continue;
            }
            Role::User => {
                let mut blocks = text_block(&message.content);
                blocks.extend(message.images.iter().map(image_block));
                ("user", blocks)
            }
            Role::Assistant => ("assistant", assistant_blocks(message)),
            Role::Tool => ("user", vec![tool_result(message)?]),
        };
        match turns.last_mut() {
            _ if blocks.is_empty() => {}
            Some((last, content)) if *last == role => content.extend(blocks),
            _ => turns.push((role, blocks)),
        }
    }
    let messages: Vec<Value> = turns
        .into_iter()
        .map(|(role, content)| json!({"role": role, "content": content}))
        .collect();

    let mut body = json!({
        "model": model,
        "max_tokens": request.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        "messages": messages,
        "stream": stream,
    });
    system.retain(|text| !text.trim().is_empty());
    if !system.is_empty() {
        body["system"] = json!(system.join("\n\n"));
    }
    if !request.tools.is_empty() {
        body["tools"] = tools(&PROVIDER, &request.tools, |tool, input_schema| {
            json!({
                "name": tool.name,
                "description": tool.description,
                "input_schema": input_schema,
            })
        })?;
        if let Some(choice) = tool_choice(&request.tool_choice, request.parallel_tool_calls) {
            body["tool_choice"] = choice;
        }
    } else {
        no_tools_to_choose(&PROVIDER, &request.tool_choice)?;
    }
    if let Some(format) = &request.response_format {
        // The GA shape, taken by every API version. `name` and `strict`
        // have no counterpart: the reply always holds to the schema.
        let schema = schema(&PROVIDER, &format.name, &format.schema)?;
        body["output_config"] = json!({
            "format": {"type": "json_schema", "schema": crate::schema::for_output(&schema)},
        });
    }
    sampling(&mut body, request);
    if !request.stop.is_empty() {
        body["stop_sequences"] = json!(request.stop);
    }
    Ok(body)
}

/// `tool_choice`, left out when it says what Anthropic assumes anyway: any
/// tool, in parallel if the model likes.
fn tool_choice(choice: &ToolChoice, parallel: Option<bool>) -> Option<Value> {
    let mut value = match choice {
        ToolChoice::Auto => json!({"type": "auto"}),
        // Parallelism means nothing when no tool may be called.
        ToolChoice::None => return Some(json!({"type": "none"})),
        ToolChoice::Required => json!({"type": "any"}),
        ToolChoice::Named(name) => json!({"type": "tool", "name": name}),
    };
    if parallel == Some(false) {
        value["disable_parallel_tool_use"] = json!(true);
    } else if matches!(choice, ToolChoice::Auto) {
        return None;
    }
    Some(value)
}

/// Anthropic refuses empty text blocks, so empty text adds none.
fn text_block(text: &str) -> Vec<Value> {
    if text.is_empty() {
        Vec::new()
    } else {
        vec![json!({"type": "text", "text": text})]
    }
}

/// An assistant turn as Claude sent it: its thinking blocks first, as they
/// came (kept in the message's provider data), then its text and its tool
/// uses. With thinking on, Anthropic refuses a tool use whose turn does not
/// start with the thinking block that led to it.
fn assistant_blocks(message: &ChatMessage) -> Vec<Value> {
    let mut thinking: BTreeMap<usize, Value> = BTreeMap::new();
    for datum in &message.provider_data {
        let Some((piece, index)) = Thinking::parse(&datum.key) else {
            continue;
        };
        let block = thinking.entry(index).or_insert_with(|| match piece {
            Thinking::Redacted => json!({"type": "redacted_thinking"}),
            Thinking::Text | Thinking::Signature => json!({"type": "thinking"}),
        });
        let field = match piece {
            Thinking::Text => "thinking",
            Thinking::Signature => "signature",
            Thinking::Redacted => "data",
        };
        block[field] = json!(datum.value);
    }
    let mut blocks: Vec<Value> = thinking.into_values().collect();
    blocks.extend(text_block(&message.content));
    blocks.extend(message.tool_calls.iter().map(|call| {
        json!({
            "type": "tool_use",
            "id": call.id,
            "name": call.name,
            "input": arguments_object(&call.arguments),
        })
    }));
    blocks
}

/// An image block: inline bytes as a base64 source, an address as a URL
/// source (which Anthropic fetches).
fn image_block(image: &Image) -> Value {
    let source = match image {
        Image::Url(url) => json!({"type": "url", "url": url}),
        Image::Inline(InlineImage { media_type, base64 }) => {
            json!({"type": "base64", "media_type": media_type, "data": base64})
        }
    };
    json!({"type": "image", "source": source})
}

/// A tool message has no error flag of its own: the planners mark a failed
/// tool's output with an `Error: ` prefix. A result with images is a list
/// of blocks, its text first.
fn tool_result(message: &ChatMessage) -> Result<Value, LlmError> {
    let id = message
        .tool_call_id
        .as_deref()
        .ok_or_else(|| PROVIDER.invalid_request("a tool message has no tool-call-id".into()))?;
    let content = if message.images.is_empty() {
        json!(message.content)
    } else {
        let mut blocks = text_block(&message.content);
        blocks.extend(message.images.iter().map(image_block));
        json!(blocks)
    };
    Ok(json!({
        "type": "tool_result",
        "tool_use_id": id,
        "content": content,
        "is_error": message.content.starts_with(ERROR_PREFIX),
    }))
}
