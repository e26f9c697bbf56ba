//! Typed reads through the memtables and redb (see `store::mem`).
//!
//! [`Read`] is a snapshot: the memtables at the time it was taken plus a
//! redb read transaction begun at the same time. Rows only ever move
//! downwards (batch → active → frozen → redb), and a frozen memtable is
//! only dropped after the redb commit holding its rows, so a snapshot
//! never misses a row: it may see rows written after it was taken, never
//! lose one written before.

use std::any::Any;
use std::borrow::Borrow;
use std::cell::RefCell;
use std::cmp::Ordering;
use std::collections::{BTreeMap, btree_map};
use std::iter::Peekable;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};

use redb::{AccessGuard, Key, ReadTransaction, TableDefinition, TableHandle, Value};

use super::Error;
use super::mem::{Layers, Mem, MemKey, Slot};

/// A redb table opened in a snapshot (`None`: it does not exist yet).
type Opened = Arc<dyn Any + Send + Sync>;

/// A read snapshot of the store (`Store::read`).
pub struct Read {
    txn: ReadTransaction,
    layers: Layers,
    /// Tables opened so far. Opening one is a search of redb's table tree,
    /// and a write batch's closures open the same few tables hundreds of
    /// times (3% of all CPU in the delivery benchmark).
    opened: Mutex<Vec<(Box<str>, Opened)>>,
}

impl Read {
    pub(super) fn new(txn: ReadTransaction, layers: Layers) -> Self {
        Read {
            txn,
            layers,
            opened: Mutex::new(Vec::new()),
        }
    }

    /// `def`'s redb table in this snapshot, opened once.
    fn db_table<K: Key + Send + Sync + 'static, V: Value + Send + Sync + 'static>(
        &self,
        def: TableDefinition<'static, K, V>,
    ) -> Result<Option<Arc<redb::ReadOnlyTable<K, V>>>, Error> {
        type Table<K, V> = Option<Arc<redb::ReadOnlyTable<K, V>>>;
        let mut opened = self.opened.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, t)) = opened.iter().find(|(n, _)| **n == *def.name())
            && let Some(t) = t.downcast_ref::<Table<K, V>>()
        {
            return Ok(t.clone());
        }
        let table: Table<K, V> = match self.txn.open_table(def) {
            Ok(t) => Some(Arc::new(t)),
            // Written since the last checkpoint only: all in memory.
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(e.into()),
        };
        opened.push((def.name().into(), Arc::new(table.clone())));
        Ok(table)
    }

    /// The number of the memtable writes go into as of this snapshot;
    /// see [`View::get_written_since`].
    pub fn generation(&self) -> u64 {
        self.layers.generation
    }

    /// Open a table for reading.
    pub fn open_table<K: Key + Send + Sync + 'static, V: Value + Send + Sync + 'static>(
        &self,
        def: TableDefinition<'static, K, V>,
    ) -> Result<View<'_, K, V>, Error> {
        self.view(def, None)
    }

    pub(super) fn view<'a, K: Key + Send + Sync + 'static, V: Value + Send + Sync + 'static>(
        &'a self,
        def: TableDefinition<'static, K, V>,
        batch: Option<&'a RefCell<Mem>>,
    ) -> Result<View<'a, K, V>, Error> {
        Ok(View {
            db: self.db_table(def)?,
            def,
            layers: &self.layers,
            batch,
        })
    }
}

/// A table as of a snapshot (and, in a write, the batch's own writes).
pub struct View<'a, K: Key + 'static, V: Value + 'static> {
    db: Option<Arc<redb::ReadOnlyTable<K, V>>>,
    def: TableDefinition<'static, K, V>,
    layers: &'a Layers,
    batch: Option<&'a RefCell<Mem>>,
}

/// A key or value read from a [`View`]; `value()` decodes it.
pub enum Got<T: Value + 'static> {
    /// From redb.
    Db(AccessGuard<'static, T>),
    /// From a memtable.
    Mem(Arc<[u8]>),
}

impl<T: Value + 'static> Got<T> {
    /// The decoded key or value.
    pub fn value(&self) -> T::SelfType<'_> {
        match self {
            Got::Db(g) => g.value(),
            Got::Mem(b) => T::from_bytes(b),
        }
    }
}

/// A row of a range: key and value.
pub type Row<K, V> = (Got<K>, Got<V>);

fn mem_key<K: Key + 'static>(key: &K::SelfType<'_>) -> MemKey {
    MemKey::new(K::as_bytes(key).as_ref(), K::compare)
}

impl<'a, K: Key + 'static, V: Value + 'static> View<'a, K, V> {
    pub(super) fn name(&self) -> &str {
        self.def.name()
    }

    /// The newest memtable version of `key`, if any memtable has one.
    fn in_memory(&self, key: &[u8]) -> Option<Slot> {
        if let Some(b) = self.batch
            && let Some(s) = b.borrow().get(self.name(), key)
        {
            return Some(s.clone());
        }
        self.layers.get(self.name(), key)
    }

    /// Whether a memtable (or the running batch) holds a value for `key`:
    /// one written since the last checkpoint.
    pub fn in_memtable<'k>(&self, key: impl Borrow<K::SelfType<'k>>) -> bool {
        self.in_memory(K::as_bytes(key.borrow()).as_ref())
            .is_some_and(|s| s.value.is_some())
    }

    /// The value stored under `key`.
    pub fn get<'k>(&self, key: impl Borrow<K::SelfType<'k>>) -> Result<Option<Got<V>>, Error> {
        self.get_written_since(key, None)
    }

    /// [`View::get`] for a key that nothing wrote before memtable
    /// `since` ([`Read::generation`] at or before its first write; `None`:
    /// not known): once every memtable from that one on is in this
    /// snapshot, a key none of them holds is not stored, and redb is not
    /// searched.
    pub fn get_written_since<'k>(
        &self,
        key: impl Borrow<K::SelfType<'k>>,
        since: Option<u64>,
    ) -> Result<Option<Got<V>>, Error> {
        let key = key.borrow();
        if let Some(slot) = self.in_memory(K::as_bytes(key).as_ref()) {
            return Ok(slot.value.map(Got::Mem));
        }
        if since.is_some_and(|g| self.layers.oldest() <= g) {
            return Ok(None);
        }
        match &self.db {
            Some(t) => Ok(t.get(key)?.map(Got::Db)),
            None => Ok(None),
        }
    }

    /// The rows within `range`, in key order.
    pub fn range<'k, KR>(&self, range: impl RangeBounds<KR> + 'k) -> Result<Rows<K, V>, Error>
    where
        KR: Borrow<K::SelfType<'k>> + 'k,
    {
        let enc = |b: Bound<&KR>| b.map(|k| mem_key::<K>(k.borrow()));
        let (lo, hi) = (enc(range.start_bound()), enc(range.end_bound()));
        let bounds = (lo.as_ref(), hi.as_ref());
        let mut mem = BTreeMap::new();
        if valid(bounds) {
            if let Some(b) = self.batch {
                b.borrow().collect(self.name(), bounds, &mut mem);
            }
            self.layers.collect(self.name(), bounds, &mut mem);
        }
        let db = match &self.db {
            Some(t) => Some(t.range(range)?),
            None => None,
        };
        Ok(Rows {
            mem: mem.into_iter().peekable(),
            db,
            db_head: None,
        })
    }

    /// Every row, in key order.
    pub fn iter(&self) -> Result<Rows<K, V>, Error> {
        self.range::<K::SelfType<'_>>(..)
    }

    /// Rows in the table (counts them: for tests and reports).
    pub fn len(&self) -> Result<u64, Error> {
        let mut n = 0u64;
        for row in self.iter()? {
            row?;
            n += 1;
        }
        Ok(n)
    }

    /// Whether the table has no rows.
    pub fn is_empty(&self) -> Result<bool, Error> {
        Ok(self.iter()?.next().transpose()?.is_none())
    }
}

/// `BTreeMap::range` panics on inverted bounds; redb returns nothing.
fn valid((lo, hi): (Bound<&MemKey>, Bound<&MemKey>)) -> bool {
    match (lo, hi) {
        (Bound::Included(a) | Bound::Excluded(a), Bound::Included(b) | Bound::Excluded(b)) => {
            match a.cmp(b) {
                Ordering::Greater => false,
                Ordering::Equal => {
                    matches!((lo, hi), (Bound::Included(_), Bound::Included(_)))
                }
                Ordering::Less => true,
            }
        }
        _ => true,
    }
}

/// Rows of a range: the memtables' rows merged with redb's, in key order.
pub struct Rows<K: Key + 'static, V: Value + 'static> {
    mem: Peekable<btree_map::IntoIter<MemKey, Slot>>,
    db: Option<redb::Range<'static, K, V>>,
    db_head: Option<(AccessGuard<'static, K>, AccessGuard<'static, V>)>,
}

impl<K: Key + 'static, V: Value + 'static> Iterator for Rows<K, V> {
    type Item = Result<Row<K, V>, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.db_head.is_none()
                && let Some(db) = &mut self.db
            {
                match db.next() {
                    Some(Ok(row)) => self.db_head = Some(row),
                    Some(Err(e)) => return Some(Err(e.into())),
                    None => self.db = None,
                }
            }
            let order = match (self.mem.peek(), &self.db_head) {
                (None, None) => return None,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some((m, _)), Some((d, _))) => {
                    K::compare(&m.bytes, K::as_bytes(&d.value()).as_ref())
                }
            };
            if order == Ordering::Greater {
                let (k, v) = self.db_head.take().expect("compared above");
                return Some(Ok((Got::Db(k), Got::Db(v))));
            }
            if order == Ordering::Equal {
                // The memtable's version replaces redb's.
                self.db_head = None;
            }
            let (k, slot) = self.mem.next().expect("compared above");
            if let Some(v) = slot.value {
                return Some(Ok((Got::Mem(Arc::from(k.bytes)), Got::Mem(v))));
            }
        }
    }
}
