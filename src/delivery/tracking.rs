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
        // Before the read: a held delivery is released only once its row
        // is written, so one of the two sees it.
        let held = self.inner.handed.get(id);
        let r = self.inner.store.read()?;
        let status = r.open_table(OUT_STATUS)?;
        let mut progress = read_progress(&status, id)?;
        if let Some(h) = held {
            let p = progress.get_or_insert_with(|| Progress::queued(h.out.summary.created_at_ms));
            // A row with a summary already holds the delivery.
            if !p.status.is_final() {
                h.record(p);
            }
        }
        let msgs = r.open_table(OUT_MESSAGES)?;
        let (summary, progress) = summary_of(&status, &msgs, id, progress)?;
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
        // Deliveries held in memory (`delivery::handed`): their status row
        // is written here for the first time, with every step.
        let held = self
            .inner
            .handed
            .take(receipts.iter().map(|rc| rc.message_id.as_str()));
        let inside = held.clone();
        let result = self
            .inner
            .store
            .write(move |txn| {
                let mut msgs = txn.open_table(OUT_MESSAGES)?;
                let mut t = records::StatusTables::open(txn)?;
                let mut applied = 0usize;
                // Which held deliveries this wrote (or found final).
                let mut written = vec![false; inside.len()];
                for ((rc, held), done) in receipts.into_iter().zip(&inside).zip(&mut written) {
                    let id = rc.message_id.as_str();
                    let at = rc.at_ms.min(now_ms());
                    if let Some(h) = held {
                        let out = &h.out;
                        if !issued_by(id, &out.summary.to_node, &node) {
                            continue;
                        }
                        let mut p = Progress::load_since(
                            &t.status,
                            id,
                            out.summary.created_at_ms,
                            out.since,
                        )?;
                        *done = true;
                        if p.status.is_final() {
                            continue;
                        }
                        h.record(&mut p);
                        if apply_kind(&mut p, rc.kind, at) {
                            records::hand_over_and_write(&mut t, &mut msgs, id, &p, &out.summary)?;
                            applied += 1;
                        }
                        continue;
                    }
                    let got = t.status.get(id)?;
                    // The common case, a message delivered before: its
                    // summary is read in place and written back as it is.
                    if let Some(mut p) = got.as_ref().and_then(|v| Progress::borrowed(v.value())) {
                        let to_node = p.summary.as_ref().map_or("", |s| s.to_node);
                        if issued_by(id, to_node, &node) && apply_kind(&mut p, rc.kind, at) {
                            t.status.insert_with(id, |b| wire::encode_into(b, &p))?;
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
                    if issued_by(id, &to_node, &node) && apply_kind(&mut p, rc.kind, at) {
                        // Every receipt is final: the envelope goes.
                        records::hand_over(&mut msgs, id, &mut p, None)?;
                        t.put(id, &p, p.summary.as_ref())?;
                        applied += 1;
                    }
                }
                Ok((applied, written))
            })
            .await;
        let handed = &self.inner.handed;
        let applied = match result {
            Ok((applied, written)) => {
                let mine = || held.iter().zip(&written);
                handed.release(mine().filter(|(_, w)| **w).filter_map(|(h, _)| h.as_ref()));
                // A receipt from a node the message did not go to: still
                // held, for the sweep or the right receipt.
                handed.untake(mine().filter(|(_, w)| !**w).filter_map(|(h, _)| h.as_ref()));
                applied
            }
            Err(e) => {
                // Held still; the receipt comes again.
                handed.untake(held.iter().flatten());
                return Err(e.into());
            }
        };
        Stats::add(&self.inner.stats.receipts_applied, applied);
        Ok(())
    }
}

type Table<'a> = crate::store::View<'a, &'static str, &'static [u8]>;

/// Message `id`'s stored progress, if it has any.
fn read_progress(status: &Table<'_>, id: &str) -> Result<Option<Progress>, Error> {
    Ok(status
        .get(id)
        .map_err(Error::Store)?
        .map(|v| Progress::decode(v.value()))
        .transpose()?)
}

/// Message `id`'s summary, and its progress, given the `progress` read
/// from `status` first: the progress holds the summary once the message
/// is handed over, its envelope row before that.
fn summary_of(
    status: &Table<'_>,
    msgs: &Table<'_>,
    id: &str,
    mut progress: Option<Progress>,
) -> Result<(Summary, Option<Progress>), Error> {
    if let Some(s) = progress.as_mut().and_then(|p| p.summary.take()) {
        return Ok((s, progress));
    }
    if let Some(stored) = msgs.get(id).map_err(Error::Store)? {
        let (head, envelope) = records::decode_outgoing(stored.value())?;
        return Ok((Summary::of(&envelope, &head), progress));
    }
    // Handed over between the two reads (a snapshot sees commits made
    // after it was taken): the status row, written in the same commit
    // that removed the envelope, holds the summary now.
    let mut again = read_progress(status, id)?;
    match again.as_mut().and_then(|p| p.summary.take()) {
        Some(s) => Ok((s, again)),
        None => Err(Error::UnknownMessage(id.to_string())),
    }
}

/// Whether a receipt for message `id`, sent to node `to_node`, came from
/// that node (`from`); one from any other node is ignored.
fn issued_by(id: &str, to_node: &str, from: &str) -> bool {
    if to_node != from {
        debug!(%id, %from, "receipt from a node the message was not sent to; ignored");
    }
    to_node == from
}

/// Apply a receipt's outcome to `p`; whether it moved. A receipt proves
/// delivery, so a move also makes sure the history shows it.
fn apply_kind<S>(p: &mut Progress<S>, kind: ReceiptKind, at: u64) -> bool {
    let moved = match kind {
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
    };
    if moved {
        ensure_delivered_step(&mut p.history);
    }
    moved
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::records::tests::{envelope, head, store_outgoing};
    use crate::store::Store;

    #[tokio::test]
    async fn a_message_handed_over_between_the_two_reads_is_still_found() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _w) = Store::open(dir.path()).unwrap();
        let env = envelope();
        let summary = Summary::of(&env, &head());
        store_outgoing(&store, "m1", &env).await;
        // Queued: a status query reads no progress...
        let r = store.read().unwrap();
        let status = r.open_table(OUT_STATUS).unwrap();
        let first = read_progress(&status, "m1").unwrap();
        assert!(first.is_none());
        // ... and before it reads the envelope row, the message is
        // handed over (status row written, envelope row removed).
        let known = summary.clone();
        store
            .write(move |txn| {
                let mut t = records::StatusTables::open(txn)?;
                let mut msgs = txn.open_table(OUT_MESSAGES)?;
                let mut p = Progress::queued(1);
                p.advance(Status::Delivered, 2, None);
                records::hand_over_and_write(&mut t, &mut msgs, "m1", &p, &known)
            })
            .await
            .unwrap();
        let msgs = r.open_table(OUT_MESSAGES).unwrap();
        assert!(
            msgs.get("m1").unwrap().is_none(),
            "the snapshot sees the hand-over"
        );
        let (got, progress) = summary_of(&status, &msgs, "m1", first).unwrap();
        assert_eq!(got, summary);
        assert_eq!(progress.unwrap().status, Status::Delivered);
        // A message neither row holds is unknown.
        assert!(matches!(
            summary_of(&status, &msgs, "m2", None),
            Err(Error::UnknownMessage(_))
        ));
    }
}
