//! The write transaction handed to store closures: reads through the
//! snapshot taken for the batch, writes into the batch's own memtable and
//! its write-ahead log record.
//!
//! Writes go through [`Table`]: `insert` and `remove` record the change for
//! the log and put it into the batch's layer, which the writer moves into
//! the active memtable once the record is appended (`store::mem`). Reads
//! (through `Deref` to [`View`]) see the batch's own writes first.
//! Replaying a record applies the same bytes again, table by table, so
//! recovery needs no knowledge of what the writes meant.
//!
//! # Record payload
//! A sequence of operations: `table name length (1) | table name |
//! kind (1: insert, 2: remove) | key length (4, LE) | key | [value length
//! (4, LE) | value]`.

use std::borrow::Borrow;
use std::cell::RefCell;
use std::ops::Deref;
use std::sync::Arc;

use redb::{Key, TableDefinition, TableHandle, TypeName, Value, WriteTransaction};

use super::Error;
use super::mem::{Carry, Mem, Rows, Slot};
use super::view::{Read, View};

const INSERT: u8 = 1;
const REMOVE: u8 = 2;

/// A write transaction as store closures see it.
pub struct Tx<'a> {
    read: &'a Read,
    batch: &'a RefCell<Mem>,
    log: &'a RefCell<Vec<u8>>,
}

impl<'a> Tx<'a> {
    pub(super) fn new(read: &'a Read, batch: &'a RefCell<Mem>, log: &'a RefCell<Vec<u8>>) -> Self {
        Tx { read, batch, log }
    }

    /// The memtable this transaction's writes go into (see
    /// [`View::get_written_since`]).
    pub fn generation(&self) -> u64 {
        self.read.generation()
    }

    /// Open a table for reading and writing in this transaction.
    pub fn open_table<K: Key + Send + Sync + 'static, V: Value + Send + Sync + 'static>(
        &self,
        def: TableDefinition<'static, K, V>,
    ) -> Result<Table<'a, K, V>, Error> {
        Ok(Table {
            view: self.read.view(def, Some(self.batch))?,
            batch: self.batch,
            log: self.log,
        })
    }
}

/// A table opened in a [`Tx`]; see the module docs.
pub struct Table<'a, K: Key + 'static, V: Value + 'static> {
    view: View<'a, K, V>,
    batch: &'a RefCell<Mem>,
    log: &'a RefCell<Vec<u8>>,
}

impl<'a, K: Key + 'static, V: Value + 'static> Deref for Table<'a, K, V> {
    type Target = View<'a, K, V>;
    fn deref(&self) -> &Self::Target {
        &self.view
    }
}

impl<K: Key + 'static, V: Value + 'static> Table<'_, K, V> {
    /// Insert or replace.
    pub fn insert<'k, 'v>(
        &mut self,
        key: impl Borrow<K::SelfType<'k>>,
        value: impl Borrow<V::SelfType<'v>>,
    ) -> Result<(), Error> {
        self.set(key.borrow(), value.borrow(), false);
        Ok(())
    }

    /// Insert a key the caller knows is not stored (a fresh id, or one
    /// just looked up): removing it before the next checkpoint then leaves
    /// no trace in redb. Inserting a stored key this way would let an
    /// older version reappear after a later remove.
    pub fn insert_new<'k, 'v>(
        &mut self,
        key: impl Borrow<K::SelfType<'k>>,
        value: impl Borrow<V::SelfType<'v>>,
    ) -> Result<(), Error> {
        self.set(key.borrow(), value.borrow(), true);
        Ok(())
    }

    /// Remove (nothing happens if the key is not stored).
    ///
    /// A key stored nowhere is not recorded at all: a tombstone for it
    /// would cost a log entry, a memtable row and a B-tree search at the
    /// next checkpoint, for nothing. Callers remove defensively (an inbox
    /// envelope or a receipt that may already be gone), so this is common.
    pub fn remove<'k>(&mut self, key: impl Borrow<K::SelfType<'k>>) -> Result<(), Error> {
        let key = key.borrow();
        if self.view.get(key)?.is_some() {
            self.tombstone(key);
        }
        Ok(())
    }

    /// Remove a key the caller knows is stored (it read the row, or wrote
    /// it and nothing else removes it), without looking it up first: the
    /// lookup [`Table::remove`] makes goes through every memtable layer
    /// and, for a miss, redb. Should the key not be stored after all, the
    /// tombstone costs a log entry and a no-op at the next checkpoint.
    pub fn discard<'k>(&mut self, key: impl Borrow<K::SelfType<'k>>) -> Result<(), Error> {
        self.tombstone(key.borrow());
        Ok(())
    }

    /// Record an insert for the log, its value written by `write` straight
    /// into the record, and put it into the batch's memtable.
    fn put_with(&self, key: &K::SelfType<'_>, write: impl FnOnce(&mut Vec<u8>), fresh: bool) {
        let k = K::as_bytes(key);
        let k = k.as_ref();
        let value: Arc<[u8]> = {
            let mut log = self.log.borrow_mut();
            record_head(&mut log, self.view.name(), k, INSERT);
            let len_at = log.len();
            log.extend_from_slice(&[0; 4]);
            let start = log.len();
            write(&mut log);
            let len = (log.len() - start) as u32;
            log[len_at..len_at + 4].copy_from_slice(&len.to_le_bytes());
            Arc::from(&log[start..])
        };
        self.batch.borrow_mut().put(
            self.view.name(),
            K::compare,
            k.into(),
            Slot::new(Some(value), fresh),
        );
    }

    fn set(&self, key: &K::SelfType<'_>, value: &V::SelfType<'_>, fresh: bool) {
        let v = V::as_bytes(value);
        self.put_with(key, |b| b.extend_from_slice(v.as_ref()), fresh);
    }

    /// Record a remove for the log and put its tombstone into the batch's
    /// memtable.
    fn tombstone(&self, key: &K::SelfType<'_>) {
        let k = K::as_bytes(key);
        let k = k.as_ref();
        record(&mut self.log.borrow_mut(), self.view.name(), k, None);
        self.batch.borrow_mut().put(
            self.view.name(),
            K::compare,
            k.into(),
            Slot::new(None, false),
        );
    }
}

impl<K: Key + 'static> Table<'_, K, &'static [u8]> {
    /// Insert or replace, the value written by `write` straight into the
    /// log record (no buffer of its own).
    pub fn insert_with<'k>(
        &mut self,
        key: impl Borrow<K::SelfType<'k>>,
        write: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(), Error> {
        self.put_with(key.borrow(), write, false);
        Ok(())
    }

    /// [`Table::insert_new`] with the value written as by [`Table::insert_with`].
    pub fn insert_new_with<'k>(
        &mut self,
        key: impl Borrow<K::SelfType<'k>>,
        write: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(), Error> {
        self.put_with(key.borrow(), write, true);
        Ok(())
    }
}

/// Append an insert (`value` given) or a remove to a record.
pub(super) fn record(log: &mut Vec<u8>, table: &str, key: &[u8], value: Option<&[u8]>) {
    record_head(
        log,
        table,
        key,
        if value.is_some() { INSERT } else { REMOVE },
    );
    if let Some(v) = value {
        log.extend_from_slice(&(v.len() as u32).to_le_bytes());
        log.extend_from_slice(v);
    }
}

/// Append an operation up to its key (an insert's value length and value
/// follow).
fn record_head(log: &mut Vec<u8>, table: &str, key: &[u8], kind: u8) {
    debug_assert!(table.len() <= u8::MAX as usize, "table names are short");
    log.push(table.len() as u8);
    log.extend_from_slice(table.as_bytes());
    log.push(kind);
    log.extend_from_slice(&(key.len() as u32).to_le_bytes());
    log.extend_from_slice(key);
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

/// Apply a memtable's rows of `def`'s table to redb.
///
/// The rows go in as the bytes the memtable holds, through [`Raw`]:
/// decoding a tuple key only for redb to encode it again took a fifth of
/// the flusher's time.
pub(super) fn apply<K: Key + 'static, V: Value + 'static>(
    txn: &WriteTransaction,
    def: &TableDefinition<'static, K, V>,
    rows: &Rows,
) -> Result<(), Error> {
    let raw: TableDefinition<'_, Raw<K>, Raw<V>> = TableDefinition::new(def.name());
    let mut table = txn.open_table(raw)?;
    // redb's decoders may panic on bytes of the wrong shape; rows from a
    // record that passed its CRC should never have them, but a clear error
    // beats a panic.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for (k, slot) in rows.sorted() {
            match (&slot.value, slot.carry) {
                // Carried into the next layer: that one writes it.
                (_, Carry::Out) => continue,
                // Neither this row nor any older version reached redb.
                (None, Carry::InFresh) => continue,
                (Some(v), _) => table.insert(k, &**v)?,
                (None, _) => table.remove(k)?,
            };
        }
        Ok::<(), redb::StorageError>(())
    }));
    match result {
        Ok(r) => Ok(r?),
        Err(_) => Err(Error::Corrupt {
            table: "write-ahead log",
            reason: format!(
                "a write to table {} holds a key or value of the wrong shape",
                rows.name
            ),
        }),
    }
}

/// `T`'s encoding, as it is: the same type name, width and order as `T`,
/// so redb takes it for a table of `T`, but nothing is decoded or encoded
/// on the way in.
#[derive(Debug)]
pub(super) struct Raw<T>(std::marker::PhantomData<T>);

impl<T: Value + 'static> Value for Raw<T> {
    type SelfType<'a>
        = &'a [u8]
    where
        Self: 'a;
    type AsBytes<'a>
        = &'a [u8]
    where
        Self: 'a;
    const NICHE: Option<&'static [u8]> = T::NICHE;

    fn fixed_width() -> Option<usize> {
        T::fixed_width()
    }

    fn from_bytes<'a>(data: &'a [u8]) -> &'a [u8]
    where
        Self: 'a,
    {
        data
    }

    fn as_bytes<'a, 'b: 'a>(value: &'a &'b [u8]) -> &'a [u8]
    where
        Self: 'b,
    {
        value
    }

    fn type_name() -> TypeName {
        T::type_name()
    }
}

impl<T: Key + 'static> Key for Raw<T> {
    fn compare(data1: &[u8], data2: &[u8]) -> std::cmp::Ordering {
        T::compare(data1, data2)
    }

    fn separator<'a>(left: &'a [u8], right: &'a [u8]) -> std::borrow::Cow<'a, [u8]> {
        T::separator(left, right)
    }

    fn min_encoded_key() -> Option<std::borrow::Cow<'static, [u8]>> {
        T::min_encoded_key()
    }
}
