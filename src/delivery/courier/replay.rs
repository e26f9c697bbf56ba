//! What a start finds still to send: the outbox and the receipts table,
//! read beside the node's start (`courier::run`), and the commands that
//! came during that read, queued once.

use std::collections::HashSet;

use libp2p::PeerId;
use tracing::warn;

use super::{Cmd, Item};
use crate::delivery::ending::InboxTables;
use crate::delivery::{Delivery, Error};
use crate::delivery::{gc, records};
use crate::store::tables::{OUT_MESSAGES, OUTBOX, RECEIPT_BATCHES, RECEIPTS_OUT};
use crate::time::now_ms;
use crate::wire::Receipt;
use crate::wire::{self, envelope::EnvelopeRef};

/// What the database says is still to send, read at start.
pub(super) struct Replay {
    pub(super) messages: Vec<(PeerId, Item)>,
    pub(super) receipts: Vec<(PeerId, Item)>,
}

impl Replay {
    /// Scan the outbox (`OUT_MESSAGES`: each row's head names the node)
    /// and the receipts table.
    pub(super) fn load(d: &Delivery) -> Result<Replay, Error> {
        let r = d.inner.store.read()?;
        let mut messages = Vec::new();
        let outbox = r.open_table(OUT_MESSAGES)?;
        for row in outbox.iter()? {
            let (k, v) = row?;
            let id = k.value();
            let Some((node, expires_at_ms, size)) = queued_row(v.value()) else {
                warn!(id, "outbox entry that does not decode skipped");
                continue;
            };
            match node.parse::<PeerId>() {
                Ok(peer) => messages.push((
                    peer,
                    Item {
                        id: id.to_string(),
                        expires_at_ms,
                        size,
                        env: None,
                    },
                )),
                Err(_) => warn!(node, id, "outbox entry with an unreadable node id skipped"),
            }
        }
        let mut receipts = Vec::new();
        let table = r.open_table(RECEIPT_BATCHES)?;
        for row in table.iter()? {
            let (k, v) = row?;
            let (node, key) = k.value();
            if let Ok(peer) = node.parse::<PeerId>() {
                receipts.push((
                    peer,
                    Item {
                        id: key.to_string(),
                        expires_at_ms: u64::MAX,
                        size: v.value().len() as u64,
                        env: None,
                    },
                ));
            }
        }
        // Ids and row keys sort by creation time, and the scans are in
        // key order: each peer's queues replay in the order written.
        Ok(Replay { messages, receipts })
    }
}

/// An `OUT_MESSAGES` value's node, expiry and envelope size (the envelope
/// is read without copying its strings).
fn queued_row(value: &[u8]) -> Option<(String, u64, u64)> {
    let (head, raw) = records::split_outgoing(value).ok()?;
    let env: EnvelopeRef<'_> = wire::decode_borrowed(raw, wire::MAX_FRAME_BYTES).ok()?;
    Some((head.to_node, env.expires_at_ms, raw.len() as u64))
}

/// Remove schema 3's outbox index, if any row is left (see `OUTBOX`): a
/// database from an older build, or its log replayed at this start.
pub(super) async fn drop_legacy_outbox(d: &Delivery) -> Result<(), Error> {
    let keys: Vec<(String, String)> = {
        let r = d.inner.store.read()?;
        let t = r.open_table(OUTBOX)?;
        let mut keys = Vec::new();
        for row in t.iter()? {
            let (k, _) = row?;
            let (node, id) = k.value();
            keys.push((node.to_string(), id.to_string()));
        }
        keys
    };
    if keys.is_empty() {
        return Ok(());
    }
    let n = keys.len();
    d.inner
        .store
        .write(move |txn| {
            let mut t = txn.open_table(OUTBOX)?;
            for (node, id) in &keys {
                t.remove((node.as_str(), id.as_str()))?;
            }
            Ok(())
        })
        .await?;
    tracing::info!(rows = n, "emptied the outbox index of schema 3");
    Ok(())
}

/// Move schema 4's receipts, a row per message in `RECEIPTS_OUT`, into
/// rows of `RECEIPT_BATCHES`, one per sender node, a chunk of rows per
/// transaction (as garbage collection walks a table): a database from an
/// older build, or its log replayed at this start. Runs before the
/// start's scan, which then queues them. A row that does not decode stays
/// where it is, named in a warning.
pub(super) async fn move_legacy_receipts(d: &Delivery) -> Result<(), Error> {
    // Most starts find none, and one read says so.
    if d.inner.store.read()?.open_table(RECEIPTS_OUT)?.len()? == 0 {
        return Ok(());
    }
    let (mut after, mut moved) = (None, 0);
    loop {
        let key = d.inner.ids.next(now_ms());
        let (n, next) = d
            .inner
            .store
            .write(move |txn| {
                let mut t = InboxTables::open(txn)?;
                let mut old = txn.open_table(RECEIPTS_OUT)?;
                let rows = gc::pair_rows(&old, &after)?;
                let next = match rows.last() {
                    Some((k, _)) if rows.len() == gc::CHUNK => Some(k.clone()),
                    _ => None,
                };
                let mut n = 0;
                for ((node, id), v) in rows {
                    match records::decode::<Receipt>("receipts_out", &v) {
                        Ok(rc) => {
                            old.remove((node.as_str(), id.as_str()))?;
                            t.keep_receipt(node, rc);
                            n += 1;
                        }
                        Err(e) => warn!(%node, %id, error = %e, "a receipt of schema 4 does not decode; left in receipts_out"),
                    }
                }
                t.write_receipts(&key)?;
                Ok((n, next))
            })
            .await?;
        moved += n;
        match next {
            Some(k) => after = Some(k),
            None => break,
        }
    }
    tracing::info!(
        receipts = moved,
        "moved the receipts of schema 4 into rows per node"
    );
    Ok(())
}

/// Ids the start's scan queued, for the commands that came during it.
#[derive(Default)]
pub(super) struct Seen {
    pub(super) messages: HashSet<String>,
    pub(super) receipts: HashSet<String>,
}

impl Seen {
    /// Empty unless some deferred command queues anything.
    pub(super) fn of(replay: &Replay, deferred: &[Cmd]) -> Seen {
        if !deferred
            .iter()
            .any(|c| matches!(c, Cmd::Enqueue(_) | Cmd::Receipts(_)))
        {
            return Seen::default();
        }
        let ids = |v: &[(PeerId, Item)]| v.iter().map(|(_, i)| i.id.clone()).collect();
        Seen {
            messages: ids(&replay.messages),
            receipts: ids(&replay.receipts),
        }
    }

    /// `cmd` without what the scan queued already.
    pub(super) fn without_replayed(&self, cmd: Cmd) -> Cmd {
        let keep = |items: Vec<(PeerId, Item)>, seen: &HashSet<String>| {
            items
                .into_iter()
                .filter(|(_, i)| !seen.contains(&i.id))
                .collect()
        };
        match cmd {
            Cmd::Enqueue(items) => Cmd::Enqueue(keep(items, &self.messages)),
            Cmd::Receipts(items) => Cmd::Receipts(keep(items, &self.receipts)),
            other => other,
        }
    }
}
