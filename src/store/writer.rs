//! The writer thread: group commits, the write-ahead log and checkpoints.
//!
//! The writer builds a transaction from every waiting closure, appends its
//! table writes to the log and commits it to redb without an fsync. It
//! does not wait for the fsync: it hands the batch's replies to the syncer
//! thread and starts on the next batch while the disk works. The syncer
//! fsyncs the log once for everything handed to it since its last fsync,
//! then answers those callers. So the disk's latency overlaps the CPU work
//! of the next batch, and every answer still means "on disk".
//!
//! A later transaction may read what an earlier one wrote before that is
//! fsynced; that is safe because the log is replayed in order (a record is
//! only durable once everything before it is) and a failed fsync stops all
//! writing (`Shared::broken`) until the node restarts and replays the log.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redb::{Database, Durability, ReadTransaction, ReadableDatabase, WriteTransaction};
use tokio::sync::mpsc;

use super::wal::{self, Wal};
use super::{Done, Error, Job, MAX_BATCH, META, OpenError, Tx, WriteStats, tables, tx};

/// The last write-ahead log record the database holds (u64, LE).
const META_WAL_CHECKPOINT: &str = "wal_checkpoint";
/// Checkpoint once the log holds this much (a checkpoint blocks the writer
/// for as long as redb takes to write and fsync what changed, so they are
/// kept small)...
const CHECKPOINT_BYTES: u64 = 8 * 1024 * 1024;
/// ... or this long after the last one, once the log holds `BUSY_BYTES`...
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);
const BUSY_BYTES: u64 = 1024 * 1024;
/// ... or this long after the last one, whatever the log holds: a quiet
/// node (lazy registry updates, the odd message) checkpoints rarely, since
/// each checkpoint is an fsync of its own.
const QUIET_CHECKPOINT_EVERY: Duration = Duration::from_secs(5);

/// Whether a batch should be the checkpoint, given how much the log holds
/// and how long ago the last checkpoint was.
fn checkpoint_due(log_bytes: u64, since_last: Duration) -> bool {
    log_bytes >= CHECKPOINT_BYTES
        || (since_last >= CHECKPOINT_EVERY && log_bytes >= BUSY_BYTES)
        || (since_last >= QUIET_CHECKPOINT_EVERY && log_bytes > 0)
}

/// Read the checkpoint and apply the log records after it, in one durable
/// transaction that also moves the checkpoint. Returns the checkpoint.
pub(super) fn recover(db: &Database, wal: &Wal) -> Result<u64, OpenError> {
    let path = wal.path().to_path_buf();
    let storage = |e: Error| OpenError::Storage {
        path: path.clone(),
        source: redb::Error::Io(std::io::Error::other(e.to_string())),
    };
    let corrupt = |reason: String| OpenError::Corrupt {
        path: path.clone(),
        reason,
    };
    let read = db.begin_read().map_err(|e| storage(e.into()))?;
    let checkpoint = read_checkpoint(&read).map_err(|e| corrupt(e.to_string()))?;
    drop(read);
    let replay = wal.read(checkpoint).map_err(|e| match e {
        wal::ReadError::Gap(gap) => corrupt(gap.to_string()),
        wal::ReadError::Io(io) => storage(Error::Storage(Arc::new(redb::Error::Io(io)))),
    })?;
    let Some(&(last, _)) = replay.records.last() else {
        return Ok(checkpoint);
    };
    let txn = db.begin_write().map_err(|e| storage(e.into()))?;
    let mut ops = 0usize;
    for (lsn, payload) in &replay.records {
        for op in tx::ops(payload).map_err(|r| corrupt(format!("record {lsn}: {r}")))? {
            tables::replay(&txn, &op).map_err(|e| match e {
                Error::Corrupt { reason, .. } => corrupt(format!("record {lsn}: {reason}")),
                other => storage(other),
            })?;
            ops += 1;
        }
    }
    write_checkpoint(&txn, last).map_err(storage)?;
    txn.commit().map_err(|e| storage(e.into()))?;
    tracing::info!(
        wal = %path.display(),
        records = replay.records.len(),
        ops,
        first = checkpoint + 1,
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

/// State the writer, the syncer and every `Store` handle share.
#[derive(Default)]
pub(super) struct Shared {
    /// Set when the log could not be written or fsynced after its
    /// transaction was applied: the database and the log may disagree, so
    /// every later write fails until the node restarts (and replays the log).
    broken: Mutex<Option<Error>>,
}

impl Shared {
    pub(super) fn broken(&self) -> Option<Error> {
        self.broken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(super) fn fail(
        &self,
        wal: &std::path::Path,
        doing: &str,
        e: &dyn std::fmt::Display,
    ) -> Error {
        let err = Error::Storage(Arc::new(redb::Error::Io(std::io::Error::other(format!(
            "{doing} ({}) failed: {e}; this node refuses further writes until it is restarted",
            wal.display()
        )))));
        tracing::error!(error = %err, "storage failure");
        let mut b = self.broken.lock().unwrap_or_else(|p| p.into_inner());
        b.get_or_insert(err).clone()
    }
}

/// The writer thread's state.
pub(super) struct Writer {
    db: Arc<Database>,
    wal: Wal,
    /// The current batch's table writes, as a log record payload.
    log: std::cell::RefCell<Vec<u8>>,
    next_lsn: u64,
    /// The last record the database itself holds.
    checkpointed: u64,
    /// Records appended but not handed to the syncer yet (lazy batches).
    unsynced: bool,
    last_checkpoint: Instant,
    shared: Arc<Shared>,
    syncer: std::sync::mpsc::Sender<Vec<Done>>,
    syncer_thread: Option<std::thread::JoinHandle<()>>,
    stats: Arc<WriteStats>,
}

impl Writer {
    /// A writer continuing after `checkpoint` (see `recover`).
    pub(super) fn new(
        db: Arc<Database>,
        mut wal: Wal,
        checkpoint: u64,
        stats: Arc<WriteStats>,
        shared: Arc<Shared>,
    ) -> std::io::Result<Writer> {
        wal.reset();
        let (tx, rx) = std::sync::mpsc::channel();
        let syncer = Syncer {
            file: wal.file()?,
            path: wal.path().to_path_buf(),
            shared: shared.clone(),
            stats: stats.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("agentmesh-fsync".into())
            .spawn(move || syncer.run(rx))?;
        Ok(Writer {
            db,
            wal,
            log: std::cell::RefCell::new(Vec::new()),
            next_lsn: checkpoint + 1,
            checkpointed: checkpoint,
            unsynced: false,
            last_checkpoint: Instant::now(),
            shared,
            syncer: tx,
            syncer_thread: Some(thread),
            stats,
        })
    }

    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let mut batch: Vec<Job> = Vec::with_capacity(256);
        while let Some(first) = rx.blocking_recv() {
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            let n = batch.len() as u64;
            self.run_batch(&mut batch);
            self.stats.commits.fetch_add(1, Ordering::Relaxed);
            self.stats.writes.fetch_add(n, Ordering::Relaxed);
        }
        // Closing: answer everything in flight, then leave the database
        // holding everything, so the log is not needed to open it.
        let (closed, _) = std::sync::mpsc::channel();
        drop(std::mem::replace(&mut self.syncer, closed));
        if let Some(t) = self.syncer_thread.take() {
            let _ = t.join();
        }
        if self.shared.broken().is_some() {
            return;
        }
        if self.next_lsn - 1 > self.checkpointed {
            let done = self
                .db
                .begin_write()
                .map_err(Error::from)
                .and_then(|txn| self.checkpoint(txn));
            if let Err(e) = done {
                tracing::error!(error = %e, "final checkpoint failed; the write-ahead log will be replayed on the next start");
                return;
            }
        }
        if let Err(e) = self.wal.truncate() {
            tracing::warn!(error = %e, wal = %self.wal.path().display(), "cannot truncate the write-ahead log after the final checkpoint");
        }
    }

    fn run_batch(&mut self, batch: &mut Vec<Job>) {
        let started = Instant::now();
        if let Some(e) = self.shared.broken() {
            answer_all(batch, &e);
            return;
        }
        let durable = batch.iter().any(|j| j.durable);
        let checkpoint = self.next_lsn - 1 > self.checkpointed
            && checkpoint_due(self.wal.len(), self.last_checkpoint.elapsed());
        let level = if checkpoint {
            Durability::Immediate
        } else {
            Durability::None
        };
        let txn = match self
            .db
            .begin_write()
            .map_err(Error::from)
            .and_then(|mut t| {
                t.set_durability(level)?;
                Ok(t)
            }) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "cannot begin write transaction");
                answer_all(batch, &e);
                return;
            }
        };
        self.log.get_mut().clear();
        let mut dones: Vec<Done> = Vec::with_capacity(batch.len());
        let mut failure: Option<Error> = None;
        {
            let tx = Tx::new(&txn, &self.log);
            for job in batch.drain(..) {
                if let Some(err) = &failure {
                    // Jobs after a failure never touch the transaction.
                    let (done, _) = (job.run)(Err(Error::BatchAborted(err.to_string())));
                    dones.push(done);
                    continue;
                }
                match catch_unwind(AssertUnwindSafe(|| (job.run)(Ok(&tx)))) {
                    Ok((done, None)) => dones.push(done),
                    Ok((done, Some(e))) => {
                        dones.push(done);
                        failure = Some(e);
                    }
                    // The panicking closure took its reply sender with it: its
                    // caller sees `Closed`.
                    Err(_) => failure = Some(Error::BatchAborted("a write panicked".into())),
                }
            }
        }
        let applied = Instant::now();
        self.stats.apply_ns.fetch_add(
            applied.duration_since(started).as_nanos() as u64,
            Ordering::Relaxed,
        );
        let result = match failure {
            Some(err) => {
                tracing::error!(error = %err, "write failed; rolling back its group commit");
                let _ = txn.abort();
                Err(Error::BatchAborted(err.to_string()))
            }
            None if checkpoint => self.checkpoint(txn),
            None => self.logged_commit(txn),
        };
        self.stats
            .commit_ns
            .fetch_add(applied.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if result.is_ok() && durable && self.unsynced {
            // The syncer answers once the log is on disk.
            self.unsynced = false;
            if let Err(std::sync::mpsc::SendError(dones)) = self.syncer.send(dones) {
                let e = self.shared.fail(
                    self.wal.path(),
                    "handing a commit to the fsync thread",
                    &"it has stopped",
                );
                dones.into_iter().for_each(|d| d(Err(e.clone())));
            }
            return;
        }
        if let Err(e) = &result {
            tracing::error!(error = %e, "group commit did not commit");
        }
        for done in dones {
            done(result.clone());
        }
    }

    /// Append the batch to the log (not fsynced), then commit it to redb
    /// without an fsync.
    fn logged_commit(&mut self, txn: WriteTransaction) -> Result<(), Error> {
        let log = self.log.get_mut();
        if !log.is_empty() {
            if let Err(e) = self.wal.append(self.next_lsn, log) {
                let _ = txn.abort();
                return Err(self.shared.fail(
                    self.wal.path(),
                    "appending to the write-ahead log",
                    &e,
                ));
            }
            self.next_lsn += 1;
            self.unsynced = true;
            self.stats
                .wal_bytes
                .fetch_add(log.len() as u64 + wal::HEADER as u64, Ordering::Relaxed);
        }
        if let Err(e) = txn.commit() {
            return Err(self
                .shared
                .fail(self.wal.path(), "committing a logged transaction", &e));
        }
        Ok(())
    }

    /// Commit durably, recording that the database now holds every record
    /// logged so far; the log starts again from the front.
    fn checkpoint(&mut self, mut txn: WriteTransaction) -> Result<(), Error> {
        let last = self.next_lsn - 1;
        txn.set_durability(Durability::Immediate)?;
        if let Err(e) = write_checkpoint(&txn, last) {
            let _ = txn.abort();
            return Err(e);
        }
        let t = Instant::now();
        if let Err(e) = txn.commit() {
            // Whether the checkpoint reached the disk is unknown. Logging
            // on at the current offset would put new records behind older
            // ones that a durable checkpoint made stale, where replay
            // would never reach them; stopping is the safe answer.
            return Err(self
                .shared
                .fail(self.wal.path(), "committing a checkpoint", &e));
        }
        let took = t.elapsed();
        self.stats
            .checkpoint_ns
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        tracing::debug!(
            record = last,
            log_bytes = self.wal.len(),
            took_ms = took.as_secs_f64() * 1e3,
            "checkpoint"
        );
        self.checkpointed = last;
        self.unsynced = false;
        self.wal.reset();
        self.last_checkpoint = Instant::now();
        self.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn answer_all(batch: &mut Vec<Job>, e: &Error) {
    for job in batch.drain(..) {
        let (done, _) = (job.run)(Err(e.clone()));
        done(Err(e.clone()));
    }
}

/// Fsyncs the log for the writer and answers the callers it covers.
struct Syncer {
    file: std::fs::File,
    path: std::path::PathBuf,
    shared: Arc<Shared>,
    stats: Arc<WriteStats>,
}

impl Syncer {
    fn run(self, rx: std::sync::mpsc::Receiver<Vec<Done>>) {
        let mut waiting: Vec<Done> = Vec::new();
        while let Ok(first) = rx.recv() {
            waiting.extend(first);
            // Everything handed over so far was appended before it was
            // handed over, so one fsync from here covers all of it.
            while let Ok(more) = rx.try_recv() {
                waiting.extend(more);
            }
            let result = match self.shared.broken() {
                Some(e) => Err(e),
                None => {
                    let t = Instant::now();
                    let synced = self.file.sync_data();
                    self.stats
                        .wal_sync_ns
                        .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    self.stats.wal_syncs.fetch_add(1, Ordering::Relaxed);
                    synced.map_err(|e| {
                        self.shared
                            .fail(&self.path, "fsyncing the write-ahead log", &e)
                    })
                }
            };
            for done in waiting.drain(..) {
                done(result.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_logs_checkpoint_often_and_quiet_ones_rarely() {
        let ms = Duration::from_millis;
        // Busy: by size, or by time once a megabyte is waiting.
        assert!(checkpoint_due(CHECKPOINT_BYTES, ms(1)));
        assert!(checkpoint_due(BUSY_BYTES, ms(500)));
        assert!(!checkpoint_due(BUSY_BYTES, ms(499)));
        // Quiet: a few lazy writes wait for the long interval.
        assert!(!checkpoint_due(4096, ms(500)));
        assert!(!checkpoint_due(4096, ms(4_999)));
        assert!(checkpoint_due(4096, ms(5_000)));
        assert!(!checkpoint_due(0, ms(60_000)));
    }
}
