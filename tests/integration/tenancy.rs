//! Tokens and tenants, rate limits and caps; and what users expect of a
//! scheduler: idempotent submission, priorities, start times and deadlines.

use std::time::{Duration, SystemTime};

use opspawn::api::auth::token_hash;
use opspawn_testkit::{Client, PluginFolder, StatusCode};
use serde_json::{Value, json};

use crate::{FINISH, Harness, MISBEHAVING_MANIFEST, calculator_task, misbehaving_task, send};

/// A server whose configuration admits two tenants' tokens.
fn authenticated(extra: &str) -> (Harness, tempfile::NamedTempFile) {
    authenticated_with_plugins(extra, |_| {})
}

/// [`authenticated`], with `add` changing the plugin folder before the
/// server starts.
fn authenticated_with_plugins(
    extra: &str,
    add: impl FnOnce(&PluginFolder),
) -> (Harness, tempfile::NamedTempFile) {
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        format!(
            r#"
            [auth]
            {extra}

            [[auth.tokens]]
            tenant = "acme"
            sha256 = "{}"

            [[auth.tokens]]
            tenant = "globex"
            sha256 = "{}"
            "#,
            token_hash("acme-token"),
            token_hash("globex-token")
        ),
    )
    .unwrap();
    let path = config.path().to_str().unwrap().to_owned();
    (
        Harness::start_with_plugins(&[("OPSPAWN_CONFIG", &path)], add),
        config,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_required_and_tenants_see_only_their_own_tasks() {
    let (harness, _config) = authenticated("");
    let client = harness.client();

    let (status, _) = send(&client, "GET", "/healthz", None, None).await;
    assert_eq!(status, StatusCode::OK, "health needs no token");
    let (status, body) = send(&client, "GET", "/v1/tasks", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["code"], "unauthorized");
    let (status, body) = send(&client, "GET", "/v1/plugins", Some("wrong"), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["code"], "invalid_token");

    let (status, task) = send(
        &client,
        "POST",
        "/v1/tasks",
        Some("acme-token"),
        Some(&calculator_task("1+1", "2")),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{task}");
    assert_eq!(task["tenant"], "acme");
    let id = task["id"].as_str().unwrap();

    let (_, mine) = send(&client, "GET", "/v1/tasks", Some("acme-token"), None).await;
    assert_eq!(mine["tasks"].as_array().unwrap().len(), 1);
    let (_, theirs) = send(&client, "GET", "/v1/tasks", Some("globex-token"), None).await;
    assert_eq!(theirs["tasks"].as_array().unwrap().len(), 0, "{theirs}");
    for (method, path) in [
        ("GET", format!("/v1/tasks/{id}")),
        ("GET", format!("/v1/tasks/{id}/events")),
        ("POST", format!("/v1/tasks/{id}/cancel")),
    ] {
        let (status, body) = send(&client, method, &path, Some("globex-token"), None).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {body}");
        assert_eq!(body["error"]["code"], "forbidden");
    }
    let (status, _) = send(
        &client,
        "GET",
        &format!("/v1/tasks/{id}"),
        Some("acme-token"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_instance_serves_one_tenant_and_never_another() {
    // The fixture's `remember` tool keeps the note of its call before.
    let (harness, _config) = authenticated_with_plugins("", |plugins| {
        let manifest =
            format!("{MISBEHAVING_MANIFEST}\n[instances]\nreuse = \"tenant\"\nmax_calls = 3\n");
        plugins.add("misbehaving", "misbehaving", Some(&manifest));
    });
    let client = harness.client();
    let remember = async |token: &str, note: &str| {
        let step = tool_step_as(&client, token, "remember", json!({ "note": note })).await;
        assert_eq!(step["status"], "succeeded", "{step:#}");
        (
            step["output"]["calls"].as_u64().unwrap(),
            step["output"]["previous"].clone(),
        )
    };

    assert_warm_per_tenant(&remember).await;
    assert_eq!(
        remember("globex-token", "globex's second").await,
        (2, json!("globex's"))
    );

    // A call that fails takes its instance with it.
    let trapped = tool_step_as(&client, "globex-token", "trap", json!({})).await;
    assert_eq!(trapped["status"], "failed", "{trapped:#}");
    assert_eq!(remember("globex-token", "after").await, (1, Value::Null));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_planner_serves_one_tenant_and_never_another() {
    // Planners reuse warm instances as tools do: the fixture remembers the
    // goal of the task it planned before.
    let (harness, _config) = authenticated_with_plugins("", |plugins| {
        plugins.add(
            "remembering",
            "remembering_planner",
            Some("[instances]\nreuse = \"tenant\"\nmax_calls = 3\n"),
        );
    });
    let client = harness.client();
    let plan = async |token: &str, goal: &str| {
        let task = json!({"goal": goal, "planner": "remembering"});
        let (status, task) = send(&client, "POST", "/v1/tasks", Some(token), Some(&task)).await;
        assert_eq!(status, StatusCode::CREATED, "{task}");
        let task = finished(&client, token, task["id"].as_str().unwrap()).await;
        assert_eq!(task["status"], "succeeded", "{task:#}");
        let answer: Value = serde_json::from_str(task["result"].as_str().unwrap()).unwrap();
        (
            answer["calls"].as_u64().unwrap(),
            answer["previous"].clone(),
        )
    };

    assert_warm_per_tenant(&plan).await;
}

/// The warm-instance scenario of a plugin whose instances are kept per
/// tenant for three calls, and which answers with how many calls its
/// instance has served and the note of the call before: `call` runs one
/// task as the tenant of a token, with a note.
async fn assert_warm_per_tenant(call: impl AsyncFn(&str, &str) -> (u64, Value)) {
    assert_eq!(call("acme-token", "acme's first").await, (1, Value::Null));
    // The same tenant's next task gets the same instance, memory and all...
    assert_eq!(
        call("acme-token", "acme's second").await,
        (2, json!("acme's first"))
    );
    // ...another tenant never does: its first call finds a fresh instance.
    assert_eq!(call("globex-token", "globex's").await, (1, Value::Null));
    // Three calls, and the instance is let go: the fourth starts afresh.
    assert_eq!(
        call("acme-token", "acme's third").await,
        (3, json!("acme's second"))
    );
    assert_eq!(call("acme-token", "acme's fourth").await, (1, Value::Null));
}

/// Waits for task `id` of `token`'s tenant to end, and returns it.
async fn finished(client: &Client, token: &str, id: &str) -> Value {
    let path = format!("/v1/tasks/{id}");
    let deadline = std::time::Instant::now() + FINISH;
    loop {
        let (_, task) = send(client, "GET", &path, Some(token), None).await;
        if ["succeeded", "failed", "cancelled"].contains(&task["status"].as_str().unwrap_or("")) {
            return task;
        }
        assert!(std::time::Instant::now() < deadline, "unfinished: {task:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs one tool of the misbehaving fixture as `token`'s tenant and returns
/// its step.
async fn tool_step_as(client: &Client, token: &str, tool: &str, arguments: Value) -> Value {
    let (status, task) = send(
        client,
        "POST",
        "/v1/tasks",
        Some(token),
        Some(&misbehaving_task(tool, arguments)),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{task}");
    let task = finished(client, token, task["id"].as_str().unwrap()).await;
    let step = task["steps"][1].clone();
    assert_eq!(step["kind"], "tool", "{task:#}");
    step
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_one_tenants_task_writes_no_other_tenants_task_can_read() {
    let (harness, _config) = authenticated("");
    let client = harness.client();
    let counts = harness.plugins.path().join("counts");

    let written = tool_step_as(
        &client,
        "acme-token",
        "write_file",
        json!({"path": "/counts/notes.txt", "content": "acme's notes"}),
    )
    .await;
    assert_eq!(written["status"], "succeeded", "{written:#}");
    assert!(counts.join("tenants/acme/notes.txt").is_file());
    assert!(
        !counts.join("notes.txt").exists(),
        "written to the shared folder"
    );

    let theirs = tool_step_as(
        &client,
        "globex-token",
        "read_file",
        json!({"path": "/counts/notes.txt"}),
    )
    .await;
    assert_eq!(
        theirs["status"], "failed",
        "another tenant read it: {theirs:#}"
    );
    assert_eq!(theirs["error"]["code"], "io_error", "{theirs:#}");
    let mine = tool_step_as(
        &client,
        "acme-token",
        "read_file",
        json!({"path": "/counts/notes.txt"}),
    )
    .await;
    assert_eq!(mine["output"]["content"], "acme's notes", "{mine:#}");

    // A link put where a tenant's folder goes is refused, not followed.
    std::fs::remove_dir_all(counts.join("tenants/globex")).ok();
    std::os::unix::fs::symlink(counts.join("tenants/acme"), counts.join("tenants/globex")).unwrap();
    let through_link = tool_step_as(
        &client,
        "globex-token",
        "read_file",
        json!({"path": "/counts/notes.txt"}),
    )
    .await;
    assert_eq!(through_link["status"], "failed", "{through_link:#}");
    assert_eq!(
        through_link["error"]["code"], "plugin_instantiate_failed",
        "{through_link:#}"
    );
    assert!(
        !through_link.to_string().contains("acme's notes"),
        "{through_link:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_rate_limited_and_a_tenant_capped() {
    let (harness, _config) = authenticated("requests_per_minute = 5\nmax_active_tasks = 1");
    let client = harness.client();
    let (status, _) = send(
        &client,
        "POST",
        "/v1/tasks",
        Some("acme-token"),
        Some(&misbehaving_task("sleep", json!({"ms": 900}))),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = send(
        &client,
        "POST",
        "/v1/tasks",
        Some("acme-token"),
        Some(&calculator_task("1+1", "2")),
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"]["code"], "too_many_active_tasks");
    let (status, _) = send(
        &client,
        "POST",
        "/v1/tasks",
        Some("globex-token"),
        Some(&calculator_task("1+1", "2")),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "the cap is per tenant");

    for _ in 0..3 {
        send(&client, "GET", "/v1/tasks", Some("acme-token"), None).await;
    }
    let response = client
        .http()
        .get(client.url("/v1/tasks"))
        .bearer_auth("acme-token")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    let (status, _) = send(&client, "GET", "/v1/tasks", Some("globex-token"), None).await;
    assert_eq!(status, StatusCode::OK, "the limit is per token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_idempotency_key_returns_the_same_task() {
    let harness = Harness::start();
    let client = harness.client();
    let submit = |key: &'static str| {
        let client = client.clone();
        async move {
            let response = client
                .http()
                .post(client.url("/v1/tasks"))
                .header("idempotency-key", key)
                .json(&calculator_task("2+2", "4"))
                .send()
                .await
                .unwrap();
            let status = response.status();
            let body: Value = response.json().await.unwrap();
            (status, body["id"].as_str().unwrap().to_owned())
        }
    };
    let (first_status, first) = submit("order-17").await;
    let (again_status, again) = submit("order-17").await;
    let (_, other) = submit("order-18").await;
    assert_eq!(first_status, StatusCode::CREATED);
    assert_eq!(
        again_status,
        StatusCode::OK,
        "a repeat is answered, not created"
    );
    assert_eq!(first, again);
    assert_ne!(first, other);
    let (_, list) = client.get("/v1/tasks").await.unwrap();
    assert_eq!(list["tasks"].as_array().unwrap().len(), 2);
}

fn rfc3339(offset: Duration, future: bool) -> String {
    let now = SystemTime::now();
    let time = if future { now + offset } else { now - offset };
    humantime::format_rfc3339_millis(time).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priorities_start_times_and_deadlines_are_honoured() {
    let harness = Harness::start_with(&[("OPSPAWN_MAX_RUNNING_TASKS", "1")]);
    let client = harness.client();
    // Hold the only running slot while the others queue up.
    let blocker = client
        .submit(&misbehaving_task("sleep", json!({"ms": 700})))
        .await
        .unwrap();
    let mut low = calculator_task("1+1", "2");
    low["priority"] = json!(-5);
    let mut high = calculator_task("2+2", "4");
    high["priority"] = json!(5);
    let mut later = calculator_task("3+3", "6");
    later["run_at"] = json!(rfc3339(Duration::from_secs(2), true));
    let mut late = calculator_task("4+4", "8");
    late["deadline"] = json!(rfc3339(Duration::from_secs(1), false));
    let low = client.submit(&low).await.unwrap();
    let high = client.submit(&high).await.unwrap();
    let later = client.submit(&later).await.unwrap();
    let late = client.submit(&late).await.unwrap();

    for id in [&blocker, &low, &high] {
        assert_eq!(
            client.wait_until_finished(id, FINISH).await.unwrap()["status"],
            "succeeded"
        );
    }
    let started = |task: &Value| task["started_at"].as_str().unwrap().to_owned();
    let low_task = client.task(&low).await.unwrap();
    let high_task = client.task(&high).await.unwrap();
    assert!(
        started(&high_task) <= started(&low_task),
        "higher priority ran first"
    );

    let late_task = client.wait_until_finished(&late, FINISH).await.unwrap();
    assert_eq!(late_task["status"], "failed");
    assert_eq!(
        late_task["error"]["code"], "deadline_exceeded",
        "{late_task:#}"
    );

    let waiting = client.task(&later).await.unwrap();
    assert_eq!(
        waiting["status"], "queued",
        "not before its start time: {waiting:#}"
    );
    let done = client.wait_until_finished(&later, FINISH).await.unwrap();
    assert_eq!(done["status"], "succeeded");
    assert!(started(&done).as_str() >= done["run_at"].as_str().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listening_beyond_loopback_without_tokens_warns_loudly() {
    let harness = Harness::start_with(&[("OPSPAWN_ADDR", "0.0.0.0:0")]);
    let log = harness.server.log();
    assert!(
        log.contains("WARNING") && log.contains("authentication OFF"),
        "no warning in: {log}"
    );
    let quiet = Harness::start();
    assert!(
        !quiet.server.log().contains("authentication OFF"),
        "loopback needs no warning"
    );
}
