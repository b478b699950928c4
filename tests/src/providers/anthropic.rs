//! Anthropic Messages: `POST {base}/v1/messages` with `x-api-key` and
//! `anthropic-version`.
//!
//! Checked as the API checks: the version header, `max_tokens`, no fields it
//! does not know (it answers "Extra inputs are not permitted"), no `system`
//! role among the messages, user and assistant turns alternating from a
//! user turn, non-empty text blocks, every `tool_use` answered by a
//! `tool_result` (first) in the very next message and every `tool_result`
//! answering a `tool_use` of the message before, tools with an object
//! `input_schema`, sampling options in their ranges (`temperature` and
//! `top_p` from 0 to 1, `top_k` a whole number) and, from API version
//! `2026-10-21` on, no sampling options at all.
//!
//! Structured output as the API takes it: `output_config.format` with
//! `type: json_schema` and a `schema` in the supported subset (every object
//! with `additionalProperties: false`; no numeric or length bounds, no
//! `minItems` above 1), or the beta's top-level `output_format` only with
//! the `anthropic-beta: structured-outputs-2025-11-13` header.
//!
//! With extended thinking on (`thinking: {"type": "enabled", ...}`), every
//! answer starts with a signed thinking block, and a conversation whose
//! last assistant turn used a tool must give that turn's thinking block
//! back first, unchanged (its signature checked against its text), as the
//! API requires.

use std::collections::HashSet;

use serde_json::{Map, Value, json};

use super::{
    Behaviour, Conversation, Incoming, Outcome, Provider, Reply, Shared, Turn, mask_key, pieces,
    text_of, tokens, type_name,
};

const FIELDS: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "system",
    "metadata",
    "stop_sequences",
    "stream",
    "temperature",
    "top_p",
    "top_k",
    "tools",
    "tool_choice",
    "thinking",
    "service_tier",
    "container",
    "mcp_servers",
    "context_management",
    "output_config",
    "output_format",
];

/// The beta header value that the retired `output_format` field needs.
const STRUCTURED_OUTPUTS_BETA: &str = "structured-outputs-2025-11-13";

/// Schema keywords structured outputs refuse (numeric, string-length and
/// most array and object size constraints).
const UNSUPPORTED_KEYWORDS: &[&str] = &[
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minLength",
    "maxLength",
    "maxItems",
    "uniqueItems",
    "minProperties",
    "maxProperties",
    "oneOf",
    "not",
    "if",
    "then",
    "else",
    "dependentRequired",
    "dependentSchemas",
    "patternProperties",
    "unevaluatedProperties",
    "unevaluatedItems",
];

const VERSIONS: &[&str] = &["2023-06-01", "2023-01-01", NO_SAMPLING_VERSION];

/// The version that refuses `temperature`, `top_p` and `top_k` outright.
pub const NO_SAMPLING_VERSION: &str = "2026-10-21";

/// What Claude says before it calls a tool.
const PREAMBLE: &str = "I'll use the calculator to work that out.";

pub(super) fn handle(incoming: &Incoming, shared: &Shared) -> Outcome {
    let provider = Provider::Anthropic;
    if incoming.rest != "/v1/messages" {
        return Outcome::rejected(
            error(404, "not_found_error", "Not Found"),
            format!("no endpoint at {}{}", provider.mount(), incoming.rest),
        );
    }
    if incoming.method != "POST" {
        return Outcome::rejected(
            error(
                405,
                "invalid_request_error",
                &format!("Method {} not allowed", incoming.method),
            ),
            format!("{} instead of POST", incoming.method),
        );
    }
    let expected = provider.test_key();
    match incoming.header("x-api-key") {
        None => {
            return Outcome::rejected(
                error(401, "authentication_error", "x-api-key header is required"),
                "no x-api-key header",
            );
        }
        Some(key) if key != expected => {
            return Outcome::rejected(
                error(401, "authentication_error", "invalid x-api-key"),
                format!("x-api-key is {:?}, expected {expected:?}", mask_key(key)),
            );
        }
        Some(_) => {}
    }
    let version = match incoming.header("anthropic-version") {
        None => {
            let message = "anthropic-version: header is required";
            return Outcome::rejected(error(400, "invalid_request_error", message), message);
        }
        Some(version) if !VERSIONS.contains(&version) => {
            let message = format!("anthropic-version: invalid version {version:?}");
            return Outcome::rejected(error(400, "invalid_request_error", &message), message);
        }
        Some(version) => version.to_owned(),
    };
    if !incoming.is_json() {
        let message = "Content-Type must be application/json";
        return Outcome::rejected(
            error(400, "invalid_request_error", message),
            format!("content-type is {:?}", incoming.header("content-type")),
        );
    }
    let body: Value = match serde_json::from_slice(&incoming.body) {
        Ok(body) => body,
        Err(e) => {
            let message = format!("There was an issue with your request: invalid JSON: {e}");
            return Outcome::rejected(error(400, "invalid_request_error", &message), message);
        }
    };
    if let Err(message) = validate(&body)
        .and_then(|()| validate_for_version(&body, &version))
        .and_then(|()| validate_thinking(&body))
        .and_then(|()| validate_structured_output(&body, incoming.header("anthropic-beta")))
    {
        return Outcome::rejected(error(400, "invalid_request_error", &message), message);
    }

    let model = body["model"].as_str().unwrap_or_default().to_owned();
    let stream = body["stream"].as_bool().unwrap_or(false);
    let conversation = conversation(&body);
    let mut outcome = match shared.behaviour(provider, &model, &conversation) {
        Behaviour::Reply(turn) => {
            let input_tokens = tokens(&String::from_utf8_lossy(&incoming.body));
            let ids = Ids {
                message: shared.id("msg_01"),
                tool_use: shared.id("toolu_01"),
                thinking: body["thinking"]["type"] == "enabled",
            };
            if stream {
                Outcome::new(Reply::Sse {
                    content_type: "text/event-stream; charset=utf-8",
                    frames: events(&model, &turn, &ids, input_tokens),
                })
            } else {
                Outcome::new(Reply::Json {
                    status: 200,
                    headers: vec![("request-id", shared.id("req_01"))],
                    body: message(&model, &turn, &ids, input_tokens),
                    pretty: false,
                })
            }
        }
        Behaviour::Unauthorized => {
            Outcome::new(error(401, "authentication_error", "invalid x-api-key"))
        }
        Behaviour::RateLimited => {
            let mut reply = error(
                429,
                "rate_limit_error",
                "This request would exceed the rate limit for your organization (mock) of 5 \
                 requests per minute. For details, refer to: \
                 https://docs.claude.com/en/api/rate-limits.",
            );
            if let Reply::Json { headers, .. } = &mut reply {
                headers.push(("retry-after", "1".into()));
                headers.push(("anthropic-ratelimit-requests-limit", "5".into()));
                headers.push(("anthropic-ratelimit-requests-remaining", "0".into()));
            }
            Outcome::new(reply)
        }
        Behaviour::ServerError => Outcome::new(error(500, "api_error", "Internal server error")),
        Behaviour::Malformed => Outcome::new(if stream {
            Reply::Sse {
                content_type: "text/event-stream; charset=utf-8",
                frames: vec![
                    "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\
                     \"msg_malformed\",\"type\":\"message\",\"role\":\n\n"
                        .to_owned(),
                    "event: content_block_delta\ndata: <<not json>>\n\n".to_owned(),
                ],
            }
        } else {
            Reply::Raw {
                status: 200,
                content_type: "application/json",
                body: "{\"id\":\"msg_malformed\",\"type\":\"message\",\"role\":\"assistant\",\
                       \"content\":[{\"type\":\"text\",\"text\":\"Final Ans"
                    .to_owned(),
            }
        }),
        Behaviour::UnknownModel => {
            Outcome::new(error(404, "not_found_error", &format!("model: {model}")))
        }
    };
    outcome.model = Some(model);
    outcome.stream = stream;
    outcome.has_tool_result = conversation.tool_result.is_some();
    outcome
}

struct Ids {
    message: String,
    tool_use: String,
    /// Whether the answer starts with a thinking block.
    thinking: bool,
}

impl Ids {
    /// The id of tool use `k` of a reply: the minted one, then with `k` added.
    fn tool_use_id(&self, k: usize) -> String {
        match k {
            0 => self.tool_use.clone(),
            k => format!("{}{k}", self.tool_use),
        }
    }
}

/// What Claude thinks before it answers, when thinking is on.
const THINKING: &str = "The user wants 6 times 7; the calculator tool can do that.";

/// The signature the mock gives a thinking block's text: any change to the
/// text (or the signature) makes it fail the check.
pub fn thinking_signature(text: &str) -> String {
    // FNV-1a, twice over, shown as the long base64-like text Anthropic sends.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("EqQBCkgIBhABGAIqQMock{hash:016x}{:016x}Sig==", !hash)
}

/// An error in Anthropic's shape.
fn error(status: u16, kind: &str, message: &str) -> Reply {
    Reply::json(
        status,
        json!({
            "type": "error",
            "error": {"type": kind, "message": message},
            "request_id": "req_011CMockAnthropicRequest"
        }),
    )
}

fn validate(body: &Value) -> Result<(), String> {
    let Some(object) = body.as_object() else {
        return Err(format!(
            "body: Input should be an object, not {}",
            type_name(body)
        ));
    };
    if let Some(extra) = object.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(format!("{extra}: Extra inputs are not permitted"));
    }
    match object.get("model") {
        Some(Value::String(model)) if !model.is_empty() => {}
        None => return Err("model: Field required".into()),
        Some(other) => {
            return Err(format!(
                "model: Input should be a valid string, got {other}"
            ));
        }
    }
    match object.get("max_tokens") {
        None => return Err("max_tokens: Field required".into()),
        Some(value) if value.as_u64().is_some_and(|n| n >= 1) => {}
        Some(value) => {
            return Err(format!(
                "max_tokens: Input should be a valid integer greater than or equal to 1, got {value}"
            ));
        }
    }
    let messages = match object.get("messages") {
        Some(Value::Array(messages)) => messages,
        None => return Err("messages: Field required".into()),
        Some(other) => {
            return Err(format!(
                "messages: Input should be a valid list, got {}",
                type_name(other)
            ));
        }
    };
    if messages.is_empty() {
        return Err("messages: at least one message is required".into());
    }
    validate_messages(messages)?;
    match object.get("system") {
        None | Some(Value::String(_)) => {}
        Some(Value::Array(blocks)) => {
            for (i, block) in blocks.iter().enumerate() {
                if block["type"] != "text" || !block["text"].is_string() {
                    return Err(format!(
                        "system.{i}: system blocks must be text blocks with a `text` string"
                    ));
                }
            }
        }
        Some(other) => {
            return Err(format!(
                "system: Input should be a valid string or list of text blocks, got {}",
                type_name(other)
            ));
        }
    }
    if let Some(tools) = object.get("tools") {
        validate_tools(tools)?;
    }
    validate_options(object)
}

/// Extended thinking: its settings, what it rules out, and that the last
/// assistant turn that used a tool gives its thinking back first, unchanged.
fn validate_thinking(body: &Value) -> Result<(), String> {
    let thinking = &body["thinking"];
    match thinking["type"].as_str() {
        None if thinking.is_null() => return Ok(()),
        Some("disabled") => return Ok(()),
        Some("enabled") => {}
        _ => {
            return Err(format!(
                "thinking: Input tag found using 'type' does not match any of the expected \
                 tags: 'enabled', 'disabled', got {thinking}"
            ));
        }
    }
    let budget = thinking["budget_tokens"].as_u64().unwrap_or(0);
    if budget < 1024 {
        return Err(
            "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024".into(),
        );
    }
    if body["max_tokens"].as_u64().is_some_and(|max| budget >= max) {
        return Err("`max_tokens` must be greater than `thinking.budget_tokens`".into());
    }
    if body
        .get("temperature")
        .is_some_and(|t| t.as_f64() != Some(1.0))
    {
        return Err("`temperature` may only be set to 1 when thinking is enabled".into());
    }
    if body.get("top_k").is_some() {
        return Err("`top_k` is not supported when thinking is enabled".into());
    }
    if matches!(body["tool_choice"]["type"].as_str(), Some("any" | "tool")) {
        return Err("Thinking may not be enabled when tool_choice forces tool use.".into());
    }
    let messages = body["messages"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    for (i, message) in messages.iter().enumerate() {
        for (j, block) in message["content"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            if block["type"] == "thinking" {
                let text = block["thinking"].as_str().unwrap_or_default();
                if block["signature"].as_str() != Some(thinking_signature(text).as_str()) {
                    return Err(format!(
                        "messages.{i}.content.{j}: Invalid `signature` in `thinking` block"
                    ));
                }
            }
        }
    }
    let last_tool_use = messages.iter().enumerate().rev().find(|(_, message)| {
        message["role"] == "assistant"
            && message["content"]
                .as_array()
                .is_some_and(|blocks| blocks.iter().any(|b| b["type"] == "tool_use"))
    });
    if let Some((i, message)) = last_tool_use {
        let first = &message["content"][0]["type"];
        if first != "thinking" && first != "redacted_thinking" {
            return Err(format!(
                "messages.{i}.content.0.type: Expected `thinking` or `redacted_thinking`, but \
                 found {first}. When `thinking` is enabled, a final `assistant` message must \
                 start with a thinking block (preceeding the lastmost set of `tool_use` and \
                 `tool_result` blocks). We recommend you include thinking blocks from \
                 previous turns. To avoid this requirement, disable `thinking`."
            ));
        }
    }
    Ok(())
}

/// `output_config` (its `format`, and `effort`), and the beta's
/// `output_format`, which needs its beta header and cannot come with the
/// other.
fn validate_structured_output(body: &Value, beta: Option<&str>) -> Result<(), String> {
    let mut format_at = None;
    if let Some(config) = body.get("output_config") {
        let Some(config) = config.as_object() else {
            return Err(format!(
                "output_config: Input should be a valid dictionary, got {}",
                type_name(config)
            ));
        };
        if let Some(extra) = config
            .keys()
            .find(|k| !["format", "effort"].contains(&k.as_str()))
        {
            return Err(format!(
                "output_config.{extra}: Extra inputs are not permitted"
            ));
        }
        if let Some(effort) = config.get("effort")
            && !effort
                .as_str()
                .is_some_and(|e| ["low", "medium", "high", "max"].contains(&e))
        {
            return Err(format!(
                "output_config.effort: Input should be 'low', 'medium', 'high' or 'max', got {effort}"
            ));
        }
        if let Some(format) = config.get("format").filter(|f| !f.is_null()) {
            format_at = Some(("output_config.format", format));
        }
    }
    if let Some(format) = body.get("output_format").filter(|f| !f.is_null()) {
        let beta_on = beta.is_some_and(|b| {
            b.split(',')
                .any(|value| value.trim() == STRUCTURED_OUTPUTS_BETA)
        });
        if !beta_on {
            return Err("output_format: Extra inputs are not permitted".into());
        }
        if format_at.is_some() {
            return Err(
                "output_format and output_config.format cannot both be set; use \
                 output_config.format"
                    .into(),
            );
        }
        format_at = Some(("output_format", format));
    }
    let Some((at, format)) = format_at else {
        return Ok(());
    };
    let Some(format) = format.as_object() else {
        return Err(format!(
            "{at}: Input should be a valid dictionary, got {}",
            type_name(format)
        ));
    };
    if format.get("type").and_then(Value::as_str) != Some("json_schema") {
        return Err(format!(
            "{at}.type: Input should be 'json_schema', got {}",
            format.get("type").unwrap_or(&Value::Null)
        ));
    }
    if let Some(extra) = format
        .keys()
        .find(|k| !["type", "schema"].contains(&k.as_str()))
    {
        return Err(format!("{at}.{extra}: Extra inputs are not permitted"));
    }
    match format.get("schema") {
        None => Err(format!("{at}.schema: Field required")),
        Some(schema @ Value::Object(_)) => supported_schema(schema, &format!("{at}.schema")),
        Some(other) => Err(format!(
            "{at}.schema: Input should be a valid dictionary, got {}",
            type_name(other)
        )),
    }
}

/// The subset of JSON Schema structured outputs take.
fn supported_schema(schema: &Value, at: &str) -> Result<(), String> {
    let Some(object) = schema.as_object() else {
        return Ok(());
    };
    if let Some(keyword) = object
        .keys()
        .find(|k| UNSUPPORTED_KEYWORDS.contains(&k.as_str()))
    {
        return Err(format!(
            "{at}: '{keyword}' is not supported in structured outputs schemas"
        ));
    }
    if let Some(min) = object.get("minItems")
        && min.as_u64().is_none_or(|n| n > 1)
    {
        return Err(format!(
            "{at}: 'minItems' values other than 0 or 1 are not supported, got {min}"
        ));
    }
    let is_object =
        object.get("type") == Some(&json!("object")) || object.contains_key("properties");
    if is_object {
        match object.get("additionalProperties") {
            Some(Value::Bool(false)) => {}
            None => {
                return Err(format!(
                    "{at}: For 'object' type, 'additionalProperties' must be explicitly set to \
                     false"
                ));
            }
            Some(_) => {
                return Err(format!(
                    "{at}: For 'object' type, 'additionalProperties: true' is not supported. \
                     Please set 'additionalProperties' to false"
                ));
            }
        }
    }
    for (key, value) in object {
        match key.as_str() {
            "properties" | "$defs" | "definitions" => {
                for (name, inner) in value.as_object().into_iter().flatten() {
                    supported_schema(inner, &format!("{at}.{key}.{name}"))?;
                }
            }
            "items" => supported_schema(value, &format!("{at}.items"))?,
            "anyOf" | "allOf" | "prefixItems" => {
                for (k, inner) in value.as_array().into_iter().flatten().enumerate() {
                    supported_schema(inner, &format!("{at}.{key}.{k}"))?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// What a version of the API refuses besides the rest.
fn validate_for_version(body: &Value, version: &str) -> Result<(), String> {
    if version == NO_SAMPLING_VERSION {
        for field in ["temperature", "top_p", "top_k"] {
            if body.get(field).is_some() {
                return Err(format!(
                    "{field}: this field is not supported in API version {version}"
                ));
            }
        }
    }
    Ok(())
}

fn validate_messages(messages: &[Value]) -> Result<(), String> {
    // The tool_use ids of the previous (assistant) message.
    let mut previous_tool_uses: Vec<String> = Vec::new();
    let mut previous_role = "";
    let last = messages.len() - 1;
    for (i, message) in messages.iter().enumerate() {
        let at = format!("messages.{i}");
        let role = match message["role"].as_str() {
            Some(role) => role,
            None => return Err(format!("{at}.role: Field required")),
        };
        match role {
            "user" | "assistant" => {}
            "system" => {
                return Err(format!(
                    "{at}.role: Unexpected role \"system\". The Messages API accepts a top-level \
                     `system` parameter, not \"system\" as an input message role."
                ));
            }
            other => {
                return Err(format!(
                    "{at}.role: Input should be 'user' or 'assistant', got {other:?}"
                ));
            }
        }
        if i == 0 && role != "user" {
            return Err(format!(
                "{at}: the first message must use the \"user\" role"
            ));
        }
        if role == previous_role {
            return Err(format!(
                "{at}: roles must alternate between \"user\" and \"assistant\", but found \
                 multiple \"{role}\" roles in a row"
            ));
        }

        let blocks: Vec<Value> = match &message["content"] {
            Value::String(text) if text.is_empty() && !(role == "assistant" && i == last) => {
                return Err(format!(
                    "{at}: all messages must have non-empty content except for the optional \
                     final assistant message"
                ));
            }
            Value::String(text) => vec![json!({"type": "text", "text": text})],
            Value::Array(blocks) if blocks.is_empty() && !(role == "assistant" && i == last) => {
                return Err(format!(
                    "{at}: all messages must have non-empty content except for the optional \
                     final assistant message"
                ));
            }
            Value::Array(blocks) => blocks.clone(),
            Value::Null => return Err(format!("{at}.content: Field required")),
            other => {
                return Err(format!(
                    "{at}.content: Input should be a valid string or list of content blocks, \
                     got {}",
                    type_name(other)
                ));
            }
        };

        let mut tool_uses = Vec::new();
        let mut answered = HashSet::new();
        let mut seen_other = false;
        for (j, block) in blocks.iter().enumerate() {
            let at = format!("{at}.content.{j}");
            match block["type"].as_str() {
                Some("text") => {
                    match block["text"].as_str() {
                        Some("") => {
                            return Err(format!("{at}: text content blocks must be non-empty"));
                        }
                        Some(text)
                            if role == "assistant"
                                && i == last
                                && text.ends_with(char::is_whitespace) =>
                        {
                            return Err(format!(
                                "{at}: final assistant content cannot end with trailing whitespace"
                            ));
                        }
                        Some(_) => {}
                        None => return Err(format!("{at}.text: Field required")),
                    }
                    seen_other = true;
                }
                Some("image") => {
                    if role != "user" {
                        return Err(format!(
                            "{at}: image blocks may only appear in user messages"
                        ));
                    }
                    check_image(&at, block)?;
                    seen_other = true;
                }
                Some("document") => {
                    if !block["source"].is_object() {
                        return Err(format!("{at}.source: Field required"));
                    }
                    seen_other = true;
                }
                Some("tool_use") => {
                    if role != "assistant" {
                        return Err(format!(
                            "{at}: tool_use blocks may only appear in assistant messages"
                        ));
                    }
                    let Some(id) = block["id"].as_str() else {
                        return Err(format!("{at}.id: Field required"));
                    };
                    if !block["name"].is_string() {
                        return Err(format!("{at}.name: Field required"));
                    }
                    if !block["input"].is_object() {
                        return Err(format!(
                            "{at}.input: Input should be a valid dictionary, got {}",
                            type_name(&block["input"])
                        ));
                    }
                    tool_uses.push(id.to_owned());
                }
                Some("tool_result") => {
                    if role != "user" {
                        return Err(format!(
                            "{at}: tool_result blocks may only appear in user messages"
                        ));
                    }
                    let Some(id) = block["tool_use_id"].as_str() else {
                        return Err(format!("{at}.tool_use_id: Field required"));
                    };
                    if seen_other {
                        return Err(format!(
                            "{at}: tool_result blocks must come first in the content of a user \
                             message, before any other block"
                        ));
                    }
                    if !previous_tool_uses.iter().any(|u| u == id) {
                        return Err(format!(
                            "{at}: unexpected `tool_use_id` found in `tool_result` blocks: {id}. \
                             Each `tool_result` block must have a corresponding `tool_use` block \
                             in the previous message."
                        ));
                    }
                    match &block["content"] {
                        Value::Null | Value::String(_) => {}
                        Value::Array(parts) => {
                            for (k, part) in parts.iter().enumerate() {
                                if !matches!(
                                    part["type"].as_str(),
                                    Some("text" | "image" | "document")
                                ) {
                                    return Err(format!(
                                        "{at}.content.{k}: tool_result content blocks must be \
                                         text, image or document blocks"
                                    ));
                                }
                                if part["type"] == "image" {
                                    check_image(&format!("{at}.content.{k}"), part)?;
                                }
                                if part["type"] == "text"
                                    && part["text"].as_str().is_none_or(str::is_empty)
                                {
                                    return Err(format!(
                                        "{at}.content.{k}: text content blocks must be non-empty"
                                    ));
                                }
                            }
                        }
                        other => {
                            return Err(format!(
                                "{at}.content: Input should be a valid string or list of \
                                 blocks, got {}",
                                type_name(other)
                            ));
                        }
                    }
                    if !matches!(block.get("is_error"), None | Some(Value::Bool(_))) {
                        return Err(format!("{at}.is_error: Input should be a valid boolean"));
                    }
                    answered.insert(id.to_owned());
                }
                Some("thinking") | Some("redacted_thinking") => seen_other = true,
                Some(other) => {
                    return Err(format!(
                        "{at}: Input tag '{other}' found using 'type' does not match any of the \
                         expected tags"
                    ));
                }
                None => return Err(format!("{at}.type: Field required")),
            }
        }
        if role == "user" && !previous_tool_uses.is_empty() {
            let missing: Vec<&str> = previous_tool_uses
                .iter()
                .filter(|id| !answered.contains(*id))
                .map(String::as_str)
                .collect();
            if !missing.is_empty() {
                return Err(format!(
                    "messages.{}: `tool_use` ids were found without `tool_result` blocks \
                     immediately after: {}. Each `tool_use` block must have a corresponding \
                     `tool_result` block in the next message.",
                    i - 1,
                    missing.join(", ")
                ));
            }
        }
        previous_tool_uses = tool_uses;
        previous_role = role;
    }
    Ok(())
}

fn validate_tools(tools: &Value) -> Result<(), String> {
    let Some(tools) = tools.as_array() else {
        return Err(format!(
            "tools: Input should be a valid list, got {}",
            type_name(tools)
        ));
    };
    for (i, tool) in tools.iter().enumerate() {
        let at = format!("tools.{i}");
        if tool.get("type").is_some_and(|t| t != "custom") {
            // A server tool (web search, bash, ...): not checked here.
            continue;
        }
        let name = tool["name"].as_str().unwrap_or_default();
        let valid_name = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid_name {
            return Err(format!(
                "{at}.name: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'"
            ));
        }
        let schema = &tool["input_schema"];
        if schema.is_null() {
            return Err(format!("{at}.input_schema: Field required"));
        }
        if !schema.is_object() {
            return Err(format!(
                "{at}.input_schema: Input should be a valid dictionary, got {}",
                type_name(schema)
            ));
        }
        if schema["type"] != "object" {
            return Err(format!(
                "{at}.input_schema.type: Input should be 'object', got {}",
                schema["type"]
            ));
        }
        if let Some(description) = tool.get("description")
            && !description.is_string()
        {
            return Err(format!("{at}.description: Input should be a valid string"));
        }
    }
    Ok(())
}

fn validate_options(object: &Map<String, Value>) -> Result<(), String> {
    if let Some(stream) = object.get("stream")
        && !stream.is_boolean()
    {
        return Err("stream: Input should be a valid boolean".into());
    }
    if let Some(stops) = object.get("stop_sequences") {
        let Some(stops) = stops.as_array() else {
            return Err("stop_sequences: Input should be a valid list".into());
        };
        for (i, stop) in stops.iter().enumerate() {
            match stop.as_str() {
                Some(stop) if !stop.trim().is_empty() => {}
                _ => {
                    return Err(format!(
                        "stop_sequences.{i}: each stop sequence must be a string containing \
                         non-whitespace"
                    ));
                }
            }
        }
    }
    if let Some(temperature) = object.get("temperature")
        && !temperature
            .as_f64()
            .is_some_and(|t| (0.0..=1.0).contains(&t))
    {
        return Err(format!(
            "temperature: Input should be less than or equal to 1 and at least 0, got {temperature}"
        ));
    }
    if let Some(top_p) = object.get("top_p")
        && !top_p.as_f64().is_some_and(|p| (0.0..=1.0).contains(&p))
    {
        return Err(format!(
            "top_p: Input should be less than or equal to 1 and at least 0, got {top_p}"
        ));
    }
    if let Some(top_k) = object.get("top_k")
        && top_k.as_u64().is_none()
    {
        return Err(format!(
            "top_k: Input should be a valid integer greater than or equal to 0, got {top_k}"
        ));
    }
    if let Some(choice) = object.get("tool_choice") {
        let ok = match choice["type"].as_str() {
            Some("auto" | "any" | "none") => true,
            Some("tool") => choice["name"].is_string(),
            _ => false,
        };
        if !ok {
            return Err(format!(
                "tool_choice: Input should be an object with type 'auto', 'any', 'tool' (with a \
                 name) or 'none', got {choice}"
            ));
        }
    }
    Ok(())
}

/// An image block's source, as Anthropic checks it: base64 bytes of one of
/// its four types (the bytes must be that type), or an http(s) URL.
fn check_image(at: &str, block: &Value) -> Result<(), String> {
    let source = &block["source"];
    if !source.is_object() {
        return Err(format!("{at}.source: Field required"));
    }
    match source["type"].as_str() {
        Some("base64") => {
            let media_type = source["media_type"].as_str().unwrap_or_default();
            if !super::images::MEDIA_TYPES.contains(&media_type) {
                return Err(format!(
                    "{at}.source.base64.media_type: Input should be 'image/jpeg', 'image/png', \
                     'image/gif' or 'image/webp'"
                ));
            }
            let Some(data) = source["data"].as_str() else {
                return Err(format!("{at}.source.base64.data: Field required"));
            };
            super::images::check_bytes(media_type, data)
                .map_err(|why| format!("{at}.source.base64.data: {why}"))
        }
        Some("url") => match source["url"].as_str() {
            Some(url) if url.starts_with("https://") || url.starts_with("http://") => Ok(()),
            Some(_) => Err(format!(
                "{at}.source.url.url: Only http and https URLs are supported"
            )),
            None => Err(format!("{at}.source.url.url: Field required")),
        },
        _ => Err(format!(
            "{at}.source: Input tag '{}' found using 'type' does not match any of the expected \
             tags: 'base64', 'url', 'file'",
            source["type"]
        )),
    }
}

fn conversation(body: &Value) -> Conversation {
    let tool_result = body["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["role"] == "user")
        .filter_map(|m| m["content"].as_array())
        .flatten()
        .filter(|block| block["type"] == "tool_result")
        .map(|block| match &block["content"] {
            Value::Null => String::new(),
            content => text_of(content),
        })
        .next_back();
    let offers_calculator = body["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|t| t["name"] == super::CALCULATOR);
    let tool_names = body["tools"].as_array().into_iter().flatten();
    Conversation {
        tool_result,
        offers_calculator,
        images: super::images::seen(body),
        image_tool: super::image_tool(tool_names.filter_map(|t| t["name"].as_str())),
        tools_forbidden: body["tool_choice"]["type"] == "none",
        parallel_allowed: body["tool_choice"]["disable_parallel_tool_use"] != true,
        response_schema: [
            &body["output_config"]["format"]["schema"],
            &body["output_format"]["schema"],
        ]
        .into_iter()
        .find(|schema| schema.is_object())
        .cloned(),
    }
}

fn usage(input_tokens: u64, output_tokens: u64) -> Value {
    json!({
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
        "output_tokens": output_tokens,
        "service_tier": "standard"
    })
}

fn output_tokens(turn: &Turn) -> u64 {
    match turn {
        Turn::Text(text) => tokens(text),
        Turn::CallTool {
            arguments, count, ..
        } => tokens(PREAMBLE) + (tokens(&arguments.to_string()) + 30) * *count as u64,
    }
}

fn stop_reason(turn: &Turn) -> &'static str {
    match turn {
        Turn::Text(_) => "end_turn",
        Turn::CallTool { .. } => "tool_use",
    }
}

/// A `message` object.
fn message(model: &str, turn: &Turn, ids: &Ids, input_tokens: u64) -> Value {
    let mut content = match turn {
        Turn::Text(text) => json!([{"type": "text", "text": text}]),
        Turn::CallTool {
            name,
            arguments,
            count,
        } => {
            let mut blocks = vec![json!({"type": "text", "text": PREAMBLE})];
            blocks.extend((0..*count).map(|k| {
                json!({"type": "tool_use", "id": ids.tool_use_id(k), "name": name, "input": arguments})
            }));
            Value::Array(blocks)
        }
    };
    if ids.thinking {
        let blocks = content.as_array_mut().expect("an array");
        blocks.insert(
            0,
            json!({"type": "thinking", "thinking": THINKING, "signature": thinking_signature(THINKING)}),
        );
    }
    json!({
        "id": ids.message,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(turn),
        "stop_sequence": null,
        "usage": usage(input_tokens, output_tokens(turn)),
    })
}

/// The event stream of a streamed message.
fn events(model: &str, turn: &Turn, ids: &Ids, input_tokens: u64) -> Vec<String> {
    let event = |data: Value| {
        format!(
            "event: {}\ndata: {data}\n\n",
            data["type"].as_str().unwrap_or_default()
        )
    };
    let mut frames = vec![
        event(json!({
            "type": "message_start",
            "message": {
                "id": ids.message,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": null,
                "stop_sequence": null,
                "usage": usage(input_tokens, 1),
            }
        })),
        event(json!({"type": "ping"})),
    ];
    // With thinking on, the thinking block comes first, its text and its
    // signature streamed as deltas, as Anthropic streams them.
    let first = usize::from(ids.thinking);
    if ids.thinking {
        frames.push(event(json!({
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "thinking", "thinking": "", "signature": ""}
        })));
        for piece in pieces(THINKING, 11) {
            frames.push(event(json!({
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "thinking_delta", "thinking": piece}
            })));
        }
        let signature = thinking_signature(THINKING);
        let (head, tail) = signature.split_at(signature.len() / 2);
        for piece in [head, tail] {
            frames.push(event(json!({
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "signature_delta", "signature": piece}
            })));
        }
        frames.push(event(json!({"type": "content_block_stop", "index": 0})));
    }
    let text_block = |frames: &mut Vec<String>, text: &str| {
        frames.push(event(json!({
            "type": "content_block_start",
            "index": first,
            "content_block": {"type": "text", "text": ""}
        })));
        for piece in pieces(text, 7) {
            frames.push(event(json!({
                "type": "content_block_delta",
                "index": first,
                "delta": {"type": "text_delta", "text": piece}
            })));
        }
        frames.push(event(json!({"type": "content_block_stop", "index": first})));
    };
    match turn {
        Turn::Text(text) => text_block(&mut frames, text),
        Turn::CallTool {
            name,
            arguments,
            count,
        } => {
            text_block(&mut frames, PREAMBLE);
            for k in 0..*count {
                let index = first + 1 + k;
                frames.push(event(json!({
                    "type": "content_block_start",
                    "index": index,
                    "content_block": {
                        "type": "tool_use", "id": ids.tool_use_id(k), "name": name, "input": {}
                    }
                })));
                let mut json_pieces = vec![String::new()];
                json_pieces.extend(pieces(&arguments.to_string(), 5));
                for piece in json_pieces {
                    frames.push(event(json!({
                        "type": "content_block_delta",
                        "index": index,
                        "delta": {"type": "input_json_delta", "partial_json": piece}
                    })));
                }
                frames.push(event(json!({"type": "content_block_stop", "index": index})));
            }
        }
    }
    frames.push(event(json!({
        "type": "message_delta",
        "delta": {"stop_reason": stop_reason(turn), "stop_sequence": null},
        "usage": {"output_tokens": output_tokens(turn)}
    })));
    frames.push(event(json!({"type": "message_stop"})));
    frames
}
