//! Plugin versions never mix within a task: a plugin replaced or removed
//! while a task runs keeps serving that task, every step records the
//! versions behind it, queued tasks wait a grace period for a plugin that
//! went missing, and a resumed task asks for the versions it recorded.

use std::time::{Duration, Instant};

use opspawn_testkit::{Client, PluginFolder};
use serde_json::{Value, json};

use crate::{FINISH, Harness, calculator_task, steps};

/// A task that calls the calculator, waits `pause_ms` in its LLM, then
/// calls it again: time to swap the plugin between the two calls.
fn two_calculations(pause_ms: u64) -> Value {
    json!({
        "goal": "Two sums, a while apart",
        "tools": ["calculator"],
        "options": {"llm": {"script": [
            {"tool_calls": [{"name": "calculator", "arguments": {"expression": "1+1"}}]},
            {"delay_ms": pause_ms,
             "tool_calls": [{"name": "calculator", "arguments": {"expression": "2+2"}}]},
            {"content": "Final Answer: 2 and 4"}
        ]}}
    })
}

/// The same component with a custom section appended: it behaves the same
/// and hashes differently, as a rebuilt plugin would.
fn rebuilt(name: &str, marker: &str) -> Vec<u8> {
    let mut bytes = std::fs::read(opspawn_testkit::wasm(name)).unwrap();
    let section_name = b"opspawn-test-build";
    let payload = marker.as_bytes();
    let body_len = 1 + section_name.len() + payload.len();
    assert!(
        body_len < 128 && section_name.len() < 128,
        "one-byte LEB128 sizes"
    );
    bytes.push(0); // a custom section
    bytes.push(body_len as u8);
    bytes.push(section_name.len() as u8);
    bytes.extend_from_slice(section_name);
    bytes.extend_from_slice(payload);
    bytes
}

/// Writes a component under a hidden name, then renames it in: the folder
/// sees one complete file.
fn replace(plugins: &PluginFolder, as_name: &str, bytes: &[u8]) {
    let hidden = plugins.path().join(format!(".{as_name}.partial"));
    std::fs::write(&hidden, bytes).unwrap();
    std::fs::rename(&hidden, plugins.path().join(format!("{as_name}.wasm"))).unwrap();
}

/// Submits [`two_calculations`], waits for its first calculation, then
/// drops in a rebuilt calculator and waits until that is the loaded
/// version. Returns the task's id, the new build's hash and the plugin
/// listing once it loaded.
async fn swap_the_calculator_mid_task(
    harness: &Harness,
    client: &Client,
) -> (String, String, Value) {
    let id = client.submit(&two_calculations(3_000)).await.unwrap();
    first_tool_call_done(client, &id).await;
    let new_build = rebuilt("calculator", "v2");
    let new_sha = sha256_hex(&new_build);
    replace(&harness.plugins, "calculator", &new_build);
    let during = wait_for_listing(client, "the new version loads", |listing| {
        loaded_sha(listing, "calculator").as_deref() == Some(new_sha.as_str())
    })
    .await;
    (id, new_sha, during)
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

async fn listing(client: &Client) -> Value {
    client.get("/v1/plugins").await.unwrap().1
}

fn loaded_sha(listing: &Value, name: &str) -> Option<String> {
    listing["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .map(|p| p["sha256"].as_str().unwrap().to_owned())
}

async fn wait_for_listing(client: &Client, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listing = listing(client).await;
        if check(&listing) {
            return listing;
        }
        assert!(Instant::now() < deadline, "{what}: {listing:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the task's first tool step has finished.
async fn first_tool_call_done(client: &Client, id: &str) {
    client
        .wait_for(id, FINISH, |task| {
            task["steps"].as_array().is_some_and(|steps| {
                steps
                    .iter()
                    .any(|s| s["kind"] == "tool" && s["status"] == "succeeded")
            })
        })
        .await
        .unwrap();
}

fn tool_step_hashes(task: &Value) -> Vec<String> {
    steps(task)
        .iter()
        .filter(|s| s["kind"] == "tool")
        .map(|s| s["plugin_sha256"].as_str().unwrap().to_owned())
        .collect()
}

/// A calculator replaced between a task's two calls: the task makes both
/// on the version it started with, which `GET /v1/plugins` lists as in use
/// meanwhile; a task started after runs on the new one. Every step records
/// the hash of the plugin that ran it and of the planner that chose it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_task_keeps_the_version_it_started_with() {
    let harness = Harness::start();
    let client = harness.client();
    let before = listing(&client).await;
    let original = loaded_sha(&before, "calculator").unwrap();
    let react = loaded_sha(&before, "react").unwrap();
    let scripted = loaded_sha(&before, "scripted").unwrap();

    let (id, new_sha, during) = swap_the_calculator_mid_task(&harness, &client).await;
    let old = &during["old_versions_in_use"];
    assert_eq!(old[0]["name"], "calculator", "{during:#}");
    assert_eq!(old[0]["sha256"], original.as_str(), "{during:#}");
    assert_eq!(old[0]["tasks"], 1, "{during:#}");
    let task = client.task(&id).await.unwrap();
    assert_eq!(
        task["status"], "running",
        "the swap came mid-task: {task:#}"
    );

    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    assert_eq!(task["status"], "succeeded", "{task:#}");
    assert_eq!(
        tool_step_hashes(&task),
        [original.as_str(), original.as_str()],
        "{task:#}"
    );
    for step in steps(&task) {
        assert_eq!(step["planner_sha256"], react.as_str(), "{step:#}");
        if step["kind"] == "llm" {
            assert_eq!(step["plugin_sha256"], scripted.as_str(), "{step:#}");
        }
    }
    let after = listing(&client).await;
    assert_eq!(after["old_versions_in_use"], json!([]), "{after:#}");

    let id = client.submit(&calculator_task("6*7", "42")).await.unwrap();
    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    assert_eq!(task["status"], "succeeded", "{task:#}");
    assert_eq!(tool_step_hashes(&task), [new_sha.as_str()], "{task:#}");
}

/// With no old versions kept (`max_old_versions = 0`), a replaced version
/// is released at once, and the running task moves to the loaded version
/// at its next call, as docs/architecture.md says happens at the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_bound_on_old_versions_a_task_moves_to_the_loaded_one() {
    let harness = Harness::start_with(&[("OPSPAWN_PLUGINS__MAX_OLD_VERSIONS", "0")]);
    let client = harness.client();
    let original = loaded_sha(&listing(&client).await, "calculator").unwrap();

    let (id, new_sha, during) = swap_the_calculator_mid_task(&harness, &client).await;
    assert_eq!(during["old_versions_in_use"], json!([]), "{during:#}");

    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    assert_eq!(task["status"], "succeeded", "{task:#}");
    assert_eq!(
        tool_step_hashes(&task),
        [original.as_str(), new_sha.as_str()],
        "{task:#}"
    );
    assert!(
        harness.server.log().contains("moves to the loaded version"),
        "the move is logged"
    );
}

/// A removed calculator keeps serving the task that was running on it.
/// Queued tasks that name it wait for it (here it comes back within the
/// grace period, and the task succeeds); past the grace period they fail
/// with `unknown_tool`, saying how long they waited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_plugin_serves_its_running_task_and_queued_ones_wait_for_it() {
    let harness = Harness::start_with(&[("OPSPAWN_PLUGINS__MISSING_PLUGIN_GRACE", "3s")]);
    let client = harness.client();
    let calculator = harness.plugins.path().join("calculator.wasm");
    let bytes = std::fs::read(&calculator).unwrap();
    let original = sha256_hex(&bytes);

    let running = client.submit(&two_calculations(3_000)).await.unwrap();
    first_tool_call_done(&client, &running).await;
    let soon = |ms: i64| {
        let at = std::time::SystemTime::now() + Duration::from_millis(ms as u64);
        humantime::format_rfc3339_millis(at).to_string()
    };
    let mut queued = calculator_task("6*7", "42");
    queued["run_at"] = json!(soon(500));
    let queued = client.submit(&queued).await.unwrap();

    std::fs::remove_file(&calculator).unwrap();
    let during = wait_for_listing(&client, "the calculator is unloaded", |listing| {
        loaded_sha(listing, "calculator").is_none()
    })
    .await;
    assert_eq!(
        during["old_versions_in_use"][0]["sha256"],
        original.as_str()
    );
    // The queued task is due now, and waits.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let waiting = client.task(&queued).await.unwrap();
    assert_ne!(waiting["status"], "failed", "{waiting:#}");
    replace(&harness.plugins, "calculator", &bytes);

    let task = client.wait_until_finished(&running, FINISH).await.unwrap();
    assert_eq!(task["status"], "succeeded", "{task:#}");
    assert_eq!(
        tool_step_hashes(&task),
        [original.as_str(), original.as_str()]
    );
    let task = client.wait_until_finished(&queued, FINISH).await.unwrap();
    assert_eq!(task["status"], "succeeded", "{task:#}");

    // Gone for good: the queued task fails once its grace period is over.
    let mut queued = calculator_task("6*7", "42");
    queued["run_at"] = json!(soon(300));
    let queued = client.submit(&queued).await.unwrap();
    std::fs::remove_file(&calculator).unwrap();
    let submitted = Instant::now();
    let task = client.wait_until_finished(&queued, FINISH).await.unwrap();
    assert!(submitted.elapsed() >= Duration::from_secs(3), "it waited");
    assert_eq!(task["status"], "failed", "{task:#}");
    assert_eq!(task["error"]["code"], "unknown_tool", "{task:#}");
    let message = task["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("after waiting 3s") && message.contains("missing_plugin_grace"),
        "{message}"
    );
}

/// A task resumed after a crash asks for the versions its journal
/// recorded. When the file was replaced while the server was down, the
/// recorded version is gone: the task goes on with the loaded one, says so
/// in the log, and its steps show where the version changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_task_says_when_its_recorded_version_is_gone() {
    let mut harness = Harness::start();
    let client = harness.client();
    let original = loaded_sha(&listing(&client).await, "calculator").unwrap();

    let id = client.submit(&two_calculations(4_000)).await.unwrap();
    first_tool_call_done(&client, &id).await;
    harness.server.kill9();
    let new_build = rebuilt("calculator", "v2");
    let new_sha = sha256_hex(&new_build);
    replace(&harness.plugins, "calculator", &new_build);
    harness.server.restart().unwrap();
    let client = harness.client();

    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    assert_eq!(task["status"], "succeeded", "{task:#}");
    assert_eq!(
        tool_step_hashes(&task),
        [original.as_str(), new_sha.as_str()],
        "{task:#}"
    );
    assert!(
        harness
            .server
            .log()
            .contains("recorded plugin version is no longer loaded"),
        "the change is logged"
    );
}
