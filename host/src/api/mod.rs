//! The REST API: validates requests, maps them to store and scheduler
//! commands, and renders tasks, steps and plugins as JSON.
//!
//! Every error is `{"error": {"code", "message"}}` with a stable code (see
//! `docs/api.md`); malformed requests are 4xx, never 500.

mod admission;
mod approvals;
pub mod auth;
pub mod connections;
mod error;
mod events;
pub mod hygiene;
mod memories;
pub mod openapi;
mod schedules;
pub mod scrape;
#[cfg(test)]
mod tests;
mod threads;
mod ui;
mod views;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Extension, FromRequest, FromRequestParts, State};
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value, json};
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use admission::{Admission, QueueLimits};
use auth::Tenant;
pub use connections::HttpLimits;
pub use error::ApiError;
use views::{Health, PluginsView, StatsView, TaskPage, TaskView, UsageView};

use crate::budgets::{Budgets, TaskBudget, usd_to_nanos};
use crate::errors::Code;
use crate::events::EventBus;
use crate::plugins::{Catalog, PluginKind, PluginRuntime};
use crate::protocol::{ResponseFormat, ToolCall};
use crate::scheduler::Scheduler;
use crate::store::{
    CancelOutcome, Millis, NewTask, STATS_COUNT_LIMIT, Store, TaskQuery, TaskRecord, TaskStatus,
};

/// The longest goal accepted, in bytes.
const MAX_GOAL_BYTES: usize = 64 * 1024;
/// The longest model name accepted, in bytes.
const MAX_MODEL_BYTES: usize = 256;
const MAX_STEPS_CEILING: i64 = 1000;
const MAX_RETRIES_CEILING: i64 = 100;
const MAX_TIMEOUT_SECS: i64 = 7 * 24 * 3600;
const PRIORITY_RANGE: std::ops::RangeInclusive<i64> = -1000..=1000;

/// What a task gets for whatever its request leaves out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskDefaults {
    pub planner: String,
    pub llm: String,
    pub model: Option<String>,
    /// Tool names; when unset, every loaded tool.
    pub tools: Option<Vec<String>>,
    pub max_steps: u32,
    /// Retries of steps that fail with a transient error, over a task.
    pub max_retries: u32,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

/// What every handler shares. A request clones it for each middleware and
/// extractor that takes it, so it is one reference count rather than one
/// per part: with a count per part, dropping those clones alone took about
/// 0.4–0.6 % of a server's CPU in profiles of the end-to-end benchmark.
#[derive(Clone)]
pub struct AppState(Arc<AppParts>);

impl From<AppParts> for AppState {
    fn from(parts: AppParts) -> Self {
        Self(Arc::new(parts))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppParts;

    fn deref(&self) -> &AppParts {
        &self.0
    }
}

/// The parts of [`AppState`].
pub struct AppParts {
    pub store: Arc<dyn Store>,
    pub runtime: Arc<PluginRuntime>,
    pub scheduler: Arc<Scheduler>,
    pub events: EventBus,
    pub defaults: Arc<TaskDefaults>,
    pub gate: Arc<auth::Gate>,
    pub admission: Arc<Admission>,
    /// `GET /metrics`, when metrics are on.
    pub scrape: Option<Arc<scrape::Scrape>>,
    /// Wakes this host's schedule loop (a schedule was created or resumed).
    pub schedule_wake: Arc<tokio::sync::Notify>,
    /// Prices and tenants' caps (shared with the scheduler, which holds
    /// the reservations).
    pub budgets: Arc<Budgets>,
    /// What each tenant may keep in long-term memory.
    pub memory: Arc<crate::memory::MemoryConfig>,
}

/// The whole API as one router. Every route but the event stream answers
/// within `limits.request_timeout`; every body must arrive within
/// `limits.body_read_timeout`.
pub fn app(state: AppState, max_body_bytes: usize, limits: &HttpLimits) -> Router {
    let (router, spec) = documented_routes(&state, limits).split_for_parts();
    let spec = Arc::new(Spec(
        serde_json::to_string(&spec).expect("the OpenAPI spec serializes"),
    ));
    // A page for people, not an API operation: not in the spec.
    let docs = utoipa_swagger_ui::SwaggerUi::new("/docs").config(
        utoipa_swagger_ui::Config::new(["/openapi.json"])
            // Swagger UI's default validator is a web service: no call out.
            .validator_url("none")
            .try_it_out_enabled(true),
    );
    router
        .merge(docs)
        .merge(ui::routes())
        .layer(Extension(spec))
        .fallback(|| async {
            ApiError::new(Code::RouteNotFound, "no such endpoint; see docs/api.md")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                Code::MethodNotAllowed,
                "this endpoint does not accept that method",
            )
        })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn_with_state(
            (Arc::new(limits.clone()), max_body_bytes),
            connections::read_body_in_time,
        ))
        .layer(middleware::map_response(hygiene::errors_as_json))
        .with_state(state)
}

/// Every API operation, each routed and described from one handler list:
/// a route added here is in the spec by construction. (`/mcp`, mounted in
/// `server.rs`, `/docs` and the dashboard's `/ui` are the only routes
/// outside it; the spec's tests check that.)
fn documented_routes(state: &AppState, limits: &HttpLimits) -> OpenApiRouter<AppState> {
    let limits = Arc::new(limits.clone());
    let answering = OpenApiRouter::new()
        .routes(routes!(list_plugins))
        .routes(routes!(create_task, list_tasks))
        .routes(routes!(get_task))
        .routes(routes!(cancel_task))
        .routes(routes!(approvals::list_approvals))
        .routes(routes!(approvals::decide_approval))
        .routes(routes!(task_stats))
        .routes(routes!(
            schedules::create_schedule,
            schedules::list_schedules
        ))
        .routes(routes!(schedules::get_schedule, schedules::delete_schedule))
        .routes(routes!(schedules::pause_schedule))
        .routes(routes!(schedules::resume_schedule))
        .routes(routes!(threads::get_thread, threads::delete_thread))
        .routes(routes!(memories::list_memories, memories::create_memory))
        .routes(routes!(memories::get_memory, memories::delete_memory))
        .routes(routes!(usage))
        .route_layer(middleware::from_fn_with_state(
            limits.clone(),
            connections::answer_in_time,
        ));
    let authenticated = OpenApiRouter::new()
        .routes(routes!(events::task_events))
        .merge(answering)
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    // Open to all, or (`/metrics`) behind a token of its own.
    let mut open = OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(openapi_json));
    if state.scrape.is_some() {
        open = open.routes(routes!(scrape::metrics));
    }
    let open = open.route_layer(middleware::from_fn_with_state(
        limits,
        connections::answer_in_time,
    ));
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(open)
        .merge(authenticated)
}

/// The spec as served: serialized once.
struct Spec(String);

/// The OpenAPI 3.1 description of this API.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses(
        (status = 200, description = "This document", content_type = "application/json", body = Object),
        openapi::SpecErrors,
    ),
)]
async fn openapi_json(Extension(spec): Extension<Arc<Spec>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], spec.0.clone())
}

/// A reference to a plugin that is not loaded: `422 code`, or, while
/// plugins are still loading, `503 plugins_loading` with `Retry-After`,
/// since the plugin may be among them.
fn not_loaded(catalog: &Catalog, code: Code, message: String) -> ApiError {
    let loading = catalog.loading().len();
    if loading == 0 {
        return ApiError::new(code, message);
    }
    ApiError::new(
        Code::PluginsLoading,
        format!("{message}; {loading} plugin file(s) are still loading: try again shortly"),
    )
    .with_retry_after(Duration::from_secs(1))
}

/// `axum::Json`, with rejections in the API's error shape.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
struct ApiJson<T>(T);

/// `axum::extract::Path`, with rejections in the API's error shape: a
/// segment that is not UTF-8 once percent-decoded is `400 invalid_path`.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
struct ApiPath<T>(T);

/// `axum::extract::Query`, with rejections in the API's error shape.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
struct ApiQuery<T>(T);

/// Answers once the server listens (the store is open; plugins load in
/// the background).
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, body = Health), openapi::HealthErrors),
)]
async fn healthz(State(state): State<AppState>) -> Json<Health> {
    let catalog = state.runtime.catalog();
    Json(Health {
        status: "ok",
        store: state.store.engine(),
        plugins: catalog.plugins().count(),
        loading: catalog.loading().len(),
    })
}

/// The loaded plugins with their tools, grants and limits; the files that
/// failed to load or are still loading; the configured MCP servers.
#[utoipa::path(
    get,
    path = "/v1/plugins",
    tag = "plugins",
    security(("api_token" = [])),
    responses((status = 200, body = PluginsView), openapi::ListPluginsErrors),
)]
async fn list_plugins(State(state): State<AppState>) -> Json<PluginsView> {
    Json(PluginsView::new(&state.runtime))
}

/// A task to submit. Only `goal` is required; the rest default to the
/// server's configuration. A field out of range is refused with its own
/// `422` code (see docs/api.md), a field of the wrong JSON type with `400
/// invalid_request`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateTask {
    /// What to do: 1 byte to 64 KiB once trimmed, no NUL.
    #[schema(min_length = 1, example = "What is (2+3)*4?")]
    goal: String,
    /// A loaded planner plugin's name.
    #[schema(example = "react")]
    planner: Option<String>,
    /// A loaded llm-adapter plugin's name.
    #[schema(example = "scripted")]
    llm: Option<String>,
    /// The model the adapter asks for: 1 to 256 bytes, no NUL.
    #[schema(min_length = 1)]
    model: Option<String>,
    /// Tool names; default: the server's configured list, else every loaded tool.
    tools: Option<Vec<String>>,
    /// `{"planner": {...}, "llm": {...}}`: an object of objects, handed to the
    /// plugins. `options.planner.max_steps` (1 to 1000) lowers the step limit.
    #[schema(value_type = Option<HashMap<String, Object>>)]
    options: Option<Value>,
    // Numbers are read as any JSON number and range-checked here, so one
    // out of range is refused with the field's own code, however large.
    /// Steps the task may take.
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 1000)]
    max_steps: Option<Number>,
    /// Retries of steps that fail with a transient error, over the task.
    #[schema(value_type = Option<i64>, minimum = 0, maximum = 100)]
    max_retries: Option<Number>,
    /// The task's time limit, in seconds (at most 7 days).
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 604800)]
    timeout_secs: Option<Number>,
    /// Higher runs first; default 0.
    #[schema(value_type = Option<i64>, minimum = -1000, maximum = 1000)]
    priority: Option<Number>,
    /// Not before this time (RFC 3339, after 1970).
    #[schema(format = DateTime)]
    run_at: Option<String>,
    /// Fail with `deadline_exceeded` unless finished by this time (RFC 3339,
    /// after `run_at`).
    #[schema(format = DateTime)]
    deadline: Option<String>,
    /// Caps on the task's LLM use, checked before each LLM call: a call
    /// whose worst case would pass one is not made, and the task fails
    /// with `budget_exceeded`.
    budget: Option<BudgetRequest>,
    /// The conversation thread the task continues: a client-chosen id (1
    /// to 128 ASCII letters, digits, `-`, `_`, `.`, `:`), this tenant's
    /// own. The task's planner sees the thread's earlier tasks, and the
    /// thread's tasks run one at a time, in the order they were submitted.
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = "^[A-Za-z0-9._:-]+$",
        example = "chat-42"
    )]
    thread: Option<String>,
    /// The long-term memory namespace the task's plugins remember in and
    /// recall from (1 to 64 ASCII letters, digits, `-`, `_`, `.`, `:`),
    /// within this tenant's memories; `default` when absent.
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = "^[A-Za-z0-9._:-]+$",
        example = "user-42"
    )]
    memory_namespace: Option<String>,
    /// Asks for structured output: the answer must be JSON matching this
    /// JSON Schema, or the task fails with `answer_schema_mismatch` (the
    /// answer kept as its `result`). Passed to the LLM with each call the
    /// planner makes without a format of its own.
    response_format: Option<ResponseFormatRequest>,
    /// Images that go with the goal, for the model to see: each an address
    /// the provider fetches (`{"url": "https://..."}`) or inline bytes
    /// (`{"media_type": "image/png", "data": <base64>}`: PNG, JPEG, WebP or
    /// GIF, at most 5 MiB each). At most 8. They count against the
    /// server's request size limit (`max_body_bytes`, 1 MiB by default).
    #[schema(value_type = Option<Vec<Object>>, max_items = 8)]
    images: Option<Vec<Value>>,
    /// Makes this a call task: one call of one tool, with no planner or LLM.
    /// Its result is the tool's output (as JSON text) and it fails with the
    /// tool's error; `tools` defaults to the one tool, and `max_steps` to 1.
    /// `planner`, `llm`, `model`, `options`, `thread`, `budget`,
    /// `response_format` and `images` are for agent tasks and are refused
    /// with it.
    call: Option<CallRequest>,
}

/// The one tool call of a call task.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CallRequest {
    /// A loaded tool's name.
    #[schema(example = "calculator")]
    tool: String,
    /// The tool's input, an object; `{}` when absent. It is checked against
    /// the tool's input schema when the call runs (`invalid_tool_input`).
    #[schema(value_type = Option<Object>)]
    arguments: Option<Map<String, Value>>,
}

/// A JSON Schema the task's answer must match.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ResponseFormatRequest {
    /// The schema's name, as providers want one: 1 to 64 ASCII letters,
    /// digits, `_` or `-`.
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = "^[a-zA-Z0-9_-]+$",
        example = "answer"
    )]
    name: String,
    /// A JSON Schema (draft 2020-12 unless its `$schema` says otherwise; local
    /// `$ref`s only), as a JSON object of at most 64 KiB.
    #[schema(value_type = Object)]
    schema: Value,
    /// Whether the provider should enforce the schema strictly (OpenAI's
    /// strict mode, which wants every object closed and every property
    /// required); default false. The answer is checked either way.
    strict: Option<bool>,
}

/// A task's caps; either or both.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct BudgetRequest {
    /// Input plus output tokens over the task's LLM calls.
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 1e12)]
    max_tokens: Option<Number>,
    /// US dollars over the task's LLM calls, at the configured prices; the
    /// task's model must have one (`budget_unpriced`).
    #[schema(value_type = Option<f64>, minimum = 0, maximum = 1000000)]
    max_cost_usd: Option<Number>,
}

/// The most tokens a task's cap may name.
const MAX_BUDGET_TOKENS: i64 = 1_000_000_000_000;

/// The longest `Idempotency-Key` accepted.
const MAX_IDEMPOTENCY_KEY: usize = 255;

/// Submits a task; it runs in the background. With an `Idempotency-Key`, a
/// repeat returns the task the first request created. With `Prefer:
/// wait=N`, the answer waits up to N seconds for the task to finish.
#[utoipa::path(
    post,
    path = "/v1/tasks",
    tag = "tasks",
    security(("api_token" = [])),
    request_body = CreateTask,
    params(
        ("Idempotency-Key" = Option<String>, Header, max_length = 255, min_length = 1,
            description = "1 to 255 visible ASCII characters; a repeat with the same key \
                returns the first task (200) instead of creating another"),
        ("Prefer" = Option<String>, Header,
            description = "`wait=N` (RFC 7240): answer once the task has finished, or \
                after N seconds (at most 60) with the task as it is then; without it, or \
                with a preference the server does not apply, the answer comes at once"),
    ),
    responses(
        (status = 201, description = "Created", body = TaskView,
            headers(
                ("Location" = String, description = "The task's URL"),
                ("Preference-Applied" = Option<String>,
                    description = "`wait=N`: the seconds the answer waited for at most"),
            )),
        (status = 200, description = "A repeat of an earlier request with the same \
            Idempotency-Key: its task", body = TaskView,
            headers(
                ("Location" = String, description = "The task's URL"),
                ("Preference-Applied" = Option<String>,
                    description = "`wait=N`: the seconds the answer waited for at most"),
            )),
        openapi::CreateTaskErrors,
    ),
)]
async fn create_task(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    answer_by: Option<Extension<connections::AnswerBy>>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<CreateTask>,
) -> Result<Response, ApiError> {
    let idempotency_key = match headers.get("idempotency-key") {
        None => None,
        Some(value) => {
            let key = value.to_str().ok().map(str::trim).unwrap_or_default();
            if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY {
                return Err(ApiError::new(
                    Code::InvalidIdempotencyKey,
                    format!(
                        "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"
                    ),
                ));
            }
            Some(key.to_owned())
        }
    };
    let task = validate(&state, request, tenant.0.clone(), idempotency_key)?;
    if let Some(cap) = state.gate.max_active_tasks()
        && state.store.count_active(&tenant.0).await? >= cap
    {
        return Err(ApiError::new(
            Code::TooManyActiveTasks,
            format!(
                "this tenant already has {cap} queued or running tasks; wait for some to finish"
            ),
        ));
    }
    let reservation = state
        .admission
        .reserve(state.store.as_ref(), &tenant.0)
        .await?;
    let created = state.store.create_task(task).await;
    let (record, event) = match created {
        Ok(created) => created,
        Err(error) => {
            state.admission.release(reservation).await;
            return Err(error.into());
        }
    };
    let wait_secs = preferred_wait(&headers);
    // Listening before the scheduler is woken. The task could only end
    // before this on another host: the wait's reads of the store find it.
    let finished = wait_secs.map(|_| state.events.task_finished(&record.id));
    let status = match event {
        Some(event) => {
            metrics::counter!(crate::metrics::TASKS_SUBMITTED, "tenant" => tenant.0.clone())
                .increment(1);
            state.events.journaled(event);
            state.scheduler.wake();
            StatusCode::CREATED
        }
        // The idempotency key named an existing task: the same answer again.
        None => {
            state.admission.release(reservation).await;
            StatusCode::OK
        }
    };
    let location = format!("/v1/tasks/{}", record.id);
    let Some((wait_secs, finished)) = wait_secs.zip(finished) else {
        return Ok((
            status,
            [(header::LOCATION, location)],
            Json(TaskView::new(record, None)),
        )
            .into_response());
    };
    let until = wait_window(wait_secs, answer_by);
    let record = wait_for_end(&state, &tenant, record, finished, until).await?;
    Ok((
        status,
        [
            (header::LOCATION, location),
            (
                HeaderName::from_static("preference-applied"),
                format!("wait={wait_secs}"),
            ),
        ],
        Json(TaskView::new(record, None)),
    )
        .into_response())
}

/// The `wait` preference of a request's `Prefer` headers (RFC 7240), in
/// seconds, at most [`MAX_WAIT_SECS`]. As the RFC asks, a preference the
/// server cannot read is ignored rather than refused: `None`, as for none.
fn preferred_wait(headers: &HeaderMap) -> Option<u32> {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .find_map(|preference| {
            // `wait=N`, perhaps with parameters after a `;`.
            let token = preference.split(';').next()?;
            let (name, value) = token.split_once('=')?;
            if !name.trim().eq_ignore_ascii_case("wait") {
                return None;
            }
            value.trim().trim_matches('"').parse::<u64>().ok()
        })
        .map(|secs| secs.min(MAX_WAIT_SECS.into()) as u32)
        .filter(|&secs| secs > 0)
}

fn parse_time(field: &str, text: Option<&str>) -> Result<Option<Millis>, ApiError> {
    let Some(text) = text else { return Ok(None) };
    crate::rfc3339::parse(text).map(Some).ok_or_else(|| {
        ApiError::new(
            Code::InvalidTime,
            format!(
                "{field} must be an RFC 3339 time after 1970, such as 2026-01-31T12:00:00Z or \
                 2026-01-31T13:00:00+01:00"
            ),
        )
    })
}

/// `number` if it is a whole number in `range`; else `code`, whatever its
/// size or kind.
fn integer_in(
    field: &str,
    number: Option<&Number>,
    range: std::ops::RangeInclusive<i64>,
    code: Code,
) -> Result<Option<i64>, ApiError> {
    let Some(number) = number else {
        return Ok(None);
    };
    match number.as_i64() {
        Some(value) if range.contains(&value) => Ok(Some(value)),
        _ => Err(ApiError::new(
            code,
            format!(
                "{field} must be a whole number from {} to {}, not {number}",
                range.start(),
                range.end()
            ),
        )),
    }
}

/// Checks what the request says by itself, then applies defaults and
/// checks every reference against what is loaded.
fn validate(
    state: &AppState,
    request: CreateTask,
    tenant: String,
    idempotency_key: Option<String>,
) -> Result<NewTask, ApiError> {
    let goal = request.goal.trim();
    if goal.is_empty() {
        return Err(ApiError::new(Code::InvalidGoal, "the goal is empty"));
    }
    if goal.contains('\0') {
        return Err(ApiError::new(
            Code::InvalidGoal,
            "the goal contains a NUL character",
        ));
    }
    if goal.len() > MAX_GOAL_BYTES {
        return Err(ApiError::new(
            Code::InvalidGoal,
            format!("the goal is longer than {MAX_GOAL_BYTES} bytes"),
        ));
    }
    if let Some(model) = &request.model
        && (model.is_empty() || model.len() > MAX_MODEL_BYTES || model.contains('\0'))
    {
        return Err(ApiError::new(
            Code::InvalidModel,
            format!("model must be 1 to {MAX_MODEL_BYTES} bytes, without NUL characters"),
        ));
    }
    if request.call.is_some() {
        check_call_fields(&request)?;
    }
    let options = request.options.unwrap_or_else(|| json!({}));
    check_options(&options)?;
    let defaults = &state.defaults;
    // A call task takes one step unless asked for more (it never needs more).
    let default_max_steps = match request.call {
        Some(_) => 1,
        None => defaults.max_steps,
    };
    let max_steps = integer_in(
        "max_steps",
        request.max_steps.as_ref(),
        1..=MAX_STEPS_CEILING,
        Code::InvalidMaxSteps,
    )?
    .map_or(default_max_steps, |n| n as u32);
    let max_retries = integer_in(
        "max_retries",
        request.max_retries.as_ref(),
        0..=MAX_RETRIES_CEILING,
        Code::InvalidMaxRetries,
    )?
    .map_or(defaults.max_retries, |n| n as u32);
    let timeout = integer_in(
        "timeout_secs",
        request.timeout_secs.as_ref(),
        1..=MAX_TIMEOUT_SECS,
        Code::InvalidTimeout,
    )?
    .map_or(defaults.timeout, |secs| Duration::from_secs(secs as u64));
    let priority = integer_in(
        "priority",
        request.priority.as_ref(),
        PRIORITY_RANGE,
        Code::InvalidPriority,
    )?
    .unwrap_or(0) as i32;
    let run_at = parse_time("run_at", request.run_at.as_deref())?;
    let deadline_at = parse_time("deadline", request.deadline.as_deref())?;
    if let (Some(run_at), Some(deadline)) = (run_at, deadline_at)
        && deadline <= run_at
    {
        return Err(ApiError::new(
            Code::InvalidTime,
            "deadline must be after run_at: the task could never finish in time",
        ));
    }

    let budget = check_budget(request.budget.as_ref())?;
    if let Some(message) = request
        .thread
        .as_deref()
        .and_then(crate::threads::invalid_thread_id)
    {
        return Err(ApiError::new(Code::InvalidThread, message));
    }
    if let Some(message) = request
        .memory_namespace
        .as_deref()
        .and_then(crate::memory::invalid_namespace)
    {
        return Err(ApiError::new(Code::InvalidMemoryNamespace, message));
    }
    let response_format = match request.response_format {
        Some(format) => {
            let format = ResponseFormat {
                name: format.name,
                schema: format.schema,
                strict: format.strict.unwrap_or(false),
            };
            crate::structured::check_format(&format)
                .map_err(|message| ApiError::new(Code::InvalidResponseFormat, message))?;
            Some(format)
        }
        None => None,
    };
    let images = crate::images::goal_images(request.images.as_deref().unwrap_or_default())
        .map_err(|message| ApiError::new(Code::InvalidImages, message))?;

    let catalog = state.runtime.catalog();
    // A call task has no planner or LLM; an agent task has both.
    let (planner, llm, model, tools, call) = match request.call {
        Some(call) => {
            let tools = request.tools.unwrap_or_else(|| vec![call.tool.clone()]);
            if !tools.contains(&call.tool) {
                return Err(ApiError::new(
                    Code::InvalidCall,
                    format!(
                        "tools leaves out {:?}, the tool the call makes; add it or leave tools out",
                        call.tool
                    ),
                ));
            }
            check_tools_loaded(&catalog, &tools)?;
            let call = ToolCall {
                id: "call_1".to_owned(),
                name: call.tool,
                arguments: Value::Object(call.arguments.unwrap_or_default()),
            };
            (String::new(), String::new(), None, tools, Some(call))
        }
        None => {
            let planner = request.planner.unwrap_or_else(|| defaults.planner.clone());
            if catalog.kind_of(&planner) != Some(PluginKind::Planner) {
                return Err(not_loaded(
                    &catalog,
                    Code::UnknownPlanner,
                    format!(
                        "no planner plugin named {planner:?} is loaded; GET /v1/plugins lists them"
                    ),
                ));
            }
            let llm = request.llm.unwrap_or_else(|| defaults.llm.clone());
            if catalog.kind_of(&llm) != Some(PluginKind::LlmAdapter) {
                return Err(not_loaded(
                    &catalog,
                    Code::UnknownLlm,
                    format!(
                        "no llm-adapter plugin named {llm:?} is loaded; GET /v1/plugins lists them"
                    ),
                ));
            }
            let tools = match request.tools.or_else(|| defaults.tools.clone()) {
                Some(tools) => tools,
                None => catalog.tool_names().map(str::to_owned).collect(),
            };
            check_tools_loaded(&catalog, &tools)?;
            let model = request.model.or_else(|| defaults.model.clone());
            check_priced(state, &tenant, &budget, &llm, model.as_deref())?;
            (planner, llm, model, tools, None)
        }
    };
    Ok(NewTask {
        tenant,
        idempotency_key,
        priority,
        run_at,
        deadline_at,
        goal: goal.to_owned(),
        planner,
        llm,
        model,
        tools,
        options,
        max_steps,
        max_retries,
        timeout,
        trace_parent: crate::telemetry::current_traceparent(),
        schedule: None,
        budget,
        thread: request.thread,
        memory_namespace: request.memory_namespace,
        response_format,
        call,
        images,
    })
}

/// Refuses, in a call task, what only an agent task takes.
fn check_call_fields(request: &CreateTask) -> Result<(), ApiError> {
    let agent_only: Vec<&str> = [
        ("planner", request.planner.is_some()),
        ("llm", request.llm.is_some()),
        ("model", request.model.is_some()),
        ("options", request.options.is_some()),
        ("thread", request.thread.is_some()),
        ("budget", request.budget.is_some()),
        ("response_format", request.response_format.is_some()),
        ("images", request.images.is_some()),
    ]
    .into_iter()
    .filter_map(|(field, given)| given.then_some(field))
    .collect();
    if agent_only.is_empty() {
        return Ok(());
    }
    Err(ApiError::new(
        Code::InvalidCall,
        format!(
            "a call task makes one tool call with no planner or LLM; {} {} for agent tasks: \
             drop {} or drop call",
            agent_only.join(", "),
            if agent_only.len() == 1 { "is" } else { "are" },
            if agent_only.len() == 1 { "it" } else { "them" },
        ),
    ))
}

/// Refuses tools that no loaded plugin or MCP server offers.
fn check_tools_loaded(catalog: &Catalog, tools: &[String]) -> Result<(), ApiError> {
    match tools.iter().find(|tool| catalog.tool_spec(tool).is_none()) {
        Some(unknown) => Err(not_loaded(
            catalog,
            Code::UnknownTool,
            format!("no loaded plugin offers a tool named {unknown:?}; GET /v1/plugins lists them"),
        )),
        None => Ok(()),
    }
}

/// The caps a request names, in range.
fn check_budget(request: Option<&BudgetRequest>) -> Result<TaskBudget, ApiError> {
    let Some(request) = request else {
        return Ok(TaskBudget::default());
    };
    let max_tokens = integer_in(
        "budget.max_tokens",
        request.max_tokens.as_ref(),
        1..=MAX_BUDGET_TOKENS,
        Code::InvalidBudget,
    )?
    .map(|n| n as u64);
    let max_cost_nanos = match &request.max_cost_usd {
        None => None,
        Some(number) => Some(number.as_f64().and_then(usd_to_nanos).ok_or_else(|| {
            ApiError::new(
                Code::InvalidBudget,
                format!("budget.max_cost_usd must be a number of dollars from 0 to 1000000, not {number}"),
            )
        })?),
    };
    Ok(TaskBudget {
        max_tokens,
        max_cost_nanos,
    })
}

/// A cost cap, the task's or its tenant's, needs the task's model to have
/// a price: one that cannot be enforced is refused, not ignored.
fn check_priced(
    state: &AppState,
    tenant: &str,
    budget: &TaskBudget,
    llm: &str,
    model: Option<&str>,
) -> Result<(), ApiError> {
    let tenant_cost_cap = state
        .budgets
        .tenant_cap(tenant)
        .is_some_and(|cap| cap.max_cost_nanos.is_some());
    if (budget.max_cost_nanos.is_none() && !tenant_cost_cap)
        || state.budgets.price(llm, model).is_some()
    {
        return Ok(());
    }
    let whose = if budget.max_cost_nanos.is_some() {
        "budget.max_cost_usd".to_owned()
    } else {
        format!("tenant {tenant:?}'s cost budget")
    };
    let model = model.map_or_else(|| "\"*\" (no model named)".to_owned(), |m| format!("{m:?}"));
    Err(ApiError::new(
        Code::BudgetUnpriced,
        format!(
            "{whose} cannot be enforced: the configuration has no price for model {model} of \
             the {llm:?} adapter; add [prices.{llm}] to the server's configuration, or submit \
             without a cost cap"
        ),
    ))
}

/// `options` is an object of objects (`{"planner": {...}, "llm": {...}}`),
/// and `options.planner.max_steps`, the one option the host documents for
/// every planner (it lowers the task's step limit), is in range.
fn check_options(options: &Value) -> Result<(), ApiError> {
    let sections_are_objects = options
        .as_object()
        .is_some_and(|o| o.values().all(Value::is_object));
    if !sections_are_objects {
        return Err(ApiError::new(
            Code::InvalidOptions,
            "options must be an object of objects, such as {\"planner\": {...}, \"llm\": {...}}",
        ));
    }
    if let Some(max_steps) = options.pointer("/planner/max_steps") {
        let in_range = max_steps
            .as_i64()
            .is_some_and(|n| (1..=MAX_STEPS_CEILING).contains(&n));
        if !in_range {
            return Err(ApiError::new(
                Code::InvalidOptions,
                format!(
                    "options.planner.max_steps must be a whole number from 1 to \
                     {MAX_STEPS_CEILING}, not {max_steps}"
                ),
            ));
        }
    }
    Ok(())
}

/// `GET /v1/tasks`'s query; any other parameter is `400 invalid_query`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListTasks {
    /// Only tasks with this status.
    #[param(value_type = Option<crate::store::TaskStatus>)]
    status: Option<String>,
    /// Tasks per page; default 50.
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
    /// Only tasks that use this plugin: as planner, LLM adapter or tool.
    #[param(max_length = 256)]
    plugin: Option<String>,
    /// Only tasks whose goal contains this text, ignoring case (ASCII
    /// letters only on SQLite).
    #[param(max_length = 256)]
    q: Option<String>,
    /// Only the runs of this schedule (its id).
    #[param(max_length = 256)]
    schedule: Option<String>,
    /// Only the tasks of this thread.
    #[param(max_length = 256)]
    thread: Option<String>,
    /// The `next_cursor` of the page before.
    cursor: Option<String>,
}

/// The page a list request asks for: `limit` items (50 unless given, 1 to
/// 500) before `cursor` (the `next_cursor` of the page before, an id).
struct PageAsked {
    limit: u32,
    before: Option<String>,
}

impl PageAsked {
    fn from_query(limit: Option<u32>, cursor: Option<String>) -> Result<Self, ApiError> {
        let limit = limit.unwrap_or(50);
        if !(1..=500).contains(&limit) {
            return Err(ApiError::new(
                Code::InvalidQuery,
                "limit must be between 1 and 500",
            ));
        }
        if let Some(cursor) = &cursor
            && uuid::Uuid::try_parse(cursor).is_err()
        {
            return Err(ApiError::new(
                Code::InvalidQuery,
                "cursor must be a next_cursor from an earlier page",
            ));
        }
        Ok(Self {
            limit,
            before: cursor,
        })
    }
}

/// The longest `plugin` or `q` filter accepted, in bytes.
const MAX_FILTER_BYTES: usize = 256;

/// A text filter of the list: absent when empty (as a form sends an
/// unfilled field), refused when too long or holding a NUL.
fn text_filter(name: &str, value: Option<String>) -> Result<Option<String>, ApiError> {
    match value {
        Some(text) if text.len() > MAX_FILTER_BYTES || text.contains('\0') => Err(ApiError::new(
            Code::InvalidQuery,
            format!("{name} must be at most {MAX_FILTER_BYTES} bytes, without NUL characters"),
        )),
        Some(text) if text.is_empty() => Ok(None),
        other => Ok(other),
    }
}

/// The tenant's tasks, newest first, a page at a time; `status`, `plugin`
/// and `q` narrow the list, and combine.
#[utoipa::path(
    get,
    path = "/v1/tasks",
    tag = "tasks",
    security(("api_token" = [])),
    params(ListTasks),
    responses((status = 200, body = TaskPage), openapi::ListTasksErrors),
)]
async fn list_tasks(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ApiQuery(query): ApiQuery<ListTasks>,
) -> Result<Json<TaskPage>, ApiError> {
    let status = match query.status.as_deref() {
        None => None,
        Some(s) => Some(TaskStatus::parse(s).ok_or_else(|| {
            ApiError::new(
                Code::InvalidQuery,
                format!(
                    "unknown status {s:?}: use queued, running, waiting_approval, succeeded, failed or cancelled"
                ),
            )
        })?),
    };
    let asked = PageAsked::from_query(query.limit, query.cursor)?;
    let plugin = text_filter("plugin", query.plugin)?;
    let goal_contains = text_filter("q", query.q)?;
    let schedule = text_filter("schedule", query.schedule)?;
    let thread = text_filter("thread", query.thread)?;
    let page = state
        .store
        .list_tasks(&TaskQuery {
            tenant: Some(tenant.0),
            status,
            plugin,
            goal_contains,
            schedule,
            thread,
            before: asked.before,
            limit: asked.limit,
        })
        .await?;
    Ok(Json(TaskPage {
        tasks: page
            .tasks
            .into_iter()
            .map(|t| TaskView::new(t, None))
            .collect(),
        next_cursor: page.next_cursor,
    }))
}

/// The tenant's tasks at a glance: how many are in each status, how long
/// the oldest runnable queued one has waited, and how many finished in
/// each of the last 60 minutes, by outcome. Each count stops at
/// `count_limit`, so the answer costs the same however many tasks there are.
#[utoipa::path(
    get,
    path = "/v1/stats",
    tag = "tasks",
    security(("api_token" = [])),
    responses((status = 200, body = StatsView), openapi::StatsErrors),
)]
async fn task_stats(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
) -> Result<Json<StatsView>, ApiError> {
    let now = crate::store::now_millis();
    let first_minute = crate::store::minute_of(now) - (views::STATS_MINUTES - 1) * 60_000;
    let stats = state
        .store
        .task_stats(&tenant.0, first_minute, now, STATS_COUNT_LIMIT)
        .await?;
    Ok(Json(StatsView::new(
        stats,
        now,
        first_minute,
        STATS_COUNT_LIMIT,
    )))
}

/// What the tenant spent in the current period of its budget (UTC days or
/// months), its caps and what is left. A tenant without a budget has no
/// usage counted per period: `tracked` is false.
#[utoipa::path(
    get,
    path = "/v1/usage",
    tag = "tasks",
    security(("api_token" = [])),
    responses((status = 200, body = UsageView), openapi::UsageErrors),
)]
async fn usage(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
) -> Result<Json<UsageView>, ApiError> {
    let Some(cap) = state.budgets.tenant_cap(&tenant.0) else {
        return Ok(Json(UsageView::untracked(tenant.0)));
    };
    let span = cap.period.at(crate::store::now_millis());
    let used = state.store.period_usage(&tenant.0, &span.key).await?;
    let reserved = state.budgets.reserved(&tenant.0, &span.key);
    Ok(Json(UsageView::new(tenant.0, &cap, &span, used, reserved)))
}

/// When a request that asked to wait `secs` for its task must stop waiting:
/// after `secs`, and in time to answer within `http.request_timeout`.
fn wait_window(
    secs: u32,
    answer_by: Option<Extension<connections::AnswerBy>>,
) -> tokio::time::Instant {
    let wait_until = tokio::time::Instant::now() + Duration::from_secs(secs.into());
    match answer_by {
        Some(Extension(connections::AnswerBy(answer_by))) => wait_until.min(
            answer_by
                .checked_sub(WAIT_ANSWER_MARGIN)
                .unwrap_or(answer_by),
        ),
        None => wait_until,
    }
}

/// `task` once it has finished, or as it is at `until` or when the host
/// starts shutting down. Its end is heard
/// from `finished` when it ends on this host, else at the next of the reads
/// of the store made every [`WAIT_STORE_POLL`] (which also cover an end
/// before `finished` listened).
async fn wait_for_end(
    state: &AppState,
    tenant: &Tenant,
    mut task: TaskRecord,
    mut finished: crate::events::TaskFinished,
    until: tokio::time::Instant,
) -> Result<TaskRecord, ApiError> {
    while !task.status.is_terminal() && tokio::time::Instant::now() < until {
        let next_read = (tokio::time::Instant::now() + WAIT_STORE_POLL).min(until);
        let stopping = tokio::select! {
            ended = finished.wait() => ended == crate::events::WaitEnded::HostStopping,
            () = tokio::time::sleep_until(next_read) => false,
        };
        task = owned_task(state, tenant, &task.id).await?;
        // The host is shutting down: the task as it is, rather than an
        // answer cut off at the end of the drain.
        if stopping {
            break;
        }
    }
    Ok(task)
}

/// The task, if it exists and belongs to the tenant.
pub(crate) async fn owned_task(
    state: &AppState,
    tenant: &Tenant,
    id: &str,
) -> Result<TaskRecord, ApiError> {
    let task = state
        .store
        .get_task(id)
        .await?
        .ok_or_else(|| ApiError::task_not_found(id))?;
    if task.tenant != tenant.0 {
        return Err(ApiError::new(
            Code::Forbidden,
            format!("task {id} belongs to another tenant"),
        ));
    }
    Ok(task)
}

/// `GET /v1/tasks/{id}`'s query; any other parameter is `400 invalid_query`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct GetTask {
    /// Wait up to this many seconds for the task to finish (succeed, fail
    /// or be cancelled) before answering; the answer is the task as it is
    /// then, finished or not. 0 (the default) answers at once.
    #[param(minimum = 0, maximum = 60)]
    wait_secs: Option<u32>,
}

/// The longest a `GET /v1/tasks/{id}` may wait for its task to finish.
const MAX_WAIT_SECS: u32 = 60;

/// How long before `http.request_timeout` a waiting `GET /v1/tasks/{id}`
/// stops waiting, to read the task and answer.
const WAIT_ANSWER_MARGIN: Duration = Duration::from_millis(500);

/// How often a waiting `GET /v1/tasks/{id}` reads the store, for a task
/// that ends on another host (this host's own are heard of at once).
const WAIT_STORE_POLL: Duration = Duration::from_secs(1);

/// The task with every step; with `wait_secs`, once it has finished or the
/// wait is over.
#[utoipa::path(
    get,
    path = "/v1/tasks/{id}",
    tag = "tasks",
    security(("api_token" = [])),
    params(
        ("id" = String, Path, min_length = 1, description = "The task's id"),
        GetTask,
    ),
    responses((status = 200, body = TaskView), openapi::GetTaskErrors),
)]
async fn get_task(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<GetTask>,
    answer_by: Option<Extension<connections::AnswerBy>>,
) -> Result<Json<TaskView>, ApiError> {
    let wait_secs = query.wait_secs.unwrap_or(0);
    if wait_secs > MAX_WAIT_SECS {
        return Err(ApiError::new(
            Code::InvalidQuery,
            format!("wait_secs must be between 0 and {MAX_WAIT_SECS}"),
        ));
    }
    let task = if wait_secs == 0 {
        owned_task(&state, &tenant, &id).await?
    } else {
        // Listening before the first read: an end in between is heard.
        let finished = state.events.task_finished(&id);
        let task = owned_task(&state, &tenant, &id).await?;
        let wait = wait_window(wait_secs, answer_by);
        wait_for_end(&state, &tenant, task, finished, wait).await?
    };
    let steps = state.store.steps(&id).await?;
    Ok(Json(TaskView::new(task, Some(steps))))
}

/// Cancels a task: a queued one at once (200), a running one at its next
/// step boundary (202).
#[utoipa::path(
    post,
    path = "/v1/tasks/{id}/cancel",
    tag = "tasks",
    security(("api_token" = [])),
    params(("id" = String, Path, min_length = 1, description = "The task's id")),
    responses(
        (status = 200, description = "Cancelled", body = TaskView),
        (status = 202, description = "Cancellation requested: the task stops at its next \
            step boundary", body = TaskView),
        openapi::CancelTaskErrors,
    ),
)]
async fn cancel_task(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ApiPath(id): ApiPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    owned_task(&state, &tenant, &id).await?;
    match state.store.request_cancel(&id).await? {
        CancelOutcome::Cancelled(task, event) => {
            metrics::counter!(
                crate::metrics::TASKS_FINISHED,
                "tenant" => tenant.0.clone(),
                "status" => TaskStatus::Cancelled.as_str(),
            )
            .increment(1);
            state.events.journaled(event);
            Ok((StatusCode::OK, Json(TaskView::new(task, None))))
        }
        CancelOutcome::Requested(task, event) => {
            state.events.journaled(event);
            state.scheduler.cancel_local(&id);
            Ok((StatusCode::ACCEPTED, Json(TaskView::new(task, None))))
        }
        CancelOutcome::AlreadyFinished(task) => Err(ApiError::new(
            Code::TaskAlreadyFinished,
            format!("task {id} already {}", task.status.as_str()),
        )),
    }
}
