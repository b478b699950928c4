//! The OpenAI adapter: Chat Completions at `{OPENAI_BASE_URL}/chat/completions`
//! (default `https://api.openai.com/v1`), model `gpt-4o-mini` unless the
//! request names one. The host adds the `authorization` header.

use llm_http::openai::ChatCompletions;
use llm_http::{CallContext, ChatRequest, ChatResponse, Guest, LlmError, Provider, base_url};

const PROVIDER: Provider = Provider {
    name: "OpenAI",
    key_env: "OPENAI_API_KEY",
};

fn wire() -> ChatCompletions {
    ChatCompletions {
        provider: PROVIDER,
        base_url: base_url("OPENAI_BASE_URL", "https://api.openai.com/v1"),
        default_model: "gpt-4o-mini".into(),
        extra_headers: Vec::new(),
        max_tokens_field: "max_completion_tokens",
    }
}

/// The exported `chat` implementation.
pub struct OpenAi;

impl Guest for OpenAi {
    fn complete(_context: CallContext, request: ChatRequest) -> Result<ChatResponse, LlmError> {
        llm_http::driver::run(&wire(), &request)
    }
}

// Exported only in the component: see the scripted adapter for why.
#[cfg(target_arch = "wasm32")]
llm_http::bindings::export_adapter!(OpenAi);

#[cfg(test)]
mod tests {
    use llm_http::wire::Wire;

    use super::*;

    #[test]
    fn defaults_to_the_public_api() {
        let wire = wire();
        assert_eq!(
            wire.url("gpt-4o-mini", true),
            "https://api.openai.com/v1/chat/completions"
        );
        assert_eq!(
            wire.model(&llm_http::fixtures::weather_request()),
            "gpt-4o-mini"
        );
    }
}
