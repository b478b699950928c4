//! Builds the guest plugins (their own cargo workspace in `plugins/`) for
//! `wasm32-wasip2` once per build of the tests, and tells the tests where the
//! components are. The nested cargo uses its own target directory, so it
//! never waits on the outer build's lock. Also generates the gRPC client
//! from `proto/`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The gRPC API's files, under `proto/` (as `host/build.rs` lists them).
const PROTO_FILES: [&str; 3] = [
    "opspawn/v1/tasks.proto",
    "opspawn/v1/threads.proto",
    "opspawn/v1/memories.proto",
];

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir
        .parent()
        .expect("tests/ sits in the workspace root");
    let plugins = root.join("plugins");
    // The guest workspace's member list is the one list of the plugins: what
    // to watch, and which components the build must produce.
    let manifest = plugins.join("Cargo.toml");
    let members = workspace_members(
        &std::fs::read_to_string(&manifest)
            .unwrap_or_else(|e| panic!("reading {}: {e}", manifest.display())),
    );
    for watched in ["Cargo.toml", "Cargo.lock"]
        .into_iter()
        .chain(members.iter().map(String::as_str))
    {
        println!("cargo:rerun-if-changed={}", plugins.join(watched).display());
    }
    println!("cargo:rerun-if-changed={}", root.join("wit").display());

    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    // OUT_DIR is <target>/<profile>/build/<package>-<hash>/out.
    let target_dir = out_dir
        .ancestors()
        .nth(4)
        .expect("OUT_DIR is inside the target directory");
    let wasm_target = target_dir.join("wasm32-plugins");

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--manifest-path",
        ])
        .arg(plugins.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", &wasm_target)
        // Flags meant for the host build must not leak into the guest build.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_PROFILE_RELEASE_DEBUG")
        .env_remove("CARGO_PROFILE_RELEASE_INCREMENTAL")
        .status()
        .expect("running cargo to build the plugins");
    assert!(
        status.success(),
        "building the plugins in {} failed; is the target installed? `rustup target add wasm32-wasip2`",
        plugins.display()
    );
    let wasm_dir = wasm_target.join("wasm32-wasip2").join("release");
    let components: Vec<String> = members
        .iter()
        .filter_map(|member| component_name(&plugins.join(member)))
        .collect();
    check_built(&wasm_dir, &components);
    println!(
        "cargo:rustc-env=OPSPAWN_TEST_WASM_DIR={}",
        wasm_dir.display()
    );
    println!(
        "cargo:rustc-env=OPSPAWN_TEST_PLUGIN_SRC={}",
        plugins.display()
    );

    // The gRPC tests' client, generated from the .proto the server is.
    let proto = root.join("proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    let descriptors = protox::compile(PROTO_FILES, [&proto])
        .unwrap_or_else(|e| panic!("compiling the .proto files in proto/: {e}"));
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(descriptors)
        .expect("generating the gRPC client");
}

/// The `members = [...]` of a workspace manifest.
fn workspace_members(manifest: &str) -> Vec<String> {
    let list = manifest
        .split_once("members = [")
        .and_then(|(_, rest)| rest.split_once(']'))
        .expect("plugins/Cargo.toml lists its members")
        .0;
    list.lines()
        .map(|line| line.split('#').next().unwrap_or_default())
        .flat_map(|line| line.split(','))
        .map(|member| member.trim().trim_matches('"'))
        .filter(|member| !member.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The file name (without `.wasm`) of the component a member builds, if
/// it builds one (a `cdylib`; `llm-http` is a library). Cargo names the
/// file after the package, dashes turned to underscores.
fn component_name(member: &Path) -> Option<String> {
    let manifest = std::fs::read_to_string(member.join("Cargo.toml"))
        .unwrap_or_else(|e| panic!("reading {}/Cargo.toml: {e}", member.display()));
    if !manifest.contains("cdylib") {
        return None;
    }
    let name = manifest
        .lines()
        .find_map(|line| line.trim().strip_prefix("name = "))
        .expect("a package name")
        .trim_matches('"');
    Some(name.replace('-', "_"))
}

fn check_built(dir: &Path, names: &[String]) {
    for name in names {
        let path = dir.join(format!("{name}.wasm"));
        assert!(
            path.exists(),
            "the plugin build did not produce {}",
            path.display()
        );
    }
}
