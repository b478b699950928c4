//! What a plugin can make the host hold or store is bounded: its
//! `describe` answer, its planner actions, its log lines. Each bound comes
//! from the manifest's `[limits]` (with a default), capped by the operator's
//! policy; crossing it fails that load or call with a clear reason, while
//! the server stays small and quick and a benign task succeeds.

use std::time::{Duration, Instant};

use opspawn_testkit::StatusCode;
use serde_json::{Value, json};

use crate::{FINISH, Harness, calculator_task, steps};

/// The server's peak resident memory so far (`VmHWM`), in bytes.
fn peak_rss(harness: &Harness) -> u64 {
    let kib: u64 = harness
        .server_status("VmHWM")
        .and_then(|value| value.trim_end_matches("kB").trim().parse().ok())
        .expect("a VmHWM line");
    kib << 10
}

/// What must hold throughout every attack: the server's peak RSS stayed
/// under 1 GiB, `/healthz` answers within a second, and a benign task
/// succeeds.
async fn still_serving(harness: &Harness) {
    let client = harness.client();
    let benign = client.submit(&calculator_task("6*7", "42")).await.unwrap();
    for _ in 0..5 {
        let started = Instant::now();
        let (status, _) = client.get("/healthz").await.unwrap();
        assert_eq!(status, StatusCode::OK);
        let took = started.elapsed();
        assert!(took < Duration::from_secs(1), "healthz took {took:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let task = client.wait_until_finished(&benign, FINISH).await.unwrap();
    assert_eq!(task["status"], "succeeded", "the benign task: {task:#}");
    assert_eq!(task["result"], "42");
    let peak = peak_rss(harness);
    assert!(
        peak < 1 << 30,
        "the server's RSS peaked at {} MiB",
        peak >> 20
    );
}

/// The failure `GET /v1/plugins` lists for `file`.
fn failure<'a>(list: &'a Value, file: &str) -> &'a str {
    list["failures"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["file"].as_str().is_some_and(|p| p.ends_with(file)))
        .unwrap_or_else(|| panic!("{file} is not among the failures: {list:#}"))["error"]
        .as_str()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_answers_past_their_limits_are_refused_at_load() {
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        "[policy.plugins.capped_tools]\nmax_tools = 100\n",
    )
    .unwrap();
    let config_path = config.path().to_str().unwrap().to_owned();
    let harness = Harness::start_with_plugins(
        &[
            ("OPSPAWN_CONFIG", &config_path),
            ("MISBEHAVING_DESCRIBE_TOOLS", "20000"),
            ("MISBEHAVING_DESCRIBE_SCHEMA_BYTES", "50000000"),
        ],
        |plugins| {
            // Copies of the fixture, each granted the variable that makes
            // its describe misbehave, with room to build the answer.
            let manifest = |var: &str, limits: &str| {
                format!(
                    "[limits]\nmemory_mib = 256\ncall_timeout_ms = 10000\n{limits}\n\
                     [capabilities]\nenv = [\"{var}\"]\n"
                )
            };
            let tools = manifest("MISBEHAVING_DESCRIBE_TOOLS", "");
            plugins.add("many_tools", "misbehaving", Some(&tools));
            let schema = manifest("MISBEHAVING_DESCRIBE_SCHEMA_BYTES", "");
            plugins.add("huge_schema", "misbehaving", Some(&schema));
            // Asks for room for its tools; the operator caps it at 100.
            let capped = manifest("MISBEHAVING_DESCRIBE_TOOLS", "max_tools = 1000000");
            plugins.add("capped_tools", "misbehaving", Some(&capped));
        },
    );

    let (_, list) = harness.client().get("/v1/plugins").await.unwrap();
    let many = failure(&list, "many_tools.wasm");
    assert!(
        many.contains("describes 20000 tools, over its limit of 256") && many.contains("max_tools"),
        "{many}"
    );
    let huge = failure(&list, "huge_schema.wasm");
    assert!(
        huge.contains("over its limit of 1048576") && huge.contains("max_describe_bytes"),
        "{huge}"
    );
    let capped = failure(&list, "capped_tools.wasm");
    assert!(
        capped.contains("describes 20000 tools, over its limit of 100"),
        "the operator's cap applies: {capped}"
    );
    let names: Vec<&str> = list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for refused in ["many_tools", "huge_schema", "capped_tools"] {
        assert!(!names.contains(&refused), "{refused} loaded: {names:?}");
    }
    assert!(names.contains(&"misbehaving"), "{names:?}");

    still_serving(&harness).await;
}

/// A task whose scripted LLM asks for `calls` in one reply, which the
/// `react` planner turns into one action.
fn tool_calls_task(calls: Vec<Value>) -> Value {
    json!({
        "goal": "Call many tools",
        "tools": ["echo"],
        "max_retries": 0,
        "options": {"llm": {"script": [
            {"tool_calls": calls},
            {"content": "Final Answer: carried on"}
        ]}}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planner_actions_past_their_limits_fail_with_a_clear_code() {
    // The react planner as shipped, with a smaller output limit: its
    // actions may hold 16 KiB.
    let react = std::fs::read_to_string(opspawn_testkit::plugin_sources().join("react/react.toml"))
        .unwrap()
        + "max_output_bytes = 16384\n";
    assert!(react.contains("[limits]"), "{react}");
    let harness = Harness::start_with_plugins(&[], |plugins| {
        plugins.add("react", "react", Some(&react));
    });
    let client = harness.client();
    let echo = |n: usize, text: &str| {
        (0..n)
            .map(|_| json!({"name": "echo", "arguments": {"text": text}}))
            .collect::<Vec<_>>()
    };

    // 64 calls (the default limit) are fine; 65, or 10,000, are not.
    for (calls, outcome) in [
        (64, None),
        (65, Some("65 tool calls")),
        (10_000, Some("10000 tool calls")),
    ] {
        let id = client
            .submit(&tool_calls_task(echo(calls, "x")))
            .await
            .unwrap();
        let task = client.wait_until_finished(&id, FINISH).await.unwrap();
        match outcome {
            None => {
                // It runs its calls until the task's 20 steps are used up.
                assert_eq!(task["error"]["code"], "step_limit_exceeded", "{task:#}");
            }
            Some(expected) => {
                assert_eq!(task["status"], "failed", "{task:#}");
                assert_eq!(task["error"]["code"], "plugin_output_too_large");
                let message = task["error"]["message"].as_str().unwrap();
                assert!(
                    message.contains(expected)
                        && message.contains("over its limit of 64")
                        && message.contains("max_tool_calls"),
                    "{message}"
                );
                assert_eq!(
                    steps(&task).len(),
                    1,
                    "no tool call of the action ran: {task:#}"
                );
            }
        }
    }

    // One call of 20 KB: over the planner's 16 KiB of output.
    let id = client
        .submit(&tool_calls_task(echo(1, &"y".repeat(20_000))))
        .await
        .unwrap();
    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    assert_eq!(task["error"]["code"], "plugin_output_too_large", "{task:#}");
    let message = task["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("over its output limit of 16384 bytes"),
        "{message}"
    );
    assert_eq!(steps(&task).len(), 1, "the call did not run: {task:#}");

    still_serving(&harness).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_past_a_calls_limits_are_dropped_with_one_note() {
    let harness = Harness::start();
    let log_size = || {
        std::fs::metadata(harness.server.data_dir.join("server.log"))
            .unwrap()
            .len()
    };
    let before = log_size();
    // 100,000 lines of 1,000 bytes: 100 MB, were they all written.
    let id = harness
        .client()
        .submit(&crate::misbehaving_task(
            "log_spam",
            json!({"lines": 100_000, "bytes": 1000}),
        ))
        .await
        .unwrap();
    let task = harness
        .client()
        .wait_until_finished(&id, FINISH)
        .await
        .unwrap();
    let step = &steps(&task)[1];
    assert_eq!(step["status"], "succeeded", "{step:#}");
    still_serving(&harness).await;

    let grown = log_size() - before;
    // The default allows 256 KiB of lines per call, written with a prefix.
    assert!(grown < 1 << 20, "the log grew by {grown} bytes");
    let log = harness.server.log();
    let notes: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("log lines") && line.contains("dropped"))
        .collect();
    assert_eq!(notes.len(), 1, "one note: {notes:#?}");
    // 262 lines of 1,000 bytes fit in 256 KiB.
    assert!(
        notes[0].contains("dropped 99738 log lines (99738000 bytes)")
            && notes[0].contains("max_log_bytes"),
        "{}",
        notes[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_fields_and_held_resources_are_bounded_per_call() {
    let harness = Harness::start();
    let client = harness.client();
    let step_of = async |tool: &str, arguments: Value| {
        let id = client
            .submit(&crate::misbehaving_task(tool, arguments))
            .await
            .unwrap();
        let task = client.wait_until_finished(&id, FINISH).await.unwrap();
        steps(&task)[1].clone()
    };

    // 10,000 sets of header fields held at once, each with seven 16 KiB
    // values: 1.1 GB, were a set not capped at 32 KiB.
    let sets = client
        .submit(&crate::misbehaving_task(
            "header_bomb",
            json!({"fields": 10_000, "values": 7, "bytes": 16_384}),
        ))
        .await
        .unwrap();
    still_serving(&harness).await;
    let task = client.wait_until_finished(&sets, FINISH).await.unwrap();
    let step = &steps(&task)[1];
    assert_eq!(step["error"]["code"], "plugin_resource_limit", "{step:#}");
    let message = step["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("limit of 32768 bytes") && message.contains("max_http_fields_bytes"),
        "{message}"
    );

    // 10,000 small sets: more than a call may hold at once.
    let step = step_of(
        "header_bomb",
        json!({"fields": 10_000, "values": 1, "bytes": 1024}),
    )
    .await;
    assert_eq!(step["error"]["code"], "plugin_resource_limit", "{step:#}");
    let message = step["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("more than 2048 resources") && message.contains("max_resources"),
        "{message}"
    );

    // A request with one 40 KB header cannot even be built.
    let step = step_of(
        "http_get",
        json!({"url": "http://127.0.0.1:9/", "headers": {"x-big": "b".repeat(40_000)}}),
    )
    .await;
    assert_eq!(step["error"]["code"], "plugin_resource_limit", "{step:#}");
    still_serving(&harness).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_replies_and_tool_errors_reaching_the_journal_are_bounded() {
    // The scripted adapter as shipped, with 16 KiB of output.
    let scripted =
        std::fs::read_to_string(opspawn_testkit::plugin_sources().join("scripted/scripted.toml"))
            .unwrap()
            + "max_output_bytes = 16384\n";
    assert!(scripted.contains("[limits]"), "{scripted}");
    let harness = Harness::start_with_plugins(&[], |plugins| {
        plugins.add("scripted", "scripted", Some(&scripted));
    });
    let client = harness.client();

    // A reply whose text is small but whose tool call's id is 20 KB: all of
    // the reply is journaled, so all of it counts.
    let task = json!({
        "goal": "Call echo",
        "tools": ["echo"],
        "max_retries": 0,
        "options": {"llm": {"script": [
            {"tool_calls": [{"id": "i".repeat(20_000), "name": "echo", "arguments": {}}]},
            {"content": "Final Answer: carried on"}
        ]}}
    });
    let id = client.submit(&task).await.unwrap();
    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    assert_eq!(task["error"]["code"], "plugin_output_too_large", "{task:#}");
    let step = &steps(&task)[0];
    assert_eq!(step["error"]["code"], "plugin_output_too_large", "{step:#}");
    assert_eq!(steps(&task).len(), 1, "no tool ran: {task:#}");

    still_serving(&harness).await;
    drop(harness);

    // A tool error whose message (it quotes the path) is over the tool's
    // 64 KiB of output.
    let harness = Harness::start();
    let client = harness.client();
    let id = client
        .submit(&crate::misbehaving_task(
            "read_file",
            json!({"path": "p".repeat(70_000)}),
        ))
        .await
        .unwrap();
    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    let step = &steps(&task)[1];
    assert_eq!(step["error"]["code"], "plugin_output_too_large", "{step:#}");
    let message = step["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("over its output limit of 65536 bytes") && message.len() < 1000,
        "{message}"
    );
    still_serving(&harness).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_a_plugin_writes_are_buffered_only_so_much() {
    let harness = Harness::start();
    let client = harness.client();
    // 400 requests whose bodies are written to as far as the host takes,
    // never sent: wasmtime buffers up to two 1 MiB writes of each, about
    // 800 MiB, unless the writes are capped (64 KiB by default). (650, as
    // at first, made the plugin run past its 1 s limit on a busy machine.)
    let id = client
        .submit(&crate::misbehaving_task(
            "body_bomb",
            json!({"requests": 400}),
        ))
        .await
        .unwrap();
    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    let step = &steps(&task)[1];
    assert_eq!(step["status"], "succeeded", "{step:#}");
    let buffered = step["output"]["buffered"].as_u64().unwrap();
    assert!(
        buffered <= 400 * (128 << 10),
        "the host took {buffered} bytes of bodies"
    );
    still_serving(&harness).await;
    let peak = peak_rss(&harness);
    assert!(
        peak < 400 << 20,
        "the server's RSS peaked at {} MiB",
        peak >> 20
    );
}

/// The bytes and entries in a folder and below it (links not followed).
fn folder_usage(folder: &std::path::Path) -> (u64, u64) {
    let (mut bytes, mut entries) = (0, 0);
    for entry in std::fs::read_dir(folder).unwrap() {
        let entry = entry.unwrap();
        let metadata = entry.path().symlink_metadata().unwrap();
        entries += 1;
        if metadata.is_file() {
            bytes += metadata.len();
        } else if metadata.is_dir() {
            let (b, e) = folder_usage(&entry.path());
            bytes += b;
            entries += e;
        }
    }
    (bytes, entries)
}

/// A plugin's writable folders hold at most its quota: written bytes,
/// sparse lengths and entries. The fixture hides the refusal from its
/// answer; the call fails with `plugin_folder_quota` all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writable_folders_hold_no_more_than_their_quota() {
    const QUOTA_BYTES: u64 = 1 << 20;
    const QUOTA_ENTRIES: u64 = 20;
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        format!(
            "[policy.plugins.misbehaving]\nmax_folder_bytes = {QUOTA_BYTES}\n\
             max_folder_files = {QUOTA_ENTRIES}\n"
        ),
    )
    .unwrap();
    let config_path = config.path().to_str().unwrap().to_owned();
    let harness = Harness::start_with(&[("OPSPAWN_CONFIG", &config_path)]);
    let client = harness.client();
    let counts = harness.plugins.path().join("counts");
    let fill = async |files: u64, bytes: u64, how: &str| {
        let arguments = json!({"folder": "/counts", "files": files, "bytes": bytes, "how": how});
        let id = client
            .submit(&crate::misbehaving_task("fill_folder", arguments))
            .await
            .unwrap();
        let task = client.wait_until_finished(&id, FINISH).await.unwrap();
        steps(&task)[1].clone()
    };

    // Within the quota: written, and the call succeeds.
    let step = fill(2, 100_000, "write").await;
    assert_eq!(step["status"], "succeeded", "{step:#}");
    assert_eq!(step["output"]["bytes"], 200_000, "{step:#}");

    // Four files of 512 KiB: the third's bytes are refused.
    let step = fill(4, 512 << 10, "write").await;
    assert_eq!(step["error"]["code"], "plugin_folder_quota", "{step:#}");
    let message = step["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("max_folder_bytes") && message.contains(&QUOTA_BYTES.to_string()),
        "{message}"
    );
    let (bytes, _) = folder_usage(&counts);
    assert!(bytes <= QUOTA_BYTES, "{bytes} bytes on disk");
    assert!(bytes > QUOTA_BYTES / 2, "what fitted was written: {bytes}");

    // A sparse file of 10 GiB costs its length.
    let step = fill(1, 10 << 30, "set_len").await;
    assert_eq!(step["error"]["code"], "plugin_folder_quota", "{step:#}");
    let (bytes, _) = folder_usage(&counts);
    assert!(bytes <= QUOTA_BYTES, "{bytes} bytes on disk");

    // A hundred folders: no more entries than the quota.
    let step = fill(100, 0, "folders").await;
    assert_eq!(step["error"]["code"], "plugin_folder_quota", "{step:#}");
    let (_, entries) = folder_usage(&counts);
    assert!(entries <= QUOTA_ENTRIES, "{entries} entries on disk");

    // Room made from outside is found again (from the call after the next
    // refusal at the latest).
    for entry in std::fs::read_dir(&counts).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            std::fs::remove_dir_all(path).unwrap();
        } else {
            std::fs::remove_file(path).unwrap();
        }
    }
    let mut succeeded = false;
    for _ in 0..2 {
        if fill(2, 100_000, "write").await["status"] == "succeeded" {
            succeeded = true;
            break;
        }
    }
    assert!(succeeded, "the emptied folder takes writes again");
    still_serving(&harness).await;
}
