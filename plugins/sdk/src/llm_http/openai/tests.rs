use serde_json::{Value, json};

use super::*;
use crate::llm_http::fixtures::{
    decode_stream, expect_error, expect_unstreamed_post, http_request, options_request,
    tool_choices, weather_request,
};
use crate::llm_http::headers::Headers;
use crate::llm_http::wire::{prepare, read_response, read_stream};
use crate::llm_http::{
    Exchange, FinishReason, HttpResponse, LlmErrorKind, ResponseFormat, SseEvent, ToolCall,
    ToolCallPart, ToolChoice, Usage,
};

const OPENAI: Provider = Provider::named("OpenAI");

fn wire() -> ChatCompletions {
    ChatCompletions {
        provider: OPENAI,
        default_model: "gpt-4o-mini".into(),
        extra_headers: vec![("x-title".into(), "Opspawn".into())],
        max_tokens_field: "max_completion_tokens",
        ranges: crate::llm_http::options::Ranges::openai(&OPENAI),
    }
}

fn context() -> ReplyContext {
    ReplyContext {
        model: "gpt-4o-mini".into(),
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

/// A question's images are parts of its message; a tool result's follow
/// the run of results in one user message, captioned with the call.
#[test]
fn images_go_as_image_url_parts() {
    use crate::llm_http::fixtures::{PIXEL_PNG, image_request};
    let body = build(
        &OPENAI,
        &image_request(),
        "gpt-4o-mini",
        false,
        "max_tokens",
    )
    .unwrap();
    let data_url = format!("data:image/png;base64,{PIXEL_PNG}");
    let messages = body["messages"].as_array().unwrap();
    let roles: Vec<&str> = messages
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(
        roles,
        ["system", "user", "assistant", "tool", "tool", "user"]
    );
    assert_eq!(
        messages[1]["content"],
        json!([
            {"type": "text", "text": "Weather in Paris and Rome?"},
            {"type": "image_url", "image_url": {"url": "https://example.com/paris.jpg"}},
            {"type": "image_url", "image_url": {"url": data_url}},
        ])
    );
    assert_eq!(
        messages[3]["content"], "{\"temp_c\":18}",
        "a tool message stays text"
    );
    assert_eq!(
        messages[5]["content"],
        json!([
            {"type": "text", "text": "The image returned by tool call call_1:"},
            {"type": "image_url", "image_url": {"url": data_url}},
        ])
    );

    let mut misplaced = weather_request();
    misplaced.messages[1].images = image_request().messages[0].images.clone();
    let error = build(&OPENAI, &misplaced, "m", false, "max_tokens").unwrap_err();
    assert_eq!(error.kind, LlmErrorKind::InvalidRequest);
}

#[test]
fn requests_carry_messages_tool_calls_results_and_tools() {
    let body = build(
        &OPENAI,
        &weather_request(),
        "gpt-4o-mini",
        true,
        "max_tokens",
    )
    .unwrap();
    let expected = json!({
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "call_2", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\":\"Rome\"}"}},
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp_c\":18}"},
            {"role": "tool", "tool_call_id": "call_2",
             "content": "Error: the weather service timed out"},
        ],
        "tools": [{"type": "function", "function": {
            "name": "get_weather",
            "description": "Current weather for a city",
            "parameters": serde_json::from_str::<Value>(crate::llm_http::fixtures::WEATHER_SCHEMA).unwrap(),
        }}],
        "temperature": 0.2,
        "max_tokens": 256,
        "stop": ["END"],
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    assert_eq!(body, expected);
}

#[test]
fn requests_without_options_are_minimal() {
    let mut request = weather_request();
    request.system = None;
    request.tools.clear();
    request.temperature = None;
    request.max_tokens = None;
    request.stop.clear();
    request.messages.truncate(1);
    let body = wire().body(&request, "m", false).unwrap();
    assert_eq!(
        body,
        json!({
            "model": "m",
            "messages": [{"role": "user", "content": "Weather in Paris and Rome?"}],
            "stream": false,
        })
    );
}

#[test]
fn openai_asks_for_max_completion_tokens() {
    let body = wire().body(&weather_request(), "m", false).unwrap();
    assert_eq!(body["max_completion_tokens"], 256);
    assert!(body.get("max_tokens").is_none());
}

#[test]
fn tool_messages_need_their_call_id() {
    let mut request = weather_request();
    request.messages[2].tool_call_id = None;
    let error = wire().body(&request, "m", false).unwrap_err();
    assert_eq!(error.kind, LlmErrorKind::InvalidRequest);
}

#[test]
fn the_endpoint_model_and_headers() {
    let wire = wire();
    assert_eq!(wire.path("m", true), "/chat/completions");
    assert_eq!(wire.model(&weather_request()), "gpt-4o-mini");
    let mut request = weather_request();
    request.model = Some("gpt-4.1".into());
    assert_eq!(wire.model(&request), "gpt-4.1");
    let headers = wire.headers(true);
    assert!(headers.contains(&("content-type".into(), "application/json".into())));
    assert!(headers.contains(&("accept".into(), "text/event-stream".into())));
    assert!(headers.contains(&("x-title".into(), "Opspawn".into())));
    assert!(!headers.iter().any(|(name, _)| name == "authorization"));
}

/// The example in OpenAI's API reference, with parallel tool calls.
const COMPLETION: &str = r#"{
  "id": "chatcmpl-abc123",
  "object": "chat.completion",
  "created": 1699896916,
  "model": "gpt-4o-mini-2024-07-18",
  "choices": [
    {
      "index": 0,
      "message": {
        "role": "assistant",
        "content": null,
        "tool_calls": [
          {"id": "call_abc123", "type": "function",
           "function": {"name": "get_current_weather", "arguments": "{\n\"location\": \"Boston, MA\"\n}"}},
          {"id": "call_def456", "type": "function",
           "function": {"name": "get_current_weather", "arguments": "{\"location\": \"Paris\"}"}}
        ]
      },
      "logprobs": null,
      "finish_reason": "tool_calls"
    }
  ],
  "usage": {"prompt_tokens": 82, "completion_tokens": 17, "total_tokens": 99}
}"#;

#[test]
fn parses_a_completion_with_parallel_tool_calls() {
    let response = wire().parse(COMPLETION.as_bytes(), &context()).unwrap();
    assert_eq!(response.message.content, "");
    assert_eq!(
        response.message.tool_calls,
        [
            call(
                "call_abc123",
                "get_current_weather",
                "{\n\"location\": \"Boston, MA\"\n}"
            ),
            call(
                "call_def456",
                "get_current_weather",
                "{\"location\": \"Paris\"}"
            ),
        ]
    );
    assert_eq!(response.finish_reason, FinishReason::ToolCalls);
    assert_eq!(
        response.usage,
        Some(Usage {
            input_tokens: 82,
            output_tokens: 17
        })
    );
    assert_eq!(response.model, "gpt-4o-mini-2024-07-18");
}

#[test]
fn parses_a_text_completion() {
    let body = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o-mini",
        "choices":[{"index":0,"message":{"role":"assistant","content":"Hello there, how may I assist you today?","refusal":null},
        "logprobs":null,"finish_reason":"stop"}],
        "usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21}}"#;
    let response = wire().parse(body.as_bytes(), &context()).unwrap();
    assert_eq!(
        response.message.content,
        "Hello there, how may I assist you today?"
    );
    assert!(response.message.tool_calls.is_empty());
    assert_eq!(response.finish_reason, FinishReason::Stop);
    for (reason, expected) in [
        ("length", FinishReason::Length),
        ("content_filter", FinishReason::ContentFilter),
        ("weird", FinishReason::Other),
    ] {
        assert_eq!(finish_reason(reason), expected);
    }
}

#[test]
fn compatible_servers_may_omit_ids_and_usage() {
    let body = r#"{"model":"llama3.2","choices":[{"index":0,"message":{"role":"assistant","content":"",
        "tool_calls":[{"function":{"name":"get_weather","arguments":{"city":"Paris"}}}]},"finish_reason":"stop"}]}"#;
    let response = wire().parse(body.as_bytes(), &context()).unwrap();
    assert_eq!(
        response.message.tool_calls,
        [call("call-3", "get_weather", r#"{"city":"Paris"}"#)]
    );
    assert_eq!(response.finish_reason, FinishReason::ToolCalls);
    assert_eq!(response.usage, None);
}

#[test]
fn malformed_bodies_are_bad_responses() {
    for body in ["{not json", r#"{"choices": []}"#, r#"{"choices": [{}]}"#] {
        let error = wire().parse(body.as_bytes(), &context()).unwrap_err();
        assert_eq!(error.kind, LlmErrorKind::BadResponse, "{body}");
        assert_eq!(error.body.as_deref(), Some(body));
    }
}

/// OpenAI's documented stream shape: a role chunk, tool-call fragments for
/// two parallel calls, the finish reason, then a usage-only chunk.
const TOOL_STREAM: &str = concat!(
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":null},\"finish_reason\":null}],\"usage\":null}\n\n",
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_a\",\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"arguments\":\"\"}}]},\"finish_reason\":null}],\"usage\":null}\n\n",
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"ci\"}}]},\"finish_reason\":null}],\"usage\":null}\n\n",
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"ty\\\": \\\"Paris\\\"}\"}}]},\"finish_reason\":null}],\"usage\":null}\n\n",
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":1,\"id\":\"call_b\",\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"arguments\":\"{\\\"city\\\": \"}}]},\"finish_reason\":null}],\"usage\":null}\n\n",
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":1,\"function\":{\"arguments\":\"\\\"Rome\\\"}\"}}]},\"finish_reason\":null}],\"usage\":null}\n\n",
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}],\"usage\":null}\n\n",
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[],\"usage\":{\"prompt_tokens\":80,\"completion_tokens\":40,\"total_tokens\":120}}\n\n",
    "data: [DONE]\n\n",
);

#[test]
fn streams_assemble_tool_call_fragments() {
    for size in [1, 7, 64, TOOL_STREAM.len()] {
        let (response, emitted) = decode_stream(&wire(), &context(), TOOL_STREAM, size);
        let response = response.unwrap();
        assert!(emitted.is_empty());
        assert_eq!(
            response.message.tool_calls,
            [
                call("call_a", "get_weather", r#"{"city": "Paris"}"#),
                call("call_b", "get_weather", r#"{"city": "Rome"}"#),
            ]
        );
        assert_eq!(response.finish_reason, FinishReason::ToolCalls);
        assert_eq!(
            response.usage,
            Some(Usage {
                input_tokens: 80,
                output_tokens: 40
            })
        );
        assert_eq!(response.model, "gpt-4o-mini-2024-07-18");
    }
}

const TEXT_STREAM: &str = concat!(
    ": OPENROUTER PROCESSING\n\n",
    "data: {\"model\":\"openai/gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
    "data: {\"model\":\"openai/gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\n\n",
    "data: {\"model\":\"openai/gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo é\"}}]}\n\n",
    "data: {\"model\":\"openai/gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2}}\n\n",
    "data: [DONE]\n\n",
);

#[test]
fn streams_emit_text_as_it_arrives() {
    let (response, emitted) = decode_stream(&wire(), &context(), TEXT_STREAM, 5);
    let response = response.unwrap();
    assert_eq!(emitted, ["Hel", "lo é"]);
    assert_eq!(response.message.content, "Hello é");
    assert_eq!(response.finish_reason, FinishReason::Stop);
    assert_eq!(response.model, "openai/gpt-4o");
    assert_eq!(response.usage.map(|u| u.output_tokens), Some(2));
}

#[test]
fn streams_cut_short_are_unavailable() {
    let cut = &TEXT_STREAM[..TEXT_STREAM
        .find("data: {\"model\":\"openai/gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{},")
        .unwrap()];
    let (response, emitted) = decode_stream(&wire(), &context(), cut, 16);
    assert_eq!(emitted, ["Hel", "lo é"]);
    assert_eq!(response.unwrap_err().kind, LlmErrorKind::Unavailable);
    let (response, _) = decode_stream(&wire(), &context(), "data: {oops\n\n", 16);
    assert_eq!(response.unwrap_err().kind, LlmErrorKind::BadResponse);
}

#[test]
fn errors_inside_a_stream_end_it() {
    let stream = concat!(
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n",
        "data: {\"id\":\"gen-1\",\"object\":\"chat.completion.chunk\",\"error\":{\"code\":502,\"message\":\"Provider returned error\"},\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\"},\"finish_reason\":\"error\"}]}\n\n",
    );
    let (response, emitted) = decode_stream(&wire(), &context(), stream, 9);
    let error = response.unwrap_err();
    assert_eq!(emitted, ["Hi"]);
    assert_eq!(error.kind, LlmErrorKind::Unavailable);
    assert_eq!(error.status, Some(502));
    assert!(error.body.unwrap().contains("Provider returned error"));
}

#[test]
fn errors_in_a_success_body_map_by_their_code() {
    for (code, kind) in [
        (401, LlmErrorKind::Auth),
        (402, LlmErrorKind::InvalidRequest),
        (429, LlmErrorKind::RateLimited),
        (502, LlmErrorKind::Unavailable),
        (503, LlmErrorKind::Unavailable),
    ] {
        let body = format!(
            r#"{{"error":{{"code":{code},"message":"no","metadata":{{"provider_name":"X"}}}}}}"#
        );
        let error = wire().parse(body.as_bytes(), &context()).unwrap_err();
        assert_eq!((code, error.kind), (code, kind));
        assert_eq!(error.status, Some(code));
        assert_eq!(error.body.as_deref(), Some(body.as_str()));
    }
}

#[test]
fn failure_statuses_use_the_generic_mapping() {
    let body = br#"{"error":{"message":"The model `gpt-9` does not exist","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#;
    let error = wire().error(404, &Headers::default(), body);
    assert_eq!(error.kind, LlmErrorKind::InvalidRequest);
    assert_eq!(
        error.message,
        "OpenAI rejected the request as invalid (404)"
    );
}

#[test]
fn new_request_fields_map_to_their_chat_completions_keys() {
    let mut request = options_request();
    for (choice, expected) in
        tool_choices(json!({"type": "function", "function": {"name": "get_weather"}}))
    {
        request.tool_choice = choice;
        let body = wire().body(&request, "m", false).unwrap();
        assert_eq!(body.get("tool_choice"), expected.as_ref());
        assert_eq!(body["top_p"], json!(0.9));
        assert_eq!(body["parallel_tool_calls"], false);
        assert_eq!(
            body["response_format"],
            json!({"type": "json_schema", "json_schema": {
                "name": "weather",
                "schema": {"type": "object", "properties": {"temp_c": {"type": "number"}}},
                "strict": true,
            }})
        );
    }
}

#[test]
fn tool_options_need_tools() {
    let mut request = weather_request();
    request.tools.clear();
    request.parallel_tool_calls = Some(true);
    let body = wire().body(&request, "m", false).unwrap();
    assert!(body.get("parallel_tool_calls").is_none());
    assert!(body.get("tool_choice").is_none());
    request.tool_choice = ToolChoice::Required;
    let error = wire().body(&request, "m", false).unwrap_err();
    assert_eq!(error.kind, LlmErrorKind::InvalidRequest);

    let mut request = weather_request();
    request.response_format = Some(ResponseFormat {
        name: "r".into(),
        schema: "{".into(),
        strict: false,
    });
    let error = wire().body(&request, "m", false).unwrap_err();
    assert_eq!(error.kind, LlmErrorKind::InvalidRequest);
}

#[test]
fn prepare_builds_the_http_request_and_its_reply_context() {
    let mut request = weather_request();
    request.provider_options = r#"{"stream": false, "seed": 7, "script": []}"#.into();
    let prepared = prepare(&wire(), &request).unwrap();
    let (http, body) = http_request(prepared.exchange);
    expect_unstreamed_post(&http, "/chat/completions");
    assert_eq!(body["model"], "gpt-4o-mini");
    assert_eq!(body["stream"], false);
    assert_eq!(body["seed"], 7);
    assert!(body.get("script").is_none());
    // Two calls are already in the conversation: a minted id would be
    // call-3. The name errors go by travels too.
    assert_eq!(
        ReplyContext::decode(&OPENAI, &prepared.reply_context).unwrap(),
        ReplyContext {
            provider: Some("OpenAI".into()),
            ..context()
        }
    );

    request.provider_options = String::new();
    let Exchange::Http(http) = prepare(&wire(), &request).unwrap().exchange else {
        panic!("expected an HTTP exchange");
    };
    assert!(http.stream, "streaming is the default");
}

#[test]
fn read_response_maps_statuses_and_reads_successes() {
    let response = |status: u16, headers: Vec<(String, String)>, body: &str| HttpResponse {
        status,
        headers,
        body: body.as_bytes().to_vec(),
    };
    let reply_context = context().encode();
    let reply = read_response(&wire(), &reply_context, &response(200, vec![], COMPLETION)).unwrap();
    assert_eq!(reply.message.tool_calls.len(), 2);

    let limited = response(
        429,
        vec![("Retry-After".into(), "2".into())],
        r#"{"error":{"message":"Rate limit reached"}}"#,
    );
    let error = read_response(&wire(), &reply_context, &limited).unwrap_err();
    assert_eq!(error.kind, LlmErrorKind::RateLimited);
    assert_eq!(error.retry_after_ms, Some(2000));
    assert_eq!(error.status, Some(429));

    // A body that cannot be read keeps the status it came with.
    let error =
        read_response(&wire(), &reply_context, &response(200, vec![], "<html>")).unwrap_err();
    assert_eq!(error.kind, LlmErrorKind::BadResponse);
    assert_eq!(error.status, Some(200));

    let error = read_response(&wire(), "garbage", &response(200, vec![], COMPLETION)).unwrap_err();
    assert_eq!(error.kind, LlmErrorKind::Other);
}

#[test]
fn stream_batches_are_translated_without_memory_of_earlier_ones() {
    let event = |data: &str| SseEvent {
        event: None,
        data: data.into(),
    };
    let reply_context = context().encode();
    // A compatible server that gives no id: the first piece gets a minted one.
    let first = event(
        r#"{"choices":[{"index":0,"delta":{"role":"assistant","tool_calls":[{"index":1,"function":{"name":"get_weather","arguments":"{\"ci"}}]}}]}"#,
    );
    let parts = read_stream(&wire(), &reply_context, &[first]).unwrap();
    assert_eq!(
        parts,
        [
            StreamPart::Model("gpt-4o-mini".into()),
            StreamPart::ToolCall(ToolCallPart {
                index: 1,
                id: Some("call-4".into()),
                name: Some("get_weather".into()),
                arguments: "{\"ci".into(),
            }),
        ]
    );
    let rest = [
        event(
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"function":{"arguments":"ty\":\"Oslo\"}"}}]},"finish_reason":"stop"}]}"#,
        ),
        event("[DONE]"),
        event(r#"{"choices":[{"index":0,"delta":{"content":"after the end"}}]}"#),
    ];
    let parts = read_stream(&wire(), &reply_context, &rest).unwrap();
    assert_eq!(
        parts,
        [
            StreamPart::ToolCall(ToolCallPart {
                index: 1,
                id: None,
                name: None,
                arguments: "ty\":\"Oslo\"}".into(),
            }),
            StreamPart::Finish(FinishReason::Stop),
            StreamPart::Done,
        ]
    );
}

#[test]
fn every_text_part_is_read_and_several_choices_are_refused() {
    let parts = r#"{"choices":[{"index":0,"finish_reason":"stop","message":{"role":"assistant",
        "content":[{"type":"text","text":"It is "},{"type":"text","text":"18 C."}]}}]}"#;
    let response = wire().parse(parts.as_bytes(), &context()).unwrap();
    assert_eq!(response.message.content, "It is 18 C.");

    let refusal = r#"{"choices":[{"index":0,"finish_reason":"stop","message":{"role":"assistant",
        "content":null,"refusal":"I can't help with that."}}]}"#;
    let response = wire().parse(refusal.as_bytes(), &context()).unwrap();
    assert_eq!(response.message.content, "I can't help with that.");

    let audio = r#"{"choices":[{"index":0,"message":{"role":"assistant",
        "content":[{"type":"output_audio","data":"..."}]}}]}"#;
    let error = wire().parse(audio.as_bytes(), &context()).unwrap_err();
    assert_eq!(error.kind, LlmErrorKind::BadResponse);
    assert!(error.message.contains("output_audio"), "{}", error.message);

    let two = r#"{"choices":[
        {"index":0,"finish_reason":"stop","message":{"role":"assistant","content":"a"}},
        {"index":1,"finish_reason":"stop","message":{"role":"assistant","content":"b"}}]}"#;
    let error = wire().parse(two.as_bytes(), &context()).unwrap_err();
    assert!(error.message.contains("2 choices"), "{}", error.message);
    let second = SseEvent {
        event: None,
        data: r#"{"choices":[{"index":1,"delta":{"content":"b"}}]}"#.into(),
    };
    let error = read_stream(&wire(), &context().encode(), &[second]).unwrap_err();
    assert_eq!(error.kind, LlmErrorKind::BadResponse);

    let mut request = weather_request();
    request.provider_options = r#"{"n": 3}"#.into();
    let error = prepare(&wire(), &request).unwrap_err();
    expect_error(
        &error,
        LlmErrorKind::InvalidRequest,
        "n 3 asks for 3 replies",
    );
}

#[test]
fn sampling_options_are_read_from_the_options_and_checked() {
    let mut request = weather_request();
    request.provider_options =
        r#"{"temperature": 1.7, "top_p": 0.5, "max_tokens": 9, "seed": 4}"#.into();
    let prepared = prepare(&wire(), &request).unwrap();
    let Exchange::Http(http) = prepared.exchange else {
        panic!("an HTTP exchange");
    };
    let body: Value = serde_json::from_slice(&http.body).unwrap();
    assert_eq!(body["temperature"], json!(1.7));
    assert_eq!(body["top_p"], json!(0.5));
    assert_eq!(body["max_completion_tokens"], 9);
    assert!(body.get("max_tokens").is_none());
    assert_eq!(body["seed"], 4);
    for (options, expected) in [
        (
            r#"{"temperature": 2.1}"#,
            "temperature 2.1 is outside OpenAI's range, 0 to 2",
        ),
        (
            r#"{"top_p": 1.1}"#,
            "top_p 1.1 is outside OpenAI's range, 0 to 1",
        ),
        (
            r#"{"top_k": 3}"#,
            "top_k is not accepted: OpenAI has no top_k",
        ),
        (r#"{"max_tokens": 0}"#, "max_tokens must be at least 1"),
    ] {
        request.provider_options = options.into();
        let error = prepare(&wire(), &request).unwrap_err();
        assert_eq!(error.kind, LlmErrorKind::InvalidRequest, "{options}");
        assert!(
            error.message.starts_with("invalid LLM options: "),
            "{}",
            error.message
        );
        assert!(
            error.message.contains(expected),
            "{options}: {}",
            error.message
        );
    }
    request.provider_options = "{}".into();
    request.temperature = Some(3.0);
    let error = prepare(&wire(), &request).unwrap_err();
    assert!(
        error.message.contains("temperature 3 is outside"),
        "{}",
        error.message
    );
}

/// The plain-chunk reading gives what the JSON-tree reading gives, for the
/// chunks it takes, and leaves every other chunk to it.
#[test]
fn plain_chunks_are_read_as_the_json_tree_reads_them() {
    let plain = [
        r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"gpt-4o","service_tier":"default","system_fingerprint":"fp","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}"#,
        r#"{"model":"gpt-4o","choices":[{"index":0,"delta":{"content":"Hel\"lo\n é"}}]}"#,
        r#"{"model":"","choices":[{"delta":{"role":"assistant"}}]}"#,
        r#"{"choices":[{"delta":{"content":"no model"}}]}"#,
        r#"{"model":"m","choices":[{"index":0,"delta":{"refusal":"I can't"},"finish_reason":"content_filter"}]}"#,
        r#"{"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"length"}],"error":null}"#,
        r#"{"model":"m","choices":[]}"#,
        r#"{}"#,
        // The closing usage, and the counts a tree reads as 0 or caps.
        r#"{"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":2}}"#,
        r#"{"id":"c","object":"chat.completion.chunk","model":"m","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12,"prompt_tokens_details":{"cached_tokens":0}}}"#,
        r#"{"model":"m","choices":[],"usage":{"prompt_tokens":null}}"#,
        r#"{"model":"m","choices":[],"usage":{"completion_tokens":99999999999}}"#,
        // Tool calls: the fragment that names a call, with and without an
        // id, and those that add arguments, by index or by position.
        r#"{"model":"m","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"a","type":"function","function":{"name":"f","arguments":""}}]}}]}"#,
        r#"{"model":"m","choices":[{"index":0,"delta":{"tool_calls":[{"index":2,"function":{"name":"g","arguments":"{\"x\":"}}]}}]}"#,
        r#"{"model":"m","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"1}"}}]}}]}"#,
        r#"{"choices":[{"delta":{"tool_calls":[{"function":{"arguments":"a"}},{"function":{"arguments":null}}]}}]}"#,
        r#"{"choices":[{"delta":{"role":"assistant","content":null,"tool_calls":null}}]}"#,
    ];
    let other = [
        r#"{"model":"m","choices":[{"index":1,"delta":{"content":"second"}}]}"#,
        r#"{"model":"m","choices":[{"delta":{"tool_calls":[{"function":{"arguments":{"x":1}}}]}}]}"#,
        r#"{"model":"m","choices":[{"delta":{"tool_calls":[{"index":-1,"function":{"arguments":""}}]}}]}"#,
        r#"{"model":"m","choices":[{"delta":{"tool_calls":[{"function":null}]}}]}"#,
        r#"{"model":"m","choices":[],"usage":{"prompt_tokens":1.5}}"#,
        r#"{"error":{"message":"overloaded","code":503}}"#,
        r#"{"model":7,"choices":[{"delta":{"content":"a number for a model"}}]}"#,
        r#"{"model":"m","choices":[{"delta":null}]}"#,
        r#"not json"#,
    ];
    let by_tree = |data: &str| {
        let mut parts = Vec::new();
        stream::decode_tree(&OPENAI, data, &context(), &mut parts).map(|()| parts)
    };
    let by_decode = |data: &str| {
        let mut parts = Vec::new();
        let event = SseEvent {
            event: None,
            data: data.to_owned(),
        };
        stream::decode(&OPENAI, &event, &context(), &mut parts).map(|()| parts)
    };
    for data in plain {
        assert!(stream::PlainChunk::read(data).is_some(), "{data}");
        assert_eq!(by_decode(data), by_tree(data), "{data}");
    }
    for data in other {
        assert!(stream::PlainChunk::read(data).is_none(), "{data}");
        assert_eq!(by_decode(data), by_tree(data), "{data}");
    }
}
