//! The OpenAI-format adapter: one component for every service that speaks
//! OpenAI's wire formats, configured by the manifest it is installed with.
//! The examples install it three times, under three names, each with its
//! own manifest (`openai.toml`, `openrouter.toml` and
//! `openai-compatible.toml` beside this crate): OpenAI itself, OpenRouter,
//! and local servers such as Ollama, vLLM, llama.cpp and LM Studio. The host
//! sends each request to the manifest's base URL and adds its credential.
//!
//! Two APIs under the base URL:
//! - Chat Completions (`/chat/completions`), the default, which every
//!   OpenAI-compatible server speaks.
//! - The Responses API (`/responses`), OpenAI's default since the
//!   Assistants API shut down: reasoning models keep their reasoning across
//!   tool calls there (its items go back unchanged).
//!
//! The `api` setting chooses one, and a task's `options.llm.api` overrides
//! it for that task. The API a request went to travels in its reply
//! context, so its answer is read as that API's.
//!
//! Its `[adapter.settings]`, all optional:
//!
//! | setting | default | what it does |
//! |---|---|---|
//! | `provider` | `"OpenAI"` | the name messages use ("OpenRouter rejected ...") |
//! | `default_model` | `"gpt-4o-mini"` | the model when the request names none |
//! | `api` | `"chat_completions"` | or `"responses"` |
//! | `max_tokens_field` | `"max_completion_tokens"` | or `"max_tokens"`, for servers that know only that |
//! | `top_k` | `false` | whether `top_k` may be sent (a common extension OpenAI refuses) |
//! | `headers` | none | more headers for every request, such as OpenRouter's attribution |

use opspawn_plugin::llm_http::openai::ChatCompletions;
use opspawn_plugin::llm_http::options::{Ranges, options_error};
use opspawn_plugin::llm_http::responses::Responses;
use opspawn_plugin::llm_http::settings::one_of;
use opspawn_plugin::llm_http::wire::{Adapter, PROVIDER_SETTING, ReplyContext, Wire};
use opspawn_plugin::llm_http::{
    ChatRequest, ChatResponse, LlmError, Provider, Settings, SseEvent, StreamPart, model_or,
};
use serde_json::Value;

/// The name messages use when the manifest gives none.
const OPENAI: Provider = Provider::named("OpenAI");
const DEFAULT_MODEL: &str = "gpt-4o-mini";

/// The APIs the adapter speaks, as the `api` setting and option name them.
const CHAT_COMPLETIONS: &str = "chat_completions";
const RESPONSES: &str = "responses";
const APIS: &[&str] = &[CHAT_COMPLETIONS, RESPONSES];

/// The field Chat Completions takes the output cap in: OpenAI's newer
/// models refuse `max_tokens`; many compatible servers know only it.
const MAX_TOKENS_FIELDS: &[&str] = &["max_completion_tokens", "max_tokens"];

/// OpenAI's two wire formats, one of them in use.
#[derive(Debug, Clone)]
pub struct OpenAiWire {
    provider: Provider,
    /// `CHAT_COMPLETIONS` or `RESPONSES`.
    api: &'static str,
    chat_completions: ChatCompletions,
    responses: Responses,
}

impl OpenAiWire {
    /// The wire of the API in use, for a request.
    fn chosen(&self) -> &dyn Wire {
        match self.api {
            RESPONSES => &self.responses,
            _ => &self.chat_completions,
        }
    }

    /// The wire of the API the request whose answer `context` is about went
    /// to. A context without an API is Chat Completions', the only API there
    /// was before.
    fn answering(&self, context: &ReplyContext) -> &dyn Wire {
        match context.api.as_deref() {
            Some(RESPONSES) => &self.responses,
            _ => &self.chat_completions,
        }
    }
}

impl Wire for OpenAiWire {
    fn provider(&self) -> Provider {
        self.provider.clone()
    }

    fn model(&self, request: &ChatRequest) -> String {
        model_or(request, &self.chat_completions.default_model)
    }

    fn ranges(&self) -> Ranges {
        self.chat_completions.ranges.clone()
    }

    fn path(&self, model: &str, stream: bool) -> String {
        self.chosen().path(model, stream)
    }

    fn headers(&self, stream: bool) -> Vec<(String, String)> {
        self.chosen().headers(stream)
    }

    fn body(&self, request: &ChatRequest, model: &str, stream: bool) -> Result<Value, LlmError> {
        self.chosen().body(request, model, stream)
    }

    fn parse(&self, body: &[u8], context: &ReplyContext) -> Result<ChatResponse, LlmError> {
        self.answering(context).parse(body, context)
    }

    fn decode(
        &self,
        event: &SseEvent,
        context: &ReplyContext,
        parts: &mut Vec<StreamPart>,
    ) -> Result<(), LlmError> {
        self.answering(context).decode(event, context, parts)
    }

    fn for_api(&self, api: &str) -> Result<Self, LlmError> {
        let api = APIS.iter().find(|known| **known == api).ok_or_else(|| {
            options_error(format!(
                "api must be {} for {}, not {api:?}",
                one_of(APIS),
                self.provider.name
            ))
        })?;
        Ok(Self {
            api,
            ..self.clone()
        })
    }

    fn api(&self) -> Option<&'static str> {
        Some(self.api)
    }
}

/// The exported `translate` implementation.
pub struct OpenAiFormat;

impl Adapter for OpenAiFormat {
    type Wire = OpenAiWire;
    const PROVIDER: Provider = OPENAI;

    fn wire(settings: &Settings) -> Result<OpenAiWire, LlmError> {
        let provider = match settings.text(&OPENAI, PROVIDER_SETTING)? {
            Some(name) if !name.is_empty() => Provider { name: name.into() },
            _ => OPENAI,
        };
        let default_model = settings.text_or(&provider, "default_model", DEFAULT_MODEL)?;
        let extra_headers = settings.headers(&provider, "headers")?;
        let ranges = if settings.flag(&provider, "top_k", false)? {
            Ranges::openai_compatible()
        } else {
            Ranges::openai(&provider)
        };
        Ok(OpenAiWire {
            api: settings.choice(&provider, "api", APIS, CHAT_COMPLETIONS)?,
            chat_completions: ChatCompletions {
                provider: provider.clone(),
                default_model: default_model.clone(),
                extra_headers: extra_headers.clone(),
                max_tokens_field: settings.choice(
                    &provider,
                    "max_tokens_field",
                    MAX_TOKENS_FIELDS,
                    MAX_TOKENS_FIELDS[0],
                )?,
                ranges: ranges.clone(),
            },
            responses: Responses {
                provider: provider.clone(),
                default_model,
                extra_headers,
                ranges,
            },
            provider,
        })
    }
}

// Exported only in the component (the macro sees to it).
opspawn_plugin::register_llm_adapter!(OpenAiFormat);

#[cfg(test)]
mod tests {
    use opspawn_plugin::llm::LlmAdapter;
    use opspawn_plugin::llm_http::fixtures::weather_request;
    use opspawn_plugin::llm_http::{
        CallContext, Exchange, FinishReason, HttpResponse, LlmErrorKind, Prepared,
    };
    use serde_json::json;

    use super::*;

    fn settings(text: &str) -> Settings {
        Settings::parse(&OPENAI, text).unwrap()
    }

    /// The `[adapter.settings]` of a shipped manifest (`openrouter.toml`
    /// beside this crate), as JSON text, which is how the host hands them over.
    fn shipped(name: &str) -> String {
        let path = format!("{}/{name}.toml", env!("CARGO_MANIFEST_DIR"));
        let manifest: toml::Table = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {path}: {e}"))
            .parse()
            .unwrap_or_else(|e| panic!("parsing {path}: {e}"));
        serde_json::to_string(&manifest["adapter"]["settings"]).unwrap()
    }

    fn prepare_for(configuration: &str, options: &str) -> Result<Prepared, LlmError> {
        let mut request = weather_request();
        request.provider_options = options.into();
        OpenAiFormat::prepare(call_context(), request, shipped(configuration))
    }

    /// The answer to a request prepared for `configuration`, read by another
    /// instance, which is handed nothing but the reply context.
    fn answer(configuration: &str, status: u16, body: &str) -> Result<ChatResponse, LlmError> {
        let prepared = prepare_for(configuration, "").unwrap();
        let answer = HttpResponse {
            status,
            headers: Vec::new(),
            body: body.as_bytes().to_vec(),
        };
        OpenAiFormat::read_response(prepared.reply_context, answer)
    }

    #[test]
    fn each_shipped_configuration_shapes_its_requests() {
        // configuration, model, output cap field, top_k taken, headers.
        let openrouter_headers = [
            ("HTTP-Referer", "https://github.com/opspawn/opspawn"),
            ("X-Title", "Opspawn"),
        ];
        for (configuration, model, cap, top_k, headers) in [
            (
                "openai",
                "gpt-4o-mini",
                "max_completion_tokens",
                false,
                &[][..],
            ),
            (
                "openrouter",
                "openrouter/auto",
                "max_tokens",
                true,
                &openrouter_headers[..],
            ),
            ("openai-compatible", "llama3.2", "max_tokens", true, &[][..]),
        ] {
            let prepared = prepare_for(configuration, "").unwrap();
            let Exchange::Http(http) = &prepared.exchange else {
                panic!("an HTTP exchange");
            };
            assert_eq!(http.path, "/chat/completions", "{configuration}");
            for (name, value) in headers {
                assert!(
                    http.headers.contains(&((*name).into(), (*value).into())),
                    "{configuration}: {name}: {:?}",
                    http.headers
                );
            }
            assert_eq!(http.headers.len(), 2 + headers.len(), "{configuration}");
            let (_, body) = path_and_body(&prepared);
            assert_eq!(body["model"], model, "{configuration}");
            assert_eq!(body[cap], 256, "{configuration}: {body}");
            let other_cap = MAX_TOKENS_FIELDS
                .iter()
                .find(|field| **field != cap)
                .unwrap();
            assert!(body.get(other_cap).is_none(), "{configuration}: {body}");

            let with_top_k = prepare_for(configuration, r#"{"top_k": 40}"#);
            if top_k {
                assert_eq!(path_and_body(&with_top_k.unwrap()).1["top_k"], 40);
            } else {
                let error = with_top_k.unwrap_err();
                assert_eq!(error.kind, LlmErrorKind::InvalidRequest);
                assert!(
                    error.message.contains("OpenAI has no top_k"),
                    "{}",
                    error.message
                );
            }
        }
    }

    /// Errors go by the configuration's name, also when read by an instance
    /// that was handed only the reply context.
    #[test]
    fn errors_go_by_the_configured_name() {
        for (configuration, name) in [
            ("openai", "OpenAI"),
            ("openrouter", "OpenRouter"),
            ("openai-compatible", "the OpenAI-compatible server"),
        ] {
            let error =
                answer(configuration, 401, r#"{"error": {"message": "bad key"}}"#).unwrap_err();
            assert_eq!(error.kind, LlmErrorKind::Auth);
            assert_eq!(
                error.message,
                format!("{name} rejected the request as unauthorized (401)")
            );
            let error = answer(configuration, 200, "not JSON").unwrap_err();
            assert_eq!(error.kind, LlmErrorKind::BadResponse);
            assert!(error.message.starts_with(name), "{}", error.message);
        }
    }

    #[test]
    fn openrouter_out_of_credits_is_an_invalid_request() {
        let body = r#"{"error":{"code":402,"message":"Insufficient credits. Add more using https://openrouter.ai/credits","metadata":{}}}"#;
        for error in [
            answer("openrouter", 402, body).unwrap_err(),
            answer("openrouter", 200, body).unwrap_err(),
        ] {
            assert_eq!(error.kind, LlmErrorKind::InvalidRequest);
            assert_eq!(error.status, Some(402));
            assert!(error.message.contains("OpenRouter"), "{}", error.message);
            assert!(error.message.contains("credits"), "{}", error.message);
            assert!(error.body.unwrap().contains("Insufficient credits"));
        }
    }

    #[test]
    fn openrouter_errors_in_a_success_body_map_by_code() {
        for (code, kind) in [
            (401, LlmErrorKind::Auth),
            (429, LlmErrorKind::RateLimited),
            (502, LlmErrorKind::Unavailable),
            (503, LlmErrorKind::Unavailable),
        ] {
            let body = format!(
                r#"{{"error":{{"code":{code},"message":"m","metadata":{{"provider_name":"Anthropic","raw":"x"}}}}}}"#
            );
            let error = answer("openrouter", 200, &body).unwrap_err();
            assert_eq!(error.kind, kind, "{code}");
        }
    }

    #[test]
    fn settings_replace_the_name_model_headers_and_cap() {
        let settings = r#"{"provider": "Acme", "default_model": "acme-1",
            "max_tokens_field": "max_tokens", "headers": {"X-Team": "agents", "X-Off": ""}}"#;
        let wire = OpenAiFormat::wire(&self::settings(settings)).unwrap();
        assert_eq!(wire.provider().name, "Acme");
        assert_eq!(wire.model(&weather_request()), "acme-1");
        let headers = wire.headers(false);
        assert!(
            headers.contains(&("X-Team".into(), "agents".into())),
            "{headers:?}"
        );
        assert!(
            !headers.iter().any(|(name, _)| name == "X-Off"),
            "{headers:?}"
        );
        let body = wire.body(&weather_request(), "acme-1", false).unwrap();
        assert_eq!(body["max_tokens"], 256);
        // The Responses API sends the same headers.
        let responses = wire.for_api(RESPONSES).unwrap();
        assert_eq!(responses.headers(false), headers);

        let error = OpenAiFormat::wire(&self::settings(
            r#"{"provider": "Acme", "max_tokens_field": "n"}"#,
        ))
        .unwrap_err();
        assert_eq!(error.kind, LlmErrorKind::Other, "the operator's to fix");
        assert!(
            error.message.contains(
                "the Acme adapter's [adapter.settings] in its manifest are invalid: \
                 max_tokens_field must be \"max_completion_tokens\" or \"max_tokens\""
            ),
            "{}",
            error.message
        );
    }

    fn call_context() -> CallContext {
        CallContext {
            task_id: "t".into(),
            step: 1,
            idempotency_key: "t-1".into(),
        }
    }

    /// `prepare` as the host calls it: the request with `options` as its
    /// provider options, and the manifest's settings.
    fn prepare(options: &str, settings: &str) -> Result<Prepared, LlmError> {
        let mut request = weather_request();
        request.provider_options = options.into();
        OpenAiFormat::prepare(call_context(), request, settings.into())
    }

    fn path_and_body(prepared: &Prepared) -> (String, Value) {
        let Exchange::Http(http) = &prepared.exchange else {
            panic!("an HTTP exchange");
        };
        (
            http.path.clone(),
            serde_json::from_slice(&http.body).unwrap(),
        )
    }

    #[test]
    fn defaults_to_gpt_4o_mini_and_takes_the_model_from_settings() {
        let wire = OpenAiFormat::wire(&settings("{}")).unwrap();
        assert_eq!(wire.path("gpt-4o-mini", true), "/chat/completions");
        assert_eq!(wire.model(&weather_request()), "gpt-4o-mini");
        let wire = OpenAiFormat::wire(&settings(r#"{"default_model": "gpt-4.1"}"#)).unwrap();
        assert_eq!(wire.model(&weather_request()), "gpt-4.1");
        assert_eq!(
            wire.body(&weather_request(), "m", true).unwrap()["max_completion_tokens"],
            256
        );
    }

    #[test]
    fn the_setting_chooses_the_api_and_the_task_overrides_it() {
        for (options, settings, path) in [
            ("", "{}", "/chat/completions"),
            ("", r#"{"api": "chat_completions"}"#, "/chat/completions"),
            ("", r#"{"api": "responses"}"#, "/responses"),
            (r#"{"api": "responses"}"#, "{}", "/responses"),
            (
                r#"{"api": "chat_completions"}"#,
                r#"{"api": "responses"}"#,
                "/chat/completions",
            ),
        ] {
            let prepared = prepare(options, settings).unwrap();
            let (sent_to, body) = path_and_body(&prepared);
            assert_eq!(sent_to, path, "options {options}, settings {settings}");
            assert!(body.get("api").is_none(), "the option is not sent: {body}");
            let responses = path == "/responses";
            assert_eq!(body.get("input").is_some(), responses, "{body}");
            assert_eq!(body.get("messages").is_some(), !responses, "{body}");
            let context = ReplyContext::decode(&OPENAI, &prepared.reply_context).unwrap();
            assert_eq!(
                context.api.as_deref(),
                Some(if responses {
                    RESPONSES
                } else {
                    CHAT_COMPLETIONS
                })
            );
        }
    }

    #[test]
    fn an_unknown_api_is_refused_naming_the_ones_there_are() {
        let error = prepare(r#"{"api": "assistants"}"#, "{}").unwrap_err();
        assert_eq!(error.kind, LlmErrorKind::InvalidRequest);
        assert_eq!(
            error.message,
            "invalid LLM options: api must be \"chat_completions\" or \"responses\" for OpenAI, \
             not \"assistants\""
        );
        let error = prepare("", r#"{"api": "assistants"}"#).unwrap_err();
        assert_eq!(error.kind, LlmErrorKind::Other, "the operator's to fix");
        assert!(
            error.message.contains(
                "[adapter.settings] in its manifest are invalid: api must be \
                 \"chat_completions\" or \"responses\""
            ),
            "{}",
            error.message
        );
    }

    #[test]
    fn an_answer_is_read_as_the_api_that_was_asked() {
        let completion = r#"{"model": "m", "choices": [{"index": 0, "finish_reason": "stop",
            "message": {"role": "assistant", "content": "From Chat Completions."}}]}"#;
        let response = r#"{"model": "m", "status": "completed", "output": [{"type": "message",
            "id": "msg_1", "role": "assistant",
            "content": [{"type": "output_text", "text": "From Responses."}]}]}"#;
        for (options, body, text) in [
            ("", completion, "From Chat Completions."),
            (r#"{"api": "responses"}"#, response, "From Responses."),
        ] {
            let prepared = prepare(options, "{}").unwrap();
            let answer = HttpResponse {
                status: 200,
                headers: Vec::new(),
                body: body.as_bytes().to_vec(),
            };
            // Read by another instance, configured with nothing.
            let reply =
                OpenAiFormat::read_response(prepared.reply_context.clone(), answer).unwrap();
            assert_eq!(reply.message.content, text);
            assert_eq!(reply.finish_reason, FinishReason::Stop);
        }

        let prepared = prepare(r#"{"api": "responses"}"#, "{}").unwrap();
        let events = vec![SseEvent {
            event: Some("response.output_text.delta".into()),
            data: json!({"type": "response.output_text.delta", "output_index": 0,
                         "content_index": 0, "item_id": "msg_1", "delta": "Hi"})
            .to_string(),
        }];
        let parts = OpenAiFormat::read_stream(prepared.reply_context, events).unwrap();
        assert_eq!(parts, [StreamPart::Text("Hi".into())]);
    }
}
