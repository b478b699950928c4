//! The `calculator` tool: evaluates arithmetic expressions.
//!
//! The parser and evaluator live in [`eval`], which knows nothing of the
//! plugin contract; this file is the tool, written with the SDK: the input
//! type (whose schema the SDK derives) and a function.

pub mod eval;

use opspawn_plugin::prelude::*;
use opspawn_plugin::tool;

/// The tool's description, for the model.
pub const DESCRIPTION: &str = "Evaluates an arithmetic expression and returns its numeric result. \
                               Supports + - * / % (remainder), ^ (power), parentheses, unary \
                               minus, decimals and scientific notation such as 1.5e3.";

/// Integral results up to this magnitude are printed as JSON integers; past
/// it, not every integer is representable, so the f64 is printed as is.
const MAX_EXACT_INTEGER: f64 = 9_007_199_254_740_992.0; // 2^53

/// The calculator's input.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Input {
    /// The expression to evaluate, for example "(2 + 3) * 4" or "2^10 / 1e3".
    pub expression: String,
}

/// The tool: `{"expression": "..."}` in, `{"expression": "...", "result": n}`
/// out.
pub fn calculator(input: Input) -> ToolResult {
    let result =
        eval::evaluate(&input.expression).map_err(|e| ToolError::new(e.code(), e.message()))?;
    Ok(json!({ "expression": input.expression, "result": number(result) }))
}

register_tools!(calculator: DESCRIPTION);

/// The tool's description and input schema, as the host sees them.
pub fn spec() -> opspawn_plugin::types::ToolSpec {
    tool::describe("calculator", Some(DESCRIPTION), &calculator)
}

/// Runs the tool on JSON input, as the host does.
pub fn calculate(input: &str) -> Result<String, ToolError> {
    let context = CallContext {
        task_id: "test".into(),
        step: 0,
        idempotency_key: "test".into(),
    };
    tool::invoke(&calculator, &context, input)
}

/// `20.0` becomes `20`, so results read the way people write them.
fn number(value: f64) -> Value {
    if value.fract() == 0.0 && value.abs() <= MAX_EXACT_INTEGER {
        // Exact: the value is integral and within i64's range.
        Value::from(value as i64)
    } else {
        Value::from(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn ok(input: Value) -> Value {
        let output = calculate(&input.to_string()).expect("the calculation should succeed");
        serde_json::from_str(&output).unwrap()
    }

    fn err(input: &str) -> ToolError {
        calculate(input).expect_err("the calculation should fail")
    }

    #[test]
    fn describes_one_tool_with_a_valid_schema() {
        let spec = spec();
        assert_eq!(spec.name, "calculator");
        assert!(
            spec.description
                .starts_with("Evaluates an arithmetic expression")
        );
        let schema: Value = serde_json::from_str(&spec.input_schema).unwrap();
        assert_eq!(schema["required"], json!(["expression"]));
        assert_eq!(schema["properties"]["expression"]["type"], "string");
        assert_eq!(schema["additionalProperties"], false);
    }

    #[test]
    fn echoes_the_expression_and_prints_integers_without_a_fraction() {
        assert_eq!(
            ok(json!({"expression": "(2+3)*4"})),
            json!({"expression": "(2+3)*4", "result": 20})
        );
        let output = calculate(r#"{"expression": "(2+3)*4"}"#).unwrap();
        assert_eq!(output, r#"{"expression":"(2+3)*4","result":20}"#);
    }

    #[test]
    fn prints_fractions_and_large_values_as_floats() {
        assert_eq!(ok(json!({"expression": "1/4"}))["result"], json!(0.25));
        assert_eq!(ok(json!({"expression": "-7/2"}))["result"], json!(-3.5));
        assert_eq!(
            ok(json!({"expression": "2^53"}))["result"],
            json!(9007199254740992_i64)
        );
        assert_eq!(
            ok(json!({"expression": "2^54"}))["result"],
            json!(18014398509481984.0)
        );
        assert_eq!(ok(json!({"expression": "-0"}))["result"], json!(0));
    }

    #[test]
    fn reports_expression_errors_with_their_code() {
        let error = err(r#"{"expression": "(1+2))"}"#);
        assert_eq!(error.code, "invalid_expression");
        assert_eq!(error.message, "unexpected ')' at position 6");

        let error = err(r#"{"expression": "1/0"}"#);
        assert_eq!(error.code, "division_by_zero");

        let error = err(r#"{"expression": "10^1000"}"#);
        assert_eq!(error.code, "invalid_expression");
    }

    #[test]
    fn rejects_input_without_a_string_expression() {
        for input in [
            "not json",
            "[]",
            "\"1+1\"",
            "{}",
            r#"{"expression": 12}"#,
            "null",
        ] {
            assert_eq!(err(input).code, "invalid_input", "{input}");
        }
    }
}
