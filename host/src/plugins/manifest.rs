//! The manifest beside a component (`calculator.toml` beside
//! `calculator.wasm`): what the plugin asks for. A plugin without one asks
//! for nothing and gets the default limits.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

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
    /// Outbound hosts as `scheme://host:port`; enforced for `wasi:http`.
    #[serde(default)]
    pub outbound_hosts: Vec<String>,
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
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Grants {
    pub env: Vec<String>,
    pub dirs: Vec<DirGrant>,
    pub outbound_hosts: Vec<String>,
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
        Ok(Grants {
            env: self.capabilities.env.clone(),
            dirs,
            outbound_hosts: self.capabilities.outbound_hosts.clone(),
        })
    }
}
