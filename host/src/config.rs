//! Configuration: built-in defaults, then a TOML file, then `OPSPAWN_*`
//! environment variables, then command-line flags; each overrides the last.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::api::auth::AuthConfig;
use crate::api::{HttpLimits, QueueLimits, TaskDefaults};
use crate::approvals::ApprovalsConfig;
use crate::budgets::{Budgets, BudgetsConfig, PriceTable};
use crate::events::EventsConfig;
use crate::grpc::GrpcConfig;
use crate::mcp::McpConfig;
use crate::memory::MemoryConfig;
use crate::metrics::MetricsConfig;
use crate::plugins::policy::OperatorPolicy;
use crate::plugins::{EngineOptions, Limits, RuntimeOptions};
use crate::scheduler::SchedulerConfig;
use crate::schedules::ScheduleConfig;
use crate::threads::ThreadsConfig;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the REST API listens.
    pub addr: SocketAddr,
    /// Where the database, the compile cache and (by default) plugins live.
    pub data_dir: PathBuf,
    /// The folder plugins are loaded from; `<data_dir>/plugins` if unset.
    pub plugin_dir: Option<PathBuf>,
    /// Compiled plugins are cached here; `<data_dir>/cache` if unset.
    pub cache_dir: Option<PathBuf>,
    /// `sqlite://PATH`; `sqlite://<data_dir>/opspawn.db` if unset.
    pub database_url: Option<String>,
    /// How many tasks run at once on this host, those waiting on a provider,
    /// a timer or a retry included. A running task is a parked future, not a
    /// thread, so this can be in the thousands; at the limit, tasks wait in
    /// the queue.
    pub max_running_tasks: usize,
    /// Deprecated: the old name of `max_running_tasks`, which it sets when
    /// that is left at its default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    /// Submissions are refused (`429 queue_full`) while this many tasks are
    /// queued in the store, as this host last counted (at most 100 ms ago).
    pub max_queued_tasks: u64,
    /// Submissions of a tenant are refused (`429 queue_full`) while it has
    /// this many tasks queued; no cap if unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queued_per_tenant: Option<u64>,
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// The largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Time limits on clients and the cap on open connections.
    pub http: HttpLimits,
    /// Watch the plugin folder and load changes without a restart.
    pub watch_plugins: bool,
    /// Finished tasks, their journals and events are deleted this long
    /// after they finish.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// How often old tasks are looked for.
    #[serde(with = "humantime_serde")]
    pub prune_interval: Duration,
    pub defaults: TaskDefaults,
    pub plugins: PluginDefaults,
    /// What plugins may be granted, globally and per plugin.
    pub policy: OperatorPolicy,
    /// API tokens (by hash), rate limits and per-tenant caps; off when no
    /// tokens are configured.
    pub auth: AuthConfig,
    /// External MCP servers whose tools join the registry (`[[mcp.servers]]`).
    #[serde(default)]
    pub mcp: McpConfig,
    /// Prometheus metrics at `GET /metrics`, and the token they need.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// The schedule loop: how late a tick may run, how often it looks.
    #[serde(default)]
    pub schedules: ScheduleConfig,
    /// What traces record (they are exported when the standard
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` variable is set).
    #[serde(default)]
    pub traces: TracesConfig,
    /// The gRPC API (`proto/opspawn/v1/tasks.proto`): off unless `listen`
    /// is set.
    #[serde(default)]
    pub grpc: GrpcConfig,
    /// `[prices.<adapter>."<model>"]`: US dollars per million input and
    /// output tokens; `"*"` prices an adapter's other models. A model with
    /// no price has an unknown cost.
    #[serde(default = "crate::budgets::default_prices")]
    pub prices: PriceTable,
    /// Tenants' token and cost caps per day or month.
    #[serde(default)]
    pub budgets: BudgetsConfig,
    /// Which tool calls wait for a person's approval, and for how long.
    #[serde(default)]
    pub approvals: ApprovalsConfig,
    /// How much of a thread's past a task's planner is given.
    #[serde(default)]
    pub threads: ThreadsConfig,
    /// How streamed LLM text is journaled as `llm.delta` events.
    #[serde(default)]
    pub events: EventsConfig,
    /// What each tenant may keep in long-term memory.
    #[serde(default)]
    pub memory: MemoryConfig,
}

/// `[traces]`: what the spans of a task carry beyond names, models, token
/// counts and outcomes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracesConfig {
    /// Record prompts and replies (`gen_ai.input.messages`,
    /// `gen_ai.output.messages`) and tool arguments and results on the
    /// spans. Off: they can hold anything a user or a tool wrote.
    pub record_content: bool,
}

/// Limits for plugins whose manifests do not ask for others.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginDefaults {
    pub memory_mib: u64,
    #[serde(with = "humantime_serde")]
    pub call_timeout: Duration,
    pub max_output_bytes: u64,
    /// The most memory any manifest may ask for.
    pub max_memory_mib: u64,
    /// Use the pooling instance allocator.
    pub pooling: bool,
    /// The instance pool: how many plugin instances may be alive at once.
    /// Calls beyond it wait their turn.
    pub instances: u32,
    /// How many instances of tools that ask for reuse (`[instances]` in
    /// their manifest) may wait warm between calls, host-wide; each holds
    /// one of `instances` and its memory while it waits. At most half of
    /// `instances`; 0 turns reuse off.
    pub warm_instances: u32,
    /// How many plugin calls may compute at once; by default two per core.
    /// Calls beyond it wait their turn.
    pub concurrent_calls: usize,
    /// The longest a plugin may take to load (compile and describe itself),
    /// whatever its manifest asks; loads run in the background meanwhile.
    #[serde(with = "humantime_serde")]
    pub max_load_time: Duration,
    /// How many replaced or removed versions of one plugin stay loaded for
    /// the tasks still running on them.
    pub max_old_versions: usize,
    /// How many compiled components of versions no longer loaded the
    /// compile cache keeps, beside those loaded.
    pub compile_cache_history: usize,
    /// How long a task waits for a plugin it names that is not loaded
    /// (removed, or being replaced) before it fails.
    #[serde(with = "humantime_serde")]
    pub missing_plugin_grace: Duration,
}

/// The default limit on tasks running at once on a host.
const DEFAULT_MAX_RUNNING_TASKS: usize = 10_000;

/// The top-level keys, as environment variables may set them.
const KEYS: &[&str] = &[
    "addr",
    "data_dir",
    "plugin_dir",
    "cache_dir",
    "database_url",
    "max_running_tasks",
    "workers",
    "max_queued_tasks",
    "max_queued_per_tenant",
    "lease",
    "max_body_bytes",
    "http",
    "watch_plugins",
    "retention",
    "prune_interval",
    "defaults",
    "plugins",
    "policy",
    "auth",
    "mcp",
    "metrics",
    "traces",
    "grpc",
    "schedules",
    "prices",
    "budgets",
    "approvals",
    "threads",
    "events",
    "memory",
];

/// Whether `OPSPAWN_<key>` names a setting (`DATA_DIR`, `DEFAULTS__LLM`).
fn is_config_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    KEYS.iter().any(|known| {
        key == *known
            || key
                .strip_prefix(known)
                .is_some_and(|rest| rest.starts_with("__") || rest.starts_with('.'))
    })
}

impl Default for Config {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("opspawn-data"),
            plugin_dir: None,
            cache_dir: None,
            database_url: None,
            max_running_tasks: DEFAULT_MAX_RUNNING_TASKS,
            workers: None,
            max_queued_tasks: 100_000,
            max_queued_per_tenant: None,
            lease: Duration::from_secs(30),
            max_body_bytes: 1 << 20,
            http: HttpLimits::default(),
            watch_plugins: true,
            retention: Duration::from_secs(30 * 24 * 3600),
            prune_interval: Duration::from_secs(3600),
            defaults: TaskDefaults {
                planner: "react".into(),
                llm: "scripted".into(),
                model: None,
                tools: None,
                max_steps: 20,
                max_retries: 2,
                timeout: Duration::from_secs(300),
            },
            plugins: PluginDefaults {
                memory_mib: 64,
                call_timeout: Duration::from_secs(10),
                max_output_bytes: 1 << 20,
                max_memory_mib: 1024,
                pooling: true,
                instances: EngineOptions::default().max_instances,
                warm_instances: EngineOptions::default().max_idle_instances,
                concurrent_calls: crate::plugins::default_concurrent_calls(),
                max_load_time: Duration::from_secs(120),
                max_old_versions: 4,
                compile_cache_history: 8,
                missing_plugin_grace: Duration::from_secs(60),
            },
            policy: OperatorPolicy::default(),
            auth: AuthConfig::default(),
            mcp: McpConfig::default(),
            metrics: MetricsConfig::default(),
            schedules: ScheduleConfig::default(),
            traces: TracesConfig::default(),
            grpc: GrpcConfig::default(),
            prices: crate::budgets::default_prices(),
            budgets: BudgetsConfig::default(),
            approvals: ApprovalsConfig::default(),
            threads: ThreadsConfig::default(),
            events: EventsConfig::default(),
            memory: MemoryConfig::default(),
        }
    }
}

impl Config {
    /// Layers the sources. `file` is read if given (it must then exist);
    /// `overrides` are flags from the command line.
    pub fn load(file: Option<&Path>, overrides: Figment) -> Result<Self, Box<figment::Error>> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(Box::new(figment::Error::from(format!(
                    "the configuration file {} does not exist",
                    file.display()
                ))));
            }
            figment = figment.merge(Toml::file(file));
        }
        // Only keys this file knows: the CLI reads other OPSPAWN_ variables.
        let env = Env::prefixed("OPSPAWN_")
            .split("__")
            .filter(|key| is_config_key(key.as_str()));
        let mut config: Self = figment
            .merge(env)
            .merge(overrides)
            .extract()
            .map_err(Box::new)?;
        if let Some(workers) = config.workers
            && config.max_running_tasks == DEFAULT_MAX_RUNNING_TASKS
        {
            config.max_running_tasks = workers;
        }
        Ok(config)
    }

    /// Warnings about settings that still work but will not for long.
    pub fn deprecations(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.workers.is_some() {
            warnings.push(
                "`workers` (OPSPAWN_WORKERS, --workers) is deprecated: tasks no longer hold a \
                 worker while they run; set `max_running_tasks` \
                 (OPSPAWN_MAX_RUNNING_TASKS, --max-running-tasks) instead"
                    .to_owned(),
            );
        }
        warnings
    }

    pub fn queue_limits(&self) -> QueueLimits {
        QueueLimits {
            max_queued_tasks: self.max_queued_tasks,
            max_queued_per_tenant: self.max_queued_per_tenant,
        }
    }

    pub fn plugin_dir(&self) -> PathBuf {
        self.plugin_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("plugins"))
    }

    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("opspawn.db").display()))
    }

    pub fn runtime_options(&self) -> RuntimeOptions {
        RuntimeOptions {
            plugin_dir: self.plugin_dir(),
            cache_dir: Some(
                self.cache_dir
                    .clone()
                    .unwrap_or_else(|| self.data_dir.join("cache")),
            ),
            default_limits: Limits {
                memory_bytes: self.plugins.memory_mib << 20,
                call_timeout: self.plugins.call_timeout,
                max_output_bytes: self.plugins.max_output_bytes,
                ..Limits::default()
            },
            policy: self.policy.clone(),
            engine: EngineOptions {
                pooling: self.plugins.pooling,
                max_memory_bytes: self.plugins.max_memory_mib << 20,
                max_instances: self.plugins.instances.max(1),
                max_idle_instances: self.plugins.warm_instances.min(self.plugins.instances / 2),
            },
            concurrent_calls: self.plugins.concurrent_calls,
            server_env: std::env::vars_os()
                .filter_map(|(key, _)| key.into_string().ok())
                .filter(|key| key.strip_prefix("OPSPAWN_").is_some_and(is_config_key))
                // What MCP servers are given or draw credentials from is
                // theirs alone: no plugin reads it.
                .chain(self.mcp.secret_variables())
                .collect(),
            server_dirs: [Some(self.data_dir.clone()), self.cache_dir.clone()]
                .into_iter()
                .flatten()
                .collect(),
            max_load_time: self.plugins.max_load_time,
            max_old_versions: self.plugins.max_old_versions,
            compile_cache_history: self.plugins.compile_cache_history,
            missing_plugin_grace: self.plugins.missing_plugin_grace,
            separate_tenants: !self.auth.tokens.is_empty(),
            stream_batch_window: crate::plugins::stream_batch_window(self.events.delta_interval),
        }
    }

    /// The prices and caps, checked: a negative or absurd price or cap is
    /// an error at start-up, not a budget silently ignored.
    pub fn budgets(&self) -> Result<Budgets, String> {
        Budgets::new(&self.prices, &self.budgets)
    }

    pub fn scheduler_config(&self, budgets: std::sync::Arc<Budgets>) -> SchedulerConfig {
        SchedulerConfig {
            max_running_tasks: self.max_running_tasks,
            lease: self.lease,
            trace_content: self.traces.record_content,
            budgets,
            approvals: std::sync::Arc::new(self.approvals.clone()),
            threads: self.threads.clone(),
            events: self.events.clone(),
            memory: self.memory.clone(),
            ..SchedulerConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(flags: serde_json::Value) -> Config {
        Config::load(None, Figment::from(Serialized::globals(flags))).unwrap()
    }

    #[test]
    fn workers_is_a_deprecated_alias_of_max_running_tasks() {
        let defaults = load(serde_json::json!({}));
        assert_eq!(defaults.max_running_tasks, DEFAULT_MAX_RUNNING_TASKS);
        assert!(defaults.deprecations().is_empty());

        let old = load(serde_json::json!({"workers": 3}));
        assert_eq!(old.max_running_tasks, 3);
        assert_eq!(old.deprecations().len(), 1);

        let both = load(serde_json::json!({"workers": 3, "max_running_tasks": 50}));
        assert_eq!(both.max_running_tasks, 50, "the new name wins");
    }

    #[test]
    fn grpc_is_off_unless_an_address_is_set() {
        assert_eq!(load(serde_json::json!({})).grpc.listen, None);
        let on = load(serde_json::json!({"grpc": {"listen": "127.0.0.1:50051"}}));
        assert_eq!(
            on.grpc.listen,
            Some(SocketAddr::from(([127, 0, 0, 1], 50051)))
        );
        assert!(
            is_config_key("GRPC__LISTEN"),
            "OPSPAWN_GRPC__LISTEN sets it"
        );
        let printed = toml::to_string_pretty(&on).unwrap();
        assert!(
            printed.contains("[grpc]\nlisten = \"127.0.0.1:50051\""),
            "{printed}"
        );
    }

    #[test]
    fn prices_and_budgets_load_print_and_are_checked() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            file.path(),
            r#"
            [prices.openai."gpt-4o-mini"]
            input_per_million = 0.15
            output_per_million = 0.6

            [budgets.default]
            period = "month"
            max_cost_usd = 20

            [budgets.tenants.acme]
            period = "day"
            max_tokens = 100000
            "#,
        )
        .unwrap();
        let config = Config::load(Some(file.path()), Figment::new()).unwrap();
        let budgets = config.budgets().unwrap();
        assert!(
            budgets.price("scripted", Some("any")).is_some(),
            "the scripted adapter stays free beside configured prices"
        );
        assert_eq!(
            budgets
                .price("openai", Some("gpt-4o-mini"))
                .map(|p| (p.input, p.output)),
            Some((150_000_000, 600_000_000))
        );
        assert_eq!(
            budgets.tenant_cap("acme").unwrap().max_tokens,
            Some(100_000)
        );
        let printed = toml::to_string_pretty(&config).unwrap();
        for line in [
            "[prices.openai.gpt-4o-mini]",
            "input_per_million = 0.15",
            "[budgets.tenants.acme]",
            "max_cost_usd = 20.0",
            "default_max_output_tokens = 4096",
        ] {
            assert!(printed.contains(line), "{line:?} in:\n{printed}");
        }
        let negative = load(serde_json::json!({
            "prices": {"openai": {"*": {"input_per_million": -1, "output_per_million": 1}}}
        }));
        assert!(
            negative
                .budgets()
                .unwrap_err()
                .contains("input_per_million")
        );
    }

    #[test]
    fn the_printed_configuration_shows_the_limits() {
        let printed = toml::to_string_pretty(&Config::default()).unwrap();
        for line in ["max_running_tasks = 10000", "max_queued_tasks = 100000"] {
            assert!(printed.contains(line), "{printed}");
        }
        assert!(!printed.contains("workers"), "{printed}");
    }
}
