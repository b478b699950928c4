//! The API's one error type: a status, a stable code and a message, sent as
//! `{"error": {"code": "...", "message": "..."}}`. Internal details are
//! logged, never sent.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::errors::Code;
use crate::store::StoreError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: Code,
    pub message: String,
    /// Sent as `Retry-After` (seconds): when a refused request may be tried
    /// again.
    pub retry_after: Option<Duration>,
}

impl ApiError {
    /// A refusal with `code`, whose status comes from the one table
    /// ([`Code::status`]).
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        let status = code
            .status()
            .and_then(|status| StatusCode::from_u16(status).ok())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// Tells the client, in `Retry-After`, to try again after `wait`
    /// (rounded up to whole seconds, at least one).
    pub fn with_retry_after(mut self, wait: Duration) -> Self {
        self.retry_after = Some(wait);
        self
    }

    pub fn task_not_found(id: &str) -> Self {
        Self::new(Code::TaskNotFound, format!("no task has the id {id:?}"))
    }

    pub fn memory_not_found(id: &str) -> Self {
        Self::new(
            Code::MemoryNotFound,
            format!("this tenant has no memory with the id {id:?}"),
        )
    }

    pub fn approval_not_found(task: &str, call: &str) -> Self {
        Self::new(
            Code::ApprovalNotFound,
            format!("task {task} has no call {call:?} that needs approval"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code.as_str(), "message": self.message}});
        let mut response = (self.status, Json(body)).into_response();
        if let Some(wait) = self.retry_after {
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound(id) => Self::task_not_found(&id),
            StoreError::MemoryFull(message) => Self::new(Code::MemoryFull, message),
            StoreError::Full(detail) => {
                tracing::error!(%detail, "the store is full; refusing writes until room is made");
                Self::new(
                    Code::StoreFull,
                    "the server's database is full; nothing was written: try again once an \
                     operator has made room",
                )
            }
            other => {
                tracing::error!(error = %other, "store error while serving a request");
                Self::new(
                    Code::InternalError,
                    "the server failed to handle the request; details are in its log",
                )
            }
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::JsonSyntaxError(e) => Self::new(
                Code::InvalidJson,
                format!("the body is not valid JSON: {}", e.body_text()),
            ),
            JsonRejection::JsonDataError(e) => Self::new(
                Code::InvalidRequest,
                format!(
                    "the body does not have the expected fields: {}",
                    e.body_text()
                ),
            ),
            JsonRejection::MissingJsonContentType(_) => Self::new(
                Code::UnsupportedMediaType,
                "send the body as JSON with `Content-Type: application/json`",
            ),
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => Self::new(
                Code::PayloadTooLarge,
                "the request body is larger than this server accepts",
            ),
            other => Self::new(Code::InvalidRequest, other.body_text()),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::new(Code::InvalidQuery, rejection.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self::new(
            Code::InvalidPath,
            format!(
                "the path is not one this endpoint accepts: {}",
                rejection.body_text()
            ),
        )
    }
}
