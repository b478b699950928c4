//! JSON helpers the wire formats share.

use serde_json::{Map, Value, json};

use crate::llm_http::{ChatRequest, LlmError, Provider, ToolSpec};

/// A whole response body as JSON; one that is not JSON could not be
/// understood.
pub fn body(provider: &Provider, body: &[u8]) -> Result<Value, LlmError> {
    serde_json::from_slice(body).map_err(|error| provider.bad_response(&error.to_string(), body))
}

/// The data of a streamed event as JSON; `what` names it when it is not
/// ("a stream chunk").
pub fn event(provider: &Provider, data: &str, what: &str) -> Result<Value, LlmError> {
    serde_json::from_str(data).map_err(|error| {
        provider.bad_response(&format!("{what} is not JSON: {error}"), data.as_bytes())
    })
}

/// A tool's input schema as JSON; an empty one means "no input".
pub fn input_schema(
    provider: &Provider,
    tool: &ToolSpec,
) -> Result<Value, crate::llm_http::LlmError> {
    if tool.input_schema.trim().is_empty() {
        return Ok(json!({"type": "object", "properties": {}}));
    }
    serde_json::from_str(&tool.input_schema).map_err(|error| {
        provider.invalid_request(format!(
            "the input schema of tool {:?} is not JSON: {error}",
            tool.name
        ))
    })
}

/// The request's tools as a JSON array, each shaped by `shape` from the tool
/// and its input schema (see [`input_schema`]).
pub fn tools(
    provider: &Provider,
    tools: &[ToolSpec],
    shape: impl Fn(&ToolSpec, Value) -> Value,
) -> Result<Value, LlmError> {
    tools
        .iter()
        .map(|tool| Ok(shape(tool, input_schema(provider, tool)?)))
        .collect::<Result<Vec<_>, LlmError>>()
        .map(Value::Array)
}

/// The request's `temperature` and `top_p`, those it sets, at the top level
/// of `body`.
pub fn sampling(body: &mut Value, request: &ChatRequest) {
    if let Some(temperature) = request.temperature {
        body["temperature"] = number(temperature);
    }
    if let Some(top_p) = request.top_p {
        body["top_p"] = number(top_p);
    }
}

/// A response format's JSON Schema, parsed.
pub fn schema(
    provider: &Provider,
    name: &str,
    schema: &str,
) -> Result<Value, crate::llm_http::LlmError> {
    serde_json::from_str(schema).map_err(|error| {
        provider.invalid_request(format!(
            "the schema of response format {name:?} is not JSON: {error}"
        ))
    })
}

/// Tool-call arguments as the JSON object providers that take objects want.
/// Arguments that are not an object are kept under `"input"` rather than
/// lost, so the model still sees what it sent.
pub fn arguments_object(arguments: &str) -> Value {
    match serde_json::from_str::<Value>(arguments) {
        Ok(Value::Object(object)) => Value::Object(object),
        _ if arguments.trim().is_empty() => Value::Object(Map::new()),
        Ok(other) => json!({"input": other}),
        Err(_) => json!({"input": arguments}),
    }
}

/// An `f32` as the number it was written as (0.7, not 0.699999988079071).
pub fn number(value: f32) -> Value {
    value
        .to_string()
        .parse::<f64>()
        .ok()
        .and_then(|value| serde_json::Number::from_f64(value).map(Value::Number))
        .unwrap_or(Value::Null)
}

/// Merges `extra` into `target`: objects key by key, anything else replaced.
pub fn merge(target: &mut Value, extra: Value) {
    match (target, extra) {
        (Value::Object(target), Value::Object(extra)) => {
            for (key, value) in extra {
                match target.get_mut(&key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        target.insert(key, value);
                    }
                }
            }
        }
        (target, extra) => *target = extra,
    }
}

/// A non-negative JSON integer as a token count.
pub fn count(value: Option<&Value>) -> u32 {
    value
        .and_then(Value::as_u64)
        .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_become_objects() {
        assert_eq!(arguments_object(r#"{"a":1}"#), json!({"a": 1}));
        assert_eq!(arguments_object(""), json!({}));
        assert_eq!(arguments_object("[1]"), json!({"input": [1]}));
        assert_eq!(arguments_object("{oops"), json!({"input": "{oops"}));
    }

    #[test]
    fn numbers_keep_their_short_form() {
        assert_eq!(number(0.7).to_string(), "0.7");
        assert_eq!(number(1.0).to_string(), "1.0");
        assert_eq!(number(f32::NAN), Value::Null);
    }

    #[test]
    fn merging_is_deep_for_objects() {
        let mut target = json!({"a": 1, "config": {"x": 1, "y": 2}});
        merge(&mut target, json!({"b": 2, "config": {"y": 3}, "a": [1]}));
        assert_eq!(
            target,
            json!({"a": [1], "b": 2, "config": {"x": 1, "y": 3}})
        );
    }

    #[test]
    fn schemas_must_be_json() {
        let provider = Provider::named("P");
        let tool = |schema: &str| ToolSpec {
            name: "t".into(),
            description: String::new(),
            input_schema: schema.into(),
        };
        assert_eq!(
            input_schema(&provider, &tool("")).unwrap(),
            json!({"type": "object", "properties": {}})
        );
        let error = input_schema(&provider, &tool("{")).unwrap_err();
        assert_eq!(error.kind, crate::llm_http::LlmErrorKind::InvalidRequest);
    }
}
