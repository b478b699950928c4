//! The OpenAPI 3.1 description of the REST API, generated from the code:
//! each handler's `#[utoipa::path]` says its method, path, parameters and
//! bodies; the views and requests derive their schemas; the error
//! responses come from the one table of codes (`crate::errors`). `app()`
//! registers the handlers through `utoipa_axum::routes!`, which builds the
//! router and the spec from one list. Served at `GET /openapi.json` and
//! rendered at `/docs` (Swagger UI, compiled into the binary).
//!
//! `/mcp` is not described: it speaks MCP's JSON-RPC over streamable HTTP,
//! whose messages OpenAPI cannot express; docs/api.md and the README point
//! to the MCP specification instead.

use std::collections::BTreeMap;

use utoipa::openapi::content::ContentBuilder;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{OpenApi, RefOr};
use utoipa::{Modify, PartialSchema, ToSchema};

use crate::errors::{Code, ErrorInfo};
use crate::store::event_kind;

/// The security scheme of every route but `/healthz`, `/metrics` and the
/// spec itself: an API token (`opspawn token new`). Needed only when the
/// server has tokens configured.
pub const API_TOKEN: &str = "api_token";
/// The separate token `[metrics]` may require for `GET /metrics`.
pub const METRICS_TOKEN: &str = "metrics_token";

/// Codes the router and its middleware may answer any route with.
const ANY_ROUTE: &[Code] = &[
    Code::RequestTimeout,
    Code::PayloadTooLarge,
    Code::UnsupportedMediaType,
    Code::InternalError,
];
/// Codes every route behind an API token may answer with.
const AUTHENTICATED: &[Code] = &[Code::Unauthorized, Code::InvalidToken, Code::RateLimited];
/// Codes of the routes that must answer within `http.request_timeout`.
const ANSWERED_IN_TIME: &[Code] = &[Code::ResponseTimeout];
/// Codes a task's fields may be refused with: `POST /v1/tasks` and a
/// schedule's task go through the same validation (`api::validate`), so
/// both list these.
const TASK_REFUSED: &[Code] = &[
    Code::InvalidGoal,
    Code::UnknownPlanner,
    Code::UnknownLlm,
    Code::UnknownTool,
    Code::InvalidOptions,
    Code::InvalidModel,
    Code::InvalidMaxSteps,
    Code::InvalidMaxRetries,
    Code::InvalidTimeout,
    Code::InvalidPriority,
    Code::InvalidTime,
    Code::InvalidBudget,
    Code::BudgetUnpriced,
    Code::InvalidThread,
    Code::InvalidMemoryNamespace,
    Code::InvalidResponseFormat,
    Code::InvalidImages,
    Code::InvalidCall,
];
/// Codes the router answers for a request that matches no operation: they
/// belong to no operation, so the spec lists them in its description and
/// in the `ErrorCode` schema.
pub const UNROUTED: &[Code] = &[Code::RouteNotFound, Code::MethodNotAllowed];
/// Codes sent with a `Retry-After` header.
const RETRY_AFTER: &[Code] = &[Code::RateLimited, Code::QueueFull, Code::PluginsLoading];

/// Declares a type per operation whose OpenAPI responses are its error
/// codes, grouped by the status the table gives each.
macro_rules! error_responses {
    ($( $(#[$doc:meta])* $name:ident: [$($group:ident),*] + [$($code:ident),* $(,)?]; )*) => {
        $(
            $(#[$doc])*
            pub struct $name;

            impl $name {
                /// Every code the operation may answer with.
                pub fn codes() -> Vec<Code> {
                    let mut codes: Vec<Code> = vec![$(Code::$code),*];
                    $( codes.extend_from_slice($group); )*
                    codes
                }
            }

            impl utoipa::IntoResponses for $name {
                fn responses() -> BTreeMap<String, RefOr<Response>> {
                    error_responses(&Self::codes())
                }
            }
        )*
    };
}

error_responses! {
    HealthErrors: [ANY_ROUTE, ANSWERED_IN_TIME] + [];
    MetricsErrors: [ANY_ROUTE, ANSWERED_IN_TIME] + [Unauthorized, InvalidToken, RouteNotFound];
    ListPluginsErrors: [ANY_ROUTE, AUTHENTICATED, ANSWERED_IN_TIME] + [];
    CreateTaskErrors: [ANY_ROUTE, AUTHENTICATED, ANSWERED_IN_TIME, TASK_REFUSED] + [
        InvalidJson, InvalidRequest, InvalidIdempotencyKey, TooManyActiveTasks, QueueFull,
        PluginsLoading, StoreFull,
    ];
    ListTasksErrors: [ANY_ROUTE, AUTHENTICATED, ANSWERED_IN_TIME] + [InvalidQuery];
    StatsErrors: [ANY_ROUTE, AUTHENTICATED, ANSWERED_IN_TIME] + [];
    UsageErrors: [ANY_ROUTE, AUTHENTICATED, ANSWERED_IN_TIME] + [];
    GetTaskErrors: [ANY_ROUTE, AUTHENTICATED, ANSWERED_IN_TIME] + [
        InvalidPath, InvalidQuery, Forbidden, TaskNotFound,
    ];
    CancelTaskErrors: [ANY_ROUTE, AUTHENTICATED, ANSWERED_IN_TIME] + [
        InvalidPath, Forbidden, TaskNotFound, TaskAlreadyFinished, StoreFull,
    ];
    TaskEventsErrors: [ANY_ROUTE, AUTHENTICATED] + [
        InvalidPath, InvalidLastEventId, Forbidden, TaskNotFound,
    ];
    SpecErrors: [ANY_ROUTE, ANSWERED_IN_TIME] + [];
    CreateScheduleErrors: [ANY_ROUTE, AUTHENTICATED, ANSWERED_IN_TIME, TASK_REFUSED] + [
        InvalidJson, InvalidRequest, InvalidSchedule, InvalidTimezone, PluginsLoading, StoreFull,
    ];
    ListApprovalsErrors: [ANY_ROUTE, AUTHENTICATED, ANSWERED_IN_TIME] + [
        InvalidPath, Forbidden, TaskNotFound,
    ];
    DecideApprovalErrors: [ANY_ROUTE, AUTHENTICATED, ANSWERED_IN_TIME] + [
        InvalidJson, InvalidRequest, InvalidPath, Forbidden, TaskNotFound, ApprovalNotFound,
        ApprovalAlreadyDecided, StoreFull,
    ];
    ListSchedulesErrors: [ANY_ROUTE, AUTHENTICATED, ANSWERED_IN_TIME] + [InvalidQuery];
    GetScheduleErrors: [ANY_ROUTE, AUTHENTICATED, ANSWERED_IN_TIME] + [
        InvalidPath, ScheduleNotFound,
    ];
    ChangeScheduleErrors: [ANY_ROUTE, AUTHENTICATED, ANSWERED_IN_TIME] + [
        InvalidPath, ScheduleNotFound, StoreFull,
    ];
    GetThreadErrors: [ANY_ROUTE, AUTHENTICATED, ANSWERED_IN_TIME] + [
        InvalidPath, InvalidQuery, InvalidThread, ThreadNotFound,
    ];
    DeleteThreadErrors: [ANY_ROUTE, AUTHENTICATED, ANSWERED_IN_TIME] + [
        InvalidPath, InvalidThread, ThreadNotFound, ThreadActive, StoreFull,
    ];
    ListMemoriesErrors: [ANY_ROUTE, AUTHENTICATED, ANSWERED_IN_TIME] + [
        InvalidQuery, InvalidMemoryNamespace,
    ];
    CreateMemoryErrors: [ANY_ROUTE, AUTHENTICATED, ANSWERED_IN_TIME] + [
        InvalidJson, InvalidRequest, InvalidMemory, InvalidMemoryNamespace, MemoryFull, StoreFull,
    ];
    GetMemoryErrors: [ANY_ROUTE, AUTHENTICATED, ANSWERED_IN_TIME] + [
        InvalidPath, MemoryNotFound,
    ];
    DeleteMemoryErrors: [ANY_ROUTE, AUTHENTICATED, ANSWERED_IN_TIME] + [
        InvalidPath, MemoryNotFound, StoreFull,
    ];
}

/// The responses for `codes`: one per status, whose body's `code` is one of
/// the codes with that status.
fn error_responses(codes: &[Code]) -> BTreeMap<String, RefOr<Response>> {
    let mut by_status: BTreeMap<u16, Vec<Code>> = BTreeMap::new();
    for &code in codes {
        let status = code
            .status()
            .unwrap_or_else(|| panic!("{code} is not a request error: it has no HTTP status"));
        let codes = by_status.entry(status).or_default();
        if !codes.contains(&code) {
            codes.push(code);
        }
    }
    by_status
        .into_iter()
        .map(|(status, codes)| {
            let names: Vec<String> = codes.iter().map(|code| format!("`{code}`")).collect();
            let mut response = ResponseBuilder::new()
                .description(names.join(", "))
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(error_body(
                            Some(format!("HTTP {status}")),
                            codes.iter().map(|code| code.as_str()),
                        )))
                        .build(),
                );
            if codes.iter().any(|code| RETRY_AFTER.contains(code)) {
                response = response.header(
                    "Retry-After",
                    HeaderBuilder::new()
                        .schema(Some(
                            ObjectBuilder::new()
                                .schema_type(Type::Integer)
                                .minimum(Some(1)),
                        ))
                        .description(Some(format!(
                            "Seconds to wait before trying again; sent with {}",
                            codes
                                .iter()
                                .filter(|code| RETRY_AFTER.contains(code))
                                .map(|code| format!("`{code}`"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        )))
                        .build(),
                );
            }
            (status.to_string(), RefOr::T(response.build()))
        })
        .collect()
}

/// `{"error": {"code", "message"}}` with `code` one of `codes`.
fn error_body<'a>(title: Option<String>, codes: impl IntoIterator<Item = &'a str>) -> Schema {
    let code = ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(codes.into_iter().collect::<Vec<_>>()));
    let error = ObjectBuilder::new()
        .schema_type(Type::Object)
        .property("code", code)
        .property(
            "message",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .description(Some("For people: show it, do not match on it")),
        )
        .required("code")
        .required("message");
    Schema::Object(
        ObjectBuilder::new()
            .title(title)
            .schema_type(Type::Object)
            .property("error", error)
            .required("error")
            .build(),
    )
}

/// Every request error code (the `Error` schema's `code`), described with
/// its status.
fn error_code_schema() -> Schema {
    let request_codes: Vec<Code> = Code::ALL
        .iter()
        .copied()
        .filter(|code| code.status().is_some())
        .collect();
    let table: Vec<String> = request_codes
        .iter()
        .map(|code| format!("- `{code}`: {}", code.status().unwrap_or_default()))
        .collect();
    Schema::Object(
        ObjectBuilder::new()
            .schema_type(Type::String)
            .description(Some(format!(
                "A request error's stable code, with the HTTP status it comes with:\n\n{}",
                table.join("\n")
            )))
            .enum_values(Some(request_codes.iter().map(|code| code.as_str())))
            .build(),
    )
}

/// Why a task or a step failed. Not every code is in the table: a tool may
/// send its own (`invalid_expression`, say), so `code` is any string, and
/// the known ones are listed in its description.
impl PartialSchema for ErrorInfo {
    fn schema() -> RefOr<Schema> {
        let known: Vec<&str> = Code::ALL
            .iter()
            .filter(|code| code.on_steps())
            .map(|code| code.as_str())
            .collect();
        let code = ObjectBuilder::new()
            .schema_type(Type::String)
            .description(Some(format!(
                "One of the task and step error codes of docs/api.md ({}), or a tool's own code",
                known
                    .iter()
                    .map(|code| format!("`{code}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
            .examples(known.iter().take(3).copied());
        RefOr::T(Schema::Object(
            ObjectBuilder::new()
                .schema_type(Type::Object)
                .property("code", code)
                .property("message", ObjectBuilder::new().schema_type(Type::String))
                .required("code")
                .required("message")
                .build(),
        ))
    }
}

impl ToSchema for ErrorInfo {}

/// One Server-Sent Event's `data` on `GET /v1/tasks/{id}/events`; the
/// event's name is its `kind` and its id its `seq`.
pub struct TaskEvent;

impl PartialSchema for TaskEvent {
    fn schema() -> RefOr<Schema> {
        let kind = ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(event_kind::ALL.iter().copied()))
            .description(Some(
                "`task.queued`; `task.started` (`attempt`); `step.started` (the step: `seq`, \
                 `kind`, `plugin`, `plugin_sha256`, `planner_sha256`, `status`, `attempt`, \
                 `started_at`, `input`); `llm.delta` \
                 (`step`, `text`: text the provider streamed, gathered about every 50 ms; \
                 `truncated: true` on a step's last one when its text ran past \
                 `[events] delta_bytes_per_step`); `step.finished` (the step \
                 without its input, with `output` or `error`, `usage`, `finished_at`); \
                 `task.cancel_requested`; `task.finished` (`status`, `result`, `error`), always \
                 the last",
            ));
        RefOr::T(Schema::Object(
            ObjectBuilder::new()
                .schema_type(Type::Object)
                .property("task_id", ObjectBuilder::new().schema_type(Type::String))
                .property(
                    "seq",
                    ObjectBuilder::new()
                        .schema_type(Type::Integer)
                        .description(Some("Per task, from 1, without gaps")),
                )
                .property("kind", kind)
                .property(
                    "at",
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .description(Some("RFC 3339, UTC")),
                )
                .property("data", ObjectBuilder::new().schema_type(Type::Object))
                .required("task_id")
                .required("seq")
                .required("kind")
                .required("at")
                .required("data")
                .build(),
        ))
    }
}

impl ToSchema for TaskEvent {}

/// One Server-Sent Event of `GET /v1/tasks/{id}/events` as it is framed
/// on the wire: its name (`event`), its id and its `data`, a
/// [`TaskEvent`] as JSON text. (OpenAPI describes an event stream by its
/// events, as OpenAPI 3.2's `itemSchema` and schemathesis read it.)
pub struct TaskEventFrame;

impl PartialSchema for TaskEventFrame {
    fn schema() -> RefOr<Schema> {
        RefOr::T(Schema::Object(
            ObjectBuilder::new()
                .schema_type(Type::Object)
                .property(
                    "event",
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .enum_values(Some(event_kind::ALL.iter().copied()))
                        .description(Some("The event's kind")),
                )
                .property(
                    "id",
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .description(Some(
                            "The event's `seq`, to resume after with `Last-Event-ID`",
                        )),
                )
                .property(
                    "data",
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .content_media_type("application/json")
                        .description(Some("A `TaskEvent` (see its schema), as JSON")),
                )
                .required("event")
                .required("data")
                .build(),
        ))
    }
}

impl ToSchema for TaskEventFrame {}

/// What `#[derive(OpenApi)]` cannot say by itself: the security schemes,
/// and the error codes' schema and table.
pub struct Generated;

impl Modify for Generated {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            API_TOKEN,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API token (`opspawn token new`); the tenant is the token's. Needed \
                         only when the server has tokens configured; without, every request \
                         acts for the tenant `default`.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            METRICS_TOKEN,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The `[metrics]` token, when one is configured; not an API token.",
                    ))
                    .build(),
            ),
        );
        components
            .schemas
            .insert("ErrorCode".to_owned(), RefOr::T(error_code_schema()));
        components.schemas.insert(
            "Error".to_owned(),
            RefOr::T(error_body(
                Some("Error".to_owned()),
                Code::ALL
                    .iter()
                    .filter(|code| code.status().is_some())
                    .map(|code| code.as_str()),
            )),
        );
        let unrouted: Vec<String> = UNROUTED
            .iter()
            .map(|code| format!("`{}` `{code}`", code.status().unwrap_or_default()))
            .collect();
        let description = openapi.info.description.get_or_insert_with(String::new);
        description.push_str(&format!(
            "\n\nA request no operation matches is answered {} in the same error shape.",
            unrouted.join(" or ")
        ));
    }
}

/// The spec's fixed parts; the paths come from `app()`'s router.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Opspawn",
        description = "The REST API of Opspawn, an agent runtime. JSON in, JSON out; every \
            error is `{\"error\": {\"code\", \"message\"}}` with a stable code (see the \
            `ErrorCode` schema and docs/api.md). When tokens are configured, every operation \
            but `/healthz`, `/metrics` and `/openapi.json` needs `Authorization: Bearer \
            <token>`, and each tenant sees only its own tasks. `/mcp` serves MCP over \
            streamable HTTP (not described here: see the MCP specification).",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    modifiers(&Generated),
    components(schemas(ErrorInfo, TaskEvent, TaskEventFrame)),
    tags(
        (name = "tasks", description = "Submit, follow and cancel tasks"),
        (name = "schedules", description = "Recurring tasks from cron expressions"),
        (name = "threads", description = "Conversations: the tasks that name a thread"),
        (name = "memories", description = "Long-term memory: notes kept across tasks, per tenant and namespace"),
        (name = "plugins", description = "What is loaded"),
        (name = "operations", description = "Health, metrics and this spec"),
    ),
)]
pub struct ApiDoc;
