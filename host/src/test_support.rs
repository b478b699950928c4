//! What the host's unit tests share: where the repository is, and its Rust
//! sources as text (for the tests that check the code's own shape).

use std::path::{Path, PathBuf};

/// The repository's root (the host crate is `host/` in it).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the host crate sits in the repository")
        .to_path_buf()
}

/// Every `.rs` file at or under `path`, with its text.
pub fn rust_files(path: &Path) -> Vec<(PathBuf, String)> {
    let mut files = Vec::new();
    let mut pending = vec![path.to_path_buf()];
    while let Some(path) = pending.pop() {
        if path.is_dir() {
            let entries = std::fs::read_dir(&path)
                .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            pending.extend(entries.map(|entry| entry.expect("a folder entry").path()));
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            files.push((path, text));
        }
    }
    files.sort();
    files
}

/// The host's sources under `host/<dir>` without their tests: test files
/// (`tests.rs`, `*_tests.rs`, `test_support.rs`) are left out, and every
/// other file is cut where its inline `mod tests` begins.
pub fn non_test_sources(dir: &str) -> Vec<(PathBuf, String)> {
    rust_files(&repo_root().join("host").join(dir))
        .into_iter()
        .filter(|(path, _)| {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            !name.ends_with("tests.rs") && name != "test_support.rs"
        })
        .map(|(path, text)| {
            let code = text
                .split("#[cfg(test)]\nmod tests {")
                .next()
                .unwrap_or_default();
            (path.clone(), code.to_owned())
        })
        .collect()
}

/// The real parts a host runs on, for tests in process: an SQLite store in
/// a temporary folder and a plugin runtime over a plugin folder of its own.
pub struct TestHost {
    pub config: crate::config::Config,
    pub store: std::sync::Arc<dyn crate::store::Store>,
    pub runtime: std::sync::Arc<crate::plugins::PluginRuntime>,
    pub plugins: opspawn_testkit::PluginFolder,
    _data: tempfile::TempDir,
}

impl TestHost {
    /// A host with the example plugins (calculator, react, scripted)
    /// loaded, or with none.
    pub async fn start(examples: bool) -> Self {
        let data = tempfile::tempdir().expect("a data folder");
        let plugins = if examples {
            opspawn_testkit::PluginFolder::with_examples()
        } else {
            opspawn_testkit::PluginFolder::new()
        };
        let config = crate::config::Config {
            data_dir: data.path().to_path_buf(),
            plugin_dir: Some(plugins.path().to_path_buf()),
            // Shared by every run of the tests: each component is compiled
            // once, then loaded in milliseconds.
            cache_dir: Some(std::env::temp_dir().join("opspawn-unit-test-compile-cache")),
            ..crate::config::Config::default()
        };
        let mut options = config.runtime_options();
        // Dozens of tests run at once; none needs a reserved instance pool.
        options.engine.pooling = false;
        let store = crate::store::open(&config.database_url())
            .await
            .expect("an SQLite store");
        let runtime = crate::plugins::PluginRuntime::new(options).expect("a plugin runtime");
        runtime.rescan().await.expect("scanning the plugin folder");
        runtime.loaded().await;
        let catalog = runtime.catalog();
        assert_eq!(
            catalog.plugins().count(),
            if examples { 3 } else { 0 },
            "the example plugins load: {:?}",
            catalog.failures()
        );
        Self {
            config,
            store,
            runtime,
            plugins,
            _data: data,
        }
    }
}
