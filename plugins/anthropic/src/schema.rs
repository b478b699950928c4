//! Response schemas as Anthropic's structured outputs take them
//! (`output_config.format`): a subset of JSON Schema in which every object
//! must say `additionalProperties: false`, and numeric, string-length and
//! most array-size constraints are refused. The request fails (400) on any
//! of them, so the schema is narrowed to what Anthropic takes, the way its
//! own SDKs do: objects are closed, unsupported keywords dropped. Dropping
//! a constraint only widens what the model may send; the host checks the
//! answer against the task's whole schema afterwards, so nothing it asked
//! for goes unchecked.

use serde_json::{Map, Value, json};

/// The keywords Anthropic's structured outputs accept.
const KEPT: &[&str] = &[
    "type",
    "title",
    "description",
    "default",
    "enum",
    "const",
    "format",
    "pattern",
    "properties",
    "required",
    "items",
    "prefixItems",
    "minItems",
    "anyOf",
    "allOf",
    "$ref",
    "$defs",
    "definitions",
];

/// The string `format`s Anthropic supports; others are dropped.
const FORMATS: &[&str] = &[
    "date-time",
    "time",
    "date",
    "duration",
    "email",
    "hostname",
    "uri",
    "ipv4",
    "ipv6",
    "uuid",
];

/// `schema` narrowed to what Anthropic accepts.
pub fn for_output(schema: &Value) -> Value {
    let Value::Object(schema) = schema else {
        return schema.clone();
    };
    let mut kept = Map::new();
    for (key, value) in schema {
        let (key, value) = match key.as_str() {
            "properties" | "$defs" | "definitions" => (key.as_str(), each_value(value)),
            "items" => (key.as_str(), for_output(value)),
            // Set below: `false` is the only value taken.
            "additionalProperties" => continue,
            "prefixItems" | "anyOf" | "allOf" => (key.as_str(), each_item(value)),
            // Anthropic has no `oneOf`; its SDKs send the options as `anyOf`.
            "oneOf" => ("anyOf", each_item(value)),
            "format" if !value.as_str().is_some_and(|f| FORMATS.contains(&f)) => continue,
            // Only 0 and 1 are supported.
            "minItems" if value.as_u64().is_none_or(|n| n > 1) => continue,
            key if KEPT.contains(&key) => (key, value.clone()),
            _ => continue,
        };
        kept.insert(key.to_owned(), value);
    }
    let is_object = schema.contains_key("properties")
        || schema.contains_key("additionalProperties")
        || match schema.get("type") {
            Some(Value::String(kind)) => kind == "object",
            Some(Value::Array(kinds)) => kinds.iter().any(|k| k == "object"),
            _ => false,
        };
    if is_object {
        kept.insert("additionalProperties".into(), json!(false));
    }
    Value::Object(kept)
}

/// An object of schemas (`properties`, `$defs`), each narrowed.
fn each_value(value: &Value) -> Value {
    match value {
        Value::Object(schemas) => Value::Object(
            schemas
                .iter()
                .map(|(name, schema)| (name.clone(), for_output(schema)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// A list of schemas (`anyOf`, `prefixItems`), each narrowed.
fn each_item(value: &Value) -> Value {
    match value {
        Value::Array(schemas) => Value::Array(schemas.iter().map(for_output).collect()),
        other => other.clone(),
    }
}
