//! The plugin versions a task runs on.
//!
//! A task takes the versions of its planner, its LLM adapter and its tools'
//! plugins when it starts, and keeps them until it ends: a plugin replaced
//! in the folder meanwhile serves new tasks, while running ones finish on
//! the version they began with, so no task ever mixes two versions of one
//! plugin. A replaced or removed version stays loaded while a task uses it,
//! up to [`RuntimeOptions::max_old_versions`](super::RuntimeOptions) old
//! versions per plugin name. Past that bound the oldest is released: the
//! tasks still on it move to the loaded version at their next call (the
//! step records the version it ran on, and the move is logged).
//!
//! A resumed task (after a crash or a restart) asks for the versions its
//! journal recorded. A recorded version that is no longer loaded cannot be
//! brought back (only the folder's current files are), so the task goes on
//! with the loaded version and the change is logged and seen in its steps'
//! hashes.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};

use serde::Serialize;

use super::registry::{Catalog, Plugin, PluginKind};

/// What a task names: the plugins it needs loaded to run.
#[derive(Debug, Clone, Copy)]
pub struct TaskPluginNames<'a> {
    pub planner: Option<&'a str>,
    pub llm: Option<&'a str>,
    pub tools: &'a [String],
}

/// The versions a task's journal recorded, by plugin name (SHA-256 of the
/// component), and the planner's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordedVersions {
    pub planner: Option<String>,
    pub plugins: BTreeMap<String, String>,
}

/// One plugin version held by one task.
struct Held(Arc<Plugin>);

impl Held {
    fn new(plugin: Arc<Plugin>) -> Self {
        plugin.users.fetch_add(1, Ordering::Relaxed);
        Self(plugin)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.users.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The plugin versions one task runs on, by plugin name, chosen when it
/// starts. Tools of external sources (MCP servers) are not versioned here:
/// they are looked up in the catalog at each call.
pub struct TaskPlugins {
    held: Mutex<BTreeMap<String, Held>>,
    /// Component tool name to the name of the plugin offering it.
    tool_owners: BTreeMap<String, String>,
    planner: Option<String>,
    llm: Option<String>,
}

impl TaskPlugins {
    /// Holds the catalog's versions of what `names` names, preferring the
    /// `recorded` ones while they are still loaded (`old` lists the
    /// replaced versions still loaded). `Err` names the first plugin or tool
    /// that nothing offers.
    pub(super) fn hold(
        catalog: &Catalog,
        old: &OldVersions,
        names: TaskPluginNames<'_>,
        recorded: &RecordedVersions,
    ) -> Result<Self, Missing> {
        let mut held = BTreeMap::new();
        let mut choose = |name: &str, kind: PluginKind, recorded: Option<&String>| {
            let current = catalog
                .plugin(name)
                .filter(|plugin| plugin.info.kind == kind);
            let chosen = match recorded {
                Some(sha) if current.as_ref().is_none_or(|p| &p.info.sha256 != sha) => {
                    match old.find(name, sha) {
                        Some(plugin) => Some(plugin),
                        None => {
                            if let Some(now) = &current {
                                tracing::warn!(
                                    plugin = name,
                                    recorded = %short(sha),
                                    loaded = %short(&now.info.sha256),
                                    "the task's recorded plugin version is no longer loaded; \
                                     it goes on with the loaded one"
                                );
                            }
                            current
                        }
                    }
                }
                _ => current,
            };
            let plugin = chosen.ok_or(Missing::Plugin {
                kind,
                name: name.to_owned(),
            })?;
            held.entry(name.to_owned())
                .or_insert_with(|| Held::new(plugin));
            Ok(())
        };
        if let Some(planner) = names.planner {
            choose(planner, PluginKind::Planner, recorded.planner.as_ref())?;
        }
        if let Some(llm) = names.llm {
            choose(llm, PluginKind::LlmAdapter, recorded.plugins.get(llm))?;
        }
        let mut tool_owners = BTreeMap::new();
        for tool in names.tools {
            match catalog.tool_plugin(tool) {
                Some(plugin) => {
                    let owner = plugin.info.name.clone();
                    choose(&owner, PluginKind::Tool, recorded.plugins.get(&owner))?;
                    tool_owners.insert(tool.clone(), owner);
                }
                None if catalog.external_tool(tool).is_some() => {}
                None => return Err(Missing::Tool(tool.clone())),
            }
        }
        Ok(Self {
            held: Mutex::new(held),
            tool_owners,
            planner: names.planner.map(str::to_owned),
            llm: names.llm.map(str::to_owned),
        })
    }

    /// The task's planner.
    pub(super) fn planner(&self, catalog: impl FnOnce() -> Arc<Catalog>) -> Option<Arc<Plugin>> {
        self.get(self.planner.as_deref()?, catalog)
    }

    /// The task's LLM adapter.
    pub(super) fn adapter(&self, catalog: impl FnOnce() -> Arc<Catalog>) -> Option<Arc<Plugin>> {
        self.get(self.llm.as_deref()?, catalog)
    }

    /// The plugin offering component tool `tool`, or `None` for a tool of
    /// an external source.
    pub(super) fn tool(
        &self,
        tool: &str,
        catalog: impl FnOnce() -> Arc<Catalog>,
    ) -> Option<Arc<Plugin>> {
        self.get(self.tool_owners.get(tool)?, catalog)
    }

    /// The name of the plugin offering `tool`, if a component does.
    pub fn tool_owner(&self, tool: &str) -> Option<&str> {
        self.tool_owners.get(tool).map(String::as_str)
    }

    /// The SHA-256 of the version of `plugin` this task runs on now (a
    /// released version is swapped for the loaded one first, as a call
    /// would).
    pub(super) fn sha256(
        &self,
        plugin: &str,
        catalog: impl FnOnce() -> Arc<Catalog>,
    ) -> Option<String> {
        self.get(plugin, catalog).map(|p| p.info.sha256.clone())
    }

    /// The SHA-256 of the planner version this task runs on now.
    pub(super) fn planner_sha256(&self, catalog: impl FnOnce() -> Arc<Catalog>) -> Option<String> {
        self.sha256(self.planner.as_deref()?, catalog)
    }

    /// The time limit of one call of the task's LLM adapter.
    pub fn llm_call_timeout(&self) -> Option<std::time::Duration> {
        let held = self.held.lock().expect("held versions lock");
        let adapter = held.get(self.llm.as_deref()?)?;
        Some(adapter.0.info.limits.call_timeout)
    }

    /// The held version of `name`; a version released at the bound on old
    /// versions is swapped for the loaded one first.
    fn get(&self, name: &str, catalog: impl FnOnce() -> Arc<Catalog>) -> Option<Arc<Plugin>> {
        let mut held = self.held.lock().expect("held versions lock");
        let entry = held.get_mut(name)?;
        if entry.0.released.load(Ordering::Relaxed)
            && let Some(loaded) = catalog().plugin(name)
            && loaded.info.kind == entry.0.info.kind
        {
            tracing::warn!(
                plugin = name,
                from = %short(&entry.0.info.sha256),
                to = %short(&loaded.info.sha256),
                "a task moves to the loaded version of a plugin: its own was released \
                 at the bound on old versions (plugins.max_old_versions)"
            );
            *entry = Held::new(loaded);
        }
        Some(entry.0.clone())
    }
}

/// What [`TaskPlugins::hold`] did not find.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Missing {
    Plugin { kind: PluginKind, name: String },
    Tool(String),
}

/// Replaced and removed plugin versions that tasks still use, by plugin
/// name, oldest first.
#[derive(Default)]
pub(super) struct OldVersions {
    by_name: Mutex<BTreeMap<String, VecDeque<Weak<Plugin>>>>,
}

impl OldVersions {
    /// Keeps `gone` (versions no longer in the catalog) while tasks use
    /// them, releasing the oldest of a name past `max_per_name`.
    pub(super) fn retire(&self, gone: impl IntoIterator<Item = Arc<Plugin>>, max_per_name: usize) {
        let mut by_name = self.by_name.lock().expect("old versions lock");
        for plugin in gone {
            if plugin.users.load(Ordering::Relaxed) > 0 {
                by_name
                    .entry(plugin.info.name.clone())
                    .or_default()
                    .push_back(Arc::downgrade(&plugin));
            }
        }
        by_name.retain(|name, versions| {
            versions.retain(|version| version.upgrade().is_some_and(|p| in_use(&p)));
            while versions.len() > max_per_name {
                if let Some(oldest) = versions.pop_front().and_then(|v| v.upgrade()) {
                    tracing::warn!(
                        plugin = %name,
                        sha256 = %short(&oldest.info.sha256),
                        tasks = oldest.users.load(Ordering::Relaxed),
                        "released an old plugin version still in use: past the bound of \
                         {max_per_name} old versions, its tasks move to the loaded version"
                    );
                    oldest.released.store(true, Ordering::Relaxed);
                }
            }
            !versions.is_empty()
        });
    }

    /// The old version of `name` with that hash, if still kept.
    fn find(&self, name: &str, sha256: &str) -> Option<Arc<Plugin>> {
        let by_name = self.by_name.lock().expect("old versions lock");
        by_name
            .get(name)?
            .iter()
            .filter_map(Weak::upgrade)
            .find(|p| p.info.sha256 == sha256 && !p.released.load(Ordering::Relaxed))
    }

    /// The old versions tasks still run on.
    pub(super) fn in_use(&self) -> Vec<OldVersion> {
        let by_name = self.by_name.lock().expect("old versions lock");
        by_name
            .values()
            .flatten()
            .filter_map(Weak::upgrade)
            .filter(|p| in_use(p))
            .map(|p| OldVersion {
                name: p.info.name.clone(),
                kind: p.info.kind,
                sha256: p.info.sha256.clone(),
                file: p.info.file.display().to_string(),
                tasks: p.users.load(Ordering::Relaxed),
            })
            .collect()
    }
}

fn in_use(plugin: &Plugin) -> bool {
    plugin.users.load(Ordering::Relaxed) > 0 && !plugin.released.load(Ordering::Relaxed)
}

/// A replaced or removed plugin version that running tasks still use.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct OldVersion {
    pub name: String,
    #[schema(value_type = String)]
    pub kind: PluginKind,
    pub sha256: String,
    pub file: String,
    /// Tasks running on it.
    pub tasks: usize,
}

/// The first 12 hex digits of a hash, for logs.
fn short(sha256: &str) -> &str {
    sha256.get(..12).unwrap_or(sha256)
}
