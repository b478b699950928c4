//! The plugin runtime: loads WebAssembly components from a folder, keeps one
//! pre-linked `InstancePre` per component, and runs each call in a fresh
//! `Store` under the plugin's limits.
//!
//! It knows nothing of tasks or the store: callers hand it neutral protocol
//! values and get protocol values (or a [`CallError`]) back.

pub mod bindings;
mod convert;
mod engine;
pub mod external;
mod folder_quota;
mod host_http;
mod llm_call;
pub mod manifest;
mod memory_host;
pub(crate) mod outbound;
pub mod policy;
mod registry;
mod state;
mod versions;
mod warm;

pub use versions::{OldVersion, RecordedVersions, TaskPluginNames, TaskPlugins};

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use wasmtime::component::{Linker, ResourceTableError};
use wasmtime::{Engine, Store, Trap, UpdateDeadline};

pub use engine::CacheUsage;
use engine::{CompileCache, EpochTicker};
pub use engine::{EngineOptions, build_engine};
pub use manifest::{Grants, Limits};
use registry::{AdapterEntry, Entry, PlannerEntry, Plugin, ToolEntry};
pub use registry::{Catalog, EXTERNAL_SEPARATOR, LoadFailure, LoadingFile, PluginInfo, PluginKind};
use state::CallState;

use crate::errors::Code;
use crate::memory::MemoryHandle;
use crate::protocol::{
    CallContext, ChatRequest, ChatResponse, LlmError, PlannerAction, TaskState, ToolSpec,
};
use crate::telemetry::TraceSpan;

/// Extra wall-clock time past a plugin's limit before its call is abandoned.
/// The epoch deadline stops running wasm; this stops a call stuck waiting on
/// the host (a sleep, a trickling request).
const WALL_CLOCK_GRACE: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    pub plugin_dir: PathBuf,
    /// Where compiled components are cached; `None` disables the cache.
    pub cache_dir: Option<PathBuf>,
    /// Limits for plugins whose manifest does not ask for others.
    pub default_limits: Limits,
    /// What the operator lets plugins be granted.
    pub policy: policy::OperatorPolicy,
    pub engine: EngineOptions,
    /// How many plugin calls may compute at once (run wasm rather than wait
    /// on the network); more wait their turn.
    pub concurrent_calls: usize,
    /// Environment variables that configure the server itself (its
    /// database URL, say): never granted to a plugin.
    pub server_env: Vec<String>,
    /// The server's own folders (data, compile cache): no folder grant may
    /// contain them or lead into them.
    pub server_dirs: Vec<PathBuf>,
    /// The longest a plugin may take to load (compiling it and its
    /// `describe` call), whatever its manifest asks.
    pub max_load_time: Duration,
    /// How many replaced or removed versions of one plugin stay loaded for
    /// the tasks still running on them; past it the oldest is released and
    /// its tasks move to the loaded version.
    pub max_old_versions: usize,
    /// How many compiled components of versions no longer loaded the compile
    /// cache keeps (the most recently used), beside those loaded.
    pub compile_cache_history: usize,
    /// How long a task waits for a plugin it names that is not loaded (removed,
    /// or being replaced) before it fails.
    pub missing_plugin_grace: Duration,
    /// Whether each tenant's calls get writable folders of their own
    /// (`<folder>/tenants/<tenant>`): on when authentication is, so that
    /// nothing one tenant's task writes is seen by another's.
    pub separate_tenants: bool,
    /// How long the host gathers a provider's streamed events before a
    /// translating adapter reads them (see [`stream_batch_window`]).
    pub stream_batch_window: Duration,
}

/// The window in which a stream's events are gathered into one batch for a
/// translating adapter, given how long streamed text is gathered before it
/// is journaled (`[events] delta_interval`): half of it, so that a batch's
/// text is journaled within about one interval and a watcher sees the same
/// pieces, while a stream costs an instance per batch rather than per event.
pub fn stream_batch_window(delta_interval: Duration) -> Duration {
    (delta_interval / 2).max(Duration::from_millis(1))
}

/// The default for [`RuntimeOptions::concurrent_calls`]: two per core, so
/// a call waiting on a host function does not leave a core idle.
pub fn default_concurrent_calls() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()) * 2
}

/// Why a plugin call failed. Each variant has a stable [`code`](Self::code).
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    #[error("no {kind} plugin named {name:?} is loaded")]
    NotLoaded { kind: PluginKind, name: String },
    #[error("no loaded plugin offers a tool named {0:?}")]
    UnknownTool(String),
    #[error("plugin {plugin} ran past its time limit of {limit:?}")]
    Timeout { plugin: String, limit: Duration },
    #[error("plugin {plugin} ran out of memory: it may use at most {limit_mib} MiB")]
    MemoryLimit { plugin: String, limit_mib: u64 },
    #[error("plugin {plugin} overflowed its stack (recursion too deep?)")]
    StackOverflow { plugin: String },
    #[error("plugin {plugin} crashed: {detail}")]
    Trap { plugin: String, detail: String },
    #[error("plugin {plugin} returned {size} bytes, over its output limit of {limit} bytes")]
    OutputTooLarge {
        plugin: String,
        size: u64,
        limit: u64,
    },
    #[error(
        "planner {plugin} asked for {count} tool calls in one action, over its limit of {limit} \
         (the manifest's [limits] max_tool_calls)"
    )]
    TooManyToolCalls {
        plugin: String,
        count: u64,
        limit: u64,
    },
    #[error(
        "plugin {plugin} held more than {limit} resources at once (files, streams, HTTP \
         fields and requests; the manifest's [limits] max_resources)"
    )]
    ResourceLimit { plugin: String, limit: u64 },
    #[error(
        "plugin {plugin} put more into one set of HTTP header fields than its limit of {limit} \
         bytes (the manifest's [limits] max_http_fields_bytes)"
    )]
    HttpFieldsLimit { plugin: String, limit: u64 },
    #[error(
        "plugin {plugin} was refused a write: its writable folders would hold more than \
         {max_bytes} bytes or {max_files} entries (the manifest's [limits] max_folder_bytes and \
         max_folder_files); delete what it no longer needs, or raise the limits"
    )]
    FolderQuota {
        plugin: String,
        max_bytes: u64,
        max_files: u64,
    },
    #[error("plugin {plugin} returned an invalid result: {detail}")]
    BadOutput { plugin: String, detail: String },
    #[error("could not start plugin {plugin}: {detail}")]
    Instantiate { plugin: String, detail: String },
    #[error("the input for tool {tool} is invalid: {detail}")]
    InvalidInput { tool: String, detail: String },
    /// The tool ran and reported an error of its own.
    #[error("{message}")]
    Tool { code: String, message: String },
    /// The LLM adapter ran and reported an error from its provider.
    #[error("{}", .0.message)]
    Llm(LlmError),
    /// The adapter refused the request before sending it: an option out of
    /// the provider's range, or a request its format cannot express.
    #[error("{}", .0.message)]
    LlmOptions(LlmError),
    #[error("planner {plugin} reported an error: {message}")]
    Planner { plugin: String, message: String },
    /// A task's plugin or tool was still missing when its wait ended.
    #[error(
        "{what} is not loaded, after waiting {grace} for it (plugins.missing_plugin_grace): put \
         its file back in the plugin folder, or submit the task again naming a loaded one"
    )]
    StillMissing {
        what: String,
        tool: bool,
        grace: String,
    },
    /// An adapter asked for something its manifest does not provide.
    #[error("LLM adapter {plugin} cannot be used as configured: {detail}")]
    AdapterConfig { plugin: String, detail: String },
}

impl CallError {
    /// A stable, documented code for clients and the step journal.
    pub fn code(&self) -> &str {
        let code = match self {
            Self::NotLoaded { .. } => Code::PluginNotLoaded,
            Self::UnknownTool(_) | Self::StillMissing { tool: true, .. } => Code::UnknownTool,
            Self::StillMissing { tool: false, .. } => Code::PluginNotLoaded,
            Self::Timeout { .. } => Code::PluginTimeout,
            Self::MemoryLimit { .. } => Code::PluginMemoryLimit,
            Self::StackOverflow { .. } => Code::PluginStackOverflow,
            Self::Trap { .. } => Code::PluginTrap,
            Self::OutputTooLarge { .. } | Self::TooManyToolCalls { .. } => {
                Code::PluginOutputTooLarge
            }
            Self::ResourceLimit { .. } | Self::HttpFieldsLimit { .. } => Code::PluginResourceLimit,
            Self::FolderQuota { .. } => Code::PluginFolderQuota,
            Self::BadOutput { .. } => Code::PluginBadOutput,
            Self::Instantiate { .. } => Code::PluginInstantiateFailed,
            Self::InvalidInput { .. } => Code::InvalidToolInput,
            Self::Tool { code, .. } => return code,
            Self::Llm(error) => error.kind.code(),
            Self::LlmOptions(_) => Code::InvalidLlmOptions,
            Self::Planner { .. } => Code::PlannerError,
            Self::AdapterConfig { .. } => Code::LlmAdapterMisconfigured,
        };
        code.as_str()
    }
}

/// A call for a kind of plugin the task holds none of: the task was
/// started without naming one.
fn not_held(kind: PluginKind) -> CallError {
    CallError::NotLoaded {
        kind,
        name: String::new(),
    }
}

/// Times a call of `plugin` for `opspawn_plugin_call_duration_seconds`.
fn record_call<T>(plugin: &Plugin, result: &Result<T, CallError>, started: Instant) {
    let labels = &plugin.labels;
    let kind = plugin.info.kind.as_str();
    let elapsed = started.elapsed();
    if result.is_ok() {
        labels.ok_calls.record(elapsed, || {
            crate::metrics::plugin_calls(labels.metric_label.clone(), kind, "ok")
        });
    } else {
        crate::metrics::plugin_calls(labels.metric_label.clone(), kind, call_outcome(result))
            .record(elapsed);
    }
}

/// A call's outcome as a metric label: `ok`, or its error's code.
fn call_outcome<T>(result: &Result<T, CallError>) -> &'static str {
    crate::metrics::outcome_label(&result.as_ref().map_err(CallError::code))
}

pub struct PluginRuntime {
    engine: Engine,
    linker: Linker<CallState>,
    cache: Arc<CompileCache>,
    options: RuntimeOptions,
    catalog: RwLock<Arc<Catalog>>,
    slots: CallSlots,
    /// Connections for the requests the host sends for translating adapters.
    http: host_http::ConnectionPool,
    /// Where this server listens: refused as an outbound destination unless
    /// the operator allows a plugin to reach it.
    server_addresses: Arc<outbound::ServerAddresses>,
    /// One scan of the folder at a time.
    scan_lock: tokio::sync::Mutex<()>,
    /// The loads in flight; held while the catalog is changed.
    loads: std::sync::Mutex<registry::Loads>,
    /// How many files are loading; sent at every change of the catalog.
    loading_count: tokio::sync::watch::Sender<usize>,
    /// Replaced and removed versions that running tasks still use.
    old_versions: versions::OldVersions,
    /// What the compile cache held after it was last pruned.
    cache_usage: Arc<std::sync::Mutex<CacheUsage>>,
    /// The files whose failure was logged, with the version that failed, so
    /// a broken file is reported once, not at every scan.
    warned: std::sync::Mutex<std::collections::BTreeMap<PathBuf, String>>,
    /// What each plugin keeps in its writable folders, per tenant.
    folder_usages: folder_quota::FolderUsages,
    /// Instances of tools that ask for reuse, waiting for their next call.
    warm: Arc<warm::WarmInstances>,
    _epoch: EpochTicker,
}

/// What a plugin call waits for before it starts.
///
/// Every call holds one of the engine's instance slots while its instance
/// lives, so the pool is never asked for more than it has: at the bound a
/// call waits its turn (the semaphores are fair) instead of failing. Calls
/// that compute also hold a compute slot, bounding how many run at once to a
/// few per core. Calls that mostly wait on the network (tools granted
/// outbound hosts, 0.1 adapters calling their provider themselves) hold an
/// instance slot only, so they cannot starve computing calls.
struct CallSlots {
    instances: Arc<Semaphore>,
    compute: Arc<Semaphore>,
}

/// Which slots a call takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotKind {
    Compute,
    NetworkBound,
}

impl CallSlots {
    /// A compute slot, for a call that computes; none for one that mostly
    /// waits on the network. Taken before the instance slot: a call waiting
    /// for a core holds no instance.
    async fn compute(&self, kind: SlotKind) -> Option<OwnedSemaphorePermit> {
        match kind {
            SlotKind::Compute => Some(
                self.compute
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("the compute semaphore is never closed"),
            ),
            SlotKind::NetworkBound => None,
        }
    }

    async fn instance(&self) -> OwnedSemaphorePermit {
        self.instances
            .clone()
            .acquire_owned()
            .await
            .expect("the instance semaphore is never closed")
    }
}

impl PluginRuntime {
    pub fn new(options: RuntimeOptions) -> wasmtime::Result<Arc<Self>> {
        let engine = engine::build_engine(&options.engine)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        folder_quota::add_to_linker(&mut linker)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
        type Data = wasmtime::component::HasSelf<CallState>;
        bindings::v0_1::logging::add_to_linker::<CallState, Data>(&mut linker, |state| state)?;
        bindings::v0_1::llm_stream::add_to_linker::<CallState, Data>(&mut linker, |state| state)?;
        bindings::v0_2::logging::add_to_linker::<CallState, Data>(&mut linker, |state| state)?;
        bindings::v0_2::memory::add_to_linker::<CallState, Data>(&mut linker, |state| state)?;
        let cache = Arc::new(CompileCache::new(&engine, options.cache_dir.clone()));
        let warm = warm::WarmInstances::new(options.engine.max_idle_instances as usize);
        let slots = CallSlots {
            instances: Arc::new(Semaphore::new(options.engine.max_instances as usize)),
            compute: Arc::new(Semaphore::new(options.concurrent_calls.max(1))),
        };
        Ok(Arc::new(Self {
            _epoch: EpochTicker::start(engine.clone()),
            engine,
            linker,
            cache,
            options,
            catalog: RwLock::new(Arc::new(Catalog::default())),
            slots,
            http: host_http::ConnectionPool::default(),
            server_addresses: Arc::default(),
            scan_lock: tokio::sync::Mutex::new(()),
            loads: std::sync::Mutex::default(),
            loading_count: tokio::sync::watch::Sender::new(0),
            old_versions: versions::OldVersions::default(),
            cache_usage: Arc::default(),
            warned: std::sync::Mutex::default(),
            folder_usages: folder_quota::FolderUsages::default(),
            warm,
        }))
    }

    pub fn plugin_dir(&self) -> &Path {
        &self.options.plugin_dir
    }

    /// Tells the runtime where this server listens, so that plugins cannot
    /// send requests to it (unless the operator's policy allows them).
    pub fn set_server_addresses(&self, addresses: Vec<std::net::SocketAddr>) {
        self.server_addresses.set(addresses);
    }

    /// What is loaded now, and what failed to load.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog.read().expect("catalog lock").clone()
    }

    /// Whether the version of the plugin offering `tool` that the task runs
    /// on asks, in its manifest's `[[approvals]]`, for a person's approval
    /// of this call. Tools of external sources have no manifest: only the
    /// operator's rules cover them.
    pub fn tool_asks_approval(&self, plugins: &TaskPlugins, tool: &str, arguments: &Value) -> bool {
        plugins.tool(tool, || self.catalog()).is_some_and(|plugin| {
            plugin
                .info
                .approvals
                .iter()
                .any(|rule| rule.matches(tool, arguments))
        })
    }

    /// The versions a task runs on, and its tools' specs, once what it
    /// names is loaded. While plugins are loading (at a start, or a file
    /// being replaced) and for [`RuntimeOptions::missing_plugin_grace`]
    /// after, a plugin that is missing is waited for rather than failed: a
    /// task resumed at start-up must find its plugins, and a queued task
    /// must not fail because its plugin is being swapped.
    pub async fn hold_task_plugins(
        &self,
        names: TaskPluginNames<'_>,
        recorded: &RecordedVersions,
    ) -> Result<(TaskPlugins, Vec<Arc<ToolSpec>>), CallError> {
        let grace_ends = tokio::time::Instant::now() + self.options.missing_plugin_grace;
        let mut changes = self.loading_count.subscribe();
        loop {
            let still_loading =
                *changes.borrow_and_update() > 0 || self.catalog().external_starting();
            let catalog = self.catalog();
            let missing = match TaskPlugins::hold(&catalog, &self.old_versions, names, recorded) {
                Ok(plugins) => {
                    let specs = names
                        .tools
                        .iter()
                        .map(|tool| {
                            catalog
                                .tool_spec(tool)
                                .cloned()
                                .ok_or_else(|| CallError::UnknownTool(tool.clone()))
                        })
                        .collect::<Result<_, _>>()?;
                    return Ok((plugins, specs));
                }
                Err(missing) => missing,
            };
            let waited = if still_loading {
                changes.changed().await.is_ok()
            } else {
                tokio::time::timeout_at(grace_ends, changes.changed())
                    .await
                    .is_ok_and(|changed| changed.is_ok())
            };
            if !waited {
                let grace = humantime::format_duration(self.options.missing_plugin_grace);
                let (what, tool) = match missing {
                    versions::Missing::Plugin { kind, name } => {
                        (format!("{kind} plugin {name:?}"), false)
                    }
                    versions::Missing::Tool(tool) => (format!("tool {tool:?}"), true),
                };
                return Err(CallError::StillMissing {
                    what,
                    tool,
                    grace: grace.to_string(),
                });
            }
        }
    }

    /// The versions behind a step a task is about to take: of `plugin`
    /// (if a component) and of the task's planner, as its next call will
    /// find them.
    pub fn step_versions(
        &self,
        plugins: &TaskPlugins,
        plugin: &str,
    ) -> (Option<String>, Option<String>) {
        (
            plugins.sha256(plugin, || self.catalog()),
            plugins.planner_sha256(|| self.catalog()),
        )
    }

    /// The replaced and removed plugin versions that running tasks still use.
    pub fn old_versions_in_use(&self) -> Vec<OldVersion> {
        self.old_versions.in_use()
    }

    /// What the compile cache held after it was last pruned (once the loads
    /// of a scan have finished).
    pub fn compile_cache_usage(&self) -> CacheUsage {
        *self.cache_usage.lock().expect("cache usage lock")
    }

    /// The tenant whose writable folders a call sees, when tenants are
    /// separated.
    fn tenant_of<'a>(&self, tenant: Option<&'a str>) -> Option<&'a str> {
        tenant.filter(|_| self.options.separate_tenants)
    }

    /// Runs a tool with a JSON object as input; its span goes under `trace`.
    pub async fn invoke_tool(
        &self,
        plugins: &TaskPlugins,
        tool: &str,
        context: &CallContext,
        input: &Value,
        trace: &TraceSpan,
    ) -> Result<Value, CallError> {
        let started = Instant::now();
        let Some(plugin) = plugins.tool(tool, || self.catalog()) else {
            // An MCP server's tool: its source runs it (and checks its input).
            let catalog = self.catalog();
            let result = match catalog.external_tool(tool) {
                Some(external) => external.invoker.invoke(tool, context, input).await,
                None => Err(CallError::UnknownTool(tool.to_owned())),
            };
            let source = catalog.tool_owner(tool).unwrap_or("unknown");
            let kind = PluginKind::Tool.as_str();
            crate::metrics::plugin_calls(source.to_owned(), kind, call_outcome(&result))
                .record(started.elapsed());
            return result;
        };
        let result = self
            .invoke_tool_unmetered(&plugin, tool, context, input, trace)
            .await;
        record_call(&plugin, &result, started);
        result
    }

    async fn invoke_tool_unmetered(
        &self,
        plugin: &Arc<Plugin>,
        tool: &str,
        context: &CallContext,
        input: &Value,
        trace: &TraceSpan,
    ) -> Result<Value, CallError> {
        let Entry::Tool(entry) = &plugin.entry else {
            unreachable!("the catalog maps tools to tool plugins")
        };
        check_tool_input(tool, plugin.validators.get(tool).map(|v| &**v), input)?;
        let input = input.to_string();
        let tenant = context.tenant.as_deref();
        let memory = context.memory.clone();
        // A tool granted the network may spend its call waiting on it.
        let kind = if plugin.info.grants.outbound_hosts.is_empty() {
            SlotKind::Compute
        } else {
            SlotKind::NetworkBound
        };
        let warm = self.warm_key(plugin, tenant, &context.task_id);
        let outcome = match entry {
            ToolEntry::V0_1(pre) => {
                let context = convert::v0_1::context_to_wit(context);
                self.call_reusing(
                    plugin,
                    kind,
                    tenant,
                    warm,
                    None,
                    memory.clone(),
                    trace,
                    async |store| pre.instantiate_async(store).await,
                    async |store, instance: &bindings::v0_1::tool::Tool| {
                        let tools = instance.opspawn_plugin_tools();
                        let result = tools.call_invoke(store, &context, tool, &input).await?;
                        Ok(result.map_err(|e| (e.code, e.message)))
                    },
                )
                .await?
            }
            ToolEntry::V0_2(pre) => {
                let context = convert::v0_2::context_to_wit(context);
                self.call_reusing(
                    plugin,
                    kind,
                    tenant,
                    warm,
                    None,
                    memory.clone(),
                    trace,
                    async |store| pre.instantiate_async(store).await,
                    async |store, instance: &bindings::v0_2::tool::Tool| {
                        let tools = instance.opspawn_plugin_tools();
                        let result = tools.call_invoke(store, &context, tool, &input).await?;
                        Ok(result.map_err(|e| (e.code, e.message)))
                    },
                )
                .await?
            }
        };
        match outcome {
            Ok(output) => {
                check_output_size(plugin, output.len())?;
                serde_json::from_str(&output).map_err(|e| CallError::BadOutput {
                    plugin: plugin.info.name.clone(),
                    detail: format!("tool {tool} returned text that is not JSON: {e}"),
                })
            }
            Err((code, message)) => {
                // A tool's error goes into the journal as its output would.
                check_output_size(plugin, code.len() + message.len())?;
                Err(CallError::Tool { code, message })
            }
        }
    }

    /// Asks a planner for the next action; its span goes under `trace`.
    pub async fn next_action(
        &self,
        plugins: &TaskPlugins,
        state: &TaskState<'_>,
        trace: &TraceSpan,
    ) -> Result<PlannerAction, CallError> {
        let plugin = plugins
            .planner(|| self.catalog())
            .ok_or_else(|| not_held(PluginKind::Planner))?;
        let started = Instant::now();
        let result = self.next_action_unmetered(&plugin, state, trace).await;
        record_call(&plugin, &result, started);
        result
    }

    async fn next_action_unmetered(
        &self,
        plugin: &Arc<Plugin>,
        state: &TaskState<'_>,
        trace: &TraceSpan,
    ) -> Result<PlannerAction, CallError> {
        let Entry::Planner(entry) = &plugin.entry else {
            unreachable!("kind checked above")
        };
        let max_calls = plugin.info.limits.max_tool_calls;
        let tenant = state.tenant;
        let memory = state.memory.clone();
        let warm = self.warm_key(plugin, tenant, state.task_id);
        let outcome = match entry {
            PlannerEntry::V0_1(pre) => {
                let wit_state = convert::v0_1::state_to_wit(state);
                self.call_reusing(
                    plugin,
                    SlotKind::Compute,
                    tenant,
                    warm,
                    None,
                    memory.clone(),
                    trace,
                    async |store| pre.instantiate_async(store).await,
                    async |store, instance: &bindings::v0_1::planner::Planner| {
                        let planning = instance.opspawn_plugin_planning();
                        let action = planning.call_next_action(store, &wit_state).await?;
                        Ok(action.map(|a| convert::v0_1::action_from_wit_bounded(a, max_calls)))
                    },
                )
                .await?
            }
            PlannerEntry::V0_2(pre) => {
                let wit_state = convert::v0_2::state_to_wit(state);
                self.call_reusing(
                    plugin,
                    SlotKind::Compute,
                    tenant,
                    warm,
                    None,
                    memory.clone(),
                    trace,
                    async |store| pre.instantiate_async(store).await,
                    async |store, instance: &bindings::v0_2::planner::Planner| {
                        let planning = instance.opspawn_plugin_planning();
                        let action = planning.call_next_action(store, &wit_state).await?;
                        Ok(action.map(|a| convert::v0_2::action_from_wit_bounded(a, max_calls)))
                    },
                )
                .await?
            }
        };
        let action = outcome
            .map_err(|message| CallError::Planner {
                plugin: plugin.info.name.clone(),
                message: bounded_text(message, plugin.info.limits.max_output_bytes),
            })?
            .map_err(|count| CallError::TooManyToolCalls {
                plugin: plugin.info.name.clone(),
                count: count as u64,
                limit: max_calls,
            })?;
        // The action goes into the journal (an LLM request as a step's
        // input, each tool call as one), so it is output like any other.
        check_output_size(plugin, convert::json_size(&action))?;
        Ok(action)
    }

    /// Sends a chat request through an LLM adapter, giving up at `deadline`.
    /// Text is sent to `deltas` as it arrives. The adapter's spans go under
    /// `trace`.
    ///
    /// A translating (0.2) adapter holds an instance only while it
    /// translates; the host performs the HTTP exchange in between. A 0.1
    /// adapter makes the call itself and holds its instance throughout.
    pub async fn complete(
        &self,
        plugins: &TaskPlugins,
        context: &CallContext,
        request: &ChatRequest,
        deltas: Option<mpsc::UnboundedSender<String>>,
        deadline: Instant,
        trace: &TraceSpan,
    ) -> Result<ChatResponse, CallError> {
        let plugin = plugins
            .adapter(|| self.catalog())
            .ok_or_else(|| not_held(PluginKind::LlmAdapter))?;
        let started = Instant::now();
        let result = self
            .complete_unmetered(&plugin, context, request, deltas, deadline, trace)
            .await;
        record_call(&plugin, &result, started);
        result
    }

    async fn complete_unmetered(
        &self,
        plugin: &Arc<Plugin>,
        context: &CallContext,
        request: &ChatRequest,
        deltas: Option<mpsc::UnboundedSender<String>>,
        deadline: Instant,
        trace: &TraceSpan,
    ) -> Result<ChatResponse, CallError> {
        let Entry::LlmAdapter(entry) = &plugin.entry else {
            unreachable!("kind checked above")
        };
        let tenant = context.tenant.as_deref();
        let outcome = async {
            Ok(match entry {
                AdapterEntry::Translating(pre) => {
                    let call = llm_call::TranslatedCall {
                        runtime: self,
                        plugin,
                        pre,
                        warm: self.warm_key(plugin, tenant, &context.task_id),
                        tenant,
                        deltas: deltas.as_ref(),
                        deadline,
                        trace,
                        delta_budget: std::sync::Mutex::new(state::Budget::new(
                            plugin.info.limits.max_deltas,
                            plugin.info.limits.max_output_bytes,
                        )),
                    };
                    call.run(context, request).await?
                }
                AdapterEntry::Calling(pre) => {
                    let warm = self.warm_key(plugin, tenant, &context.task_id);
                    let context = convert::v0_1::context_to_wit(context);
                    let request = convert::v0_1::request_to_wit(request);
                    let call = self.call_reusing(
                        plugin,
                        SlotKind::NetworkBound,
                        tenant,
                        warm,
                        deltas,
                        MemoryHandle::default(),
                        trace,
                        async |store| pre.instantiate_async(store).await,
                        async |store, instance: &bindings::v0_1::llm_adapter::LlmAdapter| {
                            let chat = instance.opspawn_plugin_chat();
                            let response = chat.call_complete(store, &context, &request).await?;
                            Ok(response
                                .map(convert::v0_1::response_from_wit)
                                .map_err(convert::v0_1::llm_error_from_wit))
                        },
                    );
                    // Boxed: a translating adapter's call, far more common,
                    // is not sized by this one.
                    match tokio::time::timeout_at(deadline.into(), Box::pin(call)).await {
                        Ok(result) => result?.map_err(CallError::Llm)?,
                        Err(_) => return Err(llm_timeout(plugin)),
                    }
                }
            })
        }
        .await;
        let response = outcome.map_err(|error| match error {
            // The provider's answer goes into the journal with the error.
            CallError::Llm(mut error) => {
                let limit = plugin.info.limits.max_output_bytes;
                error.message = bounded_text(error.message, limit);
                error.body = error.body.map(|body| bounded_text(body, limit));
                CallError::Llm(error)
            }
            other => other,
        })?;
        // The whole reply goes into the journal: ids and names count too.
        check_output_size(plugin, convert::json_size(&response))?;
        Ok(response)
    }

    /// Runs one call of `plugin` in a fresh store, once the slots it needs
    /// are free, under the plugin's limits. Its span goes under `trace`, or
    /// is a root when `trace` is none.
    #[allow(clippy::too_many_arguments)]
    async fn call<T>(
        &self,
        plugin: &Plugin,
        kind: SlotKind,
        tenant: Option<&str>,
        deltas: Option<mpsc::UnboundedSender<String>>,
        memory: MemoryHandle,
        trace: &TraceSpan,
        call: impl AsyncFnOnce(&mut Store<CallState>) -> wasmtime::Result<T>,
    ) -> Result<T, CallError> {
        let span = call_span(plugin, trace);
        let result = async {
            let _compute = self.slots.compute(kind).await;
            let _instance = self.slots.instance().await;
            let mut store = self.new_store(plugin, self.tenant_of(tenant), deltas, memory)?;
            let outcome = guarded(plugin, call(&mut store)).await;
            settle(plugin, &store, outcome)
        }
        .await;
        record_span_error(&span, &result);
        result
    }

    /// The warm-instance key of a call of `plugin` for `task` of `tenant`,
    /// with the plugin's reuse rules, when its manifest asks for reuse and
    /// the host keeps idle instances at all.
    fn warm_key(
        &self,
        plugin: &Arc<Plugin>,
        tenant: Option<&str>,
        task: &str,
    ) -> Option<(warm::WarmKey, manifest::InstanceReuse)> {
        let reuse = plugin
            .info
            .instance_reuse
            .filter(|_| self.options.engine.max_idle_instances > 0)?;
        Some((warm::WarmKey::of(plugin, &reuse, tenant, task), reuse))
    }

    /// [`PluginRuntime::call`] for a plugin whose instances may be reused
    /// (`warm`: the call's key and the plugin's reuse rules): the call takes
    /// a warm instance when one waits under its key, and `instantiate`s
    /// otherwise; after a call that ended well the instance waits for the
    /// next one, and after any failure it is dropped.
    #[allow(clippy::too_many_arguments)]
    async fn call_reusing<E: Send + 'static, T>(
        &self,
        plugin: &Arc<Plugin>,
        kind: SlotKind,
        tenant: Option<&str>,
        warm: Option<(warm::WarmKey, manifest::InstanceReuse)>,
        deltas: Option<mpsc::UnboundedSender<String>>,
        memory: MemoryHandle,
        trace: &TraceSpan,
        instantiate: impl AsyncFnOnce(&mut Store<CallState>) -> wasmtime::Result<E>,
        call: impl AsyncFnOnce(&mut Store<CallState>, &E) -> wasmtime::Result<T>,
    ) -> Result<T, CallError> {
        let span = call_span(plugin, trace);
        let result = async {
            let _compute = self.slots.compute(kind).await;
            // A key's instances are all of one plugin version, so their
            // exports are all of one type.
            let reused = warm
                .as_ref()
                .and_then(|(key, _)| self.warm.take(key))
                .and_then(|idle| {
                    let (store, exports, slot, calls) = idle.into_parts();
                    Some((store, exports.downcast::<E>().ok()?, slot, calls))
                });
            let (mut store, exports, slot, calls) = match reused {
                Some((mut store, exports, slot, calls)) => {
                    store
                        .data_mut()
                        .begin_reuse(&plugin.info.limits, memory, deltas);
                    arm_deadline(&mut store, plugin.info.limits.call_timeout);
                    (store, Some(exports), slot, calls)
                }
                None => {
                    let slot = self.slots.instance().await;
                    let store = self.new_store(plugin, self.tenant_of(tenant), deltas, memory)?;
                    (store, None, slot, 0)
                }
            };
            let outcome = guarded(plugin, async {
                let exports = match exports {
                    Some(exports) => exports,
                    None => Box::new(instantiate(&mut store).await?),
                };
                let value = call(&mut store, &exports).await?;
                Ok((value, exports))
            })
            .await;
            let (outcome, exports) = match outcome {
                Ok((value, exports)) => (Ok(value), Some(exports)),
                Err(stopped) => (Err(stopped), None),
            };
            let result = settle(plugin, &store, outcome);
            if let (Ok(_), Some(exports), Some((key, reuse))) = (&result, exports, warm)
                && calls + 1 < reuse.max_calls
            {
                store.data_mut().end_reused_call();
                let idle = warm::Idle::new(
                    store,
                    exports,
                    slot,
                    calls + 1,
                    plugin.clone(),
                    reuse.max_idle,
                );
                self.warm.keep(key, idle);
            }
            result
        }
        .await;
        record_span_error(&span, &result);
        result
    }

    /// A fresh store for one call, limited as the plugin's manifest says.
    fn new_store(
        &self,
        plugin: &Plugin,
        tenant: Option<&str>,
        deltas: Option<mpsc::UnboundedSender<String>>,
        memory: MemoryHandle,
    ) -> Result<Store<CallState>, CallError> {
        let state = CallState::new(
            plugin.info.name.as_str().into(),
            &plugin.info.grants,
            &plugin.info.limits,
            tenant,
            deltas,
            &self.folder_usages,
            memory,
        )
        .map_err(|e| CallError::Instantiate {
            plugin: plugin.info.name.clone(),
            detail: format!("{e:#}"),
        })?;
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limiter);
        arm_deadline(&mut store, plugin.info.limits.call_timeout);
        Ok(store)
    }
}

/// Stops the store's wasm once `limit` has passed from now, yielding at
/// every epoch tick meanwhile so one busy plugin cannot starve the
/// runtime's other tasks.
fn arm_deadline(store: &mut Store<CallState>, limit: Duration) {
    let deadline = Instant::now() + limit;
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |_| {
        Ok(if Instant::now() >= deadline {
            UpdateDeadline::Interrupt
        } else {
            UpdateDeadline::Yield(1)
        })
    });
}

/// Marks a call's span as failed, with its error's code, when traces are on.
fn record_span_error<T>(span: &TraceSpan, result: &Result<T, CallError>) {
    if let Err(error) = result
        && span.is_recording()
    {
        span.set_error(error.to_string());
        span.set_attribute(KeyValue::new("error.type", error.code().to_owned()));
    }
}

/// The span of one call of `plugin` (waiting for its slots included), when
/// traces are on: the plugin's kind and name, and the SHA-256 of the
/// component that ran. Its parent is the step or task it is called for,
/// `trace`; a call for no task (describing a tool at load) is a root.
fn call_span(plugin: &Plugin, trace: &TraceSpan) -> TraceSpan {
    if !crate::telemetry::traces_on() {
        return TraceSpan::none();
    }
    let labels = &plugin.labels;
    trace.child_or_root(
        labels.span_name.clone(),
        SpanKind::Internal,
        labels.span_attributes.clone(),
    )
}

/// The error for an LLM call that ran out of its time.
fn llm_timeout(plugin: &Plugin) -> CallError {
    CallError::Llm(LlmError {
        kind: crate::protocol::LlmErrorKind::Timeout,
        message: format!(
            "the call to LLM adapter {} did not finish within its limit of {}, retries included \
             (the manifest's call_timeout_ms)",
            plugin.info.name,
            humantime::format_duration(plugin.info.limits.call_timeout)
        ),
        status: None,
        body: None,
        retry_after_ms: None,
    })
}

/// Why a guarded call did not produce a value.
enum Stopped {
    WallClock,
    Wasm(wasmtime::Error),
}

/// Runs a call under the plugin's wall-clock limit.
async fn guarded<T>(
    plugin: &Plugin,
    call: impl Future<Output = wasmtime::Result<T>>,
) -> Result<T, Stopped> {
    let limit = plugin.info.limits.call_timeout + WALL_CLOCK_GRACE;
    match tokio::time::timeout(limit, call).await {
        Err(_) => Err(Stopped::WallClock),
        Ok(result) => result.map_err(Stopped::Wasm),
    }
}

/// Turns how a call stopped into the error a user should see.
fn settle<T>(
    plugin: &Plugin,
    store: &Store<CallState>,
    outcome: Result<T, Stopped>,
) -> Result<T, CallError> {
    let name = plugin.info.name.clone();
    if store.data().crossed_folder_quota() {
        // However the plugin handled the refused write, what it meant to
        // keep is not all there.
        return Err(CallError::FolderQuota {
            plugin: name,
            max_bytes: plugin.info.limits.max_folder_bytes,
            max_files: plugin.info.limits.max_folder_files,
        });
    }
    let error = match outcome {
        Ok(value) => return Ok(value),
        Err(Stopped::WallClock) => {
            return Err(CallError::Timeout {
                plugin: name,
                limit: plugin.info.limits.call_timeout,
            });
        }
        Err(Stopped::Wasm(error)) => error,
    };
    if store.data().limiter.refused {
        return Err(CallError::MemoryLimit {
            plugin: name,
            limit_mib: plugin.info.limits.memory_bytes >> 20,
        });
    }
    if matches!(
        error.downcast_ref::<ResourceTableError>(),
        Some(ResourceTableError::Full)
    ) {
        return Err(CallError::ResourceLimit {
            plugin: name,
            limit: plugin.info.limits.max_resources,
        });
    }
    if matches!(
        error.downcast_ref::<wasmtime_wasi_http::FieldMapError>(),
        Some(
            wasmtime_wasi_http::FieldMapError::TotalSizeTooBig
                | wasmtime_wasi_http::FieldMapError::TooManyFields
        )
    ) {
        return Err(CallError::HttpFieldsLimit {
            plugin: name,
            limit: plugin.info.limits.max_http_fields_bytes,
        });
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => Err(CallError::Timeout {
            plugin: name,
            limit: plugin.info.limits.call_timeout,
        }),
        Some(Trap::StackOverflow) => Err(CallError::StackOverflow { plugin: name }),
        _ => {
            let printed = store.data().output_tail();
            let detail = if printed.is_empty() {
                format!("{error:#}")
            } else {
                format!("{error:#}; it printed: {printed}")
            };
            Err(CallError::Trap {
                plugin: name,
                detail,
            })
        }
    }
}

/// Checks a tool's input, here rather than in the tool, so a tool never
/// sees input its published schema rules out: it must be a JSON object, and
/// match the schema (the first five problems are named, with where).
pub(crate) fn check_tool_input(
    tool: &str,
    schema: Option<&jsonschema::Validator>,
    input: &Value,
) -> Result<(), CallError> {
    let invalid = |detail: String| CallError::InvalidInput {
        tool: tool.to_owned(),
        detail,
    };
    if !input.is_object() {
        return Err(invalid("the arguments must be a JSON object".into()));
    }
    let Some(schema) = schema else {
        return Ok(());
    };
    let problems: Vec<String> = schema
        .iter_errors(input)
        .take(5)
        .map(|e| match e.instance_path().to_string() {
            path if path.is_empty() => e.to_string(),
            path => format!("{path}: {e}"),
        })
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(invalid(problems.join("; ")))
    }
}

/// `text`, cut to at most `limit` bytes (at a character boundary) with a
/// note of how much was cut: for a plugin's or a provider's words that
/// explain a failure, which are kept, but only so much of them.
fn bounded_text(text: String, limit: u64) -> String {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    if text.len() <= limit {
        return text;
    }
    let end = (0..=limit)
        .rev()
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(0);
    format!(
        "{}… ({} more bytes cut: over the plugin's output limit)",
        &text[..end],
        text.len() - end
    )
}

fn check_output_size(plugin: &Plugin, size: usize) -> Result<(), CallError> {
    let limit = plugin.info.limits.max_output_bytes;
    if size as u64 > limit {
        return Err(CallError::OutputTooLarge {
            plugin: plugin.info.name.clone(),
            size: size as u64,
            limit,
        });
    }
    Ok(())
}

/// The part of [`PluginInfo`] shown for a kind: kebab-case names.
impl Serialize for PluginKind {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}
