//! Consumers: one task per simulation agent that long-polls its inbox
//! through the library API, records every hand-over in the ledger, and
//! acknowledges in one durable write per batch.
//!
//! Stopping a consumer only interrupts a poll; an ack in progress is
//! always finished first, so the ledger knows exactly which acks
//! succeeded. (Crashes mid-ack are the process-level tests' business.)

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::ledger::{Book, Ledger};
use crate::delivery::Error as DeliveryError;
use crate::identity::AgentId;
use crate::node::NodeHandle;

/// Longest wait of one poll.
const POLL_WAIT: Duration = Duration::from_secs(2);
/// Most messages per poll (and per ack call).
const POLL_MAX: usize = 256;
/// Pause after a failed poll.
const ERROR_PAUSE: Duration = Duration::from_millis(200);

/// The consumers of each node.
#[derive(Debug, Default)]
pub struct Consumers {
    running: HashMap<usize, (CancellationToken, Vec<JoinHandle<()>>)>,
}

impl Consumers {
    /// Start consumers for `agents` of node `slot`.
    pub fn start(
        &mut self,
        slot: usize,
        h: &NodeHandle,
        agents: &[AgentId],
        ledger: &Arc<Ledger>,
        t0: Instant,
    ) {
        let cancel = CancellationToken::new();
        let tasks = agents
            .iter()
            .map(|a| {
                tokio::spawn(consume(
                    slot,
                    h.clone(),
                    a.clone(),
                    ledger.clone(),
                    t0,
                    cancel.clone(),
                ))
            })
            .collect();
        self.running.insert(slot, (cancel, tasks));
    }

    /// Stop node `slot`'s consumers and wait until they dropped their handles.
    pub async fn stop(&mut self, slot: usize) {
        if let Some((cancel, tasks)) = self.running.remove(&slot) {
            cancel.cancel();
            for t in tasks {
                let _ = t.await;
            }
        }
    }

    /// Stop every consumer: cancel all, then wait for all at once (one node
    /// after the other took minutes at 1,000 nodes on a busy runtime).
    pub async fn stop_all(&mut self) {
        let all: Vec<_> = self.running.drain().map(|(_, v)| v).collect();
        for (cancel, _) in &all {
            cancel.cancel();
        }
        futures::future::join_all(all.into_iter().flat_map(|(_, tasks)| tasks)).await;
    }
}

async fn consume(
    slot: usize,
    h: NodeHandle,
    agent: AgentId,
    ledger: Arc<Ledger>,
    t0: Instant,
    cancel: CancellationToken,
) {
    let d = h.delivery();
    loop {
        let got = tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            r = d.poll(&agent, POLL_WAIT, POLL_MAX) => r,
        };
        let msgs = match got {
            Ok(m) if m.is_empty() => continue,
            Ok(m) => m,
            Err(DeliveryError::Stopped) => return,
            Err(_) => {
                ledger.with(|b| b.consumer_errors += 1);
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(ERROR_PAUSE) => continue,
                }
            }
        };
        let now = t0.elapsed().as_secs_f64();
        ledger.with(|b| b.received(slot, &agent, &msgs, now));
        let ids: Vec<String> = msgs.into_iter().map(|m| m.envelope.id).collect();
        let acks = ids.iter().map(|id| (id.clone(), None)).collect();
        match d.ack_many(&agent, acks).await {
            Ok(results) => ledger.with(|b| {
                for (id, r) in ids.iter().zip(results) {
                    match r {
                        Ok(()) => b.acked(id),
                        Err(e) => Book::bump(&mut b.ack_refused, refusal(&e)),
                    }
                }
            }),
            Err(DeliveryError::Stopped) => return,
            Err(_) => ledger.with(|b| b.consumer_errors += 1),
        }
    }
}

fn refusal(e: &DeliveryError) -> &'static str {
    match e {
        DeliveryError::NotPending { state, .. } => state,
        DeliveryError::UnknownMessage(_) => "unknown message",
        _ => "other",
    }
}
