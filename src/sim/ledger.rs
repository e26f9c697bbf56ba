//! The ledger: every message by id, from the moment `send` accepted it to
//! every time a consumer was handed it, and whether its ack went through.
//!
//! "Delivered" means a consumer of the recipient agent was handed the
//! message at least once. A "duplicate" is a hand-over of a message after
//! an ack of it succeeded: the one thing at-least-once delivery with
//! durable acks must never do. Hand-overs before the ack (a lease that
//! lapsed, a node that crashed before the ack) are redeliveries, counted
//! apart. A consumer may be handed a message before the sending task has
//! recorded it as accepted (delivery can be that fast); such an entry has
//! no send side until `accepted` fills it in.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use super::scenario::Pattern;
use crate::delivery::InboxMessage;
use crate::identity::AgentId;

/// How many duplicate or missing ids a summary lists.
pub const LIST_IDS: usize = 20;

/// The send side of a message.
#[derive(Debug, Clone, PartialEq)]
pub struct SendSide {
    /// Timeline time of the `send` call, seconds.
    pub sent_s: f64,
    /// Sending node.
    pub from_slot: usize,
    /// Recipient's node, when the recipient is a known simulation agent.
    pub to_slot: Option<usize>,
    /// Expiry (ms since the epoch), as computed by the traffic generator.
    pub expires_ms: u64,
    /// Pattern that produced it.
    pub pattern: Pattern,
}

/// One message.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Msg {
    /// Filled in when `send` returned it.
    pub send: Option<SendSide>,
    /// Recipient agent.
    pub to: Option<AgentId>,
    /// Timeline time of the first hand-over to a consumer, seconds.
    pub received_s: Option<f64>,
    /// Hand-overs so far.
    pub receptions: u32,
    /// An ack of it succeeded.
    pub acked: bool,
    /// Hand-overs after the ack.
    pub after_ack: u32,
}

/// Per-node message counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeCounts {
    /// Messages its agents sent (accepted).
    pub sent: u64,
    /// Distinct messages its consumers received.
    pub received: u64,
}

/// Everything the ledger holds.
#[derive(Debug, Default)]
pub struct Book {
    /// Messages by id.
    pub msgs: HashMap<String, Msg>,
    /// Per node.
    pub nodes: Vec<NodeCounts>,
    /// `send` calls accepted (a fan-out counts once here).
    pub sends_ok: u64,
    /// `send` failures by reason.
    pub send_failed: BTreeMap<String, u64>,
    /// Sends skipped because `max_in_flight` were busy, or nobody could send.
    pub skipped: BTreeMap<String, u64>,
    /// Hand-overs after a successful ack.
    pub duplicates: u64,
    /// Some duplicate ids.
    pub duplicate_ids: Vec<String>,
    /// Hand-overs before an ack (lease lapsed, crash before the ack).
    pub redeliveries: u64,
    /// Hand-overs to an agent other than the recipient.
    pub misrouted: u64,
    /// Acks refused, by reason.
    pub ack_refused: BTreeMap<String, u64>,
    /// Failed polls and ack calls.
    pub consumer_errors: u64,
    /// Encoded size of an envelope seen by a consumer (for byte estimates).
    pub envelope_bytes: Option<usize>,
}

impl Book {
    fn node(&mut self, slot: usize) -> &mut NodeCounts {
        if self.nodes.len() <= slot {
            self.nodes.resize(slot + 1, NodeCounts::default());
        }
        &mut self.nodes[slot]
    }

    /// `send` accepted these `(message id, recipient)`.
    pub fn accepted(&mut self, ids: Vec<(String, AgentId, Option<usize>)>, side: SendSide) {
        self.sends_ok += 1;
        let n = ids.len() as u64;
        for (id, to, to_slot) in ids {
            let m = self.msgs.entry(id).or_default();
            m.send = Some(SendSide {
                to_slot,
                ..side.clone()
            });
            m.to = Some(to);
        }
        self.node(side.from_slot).sent += n;
    }

    /// A consumer of `agent` on node `slot` was handed these messages at `now_s`.
    pub fn received(&mut self, slot: usize, agent: &AgentId, msgs: &[InboxMessage], now_s: f64) {
        for im in msgs {
            if self.envelope_bytes.is_none() {
                self.envelope_bytes = Some(crate::wire::encode(&im.envelope).len());
            }
            let m = self.msgs.entry(im.envelope.id.clone()).or_default();
            if m.to.as_ref().is_some_and(|to| to != agent) {
                self.misrouted += 1;
            }
            m.to.get_or_insert_with(|| agent.clone());
            m.receptions += 1;
            if m.acked {
                m.after_ack += 1;
                self.duplicates += 1;
                if self.duplicate_ids.len() < LIST_IDS {
                    self.duplicate_ids.push(im.envelope.id.clone());
                }
            } else if m.received_s.is_some() {
                self.redeliveries += 1;
            } else {
                m.received_s = Some(now_s);
                self.node(slot).received += 1;
            }
        }
    }

    /// An ack of `id` succeeded.
    pub fn acked(&mut self, id: &str) {
        if let Some(m) = self.msgs.get_mut(id) {
            m.acked = true;
        }
    }

    /// Count one occurrence in a keyed counter.
    pub fn bump(map: &mut BTreeMap<String, u64>, key: &str) {
        *map.entry(key.to_string()).or_default() += 1;
    }

    /// Messages accepted but not yet handed to a consumer.
    pub fn outstanding(&self) -> impl Iterator<Item = (&String, &Msg)> {
        self.msgs
            .iter()
            .filter(|(_, m)| m.send.is_some() && m.received_s.is_none())
    }
}

/// The ledger, shared by the traffic generator and the consumers.
#[derive(Debug, Default)]
pub struct Ledger {
    book: Mutex<Book>,
}

impl Ledger {
    /// Work on the book (no awaits inside).
    pub fn with<R>(&self, f: impl FnOnce(&mut Book) -> R) -> R {
        f(&mut self.book.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Envelope;

    fn agent(n: u8) -> AgentId {
        AgentId::from_public(&[n; 32])
    }

    fn inbox(id: &str, to: &AgentId) -> InboxMessage {
        InboxMessage {
            envelope: Envelope {
                id: id.into(),
                from: agent(9),
                from_handle: "x".into(),
                to: to.clone(),
                subject: None,
                body_json: "1".into(),
                reply_to: None,
                created_at_ms: 0,
                expires_at_ms: 0,
                trace_id: id.into(),
                delegation_json: None,
            },
            received_at_ms: 0,
            delivery_count: 1,
        }
    }

    fn side(from: usize) -> SendSide {
        SendSide {
            sent_s: 1.0,
            from_slot: from,
            to_slot: Some(2),
            expires_ms: u64::MAX,
            pattern: Pattern::RandomPairs,
        }
    }

    #[test]
    fn redelivery_before_ack_is_not_a_duplicate_after_ack_is() {
        let (a, mut b) = (agent(1), Book::default());
        b.accepted(vec![("m1".into(), a.clone(), Some(2))], side(0));
        b.received(2, &a, &[inbox("m1", &a)], 2.0);
        b.received(2, &a, &[inbox("m1", &a)], 3.0);
        assert_eq!((b.redeliveries, b.duplicates), (1, 0));
        b.acked("m1");
        b.received(2, &a, &[inbox("m1", &a)], 4.0);
        assert_eq!((b.redeliveries, b.duplicates), (1, 1));
        assert_eq!(b.duplicate_ids, vec!["m1".to_string()]);
        let m = &b.msgs["m1"];
        assert_eq!((m.received_s, m.receptions, m.after_ack), (Some(2.0), 3, 1));
        assert_eq!(b.nodes[2].received, 1, "distinct messages only");
        assert_eq!(b.nodes[0].sent, 1);
    }

    #[test]
    fn a_message_received_before_send_returned_is_matched() {
        let (a, mut b) = (agent(1), Book::default());
        b.received(2, &a, &[inbox("m1", &a)], 1.5);
        b.acked("m1");
        assert_eq!(b.outstanding().count(), 0, "no send side yet");
        b.accepted(vec![("m1".into(), a.clone(), Some(2))], side(0));
        let m = &b.msgs["m1"];
        assert!(m.acked && m.received_s == Some(1.5) && m.send.is_some());
        assert_eq!(b.outstanding().count(), 0);
    }

    #[test]
    fn wrong_recipient_is_counted() {
        let (a, c, mut b) = (agent(1), agent(3), Book::default());
        b.accepted(vec![("m1".into(), a, Some(2))], side(0));
        b.received(4, &c, &[inbox("m1", &c)], 2.0);
        assert_eq!(b.misrouted, 1);
    }
}
