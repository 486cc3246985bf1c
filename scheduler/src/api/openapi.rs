//! The API's OpenAPI document, derived from the handlers' annotations and the types they take and
//! answer (utoipa): each route with every status it answers, and schemas a validator can tell
//! apart. Served at `/v1/openapi.json`.

use std::sync::OnceLock;

use kiln_protocol::{JobRequest, api};
use serde::{Deserialize, Serialize};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

/// `POST /v1/jobs`'s body: one job, or an array of them.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum SubmitBody {
    /// One job.
    One(JobRequest),
    /// Several, admitted together (each validated before any is).
    Many(Vec<JobRequest>),
}

/// `POST /v1/jobs`'s 201: the job, or `{jobs}` for an array. A job has an `id` and no `jobs`; a
/// batch the other way round, so one schema matches each answer.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Submitted {
    /// One job.
    One(Box<api::Job>),
    /// The jobs of an array, in its order.
    Many(api::JobBatch),
}

/// The data of an event on `GET /v1/jobs/{id}/events`: a `state` event's [`api::JobEvent`], or a
/// `progress` event's [`api::JobProgress`].
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum EventData {
    /// `event: state`.
    State(api::JobEvent),
    /// `event: progress`.
    Progress(api::JobProgress),
}

/// The answers to a caller without the role a call needs: `401` without a known token, `403`
/// with a token of the wrong kind (`forbidden` says which). One enum a role.
macro_rules! refusals {
    ($(#[doc = $doc:tt])* $name:ident, forbidden: $forbidden:tt) => {
        $(#[doc = $doc])*
        #[derive(utoipa::IntoResponses)]
        pub enum $name {
            /// No token, or one that is unknown or revoked.
            #[response(status = 401)]
            Unauthorized(api::ErrorBody),
            #[doc = $forbidden]
            #[response(status = 403)]
            Forbidden(api::ErrorBody),
        }
    };
}

refusals!(
    /// What a call of the job API or the fleet's answers a caller who may not make it.
    PersonOnly,
    forbidden: "A worker or device token."
);
refusals!(
    /// What an operator's call answers a caller who is not one.
    OperatorOnly,
    forbidden: "Not an operator token."
);
refusals!(
    /// What an upload answers a caller who may not upload.
    UploaderOnly,
    forbidden: "A client token."
);

/// Every call but `/healthz`, `/metrics` and this document needs `Authorization: Bearer <token>`.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    }
}

/// The API's document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Kiln scheduler API",
        description = "Render jobs, their events and assets, the workers, and the edge fleet's devices and tasks. Every call but /healthz, /metrics and this document needs `Authorization: Bearer <token>`; assets need none when `scheduler.public_assets` is set. Errors are `{\"error\": {\"code\", \"message\", \"field\"}}`; the message names the field and the limit."
    ),
    servers((url = "http://127.0.0.1:7878")),
    security(("bearer" = [])),
    modifiers(&BearerAuth),
    paths(
        super::submit, super::list, super::get_job, super::cancel, super::events,
        super::assets::asset, super::assets::put_asset, super::assets::provenance, super::assets::put_provenance,
        super::workers, super::resume_worker, super::drain_worker, super::create_token, super::list_tokens, super::revoke_token,
        super::openapi_json, super::healthz, super::metrics,
        super::fleet::list_devices, super::fleet::get_device, super::fleet::create_task,
        super::fleet::list_tasks, super::fleet::get_task,
        super::orders::create_order, super::orders::list_orders, super::orders::get_order,
        super::orders::cancel_order, super::orders::list_approvals, super::orders::decide,
        super::orders::list_incidents, super::orders::get_incident, super::orders::act_on_incident,
        super::orders::usage,
    ),
    components(schemas(SubmitBody, Submitted, EventData, api::Job, api::JobBatch, api::JobPage, api::JobEvent, api::JobProgress, api::ErrorBody, kiln_protocol::Tile)),
    tags(
        (name = "jobs", description = "Render jobs: submit, read, wait, cancel, follow"),
        (name = "assets", description = "PNGs by BLAKE3, their thumbnails and provenance"),
        (name = "workers", description = "The worker registry (operator)"),
        (name = "tokens", description = "API tokens (operator)"),
        (name = "fleet", description = "Edge devices and their physical tasks"),
        (name = "orders", description = "Studio orders: plans run as one durable object, and their approvals"),
        (name = "incidents", description = "What needs the operator (operator)"),
        (name = "meta", description = "Health, metrics and this document"),
    )
)]
pub struct ApiDoc;

/// The document as JSON, made once.
pub fn document() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| ApiDoc::openapi().to_pretty_json().unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}")))
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    fn doc() -> Value {
        serde_json::from_str(document()).unwrap()
    }

    /// Every route the router serves, with its method.
    const ROUTES: [(&str, &str); 33] = [
        ("post", "/v1/jobs"),
        ("get", "/v1/jobs"),
        ("get", "/v1/jobs/{id}"),
        ("post", "/v1/jobs/{id}/cancel"),
        ("get", "/v1/jobs/{id}/events"),
        ("get", "/v1/assets/{hash}"),
        ("put", "/v1/assets/{hash}"),
        ("get", "/v1/assets/{hash}/provenance"),
        ("put", "/v1/assets/{hash}/provenance"),
        ("get", "/v1/workers"),
        ("post", "/v1/workers/{id}/resume"),
        ("post", "/v1/workers/{id}/drain"),
        ("post", "/v1/tokens"),
        ("get", "/v1/tokens"),
        ("delete", "/v1/tokens/{name}"),
        ("get", "/v1/openapi.json"),
        ("get", "/healthz"),
        ("get", "/metrics"),
        ("get", "/v1/devices"),
        ("get", "/v1/devices/{id}"),
        ("post", "/v1/devices/{id}/tasks"),
        ("get", "/v1/tasks"),
        ("get", "/v1/tasks/{id}"),
        ("post", "/v1/orders"),
        ("get", "/v1/orders"),
        ("get", "/v1/orders/{id}"),
        ("post", "/v1/orders/{id}/cancel"),
        ("get", "/v1/approvals"),
        ("post", "/v1/approvals/{id}"),
        ("get", "/v1/incidents"),
        ("get", "/v1/incidents/{id}"),
        ("post", "/v1/incidents/{id}"),
        ("get", "/v1/usage"),
    ];

    #[test]
    fn every_route_is_documented_with_the_statuses_it_answers() {
        let d = doc();
        let documented: usize = d["paths"].as_object().unwrap().values().map(|p| p.as_object().unwrap().len()).sum();
        assert_eq!(documented, ROUTES.len(), "a route documented that the router does not serve, or the other way");
        for (method, path) in ROUTES {
            let op = &d["paths"][path][method];
            assert!(op.is_object(), "{method} {path} is documented");
            let statuses = op["responses"].as_object().unwrap();
            let open = ["/healthz", "/metrics", "/v1/openapi.json"].contains(&path) || path.starts_with("/v1/assets");
            if !open {
                assert!(statuses.contains_key("401"), "{method} {path} says it answers 401");
            }
            assert!(statuses.keys().any(|s| s.starts_with('2')), "{method} {path} says how it succeeds");
        }
        // The 400s a query's limits give.
        for (method, path) in
            [("post", "/v1/jobs"), ("get", "/v1/jobs/{id}"), ("get", "/v1/jobs"), ("get", "/v1/tasks")]
        {
            assert!(d["paths"][path][method]["responses"]["400"].is_object(), "{method} {path} answers 400");
        }
        let wait = d["paths"]["/v1/jobs/{id}"]["get"]["parameters"].as_array().unwrap();
        let wait = wait.iter().find(|p| p["name"] == "wait").unwrap();
        assert_eq!((&wait["schema"]["minimum"], &wait["schema"]["maximum"]), (&Value::from(0), &Value::from(60)));
    }

    #[test]
    fn a_submits_answer_matches_one_schema_for_one_job_and_the_other_for_a_batch() {
        let d = doc();
        let schemas = &d["components"]["schemas"];
        let required = |name: &str| -> Vec<String> {
            schemas[name]["required"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect()
        };
        let (job, batch) = (required("Job"), required("JobBatch"));
        assert!(job.contains(&"id".to_owned()) && !job.contains(&"jobs".to_owned()), "{job:?}");
        assert_eq!(batch, ["jobs"]);
        let answer = &d["paths"]["/v1/jobs"]["post"]["responses"]["201"]["content"]["application/json"]["schema"];
        assert_eq!(answer["$ref"], "#/components/schemas/Submitted");
        assert_eq!(schemas["Submitted"]["oneOf"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn the_event_stream_documents_both_kinds_of_event() {
        let d = doc();
        let stream = &d["paths"]["/v1/jobs/{id}/events"]["get"]["responses"]["200"]["content"]["text/event-stream"];
        assert_eq!(stream["schema"]["$ref"], "#/components/schemas/EventData");
        let kinds = d["components"]["schemas"]["EventData"]["oneOf"].as_array().unwrap();
        let refs: Vec<&str> = kinds.iter().filter_map(|k| k["$ref"].as_str()).collect();
        assert_eq!(refs, ["#/components/schemas/JobEvent", "#/components/schemas/JobProgress"]);
    }
}
