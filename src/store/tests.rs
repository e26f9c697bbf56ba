//! Tests of the database handle and the group committer.

use super::*;
use std::sync::atomic::Ordering;

const T: TableDefinition<u64, u64> = tables::TEST_TABLE;

#[tokio::test]
async fn group_commit_applies_all_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (store, writer) = Store::open(dir.path()).unwrap();
    let mut tasks = Vec::new();
    for i in 0..500u64 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            s.write(move |txn| {
                txn.open_table(T)?.insert(i, i * 2)?;
                Ok(i)
            })
            .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let commits = store.stats().commits.load(Ordering::Relaxed);
    assert!(commits <= 500);
    let r = store.read().unwrap();
    let t = r.open_table(T).unwrap();
    assert_eq!(t.len().unwrap(), 500);
    assert_eq!(t.get(7).unwrap().unwrap().value(), 14);
    drop(t);
    drop((r, store));
    writer.join();
}

#[tokio::test]
async fn detached_writes_apply_before_later_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (store, writer) = Store::open(dir.path()).unwrap();
    for i in 0..100u64 {
        store
            .write_detached(move |txn| {
                txn.open_table(T)?.insert(i, i)?;
                Ok(())
            })
            .await
            .unwrap();
    }
    // A durable write queued after them sees all of them, and its
    // commit persists them.
    let seen = store.write(|txn| txn.open_table(T)?.len()).await.unwrap();
    assert_eq!(seen, 100);
    drop(store);
    writer.join();
    let (store, _w) = Store::open(dir.path()).unwrap();
    let r = store.read().unwrap();
    assert_eq!(r.open_table(T).unwrap().len().unwrap(), 100);
}

#[tokio::test]
async fn failed_write_rolls_back_its_batch_only() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _w) = Store::open(dir.path()).unwrap();
    let r = store
        .write(|txn| {
            txn.open_table(T)?.insert(1, 1)?;
            Err::<(), _>(Error::Corrupt {
                table: "test_t",
                reason: "injected".into(),
            })
        })
        .await;
    assert!(r.is_err());
    store
        .write(|txn| {
            txn.open_table(T)?.insert(2, 2)?;
            Ok(())
        })
        .await
        .unwrap();
    let r = store.read().unwrap();
    let t = r.open_table(T).unwrap();
    assert!(
        t.get(1).unwrap().is_none(),
        "rolled-back write must not be visible"
    );
    assert!(t.get(2).unwrap().is_some());
}

#[test]
fn reopen_keeps_schema_and_rejects_garbage() {
    let dir = tempfile::tempdir().unwrap();
    open_and_close(dir.path());
    open_and_close(dir.path());

    let bad = tempfile::tempdir().unwrap();
    std::fs::write(bad.path().join(DB_FILE), vec![0x5a; 10_000]).unwrap();
    let err = Store::open(bad.path())
        .err()
        .expect("garbage must not open");
    assert!(
        matches!(err, OpenError::Corrupt { .. } | OpenError::Storage { .. }),
        "{err}"
    );
}

#[test]
fn foreign_database_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = Database::create(dir.path().join(DB_FILE)).unwrap();
        let w = db.begin_write().unwrap();
        w.open_table(T).unwrap().insert(1, 1).unwrap();
        w.commit().unwrap();
    }
    let err = Store::open(dir.path())
        .err()
        .expect("foreign db must not open");
    assert!(matches!(err, OpenError::Foreign(_)), "{err}");
}

/// Overwrite the schema version recorded in the (closed) database in `dir`.
fn set_schema(dir: &Path, version: u32) {
    let db = Database::create(dir.join(DB_FILE)).unwrap();
    let w = db.begin_write().unwrap();
    w.open_table(META)
        .unwrap()
        .insert(META_SCHEMA, version.to_le_bytes().as_slice())
        .unwrap();
    w.commit().unwrap();
}

#[test]
fn newer_schema_refused() {
    let dir = tempfile::tempdir().unwrap();
    open_and_close(dir.path());
    set_schema(dir.path(), 99);
    let err = Store::open(dir.path())
        .err()
        .expect("newer schema must not open");
    assert!(
        matches!(err, OpenError::UnknownSchema { found: 99, .. }),
        "{err}"
    );
}

#[test]
fn older_schemas_open_and_are_marked_current() {
    for old in [2, 3] {
        let dir = tempfile::tempdir().unwrap();
        open_and_close(dir.path());
        set_schema(dir.path(), old);
        let (store, w) = Store::open(dir.path()).expect("an older schema opens");
        let version = store
            .read()
            .unwrap()
            .open_table(META)
            .unwrap()
            .get(META_SCHEMA)
            .unwrap()
            .map(|v| v.value().to_vec());
        assert_eq!(
            version,
            Some(SCHEMA_VERSION.to_le_bytes().to_vec()),
            "from {old}"
        );
        drop(store);
        w.join();
        // From now on an older build, which cannot read the new rows, is
        // refused by name; this one opens it again.
        open_and_close(dir.path());
    }
}

/// Copy the data dir's files as they are on disk now, while the store is
/// open: what a process killed at this instant leaves behind.
fn snapshot(from: &Path) -> tempfile::TempDir {
    let to = tempfile::tempdir().unwrap();
    let [a, b] = wal::WAL_FILES;
    for name in [DB_FILE, a, b] {
        let src = from.join(name);
        if src.exists() {
            std::fs::copy(&src, to.path().join(name)).unwrap();
        }
    }
    to
}

/// A durable write to the test table, which must succeed.
async fn write_t<F>(store: &Store, f: F)
where
    F: for<'a> FnOnce(&mut Table<'a, u64, u64>) -> Result<(), Error> + Send + 'static,
{
    store
        .write(move |txn| f(&mut txn.open_table(T)?))
        .await
        .unwrap();
}

fn rows(store: &Store) -> Vec<(u64, u64)> {
    let r = store.read().unwrap();
    let t = r.open_table(T).unwrap();
    t.iter()
        .unwrap()
        .map(|row| {
            let (k, v) = row.unwrap();
            (k.value(), v.value())
        })
        .collect()
}

#[tokio::test]
async fn acknowledged_writes_survive_a_crash_through_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _w) = Store::open(dir.path()).unwrap();
    for i in 0..50u64 {
        store
            .write(move |txn| {
                txn.open_table(T)?.insert(i, i + 1)?;
                Ok(())
            })
            .await
            .unwrap();
    }
    write_t(&store, |t| {
        for i in 0..10u64 {
            t.remove(i)?;
        }
        // Replaced values are replayed as the last write.
        t.insert(20, 999)?;
        Ok(())
    })
    .await;
    assert!(store.stats().wal_syncs.load(Ordering::Relaxed) > 0);
    let expected = rows(&store);
    assert_eq!(expected.len(), 40);

    let copy = snapshot(dir.path());
    let (reopened, w) = Store::open(copy.path()).unwrap();
    assert_eq!(rows(&reopened), expected);
    // Writes after the replay continue the log, and a second crash keeps
    // both the replayed and the new writes.
    reopened
        .write(|txn| {
            txn.open_table(T)?.insert(100, 100)?;
            Ok(())
        })
        .await
        .unwrap();
    let copy2 = snapshot(copy.path());
    drop(reopened);
    w.join();
    let (again, _w) = Store::open(copy2.path()).unwrap();
    let got = rows(&again);
    assert_eq!(got.len(), 41);
    assert!(got.contains(&(100, 100)) && got.contains(&(20, 999)));
}

#[tokio::test]
async fn values_written_into_the_log_read_back_and_replay() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _w) = Store::open(dir.path()).unwrap();
    store
        .write(|txn| {
            let mut t = txn.open_table(tables::LOCAL_AGENTS)?;
            t.insert_with("a", |b| b.extend_from_slice(b"first"))?;
            t.insert("b", b"second".as_slice())?;
            t.insert_new_with("c", |_| {})?;
            t.insert_with("a", |b| b.extend_from_slice(b"third"))?;
            Ok(())
        })
        .await
        .unwrap();
    let values = |s: &Store| string_rows(s, tables::LOCAL_AGENTS);
    let expected = vec![
        ("a".to_string(), b"third".to_vec()),
        ("b".to_string(), b"second".to_vec()),
        ("c".to_string(), Vec::new()),
    ];
    assert_eq!(values(&store), expected);
    let copy = snapshot(dir.path());
    let (reopened, _w2) = Store::open(copy.path()).unwrap();
    assert_eq!(values(&reopened), expected, "replayed from the log");
}

#[tokio::test]
async fn a_clean_close_leaves_the_database_complete_without_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let (store, w) = Store::open(dir.path()).unwrap();
    store
        .write(|txn| {
            txn.open_table(T)?.insert(1, 2)?;
            Ok(())
        })
        .await
        .unwrap();
    drop(store);
    w.join();
    let wal = dir.path().join(wal::WAL_FILE);
    assert_eq!(
        std::fs::metadata(&wal).unwrap().len(),
        0,
        "a clean close empties the log"
    );
    std::fs::remove_file(wal).unwrap();
    let (store, _w) = Store::open(dir.path()).unwrap();
    assert_eq!(rows(&store), vec![(1, 2)]);
}

#[tokio::test]
async fn removing_a_key_stored_nowhere_logs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _w) = Store::open(dir.path()).unwrap();
    store
        .write(|txn| txn.open_table(T)?.insert(1, 1))
        .await
        .unwrap();
    let logged = || store.stats().wal_bytes.load(Ordering::Relaxed);
    let before = logged();
    store
        .write(|txn| txn.open_table(T)?.remove(7))
        .await
        .unwrap();
    assert_eq!(logged(), before, "a remove of an absent key was logged");
    // A stored key is still removed, durably.
    store
        .write(|txn| txn.open_table(T)?.remove(1))
        .await
        .unwrap();
    assert!(logged() > before);
    let copy = snapshot(dir.path());
    let (reopened, _w) = Store::open(copy.path()).unwrap();
    assert_eq!(rows(&reopened), vec![]);
}

#[tokio::test]
async fn rolled_back_batches_are_not_logged() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _w) = Store::open(dir.path()).unwrap();
    let _ = store
        .write(|txn| {
            txn.open_table(T)?.insert(1, 1)?;
            Err::<(), _>(Error::Corrupt {
                table: "test_t",
                reason: "injected".into(),
            })
        })
        .await;
    store
        .write(|txn| {
            txn.open_table(T)?.insert(2, 2)?;
            Ok(())
        })
        .await
        .unwrap();
    let copy = snapshot(dir.path());
    let (reopened, _w) = Store::open(copy.path()).unwrap();
    assert_eq!(rows(&reopened), vec![(2, 2)]);
}

#[test]
fn a_log_missing_records_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    open_and_close(dir.path());
    // A log whose first record is far past the database's checkpoint.
    let mut w = Wal::open(dir.path(), wal::WAL_FILE).unwrap();
    w.append(40, b"").unwrap();
    w.sync().unwrap();
    let err = Store::open(dir.path()).err().expect("a gap must not open");
    let msg = err.to_string();
    assert!(
        msg.contains("agentmesh.wal") && msg.contains("missing"),
        "{msg}"
    );
}

#[test]
fn a_log_naming_an_unknown_table_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    open_and_close(dir.path());
    let mut payload = vec![7u8];
    payload.extend_from_slice(b"nosuchx");
    payload.push(2);
    payload.extend_from_slice(&1u32.to_le_bytes());
    payload.push(0);
    let mut w = Wal::open(dir.path(), wal::WAL_FILE).unwrap();
    w.append(1, &payload).unwrap();
    w.sync().unwrap();
    let err = Store::open(dir.path()).err().expect("must not open");
    let msg = err.to_string();
    assert!(
        msg.contains("nosuchx") && msg.contains("does not know"),
        "{msg}"
    );
}

#[tokio::test]
async fn after_a_log_failure_every_write_fails_and_the_store_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _w) = Store::open(dir.path()).unwrap();
    store
        .write(|txn| {
            txn.open_table(T)?.insert(1, 1)?;
            Ok(())
        })
        .await
        .unwrap();
    assert!(store.failure().is_none());
    let waiting = tokio::spawn({
        let store = store.clone();
        async move { store.failed().await }
    });
    // What the writer records when an append or fsync fails.
    store
        .shared
        .fail(dir.path(), "fsyncing the write-ahead log", &"injected");
    let seen = tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
        .await
        .expect("failed() resolves once a failure is recorded")
        .unwrap();
    assert!(seen.to_string().contains("injected"), "{seen}");
    let err = store
        .write(|txn| {
            txn.open_table(T)?.insert(2, 2)?;
            Ok(())
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("refuses further writes"), "{err}");
    assert!(store.failure().is_some());
    assert!(rows(&store).iter().all(|(k, _)| *k != 2));
}

/// Durable writes of 1 MiB values until the writer has checkpointed
/// `n` times (the log file in use fills up, the flusher commits).
async fn force_checkpoints(store: &Store, n: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut i = 0u32;
    while store.stats().checkpoints.load(Ordering::Relaxed) < n {
        assert!(std::time::Instant::now() < deadline, "no checkpoint");
        i += 1;
        store
            .write(move |txn| {
                let mut t = txn.open_table(tables::LOCAL_AGENTS)?;
                t.insert(
                    format!("big-{}", i % 4).as_str(),
                    vec![7u8; 1 << 20].as_slice(),
                )?;
                Ok(())
            })
            .await
            .unwrap();
        if i > 12 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

#[tokio::test]
async fn reads_merge_the_memtable_with_the_database_and_survive_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let (store, w) = Store::open(dir.path()).unwrap();
    write_t(&store, |t| {
        for i in 0..20u64 {
            t.insert(i, i)?;
        }
        Ok(())
    })
    .await;
    force_checkpoints(&store, 1).await;
    // Rows 0..20 are in redb now; change some of them in the memtable.
    write_t(&store, |t| {
        for i in 0..5u64 {
            t.remove(i)?;
        }
        t.insert(10, 100)?;
        t.insert(50, 50)?;
        // A row written and removed in the memtable alone.
        t.insert_new(60, 60)?;
        t.remove(60)?;
        // The batch sees its own writes over the older layers.
        assert!(t.get(3)?.is_none());
        assert_eq!(t.get(10)?.map(|v| v.value()), Some(100));
        Ok(())
    })
    .await;
    let mut expected: Vec<(u64, u64)> = (5..20).map(|i| (i, i)).collect();
    expected[5] = (10, 100);
    expected.push((50, 50));
    assert_eq!(rows(&store), expected);
    {
        let r = store.read().unwrap();
        let t = r.open_table(T).unwrap();
        let got: Vec<(u64, u64)> = t
            .range(3..12)
            .unwrap()
            .map(|row| {
                let (k, v) = row.unwrap();
                (k.value(), v.value())
            })
            .collect();
        assert_eq!(got, expected[..7].to_vec());
        assert_eq!(t.len().unwrap(), 16);
        let (hi, lo) = (12u64, 3u64);
        assert!(t.range(hi..lo).unwrap().next().is_none());
    }
    // Killed now: the database holds the old rows, the log the changes.
    let copy = snapshot(dir.path());
    drop(store);
    w.join();
    let (reopened, w2) = Store::open(copy.path()).unwrap();
    assert_eq!(rows(&reopened), expected);
    drop(reopened);
    w2.join();
    // The clean close checkpointed everything and emptied both log files.
    let (again, _w) = Store::open(dir.path()).unwrap();
    assert_eq!(rows(&again), expected);
    for name in wal::WAL_FILES {
        assert_eq!(std::fs::metadata(dir.path().join(name)).unwrap().len(), 0);
    }
}

#[test]
fn records_in_both_log_files_replay_in_order() {
    let dir = tempfile::tempdir().unwrap();
    open_and_close(dir.path());
    let op = |key: u64, value: Option<u64>| {
        let mut p = Vec::new();
        let v = value.map(u64::to_le_bytes);
        tx::record(
            &mut p,
            "test_t",
            &key.to_le_bytes(),
            v.as_ref().map(|v| v.as_slice()),
        );
        p
    };
    // A checkpoint of the first file was under way when the process died:
    // records 1-2 in one file, 3 in the other, none in the database.
    let [a, b] = wal::WAL_FILES;
    let mut first = Wal::open(dir.path(), a).unwrap();
    first.append(1, &op(1, Some(10))).unwrap();
    first.append(2, &op(2, Some(20))).unwrap();
    let mut second = Wal::open(dir.path(), b).unwrap();
    second.append(3, &op(1, None)).unwrap();
    drop((first, second));
    let (store, _w) = Store::open(dir.path()).unwrap();
    assert_eq!(rows(&store), vec![(2, 20)]);
}

/// The keys of `out_messages` that redb itself holds in a copy of `dir`
/// (the log not replayed).
fn out_messages_in_redb(dir: &Path) -> Vec<String> {
    let copy = snapshot(dir);
    let db = redb::Database::open(copy.path().join(DB_FILE)).unwrap();
    let r = redb::ReadableDatabase::begin_read(&db).unwrap();
    let Ok(t) = r.open_table(tables::OUT_MESSAGES) else {
        return Vec::new();
    };
    t.iter()
        .unwrap()
        .map(|row| row.unwrap().0.value().to_string())
        .collect()
}

fn out_messages(store: &Store) -> Vec<(String, Vec<u8>)> {
    string_rows(store, tables::OUT_MESSAGES)
}

/// Every row of a table keyed by strings, as the store reads it.
fn string_rows(
    store: &Store,
    def: TableDefinition<'static, &'static str, &'static [u8]>,
) -> Vec<(String, Vec<u8>)> {
    let r = store.read().unwrap();
    let t = r.open_table(def).unwrap();
    t.iter()
        .unwrap()
        .map(|row| {
            let (k, v) = row.unwrap();
            (k.value().to_string(), v.value().to_vec())
        })
        .collect()
}

#[tokio::test]
async fn short_lived_rows_are_carried_past_a_checkpoint_once_and_survive_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _w) = Store::open(dir.path()).unwrap();
    store
        .write(|txn| {
            let mut t = txn.open_table(tables::OUT_MESSAGES)?;
            t.insert_new("m1", b"envelope 1".as_slice())?;
            t.insert_new("m2", b"envelope 2".as_slice())?;
            Ok(())
        })
        .await
        .unwrap();
    let both = vec![
        ("m1".to_string(), b"envelope 1".to_vec()),
        ("m2".to_string(), b"envelope 2".to_vec()),
    ];
    force_checkpoints(&store, 1).await;
    // Checkpointed, yet not in redb: carried into the new log file.
    assert_eq!(out_messages(&store), both);
    assert!(out_messages_in_redb(dir.path()).is_empty());
    // Killed now: the log's carried record brings them back.
    let copy = snapshot(dir.path());
    {
        let (reopened, w) = Store::open(copy.path()).unwrap();
        assert_eq!(out_messages(&reopened), both);
        drop(reopened);
        w.join();
    }
    // One goes before the next checkpoint, the other outlives it: the
    // first never reaches redb, the second does (a row is carried once).
    store
        .write(|txn| {
            txn.open_table(tables::OUT_MESSAGES)?.remove("m1")?;
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(out_messages(&store), both[1..].to_vec());
    force_checkpoints(&store, 2).await;
    assert_eq!(out_messages_in_redb(dir.path()), vec!["m2".to_string()]);
    assert_eq!(out_messages(&store), both[1..].to_vec());
    let copy = snapshot(dir.path());
    let (reopened, _w2) = Store::open(copy.path()).unwrap();
    assert_eq!(out_messages(&reopened), both[1..].to_vec());
}

#[tokio::test]
async fn discard_removes_a_stored_row_and_is_harmless_for_a_missing_one() {
    let dir = tempfile::tempdir().unwrap();
    let (store, writer) = Store::open(dir.path()).unwrap();
    write_t(&store, |t| {
        t.insert(1, 10)?;
        t.insert(2, 20)?;
        t.insert(3, 30)
    })
    .await;
    // Closing checkpoints: rows 1 to 3 are in redb now.
    drop(store);
    writer.join();
    let (store, writer) = Store::open(dir.path()).unwrap();
    write_t(&store, |t| {
        t.insert_new(4, 40)?;
        // From redb, from the memtable, and a key stored nowhere.
        t.discard(1)?;
        t.discard(4)?;
        t.discard(99)
    })
    .await;
    assert_eq!(rows(&store), vec![(2, 20), (3, 30)]);
    drop(store);
    writer.join();
    let (store, _w) = Store::open(dir.path()).unwrap();
    assert_eq!(rows(&store), vec![(2, 20), (3, 30)]);
}

#[tokio::test]
async fn a_read_since_a_memtable_searches_redb_only_once_that_memtable_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _w) = Store::open(dir.path()).unwrap();
    let first = store.write(|txn| Ok(txn.generation())).await.unwrap();
    write_t(&store, |t| t.insert(1, 10)).await;
    let get = |key: u64, since: Option<u64>| {
        let r = store.read().unwrap();
        let t = r.open_table(T).unwrap();
        t.get_written_since(key, since).unwrap().map(|v| v.value())
    };
    // In the memtable: found whatever `since` says.
    assert_eq!(get(1, Some(first)), Some(10));
    force_checkpoints(&store, 1).await;
    let now = store.read().unwrap().generation();
    assert!(now > first, "a checkpoint starts a new memtable");
    // Only in redb now. Written into memtable `first`, which the snapshot
    // no longer holds: redb is searched.
    assert_eq!(get(1, Some(first)), Some(10));
    assert_eq!(get(1, None), Some(10));
    // Claimed to be written into a memtable the snapshot holds (not true
    // of this key): redb is not searched, so it is not found.
    assert_eq!(get(1, Some(now)), None);
    // A key written since `now` is found in memory.
    write_t(&store, |t| t.insert(2, 20)).await;
    assert_eq!(get(2, Some(now)), Some(20));
}
