//! The sender's view: status queries, and receipts from recipients' nodes.

use libp2p::PeerId;
use tracing::debug;

use super::records::{self, HistoryEntry, Progress, Status, Summary, Tracking};
use super::{Delivery, Error, Stats, ids, verify_node_sig};
use crate::store::tables::{OUT_MESSAGES, OUT_STATUS, REPLIES};
use crate::time::now_ms;
use crate::wire::envelope::ReceiptPayload;
use crate::wire::{self, Receipt, ReceiptKind};

/// A message as the sender's node tracks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageView {
    /// Message id.
    pub id: String,
    /// Where it went (its envelope is not kept once it is delivered).
    pub summary: Summary,
    /// Its tracking.
    pub tracking: Tracking,
    /// Ids of replies known on this node.
    pub replies: Vec<String>,
}

impl Delivery {
    /// Status and history of a message sent from this node.
    pub fn message(&self, id: &str) -> Result<MessageView, Error> {
        let r = self.inner.store.read()?;
        let e = Error::Store;
        let status = r.open_table(OUT_STATUS)?;
        let mut progress = status
            .get(id)
            .map_err(e)?
            .map(|v| Progress::decode(v.value()))
            .transpose()?;
        let summary = match progress.as_mut().and_then(|p| p.summary.take()) {
            Some(s) => s,
            // Not handed over yet: the envelope row has it.
            None => {
                let msgs = r.open_table(OUT_MESSAGES)?;
                match msgs.get(id).map_err(e)? {
                    Some(stored) => {
                        let (head, envelope) = records::decode_outgoing(stored.value())?;
                        Summary::of(&envelope, &head)
                    }
                    // Handed over between the two reads (a snapshot sees
                    // commits made after it was taken): the status row,
                    // written in the same commit that removed the
                    // envelope, holds the summary now.
                    None => {
                        let mut again = status
                            .get(id)
                            .map_err(e)?
                            .map(|v| Progress::decode(v.value()))
                            .transpose()?;
                        match again.as_mut().and_then(|p| p.summary.take()) {
                            Some(s) => {
                                progress = again;
                                s
                            }
                            None => return Err(Error::UnknownMessage(id.to_string())),
                        }
                    }
                }
            }
        };
        let tracking = Tracking::from_parts(&summary, progress);
        Ok(MessageView {
            id: id.to_string(),
            summary,
            tracking,
            replies: self.replies_to(id)?,
        })
    }

    /// Ids of known replies to a message, oldest first.
    pub fn replies_to(&self, id: &str) -> Result<Vec<String>, Error> {
        let r = self.inner.store.read()?;
        let t = r.open_table(REPLIES)?;
        let mut out = Vec::new();
        for row in t.range((id, "")..)? {
            let (k, _) = row?;
            let (orig, reply) = k.value();
            if orig != id {
                break;
            }
            out.push(reply.to_string());
        }
        Ok(out)
    }

    /// Receipts from a peer: verify the batch, then apply.
    pub(crate) async fn apply_receipts(
        &self,
        peer: PeerId,
        payload: &[u8],
        sig: &[u8],
    ) -> Result<(), String> {
        verify_node_sig(&peer, super::RECEIPTS_DOMAIN, payload, sig)?;
        let p: ReceiptPayload =
            wire::decode(payload, wire::MAX_FRAME_BYTES).map_err(|e| e.to_string())?;
        if p.to_node != self.inner.node_id.to_string() {
            return Err(format!(
                "receipts are addressed to node {}, not this one",
                p.to_node
            ));
        }
        self.apply_receipt_list(peer, p.receipts)
            .await
            .map_err(|e| e.to_string())
    }

    /// Apply receipts that `peer` (the recipients' node) issued. A receipt
    /// for a message that was not sent to that node is ignored.
    pub(crate) async fn apply_receipt_list(
        &self,
        peer: PeerId,
        receipts: Vec<Receipt>,
    ) -> Result<(), Error> {
        let node = peer.to_string();
        let applied = self
            .inner
            .store
            .write(move |txn| {
                let mut msgs = txn.open_table(OUT_MESSAGES)?;
                let mut status = txn.open_table(OUT_STATUS)?;
                let mut applied = 0usize;
                for rc in receipts {
                    let id = rc.message_id.as_str();
                    let at = rc.at_ms.min(now_ms());
                    let got = status.get(id)?;
                    // The common case, a message delivered before: its
                    // summary is read in place and written back as it is.
                    if let Some(mut p) = got.as_ref().and_then(|v| Progress::borrowed(v.value())) {
                        let to_node = p.summary.as_ref().map(|s| s.to_node);
                        if to_node != Some(node.as_str()) {
                            debug!(%id, from = %node, "receipt from a node the message was not sent to; ignored");
                            continue;
                        }
                        if apply_kind(&mut p, rc.kind, at) {
                            ensure_delivered_step(&mut p.history);
                            status.insert_with(id, |b| wire::encode_into(b, &p))?;
                            applied += 1;
                        }
                        continue;
                    }
                    let mut p = match &got {
                        Some(v) => Progress::decode(v.value())?,
                        None => Progress::queued(ids::time_of(id).unwrap_or(0)),
                    };
                    drop(got);
                    let to_node = match &p.summary {
                        Some(s) => s.to_node.clone(),
                        None => match msgs.get(id)? {
                            Some(v) => records::split_outgoing(v.value())?.0.to_node,
                            None => continue,
                        },
                    };
                    if to_node != node {
                        debug!(%id, from = %node, "receipt from a node the message was not sent to; ignored");
                        continue;
                    }
                    if apply_kind(&mut p, rc.kind, at) {
                        ensure_delivered_step(&mut p.history);
                        // Every receipt is final: the envelope goes.
                        records::hand_over(&mut msgs, id, &mut p, None)?;
                        status.insert_with(id, |b| wire::encode_into(b, &p))?;
                        applied += 1;
                    }
                }
                Ok(applied)
            })
            .await?;
        Stats::add(&self.inner.stats.receipts_applied, applied);
        Ok(())
    }
}

/// Apply a receipt's outcome to `p`; whether it moved.
fn apply_kind<S>(p: &mut Progress<S>, kind: ReceiptKind, at: u64) -> bool {
    match kind {
        ReceiptKind::Processed { result_json } => {
            let moved = p.advance(Status::Processed, at, None);
            if moved {
                p.result_json = result_json;
            }
            moved
        }
        ReceiptKind::DeadLetter { deliveries } => p.advance(
            Status::DeadLetter,
            at,
            Some(format!("offered {deliveries} times without an ack")),
        ),
        ReceiptKind::Expired => p.advance(
            Status::Expired,
            at,
            Some("expired in the recipient's inbox".into()),
        ),
    }
}

/// A receipt proves delivery: when it overtook the delivery answer, the
/// history still shows the message was delivered (at the receipt's time).
fn ensure_delivered_step(history: &mut Vec<HistoryEntry>) {
    if history.iter().any(|h| h.status == Status::Delivered) {
        return;
    }
    if let Some(last) = history.last().cloned() {
        let pos = history.len() - 1;
        history.insert(
            pos,
            HistoryEntry {
                status: Status::Delivered,
                at_ms: last.at_ms,
                detail: None,
            },
        );
    }
}
