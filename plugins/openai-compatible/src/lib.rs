//! The OpenAI-compatible adapter, for local servers that speak Chat
//! Completions (Ollama, vLLM, llama.cpp, LM Studio): requests go to
//! `/chat/completions` under the base URL of its manifest (Ollama's
//! `http://127.0.0.1:11434/v1` unless the operator sets
//! `OPENAI_COMPATIBLE_BASE_URL`), with the request's model, else the
//! `default_model` setting, else `llama3.2`. A key is optional: the host adds
//! one when `OPENAI_COMPATIBLE_API_KEY` is set.

use opspawn_plugin::llm_http::openai::ChatCompletions;
use opspawn_plugin::llm_http::options::Ranges;
use opspawn_plugin::llm_http::wire::Adapter;
use opspawn_plugin::llm_http::{LlmError, Provider, Settings};

const PROVIDER: Provider = Provider {
    name: "the OpenAI-compatible server",
    key_env: "OPENAI_COMPATIBLE_API_KEY",
};
const DEFAULT_MODEL: &str = "llama3.2";

/// The exported `translate` implementation.
pub struct OpenAiCompatible;

impl Adapter for OpenAiCompatible {
    type Wire = ChatCompletions;
    const PROVIDER: Provider = PROVIDER;

    fn wire(settings: &Settings) -> Result<ChatCompletions, LlmError> {
        Ok(ChatCompletions {
            provider: PROVIDER,
            default_model: settings.text_or(&PROVIDER, "default_model", DEFAULT_MODEL)?,
            extra_headers: Vec::new(),
            max_tokens_field: "max_tokens",
            ranges: Ranges::openai_compatible(),
        })
    }
}

// Exported only in the component (the macro sees to it).
opspawn_plugin::register_llm_adapter!(OpenAiCompatible);

#[cfg(test)]
mod tests {
    use opspawn_plugin::llm_http::fixtures::weather_request;
    use opspawn_plugin::llm_http::wire::Wire;

    use super::*;

    #[test]
    fn defaults_to_llama_and_takes_the_model_from_settings() {
        let wire = OpenAiCompatible::wire(&Settings::default()).unwrap();
        assert_eq!(wire.path("llama3.2", true), "/chat/completions");
        assert_eq!(wire.model(&weather_request()), "llama3.2");
        let settings = Settings::parse(&PROVIDER, r#"{"default_model": "qwen3:8b"}"#).unwrap();
        let wire = OpenAiCompatible::wire(&settings).unwrap();
        assert_eq!(wire.model(&weather_request()), "qwen3:8b");
        assert_eq!(
            wire.body(&weather_request(), "m", true).unwrap()["max_tokens"],
            256
        );
    }
}
