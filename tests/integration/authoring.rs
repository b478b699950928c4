//! Plugin authors' kits, end to end: the word-count examples in Rust (on
//! the SDK), Python and JavaScript (on the kits) answer tasks, and
//! `opspawn plugin new → build → install` gives each language a tool a
//! running server loads and a task uses; `opspawn plugin check` tells a
//! good file from a bad one. Every `opspawn` here is a real process.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use opspawn_testkit::{Client, PluginFolder, plugin_sources, script_plugins, wasm};
use serde_json::{Value, json};

use crate::{FINISH, Harness, binary, steps};

/// Runs `opspawn ARGS` with `env` added; answers its output.
fn opspawn(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut command = Command::new(binary());
    command.args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("running opspawn")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `opspawn ARGS` must succeed; answers its standard output.
fn succeeds(args: &[&str], env: &[(&str, &Path)]) -> String {
    let output = opspawn(args, env);
    assert!(
        output.status.success(),
        "opspawn {args:?} failed ({}):\n{}\n{}",
        output.status,
        stdout(&output),
        String::from_utf8_lossy(&output.stderr)
    );
    stdout(&output)
}

/// A task whose scripted LLM calls `tool` once through the ReAct planner,
/// then gives the final answer.
fn tool_task(tool: &str, arguments: Value) -> Value {
    json!({
        "goal": format!("Use {tool}"),
        "tools": [tool],
        "max_retries": 0,
        "options": {"llm": {"script": [
            {"tool_calls": [{"name": tool, "arguments": arguments}]},
            {"content": "Thought: the tool answered.\nFinal Answer: counted"}
        ]}}
    })
}

/// Runs [`tool_task`] to success; answers the tool's step.
async fn tool_step(client: &Client, tool: &str, arguments: Value) -> Value {
    let id = client.submit(&tool_task(tool, arguments)).await.unwrap();
    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    assert_eq!(task["status"], "succeeded", "{task:#}");
    steps(&task)[1].clone()
}

fn manifest(name: &str) -> String {
    std::fs::read_to_string(plugin_sources().join(name).join(format!("{name}.toml"))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_word_count_examples_answer_tasks_in_three_languages() {
    let harness = Harness::start_with_plugins(&[], |plugins: &PluginFolder| {
        plugins.add("word-count", "word_count", Some(&manifest("word-count")));
        for name in ["word-count-python", "word-count-js"] {
            plugins.add_file(name, &script_plugins::example(name), Some(&manifest(name)));
        }
    });
    let client = harness.client();
    let text = "the quick brown fox jumps";
    let step = tool_step(&client, "word_count", json!({"text": text})).await;
    assert_eq!(step["output"], json!({"words": 5}), "{step:#}");
    for tool in ["word_count_python", "word_count_js"] {
        let step = tool_step(&client, tool, json!({"text": text, "min_length": 5})).await;
        assert_eq!(step["output"], json!({"words": 3}), "{tool}: {step:#}");
        // The optional parameter may be left out.
        let step = tool_step(&client, tool, json!({"text": text})).await;
        assert_eq!(step["output"], json!({"words": 5}), "{tool}: {step:#}");
        // A ToolError raised or thrown by the tool keeps its code.
        let step = tool_step(&client, tool, json!({"text": text, "min_length": 0})).await;
        assert_eq!(step["status"], "failed", "{tool}: {step:#}");
        assert_eq!(
            step["error"]["code"], "invalid_min_length",
            "{tool}: {step:#}"
        );
    }

    // The schemas the kits derived (Rust from the type, Python from the
    // type hints) and the one JavaScript declared.
    let (_, listing) = client.get("/v1/plugins").await.unwrap();
    let schema = |tool: &str| -> Value {
        let spec = listing["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|p| p["tools"].as_array().cloned().unwrap_or_default())
            .find(|t| t["name"] == tool)
            .unwrap_or_else(|| panic!("{tool} in {listing:#}"));
        spec["input_schema"].clone()
    };
    assert_eq!(schema("word_count")["required"], json!(["text"]));
    assert_eq!(schema("word_count")["properties"]["text"]["type"], "string");
    for tool in ["word_count_python", "word_count_js"] {
        let schema = schema(tool);
        assert_eq!(schema["required"], json!(["text"]), "{tool}");
        assert_eq!(
            schema["properties"]["min_length"]["type"], "integer",
            "{tool}"
        );
    }
}

/// The environment that points `opspawn plugin build` at the toolchains
/// the scripts installed, and its Rust builds at the plugins' target
/// folder, whose dependencies are already compiled.
fn toolchain_env() -> Vec<(&'static str, PathBuf)> {
    vec![
        ("OPSPAWN_COMPONENTIZE_PY", script_plugins::componentize_py()),
        ("OPSPAWN_COMPONENTIZE_JS", script_plugins::componentize_js()),
        (
            "CARGO_TARGET_DIR",
            script_plugins::target_dir().join("wasm32-plugins"),
        ),
    ]
}

/// `opspawn plugin new`, `build` and `install` for `lang` into a running
/// server's folder; then a task uses the tool.
async fn three_commands_to_a_tool_a_task_uses(lang: &str) {
    let harness = Harness::start();
    let work = tempfile::tempdir().unwrap();
    let name = format!("count-{lang}");
    let tool = name.replace('-', "_");
    let project = work.path().join(&name);
    let project_arg = project.to_str().unwrap();
    let toolchains = toolchain_env();
    let env: Vec<(&str, &Path)> = toolchains.iter().map(|(k, v)| (*k, v.as_path())).collect();

    let started = Instant::now();
    succeeds(
        &["plugin", "new", "--lang", lang, &name, "--dir", project_arg],
        &[],
    );
    let built = succeeds(&["plugin", "build", project_arg], &env);
    assert!(
        built.contains(&format!("built {project_arg}/{name}.wasm")),
        "{built}"
    );
    let component = project.join(format!("{name}.wasm"));
    let installed = succeeds(
        &["plugin", "install", component.to_str().unwrap()],
        &[("OPSPAWN_PLUGIN_DIR", harness.plugins.path())],
    );
    assert!(installed.contains("installed"), "{installed}");
    eprintln!(
        "{lang}: new, build and install took {:?}",
        started.elapsed()
    );

    let client = harness.client();
    // Loading compiles the component: a JavaScript one carries its engine
    // (about 10 MB of WebAssembly), which took over a minute on 2 busy cores
    // with the host built at the tests' opt-level 1.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let (_, listing) = client.get("/v1/plugins").await.unwrap();
        let loaded = listing["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == name.as_str());
        if loaded {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never loaded: {listing:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let step = tool_step(&client, &tool, json!({"text": "one two three"})).await;
    assert_eq!(step["output"], json!({"words": 3}), "{step:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_new_build_install_gives_a_tool_a_task_uses() {
    three_commands_to_a_tool_a_task_uses("rust").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_new_build_install_gives_a_tool_a_task_uses() {
    three_commands_to_a_tool_a_task_uses("python").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_new_build_install_gives_a_tool_a_task_uses() {
    three_commands_to_a_tool_a_task_uses("js").await;
}

#[test]
fn plugin_check_says_ready_or_why_not_and_exits_accordingly() {
    let data = tempfile::tempdir().unwrap();
    let env = [("OPSPAWN_DATA_DIR", data.path())];
    let calculator = wasm("calculator");
    let calculator_manifest = plugin_sources().join("calculator/calculator.toml");

    let good = succeeds(
        &[
            "plugin",
            "check",
            calculator.to_str().unwrap(),
            calculator_manifest.to_str().unwrap(),
        ],
        &env,
    );
    for expected in [
        "kind:        tool",
        "name:        calculator",
        "wit version: 0.2.0",
        "tool:        calculator: Evaluates an arithmetic expression",
        "\"expression\":{",
        "limits:      {\"memory_bytes\":16777216,\"call_timeout\":\"2s\"",
        "refused:     nothing",
        "ready: a server loads it as \"calculator\"",
    ] {
        assert!(good.contains(expected), "{expected:?} in:\n{good}");
    }
    let planner = succeeds(&["plugin", "check", wasm("react").to_str().unwrap()], &env);
    assert!(planner.contains("kind:        planner"), "{planner}");

    let bad = |wasm: &Path, manifest: Option<&str>| -> String {
        let mut args = vec!["plugin", "check", wasm.to_str().unwrap()];
        let manifest_path = data.path().join("given.toml");
        if let Some(text) = manifest {
            std::fs::write(&manifest_path, text).unwrap();
            args.push(manifest_path.to_str().unwrap());
        }
        let output = opspawn(&args, &env);
        assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
        let text = stdout(&output);
        assert!(!text.contains("ready"), "{text}");
        text
    };
    let not_wasm = data.path().join("notes.wasm");
    std::fs::write(&not_wasm, "just text").unwrap();
    let text = bad(&not_wasm, None);
    assert!(
        text.contains("cannot load (plugin_load_failed): not a valid WebAssembly component"),
        "{text}"
    );
    assert!(
        text.contains("what to do: build it as a component"),
        "{text}"
    );
    let text = bad(&calculator, Some("[limits]\nmemory_mib = 100000\n"));
    assert!(
        text.contains("its manifest asks for 100000 MiB of memory; this host allows at most"),
        "{text}"
    );
    assert!(
        text.contains("what to do: lower [limits] memory_mib"),
        "{text}"
    );
    let text = bad(&calculator, Some("[limits\n"));
    assert!(
        text.contains("cannot load (plugin_invalid_manifest)"),
        "{text}"
    );
    assert!(text.contains("what to do: fix the manifest"), "{text}");
}

#[test]
fn plugin_build_says_what_to_install_when_a_toolchain_is_missing() {
    let work = tempfile::tempdir().unwrap();
    for (lang, install) in [
        ("python", "pip install componentize-py==0.25.1"),
        ("js", "npm install @bytecodealliance/componentize-js@0.23.0"),
        ("rust", "install Rust (https://rustup.rs)"),
    ] {
        let project = work.path().join(lang);
        let project = project.to_str().unwrap();
        succeeds(
            &["plugin", "new", "--lang", lang, "bare", "--dir", project],
            &[],
        );
        // No toolchain anywhere: an empty PATH and none named.
        let output = Command::new(binary())
            .args(["plugin", "build", project])
            .env_clear()
            .env("PATH", work.path())
            .output()
            .unwrap();
        assert!(!output.status.success(), "{lang}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(install), "{lang}: {stderr}");
    }
}
