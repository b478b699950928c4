//! The request checks OpenAI's two APIs make alike: Chat Completions (in
//! `openai`) and the Responses API (in `responses`). OpenAI words them the
//! same way in both, naming the parameter by its path, which differs (a
//! tool's name is `tools[0].function.name` in one and `tools[0].name` in
//! the other): the callers give the path, and where the wording itself
//! differs, the words.

use serde_json::{Map, Value, json};

use super::type_name;

/// Why a request is refused, and the parameter it is about.
pub(super) struct Invalid {
    pub(super) message: String,
    pub(super) param: Option<String>,
}

pub(super) fn invalid(param: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid {
        message: message.into(),
        param: Some(param.into()),
    }
}

/// `Missing required parameter: '<param>'.`
pub(super) fn missing(param: impl Into<String>) -> Invalid {
    let param = param.into();
    let message = format!("Missing required parameter: '{param}'.");
    invalid(param, message)
}

/// `Unknown parameter: '<param>'.`
pub(super) fn unknown(param: impl Into<String>) -> Invalid {
    let param = param.into();
    let message = format!("Unknown parameter: '{param}'.");
    invalid(param, message)
}

/// `Invalid type for '<param>': expected <expected>, but got <type> instead.`
pub(super) fn mistyped(param: impl Into<String>, expected: &str, value: &Value) -> Invalid {
    let param = param.into();
    let message = format!(
        "Invalid type for '{param}': expected {expected}, but got {} instead.",
        type_name(value)
    );
    invalid(param, message)
}

/// The body's fields: it must be a JSON object.
pub(super) fn fields(body: &Value) -> Result<&Map<String, Value>, Invalid> {
    body.as_object().ok_or_else(|| {
        invalid(
            "",
            format!(
                "The request body must be a JSON object, not {}.",
                type_name(body)
            ),
        )
    })
}

/// `model`, a string that is not empty; `absent` is the refusal of a body
/// without one, which the two APIs word differently.
pub(super) fn model(object: &Map<String, Value>, absent: &str) -> Result<(), Invalid> {
    match object.get("model") {
        Some(Value::String(model)) if !model.is_empty() => Ok(()),
        None | Some(Value::Null) => Err(invalid("model", absent)),
        Some(other) => Err(mistyped("model", "a string", other)),
    }
}

/// A boolean `value` of `param`, if given (null is not given).
pub(super) fn boolean(param: &str, value: Option<&Value>) -> Result<Option<bool>, Invalid> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(value)) => Ok(Some(*value)),
        Some(other) => Err(mistyped(param, "a boolean", other)),
    }
}

/// A flag that is a boolean when given (null is not given), refused in
/// OpenAI's shorter words (`parallel_tool_calls`, `store`).
pub(super) fn flag(object: &Map<String, Value>, key: &str) -> Result<(), Invalid> {
    match object.get(key) {
        Some(value) if !value.is_null() && !value.is_boolean() => Err(invalid(
            key,
            format!("Invalid type for '{key}': expected a boolean."),
        )),
        _ => Ok(()),
    }
}

/// `stream`, a boolean, and `stream_options`, only when streaming: the
/// options, if given, for the caller to check as its API does.
pub(super) fn stream_options(object: &Map<String, Value>) -> Result<Option<&Value>, Invalid> {
    let stream = boolean("stream", object.get("stream"))?.unwrap_or(false);
    let options = object.get("stream_options").filter(|o| !o.is_null());
    if options.is_some() && !stream {
        return Err(invalid(
            "stream_options",
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
        ));
    }
    Ok(options)
}

/// `temperature` from 0 to 2 and `top_p` from 0 to 1, when given.
pub(super) fn sampling(object: &Map<String, Value>) -> Result<(), Invalid> {
    if let Some(temperature) = object.get("temperature").filter(|t| !t.is_null())
        && !temperature
            .as_f64()
            .is_some_and(|t| (0.0..=2.0).contains(&t))
    {
        return Err(invalid(
            "temperature",
            format!("Invalid 'temperature': expected a number between 0 and 2, got {temperature}."),
        ));
    }
    if let Some(top_p) = object.get("top_p").filter(|p| !p.is_null())
        && !top_p.as_f64().is_some_and(|p| (0.0..=1.0).contains(&p))
    {
        return Err(invalid(
            "top_p",
            format!("Invalid 'top_p': expected a number between 0 and 1, got {top_p}."),
        ));
    }
    Ok(())
}

/// A name OpenAI accepts for a function or a schema, at `param`: 1 to 64
/// letters, digits, `_` and `-`; `detail` ends the refusal.
fn name_at(param: &str, name: &str, detail: &str) -> Result<(), Invalid> {
    let valid = (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if valid {
        return Ok(());
    }
    Err(invalid(
        param,
        format!(
            "Invalid '{param}': string does not match pattern. Expected a string that matches \
             the pattern '^[a-zA-Z0-9_-]+$'{detail}."
        ),
    ))
}

/// A function tool's name, at `param`.
pub(super) fn function_name(param: &str, name: &str) -> Result<(), Invalid> {
    name_at(param, name, "")
}

/// A function's parameters, at `param`: a schema of objects, if it says.
pub(super) fn object_schema(
    param: &str,
    function: &str,
    parameters: &Value,
) -> Result<(), Invalid> {
    if parameters.get("type").is_some_and(|t| t != "object") {
        return Err(invalid(
            param,
            format!(
                "Invalid schema for function '{function}': schema must be a JSON Schema of \
                 'type: \"object\"', got 'type: {}'.",
                parameters["type"]
            ),
        ));
    }
    Ok(())
}

/// A structured output format's `type`, at `param`: the keys its format
/// object may have besides it, `json_schema` ones given as `schema_keys`.
pub(super) fn format_keys<'a>(
    param: &str,
    kind: &str,
    schema_keys: &'a [&'a str],
) -> Result<&'a [&'a str], Invalid> {
    match kind {
        "text" | "json_object" => Ok(&["type"]),
        "json_schema" => Ok(schema_keys),
        _ => Err(invalid(
            param,
            format!(
                "Invalid value: '{kind}'. Supported values are: 'text', 'json_object', and \
                 'json_schema'."
            ),
        )),
    }
}

/// A structured output schema's name, at `param`.
pub(super) fn schema_name(param: &str, name: &str) -> Result<(), Invalid> {
    name_at(
        param,
        name,
        &format!(" of at most 64 characters, got '{name}'"),
    )
}

/// `schema` as strict mode demands it, refused at `param` as the schema of
/// `what` (`function 'f'`, `response_format 'answer'`).
pub(super) fn strict(schema: &Value, param: &str, what: &str) -> Result<(), Invalid> {
    strict_schema(schema, "()")
        .map_err(|why| invalid(param, format!("Invalid schema for {what}: {why}")))
}

/// What strict mode demands of every object in a schema.
fn strict_schema(schema: &Value, context: &str) -> Result<(), String> {
    let Some(object) = schema.as_object() else {
        return Ok(());
    };
    let is_object =
        object.get("type") == Some(&json!("object")) || object.contains_key("properties");
    if is_object {
        if object.get("additionalProperties") != Some(&json!(false)) {
            return Err(format!(
                "In context={context}, 'additionalProperties' is required to be supplied and \
                 to be false."
            ));
        }
        let required: Vec<&str> = object
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        for name in object
            .get("properties")
            .and_then(Value::as_object)
            .into_iter()
            .flat_map(|p| p.keys())
        {
            if !required.contains(&name.as_str()) {
                return Err(format!(
                    "In context={context}, 'required' is required to be supplied and to be an \
                     array including every key in properties. Missing '{name}'."
                ));
            }
        }
    }
    for (key, value) in object {
        match key.as_str() {
            "properties" | "$defs" | "definitions" => {
                for (name, inner) in value.as_object().into_iter().flatten() {
                    strict_schema(inner, &format!("('{key}', '{name}')"))?;
                }
            }
            "items" => strict_schema(value, "('items',)")?,
            "anyOf" => {
                for (k, inner) in value.as_array().into_iter().flatten().enumerate() {
                    strict_schema(inner, &format!("('anyOf', '{k}')"))?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}
