//! One LLM call through a translating (WIT 0.2) adapter.
//!
//! The adapter runs three times at most, each in a fresh instance held only
//! for the translation: `prepare` turns the neutral request into an HTTP
//! request; the host sends it (outbound policy, credentials, timeouts,
//! connection reuse); then `read-response` reads a whole answer, or
//! `read-stream` reads each batch of server-sent events as it arrives. While
//! the provider thinks, the call is a parked future: no thread, no instance.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http_body_util::BodyExt;
use hyper::Request;
use tokio::sync::mpsc;

use super::bindings::v0_2::llm_adapter::LlmAdapterPre;
use super::bindings::v0_2::translate as wit;
use super::convert::v0_2 as convert;
use super::host_http::{BodyReadError, PooledResponse, ResponseBody};
use super::manifest::InstanceReuse;
use super::registry::Plugin;
use super::state::{Budget, CallState};
use super::warm::WarmKey;
use super::{CallError, PluginRuntime, SlotKind, llm_timeout};
use crate::protocol::{
    CallContext, ChatMessage, ChatRequest, ChatResponse, FinishReason, LlmError, LlmErrorKind,
    ProviderDatum, Role, ToolCall, Usage,
};
use crate::sse::SseStream;
use crate::telemetry::TraceSpan;

/// How long making a connection to a provider may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stream may go quiet before the call is abandoned.
const STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The most of a provider's answer the host reads; replies are far smaller.
const MAX_RESPONSE_BYTES: usize = 16 << 20;
/// What an adapter without an `[adapter]` section is given as settings.
const NO_SETTINGS: &str = "{}";
/// The most server-sent events handed to the adapter in one batch.
const MAX_EVENTS_PER_BATCH: usize = 256;

pub(super) struct TranslatedCall<'a> {
    pub runtime: &'a PluginRuntime,
    pub plugin: &'a Arc<Plugin>,
    pub pre: &'a LlmAdapterPre<CallState>,
    /// Where its instances wait between translations, when the adapter's
    /// manifest asks for reuse.
    pub warm: Option<(WarmKey, InstanceReuse)>,
    /// Whose task the call is for (see [`CallContext::tenant`]).
    pub tenant: Option<&'a str>,
    pub deltas: Option<&'a mpsc::UnboundedSender<String>>,
    /// When the whole call, retries included, must be over.
    pub deadline: Instant,
    /// The span its translations' spans go under (the step's).
    pub trace: &'a TraceSpan,
    /// How many deltas, and bytes of them, the call may still stream.
    pub delta_budget: std::sync::Mutex<Budget>,
}

impl TranslatedCall<'_> {
    pub async fn run(
        &self,
        context: &CallContext,
        request: &ChatRequest,
    ) -> Result<ChatResponse, CallError> {
        let result =
            match tokio::time::timeout_at(self.deadline.into(), self.exchange(context, request))
                .await
            {
                Ok(result) => result,
                Err(_) => Err(llm_timeout(self.plugin)),
            };
        let budget = self.delta_budget.lock().expect("delta budget lock");
        if let Some(dropped) = budget.dropped("streamed deltas", "max_deltas", "max_output_bytes") {
            tracing::warn!(plugin = %self.plugin.info.name, "{dropped}");
        }
        result
    }

    async fn exchange(
        &self,
        context: &CallContext,
        request: &ChatRequest,
    ) -> Result<ChatResponse, CallError> {
        let prepared = self.prepare(context, request).await?;
        let http = match prepared.exchange {
            wit::Exchange::Local(local) => {
                // A stand-in for a provider's latency: waiting holds nothing.
                tokio::time::sleep(Duration::from_millis(local.delay_ms.into())).await;
                // A reply made whole streams nothing: its text is in the
                // step's end (see docs/architecture.md, "Events").
                return local
                    .reply
                    .map(convert::response_from_wit)
                    .map_err(|e| CallError::Llm(convert::llm_error_from_wit(e)));
            }
            wit::Exchange::Http(http) => http,
        };
        let reply_context = prepared.reply_context;
        let stream = http.stream;
        let sent = self.send(http).await?;
        let status = sent.response.status().as_u16();
        let is_event_stream = sent
            .response
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if stream && is_event_stream && (200..300).contains(&status) {
            return self.read_stream(&reply_context, request, sent).await;
        }
        let headers = header_pairs(sent.response.headers());
        let (body, complete) = read_whole(sent.response.into_body()).await;
        let body = body.map_err(|message| self.transport_error(message))?;
        if complete && let Some(connection) = sent.connection {
            self.runtime.http.put_back(connection);
        }
        let answer = wit::HttpResponse {
            status,
            headers,
            body: body.to_vec(),
        };
        let response = self
            .translate(async |store, instance| {
                let translate = instance.opspawn_plugin_translate();
                translate
                    .call_read_response(store, &reply_context, &answer)
                    .await
            })
            .await?;
        let response = response.map(convert::response_from_wit).map_err(|e| {
            CallError::Llm(self.with_key_hint(with_status(convert::llm_error_from_wit(e), status)))
        })?;
        self.emit(&response.message.content);
        Ok(response)
    }

    async fn prepare(
        &self,
        context: &CallContext,
        request: &ChatRequest,
    ) -> Result<wit::Prepared, CallError> {
        let context = convert::context_to_wit(context);
        let request = convert::request_to_wit(request);
        let settings = self
            .plugin
            .info
            .grants
            .adapter
            .as_ref()
            .map_or(NO_SETTINGS, |endpoint| &endpoint.settings_json)
            .to_owned();
        self.translate(async |store, instance| {
            let translate = instance.opspawn_plugin_translate();
            translate
                .call_prepare(store, &context, &request, &settings)
                .await
        })
        .await?
        .map_err(|e| {
            let error = convert::llm_error_from_wit(e);
            // Refused before anything was sent: the request, not the
            // provider, is at fault, and trying again cannot help.
            if error.kind == LlmErrorKind::InvalidRequest && error.status.is_none() {
                CallError::LlmOptions(error)
            } else {
                CallError::Llm(error)
            }
        })
    }

    /// Runs one translation, in a warm instance when the adapter asks for
    /// reuse and one waits, else in a fresh one.
    async fn translate<T>(
        &self,
        call: impl AsyncFnOnce(
            &mut wasmtime::Store<CallState>,
            &super::bindings::v0_2::llm_adapter::LlmAdapter,
        ) -> wasmtime::Result<T>,
    ) -> Result<T, CallError> {
        // Boxed, as are the connection's making and the name's checking
        // (see `ConnectionPool::send`): a call's future is kept for as long
        // as the provider thinks, and these, large and done by then, would
        // otherwise size it.
        Box::pin(self.runtime.call_reusing(
            self.plugin,
            SlotKind::Compute,
            self.tenant,
            self.warm.clone(),
            None,
            crate::memory::MemoryHandle::default(),
            self.trace,
            async |store| self.pre.instantiate_async(store).await,
            call,
        ))
        .await
    }

    /// Sends the adapter's request to its configured endpoint.
    async fn send(&self, http: wit::HttpRequest) -> Result<PooledResponse, CallError> {
        let name = &self.plugin.info.name;
        let misconfigured = |detail: String| CallError::AdapterConfig {
            plugin: name.clone(),
            detail,
        };
        let endpoint = self.plugin.info.grants.adapter.as_ref().ok_or_else(|| {
            misconfigured(
                "it asked to send an HTTP request, but its manifest names no [adapter] base_url"
                    .into(),
            )
        })?;
        if let Some(credential) = &endpoint.credential
            && !endpoint.credential_optional
            && let Some(unset) = credential
                .variables
                .iter()
                .find(|name| !std::env::var(name).is_ok_and(|v| !v.trim().is_empty()))
        {
            return Err(CallError::Llm(LlmError {
                kind: LlmErrorKind::Auth,
                message: format!(
                    "no key for LLM adapter {name}: set {unset} in the server's environment \
                     (it fills the {} header for {})",
                    credential.header, endpoint.base_url
                ),
                status: None,
                body: None,
                retry_after_ms: None,
            }));
        }
        if !(http.path.starts_with('/') || http.path.starts_with('?')) || http.path.contains("://")
        {
            return Err(misconfigured(format!(
                "its request path {:?} must be relative to the base URL, starting with '/'",
                http.path
            )));
        }
        let url = format!("{}{}", endpoint.base_url, http.path);
        let mut builder = Request::builder().method(http.method.as_str()).uri(&url);
        for (header, value) in &http.headers {
            // The host owns these: framing, the destination, credentials.
            let lower = header.to_ascii_lowercase();
            if matches!(
                lower.as_str(),
                "host" | "content-length" | "transfer-encoding" | "connection"
            ) {
                continue;
            }
            builder = builder.header(header.as_str(), value.as_str());
        }
        let request = builder
            .body(Bytes::from(http.body))
            .map_err(|e| misconfigured(format!("it prepared an invalid request: {e}")))?;
        self.runtime
            .http
            .send(
                &endpoint.policy,
                &endpoint.transport,
                request,
                CONNECT_TIMEOUT,
            )
            .await
            .map_err(|e| match e {
                // The endpoint's host is always granted, so a denial is the
                // one rule past the grant: the server's own address. It is
                // permanent: fix the base URL or the policy.
                wasmtime_wasi_http::Error::HttpRequestDenied => misconfigured(format!(
                    "its base URL {} is this server's own address: adapters may not send \
                     requests to the API that runs them unless the operator's [policy] sets \
                     allow_own_server = true",
                    endpoint.base_url
                )),
                // A certificate no trusted authority signed stays so: the
                // fix is the adapter's ca_file, not another try.
                wasmtime_wasi_http::Error::Tls(error)
                    if error.to_string().contains("UnknownIssuer") =>
                {
                    misconfigured(format!(
                        "the TLS handshake with {} failed: {error}; no trusted authority signed \
                         its certificate (if a private one did, name its certificate in the \
                         manifest's [adapter] ca_file)",
                        endpoint.base_url
                    ))
                }
                e => self.transport_error(describe_http_error(&e, &endpoint.base_url)),
            })
    }

    async fn read_stream(
        &self,
        reply_context: &str,
        request: &ChatRequest,
        sent: PooledResponse,
    ) -> Result<ChatResponse, CallError> {
        let mut assembly = Assembly::default();
        let body = capped(sent.response.into_body().into_data_stream());
        let mut events = SseStream::new(Box::pin(body));
        let mut finished = false;
        let mut ended = false;
        while !finished {
            let first = match tokio::time::timeout(STREAM_IDLE_TIMEOUT, events.next()).await {
                Err(_) => {
                    return Err(self.timeout_error(format!(
                        "the provider's stream went quiet for {}s",
                        STREAM_IDLE_TIMEOUT.as_secs()
                    )));
                }
                Ok(None) => {
                    ended = true;
                    break;
                }
                Ok(Some(event)) => event,
            };
            // What else arrives within a short window goes in the same batch,
            // so a stream costs one instance per batch, not one per event,
            // for at most that much delay to its text. One timer a batch.
            let window = tokio::time::sleep(self.runtime.options.stream_batch_window);
            let mut window = std::pin::pin!(window);
            let mut batch = Vec::new();
            let mut next = Some(first);
            while let Some(event) = next.take() {
                let event = event.map_err(|e| self.transport_error(format!("{e}")))?;
                batch.push(wit::SseEvent {
                    event: event.event.filter(|e| e != "message"),
                    data: event.data,
                });
                if batch.len() < MAX_EVENTS_PER_BATCH {
                    next = tokio::select! {
                        biased;
                        event = events.next() => event,
                        () = &mut window => None,
                    };
                }
            }
            let parts = self
                .translate(async |store, instance| {
                    let translate = instance.opspawn_plugin_translate();
                    translate
                        .call_read_stream(store, reply_context, &batch)
                        .await
                })
                .await?
                .map_err(|e| CallError::Llm(convert::llm_error_from_wit(e)))?;
            for part in parts {
                if let wit::StreamPart::Text(text) = &part {
                    self.emit(text);
                }
                finished |= assembly.add(part);
            }
            let size = assembly.size();
            if size as u64 > self.plugin.info.limits.max_output_bytes {
                return Err(CallError::OutputTooLarge {
                    plugin: self.plugin.info.name.clone(),
                    size: size as u64,
                    limit: self.plugin.info.limits.max_output_bytes,
                });
            }
        }
        if finished {
            // Providers end the body right after their last event; a
            // connection whose body ended is worth keeping.
            let drain = async { while events.next().await.is_some() {} };
            ended = tokio::time::timeout(Duration::from_millis(100), drain)
                .await
                .is_ok();
        }
        if ended && let Some(connection) = sent.connection {
            self.runtime.http.put_back(connection);
        }
        Ok(assembly.into_response(request.model.as_deref().unwrap_or_default()))
    }

    fn emit(&self, text: &str) {
        if let Some(deltas) = self.deltas
            && !text.is_empty()
            && self
                .delta_budget
                .lock()
                .expect("delta budget lock")
                .admit(text.len())
        {
            let _ = deltas.send(text.to_owned());
        }
    }

    /// A provider that refused the key (`auth`, with a status): the message
    /// says where the key comes from, as the manifest has it.
    fn with_key_hint(&self, mut error: LlmError) -> LlmError {
        if error.kind == LlmErrorKind::Auth
            && error.status.is_some()
            && let Some(endpoint) = &self.plugin.info.grants.adapter
        {
            error.message = format!("{}: {}", error.message, endpoint.key_hint());
        }
        error
    }

    fn transport_error(&self, message: String) -> CallError {
        CallError::Llm(LlmError {
            kind: LlmErrorKind::Unavailable,
            message,
            status: None,
            body: None,
            retry_after_ms: None,
        })
    }

    fn timeout_error(&self, message: String) -> CallError {
        CallError::Llm(LlmError {
            kind: LlmErrorKind::Timeout,
            message,
            status: None,
            body: None,
            retry_after_ms: None,
        })
    }
}

/// The error's status, when the adapter did not say.
fn with_status(mut error: LlmError, status: u16) -> LlmError {
    if !(200..300).contains(&status) {
        error.status.get_or_insert(status);
    }
    error
}

fn header_pairs(headers: &hyper::HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .filter_map(|(name, value)| {
            Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
        })
        .collect()
}

/// Reads a whole body, up to [`MAX_RESPONSE_BYTES`], giving up after the
/// stream idles. Returns whether the body was read to its end.
async fn read_whole(body: ResponseBody) -> (Result<Bytes, String>, bool) {
    let mut stream = capped(body.into_data_stream());
    let mut collected = bytes::BytesMut::new();
    loop {
        match tokio::time::timeout(STREAM_IDLE_TIMEOUT, stream.next()).await {
            Err(_) => {
                return (
                    Err(format!(
                        "the provider stopped sending its answer for {}s",
                        STREAM_IDLE_TIMEOUT.as_secs()
                    )),
                    false,
                );
            }
            Ok(None) => return (Ok(collected.freeze()), true),
            Ok(Some(Err(error))) => return (Err(error.to_string()), false),
            Ok(Some(Ok(chunk))) => collected.extend_from_slice(&chunk),
        }
    }
}

/// An error for a body longer than [`MAX_RESPONSE_BYTES`].
#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("the provider's answer is larger than {} MiB", MAX_RESPONSE_BYTES >> 20)]
    TooLarge,
    #[error("reading the provider's answer failed: {0}")]
    Read(#[from] BodyReadError),
}

/// Ends a body stream with an error once it passes [`MAX_RESPONSE_BYTES`].
fn capped(
    stream: impl Stream<Item = Result<Bytes, BodyReadError>>,
) -> impl Stream<Item = Result<Bytes, BodyError>> {
    stream.scan((0usize, false), |(total, over), chunk| {
        let item = if *over {
            None
        } else {
            Some(match chunk {
                Ok(chunk) => {
                    *total += chunk.len();
                    if *total > MAX_RESPONSE_BYTES {
                        *over = true;
                        Err(BodyError::TooLarge)
                    } else {
                        Ok(chunk)
                    }
                }
                Err(error) => Err(error.into()),
            })
        };
        std::future::ready(item)
    })
}

fn describe_http_error(error: &wasmtime_wasi_http::Error, base_url: &str) -> String {
    use wasmtime_wasi_http::Error as E;
    match error {
        E::HttpRequestDenied => format!(
            "the request to {base_url} was refused by the outbound policy (its host is not granted)"
        ),
        E::DestinationIpProhibited => format!(
            "{base_url} resolves to an address that is not public; grant it literally to allow it"
        ),
        E::DnsError { .. } | E::DestinationNotFound => {
            format!("the host name of {base_url} did not resolve")
        }
        E::ConnectionRefused => format!("{base_url} refused the connection"),
        E::ConnectionTimeout => format!("connecting to {base_url} timed out"),
        E::Tls(error) => format!("the TLS handshake with {base_url} failed: {error}"),
        other => format!("the request to {base_url} failed: {other}"),
    }
}

/// A streamed reply being put together from the adapter's parts.
#[derive(Default)]
struct Assembly {
    content: String,
    /// Tool calls by the index the adapter gave them, in first-seen order.
    calls: Vec<(u32, PartialCall)>,
    provider_data: Vec<ProviderDatum>,
    input_tokens: Option<u32>,
    output_tokens: Option<u32>,
    finish_reason: Option<FinishReason>,
    model: Option<String>,
}

#[derive(Default)]
struct PartialCall {
    id: Option<String>,
    name: Option<String>,
    arguments: String,
}

impl Assembly {
    /// Adds one part; returns whether the stream is complete.
    fn add(&mut self, part: wit::StreamPart) -> bool {
        match part {
            wit::StreamPart::Text(text) => self.content.push_str(&text),
            wit::StreamPart::ToolCall(piece) => {
                let position = self
                    .calls
                    .iter()
                    .rposition(|(index, _)| *index == piece.index)
                    // A new name at a named index is a new call.
                    .filter(|&at| piece.name.is_none() || self.calls[at].1.name.is_none());
                let call = match position {
                    Some(position) => &mut self.calls[position].1,
                    None => {
                        self.calls.push((piece.index, PartialCall::default()));
                        &mut self.calls.last_mut().expect("just pushed").1
                    }
                };
                if piece.id.is_some() {
                    call.id = piece.id;
                }
                if piece.name.is_some() {
                    call.name = piece.name;
                }
                call.arguments.push_str(&piece.arguments);
            }
            wit::StreamPart::ProviderData((key, value)) => {
                match self.provider_data.iter_mut().find(|d| d.key == key) {
                    Some(datum) => datum.value.push_str(&value),
                    None => self.provider_data.push(ProviderDatum { key, value }),
                }
            }
            wit::StreamPart::Usage(usage) => {
                self.input_tokens = usage.input_tokens.or(self.input_tokens);
                self.output_tokens = usage.output_tokens.or(self.output_tokens);
            }
            wit::StreamPart::Finish(reason) => {
                self.finish_reason = Some(convert::finish_reason_from_wit(reason));
            }
            wit::StreamPart::Model(model) => self.model = Some(model),
            wit::StreamPart::Done => return true,
        }
        false
    }

    /// Bytes of text and tool-call arguments so far.
    fn size(&self) -> usize {
        self.content.len()
            + self
                .calls
                .iter()
                .map(|(_, call)| call.arguments.len())
                .sum::<usize>()
    }

    fn into_response(self, requested_model: &str) -> ChatResponse {
        let tool_calls: Vec<ToolCall> = self
            .calls
            .into_iter()
            .map(|(index, call)| ToolCall {
                id: call.id.unwrap_or_else(|| format!("call-{index}")),
                name: call.name.unwrap_or_default(),
                arguments: if call.arguments.trim().is_empty() {
                    serde_json::json!({})
                } else {
                    super::convert::lenient_json(&call.arguments)
                },
            })
            .collect();
        let mut finish_reason = self.finish_reason.unwrap_or(FinishReason::Other);
        // Some providers say "stop" when they stop to call tools.
        if finish_reason == FinishReason::Stop && !tool_calls.is_empty() {
            finish_reason = FinishReason::ToolCalls;
        }
        let usage = (self.input_tokens.is_some() || self.output_tokens.is_some()).then(|| Usage {
            input_tokens: self.input_tokens.unwrap_or_default().into(),
            output_tokens: self.output_tokens.unwrap_or_default().into(),
        });
        ChatResponse {
            message: ChatMessage {
                role: Role::Assistant,
                content: self.content,
                images: Vec::new(),
                tool_calls,
                tool_call_id: None,
                provider_data: self.provider_data,
            },
            finish_reason,
            usage,
            model: self.model.unwrap_or_else(|| requested_model.to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call_part(index: u32, id: Option<&str>, name: Option<&str>, args: &str) -> wit::StreamPart {
        wit::StreamPart::ToolCall(wit::ToolCallPart {
            index,
            id: id.map(Into::into),
            name: name.map(Into::into),
            arguments: args.into(),
        })
    }

    #[test]
    fn parts_assemble_into_one_reply() {
        let mut assembly = Assembly::default();
        let parts = [
            wit::StreamPart::Model("gpt-x".into()),
            wit::StreamPart::Text("Let me ".into()),
            wit::StreamPart::Text("check.".into()),
            call_part(1, Some("call_b"), Some("weather"), "{\"city\":"),
            call_part(0, Some("call_a"), Some("calculator"), ""),
            call_part(1, None, None, "\"Paris\"}"),
            call_part(0, None, None, "{\"expression\":\"1+1\"}"),
            wit::StreamPart::ProviderData(("sig".into(), "ab".into())),
            wit::StreamPart::ProviderData(("sig".into(), "cd".into())),
            wit::StreamPart::Usage(wit::UsagePart {
                input_tokens: Some(10),
                output_tokens: None,
            }),
            wit::StreamPart::Usage(wit::UsagePart {
                input_tokens: None,
                output_tokens: Some(5),
            }),
            wit::StreamPart::Finish(super::super::bindings::v0_2::types::FinishReason::Stop),
        ];
        for part in parts {
            assert!(!assembly.add(part));
        }
        assert!(assembly.add(wit::StreamPart::Done));
        let response = assembly.into_response("asked");
        assert_eq!(response.model, "gpt-x");
        assert_eq!(response.message.content, "Let me check.");
        let calls: Vec<_> = response
            .message
            .tool_calls
            .iter()
            .map(|c| (c.id.as_str(), c.name.as_str(), c.arguments.to_string()))
            .collect();
        assert_eq!(
            calls,
            [
                ("call_b", "weather", r#"{"city":"Paris"}"#.to_owned()),
                ("call_a", "calculator", r#"{"expression":"1+1"}"#.to_owned()),
            ]
        );
        assert_eq!(
            response.message.provider_data,
            [ProviderDatum {
                key: "sig".into(),
                value: "abcd".into()
            }]
        );
        assert_eq!(
            response.usage,
            Some(Usage {
                input_tokens: 10,
                output_tokens: 5
            })
        );
        // "stop" with tool calls means the model stopped to call them.
        assert_eq!(response.finish_reason, FinishReason::ToolCalls);
    }

    #[test]
    fn a_second_named_call_at_the_same_index_is_a_new_call() {
        let mut assembly = Assembly::default();
        assembly.add(call_part(0, None, Some("a"), "{}"));
        assembly.add(call_part(0, None, Some("b"), "{\"x\":1}"));
        let response = assembly.into_response("m");
        let names: Vec<_> = response
            .message
            .tool_calls
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(names, ["a", "b"]);
    }

    #[test]
    fn a_bare_stream_still_makes_a_reply() {
        let mut assembly = Assembly::default();
        assembly.add(call_part(3, None, Some("t"), " "));
        let response = assembly.into_response("asked");
        assert_eq!(response.model, "asked");
        assert_eq!(response.finish_reason, FinishReason::Other);
        assert_eq!(response.message.tool_calls[0].id, "call-3");
        assert_eq!(
            response.message.tool_calls[0].arguments,
            serde_json::json!({})
        );
        assert_eq!(response.usage, None);
    }
}
