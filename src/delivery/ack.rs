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

/// Largest result an ack may carry (a message body's limit): its receipt
/// must fit in one request to the sender's node, or it would be retried,
/// and hold up the receipts behind it, forever.
pub const MAX_RESULT_BYTES: usize = crate::wire::MAX_BODY_BYTES;

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
                    if let Some(r) = result_json.as_ref().filter(|r| r.len() > MAX_RESULT_BYTES) {
                        results.push(Err(Error::Invalid(format!(
                            "the result of message {id} is {} bytes; an ack's result may have at most {MAX_RESULT_BYTES}",
                            r.len()
                        ))));
                        continue;
                    }
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::delivery::SendRequest;
    use crate::delivery::testing::{register, start_node};
    use crate::routing::Address;

    /// A result too big for a receipt is refused for its message alone,
    /// naming it; the message stays pending and a later ack ends it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_result_too_big_for_a_receipt_is_refused_and_the_message_stays_pending() {
        let dir = tempfile::tempdir().unwrap();
        let node = start_node(dir.path()).await;
        let h = node.handle();
        let [alice, bob] = register(&h, ["alice", "bob"]).await;
        let d = h.delivery();
        let mut ids = Vec::new();
        for body in ["1", "2"] {
            let sent = d
                .send(SendRequest::new(
                    alice.clone(),
                    Address::Agent(bob.clone()),
                    body,
                ))
                .await
                .unwrap();
            ids.push(sent.messages[0].0.clone());
        }
        let mut got = 0;
        while got < 2 {
            got += d
                .poll(&bob, Duration::from_secs(10), 10)
                .await
                .unwrap()
                .len();
        }
        let huge = format!("\"{}\"", "x".repeat(MAX_RESULT_BYTES));
        let results = d
            .ack_many(
                &bob,
                vec![
                    (ids[0].clone(), Some(huge)),
                    (ids[1].clone(), Some("7".into())),
                ],
            )
            .await
            .unwrap();
        match &results[0] {
            Err(Error::Invalid(why)) => {
                assert!(why.contains(&ids[0]) && why.contains("at most"), "{why}")
            }
            other => panic!("want an invalid result, got {other:?}"),
        }
        assert!(results[1].is_ok(), "{:?}", results[1]);
        assert_eq!(d.pending_count(&bob), 1);
        d.ack(&bob, &ids[0], Some("8".into())).await.unwrap();
        assert_eq!(d.pending_count(&bob), 0);
        drop(h);
        node.shutdown().await;
    }
}
