//! Ending inbox entries: an entry that is acked, dead-lettered or expired
//! keeps its record as a tombstone, loses its envelope, and its receipt
//! goes back to the sender's node, all in the transaction that ends it.
//! The receipts of one transaction are written as one row per sender node
//! (`RECEIPT_BATCHES`), which the courier sends and then removes.

use super::records::{self, InboxRecord, InboxState};
use crate::store::tables::{INBOX, INBOX_MESSAGES, RECEIPT_BATCHES};
use crate::wire::{self, Receipt, ReceiptKind};

/// The inbox table (`INBOX`) or one keyed like it, open for writing.
pub(super) type InboxTable<'t> =
    crate::store::Table<'t, (&'static str, &'static str), &'static [u8]>;

/// `agent`'s inbox record of message `id`, if there is one.
pub(super) fn read_record(
    inbox: &InboxTable<'_>,
    agent: &str,
    id: &str,
) -> Result<Option<InboxRecord>, crate::store::Error> {
    inbox
        .get((agent, id))?
        .map(|v| records::decode::<InboxRecord>("inbox", v.value()))
        .transpose()
}

/// The three tables an inbox entry's end touches, open in one write
/// transaction, and the receipts of the entries ended in it so far.
pub(super) struct InboxTables<'t> {
    pub(super) inbox: InboxTable<'t>,
    messages: InboxTable<'t>,
    receipts: InboxTable<'t>,
    /// `(sender node, receipt)`, in the order the entries ended.
    ended: Vec<(String, Receipt)>,
}

/// Most bytes of receipts in one `RECEIPT_BATCHES` row (a row is sent
/// whole, in one request, so this bounds a request whatever the results
/// the agent acked with).
const RECEIPT_ROW_BYTES: usize = 1024 * 1024;

/// A row of receipts written for one sender node, to be queued for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReceiptRow {
    /// The node the receipts go to.
    pub(crate) node: String,
    /// The row's key there, unique per node.
    pub(crate) key: String,
    /// Encoded length of the row.
    pub(crate) bytes: u64,
}

impl<'t> InboxTables<'t> {
    pub(super) fn open(txn: &crate::store::Tx<'t>) -> Result<Self, crate::store::Error> {
        Ok(InboxTables {
            inbox: txn.open_table(INBOX)?,
            messages: txn.open_table(INBOX_MESSAGES)?,
            receipts: txn.open_table(RECEIPT_BATCHES)?,
            ended: Vec::new(),
        })
    }

    /// Write the receipts of the entries ended in this transaction: one
    /// row per sender node (more when their bytes exceed
    /// `RECEIPT_ROW_BYTES`), under `key`, a fresh id of this node (so
    /// rows sort in the order they were written). One row for a whole ack
    /// of many messages, instead of a row per message, each written,
    /// read back and removed again.
    pub(super) fn write_receipts(
        &mut self,
        key: &str,
    ) -> Result<Vec<ReceiptRow>, crate::store::Error> {
        let mut ended = std::mem::take(&mut self.ended);
        // Stable: each node's receipts keep their order.
        ended.sort_by(|a, b| a.0.cmp(&b.0));
        let mut rows = Vec::new();
        for mine in ended.chunk_by(|a, b| a.0 == b.0) {
            let node = &mine[0].0;
            let mut rest = mine;
            for part in 0.. {
                if rest.is_empty() {
                    break;
                }
                let (row, tail) = rest.split_at(fitting(rest));
                rest = tail;
                let batch: Vec<&Receipt> = row.iter().map(|(_, rc)| rc).collect();
                // Parts of one node's receipts sort after the first.
                let row_key = match part {
                    0 => key.to_string(),
                    n => format!("{key}.{n:06}"),
                };
                let mut len = 0;
                self.receipts
                    .insert_new_with((node.as_str(), row_key.as_str()), |b| {
                        // `b` may hold the key already.
                        let start = b.len();
                        wire::encode_into(b, &batch);
                        len = b.len() - start;
                    })?;
                rows.push(ReceiptRow {
                    node: node.clone(),
                    key: row_key,
                    bytes: len as u64,
                });
            }
        }
        Ok(rows)
    }

    /// The entry's record, if there is one.
    pub(super) fn get(
        &self,
        agent: &str,
        id: &str,
    ) -> Result<Option<InboxRecord>, crate::store::Error> {
        read_record(&self.inbox, agent, id)
    }

    /// End an entry in `state`: its record stays as a tombstone (to
    /// recognise duplicates), its envelope goes, and its receipt for the
    /// sender's node is kept for [`InboxTables::write_receipts`], which
    /// the caller runs before its transaction ends.
    pub(super) fn finish(
        &mut self,
        agent: &str,
        id: &str,
        mut rec: InboxRecord,
        state: InboxState,
        kind: ReceiptKind,
        at_ms: u64,
    ) -> Result<(), crate::store::Error> {
        let first = rec.state == InboxState::Pending;
        rec.state = state;
        rec.lease_until_ms = 0;
        self.inbox
            .insert_with((agent, id), |b| wire::encode_into(b, &rec))?;
        if first {
            // A pending entry's envelope is stored until it ends.
            self.messages.discard((agent, id))?;
        } else {
            self.messages.remove((agent, id))?;
        }
        self.keep_receipt(
            rec.from_node,
            Receipt {
                message_id: id.to_string(),
                kind,
                at_ms,
            },
        );
        Ok(())
    }

    /// Keep a receipt for `node` for [`InboxTables::write_receipts`].
    pub(super) fn keep_receipt(&mut self, node: String, receipt: Receipt) {
        self.ended.push((node, receipt));
    }
}

/// How many of `receipts` go in one row: as many as fit in
/// `RECEIPT_ROW_BYTES`, and at least one.
fn fitting(receipts: &[(String, Receipt)]) -> usize {
    let mut bytes = 0;
    receipts
        .iter()
        .take_while(|(_, rc)| {
            bytes += receipt_size(rc);
            bytes <= RECEIPT_ROW_BYTES
        })
        .count()
        .max(1)
}

/// About the encoded size of a receipt, to split rows.
fn receipt_size(rc: &Receipt) -> usize {
    let result = match &rc.kind {
        ReceiptKind::Processed { result_json } => result_json.as_ref().map_or(0, String::len),
        _ => 0,
    };
    rc.message_id.len() + result + 16
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn receipt(id: &str, result_json: Option<String>) -> Receipt {
        Receipt {
            message_id: id.into(),
            kind: ReceiptKind::Processed { result_json },
            at_ms: 7,
        }
    }

    /// The receipts of one transaction make one row per sender node, in
    /// the order their entries ended; a node's receipts beyond
    /// `RECEIPT_ROW_BYTES` go on in a further row that sorts after it.
    #[tokio::test]
    async fn receipts_of_one_transaction_are_a_row_per_node_split_by_size() {
        let dir = tempfile::tempdir().unwrap();
        let (store, w) = Store::open(dir.path()).unwrap();
        let big = "x".repeat(RECEIPT_ROW_BYTES / 2);
        let kept = vec![
            ("node-b", receipt("m1", None)),
            ("node-a", receipt("m2", None)),
            ("node-b", receipt("m3", Some(big.clone()))),
            ("node-b", receipt("m4", Some(big))),
            ("node-b", receipt("m5", None)),
        ];
        let written = kept.clone();
        let rows = store
            .write(move |txn| {
                let mut t = InboxTables::open(txn)?;
                for (node, rc) in written {
                    t.keep_receipt(node.into(), rc);
                }
                t.write_receipts("K")
            })
            .await
            .unwrap();
        let keys: Vec<(&str, &str)> = rows
            .iter()
            .map(|r| (r.node.as_str(), r.key.as_str()))
            .collect();
        assert_eq!(
            keys,
            vec![("node-a", "K"), ("node-b", "K"), ("node-b", "K.000001")]
        );
        {
            let r = store.read().unwrap();
            let t = r.open_table(RECEIPT_BATCHES).unwrap();
            let mut stored = Vec::new();
            for row in &rows {
                let v = t
                    .get((row.node.as_str(), row.key.as_str()))
                    .unwrap()
                    .unwrap();
                assert_eq!(row.bytes, v.value().len() as u64);
                let got: Vec<Receipt> = records::decode("receipt_batches", v.value()).unwrap();
                stored.push(
                    got.into_iter()
                        .map(|rc| rc.message_id)
                        .collect::<Vec<_>>()
                        .join(","),
                );
            }
            assert_eq!(stored, vec!["m2", "m1,m3", "m4,m5"]);
            // The whole receipts, not only their ids.
            let v = t.get(("node-b", "K.000001")).unwrap().unwrap();
            let got: Vec<Receipt> = records::decode("receipt_batches", v.value()).unwrap();
            assert_eq!(got, vec![kept[3].1.clone(), kept[4].1.clone()]);
        }

        // Nothing ended: nothing written.
        let none = store
            .write(|txn| InboxTables::open(txn)?.write_receipts("L"))
            .await
            .unwrap();
        assert!(none.is_empty());
        drop(store);
        w.join();
    }
}
