//! The `tool` world: a component that describes its tools and runs them.
//!
//! Most tools are typed functions exported with
//! [`register_tools!`](crate::register_tools); [`ToolPlugin`] is the world
//! itself, JSON text in and out, for components that build their specs at
//! run time.

use std::fmt;
use std::marker::PhantomData;

use schemars::JsonSchema;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::__private::tool::exports::opspawn::plugin::tools::{Guest, ToolError as WitToolError};
use crate::types::{CallContext, ToolSpec};

/// A tool component. Exported with
/// [`register_tool_plugin!`](crate::register_tool_plugin).
pub trait ToolPlugin {
    /// The tools this component offers; the host asks once, at load.
    fn describe() -> Vec<ToolSpec>;

    /// Runs tool `name` on `input`, a JSON object that the host has already
    /// checked against the tool's input schema; answers JSON text.
    fn invoke(context: CallContext, name: String, input: String) -> Result<String, ToolError>;
}

/// What a tool answers: its output, or an error with a code.
pub type ToolResult<T = Value> = Result<T, ToolError>;

/// The codes the SDK itself answers with.
pub mod codes {
    /// The input did not parse as the tool's input type.
    pub const INVALID_INPUT: &str = "invalid_input";
    /// No tool of this component has the name called.
    pub const UNKNOWN_TOOL: &str = "unknown_tool";
    /// An error converted with `?` (any `std::error::Error`).
    pub const TOOL_FAILED: &str = "tool_failed";
    /// The output could not be serialized as JSON.
    pub const INVALID_OUTPUT: &str = "invalid_output";
}

/// A tool's error: a short machine-readable code (such as `invalid_input`)
/// and a message for the model and the step journal.
///
/// Any `std::error::Error` converts into one with the code
/// [`codes::TOOL_FAILED`], so `?` works on every fallible call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolError {
    pub code: String,
    pub message: String,
}

impl ToolError {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
        }
    }

    /// The input is unusable: [`codes::INVALID_INPUT`].
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Self::new(codes::INVALID_INPUT, message)
    }

    /// Tool `name` is none of `offered`: [`codes::UNKNOWN_TOOL`].
    pub fn unknown_tool(name: &str, offered: &[&str]) -> Self {
        Self::new(
            codes::UNKNOWN_TOOL,
            format!(
                "this component has no tool named '{name}'; it offers {}",
                offered.join(", ")
            ),
        )
    }
}

impl<E: std::error::Error> From<E> for ToolError {
    fn from(error: E) -> Self {
        Self::new(codes::TOOL_FAILED, error.to_string())
    }
}

impl fmt::Display for ToolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// A function that can be a tool: `fn(Input) -> ToolResult<Output>` or
/// `fn(Input, &CallContext) -> ToolResult<Output>`, where `Input` is
/// `Deserialize + JsonSchema` and `Output` is `Serialize`. `Args` only tells
/// the two shapes apart.
pub trait ToolFn<Args> {
    type Input: DeserializeOwned + JsonSchema;

    /// Runs the tool; answers its output as JSON text.
    fn call(&self, input: Self::Input, context: &CallContext) -> Result<String, ToolError>;
}

impl<F, I, O> ToolFn<(I,)> for F
where
    F: Fn(I) -> Result<O, ToolError>,
    I: DeserializeOwned + JsonSchema,
    O: Serialize,
{
    type Input = I;

    fn call(&self, input: I, _context: &CallContext) -> Result<String, ToolError> {
        to_json(&self(input)?)
    }
}

impl<F, I, O> ToolFn<(I, CallContext)> for F
where
    F: Fn(I, &CallContext) -> Result<O, ToolError>,
    I: DeserializeOwned + JsonSchema,
    O: Serialize,
{
    type Input = I;

    fn call(&self, input: I, context: &CallContext) -> Result<String, ToolError> {
        to_json(&self(input, context)?)
    }
}

fn to_json(output: &impl Serialize) -> Result<String, ToolError> {
    serde_json::to_string(output).map_err(|e| {
        ToolError::new(
            codes::INVALID_OUTPUT,
            format!("the output is not JSON: {e}"),
        )
    })
}

/// The spec of tool `name`: its input schema derived from the input type,
/// and `description`, else the input type's doc comment, else its name.
pub fn describe<Args, F: ToolFn<Args>>(
    name: &str,
    description: Option<&str>,
    _tool: &F,
) -> ToolSpec {
    let mut schema = schemars::schema_for!(F::Input).to_value();
    let documented = strip_root_annotations(&mut schema);
    ToolSpec {
        name: name.to_owned(),
        description: description
            .map(str::to_owned)
            .or(documented)
            .unwrap_or_else(|| name.to_owned()),
        input_schema: schema.to_string(),
    }
}

/// Removes what the tool spec carries itself (the description) or what no
/// provider wants in a tool's parameters (`$schema`, the Rust type's name
/// as `title`); returns the description.
fn strip_root_annotations(schema: &mut Value) -> Option<String> {
    let root = schema.as_object_mut()?;
    root.remove("$schema");
    root.remove("title");
    match root.remove("description") {
        Some(Value::String(text)) => Some(text.trim().to_owned()),
        _ => None,
    }
}

/// Parses `input` as the tool's input type and runs it; input that does
/// not parse is answered with [`codes::INVALID_INPUT`].
pub fn invoke<Args, F: ToolFn<Args>>(
    tool: &F,
    context: &CallContext,
    input: &str,
) -> Result<String, ToolError> {
    let input: F::Input = serde_json::from_str(input)
        .map_err(|e| ToolError::invalid_input(format!("the input does not fit the schema: {e}")))?;
    tool.call(input, context)
}

/// The bindings' view of a [`ToolPlugin`] (for the macro).
#[doc(hidden)]
pub struct ToolExport<T>(PhantomData<T>);

impl<T: ToolPlugin> Guest for ToolExport<T> {
    fn describe() -> Vec<ToolSpec> {
        T::describe()
    }

    fn invoke(context: CallContext, name: String, input: String) -> Result<String, WitToolError> {
        T::invoke(context, name, input).map_err(|e| WitToolError {
            code: e.code,
            message: e.message,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use serde_json::json;

    use super::*;

    /// Adds two numbers.
    #[derive(Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    struct Sum {
        /// The first.
        a: f64,
        b: f64,
    }

    fn sum(input: Sum) -> ToolResult<f64> {
        Ok(input.a + input.b)
    }

    fn step(_input: Sum, context: &CallContext) -> ToolResult {
        Ok(json!({ "step": context.step }))
    }

    fn context() -> CallContext {
        CallContext {
            task_id: "t".into(),
            step: 3,
            idempotency_key: "k".into(),
        }
    }

    #[test]
    fn the_spec_takes_its_schema_and_description_from_the_input_type() {
        let spec = describe("sum", None, &sum);
        assert_eq!(spec.name, "sum");
        assert_eq!(spec.description, "Adds two numbers.");
        let schema: Value = serde_json::from_str(&spec.input_schema).unwrap();
        assert_eq!(schema["type"], "object");
        assert_eq!(schema["required"], json!(["a", "b"]));
        assert_eq!(schema["properties"]["a"]["description"], "The first.");
        assert_eq!(schema["additionalProperties"], false);
        for gone in ["$schema", "title", "description"] {
            assert!(schema.get(gone).is_none(), "{gone} in {schema}");
        }
        assert_eq!(describe("sum", Some("Given"), &sum).description, "Given");
    }

    #[test]
    fn runs_typed_functions_with_or_without_the_context() {
        assert_eq!(
            invoke(&sum, &context(), r#"{"a": 1, "b": 2.5}"#).unwrap(),
            "3.5"
        );
        assert_eq!(
            invoke(&step, &context(), r#"{"a": 1, "b": 2}"#).unwrap(),
            r#"{"step":3}"#
        );
    }

    #[test]
    fn input_that_does_not_parse_is_invalid_input() {
        for input in [
            "not json",
            "[]",
            "{}",
            r#"{"a": "1", "b": 2}"#,
            r#"{"a":1,"b":2,"c":3}"#,
        ] {
            let error = invoke(&sum, &context(), input).unwrap_err();
            assert_eq!(error.code, codes::INVALID_INPUT, "{input}");
        }
    }

    #[test]
    fn question_mark_on_any_error_is_tool_failed() {
        fn parse(text: &str) -> ToolResult<u8> {
            Ok(text.parse::<u8>()?)
        }
        let error = parse("300").unwrap_err();
        assert_eq!(error.code, codes::TOOL_FAILED);
        assert_eq!(error.message, "number too large to fit in target type");
        assert_eq!(
            error.to_string(),
            "tool_failed: number too large to fit in target type"
        );
    }

    #[test]
    fn unknown_tools_are_named_with_what_is_offered() {
        let error = ToolError::unknown_tool("x", &["sum", "step"]);
        assert_eq!(error.code, "unknown_tool");
        assert_eq!(
            error.message,
            "this component has no tool named 'x'; it offers sum, step"
        );
    }
}
