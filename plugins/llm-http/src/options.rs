//! `chat-request.provider-options`: a JSON object whose `stream` turns
//! streaming off or on, and whose other keys go into the provider's request
//! body as they are (`top_p`, say).

use serde_json::{Map, Value};

use crate::{LlmError, Provider};

/// Keys the adapters read themselves rather than pass on: `stream`, and the
/// scripted adapter's `script` and `script_file`, which a task may leave in
/// when it switches adapters.
const RESERVED: &[&str] = &["stream", "script", "script_file"];

#[derive(Debug, Clone, PartialEq)]
pub struct ProviderOptions {
    pub stream: bool,
    /// Merged into the request body, over what the adapter built.
    pub extra: Map<String, Value>,
}

impl ProviderOptions {
    pub fn parse(provider: &Provider, text: &str) -> Result<Self, LlmError> {
        let invalid = |why: String| provider.invalid_request(format!("provider options: {why}"));
        let mut extra = match text.trim() {
            "" | "null" => Map::new(),
            text => match serde_json::from_str(text) {
                Ok(Value::Object(object)) => object,
                Ok(_) => return Err(invalid("expected a JSON object".into())),
                Err(error) => return Err(invalid(error.to_string())),
            },
        };
        let stream = match extra.get("stream") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(stream)) => *stream,
            Some(other) => {
                return Err(invalid(format!(
                    "stream must be true or false, not {other}"
                )));
            }
        };
        extra.retain(|key, _| !RESERVED.contains(&key.as_str()));
        Ok(Self { stream, extra })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const P: Provider = Provider {
        name: "P",
        key_env: "P_KEY",
    };

    #[test]
    fn streaming_is_on_by_default() {
        for text in ["", "null", "{}", r#"{"stream": null}"#] {
            let options = ProviderOptions::parse(&P, text).unwrap();
            assert!(options.stream, "{text}");
            assert!(options.extra.is_empty());
        }
    }

    #[test]
    fn other_keys_pass_through() {
        let options = ProviderOptions::parse(
            &P,
            r#"{"stream": false, "script": [], "script_file": "s.json", "top_p": 0.5}"#,
        )
        .unwrap();
        assert!(!options.stream);
        assert_eq!(Value::Object(options.extra), json!({"top_p": 0.5}));
    }

    #[test]
    fn malformed_options_are_invalid_requests() {
        for text in ["[1]", "{", r#"{"stream": "no"}"#] {
            let error = ProviderOptions::parse(&P, text).unwrap_err();
            assert_eq!(error.kind, crate::LlmErrorKind::InvalidRequest, "{text}");
        }
    }
}
