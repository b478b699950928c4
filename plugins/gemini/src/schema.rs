//! Tool schemas as Gemini takes them: an OpenAPI 3.0 subset of JSON Schema.
//! Keywords outside it (`$schema`, `additionalProperties`, `$defs`, …) make
//! the request fail, so they are dropped, recursively.

use serde_json::{Map, Value};

/// The keywords of Gemini's `Schema` object, as JSON Schema spells them.
const KEPT: &[&str] = &[
    "type",
    "format",
    "title",
    "description",
    "nullable",
    "enum",
    "items",
    "minItems",
    "maxItems",
    "properties",
    "required",
    "minProperties",
    "maxProperties",
    "minLength",
    "maxLength",
    "pattern",
    "minimum",
    "maximum",
    "anyOf",
    "propertyOrdering",
    "default",
    "example",
];

/// The only `format`s Gemini accepts; others fail the request.
const FORMATS: &[&str] = &["enum", "date-time", "int32", "int64", "float", "double"];

/// `schema` trimmed to what Gemini accepts.
pub fn sanitize(schema: &Value) -> Value {
    let Value::Object(schema) = schema else {
        return schema.clone();
    };
    let mut kept = Map::new();
    for (key, value) in schema {
        let value = match key.as_str() {
            "properties" => match value {
                Value::Object(properties) => Value::Object(
                    properties
                        .iter()
                        .map(|(name, schema)| (name.clone(), sanitize(schema)))
                        .collect(),
                ),
                other => other.clone(),
            },
            "items" => sanitize(value),
            "anyOf" | "oneOf" => match value {
                Value::Array(options) => Value::Array(options.iter().map(sanitize).collect()),
                other => other.clone(),
            },
            "format" if !value.as_str().is_some_and(|f| FORMATS.contains(&f)) => continue,
            key if KEPT.contains(&key) => value.clone(),
            // `const: x` says what `enum: [x]` says, in a keyword Gemini knows.
            "const" => Value::Array(vec![value.clone()]),
            _ => continue,
        };
        let key = match key.as_str() {
            "oneOf" => "anyOf",
            "const" => "enum",
            key => key,
        };
        kept.insert(key.to_owned(), value);
    }
    // JSON Schema's `"type": ["string", "null"]` is OpenAPI's nullable string.
    if let Some(Value::Array(types)) = kept.get("type") {
        let nullable = types.iter().any(|t| t == "null");
        let first = types.iter().find(|t| *t != "null").cloned();
        match first {
            Some(first) => kept.insert("type".into(), first),
            None => kept.remove("type"),
        };
        if nullable {
            kept.insert("nullable".into(), Value::Bool(true));
        }
    }
    Value::Object(kept)
}

/// Whether a tool's parameters say nothing: Gemini refuses an object schema
/// with no properties, so such a tool is declared without parameters.
pub fn is_empty_object(schema: &Value) -> bool {
    schema.get("type").is_none_or(|t| t == "object")
        && schema
            .get("properties")
            .and_then(Value::as_object)
            .is_none_or(Map::is_empty)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn unsupported_keywords_go_at_every_depth() {
        let schema = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": "x",
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "city": {"type": "string", "format": "uri", "description": "d"},
                "when": {"type": ["string", "null"], "format": "date-time"},
                "tags": {"type": "array", "items": {"type": "string", "additionalProperties": 1, "minLength": 1}},
                "unit": {"const": "celsius"},
                "pick": {"oneOf": [{"type": "integer", "exclusiveMinimum": 0}, {"type": "string"}]},
                "additionalProperties": {"type": "boolean"}
            },
            "required": ["city"],
            "$defs": {"a": {}}
        });
        assert_eq!(
            sanitize(&schema),
            json!({
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "d"},
                    "when": {"type": "string", "format": "date-time", "nullable": true},
                    "tags": {"type": "array", "items": {"type": "string", "minLength": 1}},
                    "unit": {"enum": ["celsius"]},
                    "pick": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
                    "additionalProperties": {"type": "boolean"}
                },
                "required": ["city"]
            })
        );
    }

    #[test]
    fn empty_object_schemas_are_recognized() {
        assert!(is_empty_object(
            &json!({"type": "object", "properties": {}})
        ));
        assert!(is_empty_object(&json!({"type": "object"})));
        assert!(!is_empty_object(
            &json!({"type": "object", "properties": {"a": {}}})
        ));
        assert!(!is_empty_object(&json!({"type": "string"})));
    }
}
