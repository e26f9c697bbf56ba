//! Checkpoints: a frozen memtable applied to redb in one durable commit
//! that also records the last log record it holds; and the same at open,
//! for the records the log holds after the last checkpoint.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use redb::{Database, Durability, ReadTransaction, ReadableDatabase, WriteTransaction};

use super::mem::{self, Mem, Slot};
use super::wal::{self, Wal};
use super::writer::Shared;
use super::{Error, META, OpenError, WriteStats, tables, tx};

/// The last write-ahead log record the database holds (u64, LE).
const META_WAL_CHECKPOINT: &str = "wal_checkpoint";

/// Apply `mem` to redb and record `last` as the checkpoint, durably.
pub(super) fn checkpoint(db: &Database, mem: &Mem, last: u64) -> Result<(), Error> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    for rows in mem.tables() {
        if !rows.rows.is_empty() {
            tables::flush(&txn, rows)?;
        }
    }
    write_checkpoint(&txn, last)?;
    txn.commit()?;
    Ok(())
}

/// A frozen memtable for the flusher, holding the records up to `last`.
pub(super) struct Flush {
    pub mem: Arc<RwLock<Mem>>,
    pub last: u64,
    /// The log file that took the rows carried out of `mem`: synced before
    /// the checkpoint, which ends the need for the file that held them.
    pub sync: Option<std::fs::File>,
}

/// The flusher thread: checkpoints each frozen memtable it is handed,
/// then drops it from the readers' layers.
pub(super) struct Flusher {
    pub db: Arc<Database>,
    pub shared: Arc<Shared>,
    pub stats: Arc<WriteStats>,
    pub path: PathBuf,
}

impl Flusher {
    pub(super) fn run(self, rx: std::sync::mpsc::Receiver<Flush>) {
        while let Ok(f) = rx.recv() {
            if self.shared.broken().is_some() {
                continue;
            }
            let t = Instant::now();
            let carried = match &f.sync {
                Some(file) => file
                    .sync_data()
                    .map_err(|e| Error::Storage(Arc::new(e.into()))),
                None => Ok(()),
            };
            let (done, rows) = {
                let m = mem::read(&f.mem);
                let done = carried.and_then(|()| checkpoint(&self.db, &m, f.last));
                (done, m.rows())
            };
            let took = t.elapsed();
            match done {
                Ok(()) => {
                    // Only now: a reader's snapshot either still holds the
                    // memtable or began after the commit.
                    self.shared.layers_mut().frozen = None;
                    self.stats
                        .checkpoint_ns
                        .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
                    self.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(
                        record = f.last,
                        rows,
                        took_ms = took.as_secs_f64() * 1e3,
                        "checkpoint"
                    );
                }
                // The memtable stays in the layers, so reads still see its
                // rows; writes stop until a restart replays the log.
                Err(e) => {
                    self.shared
                        .fail(&self.path, "checkpointing the memtable to the database", &e);
                }
            }
        }
    }
}

/// Read the checkpoint and apply the log records after it (from both
/// files), in one durable transaction that also moves the checkpoint.
/// Returns the checkpoint.
pub(super) fn recover(db: &Database, wals: &[Wal]) -> Result<u64, OpenError> {
    let path = wals[0].path().to_path_buf();
    let storage = |e: Error| OpenError::Storage {
        path: path.clone(),
        source: redb::Error::Io(std::io::Error::other(e.to_string())),
    };
    let corrupt = |reason: String| OpenError::Corrupt {
        path: path.clone(),
        reason,
    };
    let read = db.begin_read().map_err(|e| storage(e.into()))?;
    let after = read_checkpoint(&read).map_err(|e| corrupt(e.to_string()))?;
    drop(read);
    let mut runs = Vec::with_capacity(wals.len());
    for w in wals {
        runs.push(
            w.scan()
                .map_err(|io| storage(Error::Storage(Arc::new(redb::Error::Io(io)))))?,
        );
    }
    let replay = wal::chain(after, runs).map_err(|e| match e {
        wal::ReadError::Gap(gap) => corrupt(gap.to_string()),
        wal::ReadError::Io(io) => storage(Error::Storage(Arc::new(redb::Error::Io(io)))),
    })?;
    let Some(&(last, _)) = replay.records.last() else {
        return Ok(after);
    };
    let mut mem = Mem::default();
    let mut ops = 0usize;
    for (lsn, payload) in &replay.records {
        for op in tx::ops(payload).map_err(|r| corrupt(format!("record {lsn}: {r}")))? {
            let cmp = tables::order(op.table).ok_or_else(|| {
                corrupt(format!(
                    "record {lsn}: it writes to table {:?}, which this build does not know",
                    op.table
                ))
            })?;
            let slot = Slot::new(op.value.map(Arc::from), false);
            mem.put(op.table, cmp, op.key.into(), slot);
            ops += 1;
        }
    }
    checkpoint(db, &mem, last).map_err(|e| match e {
        Error::Corrupt { reason, .. } => corrupt(reason),
        other => storage(other),
    })?;
    tracing::info!(
        wal = %path.display(),
        records = replay.records.len(),
        ops,
        first = after + 1,
        last,
        stopped_at = replay.stopped,
        "replayed the write-ahead log"
    );
    Ok(last)
}

fn read_checkpoint(read: &ReadTransaction) -> Result<u64, Error> {
    let meta = read.open_table(META)?;
    let Some(v) = meta.get(META_WAL_CHECKPOINT)? else {
        return Ok(0);
    };
    <[u8; 8]>::try_from(v.value())
        .map(u64::from_le_bytes)
        .map_err(|_| Error::Corrupt {
            table: "meta",
            reason: "the write-ahead log checkpoint is not a u64".into(),
        })
}

fn write_checkpoint(txn: &WriteTransaction, lsn: u64) -> Result<(), Error> {
    txn.open_table(META)?
        .insert(META_WAL_CHECKPOINT, lsn.to_le_bytes().as_slice())?;
    Ok(())
}
