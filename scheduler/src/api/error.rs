//! API errors: one type owns the mapping to HTTP status and the JSON body, which names the field
//! and the limit. Validation errors are the client's to fix (4xx); the rest are ours (5xx) and
//! are logged with their whole chain.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::scheduler::SubmitError;
use crate::store::StoreError;

/// An API error.
#[derive(Debug)]
pub struct ApiError {
    /// The status.
    pub status: StatusCode,
    /// A stable code, e.g. `invalid_request`.
    pub code: &'static str,
    /// What is wrong, starting with the field when there is one.
    pub message: String,
    /// The field at fault.
    pub field: Option<String>,
}

impl ApiError {
    /// A 400 about `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> ApiError {
        let field = field.into();
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_request",
            message: format!("{field}: {}", message.into()),
            field: Some(field),
        }
    }

    /// A 400 whose message already starts with `field: `.
    pub fn invalid_msg(message: String) -> ApiError {
        let field = message.split_once(": ").map(|(f, _)| f.to_owned()).filter(|f| !f.contains(' '));
        ApiError { status: StatusCode::BAD_REQUEST, code: "invalid_request", message, field }
    }

    /// A 401.
    pub fn unauthorized(message: &str) -> ApiError {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            code: "unauthorized",
            message: format!("authorization: {message}"),
            field: Some("authorization".into()),
        }
    }

    /// A 403.
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::FORBIDDEN, code: "forbidden", message: message.into(), field: None }
    }

    /// A 404.
    pub fn not_found(what: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::NOT_FOUND, code: "not_found", message: what.into(), field: None }
    }

    /// A 409.
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::CONFLICT, code: "conflict", message: message.into(), field: None }
    }

    /// A 413.
    pub fn too_large(limit: usize) -> ApiError {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: "body_too_large",
            message: format!("body: exceeds the limit of {limit} bytes (scheduler.limits.max_body_bytes)"),
            field: Some("body".into()),
        }
    }

    /// A 500 (logged here with its chain; the client sees a short message).
    pub fn internal(e: &dyn std::error::Error) -> ApiError {
        tracing::error!(error = %e, source = ?e.source(), "api: internal error");
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal",
            message: format!("internal error: {e}"),
            field: None,
        }
    }

    /// The error's message after a JSON body failed to parse, naming the field where serde does.
    pub fn from_json(e: &serde_json::Error) -> ApiError {
        let msg = e.to_string();
        let field = ["unknown field `", "missing field `", "duplicate field `"]
            .iter()
            .find_map(|p| msg.split_once(p).and_then(|(_, rest)| rest.split_once('`')).map(|(f, _)| f.to_owned()));
        let message = match &field {
            Some(f) => format!("{f}: {msg}"),
            None => format!("body: not valid JSON for this call: {msg}"),
        };
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_json",
            message,
            field: field.or(Some("body".into())),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(what) => ApiError::conflict(what),
            StoreError::Closed => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: "shutting_down",
                message: "the farm is shutting down; try again shortly".into(),
                field: None,
            },
            e => ApiError::internal(&e),
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Store(s) => s.into(),
            e => ApiError::invalid_msg(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "code": self.code, "message": self.message });
        if let Some(f) = self.field {
            body["field"] = f.into();
        }
        let mut resp = (self.status, Json(json!({ "error": body }))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert("www-authenticate", axum::http::HeaderValue::from_static("Bearer"));
        }
        resp
    }
}
