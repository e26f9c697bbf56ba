//! What a start finds still to send: the outbox and the receipts table,
//! read beside the node's start (`courier::run`), and the commands that
//! came during that read, queued once.

use std::collections::HashSet;

use libp2p::PeerId;
use tracing::warn;

use super::{Cmd, Item};
use crate::delivery::records;
use crate::delivery::{Delivery, Error};
use crate::store::tables::{OUT_MESSAGES, OUTBOX, RECEIPTS_OUT};
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
        let table = r.open_table(RECEIPTS_OUT)?;
        for row in table.iter()? {
            let (k, _) = row?;
            let (node, id) = k.value();
            if let Ok(peer) = node.parse::<PeerId>() {
                receipts.push((
                    peer,
                    Item {
                        id: id.to_string(),
                        expires_at_ms: u64::MAX,
                        size: 128,
                        env: None,
                    },
                ));
            }
        }
        // Ids sort by creation time, and the scan is in id order: each
        // peer's queue replays in send order.
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
