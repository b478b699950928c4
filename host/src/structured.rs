//! Structured output: a task may ask for an answer that is JSON matching a
//! JSON Schema (its `response_format`). The format is checked when the task
//! is submitted ([`check_format`]), handed to the LLM adapter with every
//! chat request the planner leaves without one, and the task's answer is
//! checked against the schema before the task succeeds ([`check_answer`]).
//! Adapters may narrow a schema to what their provider enforces (Anthropic
//! drops numeric bounds, say); the answer is checked against the whole of
//! it here, whatever the provider did.

use serde_json::Value;

use crate::protocol::ResponseFormat;

/// The most a schema may weigh, as compact JSON text: it travels with every
/// LLM call of the task, and is compiled at submission.
pub const MAX_SCHEMA_BYTES: usize = 64 * 1024;

/// How much of a violation's message is kept: one names the offending value,
/// which may be the whole answer.
const MAX_PROBLEM_BYTES: usize = 1024;

/// Why a response format is refused, for the client: its name is
/// `[a-zA-Z0-9_-]{1,64}` (what OpenAI and Gemini take), and its schema a
/// JSON object, at most [`MAX_SCHEMA_BYTES`], that compiles as JSON Schema
/// (local `$ref`s only: nothing is fetched).
pub fn check_format(format: &ResponseFormat) -> Result<(), String> {
    let name = &format.name;
    let name_ok = (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !name_ok {
        return Err(format!(
            "response_format.name must be 1 to 64 ASCII letters, digits, '_' or '-', not {name:?}"
        ));
    }
    if !format.schema.is_object() {
        return Err("response_format.schema must be a JSON Schema object".into());
    }
    let bytes = format.schema.to_string().len();
    if bytes > MAX_SCHEMA_BYTES {
        return Err(format!(
            "response_format.schema is {bytes} bytes as JSON; the limit is {MAX_SCHEMA_BYTES}"
        ));
    }
    jsonschema::validator_for(&format.schema)
        .map(drop)
        .map_err(|error| format!("response_format.schema is not a valid JSON Schema: {error}"))
}

/// Why `answer` does not match `format`, naming the first violation (where,
/// as a JSON pointer, and what); `None` when it matches. Whitespace around
/// the JSON is allowed; anything else (a code fence, prose) is not JSON.
pub fn check_answer(format: &ResponseFormat, answer: &str) -> Option<String> {
    let intro = format!(
        "the answer does not match response format {:?}",
        format.name
    );
    let value: Value = match serde_json::from_str(answer.trim()) {
        Ok(value) => value,
        Err(error) => return Some(format!("{intro}: it is not JSON ({error})")),
    };
    let validator = match jsonschema::validator_for(&format.schema) {
        Ok(validator) => validator,
        // Checked at submission; kept as a failure, not a pass, in case a
        // newer schema crate reads an old task's schema differently.
        Err(error) => return Some(format!("{intro}: its schema does not compile: {error}")),
    };
    let problem = validator.iter_errors(&value).next()?;
    let pointer = problem.instance_path().to_string();
    let at = if pointer.is_empty() {
        "the top level".to_owned()
    } else {
        pointer
    };
    Some(format!("{intro}: at {at}: {}", cut(problem.to_string())))
}

fn cut(mut text: String) -> String {
    if text.len() > MAX_PROBLEM_BYTES {
        let end = (0..=MAX_PROBLEM_BYTES)
            .rev()
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(0);
        text.truncate(end);
        text.push_str(" (cut)");
    }
    text
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn format(schema: Value) -> ResponseFormat {
        ResponseFormat {
            name: "calc".into(),
            schema,
            strict: false,
        }
    }

    fn calc() -> ResponseFormat {
        format(json!({
            "type": "object",
            "properties": {
                "answer": {"type": "integer", "minimum": 0},
                "steps": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["answer"],
        }))
    }

    #[test]
    fn a_matching_answer_passes() {
        assert_eq!(check_answer(&calc(), r#"{"answer": 42}"#), None);
        assert_eq!(
            check_answer(&calc(), "\n  {\"answer\": 0, \"steps\": [\"6*7\"]}\n"),
            None,
            "whitespace around the JSON is allowed"
        );
    }

    #[test]
    fn the_first_violation_is_named_with_its_pointer() {
        let problem = check_answer(&calc(), r#"{"answer": "42"}"#).unwrap();
        assert!(
            problem.starts_with("the answer does not match response format \"calc\": at /answer: ")
                && problem.contains("\"42\" is not of type \"integer\""),
            "{problem}"
        );
        let problem = check_answer(&calc(), r#"{"answer": 1, "steps": ["a", 7]}"#).unwrap();
        assert!(problem.contains("at /steps/1: "), "{problem}");
        let problem = check_answer(&calc(), r#"{"steps": []}"#).unwrap();
        assert!(
            problem.contains("at the top level: ") && problem.contains("\"answer\" is a required"),
            "{problem}"
        );
        let problem = check_answer(&calc(), r#"{"answer": -1}"#).unwrap();
        assert!(
            problem.contains("at /answer: ") && problem.contains("minimum"),
            "bounds a provider may not enforce are checked here: {problem}"
        );
    }

    #[test]
    fn an_answer_that_is_not_json_is_refused() {
        for answer in ["42 apples", "```json\n{\"answer\": 42}\n```", ""] {
            let problem = check_answer(&calc(), answer).unwrap();
            assert!(problem.contains("it is not JSON"), "{answer:?}: {problem}");
        }
    }

    #[test]
    fn a_long_violation_is_cut() {
        let long = "x".repeat(10_000);
        let problem = check_answer(&calc(), &json!({"answer": long}).to_string()).unwrap();
        assert!(problem.len() < 2 * MAX_PROBLEM_BYTES, "{}", problem.len());
        assert!(problem.ends_with("(cut)"), "{problem}");
    }

    #[test]
    fn formats_are_checked_at_submission() {
        assert_eq!(check_format(&calc()), Ok(()));
        let named = |name: &str| ResponseFormat {
            name: name.into(),
            ..calc()
        };
        assert_eq!(check_format(&named(&"a".repeat(64))), Ok(()));
        assert_eq!(check_format(&named("A-b_9")), Ok(()));
        for bad in ["", "has space", "dot.ted", "é", &"a".repeat(65)] {
            let error = check_format(&named(bad)).unwrap_err();
            assert!(error.contains("response_format.name"), "{bad:?}: {error}");
        }
        for schema in [json!(true), json!([]), json!("object")] {
            let error = check_format(&format(schema.clone())).unwrap_err();
            assert!(error.contains("JSON Schema object"), "{schema}: {error}");
        }
        for schema in [
            json!({"type": "objekt"}),
            json!({"type": "object", "required": "answer"}),
            json!({"$ref": "https://example.com/schema.json"}),
        ] {
            let error = check_format(&format(schema.clone())).unwrap_err();
            assert!(
                error.contains("not a valid JSON Schema"),
                "{schema}: {error}"
            );
        }
        let big = format(json!({"description": "x".repeat(MAX_SCHEMA_BYTES)}));
        let error = check_format(&big).unwrap_err();
        assert!(error.contains("the limit is 65536"), "{error}");
    }
}
