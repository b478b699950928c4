//! Builds the guest plugins (their own cargo workspace in `plugins/`) for
//! `wasm32-wasip2` once per build of the tests, and tells the tests where the
//! components are. The nested cargo uses its own target directory, so it
//! never waits on the outer build's lock.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir
        .parent()
        .expect("tests/ sits in the workspace root");
    let plugins = root.join("plugins");
    for watched in [
        "Cargo.toml",
        "Cargo.lock",
        "calculator",
        "react",
        "scripted",
        "fixtures",
        "llm-http",
        "openai",
        "openrouter",
        "openai-compatible",
        "anthropic",
        "gemini",
    ] {
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
    check_built(
        &wasm_dir,
        &[
            "calculator",
            "react",
            "scripted",
            "misbehaving",
            "openai",
            "openrouter",
            "openai_compatible",
            "anthropic",
            "gemini",
        ],
    );
    println!(
        "cargo:rustc-env=OPSPAWN_TEST_WASM_DIR={}",
        wasm_dir.display()
    );
    println!(
        "cargo:rustc-env=OPSPAWN_TEST_PLUGIN_SRC={}",
        plugins.display()
    );
}

fn check_built(dir: &Path, names: &[&str]) {
    for name in names {
        let path = dir.join(format!("{name}.wasm"));
        assert!(
            path.exists(),
            "the plugin build did not produce {}",
            path.display()
        );
    }
}
