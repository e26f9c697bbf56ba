//! Acknowledgements from local agents: one durable write for any number of
//! acks, then the acked messages' receipts queued back to their senders'
//! nodes, one row of them per node.

use super::ending::InboxTables;
use super::lease;
use super::records::InboxState;
use super::{Delivery, Error, Stats};
use crate::identity::AgentId;
use crate::time::now_ms;
use crate::wire::ReceiptKind;

/// Most acks in one call.
pub const MAX_ACKS: usize = 1000;

impl Delivery {
    /// Acknowledge a message; `result_json` travels back in the receipt.
    /// Acking an already-acknowledged message succeeds again.
    pub async fn ack(
        &self,
        agent: &AgentId,
        id: &str,
        result_json: Option<String>,
    ) -> Result<(), Error> {
        self.ack_many(agent, vec![(id.to_string(), result_json)])
            .await?
            .pop()
            .unwrap_or(Ok(()))
    }

    /// Acknowledge several messages in one durable write; one result per
    /// message, in order.
    pub async fn ack_many(
        &self,
        agent: &AgentId,
        acks: Vec<(String, Option<String>)>,
    ) -> Result<Vec<Result<(), Error>>, Error> {
        if !self.inner.discovery.is_local(agent) {
            return Err(Error::AgentNotLocal(agent.clone()));
        }
        if acks.len() > MAX_ACKS {
            return Err(Error::Invalid(format!("at most {MAX_ACKS} acks at once")));
        }
        // Leases not yet saved go with the ack (`delivery::lease`), but
        // not those of the messages acked now: their end replaces them.
        let (leases, ended) = {
            let acked: Vec<&str> = acks.iter().map(|(id, _)| id.as_str()).collect();
            self.inner.inboxes.take_for_ack(agent, &acked)
        };
        let saving = leases.clone();
        let a = agent.clone();
        // The key of the receipts' row (one row for the whole ack).
        let key = self.inner.ids.next(now_ms());
        let written = self
            .inner
            .store
            .write(move |txn| {
                let mut t = InboxTables::open(txn)?;
                for (_, l) in &saving {
                    lease::write(&mut t.inbox, a.as_str(), l)?;
                }
                let mut results = Vec::with_capacity(acks.len());
                let mut acked = Vec::new();
                for (id, result_json) in acks {
                    let Some(rec) = t.get(a.as_str(), &id)? else {
                        results.push(Err(Error::UnknownMessage(id)));
                        continue;
                    };
                    let refused = match rec.state {
                        InboxState::Pending => None,
                        InboxState::Acked => Some(Ok(())),
                        InboxState::DeadLetter => Some(Err(Error::NotPending {
                            id: id.clone(),
                            state: "dead-lettered",
                        })),
                        InboxState::Expired => Some(Err(Error::NotPending {
                            id: id.clone(),
                            state: "expired",
                        })),
                    };
                    if let Some(r) = refused {
                        results.push(r);
                        continue;
                    }
                    t.finish(
                        a.as_str(),
                        &id,
                        rec,
                        InboxState::Acked,
                        ReceiptKind::Processed { result_json },
                        now_ms(),
                    )?;
                    acked.push(id);
                    results.push(Ok(()));
                }
                let receipts = t.write_receipts(&key)?;
                Ok((results, acked, receipts))
            })
            .await;
        let (results, ids, receipts) = match written {
            Ok(r) => r,
            Err(e) => {
                self.inner.inboxes.unsaved_again(agent, leases, ended);
                return Err(e.into());
            }
        };
        self.forget_pending(agent, &ids);
        Stats::add(&self.inner.stats.acked, ids.len());
        self.queue_receipts(receipts).await;
        Ok(results)
    }
}
