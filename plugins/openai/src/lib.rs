//! The OpenAI adapter: two APIs under the base URL of its manifest
//! (`https://api.openai.com/v1` unless the operator sets `OPENAI_BASE_URL`),
//! model `gpt-4o-mini` unless the request or the `default_model` setting
//! names another. The host adds the `authorization` header.
//!
//! - Chat Completions (`/chat/completions`), the default, which every
//!   OpenAI-compatible server speaks too.
//! - The Responses API (`/responses`), OpenAI's default since the
//!   Assistants API shut down: reasoning models keep their reasoning across
//!   tool calls there (its items go back to OpenAI unchanged).
//!
//! The API is the `api` setting (`"chat_completions"` or `"responses"`),
//! and a task's `options.llm.api` overrides it for that task. One component
//! speaks both: they share the endpoint, the key, the models and the
//! sampling ranges, and an operator should not have to install, grant and
//! keep two adapters to switch a task from one to the other. The API a
//! request went to travels in its reply context, so its answer is read as
//! that API's.

use opspawn_plugin::llm_http::openai::ChatCompletions;
use opspawn_plugin::llm_http::options::{Ranges, options_error};
use opspawn_plugin::llm_http::responses::Responses;
use opspawn_plugin::llm_http::settings::one_of;
use opspawn_plugin::llm_http::wire::{Adapter, ReplyContext, Wire};
use opspawn_plugin::llm_http::{
    ChatRequest, ChatResponse, LlmError, Provider, Settings, SseEvent, StreamPart, model_or,
};
use serde_json::Value;

const PROVIDER: Provider = Provider {
    name: "OpenAI",
    key_env: "OPENAI_API_KEY",
};
const DEFAULT_MODEL: &str = "gpt-4o-mini";

/// The APIs the adapter speaks, as the `api` setting and option name them.
const CHAT_COMPLETIONS: &str = "chat_completions";
const RESPONSES: &str = "responses";
const APIS: &[&str] = &[CHAT_COMPLETIONS, RESPONSES];

/// OpenAI's two wire formats, one of them in use.
#[derive(Debug, Clone)]
pub struct OpenAiWire {
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
        PROVIDER
    }

    fn model(&self, request: &ChatRequest) -> String {
        model_or(request, &self.chat_completions.default_model)
    }

    fn ranges(&self) -> Ranges {
        Ranges::openai(&PROVIDER)
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
                PROVIDER.name
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
pub struct OpenAi;

impl Adapter for OpenAi {
    type Wire = OpenAiWire;
    const PROVIDER: Provider = PROVIDER;

    fn wire(settings: &Settings) -> Result<OpenAiWire, LlmError> {
        let default_model = settings.text_or(&PROVIDER, "default_model", DEFAULT_MODEL)?;
        Ok(OpenAiWire {
            api: settings.choice(&PROVIDER, "api", APIS, CHAT_COMPLETIONS)?,
            chat_completions: ChatCompletions {
                provider: PROVIDER,
                default_model: default_model.clone(),
                extra_headers: Vec::new(),
                max_tokens_field: "max_completion_tokens",
                ranges: Ranges::openai(&PROVIDER),
            },
            responses: Responses {
                provider: PROVIDER,
                default_model,
                extra_headers: Vec::new(),
                ranges: Ranges::openai(&PROVIDER),
            },
        })
    }
}

// Exported only in the component (the macro sees to it).
opspawn_plugin::register_llm_adapter!(OpenAi);

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
        Settings::parse(&PROVIDER, text).unwrap()
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
        OpenAi::prepare(call_context(), request, settings.into())
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
            let context = ReplyContext::decode(&PROVIDER, &prepared.reply_context).unwrap();
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
            let reply = OpenAi::read_response(prepared.reply_context.clone(), answer).unwrap();
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
        let parts = OpenAi::read_stream(prepared.reply_context, events).unwrap();
        assert_eq!(parts, [StreamPart::Text("Hi".into())]);
    }
}
