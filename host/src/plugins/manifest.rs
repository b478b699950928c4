//! The manifest beside a component (`calculator.toml` beside
//! `calculator.wasm`): what the plugin asks for. A plugin without one asks
//! for nothing and gets the default limits.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::http::HeaderName;
use serde::{Deserialize, Serialize};

use super::outbound::{Credential, HostGrant, OutboundPolicy};

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    #[serde(default)]
    pub plugin: PluginSection,
    #[serde(default)]
    pub limits: RequestedLimits,
    #[serde(default)]
    pub capabilities: Capabilities,
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
    pub max_output_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_bytes: 64 << 20,
            call_timeout: Duration::from_secs(10),
            max_output_bytes: 1 << 20,
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

impl Manifest {
    /// Reads the manifest beside `wasm`, if there is one.
    pub fn load_beside(wasm: &Path) -> Result<Option<(Self, Vec<u8>)>, String> {
        let path = wasm.with_extension("toml");
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let text =
            std::str::from_utf8(&bytes).map_err(|_| format!("{} is not UTF-8", path.display()))?;
        let manifest = toml::from_str(text)
            .map_err(|e| format!("invalid manifest {}: {}", path.display(), e.message()))?;
        Ok(Some((manifest, bytes)))
    }

    /// Resolves the requested capabilities against the plugin folder.
    pub fn grants(&self, plugin_dir: &Path) -> Result<Grants, String> {
        let dirs = self
            .capabilities
            .dirs
            .iter()
            .map(|dir| {
                let host_path = plugin_dir.join(&dir.path);
                let host_path = host_path
                    .canonicalize()
                    .map_err(|e| format!("cannot preopen {}: {e}", host_path.display()))?;
                let guest_path = dir.guest_path.clone().unwrap_or_else(|| {
                    let last = host_path
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    format!("/{last}")
                });
                Ok(DirGrant {
                    host_path,
                    guest_path,
                    writable: dir.writable,
                })
            })
            .collect::<Result<_, String>>()?;
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
        Ok(Grants {
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
            }),
        })
    }
}
