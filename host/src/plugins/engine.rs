//! The wasmtime engine every plugin shares, the epoch clock that bounds each
//! call, and the on-disk cache of compiled components.

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use wasmtime::component::Component;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// How often the epoch advances: the granularity of call time limits and how
/// often a running plugin yields to the async runtime.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// How much of each pooled memory and table is kept mapped between
/// instances, when the kernel can tell which pages an instance wrote
/// (`PAGEMAP_SCAN`, Linux 6.7+): only those pages are restored, by copying.
const KEEP_RESIDENT_SCANNED_BYTES: usize = 256 << 10;

/// The same without `PAGEMAP_SCAN`: the lowest bytes are restored whether
/// written or not, so less is kept.
const KEEP_RESIDENT_UNSCANNED_BYTES: usize = 64 << 10;

#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Use the pooling allocator (fast instantiation, reserved address space).
    pub pooling: bool,
    /// The largest linear memory any plugin may be granted.
    pub max_memory_bytes: u64,
    /// How many plugin instances may be alive at once.
    pub max_instances: u32,
    /// How many of them may wait warm between calls (plugins that ask for
    /// reuse); each holds its instance slot meanwhile.
    pub max_idle_instances: u32,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            pooling: true,
            max_memory_bytes: 1 << 30,
            max_instances: 256,
            max_idle_instances: 16,
        }
    }
}

pub fn build_engine(options: &EngineOptions) -> wasmtime::Result<Engine> {
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        .memory_init_cow(true)
        .max_wasm_stack(1 << 20)
        .async_stack_size(2 << 20);
    if options.pooling {
        let instances = options.max_instances;
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(instances)
            .total_core_instances(instances * 8)
            .total_memories(instances * 2)
            .total_tables(instances * 4)
            .total_stacks(instances)
            .max_memory_size(usize::try_from(options.max_memory_bytes).unwrap_or(usize::MAX))
            .max_core_instance_size(4 << 20)
            .table_elements(1 << 16);
        // Reset by copying rather than madvise where possible: the pages a
        // call wrote stay mapped for the next instance, so it takes no page
        // faults and the host no TLB shootdowns. With `PAGEMAP_SCAN` the
        // kernel names the written pages and only they are restored (a tool
        // call went from 32 to 14 us, and a task's CPU fell by a quarter);
        // without it the lowest bytes are restored blindly, so fewer are
        // kept (1 MiB measured slower than 64 KiB there).
        let keep_resident = if PoolingAllocationConfig::is_pagemap_scan_available() {
            pool.pagemap_scan(wasmtime::Enabled::Yes);
            KEEP_RESIDENT_SCANNED_BYTES
        } else {
            KEEP_RESIDENT_UNSCANNED_BYTES
        };
        pool.linear_memory_keep_resident(keep_resident)
            .table_keep_resident(keep_resident);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    Engine::new(&config)
}

/// Advances the engine's epoch every [`EPOCH_TICK`] on a plain thread, until
/// dropped.
pub struct EpochTicker {
    stop: Arc<AtomicBool>,
}

impl EpochTicker {
    pub fn start(engine: Engine) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::Builder::new()
            .name("opspawn-epoch".into())
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .expect("spawning the epoch thread");
        Self { stop }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Compiled components on disk, keyed by the component's content hash and
/// the engine's compatibility hash, so a cached artifact is only ever loaded
/// into an engine that can run it.
pub struct CompileCache {
    dir: Option<PathBuf>,
    engine_key: String,
    /// A gate per content hash being loaded: identical components loaded at
    /// once (one file installed under several names, as the OpenAI-format
    /// adapter is) compile once, and the others wait for the artifact.
    loading: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Components compiled by this cache (misses), for tests.
    compiled: AtomicU64,
}

impl CompileCache {
    pub fn new(engine: &Engine, dir: Option<PathBuf>) -> Self {
        let mut hasher = std::hash::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Self::keyed(dir, format!("{:016x}", hasher.finish()))
    }

    fn keyed(dir: Option<PathBuf>, engine_key: String) -> Self {
        Self {
            dir,
            engine_key,
            loading: Mutex::default(),
            compiled: AtomicU64::new(0),
        }
    }

    /// How many components this cache has compiled (not found cached).
    #[cfg(test)]
    fn compiled(&self) -> u64 {
        self.compiled.load(Ordering::Relaxed)
    }

    /// Loads the compiled form of `wasm` (whose SHA-256 is `sha256`) from the
    /// cache, compiling and caching it on a miss. Blocking: call from a
    /// blocking thread.
    /// `label` names the component in the log.
    pub fn load(
        &self,
        engine: &Engine,
        wasm: &[u8],
        sha256: &str,
        label: &str,
    ) -> wasmtime::Result<Component> {
        let Some(dir) = &self.dir else {
            self.compiled.fetch_add(1, Ordering::Relaxed);
            return compile_logged(label, wasm.len(), || Component::new(engine, wasm));
        };
        let gate = Arc::clone(
            self.loading
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(sha256.to_owned())
                .or_default(),
        );
        let loaded = {
            let _turn = gate.lock().unwrap_or_else(PoisonError::into_inner);
            self.load_in_turn(engine, wasm, sha256, label, dir)
        };
        let mut loading = self.loading.lock().unwrap_or_else(PoisonError::into_inner);
        // Nobody else holds the gate (they clone it under this lock).
        if Arc::strong_count(&gate) == 2 {
            loading.remove(sha256);
        }
        loaded
    }

    /// [`Self::load`] with a cache folder, while no other load of the same
    /// component runs.
    fn load_in_turn(
        &self,
        engine: &Engine,
        wasm: &[u8],
        sha256: &str,
        label: &str,
        dir: &Path,
    ) -> wasmtime::Result<Component> {
        let path = dir.join(format!("{sha256}-{}.cwasm", self.engine_key));
        if path.exists() {
            // Marks it recently used, for pruning.
            let _ = std::fs::File::open(&path)
                .and_then(|file| file.set_modified(std::time::SystemTime::now()));
            // SAFETY: the cache directory is the host's own, written only by
            // `store` below with the output of `precompile_component` for an
            // engine with this compatibility hash.
            match unsafe { Component::deserialize_file(engine, &path) } {
                Ok(component) => return Ok(component),
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "ignoring an unusable cached artifact")
                }
            }
        }
        self.compiled.fetch_add(1, Ordering::Relaxed);
        let compiled = compile_logged(label, wasm.len(), || engine.precompile_component(wasm))?;
        if let Err(error) = store_atomically(dir, &path, &compiled) {
            tracing::warn!(path = %path.display(), %error, "could not cache a compiled component");
        }
        // SAFETY: `compiled` was produced just above by this engine.
        unsafe { Component::deserialize(engine, &compiled) }
    }
}

/// What the compile cache holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct CacheUsage {
    /// Compiled components in the cache.
    pub artifacts: u64,
    pub bytes: u64,
}

impl CompileCache {
    /// Deletes compiled components that are neither for one of the
    /// `in_use` hashes nor among the `history` most recently used others
    /// (those may be for versions just replaced, or for another host's
    /// engine sharing the folder), and says what is left. Blocking.
    ///
    /// An artifact deleted while a loaded component maps it stays readable:
    /// the mapping keeps the file's contents until it ends.
    pub fn prune(&self, in_use: &BTreeSet<String>, history: usize) -> std::io::Result<CacheUsage> {
        let Some(dir) = &self.dir else {
            return Ok(CacheUsage::default());
        };
        let mut others = Vec::new();
        let mut usage = CacheUsage::default();
        for artifact in artifacts(dir)? {
            let sha = artifact.name.split('-').next().unwrap_or_default();
            if in_use.contains(sha) {
                usage.add(&artifact);
            } else {
                others.push(artifact);
            }
        }
        others.sort_by_key(|a| std::cmp::Reverse(a.modified));
        for (n, artifact) in others.into_iter().enumerate() {
            if n < history {
                usage.add(&artifact);
                continue;
            }
            match std::fs::remove_file(dir.join(&artifact.name)) {
                Ok(()) => tracing::debug!(artifact = %artifact.name, "pruned a compiled component"),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    tracing::warn!(artifact = %artifact.name, %error, "could not prune a compiled component");
                    usage.add(&artifact);
                }
            }
        }
        Ok(usage)
    }
}

impl CacheUsage {
    fn add(&mut self, artifact: &Artifact) {
        self.artifacts += 1;
        self.bytes += artifact.bytes;
    }
}

/// One compiled component in the cache folder.
struct Artifact {
    name: String,
    bytes: u64,
    modified: std::time::SystemTime,
}

/// The compiled components in `dir` (`<sha256>-<engine>.cwasm`); none if
/// the folder does not exist yet.
fn artifacts(dir: &Path) -> std::io::Result<Vec<Artifact>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".cwasm") {
            continue;
        }
        let Ok(metadata) = entry.metadata() else {
            continue;
        };
        found.push(Artifact {
            name,
            bytes: metadata.len(),
            modified: metadata.modified().unwrap_or(std::time::UNIX_EPOCH),
        });
    }
    Ok(found)
}

/// Compiles, saying in the log that it started and how long it took: a
/// large component (an interpreter built in) takes many seconds.
fn compile_logged<T>(
    label: &str,
    bytes: usize,
    compile: impl FnOnce() -> wasmtime::Result<T>,
) -> wasmtime::Result<T> {
    let started = std::time::Instant::now();
    tracing::info!(component = label, bytes, "compiling a component");
    let compiled = compile();
    tracing::info!(
        component = label,
        took_ms = started.elapsed().as_millis() as u64,
        ok = compiled.is_ok(),
        "compiling a component finished"
    );
    compiled
}

fn store_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    fn artifact(dir: &Path, sha: &str, engine: &str, age_secs: u64) {
        let path = dir.join(format!("{sha}-{engine}.cwasm"));
        std::fs::write(&path, vec![0u8; 100]).unwrap();
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        file.set_modified(SystemTime::now() - Duration::from_secs(age_secs))
            .unwrap();
    }

    fn names(dir: &Path) -> BTreeSet<String> {
        artifacts(dir)
            .unwrap()
            .into_iter()
            .map(|a| a.name)
            .collect()
    }

    /// Pruning keeps what is in use and the most recently used others, up to
    /// the history bound, whatever engine they were compiled for; other
    /// files in the folder are left alone.
    #[test]
    fn pruning_keeps_versions_in_use_and_a_bounded_history() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CompileCache::keyed(Some(dir.path().to_owned()), "e1".into());
        // Names are `<sha256>-<engine>.cwasm`; short stand-ins for hashes.
        artifact(dir.path(), "10aded", "e1", 1_000);
        artifact(dir.path(), "01d", "e1", 900); // an old version still in use
        artifact(dir.path(), "2ecent", "e1", 10);
        artifact(dir.path(), "0the2", "e0", 20); // another engine's, recent
        artifact(dir.path(), "57a1e", "e1", 500);
        std::fs::write(dir.path().join("notes.txt"), "not an artifact").unwrap();

        let in_use = BTreeSet::from(["10aded".to_owned(), "01d".to_owned()]);
        let usage = cache.prune(&in_use, 2).unwrap();

        assert_eq!(
            names(dir.path()),
            BTreeSet::from([
                "10aded-e1.cwasm".to_owned(),
                "01d-e1.cwasm".to_owned(),
                "2ecent-e1.cwasm".to_owned(),
                "0the2-e0.cwasm".to_owned(),
            ])
        );
        assert!(dir.path().join("notes.txt").exists());
        assert_eq!(
            usage,
            CacheUsage {
                artifacts: 4,
                bytes: 400
            }
        );

        let usage = cache.prune(&in_use, 0).unwrap();
        assert_eq!(usage.artifacts, 2, "{:?}", names(dir.path()));
    }

    /// One component installed under several names loads at once under
    /// each: it is compiled once, and the other loads take the artifact.
    #[test]
    fn identical_components_loaded_at_once_compile_once() {
        let engine = build_engine(&EngineOptions {
            pooling: false,
            ..EngineOptions::default()
        })
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cache = CompileCache::new(&engine, Some(dir.path().to_owned()));
        let wasm = std::fs::read(opspawn_testkit::wasm("calculator")).unwrap();
        std::thread::scope(|scope| {
            for _ in 0..3 {
                scope.spawn(|| cache.load(&engine, &wasm, "5ame", "calculator").unwrap());
            }
        });
        assert_eq!(cache.compiled(), 1);
        assert!(
            cache.loading.lock().unwrap().is_empty(),
            "a gate is dropped with its last load"
        );
        cache.load(&engine, &wasm, "5ame", "calculator").unwrap();
        assert_eq!(cache.compiled(), 1, "a later load finds the artifact");
    }
}
