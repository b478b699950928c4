//! `/v1/memories`: a tenant's long-term memories, as its tasks' plugins
//! keep them (`memory_namespace` on `POST /v1/tasks`): list, search, add
//! and delete. Another tenant's memory is `404 memory_not_found`, as if it
//! did not exist.

use axum::Json;
use axum::extract::{Extension, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::auth::Tenant;
use super::views::timestamp;
use super::{ApiError, ApiJson, ApiPath, ApiQuery, AppState, PageAsked, openapi};
use crate::errors::Code;
use crate::memory::{
    DEFAULT_NAMESPACE, MemoryQuery, MemoryRecord, NewMemory, invalid_namespace, search_terms,
};

/// `GET /v1/memories`'s query; any other parameter is `400 invalid_query`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct ListMemories {
    /// Only this namespace's memories; all of the tenant's when absent.
    namespace: Option<String>,
    /// Words to search for: the memories matching any of them, best first
    /// (one page only). Without it, the newest first, a page at a time.
    q: Option<String>,
    /// Memories per page; default 50.
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
    /// The `next_cursor` of the page before (listing only).
    cursor: Option<String>,
}

/// A memory, as a client sees it.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct MemoryView {
    id: String,
    namespace: String,
    text: String,
    /// What was stored with it: a JSON object.
    #[schema(value_type = Object)]
    metadata: Value,
    #[schema(format = DateTime)]
    created_at: String,
    /// The task whose plugin stored it; `null` when a client did.
    task_id: Option<String>,
    /// Relevance to the search's words (higher is better); `null` when
    /// listed without `q`.
    score: Option<f64>,
}

impl MemoryView {
    fn new(memory: MemoryRecord, searched: bool) -> Self {
        Self {
            metadata: serde_json::from_str(&memory.metadata).unwrap_or(Value::Null),
            id: memory.id,
            namespace: memory.namespace,
            text: memory.text,
            created_at: timestamp(memory.created_at),
            task_id: memory.task_id,
            score: searched.then_some(memory.score),
        }
    }
}

/// A page of memories.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct MemoryPage {
    memories: Vec<MemoryView>,
    /// Pass as `cursor` for the next page; `null` on the last one, and
    /// always for a search.
    next_cursor: Option<String>,
}

/// `POST /v1/memories`'s body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateMemory {
    /// The namespace to keep it in; `default` when absent.
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9._:-]+$")]
    namespace: Option<String>,
    /// The memory's text; searches match its words.
    #[schema(min_length = 1, example = "The user prefers metric units")]
    text: String,
    /// Anything to keep with it: a JSON object.
    #[schema(value_type = Option<Object>)]
    metadata: Option<Value>,
}

fn checked_namespace(namespace: Option<String>) -> Result<Option<String>, ApiError> {
    if let Some(message) = namespace.as_deref().and_then(invalid_namespace) {
        return Err(ApiError::new(Code::InvalidMemoryNamespace, message));
    }
    Ok(namespace)
}

/// The tenant's memories: with `q`, those matching any of its words, best
/// first; without, the newest first, a page at a time.
#[utoipa::path(
    get,
    path = "/v1/memories",
    tag = "memories",
    security(("api_token" = [])),
    params(ListMemories),
    responses((status = 200, body = MemoryPage), openapi::ListMemoriesErrors),
)]
pub(super) async fn list_memories(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ApiQuery(query): ApiQuery<ListMemories>,
) -> Result<Json<MemoryPage>, ApiError> {
    let namespace = checked_namespace(query.namespace)?;
    let asked = PageAsked::from_query(query.limit, query.cursor)?;
    let terms = query.q.as_deref().map(search_terms).unwrap_or_default();
    let searched = query.q.is_some();
    if searched && asked.before.is_some() {
        return Err(ApiError::new(
            Code::InvalidQuery,
            "a search (q) has one page: cursor is for listing without q",
        ));
    }
    if searched && terms.is_empty() {
        return Err(ApiError::new(
            Code::InvalidQuery,
            "q has no words to search for (letters or digits)",
        ));
    }
    // One more than asked, to tell whether a next page exists.
    let mut memories = state
        .store
        .search_memories(&MemoryQuery {
            tenant: tenant.0,
            namespace,
            terms,
            limit: asked.limit + u32::from(!searched),
            before: asked.before,
        })
        .await?;
    let next_cursor = if !searched && memories.len() > asked.limit as usize {
        memories.truncate(asked.limit as usize);
        memories.last().map(|memory| memory.id.clone())
    } else {
        None
    };
    Ok(Json(MemoryPage {
        memories: memories
            .into_iter()
            .map(|memory| MemoryView::new(memory, searched))
            .collect(),
        next_cursor,
    }))
}

/// Adds a memory for the tenant's tasks to recall.
#[utoipa::path(
    post,
    path = "/v1/memories",
    tag = "memories",
    security(("api_token" = [])),
    request_body = CreateMemory,
    responses(
        (status = 201, description = "Stored", body = MemoryView,
            headers(("Location" = String, description = "The memory's URL"))),
        openapi::CreateMemoryErrors,
    ),
)]
pub(super) async fn create_memory(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ApiJson(request): ApiJson<CreateMemory>,
) -> Result<impl IntoResponse, ApiError> {
    let namespace = checked_namespace(request.namespace)?;
    let metadata = match request.metadata {
        None | Some(Value::Null) => String::new(),
        Some(metadata) => metadata.to_string(),
    };
    let memory = NewMemory {
        tenant: tenant.0,
        namespace: namespace.unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()),
        text: request.text,
        metadata,
        task_id: None,
    }
    .validated(&state.memory)
    .map_err(|message| ApiError::new(Code::InvalidMemory, message))?;
    let stored = state.store.create_memory(memory, &state.memory).await?;
    let location = format!("/v1/memories/{}", stored.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(MemoryView::new(stored, false)),
    ))
}

/// One of the tenant's memories.
#[utoipa::path(
    get,
    path = "/v1/memories/{id}",
    tag = "memories",
    security(("api_token" = [])),
    params(("id" = String, Path, description = "The memory's id")),
    responses((status = 200, body = MemoryView), openapi::GetMemoryErrors),
)]
pub(super) async fn get_memory(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<MemoryView>, ApiError> {
    if uuid::Uuid::try_parse(&id).is_err() {
        return Err(ApiError::memory_not_found(&id));
    }
    match state.store.get_memory(&tenant.0, &id).await? {
        Some(memory) => Ok(Json(MemoryView::new(memory, false))),
        None => Err(ApiError::memory_not_found(&id)),
    }
}

/// Deletes one of the tenant's memories.
#[utoipa::path(
    delete,
    path = "/v1/memories/{id}",
    tag = "memories",
    security(("api_token" = [])),
    params(("id" = String, Path, description = "The memory's id")),
    responses((status = 204, description = "Deleted"), openapi::DeleteMemoryErrors),
)]
pub(super) async fn delete_memory(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    if uuid::Uuid::try_parse(&id).is_ok() && state.store.delete_memory(&tenant.0, &id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::memory_not_found(&id))
    }
}
