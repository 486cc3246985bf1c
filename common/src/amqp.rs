//! RabbitMQ plumbing shared by the worker daemon and the scheduler: connecting (with backoff),
//! declaring the topology, and publishing Kiln messages with publisher confirms.
//!
//! Topology (names under a prefix, see [`Names`]; `infra/rabbitmq/definitions.json` holds the same):
//! - `{p}.jobs`: durable direct exchange, routed by tier name to the tier queues.
//! - `{p}.jobs.{preview,final,print}`: durable queues, priorities 0..=9, dead letters to `{p}.dead`.
//! - `{p}.dead`: durable fanout exchange and queue of refused messages (with the reason in
//!   the `x-kiln-reason` header), kept for the operator.
//! - `{p}.dead.watch`: the scheduler's copy of each dead letter: it settles the job of every
//!   job message there (see the scheduler's `broker` module).
//! - `{p}.results`: durable queue of workers' results, dead letters to `{p}.dead`.
//! - `{p}.heartbeats`: durable queue of worker heartbeats; each expires unread after a minute.
//! - `{p}.control`: durable direct exchange of the scheduler's commands to workers (drain,
//!   resume), routed by worker id to a private queue each worker binds while it is connected.
//!
//! Retries are delayed on the scheduler's side (the outbox row's `not_before`), so there are
//! no delay queues.

use std::time::Duration;

use kiln_protocol::Tier;
use kiln_protocol::wire::{
    CONTENT_TYPE, DELIVERIES_HEADER, MAC_HEADER, MAX_PRIORITY, MessageKey, Names, REASON_HEADER, SIGNER_HEADER,
};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

pub use lapin;

/// Heartbeats expire unread after this long.
pub const HEARTBEAT_TTL_MS: u32 = 60_000;

/// Connects once.
pub async fn connect(url: &str, name: &str) -> Result<Connection, lapin::Error> {
    let props = ConnectionProperties::default().with_connection_name(name.to_owned().into());
    // `amqps://` trusts the system's roots and the farm's own CA (crate::tls).
    let tls = lapin::tcp::OwnedTLSConfig { identity: None, cert_chain: crate::tls::extra_ca_pem() };
    Connection::connect_with_config(url, props, tls, lapin::runtime::default_runtime()?).await
}

/// Connects, trying again with backoff (100 ms doubling to 5 s) until it works or `stop` fires;
/// `None` when stopped.
pub async fn connect_with_backoff(url: &str, name: &str, stop: impl Future<Output = ()>) -> Option<Connection> {
    let mut backoff = Duration::from_millis(100);
    tokio::pin!(stop);
    loop {
        match connect(url, name).await {
            Ok(c) => return Some(c),
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot reach RabbitMQ");
            }
        }
        tokio::select! {
            () = &mut stop => return None,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

fn args(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert(ShortString::from(*k), v.clone());
    }
    t
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.to_owned()))
}

/// The arguments each queue is declared with (the same as `infra/rabbitmq/definitions.json`).
pub fn queue_arguments(names: &Names, queue: &str) -> FieldTable {
    let dlx = ("x-dead-letter-exchange", text(&names.dead_exchange()));
    if Tier::ALL.iter().any(|t| names.tier_queue(*t) == queue) {
        args(&[("x-max-priority", AMQPValue::ShortShortUInt(MAX_PRIORITY)), dlx])
    } else if queue == names.results_queue() {
        args(&[dlx])
    } else if queue == names.heartbeats_queue() {
        args(&[("x-message-ttl", AMQPValue::LongUInt(HEARTBEAT_TTL_MS)), ("x-max-length", AMQPValue::LongUInt(10_000))])
    } else {
        FieldTable::default()
    }
}

/// Declares every exchange, queue and binding (idempotent; both sides do it at start).
pub async fn declare_topology(ch: &Channel, names: &Names) -> Result<(), lapin::Error> {
    let durable = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    ch.exchange_declare(names.jobs_exchange().into(), ExchangeKind::Direct, durable, FieldTable::default()).await?;
    ch.exchange_declare(names.dead_exchange().into(), ExchangeKind::Fanout, durable, FieldTable::default()).await?;
    ch.exchange_declare(names.control_exchange().into(), ExchangeKind::Direct, durable, FieldTable::default()).await?;
    for q in names.queues() {
        ch.queue_declare(q.clone().into(), QueueDeclareOptions::durable(), queue_arguments(names, &q)).await?;
    }
    let bind = QueueBindOptions::default();
    for t in Tier::ALL {
        let (q, x, key) = (names.tier_queue(t), names.jobs_exchange(), t.as_str());
        ch.queue_bind(q.into(), x.into(), key.into(), bind, FieldTable::default()).await?;
    }
    for q in [names.dead_queue(), names.dead_watch_queue()] {
        ch.queue_bind(q.into(), names.dead_exchange().into(), "".into(), bind, FieldTable::default()).await?;
    }
    Ok(())
}

/// Checks, without declaring anything, that what a worker uses is there as the scheduler
/// declared it: the job, results and heartbeat queues and the dead-letter and control exchanges.
/// A passive declare needs no permission, so a worker whose broker user may not configure the
/// topology (see [`Names::worker_permissions`]) uses it as found, and learns by name what is
/// missing. A failed check closes the channel.
pub async fn check_topology(ch: &Channel, names: &Names) -> Result<(), lapin::Error> {
    let passive = ExchangeDeclareOptions { passive: true, ..ExchangeDeclareOptions::default() };
    for (x, kind) in [(names.dead_exchange(), ExchangeKind::Fanout), (names.control_exchange(), ExchangeKind::Direct)] {
        ch.exchange_declare(x.into(), kind, passive, FieldTable::default()).await?;
    }
    let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    let mut queues: Vec<String> = Tier::ALL.iter().map(|t| names.tier_queue(*t)).collect();
    queues.extend([names.results_queue(), names.heartbeats_queue()]);
    for q in queues {
        ch.queue_declare(q.into(), passive, FieldTable::default()).await?;
    }
    Ok(())
}

/// Deletes every queue under `names` (the exchanges hold nothing and stay): for tests and
/// benchmarks that borrow a broker under a scratch prefix.
pub async fn delete_queues(ch: &Channel, names: &Names) -> Result<(), lapin::Error> {
    for q in names.queues() {
        ch.queue_delete(q.into(), lapin::options::QueueDeleteOptions::default()).await?;
    }
    Ok(())
}

/// A channel with publisher confirms on.
pub async fn confirm_channel(conn: &Connection) -> Result<Channel, lapin::Error> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(ch)
}

/// Closes `channels`, each waiting for the broker's answer, before their connection closes. A
/// channel dropped still open closes itself in the background, and the connection's close
/// racing that one broke the connection at every clean stop (lapin logged an error, the broker
/// saw the socket cut). Errors are ignored: a connection already gone has nothing to close.
pub async fn close_channels(channels: &[&Channel], reason: &str) {
    for ch in channels {
        let _ = ch.close(200, reason.into()).await;
    }
}

/// The properties of a durable Kiln message of `kind` (a `*_TYPE` constant).
pub fn properties(kind: &str, message_id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_content_type(CONTENT_TYPE.into())
        .with_type(kind.to_owned().into())
        .with_message_id(message_id.to_owned().into())
        .with_delivery_mode(2)
}

/// `props` with `body` signed by `key`: the signer and MAC headers the scheduler checks.
pub fn signed(props: BasicProperties, key: &MessageKey, body: &[u8]) -> BasicProperties {
    let mut headers = props.headers().clone().unwrap_or_default();
    headers.insert(SIGNER_HEADER.into(), text(key.signer()));
    headers.insert(MAC_HEADER.into(), text(&key.mac(body)));
    props.with_headers(headers)
}

/// The signer and MAC a delivery carries (see [`signed`]), where it has both.
pub fn signature(d: &lapin::message::Delivery) -> Option<(String, String)> {
    let headers = d.properties.headers().as_ref()?;
    let get = |name: &str| headers.inner().get(name).and_then(text_of);
    Some((get(SIGNER_HEADER)?, get(MAC_HEADER)?))
}

/// How many earlier deliveries of `d` ended unsettled, as far as the broker and the workers can
/// tell: the count a worker wrote in [`DELIVERIES_HEADER`] when it put the message back, plus
/// the delivery before this one when the broker says there was one (`redelivered`). A header
/// that is not a whole number counts as absent.
pub fn unsettled_deliveries(d: &lapin::message::Delivery) -> u32 {
    let counted =
        d.properties.headers().as_ref().and_then(|h| h.inner().get(DELIVERIES_HEADER)).and_then(|v| match v {
            AMQPValue::ShortShortUInt(n) => Some(u32::from(*n)),
            AMQPValue::ShortUInt(n) => Some(u32::from(*n)),
            AMQPValue::LongUInt(n) => Some(*n),
            AMQPValue::ShortShortInt(n) => u32::try_from(*n).ok(),
            AMQPValue::ShortInt(n) => u32::try_from(*n).ok(),
            AMQPValue::LongInt(n) => u32::try_from(*n).ok(),
            AMQPValue::LongLongInt(n) => u32::try_from(*n).ok(),
            _ => None,
        });
    counted.unwrap_or(0).saturating_add(u32::from(d.redelivered))
}

/// `props` counting `n` earlier unsettled deliveries ([`DELIVERIES_HEADER`]).
pub fn with_deliveries(props: &BasicProperties, n: u32) -> BasicProperties {
    let mut headers = props.headers().clone().unwrap_or_default();
    headers.insert(DELIVERIES_HEADER.into(), AMQPValue::LongUInt(n));
    props.clone().with_headers(headers)
}

/// A header value as text, where it is a string.
pub fn text_of(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// Publishes and waits for the broker's confirm; an error unless the broker acked it.
pub async fn publish_confirmed(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
) -> Result<(), PublishError> {
    let confirm = ch
        .basic_publish(
            exchange.to_owned().into(),
            routing_key.to_owned().into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await?
        .await?;
    if confirm.is_ack() { Ok(()) } else { Err(PublishError::Nacked) }
}

/// Dead-letters a refused message with its reason (the original body and properties, plus the
/// `x-kiln-reason` header), confirmed. A worker signs its dead letters (`key`): the scheduler
/// fails a job on a worker's refusal only when a worker token signed it ([`dead_letter_payload`]).
pub async fn dead_letter(
    ch: &Channel,
    names: &Names,
    body: &[u8],
    props: &BasicProperties,
    reason: &str,
    key: Option<&MessageKey>,
) -> Result<(), PublishError> {
    let mut headers = props.headers().clone().unwrap_or_default();
    headers.insert(REASON_HEADER.into(), text(reason));
    let mut props = props.clone().with_headers(headers).with_delivery_mode(2);
    if let Some(key) = key {
        props = signed(props, key, &dead_letter_payload(reason, body));
    }
    publish_confirmed(ch, &names.dead_exchange(), "", body, props).await
}

/// What a dead letter's signature covers: its reason and its body, so neither can be swapped.
pub fn dead_letter_payload(reason: &str, body: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(reason.len() + 1 + body.len());
    p.extend_from_slice(reason.as_bytes());
    p.push(0);
    p.extend_from_slice(body);
    p
}

/// Decodes a delivery as a Kiln message of kind `want` (a `*_TYPE` constant), checking its
/// content type, type and schema version ([`kiln_protocol::wire::decode`]).
pub fn decode<T: serde::de::DeserializeOwned + kiln_protocol::Versioned>(
    d: &lapin::message::Delivery,
    want: &'static str,
) -> Result<T, kiln_protocol::wire::MessageError> {
    let p = &d.properties;
    kiln_protocol::wire::decode(
        p.content_type().as_ref().map(|s| s.as_str()),
        p.kind().as_ref().map(|s| s.as_str()),
        want,
        &d.data,
    )
}

/// A publish the broker did not take.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The connection or channel failed.
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    /// The broker refused the message.
    #[error("the broker refused the message (nack)")]
    Nacked,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_of(v: &AMQPValue) -> serde_json::Value {
        match v {
            AMQPValue::ShortShortUInt(n) => (*n).into(),
            AMQPValue::LongUInt(n) => (*n).into(),
            AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned().into(),
            other => panic!("unexpected argument {other:?}"),
        }
    }

    #[test]
    fn the_shipped_definitions_match_what_the_code_declares() {
        let text = include_str!("../../infra/rabbitmq/definitions.json");
        let defs: serde_json::Value = serde_json::from_str(text).unwrap();
        let names = Names::default();
        let queues = defs["queues"].as_array().unwrap();
        let mut shipped: Vec<&str> = queues.iter().map(|q| q["name"].as_str().unwrap()).collect();
        let mut declared = names.queues();
        shipped.sort();
        declared.sort();
        assert_eq!(shipped, declared);
        for q in queues {
            let name = q["name"].as_str().unwrap();
            assert_eq!(q["durable"], true, "{name}");
            let code: serde_json::Map<String, serde_json::Value> = queue_arguments(&names, name)
                .inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), json_of(v)))
                .collect();
            assert_eq!(&serde_json::Value::Object(code), &q["arguments"], "{name}");
        }
        let exchanges: Vec<(&str, &str)> = defs["exchanges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| (x["name"].as_str().unwrap(), x["type"].as_str().unwrap()))
            .collect();
        for (name, kind) in
            [(names.jobs_exchange(), "direct"), (names.dead_exchange(), "fanout"), (names.control_exchange(), "direct")]
        {
            assert!(exchanges.contains(&(name.as_str(), kind)), "{name} ({kind}) in {exchanges:?}");
        }
        let bindings = defs["bindings"].as_array().unwrap();
        for t in Tier::ALL {
            assert!(
                bindings
                    .iter()
                    .any(|b| b["destination"] == names.tier_queue(t).as_str() && b["routing_key"] == t.as_str()),
                "{t} binding"
            );
        }
    }
}
