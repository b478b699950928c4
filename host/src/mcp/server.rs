//! Opspawn as an MCP server: `/mcp` on the HTTP server (streamable HTTP)
//! and `opspawn mcp` (stdio, for a running server).
//!
//! Both speak to the REST API, never around it: `/mcp` calls this server's
//! own router in-process with the MCP client's `Authorization` header, and
//! `opspawn mcp` calls a running server over HTTP with `OPSPAWN_TOKEN`. So
//! an MCP client gets exactly the REST API's validation, bearer tokens,
//! tenant isolation, rate limits and error codes.
//!
//! Tools: every loaded tool, each call run as a task of its own (so it is
//! journaled, limited and listed with the tenant's tasks), and `run_task`,
//! `get_task`, `cancel_task`. Tasks are resources `opspawn://tasks/{id}`.
//!
//! MCP Tasks (the `io.modelcontextprotocol/tasks` extension): a client that
//! declares it gets `run_task`'s answer as a task handle at once, the
//! Opspawn task's id, and follows it with `tasks/get` and `tasks/cancel`,
//! from this session or a later one. The MCP task is the Opspawn task, so it
//! is as durable as any other.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderValue, Method, Request, StatusCode, header};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, CancelTaskParams, ContentBlock,
    CreateTaskResult, DetailedTask, GetTaskParams, GetTaskResult, Implementation, JsonObject,
    ListResourceTemplatesResult, ListResourcesResult, ListToolsResult, PaginatedRequestParams,
    ProgressNotificationParam, ReadResourceRequestParams, ReadResourceResponse, ReadResourceResult,
    Resource, ResourceContents, ResourceTemplate, ServerCapabilities, ServerConfig, Task,
    TaskPayload, TaskStatus, Tool, UpdateTaskParams,
};
use rmcp::service::{RequestContext, RoleServer};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, ServerHandler, ServiceExt};
use serde_json::{Map, Value, json};
use tower::ServiceExt as _;

use crate::sse::SseStream;

/// The prefix of a task's resource URI.
const TASK_URI: &str = "opspawn://tasks/";
/// The tools of this server itself; a plugin tool of the same name is not
/// offered over MCP.
const OWN_TOOLS: [&str; 3] = ["run_task", "get_task", "cancel_task"];
/// How often an MCP Tasks client is asked to poll `tasks/get`, in ms.
const TASK_POLL_INTERVAL_MS: u64 = 500;

/// Where the REST API is.
pub enum Backend {
    /// This server's own router, called in-process.
    Local(axum::Router),
    /// A running server (`opspawn mcp`): its base URL.
    Remote { base: String, http: reqwest::Client },
}

type Bytestream = BoxStream<'static, Result<Bytes, std::io::Error>>;

impl Backend {
    async fn send(
        &self,
        method: Method,
        path: &str,
        auth: Option<&HeaderValue>,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Bytestream), String> {
        match self {
            Self::Local(router) => {
                let mut request = Request::builder().method(method).uri(path);
                if let Some(auth) = auth {
                    request = request.header(header::AUTHORIZATION, auth);
                }
                let request = match body {
                    Some(body) => request
                        .header(header::CONTENT_TYPE, "application/json")
                        .body(Body::from(body.to_string())),
                    None => request.body(Body::empty()),
                }
                .map_err(|e| e.to_string())?;
                let response = router
                    .clone()
                    .oneshot(request)
                    .await
                    .map_err(|e| e.to_string())?;
                let status = response.status();
                let stream = response
                    .into_body()
                    .into_data_stream()
                    .map(|chunk| chunk.map_err(std::io::Error::other))
                    .boxed();
                Ok((status, stream))
            }
            Self::Remote { base, http } => {
                let mut request = http.request(method, format!("{base}{path}"));
                if let Some(auth) = auth {
                    request = request.header(header::AUTHORIZATION, auth);
                }
                if let Some(body) = body {
                    request = request.json(body);
                }
                let response = request
                    .send()
                    .await
                    .map_err(|e| format!("cannot reach the opspawn server at {base}: {e}"))?;
                let status = StatusCode::from_u16(response.status().as_u16())
                    .unwrap_or(StatusCode::BAD_GATEWAY);
                let stream = response
                    .bytes_stream()
                    .map(|chunk| chunk.map_err(std::io::Error::other))
                    .boxed();
                Ok((status, stream))
            }
        }
    }

    /// A JSON request: the answer, or the API's error as `code: message`.
    async fn json(
        &self,
        method: Method,
        path: &str,
        auth: Option<&HeaderValue>,
        body: Option<&Value>,
    ) -> Result<Value, String> {
        let (status, mut stream) = self.send(method, path, auth, body).await?;
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            bytes.extend_from_slice(&chunk.map_err(|e| e.to_string())?);
        }
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status.is_success() {
            Ok(value)
        } else {
            Err(format!(
                "{}: {}",
                value["error"]["code"].as_str().unwrap_or("error"),
                value["error"]["message"]
                    .as_str()
                    .unwrap_or(status.canonical_reason().unwrap_or("failed"))
            ))
        }
    }
}

/// The MCP server: one per session, all sharing the backend.
#[derive(Clone)]
pub struct Front {
    backend: Arc<Backend>,
    /// `opspawn mcp`: the token from `OPSPAWN_TOKEN`. `/mcp` forwards each
    /// request's own header instead.
    token: Option<HeaderValue>,
}

impl Front {
    pub fn new(backend: Backend, token: Option<HeaderValue>) -> Self {
        Self {
            backend: Arc::new(backend),
            token,
        }
    }

    /// The `Authorization` header the REST calls for this request carry.
    fn auth(&self, context: &RequestContext<RoleServer>) -> Option<HeaderValue> {
        self.token.clone().or_else(|| {
            context
                .extensions
                .get::<axum::http::request::Parts>()
                .and_then(|parts| parts.headers.get(header::AUTHORIZATION).cloned())
        })
    }

    /// Submits a task and waits for its end, telling the client of each
    /// finished step when it asked for progress. A client that goes away
    /// (or cancels) cancels the task.
    async fn run(
        &self,
        body: &Value,
        context: &RequestContext<RoleServer>,
    ) -> Result<Value, String> {
        let auth = self.auth(context);
        let task = self
            .backend
            .json(Method::POST, "/v1/tasks", auth.as_ref(), Some(body))
            .await?;
        let id = task["id"]
            .as_str()
            .ok_or("the server returned no task id")?;
        let follow = async {
            let (status, stream) = self
                .backend
                .send(
                    Method::GET,
                    &format!("/v1/tasks/{id}/events"),
                    auth.as_ref(),
                    None,
                )
                .await?;
            if !status.is_success() {
                return Err(format!("following task {id} answered {status}"));
            }
            let mut events = SseStream::new(Box::pin(stream));
            let mut finished_steps = 0u32;
            while let Some(event) = events.next().await {
                let event = event.map_err(|e| e.to_string())?;
                match event.event.as_deref().unwrap_or("message") {
                    "step.finished" => {
                        finished_steps += 1;
                        if let Some(token) = context.meta.get_progress_token() {
                            let data: Value =
                                serde_json::from_str(&event.data).unwrap_or(Value::Null);
                            let step = &data["data"];
                            let mut progress =
                                ProgressNotificationParam::new(token, f64::from(finished_steps));
                            progress.message = Some(format!(
                                "step {} ({} {}) {}",
                                step["seq"],
                                step["kind"].as_str().unwrap_or("?"),
                                step["plugin"].as_str().unwrap_or("?"),
                                step["status"].as_str().unwrap_or("?")
                            ));
                            let _ = context.peer.notify_progress(progress).await;
                        }
                    }
                    "task.finished" => break,
                    _ => {}
                }
            }
            Ok(())
        };
        tokio::select! {
            followed = follow => followed?,
            () = context.ct.cancelled() => {
                let path = format!("/v1/tasks/{id}/cancel");
                let _ = self.backend.json(Method::POST, &path, auth.as_ref(), None).await;
                return Err(format!("the request was cancelled; so was task {id}"));
            }
        }
        self.backend
            .json(Method::GET, &format!("/v1/tasks/{id}"), auth.as_ref(), None)
            .await
    }

    /// A plugin tool's call, run as a call task of its own: one step, with
    /// no planner or LLM. The answer is that step's output.
    async fn call_plugin_tool(
        &self,
        name: &str,
        arguments: Map<String, Value>,
        context: &RequestContext<RoleServer>,
    ) -> Result<CallToolResult, String> {
        let body = json!({
            "goal": format!("Call the tool {name} (for an MCP client)"),
            "call": {"tool": name, "arguments": arguments},
        });
        let task = self.run(&body, context).await?;
        let step = task["steps"]
            .as_array()
            .and_then(|steps| steps.iter().find(|step| step["kind"] == "tool"));
        let Some(step) = step else {
            return Ok(error_result(format!(
                "task {} ended ({}) without calling {name}: {}",
                task["id"].as_str().unwrap_or("?"),
                task["status"].as_str().unwrap_or("?"),
                task["error"]["message"].as_str().unwrap_or("")
            )));
        };
        if let Some(error) = step["error"].as_object() {
            return Ok(error_result(format!(
                "{}: {}",
                error["code"].as_str().unwrap_or("error"),
                error["message"].as_str().unwrap_or("")
            )));
        }
        Ok(output_result(step["output"].clone()))
    }

    async fn own_tool(
        &self,
        name: &str,
        arguments: Map<String, Value>,
        context: &RequestContext<RoleServer>,
    ) -> Result<CallToolResult, String> {
        let auth = self.auth(context);
        let id = || {
            arguments
                .get("id")
                .and_then(Value::as_str)
                .filter(|id| !id.is_empty() && !id.contains('/'))
                .ok_or_else(|| "give the task's id as {\"id\": \"...\"}".to_owned())
        };
        match name {
            "run_task" => {
                let task = self.run(&Value::Object(arguments.clone()), context).await?;
                Ok(run_task_result(&task))
            }
            "get_task" => {
                let path = format!("/v1/tasks/{}", id()?);
                let task = self
                    .backend
                    .json(Method::GET, &path, auth.as_ref(), None)
                    .await?;
                Ok(output_result(task))
            }
            "cancel_task" => {
                let path = format!("/v1/tasks/{}/cancel", id()?);
                let task = self
                    .backend
                    .json(Method::POST, &path, auth.as_ref(), None)
                    .await?;
                Ok(output_result(task_summary(&task)))
            }
            _ => Err(format!("unknown tool {name}")),
        }
    }

    /// `run_task` for a client that declared MCP Tasks: the task is
    /// submitted and its handle returned at once.
    async fn start_task(
        &self,
        arguments: Map<String, Value>,
        context: &RequestContext<RoleServer>,
    ) -> CallToolResponse {
        let auth = self.auth(context);
        let body = Value::Object(arguments);
        match self
            .backend
            .json(Method::POST, "/v1/tasks", auth.as_ref(), Some(&body))
            .await
        {
            Ok(task) => CallToolResponse::Task(CreateTaskResult::new(mcp_task(&task))),
            Err(error) => CallToolResponse::Complete(error_result(error)),
        }
    }

    /// The REST view of the task an MCP Tasks request names.
    async fn task(
        &self,
        method: Method,
        id: &str,
        action: &str,
        context: &RequestContext<RoleServer>,
    ) -> Result<Value, ErrorData> {
        if id.is_empty() || id.contains('/') || id.contains('?') {
            return Err(ErrorData::invalid_params(
                format!("{id:?} is not an Opspawn task id"),
                None,
            ));
        }
        let auth = self.auth(context);
        let path = format!("/v1/tasks/{id}{action}");
        self.backend
            .json(method, &path, auth.as_ref(), None)
            .await
            .map_err(|e| ErrorData::invalid_params(e, None))
    }
}

/// Whether the client declared MCP Tasks, for this request or its session.
fn wants_task_handle(context: &RequestContext<RoleServer>) -> bool {
    context
        .client_capabilities()
        .is_some_and(|capabilities| capabilities.supports_tasks())
}

/// `run_task`'s answer for a finished task: the answer as text, or the
/// failure as an error result; the task's summary as structured content.
fn run_task_result(task: &Value) -> CallToolResult {
    let mut result = match task["status"].as_str() {
        Some("succeeded") => CallToolResult::success(vec![ContentBlock::text(
            task["result"].as_str().unwrap_or_default(),
        )]),
        status => error_result(format!(
            "task {} {}: {}: {}",
            task["id"].as_str().unwrap_or("?"),
            status.unwrap_or("?"),
            task["error"]["code"].as_str().unwrap_or("?"),
            task["error"]["message"].as_str().unwrap_or("")
        )),
    };
    result.structured_content = Some(task_summary(task));
    result
}

/// An Opspawn task (its REST view) as an MCP task. A task that failed is
/// `completed` with an error result, as a tool call that returned one: the
/// MCP `failed` status is for protocol errors.
fn mcp_task(task: &Value) -> Task {
    let opspawn_status = task["status"].as_str().unwrap_or_default();
    let status = match opspawn_status {
        "succeeded" | "failed" => TaskStatus::Completed,
        "cancelled" => TaskStatus::Cancelled,
        _ => TaskStatus::Working,
    };
    let created = task["created_at"].as_str().unwrap_or_default();
    let updated = task["finished_at"]
        .as_str()
        .or(task["started_at"].as_str())
        .unwrap_or(created);
    let message = match opspawn_status {
        "waiting_approval" => "waiting for a tool call to be approved".to_owned(),
        "failed" => format!(
            "failed: {}",
            task["error"]["code"].as_str().unwrap_or("error")
        ),
        other => other.to_owned(),
    };
    Task::new(
        task["id"].as_str().unwrap_or_default(),
        status,
        created,
        updated,
    )
    .with_status_message(message)
    .with_poll_interval_ms(TASK_POLL_INTERVAL_MS)
}

/// An Opspawn task as `tasks/get` answers it: a finished task carries
/// `run_task`'s answer.
fn detailed_task(task: &Value) -> DetailedTask {
    let payload = match task["status"].as_str() {
        Some("succeeded" | "failed") => {
            let result = serde_json::to_value(run_task_result(task)).unwrap_or_default();
            let result: JsonObject = match result {
                Value::Object(result) => result,
                _ => JsonObject::new(),
            };
            TaskPayload::Completed { result }
        }
        Some("cancelled") => TaskPayload::Cancelled,
        _ => TaskPayload::Working,
    };
    DetailedTask::new(mcp_task(task), payload)
}

fn error_result(message: String) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(message)])
}

/// A step's or the API's answer as a tool result: structured content when
/// it is an object, with its JSON as text too.
fn output_result(output: Value) -> CallToolResult {
    match output {
        Value::String(text) => CallToolResult::success(vec![ContentBlock::text(text)]),
        Value::Object(_) => {
            let mut result = CallToolResult::success(vec![ContentBlock::text(output.to_string())]);
            result.structured_content = Some(output);
            result
        }
        other => CallToolResult::success(vec![ContentBlock::text(other.to_string())]),
    }
}

fn task_summary(task: &Value) -> Value {
    json!({
        "task_id": task["id"],
        "status": task["status"],
        "result": task["result"],
        "error": task["error"],
        "steps": task["steps"].as_array().map(Vec::len),
    })
}

fn schema(value: Value) -> Arc<Map<String, Value>> {
    match value {
        Value::Object(object) => Arc::new(object),
        _ => Arc::new(Map::new()),
    }
}

fn own_tool_specs() -> Vec<Tool> {
    let id = json!({
        "type": "object",
        "properties": {"id": {"type": "string", "description": "the task's id"}},
        "required": ["id"],
    });
    vec![
        Tool::new(
            "run_task",
            "Runs an Opspawn task to its end and returns its answer: a goal, with optionally \
             the planner, LLM adapter, model, tools and options (as POST /v1/tasks takes \
             them). Sends a progress notification per finished step when asked.",
            schema(json!({
                "type": "object",
                "properties": {
                    "goal": {"type": "string"},
                    "planner": {"type": "string"},
                    "llm": {"type": "string"},
                    "model": {"type": "string"},
                    "tools": {"type": "array", "items": {"type": "string"}},
                    "options": {"type": "object"},
                    "max_steps": {"type": "integer"},
                    "timeout_secs": {"type": "integer"},
                    "thread": {
                        "type": "string",
                        "description": "continue this conversation thread: the agent sees \
                            its earlier tasks, and its tasks run one at a time",
                    },
                    "response_format": {
                        "type": "object",
                        "description": "ask for structured output: {name, schema (a JSON \
                            Schema), strict}; the answer must be JSON matching the schema",
                        "properties": {
                            "name": {"type": "string"},
                            "schema": {"type": "object"},
                            "strict": {"type": "boolean"},
                        },
                        "required": ["name", "schema"],
                    },
                },
                "required": ["goal"],
            })),
        ),
        Tool::new(
            "get_task",
            "An Opspawn task with every step, by id.",
            schema(id.clone()),
        ),
        Tool::new("cancel_task", "Cancels an Opspawn task, by id.", schema(id)),
    ]
}

impl ServerHandler for Front {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_resources()
                .enable_tasks()
                .build(),
        )
        .with_server_info(Implementation::new("opspawn", env!("CARGO_PKG_VERSION")))
        .with_instructions(
            "Opspawn runs agent tasks. run_task runs one to its end (or, for a client \
             that declares MCP Tasks, starts it and returns its handle at once); every \
             other tool is one of Opspawn's tools, each call run as a task of its own. \
             Tasks are resources opspawn://tasks/{id}.",
        )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let auth = self.auth(&context);
        let list = self
            .backend
            .json(Method::GET, "/v1/plugins", auth.as_ref(), None)
            .await
            .map_err(|e| ErrorData::internal_error(e, None))?;
        let mut tools = own_tool_specs();
        let offered = list["plugins"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(list["mcp_servers"].as_array().into_iter().flatten())
            .flat_map(|source| source["tools"].as_array().into_iter().flatten());
        for tool in offered {
            let Some(name) = tool["name"].as_str() else {
                continue;
            };
            if OWN_TOOLS.contains(&name) {
                continue;
            }
            tools.push(Tool::new(
                name.to_owned(),
                tool["description"].as_str().unwrap_or_default().to_owned(),
                schema(tool["input_schema"].clone()),
            ));
        }
        Ok(ListToolsResult::with_all_items(tools))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let arguments = request.arguments.unwrap_or_default();
        if request.name == "run_task" && wants_task_handle(&context) {
            return Ok(self.start_task(arguments, &context).await);
        }
        let outcome = if OWN_TOOLS.contains(&request.name.as_ref()) {
            self.own_tool(&request.name, arguments, &context).await
        } else {
            self.call_plugin_tool(&request.name, arguments, &context)
                .await
        };
        Ok(CallToolResponse::Complete(
            outcome.unwrap_or_else(error_result),
        ))
    }

    async fn get_task(
        &self,
        request: GetTaskParams,
        context: RequestContext<RoleServer>,
    ) -> Result<GetTaskResult, ErrorData> {
        let task = self
            .task(Method::GET, &request.task_id, "", &context)
            .await?;
        Ok(GetTaskResult::new(detailed_task(&task)))
    }

    async fn cancel_task(
        &self,
        request: CancelTaskParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        self.task(Method::POST, &request.task_id, "/cancel", &context)
            .await
            .map(drop)
    }

    async fn update_task(
        &self,
        request: UpdateTaskParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        Err(ErrorData::invalid_params(
            format!(
                "task {} asks for no input: Opspawn tasks take none once started (a tool \
                 call that needs approval is answered at /v1/tasks/{{id}}/approvals)",
                request.task_id
            ),
            None,
        ))
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        let auth = self.auth(&context);
        let page = self
            .backend
            .json(Method::GET, "/v1/tasks?limit=100", auth.as_ref(), None)
            .await
            .map_err(|e| ErrorData::internal_error(e, None))?;
        let resources = page["tasks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|task| {
                let id = task["id"].as_str()?;
                let mut resource = Resource::new(
                    format!("{TASK_URI}{id}"),
                    format!(
                        "{} ({})",
                        task["goal"].as_str().unwrap_or_default(),
                        task["status"].as_str().unwrap_or_default()
                    ),
                );
                resource.mime_type = Some("application/json".into());
                Some(resource)
            })
            .collect();
        Ok(ListResourcesResult::with_all_items(resources))
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, ErrorData> {
        let mut template = ResourceTemplate::new(format!("{TASK_URI}{{id}}"), "task");
        template.mime_type = Some("application/json".into());
        Ok(ListResourceTemplatesResult::with_all_items(vec![template]))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        let id = request
            .uri
            .strip_prefix(TASK_URI)
            .filter(|id| !id.is_empty() && !id.contains('/'))
            .ok_or_else(|| {
                ErrorData::resource_not_found(
                    format!(
                        "no such resource {}; tasks are {TASK_URI}{{id}}",
                        request.uri
                    ),
                    None,
                )
            })?;
        let auth = self.auth(&context);
        let task = self
            .backend
            .json(Method::GET, &format!("/v1/tasks/{id}"), auth.as_ref(), None)
            .await
            .map_err(|e| ErrorData::resource_not_found(e, None))?;
        let mut contents = ResourceContents::text(task.to_string(), request.uri.clone());
        if let ResourceContents::TextResourceContents { mime_type, .. } = &mut contents {
            *mime_type = Some("application/json".into());
        }
        Ok(ReadResourceResponse::Complete(ReadResourceResult::new(
            vec![contents],
        )))
    }
}

/// `/mcp`: streamable HTTP over this server's REST router, which must be
/// the whole API without `/mcp`. The caller puts the bearer-token check in
/// front of it.
pub fn http_service(
    rest: axum::Router,
    shutdown: tokio_util::sync::CancellationToken,
    max_body_bytes: usize,
) -> StreamableHttpService<Front, LocalSessionManager> {
    let front = Front::new(Backend::Local(rest), None);
    let config = StreamableHttpServerConfig::default()
        .with_cancellation_token(shutdown)
        .with_max_request_body_bytes(max_body_bytes);
    StreamableHttpService::new(
        move || Ok(front.clone()),
        Arc::new(LocalSessionManager::default()),
        config,
    )
}

/// `opspawn mcp`: MCP over stdio for the server at `base`.
pub async fn serve_stdio(base: String, token: Option<String>) -> anyhow::Result<()> {
    let token = token
        .map(|token| HeaderValue::from_str(&format!("Bearer {token}")))
        .transpose()?
        .map(|mut value| {
            value.set_sensitive(true);
            value
        });
    let http = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(5))
        .build()?;
    let front = Front::new(Backend::Remote { base, http }, token);
    let running = front.serve(rmcp::transport::stdio()).await?;
    running.waiting().await?;
    Ok(())
}
