//! The host as an MCP client: one supervisor per configured server keeps a
//! connection up, lists its tools into the plugin runtime's catalog, and
//! runs the calls the agent loop hands over.
//!
//! A call is an async request on the server's connection: a task waiting on
//! it holds a permit of the server's concurrency limit and nothing else (no
//! worker, no WebAssembly instance).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rmcp::model::{
    CallToolRequestParams, CallToolResult, ClientCapabilities, ClientConfig, ContentBlock,
    Implementation, ProtocolVersion, RequestMetaObject,
};
use rmcp::service::{NotificationContext, Peer, RoleClient};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use rmcp::{ClientHandler, ServiceError, ServiceExt};
use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore, watch};
use tokio_util::sync::CancellationToken;

use super::{ServerConfig, namespaced, render_template};
use crate::errors::Code;
use crate::plugins::external::{ExternalTool, ExternalTools, ToolInvoker};
use crate::plugins::{CallError, PluginRuntime};
use crate::protocol::{CallContext, ToolSpec};

/// The longest wait between two starts of a failing server.
const MAX_RESTART_DELAY: Duration = Duration::from_secs(60);
/// How long a connection must have stayed up for its next failure to
/// start the back-off over.
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// How long starting a server (spawn or connect, handshake, listing its
/// tools) may take before it counts as failed.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The `_meta` keys a call carries (a label prefix, as MCP asks).
pub const META_IDEMPOTENCY_KEY: &str = "opspawn/idempotency_key";
pub const META_TASK_ID: &str = "opspawn/task_id";
pub const META_STEP: &str = "opspawn/step";

/// Every configured MCP server, each kept up by a supervisor task.
pub struct McpClients {
    runtime: Arc<PluginRuntime>,
    servers: Vec<Arc<Server>>,
    /// Servers whose configuration is wrong: reported, never started.
    misconfigured: Vec<Value>,
    /// One publication of the catalog at a time, so none is lost.
    publishing: Mutex<()>,
    shutdown: CancellationToken,
    /// How many servers have not yet finished their first start (or
    /// failed it).
    starting: watch::Sender<usize>,
}

/// One configured server.
struct Server {
    config: ServerConfig,
    /// `mcp:<name>`: what a step's `plugin` says.
    source: String,
    calls: Arc<Semaphore>,
    state: Mutex<State>,
    /// Told when the server says its tool list changed.
    tools_changed: Arc<Notify>,
    /// Whether its first start has succeeded or failed.
    first_start_over: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct State {
    status: Status,
    /// The connection while the server is up.
    peer: Option<Peer<RoleClient>>,
    /// The tools offered, by catalog name; kept while the server restarts.
    tools: BTreeMap<String, Tool>,
    /// Why the server last failed or exited.
    error: Option<String>,
    /// Starts after the first.
    restarts: u32,
    /// The process id of a stdio server.
    pid: Option<u32>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Status {
    #[default]
    Starting,
    Ready,
    /// Down; starting again after a back-off. Its tools stay listed and
    /// calls fail with `mcp_unavailable`.
    Restarting,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Ready => "ready",
            Self::Restarting => "restarting",
        }
    }
}

#[derive(Clone)]
struct Tool {
    /// The name the server knows it by.
    original: String,
    spec: Arc<ToolSpec>,
    validator: Option<Arc<jsonschema::Validator>>,
}

impl McpClients {
    /// Starts a supervisor for each configured server and returns at once;
    /// [`started`](Self::started) waits for their first starts.
    pub fn start(runtime: Arc<PluginRuntime>, configs: &[ServerConfig]) -> Arc<Self> {
        let mut servers = Vec::new();
        let mut misconfigured = Vec::new();
        let mut names = std::collections::BTreeSet::new();
        for config in configs {
            let problem = config.problem().or_else(|| {
                (!names.insert(config.name.clone())).then(|| {
                    format!(
                        "MCP server name {:?} is given twice; each needs its own",
                        config.name
                    )
                })
            });
            if let Some(problem) = problem {
                tracing::error!(server = %config.name, %problem, "MCP server skipped");
                misconfigured.push(json!({
                    "name": config.name,
                    "status": "failed",
                    "error": problem,
                    "tools": [],
                }));
                continue;
            }
            servers.push(Arc::new(Server {
                source: format!("mcp:{}", config.name),
                calls: Arc::new(Semaphore::new(config.max_concurrent_calls.max(1))),
                config: config.clone(),
                state: Mutex::default(),
                tools_changed: Arc::new(Notify::new()),
                first_start_over: std::sync::atomic::AtomicBool::new(false),
            }));
        }
        let clients = Arc::new(Self {
            runtime,
            starting: watch::Sender::new(servers.len()),
            servers,
            misconfigured,
            publishing: Mutex::new(()),
            shutdown: CancellationToken::new(),
        });
        clients.publish();
        for server in &clients.servers {
            tokio::spawn(clients.clone().supervise(server.clone()));
        }
        clients
    }

    /// Counts `server`'s first start as over (once).
    fn first_start_over(&self, server: &Server) {
        if !server
            .first_start_over
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            self.starting
                .send_modify(|count| *count = count.saturating_sub(1));
            self.publish();
        }
    }

    /// Waits until every server has started or failed its first start.
    pub async fn started(&self) {
        let mut starting = self.starting.subscribe();
        let _ = starting.wait_for(|count| *count == 0).await;
    }

    /// What `GET /v1/plugins` shows of each server.
    pub fn views(&self) -> Vec<Value> {
        let mut views: Vec<Value> = self.servers.iter().map(|server| server.view()).collect();
        views.extend(self.misconfigured.iter().cloned());
        views
    }

    /// Stops every server (stdio servers are sent SIGTERM, then killed).
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        // The supervisors close their connections; give them a moment.
        for _ in 0..50 {
            let up = self
                .servers
                .iter()
                .any(|s| s.state.lock().expect("state lock").peer.is_some());
            if !up {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Puts every server's tools, and how each is doing, into the catalog.
    fn publish(&self) {
        let _one_at_a_time = self.publishing.lock().expect("publishing lock");
        let mut tools = Vec::new();
        for server in &self.servers {
            let state = server.state.lock().expect("state lock");
            for tool in state.tools.values() {
                tools.push(ExternalTool {
                    spec: tool.spec.clone(),
                    source: server.source.clone(),
                    invoker: server.clone(),
                });
            }
        }
        let starting = *self.starting.borrow() > 0;
        self.runtime
            .set_external_tools(ExternalTools::new(tools, self.views()).with_starting(starting));
    }

    /// Keeps one server up: starts it, lists its tools, lists them again
    /// when it says they changed, and starts it again with back-off when it
    /// exits or cannot be reached.
    async fn supervise(self: Arc<Self>, server: Arc<Server>) {
        let mut delay = server.config.restart_delay;
        loop {
            let started_at = Instant::now();
            let outcome = tokio::select! {
                outcome = self.run_once(&server) => outcome,
                () = self.shutdown.cancelled() => Ok(()),
            };
            self.first_start_over(&server);
            if self.shutdown.is_cancelled() {
                server.set_down(None);
                return;
            }
            if started_at.elapsed() >= STABLE_AFTER {
                delay = server.config.restart_delay;
            }
            let reason = match outcome {
                Ok(()) => "the server closed the connection (exited)".to_owned(),
                Err(error) => error,
            };
            tracing::warn!(
                server = %server.config.name,
                error = %reason,
                retry_in = %humantime::format_duration(delay),
                "MCP server is down; its tools fail with mcp_unavailable until it is back"
            );
            server.set_down(Some(format!(
                "{reason}; starting it again in {}",
                humantime::format_duration(delay)
            )));
            self.publish();
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.shutdown.cancelled() => return,
            }
            delay = (delay * 2).min(MAX_RESTART_DELAY);
            server.state.lock().expect("state lock").restarts += 1;
        }
    }

    /// One life of a connection: returns when it ends.
    async fn run_once(&self, server: &Arc<Server>) -> Result<(), String> {
        let handler = Handler {
            tools_changed: server.tools_changed.clone(),
        };
        let connect = async {
            let (running, pid) = match (&server.config.command, &server.config.url) {
                (Some(command), _) => {
                    let (transport, pid) = spawn(&server.config, command)?;
                    let running = handler
                        .serve(transport)
                        .await
                        .map_err(|e| format!("the MCP handshake failed: {e}"))?;
                    (running, pid)
                }
                (None, Some(url)) => {
                    let transport = http_transport(&server.config, url)?;
                    let running = match handler.serve(transport).await {
                        Ok(running) => running,
                        Err(error) => {
                            let mut message =
                                format!("cannot connect to {url}: {}", with_causes(&error));
                            if let Some(problem) = tls_problem(&server.config, url).await {
                                message.push_str(&format!("; TLS: {problem}"));
                            }
                            return Err(message);
                        }
                    };
                    (running, None)
                }
                (None, None) => unreachable!("checked by ServerConfig::problem"),
            };
            let tools = list_tools(&server.config, running.peer()).await?;
            Ok::<_, String>((running, pid, tools))
        };
        let (running, pid, tools) = tokio::time::timeout(START_TIMEOUT, connect)
            .await
            .map_err(|_| {
                format!(
                    "it did not start (spawn or connect, handshake, tools/list) within {}",
                    humantime::format_duration(START_TIMEOUT)
                )
            })??;
        let peer = running.peer().clone();
        let cancel = running.cancellation_token();
        {
            let mut state = server.state.lock().expect("state lock");
            state.status = Status::Ready;
            state.peer = Some(peer.clone());
            state.tools = tools;
            state.error = None;
            state.pid = pid;
        }
        tracing::info!(
            server = %server.config.name,
            tools = server.state.lock().expect("state lock").tools.len(),
            "MCP server ready"
        );
        self.publish();
        self.first_start_over(server);
        let mut ended = std::pin::pin!(running.waiting());
        loop {
            tokio::select! {
                _ = &mut ended => return Ok(()),
                () = server.tools_changed.notified() => {
                    match list_tools(&server.config, &peer).await {
                        Ok(tools) => {
                            tracing::info!(server = %server.config.name, tools = tools.len(), "MCP server's tools changed");
                            server.state.lock().expect("state lock").tools = tools;
                            self.publish();
                        }
                        Err(error) => tracing::warn!(server = %server.config.name, %error, "listing the MCP server's changed tools failed"),
                    }
                }
                () = self.shutdown.cancelled() => {
                    cancel.cancel();
                    let _ = tokio::time::timeout(Duration::from_secs(5), &mut ended).await;
                    return Ok(());
                }
            }
        }
    }
}

impl Server {
    fn set_down(&self, error: Option<String>) {
        let mut state = self.state.lock().expect("state lock");
        state.peer = None;
        state.pid = None;
        if error.is_some() {
            state.status = Status::Restarting;
            state.error = error;
        }
    }

    fn view(&self) -> Value {
        let state = self.state.lock().expect("state lock");
        let config = &self.config;
        let transport = match (&config.command, &config.url) {
            (Some(command), _) => json!({
                "type": "stdio",
                "command": command,
                "args": config.args,
                "env": config.env,
            }),
            (None, url) => json!({
                "type": "streamable_http",
                "url": url,
                // Where credentials go and what they draw on, never their values.
                "credentials": config.credentials.iter().map(|c| json!({
                    "header": c.header,
                    "variables": super::template_variables(&c.value),
                })).collect::<Vec<_>>(),
            }),
        };
        json!({
            "name": config.name,
            "kind": "mcp-server",
            "status": state.status.as_str(),
            "error": state.error,
            "restarts": state.restarts,
            "pid": state.pid,
            "transport": transport,
            "call_timeout": humantime::format_duration(config.call_timeout).to_string(),
            "max_concurrent_calls": config.max_concurrent_calls,
            "allow_tools": config.allow_tools,
            "deny_tools": config.deny_tools,
            "tools": state.tools.values().map(|tool| json!({
                "name": tool.spec.name,
                "mcp_name": tool.original,
                "description": tool.spec.description,
                "input_schema": tool.spec.input_schema,
            })).collect::<Vec<_>>(),
        })
    }

    fn unavailable(&self, detail: impl std::fmt::Display) -> CallError {
        CallError::Tool {
            code: Code::McpUnavailable.as_str().into(),
            message: format!("MCP server {:?} is unavailable: {detail}", self.config.name),
        }
    }
}

#[async_trait::async_trait]
impl ToolInvoker for Server {
    async fn invoke(
        &self,
        tool: &str,
        context: &CallContext,
        input: &Value,
    ) -> Result<Value, CallError> {
        let (found, peer, why_down) = {
            let state = self.state.lock().expect("state lock");
            (
                state.tools.get(tool).cloned(),
                state.peer.clone(),
                state.error.clone(),
            )
        };
        let Some(found) = found else {
            return Err(CallError::UnknownTool(tool.to_owned()));
        };
        crate::plugins::check_tool_input(tool, found.validator.as_deref(), input)?;
        let arguments = input.as_object().expect("checked to be an object");
        let Some(peer) = peer else {
            return Err(self.unavailable(why_down.unwrap_or_else(|| "it is starting".into())));
        };
        // At the limit a call waits its turn; it never fails for want of room.
        let _permit = self
            .calls
            .clone()
            .acquire_owned()
            .await
            .expect("the call semaphore is never closed");
        let mut meta = RequestMetaObject::new();
        meta.insert(META_IDEMPOTENCY_KEY.into(), json!(context.idempotency_key));
        meta.insert(META_TASK_ID.into(), json!(context.task_id));
        meta.insert(META_STEP.into(), json!(context.step));
        let mut params =
            CallToolRequestParams::new(found.original.clone()).with_arguments(arguments.clone());
        params.meta = Some(meta);
        let limit = self.config.call_timeout;
        // Dropping the request at the time limit tells the server
        // (`notifications/cancelled`).
        let result = match tokio::time::timeout(limit, peer.call_tool(params)).await {
            Err(_) => {
                return Err(CallError::Tool {
                    code: Code::McpTimeout.as_str().into(),
                    message: format!(
                        "MCP server {:?} did not answer the call of {} within {} (its \
                         call_timeout)",
                        self.config.name,
                        found.original,
                        humantime::format_duration(limit)
                    ),
                });
            }
            Ok(Err(error)) => return Err(self.call_failed(error)),
            Ok(Ok(result)) => result,
        };
        self.outcome(&found.original, result)
    }
}

impl Server {
    fn call_failed(&self, error: ServiceError) -> CallError {
        match error {
            ServiceError::McpError(error) => CallError::Tool {
                code: Code::McpError.as_str().into(),
                message: format!(
                    "MCP server {:?} refused the call: {} (JSON-RPC error {})",
                    self.config.name, error.message, error.code.0
                ),
            },
            ServiceError::Timeout { .. } => CallError::Tool {
                code: Code::McpTimeout.as_str().into(),
                message: format!("MCP server {:?} did not answer in time", self.config.name),
            },
            other => self.unavailable(format!("the call was lost: {other}")),
        }
    }

    /// A tool's answer as a step's output: its structured content when it
    /// has one, else its text when it is all text, else its blocks as sent;
    /// `isError` fails the step with that text.
    fn outcome(&self, tool: &str, result: CallToolResult) -> Result<Value, CallError> {
        let text: Vec<&str> = result
            .content
            .iter()
            .filter_map(ContentBlock::as_text)
            .map(|t| t.text.as_str())
            .collect();
        let output = if result.is_error == Some(true) {
            let message = if text.is_empty() {
                format!("MCP tool {tool} failed without saying why")
            } else {
                text.join("\n")
            };
            self.check_size(message.len())?;
            return Err(CallError::Tool {
                code: Code::McpToolError.as_str().into(),
                message,
            });
        } else if let Some(structured) = result.structured_content {
            structured
        } else if text.len() == result.content.len() {
            Value::String(text.join("\n"))
        } else {
            // Images, audio, resources beside or without text: kept as the
            // server sent them, a list of blocks. Its images go to the LLM
            // with the result (crate::images::tool_output).
            json!(result.content)
        };
        self.check_size(output.to_string().len())?;
        Ok(output)
    }

    fn check_size(&self, size: usize) -> Result<(), CallError> {
        let limit = self.config.max_output_bytes;
        if size as u64 > limit {
            return Err(CallError::OutputTooLarge {
                plugin: self.source.clone(),
                size: size as u64,
                limit,
            });
        }
        Ok(())
    }
}

/// Hears the server's notifications.
struct Handler {
    tools_changed: Arc<Notify>,
}

impl ClientHandler for Handler {
    fn get_info(&self) -> ClientConfig {
        // The session-based revision: what servers widely speak today, and
        // the one whose servers send `notifications/tools/list_changed`
        // without a subscription.
        ClientConfig::new(
            ClientCapabilities::default(),
            Implementation::new("opspawn", env!("CARGO_PKG_VERSION")),
        )
        .with_protocol_version(ProtocolVersion::V_2025_11_25)
    }

    async fn on_tool_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.tools_changed.notify_one();
    }
}

/// Starts a stdio server: an empty environment but `PATH` and the variables
/// the operator named, in a process group of its own so that a wrapper
/// (`npx`, a shell) and what it started stop together.
fn spawn(config: &ServerConfig, command: &str) -> Result<(TokioChildProcess, Option<u32>), String> {
    let mut cmd = tokio::process::Command::new(command);
    cmd.args(&config.args).env_clear();
    if let Some(cwd) = &config.cwd {
        cmd.current_dir(cwd);
    }
    for name in std::iter::once("PATH").chain(config.env.iter().map(String::as_str)) {
        if let Some(value) = std::env::var_os(name) {
            cmd.env(name, value);
        }
    }
    let mut wrapped = process_wrap::tokio::CommandWrap::from(cmd);
    wrapped.wrap(process_wrap::tokio::ProcessGroup::leader());
    let (transport, stderr) = TokioChildProcess::builder(wrapped)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {command:?}: {e}"))?;
    let pid = transport.id();
    if let Some(stderr) = stderr {
        let name = config.name.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt;
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let line: String = line.chars().take(2000).collect();
                tracing::info!(server = %name, "{line}");
            }
        });
    }
    Ok((transport, pid))
}

/// Connects to a streamable HTTP server, with the operator's credential
/// headers, read from the host's environment at each connection.
fn http_transport(
    config: &ServerConfig,
    url: &str,
) -> Result<StreamableHttpClientTransport<reqwest::Client>, String> {
    let mut headers = std::collections::HashMap::new();
    for credential in &config.credentials {
        let name = reqwest::header::HeaderName::from_bytes(credential.header.as_bytes())
            .map_err(|_| format!("invalid credential header name {:?}", credential.header))?;
        let value = render_template(&credential.value).map_err(|variable| {
            format!(
                "the credential for header {} needs the environment variable {variable}, which \
                 is not set",
                credential.header
            )
        })?;
        let mut value = reqwest::header::HeaderValue::from_str(&value).map_err(|_| {
            format!(
                "the credential for header {} is not a valid header value",
                credential.header
            )
        })?;
        value.set_sensitive(true);
        headers.insert(name, value);
    }
    let mut client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        // A server's redirect is not followed: the credential stays with it.
        .redirect(reqwest::redirect::Policy::none());
    if url.starts_with("https://") {
        client = client.tls_backend_preconfigured(crate::plugins::outbound::tls_config(
            config.ca_file.as_deref(),
        )?);
    }
    crate::install_tls_provider();
    let client = client
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
    let mut transport_config = StreamableHttpClientTransportConfig::with_uri(url.to_owned());
    transport_config.custom_headers = headers;
    transport_config.max_concurrent_requests = config.max_concurrent_calls.max(1) + 1;
    Ok(StreamableHttpClientTransport::with_client(
        client,
        transport_config,
    ))
}

/// An error with the causes under it (`error sending request: ... : invalid
/// peer certificate: UnknownIssuer`): the top line alone seldom says what
/// to fix.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(error) = cause {
        let line = error.to_string();
        if !text.contains(&line) {
            text = format!("{text}: {line}");
        }
        cause = error.source();
    }
    text
}

/// Why TLS with an https server fails, if it does: rmcp keeps only the top
/// line of a failed request, so the handshake is tried once more on its own
/// to tell the operator (an untrusted certificate, most often).
async fn tls_problem(config: &ServerConfig, url: &str) -> Option<String> {
    if !url.starts_with("https://") {
        return None;
    }
    let parsed = reqwest::Url::parse(url).ok()?;
    let host = parsed.host_str()?.trim_matches(['[', ']']).to_owned();
    let port = parsed.port_or_known_default()?;
    let name = rustls::pki_types::ServerName::try_from(host.clone()).ok()?;
    let tls = crate::plugins::outbound::tls_config(config.ca_file.as_deref()).ok()?;
    let limit = Duration::from_secs(5);
    let stream = tokio::time::timeout(limit, tokio::net::TcpStream::connect((host, port)))
        .await
        .ok()?
        .ok()?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    match tokio::time::timeout(limit, connector.connect(name, stream)).await {
        Ok(Err(error)) => {
            let error = error.to_string();
            Some(if error.contains("UnknownIssuer") {
                format!(
                    "{error} (no trusted authority signed the server's certificate; if a \
                     private CA did, name its certificate in this server's ca_file)"
                )
            } else {
                error
            })
        }
        _ => None,
    }
}

/// The server's tools that the operator offers, by catalog name, with their
/// input schemas compiled.
async fn list_tools(
    config: &ServerConfig,
    peer: &Peer<RoleClient>,
) -> Result<BTreeMap<String, Tool>, String> {
    let listed = peer
        .list_all_tools()
        .await
        .map_err(|e| format!("tools/list failed: {e}"))?;
    let mut tools = BTreeMap::new();
    for tool in listed {
        if !config.offers(&tool.name) {
            continue;
        }
        let name = namespaced(&config.name, &tool.name);
        let schema = Value::Object((*tool.input_schema).clone());
        let validator = match jsonschema::validator_for(&schema) {
            Ok(validator) => Some(Arc::new(validator)),
            Err(error) => {
                tracing::warn!(server = %config.name, tool = %tool.name, %error, "the tool's input schema does not compile; its input is not checked");
                None
            }
        };
        tools.insert(
            name.clone(),
            Tool {
                original: tool.name.to_string(),
                spec: Arc::new(ToolSpec {
                    name,
                    description: tool
                        .description
                        .as_deref()
                        .or(tool.title.as_deref())
                        .unwrap_or_default()
                        .to_owned(),
                    input_schema: schema,
                }),
                validator,
            },
        );
    }
    Ok(tools)
}
