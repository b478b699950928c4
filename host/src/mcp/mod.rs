//! MCP (the Model Context Protocol), through the official Rust SDK `rmcp`.
//!
//! [`client`]: the host as an MCP client. The operator lists external MCP
//! servers under `[[mcp.servers]]`; their tools join the plugin runtime's
//! catalog under namespaced names (`github__create_issue`) and run as
//! journaled steps like a component's.
//!
//! [`server`]: Opspawn as an MCP server, over the REST API: `/mcp`
//! (streamable HTTP) and `opspawn mcp` (stdio).

pub mod client;
pub mod server;

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use client::McpClients;

use crate::plugins::EXTERNAL_SEPARATOR;

/// The `[mcp]` section of the configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpConfig {
    /// External MCP servers whose tools join the registry.
    #[serde(default)]
    pub servers: Vec<ServerConfig>,
}

/// One `[[mcp.servers]]` entry: a stdio server (`command`) or a streamable
/// HTTP one (`url`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Names its tools: `<name>__<tool>`. Letters, digits, `-` and single
    /// `_`, at most 32.
    pub name: String,
    /// stdio: the program to start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// stdio: its working directory (the server's own by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<PathBuf>,
    /// stdio: the variables it is given, by name, from the host's own
    /// environment. It gets these and `PATH`, nothing else.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// Streamable HTTP: the endpoint, such as `https://example.com/mcp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Streamable HTTP over https: certificates (PEM) to trust for this
    /// server besides the Mozilla roots, for one whose certificate a private
    /// certificate authority signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Streamable HTTP: headers the host adds to every request, as for
    /// plugins: `value` may draw on the host's environment (`Bearer
    /// ${GITHUB_TOKEN}`). Planners, LLMs and plugins never see them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub credentials: Vec<HeaderCredential>,
    /// The server's tool names to offer (all if empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_tools: Vec<String>,
    /// The server's tool names never to offer; wins over `allow_tools`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_tools: Vec<String>,
    /// The longest one tool call may take; past it the step fails with
    /// `mcp_timeout`, which is retried under the task's retry budget.
    #[serde(default = "default_call_timeout", with = "humantime_serde")]
    pub call_timeout: Duration,
    /// Calls in flight to this server at once; more wait their turn.
    #[serde(default = "default_max_concurrent_calls")]
    pub max_concurrent_calls: usize,
    /// The largest result (or error) a call may return, in bytes.
    #[serde(default = "default_max_output_bytes")]
    pub max_output_bytes: u64,
    /// The first wait before starting a server again after it exited or
    /// could not be reached; doubled at each failure, up to a minute.
    #[serde(default = "default_restart_delay", with = "humantime_serde")]
    pub restart_delay: Duration,
}

/// A header the host adds to a streamable HTTP server's requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderCredential {
    pub header: String,
    /// `${VAR}` is replaced by the host's environment variable `VAR`.
    pub value: String,
}

fn default_call_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_max_concurrent_calls() -> usize {
    16
}

fn default_max_output_bytes() -> u64 {
    1 << 20
}

fn default_restart_delay() -> Duration {
    Duration::from_secs(1)
}

impl McpConfig {
    /// Every environment variable an MCP server is given or draws a
    /// credential from: the plugin runtime withholds them from every plugin.
    pub fn secret_variables(&self) -> Vec<String> {
        let mut variables = Vec::new();
        for server in &self.servers {
            variables.extend(server.env.iter().cloned());
            for credential in &server.credentials {
                variables.extend(template_variables(&credential.value));
            }
        }
        variables.sort();
        variables.dedup();
        variables
    }
}

impl ServerConfig {
    /// What is wrong with this entry, if anything.
    pub fn problem(&self) -> Option<String> {
        let name = &self.name;
        let valid_chars = name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if name.is_empty()
            || name.len() > 32
            || !valid_chars
            || name.contains(EXTERNAL_SEPARATOR)
            || name.ends_with('_')
        {
            return Some(format!(
                "MCP server name {name:?} must be 1 to 32 letters, digits, '-' or single '_' \
                 (not ending in '_'): it prefixes its tools' names as <name>__<tool>"
            ));
        }
        match (&self.command, &self.url) {
            (Some(_), Some(_)) => Some(format!(
                "MCP server {name:?} has both a command (stdio) and a url (HTTP); give one"
            )),
            (None, None) => Some(format!(
                "MCP server {name:?} needs a command (stdio) or a url (streamable HTTP)"
            )),
            (Some(_), None) if !self.credentials.is_empty() => Some(format!(
                "MCP server {name:?}: credentials are HTTP headers, for a url; give a stdio \
                 server its secrets with env"
            )),
            (None, Some(url)) if !url.starts_with("http://") && !url.starts_with("https://") => {
                Some(format!(
                    "MCP server {name:?}: url {url:?} must start with https:// or http://"
                ))
            }
            (None, Some(url)) if self.ca_file.is_some() && !url.starts_with("https://") => Some(
                format!("MCP server {name:?}: ca_file is for an https url, and {url:?} is not one"),
            ),
            (Some(_), None) if self.ca_file.is_some() => Some(format!(
                "MCP server {name:?}: ca_file is for an https url, not a stdio server"
            )),
            (None, Some(_)) if !self.env.is_empty() || !self.args.is_empty() => Some(format!(
                "MCP server {name:?}: env and args are for a stdio server (command)"
            )),
            _ => None,
        }
    }

    /// Whether the operator offers the server's tool `tool`.
    pub fn offers(&self, tool: &str) -> bool {
        (self.allow_tools.is_empty() || self.allow_tools.iter().any(|t| t == tool))
            && !self.deny_tools.iter().any(|t| t == tool)
    }
}

/// The variables a `${VAR}` template reads.
fn template_variables(template: &str) -> Vec<String> {
    template
        .split("${")
        .skip(1)
        .filter_map(|part| part.split_once('}').map(|(name, _)| name.to_owned()))
        .collect()
}

/// A `${VAR}` template with each variable read from the host's environment,
/// or the first variable that is unset.
fn render_template(template: &str) -> Result<String, String> {
    let mut value = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("${") {
        value.push_str(&rest[..start]);
        let Some(end) = rest[start..].find('}').map(|end| end + start) else {
            break;
        };
        let name = &rest[start + 2..end];
        value.push_str(&std::env::var(name).map_err(|_| name.to_owned())?);
        rest = &rest[end + 1..];
    }
    value.push_str(rest);
    Ok(value)
}

/// The longest tool name providers accept (`^[a-zA-Z0-9_-]{1,64}$`).
const MAX_TOOL_NAME: usize = 64;

/// The catalog name of `server`'s tool `tool`: `<server>__<tool>`, with
/// characters providers refuse replaced by `_`, and cut to 64 with a hash
/// of the original name when longer, so it fits every provider's rule and
/// two tools never share one.
pub fn namespaced(server: &str, tool: &str) -> String {
    let clean: String = tool
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let name = format!("{server}{EXTERNAL_SEPARATOR}{clean}");
    if name.len() <= MAX_TOOL_NAME && clean == tool {
        return name;
    }
    // Changed or cut: a hash of the original keeps it apart from others.
    let hash = hex::encode(&Sha256::digest(tool.as_bytes())[..4]);
    let keep = name.len().min(MAX_TOOL_NAME - hash.len() - 1);
    format!("{}_{hash}", &name[..keep])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(name: &str) -> bool {
        !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    }

    #[test]
    fn namespaced_names_fit_the_providers_rule_and_stay_apart() {
        assert_eq!(namespaced("github", "create_issue"), "github__create_issue");
        assert_eq!(namespaced("everything", "get-sum"), "everything__get-sum");
        let dotted = namespaced("fs", "files.read");
        let slashed = namespaced("fs", "files/read");
        assert!(valid(&dotted) && valid(&slashed), "{dotted} {slashed}");
        assert_ne!(dotted, slashed, "tools whose names clean alike stay apart");
        let long = "x".repeat(120);
        let cut = namespaced("server", &long);
        assert!(valid(&cut), "{cut}");
        assert_ne!(cut, namespaced("server", &"x".repeat(121)));
    }

    fn server(name: &str) -> ServerConfig {
        toml::from_str(&format!("name = {name:?}\ncommand = \"x\"")).unwrap()
    }

    #[test]
    fn server_names_cannot_make_names_collide() {
        assert!(server("github").problem().is_none());
        assert!(server("my_server-2").problem().is_none());
        for bad in ["", "a__b", "a_", "a.b", &"x".repeat(33)] {
            assert!(server(bad).problem().is_some(), "{bad:?} is refused");
        }
    }

    #[test]
    fn urls_are_https_or_http_and_a_ca_file_goes_with_https() {
        let entry = |toml: &str| -> ServerConfig { toml::from_str(toml).unwrap() };
        let https = entry("name = \"s\"\nurl = \"https://mcp.example.com/mcp\"");
        assert!(https.problem().is_none(), "{:?}", https.problem());
        let private = entry("name = \"s\"\nurl = \"https://10.0.0.5/mcp\"\nca_file = \"ca.pem\"");
        assert!(private.problem().is_none(), "{:?}", private.problem());
        let plain = entry("name = \"s\"\nurl = \"http://127.0.0.1:9/mcp\"");
        assert!(plain.problem().is_none());
        let problem = entry("name = \"s\"\nurl = \"http://127.0.0.1:9/mcp\"\nca_file = \"ca.pem\"")
            .problem()
            .unwrap();
        assert!(problem.contains("ca_file is for an https url"), "{problem}");
        let problem = entry("name = \"s\"\nurl = \"ftp://example.com\"")
            .problem()
            .unwrap();
        assert!(problem.contains("must start with https://"), "{problem}");
    }

    #[test]
    fn a_ca_file_must_hold_a_certificate() {
        let empty = tempfile::NamedTempFile::new().unwrap();
        let error = crate::plugins::outbound::tls_config(Some(empty.path())).unwrap_err();
        assert!(error.contains("holds no PEM certificate"), "{error}");
        let error =
            crate::plugins::outbound::tls_config(Some(std::path::Path::new("/nonexistent/ca.pem")))
                .unwrap_err();
        assert!(error.contains("cannot read ca_file"), "{error}");
        assert!(crate::plugins::outbound::tls_config(None).is_ok());
    }

    #[test]
    fn deny_wins_over_allow() {
        let mut config = server("s");
        assert!(config.offers("anything"));
        config.allow_tools = vec!["a".into(), "b".into()];
        config.deny_tools = vec!["b".into()];
        assert!(config.offers("a"));
        assert!(!config.offers("b"));
        assert!(!config.offers("c"));
    }
}
