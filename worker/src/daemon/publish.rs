//! The session's result publisher: results that finish together go in one message, and their
//! deliveries are acked together once the broker has confirmed it.

use kiln_common::amqp;
use kiln_protocol::wire::{self, AttemptOutcome, MessageKey, RESULT_TYPE, RESULTS_TYPE, ResultBatch, ResultMessage};
use lapin::Channel;
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;
use crate::settle::{Settle, Settler};

/// The most results the publisher puts in one [`ResultBatch`].
const MAX_RESULTS_PER_MESSAGE: usize = 128;

/// A result batch stops taking results once their inline PNGs come to this many bytes, so a
/// message stays small whatever `run.inline_asset_bytes` is (the scheduler prefetches a
/// thousand result messages).
const MAX_INLINE_BYTES_PER_MESSAGE: usize = 256 << 10;

/// The bytes of the PNG a result carries inline.
pub(super) fn inline_bytes(r: &ResultMessage) -> usize {
    match &r.outcome {
        AttemptOutcome::Succeeded { png: Some(png), .. } => png.len(),
        _ => 0,
    }
}

/// What goes in one message: `first`, then the results already waiting, up to
/// [`MAX_RESULTS_PER_MESSAGE`] or [`MAX_INLINE_BYTES_PER_MESSAGE`].
pub(super) fn gather(first: Outgoing, rx: &mut mpsc::UnboundedReceiver<Outgoing>) -> Vec<Outgoing> {
    let mut inline = inline_bytes(&first.0);
    let mut batch = vec![first];
    while batch.len() < MAX_RESULTS_PER_MESSAGE
        && inline < MAX_INLINE_BYTES_PER_MESSAGE
        && let Ok(next) = rx.try_recv()
    {
        inline += inline_bytes(&next.0);
        batch.push(next);
    }
    batch
}

/// A result on its way to the publisher, the delivery it answers, and where to say how it went.
pub(super) type Outgoing = (ResultMessage, Settle, oneshot::Sender<Result<(), String>>);

/// The session's result publisher. Renders hand it their results; it publishes what has come in
/// while its last message was being confirmed as one message (a [`ResultBatch`] of at most
/// [`MAX_RESULTS_PER_MESSAGE`], or a plain result when one came alone), and once the broker
/// confirmed it, hands their deliveries to the settler to ack together, then tells each render.
/// Under load a job costs the broker about one message instead of two, and a run of results
/// about one ack frame; idle, a result goes out at once.
#[derive(Clone)]
pub(super) struct Results(mpsc::UnboundedSender<Outgoing>);

impl Results {
    /// Starts the publisher on `publ` (a confirm channel); it ends once every sender is gone.
    pub(super) fn start(
        publ: Channel,
        queue: String,
        key: MessageKey,
        settler: Settler,
        metrics: Metrics,
    ) -> (Results, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::unbounded_channel::<Outgoing>();
        let task = tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let batch = gather(first, &mut rx);
                let n = batch.len() as u64;
                let mut results = Vec::with_capacity(batch.len());
                let mut deliveries = Vec::with_capacity(batch.len());
                let mut replies = Vec::with_capacity(batch.len());
                for (r, d, reply) in batch {
                    results.push(r);
                    deliveries.push(d);
                    replies.push(reply);
                }
                let sent = publish_results(&publ, &queue, &key, results).await.map_err(|e| e.to_string());
                if sent.is_ok() {
                    metrics.result_messages.inc();
                    metrics.results.inc_by(n);
                    settler.ack(deliveries);
                }
                for reply in replies {
                    let _ = reply.send(sent.clone());
                }
            }
        });
        (Results(tx), task)
    }

    /// Publishes a result; `Ok` once the broker confirmed the message that carried it, and its
    /// delivery is on its way to being acked. On `Err` the delivery is the caller's to settle.
    pub(super) async fn publish(&self, result: ResultMessage, delivery: Settle) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.0.send((result, delivery, tx)).map_err(|_| "the result publisher has stopped".to_owned())?;
        rx.await.map_err(|_| "the result publisher stopped before the broker confirmed".to_owned())?
    }
}

/// A result's message id: its job and attempt.
pub(super) fn result_id(r: &ResultMessage) -> String {
    format!("{}:{}", r.job.job_id, r.job.attempt)
}

/// Publishes results to the results queue in one confirmed message: a plain result message when
/// there is one, a batch otherwise.
pub(super) async fn publish_results(
    publ: &Channel,
    queue: &str,
    key: &MessageKey,
    mut results: Vec<ResultMessage>,
) -> Result<(), amqp::PublishError> {
    let (kind, id, body) = match results.len() {
        1 => {
            let r = results.remove(0);
            (RESULT_TYPE, result_id(&r), serde_json::to_vec(&r))
        }
        n => {
            let id = results.first().map(|r| format!("{}+{}", result_id(r), n - 1)).unwrap_or_default();
            (RESULTS_TYPE, id, serde_json::to_vec(&ResultBatch { v: wire::SCHEMA_VERSION, results }))
        }
    };
    // Serializing these plain structs cannot fail; an empty body would be dead-lettered, not lost.
    let body = body.unwrap_or_default();
    let props = amqp::signed(amqp::properties(kind, &id), key, &body);
    amqp::publish_confirmed(publ, "", queue, &body, props).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settle::Tag;
    use kiln_protocol::wire::JobMessage;
    use kiln_protocol::{RenderRequest, Tier};

    #[test]
    fn a_result_message_stops_at_128_results_or_256_kib_of_inline_pngs() {
        let result = |png: Option<usize>| {
            let request = RenderRequest::resolve(
                "cppn",
                "p",
                1,
                Tier::Preview,
                Some(16),
                None,
                None,
                &kiln_protocol::TierLimits::default(),
            )
            .unwrap();
            let job = JobMessage {
                v: 1,
                job_id: "j".into(),
                attempt: 1,
                client: "c".into(),
                cache_key: "k".into(),
                created_ms: 0,
                request,
            };
            let png = png.map(|n| vec![0; n]);
            let outcome = AttemptOutcome::Succeeded { asset: "h".into(), bytes: 0, png, provenance: None };
            let msg = ResultMessage {
                v: 1,
                job,
                worker: "w".into(),
                backend: "cpu".into(),
                started_ms: 0,
                finished_ms: 0,
                outcome,
            };
            let d = lapin::message::Delivery::mock(1, "".into(), "".into(), false, Vec::new());
            (msg, Settle { at: Tag { ch: 0, tag: 1 }, acker: d.acker }, oneshot::channel().0)
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        for _ in 0..300 {
            tx.send(result(None)).unwrap();
        }
        let sizes: Vec<usize> = std::iter::from_fn(|| rx.try_recv().ok().map(|f| gather(f, &mut rx).len())).collect();
        assert_eq!(sizes, [128, 128, 44]);
        for n in [100 << 10, 100 << 10, 100 << 10, 1, 60 << 10] {
            tx.send(result(Some(n))).unwrap();
        }
        let sizes: Vec<usize> = std::iter::from_fn(|| rx.try_recv().ok().map(|f| gather(f, &mut rx).len())).collect();
        assert_eq!(sizes, [3, 2], "300 KiB of PNGs fill a message; the rest go in the next");
    }
}
