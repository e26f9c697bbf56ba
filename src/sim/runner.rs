//! Running a scenario: start the nodes, register agents, wait for the mesh
//! to form, run the timeline (traffic and faults), drain, settle, measure.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::collect::{self, Extra, Sample};
use super::consumers::Consumers;
use super::ledger::Ledger;
use super::live::Live;
use super::metrics::classify;
use super::report::{Phases, Summary};
use super::scenario::{Scenario, TopologyKind};
use super::schedule::{self, Plan};
use super::traffic::Generator;
use super::watch::{Coverage, Watch};
use super::world::{self, World};
use super::{Error, RunOptions};
use crate::cluster::{Cluster, ClusterOptions, SeededRng, Topology};
use crate::time::now_ms;

/// Registrations run at once while setting up.
const REGISTER_CONCURRENCY: usize = 32;
/// Poll period of the warm-up and the drain.
const WAIT_POLL: Duration = Duration::from_millis(500);
/// Progress ticks (of 500 ms) between log lines when no bar is drawn.
const LOG_EVERY_TICKS: u64 = 30;
/// Slack before a message past its expiry counts as expired.
const EXPIRY_MARGIN_MS: u64 = 2_000;

/// A directory for the node data, removed when dropped.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(s: &Scenario) -> Result<Scratch, Error> {
        let base = s.mesh.data_dir.clone().unwrap_or_else(std::env::temp_dir);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = base.join(format!(
            "agentmesh-sim-{}-{}-{nanos}",
            s.name,
            std::process::id()
        ));
        std::fs::create_dir_all(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        Ok(Scratch(path))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn bar(show: bool, len: u64, what: &str) -> ProgressBar {
    let b = if show {
        ProgressBar::new(len)
    } else {
        ProgressBar::hidden()
    };
    let style =
        ProgressStyle::with_template("{prefix:>10} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
    b.set_style(style);
    b.set_prefix(what.to_string());
    b
}

/// Run a scenario and write its summary and plots into `o.out`.
pub async fn run(s: Scenario, o: &RunOptions) -> Result<Summary, Error> {
    let seed = o.seed.unwrap_or(s.seed);
    let plan = Arc::new(schedule::plan(&s, seed));
    let scratch = Scratch::new(&s)?;
    let started = Instant::now();
    let date = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let b = bar(o.progress, s.mesh.nodes as u64, "nodes");
    let cluster = start_nodes(&s, &scratch.0, seed, &b).await?;
    b.finish_and_clear();
    let mut phases = Phases {
        start_nodes_s: started.elapsed().as_secs_f64(),
        ..Phases::default()
    };
    info!(
        nodes = s.mesh.nodes,
        secs = phases.start_nodes_s,
        "sim: nodes started"
    );
    let s = Arc::new(s);
    let mut w = World {
        cluster,
        live: Arc::new(Live::default()),
        consumers: Consumers::default(),
        watch: Arc::new(Mutex::new(Watch {
            timeout_s: s.convergence.timeout.as_secs_f64(),
            ..Watch::default()
        })),
        ledger: Arc::new(Ledger::default()),
        scenario: s.clone(),
        plan: plan.clone(),
        t0: Instant::now(),
        rng: SeededRng::new(seed ^ 0xB007_0000_0000_0002),
        partition: None,
        slow: Default::default(),
        crashed: Default::default(),
        departed: Default::default(),
        faults: Default::default(),
        markers: Vec::new(),
        leaving: Vec::new(),
    };
    let result = drive(&mut w, &mut phases, o, seed).await;
    // Whatever happened, stop everything before the scratch dir goes.
    let t = Instant::now();
    w.consumers.stop_all().await;
    futures::future::join_all(std::mem::take(&mut w.leaving)).await;
    for i in 0..w.cluster.len() {
        w.live.set_handle(i, None);
    }
    let peak = collect::vm_kib("VmHWM:").map(|k| k as f64 / 1024.0);
    // An empty cluster takes the place of the real one, which shutdown consumes.
    let empty = Cluster::start(0, w.cluster.options().clone(), |_, _| {})
        .await
        .map_err(|source| Error::Start { node: 0, source })?;
    // The results are read: stop the nodes as a crash would, not with a
    // thousand offline announcements each verified by every other node.
    std::mem::replace(&mut w.cluster, empty).crash_all().await;
    drop(scratch);
    phases.stop_s = t.elapsed().as_secs_f64();
    info!(secs = phases.stop_s, "sim: nodes stopped");
    let (extra, samples, warmup_curve) = result?;
    phases.total_s = started.elapsed().as_secs_f64();
    let mut summary = collect::summary(
        &w,
        &plan,
        seed,
        date,
        phases,
        extra,
        &samples,
        warmup_curve,
        peak,
        &o.out,
    )?;
    summary.check();
    let json = serde_json::to_string_pretty(&summary)
        .map_err(|e| Error::Failed(format!("cannot encode the summary: {e}")))?;
    let path = o.out.join("summary.json");
    std::fs::write(&path, json).map_err(|source| Error::Io { path, source })?;
    Ok(summary)
}

/// Start the initial nodes one by one, per the scenario's topology.
async fn start_nodes(
    s: &Scenario,
    root: &std::path::Path,
    seed: u64,
    b: &ProgressBar,
) -> Result<Cluster, Error> {
    let opts = ClusterOptions {
        transport: s.mesh.transport,
        topology: match s.mesh.topology {
            TopologyKind::Random => Topology::Random {
                degree: s.mesh.degree,
                seed,
            },
            TopologyKind::Chain => Topology::Chain,
            TopologyKind::Star => Topology::Star,
        },
        root: root.to_path_buf(),
    };
    let base = s.node.clone();
    let tweak = |_: usize, cfg: &mut crate::NodeConfig| world::tweak(&base, cfg);
    let mut c = Cluster::start(1, opts, tweak)
        .await
        .map_err(|source| Error::Start { node: 0, source })?;
    b.inc(1);
    for i in 1..s.mesh.nodes {
        if let Err(source) = c.add_node(tweak).await {
            c.shutdown().await;
            return Err(Error::Start { node: i, source });
        }
        b.inc(1);
    }
    Ok(c)
}

type Measured = (Extra, Vec<Sample>, Vec<(f64, f64)>);

async fn drive(
    w: &mut World,
    ph: &mut Phases,
    o: &RunOptions,
    seed: u64,
) -> Result<Measured, Error> {
    let s = w.scenario.clone();
    // Agents.
    let t = Instant::now();
    let n = w.cluster.len();
    for chunk in (0..n).collect::<Vec<_>>().chunks(REGISTER_CONCURRENCY) {
        let regs = chunk.iter().map(|&i| {
            let h = w.cluster.handle(i);
            let s = s.clone();
            async move {
                let h = h.ok_or_else(|| Error::Failed(format!("node {i} is not running")))?;
                let ids = world::register_agents(&s, i, &h).await?;
                Ok::<_, Error>((i, h, ids))
            }
        });
        for r in futures::future::join_all(regs).await {
            let (i, h, ids) = r?;
            w.live.add_agents(i, &ids, w.plan.survives(i));
            w.live.set_handle(i, Some(h));
        }
    }
    ph.register_s = t.elapsed().as_secs_f64();
    info!(secs = ph.register_s, "sim: agents registered");

    // Warm-up: every node has a peer and sees every agent.
    let t = Instant::now();
    let b = bar(o.progress, 100, "warm-up");
    let mut curve = Vec::new();
    let mut tracker = Coverage::new(&w.live);
    loop {
        let cov = tracker.sample(&w.live).await;
        let since = t.elapsed().as_secs_f64() + ph.register_s;
        if curve.last().is_none_or(|(_, c)| *c != cov) {
            curve.push((since, cov));
        }
        b.set_position((cov * 100.0) as u64);
        let peered = w
            .live
            .running()
            .iter()
            .all(|(_, h)| !h.discovery().connected_peers().is_empty());
        if cov >= 1.0 && peered {
            ph.warmup_converged = true;
            break;
        }
        if t.elapsed() >= s.warmup_timeout {
            break;
        }
        tokio::time::sleep(WAIT_POLL.max(s.convergence.sample_every)).await;
    }
    b.finish_and_clear();
    ph.warmup_s = t.elapsed().as_secs_f64();
    info!(
        secs = ph.warmup_s,
        converged = ph.warmup_converged,
        "sim: warm-up over; timeline starts"
    );

    // Timeline.
    w.t0 = Instant::now();
    for (i, h) in w.live.running() {
        let agents = w.live.agents_of(i);
        w.consumers.start(i, &h, &agents, &w.ledger, w.t0);
    }
    let stop = CancellationToken::new();
    let samples = Arc::new(Mutex::new(Vec::new()));
    let sampler = spawn_sampler(w, samples.clone(), stop.clone());
    let total = (s.duration + s.drain).as_secs();
    let b = bar(o.progress, total, "timeline");
    let ticker = spawn_ticker(w, b.clone(), stop.clone());
    let traffic: Option<JoinHandle<()>> = s.traffic.clone().map(|traffic| {
        let g = Generator {
            traffic,
            ttl: s.message_ttl(),
            capabilities: s.mesh.capabilities,
            live: w.live.clone(),
            ledger: w.ledger.clone(),
            t0: w.t0,
            rng: SeededRng::new(seed ^ 0x7EAF_F1C0_0000_0003),
        };
        tokio::spawn(g.run(stop.clone()))
    });
    let outcome = timeline(w, ph, traffic).await;
    let extra = match outcome {
        Ok(()) => {
            let t = Instant::now();
            let x = collect::extra(w).await;
            ph.collect_s = t.elapsed().as_secs_f64();
            info!(secs = ph.collect_s, "sim: node state collected");
            x
        }
        Err(e) => {
            stop.cancel();
            let _ = sampler.await;
            let _ = ticker.await;
            b.finish_and_clear();
            return Err(e);
        }
    };
    stop.cancel();
    let _ = sampler.await;
    let _ = ticker.await;
    b.finish_and_clear();
    let samples = std::mem::take(&mut *samples.lock().unwrap_or_else(|p| p.into_inner()));
    Ok((extra, samples, curve))
}

/// Apply the plan on time, then drain and settle.
async fn timeline(
    w: &mut World,
    ph: &mut Phases,
    traffic: Option<JoinHandle<()>>,
) -> Result<(), Error> {
    let s = w.scenario.clone();
    let plan: Arc<Plan> = w.plan.clone();
    for step in &plan.steps {
        tokio::time::sleep_until((w.t0 + step.at).into()).await;
        w.apply(&step.action).await?;
    }
    tokio::time::sleep_until((w.t0 + s.duration).into()).await;
    if let Some(t) = traffic {
        let _ = t.await;
    }
    ph.timeline_s = w.now_s();
    info!(secs = ph.timeline_s, "sim: timeline over; draining");

    // Drain: heal, unslow, restart the crashed, then wait for every message.
    w.markers.push((w.now_s(), "drain".into()));
    w.heal().await;
    w.unslow_all().await;
    let crashed: Vec<usize> = w.crashed.iter().copied().collect();
    for i in crashed {
        w.restart(i).await?;
    }
    let t = Instant::now();
    loop {
        let missing = w
            .ledger
            .with(|b| classify(b, &w.departed, now_ms(), EXPIRY_MARGIN_MS).missing);
        if missing == 0 {
            ph.drained = true;
            break;
        }
        if t.elapsed() >= s.drain {
            break;
        }
        tokio::time::sleep(WAIT_POLL).await;
    }
    ph.drain_s = t.elapsed().as_secs_f64();
    info!(
        secs = ph.drain_s,
        drained = ph.drained,
        "sim: drain over; settling"
    );
    w.markers.push((w.now_s(), "drained".into()));
    // Settle: consumers keep polling, so a message handed over again after
    // its ack would show up as a duplicate.
    tokio::time::sleep(s.settle).await;
    Ok(())
}

/// Sample probes and joiners every `sample_every`, and the running nodes,
/// their peers and the process memory every second.
fn spawn_sampler(
    w: &World,
    out: Arc<Mutex<Vec<Sample>>>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    let (live, watch, t0) = (w.live.clone(), w.watch.clone(), w.t0);
    let every = w.scenario.convergence.sample_every;
    tokio::spawn(async move {
        let mut next_series = 0.0;
        loop {
            let now = t0.elapsed().as_secs_f64();
            watch
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .sample(&live, now);
            if now >= next_series {
                next_series = now.floor() + 1.0;
                let sample = collect::sample(&live, now);
                out.lock().unwrap_or_else(|p| p.into_inner()).push(sample);
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.cancelled() => return,
            }
        }
    })
}

/// Keep the progress bar current.
fn spawn_ticker(w: &World, b: ProgressBar, stop: CancellationToken) -> JoinHandle<()> {
    let (live, ledger, t0) = (w.live.clone(), w.ledger.clone(), w.t0);
    tokio::spawn(async move {
        let mut tick: u64 = 0;
        loop {
            b.set_position(t0.elapsed().as_secs());
            let (acc, del) = ledger.with(|b| {
                let acc = b.msgs.values().filter(|m| m.send.is_some()).count();
                let del = b
                    .msgs
                    .values()
                    .filter(|m| m.send.is_some() && m.received_s.is_some())
                    .count();
                (acc, del)
            });
            let msg = format!(
                "{} nodes running; {del}/{acc} messages delivered",
                live.running_count()
            );
            // Without a terminal the bar is not drawn: log a line now and then.
            if b.is_hidden() && tick.is_multiple_of(LOG_EVERY_TICKS) {
                info!("sim: t={}s {msg}", t0.elapsed().as_secs());
            }
            tick += 1;
            b.set_message(msg);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stop.cancelled() => return,
            }
        }
    })
}
