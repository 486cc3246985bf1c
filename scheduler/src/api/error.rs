//! API errors: one type owns the mapping to HTTP status and the JSON body ([`ErrorBody`]), which
//! names the field and the limit. A rejection is the caller's to fix (4xx); the rest are ours
//! (5xx) and are logged with their whole chain.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kiln_protocol::api::{ErrorBody, ErrorDetail};

use crate::scheduler::{SubmitError, TokenRefusal};
use crate::store::StoreError;

/// An API error.
#[derive(Debug)]
pub enum ApiError {
    /// The request is wrong, and the caller can fix it (4xx).
    Rejected {
        /// The status.
        status: StatusCode,
        /// A stable code, e.g. `invalid_request`.
        code: &'static str,
        /// What is wrong, starting with the field when there is one.
        message: String,
        /// The field at fault.
        field: Option<String>,
    },
    /// Ours (5xx): logged with its chain when made; the caller sees a short message.
    Unexpected {
        /// The status: 500, or 503 while the farm shuts down.
        status: StatusCode,
        /// A stable code, e.g. `internal`.
        code: &'static str,
        /// What the caller sees.
        message: String,
    },
}

impl ApiError {
    fn rejected(status: StatusCode, code: &'static str, message: String, field: Option<String>) -> ApiError {
        ApiError::Rejected { status, code, message, field }
    }

    /// A 400 about `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> ApiError {
        let field = field.into();
        let message = format!("{field}: {}", message.into());
        ApiError::rejected(StatusCode::BAD_REQUEST, "invalid_request", message, Some(field))
    }

    /// A 400 whose message already starts with `field: `.
    pub fn invalid_msg(message: String) -> ApiError {
        let field = message.split_once(": ").map(|(f, _)| f.to_owned()).filter(|f| !f.contains(' '));
        ApiError::rejected(StatusCode::BAD_REQUEST, "invalid_request", message, field)
    }

    /// A 401.
    pub fn unauthorized(message: &str) -> ApiError {
        let message = format!("authorization: {message}");
        ApiError::rejected(StatusCode::UNAUTHORIZED, "unauthorized", message, Some("authorization".into()))
    }

    /// A 403.
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::rejected(StatusCode::FORBIDDEN, "forbidden", message.into(), None)
    }

    /// A 404.
    pub fn not_found(what: impl Into<String>) -> ApiError {
        ApiError::rejected(StatusCode::NOT_FOUND, "not_found", what.into(), None)
    }

    /// A 409.
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::rejected(StatusCode::CONFLICT, "conflict", message.into(), None)
    }

    /// A 413.
    pub fn too_large(limit: usize) -> ApiError {
        let message = format!("body: exceeds the limit of {limit} bytes (scheduler.limits.max_body_bytes)");
        ApiError::rejected(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", message, Some("body".into()))
    }

    /// A 408: the call took longer than `secs` (the limit `key` of `scheduler.limits`).
    pub fn timed_out(secs: u64, key: &str) -> ApiError {
        let message = format!("request: not done within {secs} s (scheduler.limits.{key})");
        ApiError::rejected(StatusCode::REQUEST_TIMEOUT, "request_timeout", message, Some("request".into()))
    }

    /// A 429: the caller holds too many of something at once.
    pub fn too_many(message: impl Into<String>) -> ApiError {
        ApiError::rejected(StatusCode::TOO_MANY_REQUESTS, "too_many", message.into(), None)
    }

    /// A 500, logged here with its chain.
    pub fn internal(e: &dyn std::error::Error) -> ApiError {
        tracing::error!(error = %e, source = ?e.source(), "api: internal error");
        ApiError::Unexpected {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal",
            message: format!("internal error: {e}"),
        }
    }

    /// Parses a JSON body, refusing one with a NUL in any string (named by its path), which no
    /// store keeps: a 400 either way, naming the field ([`kiln_protocol::decode_json`]).
    pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
        Ok(kiln_protocol::decode_json(body)?)
    }

    /// The same error about a part of a larger request: `prefix` goes before its message (an
    /// item of a batch: `jobs[3].`).
    pub fn within(self, prefix: &str) -> ApiError {
        match self {
            ApiError::Rejected { status, code, message, field } => ApiError::Rejected {
                status,
                code,
                message: format!("{prefix}{message}"),
                field: field.map(|f| format!("{prefix}{f}")),
            },
            e => e,
        }
    }

    /// Its status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Rejected { status, .. } | ApiError::Unexpected { status, .. } => *status,
        }
    }
}

impl From<kiln_protocol::JsonError> for ApiError {
    /// A 400 naming the field; a document wrong as a whole is named `body`.
    fn from(e: kiln_protocol::JsonError) -> Self {
        let message = match e.field.as_str() {
            "body" => format!("body: not valid JSON for this call: {}", e.message),
            _ => e.to_string(),
        };
        ApiError::rejected(StatusCode::BAD_REQUEST, "invalid_json", message, Some(e.field))
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(what) => ApiError::conflict(what),
            StoreError::Closed => ApiError::Unexpected {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: "shutting_down",
                message: "the farm is shutting down; try again shortly".into(),
            },
            e if crate::store::writer::refused_by_database(&e) => ApiError::rejected(
                StatusCode::UNPROCESSABLE_ENTITY,
                "refused_by_store",
                format!("the store refused this write, and would again: {e}"),
                None,
            ),
            e => ApiError::internal(&e),
        }
    }
}

impl From<TokenRefusal> for ApiError {
    fn from(e: TokenRefusal) -> Self {
        match e {
            TokenRefusal::Field { field, message } => ApiError::invalid(field, message),
            served @ TokenRefusal::Served { .. } => ApiError::conflict(served.to_string()),
            TokenRefusal::Store(s) => s.into(),
        }
    }
}

impl From<crate::costs::OverBudget> for ApiError {
    fn from(o: crate::costs::OverBudget) -> Self {
        ApiError::rejected(StatusCode::TOO_MANY_REQUESTS, "over_budget", o.to_string(), Some("budget".into()))
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Store(s) => s.into(),
            SubmitError::OverBudget(o) => o.into(),
            e => ApiError::invalid_msg(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let (code, message, field) = match self {
            ApiError::Rejected { code, message, field, .. } => (code, message, field),
            ApiError::Unexpected { code, message, .. } => (code, message, None),
        };
        let body = ErrorBody { error: ErrorDetail { code: code.to_owned(), message, field } };
        let mut resp = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert("www-authenticate", axum::http::HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body(e: ApiError) -> (StatusCode, serde_json::Value) {
        let r = e.into_response();
        let status = r.status();
        let bytes = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn a_rejection_names_its_field_and_an_unexpected_error_does_not() {
        let (status, v) = body(ApiError::invalid("limit", "0 is outside 1..=500")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(v["error"]["field"], "limit");
        assert_eq!(v["error"]["message"], "limit: 0 is outside 1..=500");
        let (status, v) = body(ApiError::invalid("width", "too wide").within("jobs[3].")).await;
        assert_eq!(
            (status, v["error"]["message"].as_str()),
            (StatusCode::BAD_REQUEST, Some("jobs[3].width: too wide"))
        );
        assert_eq!(v["error"]["field"], "jobs[3].width");
        let (status, v) = body(ApiError::internal(&std::io::Error::other("disk on fire"))).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(v["error"]["code"], "internal");
        assert!(v["error"].get("field").is_none(), "{v}");
        let (status, v) = body(StoreError::Closed.into()).await;
        assert_eq!((status, &v["error"]["code"]), (StatusCode::SERVICE_UNAVAILABLE, &"shutting_down".into()));
    }
}
