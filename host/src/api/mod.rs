//! The REST API: validates requests, maps them to store and scheduler
//! commands, and renders tasks, steps and plugins as JSON.
//!
//! Every error is `{"error": {"code", "message"}}` with a stable code (see
//! `docs/api.md`); malformed requests are 4xx, never 500.

mod error;
mod events;
mod views;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

pub use error::ApiError;
use views::{TaskView, plugin_view};

use crate::config::TaskDefaults;
use crate::events::EventBus;
use crate::plugins::{PluginKind, PluginRuntime};
use crate::scheduler::Scheduler;
use crate::store::{CancelOutcome, NewTask, Store, TaskQuery, TaskStatus};

/// The longest goal accepted, in bytes.
const MAX_GOAL_BYTES: usize = 64 * 1024;
const MAX_STEPS_CEILING: u32 = 1000;
const MAX_TIMEOUT_SECS: u64 = 7 * 24 * 3600;

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub runtime: Arc<PluginRuntime>,
    pub scheduler: Arc<Scheduler>,
    pub events: EventBus,
    pub defaults: Arc<TaskDefaults>,
}

/// The whole API as one router.
pub fn app(state: AppState, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/plugins", get(list_plugins))
        .route("/v1/tasks", post(create_task).get(list_tasks))
        .route("/v1/tasks/{id}", get(get_task))
        .route("/v1/tasks/{id}/events", get(events::task_events))
        .route("/v1/tasks/{id}/cancel", post(cancel_task))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "route_not_found",
                "no such endpoint; see docs/api.md",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not accept that method",
            )
        })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// `axum::Json`, with rejections in the API's error shape.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
struct ApiJson<T>(T);

/// `axum::extract::Query`, with rejections in the API's error shape.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
struct ApiQuery<T>(T);

async fn healthz(State(state): State<AppState>) -> Json<Value> {
    let catalog = state.runtime.catalog();
    Json(json!({
        "status": "ok",
        "store": state.store.engine(),
        "plugins": catalog.plugins().count(),
    }))
}

async fn list_plugins(State(state): State<AppState>) -> Json<Value> {
    let catalog = state.runtime.catalog();
    Json(json!({
        "plugins": catalog.plugins().map(plugin_view).collect::<Vec<_>>(),
        "failures": catalog.failures(),
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTask {
    goal: String,
    planner: Option<String>,
    llm: Option<String>,
    model: Option<String>,
    tools: Option<Vec<String>>,
    /// `{"planner": {...}, "llm": {...}}`: handed to the plugins.
    options: Option<Value>,
    max_steps: Option<u32>,
    timeout_secs: Option<u64>,
}

async fn create_task(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<CreateTask>,
) -> Result<impl IntoResponse, ApiError> {
    let task = validate(&state, request)?;
    let (record, event) = state.store.create_task(task).await?;
    state.events.journaled(event);
    state.scheduler.wake();
    let location = format!("/v1/tasks/{}", record.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(TaskView::new(record, None)),
    ))
}

/// Applies defaults and checks every reference against what is loaded.
fn validate(state: &AppState, request: CreateTask) -> Result<NewTask, ApiError> {
    let goal = request.goal.trim();
    if goal.is_empty() {
        return Err(ApiError::unprocessable("invalid_goal", "the goal is empty"));
    }
    if goal.contains('\0') {
        return Err(ApiError::unprocessable(
            "invalid_goal",
            "the goal contains a NUL character",
        ));
    }
    if goal.len() > MAX_GOAL_BYTES {
        return Err(ApiError::unprocessable(
            "invalid_goal",
            format!("the goal is longer than {MAX_GOAL_BYTES} bytes"),
        ));
    }
    let defaults = &state.defaults;
    let catalog = state.runtime.catalog();
    let planner = request.planner.unwrap_or_else(|| defaults.planner.clone());
    if catalog.kind_of(&planner) != Some(PluginKind::Planner) {
        return Err(ApiError::unprocessable(
            "unknown_planner",
            format!("no planner plugin named {planner:?} is loaded; GET /v1/plugins lists them"),
        ));
    }
    let llm = request.llm.unwrap_or_else(|| defaults.llm.clone());
    if catalog.kind_of(&llm) != Some(PluginKind::LlmAdapter) {
        return Err(ApiError::unprocessable(
            "unknown_llm",
            format!("no llm-adapter plugin named {llm:?} is loaded; GET /v1/plugins lists them"),
        ));
    }
    let tools = match request.tools.or_else(|| defaults.tools.clone()) {
        Some(tools) => tools,
        None => catalog.tool_names().map(str::to_owned).collect(),
    };
    if let Some(unknown) = tools.iter().find(|tool| catalog.tool_spec(tool).is_none()) {
        return Err(ApiError::unprocessable(
            "unknown_tool",
            format!("no loaded plugin offers a tool named {unknown:?}; GET /v1/plugins lists them"),
        ));
    }
    let options = request.options.unwrap_or_else(|| json!({}));
    let sections_are_objects = options
        .as_object()
        .is_some_and(|o| o.values().all(Value::is_object));
    if !sections_are_objects {
        return Err(ApiError::unprocessable(
            "invalid_options",
            "options must be an object of objects, such as {\"planner\": {...}, \"llm\": {...}}",
        ));
    }
    let max_steps = request.max_steps.unwrap_or(defaults.max_steps);
    if !(1..=MAX_STEPS_CEILING).contains(&max_steps) {
        return Err(ApiError::unprocessable(
            "invalid_max_steps",
            format!("max_steps must be between 1 and {MAX_STEPS_CEILING}"),
        ));
    }
    let timeout = match request.timeout_secs {
        Some(secs) if (1..=MAX_TIMEOUT_SECS).contains(&secs) => Duration::from_secs(secs),
        Some(_) => {
            return Err(ApiError::unprocessable(
                "invalid_timeout",
                format!("timeout_secs must be between 1 and {MAX_TIMEOUT_SECS}"),
            ));
        }
        None => defaults.timeout,
    };
    Ok(NewTask {
        goal: goal.to_owned(),
        planner,
        llm,
        model: request.model.or_else(|| defaults.model.clone()),
        tools,
        options,
        max_steps,
        timeout,
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListTasks {
    status: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

async fn list_tasks(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ListTasks>,
) -> Result<Json<Value>, ApiError> {
    let status = match query.status.as_deref() {
        None => None,
        Some(s) => Some(TaskStatus::parse(s).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_query",
                format!(
                    "unknown status {s:?}: use queued, running, succeeded, failed or cancelled"
                ),
            )
        })?),
    };
    let limit = query.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_query",
            "limit must be between 1 and 500",
        ));
    }
    let page = state
        .store
        .list_tasks(&TaskQuery {
            status,
            before: query.cursor,
            limit,
        })
        .await?;
    Ok(Json(json!({
        "tasks": page.tasks.into_iter().map(|t| TaskView::new(t, None)).collect::<Vec<_>>(),
        "next_cursor": page.next_cursor,
    })))
}

async fn get_task(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<TaskView>, ApiError> {
    let task = state
        .store
        .get_task(&id)
        .await?
        .ok_or_else(|| ApiError::task_not_found(&id))?;
    let steps = state.store.steps(&id).await?;
    Ok(Json(TaskView::new(task, Some(steps))))
}

async fn cancel_task(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    match state.store.request_cancel(&id).await? {
        CancelOutcome::Cancelled(task, event) => {
            state.events.journaled(event);
            Ok((StatusCode::OK, Json(TaskView::new(task, None))))
        }
        CancelOutcome::Requested(task, event) => {
            state.events.journaled(event);
            state.scheduler.cancel_local(&id);
            Ok((StatusCode::ACCEPTED, Json(TaskView::new(task, None))))
        }
        CancelOutcome::AlreadyFinished(task) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "task_already_finished",
            format!("task {id} already {}", task.status.as_str()),
        )),
    }
}
