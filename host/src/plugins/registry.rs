//! The registry: which components are loaded from the plugin folder, what
//! each offers, and what failed to load and why.
//!
//! Loading a folder builds a new [`Catalog`] and swaps it in whole, so a
//! call in flight keeps the plugin it started with and never sees a
//! half-loaded folder. A file that is unchanged (same bytes, same manifest)
//! keeps its already-loaded plugin.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use sha2::{Digest, Sha256};
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, InstancePre};

use super::bindings::{self, WitVersion, v0_1, v0_2};
use super::manifest::{FolderScope, Grants, Limits, Manifest};
use super::state::CallState;
use super::{PluginRuntime, SlotKind, convert};
use crate::protocol::ToolSpec;

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
    /// For tool plugins: the tools it offers.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<ToolSpec>,
    pub grants: Grants,
    pub limits: Limits,
    /// What the manifest asked for that the operator's policy refused.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<String>,
}

/// A file in the plugin folder that could not be loaded, and why.
#[derive(Debug, Clone, Serialize)]
pub struct LoadFailure {
    pub file: PathBuf,
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

pub(super) struct Plugin {
    pub info: PluginInfo,
    pub entry: Entry,
    /// Compiled input schemas of the plugin's tools, by tool name.
    pub validators: BTreeMap<String, Arc<jsonschema::Validator>>,
    /// Hash of the manifest's bytes, to notice when only the manifest changed.
    manifest_sha256: Option<String>,
    /// The variables the manifest asked for that were withheld as secrets,
    /// to notice when another plugin's credential starts drawing on one.
    withheld_env: BTreeSet<String>,
}

/// Everything loaded from the plugin folder at one moment.
#[derive(Default)]
pub struct Catalog {
    plugins: BTreeMap<String, Arc<Plugin>>,
    /// Tool name to the plugin offering it.
    tools: BTreeMap<String, Arc<Plugin>>,
    failures: Vec<LoadFailure>,
}

impl Catalog {
    pub fn plugins(&self) -> impl Iterator<Item = &PluginInfo> {
        self.plugins.values().map(|plugin| &plugin.info)
    }

    pub fn failures(&self) -> &[LoadFailure] {
        &self.failures
    }

    pub fn kind_of(&self, name: &str) -> Option<PluginKind> {
        self.plugins.get(name).map(|plugin| plugin.info.kind)
    }

    pub fn tool_names(&self) -> impl Iterator<Item = &str> {
        self.tools.keys().map(String::as_str)
    }

    /// The name of the plugin that offers a tool.
    pub fn tool_owner(&self, tool: &str) -> Option<&str> {
        self.tools.get(tool).map(|plugin| plugin.info.name.as_str())
    }

    pub fn tool_spec(&self, name: &str) -> Option<&ToolSpec> {
        let plugin = self.tools.get(name)?;
        plugin.info.tools.iter().find(|spec| spec.name == name)
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
}

/// What one scan of the folder changed.
#[derive(Debug, Default)]
pub struct ScanReport {
    pub loaded: Vec<String>,
    pub unchanged: usize,
    pub removed: Vec<String>,
    pub failed: usize,
}

/// A `.wasm` file of the plugin folder as one scan found it.
struct Candidate {
    /// Its path in the folder, as users name it.
    file: PathBuf,
    modified: SystemTime,
    /// The manifest beside it, if any, with the SHA-256 of its bytes.
    manifest: Result<Option<(Manifest, String)>, String>,
}

impl PluginRuntime {
    /// Loads every `.wasm` in the plugin folder, reusing plugins whose files
    /// did not change, and swaps the result in. A file that fails to load is
    /// recorded with the reason and skipped; the rest still load.
    ///
    /// Plugins already loaded go first, so a file dropped in later cannot
    /// take over a plugin or tool name that one of them holds, whatever the
    /// file names; at start-up, older files (by modification time) go first.
    /// A file that fails to load (unreadable, half-written, refused) never
    /// unloads the version of it that was working: that version keeps
    /// serving until a new one loads.
    pub async fn scan(&self) -> std::io::Result<ScanReport> {
        let _one_at_a_time = self.scan_lock.lock().await;
        let folder = self.options.plugin_dir.canonicalize()?;
        let previous = self.catalog();
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
        candidates.sort_by(|a, b| {
            let newcomer = |c: &Candidate| previous.plugin_from(&c.file).is_none();
            (newcomer(a), a.modified, &a.file).cmp(&(newcomer(b), b.modified, &b.file))
        });
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

        let mut next = Catalog::default();
        let mut report = ScanReport::default();
        let mut warnings = Warnings::default();
        for candidate in candidates {
            let file = candidate.file;
            let incumbent = previous.plugin_from(&file);
            let read = {
                let (file, folder) = (file.clone(), folder.clone());
                tokio::task::spawn_blocking(move || read_in_folder(&file, &folder))
                    .await
                    .unwrap_or_else(|e| Err(format!("reading panicked: {e}")))
            };
            let wasm = match read {
                Ok(Some(wasm)) => Ok(wasm),
                Ok(None) => Err("it disappeared while the folder was read".to_owned()),
                Err(error) => Err(error),
            };
            let sha256 = wasm.as_ref().ok().map(|w| hex::encode(Sha256::digest(w)));
            let manifest_sha256 = match &candidate.manifest {
                Ok(manifest) => manifest.as_ref().map(|(_, sha)| sha.clone()),
                Err(_) => None,
            };
            let version = format!(
                "{} {}",
                sha256.as_deref().unwrap_or("-"),
                manifest_sha256.as_deref().unwrap_or("-")
            );
            let loaded = match (wasm, candidate.manifest) {
                (Ok(wasm), Ok(manifest)) => {
                    let sha256 = sha256.clone().unwrap_or_default();
                    self.load_or_reuse(&file, wasm, sha256, manifest, &previous, &secrets)
                        .await
                }
                (Err(error), _) | (_, Err(error)) => Err(error),
            };
            let refusal = match loaded {
                Ok((plugin, reused)) => match insert(&mut next, plugin.clone()) {
                    Ok(()) if reused => {
                        report.unchanged += 1;
                        None
                    }
                    Ok(()) => {
                        tracing::info!(
                            plugin = %plugin.info.name,
                            kind = %plugin.info.kind,
                            sha256 = %&plugin.info.sha256[..12],
                            "plugin loaded"
                        );
                        report.loaded.push(plugin.info.name.clone());
                        None
                    }
                    Err(error) => Some(error),
                },
                Err(error) => Some(error),
            };
            let Some(mut error) = refusal else {
                continue;
            };
            if let Some(incumbent) = incumbent
                && insert(&mut next, incumbent.clone()).is_ok()
            {
                error.push_str(&format!(
                    "; the version loaded before (sha256 {}) keeps serving",
                    &incumbent.info.sha256[..12]
                ));
            }
            warnings.note(&file, &version, &error);
            next.failures.push(LoadFailure { file, error });
            report.failed += 1;
        }
        report.removed = previous
            .plugins
            .keys()
            .filter(|name| !next.plugins.contains_key(*name))
            .cloned()
            .collect();
        for name in &report.removed {
            tracing::info!(plugin = %name, "plugin unloaded");
        }
        self.warn_once(warnings);
        *self.catalog.write().expect("catalog lock") = Arc::new(next);
        Ok(report)
    }

    /// Logs the failures of this scan that were not logged for the same
    /// file version before, and forgets files that no longer fail.
    fn warn_once(&self, warnings: Warnings) {
        let mut warned = self.warned.lock().expect("warnings lock");
        for (file, (version, error)) in &warnings.0 {
            if warned.get(file).is_none_or(|seen| seen != version) {
                tracing::warn!(file = %file.display(), %error, "plugin skipped");
            }
        }
        *warned = warnings
            .0
            .into_iter()
            .map(|(file, (version, _))| (file, version))
            .collect();
    }

    async fn load_or_reuse(
        &self,
        file: &Path,
        wasm: Vec<u8>,
        sha256: String,
        manifest: Option<(Manifest, String)>,
        previous: &Catalog,
        secrets: &BTreeSet<String>,
    ) -> Result<(Arc<Plugin>, bool), String> {
        let manifest_sha256 = manifest.as_ref().map(|(_, sha)| sha.clone());
        let manifest = manifest.map(|(manifest, _)| manifest).unwrap_or_default();
        let withheld_env = withheld(&manifest, secrets);
        let unchanged = previous.plugin_from(file).filter(|plugin| {
            plugin.info.sha256 == sha256
                && plugin.manifest_sha256 == manifest_sha256
                && plugin.withheld_env == withheld_env
        });
        if let Some(plugin) = unchanged {
            return Ok((plugin, true));
        }
        let plugin = self
            .load(file, wasm, sha256, &manifest, manifest_sha256, secrets)
            .await?;
        Ok((Arc::new(plugin), false))
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
            tokio::task::spawn_blocking(move || cache.load(&engine, &wasm, &sha256))
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
        let wit_version = version.as_str().to_owned();
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
            },
            entry,
            validators: BTreeMap::new(),
            manifest_sha256,
            withheld_env,
        };
        if kind == PluginKind::Tool {
            plugin.info.tools = self.describe(&plugin).await?;
            for spec in &plugin.info.tools {
                let validator = jsonschema::validator_for(&spec.input_schema).map_err(|e| {
                    format!("tool {:?} has an invalid input schema: {e}", spec.name)
                })?;
                plugin
                    .validators
                    .insert(spec.name.clone(), Arc::new(validator));
            }
        }
        Ok(plugin)
    }

    /// Asks a tool component which tools it offers.
    async fn describe(&self, plugin: &Plugin) -> Result<Vec<ToolSpec>, String> {
        let Entry::Tool(entry) = &plugin.entry else {
            unreachable!("only tools are described")
        };
        let failed = |e: super::CallError| format!("describing its tools failed: {e}");
        let specs: Vec<(String, Result<ToolSpec, String>)> = match entry {
            ToolEntry::V0_1(pre) => self
                .call(plugin, SlotKind::Compute, None, async |store| {
                    let instance = pre.instantiate_async(&mut *store).await?;
                    instance.opspawn_plugin_tools().call_describe(store).await
                })
                .await
                .map_err(failed)?
                .into_iter()
                .map(|spec| (spec.name.clone(), convert::v0_1::tool_spec_from_wit(spec)))
                .collect(),
            ToolEntry::V0_2(pre) => self
                .call(plugin, SlotKind::Compute, None, async |store| {
                    let instance = pre.instantiate_async(&mut *store).await?;
                    instance.opspawn_plugin_tools().call_describe(store).await
                })
                .await
                .map_err(failed)?
                .into_iter()
                .map(|spec| (spec.name.clone(), convert::v0_2::tool_spec_from_wit(spec)))
                .collect(),
        };
        if specs.is_empty() {
            return Err("it describes no tools".into());
        }
        specs
            .into_iter()
            .map(|(name, spec)| {
                validate_name(&name).map_err(|e| format!("tool name {name:?} {e}"))?;
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
                match runtime.scan().await {
                    Ok(report) if report.loaded.is_empty() && report.removed.is_empty() => {}
                    Ok(report) => tracing::info!(
                        loaded = ?report.loaded,
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

/// Adds a plugin unless its name or one of its tools' names is taken; the
/// plugin holding it keeps it.
fn insert(catalog: &mut Catalog, plugin: Arc<Plugin>) -> Result<(), String> {
    let name = &plugin.info.name;
    if let Some(holder) = catalog.plugins.get(name) {
        return Err(format!(
            "refused: plugin name {name:?} is already held by {}; a plugin keeps its name \
             until its own file is removed",
            holder.info.file.display()
        ));
    }
    for spec in &plugin.info.tools {
        if let Some(owner) = catalog.tools.get(&spec.name) {
            return Err(format!(
                "refused: tool {:?} is already offered by plugin {:?} ({}); a tool name \
                 belongs to the plugin that offered it first",
                spec.name,
                owner.info.name,
                owner.info.file.display()
            ));
        }
    }
    for spec in &plugin.info.tools {
        catalog.tools.insert(spec.name.clone(), plugin.clone());
    }
    catalog.plugins.insert(name.clone(), plugin);
    Ok(())
}

/// The failures of one scan, by file: the file's version (hashes of its
/// component and manifest) and the error.
#[derive(Default)]
struct Warnings(BTreeMap<PathBuf, (String, String)>);

impl Warnings {
    fn note(&mut self, file: &Path, version: &str, error: &str) {
        self.0
            .insert(file.to_owned(), (version.to_owned(), error.to_owned()));
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
    fn names_are_restricted() {
        assert!(validate_name("calculator").is_ok());
        assert!(validate_name("web_search-2").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name(&"x".repeat(65)).is_err());
    }
}
