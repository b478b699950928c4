//! The OpenAI adapter: Chat Completions at `/chat/completions` under the
//! base URL of its manifest (`https://api.openai.com/v1` unless the operator
//! sets `OPENAI_BASE_URL`), model `gpt-4o-mini` unless the request or the
//! `default_model` setting names another. The host adds the
//! `authorization` header.

use opspawn_plugin::llm_http::openai::ChatCompletions;
use opspawn_plugin::llm_http::options::Ranges;
use opspawn_plugin::llm_http::wire::Adapter;
use opspawn_plugin::llm_http::{LlmError, Provider, Settings};

const PROVIDER: Provider = Provider {
    name: "OpenAI",
    key_env: "OPENAI_API_KEY",
};
const DEFAULT_MODEL: &str = "gpt-4o-mini";

/// The exported `translate` implementation.
pub struct OpenAi;

impl Adapter for OpenAi {
    type Wire = ChatCompletions;
    const PROVIDER: Provider = PROVIDER;

    fn wire(settings: &Settings) -> Result<ChatCompletions, LlmError> {
        Ok(ChatCompletions {
            provider: PROVIDER,
            default_model: settings.text_or(&PROVIDER, "default_model", DEFAULT_MODEL)?,
            extra_headers: Vec::new(),
            max_tokens_field: "max_completion_tokens",
            ranges: Ranges::openai(&PROVIDER),
        })
    }
}

// Exported only in the component (the macro sees to it).
opspawn_plugin::register_llm_adapter!(OpenAi);

#[cfg(test)]
mod tests {
    use opspawn_plugin::llm_http::fixtures::weather_request;
    use opspawn_plugin::llm_http::wire::Wire;

    use super::*;

    fn settings(text: &str) -> Settings {
        Settings::parse(&PROVIDER, text).unwrap()
    }

    #[test]
    fn defaults_to_gpt_4o_mini_and_takes_the_model_from_settings() {
        let wire = OpenAi::wire(&settings("{}")).unwrap();
        assert_eq!(wire.path("gpt-4o-mini", true), "/chat/completions");
        assert_eq!(wire.model(&weather_request()), "gpt-4o-mini");
        let wire = OpenAi::wire(&settings(r#"{"default_model": "gpt-4.1"}"#)).unwrap();
        assert_eq!(wire.model(&weather_request()), "gpt-4.1");
        assert_eq!(
            wire.body(&weather_request(), "m", true).unwrap()["max_completion_tokens"],
            256
        );
    }
}
