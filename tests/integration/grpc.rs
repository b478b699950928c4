//! The gRPC API, called with a client generated from `proto/opspawn/v1/`
//! (and tonic-reflection's client), and with a third-party client that
//! learns the API from reflection, against a real server: the same tasks,
//! events, threads, approvals, usage, memories, validation, codes, tokens
//! and tenants as REST.

use std::time::{Duration, SystemTime};

use opspawn::api::auth::token_hash;
use opspawn_testkit::grpc::memories_client::MemoriesClient;
use opspawn_testkit::grpc::tasks_client::TasksClient;
use opspawn_testkit::grpc::threads_client::ThreadsClient;
use opspawn_testkit::grpc::{
    CancelTaskRequest, CreateMemoryRequest, GetMemoryRequest, GetTaskRequest, GetThreadRequest,
    GetUsageRequest, ListApprovalsRequest, ListMemoriesRequest, ListTasksRequest,
    SubmitTaskRequest, TaskEvent, ToolList, WatchTaskRequest,
};
use serde_json::{Value, json};
use tonic::transport::Channel;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

use crate::{FINISH, Harness, calculator_task};

const GRPC_ON: (&str, &str) = ("OPSPAWN_GRPC__LISTEN", "127.0.0.1:0");

async fn connect(harness: &Harness) -> TasksClient<Channel> {
    let url = harness
        .server
        .grpc_url
        .clone()
        .expect("the server printed where gRPC listens");
    TasksClient::connect(url).await.expect("connecting to gRPC")
}

/// A call with `authorization: Bearer <token>` when a token is given.
fn call<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

/// The stable code a refused call carries.
fn error_code(status: &tonic::Status) -> &str {
    status
        .metadata()
        .get("opspawn-error-code")
        .and_then(|code| code.to_str().ok())
        .unwrap_or_default()
}

/// Checks that a refused call carries the gRPC `code` and the stable
/// `error` code.
fn expect_refused(status: &tonic::Status, code: tonic::Code, error: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(error_code(status), error, "{status:?}");
}

/// The README's calculator task as a gRPC submission.
fn calculator(expression: &str, answer: &str) -> SubmitTaskRequest {
    let task = calculator_task(expression, answer);
    SubmitTaskRequest {
        goal: task["goal"].as_str().unwrap().to_owned(),
        tools: Some(ToolList {
            names: vec!["calculator".into()],
        }),
        options_json: Some(task["options"].to_string()),
        ..Default::default()
    }
}

/// Every event WatchTask sends, until the stream ends.
async fn watch(
    client: &mut TasksClient<Channel>,
    id: &str,
    after_seq: i64,
    token: Option<&str>,
) -> Vec<TaskEvent> {
    let request = WatchTaskRequest {
        id: id.to_owned(),
        after_seq,
    };
    let mut stream = client
        .watch_task(call(request, token))
        .await
        .expect("WatchTask starts")
        .into_inner();
    let read = async {
        let mut events = Vec::new();
        while let Some(event) = stream.message().await.expect("the event stream is sound") {
            events.push(event);
        }
        events
    };
    tokio::time::timeout(FINISH, read)
        .await
        .expect("WatchTask ends after task.finished")
}

fn data(event: &TaskEvent) -> Value {
    serde_json::from_str(&event.data_json).expect("data_json is JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_submits_gets_lists_cancels_and_watches_as_rest_does() {
    let harness = Harness::start_with(&[GRPC_ON]);
    let mut grpc = connect(&harness).await;
    let rest = harness.client();

    // Submitting twice with one idempotency key gives one task.
    let mut submit = call(calculator("6*7", "42"), None);
    submit
        .metadata_mut()
        .insert("idempotency-key", "grpc-key-1".parse().unwrap());
    let first = grpc.submit_task(submit).await.unwrap().into_inner();
    assert!(first.created, "the first submission creates the task");
    let task = first.task.unwrap();
    assert_eq!(task.idempotency_key.as_deref(), Some("grpc-key-1"));
    assert_eq!(task.tools, ["calculator"]);
    let id = task.id;

    // Follow it live from the start, while it runs.
    let live = watch(&mut grpc, &id, 0, None).await;

    let mut again = call(calculator("6*7", "42"), None);
    again
        .metadata_mut()
        .insert("idempotency-key", "grpc-key-1".parse().unwrap());
    let repeat = grpc.submit_task(again).await.unwrap().into_inner();
    assert!(!repeat.created, "a repeat with the key is not a new task");
    assert_eq!(repeat.task.unwrap().id, id);

    let journaled: Vec<&TaskEvent> = live.iter().filter(|e| e.kind != "llm.delta").collect();
    let seqs: Vec<i64> = journaled.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as i64).collect::<Vec<_>>(),
        "journaled events come in order, from 1, none missing"
    );
    assert_eq!(journaled.first().unwrap().kind, "task.queued");
    let last = live.last().unwrap();
    assert_eq!(last.kind, "task.finished", "the stream ends with the task");
    assert_eq!(data(last)["status"], "succeeded");
    assert!(live.iter().all(|e| e.task_id == id));

    // The same events, data and all, as REST's SSE stream.
    let sse = rest.events(&id, None, FINISH).await.unwrap();
    let sse: Vec<_> = sse.iter().filter(|e| e.event != "llm.delta").collect();
    assert_eq!(sse.len(), journaled.len(), "as many events as SSE sends");
    for (grpc_event, sse_event) in journaled.iter().zip(&sse) {
        assert_eq!(grpc_event.kind, sse_event.event);
        assert_eq!(json!(grpc_event.seq), sse_event.data["seq"]);
        assert_eq!(json!(grpc_event.at), sse_event.data["at"]);
        assert_eq!(
            data(grpc_event),
            sse_event.data["data"],
            "{}",
            grpc_event.kind
        );
    }

    // Replay from the middle: exactly the events after the one named.
    let middle = seqs[seqs.len() / 2];
    let replayed = watch(&mut grpc, &id, middle, None).await;
    let replayed_seqs: Vec<i64> = replayed
        .iter()
        .filter(|e| e.kind != "llm.delta")
        .map(|e| e.seq)
        .collect();
    assert_eq!(
        replayed_seqs,
        (middle + 1..=*seqs.last().unwrap()).collect::<Vec<_>>()
    );

    // The finished task, with its steps, as REST shows it (waiting for it
    // to finish, as REST's `wait_secs` does, answers at once now).
    let got = grpc
        .get_task(call(
            GetTaskRequest {
                id: id.clone(),
                wait_secs: Some(30),
            },
            None,
        ))
        .await
        .unwrap()
        .into_inner();
    let rest_task = rest.task(&id).await.unwrap();
    assert_eq!(got.status, "succeeded");
    assert_eq!(got.result.as_deref(), Some("42"));
    assert_eq!(json!(got.result), rest_task["result"]);
    assert_eq!(json!(got.created_at), rest_task["created_at"]);
    assert_eq!(got.steps.len(), 3, "{got:?}");
    let tool = &got.steps[1];
    assert_eq!(
        (tool.kind.as_str(), tool.plugin.as_str()),
        ("tool", "calculator")
    );
    let output: Value = serde_json::from_str(tool.output_json.as_deref().unwrap()).unwrap();
    assert_eq!(output, rest_task["steps"][1]["output"]);
    assert_eq!(output["result"], 42);

    // A task due in an hour waits in the queue; cancelling it ends it at once.
    let mut later = calculator("1+1", "2");
    later.run_at = Some(
        humantime::format_rfc3339_millis(SystemTime::now() + Duration::from_secs(3600)).to_string(),
    );
    let queued = grpc
        .submit_task(call(later, None))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(queued.status, "queued");

    // Lists with a filter, as REST does.
    let list = |status: &str| ListTasksRequest {
        status: Some(status.into()),
        ..Default::default()
    };
    let succeeded = grpc
        .list_tasks(call(list("succeeded"), None))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = succeeded.tasks.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, [id.as_str()], "only the finished task is succeeded");
    assert!(succeeded.tasks[0].steps.is_empty(), "lists carry no steps");
    let waiting = grpc
        .list_tasks(call(list("queued"), None))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = waiting.tasks.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, [queued.id.as_str()]);
    let one = grpc
        .list_tasks(call(
            ListTasksRequest {
                limit: Some(1),
                ..Default::default()
            },
            None,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.tasks.len(), 1);
    assert!(one.next_cursor.is_some(), "a second page exists");

    let cancelled = grpc
        .cancel_task(call(
            CancelTaskRequest {
                id: queued.id.clone(),
            },
            None,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(cancelled.cancelled, "a queued task is cancelled at once");
    assert_eq!(cancelled.task.unwrap().status, "cancelled");
    let (_, rest_view) = rest.get(&format!("/v1/tasks/{}", queued.id)).await.unwrap();
    assert_eq!(rest_view["status"], "cancelled", "REST sees the same task");

    // Refusals carry REST's codes.
    let again = grpc
        .cancel_task(call(CancelTaskRequest { id: id.clone() }, None))
        .await
        .unwrap_err();
    expect_refused(
        &again,
        tonic::Code::FailedPrecondition,
        "task_already_finished",
    );
    let missing = grpc
        .get_task(call(
            GetTaskRequest {
                id: "no-such-task".into(),
                wait_secs: None,
            },
            None,
        ))
        .await
        .unwrap_err();
    expect_refused(&missing, tonic::Code::NotFound, "task_not_found");
    let bad_filter = grpc
        .list_tasks(call(list("sleeping"), None))
        .await
        .unwrap_err();
    expect_refused(&bad_filter, tonic::Code::InvalidArgument, "invalid_query");
    let too_long_a_wait = grpc
        .get_task(call(
            GetTaskRequest {
                id: "no-such-task".into(),
                wait_secs: Some(61),
            },
            None,
        ))
        .await
        .unwrap_err();
    expect_refused(
        &too_long_a_wait,
        tonic::Code::InvalidArgument,
        "invalid_query",
    );
    let bad_replay = grpc
        .watch_task(call(
            WatchTaskRequest {
                id: "no-such-task".into(),
                after_seq: 3,
            },
            None,
        ))
        .await
        .unwrap_err();
    assert_eq!(error_code(&bad_replay), "task_not_found");

    let refusals = [
        (
            SubmitTaskRequest {
                goal: "  ".into(),
                ..Default::default()
            },
            "invalid_goal",
        ),
        (
            SubmitTaskRequest {
                max_steps: Some(0),
                ..calculator("1", "1")
            },
            "invalid_max_steps",
        ),
        (
            SubmitTaskRequest {
                options_json: Some("[1, 2]".into()),
                ..calculator("1", "1")
            },
            "invalid_options",
        ),
        (
            SubmitTaskRequest {
                options_json: Some("{not json".into()),
                ..calculator("1", "1")
            },
            "invalid_json",
        ),
        (
            SubmitTaskRequest {
                tools: Some(ToolList {
                    names: vec!["search".into()],
                }),
                ..calculator("1", "1")
            },
            "unknown_tool",
        ),
        (
            SubmitTaskRequest {
                run_at: Some("tomorrow".into()),
                ..calculator("1", "1")
            },
            "invalid_time",
        ),
    ];
    for (request, code) in refusals {
        let refused = grpc.submit_task(call(request, None)).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{code}");
        assert_eq!(error_code(&refused), code);
        assert!(
            refused.message().starts_with(&format!("{code}: ")),
            "the message names the code: {}",
            refused.message()
        );
    }
    let mut bad_key = call(calculator("1", "1"), None);
    bad_key
        .metadata_mut()
        .insert("idempotency-key", " ".parse().unwrap());
    let refused = grpc.submit_task(bad_key).await.unwrap_err();
    assert_eq!(error_code(&refused), "invalid_idempotency_key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_needs_rest_tokens_keeps_tenants_apart_and_reflects() {
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        format!(
            r#"
            [grpc]
            listen = "127.0.0.1:0"

            [[auth.tokens]]
            tenant = "acme"
            sha256 = "{}"

            [[auth.tokens]]
            tenant = "globex"
            sha256 = "{}"
            "#,
            token_hash("acme-token"),
            token_hash("globex-token")
        ),
    )
    .unwrap();
    let path = config.path().to_str().unwrap().to_owned();
    let harness = Harness::start_with(&[("OPSPAWN_CONFIG", &path)]);
    let mut grpc = connect(&harness).await;

    let anonymous = grpc
        .list_tasks(call(ListTasksRequest::default(), None))
        .await
        .unwrap_err();
    expect_refused(&anonymous, tonic::Code::Unauthenticated, "unauthorized");
    let wrong = grpc
        .submit_task(call(calculator("1+1", "2"), Some("wrong-token")))
        .await
        .unwrap_err();
    expect_refused(&wrong, tonic::Code::Unauthenticated, "invalid_token");

    let task = grpc
        .submit_task(call(calculator("2+2", "4"), Some("acme-token")))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(task.tenant, "acme");
    let events = watch(&mut grpc, &task.id, 0, Some("acme-token")).await;
    assert_eq!(events.last().unwrap().kind, "task.finished");

    // Another tenant's task is refused as REST refuses it: 403 forbidden.
    let other = || GetTaskRequest {
        id: task.id.clone(),
        wait_secs: None,
    };
    let refused = grpc
        .get_task(call(other(), Some("globex-token")))
        .await
        .unwrap_err();
    expect_refused(&refused, tonic::Code::PermissionDenied, "forbidden");
    let (status, body) =
        rest_get(&harness, &format!("/v1/tasks/{}", task.id), "globex-token").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("forbidden"))
    );
    let refused = grpc
        .watch_task(call(
            WatchTaskRequest {
                id: task.id.clone(),
                after_seq: 0,
            },
            Some("globex-token"),
        ))
        .await
        .unwrap_err();
    assert_eq!(error_code(&refused), "forbidden");
    let refused = grpc
        .cancel_task(call(
            CancelTaskRequest {
                id: task.id.clone(),
            },
            Some("globex-token"),
        ))
        .await
        .unwrap_err();
    assert_eq!(error_code(&refused), "forbidden");
    let theirs = grpc
        .list_tasks(call(ListTasksRequest::default(), Some("globex-token")))
        .await
        .unwrap()
        .into_inner();
    assert!(theirs.tasks.is_empty(), "globex sees none of acme's tasks");
    let own = grpc
        .get_task(call(other(), Some("acme-token")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(own.result.as_deref(), Some("4"));

    // The calls beside the task's keep tenants apart the same way.
    let refused = grpc
        .list_approvals(call(
            ListApprovalsRequest {
                task_id: task.id.clone(),
            },
            Some("globex-token"),
        ))
        .await
        .unwrap_err();
    expect_refused(&refused, tonic::Code::PermissionDenied, "forbidden");
    let usage = grpc
        .get_usage(call(GetUsageRequest {}, Some("acme-token")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((usage.tenant.as_str(), usage.tracked), ("acme", false));
    assert_eq!(usage.tokens, None, "no budget: nothing counted per period");
    let url = harness.server.grpc_url.clone().unwrap();
    let mut memories = MemoriesClient::connect(url.clone()).await.unwrap();
    let memory = memories
        .create_memory(call(
            CreateMemoryRequest {
                text: "acme's note".into(),
                ..Default::default()
            },
            Some("acme-token"),
        ))
        .await
        .unwrap()
        .into_inner();
    let refused = memories
        .get_memory(call(
            GetMemoryRequest {
                id: memory.id.clone(),
            },
            Some("globex-token"),
        ))
        .await
        .unwrap_err();
    expect_refused(&refused, tonic::Code::NotFound, "memory_not_found");
    let theirs = memories
        .list_memories(call(ListMemoriesRequest::default(), Some("globex-token")))
        .await
        .unwrap()
        .into_inner();
    assert!(
        theirs.memories.is_empty(),
        "globex sees none of acme's memories"
    );
    let anonymous = memories
        .list_memories(call(ListMemoriesRequest::default(), None))
        .await
        .unwrap_err();
    assert_eq!(error_code(&anonymous), "unauthorized");
    let mut threads = ThreadsClient::connect(url).await.unwrap();
    let anonymous = threads
        .get_thread(call(
            GetThreadRequest {
                id: "chat-1".into(),
                ..Default::default()
            },
            None,
        ))
        .await
        .unwrap_err();
    expect_refused(&anonymous, tonic::Code::Unauthenticated, "unauthorized");

    // Reflection needs no token: it describes the API, nothing more.
    let url = harness.server.grpc_url.clone().unwrap();
    let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
    let mut reflection = ServerReflectionClient::new(channel);
    let ask = |request: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let requests = futures::stream::iter([
        ask(MessageRequest::ListServices(String::new())),
        ask(MessageRequest::FileContainingSymbol(
            "opspawn.v1.Tasks".into(),
        )),
    ]);
    let mut answers = reflection
        .server_reflection_info(requests)
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("reflection did not list the services");
    };
    let mut services: Vec<&str> = list
        .service
        .iter()
        .map(|s| s.name.as_str())
        .filter(|name| name.starts_with("opspawn."))
        .collect();
    services.sort_unstable();
    assert_eq!(
        services,
        [
            "opspawn.v1.Memories",
            "opspawn.v1.Tasks",
            "opspawn.v1.Threads"
        ]
    );
    let Some(MessageResponse::FileDescriptorResponse(files)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("reflection did not describe opspawn.v1.Tasks");
    };
    let file = String::from_utf8_lossy(&files.file_descriptor_proto[0]).into_owned();
    assert!(file.contains("opspawn/v1/tasks.proto"), "{file}");
    assert!(file.contains("WatchTask"), "{file}");

    // A third-party client (Python grpcio) that knows only what reflection
    // told it.
    let address = harness.server.grpc_url.as_deref().unwrap();
    let output = tokio::process::Command::new(opspawn_testkit::mcp::python())
        .arg(opspawn_testkit::grpc_client_script())
        .arg(address.trim_start_matches("http://"))
        .arg("globex-token")
        .output()
        .await
        .expect("running the Python gRPC client");
    assert!(
        output.status.success(),
        "the Python gRPC client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: Value = serde_json::from_slice(&output.stdout).expect("the client prints JSON");
    for service in [
        "opspawn.v1.Tasks",
        "opspawn.v1.Threads",
        "opspawn.v1.Memories",
    ] {
        assert!(
            seen["services"]
                .as_array()
                .unwrap()
                .contains(&json!(service)),
            "{seen}"
        );
    }
    assert_eq!(seen["task"]["tenant"], "globex");
    let events = seen["events"].as_array().unwrap();
    assert_eq!(events.first().unwrap()["kind"], "task.queued", "{seen}");
    let last = events.last().unwrap();
    assert_eq!(last["kind"], "task.finished", "{seen}");
    let finished: Value = serde_json::from_str(last["data_json"].as_str().unwrap()).unwrap();
    assert_eq!(finished["result"], "42", "{seen}");
    assert_eq!(seen["refusal"]["status"], "INVALID_ARGUMENT", "{seen}");
    assert_eq!(seen["refusal"]["code"], json!(["invalid_goal"]), "{seen}");
}

/// A REST GET with a token: status and body.
async fn rest_get(harness: &Harness, path: &str, token: &str) -> (u16, Value) {
    let client = harness.client();
    let response = client
        .http()
        .get(client.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    (
        response.status().as_u16(),
        response.json().await.unwrap_or(Value::Null),
    )
}

/// The third-party client (`tests/fixtures/grpc/client.py`), kept running to
/// make calls one at a time: it knows the API only from reflection, and
/// sends and shows messages in proto3's JSON mapping (64-bit integers as
/// strings, unset optional fields absent).
struct Reflected {
    _client: tokio::process::Child,
    calls: tokio::process::ChildStdin,
    answers: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

/// A call the server refused, as the third-party client saw it.
#[derive(Debug)]
struct Refusal {
    /// The gRPC status's name, such as `INVALID_ARGUMENT`.
    status: String,
    /// The `opspawn-error-code` metadata.
    code: String,
    message: String,
}

impl Refusal {
    /// Checks the gRPC status and the stable code, which starts the message.
    fn is(&self, status: &str, code: &str) {
        assert_eq!(
            (self.status.as_str(), self.code.as_str()),
            (status, code),
            "{self:?}"
        );
        assert!(
            self.message.starts_with(&format!("{code}: ")),
            "the message names the code: {self:?}"
        );
    }
}

impl Reflected {
    /// Starts the client against the harness's gRPC port, with no token.
    fn start(harness: &Harness) -> Self {
        let address = harness
            .server
            .grpc_url
            .as_deref()
            .expect("the server printed where gRPC listens")
            .trim_start_matches("http://");
        let mut client = tokio::process::Command::new(opspawn_testkit::mcp::python())
            .arg(opspawn_testkit::grpc_client_script())
            .args([address, "", "--calls"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("starting the Python gRPC client");
        let calls = client.stdin.take().unwrap();
        let answers = tokio::io::BufReader::new(client.stdout.take().unwrap());
        Self {
            _client: client,
            calls,
            answers: tokio::io::AsyncBufReadExt::lines(answers),
        }
    }

    /// Calls `method` (`Service/Method` of `opspawn.v1`) with `request`:
    /// the answer (a list of them for a streaming method), or the refusal.
    async fn call(&mut self, method: &str, request: Value) -> Result<Value, Refusal> {
        use tokio::io::AsyncWriteExt;
        let line = json!({"method": format!("opspawn.v1.{method}"), "request": request});
        self.calls
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("the client takes calls");
        self.calls.flush().await.unwrap();
        let answer = tokio::time::timeout(FINISH, self.answers.next_line())
            .await
            .unwrap_or_else(|_| panic!("{method} was not answered in time"))
            .unwrap()
            .unwrap_or_else(|| panic!("the client stopped at {line} (its error is above)"));
        let mut answer: Value = serde_json::from_str(&answer).unwrap();
        if let Some(refusal) = answer.get("refusal") {
            let codes = refusal["code"].as_array().unwrap();
            assert_eq!(codes.len(), 1, "one stable code per refusal: {refusal}");
            return Err(Refusal {
                status: refusal["status"].as_str().unwrap().to_owned(),
                code: codes[0].as_str().unwrap().to_owned(),
                message: refusal["message"].as_str().unwrap().to_owned(),
            });
        }
        Ok(match answer.get_mut("responses") {
            Some(responses) => responses.take(),
            None => answer["response"].take(),
        })
    }

    async fn ok(&mut self, method: &str, request: Value) -> Value {
        self.call(method, request)
            .await
            .unwrap_or_else(|refusal| panic!("{method} was refused: {refusal:?}"))
    }

    async fn refused(&mut self, method: &str, request: Value) -> Refusal {
        match self.call(method, request).await {
            Ok(answer) => panic!("{method} answered {answer}, not a refusal"),
            Err(refusal) => refusal,
        }
    }

    /// Submits `request` (a SubmitTaskRequest): the task.
    async fn submit(&mut self, request: Value) -> Value {
        let mut answer = self.ok("Tasks/SubmitTask", request).await;
        assert_eq!(answer["created"], true, "{answer:#}");
        answer["task"].take()
    }

    /// Polls GetTask until `check` holds of the task; the task then.
    async fn wait_for(&mut self, id: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = std::time::Instant::now() + FINISH;
        loop {
            let task = self.ok("Tasks/GetTask", json!({"id": id})).await;
            if check(&task) {
                return task;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "task {id} did not get there in time: {task:#}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls GetTask until the task has finished; the task then.
    async fn finished(&mut self, id: &str) -> Value {
        self.wait_for(id, |task| {
            ["succeeded", "failed", "cancelled"].contains(&task["status"].as_str().unwrap())
        })
        .await
    }
}

/// A REST task body (such as [`calculator_task`]'s) as a
/// SubmitTaskRequest in proto3's JSON mapping.
fn submission(task: &Value) -> Value {
    let mut request = json!({"goal": task["goal"]});
    if let Some(tools) = task.get("tools") {
        request["tools"] = json!({"names": tools});
    }
    if let Some(options) = task.get("options") {
        request["options_json"] = json!(options.to_string());
    }
    request
}

/// A task whose scripted model answers `answer` at once, without tools.
fn answering(goal: &str, answer: &str) -> Value {
    json!({
        "goal": goal,
        "tools": {"names": []},
        "options_json": json!({"llm": {"script": [{"content": format!("Final Answer: {answer}")}]}})
            .to_string(),
    })
}

/// A `*_json` field's JSON.
fn parsed(field: &Value) -> Value {
    serde_json::from_str(
        field
            .as_str()
            .unwrap_or_else(|| panic!("JSON text, not {field}")),
    )
    .unwrap()
}

/// The (role, content) of each message but the system prompt of an LLM
/// step's request.
fn conversation(step: &Value) -> Vec<(String, String)> {
    parsed(&step["input_json"])["messages"]
        .as_array()
        .expect("an LLM step's request has messages")
        .iter()
        .filter(|m| m["role"] != "system")
        .map(|m| {
            (
                m["role"].as_str().unwrap().to_owned(),
                m["content"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn turn(role: &str, content: &str) -> (String, String) {
    (role.to_owned(), content.to_owned())
}

fn ids(tasks: &Value) -> Vec<&str> {
    tasks
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect()
}

/// Two tasks submitted over gRPC in one thread: the second's planner is
/// sent the first's question and answer. ListTasks filters by thread;
/// GetThread pages the thread and DeleteThread takes it, refusing while a
/// task of it waits, as REST does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_tasks_continue_a_thread_which_is_listed_and_deleted() {
    let harness = Harness::start_with(&[GRPC_ON]);
    let mut grpc = Reflected::start(&harness);

    let mut request = submission(&calculator_task("6*7", "42"));
    request["thread"] = json!("chat-1");
    let first = grpc.submit(request).await;
    assert_eq!(first["thread"], "chat-1", "{first:#}");
    let first_id = first["id"].as_str().unwrap().to_owned();
    let first = grpc.finished(&first_id).await;
    assert_eq!(
        (&first["status"], &first["result"]),
        (&json!("succeeded"), &json!("42")),
        "{first:#}"
    );
    assert_eq!(
        conversation(&first["steps"][0]),
        [turn("user", "Question: What is 6*7?")],
        "the thread's first task has no past"
    );

    let mut request = answering("And that plus one?", "43");
    request["thread"] = json!("chat-1");
    let second_id = grpc.submit(request).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let second = grpc.finished(&second_id).await;
    assert_eq!(second["status"], "succeeded", "{second:#}");
    assert_eq!(second["thread"], "chat-1");
    assert_eq!(
        conversation(&second["steps"][0]),
        [
            turn("user", "Question: What is 6*7?"),
            turn("assistant", "Final Answer: 42"),
            turn("user", "Question: And that plus one?"),
        ],
        "the second task's model is sent the first's question and answer"
    );

    // Another task, in no thread, to be left out of what follows.
    let alone = grpc.submit(answering("Alone", "1")).await;
    assert_eq!(alone.get("thread"), None, "{alone:#}");
    grpc.finished(alone["id"].as_str().unwrap()).await;
    let listed = grpc
        .ok("Tasks/ListTasks", json!({"thread": "chat-1"}))
        .await;
    assert_eq!(ids(&listed["tasks"]), [&second_id, &first_id]);
    let listed = grpc.ok("Tasks/ListTasks", json!({"q": "plus one"})).await;
    assert_eq!(ids(&listed["tasks"]), [&second_id]);

    let thread = grpc.ok("Threads/GetThread", json!({"id": "chat-1"})).await;
    assert_eq!(thread["id"], "chat-1");
    assert_eq!(
        ids(&thread["tasks"]),
        [&second_id, &first_id],
        "newest first"
    );
    assert_eq!(thread.get("next_cursor"), None, "one page");
    assert_eq!(
        thread["tasks"][0]["steps"],
        json!([]),
        "pages carry no steps"
    );
    let page = grpc
        .ok("Threads/GetThread", json!({"id": "chat-1", "limit": 1}))
        .await;
    assert_eq!(ids(&page["tasks"]), [&second_id]);
    let cursor = page["next_cursor"]
        .as_str()
        .expect("a second page")
        .to_owned();
    let page = grpc
        .ok(
            "Threads/GetThread",
            json!({"id": "chat-1", "limit": 1, "cursor": cursor}),
        )
        .await;
    assert_eq!(ids(&page["tasks"]), [&first_id]);
    assert_eq!(page.get("next_cursor"), None);

    // A task of the thread that waits (it starts in 2099) holds it.
    let mut later = answering("Later", "2");
    later["thread"] = json!("chat-1");
    later["run_at"] = json!("2099-01-01T00:00:00Z");
    let later = grpc.submit(later).await["id"].as_str().unwrap().to_owned();
    grpc.refused("Threads/DeleteThread", json!({"id": "chat-1"}))
        .await
        .is("FAILED_PRECONDITION", "thread_active");
    let thread = grpc.ok("Threads/GetThread", json!({"id": "chat-1"})).await;
    assert_eq!(
        thread["tasks"].as_array().unwrap().len(),
        3,
        "nothing was deleted"
    );
    let cancelled = grpc.ok("Tasks/CancelTask", json!({"id": later})).await;
    assert_eq!(cancelled["cancelled"], true, "{cancelled:#}");

    let deleted = grpc
        .ok("Threads/DeleteThread", json!({"id": "chat-1"}))
        .await;
    assert_eq!(deleted, json!({}));
    for id in [&first_id, &second_id, &later] {
        grpc.refused("Tasks/GetTask", json!({"id": id}))
            .await
            .is("NOT_FOUND", "task_not_found");
    }
    grpc.ok("Tasks/GetTask", json!({"id": alone["id"]})).await;
    grpc.refused("Threads/GetThread", json!({"id": "chat-1"}))
        .await
        .is("NOT_FOUND", "thread_not_found");
    grpc.refused("Threads/DeleteThread", json!({"id": "chat-1"}))
        .await
        .is("NOT_FOUND", "thread_not_found");

    // Bad thread ids, in a submission and as a thread's id.
    let mut bad = answering("Bad", "0");
    bad["thread"] = json!("a b");
    grpc.refused("Tasks/SubmitTask", bad)
        .await
        .is("INVALID_ARGUMENT", "invalid_thread");
    for id in ["", "a/b", "a b"] {
        grpc.refused("Threads/GetThread", json!({"id": id}))
            .await
            .is("INVALID_ARGUMENT", "invalid_thread");
        grpc.refused("Threads/DeleteThread", json!({"id": id}))
            .await
            .is("INVALID_ARGUMENT", "invalid_thread");
    }
    grpc.refused("Threads/GetThread", json!({"id": "chat-1", "cursor": "x"}))
        .await
        .is("INVALID_ARGUMENT", "invalid_query");
}

/// A task submitted over gRPC with a response format: the format is kept,
/// reaches the LLM with each call, and the answer is checked against it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_submits_a_response_format_and_the_answer_is_held_to_it() {
    let harness = Harness::start_with(&[GRPC_ON]);
    let mut grpc = Reflected::start(&harness);
    let schema = json!({
        "type": "object",
        "properties": {"answer": {"type": "integer"}},
        "required": ["answer"]
    });
    let asking = |answer: &str, strict: bool| {
        let mut request = answering("What is 6*7? Answer in JSON.", answer);
        request["response_format"] =
            json!({"name": "calc", "schema_json": schema.to_string(), "strict": strict});
        request
    };

    let task = grpc.submit(asking(r#"{"answer": 42}"#, false)).await;
    let format = &task["response_format"];
    assert_eq!(
        (&format["name"], &format["strict"]),
        (&json!("calc"), &json!(false)),
        "{task:#}"
    );
    assert_eq!(parsed(&format["schema_json"]), schema);
    let task = grpc.finished(task["id"].as_str().unwrap()).await;
    assert_eq!(task["status"], "succeeded", "{task:#}");
    assert_eq!(task["result"], r#"{"answer": 42}"#);
    assert_eq!(
        parsed(&task["steps"][0]["input_json"])["response_format"],
        json!({"name": "calc", "schema": schema, "strict": false}),
        "the LLM call carried the format"
    );

    // An answer off the schema fails the task, and is kept.
    let task = grpc.submit(asking(r#"{"answer": "42"}"#, true)).await;
    assert_eq!(task["response_format"]["strict"], true, "{task:#}");
    let task = grpc.finished(task["id"].as_str().unwrap()).await;
    assert_eq!(task["status"], "failed", "{task:#}");
    assert_eq!(task["error"]["code"], "answer_schema_mismatch", "{task:#}");
    assert_eq!(task["result"], r#"{"answer": "42"}"#);

    // Without a format, none is shown.
    let plain = grpc.submit(answering("Plain", "1")).await;
    assert_eq!(plain.get("response_format"), None, "{plain:#}");

    let format = |name: &str, schema_json: &str| {
        let mut request = answering("Bad format", "1");
        request["response_format"] = json!({"name": name, "schema_json": schema_json});
        request
    };
    for (request, code) in [
        (
            format("no spaces", r#"{"type": "object"}"#),
            "invalid_response_format",
        ),
        (format("calc", r#"{"type": 7}"#), "invalid_response_format"),
        (format("calc", "[1]"), "invalid_response_format"),
        (format("calc", "{"), "invalid_json"),
        // No schema at all, as REST refuses a missing field.
        (format("calc", ""), "invalid_request"),
    ] {
        grpc.refused("Tasks/SubmitTask", request)
            .await
            .is("INVALID_ARGUMENT", code);
    }
}

#[tokio::test]
async fn grpc_submits_a_call_task_which_makes_its_one_call() {
    let harness = Harness::start_with(&[GRPC_ON]);
    let mut grpc = Reflected::start(&harness);
    let call = |arguments_json: &str| {
        json!({
            "goal": "Evaluate",
            "call": {"tool": "calculator", "arguments_json": arguments_json},
        })
    };

    let task = grpc.submit(call(r#"{"expression": "6*7"}"#)).await;
    assert_eq!(task["call"]["tool"], "calculator", "{task:#}");
    assert_eq!(
        parsed(&task["call"]["arguments_json"]),
        json!({"expression": "6*7"})
    );
    assert_eq!((&task["planner"], &task["llm"]), (&json!(""), &json!("")));
    let task = grpc.finished(task["id"].as_str().unwrap()).await;
    assert_eq!(task["status"], "succeeded", "{task:#}");
    let steps = task["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 1, "one tool step and no LLM: {task:#}");
    assert_eq!(steps[0]["kind"], "tool");
    assert_eq!(parsed(&task["result"])["result"], 42, "{task:#}");

    // The same task read over REST shows the same call.
    let rest = harness
        .client()
        .task(task["id"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(
        rest["call"],
        json!({"tool": "calculator", "arguments": {"expression": "6*7"}})
    );

    // Refused as REST refuses them.
    let mut with_planner = call("{}");
    with_planner["planner"] = json!("react");
    let mut with_other_tools = call("{}");
    with_other_tools["tools"] = json!({"names": ["word_count"]});
    for (request, code) in [
        (call("{"), "invalid_json"),
        (with_planner, "invalid_call"),
        (with_other_tools, "invalid_call"),
        (
            json!({"goal": "Evaluate", "call": {"tool": "no_such_tool"}}),
            "unknown_tool",
        ),
    ] {
        grpc.refused("Tasks/SubmitTask", request)
            .await
            .is("INVALID_ARGUMENT", code);
    }
}

/// Images over gRPC: an address and raw bytes (base64 only in proto3's JSON,
/// which the Python client speaks), kept as REST keeps them and shown back;
/// bad ones refused as REST refuses them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_submits_a_task_with_images() {
    use crate::PIXEL_PNG;
    let harness = Harness::start_with(&[GRPC_ON]);
    let mut grpc = Reflected::start(&harness);
    let images = json!([
        {"url": "https://example.com/a.png"},
        {"inline": {"media_type": "image/png", "data": PIXEL_PNG}},
    ]);
    let task = grpc
        .submit(json!({"goal": "Look", "run_at": "2100-01-01T00:00:00Z", "images": images}))
        .await;
    assert_eq!(task["images"], images, "{task:#}");
    let rest = harness
        .client()
        .task(task["id"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(
        rest["images"],
        json!([{"url": "https://example.com/a.png"},
               {"media_type": "image/png", "data": PIXEL_PNG}])
    );
    let not_png = json!({"goal": "Look", "images": [
        {"inline": {"media_type": "image/jpeg", "data": PIXEL_PNG}}]});
    grpc.refused("Tasks/SubmitTask", not_png)
        .await
        .is("INVALID_ARGUMENT", "invalid_images");
}

/// A server whose configuration file holds `config` (TOML), with gRPC on.
fn start_configured(config: &str) -> (Harness, tempfile::NamedTempFile) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), config).unwrap();
    let path = file.path().to_str().unwrap().to_owned();
    let harness = Harness::start_with(&[GRPC_ON, ("OPSPAWN_CONFIG", &path)]);
    (harness, file)
}

/// A task's calls wait for approval; ListApprovals shows them and
/// DecideApproval answers them, each once, over gRPC: the approved call
/// runs with the approver's input, the rejected one reaches the planner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_lists_and_decides_approvals() {
    let (harness, _config) = start_configured(
        r#"
        [[approvals.rules]]
        tool = "calculator"
        "#,
    );
    let rest = harness.client();
    let mut grpc = Reflected::start(&harness);
    // The second call's id is any text the planner chose: it travels as
    // one path segment all the same.
    let odd = "call/2 ..";
    let script = json!([
        {"tool_calls": [
            {"id": "c1", "name": "calculator", "arguments": {"expression": "6*7"}},
            {"id": odd, "name": "calculator", "arguments": {"expression": "1/0"}}
        ]},
        {"content": "Final Answer: done"}
    ]);
    let task = grpc
        .submit(json!({
            "goal": "Calculate, with approval",
            "tools": {"names": ["calculator"]},
            "options_json": json!({"llm": {"script": script}}).to_string(),
        }))
        .await;
    let id = task["id"].as_str().unwrap().to_owned();
    let waiting = grpc
        .wait_for(&id, |task| task["status"] == "waiting_approval")
        .await;
    assert_eq!(waiting["steps"].as_array().unwrap().len(), 1, "{waiting:#}");
    let listed = grpc
        .ok("Tasks/ListTasks", json!({"status": "waiting_approval"}))
        .await;
    assert_eq!(ids(&listed["tasks"]), [id.as_str()]);

    let approvals = grpc.ok("Tasks/ListApprovals", json!({"task_id": id})).await;
    let (_, rest_view) = rest
        .get(&format!("/v1/tasks/{id}/approvals"))
        .await
        .unwrap();
    let pending = approvals["approvals"].as_array().unwrap();
    assert_eq!(pending.len(), 2, "{approvals:#}");
    for (approval, shown) in pending
        .iter()
        .zip(rest_view["approvals"].as_array().unwrap())
    {
        assert_eq!(approval["status"], "pending", "{approval:#}");
        assert_eq!(approval["call_id"], shown["call_id"]);
        assert_eq!(approval["step"], shown["step"]);
        assert_eq!(approval["tool"], "calculator");
        assert_eq!(parsed(&approval["input_json"]), shown["input"]);
        assert_eq!(approval["requested_at"], shown["requested_at"]);
        assert_eq!(approval["expires_at"], shown["expires_at"]);
        for unset in ["edited_input_json", "comment", "decided_by", "decided_at"] {
            assert_eq!(approval.get(unset), None, "{unset}: {approval:#}");
        }
    }
    assert_eq!(
        (
            &pending[0]["call_id"],
            &pending[0]["step"],
            &pending[1]["call_id"],
            &pending[1]["step"]
        ),
        (&json!("c1"), &json!(2), &json!(odd), &json!(3))
    );
    assert_eq!(
        parsed(&pending[0]["input_json"]),
        json!({"expression": "6*7"})
    );

    let decide = |call: &str, fields: Value| {
        let mut request = json!({"task_id": id, "call_id": call});
        request
            .as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        request
    };
    for (request, status, code) in [
        (
            decide("c1", json!({"decision": "maybe"})),
            "INVALID_ARGUMENT",
            "invalid_request",
        ),
        (
            decide("c1", json!({"decision": "reject", "input_json": "{}"})),
            "INVALID_ARGUMENT",
            "invalid_request",
        ),
        (
            decide("c1", json!({"decision": "approve", "input_json": "[1]"})),
            "INVALID_ARGUMENT",
            "invalid_request",
        ),
        (
            decide("c1", json!({"decision": "approve", "input_json": "{"})),
            "INVALID_ARGUMENT",
            "invalid_json",
        ),
        (
            decide("nope", json!({"decision": "approve"})),
            "NOT_FOUND",
            "approval_not_found",
        ),
        (
            decide("", json!({"decision": "approve"})),
            "NOT_FOUND",
            "approval_not_found",
        ),
        (
            json!({"task_id": "no-such-task", "call_id": "c1", "decision": "approve"}),
            "NOT_FOUND",
            "task_not_found",
        ),
    ] {
        grpc.refused("Tasks/DecideApproval", request)
            .await
            .is(status, code);
    }

    let approved = grpc
        .ok(
            "Tasks/DecideApproval",
            decide(
                "c1",
                json!({"decision": "approve", "input_json": r#"{"expression": "10*10"}"#,
                       "comment": "bigger"}),
            ),
        )
        .await;
    assert_eq!(
        (
            &approved["status"],
            &approved["comment"],
            &approved["decided_by"]
        ),
        (&json!("approved"), &json!("bigger"), &json!("anonymous")),
        "{approved:#}"
    );
    assert_eq!(
        parsed(&approved["edited_input_json"]),
        json!({"expression": "10*10"})
    );
    assert!(approved["decided_at"].is_string(), "{approved:#}");
    grpc.refused(
        "Tasks/DecideApproval",
        decide("c1", json!({"decision": "reject"})),
    )
    .await
    .is("FAILED_PRECONDITION", "approval_already_decided");
    let rejected = grpc
        .ok(
            "Tasks/DecideApproval",
            decide(
                odd,
                json!({"decision": "reject", "comment": "no dividing by zero"}),
            ),
        )
        .await;
    assert_eq!(
        (&rejected["call_id"], &rejected["status"]),
        (&json!(odd), &json!("rejected")),
        "{rejected:#}"
    );

    let task = grpc.finished(&id).await;
    assert_eq!(
        (&task["status"], &task["result"]),
        (&json!("succeeded"), &json!("done")),
        "{task:#}"
    );
    let steps = task["steps"].as_array().unwrap();
    let kinds: Vec<&str> = steps.iter().map(|s| s["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["llm", "tool", "tool", "llm"], "{task:#}");
    assert_eq!(
        parsed(&steps[1]["input_json"])["arguments"],
        json!({"expression": "10*10"})
    );
    assert_eq!(
        parsed(&steps[1]["output_json"])["result"],
        100,
        "the edited input ran"
    );
    assert_eq!(steps[2]["status"], "failed");
    assert_eq!(steps[2]["error"]["code"], "approval_rejected");
    let answered = grpc.ok("Tasks/ListApprovals", json!({"task_id": id})).await;
    assert_eq!(answered["approvals"], json!([approved, rejected]));
}

/// Prices for the scripted adapter and a cap for every tenant, per day.
const PRICED_AND_CAPPED: &str = r#"
[prices.scripted."*"]
input_per_million = 1000
output_per_million = 2000

[budgets]
default_max_output_tokens = 100

[budgets.default]
period = "day"
max_tokens = 1000000
max_cost_usd = 1000
"#;

/// REST's `GET /v1/usage` in proto3's JSON mapping, as GetUsage should
/// show it: whole numbers as strings, `null`s absent.
fn usage_as_grpc(rest: &Value) -> Value {
    let shown = rest
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, value)| !value.is_null())
        .map(|(key, value)| {
            let value = match value {
                Value::Number(n) if n.is_u64() => json!(n.to_string()),
                other => other.clone(),
            };
            (key.clone(), value)
        });
    Value::Object(shown.collect())
}

/// A task's budget over gRPC caps it, and shows what is left; GetUsage
/// shows the tenant's period as REST does; bad budgets are refused with
/// REST's code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_takes_a_budget_and_shows_usage() {
    let (harness, _config) = start_configured(PRICED_AND_CAPPED);
    let rest = harness.client();
    let mut grpc = Reflected::start(&harness);

    let before = grpc.ok("Tasks/GetUsage", json!({})).await;
    let (_, rest_before) = rest.get("/v1/usage").await.unwrap();
    assert_eq!(before, usage_as_grpc(&rest_before));
    assert_eq!(
        (
            &before["tracked"],
            &before["period"],
            &before["tokens"],
            &before["max_tokens"]
        ),
        (&json!(true), &json!("day"), &json!("0"), &json!("1000000")),
        "{before:#}"
    );

    // Two LLM calls of 10 input and 5 output tokens each.
    let usage = json!({"input_tokens": 10, "output_tokens": 5});
    let script = json!([
        {"tool_calls": [{"name": "calculator", "arguments": {"expression": "6*7"}}], "usage": usage},
        {"content": "Final Answer: 42", "usage": usage}
    ]);
    let task = grpc
        .submit(json!({
            "goal": "What is 6*7?",
            "tools": {"names": ["calculator"]},
            "options_json": json!({"llm": {"script": script}}).to_string(),
            "budget": {"max_tokens": 100000, "max_cost_usd": 100},
        }))
        .await;
    assert_eq!(
        (
            &task["budget"]["max_tokens"],
            &task["budget"]["max_cost_usd"]
        ),
        (&json!("100000"), &json!(100.0)),
        "{task:#}"
    );
    let task = grpc.finished(task["id"].as_str().unwrap()).await;
    assert_eq!(task["status"], "succeeded", "{task:#}");
    assert_eq!(
        task["usage"],
        json!({"input_tokens": "20", "output_tokens": "10"})
    );
    // 20 tokens at $1000 and 10 at $2000 a million.
    assert_eq!(task["cost_usd"], 0.04, "{task:#}");
    assert_eq!(
        task["budget"],
        json!({"max_tokens": "100000", "max_cost_usd": 100.0,
               "remaining_tokens": "99970", "remaining_cost_usd": 99.96})
    );

    let after = grpc.ok("Tasks/GetUsage", json!({})).await;
    let (_, rest_after) = rest.get("/v1/usage").await.unwrap();
    assert_eq!(after, usage_as_grpc(&rest_after));
    assert_eq!(
        (
            &after["input_tokens"],
            &after["output_tokens"],
            &after["tokens"]
        ),
        (&json!("20"), &json!("10"), &json!("30")),
        "{after:#}"
    );
    assert_eq!(
        (
            &after["cost_usd"],
            &after["remaining_tokens"],
            &after["remaining_cost_usd"]
        ),
        (&json!(0.04), &json!("999970"), &json!(999.96)),
        "{after:#}"
    );

    let budgeted = |budget: Value| {
        let mut request = answering("Capped", "1");
        request["budget"] = budget;
        request
    };
    for budget in [
        json!({"max_tokens": 0}),
        json!({"max_tokens": "1000000000001"}),
        json!({"max_cost_usd": -1}),
        json!({"max_cost_usd": 1000001}),
        json!({"max_cost_usd": "NaN"}),
        json!({"max_cost_usd": "Infinity"}),
    ] {
        grpc.refused("Tasks/SubmitTask", budgeted(budget.clone()))
            .await
            .is("INVALID_ARGUMENT", "invalid_budget");
    }
    // REST refuses the same budget with the same code.
    let (status, refused) = rest
        .post(
            "/v1/tasks",
            &json!({"goal": "Capped", "budget": {"max_tokens": 0}}),
        )
        .await
        .unwrap();
    assert_eq!(
        (status.as_u16(), &refused["error"]["code"]),
        (422, &json!("invalid_budget"))
    );
}

/// The example memory tool's manifest (it asks for memory).
fn memory_manifest() -> String {
    std::fs::read_to_string(opspawn_testkit::plugin_sources().join("memory/memory.toml")).unwrap()
}

/// A task submitted over gRPC in a memory namespace saves a memory there;
/// Memories lists, searches, creates, gets and deletes them, as REST does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_keeps_a_tasks_memory_namespace_and_manages_memories() {
    let harness = Harness::start_with_plugins(&[GRPC_ON], |plugins| {
        plugins.add("memory", "memory", Some(&memory_manifest()));
    });
    let rest = harness.client();
    let mut grpc = Reflected::start(&harness);

    let script = json!([
        {"tool_calls": [{"id": "c1", "name": "memory_save", "arguments":
            {"text": "The user's name is Ada Lovelace", "metadata": {"topic": "name"}}}]},
        {"content": "Final Answer: saved"}
    ]);
    let task = grpc
        .submit(json!({
            "goal": "Remember the user's name",
            "tools": {"names": ["memory_save"]},
            "options_json": json!({"llm": {"script": script}}).to_string(),
            "memory_namespace": "user-1",
        }))
        .await;
    assert_eq!(task["memory_namespace"], "user-1", "{task:#}");
    let saver = task["id"].as_str().unwrap().to_owned();
    let task = grpc.finished(&saver).await;
    assert_eq!(task["status"], "succeeded", "{task:#}");
    let saved = parsed(&task["steps"][1]["output_json"])["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let listed = grpc
        .ok("Memories/ListMemories", json!({"namespace": "user-1"}))
        .await;
    let ada = &listed["memories"][0];
    assert_eq!(
        listed["memories"].as_array().unwrap().len(),
        1,
        "{listed:#}"
    );
    assert_eq!(
        (&ada["id"], &ada["namespace"], &ada["text"], &ada["task_id"]),
        (
            &json!(saved),
            &json!("user-1"),
            &json!("The user's name is Ada Lovelace"),
            &json!(saver)
        ),
        "{ada:#}"
    );
    assert_eq!(parsed(&ada["metadata_json"]), json!({"topic": "name"}));
    assert_eq!(ada.get("score"), None, "listed, not searched: {ada:#}");
    let ada = ada.clone();

    let ops = grpc
        .ok(
            "Memories/CreateMemory",
            json!({"namespace": "ops", "text": "the pager rota is weekly",
                   "metadata_json": r#"{"by": "ops"}"#}),
        )
        .await;
    assert_eq!(
        (&ops["namespace"], &ops["text"]),
        (&json!("ops"), &json!("the pager rota is weekly")),
        "{ops:#}"
    );
    assert_eq!(parsed(&ops["metadata_json"]), json!({"by": "ops"}));
    for unset in ["task_id", "score"] {
        assert_eq!(ops.get(unset), None, "{unset}: {ops:#}");
    }
    let ops_id = ops["id"].as_str().unwrap().to_owned();
    let (_, shown) = rest.get(&format!("/v1/memories/{ops_id}")).await.unwrap();
    assert_eq!(
        (&ops["created_at"], &ops["text"]),
        (&shown["created_at"], &shown["text"]),
        "REST shows the same memory"
    );
    let plain = grpc
        .ok("Memories/CreateMemory", json!({"text": "plain note"}))
        .await;
    assert_eq!(plain["namespace"], "default");
    assert_eq!(parsed(&plain["metadata_json"]), json!({}), "{plain:#}");

    // Searches: the matching memories, with a score.
    let found = grpc
        .ok("Memories/ListMemories", json!({"q": "pager"}))
        .await;
    assert_eq!(ids(&found["memories"]), [ops_id.as_str()]);
    assert!(
        found["memories"][0]["score"].as_f64().unwrap() > 0.0,
        "{found:#}"
    );
    assert_eq!(found.get("next_cursor"), None);
    let found = grpc
        .ok("Memories/ListMemories", json!({"q": "LOVELACE rota"}))
        .await;
    let mut matched = ids(&found["memories"]);
    matched.sort_unstable();
    let mut expected = [saved.as_str(), ops_id.as_str()];
    expected.sort_unstable();
    assert_eq!(matched, expected, "any of the words: {found:#}");
    let found = grpc
        .ok(
            "Memories/ListMemories",
            json!({"q": "pager", "namespace": "user-1"}),
        )
        .await;
    assert_eq!(found["memories"], json!([]));

    // Pages, newest first.
    let page = grpc.ok("Memories/ListMemories", json!({"limit": 2})).await;
    assert_eq!(
        ids(&page["memories"]),
        [plain["id"].as_str().unwrap(), ops_id.as_str()]
    );
    let cursor = page["next_cursor"]
        .as_str()
        .expect("a second page")
        .to_owned();
    let page = grpc
        .ok(
            "Memories/ListMemories",
            json!({"limit": 2, "cursor": cursor}),
        )
        .await;
    assert_eq!(ids(&page["memories"]), [saved.as_str()]);
    assert_eq!(page.get("next_cursor"), None);

    let got = grpc.ok("Memories/GetMemory", json!({"id": saved})).await;
    assert_eq!(got, ada);
    let deleted = grpc
        .ok("Memories/DeleteMemory", json!({"id": ops_id}))
        .await;
    assert_eq!(deleted, json!({}));
    grpc.refused("Memories/GetMemory", json!({"id": ops_id}))
        .await
        .is("NOT_FOUND", "memory_not_found");
    grpc.refused("Memories/DeleteMemory", json!({"id": ops_id}))
        .await
        .is("NOT_FOUND", "memory_not_found");
    let (status, _) = rest.get(&format!("/v1/memories/{ops_id}")).await.unwrap();
    assert_eq!(status.as_u16(), 404, "REST sees it gone");

    // Bad input, refused with REST's codes.
    for (request, code) in [
        (json!({"text": "  "}), "invalid_memory"),
        (
            json!({"text": "x", "metadata_json": "[1]"}),
            "invalid_memory",
        ),
        (json!({"text": "x", "metadata_json": "{"}), "invalid_json"),
        (
            json!({"text": "x", "namespace": "no spaces"}),
            "invalid_memory_namespace",
        ),
    ] {
        grpc.refused("Memories/CreateMemory", request)
            .await
            .is("INVALID_ARGUMENT", code);
    }
    for (request, code) in [
        (json!({"q": " ;"}), "invalid_query"),
        (json!({"q": "pager", "cursor": saved}), "invalid_query"),
        (json!({"namespace": "a/b"}), "invalid_memory_namespace"),
        (json!({"limit": 0}), "invalid_query"),
    ] {
        grpc.refused("Memories/ListMemories", request)
            .await
            .is("INVALID_ARGUMENT", code);
    }
    for id in ["", "a/b", "not-a-memory"] {
        grpc.refused("Memories/GetMemory", json!({"id": id}))
            .await
            .is("NOT_FOUND", "memory_not_found");
    }
    let mut bad = answering("Bad namespace", "1");
    bad["memory_namespace"] = json!("a/b");
    grpc.refused("Tasks/SubmitTask", bad)
        .await
        .is("INVALID_ARGUMENT", "invalid_memory_namespace");
}
