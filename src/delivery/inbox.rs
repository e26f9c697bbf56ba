//! The receiving side: verify and store incoming batches (answering only
//! after the commit), lease messages to agents, take acks, dead-letter what
//! is never acked, and queue receipts back to the senders.
//!
//! The database is the truth; an in-memory index of pending entries per
//! agent (rebuilt at start) only saves scanning it on every poll.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::PeerId;
use tokio::sync::Notify;
use tracing::warn;

use super::ending::{InboxTables, ReceiptRow};
use super::lease::{self, Lease};
use super::queue::Item;
use super::records::{self, InboxRecord, InboxState};
use super::{Delivery, Error, MAX_POLL, MAX_WAIT_SECS, Stats, courier, ids, verify_node_sig};
use crate::discovery::ad;
use crate::identity::{AgentId, IdMap};
use crate::store::tables::{INBOX, INBOX_MESSAGES, REPLIES};
use crate::time::now_ms;
use crate::wire::envelope::{DeliverPayloadIn, EnvelopeRef, MAX_BATCH_BYTES, MAX_BATCH_MESSAGES};
use crate::wire::{self, Envelope, Outcome, ReceiptKind, Rejection};

/// A message handed to an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxMessage {
    /// The envelope.
    pub envelope: Envelope,
    /// Arrival at this node, ms.
    pub received_at_ms: u64,
    /// Offers so far, this one included.
    pub delivery_count: u32,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Slot {
    pub(super) lease_until_ms: u64,
    pub(super) delivery_count: u32,
    pub(super) expires_at_ms: u64,
    pub(super) received_at_ms: u64,
    /// The stored record has this lease and count (`delivery::lease`).
    pub(super) saved: bool,
}

#[derive(Debug, Default)]
pub(super) struct AgentBox {
    /// Pending entries by message id (ids sort by creation time, so each
    /// sender's order is kept).
    pub(super) pending: BTreeMap<String, Slot>,
    /// Ids leased since their lease was last saved.
    pub(super) unsaved: lease::Unsaved,
    notify: Arc<Notify>,
}

/// Index of pending inbox entries per local agent.
#[derive(Debug, Default)]
pub(crate) struct Inboxes {
    boxes: Mutex<IdMap<AgentBox>>,
}

impl Inboxes {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, IdMap<AgentBox>> {
        self.boxes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self, agent: &AgentId) -> Arc<Notify> {
        self.lock().entry(agent.clone()).or_default().notify.clone()
    }
}

/// One message of a batch, decoded; one that does not decode is refused
/// on its own, not with the whole batch.
/// Decoded borrowing `raw`: checking a message copies none of its strings.
fn decode_message(raw: &[u8]) -> Result<EnvelopeRef<'_>, Rejection> {
    let env: EnvelopeRef<'_> = wire::decode_borrowed(raw, MAX_BATCH_BYTES)
        .map_err(|e| Rejection::Invalid(format!("message does not decode: {e}")))?;
    if !env.ids_well_formed() {
        return Err(Rejection::Invalid(
            "message does not decode: an agent id is malformed".into(),
        ));
    }
    Ok(env)
}

/// A message that passed the admission checks, ready to store.
pub(crate) struct Arrival {
    id: String,
    to: AgentId,
    reply_to: Option<String>,
    expires_at_ms: u64,
    /// Its wire encoding, stored as it is.
    bytes: Shared,
}

/// A message's wire bytes where they already are: in the request frame
/// they arrived in, or in the outbound message of a send between local
/// agents. Storing copies them once, into the write-ahead log and memtable.
pub(crate) enum Shared {
    /// `frame[range]`.
    Frame(Arc<Vec<u8>>, std::ops::Range<usize>),
    /// The message's encoded envelope.
    Local(Arc<super::queue::Outbound>),
}

impl Shared {
    fn as_slice(&self) -> &[u8] {
        match self {
            Shared::Frame(f, r) => &f[r.clone()],
            Shared::Local(o) => &o.bytes,
        }
    }
}

impl Arrival {
    /// What storing needs of a checked message, with its bytes.
    fn of(env: &EnvelopeRef<'_>, bytes: Shared) -> Result<Self, Rejection> {
        Ok(Arrival {
            id: env.id.to_string(),
            to: AgentId::from_wire(env.to)
                .map_err(|e| Rejection::Invalid(format!("message does not decode: {e}")))?,
            reply_to: env.reply_to.map(str::to_string),
            expires_at_ms: env.expires_at_ms,
            bytes,
        })
    }
}

/// What selection decided for one agent's poll.
struct Selection {
    /// Leased now, with the lease and count already applied.
    offer: Vec<(String, Slot)>,
    dead: Vec<String>,
    expired: Vec<String>,
}

impl Delivery {
    /// Rebuild the pending index from the database.
    pub(crate) fn load_inboxes(&self) -> Result<(), Error> {
        let r = self.inner.store.read()?;
        let t = r.open_table(INBOX)?;
        let mut boxes = self.inner.inboxes.lock();
        for row in t.iter()? {
            let (k, v) = row?;
            let (agent, id) = k.value();
            let rec: InboxRecord = records::decode("inbox", v.value())?;
            if rec.state != InboxState::Pending {
                continue;
            }
            let Ok(agent) = agent.parse::<AgentId>() else {
                warn!(agent, "inbox entry of an unreadable agent id skipped");
                continue;
            };
            boxes.entry(agent).or_default().pending.insert(
                id.to_string(),
                Slot {
                    lease_until_ms: rec.lease_until_ms,
                    delivery_count: rec.delivery_count,
                    expires_at_ms: rec.expires_at_ms,
                    received_at_ms: rec.received_at_ms,
                    saved: true,
                },
            );
        }
        Ok(())
    }

    /// A batch from a peer: verify, check each message, store, answer.
    pub(crate) async fn accept_batch(
        &self,
        peer: PeerId,
        frame: &Arc<Vec<u8>>,
        payload: std::ops::Range<usize>,
        sig: &[u8],
    ) -> Result<Vec<Outcome>, String> {
        let payload = &frame[payload];
        if payload.len() > MAX_BATCH_BYTES {
            return Err(format!(
                "batch of {} bytes exceeds {MAX_BATCH_BYTES}",
                payload.len()
            ));
        }
        verify_node_sig(&peer, super::DELIVER_DOMAIN, payload, sig)?;
        let p: DeliverPayloadIn<'_> =
            wire::decode_borrowed(payload, MAX_BATCH_BYTES).map_err(|e| e.to_string())?;
        if p.to_node != self.inner.node_id.to_string() {
            return Err(format!(
                "batch is addressed to node {}, not this one",
                p.to_node
            ));
        }
        if p.messages.len() > MAX_BATCH_MESSAGES {
            return Err(format!(
                "batch of {} messages exceeds {MAX_BATCH_MESSAGES}",
                p.messages.len()
            ));
        }
        // Which agents the sending node may speak for: ads it sent (verified
        // here) and ads already in our registry.
        let now = now_ms();
        let mut hosted: IdMap<String> = IdMap::default();
        let mut fresh = Vec::new();
        for a in p.sender_ads {
            let known = self
                .inner
                .discovery
                .with_registry(|r| r.get(&a.body.agent_id).is_some_and(|e| e.ad == a));
            if known || ad::verify(&a, now).is_ok() {
                hosted.insert(a.body.agent_id.clone(), a.body.node_id.clone());
                if !known {
                    fresh.push(a);
                }
            }
        }
        if !fresh.is_empty() {
            self.inner.discovery.ingest(fresh).await;
        }
        let peer_str = peer.to_string();
        let checked = p
            .messages
            .into_iter()
            .map(|raw| {
                let env = decode_message(raw)?;
                let hosted_here = match hosted.get(env.from) {
                    Some(node) => *node == peer_str,
                    None => self.inner.discovery.with_registry(|r| {
                        r.get_str(env.from)
                            .is_some_and(|e| e.ad.body.node_id == peer_str)
                    }),
                };
                if !hosted_here {
                    return Err(Rejection::Invalid(format!(
                        "sender agent {} is not hosted by the sending node",
                        env.from
                    )));
                }
                // Where the message lies in the frame it came in.
                let start = raw.as_ptr() as usize - frame.as_ptr() as usize;
                let bytes = Shared::Frame(frame.clone(), start..start + raw.len());
                self.admit(&env, now, bytes)
            })
            .collect();
        self.store_checked(peer, checked)
            .await
            .map_err(|e| e.to_string())
    }

    /// Messages between agents of this node: the same checks and storage,
    /// no network.
    pub(crate) async fn store_local(
        &self,
        outs: &[Arc<super::queue::Outbound>],
    ) -> Result<Vec<Outcome>, String> {
        let now = now_ms();
        let checked = outs
            .iter()
            .map(|o| self.admit(&decode_message(&o.bytes)?, now, Shared::Local(o.clone())))
            .collect();
        self.store_checked(self.inner.node_id, checked)
            .await
            .map_err(|e| e.to_string())
    }

    /// A decoded message that passes `check`, ready to store with `bytes`
    /// (its encoding, which `env` borrows).
    fn admit(&self, env: &EnvelopeRef<'_>, now: u64, bytes: Shared) -> Result<Arrival, Rejection> {
        match self.check(env, now) {
            Some(r) => Err(r),
            None => Arrival::of(env, bytes),
        }
    }

    /// Admission checks for one message; `None` means accept. Policy checks
    /// (governance) belong here, before anything reaches an inbox.
    fn check(&self, env: &EnvelopeRef<'_>, now: u64) -> Option<Rejection> {
        if !ids::is_valid(env.id) {
            return Some(Rejection::Invalid(format!(
                "{:?} is not a message id",
                env.id
            )));
        }
        if env.expires_at_ms <= now {
            return Some(Rejection::Expired);
        }
        if env.body_json.len() > self.inner.cfg.max_body_bytes {
            return Some(Rejection::Invalid(format!(
                "body of {} bytes exceeds the recipient node's limit of {}",
                env.body_json.len(),
                self.inner.cfg.max_body_bytes
            )));
        }
        if serde_json::from_str::<serde::de::IgnoredAny>(env.body_json).is_err() {
            return Some(Rejection::Invalid("body is not valid JSON".into()));
        }
        if !self.inner.discovery.is_local_str(env.to) {
            return Some(Rejection::UnknownRecipient);
        }
        None
    }

    async fn store_checked(
        &self,
        from_node: PeerId,
        checked: Vec<Result<Arrival, Rejection>>,
    ) -> Result<Vec<Outcome>, crate::store::Error> {
        let node = from_node.to_string();
        let (outcomes, stored) = self
            .inner
            .store
            .write(move |txn| {
                let mut inbox = txn.open_table(INBOX)?;
                let mut messages = txn.open_table(INBOX_MESSAGES)?;
                let mut replies = txn.open_table(REPLIES)?;
                let now = now_ms();
                let mut outcomes = Vec::with_capacity(checked.len());
                let mut stored = Vec::new();
                for arrival in checked {
                    let a = match arrival {
                        Ok(a) => a,
                        Err(r) => {
                            outcomes.push(Outcome::Rejected(r));
                            continue;
                        }
                    };
                    let key = (a.to.as_str(), a.id.as_str());
                    let rec = InboxRecord {
                        from_node: node.clone(),
                        state: InboxState::Pending,
                        received_at_ms: now,
                        delivery_count: 0,
                        lease_until_ms: 0,
                        expires_at_ms: a.expires_at_ms,
                    };
                    // A retry of a message stored earlier keeps its record.
                    if inbox.get(key)?.is_some() {
                        outcomes.push(Outcome::Duplicate);
                        continue;
                    }
                    // Neither row exists (the envelope row never outlives
                    // the inbox row), so a quick ack leaves no trace in redb.
                    inbox.insert_new_with(key, |b| wire::encode_into(b, &rec))?;
                    // The bytes as the sender encoded them (decoded and checked).
                    messages.insert_new(key, a.bytes.as_slice())?;
                    if let Some(orig) = &a.reply_to {
                        replies.insert((orig.as_str(), a.id.as_str()), ())?;
                    }
                    stored.push((a.to, a.id, a.expires_at_ms, now));
                    outcomes.push(Outcome::Stored);
                }
                Ok((outcomes, stored))
            })
            .await?;
        let s = &self.inner.stats;
        Stats::add(&s.inbox_stored, stored.len());
        Stats::add(
            &s.inbox_duplicates,
            outcomes
                .iter()
                .filter(|o| **o == Outcome::Duplicate)
                .count(),
        );
        Stats::add(
            &s.inbox_rejected,
            outcomes
                .iter()
                .filter(|o| matches!(o, Outcome::Rejected(_)))
                .count(),
        );
        let mut wake = Vec::new();
        {
            let mut boxes = self.inner.inboxes.lock();
            for (agent, id, expires_at_ms, received_at_ms) in stored {
                let b = boxes.entry(agent).or_default();
                b.pending.insert(
                    id,
                    Slot {
                        lease_until_ms: 0,
                        delivery_count: 0,
                        expires_at_ms,
                        received_at_ms,
                        saved: true,
                    },
                );
                wake.push(b.notify.clone());
            }
        }
        for n in wake {
            n.notify_waiters();
        }
        Ok(outcomes)
    }

    fn select(&self, agent: &AgentId, max: usize, now: u64) -> Selection {
        let lease = self.inner.cfg.lease.as_millis() as u64;
        let max_deliveries = self.inner.cfg.max_deliveries;
        let mut boxes = self.inner.inboxes.lock();
        let mut sel = Selection {
            offer: Vec::new(),
            dead: Vec::new(),
            expired: Vec::new(),
        };
        let Some(b) = boxes.get_mut(agent) else {
            return sel;
        };
        let AgentBox {
            pending, unsaved, ..
        } = b;
        for (id, slot) in pending.iter_mut() {
            if sel.offer.len() >= max {
                break;
            }
            if slot.lease_until_ms > now {
                continue;
            }
            if slot.expires_at_ms <= now {
                sel.expired.push(id.clone());
            } else if slot.delivery_count >= max_deliveries {
                sel.dead.push(id.clone());
            } else {
                slot.lease_until_ms = now + lease;
                slot.delivery_count += 1;
                if slot.saved {
                    slot.saved = false;
                    unsaved.insert(id.clone());
                }
                sel.offer.push((id.clone(), *slot));
            }
        }
        for id in sel.dead.iter().chain(&sel.expired) {
            pending.remove(id);
        }
        sel
    }

    fn unselect(&self, agent: &AgentId, offered: &[(String, Slot)]) {
        let mut boxes = self.inner.inboxes.lock();
        if let Some(b) = boxes.get_mut(agent) {
            for (id, _) in offered {
                if let Some(s) = b.pending.get_mut(id) {
                    s.lease_until_ms = 0;
                    s.delivery_count = s.delivery_count.saturating_sub(1);
                }
            }
        }
    }

    /// Lease up to `max` messages to a local agent now (no waiting).
    pub async fn offer(&self, agent: &AgentId, max: usize) -> Result<Vec<InboxMessage>, Error> {
        if !self.inner.discovery.is_local(agent) {
            return Err(Error::AgentNotLocal(agent.clone()));
        }
        let now = now_ms();
        let sel = self.select(agent, max.clamp(1, MAX_POLL), now);
        if sel.offer.is_empty() && sel.dead.is_empty() && sel.expired.is_empty() {
            return Ok(Vec::new());
        }
        if sel.dead.is_empty() && sel.expired.is_empty() {
            // A plain lease stays in memory for now: the agent's ack, or
            // the courier's sweep, saves it (`delivery::lease`).
            return self.read_envelopes(agent, sel.offer);
        }
        let leases: Vec<Lease> = sel
            .offer
            .iter()
            .map(|(id, s)| (id.clone(), s.delivery_count, s.lease_until_ms))
            .collect();
        // Dead letters and expiries queue receipts, and those must not
        // outrun the state they report: durable, and waited for.
        let a = agent.clone();
        let (dead, expired) = (sel.dead.clone(), sel.expired.clone());
        let key = self.inner.ids.next(now);
        let result = self
            .inner
            .store
            .write(move |txn| {
                let mut t = InboxTables::open(txn)?;
                lease::write(&mut t.inbox, a.as_str(), &leases)?;
                for (ids, final_state) in [
                    (&dead, InboxState::DeadLetter),
                    (&expired, InboxState::Expired),
                ] {
                    for id in ids {
                        let Some(rec) = t.get(a.as_str(), id)? else {
                            continue;
                        };
                        let kind = match final_state {
                            InboxState::DeadLetter => ReceiptKind::DeadLetter {
                                deliveries: rec.delivery_count,
                            },
                            _ => ReceiptKind::Expired,
                        };
                        t.finish(a.as_str(), id, rec, final_state, kind, now)?;
                    }
                }
                t.write_receipts(&key)
            })
            .await;
        match result {
            Ok(queued) => {
                Stats::add(&self.inner.stats.dead_lettered, sel.dead.len());
                Stats::add(&self.inner.stats.expired, sel.expired.len());
                self.queue_receipts(queued).await;
                self.read_envelopes(agent, sel.offer)
            }
            Err(e) => {
                self.unselect(agent, &sel.offer);
                Err(e.into())
            }
        }
    }

    /// The envelopes of leased messages. An id whose envelope is gone was
    /// acknowledged (or finished) meanwhile, and is not offered.
    fn read_envelopes(
        &self,
        agent: &AgentId,
        leased: Vec<(String, Slot)>,
    ) -> Result<Vec<InboxMessage>, Error> {
        let r = self.inner.store.read()?;
        let t = r.open_table(INBOX_MESSAGES)?;
        let mut out = Vec::with_capacity(leased.len());
        for (id, slot) in leased {
            let Some(v) = t.get((agent.as_str(), id.as_str()))? else {
                continue;
            };
            out.push(InboxMessage {
                envelope: records::decode("inbox_messages", v.value())?,
                received_at_ms: slot.received_at_ms,
                delivery_count: slot.delivery_count,
            });
        }
        Ok(out)
    }

    /// Long-poll: lease up to `max` messages, waiting up to `wait` for some.
    pub async fn poll(
        &self,
        agent: &AgentId,
        wait: Duration,
        max: usize,
    ) -> Result<Vec<InboxMessage>, Error> {
        let wait = wait.min(Duration::from_secs(MAX_WAIT_SECS));
        let deadline = tokio::time::Instant::now() + wait;
        let notify = self.inner.inboxes.notify(agent);
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let got = self.offer(agent, max).await?;
            if !got.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(got);
            }
            // Wake for new messages, for the next lease to lapse, or at the deadline.
            let next_lease = self.next_lease_expiry(agent).map(|ms| {
                tokio::time::Instant::now() + Duration::from_millis(ms.saturating_sub(now_ms()) + 1)
            });
            let until = next_lease.map_or(deadline, |t| t.min(deadline));
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(until) => {}
            }
        }
    }

    fn next_lease_expiry(&self, agent: &AgentId) -> Option<u64> {
        let now = now_ms();
        let boxes = self.inner.inboxes.lock();
        boxes
            .get(agent)?
            .pending
            .values()
            .filter(|s| s.lease_until_ms > now)
            .map(|s| s.lease_until_ms)
            .min()
    }

    /// Drop acknowledged messages from the pending index.
    pub(crate) fn forget_pending(&self, agent: &AgentId, ids: &[String]) {
        if let Some(b) = self.inner.inboxes.lock().get_mut(agent) {
            for id in ids {
                b.pending.remove(id);
            }
        }
    }

    /// Queue rows of receipts ([`InboxTables::write_receipts`]) to their nodes.
    pub(crate) async fn queue_receipts(&self, rows: Vec<ReceiptRow>) {
        if rows.is_empty() {
            return;
        }
        let items = rows
            .into_iter()
            .filter_map(|row| {
                // Written from an inbox record, which holds a node id
                // that parsed when the message arrived.
                let peer: PeerId = row.node.parse().ok()?;
                Some((
                    peer,
                    Item {
                        id: row.key,
                        expires_at_ms: u64::MAX,
                        size: row.bytes,
                        env: None,
                    },
                ))
            })
            .collect();
        let _ = self.inner.courier.send(courier::Cmd::Receipts(items)).await;
    }

    /// Messages waiting (not yet acknowledged) for a local agent.
    pub fn pending_count(&self, agent: &AgentId) -> usize {
        self.inner
            .inboxes
            .lock()
            .get(agent)
            .map_or(0, |b| b.pending.len())
    }
}
