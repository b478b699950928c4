//! OpenTelemetry traces: a real server exports its spans over OTLP
//! (HTTP/protobuf) to a receiver built from the OTLP definitions
//! (`opentelemetry-proto`), which decodes them as a collector would. The
//! tests check the span tree and the GenAI attributes of a 3-step task,
//! that prompts stay out unless the operator opts in, and that a task
//! resumed after a crash continues the trace it was submitted in.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::{AnyValue as AnyValueMessage, KeyValue};
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode as SpanStatus;
use prost::Message;
use serde_json::{Value, json};

use crate::{FINISH, Harness, calculator_task};

/// Spans as a collector receives them, with the resource's attributes.
#[derive(Clone, Default)]
struct Received {
    spans: Arc<Mutex<Vec<Span>>>,
    resources: Arc<Mutex<Vec<Vec<KeyValue>>>>,
}

/// An OTLP/HTTP receiver on a loopback port: `POST /v1/traces` with a
/// protobuf `ExportTraceServiceRequest`, as the OTLP specification says.
async fn receiver() -> (String, Received) {
    async fn export(
        State(received): State<Received>,
        headers: HeaderMap,
        body: Bytes,
    ) -> (StatusCode, HeaderMap, Vec<u8>) {
        assert_eq!(
            headers.get(header::CONTENT_TYPE).unwrap(),
            "application/x-protobuf"
        );
        let request = ExportTraceServiceRequest::decode(body).expect("an OTLP export request");
        for resource_spans in request.resource_spans {
            let resource = resource_spans.resource.unwrap_or_default().attributes;
            received.resources.lock().unwrap().push(resource);
            for scope in resource_spans.scope_spans {
                received.spans.lock().unwrap().extend(scope.spans);
            }
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            "application/x-protobuf".parse().unwrap(),
        );
        let answer = ExportTraceServiceResponse::default().encode_to_vec();
        (StatusCode::OK, headers, answer)
    }
    let received = Received::default();
    let app = axum::Router::new()
        .route("/v1/traces", post(export))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, received)
}

/// A server exporting to `endpoint`, quickly (batches every 100 ms).
fn traced_server(endpoint: &str, extra: &[(&str, &str)]) -> Harness {
    let mut env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    env.extend_from_slice(extra);
    Harness::start_with(&env)
}

fn attribute<'a>(span: &'a Span, key: &str) -> Option<&'a AnyValue> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|value| value.value.as_ref())
}

fn text<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
    match attribute(span, key) {
        Some(AnyValue::StringValue(text)) => Some(text),
        _ => None,
    }
}

fn integer(span: &Span, key: &str) -> Option<i64> {
    match attribute(span, key) {
        Some(AnyValue::IntValue(n)) => Some(*n),
        _ => None,
    }
}

fn strings(value: Option<&AnyValue>) -> Vec<String> {
    match value {
        Some(AnyValue::ArrayValue(array)) => array
            .values
            .iter()
            .filter_map(|v: &AnyValueMessage| match &v.value {
                Some(AnyValue::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Every string anywhere in a span's attributes.
fn all_text(span: &Span) -> String {
    span.attributes
        .iter()
        .filter_map(|kv| kv.value.as_ref()?.value.as_ref())
        .map(|value| format!("{value:?}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The spans of task `id`'s trace once its run's `invoke_agent` span (with
/// `attempt`) has arrived, and the spans under it.
async fn trace_of(received: &Received, id: &str, attempt: i64) -> (Span, Vec<Span>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let spans = received.spans.lock().unwrap().clone();
        let run = spans.iter().find(|s| {
            s.name.starts_with("invoke_agent")
                && text(s, "opspawn.task.id") == Some(id)
                && integer(s, "opspawn.task.attempt") == Some(attempt)
        });
        if let Some(run) = run {
            let trace: Vec<Span> = spans
                .iter()
                .filter(|s| s.trace_id == run.trace_id)
                .cloned()
                .collect();
            // The run's span ends last; its children were sent by then.
            return (run.clone(), trace);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no invoke_agent span for task {id} (attempt {attempt}) arrived; got {:?}",
            spans.iter().map(|s| &s.name).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn children<'a>(spans: &'a [Span], parent: &Span) -> Vec<&'a Span> {
    let mut found: Vec<&Span> = spans
        .iter()
        .filter(|s| s.parent_span_id == parent.span_id)
        .collect();
    found.sort_by_key(|s| s.start_time_unix_nano);
    found
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The 3-step task with the token counts its script reports.
fn counted_calculator_task() -> Value {
    let mut task = calculator_task("(2+3)*4", "20");
    task["options"]["llm"]["script"][0]["usage"] = json!({"input_tokens": 11, "output_tokens": 7});
    task["options"]["llm"]["script"][1]["usage"] = json!({"input_tokens": 23, "output_tokens": 5});
    task
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tasks_spans_form_a_tree_under_the_callers_trace_with_genai_attributes() {
    let (endpoint, received) = receiver().await;
    let harness = traced_server(&endpoint, &[]);
    let client = harness.client();

    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let response = client
        .http()
        .post(client.url("/v1/tasks"))
        .header("traceparent", format!("00-{caller_trace}-{caller_span}-01"))
        .json(&counted_calculator_task())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let task: Value = response.json().await.unwrap();
    let id = task["id"].as_str().unwrap();
    let finished = client.wait_until_finished(id, FINISH).await.unwrap();
    assert_eq!(finished["status"], "succeeded", "{finished}");

    let (run, spans) = trace_of(&received, id, 1).await;
    assert_eq!(
        hex(&run.trace_id),
        caller_trace,
        "the task joins the caller's trace"
    );

    // The submission: a server span, the child of the caller's span.
    let submit = spans
        .iter()
        .find(|s| s.span_id == run.parent_span_id)
        .expect("the run's parent, the request that submitted it, is exported");
    assert_eq!(submit.name, "POST /v1/tasks");
    assert_eq!(submit.kind, SpanKind::Server as i32);
    assert_eq!(hex(&submit.parent_span_id), caller_span);
    assert_eq!(
        integer(submit, "http.response.status_code"),
        Some(201),
        "{submit:#?}"
    );
    assert_eq!(text(submit, "http.route"), Some("/v1/tasks"));

    // The run of the task.
    assert_eq!(run.name, "invoke_agent react");
    assert_eq!(text(&run, "gen_ai.operation.name"), Some("invoke_agent"));
    assert_eq!(text(&run, "gen_ai.agent.id"), Some(id));
    assert_eq!(text(&run, "opspawn.task.status"), Some("succeeded"));

    // Under it: the planner's calls and the three steps, in order.
    let under_run = children(&spans, &run);
    let steps: Vec<&Span> = under_run
        .iter()
        .copied()
        .filter(|s| text(s, "gen_ai.operation.name").is_some())
        .collect();
    let names: Vec<&str> = steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["chat", "execute_tool calculator", "chat"],
        "{under_run:#?}"
    );
    let planner_calls = under_run
        .iter()
        .filter(|s| s.name == "planner react")
        .count();
    assert_eq!(
        planner_calls, 4,
        "the planner chooses each of the three steps, then the answer"
    );

    let plugins: Value = client.get("/v1/plugins").await.unwrap().1;
    let sha256_of = |name: &str| {
        plugins["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["sha256"].as_str())
            .unwrap_or_else(|| panic!("plugin {name} in {plugins}"))
            .to_owned()
    };

    let (first, tool, last) = (steps[0], steps[1], steps[2]);
    for (chat, step, input, output, reason) in
        [(first, 1, 11, 7, "tool_calls"), (last, 3, 23, 5, "stop")]
    {
        assert_eq!(chat.kind, SpanKind::Client as i32);
        assert_eq!(text(chat, "gen_ai.operation.name"), Some("chat"));
        assert_eq!(text(chat, "gen_ai.provider.name"), Some("scripted"));
        assert_eq!(integer(chat, "opspawn.step"), Some(step));
        assert_eq!(integer(chat, "gen_ai.usage.input_tokens"), Some(input));
        assert_eq!(integer(chat, "gen_ai.usage.output_tokens"), Some(output));
        assert_eq!(
            strings(attribute(chat, "gen_ai.response.finish_reasons")),
            [reason]
        );
        assert!(text(chat, "gen_ai.response.model").is_some());
        let calls = children(&spans, chat);
        assert_eq!(calls.len(), 1, "{calls:#?}");
        assert_eq!(calls[0].name, "llm-adapter scripted");
        assert_eq!(
            text(calls[0], "opspawn.plugin.sha256"),
            Some(sha256_of("scripted").as_str())
        );
    }
    assert_eq!(text(tool, "gen_ai.operation.name"), Some("execute_tool"));
    assert_eq!(text(tool, "gen_ai.tool.name"), Some("calculator"));
    assert_eq!(text(tool, "gen_ai.tool.type"), Some("function"));
    assert!(text(tool, "gen_ai.tool.call.id").is_some_and(|id| !id.is_empty()));
    assert_eq!(integer(tool, "opspawn.step"), Some(2));
    let calls = children(&spans, tool);
    assert_eq!(calls.len(), 1, "{calls:#?}");
    assert_eq!(calls[0].name, "tool calculator");
    assert_eq!(text(calls[0], "opspawn.plugin.name"), Some("calculator"));
    assert_eq!(
        text(calls[0], "opspawn.plugin.sha256"),
        Some(sha256_of("calculator").as_str())
    );

    // Without the operator's opt-in, no prompt, reply, argument or result.
    for span in &spans {
        let attributes = all_text(span);
        for private in ["What is (2+3)*4?", "Final Answer", "(2+3)*4"] {
            assert!(
                !attributes.contains(private),
                "{:?} carries {private:?}: {attributes}",
                span.name
            );
        }
    }
    for key in [
        "gen_ai.input.messages",
        "gen_ai.output.messages",
        "gen_ai.tool.call.arguments",
        "gen_ai.tool.call.result",
    ] {
        assert!(spans.iter().all(|s| attribute(s, key).is_none()), "{key}");
    }

    // The resource names the service.
    let resources = received.resources.lock().unwrap().clone();
    assert!(
        resources
            .iter()
            .all(|attributes| attributes.iter().any(|kv| {
                kv.key == "service.name"
                    && matches!(
                        kv.value.as_ref().and_then(|v| v.value.as_ref()),
                        Some(AnyValue::StringValue(name)) if name == "opspawn"
                    )
            }))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_and_tool_content_are_recorded_only_when_the_operator_opts_in() {
    let (endpoint, received) = receiver().await;
    let harness = traced_server(&endpoint, &[("OPSPAWN_TRACES__RECORD_CONTENT", "true")]);
    let client = harness.client();
    let id = client.submit(&counted_calculator_task()).await.unwrap();
    let finished = client.wait_until_finished(&id, FINISH).await.unwrap();
    assert_eq!(finished["status"], "succeeded", "{finished}");

    let (run, spans) = trace_of(&received, &id, 1).await;
    // No caller trace: the submission's span is the root.
    let submit = spans
        .iter()
        .find(|s| s.span_id == run.parent_span_id)
        .unwrap();
    assert!(submit.parent_span_id.is_empty(), "{submit:#?}");

    let by_name = |name: &str| -> Vec<&Span> { spans.iter().filter(|s| s.name == name).collect() };
    let chats = by_name("chat");
    assert_eq!(chats.len(), 2);
    assert!(chats.iter().all(|chat| {
        text(chat, "gen_ai.input.messages").is_some_and(|m| m.contains("What is (2+3)*4?"))
    }));
    assert!(chats.iter().any(|chat| {
        text(chat, "gen_ai.output.messages").is_some_and(|m| m.contains("Final Answer: 20"))
    }));
    let tool = by_name("execute_tool calculator");
    assert_eq!(tool.len(), 1);
    let arguments: Value =
        serde_json::from_str(text(tool[0], "gen_ai.tool.call.arguments").unwrap()).unwrap();
    assert_eq!(arguments, json!({"expression": "(2+3)*4"}));
    assert!(text(tool[0], "gen_ai.tool.call.result").is_some_and(|r| r.contains("20")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_resumed_after_a_crash_continues_the_trace_it_was_submitted_in() {
    let (endpoint, received) = receiver().await;
    let mut harness = traced_server(&endpoint, &[]);
    let client = harness.client();
    // A slow tool step, during which the server is killed.
    let task = json!({
        "goal": "Sleep, then answer",
        "tools": ["sleep"],
        "options": {"llm": {"script": [
            {"tool_calls": [{"name": "sleep", "arguments": {"ms": 900}}]},
            {"content": "Final Answer: rested"}
        ]}}
    });
    let id = client.submit(&task).await.unwrap();
    client
        .wait_for(&id, FINISH, |task| {
            task["steps"]
                .as_array()
                .is_some_and(|steps| steps.iter().any(|s| s["kind"] == "tool"))
        })
        .await
        .unwrap();
    // The submission's span has been sent (every 100 ms) by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let submitted_in = {
        let spans = received.spans.lock().unwrap();
        spans
            .iter()
            .find(|s| s.name == "POST /v1/tasks")
            .map(|s| (s.trace_id.clone(), s.span_id.clone()))
            .expect("the submission's span was exported")
    };

    harness.server.kill9();
    harness.server.restart().unwrap();
    let client = harness.server.client();
    let finished = client.wait_until_finished(&id, FINISH).await.unwrap();
    assert_eq!(finished["status"], "succeeded", "{finished}");

    let (resumed, spans) = trace_of(&received, &id, 2).await;
    assert_eq!(
        resumed.trace_id, submitted_in.0,
        "the resumed run continues the trace"
    );
    assert_eq!(resumed.parent_span_id, submitted_in.1);
    let steps: Vec<&str> = children(&spans, &resumed)
        .iter()
        .filter(|s| text(s, "gen_ai.operation.name").is_some())
        .map(|s| s.name.as_str())
        .collect();
    // The tool step in flight at the kill runs again, then the answer.
    assert_eq!(steps, ["execute_tool sleep", "chat"]);
    assert_eq!(
        resumed.status.as_ref().map(|s| s.code),
        Some(SpanStatus::Unset as i32)
    );
}
