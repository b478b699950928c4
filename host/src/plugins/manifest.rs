//! The manifest beside a component (`calculator.toml` beside
//! `calculator.wasm`): what the plugin asks for. A plugin without one asks
//! for nothing and gets the default limits.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::http::HeaderName;
use serde::{Deserialize, Serialize};

use crate::approvals::ApprovalRule;

use super::host_http::{HttpProtocol, Transport};
use super::outbound::{Credential, HostGrant, OutboundPolicy, ServerAddresses, template_variables};

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    #[serde(default)]
    pub plugin: PluginSection,
    #[serde(default)]
    pub limits: RequestedLimits,
    #[serde(default)]
    pub capabilities: Capabilities,
    /// For LLM adapters: where the host sends their requests, with which
    /// credential, and the settings handed to the adapter.
    pub adapter: Option<AdapterSection>,
    /// For tools: whether an instance may serve more than one call.
    #[serde(default)]
    pub instances: InstancesSection,
    /// For tools: `[[approvals]]`, the plugin's own calls that need a
    /// person's approval (a tool of the plugin, or `*` for all of them,
    /// optionally with conditions on the arguments). The operator's
    /// `[[approvals.rules]]` add to these; they never take one away.
    #[serde(default)]
    pub approvals: Vec<ApprovalRule>,
}

/// `[instances]`: by default every call gets a fresh instance, so nothing a
/// call leaves in memory reaches the next one. A tool whose runtime is slow
/// to start (an interpreter) may ask for its instances to be kept warm and
/// reused, within one task or one tenant, never across tenants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InstancesSection {
    pub reuse: ReuseScope,
    /// Calls one instance serves before a fresh one takes its place.
    pub max_calls: u32,
    /// How long an instance may wait unused before it is dropped.
    pub max_idle_ms: u64,
}

impl Default for InstancesSection {
    fn default() -> Self {
        Self {
            reuse: ReuseScope::Call,
            max_calls: 1000,
            max_idle_ms: 60_000,
        }
    }
}

/// Which calls may share an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReuseScope {
    /// None: a fresh instance for every call.
    Call,
    /// The calls of one task.
    Task,
    /// The calls of one tenant's tasks.
    Tenant,
}

/// How a plugin's instances are reused, once granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct InstanceReuse {
    pub scope: ReuseScope,
    pub max_calls: u32,
    #[serde(rename = "max_idle_ms", serialize_with = "as_millis")]
    pub max_idle: Duration,
}

fn as_millis<S: serde::Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_u64(duration.as_millis() as u64)
}

impl InstancesSection {
    /// The reuse asked for, if any, checked.
    pub fn reuse(&self) -> Result<Option<InstanceReuse>, String> {
        if self.reuse == ReuseScope::Call {
            return Ok(None);
        }
        if self.max_calls < 2 {
            return Err(format!(
                "[instances] max_calls must be at least 2 when instances are reused, not {}",
                self.max_calls
            ));
        }
        if !(1..=3_600_000).contains(&self.max_idle_ms) {
            return Err(format!(
                "[instances] max_idle_ms must be from 1 to 3600000 (an hour), not {}",
                self.max_idle_ms
            ));
        }
        Ok(Some(InstanceReuse {
            scope: self.reuse,
            max_calls: self.max_calls,
            max_idle: Duration::from_millis(self.max_idle_ms),
        }))
    }
}

/// `[adapter]`: the endpoint an LLM adapter's requests go to. The grant for
/// its host and the credential follow from `base_url`; the adapter itself
/// gets no network access from it, since the host sends its requests.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterSection {
    /// `https://api.openai.com/v1`; `${VAR}` and `${VAR:-default}` read the
    /// server's environment when the plugin loads.
    pub base_url: Option<String>,
    pub credential: Option<AdapterCredential>,
    /// Which HTTP to speak: `auto` (HTTP/2 where TLS negotiates it, else
    /// HTTP/1.1), `http1` or `http2` (over cleartext by prior knowledge).
    #[serde(default)]
    pub protocol: HttpProtocol,
    /// Certificates (PEM) to trust besides the Mozilla roots, for an https
    /// endpoint whose certificate a private authority signed. `${VAR}` and
    /// `${VAR:-default}` are expanded; empty means none.
    pub ca_file: Option<String>,
    /// Handed to the adapter with every request, as a JSON object.
    #[serde(default)]
    pub settings: toml::Table,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterCredential {
    pub header: String,
    /// The value; `${VAR}` is replaced by the server's environment variable.
    pub value: String,
    /// Send requests without it when a variable it needs is unset (local
    /// servers that need no key); otherwise such a request fails at once
    /// with `llm_auth`, naming the variable.
    #[serde(default)]
    pub optional: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSection {
    /// Overrides the name taken from the file name.
    pub name: Option<String>,
    pub description: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestedLimits {
    pub memory_mib: Option<u64>,
    pub call_timeout_ms: Option<u64>,
    pub max_output_bytes: Option<u64>,
    /// For tools: the most tools `describe` may return.
    pub max_tools: Option<u64>,
    /// For tools: the most bytes `describe` may return (names,
    /// descriptions and input schemas together).
    pub max_describe_bytes: Option<u64>,
    /// For planners: the most tool calls in one action.
    pub max_tool_calls: Option<u64>,
    /// The most log lines one call may write, and their bytes.
    pub max_log_lines: Option<u64>,
    pub max_log_bytes: Option<u64>,
    /// For LLM adapters: the most streamed text deltas one call may send.
    pub max_deltas: Option<u64>,
    /// The most resources (files, streams, HTTP fields and requests...) one
    /// call may hold at once.
    pub max_resources: Option<u64>,
    /// The most bytes one set of `wasi:http` header fields may hold.
    pub max_http_fields_bytes: Option<u64>,
    /// The most bytes of one `wasi:http` write to a request body.
    pub max_http_body_chunk_bytes: Option<u64>,
    /// What the plugin may keep in its writable folders, per tenant: bytes
    /// of file contents, and entries (files, folders, links).
    pub max_folder_bytes: Option<u64>,
    pub max_folder_files: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    /// Environment variables the plugin may read, by name.
    #[serde(default)]
    pub env: Vec<String>,
    /// Directories to preopen, relative to the plugin folder.
    #[serde(default)]
    pub dirs: Vec<DirRequest>,
    /// Outbound hosts as `scheme://host[:port]`, `*.domain` and port `*`
    /// allowed; enforced for `wasi:http` on the resolved address.
    #[serde(default)]
    pub outbound_hosts: Vec<String>,
    /// Headers the host adds to requests for a granted host, such as an API
    /// key; the plugin never sees them.
    #[serde(default)]
    pub credentials: Vec<CredentialRequest>,
    /// Long-term memory (the WIT interface `memory`), kept by the host for
    /// the task's tenant and memory namespace. Tools and planners only.
    #[serde(default)]
    pub memory: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialRequest {
    /// One of the outbound hosts, such as `https://api.openai.com`.
    pub host: String,
    pub header: String,
    /// The value; `${VAR}` is replaced by the host's environment variable.
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirRequest {
    /// Host path; relative paths are relative to the plugin folder.
    pub path: PathBuf,
    /// Where the guest sees it; defaults to `/` followed by the last path component.
    pub guest_path: Option<String>,
    #[serde(default)]
    pub writable: bool,
}

/// The limits one call of a plugin runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Limits {
    pub memory_bytes: u64,
    #[serde(with = "humantime_serde")]
    pub call_timeout: Duration,
    /// Also bounds the bytes of a planner's action.
    pub max_output_bytes: u64,
    /// The most tools a tool plugin's `describe` may return.
    pub max_tools: u64,
    /// The most bytes its `describe` may return.
    pub max_describe_bytes: u64,
    /// The most tool calls in one action of a planner.
    pub max_tool_calls: u64,
    /// The most log lines one call may write; more are dropped, with a note.
    pub max_log_lines: u64,
    /// The most bytes of log lines one call may write.
    pub max_log_bytes: u64,
    /// The most text deltas one LLM call may stream; their bytes are bounded
    /// by `max_output_bytes`. More are dropped, with a note.
    pub max_deltas: u64,
    /// The most entries the call's resource table may hold at once.
    pub max_resources: u64,
    /// The most bytes (as `wasi:http` counts them in memory) one set of
    /// HTTP header fields may hold.
    pub max_http_fields_bytes: u64,
    /// The most bytes of one write to a `wasi:http` request body; the host
    /// buffers at most two such writes per body until the request is sent.
    pub max_http_body_chunk_bytes: u64,
    /// The most bytes of file contents the plugin may keep in its writable
    /// folders (each tenant's apart); a write past it fails with
    /// `insufficient-space`, and the call with `plugin_folder_quota`.
    pub max_folder_bytes: u64,
    /// The most entries (files, folders, links) it may keep there.
    pub max_folder_files: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_bytes: 64 << 20,
            call_timeout: Duration::from_secs(10),
            max_output_bytes: 1 << 20,
            max_tools: 256,
            max_describe_bytes: 1 << 20,
            max_tool_calls: 64,
            max_log_lines: 1000,
            max_log_bytes: 256 << 10,
            max_deltas: 10_000,
            max_resources: 2048,
            max_http_fields_bytes: 32 << 10,
            max_http_body_chunk_bytes: 64 << 10,
            max_folder_bytes: 64 << 20,
            max_folder_files: 10_000,
        }
    }
}

impl Limits {
    /// The requested limits where given, else these.
    pub fn with_requested(self, requested: &RequestedLimits) -> Self {
        Self {
            memory_bytes: requested
                .memory_mib
                .map_or(self.memory_bytes, |mib| mib << 20),
            call_timeout: requested
                .call_timeout_ms
                .map_or(self.call_timeout, Duration::from_millis),
            max_output_bytes: requested.max_output_bytes.unwrap_or(self.max_output_bytes),
            max_tools: requested.max_tools.unwrap_or(self.max_tools),
            max_describe_bytes: requested
                .max_describe_bytes
                .unwrap_or(self.max_describe_bytes),
            max_tool_calls: requested.max_tool_calls.unwrap_or(self.max_tool_calls),
            max_log_lines: requested.max_log_lines.unwrap_or(self.max_log_lines),
            max_log_bytes: requested.max_log_bytes.unwrap_or(self.max_log_bytes),
            max_deltas: requested.max_deltas.unwrap_or(self.max_deltas),
            max_resources: requested.max_resources.unwrap_or(self.max_resources),
            max_http_fields_bytes: requested
                .max_http_fields_bytes
                .unwrap_or(self.max_http_fields_bytes),
            max_http_body_chunk_bytes: requested
                .max_http_body_chunk_bytes
                .unwrap_or(self.max_http_body_chunk_bytes),
            max_folder_bytes: requested.max_folder_bytes.unwrap_or(self.max_folder_bytes),
            max_folder_files: requested.max_folder_files.unwrap_or(self.max_folder_files),
        }
    }
}

/// What a plugin was actually granted.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Grants {
    pub env: Vec<String>,
    pub dirs: Vec<DirGrant>,
    pub outbound_hosts: Vec<String>,
    pub credentials: Vec<CredentialGrant>,
    #[serde(skip)]
    pub outbound: Arc<OutboundPolicy>,
    /// For LLM adapters: the endpoint the host sends their requests to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter: Option<AdapterEndpoint>,
    /// Whether it may use long-term memory.
    pub memory: bool,
}

/// Where the host sends an adapter's requests, and how it authenticates.
#[derive(Debug, Clone, Serialize)]
pub struct AdapterEndpoint {
    /// Without a trailing slash; each request's path is appended to it.
    pub base_url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<CredentialGrant>,
    /// Whether requests may go without the credential when it is unset.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub credential_optional: bool,
    /// Which HTTP the host speaks to it.
    pub protocol: HttpProtocol,
    /// Certificates trusted besides the Mozilla roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// The adapter's settings, as handed to it.
    pub settings: serde_json::Value,
    /// The settings as the JSON text the adapter receives.
    #[serde(skip)]
    pub settings_json: Arc<str>,
    /// The base URL's host as the only grant, with the credential for it.
    #[serde(skip)]
    pub policy: Arc<OutboundPolicy>,
    /// How connections to it are made.
    #[serde(skip)]
    pub transport: Transport,
}

impl AdapterEndpoint {
    /// Builds the endpoint from a manifest's `[adapter]` section, expanding
    /// variables in the base URL from the server's environment. `own_server`
    /// are the server's addresses, refused as the endpoint's destination.
    pub fn from_section(
        section: &AdapterSection,
        own_server: Option<Arc<ServerAddresses>>,
    ) -> Result<Option<Self>, String> {
        let Some(template) = &section.base_url else {
            return Ok(None);
        };
        let base_url = expand_with_defaults(template)?
            .trim_end_matches('/')
            .to_owned();
        let origin = origin_of(&base_url)?;
        let grant = HostGrant::parse(&origin)?;
        let credential = section
            .credential
            .as_ref()
            .map(|credential| {
                let header =
                    HeaderName::from_bytes(credential.header.as_bytes()).map_err(|_| {
                        format!("invalid credential header name {:?}", credential.header)
                    })?;
                Ok::<_, String>(Credential {
                    host: grant.clone(),
                    header,
                    template: credential.value.clone(),
                })
            })
            .transpose()?;
        let settings = serde_json::to_value(&section.settings)
            .map_err(|e| format!("the adapter settings cannot be JSON: {e}"))?;
        let ca_file = match &section.ca_file {
            Some(template) => Some(expand_with_defaults(template)?).filter(|p| !p.is_empty()),
            None => None,
        }
        .map(PathBuf::from);
        if ca_file.is_some() && !base_url.starts_with("https://") {
            return Err(format!(
                "[adapter] ca_file is for an https base URL, and {base_url:?} is not one"
            ));
        }
        let transport = Transport::new(section.protocol, ca_file.as_deref())?;
        Ok(Some(Self {
            credential: credential.as_ref().map(|c| CredentialGrant {
                host: origin.clone(),
                header: c.header.as_str().to_owned(),
                variables: c.variables(),
            }),
            credential_optional: section.credential.as_ref().is_some_and(|c| c.optional),
            protocol: section.protocol,
            ca_file,
            transport,
            settings_json: settings.to_string().into(),
            settings,
            policy: Arc::new(OutboundPolicy {
                grants: vec![grant],
                credentials: credential.into_iter().collect(),
                own_server,
            }),
            base_url,
        }))
    }

    /// `scheme://host:port` of the base URL, as a grant names it.
    pub fn origin(&self) -> String {
        origin_of(&self.base_url).unwrap_or_default()
    }

    /// What to do when the provider refused the key: where the key comes
    /// from, as this manifest says. The adapter cannot know: one component
    /// may serve several endpoints, each with its own variable.
    pub fn key_hint(&self) -> String {
        let Some(credential) = &self.credential else {
            return "the adapter's manifest sends no key: give it an [adapter.credential]".into();
        };
        let is_set = |name: &&String| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
        let header = &credential.header;
        match credential.variables.iter().find(|name| !is_set(name)) {
            Some(unset) => format!(
                "set {unset} in the server's environment (it fills the {header} header, \
                 which requests go without while it is unset)"
            ),
            None if credential.variables.is_empty() => {
                format!("check the {header} value in the adapter's [adapter.credential]")
            }
            None => format!(
                "check {} in the server's environment (it fills the {header} header)",
                credential.variables.join(" and ")
            ),
        }
    }
}

/// `scheme://host[:port]` of an absolute http(s) URL.
fn origin_of(url: &str) -> Result<String, String> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|_| format!("base URL {url:?} is not a valid URL"))?;
    let scheme = uri
        .scheme_str()
        .filter(|s| *s == "http" || *s == "https")
        .ok_or_else(|| format!("base URL {url:?} must start with http:// or https://"))?;
    let authority = uri
        .authority()
        .ok_or_else(|| format!("base URL {url:?} names no host"))?;
    if authority.as_str().contains('@') {
        return Err(format!("base URL {url:?} must not carry user information"));
    }
    Ok(format!("{scheme}://{authority}"))
}

/// Replaces `${VAR}` with the environment variable `VAR` (an error when it
/// is unset) and `${VAR:-default}` with `VAR`, or `default` when it is unset
/// or empty.
pub fn expand_with_defaults(template: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find('}')
            .map(|i| i + start)
            .ok_or_else(|| format!("unclosed ${{ in {template:?}"))?;
        let inner = &rest[start + 2..end];
        let (name, default) = match inner.split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (inner, None),
        };
        let value = std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        match (value, default) {
            (Some(value), _) => out.push_str(value.trim()),
            (None, Some(default)) => out.push_str(default),
            (None, None) => {
                return Err(format!(
                    "{template:?} needs the environment variable {name}, which is not set"
                ));
            }
        }
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A credential as shown to users: where it goes, never its value.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CredentialGrant {
    pub host: String,
    pub header: String,
    /// The environment variables its value comes from.
    pub variables: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DirGrant {
    pub host_path: PathBuf,
    pub guest_path: String,
    pub writable: bool,
}

/// Where a plugin's folder grants may lead, all paths canonical.
#[derive(Debug, Clone, Default)]
pub struct FolderScope {
    /// The plugin folder: folders inside it may be granted, not the folder
    /// itself (a plugin writing there could install plugins).
    pub plugin_dir: PathBuf,
    /// Folders the operator's policy opens to this plugin.
    pub roots: Vec<PathBuf>,
    /// The server's own folders (data, compile cache): never granted, nor
    /// any folder that contains one.
    pub server_dirs: Vec<PathBuf>,
}

/// Parts of the system no plugin is ever granted: they expose the server's
/// own process (`/proc/self/environ`), the kernel and devices.
const SYSTEM_DIRS: [&str; 3] = ["/proc", "/sys", "/dev"];

impl FolderScope {
    /// Why `path` (canonical) may not be granted, if it may not.
    fn refusal(&self, path: &Path) -> Option<&'static str> {
        let overlaps = |dir: &Path| path.starts_with(dir) || dir.starts_with(path);
        if SYSTEM_DIRS.iter().any(|dir| overlaps(Path::new(dir))) {
            return Some("/proc, /sys and /dev are never granted");
        }
        if self.plugin_dir.starts_with(path) {
            return Some("it is or contains the plugin folder");
        }
        if self.server_dirs.iter().any(|dir| {
            dir.starts_with(path) || (path.starts_with(dir) && !path.starts_with(&self.plugin_dir))
        }) {
            return Some("it is or overlaps the server's own data");
        }
        if path.starts_with(&self.plugin_dir) || self.roots.iter().any(|r| path.starts_with(r)) {
            return None;
        }
        Some(
            "it is outside the plugin folder and every root the operator's [policy] dir_roots names",
        )
    }
}

impl Manifest {
    /// Parses a manifest's bytes; `path` names it in errors.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self, String> {
        let text =
            std::str::from_utf8(bytes).map_err(|_| format!("{} is not UTF-8", path.display()))?;
        toml::from_str(text)
            .map_err(|e| format!("invalid manifest {}: {}", path.display(), e.message()))
    }

    /// The environment variables this manifest's credentials draw on, for
    /// outbound hosts or an adapter's endpoint.
    pub fn credential_variables(&self) -> Vec<String> {
        let adapter = self.adapter.as_ref().and_then(|a| a.credential.as_ref());
        self.capabilities
            .credentials
            .iter()
            .map(|c| c.value.as_str())
            .chain(adapter.map(|c| c.value.as_str()))
            .flat_map(template_variables)
            .collect()
    }

    /// Resolves the requested capabilities: folders against `scope` (a
    /// folder it refuses is left out, with a note in the returned list),
    /// outbound requests refused to `own_server`'s addresses.
    pub fn grants(
        &self,
        scope: &FolderScope,
        own_server: Option<Arc<ServerAddresses>>,
    ) -> Result<(Grants, Vec<String>), String> {
        let mut refused = Vec::new();
        let mut dirs = Vec::new();
        for dir in &self.capabilities.dirs {
            let requested = scope.plugin_dir.join(&dir.path);
            let host_path = requested
                .canonicalize()
                .map_err(|e| format!("cannot preopen {}: {e}", requested.display()))?;
            if let Some(reason) = scope.refusal(&host_path) {
                refused.push(format!(
                    "folder {} (resolves to {}: {reason})",
                    dir.path.display(),
                    host_path.display()
                ));
                continue;
            }
            let guest_path = dir.guest_path.clone().unwrap_or_else(|| {
                let last = host_path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                format!("/{last}")
            });
            dirs.push(DirGrant {
                host_path,
                guest_path,
                writable: dir.writable,
            });
        }
        let grants = self
            .capabilities
            .outbound_hosts
            .iter()
            .map(|host| HostGrant::parse(host))
            .collect::<Result<Vec<_>, _>>()?;
        let credentials = self
            .capabilities
            .credentials
            .iter()
            .map(|request| {
                let host = HostGrant::parse(&request.host)?;
                if !self.capabilities.outbound_hosts.contains(&request.host) {
                    return Err(format!(
                        "the credential for {} is for a host not in outbound_hosts",
                        request.host
                    ));
                }
                let header = HeaderName::from_bytes(request.header.as_bytes())
                    .map_err(|_| format!("invalid credential header name {:?}", request.header))?;
                Ok(Credential {
                    host,
                    header,
                    template: request.value.clone(),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let adapter = match &self.adapter {
            Some(section) => AdapterEndpoint::from_section(section, own_server.clone())?,
            None => None,
        };
        let grants = Grants {
            adapter,
            memory: self.capabilities.memory,
            env: self.capabilities.env.clone(),
            dirs,
            outbound_hosts: self.capabilities.outbound_hosts.clone(),
            credentials: credentials
                .iter()
                .zip(&self.capabilities.credentials)
                .map(|(credential, request)| CredentialGrant {
                    host: request.host.clone(),
                    header: request.header.to_ascii_lowercase(),
                    variables: credential.variables(),
                })
                .collect(),
            outbound: Arc::new(OutboundPolicy {
                grants,
                credentials,
                own_server,
            }),
        };
        Ok((grants, refused))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_are_fresh_per_call_unless_reuse_is_asked_for() {
        let manifest: Manifest = toml::from_str("").unwrap();
        assert_eq!(manifest.instances.reuse(), Ok(None));
        let manifest: Manifest =
            toml::from_str("[instances]\nreuse = \"task\"\nmax_idle_ms = 500").unwrap();
        assert_eq!(
            manifest.instances.reuse(),
            Ok(Some(InstanceReuse {
                scope: ReuseScope::Task,
                max_calls: 1000,
                max_idle: Duration::from_millis(500),
            }))
        );
        for bad in [
            "[instances]\nreuse = \"tenant\"\nmax_calls = 1",
            "[instances]\nreuse = \"tenant\"\nmax_idle_ms = 0",
        ] {
            let manifest: Manifest = toml::from_str(bad).unwrap();
            assert!(manifest.instances.reuse().is_err(), "{bad}");
        }
        assert!(toml::from_str::<Manifest>("[instances]\nreuse = \"forever\"").is_err());
    }

    #[test]
    fn a_manifests_approval_rules_match_its_calls() {
        let manifest: Manifest = toml::from_str(
            "[[approvals]]\ntool = \"write\"\nwhen = { \"/path\" = \"/etc/*\" }\n\n\
             [[approvals]]\ntool = \"*\"\nwhen = { \"/force\" = \"true\" }\n",
        )
        .unwrap();
        let asks = |tool: &str, arguments: serde_json::Value| {
            manifest
                .approvals
                .iter()
                .any(|rule| rule.matches(tool, &arguments))
        };
        assert!(asks("write", serde_json::json!({"path": "/etc/hosts"})));
        assert!(!asks("write", serde_json::json!({"path": "/tmp/x"})));
        assert!(asks("read", serde_json::json!({"force": true})));
        assert!(!asks("read", serde_json::json!({})));
        assert!(toml::from_str::<Manifest>("[[approvals]]\ntool = \"x\"\nif = {}").is_err());
        let relative: Manifest =
            toml::from_str("[[approvals]]\ntool = \"x\"\nwhen = { \"path\" = \"*\" }").unwrap();
        assert!(relative.approvals[0].validate("[[approvals]]").is_err());
    }

    #[test]
    fn variables_expand_with_defaults() {
        // SAFETY: no other test reads these variables.
        unsafe {
            std::env::set_var("OPSPAWN_TEST_MANIFEST_SET", "https://proxy.example/v1 ");
            std::env::remove_var("OPSPAWN_TEST_MANIFEST_UNSET");
        }
        assert_eq!(
            expand_with_defaults("${OPSPAWN_TEST_MANIFEST_SET:-https://api.example}").unwrap(),
            "https://proxy.example/v1"
        );
        assert_eq!(
            expand_with_defaults("${OPSPAWN_TEST_MANIFEST_UNSET:-https://api.example}/v1").unwrap(),
            "https://api.example/v1"
        );
        let missing = expand_with_defaults("${OPSPAWN_TEST_MANIFEST_UNSET}").unwrap_err();
        assert!(missing.contains("OPSPAWN_TEST_MANIFEST_UNSET"), "{missing}");
        assert!(expand_with_defaults("${OPEN").is_err());
    }

    #[test]
    fn an_adapter_endpoint_grants_its_origin_and_credential_only() {
        let manifest: Manifest = toml::from_str(
            r#"
            [adapter]
            base_url = "http://127.0.0.1:9/openai/v1/"

            [adapter.credential]
            header = "Authorization"
            value = "Bearer ${OPSPAWN_TEST_KEY}"

            [adapter.settings]
            default_model = "m"
            "#,
        )
        .unwrap();
        let (grants, _) = manifest.grants(&FolderScope::default(), None).unwrap();
        let endpoint = grants.adapter.expect("an endpoint");
        assert_eq!(endpoint.base_url, "http://127.0.0.1:9/openai/v1");
        assert_eq!(endpoint.origin(), "http://127.0.0.1:9");
        assert_eq!(&*endpoint.settings_json, r#"{"default_model":"m"}"#);
        let credential = endpoint.credential.expect("a credential");
        assert_eq!(credential.variables, ["OPSPAWN_TEST_KEY"]);
        assert!(!endpoint.credential_optional);
        // The endpoint is the host's to call: the plugin itself gets no
        // network from it.
        assert!(grants.outbound_hosts.is_empty());
        assert!(grants.outbound.grants.is_empty());
    }

    /// `protocol` picks the HTTP the host speaks (HTTP/2 where TLS agrees,
    /// by default), and `ca_file` trusts a private authority for an https
    /// endpoint only; an empty expansion means none.
    #[test]
    fn an_adapter_endpoint_names_its_protocol_and_trusted_authority() {
        let endpoint = |adapter: &str| {
            let manifest: Manifest = toml::from_str(&format!("[adapter]\n{adapter}"))?;
            let (grants, _) = manifest
                .grants(&FolderScope::default(), None)
                .map_err(|e| e.to_string())?;
            Ok::<_, Box<dyn std::error::Error>>(grants.adapter.expect("an endpoint"))
        };
        let plain = endpoint("base_url = \"https://api.example/v1\"").unwrap();
        assert_eq!(plain.protocol, HttpProtocol::Auto);
        assert_eq!(plain.ca_file, None);

        let http1 = endpoint("base_url = \"https://api.example/v1\"\nprotocol = \"http1\"");
        assert_eq!(http1.unwrap().transport.protocol(), HttpProtocol::Http1);
        let unknown = endpoint("base_url = \"https://api.example/v1\"\nprotocol = \"h3\"");
        assert!(unknown.unwrap_err().to_string().contains("unknown variant"));

        let authority = opspawn_testkit::tls::TestAuthority::new();
        let ca = authority.ca_file().display().to_string();
        let trusting = endpoint(&format!(
            "base_url = \"https://10.0.0.5/v1\"\nca_file = \"{ca}\""
        ))
        .unwrap();
        assert_eq!(
            trusting.ca_file.as_deref(),
            Some(authority.ca_file().as_path())
        );
        let empty = endpoint(
            "base_url = \"https://api.example/v1\"\n\
             ca_file = \"${OPSPAWN_TEST_UNSET_CA_FILE_7F3A:-}\"",
        )
        .unwrap();
        assert_eq!(empty.ca_file, None);

        let cleartext = endpoint(&format!(
            "base_url = \"http://10.0.0.5/v1\"\nca_file = \"{ca}\""
        ));
        let error = cleartext.unwrap_err().to_string();
        assert!(
            error.contains("ca_file is for an https base URL"),
            "{error}"
        );
        let missing =
            endpoint("base_url = \"https://10.0.0.5/v1\"\nca_file = \"/nonexistent.pem\"");
        let error = missing.unwrap_err().to_string();
        assert!(
            error.contains("cannot read ca_file /nonexistent.pem"),
            "{error}"
        );
    }

    /// The hint names the variables this manifest reads, set or not.
    #[test]
    fn a_refused_key_is_traced_to_the_manifests_variable() {
        let endpoint = |credential: &str| {
            let manifest: Manifest = toml::from_str(&format!(
                "[adapter]\nbase_url = \"http://127.0.0.1:9/v1\"\n{credential}"
            ))
            .unwrap();
            let (grants, _) = manifest.grants(&FolderScope::default(), None).unwrap();
            grants.adapter.expect("an endpoint")
        };
        // PATH is set everywhere; the other is set nowhere.
        let set = endpoint(
            "[adapter.credential]\nheader = \"authorization\"\nvalue = \"Bearer ${PATH}\"\n",
        );
        assert_eq!(
            set.key_hint(),
            "check PATH in the server's environment (it fills the authorization header)"
        );
        let unset = endpoint(
            "[adapter.credential]\nheader = \"x-api-key\"\n\
             value = \"${OPSPAWN_TEST_UNSET_KEY_7F3A}\"\noptional = true\n",
        );
        assert_eq!(
            unset.key_hint(),
            "set OPSPAWN_TEST_UNSET_KEY_7F3A in the server's environment (it fills the \
             x-api-key header, which requests go without while it is unset)"
        );
        let fixed = endpoint(
            "[adapter.credential]\nheader = \"authorization\"\nvalue = \"Bearer sk-fixed\"\n",
        );
        assert_eq!(
            fixed.key_hint(),
            "check the authorization value in the adapter's [adapter.credential]"
        );
        assert_eq!(
            endpoint("").key_hint(),
            "the adapter's manifest sends no key: give it an [adapter.credential]"
        );
    }

    #[test]
    fn base_urls_must_be_plain_http_urls() {
        for bad in ["ftp://x", "api.openai.com/v1", "https://user:pw@host/v1"] {
            let section = AdapterSection {
                base_url: Some(bad.into()),
                ..AdapterSection::default()
            };
            assert!(
                AdapterEndpoint::from_section(&section, None).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn folder_grants_stay_inside_the_plugin_folder_and_the_operators_roots() {
        let base = tempfile::tempdir().unwrap();
        let base = base.path().canonicalize().unwrap();
        let plugins = base.join("plugins");
        let shared = base.join("shared");
        let cache = base.join("cache");
        for dir in [&plugins.join("data"), &shared.join("docs"), &cache] {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::os::unix::fs::symlink("/proc/self", plugins.join("self")).unwrap();
        std::os::unix::fs::symlink(&shared, plugins.join("outside")).unwrap();
        let scope = |roots: Vec<PathBuf>| FolderScope {
            plugin_dir: plugins.clone(),
            roots,
            server_dirs: vec![cache.clone()],
        };
        let ask = |scope: &FolderScope, paths: &[&str]| {
            let manifest = Manifest {
                capabilities: Capabilities {
                    dirs: paths
                        .iter()
                        .map(|path| DirRequest {
                            path: path.into(),
                            guest_path: None,
                            writable: false,
                        })
                        .collect(),
                    ..Capabilities::default()
                },
                ..Manifest::default()
            };
            let (grants, refused) = manifest.grants(scope, None).unwrap();
            let granted: Vec<PathBuf> = grants.dirs.into_iter().map(|d| d.host_path).collect();
            (granted, refused)
        };

        let shared_docs = shared.join("docs");
        let shared_docs = shared_docs.to_str().unwrap();
        let cache_path = cache.to_str().unwrap();
        let asked = [
            "data",
            ".",
            "..",
            "/",
            "/proc",
            "/proc/self",
            "self",
            "/sys",
            "/dev",
            "outside",
            shared_docs,
            cache_path,
        ];
        let (granted, refused) = ask(&scope(Vec::new()), &asked);
        assert_eq!(granted, [plugins.join("data")], "{refused:#?}");
        assert_eq!(refused.len(), asked.len() - 1, "{refused:#?}");
        assert!(
            refused.iter().any(|r| r.starts_with("folder /proc ")),
            "{refused:#?}"
        );
        assert!(
            refused.iter().any(|r| r.starts_with("folder self ")),
            "{refused:#?}"
        );

        // A root the operator names opens what is under it, and nothing
        // the rules above refuse.
        let (granted, refused) = ask(&scope(vec![shared.clone(), "/".into()]), &asked);
        assert_eq!(
            granted,
            [plugins.join("data"), shared.clone(), shared.join("docs")],
            "{refused:#?}"
        );
        assert!(
            refused.iter().any(|r| r.contains("/proc, /sys and /dev")),
            "{refused:#?}"
        );
    }
}
