use serde_json::{Value, json};

use super::*;
use crate::llm_http::fixtures::{
    WEATHER_SCHEMA, call, decode_stream, expect_error, expect_unstreamed_post, http_request,
    message, options_request, tool_choices, weather_request,
};
use crate::llm_http::wire::{prepare, read_response, read_stream};
use crate::llm_http::{
    ChatMessage, FinishReason, HttpResponse, LlmErrorKind, ProviderDatum, Role, ToolCall,
    ToolChoice, Usage,
};

const OPENAI: Provider = Provider::named("OpenAI");

fn wire() -> Responses {
    Responses {
        provider: OPENAI,
        default_model: "gpt-5-mini".into(),
        extra_headers: Vec::new(),
        ranges: Ranges::openai(&OPENAI),
    }
}

fn context() -> ReplyContext {
    ReplyContext {
        model: "gpt-5-mini".into(),
        first_call_number: 3,
        api: None,
        provider: None,
    }
}

fn datum(key: &str, value: &Value) -> ProviderDatum {
    ProviderDatum {
        key: key.into(),
        value: value.to_string(),
    }
}

fn weather_call(id: &str, city: &str) -> ToolCall {
    call(id, city)
}

/// A reasoning item as OpenAI returns it with `include:
/// ["reasoning.encrypted_content"]`.
fn reasoning_item() -> Value {
    json!({
        "id": "rs_68af",
        "type": "reasoning",
        "summary": [{"type": "summary_text", "text": "**Checking two cities**"}],
        "encrypted_content": "gAAAAABoqsealed==",
    })
}

#[test]
fn requests_carry_items_instructions_and_flat_tools() {
    let body = wire().body(&weather_request(), "gpt-5-mini", true).unwrap();
    let expected = json!({
        "model": "gpt-5-mini",
        "instructions": "You are terse.",
        "input": [
            {"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": "Weather in Paris and Rome?"}]},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather",
             "arguments": "{\"city\":\"Paris\"}"},
            {"type": "function_call", "call_id": "call_2", "name": "get_weather",
             "arguments": "{\"city\":\"Rome\"}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "{\"temp_c\":18}"},
            {"type": "function_call_output", "call_id": "call_2",
             "output": "Error: the weather service timed out"},
        ],
        "tools": [{
            "type": "function",
            "name": "get_weather",
            "description": "Current weather for a city",
            "parameters": serde_json::from_str::<Value>(WEATHER_SCHEMA).unwrap(),
            "strict": false,
        }],
        "temperature": 0.2,
        "max_output_tokens": 256,
        "stream": true,
        "store": false,
        "include": ["reasoning.encrypted_content"],
    });
    assert_eq!(body, expected);
    // No Chat Completions keys: the Responses API refuses them.
    for key in [
        "messages",
        "stop",
        "max_tokens",
        "max_completion_tokens",
        "stream_options",
    ] {
        assert!(body.get(key).is_none(), "{key}");
    }
}

/// Images are `input_image` parts: of the question's message, and of a
/// tool's output, which becomes a list of parts.
#[test]
fn images_go_as_input_image_parts() {
    use crate::llm_http::fixtures::{PIXEL_PNG, image_request};
    let body = build(&OPENAI, &image_request(), "gpt-5-mini", false).unwrap();
    let data_url = format!("data:image/png;base64,{PIXEL_PNG}");
    let input = body["input"].as_array().unwrap();
    assert_eq!(
        input[0]["content"],
        json!([
            {"type": "input_text", "text": "Weather in Paris and Rome?"},
            {"type": "input_image", "image_url": "https://example.com/paris.jpg"},
            {"type": "input_image", "image_url": data_url},
        ])
    );
    let outputs: Vec<&Value> = input
        .iter()
        .filter(|item| item["type"] == "function_call_output")
        .collect();
    assert_eq!(
        outputs[0]["output"],
        json!([
            {"type": "input_text", "text": "{\"temp_c\":18}"},
            {"type": "input_image", "image_url": data_url},
        ])
    );
    assert_eq!(outputs[1]["output"], "Error: the weather service timed out");
}

#[test]
fn an_assistant_turn_goes_back_as_its_items_in_their_order() {
    let mut request = weather_request();
    request.messages[1] = ChatMessage {
        tool_calls: vec![
            weather_call("call_1", "Paris"),
            weather_call("call_2", "Rome"),
        ],
        provider_data: vec![
            // In the order the host appended them, not the items' order.
            datum(
                "openai:output:2",
                &json!({"type": "function_call", "id": "fc_2", "call_id": "call_2"}),
            ),
            datum("openai:output:0", &reasoning_item()),
            datum("gemini:thought_signature", &json!("another adapter's")),
            datum(
                "openai:output:1",
                &json!({"type": "function_call", "id": "fc_1", "call_id": "call_1"}),
            ),
        ],
        ..message(Role::Assistant, "")
    };
    request.messages.push(ChatMessage {
        provider_data: vec![
            datum(
                "openai:output:0",
                &json!({"type": "message", "id": "msg_9"}),
            ),
            datum(
                "openai:output:1",
                &json!({"type": "message", "id": "msg_10"}),
            ),
        ],
        ..message(Role::Assistant, "Paris is 18 C; Rome did not answer.")
    });
    let body = wire().body(&request, "m", false).unwrap();
    let input = body["input"].as_array().unwrap();
    assert_eq!(
        input[1],
        reasoning_item(),
        "reasoning goes back unchanged, first"
    );
    assert_eq!(
        input[2],
        json!({"type": "function_call", "id": "fc_1", "status": "completed",
               "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"})
    );
    assert_eq!(input[3]["id"], "fc_2");
    assert_eq!(input[3]["call_id"], "call_2");
    assert_eq!(input[4]["type"], "function_call_output");
    assert_eq!(
        input[6],
        json!({"type": "message", "id": "msg_9", "status": "completed", "role": "assistant",
               "content": [{"type": "output_text", "text": "Paris is 18 C; Rome did not answer.",
                            "annotations": []}]}),
        "the text goes where its first message was, once"
    );
    assert_eq!(input.len(), 7, "{input:#?}");
}

#[test]
fn calls_and_text_the_data_does_not_place_follow_it() {
    let mut request = weather_request();
    request.messages[1] = ChatMessage {
        tool_calls: vec![
            weather_call("call_1", "Paris"),
            weather_call("call_new", "Oslo"),
        ],
        provider_data: vec![
            datum("openai:output:0", &reasoning_item()),
            datum(
                "openai:output:1",
                &json!({"type": "function_call", "id": "fc_1", "call_id": "call_1"}),
            ),
            // A call the planner dropped is not sent.
            datum(
                "openai:output:2",
                &json!({"type": "function_call", "id": "fc_2", "call_id": "call_2"}),
            ),
        ],
        ..message(Role::Assistant, "Let me check.")
    };
    request.messages.truncate(2);
    let body = wire().body(&request, "m", false).unwrap();
    let kinds: Vec<(&str, &str)> = body["input"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| {
            (
                item["type"].as_str().unwrap(),
                item["id"].as_str().unwrap_or("-"),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("message", "-"),
            ("reasoning", "rs_68af"),
            ("function_call", "fc_1"),
            ("message", "-"),
            ("function_call", "-"),
        ]
    );
    assert_eq!(body["input"][3]["content"][0]["text"], "Let me check.");
    assert_eq!(body["input"][4]["call_id"], "call_new");
}

#[test]
fn data_under_the_adapters_key_that_it_did_not_write_is_refused() {
    for value in [
        "not json",
        r#"{"type": "web_search_call"}"#,
        r#"{"type": "function_call"}"#,
    ] {
        let mut request = weather_request();
        request.messages[1].provider_data = vec![ProviderDatum {
            key: "openai:output:0".into(),
            value: value.into(),
        }];
        let error = wire().body(&request, "m", false).unwrap_err();
        assert_eq!(error.kind, LlmErrorKind::InvalidRequest, "{value}");
        assert!(
            error.message.contains("openai:output:0"),
            "{}",
            error.message
        );
    }
    let mut request = weather_request();
    request.messages[1].provider_data = vec![ProviderDatum {
        key: "openai:output:first".into(),
        value: "{}".into(),
    }];
    assert!(wire().body(&request, "m", false).is_err());
}

#[test]
fn request_options_map_to_their_responses_keys() {
    let mut request = options_request();
    for (choice, expected) in tool_choices(json!({"type": "function", "name": "get_weather"})) {
        request.tool_choice = choice;
        let body = wire().body(&request, "m", false).unwrap();
        assert_eq!(body.get("tool_choice"), expected.as_ref());
        assert_eq!(body["top_p"], json!(0.9));
        assert_eq!(body["parallel_tool_calls"], false);
        assert_eq!(
            body["text"],
            json!({"format": {
                "type": "json_schema",
                "name": "weather",
                "schema": {"type": "object", "properties": {"temp_c": {"type": "number"}}},
                "strict": true,
            }})
        );
        assert!(body.get("response_format").is_none());
    }

    request.tools.clear();
    request.tool_choice = ToolChoice::Required;
    let error = wire().body(&request, "m", false).unwrap_err();
    assert_eq!(error.kind, LlmErrorKind::InvalidRequest);
}

#[test]
fn fewer_than_sixteen_output_tokens_are_refused_before_sending() {
    let mut request = weather_request();
    request.provider_options = r#"{"max_tokens": 15}"#.into();
    let error = prepare(&wire(), &request).unwrap_err();
    assert_eq!(error.kind, LlmErrorKind::InvalidRequest);
    assert!(
        error
            .message
            .starts_with("invalid LLM options: max_tokens 15 is below the 16"),
        "{}",
        error.message
    );
    request.provider_options = r#"{"max_tokens": 16}"#.into();
    assert!(prepare(&wire(), &request).is_ok());
}

#[test]
fn prepare_posts_to_responses() {
    let mut request = weather_request();
    request.provider_options = r#"{"stream": false, "store": true}"#.into();
    let (http, body) = http_request(prepare(&wire(), &request).unwrap().exchange);
    expect_unstreamed_post(&http, "/responses");
    assert_eq!(body["stream"], false);
    assert_eq!(body["store"], true, "the options win over the default");
    assert_eq!(body["model"], "gpt-5-mini");
}

/// A reasoning model's answer: reasoning, a word, then two parallel calls,
/// as the API returns it (the fields a client ignores included).
const RESPONSE: &str = r#"{
  "id": "resp_68af",
  "object": "response",
  "created_at": 1756315696,
  "status": "completed",
  "background": false,
  "error": null,
  "incomplete_details": null,
  "instructions": "You are terse.",
  "model": "gpt-5-mini-2025-08-07",
  "output": [
    {"id": "rs_68af", "type": "reasoning",
     "summary": [{"type": "summary_text", "text": "**Checking two cities**"}],
     "encrypted_content": "gAAAAABoqsealed=="},
    {"id": "msg_68af", "type": "message", "status": "completed", "role": "assistant",
     "content": [{"type": "output_text", "text": "Checking both.", "annotations": [], "logprobs": []}]},
    {"id": "fc_1", "type": "function_call", "status": "completed",
     "arguments": "{\"city\":\"Paris\"}", "call_id": "call_P", "name": "get_weather"},
    {"id": "fc_2", "type": "function_call", "status": "completed",
     "arguments": "{\"city\":\"Rome\"}", "call_id": "call_R", "name": "get_weather"}
  ],
  "parallel_tool_calls": true,
  "store": false,
  "text": {"format": {"type": "text"}, "verbosity": "medium"},
  "tool_choice": "auto",
  "usage": {"input_tokens": 81, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 149, "output_tokens_details": {"reasoning_tokens": 128},
            "total_tokens": 230}
}"#;

#[test]
fn parses_text_calls_and_reasoning_of_one_response() {
    let response = wire().parse(RESPONSE.as_bytes(), &context()).unwrap();
    assert_eq!(response.message.content, "Checking both.");
    assert_eq!(
        response.message.tool_calls,
        [
            ToolCall {
                id: "call_P".into(),
                ..weather_call("", "Paris")
            },
            ToolCall {
                id: "call_R".into(),
                ..weather_call("", "Rome")
            },
        ]
    );
    assert_eq!(response.finish_reason, FinishReason::ToolCalls);
    assert_eq!(
        response.usage,
        Some(Usage {
            input_tokens: 81,
            output_tokens: 149
        })
    );
    assert_eq!(response.model, "gpt-5-mini-2025-08-07");
    let data: Vec<(&str, Value)> = response
        .message
        .provider_data
        .iter()
        .map(|d| (d.key.as_str(), serde_json::from_str(&d.value).unwrap()))
        .collect();
    assert_eq!(
        data,
        [
            ("openai:output:0", reasoning_item()),
            (
                "openai:output:1",
                json!({"type": "message", "id": "msg_68af"})
            ),
            (
                "openai:output:2",
                json!({"type": "function_call", "id": "fc_1", "call_id": "call_P"})
            ),
            (
                "openai:output:3",
                json!({"type": "function_call", "id": "fc_2", "call_id": "call_R"})
            ),
        ]
    );
}

/// What the adapter read goes back as what the model said: every output
/// item, in its order, the reasoning unchanged.
#[test]
fn a_reply_goes_back_as_the_items_it_came_as() {
    let response = wire().parse(RESPONSE.as_bytes(), &context()).unwrap();
    let mut request = weather_request();
    request.messages.truncate(1);
    request.messages.push(response.message);
    let body = wire().body(&request, "m", false).unwrap();
    let sent = &body["input"].as_array().unwrap()[1..];
    let output: Value = serde_json::from_str(RESPONSE).unwrap();
    let output = output["output"].as_array().unwrap();
    assert_eq!(sent.len(), output.len());
    assert_eq!(sent[0], output[0]);
    for (sent, given) in sent.iter().zip(output).skip(1) {
        for key in ["type", "id", "call_id", "name", "arguments", "role"] {
            assert_eq!(sent.get(key), given.get(key), "{key}: {sent} for {given}");
        }
    }
    assert_eq!(sent[1]["content"][0]["text"], "Checking both.");
}

#[test]
fn refusals_are_text_and_unfinished_answers_say_why() {
    let refusal = r#"{"status": "completed", "model": "m", "output": [
        {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
         "content": [{"type": "refusal", "refusal": "I can't help with that."}]}]}"#;
    let response = wire().parse(refusal.as_bytes(), &context()).unwrap();
    assert_eq!(response.message.content, "I can't help with that.");
    assert_eq!(response.finish_reason, FinishReason::Stop);

    for (reason, expected) in [
        ("max_output_tokens", FinishReason::Length),
        ("content_filter", FinishReason::ContentFilter),
        ("something_new", FinishReason::Other),
    ] {
        let body = format!(
            r#"{{"status": "incomplete", "incomplete_details": {{"reason": "{reason}"}},
                "output": [{{"type": "message", "role": "assistant",
                "content": [{{"type": "output_text", "text": "Par"}}]}}]}}"#
        );
        let response = wire().parse(body.as_bytes(), &context()).unwrap();
        assert_eq!(response.finish_reason, expected, "{reason}");
        assert_eq!(response.message.content, "Par");
        assert_eq!(
            response.model, "gpt-5-mini",
            "the model asked for, when none is named"
        );
    }

    let background = r#"{"status": "queued", "output": []}"#;
    let error = wire().parse(background.as_bytes(), &context()).unwrap_err();
    expect_error(&error, LlmErrorKind::BadResponse, "leave background out");
}

#[test]
fn output_items_the_adapter_cannot_keep_are_refused() {
    let search = r#"{"status": "completed", "output": [
        {"id": "ws_1", "type": "web_search_call", "status": "completed"},
        {"id": "msg_1", "type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "It is sunny."}]}]}"#;
    let error = wire().parse(search.as_bytes(), &context()).unwrap_err();
    expect_error(
        &error,
        LlmErrorKind::BadResponse,
        "an item of type web_search_call",
    );
    let audio = r#"{"status": "completed", "output": [{"type": "message", "role": "assistant",
        "content": [{"type": "output_audio", "data": "..."}]}]}"#;
    let error = wire().parse(audio.as_bytes(), &context()).unwrap_err();
    assert!(error.message.contains("output_audio"), "{}", error.message);
    for body in ["{oops", r#"{"status": "completed"}"#] {
        let error = wire().parse(body.as_bytes(), &context()).unwrap_err();
        assert_eq!(error.kind, LlmErrorKind::BadResponse, "{body}");
    }
}

#[test]
fn failures_map_by_their_code() {
    for (code, kind) in [
        ("server_error", LlmErrorKind::Unavailable),
        ("rate_limit_exceeded", LlmErrorKind::RateLimited),
        ("invalid_prompt", LlmErrorKind::InvalidRequest),
        ("image_too_large", LlmErrorKind::InvalidRequest),
        ("vector_store_timeout", LlmErrorKind::Timeout),
    ] {
        let body = format!(
            r#"{{"status": "failed", "error": {{"code": "{code}", "message": "no"}}, "output": []}}"#
        );
        let error = wire().parse(body.as_bytes(), &context()).unwrap_err();
        assert_eq!((code, error.kind), (code, kind));
        assert_eq!(error.body.as_deref(), Some(body.as_str()));
    }
}

#[test]
fn failure_statuses_use_the_generic_mapping() {
    let response = |status: u16, headers: Vec<(String, String)>, body: &str| HttpResponse {
        status,
        headers,
        body: body.as_bytes().to_vec(),
    };
    let reply_context = context().encode();
    for (status, kind) in [
        (400, LlmErrorKind::InvalidRequest),
        (401, LlmErrorKind::Auth),
        (404, LlmErrorKind::InvalidRequest),
        (429, LlmErrorKind::RateLimited),
        (500, LlmErrorKind::Unavailable),
        (503, LlmErrorKind::Unavailable),
    ] {
        let body = r#"{"error": {"message": "no", "type": "invalid_request_error", "param": null, "code": null}}"#;
        let headers = vec![("retry-after".into(), "3".into())];
        let error =
            read_response(&wire(), &reply_context, &response(status, headers, body)).unwrap_err();
        assert_eq!((status, error.kind), (status, kind));
        assert_eq!(error.status, Some(status));
        if status == 429 {
            assert_eq!(error.retry_after_ms, Some(3000));
        }
    }
    let reply = read_response(&wire(), &reply_context, &response(200, vec![], RESPONSE)).unwrap();
    assert_eq!(reply.message.tool_calls.len(), 2);
}

/// An event of the stream, as OpenAI frames it: its type as the event name
/// and in the data.
fn event(data: Value) -> String {
    format!(
        "event: {}\ndata: {data}\n\n",
        data["type"].as_str().unwrap()
    )
}

/// The answer of [`RESPONSE`], streamed as OpenAI streams it.
fn stream() -> String {
    let response = |status: &str, output: Value, usage: Value| {
        json!({"id": "resp_68af", "object": "response", "created_at": 1756315696,
               "status": status, "model": "gpt-5-mini-2025-08-07", "output": output,
               "usage": usage, "incomplete_details": null, "error": null})
    };
    let whole: Value = serde_json::from_str(RESPONSE).unwrap();
    let output = whole["output"].clone();
    let mut events = vec![
        event(json!({"type": "response.created", "sequence_number": 0,
                     "response": response("in_progress", json!([]), Value::Null)})),
        event(json!({"type": "response.in_progress", "sequence_number": 1,
                     "response": response("in_progress", json!([]), Value::Null)})),
        event(
            json!({"type": "response.output_item.added", "sequence_number": 2, "output_index": 0,
                     "item": {"id": "rs_68af", "type": "reasoning", "summary": []}}),
        ),
        event(
            json!({"type": "response.reasoning_summary_part.added", "sequence_number": 3,
                     "item_id": "rs_68af", "output_index": 0, "summary_index": 0,
                     "part": {"type": "summary_text", "text": ""}}),
        ),
        event(
            json!({"type": "response.reasoning_summary_text.delta", "sequence_number": 4,
                     "item_id": "rs_68af", "output_index": 0, "summary_index": 0,
                     "delta": "**Checking two cities**"}),
        ),
        event(
            json!({"type": "response.output_item.done", "sequence_number": 5, "output_index": 0,
                     "item": output[0]}),
        ),
        event(
            json!({"type": "response.output_item.added", "sequence_number": 6, "output_index": 1,
                     "item": {"id": "msg_68af", "type": "message", "status": "in_progress",
                              "role": "assistant", "content": []}}),
        ),
        event(
            json!({"type": "response.content_part.added", "sequence_number": 7,
                     "item_id": "msg_68af", "output_index": 1, "content_index": 0,
                     "part": {"type": "output_text", "text": "", "annotations": []}}),
        ),
    ];
    for (n, piece) in ["Check", "ing bo", "th."].iter().enumerate() {
        events.push(event(json!({"type": "response.output_text.delta",
            "sequence_number": 8 + n, "item_id": "msg_68af", "output_index": 1,
            "content_index": 0, "delta": piece, "logprobs": []})));
    }
    events.extend([
        event(
            json!({"type": "response.output_text.done", "sequence_number": 11,
                     "item_id": "msg_68af", "output_index": 1, "content_index": 0,
                     "text": "Checking both."}),
        ),
        event(
            json!({"type": "response.output_item.done", "sequence_number": 12, "output_index": 1,
                     "item": output[1]}),
        ),
    ]);
    let mut sequence = 13;
    for (index, city) in [(2, "Paris"), (3, "Rome")] {
        let item = &output[index];
        let mut added = item.clone();
        added["arguments"] = json!("");
        added["status"] = json!("in_progress");
        events.push(event(json!({"type": "response.output_item.added",
            "sequence_number": sequence, "output_index": index, "item": added})));
        for piece in ["{\"city\":", &format!("\"{city}\"}}")] {
            sequence += 1;
            events.push(event(
                json!({"type": "response.function_call_arguments.delta",
                "sequence_number": sequence, "item_id": item["id"], "output_index": index,
                "delta": piece}),
            ));
        }
        events.push(event(
            json!({"type": "response.function_call_arguments.done",
            "sequence_number": sequence + 1, "item_id": item["id"], "output_index": index,
            "arguments": item["arguments"]}),
        ));
        events.push(event(json!({"type": "response.output_item.done",
            "sequence_number": sequence + 2, "output_index": index, "item": item})));
        sequence += 3;
    }
    events.push(event(
        json!({"type": "response.completed", "sequence_number": sequence,
        "response": response("completed", output, whole["usage"].clone())}),
    ));
    events.concat()
}

#[test]
fn streams_assemble_text_calls_and_reasoning() {
    let stream = stream();
    let whole = wire().parse(RESPONSE.as_bytes(), &context()).unwrap();
    for size in [1, 9, 64, stream.len()] {
        let (response, emitted) = decode_stream(&wire(), &context(), &stream, size);
        let response = response.unwrap();
        assert_eq!(emitted, ["Check", "ing bo", "th."], "chunks of {size}");
        assert_eq!(response, whole, "chunks of {size}: streamed as read whole");
    }
}

#[test]
fn stream_events_are_translated_without_memory_of_earlier_ones() {
    let parse = |text: &str| {
        let mut parser = crate::llm_http::sse::SseParser::new();
        parser.push(text.as_bytes())
    };
    let reply_context = context().encode();
    let added = parse(&event(
        json!({"type": "response.output_item.added", "output_index": 4,
        "item": {"type": "function_call", "id": "fc_9", "name": "get_weather", "arguments": ""}}),
    ));
    assert_eq!(
        read_stream(&wire(), &reply_context, &added).unwrap(),
        [context().first_piece(4, None, "get_weather", String::new())],
        "a call without a call id gets a minted one"
    );
    let done = parse(&event(
        json!({"type": "response.output_item.done", "output_index": 4,
        "item": {"type": "function_call", "id": "fc_9", "name": "get_weather",
                 "arguments": "{}"}}),
    ));
    assert_eq!(
        read_stream(&wire(), &reply_context, &done).unwrap(),
        [StreamPart::ProviderData((
            "openai:output:4".into(),
            json!({"type": "function_call", "id": "fc_9", "call_id": "call-7"}).to_string()
        ))],
        "and the same one when the call is done"
    );
    let delta = parse(&event(
        json!({"type": "response.function_call_arguments.delta",
        "item_id": "fc_9", "delta": "{}"}),
    ));
    let error = read_stream(&wire(), &reply_context, &delta).unwrap_err();
    assert!(
        error.message.contains("no output_index"),
        "{}",
        error.message
    );
}

#[test]
fn items_the_adapter_cannot_keep_end_the_stream() {
    let stream = [
        event(json!({"type": "response.created", "response": {"model": "m", "status": "in_progress"}})),
        event(json!({"type": "response.output_item.added", "output_index": 0,
                     "item": {"id": "ws_1", "type": "web_search_call", "status": "in_progress"}})),
    ]
    .concat();
    let (response, _) = decode_stream(&wire(), &context(), &stream, 16);
    let error = response.unwrap_err();
    expect_error(&error, LlmErrorKind::BadResponse, "web_search_call");
}

#[test]
fn failed_and_incomplete_streams_say_so() {
    let text = event(
        json!({"type": "response.output_text.delta", "output_index": 0,
        "content_index": 0, "item_id": "msg_1", "delta": "Par"}),
    );
    let failed = [
        text.clone(),
        event(
            json!({"type": "response.failed", "response": {"status": "failed",
            "error": {"code": "server_error", "message": "The model failed."}}}),
        ),
    ]
    .concat();
    let (response, emitted) = decode_stream(&wire(), &context(), &failed, 7);
    assert_eq!(emitted, ["Par"]);
    let error = response.unwrap_err();
    assert_eq!(error.kind, LlmErrorKind::Unavailable);
    assert!(error.body.unwrap().contains("The model failed."));

    let error_event = [
        text.clone(),
        event(json!({"type": "error", "code": "rate_limit_exceeded",
            "message": "Slow down.", "param": null, "sequence_number": 3})),
    ]
    .concat();
    let (response, _) = decode_stream(&wire(), &context(), &error_event, 7);
    assert_eq!(response.unwrap_err().kind, LlmErrorKind::RateLimited);

    let incomplete = [
        text.clone(),
        event(
            json!({"type": "response.incomplete", "response": {"status": "incomplete",
            "incomplete_details": {"reason": "max_output_tokens"},
            "usage": {"input_tokens": 5, "output_tokens": 16}}}),
        ),
    ]
    .concat();
    let (response, _) = decode_stream(&wire(), &context(), &incomplete, 7);
    let response = response.unwrap();
    assert_eq!(response.finish_reason, FinishReason::Length);
    assert_eq!(response.message.content, "Par");
    assert_eq!(response.usage.map(|u| u.output_tokens), Some(16));

    let (response, _) = decode_stream(&wire(), &context(), &text, 7);
    assert_eq!(
        response.unwrap_err().kind,
        LlmErrorKind::Unavailable,
        "a stream cut before response.completed is not an answer"
    );
    let (response, _) = decode_stream(&wire(), &context(), "event: x\ndata: {oops\n\n", 7);
    assert_eq!(response.unwrap_err().kind, LlmErrorKind::BadResponse);
}
