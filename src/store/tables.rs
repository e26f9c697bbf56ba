//! Every table of the database, in one place so opening can create them all
//! and the schema is visible at a glance. Values are `wire`-encoded records
//! owned by the module named beside each table.

use redb::{TableDefinition, WriteTransaction};

/// Agents registered on this node, by agent id (`discovery::local`).
pub(crate) const LOCAL_AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("local_agents");
/// Every known agent's latest verified ad, by agent id (`discovery`).
pub(crate) const REGISTRY: TableDefinition<&str, &[u8]> = TableDefinition::new("registry");

/// Sent messages, by message id: routing head + wire envelope
/// (`delivery::records::encode_outgoing`); written once (`delivery`).
pub(crate) const OUT_MESSAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("out_messages");
/// Sent messages' progress (status, history, result), by message id; no row
/// while a message is still queued (`delivery::records::Progress`).
pub(crate) const OUT_STATUS: TableDefinition<&str, &[u8]> = TableDefinition::new("out_status");
/// Messages not yet handed over: `(recipient node, message id)` → `(expiry ms, size)`.
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
/// Receipts not yet confirmed by the sender's node: `(sender node, message id)` → receipt.
pub(crate) const RECEIPTS_OUT: TableDefinition<(&str, &str), &[u8]> =
    TableDefinition::new("receipts_out");

/// Opens (and so creates) every table.
pub(crate) fn create_all(txn: &WriteTransaction) -> Result<(), redb::TableError> {
    txn.open_table(super::META)?;
    txn.open_table(LOCAL_AGENTS)?;
    txn.open_table(REGISTRY)?;
    txn.open_table(OUT_MESSAGES)?;
    txn.open_table(OUT_STATUS)?;
    txn.open_table(OUTBOX)?;
    txn.open_table(IDEMPOTENCY)?;
    txn.open_table(REPLIES)?;
    txn.open_table(INBOX)?;
    txn.open_table(INBOX_MESSAGES)?;
    txn.open_table(RECEIPTS_OUT)?;
    Ok(())
}
