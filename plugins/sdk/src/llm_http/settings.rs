//! An adapter's configuration: the `[adapter.settings]` table of its
//! manifest, which the host hands to `prepare` as a JSON object. It may be
//! `{}` or empty text; keys an adapter does not know are ignored.

use serde_json::{Map, Value};

use crate::llm_http::{LlmError, LlmErrorKind, Provider};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings(Map<String, Value>);

impl Settings {
    pub fn parse(provider: &Provider, text: &str) -> Result<Self, LlmError> {
        match text.trim() {
            "" | "null" => Ok(Self::default()),
            text => match serde_json::from_str(text) {
                Ok(Value::Object(object)) => Ok(Self(object)),
                Ok(_) => Err(invalid(provider, "expected a table".into())),
                Err(error) => Err(invalid(provider, error.to_string())),
            },
        }
    }

    /// These settings with `key` set to `value`.
    pub fn with(mut self, key: &str, value: Value) -> Self {
        self.0.insert(key.to_owned(), value);
        self
    }

    /// The text under `key`, if set. Blank text counts as set: it lets an
    /// operator turn an optional header off.
    pub fn text(&self, provider: &Provider, key: &str) -> Result<Option<String>, LlmError> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(text)) => Ok(Some(text.trim().to_owned())),
            Some(other) => Err(invalid(
                provider,
                format!("{key} must be a string, not {other}"),
            )),
        }
    }

    /// The text under `key`, else `default` (also when it is blank).
    pub fn text_or(
        &self,
        provider: &Provider,
        key: &str,
        default: &str,
    ) -> Result<String, LlmError> {
        Ok(self
            .text(provider, key)?
            .filter(|text| !text.is_empty())
            .unwrap_or_else(|| default.to_owned()))
    }

    /// The text under `key`, which must be one of `allowed`; `default`
    /// when it is unset or blank.
    pub fn choice(
        &self,
        provider: &Provider,
        key: &str,
        allowed: &[&'static str],
        default: &'static str,
    ) -> Result<&'static str, LlmError> {
        let Some(text) = self.text(provider, key)?.filter(|text| !text.is_empty()) else {
            return Ok(default);
        };
        allowed
            .iter()
            .find(|choice| **choice == text)
            .copied()
            .ok_or_else(|| {
                invalid(
                    provider,
                    format!("{key} must be {}, not {text:?}", one_of(allowed)),
                )
            })
    }
}

impl Settings {
    /// The boolean under `key`, else `default`.
    pub fn flag(&self, provider: &Provider, key: &str, default: bool) -> Result<bool, LlmError> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(flag)) => Ok(*flag),
            Some(other) => Err(invalid(
                provider,
                format!("{key} must be true or false, not {other}"),
            )),
        }
    }

    /// The table of HTTP headers under `key` (name = value), in name order;
    /// one whose value is blank is left out. Names and values are checked
    /// here, so that a typo is reported as the manifest's, by name.
    pub fn headers(
        &self,
        provider: &Provider,
        key: &str,
    ) -> Result<Vec<(String, String)>, LlmError> {
        let table = match self.0.get(key) {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::Object(table)) => table,
            Some(other) => {
                return Err(invalid(
                    provider,
                    format!("{key} must be a table of header names and values, not {other}"),
                ));
            }
        };
        let mut headers = Vec::new();
        for (name, value) in table {
            let is_token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
            if name.is_empty() || !name.chars().all(is_token) {
                return Err(invalid(
                    provider,
                    format!("{key}: {name:?} is not an HTTP header name"),
                ));
            }
            let Value::String(value) = value else {
                return Err(invalid(
                    provider,
                    format!("{key}.{name} must be a string, not {value}"),
                ));
            };
            if value.chars().any(|c| c.is_control() && c != '\t') {
                return Err(invalid(
                    provider,
                    format!("{key}.{name} holds a control character"),
                ));
            }
            let value = value.trim();
            if !value.is_empty() {
                headers.push((name.clone(), value.to_owned()));
            }
        }
        Ok(headers)
    }
}

/// `"a"`, `"a" or "b"`, `"a", "b" or "c"`: the values a setting or an
/// option takes, for messages.
pub fn one_of(allowed: &[&str]) -> String {
    let quoted: Vec<String> = allowed.iter().map(|value| format!("{value:?}")).collect();
    match quoted.split_last() {
        None => String::new(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

/// Settings come from the operator, not the task: retrying cannot help, and
/// the message says where to look.
fn invalid(provider: &Provider, why: String) -> LlmError {
    LlmError::new(
        LlmErrorKind::Other,
        format!(
            "the {} adapter's [adapter.settings] in its manifest are invalid: {why}",
            provider.name
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Provider = Provider::named("P");

    #[test]
    fn empty_settings_mean_defaults() {
        for text in ["", "  ", "null", "{}"] {
            let settings = Settings::parse(&P, text).unwrap();
            assert_eq!(settings.text_or(&P, "default_model", "m").unwrap(), "m");
        }
    }

    #[test]
    fn set_values_win_and_blank_ones_are_kept_as_blank() {
        let settings = Settings::parse(
            &P,
            r#"{"default_model": " gpt-x ", "title": "", "other": 1}"#,
        )
        .unwrap();
        assert_eq!(settings.text_or(&P, "default_model", "m").unwrap(), "gpt-x");
        assert_eq!(settings.text(&P, "title").unwrap().as_deref(), Some(""));
        assert_eq!(settings.text_or(&P, "title", "t").unwrap(), "t");
        assert_eq!(settings.text(&P, "absent").unwrap(), None);
    }

    #[test]
    fn choices_are_checked_against_the_allowed_values() {
        const APIS: &[&str] = &["chat_completions", "responses"];
        let settings = Settings::parse(&P, r#"{"api": "responses", "blank": " "}"#).unwrap();
        assert_eq!(
            settings
                .choice(&P, "api", APIS, "chat_completions")
                .unwrap(),
            "responses"
        );
        assert_eq!(settings.choice(&P, "blank", APIS, "x").unwrap(), "x");
        assert_eq!(settings.choice(&P, "absent", APIS, "y").unwrap(), "y");
        let settings = Settings::parse(&P, r#"{"api": "assistants"}"#).unwrap();
        let error = settings
            .choice(&P, "api", APIS, "chat_completions")
            .unwrap_err();
        assert_eq!(error.kind, LlmErrorKind::Other);
        assert!(
            error.message.ends_with(
                "[adapter.settings] in its manifest are invalid: api must be \"chat_completions\" \
                 or \"responses\", not \"assistants\""
            ),
            "{}",
            error.message
        );
        assert_eq!(one_of(&["a", "b", "c"]), r#""a", "b" or "c""#);
        assert_eq!(one_of(&["a"]), r#""a""#);
    }

    #[test]
    fn flags_and_header_tables_are_read_and_checked() {
        let settings = Settings::parse(
            &P,
            r#"{"top_k": true, "headers": {"X-Title": "Opspawn", "HTTP-Referer": " https://e.com ", "Off": " "}}"#,
        )
        .unwrap();
        assert!(settings.flag(&P, "top_k", false).unwrap());
        assert!(!settings.flag(&P, "absent", false).unwrap());
        assert_eq!(
            settings.headers(&P, "headers").unwrap(),
            [
                ("HTTP-Referer".to_owned(), "https://e.com".to_owned()),
                ("X-Title".to_owned(), "Opspawn".to_owned()),
            ]
        );
        assert_eq!(settings.headers(&P, "absent").unwrap(), []);
        for (text, why) in [
            (r#"{"top_k": "yes"}"#, "top_k must be true or false"),
            (r#"{"headers": ["a"]}"#, "headers must be a table"),
            (
                r#"{"headers": {"Bad Name": "v"}}"#,
                "\"Bad Name\" is not an HTTP header name",
            ),
            (r#"{"headers": {"X-A": 1}}"#, "headers.X-A must be a string"),
            (
                r#"{"headers": {"X-A": "a\r\nb"}}"#,
                "headers.X-A holds a control character",
            ),
        ] {
            let settings = Settings::parse(&P, text).unwrap();
            let error = settings
                .flag(&P, "top_k", false)
                .and_then(|_| settings.headers(&P, "headers"))
                .unwrap_err();
            assert_eq!(error.kind, LlmErrorKind::Other, "{text}");
            assert!(error.message.contains(why), "{text}: {}", error.message);
        }
    }

    #[test]
    fn malformed_settings_name_the_manifest_table() {
        for text in ["[1]", "{", r#"{"default_model": 3}"#] {
            let error = Settings::parse(&P, text)
                .and_then(|settings| settings.text(&P, "default_model"))
                .unwrap_err();
            assert_eq!(error.kind, LlmErrorKind::Other, "{text}");
            assert!(
                error.message.contains("[adapter.settings]"),
                "{}",
                error.message
            );
        }
    }
}
