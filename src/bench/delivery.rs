//! `agentmesh bench delivery`: durable node→node delivery on loopback.
//!
//! Two real nodes in this process (TCP on 127.0.0.1, every commit fsynced),
//! an agent on each, driven through the library API (no HTTP):
//! 1. throughput: N messages of S bytes as fast as the producer can queue
//!    them; the time until the receiver has committed all of them, and
//!    until a consumer has received and acknowledged all of them;
//! 2. latency at fixed rates: time from `send()` to the consumer holding
//!    the message (long-poll), p50/p90/p99;
//! 3. replay: Q messages queued while the receiver is down, the sender
//!    restarted, then the time from restart to the first message stored
//!    in the receiver's inbox and to the last (outbox drained).
//!
//! `--messages 0` skips part 1, `--rate-secs 0` part 2, `--replay 0` part 3.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args as ClapArgs;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::Error;
use super::support::{ScratchDir, print_machine};
use crate::delivery::SendRequest;
use crate::discovery::Registration;
use crate::identity::AgentId;
use crate::routing::Address;
use crate::{Node, NodeConfig, NodeHandle};

/// Options.
#[derive(ClapArgs, Debug, Clone)]
pub struct Opts {
    /// Messages in the throughput run (0 skips it).
    #[arg(long, default_value_t = 50_000)]
    pub messages: usize,
    /// Body size in bytes.
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Concurrent producers in the throughput run.
    #[arg(long, default_value_t = 128)]
    pub concurrency: usize,
    /// Fixed rates (msg/s) for the latency runs, comma-separated.
    #[arg(long, default_value = "1000,5000", value_delimiter = ',')]
    pub rates: Vec<u64>,
    /// Seconds per latency run (0 skips the latency runs).
    #[arg(long, default_value_t = 10)]
    pub rate_secs: u64,
    /// Messages queued for the replay run (0 skips it).
    #[arg(long, default_value_t = 100_000)]
    pub replay: usize,
    /// Also print the figures as one JSON line (for scripts).
    #[arg(long)]
    pub json: bool,
}

struct Pair {
    a: Option<Node>,
    b: Option<Node>,
    cfg_a: NodeConfig,
    cfg_b: NodeConfig,
    alice: AgentId,
    bob: AgentId,
}

fn config(dir: &Path) -> NodeConfig {
    let mut c = NodeConfig::local_test(dir);
    c.api.enabled = false;
    c
}

impl Pair {
    async fn start(root: &Path) -> Result<Pair, Error> {
        let cfg_a = config(&root.join("a"));
        let a = Node::start(cfg_a.clone()).await?;
        let mut cfg_b = config(&root.join("b"));
        cfg_b.network.bootstrap = a.handle().dial_addr().into_iter().collect();
        // Fixed port so the restarted receiver is found at the same address.
        let b = Node::start(cfg_b.clone()).await?;
        cfg_b.network.listen = b.handle().listen_addrs().to_vec();
        let alice = register(&a.handle(), "alice").await?;
        let bob = register(&b.handle(), "bob").await?;
        let mut p = Pair {
            a: Some(a),
            b: Some(b),
            cfg_a,
            cfg_b,
            alice,
            bob,
        };
        p.wait_visible().await?;
        Ok(p)
    }

    fn a(&self) -> Result<NodeHandle, Error> {
        self.a
            .as_ref()
            .map(Node::handle)
            .ok_or_else(|| Error::Failed("node a is down".into()))
    }

    fn b(&self) -> Result<NodeHandle, Error> {
        self.b
            .as_ref()
            .map(Node::handle)
            .ok_or_else(|| Error::Failed("node b is down".into()))
    }

    async fn wait_visible(&mut self) -> Result<(), Error> {
        let a = self.a()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while a
            .discovery()
            .with_registry(|r| r.get(&self.bob).is_none_or(|e| !e.is_active()))
        {
            if Instant::now() > deadline {
                return Err(Error::Timeout(
                    "the sender never saw the recipient's ad".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    fn request(&self, body: &str) -> SendRequest {
        SendRequest::new(self.alice.clone(), Address::Agent(self.bob.clone()), body)
    }
}

async fn register(h: &NodeHandle, handle: &str) -> Result<AgentId, Error> {
    h.discovery()
        .register(Registration {
            handle: handle.into(),
            ..Registration::default()
        })
        .await
        .map(|r| r.agent_id)
        .map_err(|e| Error::Failed(format!("register {handle}: {e}")))
}

fn body_of(size: usize) -> String {
    // A JSON string of exactly `size` bytes including its quotes.
    format!("\"{}\"", "x".repeat(size.saturating_sub(2)))
}

/// Percentile of sorted durations.
fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// Consumer: long-polls Bob's inbox, records arrival times (for the
/// latency runs; the throughput run counts acks, as the JetStream consumer
/// of `scripts/nats-bench` keeps no map either), acks in batches.
fn spawn_consumer(
    b: NodeHandle,
    bob: AgentId,
    arrivals: Option<Arc<Mutex<HashMap<String, Instant>>>>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let got = tokio::select! {
                r = b.delivery().poll(&bob, Duration::from_millis(500), 1000) => r,
                _ = stop.cancelled() => return,
            };
            let msgs = match got {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("consumer: poll failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if msgs.is_empty() {
                continue;
            }
            if let Some(arrivals) = &arrivals {
                let now = Instant::now();
                let mut a = arrivals.lock().unwrap_or_else(|p| p.into_inner());
                for m in &msgs {
                    a.entry(m.envelope.id.clone()).or_insert(now);
                }
            }
            let acks = msgs.into_iter().map(|m| (m.envelope.id, None)).collect();
            if let Err(e) = b.delivery().ack_many(&bob, acks).await {
                eprintln!("consumer: ack failed: {e}");
            }
        }
    })
}

/// Run the benchmark and print its figures.
pub async fn run(o: Opts) -> Result<(), Error> {
    print_machine();
    let dir = ScratchDir::new("delivery")?;
    println!(
        "data in {} (every commit fsynced, on both nodes)",
        dir.path().display()
    );
    let mut figures = serde_json::Map::new();
    let mut pair = Pair::start(dir.path()).await?;
    let watchdog = {
        let (a, b, bob) = (pair.a()?, pair.b()?, pair.bob.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let backlog = a.delivery().backlog().await;
                eprintln!(
                    "[watchdog] queued {} delivered {} stored {} acked {} backlog {:?} pending {}",
                    load(&a.delivery().stats().queued),
                    load(&a.delivery().stats().delivered),
                    load(&b.delivery().stats().inbox_stored),
                    load(&b.delivery().stats().acked),
                    backlog,
                    b.delivery().pending_count(&bob),
                );
            }
        })
    };
    if o.messages > 0 {
        figures.insert("throughput".into(), throughput(&o, &pair).await?);
    }
    if o.rate_secs > 0 {
        for &rate in o.rates.iter().filter(|r| **r > 0) {
            figures.insert(format!("latency_{rate}"), latency(&o, &pair, rate).await?);
        }
    }
    // The watchdog holds handles of both nodes; a node whose handles live
    // on keeps its database open, and the replay run restarts both nodes.
    watchdog.abort();
    let _ = watchdog.await;
    if o.replay > 0 {
        figures.insert("replay".into(), replay(&o, &mut pair).await?);
    }
    if let Some(a) = pair.a.take() {
        a.shutdown().await;
    }
    if let Some(b) = pair.b.take() {
        b.shutdown().await;
    }
    if o.json {
        println!("{}", serde_json::Value::Object(figures));
    }
    Ok(())
}

async fn throughput(o: &Opts, pair: &Pair) -> Result<serde_json::Value, Error> {
    let (a, b) = (pair.a()?, pair.b()?);
    let body = body_of(o.size);
    let stop = CancellationToken::new();
    let consumer = spawn_consumer(b.clone(), pair.bob.clone(), None, stop.clone());
    let stored0 = load(&b.delivery().stats().inbox_stored);
    let acked0 = load(&b.delivery().stats().acked);
    let fsyncs = |h: &NodeHandle| {
        let s = h.store().stats();
        load(&s.wal_syncs) + load(&s.checkpoints)
    };
    let fsyncs0 = fsyncs(&a) + fsyncs(&b);
    let busy = |h: &NodeHandle| {
        let s = h.store().stats();
        (
            load(&s.apply_ns),
            load(&s.commit_ns),
            load(&s.commits),
            (load(&s.wal_syncs), load(&s.checkpoints)),
            (load(&s.wal_sync_ns), load(&s.checkpoint_ns)),
        )
    };
    let (busy_a0, busy_b0) = (busy(&a), busy(&b));
    let start = Instant::now();
    let cpu0 = cpu_time();
    let mut producers = JoinSet::new();
    let per = o.messages.div_ceil(o.concurrency.max(1));
    let mut send_lat: Vec<Duration> = Vec::with_capacity(o.messages);
    for p in 0..o.concurrency.max(1) {
        let n = per.min(o.messages.saturating_sub(p * per));
        let (a, req) = (a.clone(), pair.request(&body));
        producers.spawn(async move {
            let mut lat = Vec::with_capacity(n);
            for _ in 0..n {
                let t = Instant::now();
                a.delivery()
                    .send(req.clone())
                    .await
                    .map_err(|e| e.to_string())?;
                lat.push(t.elapsed());
            }
            Ok::<_, String>(lat)
        });
    }
    while let Some(r) = producers.join_next().await {
        let lat = r
            .map_err(|e| Error::Failed(e.to_string()))?
            .map_err(Error::Failed)?;
        send_lat.extend(lat);
    }
    let queued = start.elapsed();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut stored_at = None;
    loop {
        let stored = load(&b.delivery().stats().inbox_stored) - stored0;
        if stored_at.is_none() && stored >= o.messages as u64 {
            stored_at = Some(start.elapsed());
        }
        if load(&b.delivery().stats().acked) - acked0 >= o.messages as u64 {
            break;
        }
        if Instant::now() > deadline {
            let backlog = a.delivery().backlog().await.unwrap_or_default();
            return Err(Error::Timeout(format!(
                "only {stored} of {} messages stored, {} acked; sender backlog {backlog:?}; {} waiting in the inbox",
                o.messages,
                load(&b.delivery().stats().acked) - acked0,
                b.delivery().pending_count(&pair.bob)
            )));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let processed = start.elapsed();
    let cpu = cpu_time().zip(cpu0).map(|(b, a)| b.saturating_sub(a));
    stop.cancel();
    let _ = consumer.await;
    let commits = fsyncs(&a) + fsyncs(&b) - fsyncs0;
    send_lat.sort();
    let stored_at = stored_at.unwrap_or(processed);
    let (busy_a, busy_b) = (busy(&a), busy(&b));
    for (name, (ap, cm, c, (ws, cp), (wn, cn)), (ap0, cm0, c0, (ws0, cp0), (wn0, cn0))) in
        [("sender", busy_a, busy_a0), ("receiver", busy_b, busy_b0)]
    {
        println!(
            "  {name} store thread: {:.2} s building transactions, {:.2} s committing; {} commits, {} log fsyncs ({:.2} s), {} checkpoints ({:.2} s)",
            (ap - ap0) as f64 / 1e9,
            (cm - cm0) as f64 / 1e9,
            c - c0,
            ws - ws0,
            (wn - wn0) as f64 / 1e9,
            cp - cp0,
            (cn - cn0) as f64 / 1e9
        );
    }
    let rate = |d: Duration| o.messages as f64 / d.as_secs_f64();
    println!(
        "\n## throughput: {} messages of {} bytes, {} producers",
        o.messages, o.size, o.concurrency
    );
    println!(
        "  queued (durable in sender's outbox): {:>9.0} msg/s  ({:.2} s)",
        rate(queued),
        queued.as_secs_f64()
    );
    println!(
        "  stored (durable in receiver's inbox): {:>8.0} msg/s  ({:.2} s)",
        rate(stored_at),
        stored_at.as_secs_f64()
    );
    println!(
        "  received + acked by the consumer:    {:>9.0} msg/s  ({:.2} s)",
        rate(processed),
        processed.as_secs_f64()
    );
    println!(
        "  send() latency (until durable 202): p50 {}  p99 {}",
        ms(pct(&send_lat, 0.5)),
        ms(pct(&send_lat, 0.99))
    );
    println!(
        "  fsyncs on both nodes (log + checkpoints): {commits} ({:.0} messages per fsync)",
        o.messages as f64 / commits.max(1) as f64
    );
    if let Some(cpu) = cpu {
        println!(
            "  CPU (both nodes, producer, consumer): {:.2} s = {:.0} µs per message end to end",
            cpu.as_secs_f64(),
            cpu.as_secs_f64() * 1e6 / o.messages as f64
        );
    }
    Ok(serde_json::json!({
        "messages": o.messages, "size": o.size,
        "queued_per_s": rate(queued), "stored_per_s": rate(stored_at), "processed_per_s": rate(processed),
        "send_p50_ms": pct(&send_lat, 0.5).as_secs_f64() * 1e3, "send_p99_ms": pct(&send_lat, 0.99).as_secs_f64() * 1e3,
        "commits": commits,
        "cpu_us_per_message": cpu.map(|c| c.as_secs_f64() * 1e6 / o.messages as f64),
    }))
}

async fn latency(o: &Opts, pair: &Pair, rate: u64) -> Result<serde_json::Value, Error> {
    let (a, b) = (pair.a()?, pair.b()?);
    let body = body_of(o.size);
    let arrivals = Arc::new(Mutex::new(HashMap::new()));
    let stop = CancellationToken::new();
    let consumer = spawn_consumer(
        b.clone(),
        pair.bob.clone(),
        Some(arrivals.clone()),
        stop.clone(),
    );
    let total = (rate * o.rate_secs) as usize;
    let sent_at: Arc<Mutex<HashMap<String, Instant>>> =
        Arc::new(Mutex::new(HashMap::with_capacity(total)));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = JoinSet::new();
    // What can stall a message at a low rate: a failed batch (retried
    // after a backoff) or a slow fsync.
    let failed_before = load(&a.delivery().stats().batches_failed);
    for n in [&a, &b] {
        n.store()
            .stats()
            .wal_sync_max_ns
            .store(0, Ordering::Relaxed);
    }
    let start = Instant::now();
    for _ in 0..total {
        tick.tick().await;
        let (a, req, sent_at) = (a.clone(), pair.request(&body), sent_at.clone());
        tasks.spawn(async move {
            let t = Instant::now();
            let r = a.delivery().send(req).await;
            if let Ok(s) = r
                && let Some((id, _)) = s.messages.first()
            {
                sent_at
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id.clone(), t);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let offered = start.elapsed();
    let deadline = Instant::now() + Duration::from_secs(30);
    while arrivals.lock().unwrap_or_else(|p| p.into_inner()).len() < total {
        if Instant::now() > deadline {
            let backlog = a.delivery().backlog().await.unwrap_or_default();
            return Err(Error::Timeout(format!(
                "latency run at {rate}/s did not drain: {} of {total} arrived; sender backlog {backlog:?}; {} waiting in the inbox",
                arrivals.lock().unwrap_or_else(|p| p.into_inner()).len(),
                b.delivery().pending_count(&pair.bob),
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.cancel();
    let _ = consumer.await;
    let sent = sent_at.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let got = arrivals.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut lat: Vec<Duration> = sent
        .iter()
        .filter_map(|(id, t)| got.get(id).map(|r| r.saturating_duration_since(*t)))
        .collect();
    lat.sort();
    println!(
        "\n## latency at {rate} msg/s for {} s ({} messages, offered in {:.2} s): send() → consumer holds it",
        o.rate_secs,
        lat.len(),
        offered.as_secs_f64()
    );
    println!(
        "  p50 {}  p90 {}  p99 {}  max {}",
        ms(pct(&lat, 0.5)),
        ms(pct(&lat, 0.9)),
        ms(pct(&lat, 0.99)),
        ms(pct(&lat, 1.0))
    );
    let failed = load(&a.delivery().stats().batches_failed) - failed_before;
    let longest =
        |n: &NodeHandle| n.store().stats().wal_sync_max_ns.load(Ordering::Relaxed) as f64 / 1e6;
    let (sync_a, sync_b) = (longest(&a), longest(&b));
    println!(
        "  batches failed (retried after a backoff): {failed}; longest log fsync: sender {sync_a:.2} ms, receiver {sync_b:.2} ms"
    );
    let f = |p| pct(&lat, p).as_secs_f64() * 1e3;
    Ok(serde_json::json!({
        "rate": rate, "p50_ms": f(0.5), "p90_ms": f(0.9), "p99_ms": f(0.99), "max_ms": f(1.0),
        "batches_failed": failed, "longest_fsync_ms": [sync_a, sync_b],
    }))
}

async fn replay(o: &Opts, pair: &mut Pair) -> Result<serde_json::Value, Error> {
    // Receiver down: everything queues at the sender.
    if let Some(b) = pair.b.take() {
        b.crash().await;
    }
    let a = pair.a()?;
    let body = body_of(o.size);
    let start = Instant::now();
    let mut producers = JoinSet::new();
    let conc = o.concurrency.max(1);
    let per = o.replay.div_ceil(conc);
    for p in 0..conc {
        let n = per.min(o.replay.saturating_sub(p * per));
        let (a, req) = (a.clone(), pair.request(&body));
        producers.spawn(async move {
            for _ in 0..n {
                a.delivery()
                    .send(req.clone())
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok::<_, String>(())
        });
    }
    while let Some(r) = producers.join_next().await {
        r.map_err(|e| Error::Failed(e.to_string()))?
            .map_err(Error::Failed)?;
    }
    let queued = start.elapsed();
    drop(a);
    let db = pair.cfg_a.data_dir.join(crate::store::DB_FILE);
    if let Some(a) = pair.a.take() {
        a.shutdown().await;
    }
    let db_bytes = std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0);
    let earlier = if o.messages > 0 || o.rate_secs > 0 {
        " (it also holds what the earlier runs left)"
    } else {
        ""
    };
    // Receiver back first, then the sender restarts and replays its outbox.
    pair.b = Some(Node::start(pair.cfg_b.clone()).await?);
    let b = pair.b()?;
    let stored0 = load(&b.delivery().stats().inbox_stored);
    let restart = Instant::now();
    pair.a = Some(Node::start(pair.cfg_a.clone()).await?);
    let started = restart.elapsed();
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut first = None;
    loop {
        let stored = load(&b.delivery().stats().inbox_stored) - stored0;
        if first.is_none() && stored > 0 {
            first = Some(restart.elapsed());
        }
        if stored >= o.replay as u64 {
            break;
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout(format!(
                "replay stored only {stored} of {}",
                o.replay
            )));
        }
        // Finer polling until the first delivery, which is timed.
        let every = if first.is_none() { 1 } else { 5 };
        tokio::time::sleep(Duration::from_millis(every)).await;
    }
    let drained = restart.elapsed();
    let first = first.unwrap_or(drained);
    // The replay rate proper: from the first delivery to the last.
    let replay_rate =
        o.replay.saturating_sub(1) as f64 / drained.saturating_sub(first).as_secs_f64().max(1e-9);
    println!(
        "\n## replay: {} messages queued while the receiver was down",
        o.replay
    );
    println!(
        "  queued at {:.0} msg/s; sender database {:.1} MB ({:.0} bytes per queued message){earlier}",
        o.replay as f64 / queued.as_secs_f64(),
        db_bytes as f64 / 1e6,
        db_bytes as f64 / o.replay as f64
    );
    println!(
        "  restart: node up in {}, first delivery (stored in the receiver's inbox) after {}, \
         outbox drained in {:.2} s ({:.0} msg/s counted from the restart)",
        ms(started),
        ms(first),
        drained.as_secs_f64(),
        o.replay as f64 / drained.as_secs_f64()
    );
    println!("  replay rate from the first delivery to the last: {replay_rate:.0} msg/s");
    Ok(serde_json::json!({
        "messages": o.replay, "db_bytes": db_bytes, "queued_per_s": o.replay as f64 / queued.as_secs_f64(),
        "restart_ms": started.as_secs_f64() * 1e3, "first_delivery_ms": first.as_secs_f64() * 1e3,
        "drain_per_s": o.replay as f64 / drained.as_secs_f64(),
        "replay_per_s": replay_rate,
    }))
}

/// CPU time this process has used (user + system), from /proc/self/stat;
/// unlike wall time it is not inflated when other processes compete for
/// the cores.
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on Linux.
    Some(Duration::from_millis(ticks * 10))
}

fn load(a: &std::sync::atomic::AtomicU64) -> u64 {
    a.load(std::sync::atomic::Ordering::Relaxed)
}
