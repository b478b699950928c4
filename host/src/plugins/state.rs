//! What a plugin's `Store` holds for the length of one call: its WASI
//! context (built from its grants alone), its resource table, its memory
//! limiter and the channel its streamed text goes to.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::bindings::v0_1;
use super::folder_quota::{FolderCall, FolderUsage, FolderUsages, Measure};
use super::manifest::{Grants, Limits};
use super::outbound::PolicyHooks;
use crate::memory::MemoryHandle;

/// How much of a plugin's stdout and stderr is kept to explain a crash.
const OUTPUT_CAPTURE_BYTES: usize = 16 * 1024;

pub struct CallState {
    plugin: Arc<str>,
    wasi: WasiCtx,
    table: ResourceTable,
    http: WasiHttpCtx,
    http_hooks: PolicyHooks,
    pub(super) limiter: MemoryLimiter,
    pub(super) output: OutputTail,
    deltas: Option<mpsc::UnboundedSender<String>>,
    /// What this call may still log, and stream.
    log_budget: Budget,
    delta_budget: Budget,
    /// What it may still write into its writable folders, if it has any.
    folders: Option<Arc<FolderCall>>,
    /// Those folders' usage, for the next call of a warm instance.
    folder_usage: Option<Arc<FolderUsage>>,
    /// Whether the plugin was granted long-term memory.
    pub(super) memory_granted: bool,
    /// Where this call's memory calls go (a task's step), and how many it
    /// has made: each is journaled under its number.
    pub(super) memory: MemoryHandle,
    pub(super) memory_calls: u32,
}

impl CallState {
    pub fn new(
        plugin: Arc<str>,
        grants: &Grants,
        limits: &Limits,
        tenant: Option<&str>,
        deltas: Option<mpsc::UnboundedSender<String>>,
        folder_usages: &FolderUsages,
        memory: MemoryHandle,
    ) -> wasmtime::Result<Self> {
        let output = OutputTail::default();
        let mut wasi = WasiCtx::builder();
        wasi.stdout(output.clone())
            .stderr(output.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        for name in &grants.env {
            if let Ok(value) = std::env::var(name) {
                wasi.env(name, value);
            }
        }
        let mut writable = Vec::new();
        for dir in &grants.dirs {
            if !dir.writable {
                wasi.preopened_dir(&dir.host_path, &dir.guest_path, FsPerms::ReadOnly)?;
                continue;
            }
            // What a plugin writes for one tenant's task, no other tenant's
            // task can read: each sees only a folder of its own.
            let host_path = match tenant {
                Some(tenant) => tenant_folder(&dir.host_path, tenant)?,
                None => dir.host_path.clone(),
            };
            wasi.preopened_dir(&host_path, &dir.guest_path, FsPerms::ReadWrite)?;
            writable.push(host_path);
        }
        let folder_usage = (!writable.is_empty()).then(|| folder_usages.of(writable));
        let folders = folder_usage
            .clone()
            .map(|usage| FolderCall::start(usage, folder_quota(limits)));
        // Every resource the plugin holds (a stream, a set of HTTP fields)
        // is host memory: both their number and the fields' size are capped.
        let mut table = ResourceTable::new();
        table.set_max_capacity(usize::try_from(limits.max_resources).unwrap_or(usize::MAX));
        let mut http = WasiHttpCtx::new();
        http.set_field_size_limit(
            usize::try_from(limits.max_http_fields_bytes).unwrap_or(usize::MAX),
        );
        Ok(Self {
            plugin,
            wasi: wasi.build(),
            table,
            http,
            http_hooks: PolicyHooks {
                policy: grants.outbound.clone(),
                body_chunk_bytes: usize::try_from(limits.max_http_body_chunk_bytes)
                    .unwrap_or(usize::MAX)
                    .max(1),
            },
            limiter: MemoryLimiter::new(limits.memory_bytes),
            output,
            deltas,
            log_budget: Budget::new(limits.max_log_lines, limits.max_log_bytes),
            delta_budget: Budget::new(limits.max_deltas, limits.max_output_bytes),
            folders,
            folder_usage,
            memory_granted: grants.memory,
            memory,
            memory_calls: 0,
        })
    }

    /// Readies a warm instance's state for its next call: the per-call
    /// budgets start again, the call's share of its folders' quota is taken
    /// anew, and what earlier calls printed is forgotten. What the instance
    /// holds in its own memory stays: that is the point of reusing it.
    pub fn begin_reuse(
        &mut self,
        limits: &Limits,
        memory: MemoryHandle,
        deltas: Option<mpsc::UnboundedSender<String>>,
    ) {
        self.memory = memory;
        self.deltas = deltas;
        self.memory_calls = 0;
        self.limiter.refused = false;
        self.output.clear();
        self.log_budget = Budget::new(limits.max_log_lines, limits.max_log_bytes);
        self.delta_budget = Budget::new(limits.max_deltas, limits.max_output_bytes);
        self.folders = self
            .folder_usage
            .clone()
            .map(|usage| FolderCall::start(usage, folder_quota(limits)));
    }

    /// Ends a call whose instance is kept warm: what it logged past its
    /// limits is noted, and its share of its folders is given back, so they
    /// can be measured again while the instance waits.
    pub fn end_reused_call(&mut self) {
        self.memory = MemoryHandle::default();
        self.deltas = None;
        self.note_dropped();
        self.folders = None;
    }

    /// One note per call for what it logged or streamed past its limits.
    fn note_dropped(&self) {
        let plugin = &*self.plugin;
        if let Some(dropped) =
            self.log_budget
                .dropped("log lines", "max_log_lines", "max_log_bytes")
        {
            tracing::warn!(plugin, "{dropped}");
        }
        if let Some(dropped) =
            self.delta_budget
                .dropped("streamed deltas", "max_deltas", "max_output_bytes")
        {
            tracing::warn!(plugin, "{dropped}");
        }
    }

    /// The call's share of its writable folders' quota, if it has any.
    pub fn folder_call(&self) -> Option<Arc<FolderCall>> {
        self.folders.clone()
    }

    /// Whether a write into its folders was refused for want of room.
    pub fn crossed_folder_quota(&self) -> bool {
        self.folders
            .as_ref()
            .is_some_and(|folders| folders.crossed())
    }

    /// The tail of what the plugin printed, for error messages.
    pub fn output_tail(&self) -> String {
        let bytes = self.output.contents();
        let text = String::from_utf8_lossy(&bytes);
        let text = text.trim();
        let start = text.len().saturating_sub(2000);
        let start = (start..text.len())
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(text.len());
        text[start..].to_owned()
    }
}

/// `<root>/tenants/<tenant>`, made if missing: the part of a writable folder
/// grant that one tenant's calls see. The tenant's name is used as it is
/// when it is a plain file name, and hashed otherwise. Refused when either
/// level is anything but a real folder: a link planted there (by a plugin
/// that saw the whole folder before tenants were separated, say) would
/// lead the call elsewhere.
pub fn tenant_folder(root: &Path, tenant: &str) -> std::io::Result<PathBuf> {
    let plain = !tenant.is_empty()
        && tenant.len() <= 64
        && !tenant.starts_with('.')
        && tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    let name = if plain {
        tenant.to_owned()
    } else {
        use sha2::Digest;
        format!(
            "sha256-{}",
            &hex::encode(sha2::Sha256::digest(tenant))[..32]
        )
    };
    let tenants = root.join("tenants");
    let folder = tenants.join(name);
    for level in [&tenants, &folder] {
        match std::fs::create_dir(level) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        if !std::fs::symlink_metadata(level)?.file_type().is_dir() {
            return Err(std::io::Error::other(format!(
                "{} is not a folder (a link?); remove it so the tenant's folder can be made",
                level.display()
            )));
        }
    }
    Ok(folder)
}

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for CallState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.http_hooks,
        }
    }
}

impl Drop for CallState {
    fn drop(&mut self) {
        self.note_dropped();
    }
}

fn folder_quota(limits: &Limits) -> Measure {
    Measure {
        bytes: limits.max_folder_bytes,
        files: limits.max_folder_files,
    }
}

/// The plugin's stdout and stderr: the last [`OUTPUT_CAPTURE_BYTES`] of
/// what it printed, kept to explain a crash. Writing never fails: older
/// output is dropped to make room, so a plugin may print as much as it
/// likes (a warm instance over many calls too).
#[derive(Clone, Default)]
pub struct OutputTail {
    kept: Arc<std::sync::Mutex<std::collections::VecDeque<u8>>>,
}

impl OutputTail {
    pub fn contents(&self) -> Vec<u8> {
        self.kept.lock().unwrap().iter().copied().collect()
    }

    fn clear(&self) {
        self.kept.lock().unwrap().clear();
    }

    fn keep(&self, bytes: &[u8]) {
        let tail = &bytes[bytes.len().saturating_sub(OUTPUT_CAPTURE_BYTES)..];
        let mut kept = self.kept.lock().unwrap();
        let over = (kept.len() + tail.len()).saturating_sub(OUTPUT_CAPTURE_BYTES);
        kept.drain(..over);
        kept.extend(tail);
    }
}

impl IsTerminal for OutputTail {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for OutputTail {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl OutputStream for OutputTail {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.keep(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(OUTPUT_CAPTURE_BYTES)
    }
}

#[async_trait::async_trait]
impl Pollable for OutputTail {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for OutputTail {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        bytes: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.keep(bytes);
        std::task::Poll::Ready(Ok(bytes.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// How many items (log lines, deltas) and bytes one call may still send
/// the host, and how many it sent past that, which were dropped.
#[derive(Debug)]
pub(super) struct Budget {
    max_items: u64,
    max_bytes: u64,
    items: u64,
    bytes: u64,
    dropped_items: u64,
    dropped_bytes: u64,
}

impl Budget {
    pub(super) fn new(max_items: u64, max_bytes: u64) -> Self {
        Self {
            max_items,
            max_bytes,
            items: 0,
            bytes: 0,
            dropped_items: 0,
            dropped_bytes: 0,
        }
    }

    /// Whether an item of `len` bytes fits; if not, it is counted as dropped.
    pub(super) fn admit(&mut self, len: usize) -> bool {
        let len = len as u64;
        if self.items < self.max_items && self.bytes.saturating_add(len) <= self.max_bytes {
            self.items += 1;
            self.bytes += len;
            true
        } else {
            self.dropped_items += 1;
            self.dropped_bytes = self.dropped_bytes.saturating_add(len);
            false
        }
    }

    /// A note of what was dropped, if anything was: `what` names the items,
    /// `items_key` and `bytes_key` the limits in the manifest.
    pub(super) fn dropped(&self, what: &str, items_key: &str, bytes_key: &str) -> Option<String> {
        (self.dropped_items > 0).then(|| {
            format!(
                "dropped {} {what} ({} bytes) of one call, past its limits of {} {what} and {} \
                 bytes (the manifest's [limits] {items_key} and {bytes_key})",
                self.dropped_items, self.dropped_bytes, self.max_items, self.max_bytes
            )
        })
    }
}

impl CallState {
    fn log(&mut self, level: tracing::Level, message: &str) {
        if !self.log_budget.admit(message.len()) {
            return;
        }
        let plugin = &*self.plugin;
        match level {
            tracing::Level::TRACE => tracing::trace!(plugin, "{message}"),
            tracing::Level::DEBUG => tracing::debug!(plugin, "{message}"),
            tracing::Level::INFO => tracing::info!(plugin, "{message}"),
            tracing::Level::WARN => tracing::warn!(plugin, "{message}"),
            tracing::Level::ERROR => tracing::error!(plugin, "{message}"),
        }
    }
}

/// The `logging` interface of each WIT version, mapped onto `tracing`.
macro_rules! logging_host {
    ($logging:path) => {
        impl $logging for CallState {
            fn log(&mut self, level: Level, message: String) {
                let level = match level {
                    Level::Trace => tracing::Level::TRACE,
                    Level::Debug => tracing::Level::DEBUG,
                    Level::Info => tracing::Level::INFO,
                    Level::Warn => tracing::Level::WARN,
                    Level::Error => tracing::Level::ERROR,
                };
                CallState::log(self, level, &message);
            }
        }
    };
}

mod logging_v0_1 {
    use super::CallState;
    use crate::plugins::bindings::v0_1::logging::Level;
    logging_host!(crate::plugins::bindings::v0_1::logging::Host);
}

mod logging_v0_2 {
    use super::CallState;
    use crate::plugins::bindings::v0_2::logging::Level;
    logging_host!(crate::plugins::bindings::v0_2::logging::Host);
}

impl v0_1::llm_stream::Host for CallState {
    fn emit_delta(&mut self, text: String) {
        if let Some(deltas) = &self.deltas
            && self.delta_budget.admit(text.len())
        {
            // Nobody listening is fine: streaming is a courtesy.
            let _ = deltas.send(text);
        }
    }
}

/// Caps linear memory and remembers whether it had to refuse growth, so a
/// trap that follows can be reported as the memory limit it was.
pub struct MemoryLimiter {
    max_bytes: usize,
    pub(super) refused: bool,
}

impl MemoryLimiter {
    fn new(max_bytes: u64) -> Self {
        Self {
            max_bytes: usize::try_from(max_bytes).unwrap_or(usize::MAX),
            refused: false,
        }
    }
}

/// The most table elements a plugin may have; generous for interpreters.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = desired <= self.max_bytes;
        self.refused |= !allowed;
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn instances(&self) -> usize {
        // Interpreted runtimes (Python, JavaScript) instantiate many modules.
        256
    }

    fn memories(&self) -> usize {
        64
    }

    fn tables(&self) -> usize {
        64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_tenant_gets_a_real_folder_of_its_own() {
        let root = tempfile::tempdir().unwrap();
        let acme = tenant_folder(root.path(), "acme").unwrap();
        assert_eq!(acme, root.path().join("tenants/acme"));
        assert!(acme.is_dir());
        // Names that are not plain file names are hashed, never joined.
        for odd in ["../globex", "..", "", "a/b", "ünïcode"] {
            let folder = tenant_folder(root.path(), odd).unwrap();
            assert_eq!(folder.parent().unwrap(), root.path().join("tenants"));
            let name = folder.file_name().unwrap().to_str().unwrap();
            assert!(name.starts_with("sha256-"), "{odd:?} became {name:?}");
        }
        assert_ne!(
            tenant_folder(root.path(), "a/b").unwrap(),
            tenant_folder(root.path(), "a/c").unwrap()
        );
        // A link in the tenant's place is refused, not followed.
        let elsewhere = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), root.path().join("tenants/globex")).unwrap();
        let error = tenant_folder(root.path(), "globex").unwrap_err();
        assert!(error.to_string().contains("not a folder"), "{error}");
    }

    #[test]
    fn a_budget_admits_up_to_its_limits_and_counts_the_rest() {
        let mut budget = Budget::new(3, 10);
        assert!(budget.admit(4));
        assert!(budget.admit(6));
        assert!(!budget.admit(1), "the bytes are used up");
        assert_eq!(
            budget
                .dropped("x", "a", "b")
                .as_deref()
                .map(|n| n.starts_with("dropped 1 x (1 bytes)")),
            Some(true)
        );

        let mut budget = Budget::new(2, 100);
        assert!(
            budget.dropped("log lines", "a", "b").is_none(),
            "nothing dropped yet"
        );
        assert!(budget.admit(1) && budget.admit(1));
        assert!(!budget.admit(1), "the items are used up");
        assert!(!budget.admit(0));
        let note = budget
            .dropped("log lines", "max_log_lines", "max_log_bytes")
            .unwrap();
        assert!(note.starts_with("dropped 2 log lines (1 bytes)"), "{note}");
        assert!(
            note.contains("limits of 2 log lines and 100 bytes"),
            "{note}"
        );
    }
}
