//! `agentmesh bench limits`: the physical limits of this machine that the
//! other figures should be read against, measured in one run:
//! 1. the disk under `--dir` (default: the system temp dir, where the
//!    benchmarks' data dirs live): 4 KiB write + fdatasync in place,
//!    4 KiB append + fsync, and 1 MiB write + fdatasync (MB/s);
//! 2. ed25519 on one core, as `identity::sign` / `identity::verify` do it
//!    (1 KiB messages; verification includes decoding the public key);
//! 3. loopback TCP with tokio: one stream of 1 MiB writes (MB/s), and
//!    64-byte ping-pong round trips.
//!
//! MB is 10^6 bytes. Each measurement runs for `--secs` seconds.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args as ClapArgs;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::Error;
use super::support::print_machine;
use crate::identity;

/// Options.
#[derive(ClapArgs, Debug, Clone)]
pub struct Opts {
    /// Directory on the disk to test (a scratch dir is made inside it and
    /// removed afterwards). Default: the system temp dir.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 2.0)]
    pub secs: f64,
    /// Also print the figures as one JSON line (for scripts).
    #[arg(long)]
    pub json: bool,
}

/// What one measurement counted.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Measured {
    ops: u64,
    bytes: u64,
    elapsed: Duration,
}

impl Measured {
    fn per_sec(&self) -> f64 {
        per_sec(self.ops, self.elapsed)
    }
    fn mb_per_sec(&self) -> f64 {
        per_sec(self.bytes, self.elapsed) / 1e6
    }
    /// Mean time of one operation in microseconds.
    fn mean_us(&self) -> f64 {
        if self.ops == 0 {
            return 0.0;
        }
        self.elapsed.as_secs_f64() * 1e6 / self.ops as f64
    }
}

/// `count` per second of `elapsed` (0 for no time).
fn per_sec(count: u64, elapsed: Duration) -> f64 {
    let s = elapsed.as_secs_f64();
    if s > 0.0 { count as f64 / s } else { 0.0 }
}

/// Call `op(i)` for i = 0, 1, 2, … until `dur` has passed (at least once);
/// each call returns the bytes it moved.
fn repeat_for<E>(dur: Duration, mut op: impl FnMut(u64) -> Result<u64, E>) -> Result<Measured, E> {
    let start = Instant::now();
    let (mut ops, mut bytes) = (0u64, 0u64);
    loop {
        bytes += op(ops)?;
        ops += 1;
        let elapsed = start.elapsed();
        if elapsed >= dur {
            return Ok(Measured {
                ops,
                bytes,
                elapsed,
            });
        }
    }
}

/// Offset of the `i`-th block of `block` bytes, wrapping within `span`.
fn wrapping_offset(i: u64, block: u64, span: u64) -> u64 {
    let blocks = (span / block.max(1)).max(1);
    (i % blocks) * block
}

/// The mount holding `path` in `/proc/mounts` text: (device, fs type,
/// mount point) of the longest mount point that is a prefix of `path`.
fn mount_of(path: &Path, mounts: &str) -> Option<(String, String, String)> {
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (dev, mnt, fs) = (f.next()?, f.next()?, f.next()?);
            // /proc/mounts escapes spaces in paths as \040.
            let mnt = mnt.replace("\\040", " ");
            path.starts_with(&mnt)
                .then(|| (dev.to_string(), fs.to_string(), mnt))
        })
        .max_by_key(|(_, _, mnt)| mnt.len())
}

/// A fresh directory inside `parent`, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(parent: &Path) -> Result<Scratch, Error> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let p = parent.join(format!(
            "agentmesh-bench-limits-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&p)
            .map_err(|e| Error::Failed(format!("cannot create {}: {e}", p.display())))?;
        Ok(Scratch(p))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn io_err(what: &str, path: &Path) -> impl Fn(std::io::Error) -> Error {
    let ctx = format!("{what} {}", path.display());
    move |e| Error::Failed(format!("{ctx}: {e}"))
}

/// The three disk measurements.
struct Disk {
    overwrite_4k: Measured,
    append_4k: Measured,
    write_1m: Measured,
}

fn disk(dir: &Path, dur: Duration) -> Result<Disk, Error> {
    const K4: u64 = 4096;
    const M1: u64 = 1 << 20;
    let open = |name: &str| -> Result<(File, PathBuf), Error> {
        let p = dir.join(name);
        let f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&p)
            .map_err(io_err("cannot create", &p))?;
        Ok((f, p))
    };
    // 1. In place: a 1 MiB file written and fsynced first, then 4 KiB
    //    blocks rewritten in turn, each followed by fdatasync.
    let (f, p) = open("overwrite")?;
    let block = vec![0x5au8; K4 as usize];
    f.write_all_at(&vec![0u8; M1 as usize], 0)
        .and_then(|()| f.sync_all())
        .map_err(io_err("cannot prepare", &p))?;
    let overwrite_4k = repeat_for(dur, |i| {
        f.write_all_at(&block, wrapping_offset(i, K4, M1))?;
        f.sync_data()?;
        Ok(K4)
    })
    .map_err(io_err("write + fdatasync on", &p))?;
    // 2. A growing file: 4 KiB appended, then fsync (size changes too).
    let (mut f, p) = open("append")?;
    let append_4k = repeat_for(dur, |_| {
        f.write_all(&block)?;
        f.sync_all()?;
        Ok(K4)
    })
    .map_err(io_err("append + fsync on", &p))?;
    // 3. Bandwidth: 1 MiB writes + fdatasync, wrapping within 256 MiB.
    let (f, p) = open("bulk")?;
    let big = vec![0xa5u8; M1 as usize];
    let write_1m = repeat_for(dur, |i| {
        f.write_all_at(&big, wrapping_offset(i, M1, 256 * M1))?;
        f.sync_data()?;
        Ok(M1)
    })
    .map_err(io_err("1 MiB write + fdatasync on", &p))?;
    Ok(Disk {
        overwrite_4k,
        append_4k,
        write_1m,
    })
}

/// ed25519 signatures and verifications of 1 KiB messages on this thread.
fn ed25519(dur: Duration) -> Result<(Measured, Measured), Error> {
    let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
    let public = key.verifying_key().to_bytes();
    let msg = vec![0x42u8; 1024];
    let sign = repeat_for(dur, |_| {
        std::hint::black_box(identity::sign(&key, std::hint::black_box(&msg)));
        Ok::<_, Error>(0)
    })?;
    let sig = identity::sign(&key, &msg);
    let verify = repeat_for(dur, |_| {
        identity::verify(&public, std::hint::black_box(&msg), &sig)
            .map_err(|e| Error::Failed(format!("ed25519 self-check failed: {e}")))?;
        Ok::<_, Error>(0)
    })?;
    Ok((sign, verify))
}

fn tcp_err(what: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |e| Error::Failed(format!("loopback TCP {what}: {e}"))
}

/// One loopback TCP stream: 1 MiB writes for `dur`; bytes counted by the
/// reader, time until it has read them all.
async fn tcp_bandwidth(dur: Duration) -> Result<Measured, Error> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(tcp_err("bind"))?;
    let addr = listener.local_addr().map_err(tcp_err("local_addr"))?;
    let reader = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            match s.read(&mut buf).await? {
                0 => return Ok::<_, std::io::Error>(total),
                n => total += n as u64,
            }
        }
    });
    let mut w = TcpStream::connect(addr).await.map_err(tcp_err("connect"))?;
    let buf = vec![0xa5u8; 1 << 20];
    let start = Instant::now();
    while start.elapsed() < dur {
        w.write_all(&buf).await.map_err(tcp_err("write"))?;
    }
    w.shutdown().await.map_err(tcp_err("shutdown"))?;
    let bytes = reader
        .await
        .map_err(|e| Error::Failed(format!("loopback TCP reader: {e}")))?
        .map_err(tcp_err("read"))?;
    Ok(Measured {
        ops: bytes.div_ceil(1 << 20),
        bytes,
        elapsed: start.elapsed(),
    })
}

/// 64-byte ping-pong on one loopback TCP connection (TCP_NODELAY).
async fn tcp_round_trips(dur: Duration) -> Result<Measured, Error> {
    const N: usize = 64;
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(tcp_err("bind"))?;
    let addr = listener.local_addr().map_err(tcp_err("local_addr"))?;
    let echo = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        s.set_nodelay(true)?;
        let mut buf = [0u8; N];
        while s.read_exact(&mut buf).await.is_ok() {
            s.write_all(&buf).await?;
        }
        Ok::<_, std::io::Error>(())
    });
    let mut c = TcpStream::connect(addr).await.map_err(tcp_err("connect"))?;
    c.set_nodelay(true).map_err(tcp_err("nodelay"))?;
    let mut buf = [0x11u8; N];
    let start = Instant::now();
    let mut ops = 0u64;
    while start.elapsed() < dur || ops == 0 {
        c.write_all(&buf).await.map_err(tcp_err("write"))?;
        c.read_exact(&mut buf).await.map_err(tcp_err("read"))?;
        ops += 1;
    }
    let elapsed = start.elapsed();
    drop(c);
    let _ = echo.await;
    Ok(Measured {
        ops,
        bytes: ops * N as u64 * 2,
        elapsed,
    })
}

/// Run a blocking measurement off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Failed(format!("measurement thread failed: {e}")))?
}

/// Run the measurements and print them.
pub async fn run(o: Opts) -> Result<(), Error> {
    print_machine();
    if !(o.secs.is_finite() && o.secs > 0.0) {
        return Err(Error::Failed(format!(
            "--secs must be a positive number of seconds, not {}",
            o.secs
        )));
    }
    let dur = Duration::from_secs_f64(o.secs);
    let parent = o.dir.clone().unwrap_or_else(std::env::temp_dir);
    let scratch = Scratch::new(&parent)?;
    let canon = std::fs::canonicalize(&scratch.0).unwrap_or_else(|_| scratch.0.clone());
    let mount = std::fs::read_to_string("/proc/mounts")
        .ok()
        .and_then(|m| mount_of(&canon, &m));
    let fs = mount
        .map(|(dev, fs, mnt)| format!("{fs} on {dev}, mounted at {mnt}"))
        .unwrap_or_else(|| "unknown filesystem".into());
    println!(
        "disk: {} ({fs}); {} s per measurement",
        canon.display(),
        o.secs
    );

    let dir = scratch.0.clone();
    let d = blocking(move || disk(&dir, dur)).await?;
    drop(scratch);
    println!("\n## disk (fsync)");
    for (what, m) in [
        ("4 KiB write in place + fdatasync", &d.overwrite_4k),
        ("4 KiB append + fsync", &d.append_4k),
    ] {
        println!(
            "  {what:<34} {:>9.0} ops/s  (mean {:.0} µs)",
            m.per_sec(),
            m.mean_us()
        );
    }
    println!(
        "  {:<34} {:>9.1} MB/s   ({:.0} ops/s)",
        "1 MiB write + fdatasync",
        d.write_1m.mb_per_sec(),
        d.write_1m.per_sec()
    );

    let (sign, verify) = blocking(move || ed25519(dur)).await?;
    println!("\n## ed25519 on one core (1 KiB messages)");
    println!(
        "  sign    {:>9.0} /s  (mean {:.1} µs)",
        sign.per_sec(),
        sign.mean_us()
    );
    println!(
        "  verify  {:>9.0} /s  (mean {:.1} µs; includes decoding the public key)",
        verify.per_sec(),
        verify.mean_us()
    );

    let bw = tcp_bandwidth(dur).await?;
    let rt = tcp_round_trips(dur).await?;
    println!("\n## loopback TCP (tokio, 127.0.0.1)");
    println!("  one stream, 1 MiB writes  {:>9.1} MB/s", bw.mb_per_sec());
    println!(
        "  64-byte round trips       {:>9.0} /s  (mean {:.1} µs)",
        rt.per_sec(),
        rt.mean_us()
    );

    if o.json {
        let j = serde_json::json!({
            "dir": canon.display().to_string(), "fs": fs, "secs": o.secs,
            "fsync_4k_overwrite_per_s": d.overwrite_4k.per_sec(),
            "fsync_4k_append_per_s": d.append_4k.per_sec(),
            "fsync_1m_mb_per_s": d.write_1m.mb_per_sec(),
            "ed25519_sign_per_s": sign.per_sec(),
            "ed25519_verify_per_s": verify.per_sec(),
            "tcp_mb_per_s": bw.mb_per_sec(),
            "tcp_round_trips_per_s": rt.per_sec(),
        });
        println!("{j}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_means() {
        let m = Measured {
            ops: 500,
            bytes: 3_000_000,
            elapsed: Duration::from_millis(250),
        };
        assert_eq!(m.per_sec(), 2000.0);
        assert_eq!(m.mb_per_sec(), 12.0);
        assert_eq!(m.mean_us(), 500.0);
        assert_eq!(per_sec(10, Duration::ZERO), 0.0);
        let none = Measured {
            ops: 0,
            bytes: 0,
            elapsed: Duration::ZERO,
        };
        assert_eq!((none.per_sec(), none.mean_us()), (0.0, 0.0));
    }

    #[test]
    fn repeat_for_counts_ops_and_bytes_and_stops_on_error() {
        let m = repeat_for(Duration::ZERO, |_| Ok::<_, ()>(7)).unwrap();
        assert_eq!((m.ops, m.bytes), (1, 7), "runs once even for no time");
        let mut seen = Vec::new();
        let e = repeat_for(Duration::from_secs(3600), |i| {
            seen.push(i);
            if i == 3 { Err("boom") } else { Ok(1) }
        });
        assert_eq!(e, Err("boom"));
        assert_eq!(seen, [0, 1, 2, 3]);
    }

    #[test]
    fn offsets_wrap_within_the_span() {
        let offs: Vec<u64> = (0..5).map(|i| wrapping_offset(i, 4096, 3 * 4096)).collect();
        assert_eq!(offs, [0, 4096, 8192, 0, 4096]);
        assert_eq!(wrapping_offset(9, 4096, 100), 0, "span below one block");
        assert_eq!(wrapping_offset(9, 0, 100), 0, "no zero division");
    }

    #[test]
    fn mount_is_the_longest_prefix() {
        let mounts = "proc /proc proc rw 0 0\n\
                      /dev/vda / ext4 rw,relatime 0 0\n\
                      tmpfs /tmp tmpfs rw 0 0\n\
                      /dev/vdb /mnt/my\\040disk xfs rw 0 0\n\
                      garbage\n";
        let m = |p: &str| mount_of(Path::new(p), mounts).map(|(d, f, _)| format!("{d} {f}"));
        assert_eq!(m("/tmp/x/y").as_deref(), Some("tmpfs tmpfs"));
        assert_eq!(m("/work/main").as_deref(), Some("/dev/vda ext4"));
        assert_eq!(
            m("/tmpfoo").as_deref(),
            Some("/dev/vda ext4"),
            "components, not strings"
        );
        assert_eq!(m("/mnt/my disk/a").as_deref(), Some("/dev/vdb xfs"));
        assert_eq!(mount_of(Path::new("/x"), "").map(|_| ()), None);
    }
}
