//! `opspawn plugin new | build | check | install`: from an empty folder to a
//! tool the server has loaded, in three commands.
//!
//! `new` writes a project from the templates in `plugins/sdk/templates`
//! (compiled into this binary, with the Python and JavaScript kits and the
//! WIT), `build` runs the language's toolchain and says what to install
//! when it is missing, `check` loads a component with the server's own
//! loader and policy, and `install` copies it into the plugin folder the
//! way a server expects a drop-in (a hidden temporary name, then a rename).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use clap::ValueEnum;

use crate::config::Config;
use crate::errors::Code;
use crate::plugins::{PluginInfo, PluginRuntime};

/// The languages `opspawn plugin new` writes projects in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Lang {
    Rust,
    Python,
    Js,
}

/// The WIT every project builds against (the SDK's copy for Rust).
const WIT: &str = include_str!("../../wit/v0.2.0/opspawn.wit");

macro_rules! template {
    ($path:literal) => {
        include_str!(concat!("../../plugins/sdk/", $path))
    };
}

/// The Rust SDK this binary was built beside, which a new Rust project
/// depends on by path until the crate is on crates.io.
const BUILT_SDK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../plugins/sdk");

/// The componentize-py release the docs, templates and CI use.
const COMPONENTIZE_PY: &str = "componentize-py==0.25.1";
/// The componentize-js release the docs, templates and CI use.
const COMPONENTIZE_JS: &str = "@bytecodealliance/componentize-js@0.23.0";

/// Writes a tool project named `name` into `dir` (default `./<name>`) that
/// builds as it is; returns its folder.
pub fn new_project(
    lang: Lang,
    name: &str,
    dir: Option<PathBuf>,
    sdk: Option<PathBuf>,
) -> anyhow::Result<PathBuf> {
    check_project_name(name)?;
    let dir = dir.unwrap_or_else(|| PathBuf::from(name));
    if dir.exists() && std::fs::read_dir(&dir)?.next().is_some() {
        bail!(
            "{} already exists and is not empty: choose another name or --dir",
            dir.display()
        );
    }
    let tool = name.replace('-', "_");
    let mut files: Vec<(&str, String)> = vec![
        (
            ".gitignore",
            template!("templates/gitignore.template").into(),
        ),
        (
            "manifest",
            template!("templates/manifest.toml.template").into(),
        ),
    ];
    match lang {
        Lang::Rust => {
            let sdk = rust_sdk(sdk)?;
            files.push((
                "Cargo.toml",
                template!("templates/rust/Cargo.toml.template")
                    .replace("{{sdk}}", &sdk.display().to_string()),
            ));
            files.push((
                "src/lib.rs",
                template!("templates/rust/lib.rs.template").into(),
            ));
            // The versions the SDK was tested with (its workspace's lock),
            // when it has one: a first build then resolves nothing anew.
            if let Ok(lock) = std::fs::read_to_string(sdk.join("../Cargo.lock")) {
                files.push(("Cargo.lock", lock));
            }
        }
        Lang::Python => {
            files.push((
                "app.py",
                template!("templates/python/app.py.template").into(),
            ));
            files.push((
                "opspawn_tool.py",
                template!("python/opspawn_tool.py").into(),
            ));
            files.push(("wit/opspawn.wit", WIT.into()));
        }
        Lang::Js => {
            files.push(("app.js", template!("templates/js/app.js.template").into()));
            files.push(("opspawn.js", template!("js/opspawn.js").into()));
            files.push(("wit/opspawn.wit", WIT.into()));
        }
    }
    let manifest_name = format!("{name}.toml");
    for (path, text) in files {
        let path = if path == "manifest" {
            manifest_name.as_str()
        } else {
            path
        };
        let text = text.replace("{{name}}", name).replace("{{tool}}", &tool);
        let target = dir.join(path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&target, text)
            .with_context(|| format!("cannot write {}", target.display()))?;
    }
    Ok(dir)
}

/// Plugin and crate names: a lower-case letter, then lower-case letters,
/// digits and dashes, as a plugin name, a crate name and (with `_` for
/// `-`) a tool name all accept.
fn check_project_name(name: &str) -> anyhow::Result<()> {
    let valid = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !valid {
        bail!(
            "{name:?} cannot name a plugin: use a lower-case letter, then lower-case letters, \
             digits or '-' (at most 64), such as word-count"
        );
    }
    Ok(())
}

/// The SDK a new Rust project depends on: `--sdk` / `OPSPAWN_SDK_PATH`,
/// else the checkout this binary was built from, which must still be there.
fn rust_sdk(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let sdk = given.unwrap_or_else(|| PathBuf::from(BUILT_SDK));
    let manifest = sdk.join("Cargo.toml");
    let is_sdk = std::fs::read_to_string(&manifest)
        .is_ok_and(|text| text.contains("name = \"opspawn-plugin\""));
    if !is_sdk {
        bail!(
            "the Rust plugin SDK (plugins/sdk of an Opspawn checkout) is not at {}: pass --sdk \
             PATH or set OPSPAWN_SDK_PATH to the plugins/sdk folder of a checkout",
            sdk.display()
        );
    }
    Ok(sdk.canonicalize()?)
}

/// What a project folder holds, as `build` tells it.
struct Project {
    lang: Lang,
    /// The plugin's name: the Rust package's, else its manifest's stem.
    name: String,
}

impl Project {
    fn find(dir: &Path) -> anyhow::Result<Self> {
        let lang = if dir.join("Cargo.toml").is_file() {
            Lang::Rust
        } else if dir.join("app.py").is_file() {
            Lang::Python
        } else if dir.join("app.js").is_file() {
            Lang::Js
        } else {
            bail!(
                "{} holds no Cargo.toml, app.py or app.js: run `opspawn plugin build` in a \
                 project that `opspawn plugin new` wrote",
                dir.display()
            );
        };
        let name = match lang {
            Lang::Rust => package_name(&dir.join("Cargo.toml"))?,
            Lang::Python | Lang::Js => manifest_stem(dir)?,
        };
        Ok(Self { lang, name })
    }
}

fn package_name(cargo_toml: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(cargo_toml)
        .with_context(|| format!("cannot read {}", cargo_toml.display()))?;
    let manifest: toml::Table =
        toml::from_str(&text).with_context(|| format!("{} is not TOML", cargo_toml.display()))?;
    manifest
        .get("package")
        .and_then(|package| package.get("name"))
        .and_then(|name| name.as_str())
        .map(str::to_owned)
        .with_context(|| format!("{} names no [package]", cargo_toml.display()))
}

/// The stem of the one plugin manifest (`<name>.toml`) in `dir`, else the
/// folder's name.
fn manifest_stem(dir: &Path) -> anyhow::Result<String> {
    let mut stems = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "toml")
            && let Some(stem) = path.file_stem().and_then(|s| s.to_str())
            && !matches!(stem, "pyproject" | "Cargo")
        {
            stems.push(stem.to_owned());
        }
    }
    match stems.as_slice() {
        [stem] => Ok(stem.clone()),
        _ => dir
            .canonicalize()?
            .file_name()
            .and_then(|name| name.to_str())
            .map(str::to_owned)
            .context("the project folder has no name"),
    }
}

/// Builds the project in `dir` into `<dir>/<name>.wasm`; returns that path.
pub fn build(dir: &Path) -> anyhow::Result<PathBuf> {
    let project = Project::find(dir)?;
    let output = dir.join(format!("{}.wasm", project.name));
    match project.lang {
        Lang::Rust => build_rust(dir, &project.name, &output)?,
        Lang::Python => {
            let tool = toolchain(
                "OPSPAWN_COMPONENTIZE_PY",
                &dir.join(".venv/bin/componentize-py"),
                "componentize-py",
            )
            .with_context(|| {
                format!(
                    "componentize-py is not installed: run `python3 -m venv .venv && \
                     .venv/bin/pip install {COMPONENTIZE_PY}` in {}, or set \
                     OPSPAWN_COMPONENTIZE_PY to its path",
                    dir.display()
                )
            })?;
            run(Command::new(tool)
                .current_dir(dir)
                .args(["-d", "wit", "-w", "tool", "componentize", "app", "-o"])
                .arg(output.file_name().expect("a file name")))?;
        }
        Lang::Js => {
            let tool = toolchain(
                "OPSPAWN_COMPONENTIZE_JS",
                &dir.join("node_modules/.bin/componentize-js"),
                "componentize-js",
            )
            .with_context(|| {
                format!(
                    "componentize-js is not installed: run `npm install {COMPONENTIZE_JS}` in \
                     {} (Node 20 or later), or set OPSPAWN_COMPONENTIZE_JS to its path",
                    dir.display()
                )
            })?;
            // `-d http fetch-event`: a tool imports no wasi:http, which the
            // host does not offer to tools.
            run(Command::new(tool)
                .current_dir(dir)
                .args(["app.js", "--wit", "wit", "-n", "tool"])
                .args(["-d", "http", "fetch-event", "-o"])
                .arg(output.file_name().expect("a file name")))?;
        }
    }
    Ok(output)
}

fn build_rust(dir: &Path, name: &str, output: &Path) -> anyhow::Result<()> {
    if Command::new("cargo").arg("--version").output().is_err() {
        bail!(
            "cargo is not installed: install Rust (https://rustup.rs), then `rustup target add \
             wasm32-wasip2`"
        );
    }
    if let Ok(installed) = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        && !String::from_utf8_lossy(&installed.stdout)
            .lines()
            .any(|target| target == "wasm32-wasip2")
    {
        bail!("the wasm32-wasip2 target is not installed: run `rustup target add wasm32-wasip2`");
    }
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.join("target"));
    run(Command::new("cargo")
        .args(["build", "--release", "--target", "wasm32-wasip2"])
        .arg("--manifest-path")
        .arg(dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir))?;
    // Cargo names the component after the library: dashes become underscores.
    let built = target_dir
        .join("wasm32-wasip2/release")
        .join(format!("{}.wasm", name.replace('-', "_")));
    std::fs::copy(&built, output)
        .with_context(|| format!("cannot copy {} to {}", built.display(), output.display()))?;
    Ok(())
}

/// A toolchain command: the path in `env`, else the project's own install,
/// else `command` on the `PATH`.
fn toolchain(env: &str, local: &Path, command: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        return Some(PathBuf::from(path));
    }
    if local.is_file() {
        return Some(local.to_owned());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(command))
        .find(|path| path.is_file())
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let program = command.get_program().to_string_lossy().into_owned();
    let status = command
        .status()
        .with_context(|| format!("cannot run {program}"))?;
    if !status.success() {
        bail!("{program} failed ({status}); its output above says why");
    }
    Ok(())
}

/// Loads `wasm` as a server with `config` would load it from its plugin
/// folder, with `manifest` (else `<file>.toml` beside it, if any), and
/// prints what it is and whether it is ready. Answers the exit status: 0
/// when it loads, 1 when it cannot.
pub async fn check(config: &Config, wasm: &Path, manifest: Option<&Path>) -> anyhow::Result<i32> {
    let stem = plugin_stem(wasm)?;
    let bytes = std::fs::read(wasm).with_context(|| format!("cannot read {}", wasm.display()))?;
    let manifest_path = manifest_beside(wasm, manifest);
    let manifest_bytes = match &manifest_path {
        Some(path) => {
            Some(std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?)
        }
        None => None,
    };
    let mut options = config.runtime_options();
    // A check compiles afresh and leaves nothing in the server's cache.
    options.cache_dir = None;
    let runtime = PluginRuntime::new(options)
        .map_err(|e| anyhow::anyhow!("cannot start the plugin runtime: {e:#}"))?;
    println!(
        "{}{}",
        wasm.display(),
        match &manifest_path {
            Some(path) => format!(" with manifest {}", path.display()),
            None => " (no manifest: default limits, no grants)".into(),
        }
    );
    match runtime
        .check_file(&stem, bytes, manifest_bytes.as_deref())
        .await
    {
        Ok(info) => {
            print_checked(&info);
            println!(
                "ready: a server loads it as {:?} from {}",
                info.name,
                config.plugin_dir().display()
            );
            Ok(0)
        }
        Err(failure) => {
            println!("cannot load ({}): {}", failure.code.as_str(), failure.error);
            if let Some(advice) = advice(failure.code, &failure.error) {
                println!("what to do: {advice}");
            }
            Ok(1)
        }
    }
}

/// What to do about a load failure whose message does not already say.
fn advice(code: Code, error: &str) -> Option<&'static str> {
    if code == Code::PluginInvalidManifest {
        return Some(
            "fix the manifest: its fields are in docs/plugins/README.md and docs/security.md",
        );
    }
    let advice = [
        (
            "not a valid WebAssembly component",
            "build it as a component for wasm32-wasip2 against wit/v0.2.0 (`opspawn plugin build`)",
        ),
        (
            "imports something this host does not provide",
            "build it against a world of wit/v0.2.0, which imports only logging and WASI 0.2 \
             (JavaScript: componentize-js -d http fetch-event)",
        ),
        (
            "MiB of memory; this host allows",
            "lower [limits] memory_mib in the manifest, or ask the operator to raise \
             plugins.max_memory_mib",
        ),
        (
            "describing its tools failed",
            "run its describe in a unit test and fix what fails",
        ),
        (
            "has an invalid input schema",
            "fix that tool's input schema (JSON Schema, draft 2020-12)",
        ),
    ];
    advice
        .into_iter()
        .find(|(symptom, _)| error.contains(symptom))
        .map(|(_, advice)| advice)
}

fn print_checked(info: &PluginInfo) {
    println!("kind:        {}", info.kind);
    println!("name:        {}", info.name);
    println!("wit version: {}", info.wit_version);
    println!("sha256:      {} ({} bytes)", info.sha256, info.size_bytes);
    for tool in &info.tools {
        println!("tool:        {}: {}", tool.name, tool.description);
        println!("  input schema: {}", tool.input_schema);
    }
    let grants = serde_json::to_string(&info.grants).unwrap_or_default();
    println!("grants:      {grants}");
    let limits = serde_json::to_string(&info.limits).unwrap_or_default();
    println!("limits:      {limits}");
    if info.refused.is_empty() {
        println!("refused:     nothing");
    }
    for refusal in &info.refused {
        println!("refused:     {refusal}");
    }
}

/// Copies `wasm` (and `manifest`, else `<file>.toml` beside it, if any)
/// into `plugin_dir` as `<stem>.wasm` and `<stem>.toml`, each atomically,
/// the manifest first so the component never loads without it. Returns the
/// installed component's path.
pub fn install(plugin_dir: &Path, wasm: &Path, manifest: Option<&Path>) -> anyhow::Result<PathBuf> {
    let stem = plugin_stem(wasm)?;
    std::fs::create_dir_all(plugin_dir)
        .with_context(|| format!("cannot create the plugin folder {}", plugin_dir.display()))?;
    if let Some(manifest) = manifest_beside(wasm, manifest) {
        copy_atomically(&manifest, &plugin_dir.join(format!("{stem}.toml")))?;
    }
    let installed = plugin_dir.join(format!("{stem}.wasm"));
    copy_atomically(wasm, &installed)?;
    Ok(installed)
}

/// Copies `from` to a hidden temporary name beside `to` (the server skips
/// hidden files), flushes it, then renames it over `to`: a watching server
/// sees the whole file or none of it.
fn copy_atomically(from: &Path, to: &Path) -> anyhow::Result<()> {
    let name = to.file_name().expect("a file name").to_string_lossy();
    let temporary = to.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let copied = std::fs::copy(from, &temporary)
        .and_then(|_| std::fs::File::open(&temporary)?.sync_all())
        .and_then(|()| std::fs::rename(&temporary, to));
    if let Err(error) = copied {
        let _ = std::fs::remove_file(&temporary);
        return Err(error)
            .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()));
    }
    Ok(())
}

/// The file's stem, which names the plugin unless its manifest does.
fn plugin_stem(wasm: &Path) -> anyhow::Result<String> {
    if wasm.extension().is_none_or(|ext| ext != "wasm") {
        bail!("{} is not a .wasm file", wasm.display());
    }
    wasm.file_stem()
        .and_then(|stem| stem.to_str())
        .map(str::to_owned)
        .with_context(|| format!("{} has no usable file name", wasm.display()))
}

/// The manifest given, else `<file>.toml` beside the component if there is one.
fn manifest_beside(wasm: &Path, given: Option<&Path>) -> Option<PathBuf> {
    given
        .map(Path::to_owned)
        .or_else(|| Some(wasm.with_extension("toml")).filter(|path| path.is_file()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_names_fit_plugins_crates_and_tools() {
        for name in ["word-count", "a", "tool2"] {
            check_project_name(name).unwrap();
        }
        for name in ["", "Word", "2tools", "word_count", "a b", &"a".repeat(65)] {
            assert!(check_project_name(name).is_err(), "{name:?}");
        }
    }

    #[test]
    fn a_new_project_names_its_tool_and_manifest_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let project = dir.path().join("p");
        new_project(Lang::Js, "word-count", Some(project.clone()), None).unwrap();
        let app = std::fs::read_to_string(project.join("app.js")).unwrap();
        assert!(app.contains("tool(\"word_count\""), "{app}");
        assert!(project.join("word-count.toml").is_file());
        assert_eq!(
            std::fs::read_to_string(project.join("wit/opspawn.wit")).unwrap(),
            WIT
        );
        let found = Project::find(&project).unwrap();
        assert_eq!((found.lang, found.name.as_str()), (Lang::Js, "word-count"));
        let again = new_project(Lang::Js, "word-count", Some(project), None);
        assert!(again.unwrap_err().to_string().contains("not empty"));
    }

    #[test]
    fn a_rust_project_depends_on_the_sdk_by_an_absolute_path() {
        let dir = tempfile::tempdir().unwrap();
        let project = dir.path().join("p");
        new_project(Lang::Rust, "shout", Some(project.clone()), None).unwrap();
        let cargo = std::fs::read_to_string(project.join("Cargo.toml")).unwrap();
        let sdk = PathBuf::from(BUILT_SDK).canonicalize().unwrap();
        assert!(
            cargo.contains(&format!("path = \"{}\"", sdk.display())),
            "{cargo}"
        );
        assert_eq!(package_name(&project.join("Cargo.toml")).unwrap(), "shout");
        let error = new_project(
            Lang::Rust,
            "x",
            Some(dir.path().join("q")),
            Some(dir.path().into()),
        );
        assert!(error.unwrap_err().to_string().contains("--sdk"));
    }

    #[test]
    fn install_copies_the_manifest_beside_it_and_leaves_no_temporary_file() {
        let source = tempfile::tempdir().unwrap();
        let folder = tempfile::tempdir().unwrap();
        let wasm = source.path().join("shout.wasm");
        std::fs::write(&wasm, b"\0asm").unwrap();
        std::fs::write(source.path().join("shout.toml"), "[limits]\n").unwrap();
        let installed = install(folder.path(), &wasm, None).unwrap();
        assert_eq!(installed, folder.path().join("shout.wasm"));
        let mut names: Vec<String> = std::fs::read_dir(folder.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["shout.toml", "shout.wasm"]);
        assert!(install(folder.path(), &source.path().join("shout.toml"), None).is_err());
    }
}
