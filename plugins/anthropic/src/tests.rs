use opspawn_plugin::llm_http::fixtures::{
    WEATHER_SCHEMA, decode_stream, message, tool_result, weather_request,
};
use opspawn_plugin::llm_http::headers::Headers;
use opspawn_plugin::llm_http::{
    FinishReason, LlmErrorKind, ResponseFormat, Role, ToolCall, ToolChoice, Usage,
};
use serde_json::{Value, json};

use super::*;

fn wire() -> Messages {
    Anthropic::wire(&Settings::default()).unwrap()
}

fn context() -> ReplyContext {
    ReplyContext {
        model: DEFAULT_MODEL.into(),
        first_call_number: 1,
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
fn requests_merge_tool_results_into_one_user_turn() {
    let body = wire()
        .body(&weather_request(), "claude-sonnet-4-5", true)
        .unwrap();
    let expected = json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 256,
        "system": "You are terse.",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"}]},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"city": "Rome"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "{\"temp_c\":18}", "is_error": false},
                {"type": "tool_result", "tool_use_id": "call_2",
                 "content": "Error: the weather service timed out", "is_error": true},
            ]},
        ],
        "tools": [{
            "name": "get_weather",
            "description": "Current weather for a city",
            "input_schema": serde_json::from_str::<Value>(WEATHER_SCHEMA).unwrap(),
        }],
        "temperature": 0.2,
        "stop_sequences": ["END"],
        "stream": true,
    });
    assert_eq!(body, expected);
}

/// Images are image blocks with a base64 or URL source: after the
/// question's text, and inside a tool result, after its text.
#[test]
fn images_go_as_image_blocks() {
    use opspawn_plugin::llm_http::fixtures::{PIXEL_PNG, image_request};
    let body = wire()
        .body(&image_request(), "claude-sonnet-4-5", false)
        .unwrap();
    let pixel = json!({"type": "image", "source":
        {"type": "base64", "media_type": "image/png", "data": PIXEL_PNG}});
    assert_eq!(
        body["messages"][0]["content"],
        json!([
            {"type": "text", "text": "Weather in Paris and Rome?"},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/paris.jpg"}},
            pixel,
        ])
    );
    assert_eq!(
        body["messages"][2]["content"][0],
        json!({"type": "tool_result", "tool_use_id": "call_1", "is_error": false,
               "content": [{"type": "text", "text": "{\"temp_c\":18}"}, pixel]})
    );
    assert_eq!(
        body["messages"][2]["content"][1]["content"],
        "Error: the weather service timed out"
    );
}

#[test]
fn system_messages_join_the_system_prompt_and_same_roles_merge() {
    let mut request = weather_request();
    request.max_tokens = None;
    request.tools.clear();
    request.messages = vec![
        message(Role::System, "Answer in French."),
        message(Role::User, "Hi"),
        message(Role::User, "Anyone there?"),
        message(Role::Assistant, ""),
        message(Role::Assistant, "Bonjour"),
        tool_result("call_9", "late"),
        message(Role::User, "Thanks"),
    ];
    let body = wire().body(&request, "m", false).unwrap();
    assert_eq!(body["max_tokens"], 4096);
    assert_eq!(body["system"], "You are terse.\n\nAnswer in French.");
    assert_eq!(body["stream"], false);
    assert!(body.get("tools").is_none());
    assert_eq!(
        body["messages"],
        json!([
            {"role": "user", "content": [
                {"type": "text", "text": "Hi"},
                {"type": "text", "text": "Anyone there?"},
            ]},
            {"role": "assistant", "content": [{"type": "text", "text": "Bonjour"}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "call_9", "content": "late", "is_error": false},
                {"type": "text", "text": "Thanks"},
            ]},
        ])
    );
}

#[test]
fn the_endpoint_and_headers() {
    let wire = wire();
    assert_eq!(wire.path("m", false), "/v1/messages");
    let headers = wire.headers(true);
    for (name, value) in [
        ("anthropic-version", "2023-06-01"),
        ("content-type", "application/json"),
        ("accept", "text/event-stream"),
    ] {
        assert!(headers.contains(&(name.into(), value.into())), "{name}");
    }
    assert!(!headers.iter().any(|(name, _)| name == "x-api-key"));
    assert_eq!(wire.model(&weather_request()), "claude-sonnet-4-5");
}

/// The tool-use example from Anthropic's documentation.
const MESSAGE: &str = r#"{
  "id": "msg_01Aq9w938a90dw8q",
  "model": "claude-sonnet-4-5-20250929",
  "stop_reason": "tool_use",
  "role": "assistant",
  "type": "message",
  "content": [
    {"type": "text", "text": "I'll check the current weather in San Francisco for you."},
    {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9",
     "name": "get_weather", "input": {"location": "San Francisco, CA", "unit": "celsius"}}
  ],
  "stop_sequence": null,
  "usage": {"input_tokens": 472, "output_tokens": 91}
}"#;

#[test]
fn parses_a_message_with_text_and_tool_use() {
    let response = wire().parse(MESSAGE.as_bytes(), &context()).unwrap();
    assert_eq!(
        response.message.content,
        "I'll check the current weather in San Francisco for you."
    );
    assert_eq!(
        response.message.tool_calls,
        [call(
            "toolu_01A09q90qw90lq917835lq9",
            "get_weather",
            r#"{"location":"San Francisco, CA","unit":"celsius"}"#
        )]
    );
    assert_eq!(response.finish_reason, FinishReason::ToolCalls);
    assert_eq!(
        response.usage,
        Some(Usage {
            input_tokens: 472,
            output_tokens: 91
        })
    );
    assert_eq!(response.model, "claude-sonnet-4-5-20250929");
}

#[test]
fn stop_reasons_map_to_finish_reasons() {
    for (reason, expected) in [
        ("end_turn", FinishReason::Stop),
        ("stop_sequence", FinishReason::Stop),
        ("tool_use", FinishReason::ToolCalls),
        ("max_tokens", FinishReason::Length),
        ("refusal", FinishReason::ContentFilter),
        ("pause_turn", FinishReason::Other),
    ] {
        assert_eq!(response::stop_reason(reason), expected, "{reason}");
    }
}

/// The streamed tool-use example from Anthropic's documentation.
const STREAM: &str = r#"event: message_start
data: {"type":"message_start","message":{"id":"msg_014p7gG3wDgGV9EUtLvnow3U","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","stop_sequence":null,"usage":{"input_tokens":472,"output_tokens":2},"content":[],"stop_reason":null}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}

event: ping
data: {"type": "ping"}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Okay"}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":", let's check the weather."}}

event: content_block_stop
data: {"type":"content_block_stop","index":0}

event: content_block_start
data: {"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"get_weather","input":{}}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"location\":"}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":" \"San Francisco, CA\"}"}}

event: content_block_stop
data: {"type":"content_block_stop","index":1}

event: content_block_start
data: {"type":"content_block_start","index":2,"content_block":{"type":"tool_use","id":"toolu_02","name":"get_time","input":{}}}

event: content_block_stop
data: {"type":"content_block_stop","index":2}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":89}}

event: message_stop
data: {"type":"message_stop"}

"#;

#[test]
fn streams_emit_text_and_assemble_tool_input() {
    for size in [1, 13, STREAM.len()] {
        let (response, emitted) = decode_stream(&wire(), &context(), STREAM, size);
        let response = response.unwrap();
        assert_eq!(emitted, ["Okay", ", let's check the weather."]);
        assert_eq!(response.message.content, "Okay, let's check the weather.");
        assert_eq!(
            response.message.tool_calls,
            [
                call(
                    "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
                    "get_weather",
                    r#"{"location": "San Francisco, CA"}"#
                ),
                call("toolu_02", "get_time", "{}"),
            ]
        );
        assert_eq!(response.finish_reason, FinishReason::ToolCalls);
        assert_eq!(
            response.usage,
            Some(Usage {
                input_tokens: 472,
                output_tokens: 89
            })
        );
        assert_eq!(response.model, "claude-sonnet-4-5-20250929");
    }
}

#[test]
fn error_events_map_by_type() {
    for (kind_name, kind) in [
        ("overloaded_error", LlmErrorKind::Unavailable),
        ("rate_limit_error", LlmErrorKind::RateLimited),
        ("authentication_error", LlmErrorKind::Auth),
        ("invalid_request_error", LlmErrorKind::InvalidRequest),
        ("api_error", LlmErrorKind::Unavailable),
    ] {
        let stream = format!(
            "event: message_start\ndata: {}\n\nevent: error\ndata: {{\"type\":\"error\",\"error\":{{\"type\":\"{kind_name}\",\"message\":\"Overloaded\"}}}}\n\n",
            r#"{"type":"message_start","message":{"model":"m","usage":{"input_tokens":1}}}"#
        );
        let (response, _) = decode_stream(&wire(), &context(), &stream, 10);
        let error = response.unwrap_err();
        assert_eq!(error.kind, kind, "{kind_name}");
        assert!(error.body.unwrap().contains(kind_name));
    }
}

#[test]
fn streams_cut_short_are_unavailable() {
    let cut = &STREAM[..STREAM.find("event: message_delta").unwrap()];
    let (response, _) = decode_stream(&wire(), &context(), cut, 64);
    assert_eq!(response.unwrap_err().kind, LlmErrorKind::Unavailable);
}

#[test]
fn error_statuses_and_bodies() {
    let body = br#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"},"request_id":"req_1"}"#;
    let error = wire().error(401, &Headers::default(), body);
    assert_eq!(error.kind, LlmErrorKind::Auth);
    // Which variable holds the key is the manifest's: the host adds it.
    assert_eq!(
        error.message,
        "Anthropic rejected the request as unauthorized (401)"
    );
    assert!(error.body.unwrap().contains("invalid x-api-key"));

    let overloaded =
        br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
    let error = wire().error(529, &Headers::default(), overloaded);
    assert_eq!(error.kind, LlmErrorKind::Unavailable);
    assert_eq!(error.status, Some(529));

    let limited = Headers::from_pairs([("retry-after".into(), "7".into())]);
    let error = wire().error(429, &limited, b"{}");
    assert_eq!(error.kind, LlmErrorKind::RateLimited);
    assert_eq!(error.retry_after_ms, Some(7000));

    let error = wire().parse(overloaded, &context()).unwrap_err();
    assert_eq!(error.kind, LlmErrorKind::Unavailable);
}

#[test]
fn malformed_bodies_are_bad_responses() {
    for body in ["<html>", r#"{"type":"message"}"#] {
        let error = wire().parse(body.as_bytes(), &context()).unwrap_err();
        assert_eq!(error.kind, LlmErrorKind::BadResponse, "{body}");
    }
    let (response, _) = decode_stream(&wire(), &context(), "data: nope\n\n", 4);
    assert_eq!(response.unwrap_err().kind, LlmErrorKind::BadResponse);
}

#[test]
fn settings_choose_the_api_version_and_default_model() {
    let settings = Settings::parse(
        &PROVIDER,
        r#"{"api_version": "2026-10-21", "default_model": "claude-opus-4-1"}"#,
    )
    .unwrap();
    let wire = Anthropic::wire(&settings).unwrap();
    assert!(
        wire.headers(false)
            .contains(&("anthropic-version".into(), "2026-10-21".into()))
    );
    assert_eq!(wire.model(&weather_request()), "claude-opus-4-1");
}

#[test]
fn tool_choice_parallelism_and_top_p() {
    let mut request = weather_request();
    request.top_p = Some(0.5);
    for (choice, parallel, expected) in [
        (ToolChoice::Auto, None, None),
        (ToolChoice::Auto, Some(true), None),
        (
            ToolChoice::Auto,
            Some(false),
            Some(json!({"type": "auto", "disable_parallel_tool_use": true})),
        ),
        (ToolChoice::None, Some(false), Some(json!({"type": "none"}))),
        (ToolChoice::Required, None, Some(json!({"type": "any"}))),
        (
            ToolChoice::Named("get_weather".into()),
            Some(false),
            Some(json!({"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true})),
        ),
    ] {
        request.tool_choice = choice;
        request.parallel_tool_calls = parallel;
        let body = wire().body(&request, "m", false).unwrap();
        assert_eq!(body.get("tool_choice"), expected.as_ref(), "{parallel:?}");
        assert_eq!(body["top_p"], json!(0.5));
    }
    request.tools.clear();
    request.tool_choice = ToolChoice::Required;
    let error = wire().body(&request, "m", false).unwrap_err();
    assert_eq!(error.kind, LlmErrorKind::InvalidRequest);
}

fn prepare_body(
    wire: &Messages,
    request: &opspawn_plugin::llm_http::ChatRequest,
) -> Result<Value, opspawn_plugin::llm_http::LlmError> {
    let prepared = opspawn_plugin::llm_http::wire::prepare(wire, request)?;
    let opspawn_plugin::llm_http::Exchange::Http(http) = prepared.exchange else {
        panic!("an HTTP exchange");
    };
    Ok(serde_json::from_slice(&http.body).unwrap())
}

#[test]
fn sampling_options_are_checked_against_anthropics_ranges() {
    let mut request = weather_request();
    request.provider_options = r#"{"temperature": 0.9, "top_k": 5}"#.into();
    let body = prepare_body(&wire(), &request).unwrap();
    assert_eq!(body["temperature"], json!(0.9));
    assert_eq!(body["top_k"], 5);
    for (options, expected) in [
        (
            r#"{"temperature": 1.5}"#,
            "temperature 1.5 is outside Anthropic's range, 0 to 1",
        ),
        (
            r#"{"top_p": -0.1}"#,
            "top_p -0.1 is outside Anthropic's range, 0 to 1",
        ),
        (r#"{"top_k": -1}"#, "top_k must be a whole number"),
        (r#"{"temperature": "hot"}"#, "temperature must be a number"),
    ] {
        request.provider_options = options.into();
        let error = prepare_body(&wire(), &request).unwrap_err();
        assert_eq!(error.kind, LlmErrorKind::InvalidRequest, "{options}");
        assert!(
            error.message.contains(expected),
            "{options}: {}",
            error.message
        );
    }
}

#[test]
fn version_2026_10_21_refuses_sampling_options() {
    let settings = Settings::parse(&PROVIDER, r#"{"api_version": "2026-10-21"}"#).unwrap();
    let wire = Anthropic::wire(&settings).unwrap();
    assert!(
        wire.headers(false)
            .contains(&("anthropic-version".into(), "2026-10-21".into()))
    );
    let mut request = weather_request();
    let error = prepare_body(&wire, &request).unwrap_err();
    assert_eq!(error.kind, LlmErrorKind::InvalidRequest);
    assert!(
        error
            .message
            .contains("API version 2026-10-21 refuses temperature, top_p and top_k"),
        "{}",
        error.message
    );
    request.temperature = None;
    let body = prepare_body(&wire, &request).unwrap();
    assert!(body.get("temperature").is_none() && body.get("top_p").is_none());
}

const THINKING_STREAM: &str = concat!(
    "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-5\",\"content\":[],\"usage\":{\"input_tokens\":50,\"output_tokens\":1}}}\n\n",
    "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"thinking\",\"thinking\":\"\",\"signature\":\"\"}}\n\n",
    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"Paris first, \"}}\n\n",
    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"then answer.\"}}\n\n",
    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"signature_delta\",\"signature\":\"EqQBCkgIAR\"}}\n\n",
    "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
    "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"redacted_thinking\",\"data\":\"EmwKAhgBEgy3va\"}}\n\n",
    "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":1}\n\n",
    "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":2,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_1\",\"name\":\"get_weather\",\"input\":{}}}\n\n",
    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":2,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"city\\\":\\\"Paris\\\"}\"}}\n\n",
    "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":2}\n\n",
    "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\"},\"usage\":{\"output_tokens\":30}}\n\n",
    "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
);

#[test]
fn thinking_blocks_go_back_first_and_unchanged() {
    let whole = json!({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
        "content": [
            {"type": "thinking", "thinking": "Paris first, then answer.", "signature": "EqQBCkgIAR"},
            {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va"},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
        ],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 50, "output_tokens": 30}
    });
    let parsed = wire()
        .parse(whole.to_string().as_bytes(), &context())
        .unwrap();
    for size in [1, 29, THINKING_STREAM.len()] {
        let (streamed, _) = decode_stream(&wire(), &context(), THINKING_STREAM, size);
        let streamed = streamed.unwrap();
        assert_eq!(streamed.message.provider_data, parsed.message.provider_data);
        assert_eq!(streamed.message.tool_calls, parsed.message.tool_calls);
    }

    let mut request = weather_request();
    request.messages = vec![
        message(Role::User, "Weather in Paris?"),
        parsed.message,
        tool_result("toolu_1", r#"{"temp_c":18}"#),
    ];
    let body = wire().body(&request, "claude-sonnet-4-5", false).unwrap();
    assert_eq!(
        body["messages"][1]["content"],
        json!([
            {"type": "thinking", "thinking": "Paris first, then answer.", "signature": "EqQBCkgIAR"},
            {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va"},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
        ])
    );
}

#[test]
fn a_response_format_becomes_structured_output_with_a_schema_anthropic_takes() {
    let mut request = weather_request();
    request.response_format = Some(ResponseFormat {
        name: "weather".into(),
        schema: json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "properties": {
                "temp_c": {"type": "number", "minimum": -90, "maximum": 60},
                "city": {"type": "string", "minLength": 1, "format": "hostname"},
                "station": {"type": "string", "format": "icao"},
                "readings": {
                    "type": "array",
                    "minItems": 3,
                    "maxItems": 10,
                    "items": {"type": "object", "properties": {"at": {"type": "string", "format": "date-time"}}},
                },
                "source": {"oneOf": [{"type": "string"}, {"type": "null"}]},
                "extra": {"type": "object", "additionalProperties": {"type": "string"}},
            },
            "required": ["temp_c", "city"],
            "additionalProperties": true,
        })
        .to_string(),
        strict: false,
    });
    for version in [DEFAULT_API_VERSION, NO_SAMPLING_VERSION] {
        let settings =
            Settings::parse(&PROVIDER, &json!({"api_version": version}).to_string()).unwrap();
        let wire = Anthropic::wire(&settings).unwrap();
        let mut request = request.clone();
        request.temperature = None;
        let body = prepare_body(&wire, &request).unwrap();
        assert_eq!(
            body["output_config"],
            json!({"format": {"type": "json_schema", "schema": {
                "type": "object",
                "properties": {
                    "temp_c": {"type": "number"},
                    "city": {"type": "string", "format": "hostname"},
                    "station": {"type": "string"},
                    "readings": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {"at": {"type": "string", "format": "date-time"}},
                            "additionalProperties": false,
                        },
                    },
                    "source": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                    "extra": {"type": "object", "additionalProperties": false},
                },
                "required": ["temp_c", "city"],
                "additionalProperties": false,
            }}}),
            "version {version}: every object closed, unsupported keywords dropped"
        );
        assert!(
            body.get("output_format").is_none(),
            "not the retired beta shape"
        );
        let headers = wire.headers(false);
        assert!(
            !headers.iter().any(|(name, _)| name == "anthropic-beta"),
            "no beta header: {headers:?}"
        );
    }
}

#[test]
fn without_a_response_format_there_is_no_output_config() {
    let body = wire().body(&weather_request(), "m", false).unwrap();
    assert!(body.get("output_config").is_none(), "{body:#}");
}

#[test]
fn a_response_schema_that_is_not_json_is_refused_before_sending() {
    let mut request = weather_request();
    request.response_format = Some(ResponseFormat {
        name: "broken".into(),
        schema: "{".into(),
        strict: true,
    });
    let error = wire().body(&request, "m", false).unwrap_err();
    assert_eq!(error.kind, LlmErrorKind::InvalidRequest);
    assert!(error.message.contains("\"broken\""), "{}", error.message);
}
