//! The LLM adapters end to end: a real server runs each adapter plugin
//! against loopback mocks of its provider ([`MockProviders`]) that speak the
//! provider's wire format and check requests the way the provider does.
//!
//! Per adapter: the ReAct task streamed and not streamed, a rejected key, a
//! malformed answer, a rate limit and an outage that the host retries, and a
//! live run against the real API when `OPSPAWN_LIVE_TESTS=1` and the key
//! are set. Then isolation: an adapter reaches only the hosts it was
//! granted, and no plugin ever reads a key.

use std::time::Duration;

use opspawn_testkit::providers::models;
use opspawn_testkit::{Client, MockProviders, Provider, ProviderRequest, SseEvent};
use serde_json::{Value, json};

use crate::{FINISH, Harness, PIXEL_PNG, misbehaving_task, steps};

/// Starts a server with the example plugins, the misbehaving fixture and
/// `provider`'s adapter under `manifest`, with the adapter's base URL and
/// key in its environment.
fn start_server(provider: Provider, manifest: &str, base_url: &str, key: &str) -> Harness {
    start_server_with(provider, manifest, base_url, key, &[])
}

/// [`start_server`] with more variables in the server's environment.
fn start_server_with(
    provider: Provider,
    manifest: &str,
    base_url: &str,
    key: &str,
    env: &[(&str, &str)],
) -> Harness {
    let mut all = vec![
        (provider.base_url_var(), base_url),
        (provider.key_var(), key),
    ];
    all.extend_from_slice(env);
    Harness::start_with_plugins(&all, |plugins| {
        plugins.add(provider.plugin(), provider.wasm(), Some(manifest));
    })
}

/// Fails unless the adapter loaded, showing why it did not.
async fn expect_loaded(harness: &Harness, provider: Provider) {
    let (_, listing) = harness.client().get("/v1/plugins").await.unwrap();
    let plugin = listing["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == provider.plugin());
    match plugin {
        Some(plugin) => assert_eq!(plugin["kind"], "llm-adapter", "{plugin:#}"),
        None => panic!(
            "the {provider} adapter did not load; failures: {:#}",
            listing["failures"]
        ),
    }
}

/// A mock and a server whose `provider` adapter is pointed at it, granted
/// loopback.
struct Setup {
    provider: Provider,
    mock: MockProviders,
    harness: Harness,
}

impl Setup {
    async fn start(provider: Provider) -> Self {
        Self::with_manifest(provider, &provider.manifest()).await
    }

    /// As [`Setup::start`], the adapter under `manifest`.
    async fn with_manifest(provider: Provider, manifest: &str) -> Self {
        Self::with_mock(provider, MockProviders::start().await, manifest).await
    }

    /// As [`Setup::start`], the mock serving HTTPS with a certificate from
    /// its own authority, which the adapter's manifest trusts (`ca_file`),
    /// offering HTTP/2 by ALPN or only HTTP/1.1.
    async fn over_tls(provider: Provider, offer_http2: bool) -> Self {
        let mock = MockProviders::start_tls(offer_http2).await;
        let manifest = provider.manifest_for(&mock);
        Self::with_mock(provider, mock, &manifest).await
    }

    /// A server whose `provider` adapter, under `manifest`, is pointed at
    /// `mock`.
    async fn with_mock(provider: Provider, mock: MockProviders, manifest: &str) -> Self {
        let harness = start_server(
            provider,
            manifest,
            &mock.base_url_for(provider),
            &provider.test_key(),
        );
        expect_loaded(&harness, provider).await;
        Self {
            provider,
            mock,
            harness,
        }
    }

    /// The OpenAI adapter set to speak the Responses API (its `api`
    /// setting).
    async fn responses_by_default() -> Self {
        let provider = Provider::OpenAi;
        Self::with_manifest(provider, &provider.manifest_with("api", "responses")).await
    }

    fn client(&self) -> Client {
        self.harness.client()
    }

    /// Submits the ReAct task with `model` and waits for its end.
    async fn run(&self, model: &str, stream: Option<bool>) -> Value {
        let client = self.client();
        let id = client
            .submit(&react_task(self.provider, model, stream))
            .await
            .unwrap();
        client.wait_until_finished(&id, FINISH).await.unwrap()
    }

    /// Submits `task` and waits for its end. Streamed, the mock pauses
    /// before each answer, so that the task's events are subscribed to
    /// before the first one; they are returned with the task.
    async fn run_task(&self, task: &Value, stream: bool) -> (Value, Vec<SseEvent>) {
        if stream {
            self.mock.set_latency(Duration::from_millis(300));
        }
        let client = self.client();
        let id = client.submit(task).await.unwrap();
        let events = if stream {
            client.events(&id, None, FINISH).await.unwrap()
        } else {
            Vec::new()
        };
        let task = client.wait_until_finished(&id, FINISH).await.unwrap();
        (task, events)
    }

    /// Checks how the ReAct task ended: no request refused, `42` after an
    /// LLM step, the tool and another LLM step, each LLM step with input
    /// and output tokens. Returns the steps.
    fn expect_react_success<'t>(&self, task: &'t Value) -> &'t Vec<Value> {
        self.expect_no_rejections();
        assert_eq!(
            task["status"],
            "succeeded",
            "task: {task:#}\n{}",
            self.diagnosis()
        );
        assert_eq!(task["result"], "42");
        assert_eq!(kinds(task), ["llm", "tool", "llm"], "task: {task:#}");
        let steps = steps(task);
        for llm in [&steps[0], &steps[2]] {
            assert!(
                llm["usage"]["input_tokens"].as_u64().unwrap_or(0) > 0
                    && llm["usage"]["output_tokens"].as_u64().unwrap_or(0) > 0,
                "each LLM step reports input and output tokens: {llm:#}"
            );
        }
        steps
    }

    /// What the mock saw, and the end of the server's log, for failures.
    fn diagnosis(&self) -> String {
        let mut text = String::from("the mock saw:\n");
        for request in self.mock.requests() {
            text.push_str(&describe(&request));
        }
        let log = self.harness.server.log();
        let tail: String = log
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        text.push_str(&format!("the server's log ends:\n{tail}\n"));
        text
    }

    /// Fails, showing why, if the mock refused any request as the provider
    /// would have.
    fn expect_no_rejections(&self) {
        let rejected = self.mock.rejected();
        assert!(
            rejected.is_empty(),
            "the mock refused requests from the {} adapter, as {} would:\n{}",
            self.provider,
            self.provider,
            rejected.iter().map(describe).collect::<String>()
        );
    }
}

fn describe(request: &ProviderRequest) -> String {
    format!(
        "  {} {}{} -> {}{}\n    body: {}\n",
        request.method,
        request.path,
        request
            .query
            .as_deref()
            .map(|q| format!("?{q}"))
            .unwrap_or_default(),
        request.status,
        request
            .rejection
            .as_deref()
            .map(|why| format!(" REFUSED: {why}"))
            .unwrap_or_default(),
        request.raw_body.chars().take(2000).collect::<String>(),
    )
}

fn react_task(provider: Provider, model: &str, stream: Option<bool>) -> Value {
    let mut task = json!({
        "goal": "What is 6 times 7?",
        "tools": ["calculator"],
        "llm": provider.plugin(),
        "model": model,
    });
    if let Some(stream) = stream {
        task["options"] = json!({"llm": {"stream": stream}});
    }
    task
}

fn kinds(task: &Value) -> Vec<&str> {
    steps(task)
        .iter()
        .map(|s| s["kind"].as_str().unwrap_or_default())
        .collect()
}

/// What an unauthorized answer of the mock says, to show that the
/// provider's body reaches the step's error.
fn unauthorized_text(provider: Provider) -> &'static str {
    match provider {
        Provider::OpenAi | Provider::OpenAiCompatible => "Incorrect API key provided",
        Provider::OpenRouter => "User not found",
        Provider::Anthropic => "invalid x-api-key",
        Provider::Gemini => "UNAUTHENTICATED",
    }
}

/// Checks the provider-specific details of a well-formed request: the
/// endpoint, how streaming was asked for, and that the system prompt, the
/// stop sequence and the calculator's schema were passed on.
fn check_wire_details(provider: Provider, request: &ProviderRequest, stream: bool) {
    let body = &request.body;
    let context = || format!("{provider} request: {}", describe(request));
    assert_eq!(
        request.header(provider.auth_header()),
        Some(provider.auth_value(&provider.test_key()).as_str()),
        "the host added the key: {}",
        context()
    );
    assert_eq!(
        request.model.as_deref(),
        Some(models::REACT),
        "{}",
        context()
    );
    assert_eq!(request.stream, stream, "streaming: {}", context());
    match provider {
        Provider::OpenAi | Provider::OpenRouter | Provider::OpenAiCompatible => {
            assert_eq!(
                request.path,
                format!("{}/chat/completions", provider.mount())
            );
            if stream {
                assert_eq!(body["stream"], true, "{}", context());
                assert_eq!(
                    body["stream_options"]["include_usage"],
                    true,
                    "usage is asked for when streaming: {}",
                    context()
                );
            } else {
                assert!(
                    body["stream"].is_null() || body["stream"] == false,
                    "{}",
                    context()
                );
            }
            let messages = body["messages"].as_array().unwrap();
            assert!(
                messages
                    .iter()
                    .any(|m| m["role"] == "system" || m["role"] == "developer"),
                "the system prompt is sent: {}",
                context()
            );
            let stop = &body["stop"];
            assert!(
                stop == "Observation:"
                    || stop
                        .as_array()
                        .is_some_and(|s| s.contains(&json!("Observation:"))),
                "the stop sequence is sent: {}",
                context()
            );
            let calculator = body["tools"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|t| t["function"]["name"] == "calculator")
                .unwrap_or_else(|| panic!("the calculator is offered: {}", context()));
            assert!(
                calculator["function"]["parameters"]["properties"]["expression"].is_object(),
                "with its schema: {}",
                context()
            );
            if provider == Provider::OpenRouter {
                assert!(
                    request.header("http-referer").is_some() && request.header("x-title").is_some(),
                    "OpenRouter gets HTTP-Referer and X-Title: {}",
                    context()
                );
            }
        }
        Provider::Anthropic => {
            assert_eq!(request.path, "/anthropic/v1/messages");
            assert_eq!(request.header("anthropic-version"), Some("2023-06-01"));
            if stream {
                assert_eq!(body["stream"], true, "{}", context());
            } else {
                assert!(
                    body["stream"].is_null() || body["stream"] == false,
                    "{}",
                    context()
                );
            }
            assert!(
                !body["system"].is_null(),
                "the system prompt is sent: {}",
                context()
            );
            assert!(
                body["stop_sequences"]
                    .as_array()
                    .is_some_and(|s| s.contains(&json!("Observation:"))),
                "the stop sequence is sent: {}",
                context()
            );
            let calculator = body["tools"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|t| t["name"] == "calculator")
                .unwrap_or_else(|| panic!("the calculator is offered: {}", context()));
            assert!(
                calculator["input_schema"]["properties"]["expression"].is_object(),
                "with its schema: {}",
                context()
            );
        }
        Provider::Gemini => {
            let method = if stream {
                "streamGenerateContent"
            } else {
                "generateContent"
            };
            assert_eq!(
                request.path,
                format!("/gemini/v1beta/models/{}:{method}", models::REACT)
            );
            if stream {
                assert_eq!(request.query.as_deref(), Some("alt=sse"), "{}", context());
            }
            let system = body
                .get("systemInstruction")
                .or_else(|| body.get("system_instruction"));
            assert!(
                system.is_some_and(|s| !s["parts"][0]["text"].is_null()),
                "the system prompt is sent: {}",
                context()
            );
            let config = body
                .get("generationConfig")
                .or_else(|| body.get("generation_config"))
                .cloned()
                .unwrap_or_default();
            let stops = config
                .get("stopSequences")
                .or_else(|| config.get("stop_sequences"));
            assert!(
                stops.is_some_and(|s| s
                    .as_array()
                    .is_some_and(|s| s.contains(&json!("Observation:")))),
                "the stop sequence is sent: {}",
                context()
            );
            let declarations = body["tools"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| {
                    t.get("functionDeclarations")
                        .or_else(|| t.get("function_declarations"))
                })
                .filter_map(Value::as_array)
                .flatten()
                .collect::<Vec<_>>();
            let calculator = declarations
                .iter()
                .find(|d| d["name"] == "calculator")
                .unwrap_or_else(|| panic!("the calculator is offered: {}", context()));
            let schema = calculator
                .get("parameters")
                .or_else(|| calculator.get("parametersJsonSchema"))
                .or_else(|| calculator.get("parameters_json_schema"))
                .cloned()
                .unwrap_or_default();
            assert!(
                schema["properties"]["expression"].is_object(),
                "with its schema: {}",
                context()
            );
        }
    }
}

/// (a) The ReAct task: the model calls the calculator natively, then
/// answers; usage adds up; the requests are well formed; streamed text
/// reaches the task's events.
async fn react_task_succeeds(provider: Provider, stream: bool) {
    let setup = Setup::start(provider).await;
    let task = react_task(provider, models::REACT, (!stream).then_some(false));
    let (task, events) = setup.run_task(&task, stream).await;

    let steps = setup.expect_react_success(&task);
    assert_eq!(steps[0]["plugin"], provider.plugin());
    assert_eq!(steps[1]["input"]["name"], "calculator");
    assert_eq!(
        steps[1]["input"]["arguments"],
        json!({"expression": "6*7"}),
        "the tool call's arguments arrive whole"
    );
    assert_eq!(steps[1]["output"]["result"], 42);
    let usage = &task["usage"];
    assert_eq!(
        usage["input_tokens"].as_u64().unwrap(),
        steps[0]["usage"]["input_tokens"].as_u64().unwrap()
            + steps[2]["usage"]["input_tokens"].as_u64().unwrap(),
        "usage is summed over the steps: {task:#}"
    );
    assert!(usage["output_tokens"].as_u64().unwrap() > 0);

    let requests = setup.mock.requests_for(provider);
    assert_eq!(requests.len(), 2, "{}", setup.diagnosis());
    assert!(!requests[0].has_tool_result, "the first asks the question");
    assert!(requests[1].has_tool_result, "the second carries the result");
    for request in &requests {
        check_wire_details(provider, request, stream);
    }

    if stream {
        let deltas = streamed_text(&events);
        assert!(
            deltas.contains("Final Answer: 42"),
            "streamed text arrives as llm.delta events: {deltas:?}"
        );
        assert!(
            deltas.contains("calculator’s answer is in — it is 42"),
            "text cut inside a UTF-8 character is put back together: {deltas:?}"
        );
        let deltas: Vec<&SseEvent> = events.iter().filter(|e| e.event == "llm.delta").collect();
        assert!(
            deltas
                .iter()
                .all(|e| e.data["data"]["step"] == 1 || e.data["data"]["step"] == 3),
            "deltas name their LLM step: {deltas:#?}"
        );
        let final_step: String = deltas
            .iter()
            .filter(|e| e.data["data"]["step"] == 3)
            .filter_map(|e| e.data["data"]["text"].as_str())
            .collect();
        assert!(
            final_step.ends_with("Final Answer: 42"),
            "the answer streams under step 3: {final_step:?}"
        );
    }
}

/// The text of a task's `llm.delta` events, joined.
fn streamed_text(events: &[SseEvent]) -> String {
    events
        .iter()
        .filter(|e| e.event == "llm.delta")
        .filter_map(|e| e.data["data"]["text"].as_str())
        .collect()
}

/// (b) A rejected key fails the task with `llm_auth`, naming the variable
/// the key comes from, keeping the provider's answer, never the key.
async fn a_rejected_key_fails_with_llm_auth(provider: Provider) {
    let setup = Setup::start(provider).await;
    let task = setup.run(models::UNAUTHORIZED, None).await;
    setup.expect_no_rejections();
    assert_eq!(task["status"], "failed", "task: {task:#}");
    let error = &task["error"];
    assert_eq!(
        error["code"],
        "llm_auth",
        "task: {task:#}\n{}",
        setup.diagnosis()
    );
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains(provider.key_var()),
        "the message names {}: {message}",
        provider.key_var()
    );
    assert!(
        message.contains(unauthorized_text(provider)),
        "the provider's answer is kept: {message}"
    );
    assert!(
        !task.to_string().contains(&provider.test_key()),
        "the key itself appears nowhere: {task:#}"
    );
    assert_eq!(kinds(&task), ["llm"]);
    assert_eq!(steps(&task)[0]["error"]["code"], "llm_auth");
    assert_eq!(
        setup.mock.calls(provider, models::UNAUTHORIZED),
        1,
        "auth failures are not retried"
    );
}

/// The variable a refused key's message names is the one the manifest's
/// credential reads, whatever it is called: the adapter cannot know it (one
/// component serves several endpoints), the host does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_key_names_the_variable_the_manifest_reads() {
    let provider = Provider::OpenRouter;
    let mock = MockProviders::start().await;
    let manifest = provider
        .manifest()
        .replace(provider.key_var(), "TEAM_ROUTER_KEY");
    assert!(manifest.contains("${TEAM_ROUTER_KEY}"), "{manifest}");
    let base_url = mock.base_url_for(provider);
    let harness = Harness::start_with_plugins(
        &[
            (provider.base_url_var(), &base_url),
            ("TEAM_ROUTER_KEY", &provider.test_key()),
        ],
        |plugins| {
            plugins.add(provider.plugin(), provider.wasm(), Some(&manifest));
        },
    );
    expect_loaded(&harness, provider).await;
    let client = harness.client();
    let id = client
        .submit(&react_task(provider, models::UNAUTHORIZED, None))
        .await
        .unwrap();
    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    assert_eq!(task["error"]["code"], "llm_auth", "{task:#}");
    let message = task["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(
            "OpenRouter rejected the request as unauthorized (401): check \
                             TEAM_ROUTER_KEY in the server's environment"
        ),
        "{message}"
    );
    assert!(!message.contains(provider.key_var()), "{message}");
}

/// (c) An answer that is not JSON fails with `llm_bad_response`, streamed
/// or not.
async fn a_malformed_answer_fails_with_llm_bad_response(provider: Provider) {
    let setup = Setup::start(provider).await;
    for stream in [None, Some(false)] {
        let task = setup.run(models::MALFORMED, stream).await;
        assert_eq!(task["status"], "failed", "task: {task:#}");
        assert_eq!(
            task["error"]["code"],
            "llm_bad_response",
            "stream {stream:?}: task: {task:#}\n{}",
            setup.diagnosis()
        );
        assert_eq!(kinds(&task), ["llm"]);
    }
    setup.expect_no_rejections();
    let requests = setup.mock.requests_for(provider);
    assert_eq!(requests.len(), 2, "not retried: {}", setup.diagnosis());
    assert!(requests[0].stream && !requests[1].stream);
}

/// (d) A rate limit (429, `Retry-After: 1`) or an outage (500) on the first
/// call is retried by the host within the same step, and the task succeeds.
async fn a_transient_failure_is_retried(provider: Provider, model: &str) {
    let setup = Setup::start(provider).await;
    let task = setup.run(model, None).await;
    setup.expect_no_rejections();
    assert_eq!(
        task["status"],
        "succeeded",
        "task: {task:#}\n{}",
        setup.diagnosis()
    );
    assert_eq!(task["result"], "42");
    assert_eq!(
        kinds(&task),
        ["llm", "tool", "llm"],
        "a retry is not a step of its own"
    );
    assert_eq!(steps(&task)[0]["status"], "succeeded");
    assert_eq!(
        setup.mock.calls(provider, model),
        3,
        "step 1 twice, step 3 once: {}",
        setup.diagnosis()
    );
    let requests = setup.mock.requests_for(provider);
    assert!(!requests[0].has_tool_result && !requests[1].has_tool_result);
    assert!(requests[2].has_tool_result);
    assert_eq!(
        requests[0].status,
        if model == models::RATE_LIMITED_ONCE {
            429
        } else {
            500
        }
    );
    if model == models::RATE_LIMITED_ONCE {
        let waited = requests[1].at - requests[0].at;
        assert!(
            waited >= Duration::from_millis(900),
            "the retry honoured Retry-After: 1, waiting {waited:?}"
        );
    }
}

/// (f) The real API, when asked for: `OPSPAWN_LIVE_TESTS=1` and the key set
/// (for an OpenAI-compatible server, its key or its base URL). Only this
/// process's environment counts: the mocks' test keys go to their servers
/// only. The model is `OPSPAWN_LIVE_<PROVIDER>_MODEL` (`OPENAI`,
/// `OPENROUTER`, `OPENAI_COMPATIBLE`, `ANTHROPIC`, `GEMINI`) or a small
/// default; the base URL the provider's variable or the adapter's default.
async fn live_react_task(provider: Provider, llm_options: Option<Value>) {
    let set = |var: &str| std::env::var(var).ok().filter(|v| !v.is_empty());
    let key = set(provider.key_var());
    let (configured, needed) = match provider {
        // A local server (Ollama, vLLM) may need no key: its URL is enough.
        Provider::OpenAiCompatible => (
            key.is_some() || set(provider.base_url_var()).is_some(),
            format!("{} or {}", provider.base_url_var(), provider.key_var()),
        ),
        _ => (key.is_some(), provider.key_var().to_owned()),
    };
    assert!(
        set("OPSPAWN_LIVE_TESTS").as_deref() == Some("1") && configured,
        "set OPSPAWN_LIVE_TESTS=1 and {needed} to run against the real {provider} API"
    );
    let key = key.unwrap_or_else(|| "unused".to_owned());
    let model_var = format!(
        "OPSPAWN_LIVE_{}_MODEL",
        provider.plugin().to_uppercase().replace('-', "_")
    );
    let model = std::env::var(&model_var).unwrap_or_else(|_| {
        match provider {
            Provider::OpenAi => "gpt-4o-mini",
            Provider::OpenRouter => "openai/gpt-4o-mini",
            Provider::OpenAiCompatible => "llama3.1",
            Provider::Anthropic => "claude-haiku-4-5",
            Provider::Gemini => "gemini-2.5-flash",
        }
        .to_owned()
    });
    // The adapter's own manifest for its default endpoint; a grant for the
    // endpoint named in the environment otherwise.
    let (base_url, manifest) = match std::env::var(provider.base_url_var()) {
        Ok(base_url) if !base_url.is_empty() => {
            let manifest = format!(
                "[limits]\ncall_timeout_ms = 120000\n{}",
                provider.manifest()
            );
            (base_url, manifest)
        }
        _ => {
            let shipped = provider.shipped_manifest();
            let manifest = std::fs::read_to_string(&shipped)
                .unwrap_or_else(|e| panic!("reading {}: {e}", shipped.display()));
            (provider.default_base_url().to_owned(), manifest)
        }
    };
    let harness = start_server(provider, &manifest, &base_url, &key);
    expect_loaded(&harness, provider).await;
    let client = harness.client();
    let mut task = react_task(provider, &model, None);
    if let Some(options) = &llm_options {
        task["options"] = json!({ "llm": options });
    }
    let id = client.submit(&task).await.unwrap();
    let task = client
        .wait_until_finished(&id, Duration::from_secs(300))
        .await
        .unwrap();
    eprintln!(
        "live {provider} ({model}, options {llm_options:?}): {} {:?}, steps {:?}, usage {}",
        task["status"],
        task["result"],
        kinds(&task),
        task["usage"]
    );
    assert_eq!(task["status"], "succeeded", "task: {task:#}");
    assert!(
        task["result"].as_str().is_some_and(|r| r.contains("42")),
        "task: {task:#}"
    );
    assert!(task["usage"]["input_tokens"].as_u64().unwrap_or(0) > 0);
}

/// The answer schema of the structured-output tasks, as a user would write
/// it: `$schema`, open objects and a bound, which each adapter must shape
/// into what its provider takes.
fn calc_schema() -> Value {
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {
            "answer": {"type": "integer", "minimum": 0},
            "explanation": {"type": "string"},
        },
        "required": ["answer", "explanation"],
    })
}

/// Runs the ReAct task with `model`, asking for an answer matching
/// [`calc_schema`].
async fn run_structured(setup: &Setup, model: &str, stream: bool) -> Value {
    let client = setup.client();
    let mut task = react_task(setup.provider, model, (!stream).then_some(false));
    task["response_format"] = json!({"name": "calc", "schema": calc_schema()});
    let id = client.submit(&task).await.unwrap();
    client.wait_until_finished(&id, FINISH).await.unwrap()
}

/// Checks that a request asked for structured output in the provider's own
/// shape, with the schema as the provider takes it.
fn check_structured_request(provider: Provider, request: &ProviderRequest) {
    let body = &request.body;
    let context = || describe(request);
    match provider {
        Provider::OpenAi | Provider::OpenRouter | Provider::OpenAiCompatible => {
            assert_eq!(
                body["response_format"],
                json!({"type": "json_schema", "json_schema": {
                    "name": "calc", "schema": calc_schema(), "strict": false,
                }}),
                "{}",
                context()
            );
        }
        Provider::Anthropic => {
            assert_eq!(
                body["output_config"],
                json!({"format": {"type": "json_schema", "schema": {
                    "type": "object",
                    "properties": {
                        "answer": {"type": "integer"},
                        "explanation": {"type": "string"},
                    },
                    "required": ["answer", "explanation"],
                    "additionalProperties": false,
                }}}),
                "closed, without the bound Anthropic refuses: {}",
                context()
            );
            assert_eq!(request.header("anthropic-beta"), None, "{}", context());
        }
        Provider::Gemini => {
            let config = &body["generationConfig"];
            assert_eq!(
                config["responseMimeType"],
                "application/json",
                "{}",
                context()
            );
            assert_eq!(
                config["responseSchema"],
                json!({
                    "type": "object",
                    "properties": {
                        "answer": {"type": "integer", "minimum": 0},
                        "explanation": {"type": "string"},
                    },
                    "required": ["answer", "explanation"],
                }),
                "{}",
                context()
            );
        }
    }
}

/// Checks that the task's result is the JSON answer [`run_structured`]
/// asks for.
fn expect_structured_answer(task: &Value) {
    let answer: Value = serde_json::from_str(task["result"].as_str().unwrap_or_default())
        .unwrap_or_else(|e| panic!("the result is JSON ({e}): {task:#}"));
    assert_eq!(answer, json!({"answer": 42, "explanation": "42"}));
}

/// A task with a response format, through the adapter against the mock:
/// every LLM call asks for structured output in the provider's shape, and
/// the JSON answer is the task's result.
async fn a_structured_answer_is_the_result(provider: Provider, stream: bool) {
    let setup = Setup::start(provider).await;
    let task = run_structured(&setup, models::REACT, stream).await;
    setup.expect_no_rejections();
    assert_eq!(
        task["status"],
        "succeeded",
        "task: {task:#}\n{}",
        setup.diagnosis()
    );
    expect_structured_answer(&task);
    assert_eq!(
        task["response_format"],
        json!({"name": "calc", "schema": calc_schema(), "strict": false})
    );
    assert_eq!(kinds(&task), ["llm", "tool", "llm"], "task: {task:#}");
    let requests = setup.mock.requests_for(provider);
    assert_eq!(requests.len(), 2, "{}", setup.diagnosis());
    for request in &requests {
        assert_eq!(request.stream, stream, "{}", describe(request));
        check_structured_request(provider, request);
    }
}

/// An answer that does not match the schema fails the task with
/// `answer_schema_mismatch`, naming where and why; the answer is kept.
async fn an_answer_off_the_schema_fails_the_task(provider: Provider) {
    let setup = Setup::start(provider).await;
    let task = run_structured(&setup, models::OFF_SCHEMA, false).await;
    setup.expect_no_rejections();
    assert_eq!(
        task["status"],
        "failed",
        "task: {task:#}\n{}",
        setup.diagnosis()
    );
    assert_eq!(task["error"]["code"], "answer_schema_mismatch", "{task:#}");
    let message = task["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("response format \"calc\"")
            && message.contains("at /answer: ")
            && message.contains("\"42\" is not of type \"integer\""),
        "the message names the first violation: {message}"
    );
    let kept = task["result"].as_str().unwrap_or_default();
    assert_eq!(
        serde_json::from_str::<Value>(kept).ok(),
        Some(json!({"answer": "42", "explanation": "42"})),
        "the refused answer is kept: {task:#}"
    );
    assert_eq!(kinds(&task), ["llm", "tool", "llm"], "task: {task:#}");
}

macro_rules! provider_tests {
    ($($module:ident => $provider:expr),* $(,)?) => {$(
        mod $module {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn the_react_task_succeeds_streaming() {
                react_task_succeeds($provider, true).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn the_react_task_succeeds_without_streaming() {
                react_task_succeeds($provider, false).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_rejected_key_fails_with_llm_auth() {
                super::a_rejected_key_fails_with_llm_auth($provider).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_malformed_answer_fails_with_llm_bad_response() {
                super::a_malformed_answer_fails_with_llm_bad_response($provider).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_rate_limit_is_retried_after_retry_after() {
                a_transient_failure_is_retried($provider, models::RATE_LIMITED_ONCE).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_server_error_is_retried() {
                a_transient_failure_is_retried($provider, models::SERVER_ERROR_ONCE).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_structured_answer_is_the_result_streaming() {
                super::a_structured_answer_is_the_result($provider, true).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_structured_answer_is_the_result_without_streaming() {
                super::a_structured_answer_is_the_result($provider, false).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn an_answer_off_the_schema_fails_the_task() {
                super::an_answer_off_the_schema_fails_the_task($provider).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            #[ignore = "calls the real provider: needs OPSPAWN_LIVE_TESTS=1 and its key"]
            async fn live_react_task() {
                super::live_react_task($provider, None).await;
            }
        }
    )*};
}

provider_tests! {
    openai => Provider::OpenAi,
    openrouter => Provider::OpenRouter,
    openai_compatible => Provider::OpenAiCompatible,
    anthropic => Provider::Anthropic,
    gemini => Provider::Gemini,
}

/// A task for `mock-vision` whose goal carries `images`, with no tools.
fn vision_task(provider: Provider, images: Value, stream: bool) -> Value {
    json!({
        "goal": "What is in these pictures?",
        "tools": [],
        "llm": provider.plugin(),
        "model": models::VISION,
        "images": images,
        "options": {"llm": {"stream": stream}},
    })
}

/// A goal's images reach each provider in its own shape, streamed or not:
/// an address and inline bytes, or for Gemini, which takes only inline
/// bytes, the bytes alone (an address is refused there before sending).
/// The mock checks the shape as its provider does and says what it saw.
/// The journal keeps the images with the task, never in an LLM step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_goals_images_reach_each_provider_in_its_shape() {
    let url = json!({"url": "https://example.com/paris.jpg"});
    let pixel = json!({"media_type": "image/png", "data": PIXEL_PNG});
    for provider in Provider::ALL {
        let setup = Setup::start(provider).await;
        let (images, seen) = match provider {
            Provider::Gemini => (json!([pixel]), vec!["image/png"]),
            _ => (json!([url, pixel]), vec!["url", "image/png"]),
        };
        for stream in [false, true] {
            let (task, _) = setup
                .run_task(&vision_task(provider, images.clone(), stream), false)
                .await;
            let context = format!(
                "{provider}, stream {stream}: {task:#}\n{}",
                setup.diagnosis()
            );
            setup.expect_no_rejections();
            assert_eq!(task["status"], "succeeded", "{context}");
            assert_eq!(
                task["result"],
                opspawn_testkit::providers::vision_answer(&seen),
                "{context}"
            );
            assert_eq!(task["images"], images, "{context}");
            assert!(
                !steps(&task)[0]["input"].to_string().contains(PIXEL_PNG),
                "{context}"
            );
        }
        if provider == Provider::OpenAi {
            // The same from the command line: a file inline, an address as is.
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("pixel.png");
            use base64::Engine as _;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(PIXEL_PNG)
                .unwrap();
            std::fs::write(&file, bytes).unwrap();
            let output = std::process::Command::new(crate::binary())
                .args(["run", "What is in these pictures?", "--llm", "openai"])
                .args([
                    "--model",
                    models::VISION,
                    "--tool",
                    "calculator",
                    "--detach",
                ])
                .args(["--image", "https://example.com/paris.jpg", "--image"])
                .arg(&file)
                .args(["--server", &setup.harness.server.base_url])
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(output.status.success(), "{stderr}");
            let id = String::from_utf8_lossy(&output.stdout).trim().to_owned();
            let task = setup
                .client()
                .wait_until_finished(&id, FINISH)
                .await
                .unwrap();
            assert_eq!(task["images"], json!([url, pixel]), "{task:#}");
            assert_eq!(
                task["result"],
                opspawn_testkit::providers::vision_answer(&seen),
                "{task:#}"
            );
        }
        if provider == Provider::Gemini {
            let (task, _) = setup
                .run_task(&vision_task(provider, json!([url]), false), false)
                .await;
            assert_eq!(task["error"]["code"], "invalid_llm_options", "{task:#}");
            let message = task["error"]["message"].as_str().unwrap_or_default();
            assert!(message.contains("Gemini takes images inline"), "{message}");
        }
    }
    // The Responses API takes them as input_image parts.
    let setup = Setup::responses_by_default().await;
    let images = json!([url, pixel]);
    let (task, _) = setup
        .run_task(&vision_task(Provider::OpenAi, images, true), false)
        .await;
    setup.expect_no_rejections();
    assert_eq!(
        task["result"],
        opspawn_testkit::providers::vision_answer(&["url", "image/png"]),
        "{task:#}"
    );
    let request = setup.mock.requests().pop().expect("a request");
    assert!(request.path.ends_with("/responses"), "{}", request.path);
}

/// The images an MCP tool returns (the reference server's tiny image) go
/// to each provider with the tool's result, in its shape: the planner
/// reads a note in their place, the LLM sees the image, and neither the
/// planner's request nor its journal holds the bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tools_images_reach_each_provider_with_its_result() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("opspawn.toml");
    std::fs::write(
        &config,
        format!(
            "[[mcp.servers]]\nname = \"everything\"\ncommand = \"node\"\n\
             args = [{:?}, \"stdio\"]\nallow_tools = [\"get-tiny-image\"]\n",
            opspawn_testkit::mcp::everything().to_str().unwrap()
        ),
    )
    .unwrap();
    const TOOL: &str = "everything__get-tiny-image";
    for provider in Provider::ALL {
        let mock = MockProviders::start().await;
        let key = provider.test_key();
        let base_url = mock.base_url_for(provider);
        let harness = start_server_with(
            provider,
            &provider.manifest(),
            &base_url,
            &key,
            &[("OPSPAWN_CONFIG", config.to_str().unwrap())],
        );
        expect_loaded(&harness, provider).await;
        let client = harness.client();
        let task = json!({
            "goal": "What does the image tool show?",
            "tools": [TOOL],
            "llm": provider.plugin(),
            "model": models::VISION,
        });
        // The MCP server may still be starting: a task waits for it.
        let id = client.submit(&task).await.unwrap();
        let task = client.wait_until_finished(&id, FINISH).await.unwrap();
        let rejected: Vec<String> = mock.rejected().iter().map(describe).collect();
        let context = format!("{provider}: {task:#}\n{}", rejected.join(""));
        assert!(rejected.is_empty(), "{context}");
        assert_eq!(task["status"], "succeeded", "{context}");
        assert_eq!(kinds(&task), ["llm", "tool", "llm"], "{context}");
        assert_eq!(
            task["result"],
            opspawn_testkit::providers::vision_answer(&["image/png"]),
            "{context}"
        );
        let steps = steps(&task);
        let image = steps[1]["output"]
            .as_array()
            .and_then(|blocks| blocks.iter().find(|b| b["type"] == "image"))
            .unwrap_or_else(|| panic!("the tool's output holds its image: {context}"));
        let data = image["data"].as_str().unwrap();
        let requests = mock.requests();
        let last = requests.last().expect("a request");
        assert!(
            last.body.to_string().contains(data),
            "the LLM got the image: {context}"
        );
        assert!(!steps[2]["input"].to_string().contains(data), "{context}");
    }
}

/// A missing key fails the step at once with `llm_auth`, naming the
/// variable to set, before anything is sent: with the shipped manifest and
/// its default endpoint (no network is needed to find out), and with the
/// base URL pointed elsewhere (the credential follows the one setting, so
/// the message names the same variable, and the mock hears nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_key_fails_at_once_naming_the_variable() {
    let mock = MockProviders::start().await;
    // The OpenAI-compatible adapter's key is optional: it is sent without.
    for provider in Provider::ALL
        .into_iter()
        .filter(|p| *p != Provider::OpenAiCompatible)
    {
        let shipped = provider.shipped_manifest();
        let manifest = std::fs::read_to_string(&shipped)
            .unwrap_or_else(|e| panic!("reading {}: {e}", shipped.display()));
        for base_url in ["", &mock.base_url_for(provider)] {
            let harness = start_server(provider, &manifest, base_url, "");
            expect_loaded(&harness, provider).await;
            let client = harness.client();
            let started = std::time::Instant::now();
            let id = client
                .submit(&react_task(provider, models::REACT, None))
                .await
                .unwrap();
            let task = client.wait_until_finished(&id, FINISH).await.unwrap();
            let context = format!("{provider}, base URL {base_url:?}: {task:#}");
            assert_eq!(task["status"], "failed", "{context}");
            assert_eq!(task["error"]["code"], "llm_auth", "{context}");
            let message = task["error"]["message"].as_str().unwrap_or_default();
            assert!(
                message.contains(&format!("set {}", provider.key_var())),
                "the message names the variable to set: {context}"
            );
            assert_eq!(kinds(&task), ["llm"], "not retried: {context}");
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "failed at once, not after a network timeout: {context}"
            );
        }
    }
    assert!(
        mock.requests().is_empty(),
        "nothing was sent without a key: {:#?}",
        mock.requests()
    );
}

/// Submits the ReAct task with `llm_options` as its `options.llm` and waits
/// for its end.
async fn run_with_options(setup: &Setup, llm_options: Value) -> Value {
    let mut task = react_task(setup.provider, models::REACT, None);
    task["options"] = json!({ "llm": llm_options });
    let client = setup.client();
    let id = client.submit(&task).await.unwrap();
    client.wait_until_finished(&id, FINISH).await.unwrap()
}

/// Fails unless `task` failed with `invalid_llm_options` at its first step,
/// its message containing `expected`.
fn expect_invalid_options(task: &Value, expected: &str, context: &str) {
    assert_eq!(task["status"], "failed", "{context}: {task:#}");
    assert_eq!(
        task["error"]["code"], "invalid_llm_options",
        "{context}: {task:#}"
    );
    let message = task["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(expected),
        "{context}: the message says {expected:?}: {message}"
    );
    assert_eq!(kinds(task), ["llm"], "not retried: {context}: {task:#}");
}

/// Options are checked against the provider's ranges before anything is
/// sent: out of range, the step fails with `invalid_llm_options` naming the
/// range, and the provider hears nothing; so does asking for several
/// replies (`n`, `candidateCount`), which a step could not keep. In range,
/// options reach the provider where it wants them (Gemini's `topK` in its
/// generation config).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_are_checked_against_the_providers_ranges_before_sending() {
    for provider in Provider::ALL {
        let setup = Setup::start(provider).await;
        let mut refused = vec![
            (json!({"top_p": 1.5}), "top_p 1.5 is outside".to_owned()),
            (
                json!({"max_tokens": 0}),
                "max_tokens must be at least 1".to_owned(),
            ),
        ];
        match provider {
            Provider::Anthropic => refused.push((
                json!({"temperature": 1.5}),
                "temperature 1.5 is outside Anthropic's range, 0 to 1".to_owned(),
            )),
            _ => refused.push((json!({"temperature": 2.5}), "range, 0 to 2".to_owned())),
        }
        // A step takes one reply: asking for several is refused, where the
        // provider could give them (the OpenAI mock answers `n` choices).
        match provider {
            Provider::Anthropic => {}
            Provider::Gemini => refused.push((
                json!({"generationConfig": {"candidateCount": 2}}),
                "candidateCount 2 asks for 2 replies, and a step takes one".to_owned(),
            )),
            _ => refused.push((
                json!({"n": 2, "stream": false}),
                "n 2 asks for 2 replies, and a step takes one".to_owned(),
            )),
        }
        match provider {
            Provider::OpenAi => {
                refused.push((json!({"top_k": 40}), "OpenAI has no top_k".to_owned()));
            }
            Provider::Gemini => refused.push((json!({"top_k": 0}), "range, 1 to".to_owned())),
            _ => {}
        }
        for (options, expected) in &refused {
            let task = run_with_options(&setup, options.clone()).await;
            expect_invalid_options(&task, expected, &format!("{provider} with {options}"));
        }
        assert!(
            setup.mock.requests().is_empty(),
            "nothing out of range was sent: {}",
            setup.diagnosis()
        );

        let accepted = match provider {
            Provider::OpenAi => json!({"temperature": 1.5, "top_p": 0.9}),
            _ => json!({"temperature": 0.5, "top_p": 0.9, "top_k": 40}),
        };
        let task = run_with_options(&setup, accepted.clone()).await;
        setup.expect_no_rejections();
        assert_eq!(
            task["status"],
            "succeeded",
            "{provider} with {accepted}: {task:#}\n{}",
            setup.diagnosis()
        );
        let body = &setup.mock.requests_for(provider)[0].body;
        let sent = match provider {
            Provider::Gemini => json!({
                "temperature": body["generationConfig"]["temperature"],
                "top_p": body["generationConfig"]["topP"],
                "top_k": body["generationConfig"]["topK"],
            }),
            Provider::OpenAi => json!({"temperature": body["temperature"], "top_p": body["top_p"]}),
            _ => json!({
                "temperature": body["temperature"],
                "top_p": body["top_p"],
                "top_k": body["top_k"],
            }),
        };
        assert_eq!(sent, accepted, "{provider}: {}", setup.diagnosis());
    }
}

/// The Anthropic API version is a setting, and the request is shaped for
/// it: version `2026-10-21` refuses sampling options outright, so a task
/// asking for a temperature is refused before sending, naming the version,
/// and one that does not runs with that version's header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_anthropic_api_version_is_configurable_and_shapes_the_request() {
    let provider = Provider::Anthropic;
    let manifest = provider.manifest_with("api_version", "2026-10-21");
    let setup = Setup::with_manifest(provider, &manifest).await;
    for options in [json!({"temperature": 0.5}), json!({"top_k": 5})] {
        let task = run_with_options(&setup, options.clone()).await;
        expect_invalid_options(
            &task,
            "API version 2026-10-21 refuses temperature, top_p and top_k",
            &format!("{options}"),
        );
    }
    assert!(setup.mock.requests().is_empty(), "{}", setup.diagnosis());

    let task = setup.run(models::REACT, None).await;
    setup.expect_no_rejections();
    assert_eq!(
        task["status"],
        "succeeded",
        "{task:#}\n{}",
        setup.diagnosis()
    );
    assert_eq!(task["result"], "42");
    for request in setup.mock.requests() {
        assert_eq!(request.header("anthropic-version"), Some("2026-10-21"));
    }
}

/// Opaque provider data survives the round trip: Claude's signed thinking
/// block, streamed or not, is journaled with the reply and given back first
/// in the next request, unchanged (the mock checks its signature and
/// refuses a tool use whose turn does not start with it). Gemini's thought
/// signatures are checked the same way in every Gemini ReAct test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_thinking_blocks_go_back_unchanged() {
    let setup = Setup::start(Provider::Anthropic).await;
    for stream in [true, false] {
        let task = run_with_options(
            &setup,
            json!({"thinking": {"type": "enabled", "budget_tokens": 1024}, "stream": stream}),
        )
        .await;
        setup.expect_no_rejections();
        assert_eq!(
            task["status"],
            "succeeded",
            "stream {stream}: {task:#}\n{}",
            setup.diagnosis()
        );
        assert_eq!(task["result"], "42");
        let kept = &steps(&task)[0]["output"]["message"]["provider_data"];
        let value = |key: &str| {
            kept.as_array()
                .into_iter()
                .flatten()
                .find(|datum| datum["key"] == key)
                .and_then(|datum| datum["value"].as_str())
                .map(str::to_owned)
        };
        let thinking = value("anthropic:thinking:0")
            .unwrap_or_else(|| panic!("the thinking is journaled: {task:#}"));
        assert_eq!(
            value("anthropic:signature:0"),
            Some(opspawn_testkit::providers::thinking_signature(&thinking)),
            "with its signature, whole: {kept:#}"
        );
    }
    let requests = setup.mock.requests_for(Provider::Anthropic);
    assert_eq!(requests.len(), 4, "{}", setup.diagnosis());
    for second in [&requests[1], &requests[3]] {
        let assistant = &second.body["messages"][1];
        assert_eq!(assistant["role"], "assistant");
        assert_eq!(
            assistant["content"][0]["type"],
            "thinking",
            "the thinking block goes back first: {}",
            describe(second)
        );
    }
}

/// Tool choice and parallel calls, set per task in `options.llm` in one
/// neutral form, reach each provider in its own shape: `"none"` keeps the
/// model from calling tools (the mock then answers without the
/// calculator), a named tool and `parallel_tool_calls: false` are sent as
/// the provider spells them (Gemini has no parallel switch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_choice_and_parallel_calls_reach_each_provider_in_its_shape() {
    for provider in Provider::ALL {
        let setup = Setup::start(provider).await;
        let task = run_with_options(&setup, json!({"tool_choice": "none"})).await;
        assert_eq!(
            task["status"],
            "succeeded",
            "{provider}: {task:#}\n{}",
            setup.diagnosis()
        );
        assert_eq!(kinds(&task), ["llm"], "no tool was called: {task:#}");
        assert!(
            task["result"]
                .as_str()
                .is_some_and(|r| r.contains("told to call no tool")),
            "{task:#}"
        );
        let task = run_with_options(
            &setup,
            json!({"tool_choice": {"name": "calculator"}, "parallel_tool_calls": false}),
        )
        .await;
        assert_eq!(task["status"], "succeeded", "{provider}: {task:#}");
        assert_eq!(task["result"], "42");
        setup.expect_no_rejections();

        let requests = setup.mock.requests_for(provider);
        let (none, named) = (&requests[0].body, &requests[1].body);
        let shapes = match provider {
            Provider::Anthropic => (
                none["tool_choice"].clone(),
                named["tool_choice"].clone(),
                json!({"type": "none"}),
                json!({"type": "tool", "name": "calculator", "disable_parallel_tool_use": true}),
            ),
            Provider::Gemini => (
                none["toolConfig"].clone(),
                named["toolConfig"].clone(),
                json!({"functionCallingConfig": {"mode": "NONE"}}),
                json!({"functionCallingConfig": {
                    "mode": "ANY", "allowedFunctionNames": ["calculator"]
                }}),
            ),
            _ => (
                none["tool_choice"].clone(),
                json!({"choice": named["tool_choice"], "parallel": named["parallel_tool_calls"]}),
                json!("none"),
                json!({
                    "choice": {"type": "function", "function": {"name": "calculator"}},
                    "parallel": false
                }),
            ),
        };
        assert_eq!((shapes.0, shapes.1), (shapes.2, shapes.3), "{provider}");

        let task = run_with_options(&setup, json!({"tool_choice": {"name": "weather"}})).await;
        expect_invalid_options(
            &task,
            "tool_choice names \"weather\", which is not one of the request's tools",
            &format!("{provider}"),
        );
    }
}

/// Parallel tool calls: a model that calls two tools in one reply (the
/// mock's `mock-parallel`, when the request allows it) gets both run, each
/// its own step, and both results go back in the next request; with
/// `parallel_tool_calls: false` the provider is told not to, and the model
/// calls one (Gemini has no switch, so its model still calls two).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_tool_calls_run_each_and_can_be_turned_off() {
    for provider in Provider::ALL {
        let setup = Setup::start(provider).await;
        for (stream, parallel, expected) in [
            (true, None, ["llm", "tool", "tool", "llm"].as_slice()),
            (false, None, ["llm", "tool", "tool", "llm"].as_slice()),
            (
                false,
                Some(false),
                if provider == Provider::Gemini {
                    ["llm", "tool", "tool", "llm"].as_slice()
                } else {
                    ["llm", "tool", "llm"].as_slice()
                },
            ),
        ] {
            let mut options = json!({"stream": stream});
            if let Some(parallel) = parallel {
                options["parallel_tool_calls"] = json!(parallel);
            }
            let mut task = react_task(provider, models::PARALLEL, None);
            task["options"] = json!({ "llm": options });
            let client = setup.client();
            let id = client.submit(&task).await.unwrap();
            let task = client.wait_until_finished(&id, FINISH).await.unwrap();
            let context = format!("{provider}, stream {stream}, parallel {parallel:?}");
            assert_eq!(
                task["status"],
                "succeeded",
                "{context}: {task:#}\n{}",
                setup.diagnosis()
            );
            assert_eq!(task["result"], "42", "{context}");
            assert_eq!(kinds(&task), expected, "{context}: {task:#}");
            let ids: std::collections::BTreeSet<&str> = steps(&task)
                .iter()
                .filter(|step| step["kind"] == "tool")
                .filter_map(|step| step["input"]["id"].as_str())
                .collect();
            assert_eq!(
                ids.len(),
                expected.len() - 2,
                "each call has its own id: {task:#}"
            );
        }
        setup.expect_no_rejections();
    }
}

/// (e) An adapter built against WIT 0.1.0, which calls its provider itself
/// over `wasi:http`, still loads and runs, and reaches only the hosts its
/// manifest grants: granted one mock's port and pointed at another's, its
/// request is refused by the host and never arrives. And the key stays with
/// the host: a plugin asking for the variable gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_0_1_adapter_runs_and_reaches_only_granted_hosts() {
    let provider = Provider::OpenAi;
    let granted = MockProviders::start().await;
    let elsewhere = MockProviders::start().await;
    let manifest = provider.legacy_manifest(&format!("http://127.0.0.1:{}", granted.port()));
    let harness = Harness::start_with_plugins(
        &[
            (provider.base_url_var(), &elsewhere.base_url_for(provider)),
            (provider.key_var(), &provider.test_key()),
        ],
        |plugins| {
            plugins.add_file(
                provider.plugin(),
                &opspawn_testkit::legacy_wasm("openai"),
                Some(&manifest),
            );
        },
    );
    expect_loaded(&harness, provider).await;
    let client = harness.client();
    let (_, listing) = client.get("/v1/plugins").await.unwrap();
    let adapter = listing["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == provider.plugin())
        .unwrap();
    assert_eq!(adapter["wit_version"], "0.1.0", "{adapter:#}");

    let id = client
        .submit(&react_task(provider, models::REACT, None))
        .await
        .unwrap();
    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    assert_eq!(task["status"], "failed", "task: {task:#}");
    let code = task["error"]["code"].as_str().unwrap_or_default();
    assert!(code.starts_with("llm_"), "an adapter error: {task:#}");
    let message = task["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase();
    assert!(
        ["not granted", "did not grant", "denied"]
            .iter()
            .any(|phrase| message.contains(phrase)),
        "the message says the host was not granted: {task:#}"
    );
    assert!(
        elsewhere.requests().is_empty(),
        "the ungranted host received nothing: {:?}",
        elsewhere.requests()
    );
    assert!(granted.requests().is_empty());
    assert_eq!(
        adapter["grants"]["credentials"][0]["variables"],
        json!([provider.key_var()]),
        "{adapter:#}"
    );
    assert!(!listing.to_string().contains(&provider.test_key()));

    // Pointed at the granted mock, the same 0.1.0 component completes a task.
    drop(harness);
    let harness = Harness::start_with_plugins(
        &[
            (provider.base_url_var(), &granted.base_url_for(provider)),
            (provider.key_var(), &provider.test_key()),
        ],
        |plugins| {
            plugins.add_file(
                provider.plugin(),
                &opspawn_testkit::legacy_wasm("openai"),
                Some(&manifest),
            );
        },
    );
    expect_loaded(&harness, provider).await;
    let client = harness.client();
    let id = client
        .submit(&react_task(provider, models::REACT, Some(true)))
        .await
        .unwrap();
    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    assert_eq!(task["status"], "succeeded", "task: {task:#}");
    assert!(granted.rejected().is_empty(), "{:#?}", granted.rejected());

    // The server has OPENAI_API_KEY; a plugin asking for it gets nothing.
    let id = client
        .submit(&misbehaving_task(
            "env",
            json!({"name": provider.key_var()}),
        ))
        .await
        .unwrap();
    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    let step = &steps(&task)[1];
    assert_eq!(step["status"], "succeeded", "step: {step:#}");
    assert_eq!(
        step["output"]["value"],
        Value::Null,
        "the key is not in any plugin's environment: {step:#}"
    );
    assert!(!task.to_string().contains(&provider.test_key()));
}

/// (f) A translating adapter's endpoint is its base URL, and the operator's
/// policy decides whether the host may call it: outside the policy, the
/// adapter does not load, and the listing says why. The listing shows where
/// the credential goes and from which variable, never its value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_decides_which_endpoints_adapters_reach() {
    let provider = Provider::OpenAi;
    let mock = MockProviders::start().await;
    // The policy is scoped to the adapter, so the test fixture's own grants
    // stay as they are.
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        "[policy.plugins.openai]\noutbound_hosts = [\"https://api.openai.com\"]\n",
    )
    .unwrap();
    let config_path = config.path().to_str().unwrap().to_owned();
    let harness = Harness::start_with_plugins(
        &[
            ("OPSPAWN_CONFIG", &config_path),
            (provider.base_url_var(), &mock.base_url_for(provider)),
            (provider.key_var(), &provider.test_key()),
        ],
        |plugins| {
            plugins.add(
                provider.plugin(),
                provider.wasm(),
                Some(&provider.manifest()),
            );
        },
    );
    let client = harness.client();
    let (_, listing) = client.get("/v1/plugins").await.unwrap();
    let failure = listing["failures"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| {
            f["file"]
                .as_str()
                .unwrap_or_default()
                .ends_with("openai.wasm")
        })
        .unwrap_or_else(|| panic!("the adapter is refused: {listing:#}"));
    let reason = failure["error"].as_str().unwrap_or_default();
    assert!(
        reason.contains("policy") && reason.contains(&format!("127.0.0.1:{}", mock.port())),
        "the reason names the policy and the endpoint: {reason}"
    );
    assert!(mock.requests().is_empty());
    drop(harness);

    let harness = start_server(
        provider,
        &provider.manifest(),
        &mock.base_url_for(provider),
        &provider.test_key(),
    );
    expect_loaded(&harness, provider).await;
    let (_, listing) = harness.client().get("/v1/plugins").await.unwrap();
    let adapter = listing["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == provider.plugin())
        .unwrap();
    assert_eq!(adapter["wit_version"], "0.2.0", "{adapter:#}");
    assert_eq!(
        adapter["grants"]["adapter"]["base_url"],
        mock.base_url_for(provider),
        "{adapter:#}"
    );
    assert_eq!(
        adapter["grants"]["adapter"]["credential"]["variables"],
        json!([provider.key_var()]),
        "{adapter:#}"
    );
    assert!(!listing.to_string().contains(&provider.test_key()));
}

/// A provider that never answers is cut at the adapter's `call_timeout_ms`,
/// retries included: the step fails with `llm_timeout` then, not after a
/// first-byte timeout per try.
/// Hosted providers serve HTTPS and offer HTTP/2, which carries all of a
/// host's requests to one provider on a few connections. Each adapter's
/// requests, streamed and not, go over HTTP/2 to a provider that offers it,
/// and the tasks, run one after another, share one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_adapter_speaks_http2_to_a_tls_provider_that_offers_it() {
    for provider in Provider::ALL {
        let setup = Setup::over_tls(provider, true).await;
        for stream in [true, false] {
            let task = react_task(provider, models::REACT, Some(stream));
            let (task, _) = setup.run_task(&task, stream).await;
            setup.expect_react_success(&task);
        }
        let requests = setup.mock.requests();
        assert_eq!(requests.len(), 4, "{}", setup.diagnosis());
        for request in &requests {
            assert_eq!(request.version, axum::http::Version::HTTP_2, "{provider}");
            assert_eq!(
                request.header("host"),
                None,
                "HTTP/2 names it in :authority"
            );
        }
        assert_eq!(
            setup.mock.connections(),
            1,
            "{provider}: one connection for all"
        );
    }
}

/// A TLS provider that does not take HTTP/2 gets HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adapter_speaks_http1_to_a_tls_provider_without_http2() {
    let provider = Provider::Anthropic;
    let setup = Setup::over_tls(provider, false).await;
    for stream in [true, false] {
        let task = react_task(provider, models::REACT, Some(stream));
        let (task, _) = setup.run_task(&task, stream).await;
        setup.expect_react_success(&task);
    }
    for request in setup.mock.requests() {
        assert_eq!(request.version, axum::http::Version::HTTP_11);
        assert!(request.header("host").is_some(), "HTTP/1.1 needs a Host");
    }
}

/// A provider whose certificate no trusted authority signed fails the task
/// at once, naming the fix, instead of retrying what cannot succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_certificate_from_an_untrusted_authority_names_ca_file() {
    let provider = Provider::OpenAi;
    let mock = MockProviders::start_tls(true).await;
    let harness = start_server(
        provider,
        &provider.manifest(),
        &mock.base_url_for(provider),
        &provider.test_key(),
    );
    expect_loaded(&harness, provider).await;
    let client = harness.client();
    let started = std::time::Instant::now();
    let id = client
        .submit(&react_task(provider, models::REACT, None))
        .await
        .unwrap();
    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    assert_eq!(task["status"], "failed", "task: {task:#}");
    assert_eq!(
        task["error"]["code"], "llm_adapter_misconfigured",
        "{task:#}"
    );
    let message = task["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("UnknownIssuer") && message.contains("[adapter] ca_file"),
        "{message}"
    );
    assert!(started.elapsed() < Duration::from_secs(10), "not retried");
    assert!(mock.requests().is_empty(), "nothing was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_provider_is_cut_at_call_timeout_ms() {
    let provider = Provider::OpenAi;
    let mock = MockProviders::start().await;
    mock.set_latency(Duration::from_secs(120));
    let manifest = format!("[limits]\ncall_timeout_ms = 1500\n{}", provider.manifest());
    let harness = start_server(
        provider,
        &manifest,
        &mock.base_url_for(provider),
        &provider.test_key(),
    );
    expect_loaded(&harness, provider).await;
    let client = harness.client();
    let started = std::time::Instant::now();
    let id = client
        .submit(&react_task(provider, models::REACT, Some(true)))
        .await
        .unwrap();
    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    let took = started.elapsed();
    assert_eq!(task["status"], "failed", "task: {task:#}");
    assert_eq!(task["error"]["code"], "llm_timeout", "task: {task:#}");
    assert!(
        took < Duration::from_secs(5),
        "cut at 1.5 s, retries included, but the task took {took:?}"
    );
    let message = task["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("call_timeout_ms"), "{message}");
}

/// A provider that streams a long answer in about a thousand deltas, to an
/// adapter whose manifest allows 50 a call: subscribers get 50, the log
/// says once how many were dropped, and the answer itself is whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_deltas_past_a_calls_limit_are_dropped_with_one_note() {
    let provider = Provider::OpenAi;
    let mock = MockProviders::start().await;
    let manifest = format!("{}\n[limits]\nmax_deltas = 50\n", provider.manifest());
    let harness = start_server(
        provider,
        &manifest,
        &mock.base_url_for(provider),
        &provider.test_key(),
    );
    expect_loaded(&harness, provider).await;
    let client = harness.client();

    let id = client
        .submit(&react_task(provider, models::LONG_ANSWER, Some(true)))
        .await
        .unwrap();
    let events = client.events(&id, None, FINISH).await.unwrap();
    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    assert_eq!(task["status"], "succeeded", "{task:#}");
    assert_eq!(
        task["result"],
        opspawn_testkit::providers::LONG_ANSWER,
        "the reply is kept whole"
    );

    let deltas: Vec<&str> = events
        .iter()
        .filter(|e| e.event == "llm.delta")
        .map(|e| e.data["data"]["text"].as_str().unwrap_or_default())
        .collect();
    // The 50 admitted deltas, gathered into fewer events.
    assert!(
        !deltas.is_empty() && deltas.len() <= 50,
        "{} delta events",
        deltas.len()
    );
    let answer = format!("Final Answer: {}", opspawn_testkit::providers::LONG_ANSWER);
    let streamed = deltas.concat();
    assert!(
        answer.starts_with(&streamed) && streamed.len() < answer.len(),
        "the deltas kept are the start of the answer: {streamed:?}"
    );
    let log = harness.server.log();
    let notes: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("streamed deltas"))
        .collect();
    assert_eq!(notes.len(), 1, "one note for the call: {notes:#?}");
    assert!(
        notes[0].contains("max_deltas") && notes[0].contains("limits of 50 streamed deltas"),
        "{}",
        notes[0]
    );
}

/// The text of a task's `llm.delta` events, with their ids.
fn deltas_of(events: &[SseEvent]) -> Vec<(i64, String)> {
    events
        .iter()
        .filter(|e| e.event == "llm.delta")
        .map(|e| {
            (
                e.id.parse().unwrap(),
                e.data["data"]["text"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect()
}

/// Streamed text is journaled, gathered into events: a subscriber that
/// drops mid-stream and comes back with `Last-Event-ID` gets the rest, and
/// what it saw before and after is exactly what a full replay holds, with
/// the same ids; the whole answer's text is there, in far fewer events than
/// the provider's thousand deltas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_text_resumes_after_last_event_id_with_the_same_ids() {
    let provider = Provider::OpenAi;
    let mock = MockProviders::start().await;
    let harness = start_server(
        provider,
        &provider.manifest(),
        &mock.base_url_for(provider),
        &provider.test_key(),
    );
    expect_loaded(&harness, provider).await;
    let client = harness.client();
    let id = client
        .submit(&react_task(provider, models::LONG_ANSWER, Some(true)))
        .await
        .unwrap();
    // Away after the third piece of streamed text.
    let before = client
        .events_until(&id, None, FINISH, |events| deltas_of(events).len() >= 3)
        .await
        .unwrap();
    let last_seen: i64 = before.last().unwrap().id.parse().unwrap();
    let after = client.events(&id, Some(last_seen), FINISH).await.unwrap();
    let replay = client.events(&id, None, FINISH).await.unwrap();

    let mut resumed = deltas_of(&before);
    resumed.extend(deltas_of(&after));
    let replayed = deltas_of(&replay);
    assert_eq!(resumed, replayed, "the same events, with the same ids");
    let ids: Vec<i64> = replay.iter().map(|e| e.id.parse().unwrap()).collect();
    assert_eq!(ids, (1..=ids.len() as i64).collect::<Vec<_>>(), "no gaps");
    let text: String = replayed.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(
        text,
        format!("Final Answer: {}", opspawn_testkit::providers::LONG_ANSWER)
    );
    assert!(
        replayed.len() < 200,
        "about a thousand deltas are gathered into {} events",
        replayed.len()
    );
}

/// A restart mid-stream: the text journaled before the kill is still there
/// for a subscriber that comes back with `Last-Event-ID`, under the ids it
/// had, and the step's next try streams on after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_text_journaled_before_a_restart_is_replayed_after_it() {
    let provider = Provider::OpenAi;
    let mock = MockProviders::start().await;
    let mut harness = start_server(
        provider,
        &provider.manifest(),
        &mock.base_url_for(provider),
        &provider.test_key(),
    );
    expect_loaded(&harness, provider).await;
    let client = harness.client();
    let id = client
        .submit(&react_task(provider, models::LONG_ANSWER, Some(true)))
        .await
        .unwrap();
    let before = client
        .events_until(&id, None, FINISH, |events| deltas_of(events).len() >= 2)
        .await
        .unwrap();
    harness.server.restart().unwrap();
    let client = harness.client();
    let first_seen = deltas_of(&before)[0].0;
    let after = client.events(&id, Some(first_seen), FINISH).await.unwrap();
    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    assert_eq!(task["status"], "succeeded", "{task:#}");
    let journaled = deltas_of(&after);
    assert_eq!(
        journaled.first(),
        deltas_of(&before).get(1),
        "what was journaled before the kill comes back under its id"
    );
    let answer = format!("Final Answer: {}", opspawn_testkit::providers::LONG_ANSWER);
    let text: String = journaled.iter().map(|(_, t)| t.as_str()).collect();
    assert!(
        text.ends_with(&answer),
        "the step's next try streams the whole answer after it: {} bytes",
        text.len()
    );
}

/// `[events] delta_bytes_per_step` caps what a step journals: the last
/// event is cut there and marked, and the reply is still whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_text_past_the_journal_cap_is_cut_and_marked() {
    let provider = Provider::OpenAi;
    let mock = MockProviders::start().await;
    let harness = start_server_with(
        provider,
        &provider.manifest(),
        &mock.base_url_for(provider),
        &provider.test_key(),
        &[("OPSPAWN_EVENTS__DELTA_BYTES_PER_STEP", "1000")],
    );
    expect_loaded(&harness, provider).await;
    let client = harness.client();
    let id = client
        .submit(&react_task(provider, models::LONG_ANSWER, Some(true)))
        .await
        .unwrap();
    let events = client.events(&id, None, FINISH).await.unwrap();
    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    assert_eq!(task["status"], "succeeded", "{task:#}");
    let answer = format!("Final Answer: {}", opspawn_testkit::providers::LONG_ANSWER);
    assert_eq!(task["result"], opspawn_testkit::providers::LONG_ANSWER);
    let deltas: Vec<&SseEvent> = events.iter().filter(|e| e.event == "llm.delta").collect();
    let text: String = deltas
        .iter()
        .map(|e| e.data["data"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text.len(), 1000, "cut at the cap");
    assert!(answer.starts_with(&text));
    let marked: Vec<&&SseEvent> = deltas
        .iter()
        .filter(|e| e.data["data"]["truncated"] == true)
        .collect();
    assert_eq!(marked.len(), 1, "{deltas:#?}");
    assert_eq!(marked[0].id, deltas.last().unwrap().id, "the last one");
}

/// The journaled provider data of an LLM step's reply, by key.
fn provider_data(step: &Value) -> Vec<(String, String)> {
    step["output"]["message"]["provider_data"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|datum| {
            (
                datum["key"].as_str().unwrap_or_default().to_owned(),
                datum["value"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// Checks a request the OpenAI adapter sent to the Responses API: the
/// endpoint, the question as input items, the system prompt as
/// instructions, the calculator as a flat function tool, and nothing of
/// Chat Completions (the mock would have refused it too; this says what the
/// request is, not only what it is not).
fn check_responses_request(request: &ProviderRequest, model: &str, stream: bool) {
    let body = &request.body;
    let context = || describe(request);
    assert_eq!(request.path, "/openai/v1/responses", "{}", context());
    assert_eq!(request.model.as_deref(), Some(model), "{}", context());
    assert_eq!(request.stream, stream, "{}", context());
    assert_eq!(body["stream"], stream, "{}", context());
    assert!(
        body["instructions"].as_str().is_some_and(|i| !i.is_empty()),
        "the system prompt is the instructions: {}",
        context()
    );
    assert_eq!(body["input"][0]["role"], "user", "{}", context());
    assert_eq!(
        body["input"][0]["content"][0]["type"],
        "input_text",
        "{}",
        context()
    );
    let calculator = &body["tools"][0];
    assert_eq!(calculator["name"], "calculator", "{}", context());
    assert!(
        calculator["parameters"]["properties"]["expression"].is_object(),
        "{}",
        context()
    );
    assert_eq!(calculator["strict"], false, "{}", context());
    assert_eq!(body["store"], false, "stateless: {}", context());
    assert_eq!(
        body["include"],
        json!(["reasoning.encrypted_content"]),
        "{}",
        context()
    );
    for key in ["messages", "stop", "stream_options", "api"] {
        assert!(body.get(key).is_none(), "no {key}: {}", context());
    }
}

/// The ReAct task with `model`, sent to the Responses API (its
/// `options.llm.api`), streamed or not.
fn responses_task(model: &str, stream: bool) -> Value {
    let mut task = react_task(Provider::OpenAi, model, None);
    task["options"] = json!({"llm": {"api": "responses", "stream": stream}});
    task
}

/// The Responses API through the real `openai` component, chosen per task
/// (`options.llm.api`): a reasoning model's ReAct task calls the calculator
/// and answers. Its reasoning item, sealed, is journaled with the step's
/// reply and goes back unchanged before the call it led to (the mock
/// refuses the second request otherwise, and checks the seal).
async fn the_responses_api_round_trips_reasoning(stream: bool) {
    let provider = Provider::OpenAi;
    let setup = Setup::start(provider).await;
    let task = responses_task(models::REASONING, stream);
    let (task, events) = setup.run_task(&task, stream).await;

    let steps = setup.expect_react_success(&task);
    assert_eq!(steps[1]["input"]["arguments"], json!({"expression": "6*7"}));

    // The reasoning is journaled whole, sealed content and all.
    let kept = provider_data(&steps[0]);
    let reasoning: Value = kept
        .iter()
        .find(|(key, _)| key == "openai:output:0")
        .map(|(_, value)| serde_json::from_str(value).unwrap())
        .unwrap_or_else(|| panic!("the reasoning item is journaled: {kept:#?}"));
    assert_eq!(reasoning["type"], "reasoning", "{reasoning:#}");
    let reasoning_id = reasoning["id"].as_str().unwrap();
    assert_eq!(
        reasoning["encrypted_content"],
        opspawn_testkit::providers::sealed_reasoning(reasoning_id),
        "{reasoning:#}"
    );
    let call_id = steps[1]["input"]["id"].as_str().unwrap();

    let requests = setup.mock.requests_for(provider);
    assert_eq!(requests.len(), 2, "{}", setup.diagnosis());
    for request in &requests {
        check_responses_request(request, models::REASONING, stream);
    }
    // Given back unchanged, right before the call it led to, which is
    // answered by its output.
    let input = requests[1].body["input"].as_array().unwrap();
    let at = input
        .iter()
        .position(|item| *item == reasoning)
        .unwrap_or_else(|| panic!("the reasoning goes back unchanged: {input:#?}"));
    assert_eq!(input[at + 1]["type"], "function_call", "{input:#?}");
    assert_eq!(input[at + 1]["call_id"], call_id, "{input:#?}");
    assert_eq!(input[at + 2]["type"], "function_call_output", "{input:#?}");
    assert_eq!(input[at + 2]["call_id"], call_id, "{input:#?}");

    if stream {
        let deltas = streamed_text(&events);
        assert!(
            deltas.ends_with("Final Answer: 42")
                && deltas.contains("calculator’s answer is in — it is 42"),
            "streamed text arrives as llm.delta events, whole: {deltas:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_responses_api_round_trips_reasoning_streaming() {
    the_responses_api_round_trips_reasoning(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_responses_api_round_trips_reasoning_without_streaming() {
    the_responses_api_round_trips_reasoning(false).await;
}

/// The API is the adapter's `api` setting, and a task's `options.llm.api`
/// overrides it; a name the adapter does not speak is refused before
/// anything is sent, naming the ones it does, and so is the option itself
/// by an adapter that speaks one API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_api_is_a_setting_a_task_can_override() {
    let setup = Setup::responses_by_default().await;
    for (options, path) in [
        (json!({}), "/openai/v1/responses"),
        (json!({"stream": false}), "/openai/v1/responses"),
        (
            json!({"api": "chat_completions"}),
            "/openai/v1/chat/completions",
        ),
    ] {
        let before = setup.mock.requests().len();
        let task = run_with_options(&setup, options.clone()).await;
        assert_eq!(
            task["status"],
            "succeeded",
            "{options}: {task:#}\n{}",
            setup.diagnosis()
        );
        assert_eq!(task["result"], "42", "{options}");
        let sent = &setup.mock.requests()[before..];
        assert_eq!(sent.len(), 2, "{options}: {}", setup.diagnosis());
        for request in sent {
            assert_eq!(request.path, path, "{options}: {}", describe(request));
        }
        if path.ends_with("/responses") {
            let stream = options["stream"] != false;
            for request in sent {
                check_responses_request(request, models::REACT, stream);
            }
        }
    }
    setup.expect_no_rejections();

    let before = setup.mock.requests().len();
    let task = run_with_options(&setup, json!({"api": "assistants"})).await;
    expect_invalid_options(
        &task,
        "api must be \"chat_completions\" or \"responses\" for OpenAI, not \"assistants\"",
        "an unknown API",
    );
    assert_eq!(
        setup.mock.requests().len(),
        before,
        "nothing was sent: {}",
        setup.diagnosis()
    );

    let setup = Setup::start(Provider::Anthropic).await;
    let task = run_with_options(&setup, json!({"api": "responses"})).await;
    expect_invalid_options(
        &task,
        "the Anthropic adapter speaks one API; leave api out",
        "Anthropic",
    );
    assert!(setup.mock.requests().is_empty(), "{}", setup.diagnosis());
}

/// Failures through the Responses API map as through Chat Completions: a
/// rejected key is `llm_auth` naming the variable, an answer that is not
/// JSON (streamed or not) `llm_bad_response`, and a rate limit is retried
/// after `Retry-After`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_responses_api_fails_and_retries_as_chat_completions_does() {
    let provider = Provider::OpenAi;
    let setup = Setup::start(provider).await;
    let run = |model: &'static str, stream: bool| {
        let task = responses_task(model, stream);
        let client = setup.client();
        async move {
            let id = client.submit(&task).await.unwrap();
            client.wait_until_finished(&id, FINISH).await.unwrap()
        }
    };

    let task = run(models::UNAUTHORIZED, true).await;
    assert_eq!(task["error"]["code"], "llm_auth", "{task:#}");
    let message = task["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("OPENAI_API_KEY"), "{message}");
    assert!(message.contains("Incorrect API key provided"), "{message}");
    assert_eq!(kinds(&task), ["llm"]);

    for stream in [true, false] {
        let task = run(models::MALFORMED, stream).await;
        assert_eq!(
            task["error"]["code"],
            "llm_bad_response",
            "stream {stream}: {task:#}\n{}",
            setup.diagnosis()
        );
    }

    let task = run(models::RATE_LIMITED_ONCE, true).await;
    assert_eq!(
        task["status"],
        "succeeded",
        "{task:#}\n{}",
        setup.diagnosis()
    );
    assert_eq!(task["result"], "42");
    assert_eq!(kinds(&task), ["llm", "tool", "llm"]);
    assert_eq!(setup.mock.calls(provider, models::RATE_LIMITED_ONCE), 3);
    setup.expect_no_rejections();
    assert!(
        setup
            .mock
            .requests()
            .iter()
            .all(|request| request.path == "/openai/v1/responses"),
        "{}",
        setup.diagnosis()
    );
}

/// Structured output and tool choice through the Responses API: the
/// task's response format goes as `text.format` (flat, the schema as
/// given), the JSON answer is the result, streamed or not; a forbidding
/// tool choice keeps the model from calling the calculator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_responses_api_takes_structured_output_and_tool_choice() {
    let setup = Setup::responses_by_default().await;
    for stream in [true, false] {
        let before = setup.mock.requests().len();
        let task = run_structured(&setup, models::REACT, stream).await;
        assert_eq!(
            task["status"],
            "succeeded",
            "stream {stream}: {task:#}\n{}",
            setup.diagnosis()
        );
        expect_structured_answer(&task);
        let sent = &setup.mock.requests()[before..];
        assert_eq!(sent.len(), 2, "{}", setup.diagnosis());
        for request in sent {
            check_responses_request(request, models::REACT, stream);
            assert_eq!(
                request.body["text"],
                json!({"format": {"type": "json_schema", "name": "calc",
                                  "schema": calc_schema(), "strict": false}}),
                "{}",
                describe(request)
            );
            assert!(request.body.get("response_format").is_none());
        }
    }

    let before = setup.mock.requests().len();
    let task = run_with_options(&setup, json!({"tool_choice": "none"})).await;
    assert_eq!(
        task["status"],
        "succeeded",
        "{task:#}\n{}",
        setup.diagnosis()
    );
    assert_eq!(kinds(&task), ["llm"], "no tool was called: {task:#}");
    let sent = &setup.mock.requests()[before..];
    assert_eq!(
        sent[0].body["tool_choice"],
        "none",
        "{}",
        describe(&sent[0])
    );
    let task = run_with_options(&setup, json!({"tool_choice": {"name": "calculator"}})).await;
    assert_eq!(task["result"], "42", "{task:#}\n{}", setup.diagnosis());
    let last = setup.mock.requests().pop().unwrap();
    assert_eq!(
        last.body["tool_choice"],
        json!({"type": "function", "name": "calculator"}),
        "{}",
        describe(&last)
    );
    setup.expect_no_rejections();
}

/// The real Responses API, when asked for (see [`live_react_task`]); the
/// model is `OPSPAWN_LIVE_OPENAI_MODEL`, else a small default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "calls the real provider: needs OPSPAWN_LIVE_TESTS=1 and its key"]
async fn live_react_task_through_the_responses_api() {
    live_react_task(Provider::OpenAi, Some(json!({"api": "responses"}))).await;
}
