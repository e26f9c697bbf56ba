//! `agentmesh bench footprint`: what one node costs in memory and disk.
//!
//! Each node is the real `agentmesh node` binary in a process of its own
//! (this executable, unless `--binary` names another), with a fresh data
//! dir, so `/proc/<pid>/status` shows that node alone:
//! 1. node B starts and registers agent `bob`; node A starts bootstrapped
//!    to B and registers `alice`; once A knows `bob`, both sit idle for
//!    `--settle-secs` and their RSS is read (idle node RSS);
//! 2. B is killed (SIGKILL, so its ad stays active at A), and `--messages`
//!    messages of `--size` bytes from alice to bob are queued through A's
//!    HTTP API (`POST /v1/messages`, `--concurrency` requests in flight).
//!    A's RSS is read when the last one is accepted and again after
//!    `--settle-secs`; the growth of A's data dir divided by the messages
//!    is the disk cost of a queued message;
//! 3. A is stopped (SIGTERM) and started again on the same data dir, with
//!    the messages still queued, and its RSS read once more after
//!    `--settle-secs`.
//!
//! RSS is `VmRSS` (resident now) and `VmHWM` (the peak) of
//! `/proc/<pid>/status`; disk is the sum of the file sizes in the data dir
//! and the space allocated to them (`st_blocks`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use clap::Args as ClapArgs;
use futures::StreamExt;
use serde_json::{Value, json};

use super::Error;
use super::support::{ScratchDir, poll_until, print_machine};
use crate::client::Client;
use crate::node::API_ADDR_FILE;

/// How long a node may take to serve its API.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long A may take to learn of bob.
const VISIBLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stopped node may take to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// `agentmesh bench footprint` options.
#[derive(ClapArgs, Debug, Clone)]
pub struct Opts {
    /// Messages queued for the absent recipient.
    #[arg(long, default_value_t = 100_000)]
    pub messages: usize,
    /// Body size in bytes (a JSON string of exactly this many bytes).
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// HTTP requests in flight while queueing.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Seconds a node sits idle before its RSS is read.
    #[arg(long, default_value_t = 5)]
    pub settle_secs: u64,
    /// The `agentmesh` binary to run (default: this executable).
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// Also print the figures as one JSON line (for scripts).
    #[arg(long)]
    pub json: bool,
}

/// Memory of a process, from `/proc/<pid>/status`, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mem {
    rss_kib: u64,
    hwm_kib: u64,
}

impl Mem {
    fn of(pid: u32) -> Result<Mem, Error> {
        let path = format!("/proc/{pid}/status");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::Failed(format!("cannot read {path}: {e}")))?;
        Mem::parse(&text).ok_or_else(|| Error::Failed(format!("no VmRSS/VmHWM in {path}")))
    }

    fn parse(status: &str) -> Option<Mem> {
        let field = |name: &str| {
            status.lines().find_map(|l| {
                let rest = l.strip_prefix(name)?.strip_prefix(':')?;
                rest.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()
            })
        };
        Some(Mem {
            rss_kib: field("VmRSS")?,
            hwm_kib: field("VmHWM")?,
        })
    }

    fn json(&self) -> Value {
        json!({"rss_kib": self.rss_kib, "hwm_kib": self.hwm_kib})
    }
}

impl std::fmt::Display for Mem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RSS {:.1} MiB (peak {:.1} MiB)",
            self.rss_kib as f64 / 1024.0,
            self.hwm_kib as f64 / 1024.0
        )
    }
}

/// Bytes in a directory tree: file sizes, and space allocated on disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Disk {
    bytes: u64,
    allocated: u64,
}

impl Disk {
    fn of(dir: &Path) -> Result<Disk, Error> {
        use std::os::unix::fs::MetadataExt;
        let mut total = Disk::default();
        let entries = std::fs::read_dir(dir)
            .map_err(|e| Error::Failed(format!("cannot list {}: {e}", dir.display())))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::Failed(format!("{}: {e}", dir.display())))?;
            let meta = entry
                .metadata()
                .map_err(|e| Error::Failed(format!("{}: {e}", entry.path().display())))?;
            if meta.is_dir() {
                let d = Disk::of(&entry.path())?;
                total.bytes += d.bytes;
                total.allocated += d.allocated;
            } else {
                total.bytes += meta.len();
                total.allocated += meta.blocks() * 512;
            }
        }
        Ok(total)
    }

    fn json(&self) -> Value {
        json!({"bytes": self.bytes, "allocated": self.allocated})
    }
}

impl std::fmt::Display for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.2} MB in files ({:.2} MB allocated)",
            self.bytes as f64 / 1e6,
            self.allocated as f64 / 1e6
        )
    }
}

/// An `agentmesh node` child process.
struct Proc {
    name: &'static str,
    child: tokio::process::Child,
    pid: u32,
    dir: PathBuf,
    log: PathBuf,
    client: Client,
}

impl Proc {
    /// Start a node on `dir` (bootstrapped to `bootstrap` if given) and
    /// wait until its API answers.
    async fn start(
        name: &'static str,
        exe: &Path,
        dir: &Path,
        bootstrap: Option<&str>,
    ) -> Result<Proc, Error> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Failed(format!("cannot create {}: {e}", dir.display())))?;
        // A stale address file from an earlier run would point at a dead API.
        let _ = std::fs::remove_file(dir.join(API_ADDR_FILE));
        let log = dir.with_extension("log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| Error::Failed(format!("cannot open {}: {e}", log.display())))?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg("node")
            .arg("--data-dir")
            .arg(dir)
            .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
            .args(["--api", "127.0.0.1:0", "--no-mdns"]);
        if let Some(b) = bootstrap {
            cmd.args(["--bootstrap", b]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::Failed(format!("cannot run {}: {e}", exe.display())))?;
        let pid = child
            .id()
            .ok_or_else(|| Error::Failed(format!("node {name} exited at once")))?;
        let addr_file = dir.join(API_ADDR_FILE);
        let exited = |child: &mut tokio::process::Child| -> Result<(), Error> {
            match child.try_wait() {
                Ok(Some(status)) => Err(Error::Failed(format!(
                    "node {name} exited with {status} while starting (log: {})",
                    log.display()
                ))),
                _ => Ok(()),
            }
        };
        let deadline = Instant::now() + START_TIMEOUT;
        let client = loop {
            exited(&mut child)?;
            if let Ok(c) = Client::for_data_dir(dir, None, None)
                && addr_file.exists()
                && c.call(reqwest::Method::GET, "/healthz", None::<&()>)
                    .await
                    .is_ok()
            {
                break c;
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout(format!(
                    "node {name} did not serve its API within {START_TIMEOUT:?} (log: {})",
                    log.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Ok(Proc {
            name,
            child,
            pid,
            dir: dir.to_path_buf(),
            log,
            client,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, Error> {
        self.client
            .call(method, path, body)
            .await
            .map(Option::unwrap_or_default)
            .map_err(|e| {
                Error::Failed(format!(
                    "node {}: {path}: {e} (log: {})",
                    self.name,
                    self.log.display()
                ))
            })
    }

    async fn register(&self, handle: &str) -> Result<String, Error> {
        let v = self
            .call(
                reqwest::Method::POST,
                "/v1/agents",
                Some(&json!({"handle": handle})),
            )
            .await?;
        v["agent_id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| Error::Failed(format!("registering {handle}: no agent_id in {v}")))
    }

    /// `<first listen address>/p2p/<node id>`.
    async fn dial_addr(&self) -> Result<String, Error> {
        let v = self.call(reqwest::Method::GET, "/v1/node", None).await?;
        match (v["listen_addrs"][0].as_str(), v["node_id"].as_str()) {
            (Some(a), Some(id)) => Ok(format!("{a}/p2p/{id}")),
            _ => Err(Error::Failed(format!(
                "node {}: no listen address in {v}",
                self.name
            ))),
        }
    }

    fn mem(&self) -> Result<Mem, Error> {
        Mem::of(self.pid)
    }

    /// SIGKILL, and wait for the exit.
    async fn kill(mut self) -> Result<(), Error> {
        self.child
            .kill()
            .await
            .map_err(|e| Error::Failed(format!("cannot kill node {}: {e}", self.name)))
    }

    /// SIGTERM (graceful shutdown), and wait for the exit.
    async fn stop(mut self) -> Result<(), Error> {
        let status = tokio::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .await
            .map_err(|e| Error::Failed(format!("cannot run kill: {e}")))?;
        if !status.success() {
            return Err(Error::Failed(format!(
                "kill -TERM {} (node {}) failed: {status}",
                self.pid, self.name
            )));
        }
        match tokio::time::timeout(EXIT_TIMEOUT, self.child.wait()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(Error::Failed(format!(
                "waiting for node {}: {e}",
                self.name
            ))),
            Err(_) => Err(Error::Timeout(format!(
                "node {} did not exit within {EXIT_TIMEOUT:?} of SIGTERM (log: {})",
                self.name,
                self.log.display()
            ))),
        }
    }
}

/// Run the benchmark and print its figures.
pub async fn run(o: Opts) -> Result<(), Error> {
    if o.messages == 0 {
        return Err(Error::Failed("--messages must be at least 1".into()));
    }
    if o.size < 2 {
        return Err(Error::Failed(
            "--size must be at least 2 (a JSON string)".into(),
        ));
    }
    let exe = match &o.binary {
        Some(b) => b.clone(),
        None => std::env::current_exe()
            .map_err(|e| Error::Failed(format!("cannot find this executable: {e}")))?,
    };
    println!("agentmesh bench footprint");
    print_machine();
    let scratch = ScratchDir::new("footprint")?;
    println!(
        "nodes: {} in processes of their own; data under {}",
        exe.display(),
        scratch.path().display()
    );
    let settle = Duration::from_secs(o.settle_secs);
    let mut figures = serde_json::Map::new();

    let b = Proc::start("B", &exe, &scratch.path().join("b"), None).await?;
    let bob = b.register("bob").await?;
    let a = Proc::start(
        "A",
        &exe,
        &scratch.path().join("a"),
        Some(&b.dial_addr().await?),
    )
    .await?;
    let alice = a.register("alice").await?;
    poll_until(
        "node A to know agent bob",
        Duration::from_millis(20),
        VISIBLE_TIMEOUT,
        || async {
            a.client
                .call(reqwest::Method::GET, "/v1/agents?handle=bob", None::<&()>)
                .await
                .ok()
                .flatten()
                .filter(|v| v.as_array().is_some_and(|l| !l.is_empty()))
                .map(|_| ())
        },
        || "GET /v1/agents?handle=bob on A is empty".into(),
    )
    .await?;

    // 1. Idle.
    tokio::time::sleep(settle).await;
    let (idle_a, idle_b) = (a.mem()?, b.mem()?);
    let disk_idle = Disk::of(&a.dir)?;
    println!();
    println!(
        "## idle: two nodes connected, one agent each, {} s after the sender knew the recipient",
        o.settle_secs
    );
    println!("  node A: {idle_a}; data dir {disk_idle}");
    println!("  node B: {idle_b}");
    figures.insert(
        "idle".into(),
        json!({"a": idle_a.json(), "b": idle_b.json(), "a_disk": disk_idle.json()}),
    );

    // 2. Queue for an absent recipient.
    b.kill().await?;
    let body = Value::String("x".repeat(o.size - 2));
    let request = json!({"from": alice, "to": bob, "body": body});
    let t0 = Instant::now();
    let mut last_id = None;
    let mut sends = futures::stream::iter(0..o.messages)
        .map(|_| {
            a.client
                .call(reqwest::Method::POST, "/v1/messages", Some(&request))
        })
        .buffer_unordered(o.concurrency.max(1));
    let mut accepted = 0usize;
    while let Some(r) = sends.next().await {
        let v = r
            .map_err(|e| {
                Error::Failed(format!(
                    "POST /v1/messages failed after {accepted} accepted: {e} (log: {})",
                    a.log.display()
                ))
            })?
            .unwrap_or_default();
        last_id = v["message_id"].as_str().map(str::to_string).or(last_id);
        accepted += 1;
    }
    drop(sends);
    let queued_in = t0.elapsed();
    let after_queue = a.mem()?;
    tokio::time::sleep(settle).await;
    let queued_settled = a.mem()?;
    let disk_queued = Disk::of(&a.dir)?;
    let per_msg = |after: u64, before: u64| after.saturating_sub(before) as f64 / o.messages as f64;
    println!();
    println!(
        "## {} messages of {} bytes queued for an agent whose node is down (POST /v1/messages, {} in flight)",
        o.messages, o.size, o.concurrency
    );
    println!(
        "  queued in {:.2} s ({:.0} msg/s over HTTP)",
        queued_in.as_secs_f64(),
        o.messages as f64 / queued_in.as_secs_f64()
    );
    println!("  node A when the last was accepted: {after_queue}");
    println!("  node A {} s later: {queued_settled}", o.settle_secs);
    println!(
        "  node A data dir: {disk_queued}; growth {:.0} bytes per queued message ({:.0} allocated)",
        per_msg(disk_queued.bytes, disk_idle.bytes),
        per_msg(disk_queued.allocated, disk_idle.allocated)
    );

    // 3. Restart with the messages still queued.
    a.stop().await?;
    let disk_stopped = Disk::of(&scratch.path().join("a"))?;
    let t1 = Instant::now();
    let a = Proc::start("A", &exe, &scratch.path().join("a"), None).await?;
    let up_in = t1.elapsed();
    tokio::time::sleep(settle).await;
    let restarted = a.mem()?;
    let status = match &last_id {
        Some(id) => a
            .call(reqwest::Method::GET, &format!("/v1/messages/{id}"), None)
            .await?["status"]
            .as_str()
            .unwrap_or("?")
            .to_string(),
        None => "?".into(),
    };
    println!(
        "  after a graceful stop: data dir {disk_stopped}; {:.0} bytes per queued message",
        per_msg(disk_stopped.bytes, disk_idle.bytes)
    );
    println!(
        "  node A restarted on that data dir (API up in {:.0} ms), {} s later: {restarted}; last message's status: {status}",
        up_in.as_secs_f64() * 1000.0,
        o.settle_secs
    );
    figures.insert(
        "queued".into(),
        json!({
            "messages": o.messages, "size": o.size,
            "queued_per_s": o.messages as f64 / queued_in.as_secs_f64(),
            "after_queue": after_queue.json(), "settled": queued_settled.json(),
            "restarted": restarted.json(), "restart_api_ms": up_in.as_secs_f64() * 1e3,
            "disk": disk_queued.json(), "disk_stopped": disk_stopped.json(),
            "disk_bytes_per_message": per_msg(disk_stopped.bytes, disk_idle.bytes),
            "last_status": status,
        }),
    );
    a.kill().await?;
    if o.json {
        println!("{}", Value::Object(figures));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_status() {
        let s = "Name:\tagentmesh\nVmPeak:\t  900 kB\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(
            Mem::parse(s),
            Some(Mem {
                rss_kib: 10240,
                hwm_kib: 20480
            })
        );
        assert_eq!(Mem::parse("Name:\tx\n"), None);
        assert_eq!(Mem::parse("VmRSS:\tlots kB\nVmHWM:\t1 kB\n"), None);
    }

    #[test]
    fn own_memory_is_readable() {
        let m = Mem::of(std::process::id()).unwrap();
        assert!(m.rss_kib > 0 && m.hwm_kib >= m.rss_kib);
    }

    #[test]
    fn disk_sums_a_tree() {
        let d = ScratchDir::new("footprint-test").unwrap();
        std::fs::create_dir_all(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("x"), [0u8; 100]).unwrap();
        std::fs::write(d.path().join("sub/y"), [0u8; 23]).unwrap();
        assert_eq!(Disk::of(d.path()).unwrap().bytes, 123);
    }
}
