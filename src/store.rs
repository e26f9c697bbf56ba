//! The node's redb database: opening with a schema check, and the group
//! committer every write goes through.
//!
//! # Group commit
//! All writes run on one dedicated thread. Callers hand it a closure; the
//! thread drains every closure that is waiting, runs them in one write
//! transaction, commits once (fsync when any of them asked for durability)
//! and only then answers each caller. Throughput grows with load while every
//! answer still means "on disk".
//!
//! A closure must do its checks before it writes: if it returns an error
//! (or panics) the whole transaction is rolled back and every closure of the
//! batch gets an error, so a half-applied write can never be committed.
//! Domain outcomes ("handle taken") belong in the closure's `Ok` value.
//!
//! # Durability: the write-ahead log and the memtable
//! A group commit is made durable by appending its table writes to the
//! write-ahead log (`store::wal`) and fsyncing that; redb is not touched.
//! The writes go into an in-memory layer in front of redb, the memtable
//! (`store::mem`). Once the log file in use holds 32 MiB, or 1 MiB with 2 s
//! since the last checkpoint (on a quiet node, after 5 s), the
//! writer freezes the memtable and the flusher thread applies it to redb
//! in one durable commit that also records the last logged sequence number
//! (a checkpoint, `store::flush`), while the writer logs into the other
//! log file. Opening replays the records after the checkpoint. Reads
//! (`Store::read`, and reads inside a write) look through the memtables
//! before redb (`store::view`). Rows written and removed between two
//! checkpoints, which is most of a message's bookkeeping, never reach a
//! B-tree.
//!
//! Tables live in the modules that own them (`store::tables`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};

mod flush;
mod mem;
mod migrate;
pub mod tables;
mod tx;
mod view;
pub mod wal;
mod writer;

pub use tx::{Table, Tx};
pub use view::{Got, Read, Row, Rows, View};
use wal::Wal;

/// File name of the database inside the data dir.
pub const DB_FILE: &str = "agentmesh.redb";
/// The schema this build reads and writes.
pub const SCHEMA_VERSION: u32 = 6;
/// redb's page cache (its default is 1 GiB). The memtables hold what was
/// written since the last checkpoint, so redb's cache serves point reads
/// (duplicate checks, status queries) and scans; a start that scans 100k
/// queued envelopes filled 160 MiB of it and kept it.
const CACHE_BYTES: usize = 64 * 1024 * 1024;
/// Queue length of the group committer (backpressure beyond it).
const WRITE_QUEUE: usize = 16 * 1024;
/// Most closures in one transaction.
const MAX_BATCH: usize = 8192;

pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const META_SCHEMA: &str = "schema_version";
const META_APP: &str = "application";
const APP_TAG: &[u8] = b"agentmesh";

/// Errors opening the database.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Another process (or node in this process) has the database open.
    #[error("database {0} is already in use by another agentmesh process")]
    InUse(PathBuf),
    /// The file is not a readable redb database.
    #[error(
        "database {path} is corrupt or not a redb file: {reason}; refusing to start (move it aside, with the agentmesh.wal files beside it, to start afresh)"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What redb reported.
        reason: String,
    },
    /// The database was not written by agentmesh.
    #[error(
        "database {0} was not created by agentmesh (no agentmesh schema marker); refusing to start"
    )]
    Foreign(PathBuf),
    /// The schema version is not one this build knows.
    #[error(
        "database {path} has schema version {found}, this build knows version {SCHEMA_VERSION}; refusing to start"
    )]
    UnknownSchema {
        /// The file.
        path: PathBuf,
        /// Version found.
        found: u32,
    },
    /// Any other storage failure.
    #[error("cannot open database {path}: {source}")]
    Storage {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: redb::Error,
    },
}

/// Errors of reads and writes.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// redb reported a failure.
    #[error("storage error: {0}")]
    Storage(Arc<redb::Error>),
    /// A stored value could not be decoded.
    #[error("corrupt record in table {table}: {reason}")]
    Corrupt {
        /// Table name.
        table: &'static str,
        /// Decoder's complaint.
        reason: String,
    },
    /// Another write in the same group commit failed, so this one was rolled back.
    #[error("write rolled back because the transaction it shared failed: {0}")]
    BatchAborted(String),
    /// The writer thread is gone (node shutting down).
    #[error("the database is closed")]
    Closed,
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self { Error::Storage(Arc::new(e.into())) }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError,
    redb::SetDurabilityError
);

type Done = Box<dyn FnOnce(Result<(), Error>) + Send>;
/// Runs a write against the transaction (or, given an error, only prepares
/// to report it) and returns how to answer the caller once the commit is
/// known, plus the write's own failure if it failed.
type JobFn = Box<dyn FnOnce(Result<&Tx<'_>, Error>) -> (Done, Option<Error>) + Send>;

struct Job {
    durable: bool,
    run: JobFn,
}

/// Counters of the group committer (for benchmarks and `/metrics`).
#[derive(Debug, Default)]
pub struct WriteStats {
    /// Transactions committed.
    pub commits: AtomicU64,
    /// Closures applied.
    pub writes: AtomicU64,
    /// Nanoseconds spent running closures (building transactions).
    pub apply_ns: AtomicU64,
    /// Nanoseconds spent appending to the log and committing to redb
    /// (checkpoints included; the log's fsyncs are in `wal_sync_ns`).
    pub commit_ns: AtomicU64,
    /// Bytes appended to the write-ahead log (headers included).
    pub wal_bytes: AtomicU64,
    /// fsyncs of the write-ahead log.
    pub wal_syncs: AtomicU64,
    /// Checkpoints (durable redb commits).
    pub checkpoints: AtomicU64,
    /// Nanoseconds spent in fsyncs of the log.
    pub wal_sync_ns: AtomicU64,
    /// The longest fsync of the log, nanoseconds (a reader may reset it).
    pub wal_sync_max_ns: AtomicU64,
    /// Nanoseconds spent in checkpoint commits.
    pub checkpoint_ns: AtomicU64,
}

/// A cheap, cloneable handle to the database.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    jobs: mpsc::Sender<Job>,
    stats: Arc<WriteStats>,
    path: Arc<PathBuf>,
    shared: Arc<writer::Shared>,
}

/// Joins the writer thread; held by the node so shutdown can wait until the
/// database file is closed.
pub struct WriterThread(Option<std::thread::JoinHandle<()>>);

impl WriterThread {
    /// Wait for the writer to finish (every `Store` clone must be dropped first).
    pub fn join(mut self) {
        if let Some(h) = self.0.take() {
            let _ = h.join();
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Open (or create) `<data_dir>/agentmesh.redb`, checking the schema.
    pub fn open(data_dir: &Path) -> Result<(Store, WriterThread), OpenError> {
        let path = data_dir.join(DB_FILE);
        let db = open_db(&path)?;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |e: std::io::Error| OpenError::Storage {
                path,
                source: redb::Error::Io(e),
            }
        };
        let [a, b] = wal::WAL_FILES;
        let wals = [
            Wal::open(data_dir, a).map_err(io(&data_dir.join(a)))?,
            Wal::open(data_dir, b).map_err(io(&data_dir.join(b)))?,
        ];
        let checkpoint = flush::recover(&db, &wals)?;
        let wal_path = wals[0].path().to_path_buf();
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let stats = Arc::new(WriteStats::default());
        let shared = Arc::new(writer::Shared::default());
        let writer =
            writer::Writer::new(db.clone(), wals, checkpoint, stats.clone(), shared.clone())
                .map_err(io(&wal_path))?;
        let handle = std::thread::Builder::new()
            .name("agentmesh-store".into())
            .spawn(move || writer.run(rx))
            .map_err(io(&path))?;
        Ok((
            Store {
                db,
                jobs: tx,
                stats,
                path: Arc::new(path),
                shared,
            },
            WriterThread(Some(handle)),
        ))
    }

    /// Why the store refuses writes, if it does: the write-ahead log could
    /// not be written or fsynced, and only a restart (which replays the
    /// log) recovers.
    pub fn failure(&self) -> Option<Error> {
        self.shared.broken()
    }

    /// Record a failure found outside the writer (reading what must be
    /// read at start): from now on the store refuses writes, as after a
    /// failed log write, and a node stops (see [`Store::failed`]).
    pub fn fail(&self, doing: &str, e: &dyn std::fmt::Display) -> Error {
        self.shared.fail(&self.path, doing, e)
    }

    /// Resolves with the failure once the store starts refusing writes
    /// (see [`Store::failure`]): a node stops then, so that a supervisor
    /// restarts it and the restart replays the log, rather than running
    /// on and refusing every message.
    pub async fn failed(&self) -> Error {
        self.shared.failed().await
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A read snapshot (see `store::view`). Cheap; do not hold it across
    /// long awaits.
    pub fn read(&self) -> Result<Read, Error> {
        self.shared.snapshot(&self.db)
    }

    /// Write durably: resolves once the transaction holding this write is
    /// fsynced.
    pub async fn write<R, F>(&self, f: F) -> Result<R, Error>
    where
        R: Send + 'static,
        F: FnOnce(&Tx<'_>) -> Result<R, Error> + Send + 'static,
    {
        self.submit(true, f).await
    }

    /// Write without forcing an fsync: the write is appended to the
    /// write-ahead log, and the next fsync of the log (any durable write's)
    /// or the next checkpoint makes it durable. A power loss before then
    /// loses it; a killed process does not, since the log's pages are in
    /// the page cache. For state that can be rebuilt or may be lost.
    pub async fn write_lazy<R, F>(&self, f: F) -> Result<R, Error>
    where
        R: Send + 'static,
        F: FnOnce(&Tx<'_>) -> Result<R, Error> + Send + 'static,
    {
        self.submit(false, f).await
    }

    /// `write_lazy` without waiting for the commit: returns once the write
    /// is queued. Writes are applied in the order they are queued, so a
    /// later write from the same task sees this one. A failure is logged by
    /// the writer; there is nobody to tell.
    pub async fn write_detached<F>(&self, f: F) -> Result<(), Error>
    where
        F: FnOnce(&Tx<'_>) -> Result<(), Error> + Send + 'static,
    {
        let run: JobFn = Box::new(move |txn| {
            let failed = txn.and_then(f).err();
            let done: Done = Box::new(|_| {});
            (done, failed)
        });
        self.jobs
            .send(Job {
                durable: false,
                run,
            })
            .await
            .map_err(|_| Error::Closed)
    }

    /// `write` when `durable`, else `write_lazy`.
    pub async fn submit<R, F>(&self, durable: bool, f: F) -> Result<R, Error>
    where
        R: Send + 'static,
        F: FnOnce(&Tx<'_>) -> Result<R, Error> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<R, Error>>();
        let run: JobFn = Box::new(move |txn| match txn.and_then(f) {
            Ok(value) => {
                let done: Done = Box::new(move |commit: Result<(), Error>| {
                    let _ = tx.send(commit.map(|()| value));
                });
                (done, None)
            }
            Err(e) => {
                let reply = e.clone();
                let done: Done = Box::new(move |_| {
                    let _ = tx.send(Err(reply));
                });
                (done, Some(e))
            }
        });
        self.jobs
            .send(Job { durable, run })
            .await
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Group-commit counters.
    pub fn stats(&self) -> &WriteStats {
        &self.stats
    }
}

fn open_db(path: &Path) -> Result<Database, OpenError> {
    let db = redb::Builder::new()
        .set_cache_size(CACHE_BYTES)
        .create(path)
        .map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => OpenError::InUse(path.to_path_buf()),
            redb::DatabaseError::Storage(redb::StorageError::Corrupted(reason)) => {
                OpenError::Corrupt {
                    path: path.to_path_buf(),
                    reason,
                }
            }
            redb::DatabaseError::Storage(redb::StorageError::Io(io))
                if io.kind() == std::io::ErrorKind::InvalidData =>
            {
                OpenError::Corrupt {
                    path: path.to_path_buf(),
                    reason: io.to_string(),
                }
            }
            other => OpenError::Storage {
                path: path.to_path_buf(),
                source: other.into(),
            },
        })?;
    check_schema(&db, path)?;
    Ok(db)
}

fn check_schema(db: &Database, path: &Path) -> Result<(), OpenError> {
    let storage = |e: redb::Error| OpenError::Storage {
        path: path.to_path_buf(),
        source: e,
    };
    let txn = db.begin_write().map_err(|e| storage(e.into()))?;
    let existing: Vec<String> = txn
        .list_tables()
        .map_err(|e| storage(e.into()))?
        .map(|t| redb::TableHandle::name(&t).to_string())
        .collect();
    {
        let mut meta = txn.open_table(META).map_err(|e| storage(e.into()))?;
        let app = meta
            .get(META_APP)
            .map_err(|e| storage(e.into()))?
            .map(|v| v.value().to_vec());
        let version = meta
            .get(META_SCHEMA)
            .map_err(|e| storage(e.into()))?
            .map(|v| v.value().to_vec());
        match (app, version) {
            (None, None) if existing.is_empty() => {
                meta.insert(META_APP, APP_TAG)
                    .map_err(|e| storage(e.into()))?;
                meta.insert(META_SCHEMA, SCHEMA_VERSION.to_le_bytes().as_slice())
                    .map_err(|e| storage(e.into()))?;
            }
            (Some(app), Some(v)) if app == APP_TAG => {
                let found = <[u8; 4]>::try_from(v.as_slice())
                    .map(u32::from_le_bytes)
                    .map_err(|_| OpenError::Corrupt {
                        path: path.to_path_buf(),
                        reason: "schema version is not a u32".into(),
                    })?;
                if found == 1 {
                    // Same transaction as the version bump: all or nothing.
                    let moved = migrate::v1_to_v2(&txn).map_err(|e| match e {
                        Error::Corrupt { table, reason } => OpenError::Corrupt {
                            path: path.to_path_buf(),
                            reason: format!("upgrading table {table} from schema 1: {reason}"),
                        },
                        other => storage(redb::Error::Io(std::io::Error::other(other.to_string()))),
                    })?;
                    tracing::info!(path = %path.display(), messages = moved, "database upgraded from schema 1 to 2");
                }
                if (1..SCHEMA_VERSION).contains(&found) {
                    // Schema 2 → 3 rewrites no rows: `Progress::decode`
                    // reads schema 2's status rows (the log may replay
                    // some too), and those rows only change as their
                    // messages progress. Schema 3 → 4 rewrites none
                    // either: the outbox index is no longer read, and the
                    // node empties it at start (after the log's replay).
                    // Schema 4 → 5 neither: the node moves the receipts
                    // of `RECEIPTS_OUT` into `RECEIPT_BATCHES` at start.
                    // Schema 5 → 6 neither: status rows with a route
                    // (`delivery::routes`) are new, older ones still read.
                    // The bump keeps older builds, which cannot read
                    // schema 3's status rows, or would find no outbox or
                    // no receipts and never send them, from opening the
                    // file.
                    meta.insert(META_SCHEMA, SCHEMA_VERSION.to_le_bytes().as_slice())
                        .map_err(|e| storage(e.into()))?;
                    tracing::info!(path = %path.display(), from = found, to = SCHEMA_VERSION, "database schema upgraded");
                } else if found != SCHEMA_VERSION {
                    return Err(OpenError::UnknownSchema {
                        path: path.to_path_buf(),
                        found,
                    });
                }
            }
            _ => return Err(OpenError::Foreign(path.to_path_buf())),
        }
    }
    tables::create_all(&txn).map_err(|e| storage(e.into()))?;
    txn.commit().map_err(|e| storage(e.into()))?;
    Ok(())
}

/// Open the database in `dir` (creating or checking its schema) and close
/// it again, waiting for the writer to finish.
#[cfg(test)]
pub(crate) fn open_and_close(dir: &Path) {
    let (s, w) = Store::open(dir).expect("test database opens");
    drop(s);
    w.join();
}

#[cfg(test)]
mod tests;
