//! Every table of the database, in one place so opening can create them all
//! and the schema is visible at a glance. Values are `wire`-encoded records
//! owned by the module named beside each table.

use redb::{TableDefinition, WriteTransaction};

/// Agents registered on this node, by agent id (`discovery::local`).
pub(crate) const LOCAL_AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("local_agents");
/// Every known agent's latest verified ad, by agent id (`discovery`).
pub(crate) const REGISTRY: TableDefinition<&str, &[u8]> = TableDefinition::new("registry");

/// Opens (and so creates) every table.
pub(crate) fn create_all(txn: &WriteTransaction) -> Result<(), redb::TableError> {
    txn.open_table(super::META)?;
    txn.open_table(LOCAL_AGENTS)?;
    txn.open_table(REGISTRY)?;
    Ok(())
}
