//! The mocks checked on their own, with plain HTTP: they accept what the
//! providers accept, refuse what they refuse, and answer in their shapes.

use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{Value, json};

use super::{MockProviders, Provider, models, result_value};

const CALCULATOR_SCHEMA: &str = r#"{"type":"object","properties":{"expression":{"type":"string","description":"An arithmetic expression"}},"required":["expression"],"additionalProperties":false}"#;

fn schema() -> Value {
    serde_json::from_str(CALCULATOR_SCHEMA).unwrap()
}

const TOOL_OUTPUT: &str = r#"{"expression":"6*7","result":42}"#;

/// A well-formed OpenAI-style request, before or after the tool ran.
fn openai_body(model: &str, after_tool: bool, stream: bool) -> Value {
    let mut messages = vec![
        json!({"role": "system", "content": "You answer questions."}),
        json!({"role": "user", "content": "Question: What is 6 times 7?"}),
    ];
    if after_tool {
        messages.push(json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": "{\"expression\":\"6*7\"}"}}
        ]}));
        messages.push(json!({"role": "tool", "tool_call_id": "call_1", "content": TOOL_OUTPUT}));
    }
    let mut body = json!({
        "model": model,
        "messages": messages,
        "tools": [{"type": "function", "function": {"name": "calculator", "description": "Evaluates arithmetic", "parameters": schema()}}],
        "stop": ["Observation:"],
    });
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

fn anthropic_body(model: &str, after_tool: bool, stream: bool) -> Value {
    let mut messages = vec![json!({"role": "user", "content": "Question: What is 6 times 7?"})];
    if after_tool {
        messages.push(json!({"role": "assistant", "content": [
            {"type": "text", "text": "I'll compute it."},
            {"type": "tool_use", "id": "toolu_1", "name": "calculator", "input": {"expression": "6*7"}}
        ]}));
        messages.push(json!({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": TOOL_OUTPUT}
        ]}));
    }
    let mut body = json!({
        "model": model,
        "max_tokens": 1024,
        "system": "You answer questions.",
        "messages": messages,
        "tools": [{"name": "calculator", "description": "Evaluates arithmetic", "input_schema": schema()}],
        "stop_sequences": ["Observation:"],
    });
    if stream {
        body["stream"] = json!(true);
    }
    body
}

fn gemini_body(after_tool: bool) -> Value {
    let mut contents =
        vec![json!({"role": "user", "parts": [{"text": "Question: What is 6 times 7?"}]})];
    if after_tool {
        contents.push(json!({"role": "model", "parts": [
            {"functionCall": {"name": "calculator", "args": {"expression": "6*7"}},
             "thoughtSignature": super::gemini::THOUGHT_SIGNATURE}
        ]}));
        contents.push(json!({"role": "user", "parts": [
            {"functionResponse": {"name": "calculator", "response": {"result": TOOL_OUTPUT}}}
        ]}));
    }
    let mut parameters = schema();
    parameters
        .as_object_mut()
        .unwrap()
        .remove("additionalProperties");
    json!({
        "systemInstruction": {"parts": [{"text": "You answer questions."}]},
        "contents": contents,
        "tools": [{"functionDeclarations": [{"name": "calculator", "description": "Evaluates arithmetic", "parameters": parameters}]}],
        "generationConfig": {"stopSequences": ["Observation:"]},
    })
}

fn gemini_path(model: &str, stream: bool) -> String {
    if stream {
        format!("/v1beta/models/{model}:streamGenerateContent?alt=sse")
    } else {
        format!("/v1beta/models/{model}:generateContent")
    }
}

fn default_path(provider: Provider) -> &'static str {
    match provider {
        Provider::Anthropic => "/v1/messages",
        _ => "/chat/completions",
    }
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("{e}: {}", self.text))
    }

    /// The data of each SSE event, as JSON (`[DONE]` left out).
    async fn events(&self) -> Vec<(String, Value)> {
        let bytes = self.text.clone().into_bytes();
        let stream = futures::stream::iter([Ok::<_, std::io::Error>(bytes)]).eventsource();
        stream
            .filter_map(|event| async move {
                let event = event.unwrap();
                (event.data != "[DONE]").then(|| {
                    let data = serde_json::from_str(&event.data)
                        .unwrap_or_else(|e| panic!("{e}: {}", event.data));
                    (event.event, data)
                })
            })
            .collect()
            .await
    }
}

/// Posts `body` to `path` under `provider`'s mount with the right key and
/// headers, minus the ones named in `without`, plus `extra`.
async fn post(
    mock: &MockProviders,
    provider: Provider,
    path: &str,
    body: &Value,
    without: &[&str],
    extra: &[(&str, &str)],
) -> Answer {
    let mut headers: Vec<(String, String)> = vec![
        ("content-type".into(), "application/json".into()),
        (
            provider.auth_header().into(),
            provider.auth_value(&provider.test_key()),
        ),
    ];
    if provider == Provider::Anthropic {
        headers.push(("anthropic-version".into(), "2023-06-01".into()));
    }
    headers.retain(|(name, _)| !without.contains(&name.as_str()));
    headers.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let mut request = crate::http_client_builder()
        .build()
        .unwrap()
        .post(format!("{}{path}", mock.base_url_for(provider)))
        .body(body.to_string());
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let response = request.send().await.unwrap();
    Answer {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        text: response.text().await.unwrap(),
    }
}

async fn post_ok(mock: &MockProviders, provider: Provider, path: &str, body: &Value) -> Answer {
    let answer = post(mock, provider, path, body, &[], &[]).await;
    assert_eq!(answer.status, 200, "{provider}: {}", answer.text);
    answer
}

/// Expects a refusal with `status` whose body mentions `needle`.
async fn expect_refused(
    mock: &MockProviders,
    provider: Provider,
    path: &str,
    body: &Value,
    without: &[&str],
    status: u16,
    needle: &str,
) -> Value {
    let answer = post(mock, provider, path, body, without, &[]).await;
    assert_eq!(
        answer.status, status,
        "{provider} {needle}: {}",
        answer.text
    );
    assert!(
        answer.text.contains(needle),
        "{provider}: expected {needle:?} in {}",
        answer.text
    );
    let recorded = mock.requests().pop().unwrap();
    assert!(recorded.rejection.is_some(), "recorded as rejected");
    answer.json()
}

/// Expects OpenAI's mock to refuse `body` sent to `path` without a key.
async fn expect_refused_without_key(mock: &MockProviders, path: &str, body: &Value) -> Value {
    expect_refused(
        mock,
        Provider::OpenAi,
        path,
        body,
        &["authorization"],
        401,
        "didn't provide an API key",
    )
    .await
}

#[test]
fn the_result_value_is_found_in_any_wrapping() {
    assert_eq!(result_value(TOOL_OUTPUT), "42");
    assert_eq!(
        result_value(r#"{"result": "{\"expression\":\"6*7\",\"result\":42}"}"#),
        "42"
    );
    assert_eq!(result_value(r#"{"content": {"result": 42.5}}"#), "42.5");
    assert_eq!(result_value(r#"{"output": "{\"result\":7}"}"#), "7");
    assert_eq!(result_value(" 42 "), "42");
    assert_eq!(result_value(r#"{"result": "forty-two"}"#), "forty-two");
}

#[tokio::test]
async fn openai_style_mocks_call_the_calculator_then_answer() {
    let mock = MockProviders::start().await;
    for provider in [
        Provider::OpenAi,
        Provider::OpenRouter,
        Provider::OpenAiCompatible,
    ] {
        let first = post_ok(
            &mock,
            provider,
            "/chat/completions",
            &openai_body(models::REACT, false, false),
        )
        .await;
        let first = first.json();
        assert_eq!(first["object"], "chat.completion");
        let call = &first["choices"][0]["message"]["tool_calls"][0];
        assert_eq!(first["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(call["type"], "function");
        assert_eq!(call["function"]["name"], "calculator");
        let arguments: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(arguments, json!({"expression": "6*7"}));
        assert!(first["usage"]["prompt_tokens"].as_u64().unwrap() > 0);

        let second = post_ok(
            &mock,
            provider,
            "/chat/completions",
            &openai_body(models::REACT, true, false),
        )
        .await;
        let content = second.json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(content.ends_with("Final Answer: 42"), "{content}");
        assert_eq!(mock.calls(provider, models::REACT), 2);
    }
    assert!(mock.rejected().is_empty());
    let requests = mock.requests();
    assert_eq!(requests.len(), 6);
    assert!(requests[1].has_tool_result && !requests[0].has_tool_result);
    assert_eq!(
        requests[0].header("Authorization"),
        Some("Bearer test-key-openai")
    );
}

#[tokio::test]
async fn openai_style_streams_split_tool_arguments_and_end_with_done() {
    let mock = MockProviders::start().await;
    for provider in [
        Provider::OpenAi,
        Provider::OpenRouter,
        Provider::OpenAiCompatible,
    ] {
        let answer = post_ok(
            &mock,
            provider,
            "/chat/completions",
            &openai_body(models::REACT, false, true),
        )
        .await;
        assert!(
            answer.headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        assert!(answer.text.trim_end().ends_with("data: [DONE]"));
        if provider == Provider::OpenRouter {
            assert!(answer.text.starts_with(": OPENROUTER PROCESSING"));
        }
        let events = answer.events().await;
        let mut arguments = String::new();
        let mut argument_chunks = 0;
        for (_, chunk) in &events {
            assert_eq!(chunk["object"], "chat.completion.chunk");
            if let Some(piece) =
                chunk["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str()
                && !piece.is_empty()
            {
                arguments.push_str(piece);
                argument_chunks += 1;
            }
        }
        assert!(argument_chunks > 2, "arguments come in several chunks");
        assert_eq!(
            serde_json::from_str::<Value>(&arguments).unwrap(),
            json!({"expression": "6*7"})
        );
        let (_, last) = events.last().unwrap();
        assert_eq!(last["choices"], json!([]));
        assert!(last["usage"]["completion_tokens"].as_u64().unwrap() > 0);

        let answer = post_ok(
            &mock,
            provider,
            "/chat/completions",
            &openai_body(models::REACT, true, true),
        )
        .await;
        let text: String = answer
            .events()
            .await
            .iter()
            .filter_map(|(_, chunk)| {
                chunk["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect();
        assert!(text.ends_with("Final Answer: 42"), "{text}");
    }

    // Without include_usage, OpenAI sends no usage.
    let mut body = openai_body(models::REACT, true, true);
    body.as_object_mut().unwrap().remove("stream_options");
    let answer = post_ok(&mock, Provider::OpenAi, "/chat/completions", &body).await;
    assert!(
        answer
            .events()
            .await
            .iter()
            .all(|(_, chunk)| chunk.get("usage").is_none())
    );
}

#[tokio::test]
async fn openai_refuses_what_openai_refuses() {
    let mock = MockProviders::start().await;
    let openai = Provider::OpenAi;
    let path = "/chat/completions";
    let good = openai_body(models::REACT, true, false);

    let body = expect_refused_without_key(&mock, path, &good).await;
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let answer = post(
        &mock,
        openai,
        path,
        &good,
        &["authorization"],
        &[("authorization", "Bearer sk-wrong-key-123")],
    )
    .await;
    assert_eq!(answer.status, 401);
    assert_eq!(answer.json()["error"]["code"], "invalid_api_key");
    assert!(
        !answer.text.contains("sk-wrong-key-123"),
        "the key is masked"
    );
    expect_refused(
        &mock,
        openai,
        "/completions",
        &good,
        &[],
        404,
        "Invalid URL",
    )
    .await;
    expect_refused(
        &mock,
        openai,
        path,
        &good,
        &["content-type"],
        400,
        "could not parse the JSON body",
    )
    .await;

    let mut bad = good.clone();
    bad["messages"][3]
        .as_object_mut()
        .unwrap()
        .remove("tool_call_id");
    expect_refused(
        &mock,
        openai,
        path,
        &bad,
        &[],
        400,
        "'messages[3].tool_call_id'",
    )
    .await;

    let mut bad = good.clone();
    bad["messages"][2]["tool_calls"][0]["id"] = json!("call_other");
    expect_refused(
        &mock,
        openai,
        path,
        &bad,
        &[],
        400,
        "must be a response to a preceeding message with 'tool_calls'",
    )
    .await;

    let mut bad = good.clone();
    bad["messages"].as_array_mut().unwrap().pop();
    expect_refused(
        &mock,
        openai,
        path,
        &bad,
        &[],
        400,
        "did not have response messages: call_1",
    )
    .await;

    let mut bad = good.clone();
    bad["messages"][2]["tool_calls"][0]["function"]["arguments"] = json!({"expression": "6*7"});
    expect_refused(
        &mock,
        openai,
        path,
        &bad,
        &[],
        400,
        "expected a string, but got an object",
    )
    .await;

    let mut bad = good.clone();
    bad["messages"][1]["role"] = json!("human");
    expect_refused(
        &mock,
        openai,
        path,
        &bad,
        &[],
        400,
        "Invalid value: 'human'",
    )
    .await;

    let mut bad = good.clone();
    bad["tools"][0]["function"]["parameters"] = json!(CALCULATOR_SCHEMA);
    expect_refused(
        &mock,
        openai,
        path,
        &bad,
        &[],
        400,
        "'tools[0].function.parameters': expected an object",
    )
    .await;

    let mut bad = good.clone();
    bad["tools"][0]["type"] = json!("tool");
    expect_refused(&mock, openai, path, &bad, &[], 400, "'tools[0].type'").await;

    let mut bad = good.clone();
    bad["stream_options"] = json!({"include_usage": true});
    expect_refused(
        &mock,
        openai,
        path,
        &bad,
        &[],
        400,
        "only allowed when 'stream' is enabled",
    )
    .await;

    let mut bad = good.clone();
    bad["script"] = json!([]);
    expect_refused(
        &mock,
        openai,
        path,
        &bad,
        &[],
        400,
        "Unrecognized request argument supplied: script",
    )
    .await;

    let mut bad = good.clone();
    bad.as_object_mut().unwrap().remove("model");
    expect_refused(
        &mock,
        openai,
        path,
        &bad,
        &[],
        400,
        "you must provide a model parameter",
    )
    .await;

    // OpenRouter ignores fields it does not know, and has its own shape.
    let mut lenient = good.clone();
    lenient["provider"] = json!({"order": ["OpenAI"]});
    post_ok(&mock, Provider::OpenRouter, path, &lenient).await;
    let body = expect_refused(
        &mock,
        Provider::OpenRouter,
        path,
        &good,
        &["authorization"],
        401,
        "No auth credentials found",
    )
    .await;
    assert_eq!(body["error"]["code"], 401);

    assert_eq!(
        mock.calls(openai, models::REACT),
        0,
        "refused requests are not calls"
    );
}

#[tokio::test]
async fn anthropic_calls_the_calculator_then_answers() {
    let mock = MockProviders::start().await;
    let anthropic = Provider::Anthropic;
    let first = post_ok(
        &mock,
        anthropic,
        "/v1/messages",
        &anthropic_body(models::REACT, false, false),
    )
    .await
    .json();
    assert_eq!(first["type"], "message");
    assert_eq!(first["stop_reason"], "tool_use");
    assert_eq!(first["content"][0]["type"], "text");
    assert_eq!(first["content"][1]["type"], "tool_use");
    assert_eq!(first["content"][1]["input"], json!({"expression": "6*7"}));
    assert!(
        first["content"][1]["id"]
            .as_str()
            .unwrap()
            .starts_with("toolu_01")
    );
    let second = post_ok(
        &mock,
        anthropic,
        "/v1/messages",
        &anthropic_body(models::REACT, true, false),
    )
    .await
    .json();
    assert_eq!(second["stop_reason"], "end_turn");
    assert!(
        second["content"][0]["text"]
            .as_str()
            .unwrap()
            .ends_with("Final Answer: 42")
    );

    // Streamed: the documented event sequence, input JSON in pieces.
    let answer = post_ok(
        &mock,
        anthropic,
        "/v1/messages",
        &anthropic_body(models::REACT, false, true),
    )
    .await;
    let events = answer.events().await;
    let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names.first(), Some(&"message_start"));
    assert_eq!(names.last(), Some(&"message_stop"));
    assert!(names.contains(&"ping"));
    for (name, data) in &events {
        assert_eq!(
            data["type"],
            name.as_str(),
            "the event name repeats the type"
        );
    }
    let json_pieces: Vec<&str> = events
        .iter()
        .filter(|(_, data)| data["delta"]["type"] == "input_json_delta")
        .map(|(_, data)| data["delta"]["partial_json"].as_str().unwrap())
        .collect();
    assert!(json_pieces.len() > 2);
    assert_eq!(
        serde_json::from_str::<Value>(&json_pieces.concat()).unwrap(),
        json!({"expression": "6*7"})
    );
    let message_delta = events
        .iter()
        .find(|(name, _)| name == "message_delta")
        .unwrap();
    assert_eq!(message_delta.1["delta"]["stop_reason"], "tool_use");
    assert!(message_delta.1["usage"]["output_tokens"].as_u64().unwrap() > 0);
    assert!(
        events[0].1["message"]["usage"]["input_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert!(mock.rejected().is_empty(), "{:#?}", mock.rejected());
}

#[tokio::test]
async fn anthropic_refuses_what_anthropic_refuses() {
    let mock = MockProviders::start().await;
    let anthropic = Provider::Anthropic;
    let path = "/v1/messages";
    let good = anthropic_body(models::REACT, true, false);

    let body = expect_refused(
        &mock,
        anthropic,
        path,
        &good,
        &["x-api-key"],
        401,
        "x-api-key",
    )
    .await;
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "authentication_error");
    expect_refused(
        &mock,
        anthropic,
        path,
        &good,
        &["anthropic-version"],
        400,
        "anthropic-version: header is required",
    )
    .await;
    expect_refused(
        &mock,
        anthropic,
        "/v1/complete",
        &good,
        &[],
        404,
        "not_found_error",
    )
    .await;

    let mut bad = good.clone();
    bad.as_object_mut().unwrap().remove("max_tokens");
    expect_refused(
        &mock,
        anthropic,
        path,
        &bad,
        &[],
        400,
        "max_tokens: Field required",
    )
    .await;

    let mut bad = good.clone();
    bad["stop"] = json!(["Observation:"]);
    expect_refused(
        &mock,
        anthropic,
        path,
        &bad,
        &[],
        400,
        "stop: Extra inputs are not permitted",
    )
    .await;

    let mut bad = good.clone();
    bad["messages"]
        .as_array_mut()
        .unwrap()
        .insert(0, json!({"role": "system", "content": "Be brief."}));
    expect_refused(
        &mock,
        anthropic,
        path,
        &bad,
        &[],
        400,
        "Unexpected role \\\"system\\\"",
    )
    .await;

    let mut bad = good.clone();
    bad["messages"][2] = json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_other", "content": "42"}]});
    expect_refused(
        &mock,
        anthropic,
        path,
        &bad,
        &[],
        400,
        "unexpected `tool_use_id`",
    )
    .await;

    let mut bad = good.clone();
    bad["messages"][2] = json!({"role": "user", "content": "42"});
    expect_refused(
        &mock,
        anthropic,
        path,
        &bad,
        &[],
        400,
        "without `tool_result` blocks immediately after: toolu_1",
    )
    .await;

    let mut bad = good.clone();
    bad["messages"][2] = json!({"role": "tool", "tool_call_id": "toolu_1", "content": "42"});
    expect_refused(&mock, anthropic, path, &bad, &[], 400, "messages.2.role").await;

    let mut bad = good.clone();
    bad["messages"][1]["content"][0]["text"] = json!("");
    expect_refused(
        &mock,
        anthropic,
        path,
        &bad,
        &[],
        400,
        "text content blocks must be non-empty",
    )
    .await;

    let mut bad = good.clone();
    bad["messages"]
        .as_array_mut()
        .unwrap()
        .insert(1, json!({"role": "user", "content": "Again?"}));
    expect_refused(
        &mock,
        anthropic,
        path,
        &bad,
        &[],
        400,
        "roles must alternate",
    )
    .await;

    let mut bad = good.clone();
    bad["messages"][2]["content"] = json!([
        {"type": "text", "text": "Here you go"},
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "42"}
    ]);
    expect_refused(
        &mock,
        anthropic,
        path,
        &bad,
        &[],
        400,
        "tool_result blocks must come first",
    )
    .await;

    let mut bad = good.clone();
    bad["tools"][0]["parameters"] = bad["tools"][0]["input_schema"].take();
    bad["tools"][0]
        .as_object_mut()
        .unwrap()
        .remove("input_schema");
    expect_refused(
        &mock,
        anthropic,
        path,
        &bad,
        &[],
        400,
        "tools.0.input_schema: Field required",
    )
    .await;
}

#[tokio::test]
async fn gemini_calls_the_calculator_then_answers() {
    let mock = MockProviders::start().await;
    let gemini = Provider::Gemini;
    let first = post_ok(
        &mock,
        gemini,
        &gemini_path(models::REACT, false),
        &gemini_body(false),
    )
    .await
    .json();
    let part = &first["candidates"][0]["content"]["parts"][0];
    assert_eq!(
        part["functionCall"],
        json!({"name": "calculator", "args": {"expression": "6*7"}})
    );
    assert_eq!(first["candidates"][0]["finishReason"], "STOP");
    assert!(first["usageMetadata"]["promptTokenCount"].as_u64().unwrap() > 0);

    let second = post_ok(
        &mock,
        gemini,
        &gemini_path(models::REACT, false),
        &gemini_body(true),
    )
    .await
    .json();
    let text = second["candidates"][0]["content"]["parts"][0]["text"]
        .as_str()
        .unwrap();
    assert!(text.ends_with("Final Answer: 42"), "{text}");

    let answer = post_ok(
        &mock,
        gemini,
        &gemini_path(models::REACT, true),
        &gemini_body(true),
    )
    .await;
    assert!(
        answer.text.contains("\r\n\r\n"),
        "Google ends SSE events with CRLF"
    );
    let chunks = answer.events().await;
    assert!(chunks.len() >= 3);
    let text: String = chunks
        .iter()
        .map(|(_, chunk)| {
            chunk["candidates"][0]["content"]["parts"][0]["text"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert!(text.ends_with("Final Answer: 42"), "{text}");
    assert_eq!(
        chunks.last().unwrap().1["candidates"][0]["finishReason"],
        "STOP"
    );

    // Without alt=sse, a stream is one JSON array.
    let array = post_ok(
        &mock,
        gemini,
        &format!("/v1beta/models/{}:streamGenerateContent", models::REACT),
        &gemini_body(true),
    )
    .await
    .json();
    assert!(array.as_array().is_some_and(|a| a.len() >= 3));

    // snake_case field names are accepted too.
    let snake = json!({
        "system_instruction": {"parts": [{"text": "Be brief."}]},
        "contents": [{"role": "user", "parts": [{"text": "Hi"}]}],
        "generation_config": {"max_output_tokens": 100},
    });
    post_ok(&mock, gemini, &gemini_path(models::REACT, false), &snake).await;
    assert!(mock.rejected().is_empty(), "{:#?}", mock.rejected());
    let request = &mock.requests()[2];
    assert_eq!(request.model.as_deref(), Some(models::REACT));
    assert!(request.stream);
    assert_eq!(request.query.as_deref(), Some("alt=sse"));
}

#[tokio::test]
async fn gemini_refuses_what_gemini_refuses() {
    let mock = MockProviders::start().await;
    let gemini = Provider::Gemini;
    let path = gemini_path(models::REACT, false);
    let good = gemini_body(true);

    let body = expect_refused(
        &mock,
        gemini,
        &path,
        &good,
        &["x-goog-api-key"],
        403,
        "PERMISSION_DENIED",
    )
    .await;
    assert_eq!(body["error"]["code"], 403);
    let answer = post(
        &mock,
        gemini,
        &path,
        &good,
        &["x-goog-api-key"],
        &[("x-goog-api-key", "AIzaWrong")],
    )
    .await;
    assert_eq!(answer.status, 400);
    assert_eq!(
        answer.json()["error"]["details"][0]["reason"],
        "API_KEY_INVALID"
    );
    expect_refused(
        &mock,
        gemini,
        "/v1/models/mock-react:generateContent",
        &good,
        &[],
        404,
        "NOT_FOUND",
    )
    .await;

    let mut bad = good.clone();
    bad["tools"][0]["functionDeclarations"][0]["parameters"] = schema();
    expect_refused(
        &mock,
        gemini,
        &path,
        &bad,
        &[],
        400,
        "Unknown name \\\"additionalProperties\\\"",
    )
    .await;

    let mut bad = good.clone();
    bad["tools"][0]["functionDeclarations"][0]["parameters"]["properties"]["expression"]["type"] =
        json!(["string", "null"]);
    expect_refused(
        &mock,
        gemini,
        &path,
        &bad,
        &[],
        400,
        "Proto field is not repeating",
    )
    .await;

    let mut bad = good.clone();
    bad["contents"][1]["role"] = json!("assistant");
    expect_refused(
        &mock,
        gemini,
        &path,
        &bad,
        &[],
        400,
        "Please use a valid role: user, model.",
    )
    .await;

    let mut bad = good.clone();
    bad["contents"][2]["parts"][0]["functionResponse"]["response"] = json!(TOOL_OUTPUT);
    expect_refused(
        &mock,
        gemini,
        &path,
        &bad,
        &[],
        400,
        "function_response.response",
    )
    .await;

    let mut bad = good.clone();
    bad["contents"][2] = json!({"role": "user", "parts": [{"text": "42"}]});
    expect_refused(
        &mock,
        gemini,
        &path,
        &bad,
        &[],
        400,
        "function response turn comes immediately after a function call turn",
    )
    .await;

    let mut bad = good.clone();
    bad["contents"][1]["parts"] =
        json!([{"text": ""}, {"functionCall": {"name": "calculator", "args": {}}}]);
    expect_refused(&mock, gemini, &path, &bad, &[], 400, "empty text parameter").await;

    let mut bad = good.clone();
    bad["systemInstruction"] = json!("You answer questions.");
    expect_refused(&mock, gemini, &path, &bad, &[], 400, "system_instruction").await;

    let mut bad = good.clone();
    bad["stream"] = json!(false);
    expect_refused(
        &mock,
        gemini,
        &path,
        &bad,
        &[],
        400,
        "Unknown name \\\"stream\\\"",
    )
    .await;

    let mut bad = good.clone();
    bad["generationConfig"]["max_tokens"] = json!(100);
    expect_refused(
        &mock,
        gemini,
        &path,
        &bad,
        &[],
        400,
        "Unknown name \\\"max_tokens\\\" at 'generation_config'",
    )
    .await;
}

#[tokio::test]
async fn the_failing_models_fail_as_the_providers_do() {
    let mock = MockProviders::start().await;
    for provider in Provider::ALL {
        let request = |model: &str| match provider {
            Provider::Anthropic => (
                default_path(provider).to_owned(),
                anthropic_body(model, false, false),
            ),
            Provider::Gemini => (gemini_path(model, false), gemini_body(false)),
            _ => (
                default_path(provider).to_owned(),
                openai_body(model, false, false),
            ),
        };

        let (path, body) = request(models::UNAUTHORIZED);
        let answer = post(&mock, provider, &path, &body, &[], &[]).await;
        assert_eq!(answer.status, 401, "{provider}: {}", answer.text);
        assert!(answer.json()["error"].is_object());

        let (path, body) = request(models::RATE_LIMITED_ONCE);
        let answer = post(&mock, provider, &path, &body, &[], &[]).await;
        assert_eq!(answer.status, 429, "{provider}: {}", answer.text);
        assert_eq!(answer.headers["retry-after"], "1");
        post_ok(&mock, provider, &path, &body).await;
        assert_eq!(mock.calls(provider, models::RATE_LIMITED_ONCE), 2);

        let (path, body) = request(models::SERVER_ERROR_ONCE);
        let answer = post(&mock, provider, &path, &body, &[], &[]).await;
        assert_eq!(answer.status, 500, "{provider}: {}", answer.text);
        post_ok(&mock, provider, &path, &body).await;

        let (path, body) = request(models::MALFORMED);
        let answer = post_ok(&mock, provider, &path, &body).await;
        assert!(
            serde_json::from_str::<Value>(&answer.text).is_err(),
            "{provider}: not JSON"
        );

        let (path, body) = request("no-such-model");
        let answer = post(&mock, provider, &path, &body, &[], &[]).await;
        assert_eq!(answer.status, 404, "{provider}: {}", answer.text);
    }
    assert!(mock.rejected().is_empty(), "{:#?}", mock.rejected());
}

#[test]
fn manifests_take_the_base_url_from_its_variable_and_the_key_as_a_credential() {
    let manifest = Provider::Anthropic.manifest();
    assert!(
        manifest.contains(r#"base_url = "${ANTHROPIC_BASE_URL:-https://api.anthropic.com}""#),
        "{manifest}"
    );
    assert!(manifest.contains(r#"header = "x-api-key""#), "{manifest}");
    assert!(
        manifest.contains(r#"value = "${ANTHROPIC_API_KEY}""#),
        "{manifest}"
    );
    let manifest = Provider::OpenAi.legacy_manifest("http://127.0.0.1:9");
    assert!(
        manifest.contains(r#"value = "Bearer ${OPENAI_API_KEY}""#),
        "{manifest}"
    );
    assert!(
        manifest.contains(r#"host = "http://127.0.0.1:9""#),
        "{manifest}"
    );
}

#[tokio::test]
async fn gemini_wants_the_thought_signature_of_the_current_turns_calls() {
    let mock = MockProviders::start().await;
    let gemini = Provider::Gemini;
    let path = gemini_path(models::REACT, false);
    let first = post_ok(&mock, gemini, &path, &gemini_body(false))
        .await
        .json();
    assert_eq!(
        first["candidates"][0]["content"]["parts"][0]["thoughtSignature"],
        super::gemini::THOUGHT_SIGNATURE,
        "the mock's call carries a signature"
    );
    post_ok(&mock, gemini, &path, &gemini_body(true)).await;

    let mut bad = gemini_body(true);
    bad["contents"][1]["parts"][0]
        .as_object_mut()
        .unwrap()
        .remove("thoughtSignature");
    expect_refused(
        &mock,
        gemini,
        &path,
        &bad,
        &[],
        400,
        "Function call is missing a thought_signature",
    )
    .await;
    bad["contents"][1]["parts"][0]["thoughtSignature"] = json!("bm90IHRoZSBzaWduYXR1cmU=");
    expect_refused(
        &mock,
        gemini,
        &path,
        &bad,
        &[],
        400,
        "Corrupted thought signature",
    )
    .await;

    // Only the current turn is checked: after a new user text, an old call
    // without its signature is accepted, as Gemini accepts it.
    let mut older = bad.clone();
    older["contents"][1]["parts"][0]
        .as_object_mut()
        .unwrap()
        .remove("thoughtSignature");
    older["contents"]
        .as_array_mut()
        .unwrap()
        .push(json!({"role": "model", "parts": [{"text": "It is 42."}]}));
    older["contents"]
        .as_array_mut()
        .unwrap()
        .push(json!({"role": "user", "parts": [{"text": "And 6 times 8?"}]}));
    post_ok(&mock, gemini, &path, &older).await;
}

#[tokio::test]
async fn anthropic_2026_10_21_refuses_sampling_options() {
    let mock = MockProviders::start().await;
    let anthropic = Provider::Anthropic;
    let version = [("anthropic-version", "2026-10-21")];
    let body = anthropic_body(models::REACT, false, false);
    let answer = post(
        &mock,
        anthropic,
        "/v1/messages",
        &body,
        &["anthropic-version"],
        &version,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    for (field, value) in [
        ("temperature", json!(0.5)),
        ("top_p", json!(0.9)),
        ("top_k", json!(5)),
    ] {
        let mut bad = body.clone();
        bad[field] = value;
        let answer = post(
            &mock,
            anthropic,
            "/v1/messages",
            &bad,
            &["anthropic-version"],
            &version,
        )
        .await;
        assert_eq!(answer.status, 400, "{field}: {}", answer.text);
        assert!(
            answer
                .text
                .contains("not supported in API version 2026-10-21"),
            "{field}: {}",
            answer.text
        );
        // The older version takes them.
        post_ok(&mock, anthropic, "/v1/messages", &bad).await;
    }
    let mut bad = body.clone();
    bad["temperature"] = json!(1.5);
    expect_refused(
        &mock,
        anthropic,
        "/v1/messages",
        &bad,
        &[],
        400,
        "temperature",
    )
    .await;
}

#[tokio::test]
async fn anthropic_wants_the_thinking_block_back_before_a_tool_use() {
    let mock = MockProviders::start().await;
    let anthropic = Provider::Anthropic;
    let thinking = json!({"type": "enabled", "budget_tokens": 1024});
    let mut body = anthropic_body(models::REACT, false, false);
    body["thinking"] = thinking.clone();
    body["max_tokens"] = json!(2048);
    let first = post_ok(&mock, anthropic, "/v1/messages", &body)
        .await
        .json();
    let block = first["content"][0].clone();
    assert_eq!(block["type"], "thinking", "{first:#}");
    assert_eq!(
        block["signature"],
        super::thinking_signature(block["thinking"].as_str().unwrap())
    );

    let mut after = anthropic_body(models::REACT, true, false);
    after["thinking"] = thinking;
    after["max_tokens"] = json!(2048);
    expect_refused(
        &mock,
        anthropic,
        "/v1/messages",
        &after,
        &[],
        400,
        "must start with a thinking block",
    )
    .await;
    let blocks = after["messages"][1]["content"].as_array_mut().unwrap();
    blocks.insert(0, block.clone());
    post_ok(&mock, anthropic, "/v1/messages", &after).await;
    let mut changed = after.clone();
    changed["messages"][1]["content"][0]["thinking"] = json!("Something else entirely.");
    expect_refused(
        &mock,
        anthropic,
        "/v1/messages",
        &changed,
        &[],
        400,
        "Invalid `signature` in `thinking` block",
    )
    .await;
}

/// The answer schema of the structured-output checks: closed, so every
/// provider takes it as it is.
fn answer_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "answer": {"type": "integer"},
            "explanation": {"type": "string"},
        },
        "required": ["answer", "explanation"],
        "additionalProperties": false,
    })
}

/// A well-formed request of `provider` after the tool ran, asking for
/// structured output in the provider's shape.
fn structured_body(provider: Provider, model: &str) -> Value {
    match provider {
        Provider::Anthropic => {
            let mut body = anthropic_body(model, true, false);
            body["output_config"] =
                json!({"format": {"type": "json_schema", "schema": answer_schema()}});
            body
        }
        Provider::Gemini => {
            let mut body = gemini_body(true);
            let mut schema = answer_schema();
            schema
                .as_object_mut()
                .unwrap()
                .remove("additionalProperties");
            body["generationConfig"]["responseMimeType"] = json!("application/json");
            body["generationConfig"]["responseSchema"] = schema;
            body
        }
        _ => {
            let mut body = openai_body(model, true, false);
            body["response_format"] = json!({"type": "json_schema", "json_schema": {
                "name": "calc", "schema": answer_schema(), "strict": true,
            }});
            body
        }
    }
}

/// The text of a whole (not streamed) answer.
fn answer_text(provider: Provider, answer: &Value) -> String {
    let text = match provider {
        Provider::Anthropic => &answer["content"][0]["text"],
        Provider::Gemini => &answer["candidates"][0]["content"]["parts"][0]["text"],
        _ => &answer["choices"][0]["message"]["content"],
    };
    text.as_str()
        .unwrap_or_else(|| panic!("{provider}: no text in {answer}"))
        .to_owned()
}

#[tokio::test]
async fn structured_output_is_answered_with_json_built_from_the_schema() {
    let mock = MockProviders::start().await;
    for provider in Provider::ALL {
        let path = match provider {
            Provider::Gemini => gemini_path(models::REACT, false),
            other => default_path(other).to_owned(),
        };
        let off_path = match provider {
            Provider::Gemini => gemini_path(models::OFF_SCHEMA, false),
            other => default_path(other).to_owned(),
        };
        let answer = post_ok(
            &mock,
            provider,
            &path,
            &structured_body(provider, models::REACT),
        )
        .await
        .json();
        let text = answer_text(provider, &answer);
        assert_eq!(
            serde_json::from_str::<Value>(&text).unwrap_or(Value::Null),
            json!({"answer": 42, "explanation": "42"}),
            "{provider}: {text}"
        );
        let off = post_ok(
            &mock,
            provider,
            &off_path,
            &structured_body(provider, models::OFF_SCHEMA),
        )
        .await
        .json();
        let text = answer_text(provider, &off);
        assert_eq!(
            serde_json::from_str::<Value>(&text).unwrap_or(Value::Null),
            json!({"answer": "42", "explanation": "42"}),
            "{provider}: the first required property has the wrong type: {text}"
        );
        // Without a format, the same model answers in prose.
        let plain = match provider {
            Provider::Anthropic => anthropic_body(models::REACT, true, false),
            Provider::Gemini => gemini_body(true),
            _ => openai_body(models::REACT, true, false),
        };
        let text = answer_text(
            provider,
            &post_ok(&mock, provider, &path, &plain).await.json(),
        );
        assert!(text.contains("Final Answer: 42"), "{provider}: {text}");
    }
}

#[tokio::test]
async fn openai_refuses_response_formats_openai_refuses() {
    let mock = MockProviders::start().await;
    let openai = Provider::OpenAi;
    let path = "/chat/completions";
    let open = json!({"type": "object", "properties": {"answer": {"type": "integer"}}});
    let not_all_required = json!({
        "type": "object",
        "properties": {"answer": {"type": "integer"}, "why": {"type": "string"}},
        "required": ["answer"],
        "additionalProperties": false,
    });
    let nested_open = json!({
        "type": "object",
        "properties": {"inner": {"type": "object", "properties": {}}},
        "required": ["inner"],
        "additionalProperties": false,
    });
    let cases = [
        (json!("json_schema"), "expected an object"),
        (json!({"type": "json"}), "Supported values are"),
        (
            json!({"type": "json_schema"}),
            "response_format.json_schema",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"schema": open}}),
            "response_format.json_schema.name",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "has space", "schema": open}}),
            "does not match pattern",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "calc", "schema": "{}"}}),
            "response_format.json_schema.schema",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "calc", "schema": open, "strict": "yes"}}),
            "expected a boolean",
        ),
        (
            json!({"type": "json_schema", "name": "calc", "schema": open}),
            "Unknown parameter: 'response_format.name'",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "calc", "schema": open, "format": "x"}}),
            "Unknown parameter: 'response_format.json_schema.format'",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "calc", "schema": open, "strict": true}}),
            "'additionalProperties' is required to be supplied and to be false",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "calc", "schema": not_all_required, "strict": true}}),
            "Missing 'why'",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "calc", "schema": nested_open, "strict": true}}),
            "In context=('properties', 'inner')",
        ),
    ];
    for (format, needle) in cases {
        let mut body = openai_body(models::REACT, false, false);
        body["response_format"] = format;
        expect_refused(&mock, openai, path, &body, &[], 400, needle).await;
    }
    // Not strict, an open schema is taken; so are the other types.
    for format in [
        json!({"type": "json_schema", "json_schema": {"name": "calc", "schema": open, "strict": false}}),
        json!({"type": "json_schema", "json_schema": {"name": "calc", "schema": open}}),
        json!({"type": "json_object"}),
        json!({"type": "text"}),
    ] {
        let mut body = openai_body(models::REACT, false, false);
        body["response_format"] = format;
        post_ok(&mock, openai, path, &body).await;
    }
}

#[tokio::test]
async fn anthropic_refuses_structured_output_anthropic_refuses() {
    let mock = MockProviders::start().await;
    let anthropic = Provider::Anthropic;
    let path = "/v1/messages";
    let closed = answer_schema();
    let with_config = |config: Value| {
        let mut body = anthropic_body(models::REACT, false, false);
        body["output_config"] = config;
        body
    };
    let format =
        |schema: Value| with_config(json!({"format": {"type": "json_schema", "schema": schema}}));
    let cases = [
        (
            with_config(json!("json")),
            "output_config: Input should be a valid dictionary",
        ),
        (
            with_config(json!({"fromat": {}})),
            "output_config.fromat: Extra inputs",
        ),
        (
            with_config(json!({"format": {"type": "json_object", "schema": closed}})),
            "output_config.format.type: Input should be 'json_schema'",
        ),
        (
            with_config(json!({"format": {"type": "json_schema"}})),
            "output_config.format.schema: Field required",
        ),
        (
            with_config(
                json!({"format": {"type": "json_schema", "name": "calc", "schema": closed}}),
            ),
            "output_config.format.name: Extra inputs",
        ),
        (
            format(json!({"type": "object", "properties": {"a": {"type": "string"}}})),
            "'additionalProperties' must be explicitly set to false",
        ),
        (
            format(json!({"type": "object", "properties": {}, "additionalProperties": true})),
            "'additionalProperties: true' is not supported",
        ),
        (
            format(
                json!({"type": "object", "additionalProperties": false, "properties": {
                "n": {"type": "integer", "minimum": 0}}}),
            ),
            "output_config.format.schema.properties.n: 'minimum' is not supported",
        ),
        (
            format(
                json!({"type": "object", "additionalProperties": false, "properties": {
                "list": {"type": "array", "minItems": 2, "items": {"type": "string"}}}}),
            ),
            "'minItems' values other than 0 or 1",
        ),
        (
            format(
                json!({"type": "object", "additionalProperties": false, "properties": {
                "either": {"oneOf": [{"type": "string"}, {"type": "integer"}]}}}),
            ),
            "'oneOf' is not supported",
        ),
    ];
    for (body, needle) in cases {
        expect_refused(&mock, anthropic, path, &body, &[], 400, needle).await;
    }
    post_ok(&mock, anthropic, path, &format(closed.clone())).await;

    // The beta's shape needs its header.
    let mut beta = anthropic_body(models::REACT, false, false);
    beta["output_format"] = json!({"type": "json_schema", "schema": closed});
    expect_refused(
        &mock,
        anthropic,
        path,
        &beta,
        &[],
        400,
        "output_format: Extra inputs are not permitted",
    )
    .await;
    let header = [("anthropic-beta", "structured-outputs-2025-11-13")];
    let answer = post(&mock, anthropic, path, &beta, &[], &header).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let mut both = format(closed.clone());
    both["output_format"] = json!({"type": "json_schema", "schema": closed});
    let answer = post(&mock, anthropic, path, &both, &[], &header).await;
    assert_eq!(answer.status, 400, "{}", answer.text);
}

#[tokio::test]
async fn gemini_refuses_response_schemas_gemini_refuses() {
    let mock = MockProviders::start().await;
    let gemini = Provider::Gemini;
    let path = gemini_path(models::REACT, false);
    let mut openapi = answer_schema();
    openapi
        .as_object_mut()
        .unwrap()
        .remove("additionalProperties");
    let with = |config: Value| {
        let mut body = gemini_body(false);
        for (key, value) in config.as_object().unwrap() {
            body["generationConfig"][key] = value.clone();
        }
        body
    };
    let cases = [
        (
            with(json!({"responseSchema": openapi})),
            "response_mime_type must be set to `application/json`",
        ),
        (
            with(json!({"responseMimeType": "application/xml", "responseSchema": openapi})),
            "allowed mimetypes",
        ),
        (
            with(
                json!({"responseMimeType": "application/json", "responseSchema": answer_schema()}),
            ),
            // The body is JSON, so the quotes come escaped.
            r#"Unknown name \"additionalProperties\" at 'generation_config.response_schema'"#,
        ),
        (
            with(
                json!({"responseMimeType": "application/json", "responseSchema": openapi,
                        "responseJsonSchema": answer_schema()}),
            ),
            "cannot both be set",
        ),
    ];
    for (body, needle) in cases {
        expect_refused(&mock, gemini, &path, &body, &[], 400, needle).await;
    }
    post_ok(
        &mock,
        gemini,
        &path,
        &with(json!({"responseMimeType": "application/json", "responseSchema": openapi})),
    )
    .await;
    post_ok(
        &mock,
        gemini,
        &path,
        &with(
            json!({"responseMimeType": "application/json", "responseJsonSchema": answer_schema()}),
        ),
    )
    .await;
}

/// A well-formed Responses API request, before or after the tool ran, as
/// the OpenAI adapter sends it.
fn responses_body(model: &str, after_tool: bool, stream: bool) -> Value {
    let mut input = vec![json!({"type": "message", "role": "user",
        "content": [{"type": "input_text", "text": "Question: What is 6 times 7?"}]})];
    if after_tool {
        input.push(
            json!({"type": "function_call", "call_id": "call_1", "name": "calculator",
            "arguments": "{\"expression\":\"6*7\"}"}),
        );
        input.push(json!({"type": "function_call_output", "call_id": "call_1",
            "output": TOOL_OUTPUT}));
    }
    json!({
        "model": model,
        "instructions": "You answer questions.",
        "input": input,
        "tools": [{"type": "function", "name": "calculator", "description": "Evaluates arithmetic",
                   "parameters": schema(), "strict": false}],
        "stream": stream,
        "store": false,
        "include": ["reasoning.encrypted_content"],
    })
}

/// Posts [`responses_body`] to OpenAI's Responses API mock, which must
/// accept it.
async fn post_responses(
    mock: &MockProviders,
    model: &str,
    after_tool: bool,
    stream: bool,
) -> Answer {
    let body = responses_body(model, after_tool, stream);
    post_ok(mock, Provider::OpenAi, "/responses", &body).await
}

/// Expects OpenAI's Responses API mock to refuse `body` as a bad request
/// whose error mentions `needle`.
async fn responses_refused(mock: &MockProviders, body: &Value, needle: &str) -> Value {
    expect_refused(mock, Provider::OpenAi, "/responses", body, &[], 400, needle).await
}

#[tokio::test]
async fn openai_responses_calls_the_calculator_then_answers() {
    let mock = MockProviders::start().await;
    let first = post_responses(&mock, models::REACT, false, false)
        .await
        .json();
    assert_eq!(first["object"], "response");
    assert_eq!(first["status"], "completed");
    assert_eq!(first["store"], false, "the request's settings are echoed");
    let output = first["output"].as_array().unwrap();
    assert_eq!(output.len(), 1, "no reasoning from mock-react: {first:#}");
    let call = &output[0];
    assert_eq!(call["type"], "function_call");
    assert_eq!(call["name"], "calculator");
    assert!(call["id"].as_str().unwrap().starts_with("fc_"));
    assert!(call["call_id"].as_str().unwrap().starts_with("call_"));
    let arguments: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(arguments, json!({"expression": "6*7"}));
    assert!(first["usage"]["input_tokens"].as_u64().unwrap() > 0);
    assert!(first["usage"]["output_tokens"].as_u64().unwrap() > 0);

    let second = post_responses(&mock, models::REACT, true, false)
        .await
        .json();
    let message = &second["output"][0];
    assert_eq!(message["type"], "message");
    assert_eq!(message["role"], "assistant");
    let text = message["content"][0]["text"].as_str().unwrap();
    assert!(text.ends_with("Final Answer: 42"), "{text}");
    assert_eq!(message["content"][0]["type"], "output_text");

    // Streamed: the real event sequence, no [DONE].
    let answer = post_responses(&mock, models::REACT, false, true).await;
    assert!(
        answer.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    assert!(!answer.text.contains("[DONE]"));
    let events = answer.events().await;
    let kinds: Vec<&str> = events
        .iter()
        .map(|(_, data)| data["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds[..3],
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added"
        ]
    );
    assert_eq!(kinds.last(), Some(&"response.completed"));
    for (n, (name, data)) in events.iter().enumerate() {
        assert_eq!(
            name,
            data["type"].as_str().unwrap(),
            "the event is named by its type"
        );
        assert_eq!(data["sequence_number"], n, "{data}");
    }
    let arguments: String = events
        .iter()
        .filter(|(_, data)| data["type"] == "response.function_call_arguments.delta")
        .map(|(_, data)| data["delta"].as_str().unwrap())
        .collect();
    assert!(
        kinds
            .iter()
            .filter(|k| **k == "response.function_call_arguments.delta")
            .count()
            > 2,
        "arguments come in several deltas"
    );
    assert_eq!(
        serde_json::from_str::<Value>(&arguments).unwrap(),
        json!({"expression": "6*7"})
    );
    let (_, completed) = events.last().unwrap();
    assert_eq!(
        completed["response"]["output"][0]["arguments"],
        arguments.as_str()
    );
    assert!(
        completed["response"]["usage"]["output_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );

    let answer = post_responses(&mock, models::REACT, true, true).await;
    let text: String = answer
        .events()
        .await
        .iter()
        .filter(|(_, data)| data["type"] == "response.output_text.delta")
        .map(|(_, data)| data["delta"].as_str().unwrap().to_owned())
        .collect();
    assert!(text.ends_with("Final Answer: 42"), "{text}");
    assert!(mock.rejected().is_empty(), "{:#?}", mock.rejected());
    assert!(mock.requests()[1].has_tool_result);
}

#[tokio::test]
async fn openai_responses_refuses_what_openai_refuses() {
    let mock = MockProviders::start().await;
    let openai = Provider::OpenAi;
    let path = "/responses";
    let good = responses_body(models::REACT, true, false);
    post_ok(&mock, openai, path, &good).await;

    let refused = |change: &dyn Fn(&mut Value), needle: &'static str| {
        let mut bad = good.clone();
        change(&mut bad);
        (bad, needle)
    };
    let cases = [
        // Chat Completions' fields, and its shapes.
        refused(
            &|b| b["messages"] = json!([{"role": "user", "content": "hi"}]),
            "Unsupported parameter: 'messages'. In the Responses API, this parameter has moved to 'input'",
        ),
        refused(
            &|b| b["max_tokens"] = json!(64),
            "has moved to 'max_output_tokens'",
        ),
        refused(
            &|b| b["response_format"] = json!({"type": "json_object"}),
            "has moved to 'text.format'",
        ),
        refused(
            &|b| b["stop"] = json!(["Observation:"]),
            "Unknown parameter: 'stop'.",
        ),
        refused(
            &|b| b["stream_options"] = json!({"include_usage": true}),
            "'stream_options' parameter is only allowed when 'stream' is enabled",
        ),
        refused(
            &|b| {
                b["stream"] = json!(true);
                b["stream_options"] = json!({"include_usage": true});
            },
            "Unknown parameter: 'stream_options.include_usage'.",
        ),
        refused(
            &|b| {
                b["tools"] = json!([{"type": "function", "function": {
                    "name": "calculator", "parameters": schema()}}])
            },
            "Missing required parameter: 'tools[0].name'.",
        ),
        refused(
            &|b| b["tool_choice"] = json!({"type": "function", "function": {"name": "calculator"}}),
            "Missing required parameter: 'tool_choice.name'.",
        ),
        refused(
            &|b| b["tool_choice"] = json!({"type": "function", "name": "search"}),
            "not found in 'tools' parameter",
        ),
        // Function tools are strict unless they say otherwise.
        refused(
            &|b| {
                b["tools"][0].as_object_mut().unwrap().remove("strict");
                b["tools"][0]["parameters"]
                    .as_object_mut()
                    .unwrap()
                    .remove("additionalProperties");
            },
            "'additionalProperties' is required to be supplied and to be false",
        ),
        // Items: calls and outputs pair up, ids carry their type's prefix,
        // the assistant speaks in output_text.
        refused(
            &|b| b["input"][2]["call_id"] = json!("call_other"),
            "No tool call found for function call output with call_id call_other.",
        ),
        refused(
            &|b| {
                b["input"].as_array_mut().unwrap().remove(2);
            },
            "No tool output found for function call call_1.",
        ),
        refused(
            &|b| b["input"][1]["id"] = json!("call_1"),
            "Expected an ID that begins with 'fc'.",
        ),
        refused(
            &|b| b["input"][1]["arguments"] = json!({"expression": "6*7"}),
            "Invalid type for 'input[1].arguments': expected a string",
        ),
        refused(
            &|b| {
                b["input"].as_array_mut().unwrap().insert(
                    1,
                    json!({"type": "message", "role": "assistant",
                        "content": [{"type": "input_text", "text": "Let me compute."}]}),
                )
            },
            "Invalid value: 'input_text'. Supported values are: 'output_text' and 'refusal'.",
        ),
        refused(
            &|b| {
                b["input"].as_array_mut().unwrap().insert(
                    1,
                    json!({"type": "message", "id": "fc_1", "role": "assistant",
                        "content": [{"type": "output_text", "text": "Let me compute."}]}),
                )
            },
            "Expected an ID that begins with 'msg'.",
        ),
        refused(
            &|b| b["input"][0] = json!({"type": "web_search_call", "id": "ws_1"}),
            "Invalid value: 'web_search_call'.",
        ),
        refused(
            &|b| b["input"][0] = json!({"type": "item_reference", "id": "msg_1"}),
            "Item with id 'msg_1' not found.",
        ),
        refused(
            &|b| b["max_output_tokens"] = json!(8),
            "Expected a value >= 16, but got 8",
        ),
        refused(&|b| b["temperature"] = json!(2.5), "between 0 and 2"),
        refused(
            &|b| b["include"] = json!(["reasoning.raw"]),
            "Invalid value: 'reasoning.raw'",
        ),
        refused(
            &|b| {
                b["text"] = json!({"format": {"type": "json_schema",
                    "json_schema": {"name": "calc", "schema": {"type": "object"}}}})
            },
            "Missing required parameter: 'text.format.name'.",
        ),
        refused(
            &|b| {
                b["text"] = json!({"format": {"type": "json_schema", "name": "calc",
                    "strict": true, "schema": {"type": "object",
                    "properties": {"answer": {"type": "integer"}}}}})
            },
            "Invalid schema for response_format 'calc'",
        ),
    ];
    for (bad, needle) in &cases {
        let body = responses_refused(&mock, bad, needle).await;
        assert_eq!(body["error"]["type"], "invalid_request_error", "{needle}");
        assert!(body["error"]["param"].is_string(), "{body}");
    }

    let mut flat = good.clone();
    flat["tool_choice"] = json!({"type": "function", "name": "calculator"});
    flat["text"] = json!({"format": {"type": "json_schema", "name": "calc", "strict": true,
        "schema": {"type": "object", "properties": {"answer": {"type": "integer"}},
                   "required": ["answer"], "additionalProperties": false}}});
    flat["max_output_tokens"] = json!(16);
    post_ok(&mock, openai, path, &flat).await;

    expect_refused_without_key(&mock, path, &good).await;
    // OpenRouter's and the compatible servers' mocks speak Chat Completions only.
    for provider in [Provider::OpenRouter, Provider::OpenAiCompatible] {
        expect_refused(&mock, provider, path, &good, &[], 404, "Invalid URL").await;
    }
}

#[tokio::test]
async fn openai_responses_want_reasoning_back_as_it_came() {
    let mock = MockProviders::start().await;
    let openai = Provider::OpenAi;
    let path = "/responses";
    let first = post_responses(&mock, models::REASONING, false, false)
        .await
        .json();
    let output = first["output"].as_array().unwrap().clone();
    let [reasoning, call] = output.as_slice() else {
        panic!("reasoning, then the call: {first:#}");
    };
    assert_eq!(reasoning["type"], "reasoning");
    let id = reasoning["id"].as_str().unwrap();
    assert!(id.starts_with("rs_"));
    assert_eq!(reasoning["encrypted_content"], super::sealed_reasoning(id));
    assert_eq!(reasoning["summary"][0]["type"], "summary_text");
    assert_eq!(call["type"], "function_call");
    assert!(
        first["usage"]["output_tokens_details"]["reasoning_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );

    // The next request, as a stateless client builds it.
    let mut after = responses_body(models::REASONING, false, false);
    let answer = json!({"type": "function_call_output", "call_id": call["call_id"],
        "output": TOOL_OUTPUT});
    let with = |items: Vec<Value>| {
        let mut body = after.clone();
        body["input"].as_array_mut().unwrap().extend(items);
        body
    };
    let without_reasoning = with(vec![call.clone(), answer.clone()]);
    responses_refused(
        &mock,
        &without_reasoning,
        &format!(
            "Item '{}' of type 'function_call' was provided without its required 'reasoning' item: '{id}'.",
            call["id"].as_str().unwrap()
        ),
    )
    .await;
    let mut call_without_id = call.clone();
    call_without_id.as_object_mut().unwrap().remove("id");
    responses_refused(
        &mock,
        &with(vec![call_without_id.clone(), answer.clone()]),
        "without its required 'reasoning' item",
    )
    .await;
    let mut changed = reasoning.clone();
    changed["encrypted_content"] = json!("gAAAAABforged==");
    responses_refused(
        &mock,
        &with(vec![changed, call.clone(), answer.clone()]),
        &format!("The encrypted content for item {id} could not be verified."),
    )
    .await;
    let mut unsealed = reasoning.clone();
    unsealed
        .as_object_mut()
        .unwrap()
        .remove("encrypted_content");
    responses_refused(
        &mock,
        &with(vec![unsealed, call.clone(), answer.clone()]),
        "Items are not persisted when `store` is set to false.",
    )
    .await;
    responses_refused(
        &mock,
        &with(vec![reasoning.clone(), call_without_id, answer.clone()]),
        &format!(
            "Item '{id}' of type 'reasoning' was provided without its required following item."
        ),
    )
    .await;

    after = with(vec![reasoning.clone(), call.clone(), answer]);
    let second = post_ok(&mock, openai, path, &after).await.json();
    let output = second["output"].as_array().unwrap();
    assert_eq!(output[0]["type"], "reasoning", "each answer reasons first");
    assert!(
        output[1]["content"][0]["text"]
            .as_str()
            .unwrap()
            .ends_with("Final Answer: 42")
    );

    // Not asked to include it, the mock seals nothing, as OpenAI does; such
    // reasoning cannot be given back without storage.
    let mut plain = responses_body(models::REASONING, false, false);
    plain.as_object_mut().unwrap().remove("include");
    let answer = post_ok(&mock, openai, path, &plain).await.json();
    assert!(
        answer["output"][0].get("encrypted_content").is_none(),
        "{answer:#}"
    );

    // Streamed, the sealed content comes with the item when it is done.
    let answer = post_responses(&mock, models::REASONING, false, true).await;
    let events = answer.events().await;
    let reasoning_event = |kind: &str| {
        events
            .iter()
            .map(|(_, data)| data)
            .find(|data| data["type"] == kind && data["item"]["type"] == "reasoning")
            .unwrap_or_else(|| panic!("a {kind} event for the reasoning: {events:#?}"))
            .clone()
    };
    assert!(
        reasoning_event("response.output_item.added")["item"]
            .get("encrypted_content")
            .is_none()
    );
    let done = reasoning_event("response.output_item.done");
    let id = done["item"]["id"].as_str().unwrap();
    assert_eq!(
        done["item"]["encrypted_content"],
        super::sealed_reasoning(id)
    );
    assert_eq!(done["output_index"], 0);
}

#[tokio::test]
async fn the_failing_models_fail_on_the_responses_api_too() {
    let mock = MockProviders::start().await;
    let openai = Provider::OpenAi;
    let path = "/responses";
    let body = |model: &str| responses_body(model, false, false);
    let failed = async |model: &str| post(&mock, openai, path, &body(model), &[], &[]).await;

    let answer = failed(models::UNAUTHORIZED).await;
    assert_eq!(answer.status, 401, "{}", answer.text);
    assert_eq!(answer.json()["error"]["code"], "invalid_api_key");

    let answer = failed(models::RATE_LIMITED_ONCE).await;
    assert_eq!(answer.status, 429, "{}", answer.text);
    assert_eq!(answer.headers["retry-after"], "1");
    post_responses(&mock, models::RATE_LIMITED_ONCE, false, false).await;

    let answer = failed(models::SERVER_ERROR_ONCE).await;
    assert_eq!(answer.status, 500, "{}", answer.text);
    post_responses(&mock, models::SERVER_ERROR_ONCE, false, false).await;

    for stream in [false, true] {
        let answer = post_responses(&mock, models::MALFORMED, false, stream).await;
        let parsed: Result<Vec<Value>, _> = if stream {
            answer
                .text
                .split("\n\n")
                .filter_map(|frame| frame.lines().find_map(|l| l.strip_prefix("data: ")))
                .map(serde_json::from_str)
                .collect()
        } else {
            serde_json::from_str(&answer.text).map(|v| vec![v])
        };
        assert!(
            parsed.is_err(),
            "stream {stream}: not JSON: {}",
            answer.text
        );
    }

    let answer = failed("no-such-model").await;
    assert_eq!(answer.status, 404, "{}", answer.text);
    assert_eq!(answer.json()["error"]["code"], "model_not_found");

    // Background mode answers before the model ran.
    let mut background = body(models::REACT);
    background["background"] = json!(true);
    let queued = post_ok(&mock, openai, path, &background).await.json();
    assert_eq!(queued["status"], "queued");
    assert_eq!(queued["output"], json!([]));
    assert!(mock.rejected().is_empty(), "{:#?}", mock.rejected());
}
