//! The operator's policy: what plugins may be granted at all, globally and
//! per plugin. A manifest asks; the policy narrows; what is left is granted.
//! Anything refused is recorded, so `GET /v1/plugins` shows what a plugin
//! asked for and did not get.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::manifest::{Limits, Manifest};

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

    /// Whether the operator lets the plugin load at all.
    pub fn enabled(&self, plugin: &str) -> bool {
        self.plugins
            .get(plugin)
            .and_then(|p| p.enabled)
            .unwrap_or(true)
    }

    /// The manifest with everything the policy refuses taken out, the limits
    /// capped, and a note for each refusal.
    pub fn narrow(
        &self,
        plugin: &str,
        manifest: &Manifest,
        limits: Limits,
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
        // A secret never becomes readable: a variable a credential draws
        // from is not granted as plain environment, whatever the manifest says.
        let adapter_credential = manifest
            .adapter
            .as_ref()
            .and_then(|a| a.credential.as_ref());
        let secrets: Vec<String> = capabilities
            .credentials
            .iter()
            .map(|c| c.value.as_str())
            .chain(adapter_credential.map(|c| c.value.as_str()))
            .flat_map(super::outbound::template_variables)
            .collect();
        capabilities.env.retain(|name| {
            let keep = !secrets.contains(name);
            if !keep {
                refused.push(format!(
                    "environment variable {name} (it holds a credential)"
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

    #[test]
    fn without_a_policy_everything_asked_for_is_granted() {
        let (narrowed, _, refused) =
            OperatorPolicy::default().narrow("p", &manifest(), Limits::default());
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
        let (narrowed, limits, refused) = policy.narrow("p", &manifest(), Limits::default());
        let caps = &narrowed.capabilities;
        assert_eq!(caps.outbound_hosts, ["https://api.openai.com"]);
        assert_eq!(caps.env, ["A"]);
        assert!(caps.credentials.is_empty(), "the secret is not allowed");
        assert!(!caps.dirs[0].writable);
        assert_eq!(limits.memory_bytes, 8 << 20);
        assert_eq!(refused.len(), 5, "{refused:?}");

        let (other, _, _) = policy.narrow("q", &manifest(), Limits::default());
        assert_eq!(
            other.capabilities.env,
            ["A", "B"],
            "per-plugin rules stay with their plugin"
        );
    }

    #[test]
    fn a_credential_variable_is_never_plain_environment() {
        let mut manifest = manifest();
        manifest.capabilities.env.push("OPENAI_API_KEY".into());
        let (narrowed, _, refused) =
            OperatorPolicy::default().narrow("p", &manifest, Limits::default());
        assert_eq!(narrowed.capabilities.env, ["A", "B"]);
        assert_eq!(
            narrowed.capabilities.credentials.len(),
            1,
            "the credential stays"
        );
        assert!(refused[0].contains("OPENAI_API_KEY"), "{refused:?}");
    }

    #[test]
    fn a_plugin_can_be_disabled() {
        let policy: OperatorPolicy = toml::from_str("[plugins.p]\nenabled = false\n").unwrap();
        assert!(!policy.enabled("p"));
        assert!(policy.enabled("q"));
    }
}
