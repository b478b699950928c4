//! The OpenRouter adapter: Chat Completions at `/chat/completions` under the
//! base URL of its manifest (`https://openrouter.ai/api/v1` unless the
//! operator sets `OPENROUTER_BASE_URL`), model `openrouter/auto` unless the
//! request or the `default_model` setting names another. The host adds the
//! `authorization` header. The `referer` and `title` settings replace the
//! attribution headers OpenRouter asks apps to send (blank turns one off).
//!
//! OpenRouter reports some failures inside a 200 response, as
//! `{"error": {"code": 402, "message": ...}}` in the body or in a streamed
//! chunk; the shared Chat Completions reader maps those by their code.

use opspawn_plugin::llm_http::openai::ChatCompletions;
use opspawn_plugin::llm_http::options::Ranges;
use opspawn_plugin::llm_http::wire::Adapter;
use opspawn_plugin::llm_http::{LlmError, Provider, Settings};

const PROVIDER: Provider = Provider {
    name: "OpenRouter",
    key_env: "OPENROUTER_API_KEY",
};
const DEFAULT_MODEL: &str = "openrouter/auto";
const DEFAULT_REFERER: &str = "https://github.com/opspawn/opspawn";
const DEFAULT_TITLE: &str = "Opspawn";

/// The exported `translate` implementation.
pub struct OpenRouter;

impl Adapter for OpenRouter {
    type Wire = ChatCompletions;
    const PROVIDER: Provider = PROVIDER;

    fn wire(settings: &Settings) -> Result<ChatCompletions, LlmError> {
        let header = |key: &str, name: &str, default: &str| {
            let value = settings.text(&PROVIDER, key)?;
            let value = value.unwrap_or_else(|| default.to_owned());
            Ok::<_, LlmError>((!value.is_empty()).then(|| (name.to_owned(), value)))
        };
        let extra_headers = [
            header("referer", "HTTP-Referer", DEFAULT_REFERER)?,
            header("title", "X-Title", DEFAULT_TITLE)?,
        ];
        Ok(ChatCompletions {
            provider: PROVIDER,
            default_model: settings.text_or(&PROVIDER, "default_model", DEFAULT_MODEL)?,
            extra_headers: extra_headers.into_iter().flatten().collect(),
            max_tokens_field: "max_tokens",
            ranges: Ranges::openai_compatible(),
        })
    }
}

// Exported only in the component (the macro sees to it).
opspawn_plugin::register_llm_adapter!(OpenRouter);

#[cfg(test)]
mod tests {
    use opspawn_plugin::llm_http::LlmErrorKind;
    use opspawn_plugin::llm_http::headers::Headers;
    use opspawn_plugin::llm_http::wire::{ReplyContext, Wire};

    use super::*;

    fn wire() -> ChatCompletions {
        OpenRouter::wire(&Settings::default()).unwrap()
    }

    fn context() -> ReplyContext {
        ReplyContext {
            model: "openrouter/auto".into(),
            first_call_number: 1,
            api: None,
        }
    }

    #[test]
    fn sends_attribution_headers_to_the_default_endpoint() {
        let wire = wire();
        assert_eq!(wire.path("openrouter/auto", true), "/chat/completions");
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
                &opspawn_plugin::llm_http::fixtures::weather_request(),
                "openrouter/auto",
                false,
            )
            .unwrap();
        assert_eq!(body["model"], "openrouter/auto");
        assert_eq!(body["max_tokens"], 256);
    }

    #[test]
    fn settings_replace_the_model_and_attribution() {
        let settings = Settings::parse(
            &PROVIDER,
            r#"{"default_model": "anthropic/claude-sonnet-4.5", "referer": "https://example.com", "title": ""}"#,
        )
        .unwrap();
        let wire = OpenRouter::wire(&settings).unwrap();
        assert_eq!(
            wire.model(&opspawn_plugin::llm_http::fixtures::weather_request()),
            "anthropic/claude-sonnet-4.5"
        );
        let headers = wire.headers(true);
        assert!(headers.contains(&("HTTP-Referer".into(), "https://example.com".into())));
        assert!(
            !headers.iter().any(|(name, _)| name == "X-Title"),
            "{headers:?}"
        );
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
