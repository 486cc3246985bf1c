//! Property tests of every decoder of outside input: HTTP bodies and queries, AMQP job and
//! result messages, MQTT payloads, Modbus replies and config files. Each takes a valid document,
//! breaks it at a random place (a value replaced by any other, a key removed or added, the text
//! cut short, or bytes that were never a document) and checks that the decoder does not panic,
//! and that a refusal names a field that is really there: the one broken, one that holds it, or
//! `body` for a document wrong as a whole.

mod common;

use std::time::Duration;

use hyper::Method;
use hyper::body::Bytes;
use kiln_protocol::fleet::{self, DeviceStatus, DeviceTask, PayloadError, TaskReport, Telemetry};
use kiln_protocol::wire::{self, Heartbeat, JobMessage, MessageError, ResultBatch, ResultMessage};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};

/// A step of a path into a JSON document.
#[derive(Debug, Clone, PartialEq)]
enum Seg {
    Key(String),
    Index(usize),
}

/// A path as decoders name it: `request.width`, `results[0].job.attempt`.
fn name(path: &[Seg]) -> String {
    let mut out = String::new();
    for s in path {
        match s {
            Seg::Key(k) if out.is_empty() => out.push_str(k),
            Seg::Key(k) => {
                out.push('.');
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Every value inside `v` (not `v` itself), by path.
fn paths(v: &Value, at: &mut Vec<Seg>, out: &mut Vec<Vec<Seg>>) {
    let children: Vec<(Seg, &Value)> = match v {
        Value::Object(m) => m.iter().map(|(k, c)| (Seg::Key(k.clone()), c)).collect(),
        Value::Array(a) => a.iter().enumerate().map(|(i, c)| (Seg::Index(i), c)).collect(),
        _ => Vec::new(),
    };
    for (seg, child) in children {
        at.push(seg);
        out.push(at.clone());
        paths(child, at, out);
        at.pop();
    }
}

fn all_paths(v: &Value) -> Vec<Vec<Seg>> {
    let mut out = Vec::new();
    paths(v, &mut Vec::new(), &mut out);
    out
}

fn get_mut<'a>(v: &'a mut Value, path: &[Seg]) -> &'a mut Value {
    path.iter().fold(v, |v, s| match s {
        Seg::Key(k) => &mut v[k.as_str()],
        Seg::Index(i) => &mut v[*i],
    })
}

/// How a document is broken.
#[derive(Debug, Clone)]
enum Break {
    /// The value at the n-th path becomes another.
    Replace(usize, Value),
    /// The n-th path's key or item goes.
    Remove(usize),
    /// A key is added to the n-th object (the top one when there is none).
    Insert(usize, String, Value),
    /// The text stops after so many bytes.
    Truncate(usize),
    /// Bytes that were never the document.
    Junk(Vec<u8>),
}

/// A broken document: its bytes, the field that was broken (when one was), and what the decoder
/// may name: every path of the document as it is now and as it was.
struct Broken {
    bytes: Vec<u8>,
    at: Option<String>,
    /// The keys broken, as they are (a key may hold `.`): the one replaced, removed or added,
    /// and every key inside the value put there.
    keys: Vec<String>,
    fields: Vec<String>,
    whole: bool,
}

impl Broken {
    /// Whether `field` is one a refusal of this document may name (with `message`): the place
    /// broken, one that holds it or is inside it, any field there, or a field the call needs
    /// that is missing.
    fn may_name(&self, field: &str, message: &str) -> bool {
        if field.contains("\"\"") && self.keys.iter().any(String::is_empty) {
            return true; // in or at an empty key, as the decoders show it
        }
        let last = field.rsplit(['.', '[']).next().unwrap_or(field);
        if message.contains(&format!("missing field `{last}`")) {
            return true;
        }
        if self.whole {
            // Bytes that were never the document: `body`, or a place in what was sent.
            return !field.is_empty();
        }
        if field == "body" {
            return false;
        }
        let related = |a: &str, b: &str| a == b || a.starts_with(&format!("{b}.")) || a.starts_with(&format!("{b}["));
        self.at.as_deref().is_some_and(|at| related(at, field) || related(field, at))
            || self.fields.iter().any(|f| f == field)
    }
}

fn break_doc(doc: &Value, how: &Break) -> Broken {
    let before = all_paths(doc);
    let mut fields: Vec<String> = before.iter().map(|p| name(p)).collect();
    let pick = |n: usize| before.get(n % before.len().max(1)).cloned().unwrap_or_default();
    let mut v = doc.clone();
    let last_key = |p: &[Seg]| p.iter().rev().find_map(|s| if let Seg::Key(k) = s { Some(k.clone()) } else { None });
    let inside = |v: &Value| {
        let mut ps = Vec::new();
        paths(v, &mut Vec::new(), &mut ps);
        ps.iter().filter_map(|p| last_key(p)).collect::<Vec<_>>()
    };
    let mut keys = Vec::new();
    let (at, whole) = match how {
        Break::Replace(n, new) => {
            let p = pick(*n);
            *get_mut(&mut v, &p) = new.clone();
            keys.extend(last_key(&p));
            keys.extend(inside(new));
            (Some(name(&p)), p.is_empty())
        }
        Break::Remove(n) => {
            let p = pick(*n);
            keys.extend(last_key(&p));
            if let Some((last, parent)) = p.split_last() {
                match (get_mut(&mut v, parent), last) {
                    (Value::Object(m), Seg::Key(k)) => {
                        m.remove(k);
                    }
                    (Value::Array(a), Seg::Index(i)) => {
                        a.remove(*i);
                    }
                    _ => {}
                }
            }
            (Some(name(&p)), false)
        }
        Break::Insert(n, key, new) => {
            let objects: Vec<Vec<Seg>> = std::iter::once(Vec::new())
                .chain(before.iter().filter(|p| get_mut(&mut doc.clone(), p).is_object()).cloned())
                .collect();
            let mut p = objects[n % objects.len()].clone();
            if let Value::Object(m) = get_mut(&mut v, &p) {
                m.insert(key.clone(), new.clone());
            }
            keys.push(key.clone());
            keys.extend(inside(new));
            p.push(Seg::Key(key.clone()));
            (Some(name(&p)), false)
        }
        Break::Truncate(_) | Break::Junk(_) => (None, true),
    };
    let mut bytes = serde_json::to_vec(&v).unwrap();
    match how {
        Break::Truncate(n) => bytes.truncate(n % bytes.len().max(1)),
        Break::Junk(junk) => bytes = junk.clone(),
        _ => {}
    }
    let mut after = Vec::new();
    paths(&v, &mut Vec::new(), &mut after);
    fields.extend(after.iter().map(|p| name(p)));
    Broken { bytes, at, keys, fields, whole }
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9_.-]{0,12}",
        any::<String>(),
        Just("\0".to_owned()),
        Just("a\u{0}b".to_owned()),
        Just("€ é 🔥 ǅ".to_owned()),
        (1usize..20_000).prop_map(|n| "x".repeat(n)),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e300f64..1e300).prop_map(Value::from),
        text().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(text(), inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn breaks() -> impl Strategy<Value = Break> {
    prop_oneof![
        5 => (any::<usize>(), value()).prop_map(|(n, v)| Break::Replace(n, v)),
        2 => any::<usize>().prop_map(Break::Remove),
        1 => (any::<usize>(), text(), value()).prop_map(|(n, k, v)| Break::Insert(n, k, v)),
        1 => any::<usize>().prop_map(Break::Truncate),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Break::Junk),
    ]
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() })
}

fn render_request() -> Value {
    json!({"model": "cppn", "prompt": "a kiln at dusk", "seed": 7, "tier": "preview", "width": 256,
        "height": 256, "samples": 1, "watermark": false, "dither": true})
}

fn job_message() -> Value {
    json!({"v": 1, "job_id": "j-0123", "attempt": 1, "client": "operator", "cache_key": "ab".repeat(32),
        "created_ms": 1_765_000_000_000i64, "request": render_request()})
}

fn result_message() -> Value {
    json!({"v": 1, "job": job_message(), "worker": "w-1", "backend": "cpu", "started_ms": 1, "finished_ms": 2,
        "outcome": {"status": "succeeded", "asset": "cd".repeat(32), "bytes": 3, "png": "iVBO",
            "provenance": {"model": "cppn"}}})
}

/// The field an AMQP decoder's refusal names.
fn message_field(e: &MessageError) -> String {
    match e {
        MessageError::Body(j) => j.field.clone(),
        MessageError::Version(_) => "v".into(),
        e => panic!("properties were given, so only the body can be refused: {e}"),
    }
}

/// Runs `decode` on broken copies of `doc`; each refusal must name a field that is there.
fn check_decoder(label: &str, doc: Value, cases: u32, decode: impl Fn(&[u8]) -> Result<(), String>) {
    assert_eq!(decode(&serde_json::to_vec(&doc).unwrap()), Ok(()), "{label}: the unbroken document decodes");
    runner(cases)
        .run(&breaks(), |how| {
            let broken = break_doc(&doc, &how);
            if let Err(field) = decode(&broken.bytes) {
                prop_assert!(
                    broken.may_name(&field, ""),
                    "{label}: {how:?} was refused naming {field:?}, which is not in {:?}",
                    String::from_utf8_lossy(&broken.bytes)
                );
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn amqp_job_result_and_heartbeat_messages_decode_or_name_the_field() {
    let wire_decode = |kind: &'static str| {
        move |bytes: &[u8]| -> Result<(), String> {
            let ct = Some(wire::CONTENT_TYPE);
            let r = match kind {
                wire::JOB_TYPE => wire::decode::<JobMessage>(ct, Some(kind), kind, bytes).map(drop),
                wire::RESULT_TYPE => wire::decode::<ResultMessage>(ct, Some(kind), kind, bytes).map(drop),
                wire::RESULTS_TYPE => wire::decode::<ResultBatch>(ct, Some(kind), kind, bytes).map(drop),
                _ => wire::decode::<Heartbeat>(ct, Some(kind), kind, bytes).map(drop),
            };
            r.map_err(|e| message_field(&e))
        }
    };
    check_decoder("job", job_message(), 400, wire_decode(wire::JOB_TYPE));
    check_decoder("result", result_message(), 400, wire_decode(wire::RESULT_TYPE));
    let failed = json!({"v": 1, "results": [result_message(), {"v": 1, "job": job_message(), "worker": "w-2",
        "backend": "wgpu", "started_ms": 5, "finished_ms": 9,
        "outcome": {"status": "failed", "error": "out of memory", "transient": true}}]});
    check_decoder("result batch", failed, 400, wire_decode(wire::RESULTS_TYPE));
    let beat = json!({"v": 1, "worker_id": "w-1", "host": "gpu-1", "backend": "wgpu", "adapter": "H100",
        "memory_bytes": 80, "models": ["cppn"], "tiers": ["preview", "print"], "in_flight": 1, "concurrency": 2,
        "draining": false, "drained": "maintenance", "at_ms": 5, "every_ms": 1000});
    check_decoder("heartbeat", beat, 400, wire_decode(wire::HEARTBEAT_TYPE));
}

/// The field a fleet decoder's refusal names.
fn payload_field(e: &PayloadError) -> String {
    match e {
        PayloadError::Malformed(j) => j.field.clone(),
        PayloadError::Version(_) => "v".into(),
        PayloadError::Field { field, .. } => (*field).to_owned(),
    }
}

#[test]
fn mqtt_status_telemetry_task_and_report_payloads_decode_or_name_the_field() {
    fn decoder<T: serde::de::DeserializeOwned + kiln_protocol::Versioned>(bytes: &[u8]) -> Result<(), String> {
        fleet::decode::<T>(bytes).map(drop).map_err(|e| payload_field(&e))
    }
    let status = json!({"v": 1, "state": "online", "boot_id": "b-1", "kind": "printer",
        "capabilities": ["print"], "version": "0.1.0", "at_ms": 5, "detail": "ink low"});
    check_decoder("device status", status, 300, decoder::<DeviceStatus>);
    let telemetry = json!({"v": 1, "boot_id": "b-1", "seq": 4, "at_ms": 5,
        "readings": {"ink": 40, "media": 12, "shown": "ab"}, "spool_dropped": 0});
    check_decoder("telemetry", telemetry, 300, decoder::<Telemetry>);
    let task = json!({"v": 1, "task_id": "t-1", "kind": "print",
        "asset": {"hash": "ab".repeat(32), "url": "http://127.0.0.1:7070/v1/assets/x"},
        "params": {"scene": "photo", "brightness": 80}, "deadline_ms": 9, "mac": "00".repeat(32)});
    check_decoder("device task", task, 300, decoder::<DeviceTask>);
    let report = json!({"v": 2, "task_id": "t-1", "state": "rejected", "at_ms": 5, "detail": "late",
        "reason": "deadline", "output_asset": "ab".repeat(32)});
    check_decoder("task report", report, 300, decoder::<TaskReport>);
}

/// A percent-encoded query value: any bytes.
fn encoded(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("%{b:02X}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_bodies_and_queries_are_answered_and_a_refusal_names_the_field() {
    let farm = common::TestFarm::start().await;
    let rt = tokio::runtime::Handle::current();
    let send = |method: Method, path: String, body: Option<Vec<u8>>| {
        let client = farm.client.clone();
        let reply = tokio::task::block_in_place(|| {
            rt.block_on(async move {
                tokio::time::timeout(Duration::from_secs(30), client.send(method, &path, body.map(Bytes::from))).await
            })
        });
        let reply = reply.expect("answered within 30 s").expect("answered, not a dropped connection");
        let v: Value = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
        (reply.status.as_u16(), v)
    };
    let bodies = [
        (
            "/v1/jobs",
            json!({"prompt": "a kiln", "seed": 3, "tier": "preview", "width": 64, "height": 64,
            "model": "cppn", "idempotency_key": "k-1"}),
        ),
        (
            "/v1/jobs",
            json!([{"prompt": "one", "seed": 1, "tier": "preview", "width": 64, "height": 64},
            {"prompt": "two", "tier": "preview", "width": 64, "height": 64}]),
        ),
        (
            "/v1/tokens",
            json!({"name": "studio-pi", "role": "device", "devices": ["printer-1"],
            "expires_in_seconds": 3600}),
        ),
    ];
    for (path, doc) in bodies {
        runner(48)
            .run(&breaks(), |how| {
                let broken = break_doc(&doc, &how);
                let (status, v) = send(Method::POST, path.to_owned(), Some(broken.bytes.clone()));
                prop_assert!(status < 500, "{path} {how:?}: {status} {v}");
                if status == 400 {
                    let field = v["error"]["field"].as_str().unwrap_or_default();
                    let message = v["error"]["message"].as_str().unwrap_or_default();
                    prop_assert!(message.starts_with(&format!("{field}: ")), "{path} {how:?}: {v}");
                    // The API names a batch's items `jobs[N]`.
                    let field = if doc.is_array() { field.strip_prefix("jobs").unwrap_or(field) } else { field };
                    prop_assert!(broken.may_name(field, message), "{path} {how:?}: names {field:?}: {v}");
                }
                Ok(())
            })
            .unwrap();
    }
    let keys = ["state", "tier", "since", "until", "client", "limit", "cursor", "colour"];
    let query = prop::collection::vec(
        // Values of any characters and bytes, short enough for a URI (65 KiB, which the client
        // refuses to build past).
        (
            0..keys.len(),
            prop_oneof![any::<String>().prop_map(String::into_bytes), prop::collection::vec(any::<u8>(), 0..12)],
        ),
        1..4,
    );
    runner(96)
        .run(&query, |pairs| {
            let q: Vec<String> = pairs.iter().map(|(k, v)| format!("{}={}", keys[*k], encoded(v))).collect();
            let path = format!("/v1/jobs?{}", q.join("&"));
            let (status, v) = send(Method::GET, path.clone(), None);
            prop_assert!(status == 200 || status == 400, "{path}: {status} {v}");
            if status == 400 {
                let field = v["error"]["field"].as_str().unwrap_or_default();
                prop_assert!(
                    pairs.iter().any(|(k, _)| keys[*k] == field) || field == "query",
                    "{path}: names {field:?}: {v}"
                );
            }
            Ok(())
        })
        .unwrap();
    let (_, listed) = send(Method::GET, "/v1/jobs?limit=500".into(), None);
    for job in listed["jobs"].as_array().unwrap() {
        let done = farm.wait(job["id"].as_str().unwrap()).await;
        assert_ne!(done["state"], "failed", "a job a broken body admitted still renders: {done}");
    }
    farm.stop().await;
}

/// Runs `load` on broken copies of the TOML document `text`; each refusal must name the key
/// broken (or one that is there, for a document broken as a whole).
fn check_config(label: &str, text: &str, cases: u32, load: impl Fn(&str) -> Result<(), String>) {
    assert_eq!(load(text), Ok(()), "{label}: the unbroken config loads");
    let table: toml::Table = toml::from_str(text).unwrap();
    let doc = serde_json::to_value(&table).unwrap();
    runner(cases)
        .run(&breaks(), |how| {
            let broken = break_doc(&doc, &how);
            let written = if broken.whole {
                match &how {
                    Break::Truncate(n) => text.chars().take(n % text.len()).collect(),
                    _ => String::from_utf8_lossy(&broken.bytes).into_owned(),
                }
            } else {
                let v: Value = serde_json::from_slice(&broken.bytes).unwrap();
                // TOML has no null: such a break cannot be written.
                let Ok(t) = toml::Value::try_from(v) else { return Ok(()) };
                let Ok(t) = toml::to_string(&t) else { return Ok(()) };
                t
            };
            if let Err(message) = load(&written) {
                prop_assert!(!message.is_empty());
                if broken.at.is_some() {
                    // The key broken, or one inside the value put there.
                    let keys = &broken.keys;
                    prop_assert!(
                        keys.iter().any(|k| if k.is_empty() {
                            message.contains("``")
                        } else {
                            message.contains(k.as_str())
                        }),
                        "{label}: {how:?} was refused without naming any of {keys:?}: {message}\n{written}"
                    );
                }
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn config_files_and_environment_load_or_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let defaults = kiln_scheduler::config::FarmConfig::load_with(None, &|_| None).unwrap().to_toml();
    let file = dir.path().join("kiln.toml");
    check_config("kiln.toml", &defaults, 300, |text| {
        std::fs::write(&file, text).unwrap();
        kiln_scheduler::config::FarmConfig::load_with(Some(&file), &|_| None).map(drop).map_err(|e| e.to_string())
    });
    let edge = r#"
data_dir = "/tmp/kiln-edge"
telemetry_interval_ms = 5000
[mqtt]
url = "mqtt://127.0.0.1:1883"
prefix = "kiln"
[scheduler]
url = "http://127.0.0.1:7070"
token = "t"
[spool]
max_entries = 1000
[[device]]
id = "printer-1"
kind = "printer"
modbus = { address = "127.0.0.1:5020", unit = 1, timeout_ms = 500, retries = 2 }
folder = "/tmp/spool"
[[device]]
id = "lights-1"
kind = "lights"
modbus = { address = "127.0.0.1:5021" }
"#;
    check_config("kiln-edge.toml", edge, 300, |text| {
        kiln_edge::config::Config::parse(text, &|_| None).map(drop).map_err(|e| e.to_string())
    });
    let keys = ["KILN_LISTEN", "KILN_WORKERS", "KILN_MAX_ATTEMPTS", "KILN_MAX_BODY_BYTES", "KILN_PUBLIC_ASSETS"];
    runner(200)
        .run(&(0..keys.len(), text()), |(k, value)| {
            let env = |name: &str| (name == keys[k]).then(|| value.clone());
            if let Err(e) = kiln_scheduler::config::FarmConfig::load_with(None, &env) {
                prop_assert!(e.to_string().contains(keys[k]), "{}={value:?}: {e}", keys[k]);
            }
            Ok(())
        })
        .unwrap();
}

/// What the simulated device answers to the next call.
#[derive(Debug, Clone)]
enum Answer {
    /// The registers asked for (as many as were asked).
    Registers(Vec<u16>),
    /// A well-framed reply with a different number of registers.
    Count(Vec<u16>),
    /// An exception reply.
    Exception(u8),
    /// A frame whose header claims another length than it has, then silence.
    Length(u16, Vec<u8>),
    /// Any bytes, then the connection closes.
    Junk(Vec<u8>),
}

fn answers() -> impl Strategy<Value = Answer> {
    prop_oneof![
        3 => prop::collection::vec(any::<u16>(), 1..=20).prop_map(Answer::Registers),
        1 => prop::collection::vec(any::<u16>(), 0..=40).prop_map(Answer::Count),
        1 => any::<u8>().prop_map(Answer::Exception),
        1 => (any::<u16>(), prop::collection::vec(any::<u8>(), 0..40)).prop_map(|(n, b)| Answer::Length(n, b)),
        1 => prop::collection::vec(any::<u8>(), 0..300).prop_map(Answer::Junk),
    ]
}

/// A Modbus TCP server on loopback that answers each request as told.
async fn modbus_device(answer: std::sync::Arc<std::sync::Mutex<Answer>>) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut req = [0u8; 12];
                while conn.read_exact(&mut req).await.is_ok() {
                    let (tid, unit, fc) = ([req[0], req[1]], req[6], req[7]);
                    let frame = |pdu: &[u8]| {
                        let mut f = tid.to_vec();
                        f.extend([0, 0]);
                        f.extend(u16::try_from(pdu.len() + 1).unwrap().to_be_bytes());
                        f.push(unit);
                        f.extend(pdu);
                        f
                    };
                    let registers = |v: &[u16]| {
                        let mut pdu = vec![fc, u8::try_from(v.len() * 2).unwrap_or(u8::MAX)];
                        v.iter().for_each(|r| pdu.extend(r.to_be_bytes()));
                        frame(&pdu)
                    };
                    let this = answer.lock().unwrap().clone();
                    let (bytes, close) = match this {
                        Answer::Registers(v) | Answer::Count(v) => (registers(&v), false),
                        Answer::Exception(code) => (frame(&[fc | 0x80, code]), false),
                        Answer::Length(n, body) => {
                            let mut f = tid.to_vec();
                            f.extend([0, 0]);
                            f.extend(n.to_be_bytes());
                            f.push(unit);
                            f.extend(body);
                            (f, true)
                        }
                        Answer::Junk(b) => (b, true),
                    };
                    if conn.write_all(&bytes).await.is_err() || close {
                        break;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modbus_replies_of_any_shape_are_read_or_refused_in_time() {
    let answer = std::sync::Arc::new(std::sync::Mutex::new(Answer::Exception(2)));
    let addr = modbus_device(answer.clone()).await;
    let cfg: kiln_edge::config::ModbusConfig =
        serde_json::from_value(json!({"address": addr.to_string(), "timeout_ms": 200, "retries": 1})).unwrap();
    let rt = tokio::runtime::Handle::current();
    runner(160)
        .run(&(answers(), 1u16..=20), |(this, count)| {
            let this = match this {
                Answer::Registers(mut v) => {
                    v.resize(usize::from(count), 7);
                    Answer::Registers(v)
                }
                Answer::Count(v) if v.len() == usize::from(count) => Answer::Count(vec![1; v.len() + 1]),
                a => a,
            };
            *answer.lock().unwrap() = this.clone();
            let started = std::time::Instant::now();
            let got = tokio::task::block_in_place(|| {
                rt.block_on(async {
                    let mut buses = kiln_edge::modbus::Buses::default();
                    buses.device(&cfg).read(0, count).await
                })
            });
            // Two tries of 200 ms, and the reconnects between them.
            prop_assert!(started.elapsed() < Duration::from_secs(3), "{this:?}: {:?}", started.elapsed());
            match (&this, &got) {
                (Answer::Registers(v), Ok(read)) => prop_assert_eq!(v, read),
                (Answer::Registers(_), Err(e)) => prop_assert!(false, "{this:?}: refused: {e}"),
                (Answer::Count(_) | Answer::Exception(_), Ok(read)) => {
                    prop_assert!(false, "{this:?}: read {read:?} from a wrong reply")
                }
                (_, Err(e)) => prop_assert!(e.to_string().contains(&addr.to_string()), "{e}"),
                (_, Ok(read)) => prop_assert_eq!(read.len(), usize::from(count)),
            }
            Ok(())
        })
        .unwrap();
}
