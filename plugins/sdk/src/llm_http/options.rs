//! `chat-request.provider-options`: a JSON object whose `stream` turns
//! streaming off or on, whose sampling keys (`temperature`, `top_p`,
//! `top_k`, `max_tokens`) are read like the request's own fields and
//! checked against the provider's ranges, whose `tool_choice` (`"auto"`,
//! `"none"`, `"required"` or `{"name": "<tool>"}`) and `parallel_tool_calls`
//! are read like the request's own fields, whose `api` chooses among the
//! APIs an adapter speaks (OpenAI's `"chat_completions"` or `"responses"`),
//! and whose other keys go into the provider's request body as they are
//! (`seed`, say).

use serde_json::{Map, Value};

use crate::llm_http::{ChatRequest, LlmError, Provider, ToolChoice};

/// Keys the adapters read themselves rather than pass on: `stream`, and the
/// scripted adapter's `script` and `script_file`, which a task may leave in
/// when it switches adapters.
const RESERVED: &[&str] = &["stream", "script", "script_file"];

#[derive(Debug, Clone, PartialEq)]
pub struct ProviderOptions {
    pub stream: bool,
    /// `temperature`, `top_p` and `max_tokens` from the options: they win
    /// over the request's own.
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub max_tokens: Option<u64>,
    /// `top_k`, which the neutral request has no field for.
    pub top_k: Option<u64>,
    /// `tool_choice` and `parallel_tool_calls`: they win over the request's.
    pub tool_choice: Option<ToolChoice>,
    pub parallel_tool_calls: Option<bool>,
    /// `api`: which of the adapter's APIs to speak, for an adapter that
    /// speaks several (see [`Wire::for_api`](crate::llm_http::wire::Wire::for_api)).
    pub api: Option<String>,
    /// Merged into the request body, over what the adapter built.
    pub extra: Map<String, Value>,
}

impl ProviderOptions {
    pub fn parse(provider: &Provider, text: &str) -> Result<Self, LlmError> {
        let invalid =
            |why: String| options_error(format!("{} provider options: {why}", provider.name));
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
        let tool_choice = match extra.remove("tool_choice") {
            None | Some(Value::Null) => None,
            Some(Value::String(choice)) if choice == "auto" => Some(ToolChoice::Auto),
            Some(Value::String(choice)) if choice == "none" => Some(ToolChoice::None),
            Some(Value::String(choice)) if choice == "required" => Some(ToolChoice::Required),
            Some(Value::Object(named)) if named.len() == 1 && named.contains_key("name") => {
                match &named["name"] {
                    Value::String(name) if !name.is_empty() => {
                        Some(ToolChoice::Named(name.clone()))
                    }
                    other => {
                        return Err(options_error(format!("tool_choice names no tool: {other}")));
                    }
                }
            }
            Some(other) => {
                return Err(options_error(format!(
                    "tool_choice must be \"auto\", \"none\", \"required\" or \
                     {{\"name\": \"<tool>\"}}, not {other}"
                )));
            }
        };
        let parallel_tool_calls = match extra.remove("parallel_tool_calls") {
            None | Some(Value::Null) => None,
            Some(Value::Bool(parallel)) => Some(parallel),
            Some(other) => {
                return Err(options_error(format!(
                    "parallel_tool_calls must be true or false, not {other}"
                )));
            }
        };
        let api = match extra.remove("api") {
            None | Some(Value::Null) => None,
            Some(Value::String(api)) if !api.trim().is_empty() => Some(api.trim().to_owned()),
            Some(other) => {
                return Err(options_error(format!(
                    "api must name one of the adapter's APIs, not {other}"
                )));
            }
        };
        let mut number = |key: &str| match extra.remove(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(number)) => Ok(Some(number)),
            Some(other) => Err(options_error(format!(
                "{key} must be a number, not {other}"
            ))),
        };
        let float = |number: Option<serde_json::Number>| number.and_then(|n| n.as_f64());
        let whole = |key: &str, number: Option<serde_json::Number>| match number {
            None => Ok(None),
            Some(number) => number.as_u64().map(Some).ok_or_else(|| {
                options_error(format!(
                    "{key} must be a whole number of at least 0, not {number}"
                ))
            }),
        };
        let temperature = float(number("temperature")?);
        let top_p = float(number("top_p")?);
        let max_tokens = whole("max_tokens", number("max_tokens")?)?;
        let top_k = whole("top_k", number("top_k")?)?;
        Ok(Self {
            stream,
            temperature,
            top_p,
            max_tokens,
            top_k,
            tool_choice,
            parallel_tool_calls,
            api,
            extra,
        })
    }

    /// The sampling options in force: the options' own, else the request's.
    pub fn sampling(&self, request: &ChatRequest) -> Sampling {
        Sampling {
            temperature: self.temperature.or(request.temperature.map(f64::from)),
            top_p: self.top_p.or(request.top_p.map(f64::from)),
            top_k: self.top_k,
            max_tokens: self.max_tokens.or(request.max_tokens.map(u64::from)),
        }
    }
}

/// The sampling options of one request, wherever they were set.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sampling {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<u64>,
    pub max_tokens: Option<u64>,
}

/// What a provider accepts for one sampling option.
#[derive(Debug, Clone, PartialEq)]
pub enum Range {
    /// From the first to the second, both included.
    Between(f64, f64),
    /// Not accepted at all; the text says why and what to do.
    Refused(String),
}

/// What a provider accepts for each sampling option.
#[derive(Debug, Clone, PartialEq)]
pub struct Ranges {
    pub temperature: Range,
    pub top_p: Range,
    pub top_k: Range,
}

impl Ranges {
    /// Chat Completions as OpenAI documents it: no `top_k`.
    pub fn openai(provider: &Provider) -> Self {
        Self {
            temperature: Range::Between(0.0, 2.0),
            top_p: Range::Between(0.0, 1.0),
            top_k: Range::Refused(format!("{} has no top_k", provider.name)),
        }
    }

    /// Servers that speak Chat Completions with the common extension
    /// `top_k` (OpenRouter, Ollama, vLLM, llama.cpp).
    pub fn openai_compatible() -> Self {
        Self {
            temperature: Range::Between(0.0, 2.0),
            top_p: Range::Between(0.0, 1.0),
            top_k: Range::Between(0.0, f64::from(u32::MAX)),
        }
    }

    /// Checks `sampling` before anything is sent: an option out of range is
    /// an invalid request that names the provider's range.
    pub fn check(&self, provider: &Provider, sampling: &Sampling) -> Result<(), LlmError> {
        let options = [
            ("temperature", &self.temperature, sampling.temperature),
            ("top_p", &self.top_p, sampling.top_p),
            ("top_k", &self.top_k, sampling.top_k.map(|k| k as f64)),
        ];
        for (name, range, value) in options {
            let Some(value) = value else { continue };
            match range {
                Range::Refused(why) => {
                    return Err(options_error(format!("{name} is not accepted: {why}")));
                }
                Range::Between(low, high) if !(*low..=*high).contains(&value) => {
                    return Err(options_error(format!(
                        "{name} {value} is outside {}'s range, {low} to {high}",
                        provider.name
                    )));
                }
                Range::Between(..) => {}
            }
        }
        if sampling.max_tokens == Some(0) {
            return Err(options_error(format!(
                "max_tokens must be at least 1 for {}",
                provider.name
            )));
        }
        Ok(())
    }
}

/// Options the adapter refuses before sending anything. The host reports an
/// invalid request from `prepare` as `invalid_llm_options`.
pub fn options_error(why: String) -> LlmError {
    LlmError::new(
        crate::llm_http::LlmErrorKind::InvalidRequest,
        format!("invalid LLM options: {why}"),
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const P: Provider = Provider::named("P");

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
            r#"{"stream": false, "script": [], "script_file": "s.json", "seed": 5, "top_p": 0.5}"#,
        )
        .unwrap();
        assert!(!options.stream);
        assert_eq!(Value::Object(options.extra), json!({"seed": 5}));
        assert_eq!(options.top_p, Some(0.5));
    }

    #[test]
    fn tool_choice_and_parallel_calls_are_read() {
        for (text, expected) in [
            (r#"{"tool_choice": "auto"}"#, ToolChoice::Auto),
            (r#"{"tool_choice": "none"}"#, ToolChoice::None),
            (r#"{"tool_choice": "required"}"#, ToolChoice::Required),
            (
                r#"{"tool_choice": {"name": "calculator"}}"#,
                ToolChoice::Named("calculator".into()),
            ),
        ] {
            let options = ProviderOptions::parse(&P, text).unwrap();
            assert_eq!(options.tool_choice, Some(expected), "{text}");
            assert!(options.extra.is_empty(), "{text}");
        }
        let options = ProviderOptions::parse(&P, r#"{"parallel_tool_calls": false}"#).unwrap();
        assert_eq!(options.parallel_tool_calls, Some(false));
        for text in [
            r#"{"tool_choice": "any"}"#,
            r#"{"tool_choice": {"name": ""}}"#,
            r#"{"parallel_tool_calls": "no"}"#,
        ] {
            let error = ProviderOptions::parse(&P, text).unwrap_err();
            assert!(error.message.starts_with("invalid LLM options: "), "{text}");
        }
    }

    #[test]
    fn the_api_is_read_and_not_sent() {
        let options = ProviderOptions::parse(&P, r#"{"api": " responses ", "seed": 1}"#).unwrap();
        assert_eq!(options.api.as_deref(), Some("responses"));
        assert_eq!(Value::Object(options.extra), json!({"seed": 1}));
        assert_eq!(ProviderOptions::parse(&P, "{}").unwrap().api, None);
        for text in [
            r#"{"api": ""}"#,
            r#"{"api": 2}"#,
            r#"{"api": ["responses"]}"#,
        ] {
            let error = ProviderOptions::parse(&P, text).unwrap_err();
            assert!(
                error
                    .message
                    .starts_with("invalid LLM options: api must name"),
                "{text}: {}",
                error.message
            );
        }
    }

    #[test]
    fn malformed_options_are_invalid_requests() {
        for text in ["[1]", "{", r#"{"stream": "no"}"#] {
            let error = ProviderOptions::parse(&P, text).unwrap_err();
            assert_eq!(
                error.kind,
                crate::llm_http::LlmErrorKind::InvalidRequest,
                "{text}"
            );
        }
    }
}
