//! `nats-bench`: agentmesh's delivery workload through NATS JetStream, for
//! `scripts/bench-vs-nats.sh`.
//!
//! One stream (file storage, one replica), one durable pull consumer with
//! explicit acks. The producer publishes N messages with JetStream acks,
//! keeping `--inflight` publish-ack futures outstanding (like agentmesh's
//! concurrent producers each waiting for a durable answer); the consumer
//! pulls in batches and acks every message. Then a fixed-rate run measures
//! latency from `publish()` to the consumer holding the message.
//!
//! ```text
//! nats-bench --url 127.0.0.1:4222 --label default --messages 100000 \
//!            --size 1024 --inflight 128 --rate 1000 --rate-secs 10 --json
//! ```

use std::time::Duration;

use anyhow::{Context as _, Result, bail};

mod workload;

/// Command-line options.
#[derive(Debug, Clone)]
pub struct Opts {
    /// NATS server address.
    pub url: String,
    /// Name printed with the figures (e.g. the server's sync setting).
    pub label: String,
    /// Messages in the throughput run.
    pub messages: usize,
    /// Payload size in bytes.
    pub size: usize,
    /// Publish-ack futures kept in flight in the throughput run.
    pub inflight: usize,
    /// Messages per pull request.
    pub batch: usize,
    /// The consumer's `max_ack_pending` (0: the server's default, 1000).
    pub max_ack_pending: i64,
    /// Fixed rate (msg/s) of the latency run; 0 skips it.
    pub rate: u64,
    /// Seconds of the latency run.
    pub rate_secs: u64,
    /// Also print the figures as one JSON line.
    pub json: bool,
    /// The server's process id, to count its CPU time too (Linux /proc).
    pub server_pid: Option<u32>,
    /// Client worker threads (0: one per core; 1: a single-threaded runtime).
    pub threads: usize,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            url: "127.0.0.1:4222".into(),
            label: "jetstream".into(),
            messages: 100_000,
            size: 1024,
            inflight: 128,
            batch: 1000,
            max_ack_pending: 0,
            rate: 1000,
            rate_secs: 10,
            json: false,
            server_pid: None,
            threads: 0,
        }
    }
}

const USAGE: &str =
    "usage: nats-bench [--url HOST:PORT] [--label NAME] [--messages N] [--size BYTES]
                  [--inflight N] [--batch N] [--max-ack-pending N] [--rate MSG_PER_S]
                  [--rate-secs S] [--server-pid PID] [--threads N] [--json]";

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Opts> {
    let mut o = Opts::default();
    let mut it = args.into_iter();
    while let Some(flag) = it.next() {
        if flag == "--json" {
            o.json = true;
            continue;
        }
        if flag == "-h" || flag == "--help" {
            bail!("{USAGE}");
        }
        let value = it
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        let num = |v: &str| -> Result<u64> {
            v.parse()
                .with_context(|| format!("{flag} wants a number, got {v:?}"))
        };
        match flag.as_str() {
            "--url" => o.url = value,
            "--label" => o.label = value,
            "--messages" => o.messages = num(&value)? as usize,
            "--size" => o.size = num(&value)? as usize,
            "--inflight" => o.inflight = num(&value)? as usize,
            "--batch" => o.batch = num(&value)? as usize,
            "--max-ack-pending" => o.max_ack_pending = num(&value)? as i64,
            "--rate" => o.rate = num(&value)?,
            "--rate-secs" => o.rate_secs = num(&value)?,
            "--server-pid" => o.server_pid = Some(num(&value)? as u32),
            "--threads" => o.threads = num(&value)? as usize,
            _ => bail!("unknown option {flag}\n{USAGE}"),
        }
    }
    if o.messages == 0 || o.inflight == 0 || o.batch == 0 {
        bail!("--messages, --inflight and --batch must be at least 1");
    }
    if o.size < 8 {
        bail!("--size must be at least 8 bytes (the payload carries a timestamp)");
    }
    Ok(o)
}

/// Percentile of sorted durations, as agentmesh's delivery benchmark
/// computes it: the element at round((n - 1) * p).
pub fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// CPU time (user + system) process `pid` ("self" for this one) has used,
/// from /proc/PID/stat, as agentmesh's delivery benchmark counts it.
fn cpu_time(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    cpu_of_stat(&stat)
}

fn cpu_of_stat(stat: &str) -> Option<Duration> {
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on Linux.
    Some(Duration::from_millis(ticks * 10))
}

/// CPU time of this process plus the server's (if its pid is known).
fn cpu_total(o: &Opts) -> Option<Duration> {
    let mine = cpu_time("self")?;
    match o.server_pid {
        Some(pid) => Some(mine + cpu_time(&pid.to_string())?),
        None => Some(mine),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> Result<()> {
    let o = parse_args(std::env::args().skip(1))?;
    let rt = if o.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if o.threads > 1 {
            b.worker_threads(o.threads);
        }
        b.enable_all().build()
    }
    .context("starting the tokio runtime")?;
    rt.block_on(run(o))
}

async fn run(o: Opts) -> Result<()> {
    let client = workload::connect(&o.url).await?;
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(30))
        .max_ack_inflight(o.inflight.max(1000))
        .build(client.clone());
    println!(
        "## JetStream ({}) at {}: {} messages of {} bytes, {} publish acks in flight, pull batches of {}",
        o.label, o.url, o.messages, o.size, o.inflight, o.batch
    );
    let cpu0 = cpu_total(&o);
    let tp = workload::throughput(&o, &client, &js).await?;
    let cpu = cpu_total(&o)
        .zip(cpu0)
        .map(|(b, a)| b.saturating_sub(a).as_secs_f64() * 1e6 / o.messages as f64);
    let rate = |d: Duration| o.messages as f64 / d.as_secs_f64();
    println!(
        "  published (all publish acks back):   {:>9.0} msg/s  ({:.2} s)",
        rate(tp.published),
        tp.published.as_secs_f64()
    );
    println!(
        "  received + acked by the consumer:    {:>9.0} msg/s  ({:.2} s; ack floor confirmed by the server)",
        rate(tp.acked),
        tp.acked.as_secs_f64()
    );
    println!(
        "  publish latency (until ack): p50 {:.2} ms  p99 {:.2} ms; redeliveries {}",
        ms(pct(&tp.publish_lat, 0.5)),
        ms(pct(&tp.publish_lat, 0.99)),
        tp.redelivered
    );
    if let Some(us) = cpu {
        let whose = if o.server_pid.is_some() {
            "server + this client"
        } else {
            "this client only"
        };
        println!("  CPU ({whose}): {us:.0} µs per message end to end");
    }
    let mut figures = serde_json::json!({
        "cpu_us_per_message": cpu, "cpu_includes_server": o.server_pid.is_some(),
        "label": o.label, "messages": o.messages, "size": o.size, "inflight": o.inflight,
        "batch": o.batch, "max_ack_pending": o.max_ack_pending, "threads": o.threads,
        "published_per_s": rate(tp.published), "processed_per_s": rate(tp.acked),
        "publish_p50_ms": ms(pct(&tp.publish_lat, 0.5)), "publish_p99_ms": ms(pct(&tp.publish_lat, 0.99)),
        "redelivered": tp.redelivered,
    });
    if o.rate > 0 && o.rate_secs > 0 {
        let lat = workload::latency(&o, &client, &js).await?;
        let f = |p| ms(pct(&lat.samples, p));
        println!(
            "  latency at {} msg/s for {} s ({} messages, offered in {:.2} s): publish() → consumer holds it",
            o.rate,
            o.rate_secs,
            lat.samples.len(),
            lat.offered.as_secs_f64()
        );
        println!(
            "  p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
            f(0.5),
            f(0.9),
            f(0.99),
            f(1.0)
        );
        figures[format!("latency_{}", o.rate)] = serde_json::json!({
            "rate": o.rate, "p50_ms": f(0.5), "p90_ms": f(0.9), "p99_ms": f(0.99), "max_ms": f(1.0),
        });
    }
    client
        .flush()
        .await
        .context("flushing the NATS connection")?;
    if o.json {
        println!("{figures}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parses_flags_and_rejects_nonsense() {
        let o = parse_args(args(
            "--messages 10 --size 1024 --inflight 4 --json --label x",
        ))
        .unwrap();
        assert_eq!(
            (o.messages, o.size, o.inflight, o.json),
            (10, 1024, 4, true)
        );
        assert_eq!(o.label, "x");
        assert!(parse_args(args("--messages")).is_err());
        assert!(parse_args(args("--messages ten")).is_err());
        assert!(parse_args(args("--bogus 1")).is_err());
        assert!(parse_args(args("--size 4")).is_err());
    }

    #[test]
    fn cpu_from_proc_stat() {
        let stat = "42 (nats server) S 1 42 42 0 -1 4194560 100 0 0 0 250 31 0 0 20 0 9 0";
        assert_eq!(cpu_of_stat(stat), Some(Duration::from_millis(2810)));
        assert_eq!(cpu_of_stat("garbage"), None);
    }

    #[test]
    fn percentiles_match_agentmesh() {
        let d: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(pct(&d, 0.5), Duration::from_millis(51));
        assert_eq!(pct(&d, 0.99), Duration::from_millis(99));
        assert_eq!(pct(&d, 1.0), Duration::from_millis(100));
        assert_eq!(pct(&[], 0.5), Duration::ZERO);
    }
}
