//! The registry: which components are loaded from the plugin folder, what
//! each offers, and what failed to load and why.
//!
//! A scan of the folder starts a background load for each new file or new
//! version; each plugin joins the [`Catalog`] as soon as it has loaded. Every
//! change builds a new catalog and swaps it in whole, so a call in flight
//! keeps the plugin it started with. A file that is unchanged (same bytes,
//! same manifest) keeps its already-loaded plugin.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::time::{Duration, SystemTime};

use opentelemetry::KeyValue;
use serde::Serialize;
use sha2::{Digest, Sha256};
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, InstancePre};

use super::bindings::{self, WitVersion, v0_1, v0_2};
use super::external::{ExternalTool, ExternalTools};
use super::manifest::{FolderScope, Grants, InstanceReuse, Limits, Manifest};
use super::state::CallState;
use super::{PluginRuntime, SlotKind, convert};
use crate::approvals::ApprovalRule;
use crate::errors::Code;
use crate::memory::MemoryHandle;
use crate::protocol::ToolSpec;
use crate::telemetry::TraceSpan;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PluginKind {
    Tool,
    Planner,
    LlmAdapter,
}

impl PluginKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tool => "tool",
            Self::Planner => "planner",
            Self::LlmAdapter => "llm-adapter",
        }
    }

    /// The interface a component of this kind exports in `version`.
    fn export_interface(self, version: WitVersion) -> &'static str {
        match (self, version) {
            (Self::Tool, _) => "tools",
            (Self::Planner, _) => "planning",
            (Self::LlmAdapter, WitVersion::V0_1) => "chat",
            (Self::LlmAdapter, WitVersion::V0_2) => "translate",
        }
    }
}

impl fmt::Display for PluginKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// A loaded plugin as users see it in `GET /v1/plugins`.
#[derive(Debug, Clone, Serialize)]
pub struct PluginInfo {
    pub name: String,
    pub kind: PluginKind,
    /// The WIT package version the component was built against.
    pub wit_version: String,
    /// SHA-256 of the component's bytes: the same hash means the same code.
    pub sha256: String,
    pub file: PathBuf,
    pub size_bytes: u64,
    pub description: Option<String>,
    /// For tool plugins: the tools it offers, shared with every task that
    /// holds them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<Arc<ToolSpec>>,
    pub grants: Grants,
    pub limits: Limits,
    /// What the manifest asked for that the operator's policy refused.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<String>,
    /// For tools whose manifest asks for it (and the policy allows): how
    /// their instances serve more than one call. Absent: a fresh instance
    /// per call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_reuse: Option<InstanceReuse>,
    /// For tools: the manifest's `[[approvals]]`, its own calls that need a
    /// person's approval before they run.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub approvals: Vec<ApprovalRule>,
}

/// A file in the plugin folder that could not be loaded, and why: a stable
/// code (see `docs/api.md`) and a message.
#[derive(Debug, Clone, Serialize)]
pub struct LoadFailure {
    pub file: PathBuf,
    pub code: Code,
    pub error: String,
}

/// A loaded component, pre-linked for the WIT version it was built against.
pub(super) enum Entry {
    Tool(ToolEntry),
    Planner(PlannerEntry),
    LlmAdapter(AdapterEntry),
}

pub(super) enum ToolEntry {
    V0_1(v0_1::tool::ToolPre<CallState>),
    V0_2(v0_2::tool::ToolPre<CallState>),
}

pub(super) enum PlannerEntry {
    V0_1(v0_1::planner::PlannerPre<CallState>),
    V0_2(v0_2::planner::PlannerPre<CallState>),
}

pub(super) enum AdapterEntry {
    /// Performs its own HTTP through `wasi:http`, holding its instance
    /// while the provider answers.
    Calling(v0_1::llm_adapter::LlmAdapterPre<CallState>),
    /// Only translates; the host performs the exchange.
    Translating(v0_2::llm_adapter::LlmAdapterPre<CallState>),
}

pub struct Plugin {
    pub info: PluginInfo,
    pub entry: Entry,
    /// Compiled input schemas of the plugin's tools, by tool name.
    pub validators: BTreeMap<String, Arc<jsonschema::Validator>>,
    /// Hash of the manifest's bytes, to notice when only the manifest changed.
    manifest_sha256: Option<String>,
    /// The variables the manifest asked for that were withheld as secrets,
    /// to notice when another plugin's credential starts drawing on one.
    withheld_env: BTreeSet<String>,
    /// How long its file has held its names.
    standing: Standing,
    /// Tasks running on this version (`versions::TaskPlugins`).
    pub users: AtomicUsize,
    /// Set when this version, replaced or removed, was let go at the bound
    /// on old versions: the tasks still on it move to the loaded version.
    pub released: AtomicBool,
    /// How its calls are named in traces and metrics.
    pub labels: CallLabels,
}

/// How a plugin's calls are named in traces and metrics, made once at load:
/// a call then copies reference counts, not strings it formats anew.
pub struct CallLabels {
    /// `<kind> <name>`, the name of a call's span.
    pub span_name: String,
    /// A call span's attributes: the plugin's name, kind and SHA-256.
    pub span_attributes: Vec<KeyValue>,
    /// The plugin's name as a metric label.
    pub metric_label: metrics::SharedString,
    /// The histogram of its calls that ended well.
    pub ok_calls: crate::metrics::CachedHistogram,
}

impl CallLabels {
    fn new(name: &str, kind: PluginKind, sha256: &str) -> Self {
        let name: Arc<str> = name.into();
        Self {
            span_name: format!("{} {name}", kind.as_str()),
            span_attributes: vec![
                KeyValue::new("opspawn.plugin.name", name.clone()),
                KeyValue::new("opspawn.plugin.kind", kind.as_str()),
                KeyValue::new("opspawn.plugin.sha256", Arc::<str>::from(sha256)),
            ],
            metric_label: metrics::SharedString::from_shared(name),
            ok_calls: crate::metrics::CachedHistogram::new(),
        }
    }
}

/// Everything loaded from the plugin folder at one moment.
#[derive(Default)]
pub struct Catalog {
    plugins: BTreeMap<String, Arc<Plugin>>,
    /// Tool name to the plugin offering it.
    tools: BTreeMap<String, Arc<Plugin>>,
    failures: Vec<LoadFailure>,
    loading: Vec<LoadingFile>,
    /// Tools of external MCP servers, under names no component can take.
    external: Arc<ExternalTools>,
}

impl Catalog {
    pub fn plugins(&self) -> impl Iterator<Item = &PluginInfo> {
        self.plugins.values().map(|plugin| &plugin.info)
    }

    pub fn failures(&self) -> &[LoadFailure] {
        &self.failures
    }

    /// Files whose plugin is being loaded in the background.
    pub fn loading(&self) -> &[LoadingFile] {
        &self.loading
    }

    pub fn kind_of(&self, name: &str) -> Option<PluginKind> {
        self.plugins.get(name).map(|plugin| plugin.info.kind)
    }

    pub fn tool_names(&self) -> impl Iterator<Item = &str> {
        self.tools
            .keys()
            .map(String::as_str)
            .chain(self.external.names())
    }

    /// The name of the plugin (or external source, `mcp:<server>`) that
    /// offers a tool.
    pub fn tool_owner(&self, tool: &str) -> Option<&str> {
        match self.tools.get(tool) {
            Some(plugin) => Some(plugin.info.name.as_str()),
            None => self.external.get(tool).map(|t| t.source.as_str()),
        }
    }

    pub fn tool_spec(&self, name: &str) -> Option<&Arc<ToolSpec>> {
        let Some(plugin) = self.tools.get(name) else {
            return self.external.get(name).map(|tool| &tool.spec);
        };
        plugin.info.tools.iter().find(|spec| spec.name == name)
    }

    /// Whether an external source (an MCP server) is still making its first
    /// start, so a tool no one offers yet may still come.
    pub fn external_starting(&self) -> bool {
        self.external.starting()
    }

    /// The external tool of that name, if no component offers it.
    pub fn external_tool(&self, name: &str) -> Option<&ExternalTool> {
        self.external.get(name)
    }

    /// How the external tool sources (MCP servers) are doing, each in its
    /// own view.
    pub fn external_sources(&self) -> &[serde_json::Value] {
        self.external.sources()
    }

    pub(super) fn plugin(&self, name: &str) -> Option<Arc<Plugin>> {
        self.plugins.get(name).cloned()
    }

    pub(super) fn tool_plugin(&self, tool: &str) -> Option<Arc<Plugin>> {
        self.tools.get(tool).cloned()
    }

    /// The plugin loaded from `file`, if one is.
    fn plugin_from(&self, file: &Path) -> Option<Arc<Plugin>> {
        self.plugins
            .values()
            .find(|plugin| plugin.info.file == file)
            .cloned()
    }

    /// A copy to change: the same plugins, shared.
    fn shallow_clone(&self) -> Self {
        Self {
            plugins: self.plugins.clone(),
            tools: self.tools.clone(),
            failures: self.failures.clone(),
            loading: self.loading.clone(),
            external: self.external.clone(),
        }
    }

    /// Takes out the plugin loaded from `file`, with its tools.
    fn remove_file(&mut self, file: &Path) -> Option<Arc<Plugin>> {
        let plugin = self.plugin_from(file)?;
        self.plugins.remove(&plugin.info.name);
        self.tools.retain(|_, owner| !Arc::ptr_eq(owner, &plugin));
        Some(plugin)
    }

    /// Adds a plugin unless a plugin of longer standing holds its name or
    /// one of its tools' names. Plugins of shorter standing holding them
    /// (found by the same scan, but newer) are taken out and returned, each
    /// with the reason.
    fn admit(&mut self, plugin: Arc<Plugin>) -> Result<Vec<(Arc<Plugin>, String)>, String> {
        let name = &plugin.info.name;
        let rank = |p: &Plugin| (p.standing, p.info.file.clone());
        let mut rivals: Vec<(Arc<Plugin>, String)> = Vec::new();
        if let Some(holder) = self.plugins.get(name) {
            rivals.push((holder.clone(), format!("plugin name {name:?}")));
        }
        for spec in &plugin.info.tools {
            if let Some(owner) = self.tools.get(&spec.name) {
                rivals.push((owner.clone(), format!("tool {:?}", spec.name)));
            }
        }
        if let Some((holder, what)) = rivals
            .iter()
            .find(|(holder, _)| rank(holder) < rank(&plugin))
        {
            return Err(taken(what, holder));
        }
        let mut displaced = Vec::new();
        for (rival, what) in rivals {
            if self.remove_file(&rival.info.file).is_some() {
                let reason = taken(&what, &plugin);
                displaced.push((rival, reason));
            }
        }
        for spec in &plugin.info.tools {
            self.tools.insert(spec.name.clone(), plugin.clone());
        }
        self.plugins.insert(name.clone(), plugin);
        Ok(displaced)
    }
}

/// Why a plugin was refused: `what` (a plugin or tool name) is `holder`'s.
fn taken(what: &str, holder: &Plugin) -> String {
    let verb = if what.starts_with("tool") {
        "offered"
    } else {
        "held"
    };
    format!(
        "refused: {what} is already {verb} by plugin {:?} ({}); a name belongs to the plugin \
         whose file held it first, until that file is removed",
        holder.info.name,
        holder.info.file.display()
    )
}

/// `error`, noting that the version loaded before keeps serving, if one does.
fn keeps_serving(error: String, kept: Option<&Plugin>) -> String {
    match kept {
        Some(plugin) => format!(
            "{error}; the version loaded before (sha256 {}) keeps serving",
            &plugin.info.sha256[..12]
        ),
        None => error,
    }
}

/// What one scan of the folder found; loads it started finish later.
#[derive(Debug, Default)]
pub struct ScanReport {
    /// Files whose loading started (a new file or a new version).
    pub loading: Vec<PathBuf>,
    pub unchanged: usize,
    pub removed: Vec<String>,
    /// Files that could not even be read.
    pub failed: usize,
}

/// A file whose plugin is being loaded, as `GET /v1/plugins` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct LoadingFile {
    pub file: PathBuf,
    /// RFC 3339.
    pub started_at: String,
}

/// How long a file has held its names: when two plugins claim one name,
/// the one with the earlier standing keeps it. A new version of a file
/// inherits the standing of the version it replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Standing {
    /// The scan that first found the file.
    since: u64,
    /// Its modification time then: among files found by one scan (at
    /// start-up), older files go first.
    modified: SystemTime,
}

/// The loads in flight, and the scans so far. Changed only together with
/// the catalog, under the runtime's `loads` lock.
#[derive(Default)]
pub(super) struct Loads {
    scans: u64,
    in_flight: BTreeMap<PathBuf, InFlight>,
}

struct InFlight {
    /// The hashes of the component and manifest being loaded: a result for
    /// another version of the file is stale.
    version: String,
    started_at: String,
    task: tokio::task::AbortHandle,
}

/// A `.wasm` file of the plugin folder as one scan found it.
struct Candidate {
    /// Its path in the folder, as users name it.
    file: PathBuf,
    modified: SystemTime,
    /// The manifest beside it, if any, with the SHA-256 of its bytes.
    manifest: Result<Option<(Manifest, String)>, String>,
}

/// What loading one file needs.
struct LoadJob {
    file: PathBuf,
    version: String,
    standing: Standing,
    wasm: Vec<u8>,
    sha256: String,
    manifest: Manifest,
    manifest_sha256: Option<String>,
    secrets: Arc<BTreeSet<String>>,
}

/// A candidate once its component was read.
struct Found {
    candidate: Candidate,
    wasm: Result<Vec<u8>, String>,
    sha256: String,
    version: String,
}

impl PluginRuntime {
    /// Scans the plugin folder and waits until every load it started has
    /// finished (or failed, or run out of time).
    pub async fn scan(self: &Arc<Self>) -> std::io::Result<ScanReport> {
        let report = self.rescan().await?;
        self.loaded().await;
        Ok(report)
    }

    /// Replaces the external tools (those of MCP servers) in the catalog.
    pub fn set_external_tools(&self, external: ExternalTools) {
        let loads = self.loads.lock().expect("loads lock");
        let mut next = self.catalog().shallow_clone();
        next.external = Arc::new(external);
        self.publish(&loads, next);
    }

    /// Waits until no plugin is loading.
    pub async fn loaded(&self) {
        let mut loading = self.loading_count.subscribe();
        let _ = loading.wait_for(|count| *count == 0).await;
    }

    /// Scans the plugin folder: files that did not change keep their
    /// plugin, files that disappeared are unloaded at once, and each new
    /// file or new version is loaded in the background, in a task of its
    /// own, under the operator's `max_load_time`; each joins the catalog as
    /// soon as it has loaded, so a slow or failing load delays no other.
    /// `GET /v1/plugins` lists the files still loading.
    ///
    /// A name belongs to the file that has held it longest: a file dropped
    /// in later cannot take over a plugin or tool name, whatever the file
    /// names; at start-up, older files (by modification time) go first. A
    /// file that fails to load (unreadable, half-written, refused) never
    /// unloads the version of it that was working: that version keeps
    /// serving until a new one loads.
    pub async fn rescan(self: &Arc<Self>) -> std::io::Result<ScanReport> {
        let _one_at_a_time = self.scan_lock.lock().await;
        let folder = self.options.plugin_dir.canonicalize()?;
        let mut candidates = Vec::new();
        for entry in std::fs::read_dir(&self.options.plugin_dir)? {
            let file = entry?.path();
            if !is_plugin_file(&file, "wasm") || !file.is_file() {
                continue;
            }
            let modified = std::fs::metadata(&file)
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            let manifest_path = file.with_extension("toml");
            let manifest = read_in_folder(&manifest_path, &folder).and_then(|bytes| {
                bytes
                    .map(|bytes| {
                        let manifest = Manifest::parse(&bytes, &manifest_path)?;
                        Ok((manifest, hex::encode(Sha256::digest(&bytes))))
                    })
                    .transpose()
            });
            candidates.push(Candidate {
                file,
                modified,
                manifest,
            });
        }
        candidates.sort_by(|a, b| a.file.cmp(&b.file));
        // Every variable a credential draws on, in any manifest here, or
        // that the operator names as a secret, or that configures the
        // server: none is ever handed to a plugin as plain environment.
        let mut secrets: BTreeSet<String> = self
            .options
            .policy
            .secret_names()
            .map(str::to_owned)
            .chain(self.options.server_env.iter().cloned())
            .collect();
        for candidate in &candidates {
            if let Ok(Some((manifest, _))) = &candidate.manifest {
                secrets.extend(manifest.credential_variables());
            }
        }
        let secrets = Arc::new(secrets);

        let mut found = Vec::new();
        for candidate in candidates {
            let read = {
                let (file, folder) = (candidate.file.clone(), folder.clone());
                tokio::task::spawn_blocking(move || read_in_folder(&file, &folder))
                    .await
                    .unwrap_or_else(|e| Err(format!("reading panicked: {e}")))
            };
            let wasm = match read {
                Ok(Some(wasm)) => Ok(wasm),
                Ok(None) => Err("it disappeared while the folder was read".to_owned()),
                Err(error) => Err(error),
            };
            let sha256 = match &wasm {
                Ok(wasm) => hex::encode(Sha256::digest(wasm)),
                Err(_) => String::new(),
            };
            let manifest_sha256 = match &candidate.manifest {
                Ok(Some((_, sha))) => sha.as_str(),
                _ => "-",
            };
            let version = format!("{sha256} {manifest_sha256}");
            found.push(Found {
                candidate,
                wasm,
                sha256,
                version,
            });
        }

        let mut loads = self.loads.lock().expect("loads lock");
        loads.scans += 1;
        let scan = loads.scans;
        let current = self.catalog();
        let mut next = current.shallow_clone();
        next.failures.clear();
        let mut report = ScanReport::default();
        let present: BTreeSet<&Path> = found.iter().map(|f| f.candidate.file.as_path()).collect();
        let gone: Vec<PathBuf> = loads
            .in_flight
            .keys()
            .filter(|file| !present.contains(file.as_path()))
            .cloned()
            .collect();
        for file in gone {
            if let Some(load) = loads.in_flight.remove(&file) {
                load.task.abort();
            }
        }
        let removed: Vec<Arc<Plugin>> = current
            .plugins
            .values()
            .filter(|plugin| !present.contains(plugin.info.file.as_path()))
            .cloned()
            .collect();
        for plugin in removed {
            next.remove_file(&plugin.info.file);
            self.forget_warning(&plugin.info.file);
            tracing::info!(plugin = %plugin.info.name, "plugin unloaded");
            report.removed.push(plugin.info.name.clone());
        }
        for Found {
            candidate,
            wasm,
            sha256,
            version,
        } in found
        {
            let file = candidate.file;
            let incumbent = current.plugin_from(&file);
            let (wasm, manifest) = match (wasm, candidate.manifest) {
                (Ok(wasm), Ok(manifest)) => (wasm, manifest),
                (wasm, manifest) => {
                    let (code, error) = match (wasm, manifest) {
                        (Err(error), _) => (Code::PluginUnreadable, error),
                        (_, Err(error)) => (Code::PluginInvalidManifest, error),
                        (Ok(_), Ok(_)) => unreachable!("both read: matched above"),
                    };
                    // Broken now: a load of an earlier version is moot.
                    if let Some(load) = loads.in_flight.remove(&file) {
                        load.task.abort();
                    }
                    let error = keeps_serving(error, incumbent.as_deref());
                    self.warn_once(&file, &version, &error);
                    count_load(code.as_str());
                    next.failures.push(LoadFailure { file, code, error });
                    report.failed += 1;
                    continue;
                }
            };
            let manifest_sha256 = manifest.as_ref().map(|(_, sha)| sha.clone());
            let manifest = manifest.map(|(manifest, _)| manifest).unwrap_or_default();
            let unchanged = incumbent.as_ref().is_some_and(|plugin| {
                plugin.info.sha256 == sha256
                    && plugin.manifest_sha256 == manifest_sha256
                    && plugin.withheld_env == withheld(&manifest, &secrets)
            });
            if unchanged {
                if let Some(load) = loads.in_flight.remove(&file) {
                    load.task.abort();
                }
                report.unchanged += 1;
                continue;
            }
            if loads
                .in_flight
                .get(&file)
                .is_some_and(|load| load.version == version)
            {
                continue;
            }
            let standing = incumbent.map_or(
                Standing {
                    since: scan,
                    modified: candidate.modified,
                },
                |plugin| plugin.standing,
            );
            let task = self.start_load(LoadJob {
                file: file.clone(),
                version: version.clone(),
                standing,
                wasm,
                sha256,
                manifest,
                manifest_sha256,
                secrets: secrets.clone(),
            });
            let started_at = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
            if let Some(earlier) = loads.in_flight.insert(
                file.clone(),
                InFlight {
                    version,
                    started_at,
                    task,
                },
            ) {
                earlier.task.abort();
            }
            report.loading.push(file);
        }
        self.publish(&loads, next);
        Ok(report)
    }

    /// Loads one file in a task of its own, under `max_load_time`, then
    /// hands the outcome to [`install`](Self::install).
    fn start_load(self: &Arc<Self>, job: LoadJob) -> tokio::task::AbortHandle {
        let runtime = Arc::clone(self);
        let limit = self.options.max_load_time;
        let task = tokio::spawn(async move {
            let LoadJob {
                file,
                version,
                standing,
                wasm,
                sha256,
                manifest,
                manifest_sha256,
                secrets,
            } = job;
            // A task of its own, so that a panic fails this load alone.
            let loading = {
                let runtime = runtime.clone();
                let file = file.clone();
                tokio::spawn(async move {
                    runtime
                        .load(&file, wasm, sha256, &manifest, manifest_sha256, &secrets)
                        .await
                })
            };
            let abort = loading.abort_handle();
            let outcome = match tokio::time::timeout(limit, loading).await {
                Ok(Ok(outcome)) => outcome,
                Ok(Err(error)) => Err(format!("loading it failed: {error}")),
                Err(_) => {
                    abort.abort();
                    Err(format!(
                        "it did not finish loading within {} (the operator's \
                         plugins.max_load_time): its describe call, or compiling it, took too long",
                        humantime::format_duration(limit)
                    ))
                }
            };
            runtime.install(&file, &version, standing, outcome);
        });
        task.abort_handle()
    }

    /// Puts the outcome of a load into the catalog, unless the file changed
    /// or went away meanwhile.
    fn install(
        &self,
        file: &Path,
        version: &str,
        standing: Standing,
        outcome: Result<Plugin, String>,
    ) {
        let mut loads = self.loads.lock().expect("loads lock");
        if loads
            .in_flight
            .get(file)
            .is_none_or(|load| load.version != version)
        {
            return;
        }
        loads.in_flight.remove(file);
        let mut next = self.catalog().shallow_clone();
        next.failures.retain(|failure| failure.file != file);
        let previous = next.remove_file(file);
        let refusal = match outcome {
            Ok(mut plugin) => {
                plugin.standing = standing;
                let plugin = Arc::new(plugin);
                match next.admit(plugin.clone()) {
                    Ok(displaced) => {
                        count_load("loaded");
                        tracing::info!(
                            plugin = %plugin.info.name,
                            kind = %plugin.info.kind,
                            sha256 = %&plugin.info.sha256[..12],
                            "plugin loaded"
                        );
                        self.forget_warning(file);
                        for (loser, error) in displaced {
                            self.warn_once(&loser.info.file, &loser.info.sha256, &error);
                            next.failures.push(LoadFailure {
                                file: loser.info.file.clone(),
                                code: Code::PluginNameTaken,
                                error,
                            });
                        }
                        None
                    }
                    Err(error) => Some((Code::PluginNameTaken, error)),
                }
            }
            Err(error) => Some((Code::PluginLoadFailed, error)),
        };
        if let Some((code, error)) = refusal {
            count_load(code.as_str());
            let kept = previous.filter(|plugin| next.admit(plugin.clone()).is_ok());
            let error = keeps_serving(error, kept.as_deref());
            self.warn_once(file, version, &error);
            next.failures.push(LoadFailure {
                file: file.to_owned(),
                code,
                error,
            });
        }
        self.publish(&loads, next);
    }

    /// Swaps `next` in, with the files still loading.
    fn publish(&self, loads: &Loads, mut next: Catalog) {
        next.loading = loads
            .in_flight
            .iter()
            .map(|(file, load)| LoadingFile {
                file: file.clone(),
                started_at: load.started_at.clone(),
            })
            .collect();
        let previous = std::mem::replace(
            &mut *self.catalog.write().expect("catalog lock"),
            Arc::new(next),
        );
        // Versions replaced or removed stay loaded while tasks run on them.
        let current = self.catalog();
        let gone = previous.plugins.values().filter(|old| {
            current
                .plugins
                .get(&old.info.name)
                .is_none_or(|now| !Arc::ptr_eq(now, old))
        });
        self.old_versions
            .retire(gone.cloned(), self.options.max_old_versions);
        // Sent at every change (not only of the count): tasks waiting for a
        // missing plugin look again.
        self.loading_count.send_replace(loads.in_flight.len());
        if loads.in_flight.is_empty() {
            self.prune_compile_cache(&current);
        }
    }

    /// Prunes the compile cache, in the background, to the versions loaded
    /// or still in use and a bounded history of others.
    fn prune_compile_cache(&self, catalog: &Catalog) {
        let in_use: BTreeSet<String> = catalog
            .plugins
            .values()
            .map(|plugin| plugin.info.sha256.clone())
            .chain(self.old_versions.in_use().into_iter().map(|old| old.sha256))
            .collect();
        let cache = self.cache.clone();
        let usage = self.cache_usage.clone();
        let history = self.options.compile_cache_history;
        tokio::task::spawn_blocking(move || match cache.prune(&in_use, history) {
            Ok(now) => *usage.lock().expect("cache usage lock") = now,
            Err(error) => tracing::warn!(%error, "could not prune the compile cache"),
        });
    }

    /// Logs a failure unless the same version of the file failed before.
    fn warn_once(&self, file: &Path, version: &str, error: &str) {
        let mut warned = self.warned.lock().expect("warnings lock");
        if warned.get(file).is_none_or(|seen| seen != version) {
            tracing::warn!(file = %file.display(), %error, "plugin skipped");
            warned.insert(file.to_owned(), version.to_owned());
        }
    }

    fn forget_warning(&self, file: &Path) {
        self.warned.lock().expect("warnings lock").remove(file);
    }

    async fn load(
        &self,
        file: &Path,
        wasm: Vec<u8>,
        sha256: String,
        manifest: &Manifest,
        manifest_sha256: Option<String>,
        secrets: &BTreeSet<String>,
    ) -> Result<Plugin, String> {
        let name = match &manifest.plugin.name {
            Some(name) => name.clone(),
            None => file
                .file_stem()
                .map(|stem| stem.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        validate_name(&name).map_err(|e| format!("plugin name {name:?} {e}"))?;
        let policy = &self.options.policy;
        if !policy.enabled(&name) {
            return Err(format!("the operator's policy disables plugin {name:?}"));
        }
        let requested = self.options.default_limits.with_requested(&manifest.limits);
        let withheld_env = withheld(manifest, secrets);
        let (manifest, limits, mut refused) = policy.narrow(&name, manifest, requested, secrets);
        let scope = FolderScope {
            plugin_dir: canonical(&self.options.plugin_dir),
            roots: policy
                .dir_roots(&name)
                .iter()
                .map(|r| canonical(r))
                .collect(),
            server_dirs: self
                .options
                .server_dirs
                .iter()
                .map(|d| canonical(d))
                .collect(),
        };
        let own_server = (!policy.allows_own_server(&name)).then(|| self.server_addresses.clone());
        let (grants, refused_dirs) = manifest.grants(&scope, own_server)?;
        refused.extend(refused_dirs);
        for refusal in &refused {
            tracing::warn!(plugin = %name, "policy refused {refusal}");
        }
        if let Some(endpoint) = &grants.adapter {
            let secrets = endpoint
                .credential
                .as_ref()
                .map(|c| c.variables.clone())
                .unwrap_or_default();
            if !policy.allows_endpoint(&name, &endpoint.origin(), &secrets) {
                return Err(format!(
                    "the operator's policy does not let it reach its base URL {} with its \
                     credential; allow {} under [policy] outbound_hosts (and the credential's \
                     variables under secrets)",
                    endpoint.base_url,
                    endpoint.origin()
                ));
            }
        }
        if limits.memory_bytes > self.options.engine.max_memory_bytes {
            return Err(format!(
                "its manifest asks for {} MiB of memory; this host allows at most {} MiB",
                limits.memory_bytes >> 20,
                self.options.engine.max_memory_bytes >> 20
            ));
        }

        // Only a WebAssembly binary goes further: wasmtime would read text as
        // the WebAssembly text format and quote it in its error, and a
        // file's contents must never reach a load error.
        if !wasm.starts_with(b"\0asm") {
            let reason = "it is not a WebAssembly binary (those start with the bytes \\0asm)";
            return Err(format!("not a valid WebAssembly component: {reason}"));
        }
        let size_bytes = wasm.len() as u64;
        let component = {
            let engine = self.engine.clone();
            let cache = self.cache.clone();
            let sha256 = sha256.clone();
            let label = file.display().to_string();
            tokio::task::spawn_blocking(move || cache.load(&engine, &wasm, &sha256, &label))
                .await
                .map_err(|e| format!("compiling panicked: {e}"))?
                .map_err(|e| format!("not a valid WebAssembly component: {e:#}"))?
        };
        let (kind, version) = detect_kind(&self.engine, &component)?;
        let pre: InstancePre<CallState> = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| format!("it imports something this host does not provide: {e:#}"))?;
        let mismatch = |e: wasmtime::Error| {
            format!(
                "its exports do not match the {kind} world of {}@{version}: {e:#}",
                bindings::WIT_PACKAGE,
            )
        };
        let entry = match (kind, version) {
            (PluginKind::Tool, WitVersion::V0_1) => Entry::Tool(ToolEntry::V0_1(
                v0_1::tool::ToolPre::new(pre).map_err(mismatch)?,
            )),
            (PluginKind::Tool, WitVersion::V0_2) => Entry::Tool(ToolEntry::V0_2(
                v0_2::tool::ToolPre::new(pre).map_err(mismatch)?,
            )),
            (PluginKind::Planner, WitVersion::V0_1) => Entry::Planner(PlannerEntry::V0_1(
                v0_1::planner::PlannerPre::new(pre).map_err(mismatch)?,
            )),
            (PluginKind::Planner, WitVersion::V0_2) => Entry::Planner(PlannerEntry::V0_2(
                v0_2::planner::PlannerPre::new(pre).map_err(mismatch)?,
            )),
            (PluginKind::LlmAdapter, WitVersion::V0_1) => Entry::LlmAdapter(AdapterEntry::Calling(
                v0_1::llm_adapter::LlmAdapterPre::new(pre).map_err(mismatch)?,
            )),
            (PluginKind::LlmAdapter, WitVersion::V0_2) => {
                Entry::LlmAdapter(AdapterEntry::Translating(
                    v0_2::llm_adapter::LlmAdapterPre::new(pre).map_err(mismatch)?,
                ))
            }
        };
        let instance_reuse = manifest.instances.reuse()?;
        if manifest.capabilities.memory
            && (kind == PluginKind::LlmAdapter || version == WitVersion::V0_1)
        {
            return Err(format!(
                "its manifest asks for memory, which tools and planners built against \
                 opspawn:plugin@{} have; this is a {kind} of {version}: remove `memory` \
                 from [capabilities]",
                WitVersion::LATEST
            ));
        }
        if !manifest.approvals.is_empty() && kind != PluginKind::Tool {
            return Err(format!(
                "its manifest has [[approvals]], which only tools have; this is a {kind}: \
                 remove them (the operator's [[approvals.rules]] cover every tool)"
            ));
        }
        for rule in &manifest.approvals {
            rule.validate("[[approvals]]")?;
        }
        let wit_version = version.as_str().to_owned();
        let labels = CallLabels::new(&name, kind, &sha256);
        let mut plugin = Plugin {
            info: PluginInfo {
                name,
                kind,
                wit_version,
                sha256,
                file: file.to_owned(),
                size_bytes,
                description: manifest.plugin.description.clone(),
                tools: Vec::new(),
                grants,
                limits,
                refused,
                instance_reuse,
                approvals: manifest.approvals.clone(),
            },
            entry,
            validators: BTreeMap::new(),
            manifest_sha256,
            withheld_env,
            standing: Standing {
                since: 0,
                modified: SystemTime::UNIX_EPOCH,
            },
            users: AtomicUsize::new(0),
            released: AtomicBool::new(false),
            labels,
        };
        if kind == PluginKind::Tool {
            plugin.info.tools = (self.describe(&plugin).await?)
                .into_iter()
                .map(Arc::new)
                .collect();
            for spec in &plugin.info.tools {
                let validator = jsonschema::validator_for(&spec.input_schema).map_err(|e| {
                    format!("tool {:?} has an invalid input schema: {e}", spec.name)
                })?;
                plugin
                    .validators
                    .insert(spec.name.clone(), Arc::new(validator));
            }
            // A rule for a tool the plugin does not offer would never ask
            // for anything: most likely a typo that must not pass silently.
            let offered = |name: &str| plugin.info.tools.iter().any(|t| t.name == name);
            if let Some(rule) = plugin
                .info
                .approvals
                .iter()
                .find(|rule| rule.tool != "*" && !offered(&rule.tool))
            {
                let names: Vec<&str> = plugin.info.tools.iter().map(|t| t.name.as_str()).collect();
                return Err(format!(
                    "its manifest's [[approvals]] names tool {:?}, which it does not offer; \
                     name one of its tools ({}) or \"*\" for all of them",
                    rule.tool,
                    names.join(", ")
                ));
            }
        }
        Ok(plugin)
    }

    /// Loads a component from outside the plugin folder exactly as a scan
    /// would load it as `<plugin folder>/<stem>.wasm` with `manifest` beside
    /// it (same loader, limits, operator policy and load time limit), and
    /// answers what the catalog would show, without adding it to the
    /// catalog: what `opspawn plugin check` reports. Only this manifest's
    /// credential variables count as secrets here; a server also withholds
    /// those of the other manifests in its folder.
    pub async fn check_file(
        &self,
        stem: &str,
        wasm: Vec<u8>,
        manifest: Option<&[u8]>,
    ) -> Result<PluginInfo, LoadFailure> {
        let file = self.options.plugin_dir.join(format!("{stem}.wasm"));
        let failure = |code: Code, error: String| LoadFailure {
            file: file.clone(),
            code,
            error,
        };
        let manifest = match manifest {
            Some(bytes) => Manifest::parse(bytes, &file.with_extension("toml"))
                .map_err(|e| failure(Code::PluginInvalidManifest, e))?,
            None => Manifest::default(),
        };
        let secrets: BTreeSet<String> = self
            .options
            .policy
            .secret_names()
            .map(str::to_owned)
            .chain(self.options.server_env.iter().cloned())
            .chain(manifest.credential_variables())
            .collect();
        let sha256 = hex::encode(Sha256::digest(&wasm));
        let limit = self.options.max_load_time;
        let loading = self.load(&file, wasm, sha256, &manifest, None, &secrets);
        match tokio::time::timeout(limit, loading).await {
            Ok(Ok(plugin)) => Ok(plugin.info),
            Ok(Err(error)) => Err(failure(Code::PluginLoadFailed, error)),
            Err(_) => Err(failure(
                Code::PluginLoadFailed,
                format!(
                    "it did not finish loading within {} (the operator's \
                     plugins.max_load_time): its describe call, or compiling it, took too long",
                    humantime::format_duration(limit)
                ),
            )),
        }
    }

    /// Asks a tool component which tools it offers.
    async fn describe(&self, plugin: &Plugin) -> Result<Vec<ToolSpec>, String> {
        let Entry::Tool(entry) = &plugin.entry else {
            unreachable!("only tools are described")
        };
        let failed = |e: super::CallError| format!("describing its tools failed: {e}");
        let specs: Vec<(String, Result<ToolSpec, String>)> = match entry {
            ToolEntry::V0_1(pre) => {
                let specs = self
                    .call(
                        plugin,
                        SlotKind::Compute,
                        None,
                        None,
                        MemoryHandle::default(),
                        &TraceSpan::none(),
                        async |store| {
                            let instance = pre.instantiate_async(&mut *store).await?;
                            instance.opspawn_plugin_tools().call_describe(store).await
                        },
                    )
                    .await
                    .map_err(failed)?;
                check_described(
                    &plugin.info.limits,
                    specs.len(),
                    specs
                        .iter()
                        .map(|s| s.name.len() + s.description.len() + s.input_schema.len()),
                )?;
                specs
                    .into_iter()
                    .map(|spec| (spec.name.clone(), convert::v0_1::tool_spec_from_wit(spec)))
                    .collect()
            }
            ToolEntry::V0_2(pre) => {
                let specs = self
                    .call(
                        plugin,
                        SlotKind::Compute,
                        None,
                        None,
                        MemoryHandle::default(),
                        &TraceSpan::none(),
                        async |store| {
                            let instance = pre.instantiate_async(&mut *store).await?;
                            instance.opspawn_plugin_tools().call_describe(store).await
                        },
                    )
                    .await
                    .map_err(failed)?;
                check_described(
                    &plugin.info.limits,
                    specs.len(),
                    specs
                        .iter()
                        .map(|s| s.name.len() + s.description.len() + s.input_schema.len()),
                )?;
                specs
                    .into_iter()
                    .map(|spec| (spec.name.clone(), convert::v0_2::tool_spec_from_wit(spec)))
                    .collect()
            }
        };
        if specs.is_empty() {
            return Err("it describes no tools".into());
        }
        specs
            .into_iter()
            .map(|(name, spec)| {
                validate_name(&name).map_err(|e| format!("tool name {name:?} {e}"))?;
                if name.contains(EXTERNAL_SEPARATOR) {
                    return Err(format!(
                        "tool name {name:?} contains {EXTERNAL_SEPARATOR:?}, which is kept for the \
                         tools of MCP servers (<server>__<tool>) so that they cannot collide with \
                         a component's"
                    ));
                }
                spec
            })
            .collect()
    }

    /// Rescans the folder whenever the contents of its plugin files change,
    /// until the returned watcher is dropped. Opening, reading and closing
    /// a file (as a scan does) is not a change, so scans never wake the
    /// watcher themselves.
    pub fn watch(self: &Arc<Self>) -> notify::Result<PluginWatcher> {
        use notify_debouncer_full::{DebounceEventResult, new_debouncer, notify::RecursiveMode};

        let (changed, mut changes) = tokio::sync::mpsc::unbounded_channel();
        let mut debouncer = new_debouncer(
            Duration::from_millis(300),
            None,
            move |result: DebounceEventResult| {
                if let Ok(events) = result
                    && events.iter().any(|e| changes_content(&e.event))
                {
                    let _ = changed.send(());
                }
            },
        )?;
        debouncer.watch(&self.options.plugin_dir, RecursiveMode::NonRecursive)?;
        let runtime = Arc::downgrade(self);
        let task = tokio::spawn(async move {
            while changes.recv().await.is_some() {
                while changes.try_recv().is_ok() {}
                let Some(runtime) = runtime.upgrade() else {
                    break;
                };
                tracing::debug!("rescanning the plugin folder");
                match runtime.rescan().await {
                    Ok(report) if report.loading.is_empty() && report.removed.is_empty() => {}
                    Ok(report) => tracing::info!(
                        loading = ?report.loading,
                        removed = ?report.removed,
                        failed = report.failed,
                        "plugin folder changed"
                    ),
                    Err(error) => tracing::warn!(%error, "rescanning the plugin folder failed"),
                }
            }
        });
        Ok(PluginWatcher {
            _debouncer: Box::new(debouncer),
            task,
        })
    }
}

/// Whether a file event may have changed what a plugin file holds: created,
/// written, closed after writing, renamed or removed. Opening, reading,
/// closing unwritten and metadata changes are not.
fn changes_content(event: &notify::Event) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
    let kind = match event.kind {
        EventKind::Create(_) | EventKind::Remove(_) => true,
        EventKind::Modify(ModifyKind::Metadata(_)) => false,
        EventKind::Modify(_) => true,
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) | EventKind::Any | EventKind::Other => false,
    };
    kind && event
        .paths
        .iter()
        .any(|path| is_plugin_file(path, "wasm") || is_plugin_file(path, "toml"))
}

/// Keeps the plugin folder watched while alive.
pub struct PluginWatcher {
    _debouncer: Box<dyn std::any::Any + Send>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PluginWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether `path` is a file of the plugin folder of this extension: hidden
/// files (`.name`) are not, so copy-then-rename makes a drop-in atomic.
fn is_plugin_file(path: &Path, extension: &str) -> bool {
    let hidden = path
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with('.'));
    !hidden && path.extension().is_some_and(|ext| ext == extension)
}

/// The variables `manifest` asks for that are `secrets`.
fn withheld(manifest: &Manifest, secrets: &BTreeSet<String>) -> BTreeSet<String> {
    manifest
        .capabilities
        .env
        .iter()
        .filter(|name| secrets.contains(*name))
        .cloned()
        .collect()
}

/// `path` with links resolved, or as given when it cannot be.
fn canonical(path: &Path) -> PathBuf {
    path.canonicalize().unwrap_or_else(|_| path.to_owned())
}

/// Reads a file of the plugin folder (`folder` is canonical), or `None` if
/// there is none. A file that resolves outside the folder (a link to
/// another folder, to `/proc/self/environ`) is refused without being read,
/// and no error quotes what a file holds.
fn read_in_folder(path: &Path, folder: &Path) -> Result<Option<Vec<u8>>, String> {
    let name = path.file_name().map(Path::new).unwrap_or(path).display();
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {name}: {e}")),
        Ok(_) => {}
    }
    let resolved = path
        .canonicalize()
        .map_err(|e| format!("cannot read {name}: it is a link that leads nowhere ({e})"))?;
    if !resolved.starts_with(folder) {
        return Err(format!(
            "refused: {name} resolves to {}, outside the plugin folder; copy the file into \
             the folder instead of linking to it",
            resolved.display()
        ));
    }
    // Opened without following a link, so one swapped in since the check
    // above is not followed out of the folder.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&resolved)
        .map_err(|e| format!("cannot read {name}: {e}"))?;
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return Err(format!("refused: {name} is not a regular file"));
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {name}: {e}"))?;
    Ok(Some(bytes))
}

/// Refuses a `describe` answer of more tools, or more bytes (names,
/// descriptions and schemas together), than the plugin's limits allow:
/// checked before any schema is parsed or compiled, so an oversized answer
/// costs the host no more than the copy out of the plugin's memory.
fn check_described(
    limits: &Limits,
    count: usize,
    sizes: impl Iterator<Item = usize>,
) -> Result<(), String> {
    if count as u64 > limits.max_tools {
        return Err(format!(
            "refused: it describes {count} tools, over its limit of {} (the manifest's \
             [limits] max_tools, capped by the operator's policy)",
            limits.max_tools
        ));
    }
    let bytes: u64 = sizes.map(|size| size as u64).sum();
    if bytes > limits.max_describe_bytes {
        return Err(format!(
            "refused: its describe output is {bytes} bytes, over its limit of {} (the \
             manifest's [limits] max_describe_bytes, capped by the operator's policy)",
            limits.max_describe_bytes
        ));
    }
    Ok(())
}

/// What joins an MCP server's name to its tools' names; no component's tool
/// name may contain it.
pub const EXTERNAL_SEPARATOR: &str = "__";

/// Names are `[A-Za-z0-9_-]{1,64}`: safe in URLs, logs and tool calls.
fn validate_name(name: &str) -> Result<(), &'static str> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if valid {
        Ok(())
    } else {
        Err("must be 1 to 64 letters, digits, '_' or '-'")
    }
}

/// Decides the kind of a component from the Opspawn interface it exports,
/// and the WIT version it was built against, which must be one this host
/// knows exactly.
fn detect_kind(
    engine: &wasmtime::Engine,
    component: &Component,
) -> Result<(PluginKind, WitVersion), String> {
    let prefix = format!("{}/", bindings::WIT_PACKAGE);
    let mut found = None;
    for (name, item) in component.component_type().exports(engine) {
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        if !matches!(item.ty, ComponentItem::ComponentInstance(_)) {
            continue;
        }
        let (interface, version) = rest.split_once('@').unwrap_or((rest, ""));
        let Some(known) = WitVersion::parse(version) else {
            return Err(unknown_version(version));
        };
        let kind = [
            PluginKind::Tool,
            PluginKind::Planner,
            PluginKind::LlmAdapter,
        ]
        .into_iter()
        .find(|kind| kind.export_interface(known) == interface);
        if let Some(kind) = kind {
            if found.is_some() {
                return Err("it exports more than one Opspawn plugin interface".into());
            }
            found = Some((kind, known));
        }
    }
    found.ok_or_else(|| {
        format!(
            "it exports none of {0}/tools, {0}/planning or {0}/translate; build it against the \
             `tool`, `planner` or `llm-adapter` world in wit/v{1}",
            bindings::WIT_PACKAGE,
            WitVersion::LATEST
        )
    })
}

/// Why a component built against `version` cannot load here, and what to do.
fn unknown_version(version: &str) -> String {
    let known: Vec<&str> = WitVersion::ALL.iter().map(|v| v.as_str()).collect();
    let newer = semver_pair(version)
        .zip(semver_pair(WitVersion::LATEST.as_str()))
        .is_some_and(|(found, latest)| found > latest);
    let advice = if newer {
        "it is newer than this host: upgrade Opspawn, or rebuild the plugin against wit/v"
    } else {
        "rebuild the plugin against wit/v"
    };
    format!(
        "it was built against {}@{version}, which this host does not know (it loads {}); {advice}{}",
        bindings::WIT_PACKAGE,
        known.join(", "),
        WitVersion::LATEST
    )
}

/// `(major, minor, patch)` of a version like `0.2.0`.
fn semver_pair(version: &str) -> Option<(u64, u64, u64)> {
    let mut parts = version.split(['.', '-', '+']);
    Some((
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
    ))
}

/// Counts a load of a plugin file by its outcome: `loaded`, or the code of
/// its failure.
fn count_load(outcome: &'static str) {
    metrics::counter!(crate::metrics::PLUGIN_LOADS, "outcome" => outcome).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_versions_this_host_knows_exactly_load() {
        assert_eq!(WitVersion::parse("0.1.0"), Some(WitVersion::V0_1));
        assert_eq!(WitVersion::parse("0.2.0"), Some(WitVersion::V0_2));
        for unknown in ["0.1.3", "0.2.1", "0.3.0", "1.0.0", ""] {
            assert_eq!(WitVersion::parse(unknown), None, "{unknown}");
        }
    }

    #[test]
    fn a_newer_guest_is_told_to_upgrade_the_host() {
        let message = unknown_version("0.3.0");
        assert!(message.contains("upgrade Opspawn"), "{message}");
        assert!(message.contains("0.1.0, 0.2.0"), "{message}");
        let message = unknown_version("0.0.9");
        assert!(!message.contains("upgrade Opspawn"), "{message}");
        assert!(message.contains("wit/v0.2.0"), "{message}");
    }

    #[test]
    fn describe_answers_are_bounded_in_tools_and_bytes() {
        let limits = Limits {
            max_tools: 2,
            max_describe_bytes: 10,
            ..Limits::default()
        };
        assert!(check_described(&limits, 2, [4, 6].into_iter()).is_ok());
        let many = check_described(&limits, 3, [1, 1, 1].into_iter()).unwrap_err();
        assert!(many.contains("3 tools, over its limit of 2"), "{many}");
        let large = check_described(&limits, 1, [11].into_iter()).unwrap_err();
        assert!(large.contains("11 bytes, over its limit of 10"), "{large}");
    }

    #[test]
    fn names_are_restricted() {
        assert!(validate_name("calculator").is_ok());
        assert!(validate_name("web_search-2").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name(&"x".repeat(65)).is_err());
    }
}
