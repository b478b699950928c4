//! Deny by default: a plugin reads only the folders, and sees only the
//! environment, that its manifest was granted; hostile calls fail their own
//! step while other tasks finish and the server keeps answering.

use std::time::{Duration, Instant};

use opspawn_testkit::StatusCode;
use serde_json::{Value, json};

use crate::{FINISH, Harness, SECRET, misbehaving_task, steps};

/// Runs one tool call of the misbehaving fixture; returns its step.
async fn tool_step(harness: &Harness, tool: &str, arguments: Value) -> Value {
    let client = harness.client();
    let id = client
        .submit(&misbehaving_task(tool, arguments))
        .await
        .unwrap();
    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    assert!(
        !task.to_string().contains(SECRET),
        "the secret leaked into the task: {task:#}"
    );
    steps(&task)[1].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_outside_the_granted_folders_cannot_be_read_or_written() {
    let harness = Harness::start();

    let granted = tool_step(
        &harness,
        "read_file",
        json!({"path": "/readonly/visible.txt"}),
    )
    .await;
    assert_eq!(granted["status"], "succeeded", "step: {granted:#}");
    assert_eq!(granted["output"]["content"], "granted content");

    for escape in [
        "/readonly/../secret.txt",
        "/readonly/../../secret.txt",
        "/readonly/link.txt",
        "/etc/passwd",
        "../secret.txt",
        "secret.txt",
    ] {
        let step = tool_step(&harness, "read_file", json!({"path": escape})).await;
        assert_eq!(step["status"], "failed", "{escape} was readable: {step:#}");
        assert_eq!(step["error"]["code"], "io_error", "{escape}: {step:#}");
    }

    let read_only = tool_step(
        &harness,
        "write_file",
        json!({"path": "/readonly/new.txt", "content": "x"}),
    )
    .await;
    assert_eq!(
        read_only["status"], "failed",
        "a read-only folder was written: {read_only:#}"
    );
    assert!(!harness.plugins.path().join("readonly/new.txt").exists());

    let writable = tool_step(
        &harness,
        "write_file",
        json!({"path": "/counts/new.txt", "content": "x"}),
    )
    .await;
    assert_eq!(
        writable["status"], "succeeded",
        "the writable grant works: {writable:#}"
    );
    assert!(harness.plugins.path().join("counts/new.txt").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_granted_environment_variables_are_visible() {
    let harness = Harness::start_with(&[
        ("OPSPAWN_TEST_GRANTED", "visible"),
        ("OPSPAWN_TEST_HIDDEN", SECRET),
    ]);
    let hidden = tool_step(&harness, "env", json!({"name": "OPSPAWN_TEST_HIDDEN"})).await;
    assert_eq!(hidden["output"]["value"], Value::Null, "step: {hidden:#}");
    let path = tool_step(&harness, "env", json!({"name": "PATH"})).await;
    assert_eq!(
        path["output"]["value"],
        Value::Null,
        "the host's own environment is not inherited"
    );
    let granted = tool_step(&harness, "env", json!({"name": "OPSPAWN_TEST_GRANTED"})).await;
    assert_eq!(granted["output"]["value"], "visible");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_calls_fail_alone_while_other_tasks_finish() {
    let harness = Harness::start();
    let client = harness.client();
    let hostile = [
        ("spin", json!({}), "plugin_timeout"),
        ("sleep", json!({"ms": 3_600_000}), "plugin_timeout"),
        ("memory_bomb", json!({}), "plugin_memory_limit"),
        (
            "big_output",
            json!({"bytes": 100_000_000}),
            "plugin_memory_limit",
        ),
        ("trap", json!({}), "plugin_trap"),
        ("panic", json!({}), "plugin_trap"),
    ];
    let mut hostile_ids = Vec::new();
    for (tool, arguments, code) in &hostile {
        let id = client
            .submit(&misbehaving_task(tool, arguments.clone()))
            .await
            .unwrap();
        hostile_ids.push((id, *tool, *code));
    }
    let mut normal_ids = Vec::new();
    for n in 0..6 {
        let task = crate::calculator_task(&format!("{n}*7"), &format!("{}", n * 7));
        normal_ids.push(client.submit(&task).await.unwrap());
    }

    // The server keeps answering quickly while the hostile calls run.
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let started = Instant::now();
        let (status, _) = client.get("/healthz").await.unwrap();
        assert_eq!(status, StatusCode::OK);
        slowest = slowest.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        slowest < Duration::from_millis(500),
        "healthz took {slowest:?}"
    );

    for id in normal_ids {
        let task = client.wait_until_finished(&id, FINISH).await.unwrap();
        assert_eq!(
            task["status"], "succeeded",
            "a normal task was disturbed: {task:#}"
        );
    }
    for (id, tool, code) in hostile_ids {
        let task = client.wait_until_finished(&id, FINISH).await.unwrap();
        let step = &steps(&task)[1];
        assert_eq!(step["error"]["code"], code, "{tool}: {step:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_policy_narrows_what_a_manifest_asks_for() {
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        r#"
        [policy]
        writable_dirs = false

        [policy.plugins.misbehaving]
        env = []
        max_call_timeout = "300ms"
        "#,
    )
    .unwrap();
    let config_path = config.path().to_str().unwrap().to_owned();
    let harness = Harness::start_with(&[
        ("OPSPAWN_CONFIG", &config_path),
        ("OPSPAWN_TEST_GRANTED", "visible"),
    ]);

    let (_, list) = harness.client().get("/v1/plugins").await.unwrap();
    let misbehaving = list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "misbehaving")
        .unwrap()
        .clone();
    let refused: Vec<&str> = misbehaving["refused"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert!(
        refused.contains(&"environment variable OPSPAWN_TEST_GRANTED"),
        "{refused:?}"
    );
    assert!(
        refused.contains(&"write access to folder counts"),
        "{refused:?}"
    );
    assert_eq!(misbehaving["grants"]["env"], json!([]));
    assert_eq!(misbehaving["limits"]["call_timeout"], "300ms");

    let env = tool_step(&harness, "env", json!({"name": "OPSPAWN_TEST_GRANTED"})).await;
    assert_eq!(
        env["output"]["value"],
        Value::Null,
        "the refused variable is not visible"
    );
    let write = tool_step(
        &harness,
        "write_file",
        json!({"path": "/counts/x.txt", "content": "x"}),
    )
    .await;
    assert_eq!(
        write["status"], "failed",
        "the folder became read-only: {write:#}"
    );
    let spin = tool_step(&harness, "spin", json!({})).await;
    assert_eq!(spin["error"]["code"], "plugin_timeout");
    assert!(
        spin["duration_ms"].as_i64().unwrap() < 900,
        "the operator's shorter limit applies: {spin:#}"
    );
}

/// No plugin reads a secret or the server's own environment: not a variable
/// that another plugin's credential draws on, not a variable that
/// configures the server, not `/proc/self/environ` through a folder grant
/// of `/proc`, `/` or a link, and no folder outside the plugin folder
/// unless the operator names a root holding it. Each refusal is listed with
/// the plugin's grants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_and_the_servers_environment_are_out_of_every_plugins_reach() {
    // A folder beside the plugin folder, holding a secret, and one the
    // operator opens to plugins as a root.
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.txt"), SECRET).unwrap();
    let shared = tempfile::tempdir().unwrap();
    std::fs::write(shared.path().join("shared.txt"), "shared content").unwrap();
    let shared_path = shared.path().canonicalize().unwrap();
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        format!("[policy]\ndir_roots = [{:?}]\n", shared_path.display()),
    )
    .unwrap();
    let config_path = config.path().to_str().unwrap().to_owned();
    let manifest = format!(
        r#"
[limits]
call_timeout_ms = 1000

[capabilities]
env = ["OPENAI_API_KEY", "OPSPAWN_DATA_DIR", "OPSPAWN_TEST_GRANTED"]

[[capabilities.dirs]]
path = "readonly"
guest_path = "/readonly"

[[capabilities.dirs]]
path = {shared:?}
guest_path = "/shared"

[[capabilities.dirs]]
path = "/proc"
guest_path = "/proc"

[[capabilities.dirs]]
path = "/"
guest_path = "/root"

[[capabilities.dirs]]
path = "proc-link"
guest_path = "/self"

[[capabilities.dirs]]
path = {outside:?}
guest_path = "/outside"

[[capabilities.dirs]]
path = ".."
guest_path = "/up"

[[capabilities.dirs]]
path = "."
guest_path = "/plugins"
"#,
        shared = shared_path.display().to_string(),
        outside = outside.path().display().to_string(),
    );
    let harness = Harness::start_with_plugins(
        &[
            ("OPSPAWN_CONFIG", &config_path),
            ("OPENAI_API_KEY", SECRET),
            ("OPSPAWN_TEST_GRANTED", "visible"),
        ],
        |plugins| {
            // The OpenAI adapter, whose credential draws on OPENAI_API_KEY.
            let openai = opspawn_testkit::plugin_sources().join("openai/openai.toml");
            let openai = std::fs::read_to_string(openai).unwrap();
            plugins.add("openai", "openai", Some(&openai));
            std::os::unix::fs::symlink("/proc/self", plugins.path().join("proc-link")).unwrap();
            std::fs::write(plugins.path().join("misbehaving.toml"), &manifest).unwrap();
        },
    );
    let client = harness.client();

    let (_, listing) = client.get("/v1/plugins").await.unwrap();
    assert!(
        !listing.to_string().contains(SECRET),
        "the listing shows a secret: {listing:#}"
    );
    let misbehaving = listing["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "misbehaving")
        .unwrap_or_else(|| panic!("the fixture loads: {listing:#}"));
    assert_eq!(
        misbehaving["grants"]["env"],
        json!(["OPSPAWN_TEST_GRANTED"]),
        "{misbehaving:#}"
    );
    let granted: Vec<&str> = misbehaving["grants"]["dirs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["guest_path"].as_str().unwrap())
        .collect();
    assert_eq!(granted, ["/readonly", "/shared"], "{misbehaving:#}");
    let refused: Vec<&str> = misbehaving["refused"]
        .as_array()
        .unwrap_or_else(|| panic!("refusals are listed: {misbehaving:#}"))
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    for expected in [
        "environment variable OPENAI_API_KEY ",
        "environment variable OPSPAWN_DATA_DIR ",
        "folder /proc ",
        "folder / ",
        "folder proc-link ",
        &format!("folder {} ", outside.path().display()),
        "folder .. ",
        "folder . ",
    ] {
        assert!(
            refused.iter().any(|r| r.starts_with(expected)),
            "{expected:?} is listed as refused: {refused:#?}"
        );
    }

    for (name, visible) in [
        ("OPENAI_API_KEY", Value::Null),
        ("OPSPAWN_DATA_DIR", Value::Null),
        ("OPSPAWN_TEST_GRANTED", json!("visible")),
    ] {
        let step = tool_step(&harness, "env", json!({"name": name})).await;
        assert_eq!(step["output"]["value"], visible, "{name}: {step:#}");
    }

    let plugin_folder = harness.plugins.path().file_name().unwrap();
    let through_parent = format!("/up/{}/secret.txt", plugin_folder.to_string_lossy());
    for path in [
        "/proc/self/environ",
        "/root/proc/self/environ",
        "/self/environ",
        "/outside/secret.txt",
        through_parent.as_str(),
        "/plugins/secret.txt",
        "/plugins/misbehaving.toml",
    ] {
        let step = tool_step(&harness, "read_file", json!({"path": path})).await;
        assert_eq!(step["status"], "failed", "{path} was readable: {step:#}");
    }
    let shared_read = tool_step(&harness, "read_file", json!({"path": "/shared/shared.txt"})).await;
    assert_eq!(
        shared_read["output"]["content"], "shared content",
        "a root the operator names is granted: {shared_read:#}"
    );

    let log = harness.server.log();
    assert!(!log.contains(SECRET), "the log shows a secret");
}
