//! `/v1/schedules`: recurring tasks. A schedule's task is validated exactly
//! as `POST /v1/tasks` validates a submission (the same [`validate`]), once,
//! when the schedule is created; each run is then created by the schedule
//! loop (`crate::schedules::runner`) as an ordinary task.

use axum::Json;
use axum::extract::{Extension, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::auth::Tenant;
use super::views::timestamp;
use super::{
    ApiError, ApiJson, ApiPath, ApiQuery, AppState, CreateTask, PageAsked, openapi, validate,
};
use crate::errors::Code;
use crate::schedules::{CronSpec, MissedTicks, SpecError};
use crate::store::{NewSchedule, ScheduleQuery, ScheduleRecord, TaskTemplate, now_millis};

/// The longest schedule name accepted, in bytes.
const MAX_NAME_BYTES: usize = 256;
/// The longest cron expression or zone name accepted, in bytes.
const MAX_SPEC_BYTES: usize = 256;
/// How many upcoming ticks a schedule shows.
const UPCOMING: usize = 3;

/// A schedule to create.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateSchedule {
    /// A name for people: 1 to 256 bytes, no NUL.
    #[schema(min_length = 1, max_length = 256, example = "nightly report")]
    name: Option<String>,
    /// 5 fields (minute hour day-of-month month day-of-week), or 6 with
    /// seconds first; `*`, lists, ranges, steps, names (`MON`, `JAN`), `L`,
    /// `W` and `#`.
    #[schema(min_length = 1, max_length = 256, example = "0 9 * * MON-FRI")]
    cron: String,
    /// The IANA time zone the expression is read in; default `UTC`.
    #[schema(min_length = 1, max_length = 256, example = "Europe/Berlin")]
    timezone: Option<String>,
    /// What to do about ticks missed while no host ran: `skip` (default)
    /// or `run_once`.
    missed_ticks: Option<MissedTicks>,
    /// Create it paused; default false.
    paused: Option<bool>,
    /// The task each run creates: the body `POST /v1/tasks` accepts,
    /// checked the same way, without `run_at` and `deadline`.
    task: CreateTask,
}

/// The task each run of a schedule creates, with its defaults applied.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct TemplateView {
    goal: String,
    planner: String,
    llm: String,
    model: Option<String>,
    tools: Vec<String>,
    #[schema(value_type = Object)]
    options: Value,
    max_steps: u32,
    max_retries: u32,
    timeout_secs: f64,
    priority: i32,
    /// The JSON Schema each run's answer must match, if any.
    response_format: Option<crate::protocol::ResponseFormat>,
    /// A call task's tool call, which each run makes; `null` for an agent
    /// task.
    call: Option<super::views::CallView>,
    /// The images that go with each run's goal; left out when there are none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Option<Vec<Object>>, nullable = false)]
    images: Vec<crate::protocol::Image>,
}

/// A schedule. Times are RFC 3339, UTC.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ScheduleView {
    id: String,
    tenant: String,
    name: Option<String>,
    cron: String,
    timezone: String,
    missed_ticks: MissedTicks,
    paused: bool,
    /// When the next run is due; `null` while paused, or when the
    /// expression matches no time to come.
    next_run_at: Option<String>,
    /// The next few ticks, from `next_run_at` on (empty while paused).
    next_runs: Vec<String>,
    /// The tick of the latest run.
    last_run_at: Option<String>,
    /// The due run found the queue full and is created once there is room.
    waiting_for_room: bool,
    task: TemplateView,
    created_at: String,
}

impl ScheduleView {
    fn new(schedule: ScheduleRecord) -> Self {
        let next_run_at = schedule.next_run_at.filter(|_| !schedule.paused);
        let next_runs = match (
            next_run_at,
            CronSpec::parse(&schedule.cron, &schedule.timezone),
        ) {
            (Some(next), Ok(spec)) => std::iter::once(next)
                .chain(spec.upcoming(next, UPCOMING - 1))
                .map(timestamp)
                .collect(),
            _ => Vec::new(),
        };
        let template = schedule.template;
        Self {
            id: schedule.id,
            tenant: schedule.tenant,
            name: schedule.name,
            cron: schedule.cron,
            timezone: schedule.timezone,
            missed_ticks: schedule.missed_ticks,
            paused: schedule.paused,
            next_run_at: next_run_at.map(timestamp),
            next_runs,
            last_run_at: schedule.last_run_at.map(timestamp),
            waiting_for_room: schedule.waiting_for_room,
            task: TemplateView {
                goal: template.goal,
                planner: template.planner,
                llm: template.llm,
                model: template.model,
                tools: template.tools,
                options: template.options,
                max_steps: template.max_steps,
                max_retries: template.max_retries,
                timeout_secs: template.timeout_ms as f64 / 1000.0,
                priority: template.priority,
                response_format: template.response_format,
                call: template.call.map(Into::into),
                images: template.images,
            },
            created_at: timestamp(schedule.created_at),
        }
    }
}

/// `GET /v1/schedules`: a page of schedules, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct SchedulePageView {
    schedules: Vec<ScheduleView>,
    /// Pass as `cursor` for the next page; `null` on the last one.
    next_cursor: Option<String>,
}

fn invalid_schedule(message: impl Into<String>) -> ApiError {
    ApiError::new(Code::InvalidSchedule, message)
}

fn schedule_not_found(id: &str) -> ApiError {
    ApiError::new(
        Code::ScheduleNotFound,
        format!("no schedule has the id {id:?}"),
    )
}

/// The schedule, if it exists and belongs to the tenant. Another tenant's
/// is not found, as if it did not exist.
async fn owned_schedule(
    state: &AppState,
    tenant: &Tenant,
    id: &str,
) -> Result<ScheduleRecord, ApiError> {
    match state.store.get_schedule(id).await? {
        Some(schedule) if schedule.tenant == tenant.0 => Ok(schedule),
        _ => Err(schedule_not_found(id)),
    }
}

/// Creates a schedule; its runs start at its next tick.
#[utoipa::path(
    post,
    path = "/v1/schedules",
    tag = "schedules",
    security(("api_token" = [])),
    request_body = CreateSchedule,
    responses(
        (status = 201, description = "Created", body = ScheduleView,
            headers(("Location" = String, description = "The schedule's URL"))),
        openapi::CreateScheduleErrors,
    ),
)]
pub(super) async fn create_schedule(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ApiJson(request): ApiJson<CreateSchedule>,
) -> Result<impl IntoResponse, ApiError> {
    if let Some(name) = &request.name
        && (name.is_empty() || name.len() > MAX_NAME_BYTES || name.contains('\0'))
    {
        return Err(invalid_schedule(format!(
            "name must be 1 to {MAX_NAME_BYTES} bytes, without NUL characters"
        )));
    }
    let cron = request.cron.trim().to_owned();
    if cron.len() > MAX_SPEC_BYTES || cron.contains('\0') {
        return Err(invalid_schedule(format!(
            "cron must be at most {MAX_SPEC_BYTES} bytes, without NUL characters"
        )));
    }
    let timezone = request.timezone.unwrap_or_else(|| "UTC".to_owned());
    if timezone.len() > MAX_SPEC_BYTES {
        return Err(ApiError::new(
            Code::InvalidTimezone,
            format!("timezone must be at most {MAX_SPEC_BYTES} bytes"),
        ));
    }
    let spec = CronSpec::parse(&cron, &timezone).map_err(|error| match error {
        SpecError::Cron(message) => invalid_schedule(message),
        zone @ SpecError::Zone(_) => ApiError::new(Code::InvalidTimezone, zone.to_string()),
    })?;
    if request.task.run_at.is_some() || request.task.deadline.is_some() {
        return Err(ApiError::new(
            Code::InvalidTime,
            "a schedule's task has no run_at or deadline: each run starts at its tick (use \
             timeout_secs to bound how long a run may take)",
        ));
    }
    if request.task.thread.is_some() {
        return Err(ApiError::new(
            Code::InvalidThread,
            "a schedule's task cannot name a thread: each run is a task of its own",
        ));
    }
    let task = validate(&state, request.task, tenant.0.clone(), None)?;
    let paused = request.paused.unwrap_or(false);
    let schedule = state
        .store
        .create_schedule(NewSchedule {
            tenant: tenant.0,
            name: request.name,
            cron,
            timezone,
            template: TaskTemplate::of(&task),
            missed_ticks: request.missed_ticks.unwrap_or_default(),
            paused,
            next_run_at: spec.next_after(now_millis()),
        })
        .await?;
    if !paused {
        state.schedule_wake.notify_one();
    }
    let location = format!("/v1/schedules/{}", schedule.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(ScheduleView::new(schedule)),
    ))
}

/// `GET /v1/schedules`'s query; any other parameter is `400 invalid_query`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct ListSchedules {
    /// Schedules per page; default 50.
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
    /// The `next_cursor` of the page before.
    cursor: Option<String>,
}

/// The tenant's schedules, newest first, a page at a time.
#[utoipa::path(
    get,
    path = "/v1/schedules",
    tag = "schedules",
    security(("api_token" = [])),
    params(ListSchedules),
    responses((status = 200, body = SchedulePageView), openapi::ListSchedulesErrors),
)]
pub(super) async fn list_schedules(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ApiQuery(query): ApiQuery<ListSchedules>,
) -> Result<Json<SchedulePageView>, ApiError> {
    let asked = PageAsked::from_query(query.limit, query.cursor)?;
    let page = state
        .store
        .list_schedules(&ScheduleQuery {
            tenant: tenant.0,
            before: asked.before,
            limit: asked.limit,
        })
        .await?;
    Ok(Json(SchedulePageView {
        schedules: page.schedules.into_iter().map(ScheduleView::new).collect(),
        next_cursor: page.next_cursor,
    }))
}

/// The schedule, with its next few ticks.
#[utoipa::path(
    get,
    path = "/v1/schedules/{id}",
    tag = "schedules",
    security(("api_token" = [])),
    params(("id" = String, Path, min_length = 1, description = "The schedule's id")),
    responses((status = 200, body = ScheduleView), openapi::GetScheduleErrors),
)]
pub(super) async fn get_schedule(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ScheduleView>, ApiError> {
    Ok(Json(ScheduleView::new(
        owned_schedule(&state, &tenant, &id).await?,
    )))
}

/// Pauses the schedule: no run is created until it is resumed (ticks in
/// between are not caught up). Pausing a paused schedule changes nothing.
#[utoipa::path(
    post,
    path = "/v1/schedules/{id}/pause",
    tag = "schedules",
    security(("api_token" = [])),
    params(("id" = String, Path, min_length = 1, description = "The schedule's id")),
    responses((status = 200, body = ScheduleView), openapi::ChangeScheduleErrors),
)]
pub(super) async fn pause_schedule(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ScheduleView>, ApiError> {
    owned_schedule(&state, &tenant, &id).await?;
    let schedule = state
        .store
        .set_schedule_paused(&id, true, None)
        .await?
        .ok_or_else(|| schedule_not_found(&id))?;
    Ok(Json(ScheduleView::new(schedule)))
}

/// Resumes the schedule at its next tick to come.
#[utoipa::path(
    post,
    path = "/v1/schedules/{id}/resume",
    tag = "schedules",
    security(("api_token" = [])),
    params(("id" = String, Path, min_length = 1, description = "The schedule's id")),
    responses((status = 200, body = ScheduleView), openapi::ChangeScheduleErrors),
)]
pub(super) async fn resume_schedule(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ScheduleView>, ApiError> {
    let schedule = owned_schedule(&state, &tenant, &id).await?;
    if !schedule.paused {
        return Ok(Json(ScheduleView::new(schedule)));
    }
    let next_run_at = CronSpec::parse(&schedule.cron, &schedule.timezone)
        .ok()
        .and_then(|spec| spec.next_after(now_millis()));
    let schedule = state
        .store
        .set_schedule_paused(&id, false, next_run_at)
        .await?
        .ok_or_else(|| schedule_not_found(&id))?;
    state.schedule_wake.notify_one();
    Ok(Json(ScheduleView::new(schedule)))
}

/// Deletes the schedule. The tasks it created stay, still naming it.
#[utoipa::path(
    delete,
    path = "/v1/schedules/{id}",
    tag = "schedules",
    security(("api_token" = [])),
    params(("id" = String, Path, min_length = 1, description = "The schedule's id")),
    responses(
        (status = 204, description = "Deleted"),
        openapi::ChangeScheduleErrors,
    ),
)]
pub(super) async fn delete_schedule(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    owned_schedule(&state, &tenant, &id).await?;
    if !state.store.delete_schedule(&id).await? {
        return Err(schedule_not_found(&id));
    }
    Ok(StatusCode::NO_CONTENT)
}
