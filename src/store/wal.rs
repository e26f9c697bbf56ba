//! The write-ahead log beside the database.
//!
//! Each group commit appends one record holding every table write of its
//! batch; a commit is durable once its record is fsynced. The writes
//! themselves go into the memtable (`store::mem`), and a checkpoint (a
//! durable redb commit of a frozen memtable that also stores the last
//! sequence number it holds) makes the records before it redundant.
//!
//! The log is two files used in turn: when the writer freezes the active
//! memtable it moves on to the other file, starting at its front, while
//! the flusher checkpoints what the first one holds. A file is only reused
//! once its records are checkpointed.
//!
//! Why: one sequential write and one `fdatasync` of a file whose blocks
//! already exist, instead of redb's scattered page writes, per commit.
//!
//! # Format
//! A record is a 20-byte header followed by its payload:
//! `magic (4) | payload length (4, LE) | sequence number (8, LE) | crc32 (4, LE)`,
//! the CRC covering the sequence number and the payload. Records follow one
//! another with consecutive sequence numbers. Because a file is reused from
//! the front, older records (with smaller numbers) may follow the newest
//! ones; reading a file stops at the first record that is torn, fails its
//! CRC, or does not continue the sequence. Replay joins the two files'
//! runs by sequence number (`chain`).
//!
//! A file only grows, by zero-filled chunks, so that the fsync of an
//! append rarely has to persist a new file size.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// File name of the log inside the data dir.
pub const WAL_FILE: &str = "agentmesh.wal";
/// The log is two files, used in turn: one takes new records while the
/// other's are being checkpointed.
pub const WAL_FILES: [&str; 2] = [WAL_FILE, "agentmesh.wal.1"];
const MAGIC: [u8; 4] = *b"AMWL";
/// Bytes of a record's header.
pub const HEADER: usize = 20;
/// First zero-filled extension; later ones double up to `MAX_CHUNK`.
const FIRST_CHUNK: u64 = 64 * 1024;
const MAX_CHUNK: u64 = 4 * 1024 * 1024;
/// Largest payload a record may claim (a guard against garbage lengths).
pub const MAX_RECORD: usize = 1 << 30;

/// The open log, written by the store's writer thread only.
pub struct Wal {
    file: File,
    path: PathBuf,
    /// Where the next record goes.
    offset: u64,
    /// Everything before this offset has been written (zeros or records).
    written_end: u64,
    chunk: u64,
}

/// What reading the log found.
#[derive(Debug, Default)]
pub struct Replay {
    /// Records to apply, in order: `(sequence number, payload)`.
    pub records: Vec<(u64, Vec<u8>)>,
    /// Why reading stopped where it did (for the log line).
    pub stopped: &'static str,
}

/// A gap: the first record after the checkpoint is missing.
#[derive(Debug, thiserror::Error)]
#[error(
    "write-ahead log {path} starts at record {found} but the database's last checkpoint is record {checkpoint}: records in between are missing"
)]
pub struct Gap {
    /// The log file.
    pub path: PathBuf,
    /// First sequence number found.
    pub found: u64,
    /// The database's checkpoint.
    pub checkpoint: u64,
}

impl Wal {
    /// Open (or create) the log file `name` in `dir`; writing starts at
    /// the front.
    pub fn open(dir: &Path, name: &str) -> std::io::Result<Wal> {
        let path = dir.join(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let len = file.metadata()?.len();
        Ok(Wal {
            file,
            path,
            offset: 0,
            written_end: len,
            chunk: FIRST_CHUNK,
        })
    }

    /// A second handle to the file, for fsyncing from another thread.
    pub fn file(&self) -> std::io::Result<File> {
        self.file.try_clone()
    }

    /// Path of the log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes written since the last reset.
    pub fn len(&self) -> u64 {
        self.offset
    }

    /// Whether nothing was written since the last reset.
    pub fn is_empty(&self) -> bool {
        self.offset == 0
    }

    /// Read every record that continues the checkpoint `after` (one file;
    /// opening a store reads both with `scan` and `chain`).
    #[cfg(test)]
    pub fn read(&self, after: u64) -> Result<Replay, ReadError> {
        chain(after, vec![self.scan()?])
    }

    /// The records at the front of the file that follow one another.
    pub fn scan(&self) -> std::io::Result<Run> {
        let mut bytes = Vec::new();
        (&self.file).read_to_end(&mut bytes)?;
        let mut run = Run {
            path: self.path.clone(),
            records: Vec::new(),
            stopped: "",
        };
        let mut at = 0usize;
        run.stopped = loop {
            let Some(head) = bytes.get(at..at + HEADER) else {
                break "end of file";
            };
            if head[..4] != MAGIC {
                break "end of records";
            }
            let len = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes")) as usize;
            let lsn = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
            let crc = u32::from_le_bytes(head[16..20].try_into().expect("4 bytes"));
            let Some(payload) = bytes.get(at + HEADER..at + HEADER + len) else {
                break "torn record";
            };
            let mut h = crc32fast::Hasher::new();
            h.update(&head[8..16]);
            h.update(payload);
            if h.finalize() != crc {
                break "record failing its checksum";
            }
            if run.records.last().is_some_and(|&(prev, _)| lsn != prev + 1) {
                break "records older than the newest";
            }
            run.records.push((lsn, payload.to_vec()));
            at += HEADER + len;
        };
        Ok(run)
    }

    /// Append one record (not yet fsynced).
    #[cfg(test)]
    pub fn append(&mut self, lsn: u64, payload: &[u8]) -> std::io::Result<()> {
        let mut framed = vec![0u8; HEADER];
        framed.extend_from_slice(payload);
        self.append_framed(lsn, &mut framed)
    }

    /// Append one record (not yet fsynced) whose payload follows `HEADER`
    /// bytes reserved at the front of `framed`; they are filled in here,
    /// so the record goes to the file in one write, without a copy.
    pub fn append_framed(&mut self, lsn: u64, framed: &mut [u8]) -> std::io::Result<()> {
        let Some(len) = framed.len().checked_sub(HEADER) else {
            return Err(std::io::Error::other(
                "a record without room for its header",
            ));
        };
        if len > MAX_RECORD {
            return Err(std::io::Error::other(format!(
                "a commit of {len} bytes exceeds the write-ahead log's record limit of {MAX_RECORD}"
            )));
        }
        let mut h = crc32fast::Hasher::new();
        h.update(&lsn.to_le_bytes());
        h.update(&framed[HEADER..]);
        let header = &mut framed[..HEADER];
        header[..4].copy_from_slice(&MAGIC);
        header[4..8].copy_from_slice(&(len as u32).to_le_bytes());
        header[8..16].copy_from_slice(&lsn.to_le_bytes());
        header[16..].copy_from_slice(&h.finalize().to_le_bytes());
        let end = self.offset + framed.len() as u64;
        if end > self.written_end {
            self.extend(end)?;
        }
        self.file.write_all_at(framed, self.offset)?;
        self.offset = end;
        Ok(())
    }

    /// Make every appended record durable.
    pub fn sync(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// After a checkpoint: the next record goes to the front of the file.
    pub fn reset(&mut self) {
        self.offset = 0;
    }

    /// After the final checkpoint of a clean close: the log holds nothing
    /// the database lacks, so it gives its space back.
    pub fn truncate(&mut self) -> std::io::Result<()> {
        self.file.set_len(0)?;
        self.offset = 0;
        self.written_end = 0;
        Ok(())
    }

    /// Zero-fill the file up to at least `end`, so later appends overwrite
    /// blocks that exist (their fsync need not persist a new size).
    fn extend(&mut self, end: u64) -> std::io::Result<()> {
        // From a static buffer: a fresh zeroed one of megabytes was page
        // faults and page clearing on every extension.
        static ZEROS: [u8; 256 * 1024] = [0; 256 * 1024];
        let target = end.max(self.written_end + self.chunk);
        while self.written_end < target {
            let n = (target - self.written_end).min(ZEROS.len() as u64);
            self.file
                .write_all_at(&ZEROS[..n as usize], self.written_end)?;
            self.written_end += n;
        }
        self.chunk = (self.chunk * 2).min(MAX_CHUNK);
        Ok(())
    }
}

/// The records one file holds at its front, one after another.
#[derive(Debug)]
pub struct Run {
    /// The file.
    pub path: PathBuf,
    /// `(sequence number, payload)`, consecutive.
    pub records: Vec<(u64, Vec<u8>)>,
    /// Why reading stopped where it did.
    pub stopped: &'static str,
}

/// The records that continue the checkpoint `after`, from the runs of one
/// or more files (a file reused after a checkpoint holds the newest run;
/// the other file may hold the run before it).
pub fn chain(after: u64, mut runs: Vec<Run>) -> Result<Replay, ReadError> {
    let mut out = Replay {
        records: Vec::new(),
        stopped: runs.first().map_or("end of records", |r| r.stopped),
    };
    runs.retain(|r| !r.records.is_empty());
    runs.sort_by_key(|r| r.records[0].0);
    let mut expect = after + 1;
    for run in runs {
        out.stopped = run.stopped;
        for (lsn, payload) in run.records {
            if lsn < expect {
                continue;
            }
            if lsn > expect {
                if out.records.is_empty() {
                    return Err(ReadError::Gap(Gap {
                        path: run.path,
                        found: lsn,
                        checkpoint: after,
                    }));
                }
                // Only a power loss leaves a hole between the files, and
                // nothing after it was acknowledged.
                out.stopped = "a hole between the log files";
                return Ok(out);
            }
            out.records.push((lsn, payload));
            expect += 1;
        }
    }
    Ok(out)
}

/// Reading the log failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The file could not be read.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Records are missing.
    #[error(transparent)]
    Gap(Gap),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reopen(dir: &Path) -> Wal {
        Wal::open(dir, WAL_FILE).unwrap()
    }

    #[test]
    fn records_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = reopen(dir.path());
        for lsn in 1..=5u64 {
            w.append(lsn, &vec![lsn as u8; lsn as usize * 100]).unwrap();
        }
        w.sync().unwrap();
        let r = reopen(dir.path()).read(0).unwrap();
        assert_eq!(r.records.len(), 5);
        assert_eq!(r.records[2], (3, vec![3u8; 300]));
        // Records up to a checkpoint are skipped; the rest continue it.
        let r = reopen(dir.path()).read(3).unwrap();
        let lsns: Vec<u64> = r.records.iter().map(|(l, _)| *l).collect();
        assert_eq!(lsns, vec![4, 5]);
    }

    #[test]
    fn reuse_from_the_front_stops_at_older_records() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = reopen(dir.path());
        for lsn in 1..=10u64 {
            w.append(lsn, &[lsn as u8; 50]).unwrap();
        }
        // Checkpoint at 10, then two new records over the old ones.
        w.reset();
        w.append(11, &[11; 50]).unwrap();
        w.append(12, &[12; 50]).unwrap();
        w.sync().unwrap();
        let r = reopen(dir.path()).read(10).unwrap();
        let lsns: Vec<u64> = r.records.iter().map(|(l, _)| *l).collect();
        assert_eq!(lsns, vec![11, 12]);
        assert_eq!(r.stopped, "records older than the newest");
        // Nothing written since the checkpoint: nothing to apply.
        let mut w = reopen(dir.path());
        w.reset();
        let r = w.read(12).unwrap();
        assert!(r.records.is_empty());
    }

    #[test]
    fn torn_and_corrupt_tails_end_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = reopen(dir.path());
        w.append(1, &[1; 64]).unwrap();
        w.append(2, &[2; 64]).unwrap();
        w.append(3, &[3; 64]).unwrap();
        w.sync().unwrap();
        let f = OpenOptions::new()
            .write(true)
            .open(dir.path().join(WAL_FILE))
            .unwrap();
        // Flip a payload byte of record 3.
        let third = 2 * (HEADER as u64 + 64) + HEADER as u64 + 10;
        f.write_all_at(&[0xff], third).unwrap();
        let r = reopen(dir.path()).read(0).unwrap();
        assert_eq!(r.records.len(), 2);
        assert_eq!(r.stopped, "record failing its checksum");
        // A length running past the end of the file: torn.
        f.write_all_at(&u32::MAX.to_le_bytes(), 4).unwrap();
        let r = reopen(dir.path()).read(0).unwrap();
        assert!(r.records.is_empty());
        assert_eq!(r.stopped, "torn record");
    }

    #[test]
    fn two_files_join_by_sequence_number() {
        let dir = tempfile::tempdir().unwrap();
        let run = |name: &str, lsns: std::ops::RangeInclusive<u64>| {
            let mut w = Wal::open(dir.path(), name).unwrap();
            w.reset();
            for lsn in lsns {
                w.append(lsn, &[lsn as u8; 16]).unwrap();
            }
            w.scan().unwrap()
        };
        let lsns = |r: Replay| r.records.iter().map(|(l, _)| *l).collect::<Vec<_>>();
        let [a, b] = WAL_FILES;
        // The newer run is in the first file, the older in the second.
        let runs = || vec![run(a, 4..=6), run(b, 1..=3)];
        assert_eq!(lsns(chain(0, runs()).unwrap()), vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(lsns(chain(3, runs()).unwrap()), vec![4, 5, 6]);
        assert!(chain(6, runs()).unwrap().records.is_empty());
        // A hole between the files ends the replay before it.
        let r = chain(0, vec![run(a, 5..=6), run(b, 1..=3)]).unwrap();
        assert_eq!(r.stopped, "a hole between the log files");
        assert_eq!(lsns(r), vec![1, 2, 3]);
        // Missing the record right after the checkpoint is an error.
        let err = chain(0, vec![run(a, 5..=6), run(b, 3..=4)]).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn a_missing_record_after_the_checkpoint_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = reopen(dir.path());
        w.append(7, &[7; 8]).unwrap();
        w.sync().unwrap();
        let err = reopen(dir.path()).read(3).unwrap_err();
        assert!(
            err.to_string().contains("records in between are missing"),
            "{err}"
        );
    }

    #[test]
    fn the_file_grows_in_zeroed_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = reopen(dir.path());
        w.append(1, &[1; 10]).unwrap();
        let len = std::fs::metadata(dir.path().join(WAL_FILE)).unwrap().len();
        assert_eq!(len, FIRST_CHUNK);
        w.append(2, &vec![2; FIRST_CHUNK as usize]).unwrap();
        let len = std::fs::metadata(dir.path().join(WAL_FILE)).unwrap().len();
        assert_eq!(len, 3 * FIRST_CHUNK);
        assert_eq!(reopen(dir.path()).read(0).unwrap().records.len(), 2);
    }
}
