//! The API in process: `app(...)` over a real SQLite store in a temporary
//! folder and a real plugin runtime, driven with `tower::ServiceExt::oneshot`
//! (no socket, no server process). Request validation and error mapping
//! are tested here, in milliseconds each; what needs a process (crashes,
//! signals, the CLI, connections) stays in `tests/integration`.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use axum::response::IntoResponse;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::auth::{AuthConfig, Gate, TokenConfig, token_hash};
use super::hygiene::{self, CorsConfig, REQUEST_ID};
use super::{Admission, AppParts, AppState, HttpLimits, QueueLimits, TaskDefaults, app};
use crate::config::Config;
use crate::errors::Code;
use crate::events::EventBus;
use crate::scheduler::Scheduler;
use crate::store::{self, Store, StoreError};
use crate::test_support::TestHost;

const MAX_BODY_BYTES: usize = 1 << 20;
/// 2100-01-01: tasks created to run then stay queued through a test.
const FAR_FUTURE: store::Millis = 4_102_444_800_000;

/// One API over its own store and plugin folder.
struct Api {
    app: Router,
    store: Arc<dyn Store>,
    host: TestHost,
}

/// What an API under test is given.
#[derive(Default)]
struct Setup {
    /// Load the example plugins (calculator, react, scripted); without
    /// them, only what is checked before plugins are looked up passes.
    examples: bool,
    auth: AuthConfig,
    queue: Option<QueueLimits>,
    cors: CorsConfig,
    /// Serve `GET /metrics`.
    metrics: bool,
    /// Prices and caps; the configuration's defaults when unset.
    budgets: Option<crate::budgets::Budgets>,
}

impl Setup {
    fn examples() -> Self {
        Self {
            examples: true,
            ..Self::default()
        }
    }

    async fn start(self) -> Api {
        let host = TestHost::start(self.examples).await;
        let events = EventBus::default();
        let budgets = Arc::new(self.budgets.unwrap_or_else(|| {
            host.config
                .budgets()
                .expect("the default budgets are valid")
        }));
        let scheduler = Arc::new(Scheduler::start(
            host.store.clone(),
            host.runtime.clone(),
            events.clone(),
            host.config.scheduler_config(budgets.clone()),
        ));
        let state = AppState::from(AppParts {
            store: host.store.clone(),
            runtime: host.runtime.clone(),
            scheduler,
            events,
            defaults: Arc::new(host.config.defaults.clone()),
            gate: Arc::new(Gate::new(self.auth)),
            admission: Arc::new(Admission::new(
                self.queue.unwrap_or_else(|| host.config.queue_limits()),
            )),
            scrape: self.metrics.then(|| {
                Arc::new(
                    super::scrape::Scrape::new(&crate::metrics::MetricsConfig::default())
                        .expect("metrics are on by default"),
                )
            }),
            schedule_wake: Arc::new(tokio::sync::Notify::new()),
            budgets,
            memory: Arc::new(host.config.memory.clone()),
        });
        let app = app(state, MAX_BODY_BYTES, &HttpLimits::default());
        Api {
            app: hygiene::around(app, &self.cors).expect("a valid CORS configuration"),
            store: host.store.clone(),
            host,
        }
    }
}

/// An answer: status, headers and the JSON body (`null` if not JSON).
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Api {
    async fn send(&self, request: Request<Body>) -> Answer {
        let response = self
            .app
            .clone()
            .oneshot(request)
            .await
            .expect("the router answers");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("the body")
            .to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Answer {
            status,
            headers,
            body,
        }
    }

    async fn get(&self, uri: &str) -> Answer {
        self.send(request(Method::GET, uri).body(Body::empty()).unwrap())
            .await
    }

    /// Status, headers and body as text, for what is not JSON.
    async fn get_text(&self, uri: &str) -> (StatusCode, HeaderMap, String) {
        let response = self
            .app
            .clone()
            .oneshot(request(Method::GET, uri).body(Body::empty()).unwrap())
            .await
            .expect("the router answers");
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.expect("the body").to_bytes();
        (
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&bytes).into_owned(),
        )
    }

    async fn submit(&self, body: &Value) -> Answer {
        self.send(json_post("/v1/tasks", &body.to_string())).await
    }

    /// Submits `body` and expects it refused with `code` (and its status).
    async fn refused(&self, body: &Value, code: Code) -> Answer {
        let answer = self.submit(body).await;
        answer.is_error(code, &body.to_string());
        answer
    }
}

impl Answer {
    /// The answer is the error `code`, with its status from the table and
    /// a message.
    fn is_error(&self, code: Code, request: &str) {
        let status = code.status().expect("a request error has a status");
        assert_eq!(
            (self.status.as_u16(), self.body["error"]["code"].as_str()),
            (status, Some(code.as_str())),
            "for {request}: {}",
            self.body
        );
        assert!(
            self.body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "every error explains itself: {}",
            self.body
        );
    }
}

fn request(method: Method, uri: &str) -> axum::http::request::Builder {
    Request::builder().method(method).uri(uri)
}

fn json_post(uri: &str, body: &str) -> Request<Body> {
    request(Method::POST, uri)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, body.len())
        .body(Body::from(body.to_owned()))
        .unwrap()
}

#[tokio::test]
async fn bodies_that_are_not_a_task_request_are_refused() {
    let api = Setup::default().start().await;
    let cases = [
        ("{\"goal\": ", Code::InvalidJson),
        ("{}", Code::InvalidRequest),
        (r#"{"goal": 5}"#, Code::InvalidRequest),
        (r#"{"goal": "x", "colour": "red"}"#, Code::InvalidRequest),
        (r#"{"goal": "x", "max_steps": "5"}"#, Code::InvalidRequest),
        (r#"{"goal": "   "}"#, Code::InvalidGoal),
        (r#"{"goal": "a\u0000b"}"#, Code::InvalidGoal),
    ];
    for (body, code) in cases {
        api.send(json_post("/v1/tasks", body))
            .await
            .is_error(code, body);
    }
    let long_goal = json!({"goal": "x".repeat(64 * 1024 + 1)}).to_string();
    api.send(json_post("/v1/tasks", &long_goal))
        .await
        .is_error(Code::InvalidGoal, "a goal over 64 KiB");
    let oversize = json!({"goal": "x".repeat(MAX_BODY_BYTES)}).to_string();
    api.send(json_post("/v1/tasks", &oversize))
        .await
        .is_error(Code::PayloadTooLarge, "a body over the limit");

    let no_type = request(Method::POST, "/v1/tasks")
        .body(Body::from(r#"{"goal": "x"}"#))
        .unwrap();
    api.send(no_type)
        .await
        .is_error(Code::UnsupportedMediaType, "no Content-Type");
    for encoding in ["gzip", "br", "GZIP", "deflate, gzip"] {
        let body = r#"{"goal": "x"}"#;
        let encoded = request(Method::POST, "/v1/tasks")
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_ENCODING, encoding)
            .header(header::CONTENT_LENGTH, body.len())
            .body(Body::from(body))
            .unwrap();
        api.send(encoded)
            .await
            .is_error(Code::UnsupportedMediaType, encoding);
    }
    let listed = api.get("/v1/tasks").await;
    assert_eq!(
        listed.body["tasks"],
        json!([]),
        "nothing refused was created"
    );
}

#[tokio::test]
async fn numbers_out_of_range_get_the_fields_own_code_however_large() {
    let api = Setup::default().start().await;
    let two_to_53 = 9_007_199_254_740_992_u64;
    let cases = [
        ("max_steps", json!(0), Code::InvalidMaxSteps),
        ("max_steps", json!(1001), Code::InvalidMaxSteps),
        ("max_steps", json!(two_to_53), Code::InvalidMaxSteps),
        ("max_steps", json!(u64::MAX), Code::InvalidMaxSteps),
        ("max_steps", json!(-1), Code::InvalidMaxSteps),
        ("max_steps", json!(2.5), Code::InvalidMaxSteps),
        ("max_steps", json!(1e300), Code::InvalidMaxSteps),
        ("max_retries", json!(101), Code::InvalidMaxRetries),
        ("max_retries", json!(-1), Code::InvalidMaxRetries),
        ("max_retries", json!(two_to_53), Code::InvalidMaxRetries),
        ("timeout_secs", json!(0), Code::InvalidTimeout),
        (
            "timeout_secs",
            json!(7 * 24 * 3600 + 1),
            Code::InvalidTimeout,
        ),
        ("timeout_secs", json!(u64::MAX), Code::InvalidTimeout),
        ("priority", json!(1001), Code::InvalidPriority),
        ("priority", json!(-1001), Code::InvalidPriority),
        ("priority", json!(1_i64 << 40), Code::InvalidPriority),
        ("priority", json!(i64::MIN), Code::InvalidPriority),
        ("priority", json!(two_to_53), Code::InvalidPriority),
    ];
    for (field, value, code) in cases {
        let mut body = json!({"goal": "x"});
        body[field] = value;
        api.refused(&body, code).await;
    }
}

#[tokio::test]
async fn model_options_and_times_are_checked() {
    let api = Setup::default().start().await;
    let cases = [
        (json!({"model": ""}), Code::InvalidModel),
        (json!({"model": "m".repeat(257)}), Code::InvalidModel),
        (json!({"options": [1]}), Code::InvalidOptions),
        (json!({"options": {"planner": 1}}), Code::InvalidOptions),
        (
            json!({"options": {"planner": {"max_steps": -1}}}),
            Code::InvalidOptions,
        ),
        (
            json!({"options": {"planner": {"max_steps": 0}}}),
            Code::InvalidOptions,
        ),
        (
            json!({"options": {"planner": {"max_steps": "3"}}}),
            Code::InvalidOptions,
        ),
        (json!({"run_at": "tomorrow"}), Code::InvalidTime),
        (json!({"run_at": "2026-01-31T12:00:00"}), Code::InvalidTime),
        (
            json!({"deadline": "1969-12-31T23:00:00Z"}),
            Code::InvalidTime,
        ),
        (
            json!({"run_at": "2026-01-31T12:00:00Z", "deadline": "2026-01-31T11:00:00Z"}),
            Code::InvalidTime,
        ),
        (
            // The same instant: a deadline must come after the start.
            json!({"run_at": "2026-01-31T12:00:00Z", "deadline": "2026-01-31T13:00:00+01:00"}),
            Code::InvalidTime,
        ),
    ];
    for (mut body, code) in cases {
        body["goal"] = json!("x");
        api.refused(&body, code).await;
    }
}

#[tokio::test]
async fn times_with_offsets_or_in_lower_case_are_accepted_as_utc() {
    let api = Setup::examples().start().await;
    let answer = api
        .submit(&json!({
            "goal": "later",
            "run_at": "2099-01-31t13:00:00+01:00",
            "deadline": "2099-01-31t12:30:00z",
            "model": "m".repeat(256),
            "options": {"planner": {"max_steps": 3}},
            "max_steps": 1000,
            "priority": -1000,
        }))
        .await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
    assert_eq!(answer.body["run_at"], "2099-01-31T12:00:00.000Z");
    assert_eq!(answer.body["deadline"], "2099-01-31T12:30:00.000Z");
    assert_eq!(answer.body["priority"], -1000);
    let location = answer.headers[header::LOCATION].to_str().unwrap();
    assert_eq!(
        location,
        format!("/v1/tasks/{}", answer.body["id"].as_str().unwrap())
    );
}

#[tokio::test]
async fn references_must_name_loaded_plugins_of_the_right_kind() {
    let api = Setup::examples().start().await;
    let cases = [
        (json!({"planner": "nope"}), Code::UnknownPlanner),
        (json!({"planner": "calculator"}), Code::UnknownPlanner),
        (json!({"llm": "nope"}), Code::UnknownLlm),
        (json!({"llm": "react"}), Code::UnknownLlm),
        (json!({"tools": ["calculator", "nope"]}), Code::UnknownTool),
    ];
    for (mut body, code) in cases {
        body["goal"] = json!("x");
        api.refused(&body, code).await;
    }
}

#[tokio::test]
async fn the_list_checks_its_query_and_cursor() {
    let api = Setup::default().start().await;
    for query in [
        "status=done",
        "limit=lots",
        "limit=0",
        "limit=501",
        "cursor=bad",
        "cursor=",
        "colour=red",
    ] {
        api.get(&format!("/v1/tasks?{query}"))
            .await
            .is_error(Code::InvalidQuery, query);
    }
    let (a, _) = api
        .store
        .create_task(store::conformance::new_task("a", 0, Some(FAR_FUTURE)))
        .await
        .unwrap();
    let (b, _) = api
        .store
        .create_task(store::conformance::new_task("b", 0, Some(FAR_FUTURE)))
        .await
        .unwrap();
    let first = api.get("/v1/tasks?limit=1").await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    assert_eq!(first.body["tasks"][0]["id"], b.id.as_str());
    let cursor = first.body["next_cursor"].as_str().expect("a next page");
    let second = api.get(&format!("/v1/tasks?limit=1&cursor={cursor}")).await;
    assert_eq!(
        second.body["tasks"][0]["id"],
        a.id.as_str(),
        "{}",
        second.body
    );
}

#[tokio::test]
async fn a_get_waits_for_its_task_to_finish_when_asked() {
    let api = Setup::default().start().await;
    let (task, _) = api
        .store
        .create_task(store::conformance::new_task("a", 0, Some(FAR_FUTURE)))
        .await
        .unwrap();
    let uri = format!("/v1/tasks/{}", task.id);
    for query in [
        "wait_secs=61",
        "wait_secs=-1",
        "wait_secs=soon",
        "colour=red",
    ] {
        api.get(&format!("{uri}?{query}"))
            .await
            .is_error(Code::InvalidQuery, query);
    }

    // A wait that runs out answers with the task as it is then.
    let started = std::time::Instant::now();
    let answer = api.get(&format!("{uri}?wait_secs=1")).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(answer.body["status"], "queued");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );

    // A wait ends when the task does: heard from this host's scheduler or
    // API at once, not at the next of the once-a-second reads of the store.
    let started = std::time::Instant::now();
    let waiting = format!("{uri}?wait_secs=30");
    let (answer, cancelled) = tokio::join!(api.get(&waiting), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        api.send(json_post(&format!("{uri}/cancel"), "")).await
    });
    assert_eq!(cancelled.status, StatusCode::OK, "{}", cancelled.body);
    assert_eq!(answer.body["status"], "cancelled", "{}", answer.body);
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "answered {:?} after the wait began",
        started.elapsed()
    );

    // A finished task is answered at once, however long the wait asked.
    let started = std::time::Instant::now();
    let answer = api.get(&format!("{uri}?wait_secs=60")).await;
    assert_eq!(answer.body["status"], "cancelled", "{}", answer.body);
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// `POST /v1/tasks` with these `Prefer` headers.
fn submit_preferring(body: &str, prefer: &[&str]) -> Request<Body> {
    let mut request = request(Method::POST, "/v1/tasks")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, body.len());
    for preference in prefer {
        request = request.header("prefer", *preference);
    }
    request.body(Body::from(body.to_owned())).unwrap()
}

#[tokio::test]
async fn a_submission_preferring_to_wait_answers_with_the_finished_task() {
    let api = Setup::examples().start().await;
    let task = r#"{"goal": "What is 6*7?", "tools": ["calculator"], "llm": "scripted"}"#;
    let answer = api.send(submit_preferring(task, &["wait=30"])).await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
    assert_eq!(
        (
            answer.body["status"].as_str(),
            answer.body["result"].as_str()
        ),
        (Some("succeeded"), Some("42")),
        "{}",
        answer.body
    );
    assert_eq!(answer.headers["preference-applied"], "wait=30");

    // Past the most (60 s), the wait is capped, not refused; preferences
    // the server does not apply, or cannot read, are ignored (RFC 7240).
    let answer = api
        .send(submit_preferring(task, &["respond-async, wait=3600; x=y"]))
        .await;
    assert_eq!(answer.body["status"], "succeeded", "{}", answer.body);
    assert_eq!(answer.headers["preference-applied"], "wait=60");
    for prefer in [&["respond-async"][..], &["wait=soon"], &["wait=0"], &[]] {
        let later = r#"{"goal": "x", "run_at": "2099-01-01T00:00:00Z"}"#;
        let started = std::time::Instant::now();
        let answer = api.send(submit_preferring(later, prefer)).await;
        assert_eq!(
            answer.status,
            StatusCode::CREATED,
            "{prefer:?}: {}",
            answer.body
        );
        assert_eq!(answer.body["status"], "queued", "{prefer:?}");
        assert!(
            !answer.headers.contains_key("preference-applied"),
            "{prefer:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{prefer:?}: no wait"
        );
    }

    // A wait that runs out answers with the task as it is then.
    let later = r#"{"goal": "x", "run_at": "2099-01-01T00:00:00Z"}"#;
    let started = std::time::Instant::now();
    let answer = api.send(submit_preferring(later, &["wait=1"])).await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
    assert_eq!(answer.body["status"], "queued");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn the_list_filters_by_plugin_and_goal_text() {
    let api = Setup::default().start().await;
    let long = "x".repeat(257);
    for query in [
        format!("q={long}"),
        format!("plugin={long}"),
        "q=a%00b".to_owned(),
    ] {
        api.get(&format!("/v1/tasks?{query}"))
            .await
            .is_error(Code::InvalidQuery, &query);
    }
    let mut with_tool = store::conformance::new_task("Add It Up", 0, Some(FAR_FUTURE));
    with_tool.tools = vec!["adder".into()];
    let (adder, _) = api.store.create_task(with_tool).await.unwrap();
    api.store
        .create_task(store::conformance::new_task(
            "something else",
            0,
            Some(FAR_FUTURE),
        ))
        .await
        .unwrap();
    let ids = |answer: &Answer| -> Vec<String> {
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        answer.body["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        ids(&api.get("/v1/tasks?plugin=adder").await),
        [adder.id.as_str()]
    );
    assert_eq!(
        ids(&api.get("/v1/tasks?q=add%20IT").await),
        [adder.id.as_str()]
    );
    assert_eq!(
        ids(&api.get("/v1/tasks?q=&plugin=").await).len(),
        2,
        "empty filters (an unfilled form field) filter nothing"
    );
    assert!(
        ids(&api.get("/v1/tasks?plugin=react&q=nothing").await).is_empty(),
        "filters combine"
    );
}

#[tokio::test]
async fn stats_count_the_tenants_tasks_by_status_and_minute() {
    let api = Setup::default().start().await;
    for goal in ["a", "b"] {
        api.store
            .create_task(store::conformance::new_task(goal, 0, Some(FAR_FUTURE)))
            .await
            .unwrap();
    }
    let asked_at = store::minute_of(store::now_millis());
    let answer = api.get("/v1/stats").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    let stats = answer.body;
    assert_eq!(
        stats["counts"],
        json!({"queued": 2, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 0,
               "waiting_approval": 0})
    );
    assert_eq!(stats["count_limit"], store::STATS_COUNT_LIMIT);
    assert_eq!(
        stats["oldest_queued_age_ms"],
        Value::Null,
        "a task held back until later is not waiting"
    );
    let minutes = stats["finished_per_minute"].as_array().unwrap();
    assert_eq!(minutes.len(), 60, "the last hour, minute by minute");
    let first = crate::rfc3339::parse(minutes[0]["minute"].as_str().unwrap()).unwrap();
    let last = crate::rfc3339::parse(minutes[59]["minute"].as_str().unwrap()).unwrap();
    assert_eq!(last - first, 59 * 60_000);
    assert!(
        (asked_at..=store::minute_of(store::now_millis())).contains(&last),
        "the current minute is last"
    );
    assert!(
        minutes
            .iter()
            .all(|m| m["succeeded"] == 0 && m["failed"] == 0)
    );
}

#[tokio::test]
async fn plugin_files_that_do_not_load_say_why_with_a_code() {
    let api = Setup::default().start().await;
    let folder = api.host.plugins.path();
    std::fs::write(folder.join("text.wasm"), "not a component").unwrap();
    std::os::unix::fs::symlink("/etc/hostname", folder.join("outside.wasm")).unwrap();
    api.host
        .plugins
        .add("manifest", "calculator", Some("[[[ not TOML"));
    api.host.plugins.add("first", "calculator", None);
    api.host.plugins.add("second", "calculator", None);
    api.host.runtime.rescan().await.unwrap();
    api.host.runtime.loaded().await;

    let listed = api.get("/v1/plugins").await;
    let failures: std::collections::BTreeMap<String, String> = listed.body["failures"]
        .as_array()
        .expect("failures")
        .iter()
        .map(|failure| {
            let file = failure["file"].as_str().unwrap();
            let name = file.rsplit('/').next().unwrap().to_owned();
            (
                name,
                failure["code"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let code = |file: &str| failures.get(file).map(String::as_str);
    assert_eq!(
        code("text.wasm"),
        Some("plugin_load_failed"),
        "{failures:?}"
    );
    assert_eq!(
        code("outside.wasm"),
        Some("plugin_unreadable"),
        "{failures:?}"
    );
    assert_eq!(
        code("manifest.wasm"),
        Some("plugin_invalid_manifest"),
        "{failures:?}"
    );
    let taken: Vec<_> = ["first.wasm", "second.wasm"]
        .map(code)
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(
        taken,
        ["plugin_name_taken"],
        "one calculator loads: {failures:?}"
    );
    assert_eq!(listed.body["plugins"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn unknown_tasks_routes_and_methods_have_their_codes() {
    let api = Setup::default().start().await;
    let missing = "01890000-0000-7000-8000-000000000000";
    api.get(&format!("/v1/tasks/{missing}"))
        .await
        .is_error(Code::TaskNotFound, "GET a missing task");
    api.get("/v1/tasks/not-even-an-id/events")
        .await
        .is_error(Code::TaskNotFound, "events of a missing task");
    api.send(json_post(&format!("/v1/tasks/{missing}/cancel"), ""))
        .await
        .is_error(Code::TaskNotFound, "cancelling a missing task");
    api.get("/v2/everything")
        .await
        .is_error(Code::RouteNotFound, "/v2");
    api.send(
        request(Method::DELETE, "/v1/tasks")
            .body(Body::empty())
            .unwrap(),
    )
    .await
    .is_error(Code::MethodNotAllowed, "DELETE /v1/tasks");

    let (task, _) = api
        .store
        .create_task(store::conformance::new_task(
            "followed",
            0,
            Some(FAR_FUTURE),
        ))
        .await
        .unwrap();
    let bad_last_id = request(Method::GET, &format!("/v1/tasks/{}/events", task.id))
        .header("last-event-id", "seven")
        .body(Body::empty())
        .unwrap();
    api.send(bad_last_id)
        .await
        .is_error(Code::InvalidLastEventId, "Last-Event-ID: seven");
    let cancelled = api
        .send(json_post(&format!("/v1/tasks/{}/cancel", task.id), ""))
        .await;
    assert_eq!(cancelled.status, StatusCode::OK, "{}", cancelled.body);
    api.send(json_post(&format!("/v1/tasks/{}/cancel", task.id), ""))
        .await
        .is_error(Code::TaskAlreadyFinished, "cancelling twice");
}

#[tokio::test]
async fn idempotency_keys_are_checked_and_name_one_task() {
    let api = Setup::examples().start().await;
    let with_key = |key: &str| {
        request(Method::POST, "/v1/tasks")
            .header(header::CONTENT_TYPE, "application/json")
            .header("idempotency-key", key)
            .body(Body::from(r#"{"goal": "once"}"#))
            .unwrap()
    };
    for key in ["", "   ", &"k".repeat(256)] {
        api.send(with_key(key))
            .await
            .is_error(Code::InvalidIdempotencyKey, &format!("key {key:?}"));
    }
    let first = api.send(with_key("k-1")).await;
    let again = api.send(with_key("k-1")).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    assert_eq!(again.status, StatusCode::OK, "{}", again.body);
    assert_eq!(first.body["id"], again.body["id"]);
}

fn tokens(requests_per_minute: Option<u32>, max_active_tasks: Option<u64>) -> AuthConfig {
    let token = |tenant: &str, secret: &str| TokenConfig {
        tenant: tenant.into(),
        sha256: token_hash(secret),
        name: None,
    };
    AuthConfig {
        tokens: vec![token("acme", "acme-secret"), token("other", "other-secret")],
        requests_per_minute,
        max_active_tasks,
    }
}

fn as_token(method: Method, uri: &str, authorization: &str) -> Request<Body> {
    request(method, uri)
        .header(header::AUTHORIZATION, authorization)
        .body(Body::empty())
        .unwrap()
}

#[tokio::test]
async fn tokens_are_required_any_case_of_bearer_works_and_tenants_are_apart() {
    let api = Setup {
        auth: tokens(None, None),
        ..Setup::default()
    }
    .start()
    .await;
    api.get("/v1/tasks")
        .await
        .is_error(Code::Unauthorized, "no token");
    api.send(as_token(Method::GET, "/v1/tasks", "Bearer guess"))
        .await
        .is_error(Code::InvalidToken, "a wrong token");
    api.send(as_token(Method::GET, "/v1/tasks", "Basic acme-secret"))
        .await
        .is_error(Code::InvalidToken, "another scheme");
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let answer = api
            .send(as_token(
                Method::GET,
                "/v1/tasks",
                &format!("{scheme} acme-secret"),
            ))
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{scheme}: {}", answer.body);
    }
    let health = api.get("/healthz").await;
    assert_eq!(health.status, StatusCode::OK, "/healthz needs no token");

    let mut theirs = store::conformance::new_task("theirs", 0, Some(FAR_FUTURE));
    theirs.tenant = "other".into();
    let (theirs, _) = api.store.create_task(theirs).await.unwrap();
    let uri = format!("/v1/tasks/{}", theirs.id);
    api.send(as_token(Method::GET, &uri, "Bearer acme-secret"))
        .await
        .is_error(Code::Forbidden, "another tenant's task");
    let own = api
        .send(as_token(Method::GET, &uri, "bearer other-secret"))
        .await;
    assert_eq!(own.status, StatusCode::OK, "{}", own.body);
}

#[tokio::test]
async fn rate_limits_and_caps_refuse_with_retry_after() {
    let api = Setup {
        auth: tokens(Some(2), Some(1)),
        queue: Some(QueueLimits {
            max_queued_tasks: 100,
            max_queued_per_tenant: None,
        }),
        ..Setup::examples()
    }
    .start()
    .await;
    let submit = |secret: &str| {
        let mut request = json_post(
            "/v1/tasks",
            r#"{"goal": "x", "run_at": "2099-01-01T00:00:00Z"}"#,
        );
        request.headers_mut().insert(
            header::AUTHORIZATION,
            format!("Bearer {secret}").parse().unwrap(),
        );
        request
    };
    let first = api.send(submit("acme-secret")).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    api.send(submit("acme-secret"))
        .await
        .is_error(Code::TooManyActiveTasks, "a second task over the cap");
    let limited = api.send(submit("acme-secret")).await;
    limited.is_error(Code::RateLimited, "a third request in a minute");
    assert!(limited.headers.contains_key(header::RETRY_AFTER));

    let queue = Setup {
        queue: Some(QueueLimits {
            max_queued_tasks: 1,
            max_queued_per_tenant: None,
        }),
        ..Setup::examples()
    }
    .start()
    .await;
    let later = json!({"goal": "x", "run_at": "2099-01-01T00:00:00Z"});
    let first = queue.submit(&later).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    let full = queue.submit(&later).await;
    full.is_error(Code::QueueFull, "a second task past max_queued_tasks");
    assert!(full.headers.contains_key(header::RETRY_AFTER));
}

/// A full database refuses with `507 store_full`, not `500`: the error
/// SQLite gives when it has no room, read from a real database capped with
/// `max_page_count`, is the store's `Full`, and the API answers it so.
#[test]
fn a_full_store_is_answered_store_full() {
    let error = store::full_sqlite_error();
    assert!(matches!(error, StoreError::Full(_)), "{error:?}");
    let answer = super::ApiError::from(error);
    assert_eq!(answer.code, Code::StoreFull);
    assert_eq!(answer.status, StatusCode::INSUFFICIENT_STORAGE);
}

#[test]
fn task_defaults_are_within_what_a_request_may_ask() {
    let defaults: TaskDefaults = Config::default().defaults;
    assert!((1..=super::MAX_STEPS_CEILING).contains(&i64::from(defaults.max_steps)));
    assert!(i64::from(defaults.max_retries) <= super::MAX_RETRIES_CEILING);
}

#[tokio::test]
async fn every_answer_carries_a_request_id_and_a_usable_one_from_the_client_is_kept() {
    let api = Setup::default().start().await;
    let id_of = |answer: &Answer| {
        answer
            .headers
            .get(&REQUEST_ID)
            .and_then(|id| id.to_str().ok())
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no X-Request-Id in {:?}", answer.headers))
    };
    let first = id_of(&api.get("/healthz").await);
    let second = id_of(&api.get("/v2/nothing").await);
    assert_ne!(first, second, "each request gets its own id");
    for id in [&first, &second] {
        assert!(
            uuid::Uuid::parse_str(id).is_ok(),
            "a new id is a UUID: {id}"
        );
    }
    let with_id = |id: &str| {
        request(Method::GET, "/healthz")
            .header(REQUEST_ID, id)
            .body(Body::empty())
            .unwrap()
    };
    assert_eq!(id_of(&api.send(with_id("trace-42.a")).await), "trace-42.a");
    let too_long = "x".repeat(129);
    for unusable in ["has space", "<script>", too_long.as_str()] {
        let replaced = id_of(&api.send(with_id(unusable)).await);
        assert!(
            uuid::Uuid::parse_str(&replaced).is_ok(),
            "{unusable:?} is replaced by a new id, not {replaced:?}"
        );
    }
}

#[tokio::test]
async fn errors_the_framework_finds_are_json_with_a_code() {
    let api = Setup::default().start().await;
    for uri in [
        "/v1/tasks/%FF",
        "/v1/tasks/%C3%28/events",
        "/v1/tasks/%80abc/cancel",
    ] {
        let method = if uri.ends_with("/cancel") {
            Method::POST
        } else {
            Method::GET
        };
        api.send(request(method, uri).body(Body::empty()).unwrap())
            .await
            .is_error(Code::InvalidPath, uri);
    }
    // A preflight while CORS is off is an ordinary request for a method
    // the route lacks.
    let preflight = request(Method::OPTIONS, "/v1/tasks")
        .header(header::ORIGIN, "https://dash.example")
        .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
        .body(Body::empty())
        .unwrap();
    let answer = api.send(preflight).await;
    answer.is_error(Code::MethodNotAllowed, "OPTIONS with CORS off");
    assert!(
        !answer
            .headers
            .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN),
        "CORS is off by default: {:?}",
        answer.headers
    );
}

#[tokio::test]
async fn a_plain_text_error_from_a_layer_becomes_the_json_error_of_its_status() {
    let cases = [
        (StatusCode::BAD_REQUEST, Code::InvalidRequest),
        (StatusCode::NOT_FOUND, Code::RouteNotFound),
        (StatusCode::PAYLOAD_TOO_LARGE, Code::PayloadTooLarge),
        (StatusCode::IM_A_TEAPOT, Code::InvalidRequest),
        (StatusCode::BAD_GATEWAY, Code::InternalError),
    ];
    for (status, code) in cases {
        let plain = (status, "Failed to parse the request").into_response();
        let response = hygiene::errors_as_json(plain).await;
        let status = response.status();
        let body: Value =
            serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes())
                .expect("a JSON body");
        let answer = Answer {
            status,
            headers: HeaderMap::new(),
            body,
        };
        answer.is_error(code, &format!("plain {status}"));
    }
}

#[tokio::test]
async fn a_panicking_handler_is_answered_500_internal_error_with_its_request_id() {
    async fn boom() -> &'static str {
        panic!("deliberately, in a test")
    }
    let router = Router::new().route("/boom", axum::routing::get(boom));
    let router = hygiene::around(router, &CorsConfig::default()).unwrap();
    let response = router
        .oneshot(request(Method::GET, "/boom").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(response.headers().contains_key(&REQUEST_ID));
    let body: Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["error"]["code"], "internal_error", "{body}");
}

#[tokio::test]
async fn cors_answers_the_configured_origins_only_and_before_authentication() {
    let api = Setup {
        auth: tokens(None, None),
        cors: CorsConfig {
            allow_origins: vec!["https://dash.example".into()],
            ..CorsConfig::default()
        },
        ..Setup::default()
    }
    .start()
    .await;
    let preflight = |origin: &str| {
        request(Method::OPTIONS, "/v1/tasks")
            .header(header::ORIGIN, origin)
            .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
            .header(
                header::ACCESS_CONTROL_REQUEST_HEADERS,
                "authorization, content-type, idempotency-key, prefer",
            )
            .body(Body::empty())
            .unwrap()
    };
    let allowed = api.send(preflight("https://dash.example")).await;
    assert_eq!(allowed.status, StatusCode::OK, "{:?}", allowed.headers);
    assert_eq!(
        allowed.headers[header::ACCESS_CONTROL_ALLOW_ORIGIN],
        "https://dash.example"
    );
    let allowed_headers = allowed.headers[header::ACCESS_CONTROL_ALLOW_HEADERS]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    for needed in ["authorization", "content-type", "idempotency-key", "prefer"] {
        assert!(allowed_headers.contains(needed), "{allowed_headers}");
    }
    let other = api.send(preflight("https://evil.example")).await;
    assert!(
        !other
            .headers
            .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN),
        "another origin is not allowed: {:?}",
        other.headers
    );

    let listed = api
        .send(
            request(Method::GET, "/v1/tasks")
                .header(header::ORIGIN, "https://dash.example")
                .header(header::AUTHORIZATION, "Bearer acme-secret")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(listed.status, StatusCode::OK, "{}", listed.body);
    assert_eq!(
        listed.headers[header::ACCESS_CONTROL_ALLOW_ORIGIN],
        "https://dash.example"
    );
    let exposed = listed.headers[header::ACCESS_CONTROL_EXPOSE_HEADERS]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    for exposed_header in ["x-request-id", "location", "preference-applied"] {
        assert!(exposed.contains(exposed_header), "{exposed}");
    }
    // Without a token the answer is still refused, CORS or not.
    let anonymous = api
        .send(
            request(Method::GET, "/v1/tasks")
                .header(header::ORIGIN, "https://dash.example")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    anonymous.is_error(Code::Unauthorized, "no token, from an allowed origin");
}

/// The spec `GET /openapi.json` serves, from an API with every optional
/// route (`/metrics`) on.
async fn served_spec() -> (Api, Value) {
    let api = Setup {
        metrics: true,
        ..Setup::default()
    }
    .start()
    .await;
    let answer = api.get("/openapi.json").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(
        answer.headers[header::CONTENT_TYPE],
        "application/json",
        "the spec is JSON"
    );
    let spec = answer.body;
    assert!(
        spec["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1")),
        "an OpenAPI 3.1 document: {}",
        spec["openapi"]
    );
    (api, spec)
}

/// Every (method, path) the spec has an operation for.
fn operations(spec: &Value) -> Vec<(String, String)> {
    let mut operations = Vec::new();
    for (path, item) in spec["paths"].as_object().expect("the spec has paths") {
        for method in ["get", "post", "put", "patch", "delete", "head", "options"] {
            if item.get(method).is_some() {
                operations.push((method.to_uppercase(), path.clone()));
            }
        }
    }
    operations
}

/// Routes served outside the spec, each for a reason: MCP's JSON-RPC
/// cannot be described in OpenAPI, and `/docs` and the dashboard (`/ui`
/// and the files under it) are pages for people.
const UNDESCRIBED_ROUTES: &[&str] = &["/mcp", "/docs", "/ui"];

/// `path` is one of [`UNDESCRIBED_ROUTES`] or under one.
fn undescribed(path: &str) -> bool {
    UNDESCRIBED_ROUTES
        .iter()
        .any(|route| path == *route || path.starts_with(&format!("{route}/")))
}

#[tokio::test]
async fn every_route_is_in_the_spec_and_every_operation_in_it_is_routed() {
    let (api, spec) = served_spec().await;
    let described = operations(&spec);

    // Every endpoint docs/api.md lists is an operation of the spec.
    let docs = std::fs::read_to_string(crate::test_support::repo_root().join("docs/api.md"))
        .expect("reading docs/api.md");
    let table = docs
        .split_once("## Endpoints")
        .expect("docs/api.md has an Endpoints section")
        .1;
    let mut documented = Vec::new();
    for row in table
        .lines()
        .skip_while(|line| !line.starts_with('|'))
        .take_while(|line| line.starts_with('|'))
        .skip(2)
    {
        let first_cell = row.split('|').nth(1).unwrap_or_default();
        for endpoint in first_cell.split('`').skip(1).step_by(2) {
            let (method, path) = endpoint
                .split_once(' ')
                .unwrap_or_else(|| panic!("{endpoint:?} in docs/api.md is not `METHOD /path`"));
            documented.push((method.to_owned(), path.to_owned()));
        }
    }
    assert!(
        documented.len() >= 8,
        "endpoints in docs/api.md: {documented:?}"
    );
    for (method, path) in &documented {
        if undescribed(path) {
            continue;
        }
        assert!(
            described.contains(&(method.clone(), path.clone())),
            "docs/api.md lists {method} {path}, which the OpenAPI spec lacks"
        );
    }
    for (method, path) in &described {
        assert!(
            documented.contains(&(method.clone(), path.clone())),
            "the spec has {method} {path}, which docs/api.md's endpoint table lacks"
        );
    }

    // Every route the code mounts by hand (not through `routes!`, which
    // documents it) is one the spec describes or one left out on purpose.
    for (file, text) in crate::test_support::non_test_sources("src") {
        for call in [
            ".route(\"",
            ".route_service(\"",
            ".nest(\"",
            ".nest_service(\"",
        ] {
            for (at, _) in text.match_indices(call) {
                let path = text[at + call.len()..]
                    .split('"')
                    .next()
                    .unwrap_or_default();
                assert!(
                    undescribed(path) || described.iter().any(|(_, described)| described == path),
                    "{} mounts {path} outside the spec: register its handler with \
                     utoipa_axum's routes! and #[utoipa::path]",
                    file.display()
                );
            }
        }
    }

    // And every operation in the spec is served: the router neither says
    // there is no such route nor that the method is wrong.
    let missing_task = "01890000-0000-7000-8000-000000000000";
    for (method, path) in &described {
        let uri = path.replace("{id}", missing_task);
        let request = request(method.parse().unwrap(), &uri)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(if method == "POST" { "{}" } else { "" }))
            .unwrap();
        let answer = api.send(request).await;
        let code = answer.body["error"]["code"].as_str();
        assert!(
            code != Some(Code::RouteNotFound.as_str())
                && code != Some(Code::MethodNotAllowed.as_str()),
            "the spec has {method} {path}, but the router answers {} {}",
            answer.status,
            answer.body
        );
    }
}

#[tokio::test]
async fn every_error_code_is_in_the_spec_with_its_status() {
    let (_api, spec) = served_spec().await;
    let error_codes: Vec<&str> = spec["components"]["schemas"]["ErrorCode"]["enum"]
        .as_array()
        .expect("the spec has an ErrorCode enum")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    // (status, code) for every error response of every operation.
    let mut answered = Vec::new();
    for (method, path) in operations(&spec) {
        let responses = &spec["paths"][&path][method.to_lowercase()]["responses"];
        for (status, response) in responses.as_object().expect("responses") {
            let schema = &response["content"]["application/json"]["schema"];
            let Some(codes) =
                schema["properties"]["error"]["properties"]["code"]["enum"].as_array()
            else {
                continue;
            };
            for code in codes.iter().filter_map(Value::as_str) {
                let known = Code::ALL.iter().find(|c| c.as_str() == code);
                let table_status = known.and_then(|c| c.status()).unwrap_or_else(|| {
                    panic!("{method} {path} answers `{code}`, not in the table")
                });
                assert_eq!(
                    table_status.to_string(),
                    *status,
                    "{method} {path} lists `{code}` under the wrong status"
                );
                answered.push((status.clone(), code.to_owned()));
            }
        }
    }
    let description = spec["info"]["description"].as_str().unwrap_or_default();
    let error_info = spec["components"]["schemas"]["ErrorInfo"].to_string();
    for code in Code::ALL {
        if let Some(status) = code.status() {
            assert!(
                error_codes.contains(&code.as_str()),
                "the ErrorCode schema lacks `{code}`"
            );
            if super::openapi::UNROUTED.contains(code) {
                assert!(
                    description.contains(&format!("`{status}` `{code}`")),
                    "the spec's description must say unrouted requests get {status} `{code}`"
                );
            } else {
                assert!(
                    answered.contains(&(status.to_string(), code.as_str().to_owned())),
                    "no operation in the spec answers `{code}` ({status})"
                );
            }
        }
        if code.on_steps() {
            assert!(
                error_info.contains(&format!("`{code}`")),
                "the ErrorInfo schema does not name the task and step code `{code}`"
            );
        }
    }
}

#[tokio::test]
async fn the_spec_says_what_needs_a_token_the_idempotency_key_and_the_event_stream() {
    let (_api, spec) = served_spec().await;
    let schemes = &spec["components"]["securitySchemes"];
    assert_eq!(schemes["api_token"]["scheme"], "bearer", "{schemes}");
    for (method, path) in operations(&spec) {
        let operation = &spec["paths"][&path][method.to_lowercase()];
        let security = operation["security"].to_string();
        let open = ["/healthz", "/metrics", "/openapi.json"].contains(&path.as_str());
        assert_eq!(
            security.contains("api_token"),
            !open,
            "{method} {path}: only /healthz, /metrics and /openapi.json are open ({security})"
        );
    }
    let create = &spec["paths"]["/v1/tasks"]["post"];
    assert!(
        create["parameters"].as_array().is_some_and(|p| p
            .iter()
            .any(|p| p["name"] == "Idempotency-Key" && p["in"] == "header")),
        "POST /v1/tasks documents the Idempotency-Key header: {}",
        create["parameters"]
    );
    assert_eq!(
        create["requestBody"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/CreateTask"
    );
    let stream = &spec["paths"]["/v1/tasks/{id}/events"]["get"]["responses"]["200"]["content"];
    assert!(
        stream.get("text/event-stream").is_some(),
        "the events route answers text/event-stream: {stream}"
    );
    let kinds = &spec["components"]["schemas"]["TaskEvent"]["properties"]["kind"]["enum"];
    for kind in crate::store::event_kind::ALL {
        assert!(
            kinds
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == kind)),
            "the TaskEvent schema lacks the event kind {kind}: {kinds}"
        );
    }
}

#[tokio::test]
async fn the_spec_and_its_page_are_open_even_when_tokens_are_required() {
    let api = Setup {
        auth: AuthConfig {
            tokens: vec![TokenConfig {
                tenant: "acme".into(),
                sha256: token_hash("secret"),
                name: None,
            }],
            ..AuthConfig::default()
        },
        ..Setup::default()
    }
    .start()
    .await;
    assert_eq!(api.get("/openapi.json").await.status, StatusCode::OK);
    assert_eq!(api.get("/docs/").await.status, StatusCode::OK);
    assert_eq!(api.get("/ui/").await.status, StatusCode::OK);
    assert_eq!(api.get("/ui/main.js").await.status, StatusCode::OK);
    api.get("/v1/stats").await.is_error(
        Code::Unauthorized,
        "the dashboard's data still needs a token",
    );
    api.get("/v1/tasks")
        .await
        .is_error(Code::Unauthorized, "the API itself still needs a token");
}

/// `src` and `href` attribute values in `html`.
fn linked(html: &str) -> Vec<String> {
    let mut links = Vec::new();
    for attribute in ["src=\"", "href=\""] {
        for (at, _) in html.match_indices(attribute) {
            let rest = &html[at + attribute.len()..];
            links.push(rest.split('"').next().unwrap_or_default().to_owned());
        }
    }
    links
}

#[tokio::test]
async fn the_docs_page_is_served_from_the_binary_with_nothing_from_elsewhere() {
    let api = Setup::default().start().await;
    let redirect = api.get("/docs").await;
    assert!(
        redirect.status.is_redirection(),
        "/docs leads to /docs/: {}",
        redirect.status
    );
    assert_eq!(redirect.headers[header::LOCATION], "/docs/");

    let (status, headers, page) = api.get_text("/docs/").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/html"),
        "{headers:?}"
    );
    let links = linked(&page);
    assert!(
        links.iter().any(|l| l.ends_with(".js")),
        "the page loads its scripts: {links:?}"
    );
    for link in &links {
        assert!(
            !link.contains("://") && !link.starts_with("//"),
            "/docs/ loads {link} from elsewhere; every asset must be in the binary"
        );
        let path = format!("/docs/{}", link.trim_start_matches("./"));
        let (status, _, body) = api.get_text(&path).await;
        assert_eq!(status, StatusCode::OK, "{path}, linked from /docs/");
        assert!(!body.is_empty(), "{path} is empty");
    }
    // What the page runs: it reads this server's spec, and calls no
    // validator or other service.
    let (status, _, initializer) = api.get_text("/docs/swagger-initializer.js").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        initializer.contains("\"/openapi.json\""),
        "the page renders this server's spec: {initializer}"
    );
    assert!(
        !initializer.contains("http://") && !initializer.contains("https://"),
        "the page's configuration names another server: {initializer}"
    );
}

#[tokio::test]
async fn the_dashboard_is_served_from_the_binary_under_a_strict_policy() {
    let api = Setup::default().start().await;
    let redirect = api.get("/ui").await;
    assert!(redirect.status.is_redirection(), "{}", redirect.status);
    assert_eq!(redirect.headers[header::LOCATION], "/ui/");

    let (status, headers, page) = api.get_text("/ui/").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "text/html; charset=utf-8");
    let policy = headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
    assert!(
        policy.contains("default-src 'none'")
            && policy.contains("script-src 'self';")
            && !policy.contains("unsafe"),
        "{policy}"
    );
    assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    assert!(
        !page.contains("<script>") && !page.contains(" style="),
        "no inline script or style: the policy would refuse it"
    );

    // Every file in host/ui is served, with its type and the policy, and
    // loads nothing from elsewhere; every module it imports is served too.
    let ui = crate::test_support::repo_root().join("host/ui");
    let mut on_disk = Vec::new();
    let mut folders = vec![ui.clone()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                folders.push(path);
            } else {
                on_disk.push(path.strip_prefix(&ui).unwrap().display().to_string());
            }
        }
    }
    on_disk.sort();
    let mut served: Vec<&str> = super::ui::file_paths().collect();
    served.sort();
    assert_eq!(on_disk, served, "every file in host/ui is in ui.rs's table");
    for path in served {
        let (status, headers, text) = api.get_text(&format!("/ui/{path}")).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert!(
            headers.contains_key(header::CONTENT_SECURITY_POLICY),
            "{path}"
        );
        let media_type = headers[header::CONTENT_TYPE].to_str().unwrap();
        let expected = match path.rsplit('.').next() {
            Some("js") => "text/javascript",
            Some("css") => "text/css",
            _ => "text/html",
        };
        assert!(media_type.starts_with(expected), "{path}: {media_type}");
        let without_svg_namespace = text.replace("http://www.w3.org/2000/svg", "");
        assert!(
            !without_svg_namespace.contains("://"),
            "{path} names another server; every asset must be in the binary"
        );
        let folder = path.rsplit_once('/').map_or("", |(folder, _)| folder);
        for (at, _) in text.match_indices(" from \"") {
            let import = text[at + 7..].split('"').next().unwrap();
            let resolved = std::path::Path::new(folder).join(import);
            let mut parts: Vec<&str> = Vec::new();
            for part in resolved.iter().map(|p| p.to_str().unwrap()) {
                match part {
                    "." => {}
                    ".." => {
                        parts.pop();
                    }
                    part => parts.push(part),
                }
            }
            let target = format!("/ui/{}", parts.join("/"));
            assert_eq!(
                api.get_text(&target).await.0,
                StatusCode::OK,
                "{path} imports {import} ({target})"
            );
        }
    }
    for link in linked(&page) {
        assert!(!link.contains("://"), "{link}");
        if !link.starts_with('#') && !link.starts_with("data:") {
            let (status, ..) = api.get_text(&format!("/ui/{link}")).await;
            assert_eq!(status, StatusCode::OK, "{link}, linked from /ui/");
        }
    }
    api.get("/ui/nothing.js")
        .await
        .is_error(Code::RouteNotFound, "a file the dashboard lacks");
}

fn with_token(method: Method, uri: &str, token: &str, body: Option<&Value>) -> Request<Body> {
    let builder = request(method, uri).header(header::AUTHORIZATION, format!("Bearer {token}"));
    match body {
        Some(body) => {
            let text = body.to_string();
            builder
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::CONTENT_LENGTH, text.len())
                .body(Body::from(text))
                .unwrap()
        }
        None => builder.body(Body::empty()).unwrap(),
    }
}

/// A schedule is refused with a stable code for a bad expression, an
/// unknown zone, a bad name, and for a task `POST /v1/tasks` would refuse
/// (the same checks, the same codes); a good one is created with its next
/// ticks in its zone.
#[tokio::test]
async fn schedules_are_validated_like_tasks_and_show_their_next_ticks() {
    let api = Setup {
        examples: true,
        ..Setup::default()
    }
    .start()
    .await;
    let post = |body: Value| {
        let api = &api;
        async move {
            api.send(json_post("/v1/schedules", &body.to_string()))
                .await
        }
    };
    let task = json!({"goal": "What is 1+1?", "tools": ["calculator"]});
    let cases = [
        (
            json!({"cron": "* * * *", "task": task}),
            Code::InvalidSchedule,
        ),
        (
            json!({"cron": "0 0 0 * * * *", "task": task}),
            Code::InvalidSchedule,
        ),
        (
            json!({"cron": "61 * * * *", "task": task}),
            Code::InvalidSchedule,
        ),
        (
            json!({"cron": "0 0 30 2 *", "task": task}),
            Code::InvalidSchedule,
        ),
        (json!({"cron": "", "task": task}), Code::InvalidSchedule),
        (
            json!({"cron": "* * * * *", "name": "", "task": task}),
            Code::InvalidSchedule,
        ),
        (
            json!({"cron": "* * * * *", "timezone": "Mars/Olympus", "task": task}),
            Code::InvalidTimezone,
        ),
        (
            json!({"cron": "* * * * *", "task": {"goal": " "}}),
            Code::InvalidGoal,
        ),
        (
            json!({"cron": "* * * * *", "task": {"goal": "x", "tools": ["nope"]}}),
            Code::UnknownTool,
        ),
        (
            json!({"cron": "* * * * *", "task": {"goal": "x", "planner": "nope"}}),
            Code::UnknownPlanner,
        ),
        (
            json!({"cron": "* * * * *", "task": {"goal": "x", "max_steps": 0}}),
            Code::InvalidMaxSteps,
        ),
        (
            json!({"cron": "* * * * *", "task": {"goal": "x", "run_at": "2030-01-01T00:00:00Z"}}),
            Code::InvalidTime,
        ),
        (
            json!({"cron": "* * * * *", "task": {"goal": "x", "budget": {"max_tokens": 0}}}),
            Code::InvalidBudget,
        ),
        (json!({"cron": "* * * * *"}), Code::InvalidRequest),
        (
            json!({"cron": "* * * * *", "missed_ticks": "all", "task": task}),
            Code::InvalidRequest,
        ),
        (
            json!({"cron": "* * * * *", "task": task, "colour": "red"}),
            Code::InvalidRequest,
        ),
    ];
    let documented = super::openapi::CreateScheduleErrors::codes();
    for (body, code) in cases {
        post(body.clone()).await.is_error(code, &body.to_string());
        assert!(
            documented.contains(&code),
            "the spec lists {code:?} among POST /v1/schedules' answers"
        );
    }
    let listed = api.get("/v1/schedules").await;
    assert_eq!(listed.body["schedules"], json!([]), "nothing was created");

    let created = post(json!({
        "name": "weekday mornings",
        "cron": "0 9 * * MON-FRI",
        "timezone": "Europe/Berlin",
        "missed_ticks": "run_once",
        "task": {"goal": "  Report  ", "tools": ["calculator"], "priority": 3},
    }))
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let id = created.body["id"].as_str().unwrap().to_owned();
    assert_eq!(
        created.headers[header::LOCATION],
        format!("/v1/schedules/{id}").as_str()
    );
    let schedule = &created.body;
    assert_eq!(schedule["missed_ticks"], "run_once");
    assert_eq!(schedule["paused"], false);
    assert_eq!(
        schedule["task"]["goal"], "Report",
        "trimmed as a task's goal is"
    );
    assert_eq!(schedule["task"]["planner"], "react", "defaults applied");
    assert_eq!(schedule["task"]["priority"], 3);
    let next_runs: Vec<&str> = schedule["next_runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(next_runs.len(), 3);
    assert_eq!(schedule["next_run_at"].as_str(), Some(next_runs[0]));
    for tick in &next_runs {
        // 09:00 in Berlin is 07:00 or 08:00 UTC, whatever the season.
        assert!(
            tick.ends_with("T07:00:00.000Z") || tick.ends_with("T08:00:00.000Z"),
            "{tick}"
        );
    }
    let shown = api.get(&format!("/v1/schedules/{id}")).await;
    assert_eq!(shown.status, StatusCode::OK);
    assert_eq!(shown.body["next_runs"], schedule["next_runs"]);

    let default_zone = post(json!({"cron": "*/10 * * * * *", "task": task})).await;
    assert_eq!(
        default_zone.status,
        StatusCode::CREATED,
        "{}",
        default_zone.body
    );
    assert_eq!(default_zone.body["timezone"], "UTC");
    assert_eq!(default_zone.body["missed_ticks"], "skip");

    let page = api.get("/v1/schedules?limit=1").await;
    assert_eq!(page.body["schedules"][0]["id"], default_zone.body["id"]);
    let cursor = page.body["next_cursor"].as_str().unwrap();
    let rest = api
        .get(&format!("/v1/schedules?limit=1&cursor={cursor}"))
        .await;
    assert_eq!(rest.body["schedules"][0]["id"], id.as_str());
    assert_eq!(rest.body["next_cursor"], Value::Null);
    for bad in ["limit=0", "cursor=nope", "colour=red"] {
        api.get(&format!("/v1/schedules?{bad}"))
            .await
            .is_error(Code::InvalidQuery, bad);
    }
}

/// Pause hides the next runs; resume brings them back from now; delete
/// answers 204 and the schedule is gone. Another tenant's schedule is not
/// found by any route, and is not listed.
#[tokio::test]
async fn schedules_pause_resume_delete_and_stay_within_their_tenant() {
    let api = Setup {
        examples: true,
        auth: tokens(None, None),
        ..Setup::default()
    }
    .start()
    .await;
    let body = json!({"cron": "0 0 1 1 *", "task": {"goal": "Happy new year", "tools": []}});
    let created = api
        .send(with_token(
            Method::POST,
            "/v1/schedules",
            "acme-secret",
            Some(&body),
        ))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    assert_eq!(created.body["tenant"], "acme");
    let id = created.body["id"].as_str().unwrap().to_owned();
    let one = format!("/v1/schedules/{id}");

    for (method, uri) in [
        (Method::GET, one.clone()),
        (Method::POST, format!("{one}/pause")),
        (Method::POST, format!("{one}/resume")),
        (Method::DELETE, one.clone()),
    ] {
        api.send(with_token(method.clone(), &uri, "other-secret", None))
            .await
            .is_error(
                Code::ScheduleNotFound,
                &format!("{method} {uri} as another tenant"),
            );
    }
    let theirs = api
        .send(with_token(
            Method::GET,
            "/v1/schedules",
            "other-secret",
            None,
        ))
        .await;
    assert_eq!(theirs.body["schedules"], json!([]));
    api.send(with_token(
        Method::GET,
        "/v1/schedules/nope",
        "acme-secret",
        None,
    ))
    .await
    .is_error(Code::ScheduleNotFound, "no such schedule");

    let paused = api
        .send(with_token(
            Method::POST,
            &format!("{one}/pause"),
            "acme-secret",
            None,
        ))
        .await;
    assert_eq!(paused.status, StatusCode::OK, "{}", paused.body);
    assert_eq!(paused.body["paused"], true);
    assert_eq!(paused.body["next_run_at"], Value::Null);
    assert_eq!(paused.body["next_runs"], json!([]));
    assert_eq!(
        api.store.earliest_schedule_due().await.unwrap(),
        None,
        "a paused schedule is never due"
    );
    let resumed = api
        .send(with_token(
            Method::POST,
            &format!("{one}/resume"),
            "acme-secret",
            None,
        ))
        .await;
    assert_eq!(resumed.body["paused"], false);
    assert!(
        resumed.body["next_run_at"]
            .as_str()
            .unwrap()
            .contains("-01-01T00:00:00")
    );

    let deleted = api
        .send(with_token(Method::DELETE, &one, "acme-secret", None))
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    api.send(with_token(Method::GET, &one, "acme-secret", None))
        .await
        .is_error(Code::ScheduleNotFound, "deleted");
}

/// Prices and caps from TOML, as the configuration file has them.
fn budgets_from(toml_text: &str) -> crate::budgets::Budgets {
    let config: Config = Config::load(
        None,
        figment::Figment::from(figment::providers::Serialized::globals(
            toml::from_str::<toml::Value>(toml_text).unwrap(),
        )),
    )
    .unwrap();
    config.budgets().unwrap()
}

#[tokio::test]
async fn a_budget_out_of_range_is_refused_with_its_code() {
    let api = Setup::examples().start().await;
    let cases = [
        json!({"max_tokens": 0}),
        json!({"max_tokens": -5}),
        json!({"max_tokens": 1.5}),
        json!({"max_tokens": 1e30}),
        json!({"max_cost_usd": -0.01}),
        json!({"max_cost_usd": 1e7}),
    ];
    for budget in cases {
        api.refused(&json!({"goal": "x", "budget": budget}), Code::InvalidBudget)
            .await;
    }
    for budget in [
        json!({"max_tokens": "5"}),
        json!({"max_cents": 5}),
        json!(5),
    ] {
        api.refused(
            &json!({"goal": "x", "budget": budget}),
            Code::InvalidRequest,
        )
        .await;
    }
    // In range: kept on the task, with what is left of it.
    let answer = api
        .submit(&json!({
            "goal": "x",
            "run_at": "2100-01-01T00:00:00Z",
            "budget": {"max_tokens": 500, "max_cost_usd": 0.25},
        }))
        .await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
    assert_eq!(
        answer.body["budget"],
        json!({"max_tokens": 500, "max_cost_usd": 0.25, "remaining_tokens": 500,
               "remaining_cost_usd": 0.25})
    );
    assert_eq!(
        answer.body["cost_usd"],
        json!(0.0),
        "the scripted adapter is free by default"
    );
    let plain = api
        .submit(&json!({"goal": "x", "run_at": "2100-01-01T00:00:00Z"}))
        .await;
    assert_eq!(plain.body["budget"], Value::Null, "{}", plain.body);
}

#[tokio::test]
async fn a_call_task_is_checked_at_submission_and_kept() {
    let api = Setup::examples().start().await;
    let call = json!({"tool": "calculator", "arguments": {"expression": "6*7"}});
    let later = "2100-01-01T00:00:00Z";
    for (field, value) in [
        ("planner", json!("react")),
        ("llm", json!("scripted")),
        ("model", json!("m")),
        ("options", json!({"llm": {}})),
        ("thread", json!("t1")),
        ("budget", json!({"max_tokens": 10})),
        ("response_format", json!({"name": "n", "schema": {}})),
    ] {
        let mut body = json!({"goal": "x", "call": call});
        body[field] = value;
        let refused = api.refused(&body, Code::InvalidCall).await;
        let message = refused.body["error"]["message"].as_str().unwrap();
        assert!(message.contains(field), "{message}");
    }
    api.refused(
        &json!({"goal": "x", "call": call, "tools": ["echo"]}),
        Code::InvalidCall,
    )
    .await;
    api.refused(
        &json!({"goal": "x", "call": {"tool": "no_such_tool"}}),
        Code::UnknownTool,
    )
    .await;
    for bad in [
        json!({"arguments": {}}),
        json!({"tool": "calculator", "arguments": "6*7"}),
        json!({"tool": "calculator", "input": {}}),
        json!("calculator"),
    ] {
        api.refused(&json!({"goal": "x", "call": bad}), Code::InvalidRequest)
            .await;
    }

    let answer = api
        .submit(&json!({"goal": "x", "call": call, "run_at": later}))
        .await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
    let id = answer.body["id"].as_str().unwrap();
    let shown = api.get(&format!("/v1/tasks/{id}")).await;
    for view in [&answer.body, &shown.body] {
        assert_eq!(view["call"], call, "{view}");
        assert_eq!(view["planner"], "", "{view}");
        assert_eq!(view["llm"], "", "{view}");
        assert_eq!(view["tools"], json!(["calculator"]), "{view}");
        assert_eq!(view["max_steps"], 1, "{view}");
    }
    let bare = api
        .submit(&json!({"goal": "x", "call": {"tool": "calculator"}, "run_at": later}))
        .await;
    assert_eq!(bare.body["call"]["arguments"], json!({}), "{}", bare.body);
    let agent = api.submit(&json!({"goal": "x", "run_at": later})).await;
    assert_eq!(agent.body["call"], Value::Null, "{}", agent.body);

    // A schedule's task may be a call task; each run makes the call.
    let created = api
        .send(json_post(
            "/v1/schedules",
            &json!({"cron": "0 9 * * *", "paused": true,
                    "task": {"goal": "x", "call": call}})
            .to_string(),
        ))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let id = created.body["id"].as_str().unwrap();
    let shown = api.get(&format!("/v1/schedules/{id}")).await;
    assert_eq!(shown.body["task"]["call"], call, "{}", shown.body);
}

#[tokio::test]
async fn a_goals_images_are_checked_at_submission_and_kept() {
    use crate::images::tests::PIXEL_PNG;
    let api = Setup::examples().start().await;
    let with = |images: Value| json!({"goal": "x", "images": images});
    for images in [
        json!([{"url": "ftp://example.com/a.png"}]),
        json!([{"url": "data:image/png;base64,AAAA"}]),
        json!([{"media_type": "image/bmp", "data": PIXEL_PNG}]),
        json!([{"media_type": "image/jpeg", "data": PIXEL_PNG}]),
        json!([{"media_type": "image/png", "data": "%%%"}]),
        json!([{"media_type": "image/png"}]),
        json!([{"url": "https://example.com/a.png", "media_type": "image/png", "data": PIXEL_PNG}]),
        json!([{"path": "/etc/passwd"}]),
        json!(["https://example.com/a.png"]),
        json!(vec![json!({"url": "https://example.com/a.png"}); 9]),
    ] {
        api.refused(&with(images), Code::InvalidImages).await;
    }
    api.refused(
        &with(json!({"url": "https://example.com/a.png"})),
        Code::InvalidRequest,
    )
    .await;
    // A call task has no LLM to show them to.
    api.refused(
        &json!({"goal": "x", "call": {"tool": "calculator"},
                "images": [{"url": "https://example.com/a.png"}]}),
        Code::InvalidCall,
    )
    .await;

    let images = json!([{"url": "https://example.com/a.png"},
                        {"media_type": "image/png", "data": PIXEL_PNG}]);
    let answer = api
        .submit(&json!({"goal": "x", "run_at": "2100-01-01T00:00:00Z", "images": images}))
        .await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
    assert_eq!(answer.body["images"], images);
    let id = answer.body["id"].as_str().unwrap();
    assert_eq!(
        api.get(&format!("/v1/tasks/{id}")).await.body["images"],
        images
    );
    let plain = api
        .submit(&json!({"goal": "x", "run_at": "2100-01-01T00:00:00Z"}))
        .await;
    assert!(plain.body.get("images").is_none(), "{}", plain.body);
}

#[tokio::test]
async fn a_response_format_is_checked_at_submission_and_kept() {
    let api = Setup::examples().start().await;
    let schema = json!({
        "type": "object",
        "properties": {"answer": {"type": "integer"}},
        "required": ["answer"],
    });
    let with = |format: Value| json!({"goal": "x", "response_format": format});
    let long_name = "n".repeat(65);
    for format in [
        json!({"name": "", "schema": schema}),
        json!({"name": "has space", "schema": schema}),
        json!({"name": long_name, "schema": schema}),
        json!({"name": "calc", "schema": true}),
        json!({"name": "calc", "schema": "object"}),
        json!({"name": "calc", "schema": {"type": "objekt"}}),
        json!({"name": "calc", "schema": {"required": "answer"}}),
        json!({"name": "calc", "schema": {"$ref": "https://example.com/schema.json"}}),
        json!({"name": "calc", "schema": {"description": "x".repeat(64 * 1024)}}),
    ] {
        api.refused(&with(format), Code::InvalidResponseFormat)
            .await;
    }
    for format in [
        json!({"name": "calc"}),
        json!({"schema": schema}),
        json!({"name": "calc", "schema": schema, "strict": "yes"}),
        json!({"name": "calc", "schema": schema, "type": "json_schema"}),
        json!("calc"),
    ] {
        api.refused(&with(format), Code::InvalidRequest).await;
    }

    let answer = api
        .submit(&json!({
            "goal": "x",
            "run_at": "2100-01-01T00:00:00Z",
            "response_format": {"name": "calc", "schema": schema},
        }))
        .await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
    let kept = json!({"name": "calc", "schema": schema, "strict": false});
    assert_eq!(
        answer.body["response_format"], kept,
        "strict is false unless asked"
    );
    let id = answer.body["id"].as_str().unwrap();
    let shown = api.get(&format!("/v1/tasks/{id}")).await;
    assert_eq!(shown.body["response_format"], kept, "{}", shown.body);
    let strict = api
        .submit(&json!({
            "goal": "x",
            "run_at": "2100-01-01T00:00:00Z",
            "response_format": {"name": "calc", "schema": schema, "strict": true},
        }))
        .await;
    assert_eq!(strict.body["response_format"]["strict"], true);
    let plain = api
        .submit(&json!({"goal": "x", "run_at": "2100-01-01T00:00:00Z"}))
        .await;
    assert_eq!(plain.body["response_format"], Value::Null, "{}", plain.body);

    // A schedule's task is checked the same way, and each run gets it.
    let schedule = |format: Value| {
        json!({"cron": "0 9 * * *", "paused": true,
               "task": {"goal": "x", "response_format": format}})
        .to_string()
    };
    api.send(json_post(
        "/v1/schedules",
        &schedule(json!({"name": "calc", "schema": {"type": "objekt"}})),
    ))
    .await
    .is_error(Code::InvalidResponseFormat, "a schedule's bad format");
    let created = api
        .send(json_post(
            "/v1/schedules",
            &schedule(json!({"name": "calc", "schema": schema})),
        ))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    assert_eq!(created.body["task"]["response_format"], kept);
    let id = created.body["id"].as_str().unwrap();
    let shown = api.get(&format!("/v1/schedules/{id}")).await;
    assert_eq!(
        shown.body["task"]["response_format"], kept,
        "read back from the store: {}",
        shown.body
    );
}

#[tokio::test]
async fn a_cost_cap_on_a_model_with_no_price_is_refused_not_ignored() {
    // No prices at all: not even the scripted adapter's default one.
    let unpriced = crate::budgets::Budgets::new(
        &Default::default(),
        &crate::budgets::BudgetsConfig::default(),
    )
    .unwrap();
    assert!(unpriced.price("scripted", None).is_none());
    let api_unpriced = Setup {
        budgets: Some(unpriced),
        ..Setup::examples()
    }
    .start()
    .await;
    let answer = api_unpriced
        .submit(&json!({"goal": "x", "model": "m1", "budget": {"max_cost_usd": 1}}))
        .await;
    answer.is_error(Code::BudgetUnpriced, "a cost cap on an unpriced model");
    let message = answer.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("\"m1\"") && message.contains("[prices.scripted]"),
        "the message says which model lacks a price and where to add one: {message}"
    );
    let tokens_only = api_unpriced
        .submit(&json!({
            "goal": "x",
            "run_at": "2100-01-01T00:00:00Z",
            "budget": {"max_tokens": 100},
        }))
        .await;
    assert_eq!(
        tokens_only.status,
        StatusCode::CREATED,
        "a token cap needs no price: {}",
        tokens_only.body
    );
    assert_eq!(tokens_only.body["cost_usd"], json!(0.0));

    // A tenant's cost cap needs the price as much as a task's.
    let tenant_capped = Setup {
        budgets: Some(
            crate::budgets::Budgets::new(
                &Default::default(),
                &toml::from_str(
                    r#"
                    [default]
                    period = "month"
                    max_cost_usd = 5
                    "#,
                )
                .unwrap(),
            )
            .unwrap(),
        ),
        ..Setup::examples()
    }
    .start()
    .await;
    let answer = tenant_capped.submit(&json!({"goal": "x"})).await;
    answer.is_error(Code::BudgetUnpriced, "a tenant cost cap, unpriced model");
    assert!(
        answer.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tenant \"default\"'s cost budget"),
        "{}",
        answer.body
    );
}

#[tokio::test]
async fn usage_shows_the_tenants_period_caps_and_what_is_left() {
    let api = Setup::default().start().await;
    let answer = api.get("/v1/usage").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(answer.body["tenant"], "default");
    assert_eq!(
        answer.body["tracked"], false,
        "without a budget, nothing is counted per period"
    );
    assert_eq!(answer.body["tokens"], Value::Null);

    let api = Setup {
        budgets: Some(budgets_from(
            r#"
            [budgets.default]
            period = "month"
            max_tokens = 1000
            max_cost_usd = 2.5
            "#,
        )),
        ..Setup::default()
    }
    .start()
    .await;
    let month = crate::budgets::Period::Month.at(store::now_millis());
    let usage = api.get("/v1/usage").await.body;
    assert_eq!(usage["tracked"], true);
    assert_eq!(usage["period"], "month");
    assert_eq!(
        usage["period_start"],
        crate::rfc3339::format(month.start),
        "{usage}"
    );
    assert_eq!(usage["period_end"], crate::rfc3339::format(month.end));
    assert_eq!(
        (
            &usage["tokens"],
            &usage["cost_usd"],
            &usage["remaining_tokens"],
            &usage["remaining_cost_usd"]
        ),
        (&json!(0), &json!(0.0), &json!(1000), &json!(2.5))
    );
    assert_eq!(usage["max_cost_usd"], 2.5);
}
