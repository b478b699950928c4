//! Loopback mocks of the LLM providers the adapters speak to, on their real
//! wire formats: OpenAI Chat Completions (and OpenRouter and any
//! OpenAI-compatible server, which speak the same dialect with their own
//! accents), OpenAI's Responses API, Anthropic Messages and Google Gemini
//! `generateContent`.
//!
//! One axum server on `127.0.0.1:0` serves all five, each under its own
//! path prefix ([`Provider::mount`]); point an adapter's base-URL variable at
//! [`MockProviders::base_url_for`]. Every endpoint checks requests the way
//! its provider does (path, method, key, content type, required fields,
//! conversation rules) and answers a rejected one in that provider's error
//! shape. Every request is recorded, accepted or not, for assertions.
//!
//! What a request's model name makes the mock do:
//!
//! | model | answer |
//! |---|---|
//! | `mock-react` | tool calls forbidden by the request's tool choice: the text [`NO_TOOLS_ANSWER`]; no tool result in the conversation yet: a native tool call to `calculator` with `{"expression": "6*7"}`; else the text `Final Answer: <the tool's result>` |
//! | `mock-parallel` | as `mock-react`, but its tool call comes twice in one reply when the request allows parallel calls |
//! | `mock-401` | 401 in the provider's error shape |
//! | `mock-429-once` | 429 with `Retry-After: 1` on its first call to this server, then as `mock-react` |
//! | `mock-500-once` | 500 on its first call to this server, then as `mock-react` |
//! | `mock-malformed` | 200 with a body (or stream) that is not JSON |
//! | `mock-long-answer` | the text `Final Answer: ` and [`LONG_ANSWER`], streamed (when asked) in many small deltas |
//! | `mock-off-schema` | as `mock-react`, but its structured answer breaks the schema (see below) |
//! | `mock-reasoning` | as `mock-react`; in OpenAI's Responses API each answer starts with a reasoning item that must come back (see `responses`) |
//! | `mock-vision` | offered a tool with `image` in its name and no tool result yet: a call to it with `{}`; else the text `Final Answer: ` and [`vision_answer`] of the images the request holds |
//! | anything else | 404, model not found |
//!
//! Structured output: when a request asks for JSON matching a schema
//! (OpenAI's `response_format`, Anthropic's `output_config.format`,
//! Gemini's `responseSchema`), each endpoint checks the shape as its
//! provider does, and the text answers of `mock-react` (and the models that
//! answer as it does) are JSON built from the schema: every property given,
//! strings and numbers filled with the tool's result. `mock-off-schema`
//! answers the same JSON with the schema's first required property of the
//! wrong type (a string for a number, a number for anything else), as a
//! model without constrained decoding might.
//!
//! Streamed answers are sent a few frames at a time with short pauses, and
//! two frames are cut in the middle (one of them inside a multi-byte UTF-8
//! character), as proxies and TCP may cut them: a client must reassemble.

mod anthropic;
mod gemini;

pub use anthropic::thinking_signature;
mod images;
mod openai;
mod openai_checks;
mod responses;
#[cfg(test)]
mod tests;

pub use responses::sealed_reasoning;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, Version, header};
use axum::response::Response;
use futures::StreamExt;
use serde_json::{Value, json};

use crate::tls::{self, TestAuthority};

/// The model names the mocks understand.
pub mod models {
    pub const REACT: &str = "mock-react";
    pub const UNAUTHORIZED: &str = "mock-401";
    pub const RATE_LIMITED_ONCE: &str = "mock-429-once";
    pub const SERVER_ERROR_ONCE: &str = "mock-500-once";
    pub const MALFORMED: &str = "mock-malformed";
    pub const PARALLEL: &str = "mock-parallel";
    pub const LONG_ANSWER: &str = "mock-long-answer";
    pub const OFF_SCHEMA: &str = "mock-off-schema";
    pub const REASONING: &str = "mock-reasoning";
    pub const VISION: &str = "mock-vision";
}

/// The answer of `mock-long-answer`: 6,000 characters, so about a thousand
/// deltas when streamed.
pub const LONG_ANSWER: &str = include_str!("long_answer.txt");

/// What `mock-react` answers when the request forbids tool calls.
pub const NO_TOOLS_ANSWER: &str = "Final Answer: told to call no tool, I cannot compute";

/// The tool `mock-react` calls, and with what.
pub const CALCULATOR: &str = "calculator";
pub const CALCULATOR_EXPRESSION: &str = "6*7";

/// One of the providers the adapters speak to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Provider {
    OpenAi,
    OpenRouter,
    OpenAiCompatible,
    Anthropic,
    Gemini,
}

impl Provider {
    pub const ALL: [Provider; 5] = [
        Provider::OpenAi,
        Provider::OpenRouter,
        Provider::OpenAiCompatible,
        Provider::Anthropic,
        Provider::Gemini,
    ];

    /// The adapter's plugin name, as a task's `llm` names it.
    pub fn plugin(self) -> &'static str {
        match self {
            Provider::OpenAi => "openai",
            Provider::OpenRouter => "openrouter",
            Provider::OpenAiCompatible => "openai-compatible",
            Provider::Anthropic => "anthropic",
            Provider::Gemini => "gemini",
        }
    }

    /// The compiled component's name (see [`crate::wasm`]): OpenAI,
    /// OpenRouter and OpenAI-compatible servers are one component, the
    /// OpenAI-format adapter, under three names.
    pub fn wasm(self) -> &'static str {
        match self {
            Provider::OpenAi | Provider::OpenRouter | Provider::OpenAiCompatible => "openai",
            other => other.plugin(),
        }
    }

    /// The manifest shipped for this adapter (`plugins/openai/openrouter.toml`).
    pub fn shipped_manifest(self) -> std::path::PathBuf {
        crate::plugin_sources()
            .join(self.wasm())
            .join(format!("{}.toml", self.plugin()))
    }

    /// The shipped manifest, parsed.
    fn shipped_table(self) -> toml::Table {
        let path = self.shipped_manifest();
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
            .parse()
            .unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
    }

    /// The variable the adapter reads its base URL from.
    pub fn base_url_var(self) -> &'static str {
        match self {
            Provider::OpenAi => "OPENAI_BASE_URL",
            Provider::OpenRouter => "OPENROUTER_BASE_URL",
            Provider::OpenAiCompatible => "OPENAI_COMPATIBLE_BASE_URL",
            Provider::Anthropic => "ANTHROPIC_BASE_URL",
            Provider::Gemini => "GEMINI_BASE_URL",
        }
    }

    /// The adapter's base URL when the variable is unset.
    pub fn default_base_url(self) -> &'static str {
        match self {
            Provider::OpenAi => "https://api.openai.com/v1",
            Provider::OpenRouter => "https://openrouter.ai/api/v1",
            Provider::OpenAiCompatible => "http://127.0.0.1:11434/v1",
            Provider::Anthropic => "https://api.anthropic.com",
            Provider::Gemini => "https://generativelanguage.googleapis.com",
        }
    }

    /// The variable the host reads the key from, for the credential header.
    pub fn key_var(self) -> &'static str {
        match self {
            Provider::OpenAi => "OPENAI_API_KEY",
            Provider::OpenRouter => "OPENROUTER_API_KEY",
            Provider::OpenAiCompatible => "OPENAI_COMPATIBLE_API_KEY",
            Provider::Anthropic => "ANTHROPIC_API_KEY",
            Provider::Gemini => "GEMINI_API_KEY",
        }
    }

    /// The key the mock expects: `test-key-<plugin>`.
    pub fn test_key(self) -> String {
        format!("test-key-{}", self.plugin())
    }

    /// The header the key travels in (lower case).
    pub fn auth_header(self) -> &'static str {
        match self {
            Provider::OpenAi | Provider::OpenRouter | Provider::OpenAiCompatible => "authorization",
            Provider::Anthropic => "x-api-key",
            Provider::Gemini => "x-goog-api-key",
        }
    }

    /// The auth header's value for `key`.
    pub fn auth_value(self, key: &str) -> String {
        match self {
            Provider::OpenAi | Provider::OpenRouter | Provider::OpenAiCompatible => {
                format!("Bearer {key}")
            }
            Provider::Anthropic | Provider::Gemini => key.to_owned(),
        }
    }

    /// Where this provider's API is mounted on the mock server; the base URL
    /// an adapter is given is the server's URL followed by this.
    pub fn mount(self) -> &'static str {
        match self {
            Provider::OpenAi => "/openai/v1",
            Provider::OpenRouter => "/openrouter/api/v1",
            Provider::OpenAiCompatible => "/openai-compatible/v1",
            Provider::Anthropic => "/anthropic",
            Provider::Gemini => "/gemini",
        }
    }

    /// A manifest in the shape the shipped ones have: the base URL from the
    /// adapter's variable (which the tests set to a mock), the key as a
    /// credential the host adds from the server's environment, and the
    /// shipped settings and warm instances (`[instances]`).
    pub fn manifest(self) -> String {
        self.manifest_with_setting(None)
    }

    /// [`Self::manifest`] for an adapter pointed at `mock`: trusting the
    /// authority of a mock that serves TLS.
    pub fn manifest_for(self, mock: &MockProviders) -> String {
        let manifest = self.manifest();
        match mock.ca_file() {
            Some(ca_file) => {
                let mut manifest: toml::Table = manifest.parse().expect("the manifest is TOML");
                manifest["adapter"]
                    .as_table_mut()
                    .expect("[adapter] is a table")
                    .insert("ca_file".into(), ca_file.display().to_string().into());
                toml::to_string(&manifest).expect("a table serializes")
            }
            None => manifest,
        }
    }

    /// [`Self::manifest`] with one setting replaced or added, such as
    /// `("api", "responses")`.
    pub fn manifest_with(self, key: &str, value: &str) -> String {
        self.manifest_with_setting(Some((key, value)))
    }

    fn manifest_with_setting(self, setting: Option<(&str, &str)>) -> String {
        let manifest = format!(
            r#"[adapter]
base_url = "${{{base_url_var}:-{default}}}"

[adapter.credential]
header = "{header}"
value = "{value}"
"#,
            base_url_var = self.base_url_var(),
            default = self.default_base_url(),
            header = self.auth_header(),
            value = self.auth_value(&format!("${{{}}}", self.key_var())),
        );
        let mut manifest: toml::Table = manifest.parse().expect("the manifest is TOML");
        // The shipped manifest's `[adapter.settings]`, which configure the
        // component for this provider.
        let shipped = self.shipped_table();
        let mut settings = match shipped
            .get("adapter")
            .and_then(|adapter| adapter.get("settings"))
        {
            Some(toml::Value::Table(settings)) => settings.clone(),
            _ => toml::Table::new(),
        };
        if let Some((key, value)) = setting {
            settings.insert(key.into(), value.into());
        }
        if !settings.is_empty() {
            manifest["adapter"]
                .as_table_mut()
                .expect("[adapter] is a table")
                .insert("settings".into(), toml::Value::Table(settings));
        }
        // Warm instances as shipped, so the tests run the adapter as it is
        // installed.
        if let Some(instances) = shipped.get("instances") {
            manifest.insert("instances".into(), instances.clone());
        }
        toml::to_string(&manifest).expect("a table serializes")
    }

    /// The 0.1.0 manifest shape, for adapters built against `wit/v0.1.0`
    /// that call their provider themselves: `outbound_host` granted, the
    /// base-URL variable readable, the key as a credential for that host.
    pub fn legacy_manifest(self, outbound_host: &str) -> String {
        format!(
            r#"[capabilities]
env = ["{base_url_var}"]
outbound_hosts = ["{outbound_host}"]

[[capabilities.credentials]]
host = "{outbound_host}"
header = "{header}"
value = "{value}"
"#,
            base_url_var = self.base_url_var(),
            header = self.auth_header(),
            value = self.auth_value(&format!("${{{}}}", self.key_var())),
        )
    }
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.plugin())
    }
}

/// One request the mock received, and how it answered.
#[derive(Debug, Clone)]
pub struct ProviderRequest {
    /// Whose prefix the path fell under; `None` for a path under none.
    pub provider: Option<Provider>,
    pub method: String,
    /// The full path, mount prefix included.
    pub path: String,
    pub query: Option<String>,
    /// Lower-case names; repeated headers joined with `, `.
    pub headers: BTreeMap<String, String>,
    /// The body as JSON, or `Null` when it is not JSON.
    pub body: Value,
    pub raw_body: String,
    /// The model asked for (from the body, or from the path for Gemini).
    pub model: Option<String>,
    /// Whether a streamed answer was asked for.
    pub stream: bool,
    /// Whether the conversation already held a tool result.
    pub has_tool_result: bool,
    /// The status the mock answered with.
    pub status: u16,
    /// Why the mock refused the request as the provider would, if it did
    /// (a bad path, key, header or body); `None` for accepted requests,
    /// including the ones a `mock-*` model fails on purpose.
    pub rejection: Option<String>,
    /// The HTTP version it came over.
    pub version: Version,
    pub at: Instant,
}

impl ProviderRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

/// The mock server. Dropping it stops it.
pub struct MockProviders {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
    /// For a server over TLS: the authority that signed its certificate.
    authority: Option<TestAuthority>,
    connections: Arc<AtomicUsize>,
}

impl MockProviders {
    /// Starts a server on an ephemeral loopback port, on the current tokio
    /// runtime, speaking HTTP/1.1 over cleartext (and HTTP/2 to a client
    /// that starts it by prior knowledge), as local inference servers do.
    pub async fn start() -> Self {
        Self::serve(None).await
    }

    /// Starts a server over TLS, as hosted providers are, with a certificate
    /// from an authority of its own ([`Self::ca_file`]). It offers HTTP/2
    /// and HTTP/1.1 by ALPN, or HTTP/1.1 alone unless `offer_http2`.
    pub async fn start_tls(offer_http2: bool) -> Self {
        let authority = TestAuthority::new();
        let alpn: &[&[u8]] = if offer_http2 {
            &[b"h2", b"http/1.1"]
        } else {
            &[b"http/1.1"]
        };
        let config = authority.server_config(alpn);
        Self::serve(Some((authority, config))).await
    }

    async fn serve(tls: Option<(TestAuthority, Arc<rustls::ServerConfig>)>) -> Self {
        let (listener, addr) = tls::loopback_listener().await;
        let shared = Arc::new(Shared::default());
        let router = Router::new().fallback(handle).with_state(shared.clone());
        let connections = Arc::new(AtomicUsize::new(0));
        let (authority, config) = tls.unzip();
        let server = tokio::spawn(tls::serve(listener, config, router, connections.clone()));
        Self {
            addr,
            shared,
            server,
            authority,
            connections,
        }
    }

    /// The certificate (PEM) of the authority that signed a TLS server's
    /// certificate, for the client to trust; `None` over cleartext.
    pub fn ca_file(&self) -> Option<std::path::PathBuf> {
        self.authority.as_ref().map(TestAuthority::ca_file)
    }

    /// How many connections the server has accepted.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// `http://127.0.0.1:<port>`, or `https://` over TLS.
    pub fn base_url(&self) -> String {
        let scheme = if self.authority.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The base URL to give `provider`'s adapter: the server's URL and the
    /// provider's mount, such as `http://127.0.0.1:4321/openai/v1`.
    pub fn base_url_for(&self, provider: Provider) -> String {
        format!("{}{}", self.base_url(), provider.mount())
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<ProviderRequest> {
        self.shared.state().requests.clone()
    }

    /// The requests to one provider's endpoints.
    pub fn requests_for(&self, provider: Provider) -> Vec<ProviderRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.provider == Some(provider))
            .collect()
    }

    /// The requests the mock refused as malformed (bad path, key, header or
    /// body), with the reasons.
    pub fn rejected(&self) -> Vec<ProviderRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.rejection.is_some())
            .collect()
    }

    /// How many well-formed requests for `model` reached `provider`.
    pub fn calls(&self, provider: Provider, model: &str) -> usize {
        self.shared
            .state()
            .calls
            .get(&(provider, model.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// Delays every answer by `latency` (before the first byte), so that a
    /// test can subscribe to a task's events before its LLM step answers.
    pub fn set_latency(&self, latency: Duration) {
        self.shared.state().latency = latency;
    }

    /// Stops keeping every request (a benchmark's tens of thousands would
    /// cost memory and time); counts and the in-flight gauge go on.
    pub fn stop_recording(&self) {
        self.shared.state().recording = false;
    }

    /// The most requests the mock was answering at once.
    pub fn max_in_flight(&self) -> usize {
        self.shared.state().max_in_flight
    }
}

impl Drop for MockProviders {
    fn drop(&mut self) {
        self.server.abort();
    }
}

#[derive(Default)]
struct Shared {
    state: Mutex<MockState>,
}

struct MockState {
    requests: Vec<ProviderRequest>,
    recording: bool,
    calls: HashMap<(Provider, String), usize>,
    latency: Duration,
    next_id: u64,
    in_flight: usize,
    max_in_flight: usize,
    /// What the Responses API mock must see given back.
    responses: responses::Issued,
}

impl Default for MockState {
    fn default() -> Self {
        Self {
            requests: Vec::new(),
            recording: true,
            calls: HashMap::new(),
            latency: Duration::ZERO,
            next_id: 0,
            in_flight: 0,
            max_in_flight: 0,
            responses: responses::Issued::default(),
        }
    }
}

/// Counts a request as in flight until dropped.
struct InFlight(Arc<Shared>);

impl InFlight {
    fn start(shared: &Arc<Shared>) -> Self {
        let mut state = shared.state();
        state.in_flight += 1;
        state.max_in_flight = state.max_in_flight.max(state.in_flight);
        Self(shared.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.state().in_flight -= 1;
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, MockState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a well-formed call and returns its number (from 1).
    fn count_call(&self, provider: Provider, model: &str) -> usize {
        let mut state = self.state();
        let count = state.calls.entry((provider, model.to_owned())).or_default();
        *count += 1;
        *count
    }

    /// A fresh id with `prefix` and 24 letters and digits, unique on this
    /// server (like `toolu_01A09q90qw90lq917835lq9t`).
    fn id(&self, prefix: &str) -> String {
        const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
        let n = {
            let mut state = self.state();
            state.next_id += 1;
            state.next_id
        };
        // splitmix64, twice, for 24 base-62 digits that look random.
        let mix = |mut z: u64| {
            z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let mut id = String::from(prefix);
        for mut word in [mix(n), mix(!n)] {
            for _ in 0..12 {
                id.push(ALPHABET[(word % 62) as usize] as char);
                word /= 62;
            }
        }
        id
    }

    /// Decides what a well-formed request for `model` gets, counting it.
    fn behaviour(&self, provider: Provider, model: &str, conversation: &Conversation) -> Behaviour {
        let call = self.count_call(provider, model);
        match model {
            // Reasoning shows only in the Responses API (see `responses`).
            models::REACT | models::REASONING => Behaviour::Reply(react(conversation)),
            models::PARALLEL => Behaviour::Reply(match react(conversation) {
                Turn::CallTool {
                    name, arguments, ..
                } => Turn::CallTool {
                    name,
                    arguments,
                    count: if conversation.parallel_allowed { 2 } else { 1 },
                },
                text => text,
            }),
            models::OFF_SCHEMA => Behaviour::Reply(match react(conversation) {
                Turn::Text(text) => Turn::Text(match &conversation.response_schema {
                    Some(schema) => off_schema(schema, &text),
                    None => text,
                }),
                call => call,
            }),
            models::VISION => Behaviour::Reply(vision(conversation)),
            models::LONG_ANSWER => {
                Behaviour::Reply(Turn::Text(format!("Final Answer: {LONG_ANSWER}")))
            }
            models::UNAUTHORIZED => Behaviour::Unauthorized,
            models::MALFORMED => Behaviour::Malformed,
            models::RATE_LIMITED_ONCE if call == 1 => Behaviour::RateLimited,
            models::SERVER_ERROR_ONCE if call == 1 => Behaviour::ServerError,
            models::RATE_LIMITED_ONCE | models::SERVER_ERROR_ONCE => {
                Behaviour::Reply(react(conversation))
            }
            _ => Behaviour::UnknownModel,
        }
    }
}

/// What the mock gathered from a well-formed request's conversation.
pub(crate) struct Conversation {
    /// The text of the latest tool result, if there is one.
    tool_result: Option<String>,
    /// Whether `calculator` was offered as a tool.
    offers_calculator: bool,
    /// Whether the request lets the model make several tool calls at once
    /// (OpenAI's `parallel_tool_calls`, Anthropic's
    /// `disable_parallel_tool_use`; Gemini has no switch).
    parallel_allowed: bool,
    /// Whether the request forbade tool calls (OpenAI's `"none"`,
    /// Anthropic's `{"type": "none"}`, Gemini's mode `NONE`).
    tools_forbidden: bool,
    /// The JSON Schema the request wants text answers to match, if it asks
    /// for structured output.
    response_schema: Option<Value>,
    /// The images the request holds, in order (see [`images::seen`]).
    images: Vec<String>,
    /// The first offered tool with `image` in its name, if any.
    image_tool: Option<String>,
}

/// The first of `names` with `image` in it, in any case.
fn image_tool<'a>(mut names: impl Iterator<Item = &'a str>) -> Option<String> {
    names
        .find(|name| name.to_ascii_lowercase().contains("image"))
        .map(str::to_owned)
}

/// What `mock-vision` says it sees: `I see 2 images: url, image/png`, one
/// entry per image in the order they came (its media type, or `url` for an
/// address), or `I see no image`.
pub fn vision_answer(images: &[&str]) -> String {
    match images {
        [] => "I see no image".to_owned(),
        [one] => format!("I see 1 image: {one}"),
        many => format!("I see {} images: {}", many.len(), many.join(", ")),
    }
}

/// What `mock-vision` does: calls the image tool it is offered, once, then
/// says what images it saw.
fn vision(conversation: &Conversation) -> Turn {
    match (&conversation.image_tool, &conversation.tool_result) {
        (Some(tool), None) if !conversation.tools_forbidden => Turn::CallTool {
            name: tool.clone(),
            arguments: json!({}),
            count: 1,
        },
        _ => {
            let images: Vec<&str> = conversation.images.iter().map(String::as_str).collect();
            Turn::Text(format!("Final Answer: {}", vision_answer(&images)))
        }
    }
}

/// What a mock model does with a well-formed request.
pub(crate) enum Behaviour {
    Reply(Turn),
    Unauthorized,
    RateLimited,
    ServerError,
    Malformed,
    UnknownModel,
}

/// What the mock model says.
pub(crate) enum Turn {
    /// A native tool call.
    /// A native tool call, `count` times in one reply (parallel calls when
    /// more than one), each with its own id.
    CallTool {
        name: String,
        arguments: Value,
        count: usize,
    },
    /// Text.
    Text(String),
}

fn react(conversation: &Conversation) -> Turn {
    let turn = react_free(conversation);
    match (&conversation.response_schema, turn) {
        (Some(schema), Turn::Text(text)) => {
            let value = conversation
                .tool_result
                .as_deref()
                .map_or_else(|| text.clone(), result_value);
            Turn::Text(instance(schema, &value).to_string())
        }
        (_, turn) => turn,
    }
}

/// What `mock-react` says when no format constrains it.
fn react_free(conversation: &Conversation) -> Turn {
    if conversation.tools_forbidden {
        return Turn::Text(NO_TOOLS_ANSWER.into());
    }
    match &conversation.tool_result {
        Some(result) => {
            let value = result_value(result);
            // Non-ASCII on purpose: streamed, it is cut inside a character.
            Turn::Text(format!(
                "Thought: the calculator’s answer is in — it is {value}.\nFinal Answer: {value}"
            ))
        }
        None if conversation.offers_calculator => Turn::CallTool {
            name: CALCULATOR.to_owned(),
            arguments: serde_json::json!({"expression": CALCULATOR_EXPRESSION}),
            count: 1,
        },
        None => Turn::Text(
            "Final Answer: (the mock was offered no calculator tool, so it cannot compute)".into(),
        ),
    }
}

/// A value that matches `schema` (as far as the mock understands schemas:
/// `const`, `enum`, the first of `anyOf`/`oneOf`, and the types), with
/// strings and numbers filled from `value`.
pub(crate) fn instance(schema: &Value, value: &str) -> Value {
    if let Some(constant) = schema.get("const") {
        return constant.clone();
    }
    if let Some(first) = schema["enum"].as_array().and_then(|values| values.first()) {
        return first.clone();
    }
    for key in ["anyOf", "oneOf", "any_of"] {
        if let Some(first) = schema[key].as_array().and_then(|options| options.first()) {
            return instance(first, value);
        }
    }
    let kind = match &schema["type"] {
        Value::String(kind) => kind.to_ascii_lowercase(),
        Value::Array(kinds) => kinds
            .iter()
            .filter_map(Value::as_str)
            .find(|kind| *kind != "null")
            .unwrap_or("null")
            .to_ascii_lowercase(),
        _ if schema.get("properties").is_some() => "object".into(),
        _ => "string".into(),
    };
    match kind.as_str() {
        "object" => Value::Object(
            schema["properties"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(name, property)| (name.clone(), instance(property, value)))
                .collect(),
        ),
        "array" => Value::Array(vec![instance(&schema["items"], value)]),
        "integer" => value.trim().parse::<i64>().map_or(json!(0), |n| json!(n)),
        "number" => value.trim().parse::<f64>().map_or(json!(0), |n| json!(n)),
        "boolean" => json!(true),
        "null" => Value::Null,
        _ => json!(value),
    }
}

/// `text` (an answer built by [`instance`]) with the schema's first
/// required property of the wrong type; the answer as a JSON string when
/// there is none.
fn off_schema(schema: &Value, text: &str) -> String {
    let mut answer: Value = serde_json::from_str(text).unwrap_or(Value::Null);
    let first = schema["required"].as_array().and_then(|r| r.first());
    match (first.and_then(Value::as_str), answer.as_object_mut()) {
        (Some(name), Some(object)) => {
            let wrong = match object.get(name) {
                Some(Value::Number(n)) => json!(n.to_string()),
                _ => json!(12345),
            };
            object.insert(name.to_owned(), wrong);
            answer.to_string()
        }
        _ => json!(text).to_string(),
    }
}

/// The result value in a tool result's text: the first `result` field found
/// (looking into strings that hold JSON too), or else the text itself.
pub(crate) fn result_value(text: &str) -> String {
    fn find(value: &Value) -> Option<String> {
        match value {
            Value::Object(map) => {
                if let Some(result) = map.get("result") {
                    return Some(match result {
                        Value::String(s) => match serde_json::from_str::<Value>(s) {
                            Ok(inner @ (Value::Object(_) | Value::Array(_))) => {
                                find(&inner).unwrap_or_else(|| s.clone())
                            }
                            _ => s.clone(),
                        },
                        Value::Object(_) | Value::Array(_) => {
                            find(result).unwrap_or_else(|| result.to_string())
                        }
                        other => other.to_string(),
                    });
                }
                map.values().find_map(find)
            }
            Value::Array(items) => items.iter().find_map(find),
            Value::String(s) => match serde_json::from_str::<Value>(s) {
                Ok(inner @ (Value::Object(_) | Value::Array(_))) => find(&inner),
                _ => None,
            },
            _ => None,
        }
    }
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|value| find(&value))
        .unwrap_or_else(|| text.trim().to_owned())
}

/// The text of a tool result's content: the text itself, or its parts'
/// texts joined; any other value as JSON.
pub(crate) fn text_of(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|part| part["text"].as_str())
            .collect::<Vec<_>>()
            .join(""),
        other => other.to_string(),
    }
}

/// A rough token count, so usage is plausible and never zero.
pub(crate) fn tokens(text: &str) -> u64 {
    (text.len() as u64).div_ceil(4).max(1)
}

pub(crate) fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Cuts `text` into pieces of at most `size` characters.
pub(crate) fn pieces(text: &str, size: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    chars
        .chunks(size.max(1))
        .map(|chunk| chunk.iter().collect())
        .collect()
}

/// A request as the provider modules see it.
pub(crate) struct Incoming {
    method: Method,
    /// The path after the provider's mount.
    rest: String,
    query: Option<String>,
    headers: HeaderMap,
    body: Bytes,
}

impl Incoming {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Whether the body is declared as JSON.
    fn is_json(&self) -> bool {
        self.header("content-type").is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
        })
    }

    fn query_param(&self, name: &str) -> Option<&str> {
        self.query.as_deref()?.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (key == name).then_some(value)
        })
    }
}

/// How a provider module answered.
pub(crate) struct Outcome {
    reply: Reply,
    model: Option<String>,
    stream: bool,
    has_tool_result: bool,
    rejection: Option<String>,
}

impl Outcome {
    fn new(reply: Reply) -> Self {
        Self {
            reply,
            model: None,
            stream: false,
            has_tool_result: false,
            rejection: None,
        }
    }

    /// A refusal, as the provider would answer a malformed request.
    fn rejected(reply: Reply, why: impl Into<String>) -> Self {
        Self {
            rejection: Some(why.into()),
            ..Self::new(reply)
        }
    }
}

pub(crate) enum Reply {
    Json {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: Value,
        /// Pretty-printed, as OpenAI sends its bodies.
        pretty: bool,
    },
    Raw {
        status: u16,
        content_type: &'static str,
        body: String,
    },
    /// A `200` stream of server-sent-event frames, each whole (`data: …\n\n`).
    Sse {
        content_type: &'static str,
        frames: Vec<String>,
    },
}

impl Reply {
    fn json(status: u16, body: Value) -> Self {
        Reply::Json {
            status,
            headers: Vec::new(),
            body,
            pretty: false,
        }
    }

    fn status(&self) -> u16 {
        match self {
            Reply::Json { status, .. } | Reply::Raw { status, .. } => *status,
            Reply::Sse { .. } => 200,
        }
    }

    fn into_response(self) -> Response {
        let build = |status: u16, content_type: &str, body: Body| {
            let mut response = Response::new(body);
            *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_str(content_type).expect("a valid content type"),
            );
            response
        };
        match self {
            Reply::Json {
                status,
                headers,
                body,
                pretty,
            } => {
                let text = if pretty {
                    serde_json::to_string_pretty(&body)
                } else {
                    serde_json::to_string(&body)
                }
                .expect("serialising JSON");
                let mut response = build(status, "application/json", Body::from(text));
                for (name, value) in headers {
                    if let (Ok(name), Ok(value)) = (
                        HeaderName::from_bytes(name.as_bytes()),
                        HeaderValue::from_str(&value),
                    ) {
                        response.headers_mut().insert(name, value);
                    }
                }
                response
            }
            Reply::Raw {
                status,
                content_type,
                body,
            } => build(status, content_type, Body::from(body)),
            Reply::Sse {
                content_type,
                frames,
            } => {
                let chunks = cut_frames(&frames);
                let stream = futures::stream::iter(chunks).then(|chunk| async move {
                    tokio::time::sleep(Duration::from_millis(3)).await;
                    Ok::<Bytes, Infallible>(chunk)
                });
                let mut response = build(200, content_type, Body::from_stream(stream));
                response
                    .headers_mut()
                    .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                response
            }
        }
    }
}

/// The frames as the chunks they are sent in: each frame its own chunk,
/// except that the second frame is cut in half, and the first frame with a
/// non-ASCII character is cut inside that character's UTF-8 bytes.
fn cut_frames(frames: &[String]) -> Vec<Bytes> {
    let mut chunks = Vec::new();
    let mut cut_utf8 = false;
    for (index, frame) in frames.iter().enumerate() {
        let bytes = frame.as_bytes();
        let non_ascii = bytes.iter().position(|b| !b.is_ascii());
        let cut = match non_ascii {
            Some(at) if !cut_utf8 => {
                cut_utf8 = true;
                Some(at + 1)
            }
            _ if index == 1 && bytes.len() > 1 => Some(bytes.len() / 2),
            _ => None,
        };
        match cut {
            Some(at) => {
                chunks.push(Bytes::copy_from_slice(&bytes[..at]));
                chunks.push(Bytes::copy_from_slice(&bytes[at..]));
            }
            None => chunks.push(Bytes::copy_from_slice(bytes)),
        }
    }
    chunks
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    version: Version,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let at = Instant::now();
    let _in_flight = InFlight::start(&shared);
    let latency = shared.state().latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let path = uri.path().to_owned();
    let mounted = Provider::ALL.into_iter().find_map(|provider| {
        let rest = path.strip_prefix(provider.mount())?;
        (rest.is_empty() || rest.starts_with('/')).then(|| (provider, rest.to_owned()))
    });
    let incoming = Incoming {
        method: method.clone(),
        rest: mounted
            .as_ref()
            .map(|(_, rest)| rest.clone())
            .unwrap_or_default(),
        query: uri.query().map(str::to_owned),
        headers: headers.clone(),
        body: body.clone(),
    };
    let outcome = match mounted {
        Some((provider, _)) => match provider {
            Provider::OpenAi | Provider::OpenRouter | Provider::OpenAiCompatible => {
                openai::handle(provider, &incoming, &shared)
            }
            Provider::Anthropic => anthropic::handle(&incoming, &shared),
            Provider::Gemini => gemini::handle(&incoming, &shared),
        },
        None => {
            let mounts: Vec<&str> = Provider::ALL.iter().map(|p| p.mount()).collect();
            Outcome::rejected(
                Reply::json(
                    404,
                    serde_json::json!({"error": {"message": format!(
                        "mock providers: no provider is mounted at {path}; the mounts are {}",
                        mounts.join(", ")
                    )}}),
                ),
                format!("no provider is mounted at {path}"),
            )
        }
    };

    if !shared.state().recording {
        return outcome.reply.into_response();
    }
    let mut recorded_headers = BTreeMap::<String, String>::new();
    for (name, value) in &headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        recorded_headers
            .entry(name.as_str().to_owned())
            .and_modify(|existing| {
                existing.push_str(", ");
                existing.push_str(&value);
            })
            .or_insert(value);
    }
    let raw_body = String::from_utf8_lossy(&body).into_owned();
    shared.state().requests.push(ProviderRequest {
        provider: mounted.map(|(provider, _)| provider),
        method: method.to_string(),
        path,
        query: uri.query().map(str::to_owned),
        headers: recorded_headers,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        raw_body,
        model: outcome.model.clone(),
        stream: outcome.stream,
        has_tool_result: outcome.has_tool_result,
        status: outcome.reply.status(),
        rejection: outcome.rejection.clone(),
        version,
        at,
    });
    outcome.reply.into_response()
}

/// Describes a JSON value's type the way error messages do.
pub(crate) fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Shows only the ends of a key, as providers do in their errors.
pub(crate) fn mask_key(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() <= 8 {
        return "*".repeat(chars.len());
    }
    let head: String = chars[..4].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}{}{tail}", "*".repeat(chars.len() - 8))
}
