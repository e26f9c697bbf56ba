//! Deliveries recorded late. When a recipient's node confirms that it
//! stored a message, the sender holds that fact in memory; the message's
//! status row is written once, with its final state, when the receipt
//! comes (usually milliseconds later), and carries the `sent` and
//! `delivered` steps with it. A delivery whose receipt takes longer than
//! `DeliveryConfig::hold_delivered` (1 s) is written by the courier's
//! sweep, and a graceful stop writes every one still held.
//!
//! Before, every delivery wrote the status row (with the message's
//! summary) and removed the envelope row, and the receipt read the status
//! row back and wrote it again: two writes and a read per message where
//! one write does.
//!
//! Until it is written, a held delivery keeps its envelope row in the
//! outbox (`OUT_MESSAGES`): a crash loses nothing but the `delivered`
//! step, the restart sends the message again, and the recipient's node
//! answers that it has it already (`Duplicate`), which records the step
//! anew. Status queries look here before the database, so a held message
//! shows `delivered`.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use foldhash::fast::RandomState;

use super::Delivery;
use super::queue::Outbound;
use super::records::{self, Progress, Status};
use crate::store::tables::OUT_MESSAGES;
use crate::time::now_ms;

/// Most deliveries held at once, and most envelope bytes they keep alive
/// (each keeps its `Outbound`); beyond either a delivery is written at
/// once, as before.
pub(super) const MAX_HELD: usize = 8192;
pub(super) const MAX_HELD_BYTES: usize = 16 * 1024 * 1024;
/// A delivery taken for a write that never finished (its task was
/// dropped) is free for the sweep again after this long.
const STALE_TAKE_MS: u64 = 30_000;

/// A delivery not yet written.
#[derive(Debug, Clone)]
pub(super) struct Held {
    pub out: Arc<Outbound>,
    /// When the batch that carried it was sent, ms.
    pub sent_at: u64,
    /// When the recipient's node confirmed it, ms.
    pub at: u64,
}

impl Held {
    /// Add the attempt and the `sent` and `delivered` steps to `p`, unless
    /// they are there already: a row with a summary was written by a
    /// hand-over (this delivery's, by the sweep or another receipt, or a
    /// final state's), which the writer thread orders before this one.
    pub fn record<S>(&self, p: &mut Progress<S>) {
        if p.summary.is_none() {
            p.attempts += 1;
            p.advance(Status::Sent, self.sent_at, None);
            p.advance(Status::Delivered, self.at, None);
        }
    }
}

/// A held delivery keyed by its message id (no copy of the id).
struct Key(Arc<Outbound>);

impl Borrow<str> for Key {
    fn borrow(&self) -> &str {
        &self.0.id
    }
}
impl Hash for Key {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.0.id.as_str().hash(h)
    }
}
impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.0.id == other.0.id
    }
}
impl Eq for Key {}

#[derive(Clone, Copy)]
struct Slot {
    sent_at: u64,
    at: u64,
    /// Taken for a write at this time (ms): the sweep leaves it alone.
    taken_at: Option<u64>,
}

#[derive(Default)]
struct Map {
    held: HashMap<Key, Slot, RandomState>,
    /// Envelope bytes the held deliveries keep alive.
    bytes: usize,
}

impl Map {
    fn held(k: &Key, s: &Slot) -> Held {
        Held {
            out: k.0.clone(),
            sent_at: s.sent_at,
            at: s.at,
        }
    }
}

/// The deliveries held, by message id.
#[derive(Default)]
pub(super) struct Handed {
    map: Mutex<Map>,
}

impl Handed {
    fn lock(&self) -> std::sync::MutexGuard<'_, Map> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hold `outs`, sent at `sent_at` and confirmed at `at`; returns those
    /// that did not fit, for the caller to write.
    pub fn hold(&self, outs: Vec<Arc<Outbound>>, sent_at: u64, at: u64) -> Vec<Arc<Outbound>> {
        let mut m = self.lock();
        let mut rest = Vec::new();
        for out in outs {
            let size = out.bytes.len();
            if m.held.len() >= MAX_HELD || m.bytes + size > MAX_HELD_BYTES {
                rest.push(out);
                continue;
            }
            let slot = Slot {
                sent_at,
                at,
                taken_at: None,
            };
            // Held already (delivered twice): the first delivery counts.
            if let std::collections::hash_map::Entry::Vacant(v) = m.held.entry(Key(out)) {
                v.insert(slot);
                m.bytes += size;
            }
        }
        rest
    }

    /// The held deliveries among `ids`, one entry per id (`None`: not
    /// held), marked taken. Taken or not before: two writers of one
    /// delivery record it once (see [`Held::record`]).
    pub fn take<'a>(&self, ids: impl Iterator<Item = &'a str>) -> Vec<Option<Held>> {
        let mut m = self.lock();
        if m.held.is_empty() {
            return ids.map(|_| None).collect();
        }
        let now = now_ms();
        ids.map(|id| {
            let (k, slot) = m.held.get_key_value(id)?;
            let h = Map::held(k, slot);
            if let Some(s) = m.held.get_mut(id) {
                s.taken_at = Some(now);
            }
            Some(h)
        })
        .collect()
    }

    /// Take every delivery held since before `before` (all of them with
    /// `all`) that no write has taken.
    pub fn take_due(&self, before: u64, all: bool) -> Vec<Held> {
        let mut m = self.lock();
        let now = now_ms();
        m.held
            .iter_mut()
            .filter(|(_, s)| {
                s.taken_at
                    .is_none_or(|t| now.saturating_sub(t) > STALE_TAKE_MS)
                    && (all || s.at < before)
            })
            .map(|(k, s)| {
                s.taken_at = Some(now);
                Map::held(k, s)
            })
            .collect()
    }

    /// Forget deliveries once their row is written (or found final).
    pub fn release<'a>(&self, held: impl Iterator<Item = &'a Held>) {
        let mut m = self.lock();
        for h in held {
            if m.held.remove(h.out.id.as_str()).is_some() {
                m.bytes = m.bytes.saturating_sub(h.out.bytes.len());
            }
        }
    }

    /// Give back deliveries taken for a write that failed or skipped them:
    /// the sweep (or the next receipt) writes them.
    pub fn untake<'a>(&self, held: impl Iterator<Item = &'a Held>) {
        let mut m = self.lock();
        for h in held {
            if let Some(s) = m.held.get_mut(h.out.id.as_str()) {
                s.taken_at = None;
            }
        }
    }

    /// The held delivery of `id`, taken or not.
    pub fn get(&self, id: &str) -> Option<Held> {
        let m = self.lock();
        m.held.get_key_value(id).map(|(k, s)| Map::held(k, s))
    }

    /// Deliveries held.
    pub fn len(&self) -> usize {
        self.lock().held.len()
    }
}

impl Delivery {
    /// Write held deliveries: those held for longer than
    /// `hold_delivered`, or all of them with `all` (a graceful stop).
    pub(super) async fn save_deliveries(&self, all: bool) {
        let hold = self.inner.cfg.hold_delivered.as_millis() as u64;
        let due = self
            .inner
            .handed
            .take_due(now_ms().saturating_sub(hold), all);
        if due.is_empty() {
            return;
        }
        let n = due.len();
        let inside = due.clone();
        let r = self
            .inner
            .store
            .write(move |txn| {
                let mut t = records::StatusTables::open(txn)?;
                let mut msgs = txn.open_table(OUT_MESSAGES)?;
                write_delivered(&mut t, &mut msgs, &inside)
            })
            .await;
        match r {
            Ok(()) => {
                self.inner.handed.release(due.iter());
                tracing::debug!(deliveries = n, "held deliveries written");
            }
            Err(e) => {
                // Held still: the next sweep tries again.
                self.inner.handed.untake(due.iter());
                tracing::warn!(error = %e, deliveries = n, "cannot write held deliveries");
            }
        }
    }

    /// Deliveries held in memory (see the module doc).
    pub fn held_deliveries(&self) -> usize {
        self.inner.handed.len()
    }
}

/// Write `held` as delivered, handing each envelope over to its status
/// row (the step as `courier::apply_outcomes` wrote it before).
pub(super) fn write_delivered(
    t: &mut records::StatusTables<'_>,
    msgs: &mut crate::store::Table<'_, &'static str, &'static [u8]>,
    held: &[Held],
) -> Result<(), crate::store::Error> {
    for h in held {
        let out = &h.out;
        let mut p = Progress::load_since(&t.status, &out.id, out.summary.created_at_ms, out.since)?;
        if p.status.is_final() {
            continue;
        }
        h.record(&mut p);
        records::hand_over_and_write(t, msgs, &out.id, &p, &out.summary)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use crate::delivery::testing::{register, rows, wait_until};
    use crate::delivery::{SendRequest, Status, Tracking};
    use crate::identity::AgentId;
    use crate::routing::Address;
    use crate::store::tables::{OUT_MESSAGES, OUT_STATUS};
    use crate::{Node, NodeConfig, NodeHandle};

    async fn node(dir: &Path, hold: Duration) -> Node {
        let mut cfg = NodeConfig::local_test(dir);
        cfg.api.enabled = false;
        cfg.delivery.hold_delivered = hold;
        Node::start(cfg).await.unwrap()
    }

    /// Poll the status of `id` until `done` holds (10 s at most).
    async fn wait_for(h: &NodeHandle, id: &str, what: &str, done: impl Fn(&Tracking) -> bool) {
        let tracking = || h.delivery().message(id).unwrap().tracking;
        wait_until(
            what,
            10,
            || async { done(&tracking()).then_some(()) },
            || format!("{:?}", tracking()),
        )
        .await;
    }

    /// Bob takes message `id` and acks it with `result`; once the sender
    /// shows it processed, its tracking, checked to hold every step once.
    async fn ack_and_wait(
        h: &NodeHandle,
        bob: &AgentId,
        id: &str,
        result: Option<&str>,
    ) -> Tracking {
        let got = h
            .delivery()
            .poll(bob, Duration::from_secs(5), 10)
            .await
            .unwrap();
        assert_eq!(got.len(), 1);
        h.delivery()
            .ack(bob, id, result.map(str::to_string))
            .await
            .unwrap();
        wait_for(h, id, "processed", |t| t.status == Status::Processed).await;
        let t = h.delivery().message(id).unwrap().tracking;
        assert_eq!(
            steps(&t),
            [
                Status::Queued,
                Status::Sent,
                Status::Delivered,
                Status::Processed
            ]
        );
        assert_eq!(t.attempts, 1);
        t
    }

    fn steps(t: &Tracking) -> Vec<Status> {
        t.history.iter().map(|h| h.status).collect()
    }

    /// A node holding deliveries for `hold`, agents alice and bob on it,
    /// and one message from alice to bob: the node, bob, the message id.
    async fn one_message(dir: &Path, hold: Duration) -> (Node, NodeHandle, AgentId, String) {
        let n = node(dir, hold).await;
        let h = n.handle();
        let [alice, bob] = register(&h, ["alice", "bob"]).await;
        let req = SendRequest::new(alice, Address::Agent(bob.clone()), "{\"n\":1}");
        let id = h.delivery().send(req).await.unwrap().messages[0].0.clone();
        (n, h, bob, id)
    }

    #[tokio::test]
    async fn a_delivery_is_held_until_its_receipt_and_written_once_with_every_step() {
        let dir = tempfile::tempdir().unwrap();
        let (n, h, bob, id) = one_message(dir.path(), Duration::from_secs(3600)).await;
        wait_for(&h, &id, "delivered", |t| t.status == Status::Delivered).await;
        // Shown from memory: nothing written yet, the envelope still stored.
        assert_eq!(h.delivery().held_deliveries(), 1);
        assert_eq!(rows(&h, OUT_STATUS), 0);
        assert_eq!(rows(&h, OUT_MESSAGES), 1);
        let t = h.delivery().message(&id).unwrap().tracking;
        assert_eq!(steps(&t), [Status::Queued, Status::Sent, Status::Delivered]);
        assert_eq!(t.attempts, 1);

        let t = ack_and_wait(&h, &bob, &id, Some("{\"ok\":true}")).await;
        assert_eq!(t.result_json.as_deref(), Some("{\"ok\":true}"));
        // One status row, the envelope handed over, nothing held.
        assert_eq!(rows(&h, OUT_STATUS), 1);
        assert_eq!(rows(&h, OUT_MESSAGES), 0);
        assert_eq!(h.delivery().held_deliveries(), 0);
        drop(h);
        n.shutdown().await;
    }

    #[tokio::test]
    async fn a_delivery_without_a_receipt_is_written_by_the_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let (n, h, _, id) = one_message(dir.path(), Duration::from_millis(50)).await;
        // Bob never polls: the sweep (every 0.5 s) writes the step.
        wait_until(
            "the sweep to write the delivery",
            10,
            || async { (rows(&h, OUT_STATUS) > 0).then_some(()) },
            || format!("{} held", h.delivery().held_deliveries()),
        )
        .await;
        wait_for(&h, &id, "released", |_| h.delivery().held_deliveries() == 0).await;
        assert_eq!(rows(&h, OUT_MESSAGES), 0);
        let t = h.delivery().message(&id).unwrap().tracking;
        assert_eq!(steps(&t), [Status::Queued, Status::Sent, Status::Delivered]);
        assert_eq!(t.attempts, 1);
        drop(h);
        n.shutdown().await;
    }

    #[tokio::test]
    async fn a_graceful_stop_writes_held_deliveries_so_nothing_is_sent_again() {
        let dir = tempfile::tempdir().unwrap();
        let (n, h, _, id) = one_message(dir.path(), Duration::from_secs(3600)).await;
        wait_for(&h, &id, "delivered", |t| t.status == Status::Delivered).await;
        assert_eq!(rows(&h, OUT_STATUS), 0);
        drop(h);
        n.shutdown().await;

        let n = node(dir.path(), Duration::from_secs(3600)).await;
        let h = n.handle();
        // Written at the stop: the outbox is empty, so the start queues
        // nothing to send again.
        assert_eq!(rows(&h, OUT_MESSAGES), 0);
        assert_eq!(rows(&h, OUT_STATUS), 1);
        assert_eq!(h.delivery().backlog().await.unwrap(), (0, 0));
        let t = h.delivery().message(&id).unwrap().tracking;
        assert_eq!(t.status, Status::Delivered);
        assert_eq!(steps(&t), [Status::Queued, Status::Sent, Status::Delivered]);
        drop(h);
        n.shutdown().await;
    }

    #[tokio::test]
    async fn a_receipt_from_another_node_leaves_the_delivery_held() {
        let dir = tempfile::tempdir().unwrap();
        let (n, h, bob, id) = one_message(dir.path(), Duration::from_secs(3600)).await;
        wait_for(&h, &id, "delivered", |t| t.status == Status::Delivered).await;
        let stranger = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        let forged = crate::wire::Receipt {
            message_id: id.clone(),
            kind: crate::wire::ReceiptKind::Processed { result_json: None },
            at_ms: crate::time::now_ms(),
        };
        h.delivery()
            .apply_receipt_list(stranger, vec![forged])
            .await
            .unwrap();
        // Ignored, and still held: nothing written, still `delivered`.
        assert_eq!(h.delivery().held_deliveries(), 1);
        assert_eq!(rows(&h, OUT_STATUS), 0);
        let t = h.delivery().message(&id).unwrap().tracking;
        assert_eq!(t.status, Status::Delivered);
        // The real receipt still records every step once.
        ack_and_wait(&h, &bob, &id, None).await;
        assert_eq!(h.delivery().held_deliveries(), 0);
        drop(h);
        n.shutdown().await;
    }

    fn outbound(id: &str, bytes: usize) -> std::sync::Arc<crate::delivery::queue::Outbound> {
        use crate::delivery::records::tests::{envelope, head};
        let env = crate::wire::Envelope {
            id: id.into(),
            ..envelope()
        };
        std::sync::Arc::new(crate::delivery::queue::Outbound::new(
            &env,
            &head(),
            vec![0; bytes],
        ))
    }

    #[test]
    fn holding_is_bounded_by_count_and_by_envelope_bytes() {
        let handed = super::Handed::default();
        let big = super::MAX_HELD_BYTES / 2 + 1;
        let rest = handed.hold(vec![outbound("a", big), outbound("b", big)], 1, 2);
        // The second would pass the byte bound: written at once instead.
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].id, "b");
        assert_eq!(handed.len(), 1);
        // Released, its bytes count no more.
        let taken = handed.take(["a"].into_iter());
        handed.release(taken.iter().flatten());
        assert_eq!(handed.len(), 0);
        assert!(handed.hold(vec![outbound("b", big)], 1, 2).is_empty());
        let many: Vec<_> = (0..super::MAX_HELD + 1)
            .map(|i| outbound(&format!("m{i}"), 1))
            .collect();
        let handed = super::Handed::default();
        assert_eq!(handed.hold(many, 1, 2).len(), 1);
        assert_eq!(handed.len(), super::MAX_HELD);
    }

    #[test]
    fn a_delivery_is_recorded_once_whoever_writes_it_first() {
        let h = super::Held {
            out: outbound("m", 1),
            sent_at: 5,
            at: 6,
        };
        let mut p = crate::delivery::records::Progress::queued(1);
        h.record(&mut p);
        assert_eq!(p.attempts, 1);
        assert_eq!(p.status, Status::Delivered);
        // Written by a hand-over (the sweep's, say): the row has the
        // summary, and the steps are not added again.
        p.summary = Some(h.out.summary.clone());
        h.record(&mut p);
        assert_eq!(p.attempts, 1);
        assert_eq!(p.history.len(), 3);
    }
}
