//! The OpenRouter adapter: Chat Completions at
//! `{OPENROUTER_BASE_URL}/chat/completions` (default
//! `https://openrouter.ai/api/v1`), model `openrouter/auto` unless the request
//! names one. The host adds the `authorization` header.
//!
//! OpenRouter reports some failures inside a 200 response, as
//! `{"error": {"code": 402, "message": ...}}` in the body or in a streamed
//! chunk; the shared Chat Completions reader maps those by their code.

use llm_http::openai::ChatCompletions;
use llm_http::{CallContext, ChatRequest, ChatResponse, Guest, LlmError, Provider, base_url};

const PROVIDER: Provider = Provider {
    name: "OpenRouter",
    key_env: "OPENROUTER_API_KEY",
};

fn wire() -> ChatCompletions {
    ChatCompletions {
        provider: PROVIDER,
        base_url: base_url("OPENROUTER_BASE_URL", "https://openrouter.ai/api/v1"),
        default_model: "openrouter/auto".into(),
        // Attribution OpenRouter asks apps to send.
        extra_headers: vec![
            (
                "HTTP-Referer".into(),
                "https://github.com/opspawn/opspawn".into(),
            ),
            ("X-Title".into(), "Opspawn".into()),
        ],
        max_tokens_field: "max_tokens",
    }
}

/// The exported `chat` implementation.
pub struct OpenRouter;

impl Guest for OpenRouter {
    fn complete(_context: CallContext, request: ChatRequest) -> Result<ChatResponse, LlmError> {
        llm_http::driver::run(&wire(), &request)
    }
}

// Exported only in the component: see the scripted adapter for why.
#[cfg(target_arch = "wasm32")]
llm_http::bindings::export_adapter!(OpenRouter);

#[cfg(test)]
mod tests {
    use llm_http::LlmErrorKind;
    use llm_http::http::Headers;
    use llm_http::wire::{ReplyContext, Wire};

    use super::*;

    fn context() -> ReplyContext {
        ReplyContext {
            model: "openrouter/auto".into(),
            first_call_number: 1,
        }
    }

    #[test]
    fn sends_attribution_headers_to_the_default_endpoint() {
        let wire = wire();
        assert_eq!(
            wire.url("openrouter/auto", true),
            "https://openrouter.ai/api/v1/chat/completions"
        );
        let headers = wire.headers(false);
        for (name, value) in [
            ("HTTP-Referer", "https://github.com/opspawn/opspawn"),
            ("X-Title", "Opspawn"),
            ("content-type", "application/json"),
        ] {
            assert!(
                headers.contains(&(name.into(), value.into())),
                "{name}: {headers:?}"
            );
        }
        let body = wire
            .body(
                &llm_http::fixtures::weather_request(),
                "openrouter/auto",
                false,
            )
            .unwrap();
        assert_eq!(body["model"], "openrouter/auto");
        assert_eq!(body["max_tokens"], 256);
    }

    #[test]
    fn out_of_credits_is_an_invalid_request() {
        let body = br#"{"error":{"code":402,"message":"Insufficient credits. Add more using https://openrouter.ai/credits","metadata":{}}}"#;
        for error in [
            wire().error(402, &Headers::default(), body),
            wire().parse(body, &context()).unwrap_err(),
        ] {
            assert_eq!(error.kind, LlmErrorKind::InvalidRequest);
            assert_eq!(error.status, Some(402));
            assert!(error.message.contains("credits"), "{}", error.message);
            assert!(error.body.unwrap().contains("Insufficient credits"));
        }
    }

    #[test]
    fn errors_in_the_body_map_by_code() {
        let body = |code: u16| {
            format!(
                r#"{{"error":{{"code":{code},"message":"m","metadata":{{"provider_name":"Anthropic","raw":"x"}}}}}}"#
            )
        };
        for (code, kind) in [
            (401, LlmErrorKind::Auth),
            (429, LlmErrorKind::RateLimited),
            (502, LlmErrorKind::Unavailable),
            (503, LlmErrorKind::Unavailable),
        ] {
            let error = wire().parse(body(code).as_bytes(), &context()).unwrap_err();
            assert_eq!(error.kind, kind, "{code}");
        }
        let auth = wire().error(401, &Headers::default(), body(401).as_bytes());
        assert!(auth.message.contains("OPENROUTER_API_KEY"));
    }
}
