//! `generateContent` request bodies.
//!
//! Turns alternate between `user` and `model`, made of parts; tool results
//! are `functionResponse` parts of a user turn, named after the call they
//! answer, since Gemini's calls carry no ids.

use opspawn_plugin::llm_http::images::check_placement;
use opspawn_plugin::llm_http::json::{arguments_object, input_schema, number, schema};
use opspawn_plugin::llm_http::wire::no_tools_to_choose;
use opspawn_plugin::llm_http::{
    ChatMessage, ChatRequest, LlmError, Role, ToolChoice, provider_datum,
};
use opspawn_plugin::types::{Image, InlineImage};
use serde_json::{Map, Value, json};

use crate::PROVIDER;
use crate::response::{TEXT_SIGNATURE_KEY, call_signature_key};
use crate::schema::{is_empty_object, sanitize};

pub fn build(request: &ChatRequest) -> Result<Value, LlmError> {
    let mut system: Vec<&str> = request.system.iter().map(String::as_str).collect();
    let mut turns: Vec<(&str, Vec<Value>)> = Vec::new();
    // The images of a run of tool results follow all of its function
    // responses, in the same user turn.
    let mut tool_images: Vec<Value> = Vec::new();
    for (position, message) in request.messages.iter().enumerate() {
        check_placement(&PROVIDER, message)?;
        let (role, parts) = match message.role {
            Role::System => {
                system.push(&message.content);
                continue;
            }
            Role::User => {
                let mut parts = text_part(&message.content);
                for image in &message.images {
                    parts.push(image_part(image)?);
                }
                ("user", parts)
            }
            Role::Assistant => ("model", model_parts(message)),
            Role::Tool => {
                let part = function_response(message, &request.messages[..position])?;
                for image in &message.images {
                    tool_images.push(image_part(image)?);
                }
                ("user", vec![part])
            }
        };
        match turns.last_mut() {
            _ if parts.is_empty() => {}
            Some((last, existing)) if *last == role => existing.extend(parts),
            _ => turns.push((role, parts)),
        }
        let run_ends = request
            .messages
            .get(position + 1)
            .is_none_or(|next| next.role != Role::Tool);
        if run_ends && let Some((_, parts)) = turns.last_mut() {
            parts.append(&mut tool_images);
        }
    }
    let contents: Vec<Value> = turns
        .into_iter()
        .map(|(role, parts)| json!({"role": role, "parts": parts}))
        .collect();

    let mut body = json!({"contents": contents});
    system.retain(|text| !text.trim().is_empty());
    if !system.is_empty() {
        body["systemInstruction"] = json!({"parts": [{"text": system.join("\n\n")}]});
    }
    if !request.tools.is_empty() {
        let declarations = request
            .tools
            .iter()
            .map(|tool| {
                let mut declaration = json!({"name": tool.name, "description": tool.description});
                let parameters = sanitize(&input_schema(&PROVIDER, tool)?);
                if !is_empty_object(&parameters) {
                    declaration["parameters"] = parameters;
                }
                Ok(declaration)
            })
            .collect::<Result<Vec<_>, LlmError>>()?;
        body["tools"] = json!([{"functionDeclarations": declarations}]);
        if let Some(config) = function_calling(&request.tool_choice) {
            body["toolConfig"] = json!({"functionCallingConfig": config});
        }
    } else {
        no_tools_to_choose(&PROVIDER, &request.tool_choice)?;
    }
    // Gemini has no switch for parallel calls: `parallel-tool-calls` is left
    // to the model.
    let mut config = Map::new();
    if let Some(temperature) = request.temperature {
        config.insert("temperature".into(), number(temperature));
    }
    if let Some(top_p) = request.top_p {
        config.insert("topP".into(), number(top_p));
    }
    if let Some(format) = &request.response_format {
        // `strict` has no counterpart: Gemini always holds to the schema.
        let schema = schema(&PROVIDER, &format.name, &format.schema)?;
        config.insert("responseMimeType".into(), json!("application/json"));
        config.insert("responseSchema".into(), sanitize(&schema));
    }
    if let Some(max_tokens) = request.max_tokens {
        config.insert("maxOutputTokens".into(), json!(max_tokens));
    }
    if !request.stop.is_empty() {
        config.insert("stopSequences".into(), json!(request.stop));
    }
    if !config.is_empty() {
        body["generationConfig"] = Value::Object(config);
    }
    Ok(body)
}

/// `functionCallingConfig`, left out for `auto`, the default.
fn function_calling(choice: &ToolChoice) -> Option<Value> {
    match choice {
        ToolChoice::Auto => None,
        ToolChoice::None => Some(json!({"mode": "NONE"})),
        ToolChoice::Required => Some(json!({"mode": "ANY"})),
        ToolChoice::Named(name) => Some(json!({"mode": "ANY", "allowedFunctionNames": [name]})),
    }
}

/// An image as an `inlineData` part. Gemini takes a URL only for a file
/// uploaded to it first (`fileData`), so an address is refused rather than
/// sent as something Gemini would fetch.
fn image_part(image: &Image) -> Result<Value, LlmError> {
    match image {
        Image::Inline(InlineImage { media_type, base64 }) => {
            Ok(json!({"inlineData": {"mimeType": media_type, "data": base64}}))
        }
        Image::Url(url) => Err(PROVIDER.invalid_request(format!(
            "Gemini takes images inline, not by URL ({url}): give the image's bytes as \
             media_type and data"
        ))),
    }
}

fn text_part(text: &str) -> Vec<Value> {
    if text.is_empty() {
        Vec::new()
    } else {
        vec![json!({"text": text})]
    }
}

/// A model turn as Gemini sent it: its text, then its calls, each part with
/// the thought signature it came with (kept in the message's provider
/// data), since Gemini 3 refuses calls of the current turn without theirs.
fn model_parts(message: &ChatMessage) -> Vec<Value> {
    let mut parts = text_part(&message.content);
    if let (Some(part), Some(signature)) = (
        parts.first_mut(),
        provider_datum(message, TEXT_SIGNATURE_KEY),
    ) {
        part["thoughtSignature"] = json!(signature);
    }
    parts.extend(message.tool_calls.iter().map(|call| {
        let mut part = json!({
            "functionCall": {"name": call.name, "args": arguments_object(&call.arguments)}
        });
        if let Some(signature) = provider_datum(message, &call_signature_key(&call.id)) {
            part["thoughtSignature"] = json!(signature);
        }
        part
    }));
    parts
}

/// A tool result as a `functionResponse`, named after the latest earlier
/// call with its id. Output that is not a JSON object is wrapped in one.
fn function_response(message: &ChatMessage, earlier: &[ChatMessage]) -> Result<Value, LlmError> {
    let id = message
        .tool_call_id
        .as_deref()
        .ok_or_else(|| PROVIDER.invalid_request("a tool message has no tool-call-id".into()))?;
    let name = earlier
        .iter()
        .rev()
        .flat_map(|message| &message.tool_calls)
        .find(|call| call.id == id)
        .map(|call| call.name.as_str())
        .ok_or_else(|| {
            PROVIDER.invalid_request(format!(
                "the tool result for {id:?} answers no earlier tool call"
            ))
        })?;
    let response = match serde_json::from_str::<Value>(&message.content) {
        Ok(Value::Object(object)) => Value::Object(object),
        Ok(value) => json!({"result": value}),
        Err(_) => json!({"result": message.content}),
    };
    Ok(json!({"functionResponse": {"name": name, "response": response}}))
}
