//! Gathering the figures: samples while the run goes, checks of the nodes
//! before they stop, and the summary (with its plots) at the end.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::Ordering;

use super::Error;
use super::live::Live;
use super::metrics::{self, Percentiles, Spread, classify};
use super::plots::{self, PlotData};
use super::report::{
    BYTES_METHOD, Convergence, Integrity, NodeCounters, NodeTraffic, PerNode, Phases, Sends,
    SeriesPoint, Setting, Summary,
};
use super::scenario::TopologyKind;
use super::schedule::Plan;
use super::world::World;
use crate::time::now_ms;

/// Slack before a message past its expiry counts as expired.
const EXPIRY_MARGIN_MS: u64 = 2_000;

/// One sample of the running mesh.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// Timeline seconds.
    pub t: f64,
    /// Running nodes.
    pub running: usize,
    /// Mean connected peers per running node.
    pub mean_peers: f64,
    /// Resident memory, MiB.
    pub rss_mib: f64,
}

/// A `/proc/self/status` value in KiB (e.g. `"VmHWM:"`).
pub fn vm_kib(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Sample the mesh now.
pub fn sample(live: &Live, t: f64) -> Sample {
    let running = live.running();
    let peers: usize = running
        .iter()
        .map(|(_, h)| h.discovery().connected_peers().len())
        .sum();
    Sample {
        t,
        running: running.len(),
        mean_peers: peers as f64 / running.len().max(1) as f64,
        rss_mib: vm_kib("VmRSS:").map_or(0.0, |k| k as f64 / 1024.0),
    }
}

/// What is read from the nodes before they stop.
#[derive(Debug, Clone, Default)]
pub struct Extra {
    /// Pending inbox entries of simulation agents.
    pub inbox_pending: u64,
    /// Sender-side status of accepted messages whose sender runs.
    pub sender_status: BTreeMap<String, u64>,
    /// Node counters.
    pub counters: NodeCounters,
}

/// Read inboxes, tracking and counters of the running nodes.
pub async fn extra(w: &World) -> Extra {
    let mut x = Extra::default();
    let by_sender: HashMap<usize, Vec<String>> = w.ledger.with(|b| {
        let mut m: HashMap<usize, Vec<String>> = HashMap::new();
        for (id, msg) in &b.msgs {
            if let Some(s) = &msg.send {
                m.entry(s.from_slot).or_default().push(id.clone());
            }
        }
        m
    });
    for (i, h) in w.live.running() {
        let d = h.delivery();
        for a in w.live.agents_of(i) {
            x.inbox_pending += d.pending_count(&a) as u64;
        }
        for id in by_sender.get(&i).map(Vec::as_slice).unwrap_or_default() {
            let status = match d.message(id) {
                Ok(v) => v.tracking.status.as_str().to_string(),
                Err(_) => "unknown at the sender".to_string(),
            };
            *x.sender_status.entry(status).or_default() += 1;
        }
        let st = d.stats();
        let c = &mut x.counters;
        c.inbox_duplicates += st.inbox_duplicates.load(Ordering::Relaxed);
        c.batches_failed += st.batches_failed.load(Ordering::Relaxed);
        c.expired += st.expired.load(Ordering::Relaxed);
        c.dead_lettered += st.dead_lettered.load(Ordering::Relaxed);
    }
    // Network counters come from each node's swarm task: ask them all at
    // once (one by one, a busy 300-node process took minutes).
    let running = w.live.running();
    let stats = futures::future::join_all(
        running
            .iter()
            .map(|(_, h)| async move { h.net().stats().await }),
    )
    .await;
    for ns in stats.into_iter().flatten() {
        x.counters.net_events_shed += ns.events_shed;
        x.counters.idle_connections_closed += ns.idle_closed;
    }
    x
}

fn spread_opt(v: Vec<f64>) -> Option<Spread> {
    Spread::of(&v)
}

/// Assemble the summary and write the plots into `out`.
#[allow(clippy::too_many_arguments)]
pub fn summary(
    w: &World,
    plan: &Plan,
    seed: u64,
    date_utc: String,
    phases: Phases,
    extra: Extra,
    samples: &[Sample],
    warmup_curve: Vec<(f64, f64)>,
    peak_memory_mib: Option<f64>,
    out: &Path,
) -> Result<Summary, Error> {
    let s = &w.scenario;
    let node = &s.node;
    let timers: BTreeMap<String, String> = [
        ("discovery.ad_ttl", node.discovery.ad_ttl),
        (
            "discovery.refresh_interval",
            node.discovery.refresh_interval,
        ),
        (
            "discovery.anti_entropy_interval",
            node.discovery.anti_entropy_interval,
        ),
        ("delivery.lease", node.delivery.lease),
        ("delivery.ttl", node.delivery.default_ttl),
        ("delivery.retry_initial", node.delivery.retry_initial),
        ("delivery.retry_max", node.delivery.retry_max),
        ("network.idle_timeout", node.network.idle_timeout),
        (
            "network.kad_bootstrap_interval",
            node.network.kad_bootstrap_interval,
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), humantime::format_duration(v).to_string()))
    .collect();
    let setting = Setting {
        scenario: s.name.clone(),
        description: s.description.clone(),
        seed,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        date_utc,
        build: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        nodes_initial: plan.initial,
        nodes_total: w.live.with(|v| v.handles.len()),
        nodes_departed: w.departed.len(),
        transport: format!(
            "{:?}{}",
            s.mesh.transport,
            if s.mesh.plaintext { ", plaintext" } else { "" }
        )
        .to_lowercase(),
        topology: match s.mesh.topology {
            TopologyKind::Random => format!("random, degree {}", s.mesh.degree),
            TopologyKind::Chain => "chain".into(),
            TopologyKind::Star => "star".into(),
        },
        agents_per_node: s.mesh.agents_per_node,
        timers,
        traffic: s.traffic.as_ref().map(|t| {
            let mix: Vec<String> = t
                .mix
                .iter()
                .map(|(p, w)| format!("{}:{w}", p.as_str()))
                .collect();
            format!(
                "{} sends/s of {} bytes, mix [{}], from {:?} to {:?}, ttl {}, at most {} in flight",
                t.rate,
                t.body_bytes,
                mix.join(", "),
                t.start,
                t.stop,
                humantime::format_duration(s.message_ttl()),
                t.max_in_flight
            )
        }),
    };
    let end_s = (phases.timeline_s + phases.drain_s + s.settle.as_secs_f64()).ceil() as usize;
    let (outcomes, sends, integrity_part, latencies, by_pattern, per_node, accepted, delivered) =
        w.ledger.with(|b| {
            let outcomes = classify(b, &w.departed, now_ms(), EXPIRY_MARGIN_MS);
            let sends = Sends {
                ok: b.sends_ok,
                failed: b.send_failed.clone(),
                skipped: b.skipped.clone(),
            };
            let integrity = Integrity {
                duplicates: b.duplicates,
                duplicate_ids: b.duplicate_ids.clone(),
                redeliveries_before_ack: b.redeliveries,
                misrouted: b.misrouted,
                ack_refused: b.ack_refused.clone(),
                consumer_errors: b.consumer_errors,
                ..Integrity::default()
            };
            let lat = metrics::latencies_ms(b);
            let mut by: BTreeMap<String, Vec<f64>> = BTreeMap::new();
            for m in b.msgs.values() {
                if let (Some(sd), Some(r)) = (&m.send, m.received_s) {
                    by.entry(sd.pattern.as_str().to_string())
                        .or_default()
                        .push((r - sd.sent_s).max(0.0) * 1000.0);
                }
            }
            let by: BTreeMap<String, Percentiles> = by
                .into_iter()
                .map(|(k, mut v)| {
                    v.sort_by(f64::total_cmp);
                    (k, Percentiles::of(&v))
                })
                .collect();
            let env = b.envelope_bytes;
            let nodes: Vec<NodeTraffic> = (0..w.live.with(|v| v.handles.len()))
                .map(|i| {
                    let c = b.nodes.get(i).copied().unwrap_or_default();
                    NodeTraffic {
                        node: i,
                        stays: plan.survives(i),
                        sent: c.sent,
                        received: c.received,
                        bytes_est: (c.sent + c.received) * env.unwrap_or(0) as u64,
                    }
                })
                .collect();
            let col = |f: fn(&NodeTraffic) -> u64| -> Vec<f64> {
                nodes.iter().map(|n| f(n) as f64).collect()
            };
            let per_node = PerNode {
                bytes_method: BYTES_METHOD,
                envelope_bytes: env,
                sent: spread_opt(col(|n| n.sent)),
                received: spread_opt(col(|n| n.received)),
                bytes_est: spread_opt(col(|n| n.bytes_est)),
                nodes,
            };
            let sent_times = b
                .msgs
                .values()
                .filter_map(|m| Some(m.send.as_ref()?.sent_s));
            let accepted = metrics::cumulative_per_second(sent_times, end_s);
            let recv_times = b
                .msgs
                .values()
                .filter(|m| m.send.is_some())
                .filter_map(|m| m.received_s);
            let delivered = metrics::cumulative_per_second(recv_times, end_s);
            (
                outcomes, sends, integrity, lat, by, per_node, accepted, delivered,
            )
        });
    let integrity = Integrity {
        inbox_pending_at_end: extra.inbox_pending,
        sender_status_at_end: extra.sender_status,
        ..integrity_part
    };
    let (probes, joiners) = {
        let wt = w.watch.lock().unwrap_or_else(|p| p.into_inner());
        (wt.probes.clone(), wt.joiners.clone())
    };
    let joined = |late: bool| {
        spread_opt(
            joiners
                .iter()
                .filter(|j| j.late == late)
                .filter_map(|j| j.synced_s)
                .collect(),
        )
    };
    let convergence = Convergence {
        initial_all_s: phases
            .warmup_converged
            .then_some(phases.register_s + phases.warmup_s),
        probes_converged: probes.iter().filter(|p| p.all_s.is_some()).count(),
        probes_not_converged: probes.iter().filter(|p| p.all_s.is_none()).count(),
        probe_all_s: spread_opt(probes.iter().filter_map(|p| p.all_s).collect()),
        probe_half_s: spread_opt(probes.iter().filter_map(|p| p.half_s).collect()),
        late_join_sync_s: joined(true),
        churn_join_sync_s: joined(false),
        joiners_not_synced: joiners.iter().filter(|j| j.synced_s.is_none()).count(),
        probes: probes.clone(),
        joiners,
    };
    let mut curves = vec![(
        "warm-up: (node, agent) pairs known".to_string(),
        warmup_curve,
    )];
    curves.extend(probes.iter().map(|p| {
        (
            format!("probe {} (t={:.0}s)", p.n, p.start_s),
            p.curve.clone(),
        )
    }));
    let at = |v: &[u64], t: f64| {
        v.get(t.max(0.0) as usize)
            .or(v.last())
            .copied()
            .unwrap_or(0)
    };
    let series = samples
        .iter()
        .map(|x| SeriesPoint {
            t: x.t,
            running: x.running,
            mean_peers: x.mean_peers,
            rss_mib: x.rss_mib,
            accepted: at(&accepted, x.t),
            delivered: at(&delivered, x.t),
        })
        .collect();
    let data = PlotData {
        name: s.name.clone(),
        latencies_ms: latencies.clone(),
        accepted,
        delivered,
        running: samples.iter().map(|x| (x.t, x.running as f64)).collect(),
        markers: w.markers.clone(),
        curves,
    };
    std::fs::create_dir_all(out).map_err(|source| Error::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let plots = plots::write_all(out, &data)?;
    Ok(Summary {
        setting,
        phases,
        sends,
        messages: outcomes,
        integrity,
        latency: Percentiles::of(&latencies),
        latency_by_pattern: by_pattern,
        convergence,
        per_node,
        node_counters: extra.counters,
        peak_memory_mib,
        faults: w.faults.clone(),
        markers: w.markers.clone(),
        series,
        plots,
        passed: false,
        problems: Vec::new(),
    })
}
