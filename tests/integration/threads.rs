//! Threads end to end: a real server runs the ReAct planner and the OpenAI
//! adapter against the loopback mock of OpenAI's API, which records every
//! request. A thread's next task sees the earlier tasks' goals and answers
//! in what the model is sent; a thread's tasks never run at once while other
//! threads' do; deleting a thread takes its tasks; thread ids are a
//! tenant's own.

use std::time::Duration;

use opspawn::api::auth::token_hash;
use opspawn_testkit::providers::models;
use opspawn_testkit::{Client, MockProviders, Provider, StatusCode};
use serde_json::{Value, json};

use crate::{FINISH, Harness};

const PROVIDER: Provider = Provider::OpenAi;

/// A server with the OpenAI adapter pointed at `mock`, configured with
/// `config` (TOML; may be empty).
fn start(mock: &MockProviders, config: &str) -> (Harness, tempfile::NamedTempFile) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), config).unwrap();
    let path = file.path().to_str().unwrap().to_owned();
    let harness = Harness::start_with_plugins(
        &[
            (PROVIDER.base_url_var(), &mock.base_url_for(PROVIDER)),
            (PROVIDER.key_var(), &PROVIDER.test_key()),
            ("OPSPAWN_CONFIG", &path),
        ],
        |plugins| {
            plugins.add(
                PROVIDER.plugin(),
                PROVIDER.wasm(),
                Some(&PROVIDER.manifest()),
            );
        },
    );
    (harness, file)
}

/// The mock's ReAct task (the model calls the calculator, then answers),
/// in `thread` if one is given.
fn task(goal: &str, thread: Option<&str>) -> Value {
    let mut task = json!({
        "goal": goal,
        "tools": ["calculator"],
        "llm": PROVIDER.plugin(),
        "model": models::REACT,
    });
    if let Some(thread) = thread {
        task["thread"] = json!(thread);
    }
    task
}

async fn run(client: &Client, task: &Value) -> Value {
    let id = client.submit(task).await.unwrap();
    client.wait_until_finished(&id, FINISH).await.unwrap()
}

/// The (role, content) of each message but the system prompt of a chat
/// request the mock received.
fn conversation(body: &Value) -> Vec<(String, String)> {
    body["messages"]
        .as_array()
        .expect("a chat request has messages")
        .iter()
        .filter(|m| m["role"] != "system")
        .map(|m| {
            (
                m["role"].as_str().unwrap_or_default().to_owned(),
                m["content"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn turn(role: &str, content: &str) -> (String, String) {
    (role.to_owned(), content.to_owned())
}

/// The first request the mock received after the first `n`.
fn first_request_after(mock: &MockProviders, n: usize) -> Value {
    let requests = mock.requests_for(PROVIDER);
    assert!(requests.len() > n, "{} requests", requests.len());
    requests[n].body.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_threads_next_task_is_sent_the_earlier_goals_and_answers() {
    let mock = MockProviders::start().await;
    let (harness, _config) = start(&mock, "");
    let client = harness.client();

    let first = run(&client, &task("What is 6 times 7?", Some("chat-1"))).await;
    assert_eq!(first["status"], "succeeded", "{first:#}");
    assert_eq!(first["thread"], "chat-1");
    let answer = first["result"].as_str().unwrap().to_owned();
    let sent = mock.requests_for(PROVIDER).len();
    assert_eq!(
        conversation(&first_request_after(&mock, 0)),
        [turn("user", "Question: What is 6 times 7?")],
        "the thread's first task has no past"
    );

    let second = run(&client, &task("And that plus one?", Some("chat-1"))).await;
    assert_eq!(second["status"], "succeeded", "{second:#}");
    assert_eq!(
        conversation(&first_request_after(&mock, sent)),
        [
            turn("user", "Question: What is 6 times 7?"),
            turn("assistant", &format!("Final Answer: {answer}")),
            turn("user", "Question: And that plus one?"),
        ],
        "the second task's first call carries the first task's goal and answer"
    );

    // A third: both earlier tasks, oldest first.
    let sent = mock.requests_for(PROVIDER).len();
    let third = run(&client, &task("Thanks!", Some("chat-1"))).await;
    assert_eq!(third["status"], "succeeded", "{third:#}");
    let questions: Vec<String> = conversation(&first_request_after(&mock, sent))
        .into_iter()
        .filter(|(role, _)| role == "user")
        .map(|(_, content)| content)
        .collect();
    assert_eq!(
        questions,
        [
            "Question: What is 6 times 7?",
            "Question: And that plus one?",
            "Question: Thanks!"
        ]
    );

    // Another thread, and no thread, start afresh.
    for thread in [Some("chat-2"), None] {
        let sent = mock.requests_for(PROVIDER).len();
        let other = run(&client, &task("What is 6 times 7?", thread)).await;
        assert_eq!(other["status"], "succeeded", "{other:#}");
        assert_eq!(
            conversation(&first_request_after(&mock, sent)),
            [turn("user", "Question: What is 6 times 7?")],
            "{thread:?} has no past"
        );
    }
    assert!(mock.rejected().is_empty(), "{:?}", mock.rejected());
}

/// A task's run interval (started, finished), in milliseconds.
fn interval(task: &Value) -> (i64, i64) {
    let at = |field: &str| {
        opspawn::rfc3339::parse(task[field].as_str().unwrap_or_default())
            .unwrap_or_else(|| panic!("{field} of {task:#}"))
    };
    (at("started_at"), at("finished_at"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_threads_tasks_run_one_at_a_time_while_other_threads_run_beside_them() {
    let mock = MockProviders::start().await;
    // Each call takes a while, so tasks that could overlap do.
    mock.set_latency(Duration::from_millis(300));
    let (harness, _config) = start(&mock, "");
    let client = harness.client();

    // Submitted together: three of one thread, and one each of two others.
    let mut serial = Vec::new();
    for n in 0..3 {
        serial.push(
            client
                .submit(&task(&format!("Serial {n}"), Some("serial")))
                .await
                .unwrap(),
        );
    }
    let mut apart = Vec::new();
    for thread in ["apart-a", "apart-b"] {
        apart.push(client.submit(&task(thread, Some(thread))).await.unwrap());
    }
    let mut finished = Vec::new();
    for id in serial.iter().chain(&apart) {
        let task = client.wait_until_finished(id, FINISH).await.unwrap();
        assert_eq!(task["status"], "succeeded", "{task:#}");
        finished.push(task);
    }

    let runs: Vec<(i64, i64)> = finished[..3].iter().map(interval).collect();
    for pair in runs.windows(2) {
        assert!(
            pair[0].1 <= pair[1].0,
            "a thread's tasks run one after the other, in submission order: {runs:?}"
        );
    }
    let (a, b) = (interval(&finished[3]), interval(&finished[4]));
    assert!(
        a.0 < b.1 && b.0 < a.1,
        "tasks of different threads run at once: {a:?} {b:?}"
    );
    let first_serial = runs[0];
    assert!(
        a.0 < first_serial.1 && first_serial.0 < a.1,
        "a thread's task and another thread's run at once: {first_serial:?} {a:?}"
    );
    // The later tasks of the thread each saw the ones before.
    let third = mock
        .requests_for(PROVIDER)
        .into_iter()
        .map(|r| conversation(&r.body))
        .find(|turns| turns.last() == Some(&turn("user", "Question: Serial 2")))
        .expect("the third task's first call");
    assert_eq!(
        third.len(),
        5,
        "two earlier questions and answers: {third:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_thread_takes_its_tasks_and_thread_ids_are_checked() {
    let mock = MockProviders::start().await;
    let (harness, _config) = start(&mock, "");
    let client = harness.client();

    let mut ids = Vec::new();
    for goal in ["One", "Two"] {
        let done = run(&client, &task(goal, Some("doomed"))).await;
        assert_eq!(done["status"], "succeeded", "{done:#}");
        ids.push(done["id"].as_str().unwrap().to_owned());
    }
    let kept = run(&client, &task("Kept", Some("kept"))).await;

    let (status, thread) = client.get("/v1/threads/doomed").await.unwrap();
    assert_eq!(status, StatusCode::OK, "{thread}");
    assert_eq!(thread["thread"], "doomed");
    let listed: Vec<&str> = thread["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [ids[1].as_str(), ids[0].as_str()], "newest first");
    let (_, page) = client.get("/v1/threads/doomed?limit=1").await.unwrap();
    assert_eq!(page["tasks"].as_array().unwrap().len(), 1);
    let cursor = page["next_cursor"].as_str().unwrap().to_owned();
    let (_, rest) = client
        .get(&format!("/v1/threads/doomed?limit=1&cursor={cursor}"))
        .await
        .unwrap();
    assert_eq!(rest["tasks"][0]["id"], ids[0].as_str());
    let (_, filtered) = client.get("/v1/tasks?thread=doomed").await.unwrap();
    assert_eq!(filtered["tasks"].as_array().unwrap().len(), 2, "{filtered}");

    // A queued task of the thread (it starts in 2099) holds it.
    let mut waiting = task("Three", Some("doomed"));
    waiting["run_at"] = json!("2099-01-01T00:00:00Z");
    let waiting = client.submit(&waiting).await.unwrap();
    let delete = |path: &str| client.http().delete(client.url(path)).send();
    let refused = delete("/v1/threads/doomed").await.unwrap();
    assert_eq!(refused.status(), StatusCode::CONFLICT);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "thread_active", "{body}");
    assert_eq!(
        client.get("/v1/threads/doomed").await.unwrap().1["tasks"]
            .as_array()
            .unwrap()
            .len(),
        3,
        "nothing was deleted"
    );
    let (status, _) = client
        .post(&format!("/v1/tasks/{waiting}/cancel"), &json!({}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);

    let deleted = delete("/v1/threads/doomed").await.unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    for id in ids.iter().chain([&waiting]) {
        let (status, body) = client.get(&format!("/v1/tasks/{id}")).await.unwrap();
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        let events = client
            .http()
            .get(client.url(&format!("/v1/tasks/{id}/events")))
            .send()
            .await
            .unwrap();
        assert_eq!(events.status(), StatusCode::NOT_FOUND);
    }
    let (status, body) = client.get("/v1/threads/doomed").await.unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "thread_not_found");
    let again = delete("/v1/threads/doomed").await.unwrap();
    assert_eq!(again.status(), StatusCode::NOT_FOUND);
    let (status, _) = client
        .get(&format!("/v1/tasks/{}", kept["id"].as_str().unwrap()))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "another thread's task stays");

    // Bad thread ids, in a submission and in a path.
    for bad in [
        json!(""),
        json!("a b"),
        json!("a/b"),
        json!("x".repeat(129)),
    ] {
        let mut body = task("Bad", None);
        body["thread"] = bad.clone();
        let (status, answer) = client.post("/v1/tasks", &body).await.unwrap();
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_thread")),
            "{bad}: {answer}"
        );
    }
    let mut wrong_type = task("Bad", None);
    wrong_type["thread"] = json!(7);
    let (status, answer) = client.post("/v1/tasks", &wrong_type).await.unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    let (status, answer) = client.get("/v1/threads/a%20b").await.unwrap();
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_thread"))
    );
    let (status, answer) = client
        .post(
            "/v1/schedules",
            &json!({"cron": "0 9 * * *", "task": task("Daily", Some("chat-1"))}),
        )
        .await
        .unwrap();
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_thread")),
        "{answer}"
    );
}

async fn send(
    client: &Client,
    method: &str,
    path: &str,
    token: &str,
    body: Option<&Value>,
) -> (StatusCode, Value) {
    crate::send(client, method, path, Some(token), body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thread_id_is_its_tenants_own() {
    let mock = MockProviders::start().await;
    let (harness, _config) = start(
        &mock,
        &format!(
            r#"
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
    );
    let client = harness.client();
    let submit = |token: &'static str, goal: &str| {
        let body = task(goal, Some("shared"));
        let client = client.clone();
        async move {
            let (status, task) = send(&client, "POST", "/v1/tasks", token, Some(&body)).await;
            assert_eq!(status, StatusCode::CREATED, "{task}");
            task["id"].as_str().unwrap().to_owned()
        }
    };
    let finished = |token: &'static str, id: String| {
        let client = client.clone();
        async move {
            for _ in 0..600 {
                let (_, task) = send(&client, "GET", &format!("/v1/tasks/{id}"), token, None).await;
                if task["status"] == "succeeded" || task["status"] == "failed" {
                    return task;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("task {id} did not finish");
        }
    };

    // acme's thread "shared": one task done, one waiting (it starts in
    // 2099). globex's thread of the same name is not held up by it, nor
    // sees it.
    let acme_done = finished("acme-token", submit("acme-token", "Acme's first").await).await;
    assert_eq!(acme_done["status"], "succeeded", "{acme_done:#}");
    let (status, waiting) = send(
        &client,
        "POST",
        "/v1/tasks",
        "acme-token",
        Some(&json!({
            "goal": "Acme's later question",
            "thread": "shared",
            "run_at": "2099-01-01T00:00:00Z",
            "llm": PROVIDER.plugin(),
            "model": models::REACT,
        })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{waiting}");

    let sent = mock.requests_for(PROVIDER).len();
    let globex = finished(
        "globex-token",
        submit("globex-token", "Globex's first").await,
    )
    .await;
    assert_eq!(globex["status"], "succeeded", "{globex:#}");
    assert_eq!(
        conversation(&first_request_after(&mock, sent)),
        [turn("user", "Question: Globex's first")],
        "globex's thread shows nothing of acme's"
    );

    let (status, listed) = send(&client, "GET", "/v1/threads/shared", "globex-token", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed["tasks"].as_array().unwrap().len(), 1, "{listed:#}");
    assert_eq!(listed["tasks"][0]["tenant"], "globex");
    let (status, _) = send(
        &client,
        "DELETE",
        "/v1/threads/shared",
        "globex-token",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, listed) = send(&client, "GET", "/v1/threads/shared", "acme-token", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        listed["tasks"].as_array().unwrap().len(),
        2,
        "acme's thread stays: {listed:#}"
    );
    let (status, refused) = send(&client, "DELETE", "/v1/threads/shared", "acme-token", None).await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("thread_active")),
        "acme's waiting task holds acme's thread"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_runs_in_a_thread_shows_it_and_deletes_it() {
    let harness = Harness::start();
    let client = harness.client();
    let server = harness.server.base_url.clone();
    let opspawn = |args: &[&str]| {
        let output = std::process::Command::new(crate::binary())
            .args(args)
            .args(["--server", &server])
            .output()
            .expect("running opspawn");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        (output.status.success(), stdout, stderr)
    };
    // The scripted adapter's offline demo: the calculator, then 20.
    let (ok, _, stderr) = opspawn(&["run", "--thread", "cli-1", "What is (2+3)*4?"]);
    assert!(ok, "{stderr}");
    let (ok, second, stderr) = opspawn(&["run", "--thread", "cli-1", "--detach", "And 6*7?"]);
    assert!(ok, "{stderr}");
    let second = second.trim().to_owned();
    let task = client.wait_until_finished(&second, FINISH).await.unwrap();
    assert_eq!(task["thread"], "cli-1", "{task:#}");

    let (ok, shown, stderr) = opspawn(&["threads", "show", "cli-1"]);
    assert!(ok, "{stderr}");
    let lines: Vec<&str> = shown.lines().collect();
    assert!(lines[0].starts_with(&second), "newest first: {shown}");
    assert!(
        shown.contains("What is (2+3)*4?") && shown.contains("-> 20"),
        "{shown}"
    );

    let (ok, _, stderr) = opspawn(&["threads", "delete", "cli-1"]);
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = opspawn(&["threads", "show", "cli-1"]);
    assert!(!ok && stderr.contains("thread_not_found"), "{stderr}");
    let (ok, _, stderr) = opspawn(&["run", "--thread", "not ok", "--detach", "x"]);
    assert!(!ok && stderr.contains("invalid_thread"), "{stderr}");
}
