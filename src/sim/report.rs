//! The summary of a run: what `summary.json` holds and what is printed.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use super::metrics::{Outcomes, Percentiles, Spread};
use super::watch::{Joiner, Probe};

/// How per-node bytes are estimated.
pub const BYTES_METHOD: &str = "estimate: (messages sent + messages received) x encoded size of one envelope \
     (measured on a received message); excludes batching, signatures, receipts, discovery and libp2p overhead";

/// The run's setting.
#[derive(Debug, Clone, Serialize)]
pub struct Setting {
    /// Scenario name.
    pub scenario: String,
    /// What it shows.
    pub description: String,
    /// Seed used.
    pub seed: u64,
    /// Command line.
    pub command: String,
    /// UTC start time (RFC 3339).
    pub date_utc: String,
    /// `release` or `debug`.
    pub build: &'static str,
    /// Cores available.
    pub cores: usize,
    /// Nodes at the start.
    pub nodes_initial: usize,
    /// Nodes that ever ran (initial plus joiners).
    pub nodes_total: usize,
    /// Nodes that left for good.
    pub nodes_departed: usize,
    /// Transport.
    pub transport: String,
    /// Bootstrap topology and degree.
    pub topology: String,
    /// Agents per node.
    pub agents_per_node: usize,
    /// Node timers used (the scenario's overrides applied).
    pub timers: BTreeMap<String, String>,
    /// Traffic: rate, body size, mix, window, TTL.
    pub traffic: Option<String>,
}

/// Wall-clock phases, seconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Phases {
    /// Starting the initial nodes.
    pub start_nodes_s: f64,
    /// Registering the initial agents.
    pub register_s: f64,
    /// Until every node saw every initial agent (or the warm-up timeout).
    pub warmup_s: f64,
    /// Whether the warm-up converged.
    pub warmup_converged: bool,
    /// The timeline.
    pub timeline_s: f64,
    /// From the end of the timeline until every message that had to arrive did.
    pub drain_s: f64,
    /// Whether the drain finished before its bound.
    pub drained: bool,
    /// Reading the nodes' state after the settle.
    pub collect_s: f64,
    /// Stopping every node.
    pub stop_s: f64,
    /// Everything.
    pub total_s: f64,
}

/// Sends.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sends {
    /// `send` calls accepted (a fan-out counts once).
    pub ok: u64,
    /// Failures by reason (not accepted, not counted as messages).
    pub failed: BTreeMap<String, u64>,
    /// Sends not attempted, by reason.
    pub skipped: BTreeMap<String, u64>,
}

/// Delivery correctness beyond the outcome counts.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Integrity {
    /// Hand-overs of a message after its ack succeeded. Must be 0.
    pub duplicates: u64,
    /// Some of their ids.
    pub duplicate_ids: Vec<String>,
    /// Hand-overs before an ack (lease lapsed or node crashed before the ack).
    pub redeliveries_before_ack: u64,
    /// Hand-overs to the wrong agent. Must be 0.
    pub misrouted: u64,
    /// Acks refused, by reason.
    pub ack_refused: BTreeMap<String, u64>,
    /// Failed polls and ack calls.
    pub consumer_errors: u64,
    /// Messages still pending in the simulation agents' inboxes at the end.
    pub inbox_pending_at_end: u64,
    /// Status at the sending node, at the end, of messages whose sender runs.
    pub sender_status_at_end: BTreeMap<String, u64>,
}

/// Ad convergence and catch-up.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Convergence {
    /// Seconds until every node saw every initial agent (warm-up).
    pub initial_all_s: Option<f64>,
    /// Probes that reached every running node.
    pub probes_converged: usize,
    /// Probes that did not within the timeout.
    pub probes_not_converged: usize,
    /// Seconds until every running node saw a probe.
    pub probe_all_s: Option<Spread>,
    /// Seconds until half did.
    pub probe_half_s: Option<Spread>,
    /// Seconds until a `late_join` node held every running node's agents.
    pub late_join_sync_s: Option<Spread>,
    /// Same, for nodes joining by churn.
    pub churn_join_sync_s: Option<Spread>,
    /// Joiners that did not catch up within the timeout.
    pub joiners_not_synced: usize,
    /// Every probe.
    pub probes: Vec<Probe>,
    /// Every joiner.
    pub joiners: Vec<Joiner>,
}

/// One node's traffic.
#[derive(Debug, Clone, Serialize)]
pub struct NodeTraffic {
    /// Slot.
    pub node: usize,
    /// Never left for good.
    pub stays: bool,
    /// Messages its agents sent (accepted).
    pub sent: u64,
    /// Distinct messages its consumers received.
    pub received: u64,
    /// Estimated bytes (see `bytes_method`).
    pub bytes_est: u64,
}

/// Per-node traffic.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PerNode {
    /// How bytes are estimated.
    pub bytes_method: &'static str,
    /// Encoded size of one envelope.
    pub envelope_bytes: Option<usize>,
    /// Messages sent per node.
    pub sent: Option<Spread>,
    /// Messages received per node.
    pub received: Option<Spread>,
    /// Bytes per node.
    pub bytes_est: Option<Spread>,
    /// Every node.
    pub nodes: Vec<NodeTraffic>,
}

/// Counters summed over the nodes running at the end (each since its last start).
#[derive(Debug, Clone, Default, Serialize)]
pub struct NodeCounters {
    /// Duplicates a receiving node recognised and did not store again.
    pub inbox_duplicates: u64,
    /// Batches that failed and were retried.
    pub batches_failed: u64,
    /// Messages that expired.
    pub expired: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
    /// Inbound network events dropped because a node did not keep up.
    pub net_events_shed: u64,
    /// Connections the nodes closed for being idle.
    pub idle_connections_closed: u64,
}

/// The mesh once a second.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SeriesPoint {
    /// Timeline seconds.
    pub t: f64,
    /// Running nodes.
    pub running: usize,
    /// Mean connected peers per running node.
    pub mean_peers: f64,
    /// Resident memory of the process, MiB.
    pub rss_mib: f64,
    /// Messages accepted so far.
    pub accepted: u64,
    /// Messages delivered so far.
    pub delivered: u64,
}

/// Everything `summary.json` holds.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// What ran.
    pub setting: Setting,
    /// How long each phase took.
    pub phases: Phases,
    /// Sends.
    pub sends: Sends,
    /// What became of the accepted messages.
    pub messages: Outcomes,
    /// Duplicates and other integrity checks.
    pub integrity: Integrity,
    /// Send → consumer latency.
    pub latency: Percentiles,
    /// Latency per pattern.
    pub latency_by_pattern: BTreeMap<String, Percentiles>,
    /// Discovery.
    pub convergence: Convergence,
    /// Per node.
    pub per_node: PerNode,
    /// Node counters.
    pub node_counters: NodeCounters,
    /// Peak resident memory of the process (VmHWM), MiB.
    pub peak_memory_mib: Option<f64>,
    /// Faults applied, by kind (nodes touched; partitions and heals count 1).
    pub faults: BTreeMap<String, u64>,
    /// `(timeline seconds, label)` of each fault and phase change.
    pub markers: Vec<(f64, String)>,
    /// The mesh once a second.
    pub series: Vec<SeriesPoint>,
    /// Plot files.
    pub plots: Vec<PathBuf>,
    /// Whether the must-hold checks passed (nothing missing, no duplicates,
    /// nothing misrouted or unknown).
    pub passed: bool,
    /// What failed, and warnings.
    pub problems: Vec<String>,
}

impl Summary {
    /// The must-hold checks.
    pub fn check(&mut self) {
        let m = &self.messages;
        let mut p = Vec::new();
        if m.missing > 0 {
            p.push(format!(
                "{} accepted messages never reached a consumer (e.g. {:?})",
                m.missing, m.missing_ids
            ));
        }
        if self.integrity.duplicates > 0 {
            p.push(format!(
                "{} hand-overs after a successful ack (e.g. {:?})",
                self.integrity.duplicates, self.integrity.duplicate_ids
            ));
        }
        if self.integrity.misrouted > 0 {
            p.push(format!(
                "{} messages handed to the wrong agent",
                self.integrity.misrouted
            ));
        }
        if m.unknown_received > 0 {
            p.push(format!(
                "{} messages received that send() never accepted",
                m.unknown_received
            ));
        }
        self.passed = p.is_empty();
        if !self.phases.warmup_converged {
            p.push("warning: the warm-up timed out before every node saw every agent".into());
        }
        if !self.phases.drained {
            p.push("warning: the drain hit its bound".into());
        }
        self.problems = p;
    }

    /// Human-readable lines.
    pub fn lines(&self) -> Vec<String> {
        let s = &self.setting;
        let m = &self.messages;
        let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
        let secs = |v: &Option<Spread>| {
            v.map_or("-".into(), |v| {
                format!("median {:.2} s, max {:.2} s", v.median, v.max)
            })
        };
        let mut l = vec![
            format!(
                "== {} (seed {}; {} build, {} cores; {} nodes at start, {} in all, {} left for good)",
                s.scenario,
                s.seed,
                s.build,
                s.cores,
                s.nodes_initial,
                s.nodes_total,
                s.nodes_departed
            ),
            format!(
                "phases: nodes started in {:.1} s, warm-up {:.1} s{}, timeline {:.1} s, drain {:.1} s{}, collect {:.1} s, stop {:.1} s, total {:.1} s",
                self.phases.start_nodes_s,
                self.phases.warmup_s,
                if self.phases.warmup_converged {
                    ""
                } else {
                    " (timed out)"
                },
                self.phases.timeline_s,
                self.phases.drain_s,
                if self.phases.drained {
                    ""
                } else {
                    " (bound hit)"
                },
                self.phases.collect_s,
                self.phases.stop_s,
                self.phases.total_s
            ),
            format!(
                "messages: {} accepted, {} delivered; delivery ratio {:.4}% of the {} that had to arrive (raw {:.4}%)",
                m.accepted,
                m.delivered,
                m.delivery_ratio * 100.0,
                m.delivered + m.missing,
                m.raw_delivery_ratio * 100.0
            ),
            format!(
                "  not delivered: {} missing, {} to nodes that left, {} from nodes that left, {} expired",
                m.missing, m.recipient_left, m.sender_left, m.expired
            ),
            format!(
                "  duplicates after ack: {}; redeliveries before ack: {}; misrouted: {}; sends failed: {:?}; skipped: {:?}",
                self.integrity.duplicates,
                self.integrity.redeliveries_before_ack,
                self.integrity.misrouted,
                self.sends.failed,
                self.sends.skipped
            ),
            format!(
                "latency send → consumer: p50 {} ms, p90 {} ms, p99 {} ms, max {} ms",
                ms(self.latency.p50_ms),
                ms(self.latency.p90_ms),
                ms(self.latency.p99_ms),
                ms(self.latency.max_ms)
            ),
            format!(
                "convergence: initial {} s; probes {} converged / {} not, every node saw a probe after {}",
                self.convergence
                    .initial_all_s
                    .map_or("-".into(), |v| format!("{v:.2}")),
                self.convergence.probes_converged,
                self.convergence.probes_not_converged,
                secs(&self.convergence.probe_all_s)
            ),
            format!(
                "joiners: late joiners held every running agent after {}; churn joiners after {}; {} not synced",
                secs(&self.convergence.late_join_sync_s),
                secs(&self.convergence.churn_join_sync_s),
                self.convergence.joiners_not_synced
            ),
            format!(
                "per node: received {}; bytes (estimated) {}",
                self.per_node.received.map_or("-".into(), |v| format!(
                    "median {:.0}, max {:.0}",
                    v.median, v.max
                )),
                self.per_node.bytes_est.map_or("-".into(), |v| format!(
                    "median {:.0}, max {:.0}",
                    v.median, v.max
                ))
            ),
            format!(
                "peak memory {} MiB; faults {:?}",
                self.peak_memory_mib
                    .map_or("-".into(), |v| format!("{v:.0}")),
                self.faults
            ),
        ];
        for p in &self.problems {
            l.push(format!("!! {p}"));
        }
        l.push(format!(
            "result: {}",
            if self.passed { "PASS" } else { "FAIL" }
        ));
        l
    }
}
