//! Tests of the database handle and the group committer.

use super::*;
use redb::ReadableTableMetadata;

const T: TableDefinition<u64, u64> = TableDefinition::new("test_t");

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
    drop((t, r, store));
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
    let seen = store
        .write(|txn| Ok(txn.open_table(T)?.len()?))
        .await
        .unwrap();
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

#[test]
fn newer_schema_refused() {
    let dir = tempfile::tempdir().unwrap();
    open_and_close(dir.path());
    {
        let db = Database::create(dir.path().join(DB_FILE)).unwrap();
        let w = db.begin_write().unwrap();
        w.open_table(META)
            .unwrap()
            .insert(META_SCHEMA, 99u32.to_le_bytes().as_slice())
            .unwrap();
        w.commit().unwrap();
    }
    let err = Store::open(dir.path())
        .err()
        .expect("newer schema must not open");
    assert!(
        matches!(err, OpenError::UnknownSchema { found: 99, .. }),
        "{err}"
    );
}
