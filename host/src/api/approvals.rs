//! `/v1/tasks/{id}/approvals`: the tool calls of a task that need a
//! person's approval, and the answers (docs/architecture.md, "Approvals").

use axum::Json;
use axum::extract::{Extension, State};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::auth::{Principal, Tenant};
use super::views::timestamp;
use super::{ApiError, ApiJson, ApiPath, AppState, openapi, owned_task};
use crate::errors::Code;
use crate::store::{ApprovalRecord, ApprovalStatus, DecideOutcome, Decision};

/// The longest comment accepted, in bytes.
const MAX_COMMENT_BYTES: usize = 4096;

/// One tool call that needed approval.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ApprovalView {
    /// The call's id, as the planner gave it: the `{call}` to answer.
    call_id: String,
    /// The step the call runs as.
    step: u32,
    tool: String,
    /// The arguments the planner asked for.
    #[schema(value_type = Object)]
    input: Value,
    status: ApprovalStatus,
    /// The arguments the approver gave instead: what the tool receives.
    #[schema(value_type = Option<Object>)]
    edited_input: Option<Value>,
    comment: Option<String>,
    /// The API token's name (`tenant:<tenant>` for a token with none),
    /// `anonymous` without tokens, `timeout` or `cancel`.
    decided_by: Option<String>,
    #[schema(format = DateTime)]
    decided_at: Option<String>,
    #[schema(format = DateTime)]
    requested_at: String,
    /// Rejected as timed out from then on, if still pending.
    #[schema(format = DateTime)]
    expires_at: String,
}

impl From<ApprovalRecord> for ApprovalView {
    fn from(record: ApprovalRecord) -> Self {
        Self {
            call_id: record.call_id,
            step: record.step,
            tool: record.tool,
            input: record.input,
            status: record.status,
            edited_input: record.edited_input,
            comment: record.comment,
            decided_by: record.decided_by,
            decided_at: record.decided_at.map(timestamp),
            requested_at: timestamp(record.requested_at),
            expires_at: timestamp(record.expires_at),
        }
    }
}

/// A task's calls that needed approval, pending and answered.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ApprovalList {
    approvals: Vec<ApprovalView>,
}

/// The calls of a task that needed approval, by step: pending ones and
/// how earlier ones were answered.
#[utoipa::path(
    get,
    path = "/v1/tasks/{id}/approvals",
    tag = "tasks",
    security(("api_token" = [])),
    params(("id" = String, Path, min_length = 1, description = "The task's id")),
    responses((status = 200, body = ApprovalList), openapi::ListApprovalsErrors),
)]
pub(super) async fn list_approvals(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ApprovalList>, ApiError> {
    owned_task(&state, &tenant, &id).await?;
    let approvals = state.store.approvals(&id).await?;
    Ok(Json(ApprovalList {
        approvals: approvals.into_iter().map(ApprovalView::from).collect(),
    }))
}

/// An answer to a pending call.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct DecideApproval {
    /// `approve` or `reject`.
    decision: DecisionKind,
    /// Approvals only: the arguments to call the tool with instead of the
    /// planner's (a JSON object).
    #[schema(value_type = Option<Object>)]
    input: Option<Value>,
    /// Up to 4 KiB, no NUL; a rejection's comment reaches the planner.
    comment: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(super) enum DecisionKind {
    Approve,
    Reject,
}

/// Approves or rejects one pending call. Each call is answered once: a
/// second answer gets `409 approval_already_decided`. When the task has
/// no pending call left it goes back to the queue and runs the approved
/// calls (with the edited input, if given); a rejected call reaches the
/// planner as the call's error (`approval_rejected`).
#[utoipa::path(
    post,
    path = "/v1/tasks/{id}/approvals/{call}",
    tag = "tasks",
    security(("api_token" = [])),
    params(
        ("id" = String, Path, min_length = 1, description = "The task's id"),
        ("call" = String, Path, min_length = 1, description = "The pending call's id"),
    ),
    request_body = DecideApproval,
    responses(
        (status = 200, description = "Answered", body = ApprovalView),
        openapi::DecideApprovalErrors,
    ),
)]
pub(super) async fn decide_approval(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    Extension(principal): Extension<Principal>,
    ApiPath((id, call)): ApiPath<(String, String)>,
    ApiJson(request): ApiJson<DecideApproval>,
) -> Result<Json<ApprovalView>, ApiError> {
    owned_task(&state, &tenant, &id).await?;
    let approve = matches!(request.decision, DecisionKind::Approve);
    if let Some(input) = &request.input {
        if !approve {
            return Err(ApiError::new(
                Code::InvalidRequest,
                "`input` goes with an approval only: a rejected call does not run",
            ));
        }
        if !input.is_object() {
            return Err(ApiError::new(
                Code::InvalidRequest,
                "`input` must be a JSON object: the tool's arguments",
            ));
        }
    }
    if let Some(comment) = &request.comment
        && (comment.len() > MAX_COMMENT_BYTES || comment.contains('\0'))
    {
        return Err(ApiError::new(
            Code::InvalidRequest,
            format!("`comment` must be at most {MAX_COMMENT_BYTES} bytes, with no NUL"),
        ));
    }
    let decision = Decision {
        approve,
        input: request.input,
        comment: request.comment,
        by: principal.0,
    };
    match state.store.decide_approval(&id, &call, &decision).await? {
        DecideOutcome::Decided {
            approval,
            events,
            requeued,
        } => {
            for event in events {
                state.events.journaled(event);
            }
            if requeued {
                state.scheduler.wake();
            }
            Ok(Json(approval.into()))
        }
        DecideOutcome::AlreadyDecided(approval) => Err(ApiError::new(
            Code::ApprovalAlreadyDecided,
            format!(
                "call {call:?} of task {id} was already answered: {} by {} at {}",
                approval.status.as_str(),
                approval.decided_by.as_deref().unwrap_or("unknown"),
                approval.decided_at.map(timestamp).unwrap_or_default(),
            ),
        )),
        DecideOutcome::NotFound => Err(ApiError::approval_not_found(&id, &call)),
    }
}
