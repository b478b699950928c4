//! `/v1/threads/{id}`: a tenant's conversation threads. A thread has no
//! row of its own: it is the tasks that name it (`thread` on
//! `POST /v1/tasks`), so it exists while it has tasks.

use axum::Json;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::Tenant;
use super::views::TaskView;
use super::{ApiError, ApiPath, ApiQuery, AppState, PageAsked, openapi};
use crate::errors::Code;
use crate::store::{TaskQuery, ThreadDeletion};

/// `GET /v1/threads/{id}`'s query; any other parameter is `400 invalid_query`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct ListThread {
    /// Tasks per page; default 50.
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
    /// The `next_cursor` of the page before.
    cursor: Option<String>,
}

/// A thread's tasks, newest first, a page at a time.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ThreadView {
    /// The thread's id.
    thread: String,
    tasks: Vec<TaskView>,
    /// Pass as `cursor` for the next page; `null` on the last one.
    next_cursor: Option<String>,
}

/// The thread id in a path, checked as `POST /v1/tasks` checks `thread`.
fn checked(thread: &str) -> Result<(), ApiError> {
    match crate::threads::invalid_thread_id(thread) {
        Some(message) => Err(ApiError::new(Code::InvalidThread, message)),
        None => Ok(()),
    }
}

fn thread_not_found(thread: &str) -> ApiError {
    ApiError::new(
        Code::ThreadNotFound,
        format!("this tenant has no task in thread {thread:?}"),
    )
}

/// The thread's tasks, newest first, a page at a time (as `GET /v1/tasks`
/// pages); `404 thread_not_found` when the tenant has none in it.
#[utoipa::path(
    get,
    path = "/v1/threads/{id}",
    tag = "threads",
    security(("api_token" = [])),
    params(
        ("id" = String, Path, min_length = 1, max_length = 128, description = "The thread's id"),
        ListThread,
    ),
    responses((status = 200, body = ThreadView), openapi::GetThreadErrors),
)]
pub(super) async fn get_thread(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ApiPath(thread): ApiPath<String>,
    ApiQuery(query): ApiQuery<ListThread>,
) -> Result<Json<ThreadView>, ApiError> {
    checked(&thread)?;
    let first_page = query.cursor.is_none();
    let asked = PageAsked::from_query(query.limit, query.cursor)?;
    let page = state
        .store
        .list_tasks(&TaskQuery {
            tenant: Some(tenant.0),
            thread: Some(thread.clone()),
            before: asked.before,
            limit: asked.limit,
            ..TaskQuery::default()
        })
        .await?;
    if first_page && page.tasks.is_empty() {
        return Err(thread_not_found(&thread));
    }
    Ok(Json(ThreadView {
        thread,
        tasks: page
            .tasks
            .into_iter()
            .map(|t| TaskView::new(t, None))
            .collect(),
        next_cursor: page.next_cursor,
    }))
}

/// Deletes the thread: all its tasks, with their steps and events. Refused
/// with `409 thread_active` while one of them is queued, running or waiting for approval (cancel
/// those first); nothing is deleted then.
#[utoipa::path(
    delete,
    path = "/v1/threads/{id}",
    tag = "threads",
    security(("api_token" = [])),
    params(("id" = String, Path, min_length = 1, max_length = 128, description = "The thread's id")),
    responses(
        (status = 204, description = "Deleted"),
        openapi::DeleteThreadErrors,
    ),
)]
pub(super) async fn delete_thread(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ApiPath(thread): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    checked(&thread)?;
    match state.store.delete_thread(&tenant.0, &thread).await? {
        ThreadDeletion::Deleted(0) => Err(thread_not_found(&thread)),
        ThreadDeletion::Deleted(_) => Ok(StatusCode::NO_CONTENT),
        ThreadDeletion::Active(active) => Err(ApiError::new(
            Code::ThreadActive,
            format!(
                "{active} task(s) of thread {thread:?} are queued, running or waiting for approval; cancel them or \
                 wait for them to finish, then delete the thread"
            ),
        )),
    }
}
