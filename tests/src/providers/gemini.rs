//! Google Gemini: `POST {base}/v1beta/models/{model}:generateContent`, and
//! `:streamGenerateContent?alt=sse` for server-sent events, with
//! `x-goog-api-key`.
//!
//! Checked as the API checks: no field it does not know ("Invalid JSON
//! payload received. Unknown name …"), in the request, its generation config,
//! its parts and its function declarations' `parameters` (an OpenAPI subset:
//! no `additionalProperties`, no `$schema`, one type per schema); `contents`
//! with roles `user` and `model`, parts that each hold one thing and no
//! empty text; function responses right after the function call turn, as
//! many as it made, answering its names; a `Content` as system
//! instruction. A bad key is answered 400 `API_KEY_INVALID`, and a missing
//! one 403, as Google does. Stream chunks end with `\r\n\r\n`, as Google's
//! do; without `alt=sse` the stream comes as one JSON array.
//!
//! Thought signatures as Gemini 3 has them: each function call the mock
//! makes carries a `thoughtSignature`, and so does the last part of a text
//! answer; a request whose current turn (since the last user text) holds a
//! function call without the signature it came with is refused, as Gemini 3
//! refuses it.

use serde_json::{Map, Value, json};

use super::{
    Behaviour, Conversation, Incoming, Outcome, Provider, Reply, Shared, Turn, pieces, tokens,
    type_name,
};

/// Field names accepted in either spelling: the canonical camelCase one and
/// its snake_case twin.
fn known(key: &str, names: &[&str]) -> bool {
    names.iter().any(|name| *name == key || snake(name) == key)
}

fn snake(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Looks a field up by either spelling.
fn field<'a>(object: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    object.get(name).or_else(|| object.get(&snake(name)))
}

/// [`field`] of a value that should be an object.
fn field_of<'a>(value: &'a Value, name: &str) -> Option<&'a Value> {
    value.as_object().and_then(|object| field(object, name))
}

const REQUEST_FIELDS: &[&str] = &[
    "contents",
    "tools",
    "toolConfig",
    "safetySettings",
    "systemInstruction",
    "generationConfig",
    "cachedContent",
];

const GENERATION_CONFIG_FIELDS: &[&str] = &[
    "stopSequences",
    "responseMimeType",
    "responseSchema",
    "responseJsonSchema",
    "responseModalities",
    "candidateCount",
    "maxOutputTokens",
    "temperature",
    "topP",
    "topK",
    "seed",
    "presencePenalty",
    "frequencyPenalty",
    "responseLogprobs",
    "logprobs",
    "enableEnhancedCivicAnswers",
    "speechConfig",
    "thinkingConfig",
    "imageConfig",
    "mediaResolution",
];

/// The part fields that carry data; a part holds exactly one.
const PART_DATA: &[&str] = &[
    "text",
    "inlineData",
    "fileData",
    "functionCall",
    "functionResponse",
    "executableCode",
    "codeExecutionResult",
];

const PART_METADATA: &[&str] = &[
    "thought",
    "thoughtSignature",
    "videoMetadata",
    "partMetadata",
];

/// The fields of the OpenAPI-subset `Schema` that `parameters` takes.
const SCHEMA_FIELDS: &[&str] = &[
    "type",
    "format",
    "title",
    "description",
    "nullable",
    "enum",
    "maxItems",
    "minItems",
    "properties",
    "required",
    "minProperties",
    "maxProperties",
    "minLength",
    "maxLength",
    "pattern",
    "example",
    "anyOf",
    "propertyOrdering",
    "default",
    "items",
    "minimum",
    "maximum",
];

const SCHEMA_TYPES: &[&str] = &[
    "TYPE_UNSPECIFIED",
    "STRING",
    "NUMBER",
    "INTEGER",
    "BOOLEAN",
    "ARRAY",
    "OBJECT",
    "NULL",
];

pub(crate) const THOUGHT_SIGNATURE: &str =
    "CiQBcsjafMockThoughtSignatureOpaqueBytesAAAAAAAAAAAAAAAAAA==";

pub(super) fn handle(incoming: &Incoming, shared: &Shared) -> Outcome {
    let provider = Provider::Gemini;
    let Some((model, method)) = incoming
        .rest
        .strip_prefix("/v1beta/models/")
        .and_then(|rest| rest.split_once(':'))
        .filter(|(model, _)| !model.is_empty() && !model.contains('/'))
    else {
        let message = format!(
            "The requested URL {}{} was not found on this server.",
            provider.mount(),
            incoming.rest
        );
        return Outcome::rejected(error(404, "NOT_FOUND", &message), message);
    };
    let stream = match method {
        "generateContent" => false,
        "streamGenerateContent" => true,
        other => {
            let message = format!("Method not found: {other}");
            return Outcome::rejected(error(404, "NOT_FOUND", &message), message);
        }
    };
    let sse = incoming.query_param("alt") == Some("sse");
    if incoming.method != "POST" {
        let message = format!("{} is not allowed; use POST", incoming.method);
        return Outcome::rejected(error(405, "INVALID_ARGUMENT", &message), message);
    }
    let expected = provider.test_key();
    match incoming.header("x-goog-api-key") {
        None => {
            let message = "Method doesn't allow unregistered callers (callers without \
                           established identity). Please use API Key or other form of API \
                           consumer identity to call this API.";
            return Outcome::rejected(
                error(403, "PERMISSION_DENIED", message),
                "no x-goog-api-key header",
            );
        }
        Some(key) if key != expected => {
            let mut reply = error(
                400,
                "INVALID_ARGUMENT",
                "API key not valid. Please pass a valid API key.",
            );
            if let Reply::Json { body, .. } = &mut reply {
                body["error"]["details"] = json!([{
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                    "metadata": {"service": "generativelanguage.googleapis.com"}
                }]);
            }
            return Outcome::rejected(
                reply,
                format!(
                    "x-goog-api-key is {:?}, expected {expected:?}",
                    super::mask_key(key)
                ),
            );
        }
        Some(_) => {}
    }
    if !incoming.is_json() {
        let message = format!(
            "Invalid JSON payload received. Content-Type {:?} is not application/json.",
            incoming.header("content-type").unwrap_or_default()
        );
        return Outcome::rejected(error(400, "INVALID_ARGUMENT", &message), message);
    }
    let body: Value = match serde_json::from_slice(&incoming.body) {
        Ok(body) => body,
        Err(e) => {
            let message = format!("Invalid JSON payload received. {e}");
            return Outcome::rejected(error(400, "INVALID_ARGUMENT", &message), message);
        }
    };
    if let Err(message) = validate(&body) {
        return Outcome::rejected(error(400, "INVALID_ARGUMENT", &message), message);
    }

    let conversation = conversation(&body);
    let mut outcome = match shared.behaviour(provider, model, &conversation) {
        Behaviour::Reply(turn) => {
            let input_tokens = tokens(&String::from_utf8_lossy(&incoming.body));
            let response_id = shared.id("");
            let chunks = responses(model, &turn, &response_id, input_tokens, stream);
            if stream && sse {
                Outcome::new(Reply::Sse {
                    content_type: "text/event-stream",
                    frames: chunks
                        .iter()
                        .map(|chunk| format!("data: {chunk}\r\n\r\n"))
                        .collect(),
                })
            } else if stream {
                // Without alt=sse, Google streams one JSON array.
                Outcome::new(Reply::json(200, Value::Array(chunks)))
            } else {
                Outcome::new(Reply::json(
                    200,
                    chunks.into_iter().next().unwrap_or_default(),
                ))
            }
        }
        Behaviour::Unauthorized => Outcome::new(error(
            401,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials. Expected OAuth 2 access token, \
             login cookie or other valid authentication credential. See \
             https://developers.google.com/identity/sign-in/web/devconsole-project.",
        )),
        Behaviour::RateLimited => {
            let mut reply = error(
                429,
                "RESOURCE_EXHAUSTED",
                "You exceeded your current quota, please check your plan and billing details. \
                 For more information on this error, head to: \
                 https://ai.google.dev/gemini-api/docs/rate-limits. Please retry in 1s.",
            );
            if let Reply::Json { body, headers, .. } = &mut reply {
                body["error"]["details"] = json!([
                    {
                        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                        "violations": [{
                            "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                            "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                            "quotaValue": "2"
                        }]
                    },
                    {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1s"}
                ]);
                headers.push(("retry-after", "1".into()));
            }
            Outcome::new(reply)
        }
        Behaviour::ServerError => Outcome::new(error(
            500,
            "INTERNAL",
            "An internal error has occurred. Please retry or report in \
             https://developers.generativeai.google/guide/troubleshooting",
        )),
        Behaviour::Malformed => Outcome::new(if stream && sse {
            Reply::Sse {
                content_type: "text/event-stream",
                frames: vec![
                    "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"Final Ans\r\n\r\n"
                        .to_owned(),
                    "data: <<not json>>\r\n\r\n".to_owned(),
                ],
            }
        } else {
            Reply::Raw {
                status: 200,
                content_type: "application/json; charset=UTF-8",
                body: "{\n  \"candidates\": [\n    {\n      \"content\": {\n        \"parts\": [\n          {\n            \"text\": \"Final Ans"
                    .to_owned(),
            }
        }),
        Behaviour::UnknownModel => Outcome::new(error(
            404,
            "NOT_FOUND",
            &format!(
                "models/{model} is not found for API version v1beta, or is not supported for \
                 {method}. Call ListModels to see the list of available models and their \
                 supported methods."
            ),
        )),
    };
    outcome.model = Some(model.to_owned());
    outcome.stream = stream;
    outcome.has_tool_result = conversation.tool_result.is_some();
    outcome
}

/// An error in Google's shape.
fn error(status: u16, code: &str, message: &str) -> Reply {
    Reply::json(
        status,
        json!({"error": {"code": status, "message": message, "status": code}}),
    )
}

fn unknown_name(name: &str, at: &str) -> String {
    if at.is_empty() {
        format!("Invalid JSON payload received. Unknown name \"{name}\": Cannot find field.")
    } else {
        format!(
            "Invalid JSON payload received. Unknown name \"{name}\" at '{at}': Cannot find field."
        )
    }
}

fn validate(body: &Value) -> Result<(), String> {
    let Some(object) = body.as_object() else {
        return Err(format!(
            "Invalid JSON payload received. Expected an object, got {}.",
            type_name(body)
        ));
    };
    if let Some(unknown) = object.keys().find(|k| !known(k, REQUEST_FIELDS)) {
        return Err(unknown_name(unknown, ""));
    }
    let contents = match field(object, "contents") {
        Some(Value::Array(contents)) if !contents.is_empty() => contents,
        None | Some(Value::Array(_)) => {
            return Err("* GenerateContentRequest.contents: contents is not specified".into());
        }
        Some(other) => {
            return Err(format!(
                "Invalid value at 'contents' (type.googleapis.com/google.ai.generativelanguage.v1beta.Content), {other}"
            ));
        }
    };
    validate_contents(contents)?;
    validate_thought_signatures(contents)?;
    if let Some(system) = field(object, "systemInstruction") {
        let Some(system) = system.as_object() else {
            return Err(format!(
                "Invalid value at 'system_instruction' \
                 (type.googleapis.com/google.ai.generativelanguage.v1beta.Content), {system}"
            ));
        };
        if let Some(role) = system.get("role")
            && !role.is_string()
        {
            return Err("Invalid value at 'system_instruction.role': expected a string".into());
        }
        let Some(parts) = field(system, "parts").and_then(Value::as_array) else {
            return Err(
                "* GenerateContentRequest.system_instruction.parts: must not be empty".into(),
            );
        };
        for (j, part) in parts.iter().enumerate() {
            validate_part(part, &format!("system_instruction.parts[{j}]"))?;
        }
    }
    if let Some(config) = field(object, "generationConfig") {
        let Some(config) = config.as_object() else {
            return Err("Invalid value at 'generation_config': expected an object".into());
        };
        if let Some(unknown) = config.keys().find(|k| !known(k, GENERATION_CONFIG_FIELDS)) {
            return Err(unknown_name(unknown, "generation_config"));
        }
        if let Some(stops) = field(config, "stopSequences")
            && !stops
                .as_array()
                .is_some_and(|s| s.len() <= 5 && s.iter().all(Value::is_string))
        {
            return Err(
                "Invalid value at 'generation_config.stop_sequences': expected at most 5 strings"
                    .into(),
            );
        }
        if let Some(max) = field(config, "maxOutputTokens")
            && max.as_u64().is_none_or(|n| n < 1)
        {
            return Err(format!(
                "Invalid value at 'generation_config.max_output_tokens' (TYPE_INT32), {max}"
            ));
        }
        if let Some(temperature) = field(config, "temperature")
            && !temperature
                .as_f64()
                .is_some_and(|t| (0.0..=2.0).contains(&t))
        {
            return Err(format!(
                "* GenerateContentRequest.generation_config.temperature: must be in [0, 2], got {temperature}"
            ));
        }
    }
    if let Some(config) = field(object, "generationConfig").and_then(Value::as_object) {
        validate_response_schema(config)?;
        if let Some(top_p) = field(config, "topP")
            && !top_p.as_f64().is_some_and(|p| (0.0..=1.0).contains(&p))
        {
            return Err(format!(
                "* GenerateContentRequest.generation_config.top_p: must be in [0, 1], got {top_p}"
            ));
        }
        if let Some(top_k) = field(config, "topK")
            && top_k.as_u64().is_none_or(|k| k < 1)
        {
            return Err(format!(
                "* GenerateContentRequest.generation_config.top_k: must be positive, got {top_k}"
            ));
        }
    }
    if let Some(tools) = field(object, "tools") {
        validate_tools(tools)?;
    }
    if let Some(config) = field(object, "toolConfig") {
        let mode = config
            .as_object()
            .and_then(|c| field(c, "functionCallingConfig"))
            .and_then(Value::as_object)
            .and_then(|c| c.get("mode"));
        if let Some(mode) = mode
            && !mode.as_str().is_some_and(|m| {
                matches!(
                    m,
                    "AUTO" | "ANY" | "NONE" | "VALIDATED" | "MODE_UNSPECIFIED"
                )
            })
        {
            return Err(format!(
                "Invalid value at 'tool_config.function_calling_config.mode' \
                 (type.googleapis.com/google.ai.generativelanguage.v1beta.FunctionCallingConfig.Mode), {mode}"
            ));
        }
    }
    Ok(())
}

/// Structured output: `responseSchema` (the OpenAPI subset) or
/// `responseJsonSchema` (JSON Schema), not both, and either only with a JSON
/// `responseMimeType`.
fn validate_response_schema(config: &Map<String, Value>) -> Result<(), String> {
    let mime = field(config, "responseMimeType");
    if let Some(mime) = mime
        && !mime
            .as_str()
            .is_some_and(|m| ["text/plain", "application/json", "text/x.enum"].contains(&m))
    {
        return Err(format!(
            "* GenerateContentRequest.generation_config.response_mime_type: allowed mimetypes \
             are `text/plain`, `application/json`, `text/x.enum`, got {mime}"
        ));
    }
    let schema = field(config, "responseSchema");
    let json_schema = field(config, "responseJsonSchema");
    if schema.is_some() && json_schema.is_some() {
        return Err(
            "* GenerateContentRequest.generation_config: response_schema and \
             response_json_schema cannot both be set"
                .into(),
        );
    }
    if schema.is_none() && json_schema.is_none() {
        return Ok(());
    }
    if mime
        .and_then(Value::as_str)
        .is_none_or(|m| m == "text/plain")
    {
        return Err(
            "* GenerateContentRequest.generation_config.response_mime_type: \
             response_mime_type must be set to `application/json` or `text/x.enum` when a \
             response schema is set"
                .into(),
        );
    }
    match (schema, json_schema) {
        (Some(schema), _) => validate_schema(schema, "generation_config.response_schema"),
        (_, Some(schema)) if !schema.is_object() => Err(format!(
            "Invalid value at 'generation_config.response_json_schema' \
             (type.googleapis.com/google.protobuf.Value), {schema}"
        )),
        _ => Ok(()),
    }
}

fn validate_contents(contents: &[Value]) -> Result<(), String> {
    // The names the previous content called, if it was a function call turn.
    let mut previous_calls: Vec<String> = Vec::new();
    for (i, content) in contents.iter().enumerate() {
        let at = format!("contents[{i}]");
        let Some(content) = content.as_object() else {
            return Err(format!(
                "Invalid value at '{at}' (type.googleapis.com/google.ai.generativelanguage.v1beta.Content), {content}"
            ));
        };
        if let Some(unknown) = content.keys().find(|k| !known(k, &["role", "parts"])) {
            return Err(unknown_name(unknown, &at));
        }
        let role = match content.get("role") {
            Some(Value::String(role)) if role == "user" || role == "model" => role.as_str(),
            None if contents.len() == 1 => "user",
            None => {
                return Err(format!(
                    "* GenerateContentRequest.{at}.role: a multi-turn request needs a role on \
                     every content. Please use a valid role: user, model."
                ));
            }
            Some(_) => return Err("Please use a valid role: user, model.".into()),
        };
        let parts = match field(content, "parts") {
            Some(Value::Array(parts)) if !parts.is_empty() => parts,
            _ => {
                return Err(format!(
                    "* GenerateContentRequest.{at}.parts: contents.parts must not be empty."
                ));
            }
        };
        let mut calls = Vec::new();
        let mut responses = Vec::new();
        for (j, part) in parts.iter().enumerate() {
            let at = format!("{at}.parts[{j}]");
            validate_part(part, &at)?;
            let part = part.as_object().expect("checked by validate_part");
            if let Some(call) = field(part, "functionCall") {
                if role != "model" {
                    return Err(format!(
                        "* GenerateContentRequest.{at}.function_call: a function call must come \
                         from the model role"
                    ));
                }
                calls.push(call["name"].as_str().unwrap_or_default().to_owned());
            }
            if let Some(response) = field(part, "functionResponse") {
                if role != "user" {
                    return Err(format!(
                        "* GenerateContentRequest.{at}.function_response: a function response \
                         must come in the user role"
                    ));
                }
                responses.push(response["name"].as_str().unwrap_or_default().to_owned());
            }
        }
        if !calls.is_empty() && (i == 0 || contents[i - 1]["role"] != "user") {
            return Err("Please ensure that function call turn comes immediately after a user turn or after a function response turn.".into());
        }
        if !responses.is_empty() {
            if previous_calls.is_empty() {
                return Err("Please ensure that function response turn comes immediately after a function call turn.".into());
            }
            if responses.len() != previous_calls.len() {
                return Err("Please ensure that the number of function response parts is equal to the number of function call parts of the function call turn.".into());
            }
            let mut expected = previous_calls.clone();
            let mut got = responses.clone();
            expected.sort();
            got.sort();
            if expected != got {
                return Err(format!(
                    "* GenerateContentRequest.{at}: the function responses ({}) do not answer \
                     the function calls of the previous turn ({})",
                    got.join(", "),
                    expected.join(", ")
                ));
            }
        } else if !previous_calls.is_empty() {
            return Err("Please ensure that function response turn comes immediately after a function call turn.".into());
        }
        previous_calls = calls;
    }
    Ok(())
}

/// Gemini 3's rule: in the current turn (the contents after the last user
/// text), the first function call of each model step carries the thought
/// signature it came with.
fn validate_thought_signatures(contents: &[Value]) -> Result<(), String> {
    let parts = |content: &Value| -> Vec<Value> {
        content
            .as_object()
            .and_then(|c| field(c, "parts"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let current = contents
        .iter()
        .rposition(|content| {
            content["role"] != "model" && parts(content).iter().any(|p| p.get("text").is_some())
        })
        .map_or(0, |at| at + 1);
    for (i, content) in contents.iter().enumerate().skip(current) {
        let parts = parts(content);
        let Some((j, call)) = parts.iter().enumerate().find(|(_, part)| {
            part.as_object()
                .is_some_and(|p| field(p, "functionCall").is_some())
        }) else {
            continue;
        };
        let name = call
            .as_object()
            .and_then(|p| field(p, "functionCall"))
            .and_then(|c| c["name"].as_str())
            .unwrap_or_default();
        match call.as_object().and_then(|p| field(p, "thoughtSignature")) {
            None => {
                return Err(format!(
                    "Function call is missing a thought_signature in functionCall parts. This \
                     is required for tools to work correctly, and missing thought_signature \
                     may lead to degraded model performance. Additional data, function call \
                     `default_api:{name}` , position {}. Please refer to \
                     https://ai.google.dev/gemini-api/docs/thought-signatures for more details.",
                    i + 1
                ));
            }
            Some(signature) if signature != THOUGHT_SIGNATURE => {
                return Err(format!(
                    "* GenerateContentRequest.contents[{i}].parts[{j}].thought_signature: \
                     Corrupted thought signature."
                ));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

fn validate_part(part: &Value, at: &str) -> Result<(), String> {
    let Some(part) = part.as_object() else {
        return Err(format!(
            "Invalid value at '{at}' (type.googleapis.com/google.ai.generativelanguage.v1beta.Part), {part}"
        ));
    };
    if let Some(unknown) = part
        .keys()
        .find(|k| !known(k, PART_DATA) && !known(k, PART_METADATA))
    {
        return Err(unknown_name(unknown, at));
    }
    let data: Vec<&String> = part.keys().filter(|k| known(k, PART_DATA)).collect();
    if data.len() != 1 {
        return Err(format!(
            "* GenerateContentRequest.{at}.data: required oneof field 'data' must have one \
             initialized field"
        ));
    }
    if let Some(text) = part.get("text") {
        match text.as_str() {
            Some("") => {
                return Err(
                    "Unable to submit request because it has an empty text parameter. \
                            Add a value to the parameter and try again."
                        .into(),
                );
            }
            Some(_) => {}
            None => {
                return Err(format!(
                    "Invalid value at '{at}.text' (TYPE_STRING), {text}"
                ));
            }
        }
    }
    if let Some(call) = field(part, "functionCall") {
        if call["name"].as_str().is_none_or(str::is_empty) {
            return Err(format!(
                "* GenerateContentRequest.{at}.function_call.name: Name cannot be empty."
            ));
        }
        if let Some(args) = call.get("args")
            && !args.is_object()
        {
            return Err(format!(
                "Invalid value at '{at}.function_call.args' (type.googleapis.com/google.protobuf.Struct), {args}"
            ));
        }
    }
    if let Some(inline) = field(part, "inlineData") {
        let Some(mime_type) = field_of(inline, "mimeType").and_then(Value::as_str) else {
            return Err(format!(
                "* GenerateContentRequest.{at}.inline_data.mime_type: must be set"
            ));
        };
        let data = field_of(inline, "data")
            .and_then(Value::as_str)
            .unwrap_or_default();
        // Gemini reads bytes as a protobuf `bytes` field: base64, or the
        // request is refused; and it cannot read an image of another type.
        if let Err(why) = super::images::check_bytes(mime_type, data) {
            return Err(format!(
                "Invalid value at '{at}.inline_data.data' (TYPE_BYTES), {why}"
            ));
        }
    }
    if let Some(file) = field(part, "fileData")
        && field_of(file, "fileUri")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
    {
        return Err(format!(
            "* GenerateContentRequest.{at}.file_data.file_uri: must be set"
        ));
    }
    if let Some(response) = field(part, "functionResponse") {
        if response["name"].as_str().is_none_or(str::is_empty) {
            return Err(format!(
                "* GenerateContentRequest.{at}.function_response.name: Name cannot be empty."
            ));
        }
        match response.get("response") {
            Some(Value::Object(_)) => {}
            Some(other) => {
                return Err(format!(
                    "Invalid value at '{at}.function_response.response' (type.googleapis.com/google.protobuf.Struct), {other}"
                ));
            }
            None => {
                return Err(format!(
                    "* GenerateContentRequest.{at}.function_response.response: must be set"
                ));
            }
        }
    }
    Ok(())
}

fn validate_tools(tools: &Value) -> Result<(), String> {
    let Some(tools) = tools.as_array() else {
        return Err(format!(
            "Invalid value at 'tools' (type.googleapis.com/google.ai.generativelanguage.v1beta.Tool), {tools}"
        ));
    };
    for (i, tool) in tools.iter().enumerate() {
        let at = format!("tools[{i}]");
        let Some(tool) = tool.as_object() else {
            return Err(format!(
                "Invalid value at '{at}' (type.googleapis.com/google.ai.generativelanguage.v1beta.Tool), {tool}"
            ));
        };
        let tool_fields = [
            "functionDeclarations",
            "googleSearchRetrieval",
            "codeExecution",
            "googleSearch",
            "urlContext",
            "computerUse",
            "fileSearch",
            "googleMaps",
        ];
        if let Some(unknown) = tool.keys().find(|k| !known(k, &tool_fields)) {
            return Err(unknown_name(unknown, &at));
        }
        let Some(declarations) = field(tool, "functionDeclarations") else {
            continue;
        };
        let Some(declarations) = declarations.as_array() else {
            return Err(format!(
                "Invalid value at '{at}.function_declarations': expected a list, got {declarations}"
            ));
        };
        for (j, declaration) in declarations.iter().enumerate() {
            let at = format!("{at}.function_declarations[{j}]");
            let Some(declaration) = declaration.as_object() else {
                return Err(format!("Invalid value at '{at}', {declaration}"));
            };
            let fields = [
                "name",
                "description",
                "parameters",
                "parametersJsonSchema",
                "response",
                "responseJsonSchema",
                "behavior",
            ];
            if let Some(unknown) = declaration.keys().find(|k| !known(k, &fields)) {
                return Err(unknown_name(unknown, &at));
            }
            let name = declaration
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let valid_name = !name.is_empty()
                && name.len() <= 64
                && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
            if !valid_name {
                return Err(format!(
                    "* GenerateContentRequest.{at}.name: Invalid function name. Must start with \
                     a letter or an underscore. Must be alphameric (a-z, A-Z, 0-9), underscores \
                     (_), dots (.) or dashes (-), with a maximum length of 64."
                ));
            }
            let parameters = field(declaration, "parameters");
            let json_schema = field(declaration, "parametersJsonSchema");
            if parameters.is_some() && json_schema.is_some() {
                return Err(format!(
                    "* GenerateContentRequest.{at}: parameters and parameters_json_schema cannot \
                     both be set"
                ));
            }
            if let Some(parameters) = parameters {
                validate_schema(parameters, &format!("{at}.parameters"))?;
                if !parameters["type"]
                    .as_str()
                    .is_some_and(|t| t.eq_ignore_ascii_case("object"))
                {
                    return Err(format!(
                        "* GenerateContentRequest.{at}.parameters.type: must be OBJECT for \
                         function parameters"
                    ));
                }
            }
            if let Some(schema) = json_schema
                && !schema.is_object()
            {
                return Err(format!(
                    "Invalid value at '{at}.parameters_json_schema' \
                     (type.googleapis.com/google.protobuf.Value), {schema}"
                ));
            }
        }
    }
    Ok(())
}

/// An OpenAPI-subset `Schema`: known fields only, one type per schema.
fn validate_schema(schema: &Value, at: &str) -> Result<(), String> {
    let Some(schema) = schema.as_object() else {
        return Err(format!(
            "Invalid value at '{at}' (type.googleapis.com/google.ai.generativelanguage.v1beta.Schema), {schema}"
        ));
    };
    if let Some(unknown) = schema.keys().find(|k| !known(k, SCHEMA_FIELDS)) {
        return Err(unknown_name(unknown, at));
    }
    match schema.get("type") {
        None => {}
        Some(Value::String(kind)) if SCHEMA_TYPES.iter().any(|t| t.eq_ignore_ascii_case(kind)) => {}
        Some(Value::Array(_)) => {
            return Err(format!(
                "Invalid JSON payload received. Proto field is not repeating, cannot start list. \
                 at '{at}.type'"
            ));
        }
        Some(other) => {
            return Err(format!(
                "Invalid value at '{at}.type' (type.googleapis.com/google.ai.generativelanguage.v1beta.Type), {other}"
            ));
        }
    }
    if let Some(properties) = schema.get("properties") {
        let Some(properties) = properties.as_object() else {
            return Err(format!(
                "Invalid value at '{at}.properties': expected an object"
            ));
        };
        for (name, property) in properties {
            validate_schema(property, &format!("{at}.properties[\"{name}\"]"))?;
        }
    }
    if let Some(items) = schema.get("items") {
        validate_schema(items, &format!("{at}.items"))?;
    }
    if let Some(any_of) = field(schema, "anyOf") {
        for (k, option) in any_of.as_array().into_iter().flatten().enumerate() {
            validate_schema(option, &format!("{at}.any_of[{k}]"))?;
        }
    }
    for list in ["required", "enum", "propertyOrdering"] {
        if let Some(values) = field(schema, list)
            && !values
                .as_array()
                .is_some_and(|v| v.iter().all(Value::is_string))
        {
            return Err(format!(
                "Invalid value at '{at}.{}' (TYPE_STRING): expected a list of strings, got {values}",
                snake(list)
            ));
        }
    }
    Ok(())
}

fn conversation(body: &Value) -> Conversation {
    let object = body.as_object();
    let contents = object
        .and_then(|o| field(o, "contents"))
        .and_then(Value::as_array);
    let tool_result = contents
        .into_iter()
        .flatten()
        .filter_map(|c| c.as_object().and_then(|c| field(c, "parts")))
        .filter_map(Value::as_array)
        .flatten()
        .filter_map(|part| part.as_object().and_then(|p| field(p, "functionResponse")))
        .map(|response| response["response"].to_string())
        .next_back();
    let declarations = object
        .and_then(|o| field(o, "tools"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|t| t.as_object().and_then(|t| field(t, "functionDeclarations")))
        .filter_map(Value::as_array)
        .flatten();
    let offers_calculator = declarations.clone().any(|d| d["name"] == super::CALCULATOR);
    let mode = object
        .and_then(|o| field(o, "toolConfig"))
        .and_then(Value::as_object)
        .and_then(|c| field(c, "functionCallingConfig"))
        .and_then(|c| c.get("mode"));
    Conversation {
        tool_result,
        offers_calculator,
        images: super::images::seen(body),
        image_tool: super::image_tool(declarations.filter_map(|d| d["name"].as_str())),
        tools_forbidden: mode.is_some_and(|mode| mode == "NONE"),
        // Gemini has no switch: the model calls in parallel as it likes.
        parallel_allowed: true,
        response_schema: object
            .and_then(|o| field(o, "generationConfig"))
            .and_then(Value::as_object)
            .and_then(|c| field(c, "responseSchema").or_else(|| field(c, "responseJsonSchema")))
            .filter(|schema| schema.is_object())
            .cloned(),
    }
}

/// The `GenerateContentResponse`s of an answer: one when not streamed; a
/// few chunks when streamed, every one with `usageMetadata` (the running
/// total) and the last with `finishReason`.
fn responses(
    model: &str,
    turn: &Turn,
    response_id: &str,
    input_tokens: u64,
    stream: bool,
) -> Vec<Value> {
    let response = |parts: Value, finish: bool, output_tokens: u64| {
        let mut candidate = json!({
            "content": {"parts": parts, "role": "model"},
            "index": 0,
        });
        if finish {
            candidate["finishReason"] = json!("STOP");
        }
        let mut usage = json!({
            "promptTokenCount": input_tokens,
            "totalTokenCount": input_tokens + output_tokens,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": input_tokens}],
        });
        if output_tokens > 0 {
            usage["candidatesTokenCount"] = json!(output_tokens);
        }
        json!({
            "candidates": [candidate],
            "usageMetadata": usage,
            "modelVersion": model,
            "responseId": response_id,
        })
    };
    match turn {
        Turn::CallTool {
            name,
            arguments,
            count,
        } => {
            // Of parallel calls, only the first carries the signature.
            let parts: Vec<Value> = (0..*count)
                .map(|k| {
                    let mut part = json!({"functionCall": {"name": name, "args": arguments}});
                    if k == 0 {
                        part["thoughtSignature"] = json!(THOUGHT_SIGNATURE);
                    }
                    part
                })
                .collect();
            let output = (tokens(&arguments.to_string()) + 3) * *count as u64;
            vec![response(Value::Array(parts), true, output)]
        }
        Turn::Text(text) if !stream => vec![response(
            json!([{"text": text, "thoughtSignature": THOUGHT_SIGNATURE}]),
            true,
            tokens(text),
        )],
        Turn::Text(text) => {
            let count = text.chars().count();
            let pieces = pieces(text, count.div_ceil(3));
            let last = pieces.len() - 1;
            let mut sent = String::new();
            pieces
                .iter()
                .enumerate()
                .map(|(k, piece)| {
                    sent.push_str(piece);
                    // The signature comes with the last part.
                    let mut part = json!({"text": piece});
                    if k == last {
                        part["thoughtSignature"] = json!(THOUGHT_SIGNATURE);
                    }
                    response(json!([part]), k == last, tokens(&sent))
                })
                .collect()
        }
    }
}
