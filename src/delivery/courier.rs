//! The courier: one task owning the send queues of messages and receipts.
//! It hands ready batches to short-lived tasks (one in flight per peer),
//! applies their results, backs off from unreachable peers, retries a peer
//! the moment it reconnects, and expires what outlives its TTL.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, warn};

use super::queue::{Backoff, Item, Outbound, Queues};
use super::records::{self, Progress, Status};
use super::{DELIVER_DOMAIN, Delivery, RECEIPTS_DOMAIN, Stats, handed, ids};
use crate::store::tables::{OUT_MESSAGES, OUT_STATUS, RECEIPT_BATCHES};
use crate::time::now_ms;
use crate::wire::envelope::{
    DeliverPayloadRef, MAX_BATCH_BYTES, MAX_BATCH_MESSAGES, ReceiptPayload,
};
use crate::wire::rpc::{self, Batch};
use crate::wire::{self, Envelope, Outcome, Receipt, Rejection, Response};

/// Command queue length.
pub(crate) const QUEUE: usize = 8192;
/// Messages per batch: as many as a receiver takes. One batch is in
/// flight per peer, so the batch size bounds a peer's delivery rate: at 512
/// the courier fell behind saturated producers, and the outbox backlog that
/// built up went through redb's B-trees (`bench delivery`, 300k messages:
/// 40-44k msg/s end to end, against 47-50k at 1024).
const BATCH: usize = MAX_BATCH_MESSAGES;
/// Bytes per batch (well under the frame limit).
const BATCH_BYTES: u64 = 4 * 1024 * 1024;
/// Sweep period: expiry, and saving leases (`delivery::lease`).
const SWEEP: Duration = Duration::from_millis(500);
/// Garbage-collection period.
const GC_EVERY: Duration = Duration::from_secs(60);

const _: () = assert!(BATCH <= MAX_BATCH_MESSAGES && BATCH_BYTES as usize <= MAX_BATCH_BYTES / 2);

/// What the courier is asked to do.
pub(crate) enum Cmd {
    /// Messages newly queued.
    Enqueue(Vec<(PeerId, Item)>),
    /// Receipts newly queued.
    Receipts(Vec<(PeerId, Item)>),
    /// A peer connected.
    PeerUp(PeerId),
    /// A batch finished.
    Done {
        peer: PeerId,
        kind: Kind,
        result: Result<Vec<String>, String>,
    },
    /// How much is waiting: `(messages, receipts)`.
    Backlog(oneshot::Sender<(usize, usize)>),
}

/// Which queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Messages,
    Receipts,
}

use replay::{Replay, Seen, drop_legacy_outbox, move_legacy_receipts};

struct State {
    messages: Queues,
    receipts: Queues,
    rng: u64,
}

impl State {
    fn jitter(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }

    fn queue(&mut self, kind: Kind) -> &mut Queues {
        match kind {
            Kind::Messages => &mut self.messages,
            Kind::Receipts => &mut self.receipts,
        }
    }
}

/// Run the courier until cancelled.
pub(crate) async fn run(d: Delivery, mut rx: mpsc::Receiver<Cmd>, cancel: CancellationToken) {
    let backoff = Backoff {
        initial: d.inner.cfg.retry_initial,
        max: d.inner.cfg.retry_max,
    };
    let mut st = State {
        messages: Queues::new(backoff),
        receipts: Queues::new(backoff),
        rng: now_ms() | 1,
    };
    // Before the scan, which queues what this finds.
    if let Err(e) = move_legacy_receipts(&d).await {
        let e = d
            .inner
            .store
            .fail("moving the receipts of schema 4", &e.to_string());
        tracing::error!(error = %e, "the courier stops");
        return;
    }
    // What was queued before this start is read beside the node's start,
    // not before it: with 100k messages queued the scan takes a few hundred
    // ms. Commands that come meanwhile wait, and whatever they queue that
    // the scan found too is queued once.
    let scan = tokio::task::spawn_blocking({
        let d = d.clone();
        move || Replay::load(&d)
    });
    tokio::pin!(scan);
    let mut deferred = Vec::new();
    let scanned = loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            r = &mut scan => break r,
            cmd = rx.recv() => match cmd {
                None => return,
                Some(cmd) => deferred.push(cmd),
            },
        }
    };
    // A scan that panicked (join error) or failed reading the store.
    let scanned = scanned
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    let replay = match scanned {
        Ok(r) => r,
        Err(why) => {
            // Queued messages would stay unsent: stop, as on a failed write.
            let e = d.inner.store.fail("reading the outbox at start", &why);
            tracing::error!(error = %e, "the courier stops");
            return;
        }
    };
    if !replay.messages.is_empty() || !replay.receipts.is_empty() {
        debug!(
            messages = replay.messages.len(),
            receipts = replay.receipts.len(),
            deferred = deferred.len(),
            "replaying from disk"
        );
    }
    let seen = Seen::of(&replay, &deferred);
    for (p, i) in replay.messages {
        st.messages.push(p, i);
    }
    for (p, i) in replay.receipts {
        st.receipts.push(p, i);
    }
    for cmd in deferred {
        handle(&d, &mut st, seen.without_replayed(cmd));
    }
    if let Err(e) = drop_legacy_outbox(&d).await {
        warn!(error = %e, "cannot empty the outbox index of schema 3 (unused; it stays)");
    }
    let mut sweep = tokio::time::interval(SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut gc = tokio::time::interval_at(tokio::time::Instant::now() + GC_EVERY, GC_EVERY);
    gc.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        dispatch(&d, &mut st);
        let next = [st.messages.next_retry(), st.receipts.next_retry()]
            .into_iter()
            .flatten()
            .min();
        let wake = tokio::time::sleep_until(
            next.map(tokio::time::Instant::from_std)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600)),
        );
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            cmd = rx.recv() => match cmd {
                None => break,
                Some(cmd) => handle(&d, &mut st, cmd),
            },
            _ = wake, if next.is_some() => {}
            _ = sweep.tick() => {
                expire(&d, &mut st).await;
                d.save_leases().await;
                d.save_deliveries(false).await;
            }
            _ = gc.tick() => {
                let d = d.clone();
                tokio::spawn(async move { d.gc().await }.in_current_span());
            }
        }
    }
    // A graceful stop: what is held would otherwise be sent again at the
    // next start (and show `queued` until then).
    d.save_deliveries(true).await;
}

fn handle(d: &Delivery, st: &mut State, cmd: Cmd) {
    match cmd {
        Cmd::Enqueue(items) => {
            for (p, i) in items {
                st.messages.push(p, i);
            }
        }
        Cmd::Receipts(items) => {
            for (p, i) in items {
                st.receipts.push(p, i);
            }
        }
        Cmd::PeerUp(peer) => {
            st.messages.wake(&peer);
            st.receipts.wake(&peer);
        }
        Cmd::Done { peer, kind, result } => match result {
            Ok(answered) => st.queue(kind).complete(&peer, &answered),
            Err(error) => {
                let j = st.jitter();
                let delay = st.queue(kind).fail(&peer, Instant::now(), j);
                if kind == Kind::Messages {
                    Stats::add(&d.inner.stats.batches_failed, 1);
                }
                debug!(%peer, ?kind, %error, retry_in = ?delay, "batch failed; backing off");
            }
        },
        Cmd::Backlog(reply) => {
            let _ = reply.send((st.messages.len(), st.receipts.len()));
        }
    }
}

fn dispatch(d: &Delivery, st: &mut State) {
    let now = Instant::now();
    for kind in [Kind::Messages, Kind::Receipts] {
        let q = st.queue(kind);
        for peer in q.ready(now) {
            let Some(batch) = q.take_batch(&peer, now, BATCH, BATCH_BYTES) else {
                continue;
            };
            let d = d.clone();
            tokio::spawn(
                async move {
                    let result = match kind {
                        Kind::Messages => send_messages(&d, peer, batch).await,
                        Kind::Receipts => send_receipts(&d, peer, batch).await,
                    };
                    let _ = d.inner.courier.send(Cmd::Done { peer, kind, result }).await;
                }
                .in_current_span(),
            );
        }
    }
}

/// What to send of a batch's items, the ids not to send (gone or final:
/// answered), and those of them that are final but still stored.
type Loaded = (Vec<Arc<Outbound>>, Vec<String>, Vec<String>);

/// The messages of a batch; ids whose message is gone or already final
/// are returned as answered, the final ones still stored also apart.
fn load_outbound(d: &Delivery, items: &[Item]) -> Result<Loaded, String> {
    let now = now_ms();
    // Fresh from `send` and not past its TTL: nothing on disk can have made
    // it final yet (a receipt needs a transmission first).
    let fresh = |item: &Item| {
        item.env
            .as_ref()
            .filter(|_| item.expires_at_ms > now)
            .map(|c| c.outbound().clone())
    };
    if let Some(outs) = items.iter().map(fresh).collect::<Option<Vec<_>>>() {
        return Ok((outs, Vec::new(), Vec::new()));
    }
    let r = d.inner.store.read().map_err(|e| e.to_string())?;
    let msgs = r.open_table(OUT_MESSAGES).map_err(|e| e.to_string())?;
    let status = r.open_table(OUT_STATUS).map_err(|e| e.to_string())?;
    let mut outs = Vec::with_capacity(items.len());
    let mut gone = Vec::new();
    let mut finished = Vec::new();
    for item in items {
        if let Some(out) = fresh(item) {
            outs.push(out);
            continue;
        }
        let stored = msgs.get(item.id.as_str()).map_err(|e| e.to_string())?;
        let Some(Ok((head, raw))) = stored.as_ref().map(|v| records::split_outgoing(v.value()))
        else {
            gone.push(item.id.clone());
            continue;
        };
        let Ok(env) = records::decode::<Envelope>("out_messages", raw) else {
            // Kept (it is stored data), but it cannot be sent.
            warn!(id = %item.id, "stored envelope does not decode; not sent");
            gone.push(item.id.clone());
            continue;
        };
        let progress =
            Progress::load(&status, &item.id, env.created_at_ms).map_err(|e| e.to_string())?;
        if progress.status.is_final() {
            gone.push(item.id.clone());
            finished.push(item.id.clone());
        } else {
            outs.push(Arc::new(Outbound::new(&env, &head, raw.to_vec())));
        }
    }
    Ok((outs, gone, finished))
}

async fn send_messages(
    d: &Delivery,
    peer: PeerId,
    items: Vec<Item>,
) -> Result<Vec<String>, String> {
    let (outs, mut answered, finished) = load_outbound(d, &items)?;
    if !finished.is_empty() {
        // Already final (a receipt overtook us) but still stored: hand
        // the envelope over, so the next start does not queue it again.
        // Lazy: lost in a crash, the next start finds it final again.
        d.inner
            .store
            .write_lazy(move |txn| {
                let mut t = records::StatusTables::open(txn)?;
                let mut msgs = txn.open_table(OUT_MESSAGES)?;
                for id in &finished {
                    let mut p = Progress::load(&t.status, id, 0)?;
                    if p.summary.is_none() {
                        records::hand_over(&mut msgs, id, &mut p, None)?;
                        t.put(id, &p, p.summary.as_ref())?;
                    }
                }
                Ok(())
            })
            .await
            .map_err(|e| e.to_string())?;
    }
    if outs.is_empty() {
        return Ok(answered);
    }
    let sent_at = now_ms();
    let outcomes = if peer == d.inner.node_id {
        d.store_local(&outs).await?
    } else {
        let result = request_delivery(d, peer, &outs).await;
        if let Err(e) = &result {
            note_failure(d, &outs, e).await;
            refresh_addresses(d, peer, &outs).await;
        }
        result?
    };
    Stats::add(&d.inner.stats.batches_sent, 1);
    answered.extend(outs.iter().map(|o| o.id.clone()));
    // The receiver has them: free the peer's queue for the next batch now
    // and record the outcomes alongside (deliveries are held in memory,
    // `delivery::handed`; rejections, and deliveries beyond what can be
    // held, are written). Should that write fail, the envelopes stay in
    // the outbox and the messages go again (the receiver answers
    // `Duplicate`), so requeue them.
    let d2 = d.clone();
    tokio::spawn(
        async move {
            let retry: Vec<(PeerId, Item)> = outs
                .iter()
                .map(|o| {
                    (
                        peer,
                        Item {
                            id: o.id.clone(),
                            expires_at_ms: o.summary.expires_at_ms,
                            size: o.bytes.len() as u64,
                            env: None,
                        },
                    )
                })
                .collect();
            if let Err(e) = apply_outcomes(&d2, peer, outs, outcomes, sent_at).await {
                warn!(error = %e, "cannot record delivery outcomes; the batch will be sent again");
                let _ = d2.inner.courier.send(Cmd::Enqueue(retry)).await;
            }
        }
        .in_current_span(),
    );
    Ok(answered)
}

async fn request_delivery(
    d: &Delivery,
    peer: PeerId,
    outs: &[Arc<Outbound>],
) -> Result<Vec<Outcome>, String> {
    let senders: HashSet<&crate::identity::AgentId> =
        outs.iter().map(|o| &o.summary.from).collect();
    let sender_ads: Vec<_> = d.inner.discovery.with_registry(|r| {
        senders
            .iter()
            .filter_map(|id| r.get(id).map(|e| e.ad.clone()))
            .collect()
    });
    let to_node = peer.to_string();
    let payload = DeliverPayloadRef {
        to_node: &to_node,
        sender_ads: &sender_ads,
        messages: outs
            .iter()
            .map(|o| serde_bytes::Bytes::new(&o.bytes))
            .collect(),
    };
    let request = rpc::encode_signed(Batch::Deliver, &payload, |p| {
        d.inner
            .node_key
            .sign(&wire::digest_signing_bytes(DELIVER_DOMAIN, p))
    });
    let bytes = d
        .inner
        .net
        .request(peer, request)
        .await
        .map_err(|e| e.to_string())?;
    match wire::decode::<Response>(&bytes, wire::MAX_FRAME_BYTES).map_err(|e| e.to_string())? {
        Response::Delivered(o) if o.len() == outs.len() => Ok(o),
        Response::Delivered(o) => Err(format!(
            "peer answered {} outcomes for {} messages",
            o.len(),
            outs.len()
        )),
        Response::Error { message } => Err(format!("peer refused the batch: {message}")),
        other => Err(format!("unexpected answer {other:?}")),
    }
}

/// Record the attempt and its error on each message of a failed batch.
async fn note_failure(d: &Delivery, outs: &[Arc<Outbound>], error: &str) {
    let ids: Vec<(String, u64)> = outs
        .iter()
        .map(|o| (o.id.clone(), o.summary.created_at_ms))
        .collect();
    let error = error.to_string();
    // Lazy: attempt counts and errors are informational.
    let r = d
        .inner
        .store
        .write_lazy(move |txn| {
            let mut t = records::StatusTables::open(txn)?;
            for (id, created) in &ids {
                let mut p = Progress::load(&t.status, id, *created)?;
                if p.status.is_final() {
                    continue;
                }
                p.attempts += 1;
                p.last_error = Some(error.clone());
                p.advance(Status::Sent, now_ms(), None);
                t.put(id, &p, p.summary.as_ref())?;
            }
            Ok(())
        })
        .await;
    if let Err(e) = r {
        warn!(error = %e, "cannot record a failed attempt");
    }
}

/// After a failure, make sure the swarm knows the recipient node's current
/// addresses: from the registry, else from the DHT.
async fn refresh_addresses(d: &Delivery, peer: PeerId, outs: &[Arc<Outbound>]) {
    let Some(to) = outs.first().map(|o| o.summary.to.clone()) else {
        return;
    };
    let known = d
        .inner
        .discovery
        .with_registry(|r| r.get(&to).map(|e| e.ad.body.node_addrs.clone()));
    let addrs = match known {
        Some(a) if !a.is_empty() => a,
        _ => {
            let _ = d.inner.discovery.get(&to).await;
            d.inner
                .discovery
                .with_registry(|r| r.get(&to).map(|e| e.ad.body.node_addrs.clone()))
                .unwrap_or_default()
        }
    };
    let addrs: Vec<_> = addrs.iter().filter_map(|a| a.parse().ok()).collect();
    if !addrs.is_empty() {
        let _ = d.inner.net.add_addresses(peer, addrs).await;
    }
}

async fn apply_outcomes(
    d: &Delivery,
    peer: PeerId,
    outs: Vec<Arc<Outbound>>,
    outcomes: Vec<Outcome>,
    sent_at: u64,
) -> Result<(), crate::store::Error> {
    let now = now_ms();
    let (mut stored, mut rejected) = (Vec::with_capacity(outs.len()), Vec::new());
    for (out, outcome) in outs.into_iter().zip(outcomes) {
        match outcome {
            Outcome::Stored | Outcome::Duplicate => stored.push(out),
            Outcome::Rejected(why) => rejected.push((out, why)),
        }
    }
    let delivered = stored.len();
    // Held in memory until the receipt (`delivery::handed`); what does
    // not fit is written now.
    let overflow: Vec<handed::Held> = d
        .inner
        .handed
        .hold(stored, sent_at, now)
        .into_iter()
        .map(|out| handed::Held {
            out,
            sent_at,
            at: now,
        })
        .collect();
    if !rejected.is_empty() || !overflow.is_empty() {
        // Lazy (no fsync of its own): should a crash lose it, the envelopes
        // come back, the messages go again and the receiver answers
        // `Duplicate`. The next durable commit (any send) persists it.
        let written = d
            .inner
            .store
            .write_lazy(move |txn| {
                let mut t = records::StatusTables::open(txn)?;
                let mut msgs = txn.open_table(OUT_MESSAGES)?;
                handed::write_delivered(&mut t, &mut msgs, &overflow)?;
                for (out, why) in &rejected {
                    let mut p = Progress::load_since(
                        &t.status,
                        &out.id,
                        out.summary.created_at_ms,
                        out.since,
                    )?;
                    if p.status.is_final() {
                        continue;
                    }
                    p.attempts += 1;
                    p.advance(Status::Sent, sent_at, None);
                    let (to, detail) = match why {
                        Rejection::Expired => (
                            Status::Expired,
                            "expired before it reached the recipient".to_string(),
                        ),
                        Rejection::Denied(why) => (Status::Denied, why.clone()),
                        Rejection::UnknownRecipient => (
                            Status::Failed,
                            format!("agent {} is not registered on node {peer}", out.summary.to),
                        ),
                        Rejection::Invalid(why) => (Status::Failed, why.clone()),
                    };
                    p.advance(to, now, Some(detail));
                    // Final: the envelope is no longer needed.
                    records::hand_over_and_write(&mut t, &mut msgs, &out.id, &p, &out.summary)?;
                }
                // Back to this side to be freed where they were allocated (a
                // cross-thread free per string otherwise).
                Ok((overflow, rejected))
            })
            .await?;
        drop(written);
    }
    Stats::add(&d.inner.stats.delivered, delivered);
    Ok(())
}

async fn send_receipts(
    d: &Delivery,
    peer: PeerId,
    items: Vec<Item>,
) -> Result<Vec<String>, String> {
    let node = peer.to_string();
    // Each item is a row of receipts (`RECEIPT_BATCHES`).
    let (receipts, keys, mut answered) = {
        let r = d.inner.store.read().map_err(|e| e.to_string())?;
        let t = r.open_table(RECEIPT_BATCHES).map_err(|e| e.to_string())?;
        let mut rs: Vec<Receipt> = Vec::new();
        let mut keys = Vec::with_capacity(items.len());
        let mut gone = Vec::new();
        for item in &items {
            match t
                .get((node.as_str(), item.id.as_str()))
                .map_err(|e| e.to_string())?
            {
                Some(v) => match records::decode::<Vec<Receipt>>("receipt_batches", v.value()) {
                    Ok(row) => {
                        rs.extend(row);
                        keys.push(item.id.clone());
                    }
                    Err(e) => {
                        // Sending it would fail forever: leave it for
                        // inspection and say so once.
                        warn!(%peer, key = %item.id, error = %e, "a stored row of receipts does not decode; it is not sent");
                        gone.push(item.id.clone());
                    }
                },
                None => gone.push(item.id.clone()),
            }
        }
        (rs, keys, gone)
    };
    if receipts.is_empty() {
        return Ok(answered);
    }
    if peer == d.inner.node_id {
        d.apply_receipt_list(peer, receipts)
            .await
            .map_err(|e| e.to_string())?;
    } else {
        let payload = ReceiptPayload {
            to_node: node.clone(),
            receipts,
        };
        let request = rpc::encode_signed(Batch::Receipts, &payload, |p| {
            d.inner
                .node_key
                .sign(&wire::digest_signing_bytes(RECEIPTS_DOMAIN, p))
        });
        let bytes = d
            .inner
            .net
            .request(peer, request)
            .await
            .map_err(|e| e.to_string())?;
        match wire::decode::<Response>(&bytes, wire::MAX_FRAME_BYTES).map_err(|e| e.to_string())? {
            Response::Ack => {}
            Response::Error { message } => return Err(format!("peer refused receipts: {message}")),
            other => return Err(format!("unexpected answer {other:?}")),
        }
    }
    // Lazy: lost in a crash, the receipts go again and the sender ignores
    // what it already has.
    let keys = d
        .inner
        .store
        .write_lazy(move |txn| {
            let mut t = txn.open_table(RECEIPT_BATCHES)?;
            // Read above, and only this peer's one batch in flight
            // removes them.
            for key in &keys {
                t.discard((node.as_str(), key.as_str()))?;
            }
            Ok(keys)
        })
        .await
        .map_err(|e| e.to_string())?;
    answered.extend(keys);
    Ok(answered)
}

/// Expire queued messages past their TTL.
async fn expire(d: &Delivery, st: &mut State) {
    let now = now_ms();
    let gone = st.messages.take_expired(now);
    if gone.is_empty() {
        return;
    }
    let n = gone.len();
    let r = d
        .inner
        .store
        .write(move |txn| {
            let mut t = records::StatusTables::open(txn)?;
            let mut msgs = txn.open_table(OUT_MESSAGES)?;
            for (_, item) in &gone {
                let created = ids::time_of(&item.id).unwrap_or(now);
                let mut p = Progress::load(&t.status, &item.id, created)?;
                let detail = match &p.last_error {
                    Some(e) => format!("TTL elapsed before delivery (last error: {e})"),
                    None => "TTL elapsed before delivery".to_string(),
                };
                if p.advance(Status::Expired, now, Some(detail)) {
                    let known = item.env.as_ref().map(|c| &c.outbound().summary);
                    records::hand_over(&mut msgs, &item.id, &mut p, known)?;
                    t.put(&item.id, &p, p.summary.as_ref())?;
                }
            }
            Ok(())
        })
        .await;
    match r {
        Ok(()) => Stats::add(&d.inner.stats.expired, n),
        Err(e) => warn!(error = %e, "cannot record expired messages"),
    }
}

mod replay;
#[cfg(test)]
mod tests;
