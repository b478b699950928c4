use opspawn_plugin::llm_http::fixtures::{decode_stream, weather_request};
use opspawn_plugin::llm_http::{
    FinishReason, LlmErrorKind, ResponseFormat, ToolCall, ToolChoice, ToolSpec, Usage,
};
use serde_json::json;

use super::*;

fn wire() -> GenerateContent {
    Gemini::wire(&Settings::default()).unwrap()
}

fn context() -> ReplyContext {
    ReplyContext {
        model: DEFAULT_MODEL.into(),
        first_call_number: 3,
        api: None,
        provider: None,
    }
}

fn call(id: &str, name: &str, arguments: &str) -> ToolCall {
    ToolCall {
        id: id.into(),
        name: name.into(),
        arguments: arguments.into(),
    }
}

#[test]
fn requests_name_function_responses_after_their_calls() {
    let body = wire()
        .body(&weather_request(), "gemini-2.5-flash", true)
        .unwrap();
    let expected = json!({
        "contents": [
            {"role": "user", "parts": [{"text": "Weather in Paris and Rome?"}]},
            {"role": "model", "parts": [
                {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
                {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}},
            ]},
            {"role": "user", "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"temp_c": 18}}},
                {"functionResponse": {"name": "get_weather",
                 "response": {"result": "Error: the weather service timed out"}}},
            ]},
        ],
        "systemInstruction": {"parts": [{"text": "You are terse."}]},
        "tools": [{"functionDeclarations": [{
            "name": "get_weather",
            "description": "Current weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "City name"}},
                "required": ["city"],
            },
        }]}],
        "generationConfig": {"temperature": 0.2, "maxOutputTokens": 256, "stopSequences": ["END"]},
    });
    assert_eq!(body, expected);
}

/// Inline images are `inlineData` parts: after the question's text, and
/// after the run of function responses their tool results are in. An image
/// by URL is refused, naming the way that works.
#[test]
fn inline_images_go_as_inline_data_and_urls_are_refused() {
    use opspawn_plugin::llm_http::fixtures::{PIXEL_PNG, image_request};
    let mut request = image_request();
    let pixel = json!({"inlineData": {"mimeType": "image/png", "data": PIXEL_PNG}});
    let error = wire()
        .body(&request, "gemini-2.5-flash", false)
        .unwrap_err();
    assert_eq!(error.kind, LlmErrorKind::InvalidRequest);
    assert!(
        error
            .message
            .contains("Gemini takes images inline, not by URL"),
        "{}",
        error.message
    );

    request.messages[0].images.remove(0);
    let body = wire().body(&request, "gemini-2.5-flash", false).unwrap();
    assert_eq!(
        body["contents"][0]["parts"],
        json!([{"text": "Weather in Paris and Rome?"}, pixel])
    );
    let results = body["contents"][2]["parts"].as_array().unwrap();
    assert_eq!(results.len(), 3, "{results:?}");
    assert!(results[0].get("functionResponse").is_some());
    assert!(results[1].get("functionResponse").is_some());
    assert_eq!(results[2], pixel);
}

#[test]
fn plain_requests_leave_out_what_is_unset() {
    let mut request = weather_request();
    request.system = None;
    request.temperature = None;
    request.max_tokens = None;
    request.stop.clear();
    request.messages.truncate(1);
    request.tools = vec![ToolSpec {
        name: "now".into(),
        description: "The time".into(),
        input_schema: r#"{"type":"object","properties":{},"additionalProperties":false}"#.into(),
    }];
    assert_eq!(
        wire().body(&request, "m", false).unwrap(),
        json!({
            "contents": [{"role": "user", "parts": [{"text": "Weather in Paris and Rome?"}]}],
            "tools": [{"functionDeclarations": [{"name": "now", "description": "The time"}]}],
        })
    );
}

#[test]
fn non_object_tool_output_is_wrapped() {
    let mut request = weather_request();
    request.messages[2].content = "[1, 2]".into();
    let body = wire().body(&request, "m", false).unwrap();
    assert_eq!(
        body["contents"][2]["parts"][0]["functionResponse"]["response"],
        json!({"result": [1, 2]})
    );
    request.messages[2].tool_call_id = Some("unknown".into());
    let error = wire().body(&request, "m", false).unwrap_err();
    assert_eq!(error.kind, LlmErrorKind::InvalidRequest);
}

#[test]
fn urls_put_the_model_in_the_path() {
    let wire = wire();
    assert_eq!(
        wire.path("gemini-2.5-flash", false),
        "/v1beta/models/gemini-2.5-flash:generateContent"
    );
    assert_eq!(
        wire.path("gemini-2.5-flash", true),
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    );
    let mut request = weather_request();
    assert_eq!(wire.model(&request), "gemini-2.5-flash");
    request.model = Some("models/gemini-2.5-pro".into());
    assert_eq!(wire.model(&request), "gemini-2.5-pro");
    let settings = Settings::parse(&PROVIDER, r#"{"default_model": "gemini-2.5-pro"}"#).unwrap();
    assert_eq!(
        Gemini::wire(&settings).unwrap().model(&weather_request()),
        "gemini-2.5-pro"
    );
    assert!(
        !wire
            .headers(true)
            .iter()
            .any(|(name, _)| name == "x-goog-api-key")
    );
}

/// A function-calling response as Gemini's documentation shows it.
const RESPONSE: &str = r#"{
  "candidates": [
    {
      "content": {
        "parts": [
          {"text": "Let me check."},
          {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
          {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}}
        ],
        "role": "model"
      },
      "finishReason": "STOP",
      "index": 0
    }
  ],
  "usageMetadata": {"promptTokenCount": 70, "candidatesTokenCount": 20, "totalTokenCount": 90},
  "modelVersion": "gemini-2.5-flash",
  "responseId": "abc"
}"#;

#[test]
fn parses_function_calls_and_mints_their_ids() {
    let response = wire().parse(RESPONSE.as_bytes(), &context()).unwrap();
    assert_eq!(response.message.content, "Let me check.");
    assert_eq!(
        response.message.tool_calls,
        [
            call("call-3", "get_weather", r#"{"city":"Paris"}"#),
            call("call-4", "get_weather", r#"{"city":"Rome"}"#),
        ]
    );
    // Gemini says STOP when it stops to call functions.
    assert_eq!(response.finish_reason, FinishReason::ToolCalls);
    assert_eq!(
        response.usage,
        Some(Usage {
            input_tokens: 70,
            output_tokens: 20
        })
    );
    assert_eq!(response.model, "gemini-2.5-flash");
}

#[test]
fn finish_reasons_and_blocked_prompts() {
    for (reason, expected) in [
        ("STOP", FinishReason::Stop),
        ("MAX_TOKENS", FinishReason::Length),
        ("SAFETY", FinishReason::ContentFilter),
        ("RECITATION", FinishReason::ContentFilter),
        ("MALFORMED_FUNCTION_CALL", FinishReason::Other),
    ] {
        assert_eq!(response::finish_reason(reason), expected, "{reason}");
    }
    let blocked =
        r#"{"promptFeedback":{"blockReason":"SAFETY"},"usageMetadata":{"promptTokenCount":5}}"#;
    let response = wire().parse(blocked.as_bytes(), &context()).unwrap();
    assert_eq!(response.finish_reason, FinishReason::ContentFilter);
    assert_eq!(response.message.content, "");
}

#[test]
fn thoughts_and_thinking_tokens() {
    let body = r#"{"candidates":[{"content":{"role":"model","parts":[
        {"text":"Thinking about it","thought":true},{"text":"42"}]},"finishReason":"STOP"}],
        "usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":1,"thoughtsTokenCount":10}}"#;
    let response = wire().parse(body.as_bytes(), &context()).unwrap();
    assert_eq!(response.message.content, "42");
    assert_eq!(response.usage.map(|u| u.output_tokens), Some(11));
    assert_eq!(response.model, "gemini-2.5-flash");
}

const STREAM: &str = concat!(
    "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"The weather\"}],\"role\": \"model\"},\"index\": 0}],\"usageMetadata\": {\"promptTokenCount\": 70,\"candidatesTokenCount\": 2},\"modelVersion\": \"gemini-2.5-flash\"}\r\n\r\n",
    "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \" needs a tool.\"}],\"role\": \"model\"},\"index\": 0}],\"modelVersion\": \"gemini-2.5-flash\"}\r\n\r\n",
    "data: {\"candidates\": [{\"content\": {\"parts\": [{\"functionCall\": {\"name\": \"get_weather\",\"args\": {\"city\": \"Paris\"}}},{\"functionCall\": {\"name\": \"get_weather\",\"args\": {\"city\": \"Rome\"}}}],\"role\": \"model\"},\"finishReason\": \"STOP\",\"index\": 0}],\"usageMetadata\": {\"promptTokenCount\": 70,\"candidatesTokenCount\": 25,\"totalTokenCount\": 95},\"modelVersion\": \"gemini-2.5-flash\"}\r\n\r\n",
);

#[test]
fn streams_emit_text_and_collect_calls() {
    for size in [1, 11, STREAM.len()] {
        let (response, emitted) = decode_stream(&wire(), &context(), STREAM, size);
        let response = response.unwrap();
        assert_eq!(emitted, ["The weather", " needs a tool."]);
        assert_eq!(response.message.content, "The weather needs a tool.");
        assert_eq!(
            response.message.tool_calls,
            [
                call("call-3", "get_weather", r#"{"city":"Paris"}"#),
                call("call-4", "get_weather", r#"{"city":"Rome"}"#),
            ]
        );
        assert_eq!(response.finish_reason, FinishReason::ToolCalls);
        assert_eq!(
            response.usage,
            Some(Usage {
                input_tokens: 70,
                output_tokens: 25
            })
        );
    }
}

#[test]
fn streams_cut_short_or_broken() {
    let cut = &STREAM[..STREAM.rfind("data:").unwrap()];
    let (response, _) = decode_stream(&wire(), &context(), cut, 64);
    assert_eq!(response.unwrap_err().kind, LlmErrorKind::Unavailable);

    let failed = "data: {\"error\": {\"code\": 503, \"message\": \"The model is overloaded.\", \"status\": \"UNAVAILABLE\"}}\n\n";
    let (response, _) = decode_stream(&wire(), &context(), failed, 64);
    let error = response.unwrap_err();
    assert_eq!(error.kind, LlmErrorKind::Unavailable);
    assert_eq!(error.status, Some(503));

    let (response, _) = decode_stream(&wire(), &context(), "data: {\n\n", 64);
    assert_eq!(response.unwrap_err().kind, LlmErrorKind::BadResponse);
}

fn error_body(code: u16, status: &str, details: &str) -> String {
    format!(
        r#"{{"error": {{"code": {code}, "message": "it failed", "status": "{status}", "details": [{details}]}}}}"#
    )
}

#[test]
fn errors_map_by_status_name() {
    let no_headers = Headers::default();
    for (code, status, details, kind) in [
        (400, "INVALID_ARGUMENT", "", LlmErrorKind::InvalidRequest),
        (
            400,
            "INVALID_ARGUMENT",
            r#"{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}"#,
            LlmErrorKind::Auth,
        ),
        (401, "UNAUTHENTICATED", "", LlmErrorKind::Auth),
        (403, "PERMISSION_DENIED", "", LlmErrorKind::Auth),
        (404, "NOT_FOUND", "", LlmErrorKind::InvalidRequest),
        (429, "RESOURCE_EXHAUSTED", "", LlmErrorKind::RateLimited),
        (500, "INTERNAL", "", LlmErrorKind::Unavailable),
        (503, "UNAVAILABLE", "", LlmErrorKind::Unavailable),
        (504, "DEADLINE_EXCEEDED", "", LlmErrorKind::Timeout),
    ] {
        let body = error_body(code, status, details);
        let error = wire().error(code, &no_headers, body.as_bytes());
        assert_eq!(error.kind, kind, "{status} {details}");
        assert_eq!(error.status, Some(code));
        assert_eq!(error.body.as_deref(), Some(body.as_str()));
    }
    let auth = wire().error(
        403,
        &no_headers,
        error_body(403, "PERMISSION_DENIED", "").as_bytes(),
    );
    assert_eq!(
        auth.message,
        "Gemini rejected the request as forbidden (403)"
    );
    let html = wire().error(502, &no_headers, b"<html>Bad Gateway</html>");
    assert_eq!(html.kind, LlmErrorKind::Unavailable);
}

#[test]
fn rate_limits_carry_the_retry_delay() {
    let body = error_body(
        429,
        "RESOURCE_EXHAUSTED",
        r#"{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "32s"}"#,
    );
    let error = wire().error(429, &Headers::default(), body.as_bytes());
    assert_eq!(error.retry_after_ms, Some(32_000));
    let header = Headers::from_pairs([("Retry-After".into(), "5".into())]);
    let error = wire().error(429, &header, body.as_bytes());
    assert_eq!(error.retry_after_ms, Some(5_000));
}

#[test]
fn malformed_bodies_are_bad_responses() {
    for body in ["not json", "{}", r#"{"candidates": []}"#] {
        let error = wire().parse(body.as_bytes(), &context()).unwrap_err();
        assert_eq!(error.kind, LlmErrorKind::BadResponse, "{body}");
    }
}

#[test]
fn tool_config_top_p_and_response_schema() {
    let mut request = weather_request();
    request.top_p = Some(0.8);
    request.parallel_tool_calls = Some(false);
    request.response_format = Some(ResponseFormat {
        name: "weather".into(),
        schema: r#"{"$schema":"https://json-schema.org/draft/2020-12/schema","type":"object","properties":{"temp_c":{"type":"number"}},"additionalProperties":false}"#.into(),
        strict: true,
    });
    for (choice, expected) in [
        (ToolChoice::Auto, None),
        (ToolChoice::None, Some(json!({"mode": "NONE"}))),
        (ToolChoice::Required, Some(json!({"mode": "ANY"}))),
        (
            ToolChoice::Named("get_weather".into()),
            Some(json!({"mode": "ANY", "allowedFunctionNames": ["get_weather"]})),
        ),
    ] {
        request.tool_choice = choice;
        let body = wire().body(&request, "m", false).unwrap();
        assert_eq!(
            body.get("toolConfig"),
            expected
                .map(|config| json!({"functionCallingConfig": config}))
                .as_ref()
        );
        let config = &body["generationConfig"];
        assert_eq!(config["topP"], json!(0.8));
        assert_eq!(config["responseMimeType"], "application/json");
        assert_eq!(
            config["responseSchema"],
            json!({"type": "object", "properties": {"temp_c": {"type": "number"}}})
        );
    }
    request.tools.clear();
    request.tool_choice = ToolChoice::Named("get_weather".into());
    let error = wire().body(&request, "m", false).unwrap_err();
    assert_eq!(error.kind, LlmErrorKind::InvalidRequest);
}

const SIGNED_STREAM: &str = concat!(
    "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"Checking.\"}],\"role\": \"model\"},\"index\": 0}],\"modelVersion\": \"gemini-3-pro\"}\r\n\r\n",
    "data: {\"candidates\": [{\"content\": {\"parts\": [{\"functionCall\": {\"name\": \"get_weather\",\"args\": {\"city\": \"Paris\"}},\"thoughtSignature\": \"c2lnLXBhcmlz\"},{\"functionCall\": {\"name\": \"get_weather\",\"args\": {\"city\": \"Rome\"}}}],\"role\": \"model\"},\"finishReason\": \"STOP\",\"index\": 0}],\"modelVersion\": \"gemini-3-pro\"}\r\n\r\n",
);

#[test]
fn thought_signatures_go_back_with_their_calls() {
    let whole = r#"{"candidates":[{"content":{"role":"model","parts":[
        {"text":"Checking."},
        {"functionCall":{"name":"get_weather","args":{"city":"Paris"}},"thoughtSignature":"c2lnLXBhcmlz"},
        {"functionCall":{"name":"get_weather","args":{"city":"Rome"}}}]},"finishReason":"STOP"}]}"#;
    let parsed = wire().parse(whole.as_bytes(), &context()).unwrap();
    for size in [1, 17, SIGNED_STREAM.len()] {
        let (streamed, _) = decode_stream(&wire(), &context(), SIGNED_STREAM, size);
        let streamed = streamed.unwrap();
        assert_eq!(streamed.message.provider_data, parsed.message.provider_data);
        assert_eq!(streamed.message.tool_calls, parsed.message.tool_calls);
    }
    assert_eq!(
        parsed.message.provider_data,
        [opspawn_plugin::llm_http::ProviderDatum {
            key: "gemini:thought_signature:call-3".into(),
            value: "c2lnLXBhcmlz".into()
        }]
    );

    // The reply goes back as the model turn, each signature on its part.
    let mut request = weather_request();
    request.messages.truncate(1);
    request.messages.push(parsed.message);
    request
        .messages
        .push(opspawn_plugin::llm_http::fixtures::tool_result(
            "call-3", "{}",
        ));
    request
        .messages
        .push(opspawn_plugin::llm_http::fixtures::tool_result(
            "call-4", "{}",
        ));
    let body = wire().body(&request, "gemini-3-pro", false).unwrap();
    assert_eq!(
        body["contents"][1]["parts"],
        json!([
            {"text": "Checking."},
            {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
             "thoughtSignature": "c2lnLXBhcmlz"},
            {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}},
        ])
    );

    // A text reply's signature is kept too, and goes back on its text.
    let text = r#"{"candidates":[{"content":{"role":"model","parts":[
        {"text":"It is 18 C.","thoughtSignature":"dGV4dA=="}]},"finishReason":"STOP"}]}"#;
    let parsed = wire().parse(text.as_bytes(), &context()).unwrap();
    request.messages.push(parsed.message);
    let body = wire().body(&request, "gemini-3-pro", false).unwrap();
    assert_eq!(
        body["contents"][3]["parts"],
        json!([{"text": "It is 18 C.", "thoughtSignature": "dGV4dA=="}])
    );
}

#[test]
fn sampling_options_are_checked_and_top_k_goes_in_the_generation_config() {
    let mut request = weather_request();
    request.provider_options = r#"{"top_k": 40, "temperature": 1.5}"#.into();
    let prepared = opspawn_plugin::llm_http::wire::prepare(&wire(), &request).unwrap();
    let opspawn_plugin::llm_http::Exchange::Http(http) = prepared.exchange else {
        panic!("an HTTP exchange");
    };
    let body: serde_json::Value = serde_json::from_slice(&http.body).unwrap();
    assert_eq!(body["generationConfig"]["topK"], 40);
    assert_eq!(body["generationConfig"]["temperature"], json!(1.5));
    assert!(body.get("top_k").is_none() && body.get("temperature").is_none());

    for (options, expected) in [
        (
            r#"{"temperature": 2.5}"#,
            "temperature 2.5 is outside Gemini's range, 0 to 2",
        ),
        (r#"{"top_k": 0}"#, "top_k 0 is outside Gemini's range, 1 to"),
    ] {
        request.provider_options = options.into();
        let error = opspawn_plugin::llm_http::wire::prepare(&wire(), &request).unwrap_err();
        assert_eq!(error.kind, LlmErrorKind::InvalidRequest);
        assert!(error.message.contains(expected), "{}", error.message);
    }
}
