//! OpenAI Chat Completions (`POST {base}/chat/completions`), as OpenAI,
//! OpenRouter and OpenAI-compatible servers (vLLM, Ollama, llama.cpp) speak
//! it. OpenAI's Responses API (`POST {base}/responses`) is in `responses`,
//! after the checks both share here (the key, a JSON body).
//!
//! Accents: OpenAI refuses fields it does not know and pretty-prints its
//! bodies; OpenRouter ignores unknown fields, sends SSE comments
//! (`: OPENROUTER PROCESSING`) while it waits, always reports usage, and has
//! its own error shape (`{"error": {"code": 401, "message": …}}`).

use std::collections::HashSet;

use serde_json::{Map, Value, json};

use super::openai_checks::{self as checks, Invalid, invalid, missing, mistyped};
use super::{
    Behaviour, Conversation, Incoming, Outcome, Provider, Reply, Shared, Turn, mask_key, pieces,
    text_of, tokens, unix_time,
};

/// The request fields OpenAI accepts; it refuses any other.
const OPENAI_FIELDS: &[&str] = &[
    "model",
    "messages",
    "audio",
    "frequency_penalty",
    "function_call",
    "functions",
    "logit_bias",
    "logprobs",
    "max_completion_tokens",
    "max_tokens",
    "metadata",
    "modalities",
    "n",
    "parallel_tool_calls",
    "prediction",
    "presence_penalty",
    "prompt_cache_key",
    "reasoning_effort",
    "response_format",
    "safety_identifier",
    "seed",
    "service_tier",
    "stop",
    "store",
    "stream",
    "stream_options",
    "temperature",
    "tool_choice",
    "tools",
    "top_logprobs",
    "top_p",
    "user",
    "verbosity",
    "web_search_options",
];

const ROLES: &str = "'system', 'assistant', 'user', 'function', 'tool', and 'developer'";

pub(super) fn handle(provider: Provider, incoming: &Incoming, shared: &Shared) -> Outcome {
    // OpenAI serves the Responses API too; OpenRouter and the compatible
    // servers are mocked with Chat Completions only.
    let responses = provider == Provider::OpenAi && incoming.rest == "/responses";
    if (incoming.rest != "/chat/completions" && !responses) || incoming.method != "POST" {
        let message = format!(
            "Invalid URL ({} {}{})",
            incoming.method,
            provider.mount(),
            incoming.rest
        );
        return Outcome::rejected(
            error(provider, 404, "invalid_request_error", None, &message),
            message,
        );
    }

    let expected = provider.auth_value(&provider.test_key());
    match incoming.header("authorization") {
        None => {
            let message = match provider {
                Provider::OpenRouter => "No auth credentials found".to_owned(),
                _ => "You didn't provide an API key. You need to provide your API key in an \
                      Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), \
                      or as the password field (with blank username) if you're accessing the API \
                      from your browser and are prompted for a username and password. You can \
                      obtain an API key from https://platform.openai.com/account/api-keys."
                    .to_owned(),
            };
            return Outcome::rejected(
                error(provider, 401, "invalid_request_error", None, &message),
                format!("no Authorization header (expected {expected:?})"),
            );
        }
        Some(value) if value != expected => {
            let key = value.strip_prefix("Bearer ").unwrap_or(value);
            return Outcome::rejected(
                unauthorized(provider, key),
                format!("Authorization is {value:?}, expected {expected:?}"),
            );
        }
        Some(_) => {}
    }

    if !incoming.is_json() {
        let message = "We could not parse the JSON body of your request. (HINT: This likely \
                       means you aren't using your HTTP library correctly. The OpenAI API expects \
                       a JSON payload, but what was sent was not valid JSON. If you have trouble \
                       figuring out how to fix this, please contact us through our help center at \
                       help.openai.com.)";
        return Outcome::rejected(
            error(provider, 400, "invalid_request_error", None, message),
            format!(
                "content-type is {:?}, not application/json",
                incoming.header("content-type")
            ),
        );
    }
    let body: Value = match serde_json::from_slice(&incoming.body) {
        Ok(body) => body,
        Err(e) => {
            let message = "We could not parse the JSON body of your request. (HINT: This likely \
                           means you aren't using your HTTP library correctly. The OpenAI API \
                           expects a JSON payload, but what was sent was not valid JSON.)";
            return Outcome::rejected(
                error(provider, 400, "invalid_request_error", None, message),
                format!("the body is not JSON: {e}"),
            );
        }
    };
    if responses {
        return super::responses::handle(incoming, &body, shared);
    }
    if let Err(invalid) = validate(provider, &body) {
        return Outcome::rejected(
            error(
                provider,
                400,
                "invalid_request_error",
                invalid.param.as_deref(),
                &invalid.message,
            ),
            invalid.message,
        );
    }

    let model = body["model"].as_str().unwrap_or_default().to_owned();
    let stream = body["stream"].as_bool().unwrap_or(false);
    let include_usage = provider == Provider::OpenRouter
        || body["stream_options"]["include_usage"]
            .as_bool()
            .unwrap_or(false);
    let conversation = conversation(&body);
    let mut outcome = match shared.behaviour(provider, &model, &conversation) {
        Behaviour::Reply(turn) => {
            let input_tokens = tokens(&String::from_utf8_lossy(&incoming.body));
            let ids = Ids {
                completion: match provider {
                    Provider::OpenRouter => shared.id("gen-"),
                    _ => shared.id("chatcmpl-"),
                },
                call: shared.id("call_"),
            };
            if stream {
                Outcome::new(Reply::Sse {
                    content_type: "text/event-stream; charset=utf-8",
                    frames: chunks(provider, &model, &turn, &ids, input_tokens, include_usage),
                })
            } else {
                let mut body = completion(provider, &model, &turn, &ids, input_tokens);
                // `n` above 1 gets that many choices, as the API gives them
                // (not streamed: the adapters never ask for more than one).
                let n = body_n(&incoming.body);
                let first = body["choices"][0].clone();
                body["choices"] = (0..n)
                    .map(|index| {
                        let mut choice = first.clone();
                        choice["index"] = json!(index);
                        choice
                    })
                    .collect();
                Outcome::new(Reply::Json {
                    status: 200,
                    headers: Vec::new(),
                    body,
                    pretty: provider == Provider::OpenAi,
                })
            }
        }
        Behaviour::Unauthorized => Outcome::new(unauthorized(provider, &provider.test_key())),
        Behaviour::RateLimited => {
            let mut reply = rate_limited(provider, &model);
            if let Reply::Json { headers, .. } = &mut reply {
                headers.push(("x-ratelimit-limit-requests", "3".into()));
                headers.push(("x-ratelimit-remaining-requests", "0".into()));
                headers.push(("x-ratelimit-reset-requests", "1s".into()));
            }
            Outcome::new(reply)
        }
        Behaviour::ServerError => Outcome::new(server_error(provider)),
        Behaviour::Malformed => Outcome::new(if stream {
            Reply::Sse {
                content_type: "text/event-stream; charset=utf-8",
                frames: vec![
                    "data: {\"id\":\"chatcmpl-malformed\",\"object\":\"chat.completion.chunk\",\
                     \"choices\":[{\"index\":0,\"delta\":{\"content\":\"Final Ans\n\n"
                        .to_owned(),
                    "data: <html><body>upstream reset</body></html>\n\n".to_owned(),
                    "data: [DONE]\n\n".to_owned(),
                ],
            }
        } else {
            Reply::Raw {
                status: 200,
                content_type: "application/json",
                body: "{\"id\": \"chatcmpl-malformed\", \"object\": \"chat.completion\", \
                       \"choices\": [{\"index\": 0, \"message\": {\"role\": \"assistant\", \
                       \"content\": \"Final Ans"
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

struct Ids {
    completion: String,
    call: String,
}

impl Ids {
    /// The id of call `k` of a reply: the minted one, then with `k` added.
    fn call_id(&self, k: usize) -> String {
        match k {
            0 => self.call.clone(),
            k => format!("{}{k}", self.call),
        }
    }
}

/// An error in the provider's shape.
pub(super) fn error(
    provider: Provider,
    status: u16,
    kind: &str,
    code: Option<&str>,
    message: &str,
) -> Reply {
    let body = match provider {
        Provider::OpenRouter => json!({"error": {"code": status, "message": message}}),
        _ => json!({"error": {
            "message": message,
            "type": kind,
            "param": null,
            "code": code,
        }}),
    };
    Reply::json(status, body)
}

/// `mock-429-once`'s first answer: a 429 with `Retry-After: 1`.
pub(super) fn rate_limited(provider: Provider, model: &str) -> Reply {
    let message = format!(
        "Rate limit reached for {model} in organization org-mock on requests per min (RPM): \
         Limit 3, Used 3, Requested 1. Please try again in 1s. Visit \
         https://platform.openai.com/account/rate-limits to learn more."
    );
    let mut reply = error(
        provider,
        429,
        "requests",
        Some("rate_limit_exceeded"),
        &message,
    );
    if let Reply::Json { headers, .. } = &mut reply {
        headers.push(("retry-after", "1".into()));
    }
    reply
}

/// `mock-500-once`'s first answer.
pub(super) fn server_error(provider: Provider) -> Reply {
    error(
        provider,
        500,
        "server_error",
        None,
        "The server had an error while processing your request. Sorry about that!",
    )
}

/// The answer for a model the mock does not know.
pub(super) fn model_not_found(provider: Provider, model: &str) -> Reply {
    error(
        provider,
        404,
        "invalid_request_error",
        Some("model_not_found"),
        &format!("The model `{model}` does not exist or you do not have access to it."),
    )
}

pub(super) fn unauthorized(provider: Provider, key: &str) -> Reply {
    match provider {
        Provider::OpenRouter => Reply::json(
            401,
            json!({"error": {"code": 401, "message": "User not found.", "metadata": null}}),
        ),
        _ => error(
            provider,
            401,
            "invalid_request_error",
            Some("invalid_api_key"),
            &format!(
                "Incorrect API key provided: {}. You can find your API key at \
                 https://platform.openai.com/account/api-keys.",
                mask_key(key)
            ),
        ),
    }
}

fn validate(provider: Provider, body: &Value) -> Result<(), Invalid> {
    let object = checks::fields(body)?;
    if provider == Provider::OpenAi
        && let Some(unknown) = object.keys().find(|k| !OPENAI_FIELDS.contains(&k.as_str()))
    {
        return Err(invalid(
            unknown.clone(),
            format!("Unrecognized request argument supplied: {unknown}"),
        ));
    }
    checks::model(object, "you must provide a model parameter")?;
    let messages = match object.get("messages") {
        Some(Value::Array(messages)) => messages,
        None => return Err(missing("messages")),
        Some(other) => return Err(mistyped("messages", "an array", other)),
    };
    if messages.is_empty() {
        return Err(invalid(
            "messages",
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got \
             an empty array instead.",
        ));
    }
    validate_messages(messages)?;
    if let Some(tools) = object.get("tools") {
        validate_tools(tools)?;
    }
    validate_options(object)?;
    Ok(())
}

fn validate_messages(messages: &[Value]) -> Result<(), Invalid> {
    // Tool calls of the latest assistant message still waiting for their
    // tool message, and all of that message's calls.
    let mut waiting: Vec<String> = Vec::new();
    let mut answerable: HashSet<String> = HashSet::new();
    let unanswered = |waiting: &[String]| {
        invalid(
            "messages",
            format!(
                "An assistant message with 'tool_calls' must be followed by tool messages \
                 responding to each 'tool_call_id'. The following tool_call_ids did not have \
                 response messages: {}",
                waiting.join(", ")
            ),
        )
    };
    for (i, message) in messages.iter().enumerate() {
        let at = format!("messages[{i}]");
        let Some(message) = message.as_object() else {
            return Err(mistyped(&at, "an object", message));
        };
        let role = match message.get("role") {
            Some(Value::String(role)) => role.as_str(),
            None => return Err(missing(format!("{at}.role"))),
            Some(other) => return Err(mistyped(format!("{at}.role"), "a string", other)),
        };
        if role != "tool" && !waiting.is_empty() {
            return Err(unanswered(&waiting));
        }
        match role {
            "system" | "developer" | "user" => {
                validate_content(&at, role, message.get("content"), false)?;
                answerable.clear();
            }
            "assistant" => {
                let calls = match message.get("tool_calls") {
                    None | Some(Value::Null) => Vec::new(),
                    Some(Value::Array(calls)) => validate_tool_calls(&at, calls)?,
                    Some(other) => {
                        return Err(mistyped(format!("{at}.tool_calls"), "an array", other));
                    }
                };
                let optional = !calls.is_empty() || message.contains_key("refusal");
                validate_content(&at, role, message.get("content"), optional)?;
                answerable = calls.iter().cloned().collect();
                waiting = calls;
            }
            "tool" => {
                let id = match message.get("tool_call_id") {
                    Some(Value::String(id)) => id.clone(),
                    None | Some(Value::Null) => return Err(missing(format!("{at}.tool_call_id"))),
                    Some(other) => {
                        return Err(mistyped(format!("{at}.tool_call_id"), "a string", other));
                    }
                };
                validate_content(&at, role, message.get("content"), false)?;
                if !answerable.contains(&id) {
                    return Err(invalid(
                        format!("{at}.role"),
                        "Invalid parameter: messages with role 'tool' must be a response to a \
                         preceeding message with 'tool_calls'.",
                    ));
                }
                waiting.retain(|waiting| *waiting != id);
            }
            "function" => {
                if !message.get("name").is_some_and(Value::is_string) {
                    return Err(missing(format!("{at}.name")));
                }
                answerable.clear();
            }
            other => {
                return Err(invalid(
                    format!("{at}.role"),
                    format!("Invalid value: '{other}'. Supported values are: {ROLES}."),
                ));
            }
        }
    }
    if !waiting.is_empty() {
        return Err(unanswered(&waiting));
    }
    Ok(())
}

/// Content is a string or an array of typed parts, of the types `role`
/// takes (images only from the user: a tool message takes text only);
/// `optional` allows it to be absent or null (an assistant message with
/// tool calls).
fn validate_content(
    at: &str,
    role: &str,
    content: Option<&Value>,
    optional: bool,
) -> Result<(), Invalid> {
    let param = format!("{at}.content");
    match content {
        Some(Value::String(_)) => Ok(()),
        None | Some(Value::Null) if optional => Ok(()),
        None => Err(missing(param)),
        Some(Value::Array(parts)) => {
            let supported: &[&str] = match role {
                "user" => &["text", "image_url", "input_audio", "file"],
                "assistant" => &["text", "refusal"],
                _ => &["text"],
            };
            for (j, part) in parts.iter().enumerate() {
                let kind = part["type"].as_str();
                if let Some(kind) = kind
                    && !supported.contains(&kind)
                {
                    return Err(invalid(
                        format!("{param}[{j}].type"),
                        format!(
                            "Invalid value: '{kind}'. Supported values are: {}.",
                            supported
                                .iter()
                                .map(|kind| format!("'{kind}'"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                }
                if kind == Some("image_url") {
                    let url_param = format!("{param}[{j}].image_url.url");
                    match part["image_url"]["url"].as_str() {
                        None => return Err(missing(url_param)),
                        Some(url) => super::images::check_image_url(url).map_err(|why| {
                            invalid(&url_param, format!("Invalid '{url_param}'. {why}"))
                        })?,
                    }
                }
                let ok = match kind {
                    Some("text") | Some("refusal") => {
                        part["text"].is_string() || part["refusal"].is_string()
                    }
                    Some("image_url") => part["image_url"].is_object(),
                    Some("input_audio") => part["input_audio"].is_object(),
                    Some("file") => part["file"].is_object(),
                    _ => false,
                };
                if !ok {
                    return Err(invalid(
                        format!("{param}[{j}]"),
                        format!(
                            "Invalid value for '{param}[{j}]': expected a content part with a \
                             known 'type' and its field, got {part}."
                        ),
                    ));
                }
            }
            Ok(())
        }
        Some(other) => Err(mistyped(
            param,
            "one of a string or array of objects",
            other,
        )),
    }
}

/// Checks an assistant message's tool calls; returns their ids.
fn validate_tool_calls(at: &str, calls: &[Value]) -> Result<Vec<String>, Invalid> {
    let mut ids = Vec::new();
    for (j, call) in calls.iter().enumerate() {
        let param = format!("{at}.tool_calls[{j}]");
        let Some(id) = call["id"].as_str() else {
            return Err(missing(format!("{param}.id")));
        };
        if call["type"] != "function" {
            return Err(invalid(
                format!("{param}.type"),
                format!(
                    "Invalid value for '{param}.type': expected 'function', got {}.",
                    call["type"]
                ),
            ));
        }
        if !call["function"]["name"].is_string() {
            return Err(missing(format!("{param}.function.name")));
        }
        match &call["function"]["arguments"] {
            Value::String(_) => {}
            Value::Null => return Err(missing(format!("{param}.function.arguments"))),
            other => {
                return Err(mistyped(
                    format!("{param}.function.arguments"),
                    "a string",
                    other,
                ));
            }
        }
        ids.push(id.to_owned());
    }
    Ok(ids)
}

fn validate_tools(tools: &Value) -> Result<(), Invalid> {
    let Some(tools) = tools.as_array() else {
        return Err(mistyped("tools", "an array", tools));
    };
    for (i, tool) in tools.iter().enumerate() {
        let param = format!("tools[{i}]");
        if tool["type"] != "function" {
            return Err(invalid(
                format!("{param}.type"),
                format!(
                    "Invalid value for '{param}.type': expected 'function', got {}.",
                    tool["type"]
                ),
            ));
        }
        let function = &tool["function"];
        if !function.is_object() {
            return Err(missing(format!("{param}.function")));
        }
        let name = function["name"].as_str().unwrap_or_default();
        checks::function_name(&format!("{param}.function.name"), name)?;
        let parameters = &function["parameters"];
        if !matches!(parameters, Value::Null | Value::Object(_)) {
            return Err(mistyped(
                format!("{param}.function.parameters"),
                "an object",
                parameters,
            ));
        }
        checks::object_schema(&format!("{param}.function.parameters"), name, parameters)?;
    }
    Ok(())
}

fn validate_options(object: &Map<String, Value>) -> Result<(), Invalid> {
    if let Some(choice) = object.get("tool_choice").filter(|c| !c.is_null()) {
        let valid = match choice {
            Value::String(mode) => matches!(mode.as_str(), "none" | "auto" | "required"),
            Value::Object(_) => {
                choice["type"] == "function" && choice["function"]["name"].is_string()
            }
            _ => false,
        };
        if !valid {
            return Err(invalid(
                "tool_choice",
                format!(
                    "Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or a \
                     named function, got {choice}."
                ),
            ));
        }
        if object.get("tools").is_none_or(Value::is_null) {
            return Err(invalid(
                "tool_choice",
                "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' \
                 are specified.",
            ));
        }
    }
    checks::flag(object, "parallel_tool_calls")?;
    if let Some(options) = checks::stream_options(object)? {
        if !options.is_object() {
            return Err(invalid(
                "stream_options",
                "Invalid type for 'stream_options': expected an object.",
            ));
        }
        if let Some(include) = options.get("include_usage")
            && !include.is_boolean()
        {
            return Err(invalid(
                "stream_options.include_usage",
                "Invalid type for 'stream_options.include_usage': expected a boolean.",
            ));
        }
    }
    match object.get("stop") {
        None | Some(Value::Null) | Some(Value::String(_)) => {}
        Some(Value::Array(stops)) => {
            if stops.len() > 4 || !stops.iter().all(Value::is_string) {
                return Err(invalid(
                    "stop",
                    "Invalid 'stop': expected a string or an array of at most 4 strings.",
                ));
            }
        }
        Some(other) => return Err(mistyped("stop", "a string or an array", other)),
    }
    checks::sampling(object)?;
    for field in ["max_tokens", "max_completion_tokens"] {
        if let Some(value) = object.get(field).filter(|v| !v.is_null())
            && value.as_u64().is_none_or(|n| n < 1)
        {
            return Err(invalid(
                field,
                format!("Invalid '{field}': expected an integer of at least 1, got {value}."),
            ));
        }
    }
    if let Some(format) = object.get("response_format").filter(|f| !f.is_null()) {
        validate_response_format(format)?;
    }
    Ok(())
}

/// `response_format`: `text`, `json_object`, or `json_schema` with a
/// `json_schema` object (a valid `name`, an object `schema`, a boolean
/// `strict`); in strict mode every object of the schema must be closed and
/// require all its properties, as OpenAI's structured outputs demand.
fn validate_response_format(format: &Value) -> Result<(), Invalid> {
    let Some(object) = format.as_object() else {
        return Err(mistyped("response_format", "an object", format));
    };
    let kind = object
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let allowed = checks::format_keys("response_format.type", kind, &["type", "json_schema"])?;
    if let Some(unknown) = object.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(checks::unknown(format!("response_format.{unknown}")));
    }
    if kind != "json_schema" {
        return Ok(());
    }
    let Some(spec) = object.get("json_schema").and_then(Value::as_object) else {
        return Err(missing("response_format.json_schema"));
    };
    if let Some(unknown) = spec
        .keys()
        .find(|k| !["name", "description", "schema", "strict"].contains(&k.as_str()))
    {
        return Err(checks::unknown(format!(
            "response_format.json_schema.{unknown}"
        )));
    }
    let name = match spec.get("name") {
        Some(Value::String(name)) => name.as_str(),
        None => return Err(missing("response_format.json_schema.name")),
        Some(other) => {
            return Err(mistyped(
                "response_format.json_schema.name",
                "a string",
                other,
            ));
        }
    };
    checks::schema_name("response_format.json_schema.name", name)?;
    let strict = checks::boolean("response_format.json_schema.strict", spec.get("strict"))?;
    let schema = match spec.get("schema") {
        None => return Ok(()),
        Some(schema @ Value::Object(_)) => schema,
        Some(other) => {
            return Err(mistyped(
                "response_format.json_schema.schema",
                "an object",
                other,
            ));
        }
    };
    if strict == Some(true) {
        checks::strict(
            schema,
            "response_format",
            &format!("response_format '{name}'"),
        )?;
    }
    Ok(())
}

/// What the conversation holds: the latest tool message's text, and
/// whether the calculator is offered.
fn conversation(body: &Value) -> Conversation {
    let tool_result = body["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["role"] == "tool")
        .map(|m| text_of(&m["content"]))
        .next_back();
    let offers_calculator = body["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|t| t["function"]["name"] == super::CALCULATOR);
    let tool_names = body["tools"].as_array().into_iter().flatten();
    Conversation {
        tool_result,
        offers_calculator,
        images: super::images::seen(body),
        image_tool: super::image_tool(tool_names.filter_map(|t| t["function"]["name"].as_str())),
        tools_forbidden: body["tool_choice"] == "none",
        parallel_allowed: body["parallel_tool_calls"] != false,
        response_schema: (body["response_format"]["type"] == "json_schema")
            .then(|| body["response_format"]["json_schema"]["schema"].clone())
            .filter(Value::is_object),
    }
}

fn usage(provider: Provider, input_tokens: u64, output_tokens: u64) -> Value {
    let mut usage = json!({
        "prompt_tokens": input_tokens,
        "completion_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
    });
    match provider {
        Provider::OpenAi => {
            usage["prompt_tokens_details"] = json!({"cached_tokens": 0, "audio_tokens": 0});
            usage["completion_tokens_details"] = json!({
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0
            });
        }
        Provider::OpenRouter => {
            usage["cost"] = json!(0.0000123);
            usage["is_byok"] = json!(false);
            usage["prompt_tokens_details"] = json!({"cached_tokens": 0});
            usage["completion_tokens_details"] = json!({"reasoning_tokens": 0});
        }
        _ => {}
    }
    usage
}

fn output_tokens(turn: &Turn) -> u64 {
    match turn {
        Turn::Text(text) => tokens(text),
        Turn::CallTool {
            arguments, count, ..
        } => (tokens(&arguments.to_string()) + 5) * *count as u64,
    }
}

fn finish_reason(turn: &Turn) -> &'static str {
    match turn {
        Turn::Text(_) => "stop",
        Turn::CallTool { .. } => "tool_calls",
    }
}

/// The request's `n`: how many choices it asks for.
fn body_n(body: &[u8]) -> u64 {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|body| body["n"].as_u64())
        .unwrap_or(1)
        .clamp(1, 8)
}

/// A `chat.completion` object.
fn completion(provider: Provider, model: &str, turn: &Turn, ids: &Ids, input_tokens: u64) -> Value {
    let message = match turn {
        Turn::Text(text) => json!({
            "role": "assistant",
            "content": text,
            "refusal": null,
            "annotations": []
        }),
        Turn::CallTool {
            name,
            arguments,
            count,
        } => json!({
            "role": "assistant",
            "content": null,
            "tool_calls": (0..*count).map(|k| json!({
                "id": ids.call_id(k),
                "type": "function",
                "function": {"name": name, "arguments": arguments.to_string()}
            })).collect::<Vec<_>>(),
            "refusal": null,
            "annotations": []
        }),
    };
    let mut choice = json!({
        "index": 0,
        "message": message,
        "logprobs": null,
        "finish_reason": finish_reason(turn),
    });
    let mut completion = json!({
        "id": ids.completion,
        "object": "chat.completion",
        "created": unix_time(),
        "model": model,
        "choices": [],
        "usage": usage(provider, input_tokens, output_tokens(turn)),
    });
    match provider {
        Provider::OpenAi => {
            completion["service_tier"] = json!("default");
            completion["system_fingerprint"] = json!("fp_mock0d0c0a");
        }
        Provider::OpenRouter => {
            completion["provider"] = json!("OpenAI");
            choice["native_finish_reason"] = json!(finish_reason(turn));
        }
        Provider::OpenAiCompatible => {
            completion["system_fingerprint"] = json!("fp_ollama");
        }
        _ => {}
    }
    completion["choices"] = json!([choice]);
    completion
}

/// The `chat.completion.chunk` frames of a streamed answer, ending with
/// `data: [DONE]`.
fn chunks(
    provider: Provider,
    model: &str,
    turn: &Turn,
    ids: &Ids,
    input_tokens: u64,
    include_usage: bool,
) -> Vec<String> {
    let created = unix_time();
    let chunk = |delta: Value, finish_reason: Option<&str>| {
        let mut choice = json!({
            "index": 0,
            "delta": delta,
            "logprobs": null,
            "finish_reason": finish_reason,
        });
        let mut chunk = json!({
            "id": ids.completion,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [],
        });
        match provider {
            Provider::OpenAi => {
                chunk["service_tier"] = json!("default");
                chunk["system_fingerprint"] = json!("fp_mock0d0c0a");
                if include_usage {
                    chunk["usage"] = Value::Null;
                }
            }
            Provider::OpenRouter => {
                chunk["provider"] = json!("OpenAI");
                choice["native_finish_reason"] = json!(finish_reason);
            }
            _ => {
                chunk["system_fingerprint"] = json!("fp_ollama");
            }
        }
        chunk["choices"] = json!([choice]);
        format!("data: {chunk}\n\n")
    };

    let mut frames = Vec::new();
    if provider == Provider::OpenRouter {
        frames.push(": OPENROUTER PROCESSING\n\n".to_owned());
    }
    match turn {
        Turn::Text(text) => {
            frames.push(chunk(
                json!({"role": "assistant", "content": "", "refusal": null}),
                None,
            ));
            for piece in pieces(text, 6) {
                frames.push(chunk(json!({"content": piece}), None));
            }
        }
        Turn::CallTool {
            name,
            arguments,
            count,
        } => {
            frames.push(chunk(
                json!({"role": "assistant", "content": null, "refusal": null}),
                None,
            ));
            for k in 0..*count {
                frames.push(chunk(
                    json!({"tool_calls": [{
                        "index": k,
                        "id": ids.call_id(k),
                        "type": "function",
                        "function": {"name": name, "arguments": ""}
                    }]}),
                    None,
                ));
                for piece in pieces(&arguments.to_string(), 4) {
                    frames.push(chunk(
                        json!({"tool_calls": [{"index": k, "function": {"arguments": piece}}]}),
                        None,
                    ));
                }
            }
        }
    }
    frames.push(chunk(json!({}), Some(finish_reason(turn))));
    if include_usage {
        let mut last = json!({
            "id": ids.completion,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [],
            "usage": usage(provider, input_tokens, output_tokens(turn)),
        });
        match provider {
            Provider::OpenAi => {
                last["service_tier"] = json!("default");
                last["system_fingerprint"] = json!("fp_mock0d0c0a");
            }
            Provider::OpenRouter => last["provider"] = json!("OpenAI"),
            _ => last["system_fingerprint"] = json!("fp_ollama"),
        }
        frames.push(format!("data: {last}\n\n"));
    }
    frames.push("data: [DONE]\n\n".to_owned());
    frames
}
