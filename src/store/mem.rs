//! The memtable: every table write since the last checkpoint, held in
//! memory in front of redb.
//!
//! A group commit no longer touches redb: its writes go to the write-ahead
//! log (which makes them durable) and into the *active* memtable. Once the
//! log has grown enough, the writer freezes the active memtable and a
//! flusher thread applies what it holds to redb in one durable transaction
//! (the checkpoint). Rows that were written and removed again before that,
//! which is most of a message's bookkeeping (outbox entries, in-flight
//! envelopes, unconfirmed receipts), never reach a B-tree at all, and a row
//! rewritten many times is written to redb once.
//!
//! Reads look through the layers newest first: the running batch's own
//! writes, the active memtable, the frozen one being flushed, then redb.
//! A removal is a tombstone that hides older versions, unless the row it
//! removes is *fresh* (written by `insert_new`, so no older version exists
//! below it): then both simply vanish.
//!
//! Keys are kept as redb encodes them and ordered by the key type's own
//! `compare`, so ranges merge with redb's.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::{Arc, RwLock};

use foldhash::fast::RandomState;

/// A key type's ordering over encoded keys (`redb::Key::compare`).
pub(super) type Cmp = fn(&[u8], &[u8]) -> Ordering;

/// An encoded key with its table's ordering (for merging ranges).
#[derive(Clone)]
pub(super) struct MemKey {
    pub bytes: Box<[u8]>,
    cmp: Cmp,
}

impl MemKey {
    pub fn new(bytes: &[u8], cmp: Cmp) -> Self {
        MemKey {
            bytes: bytes.into(),
            cmp,
        }
    }
}

impl Ord for MemKey {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.cmp)(&self.bytes, &other.bytes)
    }
}
impl PartialOrd for MemKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for MemKey {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for MemKey {}

/// A row's newest version in a layer.
#[derive(Clone)]
pub(super) struct Slot {
    /// `None`: removed.
    pub value: Option<Arc<[u8]>>,
    /// No version of this key exists in any older layer.
    pub fresh: bool,
    /// Whether the row moved between layers at a freeze (see [`Carry`]).
    pub carry: Carry,
}

impl Slot {
    pub fn new(value: Option<Arc<[u8]>>, fresh: bool) -> Slot {
        Slot {
            value,
            fresh,
            carry: Carry::No,
        }
    }
}

/// A short-lived row still live when its memtable froze is *carried*:
/// logged again into the next log file and put into the next memtable,
/// instead of being written to redb and removed from it again a moment
/// later (an in-flight envelope: insert and remove of a kilobyte in a
/// B-tree). A row is carried once; still live at the next freeze, it goes
/// to redb like any other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Carry {
    No,
    /// In the frozen layer: a newer layer holds it, the flusher skips it.
    Out,
    /// Carried into this layer from one whose version never reached redb,
    /// and none older did either: once that layer is flushed, removing the
    /// row leaves nothing for redb to do. (Not `fresh`: until then the
    /// older layer still holds a version that a removal must hide.)
    InFresh,
    /// Carried into this layer over an older version redb may hold.
    In,
}

/// One table's rows in a layer, by encoded key. A hash map: point reads
/// and writes are the hot path, and ordering long tuple keys on every
/// insert cost more than the rest of the memtable together; ranges (rare)
/// sort what they find. Hashed with foldhash, seeded per map: SipHash was
/// 5% of all CPU time in the delivery benchmark.
pub(super) struct Rows {
    pub name: Box<str>,
    pub cmp: Cmp,
    pub rows: HashMap<Box<[u8]>, Slot, RandomState>,
}

impl Rows {
    /// Write `slot` over whatever this table holds for `key`.
    fn put(&mut self, key: Box<[u8]>, mut slot: Slot) {
        use std::collections::hash_map::Entry;
        // One hash and one probe (a lookup, then an insert on a miss, was
        // two of each: a third of the cost of moving a batch in).
        match self.rows.entry(key) {
            Entry::Occupied(old) if old.get().fresh => {
                if slot.value.is_none() {
                    // Nothing older to hide: the row simply never was.
                    old.remove();
                } else {
                    slot.fresh = true;
                    *old.into_mut() = slot;
                }
            }
            Entry::Occupied(old) => {
                let old = old.into_mut();
                // A carried row stays carried (and is not carried again).
                if old.carry != Carry::No {
                    slot.carry = old.carry;
                }
                *old = slot;
            }
            Entry::Vacant(v) => {
                v.insert(slot);
            }
        }
    }

    /// The rows in key order (for the flusher: redb inserts faster in order).
    pub fn sorted(&self) -> Vec<(&[u8], &Slot)> {
        let mut v: Vec<(&[u8], &Slot)> = self.rows.iter().map(|(k, s)| (&**k, s)).collect();
        v.sort_unstable_by(|a, b| (self.cmp)(a.0, b.0));
        v
    }
}

/// A layer: rows of any number of tables.
#[derive(Default)]
pub(super) struct Mem {
    tables: Vec<Rows>,
}

impl Mem {
    fn table(&self, name: &str) -> Option<&Rows> {
        self.tables.iter().find(|t| &*t.name == name)
    }

    fn table_mut(&mut self, name: &str, cmp: Cmp) -> &mut Rows {
        match self.tables.iter().position(|t| &*t.name == name) {
            Some(i) => &mut self.tables[i],
            None => {
                self.tables.push(Rows {
                    name: name.into(),
                    cmp,
                    rows: HashMap::default(),
                });
                self.tables.last_mut().expect("just pushed")
            }
        }
    }

    /// The newest version of `key` in this layer, if the layer has one.
    pub fn get(&self, name: &str, key: &[u8]) -> Option<&Slot> {
        self.table(name)?.rows.get(key)
    }

    /// Write `slot` over whatever this layer holds for `key`.
    pub fn put(&mut self, name: &str, cmp: Cmp, key: Box<[u8]>, slot: Slot) {
        self.table_mut(name, cmp).put(key, slot);
    }

    /// Move every row of `newer` over this layer's, leaving `newer` empty
    /// (its maps keep their room for the next batch).
    pub fn absorb(&mut self, newer: &mut Mem) {
        for t in &mut newer.tables {
            if t.rows.is_empty() {
                continue;
            }
            // The table once per table, not once per row.
            let into = self.table_mut(&t.name, t.cmp);
            for (k, s) in t.rows.drain() {
                into.put(k, s);
            }
        }
    }

    /// Add this layer's rows of `name` within the bounds to `into`, unless
    /// `into` already has the key (from a newer layer).
    pub fn collect(
        &self,
        name: &str,
        (lo, hi): (Bound<&MemKey>, Bound<&MemKey>),
        into: &mut BTreeMap<MemKey, Slot>,
    ) {
        let Some(t) = self.table(name) else { return };
        let above = |k: &[u8]| match lo {
            Bound::Included(b) => (t.cmp)(k, &b.bytes) != Ordering::Less,
            Bound::Excluded(b) => (t.cmp)(k, &b.bytes) == Ordering::Greater,
            Bound::Unbounded => true,
        };
        let below = |k: &[u8]| match hi {
            Bound::Included(b) => (t.cmp)(k, &b.bytes) != Ordering::Greater,
            Bound::Excluded(b) => (t.cmp)(k, &b.bytes) == Ordering::Less,
            Bound::Unbounded => true,
        };
        for (k, s) in &t.rows {
            if above(k) && below(k) {
                into.entry(MemKey::new(k, t.cmp))
                    .or_insert_with(|| s.clone());
            }
        }
    }

    /// Every table's rows (for the flusher).
    pub fn tables(&self) -> &[Rows] {
        &self.tables
    }

    /// Carry this (freezing) layer's live rows of the tables `carried`
    /// names into `next`, each at most once, while `take` accepts them
    /// (it logs each row it accepts). Marks them for the flusher to skip;
    /// what readers see does not change. Returns the rows carried.
    pub fn carry_into(
        &mut self,
        next: &mut Mem,
        carried: impl Fn(&str) -> bool,
        mut take: impl FnMut(&str, &[u8], &[u8]) -> bool,
    ) -> usize {
        let mut n = 0;
        for t in self.tables.iter_mut().filter(|t| carried(&t.name)) {
            for (k, s) in t.rows.iter_mut() {
                let Some(v) = &s.value else { continue };
                if s.carry != Carry::No {
                    continue;
                }
                if !take(&t.name, k, v) {
                    return n;
                }
                s.carry = Carry::Out;
                let carry = if s.fresh { Carry::InFresh } else { Carry::In };
                let slot = Slot {
                    value: Some(v.clone()),
                    fresh: false,
                    carry,
                };
                next.put(&t.name, t.cmp, k.clone(), slot);
                n += 1;
            }
        }
        n
    }

    /// Rows held, tombstones included.
    pub fn rows(&self) -> usize {
        self.tables.iter().map(|t| t.rows.len()).sum()
    }

    pub fn clear(&mut self) {
        self.tables.iter_mut().for_each(|t| t.rows.clear());
    }
}

/// The memtables a reader sees, taken together with its redb snapshot.
#[derive(Clone, Default)]
pub(super) struct Layers {
    /// Written by the writer after each group commit.
    pub active: Arc<RwLock<Mem>>,
    /// Being flushed to redb; never written again.
    pub frozen: Option<Arc<RwLock<Mem>>>,
    /// The active memtable's number: 0 when the store opened, one more at
    /// every freeze (the frozen one's is one less).
    pub generation: u64,
}

impl Layers {
    /// The number of the oldest memtable here. Every row written into a
    /// memtable numbered at least this is in these layers, not only in
    /// redb.
    pub fn oldest(&self) -> u64 {
        self.generation
            .saturating_sub(u64::from(self.frozen.is_some()))
    }

    fn each(&self) -> impl Iterator<Item = &Arc<RwLock<Mem>>> {
        std::iter::once(&self.active).chain(self.frozen.as_ref())
    }

    /// The newest version of `key` in the memtables, if they have one.
    pub fn get(&self, name: &str, key: &[u8]) -> Option<Slot> {
        self.each().find_map(|m| read(m).get(name, key).cloned())
    }

    /// Add the memtables' rows of `name` within the bounds to `into`
    /// (keys already there win).
    pub fn collect(
        &self,
        name: &str,
        bounds: (Bound<&MemKey>, Bound<&MemKey>),
        into: &mut BTreeMap<MemKey, Slot>,
    ) {
        for m in self.each() {
            read(m).collect(name, bounds, into);
        }
    }
}

/// Read access to a memtable (a panic elsewhere does not make its rows
/// unreadable: writers only ever leave it consistent between calls).
pub(super) fn read(m: &RwLock<Mem>) -> std::sync::RwLockReadGuard<'_, Mem> {
    m.read().unwrap_or_else(|p| p.into_inner())
}

/// Write access to a memtable.
pub(super) fn write(m: &RwLock<Mem>) -> std::sync::RwLockWriteGuard<'_, Mem> {
    m.write().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORDER: Cmp = |a, b| a.cmp(b);
    fn key(s: &str) -> Box<[u8]> {
        s.as_bytes().into()
    }
    fn bound(s: &str) -> MemKey {
        MemKey::new(s.as_bytes(), ORDER)
    }
    fn val(s: &str) -> Slot {
        Slot::new(Some(Arc::from(s.as_bytes())), false)
    }
    fn fresh(s: &str) -> Slot {
        Slot {
            fresh: true,
            ..val(s)
        }
    }
    const GONE: Slot = Slot {
        value: None,
        fresh: false,
        carry: Carry::No,
    };
    fn shown(m: &Mem) -> Vec<(String, Option<String>)> {
        m.tables()
            .iter()
            .flat_map(|t| t.sorted())
            .map(|(k, s)| {
                (
                    String::from_utf8(k.to_vec()).unwrap(),
                    s.value
                        .as_ref()
                        .map(|v| String::from_utf8(v.to_vec()).unwrap()),
                )
            })
            .collect()
    }

    #[test]
    fn a_fresh_row_removed_leaves_nothing_and_an_old_one_a_tombstone() {
        let mut m = Mem::default();
        m.put("t", ORDER, key("a"), fresh("1"));
        m.put("t", ORDER, key("a"), val("2")); // still fresh: nothing below
        m.put("t", ORDER, key("b"), val("1"));
        m.put("t", ORDER, key("a"), GONE);
        m.put("t", ORDER, key("b"), GONE);
        assert_eq!(shown(&m), vec![("b".into(), None)]);
    }

    #[test]
    fn absorbing_a_batch_applies_the_same_rules_in_order() {
        let mut active = Mem::default();
        active.put("t", ORDER, key("a"), fresh("1"));
        active.put("t", ORDER, key("c"), val("1"));
        let mut batch = Mem::default();
        batch.put("t", ORDER, key("a"), GONE);
        batch.put("t", ORDER, key("b"), fresh("2"));
        batch.put("t", ORDER, key("c"), val("3"));
        active.absorb(&mut batch);
        assert_eq!(
            shown(&active),
            vec![
                ("b".into(), Some("2".into())),
                ("c".into(), Some("3".into()))
            ]
        );
    }

    #[test]
    fn newer_layers_win_in_gets_and_ranges() {
        let layers = Layers::default();
        let frozen = Arc::new(RwLock::new(Mem::default()));
        write(&frozen).put("t", ORDER, key("a"), val("old"));
        write(&frozen).put("t", ORDER, key("b"), val("old"));
        write(&layers.active).put("t", ORDER, key("a"), GONE);
        write(&layers.active).put("t", ORDER, key("c"), val("new"));
        let layers = Layers {
            frozen: Some(frozen),
            ..layers
        };
        assert!(layers.get("t", b"a").unwrap().value.is_none());
        assert!(layers.get("t", b"b").unwrap().value.is_some());
        assert!(layers.get("u", b"b").is_none());
        let mut got = BTreeMap::new();
        layers.collect(
            "t",
            (Bound::Included(&bound("a")), Bound::Excluded(&bound("c"))),
            &mut got,
        );
        let got: Vec<_> = got
            .iter()
            .map(|(k, s)| (k.bytes.to_vec(), s.value.is_some()))
            .collect();
        assert_eq!(got, vec![(b"a".to_vec(), false), (b"b".to_vec(), true)]);
    }

    #[test]
    fn carried_rows_stay_hidden_once_removed_and_are_carried_once() {
        let frozen = Arc::new(RwLock::new(Mem::default()));
        write(&frozen).put("q", ORDER, key("a"), fresh("1"));
        write(&frozen).put("q", ORDER, key("b"), val("1"));
        write(&frozen).put("q", ORDER, key("gone"), GONE);
        write(&frozen).put("other", ORDER, key("x"), fresh("1"));
        let mut next = Mem::default();
        let mut logged = Vec::new();
        let n = write(&frozen).carry_into(
            &mut next,
            |t| t == "q",
            |t, k, v| {
                logged.push((t.to_string(), k.to_vec(), v.to_vec()));
                true
            },
        );
        assert_eq!(n, 2);
        logged.sort();
        assert_eq!(
            logged,
            vec![
                ("q".into(), b"a".to_vec(), b"1".to_vec()),
                ("q".into(), b"b".to_vec(), b"1".to_vec())
            ]
        );
        {
            let f = read(&frozen);
            let carry = |k: &[u8]| f.get("q", k).unwrap().carry;
            assert_eq!((carry(b"a"), carry(b"b")), (Carry::Out, Carry::Out));
            assert_eq!(f.get("other", b"x").unwrap().carry, Carry::No);
        }
        let carry = |m: &Mem, k: &[u8]| m.get("q", k).map(|s| (s.carry, s.fresh));
        assert_eq!(carry(&next, b"a"), Some((Carry::InFresh, false)));
        assert_eq!(carry(&next, b"b"), Some((Carry::In, false)));
        // Removed in the newer layer: a tombstone, which hides the frozen
        // layer's version from readers and keeps what it was carried as.
        let mut batch = Mem::default();
        batch.put("q", ORDER, key("a"), GONE);
        next.absorb(&mut batch);
        assert_eq!(carry(&next, b"a"), Some((Carry::InFresh, false)));
        let layers = Layers {
            active: Arc::new(RwLock::new(next)),
            frozen: Some(frozen),
            generation: 1,
        };
        assert!(layers.get("q", b"a").unwrap().value.is_none());
        assert!(layers.get("q", b"b").unwrap().value.is_some());
        // At the next freeze nothing is carried a second time.
        let mut after = Mem::default();
        let again = write(&layers.active).carry_into(&mut after, |_| true, |_, _, _| true);
        assert_eq!(again, 0);
        // The budget stops carrying; what is left stays for redb.
        let mut m = Mem::default();
        m.put("q", ORDER, key("a"), fresh("1"));
        m.put("q", ORDER, key("b"), fresh("2"));
        let mut next = Mem::default();
        assert_eq!(m.carry_into(&mut next, |_| true, |_, _, _| false), 0);
        assert!(m.tables()[0].rows.values().all(|s| s.carry == Carry::No));
    }
}
