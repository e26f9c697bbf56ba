//! The write transaction handed to store closures: a redb transaction whose
//! table writes are also recorded for the write-ahead log.
//!
//! Writes go through [`Table`], which wraps `redb::Table`: reads are the
//! redb ones (through `Deref`, which only gives `&self` methods), and
//! `insert`/`remove` apply the change and append it to the commit's log
//! record. Replaying a record applies the same bytes again, table by table,
//! so recovery needs no knowledge of what the writes meant.
//!
//! # Record payload
//! A sequence of operations: `table name length (1) | table name |
//! kind (1: insert, 2: remove) | key length (4, LE) | key | [value length
//! (4, LE) | value]`.

use std::borrow::Borrow;
use std::cell::RefCell;
use std::ops::Deref;

use redb::{AccessGuard, Key, StorageError, TableDefinition, TableHandle, Value, WriteTransaction};

use super::Error;

const INSERT: u8 = 1;
const REMOVE: u8 = 2;

/// A write transaction as store closures see it.
pub struct Tx<'a> {
    txn: &'a WriteTransaction,
    log: &'a RefCell<Vec<u8>>,
}

impl<'a> Tx<'a> {
    pub(super) fn new(txn: &'a WriteTransaction, log: &'a RefCell<Vec<u8>>) -> Self {
        Tx { txn, log }
    }

    /// Open a table for reading and writing in this transaction.
    pub fn open_table<K: Key + 'static, V: Value + 'static>(
        &self,
        def: TableDefinition<'static, K, V>,
    ) -> Result<Table<'a, K, V>, redb::TableError> {
        Ok(Table {
            inner: self.txn.open_table(def)?,
            def,
            log: self.log,
        })
    }
}

/// A table opened in a [`Tx`]; see the module docs.
pub struct Table<'a, K: Key + 'static, V: Value + 'static> {
    inner: redb::Table<'a, K, V>,
    def: TableDefinition<'static, K, V>,
    log: &'a RefCell<Vec<u8>>,
}

impl<'a, K: Key + 'static, V: Value + 'static> Deref for Table<'a, K, V> {
    type Target = redb::Table<'a, K, V>;
    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl<K: Key + 'static, V: Value + 'static> Table<'_, K, V> {
    /// Insert or replace; returns the old value.
    pub fn insert<'k, 'v>(
        &mut self,
        key: impl Borrow<K::SelfType<'k>>,
        value: impl Borrow<V::SelfType<'v>>,
    ) -> Result<Option<AccessGuard<'_, V>>, StorageError> {
        let mark = self.record(
            K::as_bytes(key.borrow()).as_ref(),
            Some(V::as_bytes(value.borrow()).as_ref()),
        );
        let result = self.inner.insert(key, value);
        if result.is_err() {
            self.log.borrow_mut().truncate(mark);
        }
        result
    }

    /// Remove; returns the old value.
    pub fn remove<'k>(
        &mut self,
        key: impl Borrow<K::SelfType<'k>>,
    ) -> Result<Option<AccessGuard<'_, V>>, StorageError> {
        let mark = self.record(K::as_bytes(key.borrow()).as_ref(), None);
        let result = self.inner.remove(key);
        if !matches!(result, Ok(Some(_))) {
            // Nothing removed (or a failure): nothing to replay.
            self.log.borrow_mut().truncate(mark);
        }
        result
    }

    /// Append an insert (`value` given) or a remove to the batch's record;
    /// returns where it starts, to take it back if redb refuses the write.
    fn record(&self, key: &[u8], value: Option<&[u8]>) -> usize {
        let table = self.def.name();
        debug_assert!(table.len() <= u8::MAX as usize, "table names are short");
        let mut log = self.log.borrow_mut();
        let mark = log.len();
        log.push(table.len() as u8);
        log.extend_from_slice(table.as_bytes());
        log.push(if value.is_some() { INSERT } else { REMOVE });
        for part in std::iter::once(key).chain(value) {
            log.extend_from_slice(&(part.len() as u32).to_le_bytes());
            log.extend_from_slice(part);
        }
        mark
    }
}

/// One operation of a record.
pub(super) struct Op<'p> {
    pub table: &'p str,
    pub key: &'p [u8],
    /// `None` for a remove.
    pub value: Option<&'p [u8]>,
}

/// Split a record payload into its operations.
pub(super) fn ops(payload: &[u8]) -> Result<Vec<Op<'_>>, String> {
    let mut out = Vec::new();
    let mut at = 0usize;
    let take = |at: &mut usize, n: usize| -> Result<&[u8], String> {
        let s = payload
            .get(*at..*at + n)
            .ok_or_else(|| format!("operation truncated at byte {at}"))?;
        *at += n;
        Ok(s)
    };
    let len32 = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize;
    while at < payload.len() {
        let name_len = take(&mut at, 1)?[0] as usize;
        let table = std::str::from_utf8(take(&mut at, name_len)?)
            .map_err(|_| format!("table name at byte {at} is not UTF-8"))?;
        let kind = take(&mut at, 1)?[0];
        let key_len = len32(take(&mut at, 4)?);
        let key = take(&mut at, key_len)?;
        let value = match kind {
            INSERT => {
                let n = len32(take(&mut at, 4)?);
                Some(take(&mut at, n)?)
            }
            REMOVE => None,
            other => return Err(format!("unknown operation kind {other}")),
        };
        out.push(Op { table, key, value });
    }
    Ok(out)
}

/// Apply one logged operation to `def`'s table.
pub(super) fn apply<K: Key + 'static, V: Value + 'static>(
    txn: &WriteTransaction,
    def: TableDefinition<'static, K, V>,
    op: &Op<'_>,
) -> Result<(), Error> {
    let mut table = txn.open_table(def)?;
    // redb's decoders may panic on bytes of the wrong shape; a record that
    // passed its CRC should never have them, but a clear error beats a panic.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match op.value {
        Some(v) => table
            .insert(K::from_bytes(op.key), V::from_bytes(v))
            .map(|_| ()),
        None => table.remove(K::from_bytes(op.key)).map(|_| ()),
    }));
    match result {
        Ok(r) => Ok(r?),
        Err(_) => Err(Error::Corrupt {
            table: "write-ahead log",
            reason: format!(
                "an operation on table {} holds a key or value of the wrong shape",
                op.table
            ),
        }),
    }
}
