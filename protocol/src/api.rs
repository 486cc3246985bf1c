//! The scheduler's HTTP API under `/v1`, as types: what each call answers (and the bodies it
//! takes beyond [`crate::JobRequest`]). The scheduler writes them, the CLI, the benchmarks and the
//! tests read them, and with the `openapi` feature they are the schemas of the scheduler's OpenAPI
//! document. A versioned contract (DESIGN.md): fields are added, never changed.

use serde::{Deserialize, Serialize};

use crate::fleet::{TaskKind, TaskState};
use crate::wire::Heartbeat;
use crate::{JobState, Tier};

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything: any job, tokens, the operator's views.
    Operator,
    /// Submit jobs, read them, cancel its own.
    Client,
    /// Upload rendered assets (a `kiln-worker` daemon).
    Worker,
    /// Fetch assets and upload photos (a `kiln-edge` agent).
    Device,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 4] = [Role::Operator, Role::Client, Role::Worker, Role::Device];

    /// The role's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Client => "client",
            Role::Worker => "worker",
            Role::Device => "device",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("role: unknown role {s:?}; expected operator, client, worker or device"))
    }
}

/// A job (`GET /v1/jobs/{id}` and every answer that carries jobs). Times are RFC 3339 in UTC.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Job {
    /// The asset, once it has succeeded or was answered from the cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asset: Option<String>,
    /// Attempts made (0 before the first).
    pub attempt: u32,
    /// The cache key (BLAKE3 of the request's canonical form).
    pub cache_key: String,
    /// The name of the token that submitted it.
    pub client: String,
    /// When it was submitted.
    pub created_at: String,
    /// Whether the print dither runs.
    pub dither: bool,
    /// The last error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// The job whose render this one shares (single flight).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follows: Option<String>,
    /// Height in pixels.
    pub height: u32,
    /// Its id.
    pub id: String,
    /// The submitter's idempotency key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Where to find it, its events, and once it has one, its asset.
    pub links: JobLinks,
    /// The model.
    pub model: String,
    /// The prompt, normalised.
    pub prompt: String,
    /// Supersampling per axis.
    pub samples: u32,
    /// The seed.
    pub seed: u64,
    /// When its render started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// Where it is.
    pub state: JobState,
    /// Its tier.
    pub tier: Tier,
    /// The rows it renders, for a tile of a job cut up across the farm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tile: Option<crate::Tile>,
    /// When it last changed.
    pub updated_at: String,
    /// Whether the preview watermark runs.
    pub watermark: bool,
    /// Width in pixels.
    pub width: u32,
}

/// A job's links.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobLinks {
    /// Its asset's PNG, once it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asset: Option<String>,
    /// Its event stream.
    pub events: String,
    /// Its asset's provenance, once it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<String>,
    /// Itself.
    #[serde(rename = "self")]
    pub self_: String,
    /// Its asset's thumbnail, once it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thumbnail: Option<String>,
}

/// `POST /v1/jobs` with an array: the jobs, in the order given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobBatch {
    /// The jobs.
    pub jobs: Vec<Job>,
}

/// `GET /v1/jobs`: a page of jobs, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobPage {
    /// The jobs.
    pub jobs: Vec<Job>,
    /// The `cursor` of the next page, if there may be one.
    pub next: Option<String>,
}

/// A `state` event of `GET /v1/jobs/{id}/events`: one transition, already durable; the SSE
/// event's id is its `seq` (send it back as `Last-Event-ID` to resume).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobEvent {
    /// Its place in the order of every job's events.
    pub seq: i64,
    /// The job.
    pub job_id: String,
    /// When, unix milliseconds.
    pub at_ms: i64,
    /// The state the job moved to.
    pub state: JobState,
    /// The attempt.
    pub attempt: u32,
    /// Why, or what happened.
    pub detail: String,
    /// The asset, for `succeeded` and `cached`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asset: Option<String>,
    /// The error, for `failed` and retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A `progress` event of `GET /v1/jobs/{id}/events`: rows of the render done so far (not
/// stored; at most every 2% and the end).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobProgress {
    /// The job.
    pub job_id: String,
    /// Rows finished.
    pub rows_done: u32,
    /// Rows in all.
    pub rows: u32,
    /// For a job cut into tiles across the farm: tiles finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiles_done: Option<u32>,
    /// For a job cut into tiles: tiles in all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiles: Option<u32>,
}

/// Every error: `{"error": {...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    /// A stable code: `invalid_request`, `invalid_json`, `unauthorized`, `forbidden`, `not_found`,
    /// `conflict`, `body_too_large`, `shutting_down`, `internal`.
    pub code: String,
    /// What is wrong, starting with the field when there is one, naming the limit.
    pub message: String,
    /// The field at fault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// `POST /v1/tokens`'s body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// Who holds it: 1 to 100 printable characters, unique.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// For a `device` token: the device ids its agent serves. Tasks for these devices are signed
    /// with this token's key, so only its holder can check them; a device is served by one token.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
    /// It stops working this many seconds from now; never when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_seconds: Option<u64>,
    /// What it may spend per `budget_period`, in weighted device-seconds (a client token); no
    /// limit when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_seconds: Option<u64>,
    /// The budget's period: `day` (the default), `week` or `month`, in UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_period: Option<String>,
}

/// One token as `GET /v1/tokens` lists it (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenInfo {
    /// Who holds it.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// The devices it serves (a `device` token).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
    /// When it was made, unix milliseconds.
    pub created_ms: i64,
    /// When it stops working, unix milliseconds; never when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<i64>,
    /// Whether it has expired.
    pub expired: bool,
    /// Its budget per `budget_period`, weighted device-seconds; none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_seconds: Option<u64>,
    /// The budget's period: day, week or month.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_period: Option<String>,
}

/// `GET /v1/tokens`: the tokens not revoked, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Tokens {
    /// The tokens.
    pub tokens: Vec<TokenInfo>,
}

/// `POST /v1/tokens`'s answer: the secret, shown this once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenCreated {
    /// Who holds it.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// The secret (`kiln_` and 32 hex digits); only its hash is kept.
    pub token: String,
    /// The devices it serves (a `device` token).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
    /// When it stops working, unix milliseconds; never when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<i64>,
    /// Its budget per `budget_period`, weighted device-seconds; none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_seconds: Option<u64>,
    /// The budget's period: day, week or month.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_period: Option<String>,
}

/// `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Health {
    /// `ok`, or `unavailable` (503) while the database does not answer.
    pub status: String,
    /// Why it is unavailable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What keeps the farm from doing its work though the scheduler is up: a tier with jobs
    /// waiting and no active worker serving it. The status stays `ok` (200).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// A worker as `GET /v1/workers` shows it: its last heartbeat (an in-process worker's: what it
/// was started with), its state and when it was last heard from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Worker {
    /// Its last heartbeat.
    #[serde(flatten)]
    pub heartbeat: Heartbeat,
    /// `active`, `draining`, `drained` or `lost`.
    pub state: String,
    /// Why the scheduler drained it, while it is drained.
    pub drained_reason: Option<String>,
    /// When it was last heard from, unix milliseconds (an in-process worker: now).
    pub last_seen_ms: i64,
}

/// A worker the scheduler drained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DrainedWorker {
    /// Its id.
    pub worker_id: String,
    /// Why.
    pub reason: String,
    /// When, unix milliseconds.
    pub at_ms: i64,
}

/// `GET /v1/workers`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Workers {
    /// Every worker heard from, by id.
    pub workers: Vec<Worker>,
    /// Every drained worker, heard from or not.
    pub drained: Vec<DrainedWorker>,
}

/// `POST /v1/workers/{id}/resume`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Resumed {
    /// The worker.
    pub worker_id: String,
    /// `resumed`, or `drained` (`POST /v1/workers/{id}/drain`).
    pub state: String,
}

/// `POST /v1/workers/{id}/drain`'s body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Drain {
    /// Why, for the workers view and the worker's own log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// An edge device (`GET /v1/devices`, `GET /v1/devices/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Device {
    /// Its id.
    pub id: String,
    /// `printer`, `lights`, `camera` or `display`.
    pub kind: String,
    /// `online`, `degraded` or `offline`.
    pub state: String,
    /// Why, when degraded or offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The start of its agent it last announced.
    pub boot_id: String,
    /// Its agent's version.
    pub version: String,
    /// What it can do.
    pub capabilities: Vec<String>,
    /// When the scheduler last heard from it.
    pub last_seen_at: String,
    /// The sequence number of its latest telemetry.
    pub telemetry_seq: i64,
    /// When its latest telemetry came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telemetry_at: Option<String>,
    /// Seconds since then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds_since_telemetry: Option<f64>,
    /// Telemetry its agent dropped because its spool was full.
    pub spool_dropped: i64,
    /// Its latest readings (`GET /v1/devices/{id}` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub telemetry: Option<serde_json::Value>,
    /// Itself, and its tasks.
    pub links: DeviceLinks,
}

/// A device's links.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeviceLinks {
    /// Itself.
    #[serde(rename = "self")]
    pub self_: String,
    /// Its tasks.
    pub tasks: String,
}

/// `GET /v1/devices`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Devices {
    /// Every device the fleet bridge has heard of.
    pub devices: Vec<Device>,
}

/// `POST /v1/devices/{id}/tasks`'s body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewTask {
    /// What to do; the device's kind must do it.
    pub kind: TaskKind,
    /// The asset to print or display (its hash), stored here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asset: Option<String>,
    /// Parameters (lights: `scene`, `brightness`).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub params: serde_json::Map<String, serde_json::Value>,
    /// Seconds until it is past its deadline (1 to a week; default the farm's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_seconds: Option<u64>,
}

/// A device task (`GET /v1/tasks/{id}` and every answer that carries tasks).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Task {
    /// Its id.
    pub id: String,
    /// Its device.
    pub device_id: String,
    /// What it does.
    pub kind: TaskKind,
    /// Where it is.
    pub state: TaskState,
    /// Its parameters.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub params: serde_json::Map<String, serde_json::Value>,
    /// Times it was sent.
    pub sends: i64,
    /// After this it is not run.
    pub deadline_at: String,
    /// Who created it.
    pub created_by: String,
    /// When it was created.
    pub created_at: String,
    /// When it last changed.
    pub updated_at: String,
    /// The asset it works on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asset: Option<String>,
    /// The last note: why it failed, what was done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// An asset it made (a capture's photo).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_asset: Option<String>,
    /// Every state it went through (`GET /v1/tasks/{id}` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<TaskEvent>>,
    /// Itself, its device, and the asset it made.
    pub links: TaskLinks,
}

/// One state a task went through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaskEvent {
    /// The state.
    pub state: TaskState,
    /// When.
    pub at: String,
    /// A note.
    pub detail: Option<String>,
}

/// A task's links.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaskLinks {
    /// Itself.
    #[serde(rename = "self")]
    pub self_: String,
    /// Its device.
    pub device: String,
    /// The asset it made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_asset: Option<String>,
}

/// `GET /v1/tasks`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Tasks {
    /// The tasks, newest first.
    pub tasks: Vec<Task>,
}

/// `POST /v1/orders`' body: a plan to run on a prompt and its seeds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewOrder {
    /// The plan: `gallery-print` (the default) or one written in the config file.
    #[serde(default = "gallery_print")]
    pub plan: String,
    /// The prompt every render of the order shares.
    pub prompt: String,
    /// The seeds to preview, 1 to 16: the approval chooses among them.
    pub seeds: Vec<u64>,
    /// The model (the scheduler's default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// How long the approval may wait before it raises an incident (none by default: it waits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_timeout_seconds: Option<u64>,
    /// How long the order may take in all (default 30 days); past it the order fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_seconds: Option<u64>,
}

fn gallery_print() -> String {
    "gallery-print".into()
}

/// An order: a plan run as one durable object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Order {
    /// Its id.
    pub id: String,
    /// The plan it runs.
    pub plan: String,
    /// `running`, `awaiting_approval`, `succeeded`, `failed` or `cancelled`.
    pub state: String,
    /// The token that placed it.
    pub client: String,
    /// The prompt.
    pub prompt: String,
    /// The seeds previewed.
    pub seeds: Vec<u64>,
    /// The seed the approval chose, once chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chosen_seed: Option<u64>,
    /// The steps, in order, each with its checkpoint.
    pub steps: Vec<OrderStep>,
    /// The approval, once the order reaches it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<Approval>,
    /// What the order made: `photo` (of the print) and `shown` (the asset on the gallery display).
    pub outputs: std::collections::BTreeMap<String, String>,
    /// Why it failed or was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When it was placed (RFC 3339).
    pub created_at: String,
    /// When it last changed.
    pub updated_at: String,
    /// When it fails if not done.
    pub expires_at: String,
    /// What its renders were estimated to cost when it was placed: weighted device-milliseconds
    /// (`[scheduler.costs]`), every seed previewed and one carried on, cache hits included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_cost_ms: Option<i64>,
    /// Every change, oldest first (`GET /v1/orders/{id}` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<OrderEvent>>,
}

/// A step of an order and its checkpoint: what it made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OrderStep {
    /// Its name in the plan (`preview`, `approve`, `final`, `print_render`, `print`, `lights`,
    /// `photo`, `display` in `gallery-print`).
    pub name: String,
    /// `render`, `approve` or `device`.
    pub kind: String,
    /// `pending`, `running`, `waiting`, `succeeded`, `failed`, `skipped` or `cancelled`.
    pub state: String,
    /// The attempt (1 for the first; 0 before it starts).
    pub attempt: u32,
    /// Its render jobs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jobs: Vec<String>,
    /// The assets it made or used.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub assets: Vec<String>,
    /// Its device task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// The device it ran on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// When it started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
    /// What it is waiting for, or why it failed or was skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// One change in an order's life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OrderEvent {
    /// When (RFC 3339).
    pub at: String,
    /// The step it is about, if one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// The order's or the step's new state.
    pub state: String,
    /// What happened.
    pub detail: String,
}

/// `GET /v1/orders`: a page, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OrderPage {
    /// The orders.
    pub orders: Vec<Order>,
    /// The cursor of the next page, if there may be one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// An approval gate: the operator chooses one option or rejects them all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Approval {
    /// Its id.
    pub id: String,
    /// The order it gates.
    pub order: String,
    /// The step.
    pub step: String,
    /// `pending`, `approved` or `rejected`.
    pub state: String,
    /// The prompt.
    pub prompt: String,
    /// The options, numbered from 1.
    pub options: Vec<ApprovalOption>,
    /// When it opened (RFC 3339).
    pub created_at: String,
    /// When it raises an incident if still pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due_at: Option<String>,
    /// Who decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    /// When.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<String>,
    /// The option chosen (from 1), when approved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub option: Option<u32>,
    /// Why, as the operator wrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// While pending: what approving starts (the chosen seed's later renders) is estimated to
    /// cost, weighted device-milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_cost_ms: Option<i64>,
}

/// One option of an approval: a preview.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApprovalOption {
    /// Its number, from 1.
    pub option: u32,
    /// Its seed.
    pub seed: u64,
    /// The preview (BLAKE3): `GET /v1/assets/{asset}`, `?variant=thumb` for its thumbnail.
    pub asset: String,
    /// The preview's job.
    pub job: String,
}

/// `GET /v1/approvals`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Approvals {
    /// The approvals, oldest first.
    pub approvals: Vec<Approval>,
}

/// `POST /v1/approvals/{id}`' body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Decision {
    /// `approve` or `reject`.
    pub decision: String,
    /// The option approved (from 1); required to approve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub option: Option<u32>,
    /// Why; required to reject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Something that needs the operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Incident {
    /// Its id.
    pub id: String,
    /// `order_step`, `order_expired`, `approval_timeout`, `device_not_ready`, `job_failed`,
    /// `job_quarantined`, `task_failed`, `task_timed_out` or `task_expired`.
    pub kind: String,
    /// What it concerns: an order, job or device task id.
    pub subject: String,
    /// `open` or `resolved`.
    pub state: String,
    /// What happened.
    pub summary: String,
    /// What can be done (`POST /v1/incidents/{id}`): `retry` where the subject can try again,
    /// and `resolve`.
    pub actions: Vec<String>,
    /// When it was raised (RFC 3339).
    pub created_at: String,
    /// When it last changed.
    pub updated_at: String,
    /// Who resolved it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_by: Option<String>,
    /// Their note.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// `GET /v1/incidents`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Incidents {
    /// Open first, then newest first.
    pub incidents: Vec<Incident>,
}

/// `POST /v1/incidents/{id}`' body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct IncidentAction {
    /// `retry` (the order's failed step runs again) or `resolve`.
    pub action: String,
    /// A note kept with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_parse_by_name() {
        assert_eq!("client".parse::<Role>().unwrap(), Role::Client);
        assert!("admin".parse::<Role>().unwrap_err().contains("role"));
        for r in Role::ALL {
            assert_eq!(serde_json::to_value(r).unwrap(), r.as_str());
        }
    }
}

/// One line of `GET /v1/usage`: a token's renders of one tier on one UTC day.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UsageDay {
    /// The token.
    pub client: String,
    /// The tier.
    pub tier: Tier,
    /// The UTC day, `YYYY-MM-DD`.
    pub day: String,
    /// Renders charged (cache hits and attached jobs cost nothing and are not here).
    pub renders: u64,
    /// The device time they took on their workers, seconds.
    pub device_seconds: f64,
    /// That time weighed by tier (`[scheduler.costs]`): what budgets count.
    pub cost_seconds: f64,
}

/// A token's budget and what it has used of it this period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BudgetUse {
    /// The token.
    pub client: String,
    /// Weighted device-seconds it may spend per period.
    pub budget_seconds: u64,
    /// `day`, `week` or `month` (UTC).
    pub period: String,
    /// Spent this period.
    pub used_seconds: f64,
    /// Estimated for its renders queued or running.
    pub in_flight_seconds: f64,
    /// When the period ends and the budget is whole again (RFC 3339).
    pub resets_at: String,
}

/// `GET /v1/usage`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Usage {
    /// From (RFC 3339).
    pub since: String,
    /// Until, not included.
    pub until: String,
    /// Per token, tier and day, newest day first.
    pub days: Vec<UsageDay>,
    /// The budgets of the tokens shown that have one.
    pub budgets: Vec<BudgetUse>,
}

/// `POST /v1/orders?dry_run=true`: what an order would cost, placing nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OrderEstimate {
    /// The plan.
    pub plan: String,
    /// The renders it would make: every seed previewed, one carried on at each later tier.
    pub renders: usize,
    /// Their estimated cost, weighted device-milliseconds (cache hits included at full cost).
    pub estimated_cost_ms: i64,
}
