//! The OpenAI-compatible adapter, for local servers that speak Chat
//! Completions (Ollama, vLLM, llama.cpp, LM Studio): POSTs to
//! `{OPENAI_COMPATIBLE_BASE_URL}/chat/completions` (default Ollama's
//! `http://127.0.0.1:11434/v1`), with the request's model, else
//! `OPENAI_COMPATIBLE_MODEL`, else `llama3.2`. A key is optional: the host
//! adds one when `OPENAI_COMPATIBLE_API_KEY` is set.

use llm_http::openai::ChatCompletions;
use llm_http::{
    CallContext, ChatRequest, ChatResponse, Guest, LlmError, Provider, base_url, env_or,
};

const PROVIDER: Provider = Provider {
    name: "the OpenAI-compatible server",
    key_env: "OPENAI_COMPATIBLE_API_KEY",
};

fn wire() -> ChatCompletions {
    ChatCompletions {
        provider: PROVIDER,
        base_url: base_url("OPENAI_COMPATIBLE_BASE_URL", "http://127.0.0.1:11434/v1"),
        default_model: env_or("OPENAI_COMPATIBLE_MODEL", "llama3.2"),
        extra_headers: Vec::new(),
        max_tokens_field: "max_tokens",
    }
}

/// The exported `chat` implementation.
pub struct OpenAiCompatible;

impl Guest for OpenAiCompatible {
    fn complete(_context: CallContext, request: ChatRequest) -> Result<ChatResponse, LlmError> {
        llm_http::driver::run(&wire(), &request)
    }
}

// Exported only in the component: see the scripted adapter for why.
#[cfg(target_arch = "wasm32")]
llm_http::bindings::export_adapter!(OpenAiCompatible);

#[cfg(test)]
mod tests {
    use llm_http::wire::Wire;

    use super::*;

    #[test]
    fn defaults_to_a_local_ollama() {
        // The test process does not set these variables.
        let wire = wire();
        assert_eq!(
            wire.url("llama3.2", true),
            "http://127.0.0.1:11434/v1/chat/completions"
        );
        assert_eq!(
            wire.model(&llm_http::fixtures::weather_request()),
            "llama3.2"
        );
    }
}
