//! Every table of the database, in one place so opening can create them all
//! and the schema is visible at a glance. Values are `wire`-encoded records
//! owned by the module named beside each table.

use redb::{TableDefinition, WriteTransaction};

/// Opens (and so creates) every table.
pub(crate) fn create_all(txn: &WriteTransaction) -> Result<(), redb::TableError> {
    let _ = txn.open_table(super::META)?;
    Ok(())
}

#[allow(dead_code)]
const _UNUSED: Option<TableDefinition<&str, &[u8]>> = None;
