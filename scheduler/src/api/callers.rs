//! Who calls, from the request's bearer token, as axum extractors: a handler names the callers
//! it serves in its arguments ([`Person`]: an operator or a client; [`Operator`]), and anyone else
//! gets the 401 or 403 that says why. The asset calls check by hand ([`caller`], [`uploader`]),
//! so that an upload from a caller who may not upload is refused before its body is read.
//!
//! A browser signed in to the console ([`super::console`]) is a caller too, by its session
//! cookie, with the token it signed in with; a call from it that changes anything (not GET or
//! HEAD) must carry the session's CSRF token in `x-kiln-csrf`, or is refused.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, header};

use super::{ApiError, AppState};
use crate::auth::{Caller, Role};
use crate::scheduler::Scheduler;

/// A caller who may use the job API: an operator or a client (a worker or device token only
/// moves assets).
pub struct Person(pub Caller);

/// An operator.
pub struct Operator(pub Caller);

/// The console's session cookie.
pub(super) const SESSION_COOKIE: &str = "kiln_session";

/// The header that carries a console session's CSRF token on a call that changes anything.
pub(super) const CSRF_HEADER: &str = "x-kiln-csrf";

/// The console session id in a request's cookies.
pub(super) fn session_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == SESSION_COOKIE)
        .map(|(_, v)| v.to_owned())
}

/// The caller a request's bearer token names, or its console session: a call with `method` that
/// changes anything must then carry the session's CSRF token.
pub(super) fn caller(s: &Scheduler, method: &Method, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        if let Some(id) = session_id(headers) {
            let session = s
                .sessions
                .get(&id, kiln_protocol::now_ms())
                .ok_or_else(|| ApiError::unauthorized("the console session has ended; sign in again at /login"))?;
            let safe = *method == Method::GET || *method == Method::HEAD;
            let csrf = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
            if !safe && csrf != Some(session.csrf.as_str()) {
                return Err(ApiError::forbidden(format!(
                    "a call from a console session must carry its CSRF token in {CSRF_HEADER}"
                )));
            }
            return s
                .authenticate(session.token.expose())
                .ok_or_else(|| ApiError::unauthorized("the session's token was revoked or expired; sign in again"));
        }
        return Err(ApiError::unauthorized(
            "missing; send `Authorization: Bearer <token>` (the operator's is in DATA/operator.token)",
        ));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .ok_or_else(|| ApiError::unauthorized("expected `Bearer <token>`"))?;
    s.authenticate(token).ok_or_else(|| ApiError::unauthorized("unknown, revoked or expired token"))
}

/// The caller, if the job API is theirs.
fn person(s: &Scheduler, method: &Method, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let who = caller(s, method, headers)?;
    match who.role {
        Role::Worker => Err(ApiError::forbidden("a worker token may only upload assets")),
        Role::Device => Err(ApiError::forbidden("a device token may only fetch and upload assets")),
        Role::Operator | Role::Client => Ok(who),
    }
}

/// A caller who may upload assets: a worker, a device or an operator (a client may not).
pub(super) fn uploader(s: &Scheduler, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let who = caller(s, &Method::PUT, headers)?;
    match who.role {
        Role::Worker | Role::Operator | Role::Device => Ok(who),
        Role::Client => Err(ApiError::forbidden("uploading assets needs a worker, device or operator token")),
    }
}

impl FromRequestParts<AppState> for Person {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Self, ApiError> {
        person(s, &parts.method, &parts.headers).map(Person)
    }
}

impl FromRequestParts<AppState> for Operator {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Self, ApiError> {
        let who = person(s, &parts.method, &parts.headers)?;
        if who.role != Role::Operator {
            let path = parts.uri.path();
            return Err(ApiError::forbidden(format!(
                "{path} is the operator's; the token {:?} is a client's",
                who.name
            )));
        }
        Ok(Operator(who))
    }
}
