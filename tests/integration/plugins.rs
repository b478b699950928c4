//! The plugin folder and the sandbox: listing, broken files, loading without
//! a restart, and plugins that crash or loop failing only their own step.

use std::time::{Duration, Instant};

use opspawn_testkit::{PluginFolder, Server, StatusCode};
use serde_json::{Value, json};

use crate::{FINISH, Harness, binary, calculator_task, misbehaving_task, steps};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_are_listed_with_kind_version_hash_and_tool_schemas() {
    let harness = Harness::start();
    let (status, list) = harness.client().get("/v1/plugins").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let plugins = list["plugins"].as_array().unwrap();
    let find = |name: &str| -> &Value {
        plugins
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{name} is listed: {list:#}"))
    };
    assert_eq!(find("calculator")["kind"], "tool");
    assert_eq!(find("react")["kind"], "planner");
    assert_eq!(find("scripted")["kind"], "llm-adapter");
    let calculator = find("calculator");
    assert_eq!(calculator["wit_version"], "0.2.0");
    assert_eq!(calculator["sha256"].as_str().unwrap().len(), 64);
    let tool = &calculator["tools"][0];
    assert_eq!(tool["name"], "calculator");
    assert!(!tool["description"].as_str().unwrap().is_empty());
    assert_eq!(tool["input_schema"]["type"], "object");
    assert_eq!(tool["input_schema"]["required"], json!(["expression"]));
    assert_eq!(
        calculator["limits"]["memory_bytes"],
        16 << 20,
        "the manifest's limit applies"
    );
    assert!(list["failures"].as_array().unwrap().is_empty(), "{list:#}");
}

/// Components built against WIT 0.1.0 before 0.2.0 existed (the files in
/// `tests/fixtures/wit-0.1.0`, never rebuilt) keep loading and running: a
/// whole task runs on a 0.1.0 planner, tool and adapter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn components_built_for_wit_0_1_0_still_run_a_task() {
    let plugins = PluginFolder::new();
    for name in ["calculator", "react", "scripted"] {
        let manifest = opspawn_testkit::plugin_sources()
            .join(name)
            .join(format!("{name}.toml"));
        let manifest = std::fs::read_to_string(manifest).ok();
        plugins.add_file(
            name,
            &opspawn_testkit::legacy_wasm(name),
            manifest.as_deref(),
        );
    }
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(binary(), data.path(), plugins.path(), &[]).unwrap();
    let client = server.client();
    let (_, list) = client.get("/v1/plugins").await.unwrap();
    assert!(list["failures"].as_array().unwrap().is_empty(), "{list:#}");
    for plugin in list["plugins"].as_array().unwrap() {
        assert_eq!(plugin["wit_version"], "0.1.0", "{plugin:#}");
    }
    let id = client
        .submit(&calculator_task("(2+3)*4", "20"))
        .await
        .unwrap();
    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    assert_eq!(task["status"], "succeeded", "{task:#}");
    assert_eq!(task["result"], "20", "{task:#}");
    assert_eq!(steps(&task)[1]["output"]["result"], 20, "{task:#}");
}

/// A component built against a WIT version this host does not know, newer
/// or older, is refused with a message that says what to do, and the rest
/// of the folder loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn components_of_unknown_wit_versions_are_refused_with_advice() {
    let plugins = PluginFolder::with_examples();
    // The same bytes with every `@0.1.0` turned into `@0.3.0` (or `@0.1.3`):
    // what a guest built against a later version would name.
    let legacy = std::fs::read(opspawn_testkit::legacy_wasm("calculator")).unwrap();
    for (name, version) in [("future", b"@0.3.0"), ("patched", b"@0.1.3")] {
        let mut bytes = legacy.clone();
        let mut replaced = 0;
        for at in 0..bytes.len().saturating_sub(6) {
            if &bytes[at..at + 6] == b"@0.1.0" {
                bytes[at..at + 6].copy_from_slice(version);
                replaced += 1;
            }
        }
        assert!(replaced > 0, "the fixture names its version");
        std::fs::write(plugins.path().join(format!("{name}.wasm")), bytes).unwrap();
    }
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(binary(), data.path(), plugins.path(), &[]).unwrap();
    let (_, list) = server.client().get("/v1/plugins").await.unwrap();
    let failure = |file: &str| -> String {
        list["failures"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["file"].as_str().unwrap_or_default().ends_with(file))
            .unwrap_or_else(|| panic!("{file} is refused: {list:#}"))["error"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let future = failure("future.wasm");
    assert!(
        future.contains("opspawn:plugin@0.3.0") && future.contains("upgrade Opspawn"),
        "{future}"
    );
    let patched = failure("patched.wasm");
    assert!(
        patched.contains("opspawn:plugin@0.1.3") && patched.contains("0.1.0, 0.2.0"),
        "{patched}"
    );
    let names: Vec<&str> = list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"calculator"), "the rest load: {names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_files_are_reported_and_skipped_while_the_rest_load() {
    let plugins = PluginFolder::with_examples();
    std::fs::write(plugins.path().join("garbage.wasm"), b"this is not wasm").unwrap();
    // A core module, not a component.
    std::fs::write(plugins.path().join("core.wasm"), b"\0asm\x01\0\0\0").unwrap();
    // A tool whose manifest is invalid.
    plugins.add(
        "badmanifest",
        "calculator",
        Some("[limits]\nmemory = \"lots\"\n"),
    );
    // A second plugin offering a tool name that is already taken.
    plugins.add("twin", "calculator", None);
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(binary(), data.path(), plugins.path(), &[]).unwrap();
    let (_, list) = server.client().get("/v1/plugins").await.unwrap();

    let names: Vec<&str> = list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"calculator") && names.contains(&"react") && names.contains(&"scripted"),
        "{list:#}"
    );
    let failures = list["failures"].as_array().unwrap();
    let reason = |file: &str| -> String {
        failures
            .iter()
            .find(|f| f["file"].as_str().unwrap().ends_with(file))
            .unwrap_or_else(|| panic!("{file} is reported: {list:#}"))["error"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert!(reason("garbage.wasm").contains("not a valid WebAssembly component"));
    assert!(reason("core.wasm").contains("not a valid WebAssembly component"));
    assert!(reason("badmanifest.wasm").contains("invalid manifest"));
    assert!(reason("twin.wasm").contains("already offered by plugin \"calculator\""));

    let id = server
        .client()
        .submit(&calculator_task("6*7", "42"))
        .await
        .unwrap();
    let task = server
        .client()
        .wait_until_finished(&id, FINISH)
        .await
        .unwrap();
    assert_eq!(task["status"], "succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_dropped_into_the_folder_loads_without_a_restart() {
    let plugins = PluginFolder::new();
    plugins.add("react", "react", None);
    plugins.add("scripted", "scripted", None);
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(binary(), data.path(), plugins.path(), &[]).unwrap();
    let client = server.client();
    let (status, body) = client
        .post("/v1/tasks", &calculator_task("1+2", "3"))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["code"], "unknown_tool");

    // Copy under a hidden name, then rename: the folder sees one complete file.
    let hidden = plugins.path().join(".calculator.wasm.partial");
    std::fs::copy(opspawn_testkit::wasm("calculator"), &hidden).unwrap();
    std::fs::rename(&hidden, plugins.path().join("calculator.wasm")).unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, list) = client.get("/v1/plugins").await.unwrap();
        if list["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "calculator")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the calculator was not loaded: {list:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let id = client.submit(&calculator_task("1+2", "3")).await.unwrap();
    assert_eq!(
        client.wait_until_finished(&id, FINISH).await.unwrap()["status"],
        "succeeded"
    );

    std::fs::remove_file(plugins.path().join("calculator.wasm")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, list) = client.get("/v1/plugins").await.unwrap();
        if !list["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "calculator")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the calculator was not unloaded: {list:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs one misbehaving tool and returns the task and its failed tool step.
async fn run_misbehaving(harness: &Harness, tool: &str, arguments: Value) -> (Value, Value) {
    let client = harness.client();
    let id = client
        .submit(&misbehaving_task(tool, arguments))
        .await
        .unwrap();
    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    assert_eq!(
        task["status"], "succeeded",
        "the task carried on after the failed step: {task:#}"
    );
    let step = steps(&task)[1].clone();
    assert_eq!(step["kind"], "tool");
    assert_eq!(step["status"], "failed", "step: {step:#}");
    (task, step)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trapping_or_panicking_plugin_fails_only_its_step() {
    let harness = Harness::start();
    let (_, trap) = run_misbehaving(&harness, "trap", json!({})).await;
    assert_eq!(trap["error"]["code"], "plugin_trap");
    assert!(
        trap["error"]["message"]
            .as_str()
            .unwrap()
            .contains("misbehaving")
    );

    let (_, panic) = run_misbehaving(&harness, "panic", json!({})).await;
    assert_eq!(panic["error"]["code"], "plugin_trap");
    assert!(
        panic["error"]["message"]
            .as_str()
            .unwrap()
            .contains("deliberate panic"),
        "what the plugin printed explains the crash: {panic:#}"
    );

    // The host is unharmed and still runs other tasks.
    let client = harness.client();
    let (status, _) = client.get("/healthz").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let id = client.submit(&calculator_task("2*21", "42")).await.unwrap();
    assert_eq!(
        client.wait_until_finished(&id, FINISH).await.unwrap()["status"],
        "succeeded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_plugin_is_stopped_by_its_time_limit() {
    let harness = Harness::start();
    let client = harness.client();
    // A calculator task runs alongside and is not held up by the loop.
    let started = Instant::now();
    let looping = client
        .submit(&misbehaving_task("spin", json!({})))
        .await
        .unwrap();
    let sleeping = client
        .submit(&misbehaving_task("sleep", json!({"ms": 600_000})))
        .await
        .unwrap();
    let normal = client.submit(&calculator_task("3*3", "9")).await.unwrap();

    let normal = client.wait_until_finished(&normal, FINISH).await.unwrap();
    assert_eq!(normal["status"], "succeeded");

    for id in [looping, sleeping] {
        let task = client.wait_until_finished(&id, FINISH).await.unwrap();
        let step = &steps(&task)[1];
        assert_eq!(step["status"], "failed", "task: {task:#}");
        assert_eq!(step["error"]["code"], "plugin_timeout", "step: {step:#}");
        let took = step["duration_ms"].as_i64().unwrap();
        assert!(
            (900..5000).contains(&took),
            "stopped near its 1 s limit, after {took} ms"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_bombs_and_deep_recursion_fail_with_their_own_codes() {
    let harness = Harness::start();
    let (_, bomb) = run_misbehaving(&harness, "memory_bomb", json!({})).await;
    assert_eq!(
        bomb["error"]["code"], "plugin_memory_limit",
        "step: {bomb:#}"
    );
    // Rust keeps part of its stack in linear memory: recursion there ends in
    // an out-of-bounds access (a trap) before the wasm stack overflows.
    let (_, deep) = run_misbehaving(&harness, "recurse", json!({})).await;
    let code = deep["error"]["code"].as_str().unwrap();
    assert!(
        code == "plugin_stack_overflow"
            || (code == "plugin_trap"
                && deep["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("out of bounds")),
        "step: {deep:#}"
    );
    let (_, big) = run_misbehaving(&harness, "big_output", json!({"bytes": 200_000})).await;
    assert_eq!(
        big["error"]["code"], "plugin_output_too_large",
        "step: {big:#}"
    );
}
