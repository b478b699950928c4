//! The operator's policy: what plugins may be granted at all, globally and
//! per plugin. A manifest asks; the policy narrows; what is left is granted.
//! Anything refused is recorded, so `GET /v1/plugins` shows what a plugin
//! asked for and did not get.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::manifest::{Limits, Manifest, ReuseScope};

/// `None` in a list means "whatever manifests ask for"; `["*"]` says so
/// explicitly; `[]` refuses everything of that kind.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OperatorPolicy {
    #[serde(flatten)]
    pub all: Allowances,
    /// Narrower rules for single plugins, by name.
    pub plugins: BTreeMap<String, PluginPolicy>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Allowances {
    /// Outbound hosts that may be granted, exactly as manifests write them.
    pub outbound_hosts: Option<Vec<String>>,
    /// Environment variables plugins may read.
    pub env: Option<Vec<String>>,
    /// Environment variables credentials may draw their values from.
    pub secrets: Option<Vec<String>>,
    /// Whether folders may be preopened at all, and read-write.
    pub dirs: Option<bool>,
    pub writable_dirs: Option<bool>,
    /// Folders outside the plugin folder that manifests may grant, with
    /// everything below them. Unlike the other lists these add up: a root
    /// named globally or for the plugin is open to it. Without any, folder
    /// grants stay inside the plugin folder. `/proc`, `/sys`, `/dev` and the
    /// server's own folders are never granted, whatever is named here.
    pub dir_roots: Option<Vec<PathBuf>>,
    /// Whether plugins may send requests to this server's own listen
    /// addresses (its API). Refused unless set to `true`, globally or for
    /// the plugin, and not `false` at the other level.
    pub allow_own_server: Option<bool>,
    /// Whether a tool's instances may be reused across calls when its
    /// manifest asks (`[instances]`); `false` keeps every call on a fresh
    /// instance.
    pub instance_reuse: Option<bool>,
    /// Whether plugins whose manifest asks for long-term memory
    /// (`[capabilities] memory = true`) get it; `false` refuses it.
    pub memory: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PluginPolicy {
    /// `false` keeps the plugin from loading at all.
    pub enabled: Option<bool>,
    #[serde(flatten)]
    pub allow: Allowances,
    pub max_memory_mib: Option<u64>,
    #[serde(with = "humantime_serde")]
    pub max_call_timeout: Option<Duration>,
    pub max_output_bytes: Option<u64>,
    pub max_tools: Option<u64>,
    pub max_describe_bytes: Option<u64>,
    pub max_tool_calls: Option<u64>,
    pub max_log_lines: Option<u64>,
    pub max_log_bytes: Option<u64>,
    pub max_deltas: Option<u64>,
    pub max_resources: Option<u64>,
    pub max_http_fields_bytes: Option<u64>,
    pub max_http_body_chunk_bytes: Option<u64>,
    pub max_folder_bytes: Option<u64>,
    pub max_folder_files: Option<u64>,
}

fn allows(list: &Option<Vec<String>>, item: &str) -> bool {
    list.as_ref()
        .is_none_or(|list| list.iter().any(|allowed| allowed == "*" || allowed == item))
}

impl OperatorPolicy {
    /// Whether the policy lets `plugin` reach `host` (`scheme://host[:port]`)
    /// and send a credential drawn from `secrets`. Used for an adapter's
    /// base URL, which the host itself calls.
    pub fn allows_endpoint(&self, plugin: &str, host: &str, secrets: &[String]) -> bool {
        let scoped = self.plugins.get(plugin).map(|p| &p.allow);
        std::iter::once(&self.all).chain(scoped).all(|rules| {
            allows(&rules.outbound_hosts, host)
                && secrets.iter().all(|name| allows(&rules.secrets, name))
        })
    }

    /// The folders outside the plugin folder that `plugin` may be granted.
    pub fn dir_roots(&self, plugin: &str) -> Vec<PathBuf> {
        let scoped = self.plugins.get(plugin).map(|p| &p.allow);
        std::iter::once(&self.all)
            .chain(scoped)
            .flat_map(|rules| rules.dir_roots.iter().flatten().cloned())
            .collect()
    }

    /// Whether `plugin` may reach this server's own listen addresses.
    pub fn allows_own_server(&self, plugin: &str) -> bool {
        let scoped = self.plugins.get(plugin).map(|p| &p.allow);
        let levels: Vec<Option<bool>> = std::iter::once(&self.all)
            .chain(scoped)
            .map(|rules| rules.allow_own_server)
            .collect();
        levels.contains(&Some(true)) && !levels.contains(&Some(false))
    }

    /// The variables the operator names as secrets, globally or for any
    /// plugin: credentials draw on them, so no plugin reads them as plain
    /// environment.
    pub fn secret_names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(&self.all)
            .chain(self.plugins.values().map(|p| &p.allow))
            .flat_map(|rules| rules.secrets.iter().flatten())
            .map(String::as_str)
            .filter(|name| *name != "*")
    }

    /// Whether the operator lets the plugin load at all.
    pub fn enabled(&self, plugin: &str) -> bool {
        self.plugins
            .get(plugin)
            .and_then(|p| p.enabled)
            .unwrap_or(true)
    }

    /// The manifest with everything the policy refuses taken out, the limits
    /// capped, and a note for each refusal. `secrets` are the variables that
    /// any plugin's credential draws on (or that configure the server): none
    /// is granted as plain environment, whatever the manifest asks.
    pub fn narrow(
        &self,
        plugin: &str,
        manifest: &Manifest,
        limits: Limits,
        secrets: &BTreeSet<String>,
    ) -> (Manifest, Limits, Vec<String>) {
        let scoped = self.plugins.get(plugin);
        let rules: Vec<&Allowances> = std::iter::once(&self.all)
            .chain(scoped.map(|p| &p.allow))
            .collect();
        let allowed = |pick: fn(&Allowances) -> &Option<Vec<String>>, item: &str| {
            rules.iter().all(|rules| allows(pick(rules), item))
        };
        let flag =
            |pick: fn(&Allowances) -> Option<bool>| rules.iter().all(|r| pick(r) != Some(false));

        let mut refused = Vec::new();
        let mut narrowed = manifest.clone();
        let capabilities = &mut narrowed.capabilities;
        capabilities.outbound_hosts.retain(|host| {
            let keep = allowed(|a| &a.outbound_hosts, host);
            if !keep {
                refused.push(format!("outbound host {host}"));
            }
            keep
        });
        capabilities.env.retain(|name| {
            let keep = allowed(|a| &a.env, name);
            if !keep {
                refused.push(format!("environment variable {name}"));
            }
            keep
        });
        let hosts = capabilities.outbound_hosts.clone();
        capabilities.credentials.retain(|credential| {
            let secrets_allowed = super::outbound::template_variables(&credential.value)
                .iter()
                .all(|name| allowed(|a| &a.secrets, name));
            let keep = hosts.contains(&credential.host) && secrets_allowed;
            if !keep {
                refused.push(format!("credential for {}", credential.host));
            }
            keep
        });
        // A secret never becomes readable: a variable that this or any other
        // plugin's credential draws from is not granted as plain environment,
        // whatever the manifest says.
        let own_secrets = manifest.credential_variables();
        capabilities.env.retain(|name| {
            let keep = !secrets.contains(name) && !own_secrets.contains(name);
            if !keep {
                refused.push(format!(
                    "environment variable {name} (it holds a credential or a server setting)"
                ));
            }
            keep
        });
        let dirs_allowed = flag(|a| a.dirs);
        let writable_allowed = flag(|a| a.writable_dirs);
        capabilities.dirs.retain_mut(|dir| {
            if !dirs_allowed {
                refused.push(format!("folder {}", dir.path.display()));
                return false;
            }
            if dir.writable && !writable_allowed {
                refused.push(format!("write access to folder {}", dir.path.display()));
                dir.writable = false;
            }
            true
        });

        if capabilities.memory && !flag(|a| a.memory) {
            refused.push("long-term memory".to_owned());
            capabilities.memory = false;
        }

        if narrowed.instances.reuse != ReuseScope::Call && !flag(|a| a.instance_reuse) {
            refused.push("reuse of instances across calls".to_owned());
            narrowed.instances.reuse = ReuseScope::Call;
        }

        let mut limits = limits;
        if let Some(policy) = scoped {
            if let Some(max) = policy.max_memory_mib.map(|mib| mib << 20)
                && limits.memory_bytes > max
            {
                refused.push(format!("memory above {} MiB", max >> 20));
                limits.memory_bytes = max;
            }
            if let Some(max) = policy.max_call_timeout
                && limits.call_timeout > max
            {
                refused.push(format!("call time above {max:?}"));
                limits.call_timeout = max;
            }
            if let Some(max) = policy.max_output_bytes
                && limits.max_output_bytes > max
            {
                refused.push(format!("output above {max} bytes"));
                limits.max_output_bytes = max;
            }
            if let Some(max) = policy.max_tools
                && limits.max_tools > max
            {
                refused.push(format!("more than {max} tools"));
                limits.max_tools = max;
            }
            if let Some(max) = policy.max_describe_bytes
                && limits.max_describe_bytes > max
            {
                refused.push(format!("describe output above {max} bytes"));
                limits.max_describe_bytes = max;
            }
            if let Some(max) = policy.max_tool_calls
                && limits.max_tool_calls > max
            {
                refused.push(format!("more than {max} tool calls per action"));
                limits.max_tool_calls = max;
            }
            if let Some(max) = policy.max_log_lines
                && limits.max_log_lines > max
            {
                refused.push(format!("more than {max} log lines per call"));
                limits.max_log_lines = max;
            }
            if let Some(max) = policy.max_log_bytes
                && limits.max_log_bytes > max
            {
                refused.push(format!("log lines above {max} bytes per call"));
                limits.max_log_bytes = max;
            }
            if let Some(max) = policy.max_deltas
                && limits.max_deltas > max
            {
                refused.push(format!("more than {max} streamed deltas per call"));
                limits.max_deltas = max;
            }
            if let Some(max) = policy.max_resources
                && limits.max_resources > max
            {
                refused.push(format!("more than {max} resources per call"));
                limits.max_resources = max;
            }
            if let Some(max) = policy.max_http_fields_bytes
                && limits.max_http_fields_bytes > max
            {
                refused.push(format!("HTTP header fields above {max} bytes"));
                limits.max_http_fields_bytes = max;
            }
            if let Some(max) = policy.max_http_body_chunk_bytes
                && limits.max_http_body_chunk_bytes > max
            {
                refused.push(format!("HTTP body writes above {max} bytes"));
                limits.max_http_body_chunk_bytes = max;
            }
            if let Some(max) = policy.max_folder_bytes
                && limits.max_folder_bytes > max
            {
                refused.push(format!("writable folders above {max} bytes"));
                limits.max_folder_bytes = max;
            }
            if let Some(max) = policy.max_folder_files
                && limits.max_folder_files > max
            {
                refused.push(format!("writable folders above {max} entries"));
                limits.max_folder_files = max;
            }
        }
        (narrowed, limits, refused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        toml::from_str(
            r#"
            [capabilities]
            env = ["A", "B"]
            outbound_hosts = ["https://api.openai.com", "https://evil.example"]

            [[capabilities.credentials]]
            host = "https://api.openai.com"
            header = "authorization"
            value = "Bearer ${OPENAI_API_KEY}"

            [[capabilities.dirs]]
            path = "data"
            writable = true
            "#,
        )
        .unwrap()
    }

    fn none() -> BTreeSet<String> {
        BTreeSet::new()
    }

    #[test]
    fn without_a_policy_everything_asked_for_is_granted() {
        let (narrowed, _, refused) =
            OperatorPolicy::default().narrow("p", &manifest(), Limits::default(), &none());
        assert_eq!(narrowed, manifest());
        assert!(refused.is_empty());
    }

    #[test]
    fn the_policy_narrows_globally_and_per_plugin() {
        let policy: OperatorPolicy = toml::from_str(
            r#"
            outbound_hosts = ["https://api.openai.com"]
            writable_dirs = false

            [plugins.p]
            env = ["A"]
            secrets = []
            max_memory_mib = 8
            "#,
        )
        .unwrap();
        let (narrowed, limits, refused) =
            policy.narrow("p", &manifest(), Limits::default(), &none());
        let caps = &narrowed.capabilities;
        assert_eq!(caps.outbound_hosts, ["https://api.openai.com"]);
        assert_eq!(caps.env, ["A"]);
        assert!(caps.credentials.is_empty(), "the secret is not allowed");
        assert!(!caps.dirs[0].writable);
        assert_eq!(limits.memory_bytes, 8 << 20);
        assert_eq!(refused.len(), 5, "{refused:?}");

        let (other, _, _) = policy.narrow("q", &manifest(), Limits::default(), &none());
        assert_eq!(
            other.capabilities.env,
            ["A", "B"],
            "per-plugin rules stay with their plugin"
        );
    }

    #[test]
    fn the_operator_can_keep_every_call_on_a_fresh_instance() {
        let mut manifest = manifest();
        manifest.instances.reuse = ReuseScope::Tenant;
        let (narrowed, _, refused) =
            OperatorPolicy::default().narrow("p", &manifest, Limits::default(), &none());
        assert_eq!(narrowed.instances.reuse, ReuseScope::Tenant);
        assert!(refused.is_empty(), "{refused:?}");

        for policy in [
            "instance_reuse = false",
            "[plugins.p]\ninstance_reuse = false",
        ] {
            let policy: OperatorPolicy = toml::from_str(policy).unwrap();
            let (narrowed, _, refused) = policy.narrow("p", &manifest, Limits::default(), &none());
            assert_eq!(narrowed.instances.reuse, ReuseScope::Call, "{policy:?}");
            assert_eq!(refused, ["reuse of instances across calls"]);
        }
    }

    #[test]
    fn a_credential_variable_is_never_plain_environment() {
        let mut manifest = manifest();
        manifest.capabilities.env.push("OPENAI_API_KEY".into());
        let (narrowed, _, refused) =
            OperatorPolicy::default().narrow("p", &manifest, Limits::default(), &none());
        assert_eq!(narrowed.capabilities.env, ["A", "B"]);
        assert_eq!(
            narrowed.capabilities.credentials.len(),
            1,
            "the credential stays"
        );
        assert!(refused[0].contains("OPENAI_API_KEY"), "{refused:?}");
    }

    #[test]
    fn another_plugins_credential_variable_is_never_plain_environment() {
        let mut manifest = manifest();
        manifest.capabilities.env.push("ANTHROPIC_API_KEY".into());
        let secrets = BTreeSet::from(["ANTHROPIC_API_KEY".to_owned()]);
        let (narrowed, _, refused) =
            OperatorPolicy::default().narrow("p", &manifest, Limits::default(), &secrets);
        assert_eq!(narrowed.capabilities.env, ["A", "B"]);
        assert!(refused[0].contains("ANTHROPIC_API_KEY"), "{refused:?}");
    }

    #[test]
    fn the_operators_secrets_roots_and_own_server_rule() {
        let policy: OperatorPolicy = toml::from_str(
            r#"
            secrets = ["OPENAI_API_KEY", "*"]
            dir_roots = ["/srv/shared"]

            [plugins.p]
            secrets = ["GEMINI_API_KEY"]
            dir_roots = ["/srv/p"]
            allow_own_server = true

            [plugins.q]
            allow_own_server = false
            "#,
        )
        .unwrap();
        let secrets: Vec<&str> = policy.secret_names().collect();
        assert_eq!(secrets, ["OPENAI_API_KEY", "GEMINI_API_KEY"]);
        assert_eq!(
            policy.dir_roots("p"),
            [PathBuf::from("/srv/shared"), PathBuf::from("/srv/p")]
        );
        assert_eq!(policy.dir_roots("q"), [PathBuf::from("/srv/shared")]);
        assert!(policy.allows_own_server("p"));
        assert!(!policy.allows_own_server("q"));
        assert!(!policy.allows_own_server("r"), "refused unless allowed");
        assert!(!OperatorPolicy::default().allows_own_server("p"));
    }

    #[test]
    fn the_policy_caps_what_plugins_make_the_host_hold() {
        let policy: OperatorPolicy = toml::from_str(
            r#"
            [plugins.p]
            max_tools = 10
            max_describe_bytes = 1000
            max_tool_calls = 4
            max_log_lines = 5
            max_log_bytes = 500
            max_deltas = 6
            max_http_body_chunk_bytes = 4096
            max_folder_bytes = 1000000
            max_folder_files = 50
            "#,
        )
        .unwrap();
        let manifest: Manifest = toml::from_str(
            r#"
            [limits]
            max_tools = 1000
            max_describe_bytes = 100
            max_tool_calls = 100
            max_log_lines = 100
            max_log_bytes = 100000
            max_deltas = 3
            max_folder_bytes = 2000000
            "#,
        )
        .unwrap();
        let requested = Limits::default().with_requested(&manifest.limits);
        assert_eq!(requested.max_tools, 1000, "the manifest raises a default");
        let (_, limits, refused) = policy.narrow("p", &manifest, requested, &none());
        assert_eq!(limits.max_tools, 10);
        assert_eq!(limits.max_describe_bytes, 100, "under the cap: as asked");
        assert_eq!(limits.max_tool_calls, 4);
        assert_eq!(limits.max_log_lines, 5);
        assert_eq!(limits.max_log_bytes, 500);
        assert_eq!(limits.max_deltas, 3);
        assert_eq!(limits.max_folder_bytes, 1_000_000, "capped");
        assert_eq!(limits.max_folder_files, 50, "the default, capped");
        assert_eq!(limits.max_http_body_chunk_bytes, 4096);
        assert_eq!(refused.len(), 7, "{refused:?}");
        let (_, defaults, _) =
            OperatorPolicy::default().narrow("p", &Manifest::default(), Limits::default(), &none());
        assert_eq!(
            (
                defaults.max_tools,
                defaults.max_describe_bytes,
                defaults.max_tool_calls
            ),
            (256, 1 << 20, 64)
        );
        assert_eq!(
            (
                defaults.max_log_lines,
                defaults.max_log_bytes,
                defaults.max_deltas
            ),
            (1000, 256 << 10, 10_000)
        );
    }

    #[test]
    fn a_plugin_can_be_disabled() {
        let policy: OperatorPolicy = toml::from_str("[plugins.p]\nenabled = false\n").unwrap();
        assert!(!policy.enabled("p"));
        assert!(policy.enabled("q"));
    }
}
