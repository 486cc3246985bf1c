//! The messages the scheduler and workers exchange over RabbitMQ, and the names of the
//! exchanges and queues they use. Versioned contracts: every message carries its schema version
//! (`v`) and is sent with the content type [`CONTENT_TYPE`] and the AMQP `type` naming its kind and
//! version; a consumer that gets anything else dead-letters it with the reason.

use serde::{Deserialize, Serialize};

use std::ops::RangeInclusive;

use crate::{RenderRequest, Tier, Versioned};

/// The schema version of every message here.
pub const SCHEMA_VERSION: u32 = 1;
/// The content type every message is sent with.
pub const CONTENT_TYPE: &str = "application/json";
/// The AMQP `type` of a job message.
pub const JOB_TYPE: &str = "kiln.job.v1";
/// The AMQP `type` of a result message.
pub const RESULT_TYPE: &str = "kiln.result.v1";
/// The AMQP `type` of a result batch: several results in one message ([`ResultBatch`]).
pub const RESULTS_TYPE: &str = "kiln.results.v1";
/// The AMQP `type` of a heartbeat.
pub const HEARTBEAT_TYPE: &str = "kiln.heartbeat.v1";
/// The AMQP `type` of a control message (scheduler to one worker).
pub const CONTROL_TYPE: &str = "kiln.control.v1";
/// The highest message priority a job queue honours (`x-max-priority`).
pub const MAX_PRIORITY: u8 = 9;
/// The header a dead-lettered message carries with the reason it was refused.
pub const REASON_HEADER: &str = "x-kiln-reason";
/// The header in which workers count a job message's earlier deliveries that ended unsettled
/// (classic priority queues keep no delivery count): a worker that gets a message back puts a
/// copy back with the count one higher, or dead-letters it past its `run.delivery_limit`.
pub const DELIVERIES_HEADER: &str = "x-kiln-deliveries";
/// The header that says which worker token signed a result or heartbeat ([`MessageKey::signer`]).
pub const SIGNER_HEADER: &str = "x-kiln-signer";
/// The header with a result's or heartbeat's MAC over its body ([`MessageKey::mac`]).
pub const MAC_HEADER: &str = "x-kiln-mac";

/// What a worker signs its results and heartbeats with, so the scheduler takes them only from
/// a holder of a worker token it issued (as RabbitMQ's validated `user_id` would, but without a
/// broker user per worker). Both sides derive it from the token's BLAKE3 (all the scheduler
/// keeps of a token): a public signer id, which names the token without revealing it, and a
/// MAC key (BLAKE3's keyed hash). Whoever can read the store's tokens table can sign too.
#[derive(Clone)]
pub struct MessageKey {
    signer: String,
    key: [u8; 32],
}

impl std::fmt::Debug for MessageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageKey").field("signer", &self.signer).finish_non_exhaustive()
    }
}

impl MessageKey {
    /// The key of a worker token (the secret, `kiln_…`).
    pub fn from_token(token: &str) -> MessageKey {
        MessageKey::from_token_hash(blake3::hash(token.as_bytes()).to_hex().as_str())
    }

    /// The key of the token whose BLAKE3, in hex, is `hash` (as the scheduler stores it).
    pub fn from_token_hash(hash: &str) -> MessageKey {
        let id = blake3::derive_key("kiln 2026-12 worker message signer", hash.as_bytes());
        let key = blake3::derive_key("kiln 2026-12 worker message key", hash.as_bytes());
        let signer = id[..16].iter().map(|b| format!("{b:02x}")).collect();
        MessageKey { signer, key }
    }

    /// The signer id that goes in [`SIGNER_HEADER`].
    pub fn signer(&self) -> &str {
        &self.signer
    }

    /// The MAC of `body` that goes in [`MAC_HEADER`].
    pub fn mac(&self, body: &[u8]) -> String {
        blake3::keyed_hash(&self.key, body).to_hex().to_string()
    }

    /// Whether `mac` is this key's MAC of `body` (compared in constant time).
    pub fn verify(&self, body: &[u8], mac: &str) -> bool {
        blake3::Hash::from_hex(mac).is_ok_and(|m| m == blake3::keyed_hash(&self.key, body))
    }
}

/// The names of the broker objects, all under one prefix (`kiln` unless configured otherwise,
/// so several farms or test runs can share a broker).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    prefix: String,
}

impl Default for Names {
    fn default() -> Self {
        Names::new("kiln")
    }
}

impl Names {
    /// Names under `prefix`.
    pub fn new(prefix: &str) -> Names {
        Names { prefix: prefix.to_owned() }
    }
    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    /// The direct exchange jobs are published to, routed by tier name.
    pub fn jobs_exchange(&self) -> String {
        format!("{}.jobs", self.prefix)
    }
    /// A tier's durable job queue (bound to the jobs exchange with the tier's name).
    pub fn tier_queue(&self, tier: Tier) -> String {
        format!("{}.jobs.{}", self.prefix, tier.as_str())
    }
    /// The fanout exchange refused and expired messages go to.
    pub fn dead_exchange(&self) -> String {
        format!("{}.dead", self.prefix)
    }
    /// The durable queue of dead letters, for the operator.
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.prefix)
    }
    /// The scheduler's own copy of every dead letter (bound to the dead-letter exchange beside
    /// [`Names::dead_queue`], which keeps them for the operator): it settles each job whose
    /// message was refused, expired or dropped, so none stays `dispatched`.
    pub fn dead_watch_queue(&self) -> String {
        format!("{}.dead.watch", self.prefix)
    }
    /// The durable queue workers publish results to (through the default exchange).
    pub fn results_queue(&self) -> String {
        format!("{}.results", self.prefix)
    }
    /// The queue workers publish heartbeats to (through the default exchange); each heartbeat
    /// expires after a minute unread.
    pub fn heartbeats_queue(&self) -> String {
        format!("{}.heartbeats", self.prefix)
    }
    /// The direct exchange the scheduler sends control messages to, routed by worker id to the
    /// private queue each worker binds while it is connected.
    pub fn control_exchange(&self) -> String {
        format!("{}.control", self.prefix)
    }
    /// The RabbitMQ permissions (`configure`, `write`, `read` regular expressions, as
    /// `rabbitmqctl set_permissions` takes them) of a worker's own broker user: it may declare only
    /// its private control queue (`amq.gen-…`), publish only through the default exchange (its
    /// results and heartbeats) and to the dead-letter exchange, and consume only the job queues
    /// and its control queue. It cannot declare the topology; it checks the scheduler's.
    /// Write on `amq.default` reaches any queue by name: what it may put there is checked by the
    /// scheduler (signed results for open attempts), not by the broker.
    pub fn worker_permissions(&self) -> [String; 3] {
        let p = regex_escape(&self.prefix);
        let tiers: Vec<&str> = Tier::ALL.iter().map(|t| t.as_str()).collect();
        [
            r"^amq\.gen-.*$".to_owned(),
            format!(r"^(amq\.default|amq\.gen-.*|{p}\.dead)$"),
            format!(r"^({p}\.jobs\.({})|{p}\.control|amq\.gen-.*)$", tiers.join("|")),
        ]
    }

    /// Every queue, for tests and tools that clean up.
    pub fn queues(&self) -> Vec<String> {
        let mut q: Vec<String> = Tier::ALL.iter().map(|t| self.tier_queue(*t)).collect();
        q.extend([self.dead_queue(), self.dead_watch_queue(), self.results_queue(), self.heartbeats_queue()]);
        q
    }
}

/// `s` with the characters a regular expression gives meaning to escaped.
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.^$|?*+()[]{}-".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A render for a worker: one attempt of one job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobMessage {
    /// Schema version ([`SCHEMA_VERSION`]).
    pub v: u32,
    /// The job.
    pub job_id: String,
    /// The attempt (1 for the first); a result is recorded only for the attempt the job is on.
    pub attempt: u32,
    /// Who submitted it.
    pub client: String,
    /// The cache key the scheduler computed.
    pub cache_key: String,
    /// When the job was created, unix milliseconds.
    pub created_ms: i64,
    /// What to render.
    pub request: RenderRequest,
}

impl JobMessage {
    /// The message priority within its tier queue: a later attempt has waited longer and goes
    /// first.
    pub fn priority(&self) -> u8 {
        (4 + self.attempt.min(5)) as u8
    }
}

/// How an attempt ended, as a worker reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum AttemptOutcome {
    /// The render made an asset, stored (or uploaded) before this was sent, unless it travels
    /// here (`png`).
    Succeeded {
        /// BLAKE3 of the PNG.
        asset: String,
        /// Its size.
        bytes: u64,
        /// The PNG itself, when it is small enough to travel with its result instead of being
        /// uploaded (a worker's `run.inline_asset_bytes`); base64 in the JSON. The scheduler
        /// checks it hashes to `asset` and stores it before it records the result.
        #[serde(default, skip_serializing_if = "Option::is_none", with = "base64_bytes")]
        png: Option<Vec<u8>>,
        /// The asset's provenance record (who asked, model, backend, timings), sent with the
        /// result instead of uploaded beside the asset.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        provenance: Option<serde_json::Value>,
    },
    /// The render failed.
    Failed {
        /// What went wrong.
        error: String,
        /// Whether another attempt may succeed.
        transient: bool,
    },
}

/// An optional byte string as standard base64 text.
mod base64_bytes {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(b) => s.serialize_str(&STANDARD.encode(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        let Some(text) = Option::<std::borrow::Cow<'de, str>>::deserialize(d)? else { return Ok(None) };
        STANDARD
            .decode(text.as_bytes())
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("png: not base64: {e}")))
    }
}

/// A worker's report of an attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultMessage {
    /// Schema version ([`SCHEMA_VERSION`]).
    pub v: u32,
    /// The job message the worker ran, as it got it.
    pub job: JobMessage,
    /// The worker's id.
    pub worker: String,
    /// The backend and device that rendered it (provenance).
    pub backend: String,
    /// When the render started, unix milliseconds.
    pub started_ms: i64,
    /// When it ended.
    pub finished_ms: i64,
    /// How it ended.
    pub outcome: AttemptOutcome,
}

/// Several results in one message ([`RESULTS_TYPE`]): a busy worker sends what its renders
/// finished while its last message was being confirmed in one message, so a job costs the broker
/// about one message (its job) instead of two. Each result is recorded as if it came alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultBatch {
    /// Schema version ([`SCHEMA_VERSION`]).
    pub v: u32,
    /// The results, each with its own schema version.
    pub results: Vec<ResultMessage>,
}

/// A worker's heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Heartbeat {
    /// Schema version ([`SCHEMA_VERSION`]).
    pub v: u32,
    /// The worker's id (unique per process).
    pub worker_id: String,
    /// The host it runs on.
    pub host: String,
    /// `wgpu` or `cpu`.
    pub backend: String,
    /// The adapter (GPU) or CPU it renders on.
    pub adapter: String,
    /// The GPU's memory in bytes, where its driver says (NVML on NVIDIA).
    pub memory_bytes: Option<u64>,
    /// The GPU's memory in use, bytes (by every process on it), where its driver says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_used_bytes: Option<u64>,
    /// The share of the last sample period the GPU ran a kernel, percent, where its driver says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilization_percent: Option<u32>,
    /// Models it can run.
    pub models: Vec<String>,
    /// Tiers it consumes.
    pub tiers: Vec<Tier>,
    /// Renders in hand.
    pub in_flight: u32,
    /// Renders it runs at once.
    pub concurrency: u32,
    /// Whether it is draining (stopped taking work).
    pub draining: bool,
    /// Why the scheduler drained it, while it is drained (it takes no work until resumed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drained: Option<String>,
    /// When it was sent, unix milliseconds.
    pub at_ms: i64,
    /// How often it beats, milliseconds (absent from workers before it was sent): the scheduler
    /// shows it lost only after three missed beats, however short its own lost period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_ms: Option<u64>,
}

/// What the scheduler tells one worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    /// Stop taking work (finish what is in hand, hand back what was sent ahead) until resumed.
    Drain {
        /// Why, as the operator will read it.
        reason: String,
    },
    /// Take work again.
    Resume,
}

/// A control message for one worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlMessage {
    /// Schema version ([`SCHEMA_VERSION`]).
    pub v: u32,
    /// The worker it is for.
    pub worker_id: String,
    /// What to do.
    #[serde(flatten)]
    pub command: Command,
}

/// Why a message was refused.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    /// The content type is not [`CONTENT_TYPE`].
    #[error("content type {0:?} is not {CONTENT_TYPE}")]
    ContentType(String),
    /// The AMQP `type` is not the expected kind and version.
    #[error("message type {got:?} is not {want}")]
    Type {
        /// What came.
        got: String,
        /// What was expected.
        want: &'static str,
    },
    /// The body does not decode, or holds a NUL: the error names the field.
    #[error("{0}")]
    Body(#[from] crate::JsonError),
    /// A schema version this build does not know.
    #[error("v: schema version {0} is not {SCHEMA_VERSION}")]
    Version(u32),
}

/// Decodes a message of kind `want` (one of the `*_TYPE` constants), checking its content type,
/// type and schema version. Absent properties are accepted (tools publishing by hand).
pub fn decode<T: serde::de::DeserializeOwned + Versioned>(
    content_type: Option<&str>,
    kind: Option<&str>,
    want: &'static str,
    body: &[u8],
) -> Result<T, MessageError> {
    if let Some(ct) = content_type
        && ct != CONTENT_TYPE
    {
        return Err(MessageError::ContentType(ct.to_owned()));
    }
    if let Some(k) = kind
        && k != want
    {
        return Err(MessageError::Type { got: k.to_owned(), want });
    }
    let v: T = crate::decode_json(body)?;
    if !v.readable() {
        return Err(MessageError::Version(v.version()));
    }
    Ok(v)
}

impl Versioned for JobMessage {
    const READS: RangeInclusive<u32> = SCHEMA_VERSION..=SCHEMA_VERSION;
    fn version(&self) -> u32 {
        self.v
    }
}
impl Versioned for ResultMessage {
    const READS: RangeInclusive<u32> = SCHEMA_VERSION..=SCHEMA_VERSION;
    fn version(&self) -> u32 {
        self.v
    }
}
impl Versioned for ResultBatch {
    const READS: RangeInclusive<u32> = SCHEMA_VERSION..=SCHEMA_VERSION;
    /// The batch's own version, or the first result's that differs from it: a batch is read
    /// only when every result in it is of this schema.
    fn version(&self) -> u32 {
        self.results.iter().map(|r| r.v).find(|v| *v != self.v).unwrap_or(self.v)
    }
}
impl Versioned for Heartbeat {
    const READS: RangeInclusive<u32> = SCHEMA_VERSION..=SCHEMA_VERSION;
    fn version(&self) -> u32 {
        self.v
    }
}
impl Versioned for ControlMessage {
    const READS: RangeInclusive<u32> = SCHEMA_VERSION..=SCHEMA_VERSION;
    fn version(&self) -> u32 {
        self.v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TierLimits;

    fn job() -> JobMessage {
        let request =
            RenderRequest::resolve("cppn", "a fox", 7, Tier::Preview, Some(32), None, None, &TierLimits::default())
                .unwrap();
        JobMessage {
            v: 1,
            job_id: "j1".into(),
            attempt: 1,
            client: "c".into(),
            cache_key: "k".into(),
            created_ms: 5,
            request,
        }
    }

    #[test]
    fn a_job_message_round_trips_and_bad_ones_are_refused_with_the_reason() {
        let body = serde_json::to_vec(&job()).unwrap();
        let back: JobMessage = decode(Some(CONTENT_TYPE), Some(JOB_TYPE), JOB_TYPE, &body).unwrap();
        assert_eq!(back, job());
        let e = decode::<JobMessage>(Some("text/plain"), None, JOB_TYPE, &body).unwrap_err();
        assert!(e.to_string().contains("text/plain"), "{e}");
        let e = decode::<JobMessage>(None, Some(RESULT_TYPE), JOB_TYPE, &body).unwrap_err();
        assert!(e.to_string().contains("kiln.result.v1"), "{e}");
        let e = decode::<JobMessage>(None, None, JOB_TYPE, b"{not json").unwrap_err();
        assert!(e.to_string().starts_with("body:"), "{e}");
        let mut v2 = job();
        v2.v = 2;
        let e = decode::<JobMessage>(None, None, JOB_TYPE, &serde_json::to_vec(&v2).unwrap()).unwrap_err();
        assert!(e.to_string().contains("schema version 2"), "{e}");
    }

    #[test]
    fn a_result_batch_round_trips_and_is_refused_when_any_result_is_of_another_schema() {
        let result = |attempt| ResultMessage {
            v: 1,
            job: JobMessage { attempt, ..job() },
            worker: "w".into(),
            backend: "cpu".into(),
            started_ms: 1,
            finished_ms: 2,
            outcome: AttemptOutcome::Failed { error: "boom".into(), transient: true },
        };
        let batch = ResultBatch { v: 1, results: vec![result(1), result(2)] };
        let body = serde_json::to_vec(&batch).unwrap();
        let back: ResultBatch = decode(Some(CONTENT_TYPE), Some(RESULTS_TYPE), RESULTS_TYPE, &body).unwrap();
        assert_eq!(back, batch);
        let e = decode::<ResultBatch>(None, Some(RESULT_TYPE), RESULTS_TYPE, &body).unwrap_err();
        assert!(e.to_string().contains("kiln.result.v1"), "{e}");
        let mut mixed = batch.clone();
        mixed.results[1].v = 3;
        let e = decode::<ResultBatch>(None, None, RESULTS_TYPE, &serde_json::to_vec(&mixed).unwrap()).unwrap_err();
        assert!(e.to_string().contains("schema version 3"), "{e}");
    }

    #[test]
    fn an_inline_asset_travels_as_base64_and_a_result_without_one_reads_as_before() {
        let png = vec![0x89, b'P', b'N', b'G', 0, 255, 7];
        let outcome = AttemptOutcome::Succeeded {
            asset: "ab".repeat(32),
            bytes: png.len() as u64,
            png: Some(png.clone()),
            provenance: Some(serde_json::json!({ "asset": "ab".repeat(32) })),
        };
        let text = serde_json::to_string(&outcome).unwrap();
        assert!(text.contains("\"png\":\"iVBORwD/Bw==\""), "{text}");
        assert_eq!(serde_json::from_str::<AttemptOutcome>(&text).unwrap(), outcome);
        // A worker that uploads sends neither; the fields stay out of the JSON.
        let plain: AttemptOutcome = serde_json::from_str(r#"{"status":"succeeded","asset":"h","bytes":3}"#).unwrap();
        assert_eq!(plain, AttemptOutcome::Succeeded { asset: "h".into(), bytes: 3, png: None, provenance: None });
        assert_eq!(serde_json::to_string(&plain).unwrap(), r#"{"status":"succeeded","asset":"h","bytes":3}"#);
        let e = serde_json::from_str::<AttemptOutcome>(r#"{"status":"succeeded","asset":"h","bytes":3,"png":"@@"}"#)
            .unwrap_err();
        assert!(e.to_string().contains("png: not base64"), "{e}");
    }

    #[test]
    fn names_sit_under_the_prefix_and_retries_go_first() {
        let n = Names::default();
        assert_eq!(n.tier_queue(Tier::Print), "kiln.jobs.print");
        assert_eq!(n.queues().len(), 7);
        let mut j = job();
        let first = j.priority();
        j.attempt = 3;
        assert!(j.priority() > first && j.priority() <= MAX_PRIORITY);
    }

    #[test]
    fn a_workers_broker_user_may_touch_only_its_queues_and_the_dead_letter_exchange() {
        let [configure, write, read] = Names::new("kiln").worker_permissions();
        assert_eq!(configure, r"^amq\.gen-.*$");
        assert_eq!(write, r"^(amq\.default|amq\.gen-.*|kiln\.dead)$");
        assert_eq!(read, r"^(kiln\.jobs\.(preview|final|print)|kiln\.control|amq\.gen-.*)$");
        // A prefix is matched as written, not as a pattern.
        let [_, write, _] = Names::new("studio.a+b").worker_permissions();
        assert_eq!(write, r"^(amq\.default|amq\.gen-.*|studio\.a\+b\.dead)$");
    }

    #[test]
    fn a_message_key_signs_what_the_scheduler_can_check_from_the_stored_hash_alone() {
        let token = "kiln_00112233445566778899aabbccddeeff";
        let worker = MessageKey::from_token(token);
        let sched = MessageKey::from_token_hash(blake3::hash(token.as_bytes()).to_hex().as_str());
        assert_eq!(worker.signer(), sched.signer());
        assert_eq!(worker.signer().len(), 32);
        let mac = worker.mac(b"{\"v\":1}");
        assert!(sched.verify(b"{\"v\":1}", &mac));
        assert!(!sched.verify(b"{\"v\":2}", &mac), "another body");
        assert!(!sched.verify(b"{\"v\":1}", "not hex"));
        let other = MessageKey::from_token("kiln_ffeeddccbbaa99887766554433221100");
        assert_ne!(other.signer(), worker.signer());
        assert!(!other.verify(b"{\"v\":1}", &mac), "another token");
        assert!(!format!("{worker:?}").contains(&hex(&worker.key)), "the key is never printed");
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|b| format!("{b:02x}")).collect()
    }
}
