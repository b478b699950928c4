//! gRPC beside REST (`proto/opspawn/v1/`: the `Tasks`, `Threads` and
//! `Memories` services), on a port of its own when `[grpc] listen` is set.
//!
//! Every call is served by the REST route of the same name, called
//! in-process with the caller's `authorization` (and `idempotency-key`)
//! metadata as headers, as `/mcp` does (see `mcp/server.rs`). So gRPC gets
//! REST's validation, bearer tokens, tenants, rate limits, idempotency and
//! error codes by construction, and `WatchTask` is the SSE route's stream,
//! re-framed: the same events, replay and end.

use std::net::SocketAddr;

use axum::body::Body;
use axum::http::{HeaderName, Method, Request, StatusCode, header};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status};
use tower::ServiceExt as _;

use crate::api::ApiError;
use crate::errors::Code;
use crate::sse::SseStream;

/// The code generated from `proto/opspawn/v1/`.
pub mod pb {
    tonic::include_proto!("opspawn.v1");
}

/// The parsed .proto files, for server reflection.
const DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/opspawn_descriptor.bin"));

/// The metadata key carrying an error's stable code.
pub const ERROR_CODE_KEY: &str = "opspawn-error-code";

/// Call metadata passed on to REST as headers of the same name.
const FORWARDED: [HeaderName; 2] = [
    header::AUTHORIZATION,
    HeaderName::from_static("idempotency-key"),
];

/// The largest REST answer read (a task with its steps); past it, the call
/// fails rather than the server holding it all.
const MAX_ANSWER_BYTES: usize = 64 << 20;

/// `[grpc]`: where gRPC listens, if anywhere.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcConfig {
    /// The address gRPC listens on (`127.0.0.1:50051`); gRPC is off when
    /// unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
}

/// Serves gRPC (the task, thread and memory services, and reflection) on
/// `listener` until `shutdown` completes. `rest` is the REST API's router.
pub async fn serve(
    listener: tokio::net::TcpListener,
    rest: axum::Router,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(DESCRIPTORS)
    };
    let api = GrpcApi { rest };
    tonic::transport::Server::builder()
        .add_service(pb::tasks_server::TasksServer::new(api.clone()))
        .add_service(pb::threads_server::ThreadsServer::new(api.clone()))
        .add_service(pb::memories_server::MemoriesServer::new(api))
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            shutdown,
        )
        .await?;
    Ok(())
}

/// The gRPC services: each call one REST request.
#[derive(Clone)]
struct GrpcApi {
    rest: axum::Router,
}

/// A REST answer that succeeded: its status and body.
struct Answer {
    status: StatusCode,
    body: Body,
}

impl GrpcApi {
    /// Sends a request to the REST router with the forwarded metadata (and
    /// `extra` headers); a refusal becomes the matching [`Status`].
    async fn rest(
        &self,
        method: Method,
        path: &str,
        metadata: &MetadataMap,
        extra: &[(HeaderName, String)],
        body: Option<Value>,
    ) -> Result<Answer, Status> {
        let mut request = Request::builder().method(method).uri(path);
        for name in &FORWARDED {
            if let Some(value) = metadata.get(name.as_str()) {
                request = request.header(name, value.as_bytes());
            }
        }
        for (name, value) in extra {
            request = request.header(name, value);
        }
        let request = match body {
            Some(body) => request
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_string())),
            None => request.body(Body::empty()),
        }
        .map_err(|e| {
            api_refusal(ApiError::new(
                Code::InvalidRequest,
                format!("the call's metadata cannot be sent on as HTTP headers: {e}"),
            ))
        })?;
        let response = self
            .rest
            .clone()
            .oneshot(request)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let status = response.status();
        let retry_after = response.headers().get(header::RETRY_AFTER).cloned();
        if status.is_success() {
            return Ok(Answer {
                status,
                body: response.into_body(),
            });
        }
        let body = read(response.into_body()).await?;
        let mut refusal = refusal_status(status, &body);
        if let Some(retry_after) = retry_after.and_then(|v| v.to_str().ok()?.parse().ok()) {
            refusal.metadata_mut().insert("retry-after", retry_after);
        }
        Err(refusal)
    }

    /// A JSON request: the status and the answer.
    async fn json(
        &self,
        method: Method,
        path: &str,
        metadata: &MetadataMap,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value), Status> {
        let answer = self.rest(method, path, metadata, &[], body).await?;
        let bytes = read(answer.body).await?;
        let value = serde_json::from_slice(&bytes)
            .map_err(|e| Status::internal(format!("the REST API answered with bad JSON: {e}")))?;
        Ok((answer.status, value))
    }

    /// A `GET`, answered with JSON.
    async fn get(&self, path: &str, metadata: &MetadataMap) -> Result<Value, Status> {
        let (_, answer) = self.json(Method::GET, path, metadata, None).await?;
        Ok(answer)
    }

    /// A request whose answer has no body (`204 No Content`).
    async fn no_content(
        &self,
        method: Method,
        path: &str,
        metadata: &MetadataMap,
    ) -> Result<(), Status> {
        self.rest(method, path, metadata, &[], None).await?;
        Ok(())
    }
}

/// The items of the array under `key` in `value`, each read by `read`;
/// none when there is no array.
fn each<T>(value: &Value, key: &str, read: impl Fn(&Value) -> T) -> Vec<T> {
    value[key]
        .as_array()
        .into_iter()
        .flatten()
        .map(read)
        .collect()
}

async fn read(body: Body) -> Result<Bytes, Status> {
    axum::body::to_bytes(body, MAX_ANSWER_BYTES)
        .await
        .map_err(|e| Status::internal(format!("reading the REST answer failed: {e}")))
}

/// The gRPC status for a REST status. The stable code says which refusal
/// it is; this says what kind, for clients that only look at gRPC codes.
fn grpc_code(status: StatusCode) -> tonic::Code {
    match status.as_u16() {
        400 | 422 => tonic::Code::InvalidArgument,
        401 => tonic::Code::Unauthenticated,
        403 => tonic::Code::PermissionDenied,
        404 => tonic::Code::NotFound,
        408 => tonic::Code::DeadlineExceeded,
        // The task's state forbids it (`task_already_finished`).
        409 => tonic::Code::FailedPrecondition,
        // Too large, too many, or no room: all a resource that ran out.
        413 | 429 | 507 => tonic::Code::ResourceExhausted,
        503 => tonic::Code::Unavailable,
        _ => tonic::Code::Internal,
    }
}

/// REST's `{"error": {"code", "message"}}` as a [`Status`]: `code: message`,
/// with the code in the `opspawn-error-code` metadata too.
fn refusal_status(status: StatusCode, body: &[u8]) -> Status {
    let value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let code = value["error"]["code"]
        .as_str()
        .unwrap_or(Code::InternalError.as_str());
    let message = value["error"]["message"]
        .as_str()
        .unwrap_or(status.canonical_reason().unwrap_or("failed"));
    let mut refusal = Status::new(grpc_code(status), format!("{code}: {message}"));
    if let Ok(code) = MetadataValue::try_from(code) {
        refusal.metadata_mut().insert(ERROR_CODE_KEY, code);
    }
    refusal
}

/// A refusal decided here, before REST is called, in REST's terms.
fn api_refusal(error: ApiError) -> Status {
    let body =
        serde_json::json!({"error": {"code": error.code.as_str(), "message": error.message}});
    refusal_status(error.status, body.to_string().as_bytes())
}

/// Whether `id` goes into a REST path as one segment as it is. The ids the
/// server makes (UUIDs) always do.
fn plain_segment(id: &str) -> bool {
    !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b))
}

/// The REST path of a task. An id REST could not take as one path segment
/// (task ids are UUIDs) names no task.
fn task_path(id: &str, rest: &str) -> Result<String, Status> {
    if !plain_segment(id) {
        return Err(api_refusal(ApiError::task_not_found(id)));
    }
    Ok(format!("/v1/tasks/{id}{rest}"))
}

/// The REST path of a task's call that needed approval. Call ids are the
/// planner's, any text, so the id is percent-encoded; an empty one names no
/// call.
fn approval_path(task_id: &str, call_id: &str) -> Result<String, Status> {
    if call_id.is_empty() {
        return Err(api_refusal(ApiError::approval_not_found(task_id, call_id)));
    }
    task_path(task_id, &format!("/approvals/{}", percent_encoded(call_id)))
}

/// `text` as one path segment: every byte but ASCII letters, digits, `-`,
/// `_` and `~` as `%XX`, so no text becomes another path (`..`, `a/b`).
fn percent_encoded(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_~".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// The REST path of a thread, its id checked as REST checks it (what a
/// thread id may hold needs no escaping in a path).
fn thread_path(id: &str) -> Result<String, Status> {
    if let Some(message) = crate::threads::invalid_thread_id(id) {
        return Err(api_refusal(ApiError::new(Code::InvalidThread, message)));
    }
    Ok(format!("/v1/threads/{id}"))
}

/// The REST path of a memory. An id REST could not take as one path segment
/// (memory ids are UUIDs) names no memory.
fn memory_path(id: &str) -> Result<String, Status> {
    if !plain_segment(id) {
        return Err(api_refusal(ApiError::memory_not_found(id)));
    }
    Ok(format!("/v1/memories/{id}"))
}

/// `path` with the query parameters of `pairs` that are set.
fn with_query(path: &str, pairs: Vec<(&str, Option<String>)>) -> Result<String, Status> {
    let pairs: Vec<(&str, String)> = pairs
        .into_iter()
        .filter_map(|(key, value)| Some((key, value?)))
        .collect();
    let query = serde_urlencoded::to_string(&pairs)
        .map_err(|e| api_refusal(ApiError::new(Code::InvalidQuery, e.to_string())))?;
    Ok(if query.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{query}")
    })
}

/// A `*_json` field as JSON; not JSON is REST's `invalid_json`.
fn parse_json(field: &str, text: &str) -> Result<Value, Status> {
    serde_json::from_str(text).map_err(|e| {
        api_refusal(ApiError::new(
            Code::InvalidJson,
            format!("{field} is not valid JSON: {e}"),
        ))
    })
}

/// The body of `POST /v1/tasks`: only the fields that are set, so REST
/// applies its defaults to the rest.
fn submit_body(request: pb::SubmitTaskRequest) -> Result<Value, Status> {
    let mut body = Map::new();
    body.insert("goal".into(), request.goal.into());
    let strings = [
        ("planner", request.planner),
        ("llm", request.llm),
        ("model", request.model),
        ("run_at", request.run_at),
        ("deadline", request.deadline),
        ("thread", request.thread),
        ("memory_namespace", request.memory_namespace),
    ];
    for (field, value) in strings {
        if let Some(value) = value {
            body.insert(field.into(), value.into());
        }
    }
    let numbers = [
        ("max_steps", request.max_steps),
        ("max_retries", request.max_retries),
        ("timeout_secs", request.timeout_secs),
        ("priority", request.priority),
    ];
    for (field, value) in numbers {
        if let Some(value) = value {
            body.insert(field.into(), value.into());
        }
    }
    if let Some(tools) = request.tools {
        body.insert("tools".into(), tools.names.into());
    }
    if let Some(options) = request.options_json {
        body.insert("options".into(), parse_json("options_json", &options)?);
    }
    if let Some(budget) = request.budget {
        body.insert("budget".into(), budget_body(budget)?);
    }
    if let Some(format) = request.response_format {
        body.insert("response_format".into(), response_format_body(format)?);
    }
    if let Some(call) = request.call {
        body.insert("call".into(), call_body(call)?);
    }
    if !request.images.is_empty() {
        let images = request.images.into_iter().map(image_body).collect();
        body.insert("images".into(), Value::Array(images));
    }
    Ok(Value::Object(body))
}

/// An image as REST takes it: `{url}`, or `{media_type, data}` with the
/// bytes in base64. One with neither is `{}`, which REST refuses.
fn image_body(image: pb::Image) -> Value {
    use base64::Engine as _;
    match image.source {
        Some(pb::image::Source::Url(url)) => json!({"url": url}),
        Some(pb::image::Source::Inline(inline)) => json!({
            "media_type": inline.media_type,
            "data": base64::engine::general_purpose::STANDARD.encode(inline.data),
        }),
        None => json!({}),
    }
}

/// An image as REST renders it (`protocol::Image`), its bytes decoded.
fn image(value: &Value) -> pb::Image {
    use base64::Engine as _;
    let source = match value["url"].as_str() {
        Some(url) => pb::image::Source::Url(url.to_owned()),
        None => pb::image::Source::Inline(pb::InlineImage {
            media_type: string(&value["media_type"]),
            data: base64::engine::general_purpose::STANDARD
                .decode(value["data"].as_str().unwrap_or_default())
                .unwrap_or_default(),
        }),
    };
    pb::Image {
        source: Some(source),
    }
}

/// A call task's `call` as REST takes it: empty `arguments_json` is no
/// arguments.
fn call_body(call: pb::ToolCallRequest) -> Result<Value, Status> {
    let mut body = Map::new();
    body.insert("tool".into(), call.tool.into());
    if !call.arguments_json.is_empty() {
        body.insert(
            "arguments".into(),
            parse_json("call.arguments_json", &call.arguments_json)?,
        );
    }
    Ok(Value::Object(body))
}

/// A task's `budget` as REST takes it: only the caps that are set. A cost
/// JSON cannot carry (NaN, infinite) is refused as REST refuses one out of
/// range.
fn budget_body(budget: pb::Budget) -> Result<Value, Status> {
    let mut body = Map::new();
    if let Some(max_tokens) = budget.max_tokens {
        body.insert("max_tokens".into(), max_tokens.into());
    }
    if let Some(usd) = budget.max_cost_usd {
        let usd = serde_json::Number::from_f64(usd).ok_or_else(|| {
            api_refusal(ApiError::new(
                Code::InvalidBudget,
                format!(
                    "budget.max_cost_usd must be a number of dollars from 0 to 1000000, not {usd}"
                ),
            ))
        })?;
        body.insert("max_cost_usd".into(), usd.into());
    }
    Ok(Value::Object(body))
}

/// A task's `response_format` as REST takes it. An empty `schema_json` is
/// a schema not given, which REST refuses as a missing field.
fn response_format_body(format: pb::ResponseFormat) -> Result<Value, Status> {
    let mut body = Map::new();
    body.insert("name".into(), format.name.into());
    if !format.schema_json.is_empty() {
        let schema = parse_json("response_format.schema_json", &format.schema_json)?;
        body.insert("schema".into(), schema);
    }
    body.insert("strict".into(), format.strict.into());
    Ok(Value::Object(body))
}

/// The body of `POST /v1/tasks/{id}/approvals/{call}`.
fn decision_body(request: pb::DecideApprovalRequest) -> Result<Value, Status> {
    let mut body = Map::new();
    body.insert("decision".into(), request.decision.into());
    if let Some(input) = request.input_json {
        body.insert("input".into(), parse_json("input_json", &input)?);
    }
    if let Some(comment) = request.comment {
        body.insert("comment".into(), comment.into());
    }
    Ok(Value::Object(body))
}

/// The body of `POST /v1/memories`.
fn memory_body(request: pb::CreateMemoryRequest) -> Result<Value, Status> {
    let mut body = Map::new();
    body.insert("text".into(), request.text.into());
    if let Some(namespace) = request.namespace {
        body.insert("namespace".into(), namespace.into());
    }
    if let Some(metadata) = request.metadata_json {
        body.insert("metadata".into(), parse_json("metadata_json", &metadata)?);
    }
    Ok(Value::Object(body))
}

fn string(value: &Value) -> String {
    value.as_str().unwrap_or_default().to_owned()
}

fn optional_string(value: &Value) -> Option<String> {
    value.as_str().map(str::to_owned)
}

/// JSON as text, absent for `null`.
fn optional_json(value: &Value) -> Option<String> {
    (!value.is_null()).then(|| value.to_string())
}

fn error(value: &Value) -> Option<pb::Error> {
    value.is_object().then(|| pb::Error {
        code: string(&value["code"]),
        message: string(&value["message"]),
    })
}

fn usage(value: &Value) -> pb::Usage {
    pb::Usage {
        input_tokens: value["input_tokens"].as_u64().unwrap_or_default(),
        output_tokens: value["output_tokens"].as_u64().unwrap_or_default(),
    }
}

/// A task as REST renders it (`api/views.rs`, `TaskView`).
fn task(value: &Value) -> pb::Task {
    pb::Task {
        id: string(&value["id"]),
        tenant: string(&value["tenant"]),
        status: string(&value["status"]),
        goal: string(&value["goal"]),
        planner: string(&value["planner"]),
        llm: string(&value["llm"]),
        model: optional_string(&value["model"]),
        tools: each(value, "tools", string),
        options_json: value["options"].to_string(),
        max_steps: value["max_steps"].as_u64().unwrap_or_default() as u32,
        max_retries: value["max_retries"].as_u64().unwrap_or_default() as u32,
        timeout_secs: value["timeout_secs"].as_f64().unwrap_or_default(),
        priority: value["priority"].as_i64().unwrap_or_default() as i32,
        idempotency_key: optional_string(&value["idempotency_key"]),
        run_at: optional_string(&value["run_at"]),
        deadline: optional_string(&value["deadline"]),
        result: optional_string(&value["result"]),
        error: error(&value["error"]),
        attempt: value["attempt"].as_i64().unwrap_or_default(),
        cancel_requested: value["cancel_requested"].as_bool().unwrap_or_default(),
        usage: Some(usage(&value["usage"])),
        created_at: string(&value["created_at"]),
        started_at: optional_string(&value["started_at"]),
        finished_at: optional_string(&value["finished_at"]),
        steps: each(value, "steps", step),
        cost_usd: value["cost_usd"].as_f64(),
        budget: value["budget"]
            .is_object()
            .then(|| task_budget(&value["budget"])),
        schedule_id: optional_string(&value["schedule_id"]),
        scheduled_for: optional_string(&value["scheduled_for"]),
        thread: optional_string(&value["thread"]),
        memory_namespace: optional_string(&value["memory_namespace"]),
        response_format: value["response_format"]
            .is_object()
            .then(|| response_format(&value["response_format"])),
        call: value["call"].is_object().then(|| pb::ToolCallRequest {
            tool: string(&value["call"]["tool"]),
            arguments_json: value["call"]["arguments"].to_string(),
        }),
        images: each(value, "images", image),
    }
}

/// A task's caps as REST renders them (`api/views.rs`, `BudgetView`).
fn task_budget(value: &Value) -> pb::TaskBudget {
    pb::TaskBudget {
        max_tokens: value["max_tokens"].as_u64(),
        max_cost_usd: value["max_cost_usd"].as_f64(),
        remaining_tokens: value["remaining_tokens"].as_u64(),
        remaining_cost_usd: value["remaining_cost_usd"].as_f64(),
    }
}

/// A task's response format as REST renders it (`protocol::ResponseFormat`).
fn response_format(value: &Value) -> pb::ResponseFormat {
    pb::ResponseFormat {
        name: string(&value["name"]),
        schema_json: value["schema"].to_string(),
        strict: value["strict"].as_bool().unwrap_or_default(),
    }
}

/// A step as REST renders it (`api/views.rs`, `StepView`).
fn step(value: &Value) -> pb::Step {
    pb::Step {
        seq: value["seq"].as_u64().unwrap_or_default() as u32,
        kind: string(&value["kind"]),
        plugin: string(&value["plugin"]),
        status: string(&value["status"]),
        input_json: value["input"].to_string(),
        output_json: optional_json(&value["output"]),
        error: error(&value["error"]),
        usage: value["usage"].is_object().then(|| usage(&value["usage"])),
        attempt: value["attempt"].as_i64().unwrap_or_default(),
        started_at: string(&value["started_at"]),
        finished_at: optional_string(&value["finished_at"]),
        duration_ms: value["duration_ms"].as_i64(),
        plugin_sha256: optional_string(&value["plugin_sha256"]),
        planner_sha256: optional_string(&value["planner_sha256"]),
    }
}

/// A call that needed approval as REST renders it (`api/approvals.rs`,
/// `ApprovalView`).
fn approval(value: &Value) -> pb::Approval {
    pb::Approval {
        call_id: string(&value["call_id"]),
        step: value["step"].as_u64().unwrap_or_default() as u32,
        tool: string(&value["tool"]),
        input_json: value["input"].to_string(),
        status: string(&value["status"]),
        edited_input_json: optional_json(&value["edited_input"]),
        comment: optional_string(&value["comment"]),
        decided_by: optional_string(&value["decided_by"]),
        decided_at: optional_string(&value["decided_at"]),
        requested_at: string(&value["requested_at"]),
        expires_at: string(&value["expires_at"]),
    }
}

/// A tenant's usage as REST renders it (`api/views.rs`, `UsageView`).
fn tenant_usage(value: &Value) -> pb::TenantUsage {
    pb::TenantUsage {
        tenant: string(&value["tenant"]),
        tracked: value["tracked"].as_bool().unwrap_or_default(),
        period: optional_string(&value["period"]),
        period_start: optional_string(&value["period_start"]),
        period_end: optional_string(&value["period_end"]),
        input_tokens: value["input_tokens"].as_u64(),
        output_tokens: value["output_tokens"].as_u64(),
        tokens: value["tokens"].as_u64(),
        cost_usd: value["cost_usd"].as_f64(),
        max_tokens: value["max_tokens"].as_u64(),
        max_cost_usd: value["max_cost_usd"].as_f64(),
        remaining_tokens: value["remaining_tokens"].as_u64(),
        remaining_cost_usd: value["remaining_cost_usd"].as_f64(),
        reserved_tokens: value["reserved_tokens"].as_u64().unwrap_or_default(),
        reserved_cost_usd: value["reserved_cost_usd"].as_f64().unwrap_or_default(),
    }
}

/// A memory as REST renders it (`api/memories.rs`, `MemoryView`).
fn memory(value: &Value) -> pb::Memory {
    pb::Memory {
        id: string(&value["id"]),
        namespace: string(&value["namespace"]),
        text: string(&value["text"]),
        metadata_json: value["metadata"].to_string(),
        created_at: string(&value["created_at"]),
        task_id: optional_string(&value["task_id"]),
        score: value["score"].as_f64(),
    }
}

/// One SSE event's `data` as a [`pb::TaskEvent`].
fn task_event(data: &str) -> Result<pb::TaskEvent, Status> {
    let value: Value = serde_json::from_str(data)
        .map_err(|e| Status::internal(format!("an event that is not JSON: {e}")))?;
    Ok(pb::TaskEvent {
        task_id: string(&value["task_id"]),
        seq: value["seq"].as_i64().unwrap_or_default(),
        kind: string(&value["kind"]),
        at: string(&value["at"]),
        data_json: value["data"].to_string(),
    })
}

#[tonic::async_trait]
impl pb::tasks_server::Tasks for GrpcApi {
    async fn submit_task(
        &self,
        request: GrpcRequest<pb::SubmitTaskRequest>,
    ) -> Result<GrpcResponse<pb::SubmitTaskResponse>, Status> {
        let (metadata, _, request) = request.into_parts();
        let body = submit_body(request)?;
        let (status, answer) = self
            .json(Method::POST, "/v1/tasks", &metadata, Some(body))
            .await?;
        Ok(GrpcResponse::new(pb::SubmitTaskResponse {
            task: Some(task(&answer)),
            created: status == StatusCode::CREATED,
        }))
    }

    async fn get_task(
        &self,
        request: GrpcRequest<pb::GetTaskRequest>,
    ) -> Result<GrpcResponse<pb::Task>, Status> {
        let asked = request.get_ref();
        let path = with_query(
            &task_path(&asked.id, "")?,
            vec![("wait_secs", asked.wait_secs.map(|secs| secs.to_string()))],
        )?;
        let answer = self.get(&path, request.metadata()).await?;
        Ok(GrpcResponse::new(task(&answer)))
    }

    async fn list_tasks(
        &self,
        request: GrpcRequest<pb::ListTasksRequest>,
    ) -> Result<GrpcResponse<pb::ListTasksResponse>, Status> {
        let query = request.get_ref();
        let path = with_query(
            "/v1/tasks",
            vec![
                ("status", query.status.clone()),
                ("limit", query.limit.map(|limit| limit.to_string())),
                ("cursor", query.cursor.clone()),
                ("plugin", query.plugin.clone()),
                ("q", query.q.clone()),
                ("schedule", query.schedule.clone()),
                ("thread", query.thread.clone()),
            ],
        )?;
        let answer = self.get(&path, request.metadata()).await?;
        Ok(GrpcResponse::new(pb::ListTasksResponse {
            tasks: each(&answer, "tasks", task),
            next_cursor: optional_string(&answer["next_cursor"]),
        }))
    }

    async fn cancel_task(
        &self,
        request: GrpcRequest<pb::CancelTaskRequest>,
    ) -> Result<GrpcResponse<pb::CancelTaskResponse>, Status> {
        let path = task_path(&request.get_ref().id, "/cancel")?;
        let (status, answer) = self
            .json(Method::POST, &path, request.metadata(), None)
            .await?;
        Ok(GrpcResponse::new(pb::CancelTaskResponse {
            task: Some(task(&answer)),
            cancelled: status == StatusCode::OK,
        }))
    }

    type WatchTaskStream = BoxStream<'static, Result<pb::TaskEvent, Status>>;

    async fn watch_task(
        &self,
        request: GrpcRequest<pb::WatchTaskRequest>,
    ) -> Result<GrpcResponse<Self::WatchTaskStream>, Status> {
        let watch = request.get_ref();
        let path = task_path(&watch.id, "/events")?;
        let mut extra = Vec::new();
        if watch.after_seq != 0 {
            extra.push((
                HeaderName::from_static("last-event-id"),
                watch.after_seq.to_string(),
            ));
        }
        let answer = self
            .rest(Method::GET, &path, request.metadata(), &extra, None)
            .await?;
        // Dropping this stream (the client went away) drops the SSE body,
        // which stops the route's follower.
        let events = SseStream::new(answer.body.into_data_stream())
            .map(|event| match event {
                Ok(event) => task_event(&event.data),
                Err(e) => Err(Status::internal(format!("reading the events failed: {e}"))),
            })
            .boxed();
        Ok(GrpcResponse::new(events))
    }

    async fn list_approvals(
        &self,
        request: GrpcRequest<pb::ListApprovalsRequest>,
    ) -> Result<GrpcResponse<pb::ListApprovalsResponse>, Status> {
        let path = task_path(&request.get_ref().task_id, "/approvals")?;
        let answer = self.get(&path, request.metadata()).await?;
        Ok(GrpcResponse::new(pb::ListApprovalsResponse {
            approvals: each(&answer, "approvals", approval),
        }))
    }

    async fn decide_approval(
        &self,
        request: GrpcRequest<pb::DecideApprovalRequest>,
    ) -> Result<GrpcResponse<pb::Approval>, Status> {
        let (metadata, _, request) = request.into_parts();
        let path = approval_path(&request.task_id, &request.call_id)?;
        let body = decision_body(request)?;
        let (_, answer) = self
            .json(Method::POST, &path, &metadata, Some(body))
            .await?;
        Ok(GrpcResponse::new(approval(&answer)))
    }

    async fn get_usage(
        &self,
        request: GrpcRequest<pb::GetUsageRequest>,
    ) -> Result<GrpcResponse<pb::TenantUsage>, Status> {
        let answer = self.get("/v1/usage", request.metadata()).await?;
        Ok(GrpcResponse::new(tenant_usage(&answer)))
    }
}

#[tonic::async_trait]
impl pb::threads_server::Threads for GrpcApi {
    async fn get_thread(
        &self,
        request: GrpcRequest<pb::GetThreadRequest>,
    ) -> Result<GrpcResponse<pb::Thread>, Status> {
        let query = request.get_ref();
        let path = with_query(
            &thread_path(&query.id)?,
            vec![
                ("limit", query.limit.map(|limit| limit.to_string())),
                ("cursor", query.cursor.clone()),
            ],
        )?;
        let answer = self.get(&path, request.metadata()).await?;
        Ok(GrpcResponse::new(pb::Thread {
            id: string(&answer["thread"]),
            tasks: each(&answer, "tasks", task),
            next_cursor: optional_string(&answer["next_cursor"]),
        }))
    }

    async fn delete_thread(
        &self,
        request: GrpcRequest<pb::DeleteThreadRequest>,
    ) -> Result<GrpcResponse<pb::DeleteThreadResponse>, Status> {
        let path = thread_path(&request.get_ref().id)?;
        self.no_content(Method::DELETE, &path, request.metadata())
            .await?;
        Ok(GrpcResponse::new(pb::DeleteThreadResponse {}))
    }
}

#[tonic::async_trait]
impl pb::memories_server::Memories for GrpcApi {
    async fn list_memories(
        &self,
        request: GrpcRequest<pb::ListMemoriesRequest>,
    ) -> Result<GrpcResponse<pb::ListMemoriesResponse>, Status> {
        let query = request.get_ref();
        let path = with_query(
            "/v1/memories",
            vec![
                ("namespace", query.namespace.clone()),
                ("q", query.q.clone()),
                ("limit", query.limit.map(|limit| limit.to_string())),
                ("cursor", query.cursor.clone()),
            ],
        )?;
        let answer = self.get(&path, request.metadata()).await?;
        Ok(GrpcResponse::new(pb::ListMemoriesResponse {
            memories: each(&answer, "memories", memory),
            next_cursor: optional_string(&answer["next_cursor"]),
        }))
    }

    async fn create_memory(
        &self,
        request: GrpcRequest<pb::CreateMemoryRequest>,
    ) -> Result<GrpcResponse<pb::Memory>, Status> {
        let (metadata, _, request) = request.into_parts();
        let body = memory_body(request)?;
        let (_, answer) = self
            .json(Method::POST, "/v1/memories", &metadata, Some(body))
            .await?;
        Ok(GrpcResponse::new(memory(&answer)))
    }

    async fn get_memory(
        &self,
        request: GrpcRequest<pb::GetMemoryRequest>,
    ) -> Result<GrpcResponse<pb::Memory>, Status> {
        let path = memory_path(&request.get_ref().id)?;
        let answer = self.get(&path, request.metadata()).await?;
        Ok(GrpcResponse::new(memory(&answer)))
    }

    async fn delete_memory(
        &self,
        request: GrpcRequest<pb::DeleteMemoryRequest>,
    ) -> Result<GrpcResponse<pb::DeleteMemoryResponse>, Status> {
        let path = memory_path(&request.get_ref().id)?;
        self.no_content(Method::DELETE, &path, request.metadata())
            .await?;
        Ok(GrpcResponse::new(pb::DeleteMemoryResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_request_code_has_a_deliberate_grpc_code() {
        for code in Code::ALL {
            let Some(status) = code.status() else {
                continue;
            };
            let grpc = grpc_code(StatusCode::from_u16(status).unwrap());
            // Internal is for what a client cannot cause or fix by itself.
            let internal = matches!(
                code,
                Code::InternalError | Code::MethodNotAllowed | Code::UnsupportedMediaType
            );
            assert_eq!(
                grpc == tonic::Code::Internal,
                internal,
                "{} ({status}) maps to {grpc:?}",
                code.as_str()
            );
        }
    }

    #[test]
    fn a_refusal_carries_the_stable_code() {
        let refusal = api_refusal(ApiError::new(Code::InvalidGoal, "the goal is empty"));
        assert_eq!(refusal.code(), tonic::Code::InvalidArgument);
        assert_eq!(refusal.message(), "invalid_goal: the goal is empty");
        assert_eq!(
            refusal.metadata().get(ERROR_CODE_KEY).unwrap(),
            "invalid_goal"
        );
    }

    #[test]
    fn only_set_fields_reach_rest() {
        let body = submit_body(pb::SubmitTaskRequest {
            goal: "g".into(),
            max_steps: Some(3),
            tools: Some(pb::ToolList { names: vec![] }),
            options_json: Some(r#"{"planner": {"max_steps": 2}}"#.into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "goal": "g", "max_steps": 3, "tools": [],
                "options": {"planner": {"max_steps": 2}}
            })
        );
        let refused = submit_body(pb::SubmitTaskRequest {
            goal: "g".into(),
            options_json: Some("{".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(
            refused.metadata().get(ERROR_CODE_KEY).unwrap(),
            "invalid_json"
        );
    }

    #[test]
    fn images_reach_rest_in_its_shape_and_come_back() {
        let pixel = vec![0x89, b'P', b'N', b'G', 1, 2, 3];
        let images = vec![
            pb::Image {
                source: Some(pb::image::Source::Url("https://example.com/a.png".into())),
            },
            pb::Image {
                source: Some(pb::image::Source::Inline(pb::InlineImage {
                    media_type: "image/png".into(),
                    data: pixel.clone(),
                })),
            },
            pb::Image { source: None },
        ];
        let body = submit_body(pb::SubmitTaskRequest {
            goal: "g".into(),
            images: images.clone(),
            ..Default::default()
        })
        .unwrap();
        let rest_images = serde_json::json!([
            {"url": "https://example.com/a.png"},
            {"media_type": "image/png", "data": "iVBORwECAw=="},
            {},
        ]);
        assert_eq!(body["images"], rest_images);
        // What REST shows comes back as it went.
        let shown = task(&serde_json::json!({"images": &rest_images.as_array().unwrap()[..2]}));
        assert_eq!(shown.images, images[..2]);
        let plain = submit_body(pb::SubmitTaskRequest {
            goal: "g".into(),
            ..Default::default()
        })
        .unwrap();
        assert!(plain.get("images").is_none(), "{plain}");
    }

    #[test]
    fn a_call_reaches_rest_in_its_shape() {
        let call = |arguments_json: &str| {
            submit_body(pb::SubmitTaskRequest {
                goal: "g".into(),
                call: Some(pb::ToolCallRequest {
                    tool: "calculator".into(),
                    arguments_json: arguments_json.into(),
                }),
                ..Default::default()
            })
        };
        assert_eq!(
            call(r#"{"expression": "6*7"}"#).unwrap(),
            serde_json::json!({
                "goal": "g",
                "call": {"tool": "calculator", "arguments": {"expression": "6*7"}}
            })
        );
        assert_eq!(
            call("").unwrap(),
            serde_json::json!({"goal": "g", "call": {"tool": "calculator"}}),
            "no arguments_json is no arguments, which REST takes as {{}}"
        );
        let refused = call("{").unwrap_err();
        assert_eq!(
            refused.metadata().get(ERROR_CODE_KEY).unwrap(),
            "invalid_json"
        );
        assert!(refused.message().contains("call.arguments_json"));
    }

    #[test]
    fn budgets_threads_namespaces_and_formats_reach_rest_in_its_shape() {
        let body = submit_body(pb::SubmitTaskRequest {
            goal: "g".into(),
            thread: Some("chat-1".into()),
            memory_namespace: Some("user-1".into()),
            budget: Some(pb::Budget {
                max_tokens: Some(1000),
                max_cost_usd: Some(0.5),
            }),
            response_format: Some(pb::ResponseFormat {
                name: "calc".into(),
                schema_json: r#"{"type": "object"}"#.into(),
                strict: true,
            }),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "goal": "g", "thread": "chat-1", "memory_namespace": "user-1",
                "budget": {"max_tokens": 1000, "max_cost_usd": 0.5},
                "response_format": {"name": "calc", "schema": {"type": "object"}, "strict": true}
            })
        );
        // An empty budget is REST's empty one; a schema not given is left
        // out, for REST to refuse as a missing field.
        let body = submit_body(pb::SubmitTaskRequest {
            goal: "g".into(),
            budget: Some(pb::Budget::default()),
            response_format: Some(pb::ResponseFormat {
                name: "calc".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(body["budget"], serde_json::json!({}));
        assert_eq!(
            body["response_format"],
            serde_json::json!({"name": "calc", "strict": false})
        );

        let refusals = [
            (
                pb::SubmitTaskRequest {
                    budget: Some(pb::Budget {
                        max_cost_usd: Some(f64::NAN),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                "invalid_budget",
            ),
            (
                pb::SubmitTaskRequest {
                    budget: Some(pb::Budget {
                        max_cost_usd: Some(f64::INFINITY),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                "invalid_budget",
            ),
            (
                pb::SubmitTaskRequest {
                    response_format: Some(pb::ResponseFormat {
                        name: "calc".into(),
                        schema_json: "{".into(),
                        strict: false,
                    }),
                    ..Default::default()
                },
                "invalid_json",
            ),
        ];
        for (request, code) in refusals {
            let refused = submit_body(request).unwrap_err();
            assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{code}");
            assert_eq!(refused.metadata().get(ERROR_CODE_KEY).unwrap(), code);
        }
    }

    #[test]
    fn a_task_view_keeps_what_rest_shows() {
        let view = serde_json::json!({
            "id": "t-1", "status": "waiting_approval", "options": {},
            "usage": {"input_tokens": 20, "output_tokens": 10},
            "cost_usd": 0.04,
            "budget": {"max_tokens": 1000, "max_cost_usd": null,
                       "remaining_tokens": 970, "remaining_cost_usd": null},
            "schedule_id": null, "scheduled_for": null,
            "thread": "chat-1", "memory_namespace": null,
            "response_format": {"name": "calc", "schema": {"type": "object"}, "strict": false},
            "steps": [{"seq": 1, "kind": "llm", "input": {}, "plugin_sha256": "ab",
                       "planner_sha256": null}]
        });
        let shown = task(&view);
        assert_eq!(shown.status, "waiting_approval");
        assert_eq!(shown.cost_usd, Some(0.04));
        assert_eq!(
            shown.budget,
            Some(pb::TaskBudget {
                max_tokens: Some(1000),
                max_cost_usd: None,
                remaining_tokens: Some(970),
                remaining_cost_usd: None,
            })
        );
        assert_eq!(shown.thread.as_deref(), Some("chat-1"));
        assert_eq!(shown.memory_namespace, None);
        assert_eq!(shown.schedule_id, None);
        assert_eq!(
            shown.response_format,
            Some(pb::ResponseFormat {
                name: "calc".into(),
                schema_json: r#"{"type":"object"}"#.into(),
                strict: false,
            })
        );
        assert_eq!(shown.steps[0].plugin_sha256.as_deref(), Some("ab"));
        assert_eq!(shown.steps[0].planner_sha256, None);
        let plain = task(&serde_json::json!({"budget": null, "response_format": null}));
        assert_eq!((plain.budget, plain.response_format), (None, None));
    }

    #[test]
    fn a_call_id_is_one_percent_encoded_segment() {
        assert_eq!(
            approval_path("t-1", "call_1").unwrap(),
            "/v1/tasks/t-1/approvals/call_1"
        );
        assert_eq!(
            approval_path("t-1", "a/b ..").unwrap(),
            "/v1/tasks/t-1/approvals/a%2Fb%20%2E%2E"
        );
        assert_eq!(
            approval_path("t-1", "é").unwrap(),
            "/v1/tasks/t-1/approvals/%C3%A9"
        );
        let refused = approval_path("t-1", "").unwrap_err();
        assert_eq!(refused.code(), tonic::Code::NotFound);
        assert_eq!(
            refused.metadata().get(ERROR_CODE_KEY).unwrap(),
            "approval_not_found"
        );
        let refused = approval_path("a/b", "c").unwrap_err();
        assert_eq!(
            refused.metadata().get(ERROR_CODE_KEY).unwrap(),
            "task_not_found"
        );
    }

    #[test]
    fn thread_and_memory_ids_are_checked_as_rest_checks_them() {
        assert_eq!(thread_path("chat-1:a.b").unwrap(), "/v1/threads/chat-1:a.b");
        for id in [String::new(), "a b".into(), "a/b".into(), "x".repeat(129)] {
            let refused = thread_path(&id).unwrap_err();
            assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{id:?}");
            assert_eq!(
                refused.metadata().get(ERROR_CODE_KEY).unwrap(),
                "invalid_thread"
            );
        }
        let id = "0190a5f0-0000-7000-8000-000000000000";
        assert_eq!(memory_path(id).unwrap(), format!("/v1/memories/{id}"));
        for id in ["", "a/b", "a?b"] {
            let refused = memory_path(id).unwrap_err();
            assert_eq!(refused.code(), tonic::Code::NotFound, "{id:?}");
            assert_eq!(
                refused.metadata().get(ERROR_CODE_KEY).unwrap(),
                "memory_not_found"
            );
        }
    }

    #[test]
    fn only_set_query_parameters_reach_rest() {
        assert_eq!(
            with_query("/v1/memories", vec![("q", None), ("limit", None)]).unwrap(),
            "/v1/memories"
        );
        assert_eq!(
            with_query(
                "/v1/memories",
                vec![
                    ("q", Some("a b&c".into())),
                    ("limit", None),
                    ("cursor", Some("x".into()))
                ]
            )
            .unwrap(),
            "/v1/memories?q=a+b%26c&cursor=x"
        );
    }

    #[test]
    fn an_id_that_is_not_one_path_segment_names_no_task() {
        assert_eq!(
            task_path("abc-1", "/cancel").unwrap(),
            "/v1/tasks/abc-1/cancel"
        );
        for id in ["", "a/b", "a?b", "../x", "a b"] {
            let refused = task_path(id, "").unwrap_err();
            assert_eq!(refused.code(), tonic::Code::NotFound, "{id:?}");
        }
    }
}
