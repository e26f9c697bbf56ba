//! Every table of the database, in one place so opening can create them all
//! and the schema is visible at a glance. Values are `wire`-encoded records
//! owned by the module named beside each table.

use redb::{Key, TableDefinition, TableHandle, Value, WriteTransaction};

use super::Error;
use super::mem::{Cmp, Rows};

/// Agents registered on this node, by agent id (`discovery::local`).
pub(crate) const LOCAL_AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("local_agents");
/// Every known agent's latest verified ad, by agent id (`discovery`).
pub(crate) const REGISTRY: TableDefinition<&str, &[u8]> = TableDefinition::new("registry");

/// Sent messages not yet handed over, by message id: routing head + wire
/// envelope (`delivery::records::encode_outgoing`). Removed once the
/// recipient's node has the message or it is final; its `OUT_STATUS` row
/// then holds a summary (`delivery::records::hand_over`).
pub(crate) const OUT_MESSAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("out_messages");
/// Sent messages' progress (status, history, result, and once handed
/// over the summary), by message id; no row while a message is still
/// queued (`delivery::records::Progress`).
pub(crate) const OUT_STATUS: TableDefinition<&str, &[u8]> = TableDefinition::new("out_status");
/// Route id → route (`delivery::routes`): what every message between two
/// agents shares, stored once.
pub(crate) const OUT_ROUTES: TableDefinition<u64, &[u8]> = TableDefinition::new("out_routes");
/// Schema 3 and earlier: `(recipient node, message id)` → `(expiry ms,
/// size)` for every message not yet handed over, an index of what
/// `OUT_MESSAGES` holds anyway (its head names the node). No longer
/// written: the table stays defined so that an older build's log records
/// replay, and starting a node empties it (`delivery::courier::Replay`).
pub(crate) const OUTBOX: TableDefinition<(&str, &str), (u64, u64)> = TableDefinition::new("outbox");
/// `(sending agent, idempotency key)` → encoded list of message ids + expiry.
pub(crate) const IDEMPOTENCY: TableDefinition<(&str, &str), &[u8]> =
    TableDefinition::new("idempotency");
/// `(original message id, reply message id)` → ().
pub(crate) const REPLIES: TableDefinition<(&str, &str), ()> = TableDefinition::new("replies");
/// Received messages' state: `(recipient agent, message id)` → inbox record
/// (small, rewritten on every offer and ack).
pub(crate) const INBOX: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("inbox");
/// Received messages' envelopes, same key; written once, removed when the
/// message reaches a final state.
pub(crate) const INBOX_MESSAGES: TableDefinition<(&str, &str), &[u8]> =
    TableDefinition::new("inbox_messages");
/// Schema 4 and earlier: receipts not yet confirmed by the sender's node,
/// one row per message: `(sender node, message id)` → receipt. No longer
/// written: the table stays defined so that an older build's log records
/// replay, and starting a node moves its rows into `RECEIPT_BATCHES`
/// (`delivery::courier::replay`).
pub(crate) const RECEIPTS_OUT: TableDefinition<(&str, &str), &[u8]> =
    TableDefinition::new("receipts_out");
/// Receipts not yet confirmed by the sender's node, one row per sender
/// node and transaction that ended messages (an ack of many is one row):
/// `(sender node, row key)` → encoded `Vec<Receipt>`. The row key is an
/// id minted by this node, so rows sort in the order they were written.
pub(crate) const RECEIPT_BATCHES: TableDefinition<(&str, &str), &[u8]> =
    TableDefinition::new("receipt_batches");

/// Tables whose rows live briefly (queued envelopes, receipts not yet
/// confirmed): a row still live when its memtable freezes is carried into
/// the next one rather than written to redb (`store::mem::Carry`).
pub(super) fn carried(name: &str) -> bool {
    [
        OUT_MESSAGES.name(),
        INBOX_MESSAGES.name(),
        RECEIPTS_OUT.name(),
        RECEIPT_BATCHES.name(),
    ]
    .contains(&name)
}

/// Every table, for `create_all` and the write-ahead log's replay.
macro_rules! every_table {
    ($apply:ident) => {
        $apply!(
            super::META,
            LOCAL_AGENTS,
            REGISTRY,
            OUT_MESSAGES,
            OUT_STATUS,
            OUT_ROUTES,
            OUTBOX,
            IDEMPOTENCY,
            REPLIES,
            INBOX,
            INBOX_MESSAGES,
            RECEIPTS_OUT,
            RECEIPT_BATCHES
        )
    };
}

/// A table only the store's own tests write.
#[cfg(test)]
pub(crate) const TEST_TABLE: TableDefinition<u64, u64> = TableDefinition::new("test_t");

/// Opens (and so creates) every table.
pub(crate) fn create_all(txn: &WriteTransaction) -> Result<(), redb::TableError> {
    macro_rules! create {
        ($($t:expr),*) => { $( txn.open_table($t)?; )* };
    }
    every_table!(create);
    Ok(())
}

/// The key order of the table called `name`, for putting logged
/// operations into a memtable.
pub(super) fn order(name: &str) -> Option<Cmp> {
    fn of<K: Key + 'static, V: Value + 'static>(_: TableDefinition<'static, K, V>) -> Cmp {
        K::compare
    }
    macro_rules! find {
        ($($t:expr),*) => {
            $( if name == $t.name() { return Some(of($t)); } )*
        };
    }
    every_table!(find);
    #[cfg(test)]
    find!(TEST_TABLE);
    None
}

/// Applies a memtable's rows of one table to redb.
pub(super) fn flush(txn: &WriteTransaction, rows: &Rows) -> Result<(), Error> {
    macro_rules! find {
        ($($t:expr),*) => {
            $( if &*rows.name == $t.name() { return super::tx::apply(txn, &$t, rows); } )*
        };
    }
    every_table!(find);
    #[cfg(test)]
    find!(TEST_TABLE);
    Err(Error::Corrupt {
        table: "write-ahead log",
        reason: format!(
            "it writes to table {:?}, which this build does not know",
            rows.name
        ),
    })
}
