//! Long-term memory end to end: the example `memory` tool (built on the
//! host's `memory` interface) saves a note in one task, and a later task
//! finds it, after a restart; the scripted LLM asks for each call. Memories
//! are a tenant's own, through plugins and over REST; a plugin without the
//! grant gets `memory_not_granted`; caps refuse with `memory_full`.

use opspawn::api::auth::token_hash;
use opspawn_testkit::{Client, StatusCode, plugin_sources};
use serde_json::{Value, json};

use crate::{FINISH, Harness, send};

/// The example memory tool's own manifest (it asks for memory).
fn manifest() -> String {
    std::fs::read_to_string(plugin_sources().join("memory/memory.toml")).unwrap()
}

/// A server with the memory tool, under `manifest`, and `config` (TOML).
fn start(manifest: &str, config: &str) -> (Harness, tempfile::NamedTempFile) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), config).unwrap();
    let path = file.path().to_str().unwrap().to_owned();
    let harness = Harness::start_with_plugins(&[("OPSPAWN_CONFIG", &path)], |plugins| {
        plugins.add("memory", "memory", Some(manifest));
    });
    (harness, file)
}

/// A task whose model calls `tool` with `arguments` once, then answers.
fn calling(tool: &str, arguments: Value, namespace: Option<&str>) -> Value {
    let mut task = json!({
        "goal": format!("Use {tool}"),
        "tools": [tool],
        "options": {"llm": {"script": [
            {"tool_calls": [{"id": "c1", "name": tool, "arguments": arguments}]},
            {"content": "Final Answer: done"}
        ]}}
    });
    if let Some(namespace) = namespace {
        task["memory_namespace"] = json!(namespace);
    }
    task
}

/// Runs `task` to its end, as `token`'s tenant if given; answers its id
/// and its one tool step.
async fn tool_step(client: &Client, token: Option<&str>, task: &Value) -> (String, Value) {
    let (status, created) = send(client, "POST", "/v1/tasks", token, Some(task)).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    let deadline = std::time::Instant::now() + FINISH;
    loop {
        let (_, task) = send(client, "GET", &format!("/v1/tasks/{id}"), token, None).await;
        if ["succeeded", "failed", "cancelled"].contains(&task["status"].as_str().unwrap()) {
            assert_eq!(task["status"], "succeeded", "{task:#}");
            let steps = task["steps"].as_array().unwrap();
            let step = steps
                .iter()
                .find(|s| s["kind"] == "tool")
                .unwrap_or_else(|| panic!("no tool step: {task:#}"))
                .clone();
            return (id, step);
        }
        assert!(std::time::Instant::now() < deadline, "{task:#}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn search(query: &str) -> Value {
    json!({"query": query})
}

/// The texts of the notes a `memory_search` step found.
fn found(step: &Value) -> Vec<String> {
    step["output"]["notes"]
        .as_array()
        .unwrap_or_else(|| panic!("not a search's output: {step:#}"))
        .iter()
        .map(|note| note["text"].as_str().unwrap().to_owned())
        .collect()
}

/// What one task saves, a later task of the same namespace finds, after
/// the server restarts; another namespace does not see it. The memory is
/// listed over REST with the task that saved it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_is_recalled_by_a_later_task_after_a_restart() {
    let (mut harness, _config) = start(&manifest(), "");
    let client = harness.client();
    let (saver, saved) = tool_step(
        &client,
        None,
        &calling(
            "memory_save",
            json!({"text": "The user's name is Ada Lovelace", "metadata": {"topic": "name"}}),
            Some("user-1"),
        ),
    )
    .await;
    let id = saved["output"]["id"].as_str().unwrap().to_owned();

    harness.server.restart().unwrap();
    let client = harness.client();
    let (_, recalled) = tool_step(
        &client,
        None,
        &calling(
            "memory_search",
            search("what is the user's name?"),
            Some("user-1"),
        ),
    )
    .await;
    assert_eq!(found(&recalled), ["The user's name is Ada Lovelace"]);
    assert_eq!(recalled["output"]["notes"][0]["id"], id.as_str());
    assert_eq!(recalled["output"]["notes"][0]["metadata"]["topic"], "name");
    let (_, elsewhere) = tool_step(
        &client,
        None,
        &calling("memory_search", search("name"), Some("user-2")),
    )
    .await;
    assert!(found(&elsewhere).is_empty(), "{elsewhere:#}");
    let (_, default) = tool_step(
        &client,
        None,
        &calling("memory_search", search("name"), None),
    )
    .await;
    assert!(found(&default).is_empty(), "{default:#}");

    let (status, listed) = client.get("/v1/memories?q=lovelace").await.unwrap();
    assert_eq!(status, StatusCode::OK, "{listed}");
    let memories = listed["memories"].as_array().unwrap();
    assert_eq!(memories.len(), 1, "{listed:#}");
    assert_eq!(memories[0]["namespace"], "user-1");
    assert_eq!(memories[0]["task_id"], saver.as_str());

    // Forgotten by a third task, it is gone for the next.
    let (_, forgotten) = tool_step(
        &client,
        None,
        &calling("memory_forget", json!({"id": id}), Some("user-1")),
    )
    .await;
    assert_eq!(forgotten["output"]["forgotten"], true, "{forgotten:#}");
    let (status, _) = client.get(&format!("/v1/memories/{id}")).await.unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// A plugin whose manifest does not ask for memory, or whose operator
/// refuses it, is refused every call with `memory_not_granted`, and stores
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_without_the_grant_gets_memory_not_granted() {
    let unasked = manifest().replace("memory = true", "memory = false");
    assert_ne!(unasked, manifest());
    for (manifest, config) in [
        (unasked.as_str(), ""),
        (&manifest(), "[policy]\nmemory = false\n"),
    ] {
        let (harness, _config) = start(manifest, config);
        let client = harness.client();
        let (_, step) = tool_step(
            &client,
            None,
            &calling("memory_save", json!({"text": "not to be kept"}), None),
        )
        .await;
        assert_eq!(step["status"], "failed", "{step:#}");
        assert_eq!(step["error"]["code"], "memory_not_granted", "{step:#}");
        let (_, listed) = client.get("/v1/memories").await.unwrap();
        assert_eq!(listed["memories"], json!([]), "{listed:#}");
    }
}

/// Two tenants: neither sees the other's memories, whether its plugin
/// searches or its client lists, reads or deletes; bad input is a clear
/// 422, and past the cap a memory is refused with `409 memory_full`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memories_are_a_tenants_own_and_capped() {
    let config = format!(
        r#"
        [memory]
        max_memories_per_tenant = 2

        [[auth.tokens]]
        tenant = "acme"
        sha256 = "{}"

        [[auth.tokens]]
        tenant = "globex"
        sha256 = "{}"
        "#,
        token_hash("acme-token"),
        token_hash("globex-token")
    );
    let (harness, _config) = start(&manifest(), &config);
    let client = harness.client();
    let acme = Some("acme-token");
    let globex = Some("globex-token");

    // Through a plugin.
    tool_step(
        &client,
        acme,
        &calling(
            "memory_save",
            json!({"text": "acme's launch code is 1234"}),
            None,
        ),
    )
    .await;
    let (_, theirs) = tool_step(
        &client,
        globex,
        &calling("memory_search", search("launch code"), None),
    )
    .await;
    assert!(found(&theirs).is_empty(), "{theirs:#}");
    let (_, mine) = tool_step(
        &client,
        acme,
        &calling("memory_search", search("launch code"), None),
    )
    .await;
    assert_eq!(found(&mine), ["acme's launch code is 1234"]);

    // Over REST.
    let (status, created) = send(
        &client,
        "POST",
        "/v1/memories",
        acme,
        Some(&json!({"namespace": "ops", "text": "the pager rota is weekly", "metadata": {"by": "ops"}})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().unwrap();
    let path = format!("/v1/memories/{id}");
    let (status, body) = send(&client, "GET", &path, globex, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "memory_not_found");
    let (status, _) = send(&client, "DELETE", &path, globex, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, listed) = send(&client, "GET", "/v1/memories", globex, None).await;
    assert_eq!(listed["memories"], json!([]), "{listed:#}");
    let (_, listed) = send(&client, "GET", "/v1/memories?namespace=ops", acme, None).await;
    assert_eq!(
        listed["memories"].as_array().unwrap().len(),
        1,
        "{listed:#}"
    );
    assert_eq!(listed["memories"][0]["metadata"]["by"], "ops");

    // Bad input.
    for (body, code) in [
        (json!({"text": "  "}), "invalid_memory"),
        (json!({"text": "x", "metadata": [1]}), "invalid_memory"),
        (
            json!({"text": "x", "namespace": "no spaces"}),
            "invalid_memory_namespace",
        ),
    ] {
        let (status, answer) = send(&client, "POST", "/v1/memories", acme, Some(&body)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body} {answer}");
        assert_eq!(answer["error"]["code"], code, "{body} {answer}");
    }
    let (status, answer) = send(&client, "GET", "/v1/memories?q=%20%3B", acme, None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(answer["error"]["code"], "invalid_query");
    let mut bad_task = calling("memory_search", search("x"), None);
    bad_task["memory_namespace"] = json!("a/b");
    let (status, answer) = send(&client, "POST", "/v1/tasks", acme, Some(&bad_task)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(answer["error"]["code"], "invalid_memory_namespace");

    // The cap: acme keeps two memories, so a third is refused, through
    // REST and through its plugin, until one is deleted.
    let third = json!({"text": "a third"});
    let (status, answer) = send(&client, "POST", "/v1/memories", acme, Some(&third)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert_eq!(answer["error"]["code"], "memory_full");
    let (status, created) = send(&client, "POST", "/v1/memories", globex, Some(&third)).await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "another tenant has room: {created}"
    );
    let (status, _) = send(&client, "DELETE", &path, acme, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, answer) = send(&client, "POST", "/v1/memories", acme, Some(&third)).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    let (_, refused) = tool_step(
        &client,
        acme,
        &calling("memory_save", json!({"text": "a fourth"}), None),
    )
    .await;
    assert_eq!(refused["status"], "failed", "{refused:#}");
    assert_eq!(refused["error"]["code"], "memory_full", "{refused:#}");
}
