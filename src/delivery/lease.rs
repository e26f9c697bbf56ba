//! Leases are saved late. An offer leases messages in memory only (the
//! pending index); the lease and the offer count reach the database with
//! the agent's next ack, in the same transaction, or at the courier's next
//! sweep, whichever comes first. An agent that acks what it was offered
//! (the common case) so never has its leases written at all: the ack's
//! final state replaces them.
//!
//! What a crash loses is what a lost lease always meant: the message is
//! offered again without that offer counted. The sweep bounds how long a
//! lease can stay unsaved, so a message that brings its whole host down
//! still counts its offers and is dead-lettered in the end.

use std::collections::HashSet;

use super::Delivery;
use super::ending::{InboxTable, read_record};
use super::inbox::{AgentBox, Inboxes};
use super::records::InboxState;
use crate::identity::AgentId;
use crate::store::tables::INBOX;
use crate::wire;

/// A lease to save: message id, offers so far, leased until (ms).
pub(super) type Lease = (String, u32, u64);

/// Ids leased since their lease was last saved, of one agent.
pub(super) type Unsaved = HashSet<String, foldhash::fast::RandomState>;

/// Leases taken from the index to be written, by agent.
pub(super) type Taken = Vec<(AgentId, Vec<Lease>)>;

impl Inboxes {
    /// Take every lease not yet saved, marking them saved.
    pub(super) fn take_unsaved(&self) -> Taken {
        let mut boxes = self.lock();
        let mut out = Vec::new();
        for (agent, b) in boxes.iter_mut() {
            let leases = b.take_unsaved();
            if !leases.is_empty() {
                out.push((agent.clone(), leases));
            }
        }
        out
    }

    /// For an ack of `acked` by `agent`: take the agent's other leases not
    /// yet saved, and forget that the acked ones are unsaved (the ack's
    /// final state replaces them). Returns the leases and the acked ids
    /// that were unsaved, for [`Inboxes::unsaved_again`] should the ack
    /// fail.
    pub(super) fn take_for_ack(&self, agent: &AgentId, acked: &[&str]) -> (Taken, Vec<String>) {
        let mut boxes = self.lock();
        let Some(b) = boxes.get_mut(agent) else {
            return (Vec::new(), Vec::new());
        };
        let ended: Vec<String> = acked.iter().filter_map(|id| b.unsaved.take(*id)).collect();
        let leases = b.take_unsaved();
        let taken = if leases.is_empty() {
            Vec::new()
        } else {
            vec![(agent.clone(), leases)]
        };
        (taken, ended)
    }

    /// What [`Inboxes::take_unsaved`] or [`Inboxes::take_for_ack`] took,
    /// when its write failed: unsaved again, unless the message left the
    /// index meanwhile.
    pub(super) fn unsaved_again(&self, agent: &AgentId, taken: Taken, ended: Vec<String>) {
        let mut boxes = self.lock();
        for (a, leases) in taken {
            if let Some(b) = boxes.get_mut(&a) {
                for (id, _, _) in leases {
                    b.mark_unsaved(id);
                }
            }
        }
        if let Some(b) = boxes.get_mut(agent) {
            for id in ended {
                b.mark_unsaved(id);
            }
        }
    }
}

impl AgentBox {
    fn take_unsaved(&mut self) -> Vec<Lease> {
        let mut leases = Vec::with_capacity(self.unsaved.len());
        for id in self.unsaved.drain() {
            if let Some(s) = self.pending.get_mut(&id) {
                s.saved = true;
                leases.push((id, s.delivery_count, s.lease_until_ms));
            }
        }
        leases
    }

    fn mark_unsaved(&mut self, id: String) {
        if let Some(s) = self.pending.get_mut(&id) {
            s.saved = false;
            self.unsaved.insert(id);
        }
    }
}

/// Write `leases` of `agent`'s pending entries. Counts only grow: a lease
/// taken earlier but written later (two writers racing) never lowers a
/// stored count.
pub(super) fn write(
    inbox: &mut InboxTable<'_>,
    agent: &str,
    leases: &[Lease],
) -> Result<(), crate::store::Error> {
    for (id, count, until) in leases {
        let Some(mut rec) = read_record(inbox, agent, id)? else {
            continue;
        };
        if rec.state != InboxState::Pending
            || (*count, *until) <= (rec.delivery_count, rec.lease_until_ms)
        {
            continue;
        }
        rec.delivery_count = *count;
        rec.lease_until_ms = *until;
        inbox.insert_with((agent, id.as_str()), |b| wire::encode_into(b, &rec))?;
    }
    Ok(())
}

impl Delivery {
    /// Save every lease not yet saved (the courier's sweep), durably.
    pub(crate) async fn save_leases(&self) {
        let taken = self.inner.inboxes.take_unsaved();
        if taken.is_empty() {
            return;
        }
        let n: usize = taken.iter().map(|(_, l)| l.len()).sum();
        let result = self
            .inner
            .store
            .write(move |txn| {
                let mut inbox = txn.open_table(INBOX)?;
                for (agent, leases) in &taken {
                    write(&mut inbox, agent.as_str(), leases)?;
                }
                Ok(taken)
            })
            .await;
        match result {
            Ok(_) => tracing::debug!(leases = n, "leases saved"),
            // Not taken again: a write fails when the store is broken or a
            // record is corrupt, and trying every sweep would not mend it.
            // The next ack of the agent still persists what it can.
            Err(e) => tracing::warn!(error = %e, leases = n, "cannot save leases"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::inbox::{Inboxes, Slot};
    use crate::delivery::SendRequest;
    use crate::delivery::testing::{register, start_node, wait_until};
    use crate::identity::AgentId;
    use crate::routing::Address;
    use crate::store::tables::INBOX;

    fn slot(count: u32, until: u64, saved: bool) -> Slot {
        Slot {
            lease_until_ms: until,
            delivery_count: count,
            expires_at_ms: u64::MAX,
            received_at_ms: 1,
            saved,
        }
    }

    #[test]
    fn an_ack_takes_the_other_unsaved_leases_and_gives_them_back_if_it_fails() {
        let inboxes = Inboxes::default();
        let bob = AgentId::from_public(&[2; 32]);
        {
            let mut boxes = inboxes.lock();
            let b = boxes.entry(bob.clone()).or_default();
            for (id, saved) in [("m1", false), ("m2", false), ("m3", true)] {
                b.pending.insert(id.into(), slot(1, 50, saved));
                if !saved {
                    b.unsaved.insert(id.into());
                }
            }
        }
        let (taken, ended) = inboxes.take_for_ack(&bob, &["m1"]);
        // m1 ends with the ack, m3's lease is stored already.
        assert_eq!(taken, vec![(bob.clone(), vec![("m2".to_string(), 1, 50)])]);
        assert_eq!(ended, vec!["m1".to_string()]);
        {
            let boxes = inboxes.lock();
            let b = &boxes[&bob];
            assert!(b.unsaved.is_empty());
            assert!(b.pending["m2"].saved);
        }
        // Nothing is left for the sweep.
        assert!(inboxes.take_unsaved().is_empty());
        // The ack's write failed: both are unsaved again, and the sweep
        // takes them.
        inboxes.unsaved_again(&bob, taken, ended);
        let mut swept = inboxes.take_unsaved();
        swept[0].1.sort();
        assert_eq!(
            swept,
            vec![(
                bob.clone(),
                vec![("m1".to_string(), 1, 50), ("m2".to_string(), 1, 50)]
            )]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lease_never_acked_reaches_the_database_with_the_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let node = start_node(dir.path()).await;
        let h = node.handle();
        let [alice, bob] = register(&h, ["alice", "bob"]).await;
        let sent = h
            .delivery()
            .send(SendRequest::new(alice, Address::Agent(bob.clone()), "1"))
            .await
            .unwrap();
        let id = sent.messages[0].0.clone();
        let got = h
            .delivery()
            .poll(&bob, Duration::from_secs(10), 10)
            .await
            .unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].envelope.id, id);
        // Never acked: the courier's sweep saves the lease and its count.
        let rec = || {
            let r = h.store().read().unwrap();
            let t = r.open_table(INBOX).unwrap();
            let v = t.get((bob.as_str(), id.as_str())).unwrap().unwrap();
            crate::delivery::records::decode::<crate::delivery::records::InboxRecord>(
                "inbox",
                v.value(),
            )
            .unwrap()
        };
        let saved = wait_until(
            "the sweep to save the lease",
            10,
            || async { Some(rec()).filter(|r| r.delivery_count == 1) },
            || format!("{:?}", rec()),
        )
        .await;
        assert!(saved.lease_until_ms > 0, "{saved:?}");
        drop(h);
        node.shutdown().await;
    }
}
