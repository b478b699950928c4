//! OpenAI's Responses API (`POST {base}/responses`), on the OpenAI mount
//! only: OpenRouter's and the compatible servers' mounts answer it 404, as
//! they answer any path they do not serve. Authentication and the JSON body
//! are checked as for Chat Completions (see `openai`), then the body as the
//! Responses API checks it:
//!
//! - No fields it does not know; a Chat Completions field is refused naming
//!   where the Responses API has it instead (`messages` → `input`,
//!   `max_tokens` → `max_output_tokens`, `response_format` → `text.format`),
//!   as OpenAI does; `stop` and the rest are unknown parameters.
//! - `input` items: messages (`input_text` parts from the user, system and
//!   developer, `output_text` or `refusal` parts from the assistant),
//!   `function_call` (call id, name, string arguments),
//!   `function_call_output` answering a call earlier in the input (and
//!   every call answered), `reasoning` (id, summary); item ids with their
//!   type's prefix (`msg`, `fc`, `rs`). The mock stores nothing, so an
//!   `item_reference` is never found.
//! - Function tools flat (`{"type": "function", "name": …}`, not nested
//!   under `function`), and strict unless they say `"strict": false`, as the
//!   API makes them: a strict tool's schema must close every object and
//!   require all its properties. `tool_choice` flat too, naming an offered
//!   tool.
//! - `max_output_tokens` at least 16, `temperature` 0–2, `top_p` 0–1,
//!   `text.format` (`json_schema` flat: `name`, `schema`, `strict`),
//!   `include` values it knows, `stream_options` only when streaming.
//!
//! Reasoning, as a stateless client meets it: `mock-reasoning` starts every
//! answer with a reasoning item. Its `encrypted_content` is sent only when
//! the request asks for it (`include: ["reasoning.encrypted_content"]`),
//! and it is sealed: changed, it "could not be verified". With `store:
//! false` a reasoning item given back without it is "not found". A function
//! call the mock made after reasoning must be given back after that
//! reasoning item, and a reasoning item must be followed by the item that
//! came after it, as OpenAI requires.
//!
//! Streamed, an answer is the real event sequence: `response.created`,
//! `response.in_progress`, per item `response.output_item.added`, its
//! content part, text or argument deltas and their `done` events, and
//! `response.output_item.done` (a reasoning item's `encrypted_content`
//! only there), then `response.completed` with the whole response and its
//! usage; every event named in `event:` and in its data's `type`, with a
//! `sequence_number`. There is no `[DONE]`.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value, json};

use super::openai::{model_not_found, rate_limited, server_error, unauthorized};
use super::openai_checks::{self as checks, Invalid, invalid, missing, mistyped};
use super::{
    Behaviour, Conversation, Incoming, Outcome, Provider, Reply, Shared, Turn, models, pieces,
    text_of, tokens, unix_time,
};

/// The request fields the Responses API accepts; it refuses any other.
const FIELDS: &[&str] = &[
    "model",
    "input",
    "instructions",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "max_output_tokens",
    "max_tool_calls",
    "temperature",
    "top_p",
    "top_logprobs",
    "text",
    "reasoning",
    "stream",
    "stream_options",
    "store",
    "include",
    "metadata",
    "previous_response_id",
    "conversation",
    "truncation",
    "user",
    "safety_identifier",
    "prompt",
    "prompt_cache_key",
    "service_tier",
    "background",
];

/// Chat Completions fields, and where the Responses API has them instead.
const MOVED: &[(&str, &str)] = &[
    ("messages", "input"),
    ("max_tokens", "max_output_tokens"),
    ("max_completion_tokens", "max_output_tokens"),
    ("response_format", "text.format"),
    ("functions", "tools"),
    ("function_call", "tool_choice"),
    ("reasoning_effort", "reasoning.effort"),
    ("verbosity", "text.verbosity"),
];

/// The `include` values the API knows.
const INCLUDABLE: &[&str] = &[
    "reasoning.encrypted_content",
    "message.output_text.logprobs",
    "message.input_image.image_url",
    "file_search_call.results",
    "web_search_call.action.sources",
    "web_search_call.results",
    "code_interpreter_call.outputs",
    "computer_call_output.output.image_url",
];

/// The fewest output tokens a request may ask for.
const MIN_OUTPUT_TOKENS: u64 = 16;

/// What `mock-reasoning` thinks, in its summary.
const REASONING_SUMMARY: &str = "**Computing the product**\n\nThe calculator can do 6*7.";

/// The reasoning items the mock gave, so that it can tell whether they come
/// back as OpenAI requires (OpenAI keeps this in the sealed content; the
/// mock keeps it here).
#[derive(Default)]
pub(crate) struct Issued {
    /// Per call id of a function call that came after reasoning: that
    /// reasoning item's id, and the call's item id.
    reasoning_of_call: HashMap<String, (String, String)>,
    /// Per reasoning item id: the id of the item that came after it.
    follower: HashMap<String, String>,
}

/// The sealed content of reasoning item `id`, as the mock gives it: any
/// change to it (or to the id) fails the check.
pub fn sealed_reasoning(id: &str) -> String {
    // FNV-1a, shown as the long base64-like text OpenAI sends.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in id.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("gAAAAABoMockSealed{hash:016x}{:016x}Reasoning==", !hash)
}

/// Answers a request to `/responses` whose key and JSON body were checked.
pub(super) fn handle(incoming: &Incoming, body: &Value, shared: &Shared) -> Outcome {
    let provider = Provider::OpenAi;
    if let Err(invalid) = validate(body, shared) {
        let refusal = json!({"error": {
            "message": invalid.message,
            "type": "invalid_request_error",
            "param": invalid.param,
            "code": null,
        }});
        return Outcome::rejected(Reply::json(400, refusal), invalid.message);
    }
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    let stream = body["stream"].as_bool().unwrap_or(false);
    let conversation = conversation(body);
    let mut outcome = match shared.behaviour(provider, &model, &conversation) {
        Behaviour::Reply(_) if body["background"] == true && !stream => {
            // Background mode answers at once, before the model has run.
            let mut queued = response(body, &model, &shared.id("resp_"), "queued", &[]);
            queued["background"] = json!(true);
            Outcome::new(Reply::Json {
                status: 200,
                headers: Vec::new(),
                body: queued,
                pretty: true,
            })
        }
        Behaviour::Reply(turn) => {
            let input_tokens = tokens(&String::from_utf8_lossy(&incoming.body));
            let output = output(body, &model, &turn, shared);
            let id = shared.id("resp_");
            let usage = usage(input_tokens, &output);
            if stream {
                Outcome::new(Reply::Sse {
                    content_type: "text/event-stream; charset=utf-8",
                    frames: events(body, &model, &id, &output, usage),
                })
            } else {
                let mut whole = response(body, &model, &id, "completed", &output);
                whole["usage"] = usage;
                Outcome::new(Reply::Json {
                    status: 200,
                    headers: Vec::new(),
                    body: whole,
                    pretty: true,
                })
            }
        }
        Behaviour::Unauthorized => Outcome::new(unauthorized(provider, &provider.test_key())),
        Behaviour::RateLimited => Outcome::new(rate_limited(provider, &model)),
        Behaviour::ServerError => Outcome::new(server_error(provider)),
        Behaviour::Malformed => Outcome::new(if stream {
            Reply::Sse {
                content_type: "text/event-stream; charset=utf-8",
                frames: vec![
                    "event: response.created\ndata: {\"type\":\"response.created\",\
                     \"sequence_number\":0,\"response\":{\"id\":\"resp_malformed\",\"object\":\
                     \"response\",\"status\":\"in_progress\",\"output\":[]}}\n\n"
                        .to_owned(),
                    "event: response.output_text.delta\ndata: <html><body>upstream reset\
                     </body></html>\n\n"
                        .to_owned(),
                ],
            }
        } else {
            Reply::Raw {
                status: 200,
                content_type: "application/json",
                body: "{\"id\": \"resp_malformed\", \"object\": \"response\", \"status\": \
                       \"completed\", \"output\": [{\"type\": \"message\", \"content\": [{\"type\
                       \": \"output_text\", \"text\": \"Final Ans"
                    .to_owned(),
            }
        }),
        Behaviour::UnknownModel => Outcome::new(model_not_found(provider, &model)),
    };
    outcome.model = Some(model);
    outcome.stream = stream;
    outcome.has_tool_result = conversation.tool_result.is_some();
    outcome
}

/// The output items of a turn, recording what a stateless client must give
/// back: `mock-reasoning` reasons first, and what came after its reasoning
/// is remembered.
fn output(body: &Value, model: &str, turn: &Turn, shared: &Shared) -> Vec<Value> {
    let mut output = Vec::new();
    let reasoning = (model == models::REASONING).then(|| shared.id("rs_"));
    if let Some(id) = &reasoning {
        let mut item = json!({
            "id": id,
            "type": "reasoning",
            "summary": [{"type": "summary_text", "text": REASONING_SUMMARY}],
        });
        let included = body["include"]
            .as_array()
            .is_some_and(|include| include.contains(&json!("reasoning.encrypted_content")));
        if included {
            item["encrypted_content"] = json!(sealed_reasoning(id));
        }
        output.push(item);
    }
    match turn {
        Turn::Text(text) => output.push(json!({
            "id": shared.id("msg_"),
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": text}],
        })),
        Turn::CallTool {
            name,
            arguments,
            count,
        } => {
            for _ in 0..*count {
                output.push(json!({
                    "id": shared.id("fc_"),
                    "type": "function_call",
                    "status": "completed",
                    "arguments": arguments.to_string(),
                    "call_id": shared.id("call_"),
                    "name": name,
                }));
            }
        }
    }
    if let Some(reasoning) = reasoning {
        let mut state = shared.state();
        let issued = &mut state.responses;
        if let Some(next) = output.get(1).and_then(|item| item["id"].as_str()) {
            issued.follower.insert(reasoning.clone(), next.to_owned());
        }
        for call in output.iter().filter(|item| item["type"] == "function_call") {
            issued.reasoning_of_call.insert(
                call["call_id"].as_str().unwrap_or_default().to_owned(),
                (
                    reasoning.clone(),
                    call["id"].as_str().unwrap_or_default().to_owned(),
                ),
            );
        }
    }
    output
}

fn usage(input_tokens: u64, output: &[Value]) -> Value {
    let reasoning_tokens: u64 = output
        .iter()
        .filter(|item| item["type"] == "reasoning")
        .map(|_| tokens(REASONING_SUMMARY) * 4)
        .sum();
    let output_tokens = tokens(&Value::Array(output.to_vec()).to_string()) + reasoning_tokens;
    json!({
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": input_tokens + output_tokens,
    })
}

/// A `response` object with `status` and `output`, echoing the request's
/// settings as the API does.
fn response(body: &Value, model: &str, id: &str, status: &str, output: &[Value]) -> Value {
    let or = |key: &str, default: Value| match &body[key] {
        Value::Null => default,
        value => value.clone(),
    };
    json!({
        "id": id,
        "object": "response",
        "created_at": unix_time(),
        "status": status,
        "background": false,
        "error": null,
        "incomplete_details": null,
        "instructions": body["instructions"],
        "max_output_tokens": body["max_output_tokens"],
        "model": model,
        "output": output,
        "parallel_tool_calls": or("parallel_tool_calls", json!(true)),
        "previous_response_id": null,
        "reasoning": {
            "effort": if model == models::REASONING { json!("medium") } else { Value::Null },
            "summary": null,
        },
        "service_tier": "default",
        "store": or("store", json!(true)),
        "temperature": or("temperature", json!(1.0)),
        "text": {
            "format": match &body["text"]["format"] {
                Value::Null => json!({"type": "text"}),
                format => format.clone(),
            },
            "verbosity": "medium",
        },
        "tool_choice": or("tool_choice", json!("auto")),
        "tools": or("tools", json!([])),
        "top_p": or("top_p", json!(1.0)),
        "truncation": "disabled",
        "usage": null,
        "user": null,
        "metadata": {},
    })
}

/// The server-sent events of a streamed answer.
fn events(body: &Value, model: &str, id: &str, output: &[Value], usage: Value) -> Vec<String> {
    let mut frames = Vec::new();
    let mut emit = |mut data: Value| {
        data["sequence_number"] = json!(frames.len());
        let kind = data["type"].as_str().unwrap_or_default().to_owned();
        frames.push(format!("event: {kind}\ndata: {data}\n\n"));
    };
    let in_progress = response(body, model, id, "in_progress", &[]);
    emit(json!({"type": "response.created", "response": in_progress}));
    emit(json!({"type": "response.in_progress", "response": in_progress}));
    for (index, item) in output.iter().enumerate() {
        let item_id = &item["id"];
        match item["type"].as_str() {
            Some("reasoning") => {
                emit(
                    json!({"type": "response.output_item.added", "output_index": index,
                    "item": {"id": item_id, "type": "reasoning", "summary": []}}),
                );
                emit(
                    json!({"type": "response.reasoning_summary_part.added", "item_id": item_id,
                    "output_index": index, "summary_index": 0,
                    "part": {"type": "summary_text", "text": ""}}),
                );
                for piece in pieces(REASONING_SUMMARY, 12) {
                    emit(json!({"type": "response.reasoning_summary_text.delta",
                        "item_id": item_id, "output_index": index, "summary_index": 0,
                        "delta": piece}));
                }
                emit(
                    json!({"type": "response.reasoning_summary_text.done", "item_id": item_id,
                    "output_index": index, "summary_index": 0, "text": REASONING_SUMMARY}),
                );
                emit(
                    json!({"type": "response.reasoning_summary_part.done", "item_id": item_id,
                    "output_index": index, "summary_index": 0,
                    "part": {"type": "summary_text", "text": REASONING_SUMMARY}}),
                );
            }
            Some("message") => {
                let text = item["content"][0]["text"].as_str().unwrap_or_default();
                emit(
                    json!({"type": "response.output_item.added", "output_index": index,
                    "item": {"id": item_id, "type": "message", "status": "in_progress",
                             "role": "assistant", "content": []}}),
                );
                emit(
                    json!({"type": "response.content_part.added", "item_id": item_id,
                    "output_index": index, "content_index": 0,
                    "part": {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}}),
                );
                for piece in pieces(text, 6) {
                    emit(
                        json!({"type": "response.output_text.delta", "item_id": item_id,
                        "output_index": index, "content_index": 0, "delta": piece,
                        "logprobs": []}),
                    );
                }
                emit(
                    json!({"type": "response.output_text.done", "item_id": item_id,
                    "output_index": index, "content_index": 0, "text": text, "logprobs": []}),
                );
                emit(
                    json!({"type": "response.content_part.done", "item_id": item_id,
                    "output_index": index, "content_index": 0, "part": item["content"][0]}),
                );
            }
            _ => {
                let arguments = item["arguments"].as_str().unwrap_or_default();
                let mut added = item.clone();
                added["status"] = json!("in_progress");
                added["arguments"] = json!("");
                emit(
                    json!({"type": "response.output_item.added", "output_index": index,
                    "item": added}),
                );
                for piece in pieces(arguments, 4) {
                    emit(json!({"type": "response.function_call_arguments.delta",
                        "item_id": item_id, "output_index": index, "delta": piece}));
                }
                emit(
                    json!({"type": "response.function_call_arguments.done", "item_id": item_id,
                    "output_index": index, "arguments": arguments}),
                );
            }
        }
        emit(json!({"type": "response.output_item.done", "output_index": index, "item": item}));
    }
    let mut completed = response(body, model, id, "completed", output);
    completed["usage"] = usage;
    emit(json!({"type": "response.completed", "response": completed}));
    frames
}

/// What the conversation holds: the latest function call output, and the
/// tools and options the model is given.
fn conversation(body: &Value) -> Conversation {
    let tool_result = body["input"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|item| item["type"] == "function_call_output")
        .map(|item| text_of(&item["output"]))
        .next_back();
    let offers_calculator = body["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|tool| tool["name"] == super::CALCULATOR);
    let format = &body["text"]["format"];
    let tool_names = body["tools"].as_array().into_iter().flatten();
    Conversation {
        tool_result,
        offers_calculator,
        images: super::images::seen(body),
        image_tool: super::image_tool(tool_names.filter_map(|t| t["name"].as_str())),
        tools_forbidden: body["tool_choice"] == "none",
        parallel_allowed: body["parallel_tool_calls"] != false,
        response_schema: (format["type"] == "json_schema")
            .then(|| format["schema"].clone())
            .filter(Value::is_object),
    }
}

fn validate(body: &Value, shared: &Shared) -> Result<(), Invalid> {
    let object = checks::fields(body)?;
    if let Some((field, instead)) = MOVED.iter().find(|(field, _)| object.contains_key(*field)) {
        return Err(invalid(
            *field,
            format!(
                "Unsupported parameter: '{field}'. In the Responses API, this parameter has \
                 moved to '{instead}'. Try again with the new parameter. See the API \
                 documentation for more information: \
                 https://platform.openai.com/docs/api-reference/responses/create."
            ),
        ));
    }
    if let Some(unknown) = object.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(checks::unknown(unknown.clone()));
    }
    checks::model(object, "Missing required parameter: 'model'.")?;
    let store = object.get("store").is_none_or(|store| *store != false);
    match object.get("input") {
        Some(Value::String(_)) => {}
        Some(Value::Array(items)) => validate_input(items, store, shared)?,
        None | Some(Value::Null) => return Err(missing("input")),
        Some(other) => {
            return Err(mistyped(
                "input",
                "one of a string or array of input items",
                other,
            ));
        }
    }
    if let Some(instructions) = object.get("instructions").filter(|i| !i.is_null())
        && !instructions.is_string()
    {
        return Err(invalid(
            "instructions",
            "Invalid type for 'instructions': expected a string.",
        ));
    }
    let tools = match object.get("tools") {
        None | Some(Value::Null) => Vec::new(),
        Some(tools) => validate_tools(tools)?,
    };
    validate_options(object, &tools)?;
    Ok(())
}

/// The input items, in order: their shapes, calls answered by outputs
/// that come after them, and reasoning given back as the mock gave it.
fn validate_input(items: &[Value], store: bool, shared: &Shared) -> Result<(), Invalid> {
    let state = shared.state();
    let issued = &state.responses;
    let mut calls: Vec<String> = Vec::new();
    let mut answered: HashSet<String> = HashSet::new();
    let mut reasoning_seen: HashSet<String> = HashSet::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!("input[{i}]");
        let Some(fields) = item.as_object() else {
            return Err(mistyped(&at, "an input item", item));
        };
        let kind = match fields.get("type") {
            Some(Value::String(kind)) => kind.as_str(),
            None if fields.contains_key("role") => "message",
            _ => return Err(missing(format!("{at}.type"))),
        };
        let id = fields.get("id").and_then(Value::as_str);
        let check_id = |prefix: &str| match id {
            Some(id) if !id.starts_with(prefix) => Err(invalid(
                format!("{at}.id"),
                format!("Invalid '{at}.id': '{id}'. Expected an ID that begins with '{prefix}'."),
            )),
            _ => Ok(()),
        };
        let text = |key: &str| match fields.get(key) {
            Some(Value::String(text)) => Ok(text.clone()),
            None | Some(Value::Null) => Err(missing(format!("{at}.{key}"))),
            Some(other) => Err(mistyped(format!("{at}.{key}"), "a string", other)),
        };
        match kind {
            "message" => {
                let role = text("role")?;
                let parts: &[&str] = match role.as_str() {
                    "assistant" => &["output_text", "refusal"],
                    "user" | "system" | "developer" => &["input_text", "input_image", "input_file"],
                    other => {
                        return Err(invalid(
                            format!("{at}.role"),
                            format!(
                                "Invalid value: '{other}'. Supported values are: 'assistant', \
                                 'system', 'developer', and 'user'."
                            ),
                        ));
                    }
                };
                if id.is_some() && role != "assistant" {
                    return Err(checks::unknown(format!("{at}.id")));
                }
                check_id("msg")?;
                validate_content(&at, fields.get("content"), parts)?;
            }
            "function_call" => {
                check_id("fc")?;
                let call_id = text("call_id")?;
                text("name")?;
                text("arguments")?;
                if let Some((reasoning, item)) = issued.reasoning_of_call.get(&call_id)
                    && !reasoning_seen.contains(reasoning)
                {
                    return Err(invalid(
                        "input",
                        format!(
                            "Item '{}' of type 'function_call' was provided without its \
                             required 'reasoning' item: '{reasoning}'.",
                            id.unwrap_or(item)
                        ),
                    ));
                }
                calls.push(call_id);
            }
            "function_call_output" => {
                let call_id = text("call_id")?;
                match fields.get("output") {
                    Some(Value::String(_)) => {}
                    // A list of input parts: text, images, files.
                    Some(output @ Value::Array(_)) => validate_content(
                        &format!("{at}.output"),
                        Some(output),
                        &["input_text", "input_image", "input_file"],
                    )?,
                    _ => return Err(missing(format!("{at}.output"))),
                }
                if !calls.contains(&call_id) {
                    return Err(invalid(
                        "input",
                        format!(
                            "No tool call found for function call output with call_id {call_id}."
                        ),
                    ));
                }
                answered.insert(call_id);
            }
            "reasoning" => {
                let id = text("id")?;
                check_id("rs")?;
                if !fields.get("summary").is_some_and(Value::is_array) {
                    return Err(missing(format!("{at}.summary")));
                }
                match fields.get("encrypted_content").and_then(Value::as_str) {
                    Some(sealed) if sealed != sealed_reasoning(&id) => {
                        return Err(invalid(
                            "input",
                            format!(
                                "The encrypted content for item {id} could not be verified. \
                                 Reason: Encrypted content could not be decrypted or parsed."
                            ),
                        ));
                    }
                    Some(_) => {}
                    // The mock stores nothing: only sealed reasoning comes
                    // back, and OpenAI says so when store is off.
                    None if !store => {
                        return Err(invalid(
                            "input",
                            format!(
                                "Item with id '{id}' not found. Items are not persisted when \
                                 `store` is set to false. Try again with `store` set to true, \
                                 or remove this item from your input."
                            ),
                        ));
                    }
                    None => {
                        return Err(invalid("input", format!("Item with id '{id}' not found.")));
                    }
                }
                if let Some(follower) = issued.follower.get(&id) {
                    let next = items.get(i + 1).and_then(|next| next["id"].as_str());
                    if next != Some(follower.as_str()) {
                        return Err(invalid(
                            "input",
                            format!(
                                "Item '{id}' of type 'reasoning' was provided without its \
                                 required following item."
                            ),
                        ));
                    }
                }
                reasoning_seen.insert(id);
            }
            "item_reference" => {
                let id = text("id")?;
                return Err(invalid("input", format!("Item with id '{id}' not found.")));
            }
            other => {
                return Err(invalid(
                    format!("{at}.type"),
                    format!(
                        "Invalid value: '{other}'. Supported values are: 'message', \
                         'function_call', 'function_call_output', 'reasoning', and \
                         'item_reference'."
                    ),
                ));
            }
        }
    }
    if let Some(unanswered) = calls.iter().find(|call| !answered.contains(*call)) {
        return Err(invalid(
            "input",
            format!("No tool output found for function call {unanswered}."),
        ));
    }
    Ok(())
}

/// `'a'`, `'a' and 'b'`, `'a', 'b', and 'c'`, as OpenAI lists values.
fn supported(values: &[&str]) -> String {
    let quoted: Vec<String> = values.iter().map(|value| format!("'{value}'")).collect();
    match quoted.as_slice() {
        [] => String::new(),
        [one] => one.clone(),
        [first, second] => format!("{first} and {second}"),
        [rest @ .., last] => format!("{}, and {last}", rest.join(", ")),
    }
}

/// A message's content: text, or parts of the kinds its role may send.
fn validate_content(at: &str, content: Option<&Value>, kinds: &[&str]) -> Result<(), Invalid> {
    let param = format!("{at}.content");
    let parts = match content {
        Some(Value::String(_)) => return Ok(()),
        Some(Value::Array(parts)) => parts,
        None | Some(Value::Null) => return Err(missing(param)),
        Some(other) => {
            return Err(mistyped(
                param,
                "one of a string or array of input content",
                other,
            ));
        }
    };
    for (j, part) in parts.iter().enumerate() {
        let kind = part["type"].as_str().unwrap_or_default();
        if !kinds.contains(&kind) {
            return Err(invalid(
                format!("{param}[{j}]"),
                format!(
                    "Invalid value: '{kind}'. Supported values are: {}.",
                    supported(kinds)
                ),
            ));
        }
        if kind == "input_image" {
            let url_param = format!("{param}[{j}].image_url");
            match (part.get("image_url"), part.get("file_id")) {
                (Some(Value::String(url)), None) => super::images::check_image_url(url)
                    .map_err(|why| invalid(&url_param, format!("Invalid '{url_param}'. {why}")))?,
                (None, Some(Value::String(_))) => {}
                _ => {
                    return Err(invalid(
                        url_param,
                        "Invalid input image: provide exactly one of 'image_url' or 'file_id'.",
                    ));
                }
            }
            if let Some(detail) = part.get("detail")
                && !["low", "high", "auto"].contains(&detail.as_str().unwrap_or_default())
            {
                return Err(invalid(
                    format!("{param}[{j}].detail"),
                    "Invalid value. Supported values are: 'low', 'high', and 'auto'.",
                ));
            }
            continue;
        }
        let field = match kind {
            "input_text" | "output_text" => "text",
            "refusal" => "refusal",
            _ => continue,
        };
        if !part[field].is_string() {
            return Err(missing(format!("{param}[{j}].{field}")));
        }
    }
    Ok(())
}

/// Function tools, flat; strict unless they say otherwise. Returns their
/// names.
fn validate_tools(tools: &Value) -> Result<Vec<String>, Invalid> {
    let Some(tools) = tools.as_array() else {
        return Err(mistyped("tools", "an array", tools));
    };
    let mut names = Vec::new();
    for (i, tool) in tools.iter().enumerate() {
        let param = format!("tools[{i}]");
        if tool["type"] != "function" {
            return Err(invalid(
                format!("{param}.type"),
                format!(
                    "Invalid value: {}. The mock serves function tools only (OpenAI also has \
                     built-in tools, which an adapter that only translates cannot run).",
                    tool["type"]
                ),
            ));
        }
        let Some(name) = tool["name"].as_str() else {
            return Err(missing(format!("{param}.name")));
        };
        if let Some(unknown) = tool
            .as_object()
            .into_iter()
            .flat_map(Map::keys)
            .find(|key| {
                !["type", "name", "description", "parameters", "strict"].contains(&key.as_str())
            })
        {
            return Err(checks::unknown(format!("{param}.{unknown}")));
        }
        checks::function_name(&format!("{param}.name"), name)?;
        let parameters = &tool["parameters"];
        if !parameters.is_object() {
            return Err(missing(format!("{param}.parameters")));
        }
        checks::object_schema(&format!("{param}.parameters"), name, parameters)?;
        let strict = checks::boolean(&format!("{param}.strict"), Some(&tool["strict"]))?;
        if strict.unwrap_or(true) {
            checks::strict(
                parameters,
                &format!("{param}.parameters"),
                &format!("function '{name}'"),
            )?;
        }
        names.push(name.to_owned());
    }
    Ok(names)
}

fn validate_options(object: &Map<String, Value>, tools: &[String]) -> Result<(), Invalid> {
    if let Some(choice) = object.get("tool_choice").filter(|c| !c.is_null()) {
        match choice {
            Value::String(mode) if matches!(mode.as_str(), "none" | "auto" | "required") => {}
            Value::Object(named) if named.get("type") == Some(&json!("function")) => {
                let Some(name) = named.get("name").and_then(Value::as_str) else {
                    return Err(missing("tool_choice.name"));
                };
                if !tools.iter().any(|tool| tool == name) {
                    return Err(invalid(
                        "tool_choice",
                        format!(
                            "Tool choice 'function' ('{name}') not found in 'tools' parameter."
                        ),
                    ));
                }
            }
            other => {
                return Err(invalid(
                    "tool_choice",
                    format!(
                        "Invalid value for 'tool_choice': expected 'none', 'auto', 'required' \
                         or a function, got {other}."
                    ),
                ));
            }
        }
    }
    checks::flag(object, "parallel_tool_calls")?;
    if let Some(options) = checks::stream_options(object)?
        && let Some(unknown) = options
            .as_object()
            .into_iter()
            .flat_map(Map::keys)
            .find(|key| *key != "include_obfuscation")
    {
        return Err(checks::unknown(format!("stream_options.{unknown}")));
    }
    checks::flag(object, "store")?;
    if let Some(include) = object.get("include").filter(|i| !i.is_null()) {
        let Some(values) = include.as_array() else {
            return Err(invalid(
                "include",
                "Invalid type for 'include': expected an array of strings.",
            ));
        };
        for (k, value) in values.iter().enumerate() {
            let known = value.as_str().is_some_and(|v| INCLUDABLE.contains(&v));
            if !known {
                let value = value
                    .as_str()
                    .map_or_else(|| value.to_string(), str::to_owned);
                return Err(invalid(
                    format!("include[{k}]"),
                    format!(
                        "Invalid value: '{value}'. Supported values are: {}.",
                        supported(INCLUDABLE)
                    ),
                ));
            }
        }
    }
    checks::sampling(object)?;
    if let Some(value) = object.get("max_output_tokens").filter(|v| !v.is_null()) {
        match value.as_u64() {
            Some(n) if n >= MIN_OUTPUT_TOKENS => {}
            Some(n) => {
                return Err(invalid(
                    "max_output_tokens",
                    format!(
                        "Invalid 'max_output_tokens': integer below minimum value. Expected a \
                         value >= {MIN_OUTPUT_TOKENS}, but got {n} instead."
                    ),
                ));
            }
            None => {
                return Err(invalid(
                    "max_output_tokens",
                    format!(
                        "Invalid type for 'max_output_tokens': expected an integer, got {value}."
                    ),
                ));
            }
        }
    }
    if let Some(text) = object.get("text").filter(|t| !t.is_null()) {
        validate_text(text)?;
    }
    Ok(())
}

/// `text.format`: `text`, `json_object`, or `json_schema` with its `name`,
/// `schema` and `strict` beside the type (not nested, as Chat Completions
/// has them); strict, every object of the schema closed and all its
/// properties required.
fn validate_text(text: &Value) -> Result<(), Invalid> {
    let Some(format) = text.get("format").filter(|f| !f.is_null()) else {
        return Ok(());
    };
    let kind = format["type"].as_str().unwrap_or_default();
    let allowed = checks::format_keys(
        "text.format.type",
        kind,
        &["type", "name", "description", "schema", "strict"],
    )?;
    if kind == "json_schema" && !format.get("name").is_some_and(Value::is_string) {
        return Err(missing("text.format.name"));
    }
    if let Some(unknown) = format
        .as_object()
        .into_iter()
        .flat_map(Map::keys)
        .find(|key| !allowed.contains(&key.as_str()))
    {
        return Err(checks::unknown(format!("text.format.{unknown}")));
    }
    if kind != "json_schema" {
        return Ok(());
    }
    let name = format["name"].as_str().unwrap_or_default();
    checks::schema_name("text.format.name", name)?;
    let Some(schema) = format.get("schema").filter(|s| s.is_object()) else {
        return Err(missing("text.format.schema"));
    };
    if checks::boolean("text.format.strict", Some(&format["strict"]))? == Some(true) {
        checks::strict(
            schema,
            "text.format.schema",
            &format!("response_format '{name}'"),
        )?;
    }
    Ok(())
}
