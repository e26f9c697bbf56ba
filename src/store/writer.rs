//! The writer thread: group commits into the write-ahead log and the
//! memtable, and when to checkpoint.
//!
//! The writer builds a batch from every waiting closure, appends the
//! batch's table writes to the log and moves them into the active memtable
//! (`store::mem`); redb is not touched. It does not wait for the fsync: it
//! hands the batch's replies to the syncer thread and starts on the next
//! batch while the disk works. The syncer fsyncs the log once for
//! everything handed to it since its last fsync, then answers those
//! callers. So the disk's latency overlaps the CPU work of the next batch,
//! and every answer still means "on disk". Under load both wait a little
//! before they start (see [`GATHER`] and [`LINGER`]), so that each group
//! commit and each fsync covers more callers.
//!
//! Once the log file in use holds enough, the writer freezes the active
//! memtable, hands it to the flusher thread (`store::flush`) and moves on
//! to the other log file. The checkpoint runs beside the writer instead of
//! stalling it; the writer freezes again only once it is done.
//!
//! A later batch may read what an earlier one wrote before that is
//! fsynced; that is safe because the log is replayed in order (a record is
//! only durable once everything before it is) and a failed append, fsync
//! or checkpoint stops all writing (`Shared::broken`) until the node
//! restarts and replays the log.

use std::cell::RefCell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase};
use tokio::sync::mpsc;

use super::flush::{self, Flush, Flusher};
use super::mem::{self, Layers, Mem};
use super::view::Read;
use super::wal::{self, Wal};
use super::{Done, Error, Job, MAX_BATCH, Tx, WriteStats, tables, tx};

/// Checkpoint once the log file in use holds this much... The longer the
/// interval, the more rows are written and removed again before it (a
/// message's outbox row, envelope and receipts live for tens of
/// milliseconds): at 8 MiB, a quarter of the messages of a saturated
/// benchmark still had their envelope in the memtable when it froze, at
/// 32 MiB 7%. The memtables hold at most two files' worth of rows.
const CHECKPOINT_BYTES: u64 = 32 * 1024 * 1024;
/// ... or this long after the last one, once it holds `BUSY_BYTES`...
const CHECKPOINT_EVERY: Duration = Duration::from_millis(2000);
const BUSY_BYTES: u64 = 1024 * 1024;
/// ... or this long after the last one, whatever it holds: a quiet node
/// (lazy registry updates, the odd message) checkpoints rarely, since each
/// checkpoint is an fsync of its own.
const QUIET_CHECKPOINT_EVERY: Duration = Duration::from_secs(5);
/// Most value bytes carried into the next memtable at a freeze; the rest
/// of what is live goes to redb. Bounds the carry record and the memory a
/// large backlog keeps in memtables.
const CARRY_BYTES: usize = 16 * 1024 * 1024;

/// Whether to checkpoint, given how much the log file in use holds and how
/// long ago the last checkpoint was.
fn checkpoint_due(log_bytes: u64, since_last: Duration) -> bool {
    log_bytes >= CHECKPOINT_BYTES
        || (since_last >= CHECKPOINT_EVERY && log_bytes >= BUSY_BYTES)
        || (since_last >= QUIET_CHECKPOINT_EVERY && log_bytes > 0)
}

/// State the writer, the syncer, the flusher and every `Store` handle share.
#[derive(Default)]
pub(super) struct Shared {
    /// Set when the log could not be written or fsynced, or a checkpoint
    /// failed: the database and the log may disagree, so every later write
    /// fails until the node restarts (and replays the log).
    broken: Mutex<Option<Error>>,
    /// Cancelled when `broken` is first set (see `Store::failed`).
    failed: tokio_util::sync::CancellationToken,
    /// The memtables readers look through.
    layers: RwLock<Layers>,
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
        let first = b.get_or_insert(err).clone();
        self.failed.cancel();
        first
    }

    /// Resolves once a failure is recorded (at once if one already is).
    pub(super) async fn failed(&self) -> Error {
        self.failed.cancelled().await;
        self.broken()
            .expect("the token is only cancelled after a failure is recorded")
    }

    /// A read snapshot: the memtables and a redb transaction begun while
    /// holding them, so a memtable the flusher drops is in the snapshot's
    /// redb transaction if it is not in its layers.
    pub(super) fn snapshot(&self, db: &Database) -> Result<Read, Error> {
        let layers = self.layers.read().unwrap_or_else(|p| p.into_inner());
        let txn = db.begin_read()?;
        Ok(Read::new(txn, layers.clone()))
    }

    pub(super) fn layers_mut(&self) -> std::sync::RwLockWriteGuard<'_, Layers> {
        self.layers.write().unwrap_or_else(|p| p.into_inner())
    }

    fn flushing(&self) -> bool {
        self.layers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .frozen
            .is_some()
    }
}

/// The writer thread's state.
pub(super) struct Writer {
    db: Arc<Database>,
    /// The two log files; `cur` takes new records.
    wals: [Wal; 2],
    cur: usize,
    /// The running batch's writes: its memtable layer and its log record
    /// (the payload after `wal::HEADER` bytes kept for the record header).
    batch: RefCell<Mem>,
    log: RefCell<Vec<u8>>,
    /// The memtable batches go into (the one in `Shared::layers`).
    active: Arc<RwLock<Mem>>,
    next_lsn: u64,
    /// The last record handed to the flusher (or checkpointed at open).
    frozen_upto: u64,
    /// Log files appended to and not handed to the syncer since.
    unsynced: [bool; 2],
    last_checkpoint: Instant,
    shared: Arc<Shared>,
    syncer: std::sync::mpsc::Sender<([bool; 2], Vec<Done>)>,
    syncer_thread: Option<std::thread::JoinHandle<()>>,
    flusher: Option<std::sync::mpsc::Sender<Flush>>,
    flusher_thread: Option<std::thread::JoinHandle<()>>,
    stats: Arc<WriteStats>,
}

impl Writer {
    /// A writer continuing after `checkpoint` (see `flush::recover`), which
    /// covers everything both log files hold.
    pub(super) fn new(
        db: Arc<Database>,
        mut wals: [Wal; 2],
        checkpoint: u64,
        stats: Arc<WriteStats>,
        shared: Arc<Shared>,
    ) -> std::io::Result<Writer> {
        wals.iter_mut().for_each(Wal::reset);
        let (tx, rx) = std::sync::mpsc::channel();
        let syncer = Syncer {
            files: [wals[0].file()?, wals[1].file()?],
            path: wals[0].path().to_path_buf(),
            shared: shared.clone(),
            stats: stats.clone(),
        };
        let syncer_thread = std::thread::Builder::new()
            .name("agentmesh-fsync".into())
            .spawn(move || syncer.run(rx))?;
        let (ftx, frx) = std::sync::mpsc::channel();
        let flusher = Flusher {
            db: db.clone(),
            shared: shared.clone(),
            stats: stats.clone(),
            path: wals[0].path().to_path_buf(),
        };
        let flusher_thread = std::thread::Builder::new()
            .name("agentmesh-flush".into())
            .spawn(move || flusher.run(frx))?;
        let active = shared.layers_mut().active.clone();
        Ok(Writer {
            db,
            wals,
            cur: 0,
            batch: RefCell::new(Mem::default()),
            log: RefCell::new(vec![0; wal::HEADER]),
            active,
            next_lsn: checkpoint + 1,
            frozen_upto: checkpoint,
            unsynced: [false; 2],
            last_checkpoint: Instant::now(),
            shared,
            syncer: tx,
            syncer_thread: Some(syncer_thread),
            flusher: Some(ftx),
            flusher_thread: Some(flusher_thread),
            stats,
        })
    }

    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let mut batch: Vec<Job> = Vec::with_capacity(256);
        let mut last = 0;
        while let Some(first) = rx.blocking_recv() {
            batch.push(first);
            GATHER.take(last);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            last = batch.len();
            self.run_batch(&mut batch);
            self.stats.commits.fetch_add(1, Ordering::Relaxed);
            self.stats.writes.fetch_add(last as u64, Ordering::Relaxed);
        }
        self.close();
    }

    /// Answer everything in flight, finish the running checkpoint, then
    /// checkpoint the rest, so the log is not needed to open the database.
    fn close(&mut self) {
        let (closed, _) = std::sync::mpsc::channel();
        drop(std::mem::replace(&mut self.syncer, closed));
        if let Some(t) = self.syncer_thread.take() {
            let _ = t.join();
        }
        drop(self.flusher.take());
        if let Some(t) = self.flusher_thread.take() {
            let _ = t.join();
        }
        if self.shared.broken().is_some() {
            return;
        }
        let last = self.next_lsn - 1;
        if last > self.frozen_upto {
            let done = flush::checkpoint(&self.db, &mem::read(&self.active), last);
            if let Err(e) = done {
                tracing::error!(error = %e, "final checkpoint failed; the write-ahead log will be replayed on the next start");
                return;
            }
        }
        for w in &mut self.wals {
            if let Err(e) = w.truncate() {
                tracing::warn!(error = %e, wal = %w.path().display(), "cannot truncate the write-ahead log after the final checkpoint");
            }
        }
    }

    fn run_batch(&mut self, batch: &mut Vec<Job>) {
        let started = Instant::now();
        if let Some(e) = self.shared.broken() {
            answer_all(batch, &e);
            return;
        }
        let durable = batch.iter().any(|j| j.durable);
        let read = match self.shared.snapshot(&self.db) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot begin a read transaction for a group commit");
                answer_all(batch, &e);
                return;
            }
        };
        self.batch.get_mut().clear();
        self.log.get_mut().truncate(wal::HEADER);
        let mut dones: Vec<Done> = Vec::with_capacity(batch.len());
        let mut failure: Option<Error> = None;
        {
            let tx = Tx::new(&read, &self.batch, &self.log);
            for job in batch.drain(..) {
                if let Some(err) = &failure {
                    // Jobs after a failure never touch the batch.
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
        drop(read);
        let applied = Instant::now();
        self.stats.apply_ns.fetch_add(
            applied.duration_since(started).as_nanos() as u64,
            Ordering::Relaxed,
        );
        let result = match failure {
            Some(err) => {
                tracing::error!(error = %err, "write failed; rolling back its group commit");
                Err(Error::BatchAborted(err.to_string()))
            }
            None => self.commit(),
        };
        self.stats
            .commit_ns
            .fetch_add(applied.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if result.is_ok() && durable && self.unsynced.contains(&true) {
            // The syncer answers once the log is on disk.
            let files = std::mem::take(&mut self.unsynced);
            if let Err(std::sync::mpsc::SendError((_, dones))) = self.syncer.send((files, dones)) {
                let e = self.shared.fail(
                    self.wals[self.cur].path(),
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

    /// Append the batch's record to the log (not fsynced), move its writes
    /// into the active memtable, and checkpoint if it is time.
    fn commit(&mut self) -> Result<(), Error> {
        let log = self.log.get_mut();
        if log.len() == wal::HEADER {
            return Ok(());
        }
        let wal = &mut self.wals[self.cur];
        if let Err(e) = wal.append_framed(self.next_lsn, log) {
            return Err(self
                .shared
                .fail(wal.path(), "appending to the write-ahead log", &e));
        }
        self.next_lsn += 1;
        self.unsynced[self.cur] = true;
        self.stats
            .wal_bytes
            .fetch_add(log.len() as u64, Ordering::Relaxed);
        mem::write(&self.active).absorb(self.batch.get_mut());
        if checkpoint_due(self.wals[self.cur].len(), self.last_checkpoint.elapsed())
            && !self.shared.flushing()
        {
            self.freeze();
        }
        Ok(())
    }

    /// Hand the active memtable to the flusher and log into the other file
    /// (whose records the last checkpoint covers: the flusher is idle).
    /// Short-lived rows still live are carried into the next memtable
    /// (`mem::Carry`): logged again as the new file's first record, which
    /// the flusher makes durable before its checkpoint lets the old file go.
    fn freeze(&mut self) {
        let last = self.next_lsn - 1;
        self.cur ^= 1;
        self.wals[self.cur].reset();
        let mut next = Mem::default();
        // A buffer of its own per freeze: up to 16 MiB that would
        // otherwise stay allocated between checkpoints.
        let mut carry = vec![0; wal::HEADER];
        let mut budget = CARRY_BYTES;
        mem::write(&self.active).carry_into(&mut next, tables::carried, |table, key, value| {
            let Some(left) = budget.checked_sub(value.len()) else {
                return false;
            };
            budget = left;
            tx::record(&mut carry, table, key, Some(value));
            true
        });
        let mut sync = None;
        if carry.len() > wal::HEADER {
            let wal = &mut self.wals[self.cur];
            let appended = wal
                .append_framed(self.next_lsn, &mut carry)
                .and_then(|()| wal.file());
            match appended {
                Ok(file) => sync = Some(file),
                Err(e) => {
                    self.shared.fail(
                        wal.path(),
                        "carrying live rows into the write-ahead log",
                        &e,
                    );
                    return;
                }
            }
            self.next_lsn += 1;
            self.unsynced[self.cur] = true;
            self.stats
                .wal_bytes
                .fetch_add(carry.len() as u64, Ordering::Relaxed);
        }
        let fresh = Arc::new(RwLock::new(next));
        let old = {
            let mut layers = self.shared.layers_mut();
            let old = std::mem::replace(&mut layers.active, fresh.clone());
            layers.frozen = Some(old.clone());
            layers.generation += 1;
            old
        };
        self.active = fresh;
        self.frozen_upto = last;
        self.last_checkpoint = Instant::now();
        let handed = self.flusher.as_ref().is_some_and(|f| {
            f.send(Flush {
                mem: old,
                last,
                sync,
            })
            .is_ok()
        });
        if !handed {
            self.shared.fail(
                self.wals[self.cur].path(),
                "handing a checkpoint to the flusher",
                &"it has stopped",
            );
        }
    }
}

fn answer_all(batch: &mut Vec<Job>, e: &Error) {
    for job in batch.drain(..) {
        let (done, _) = (job.run)(Err(e.clone()));
        done(Err(e.clone()));
    }
}

/// A short wait under load: taken when the previous round (group commit
/// or fsync) served at least `busy` callers, so that the next one serves
/// more; a light load never waits.
struct Pause {
    busy: usize,
    wait: Duration,
}

impl Pause {
    /// The wait after a round that served `served` callers, if any.
    fn after(&self, served: usize) -> Option<Duration> {
        (served >= self.busy).then_some(self.wait)
    }

    /// Sleep for [`Pause::after`].
    fn take(&self, served: usize) {
        if let Some(d) = self.after(served) {
            std::thread::sleep(d);
        }
    }
}

/// How long the writer waits, once a closure has arrived, for more to join
/// its group commit. Under load, callers arrive a few microseconds apart
/// and a group commit of a handful costs nearly what one of fifty does
/// (waking the thread, a snapshot, a `write` syscall, moving rows into the
/// memtable, handing over to the syncer): with 128 producers on 2 cores,
/// waiting 50 µs made the sender's group commits 2,700 instead of 18,000
/// per 100k messages, took about 6% less CPU per message and moved about
/// 4% more (BENCHMARKS.md, stop 16). The wait is shorter than the fsync
/// every durable caller waits for anyway. At 1,000 msg/s a group commit
/// runs one closure, and nothing waits.
const GATHER: Pause = Pause {
    busy: 4,
    wait: Duration::from_micros(50),
};

/// How long the syncer waits before an fsync: under load, long enough for
/// the writer to append a few more group commits, so that one fsync covers
/// them all. An fsync costs the machine more CPU than its wait suggests
/// (the syscall, the journal commit, the thread and task wake-ups); on 2
/// cores with 128 producers, waiting 150 µs cut the sender's fsyncs from
/// about 3,000 to 1,300-1,500 per 100k messages, CPU per message by about
/// 5% and moved about 4% more messages per second, with send latency
/// unchanged (BENCHMARKS.md, stop 16). At 1,000 msg/s an fsync answers one
/// or two callers, and nothing waits.
const LINGER: Pause = Pause {
    busy: 8,
    wait: Duration::from_micros(150),
};

/// Fsyncs the log for the writer and answers the callers it covers.
struct Syncer {
    files: [std::fs::File; 2],
    path: std::path::PathBuf,
    shared: Arc<Shared>,
    stats: Arc<WriteStats>,
}

impl Syncer {
    fn run(self, rx: std::sync::mpsc::Receiver<([bool; 2], Vec<Done>)>) {
        let mut waiting: Vec<Done> = Vec::new();
        let mut last_answered = 0;
        while let Ok((mut files, first)) = rx.recv() {
            waiting.extend(first);
            LINGER.take(last_answered);
            // Everything handed over so far was appended before it was
            // handed over, so one fsync (per file) from here covers all of it.
            while let Ok((more_files, more)) = rx.try_recv() {
                waiting.extend(more);
                files = [files[0] || more_files[0], files[1] || more_files[1]];
            }
            let result = match self.shared.broken() {
                Some(e) => Err(e),
                None => self.sync(files),
            };
            last_answered = waiting.len();
            for done in waiting.drain(..) {
                done(result.clone());
            }
        }
    }

    fn sync(&self, files: [bool; 2]) -> Result<(), Error> {
        for (file, _) in self.files.iter().zip(files).filter(|(_, dirty)| *dirty) {
            let t = Instant::now();
            let synced = file.sync_data();
            let took = t.elapsed().as_nanos() as u64;
            self.stats.wal_sync_ns.fetch_add(took, Ordering::Relaxed);
            self.stats
                .wal_sync_max_ns
                .fetch_max(took, Ordering::Relaxed);
            self.stats.wal_syncs.fetch_add(1, Ordering::Relaxed);
            synced.map_err(|e| {
                self.shared
                    .fail(&self.path, "fsyncing the write-ahead log", &e)
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_writer_waits_for_more_closures_only_under_load() {
        assert_eq!(GATHER.after(0), None);
        assert_eq!(GATHER.after(1), None);
        assert_eq!(GATHER.after(GATHER.busy - 1), None);
        assert_eq!(GATHER.after(GATHER.busy), Some(GATHER.wait));
        assert_eq!(GATHER.after(MAX_BATCH), Some(GATHER.wait));
    }

    #[test]
    fn the_syncer_waits_before_an_fsync_only_under_load() {
        assert_eq!(LINGER.after(0), None);
        assert_eq!(LINGER.after(LINGER.busy - 1), None);
        assert_eq!(LINGER.after(LINGER.busy), Some(LINGER.wait));
        assert_eq!(LINGER.after(500), Some(LINGER.wait));
    }

    #[test]
    fn busy_logs_checkpoint_often_and_quiet_ones_rarely() {
        let ms = Duration::from_millis;
        // Busy: by size, or by time once a megabyte is waiting.
        assert!(checkpoint_due(CHECKPOINT_BYTES, ms(1)));
        assert!(checkpoint_due(BUSY_BYTES, CHECKPOINT_EVERY));
        assert!(!checkpoint_due(BUSY_BYTES, CHECKPOINT_EVERY - ms(1)));
        assert!(!checkpoint_due(CHECKPOINT_BYTES - 1, ms(1)));
        // Quiet: a few lazy writes wait for the long interval.
        assert!(!checkpoint_due(4096, CHECKPOINT_EVERY));
        assert!(!checkpoint_due(4096, ms(4_999)));
        assert!(checkpoint_due(4096, ms(5_000)));
        assert!(!checkpoint_due(0, ms(60_000)));
    }
}
