//! Scenario files: the TOML format, its defaults, and validation.
//!
//! Every table denies unknown keys, so a typo is an error naming the key
//! instead of a silent default. Durations are strings (`"20s"`, `"1m30s"`,
//! `"500ms"`). The `[[events]]` timeline is described in `events`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::events::{self, Event, RawEvent};
use crate::config::{NodeConfig, TransportKind};

/// Why a scenario file cannot be used: the message names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ScenarioError {
    /// The scenario file.
    pub file: PathBuf,
    /// What is wrong, naming the key.
    pub message: String,
}

/// A duration written as a string, e.g. `"20s"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(s.trim()).map(Dur).map_err(|e| {
            serde::de::Error::custom(format!(
                "{s:?} is not a duration ({e}); write e.g. \"20s\", \"1m30s\" or \"500ms\""
            ))
        })
    }
}

fn dur(d: Option<Dur>, default: Duration) -> Duration {
    d.map_or(default, |d| d.0)
}

/// How the nodes bootstrap to each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TopologyKind {
    /// Each node bootstraps to `degree` random earlier nodes (seeded).
    Random,
    /// Node i bootstraps to node i-1.
    Chain,
    /// Every node bootstraps to node 0.
    Star,
}

/// A traffic pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pattern {
    /// A random agent sends to a random agent on a node that stays.
    RandomPairs,
    /// A random agent sends to every provider of a random capability.
    Fanout,
    /// A random agent sends to one provider of a random capability.
    CapabilityOne,
}

impl Pattern {
    /// The name used in files and summaries.
    pub fn as_str(self) -> &'static str {
        match self {
            Pattern::RandomPairs => "random_pairs",
            Pattern::Fanout => "fanout",
            Pattern::CapabilityOne => "capability_one",
        }
    }
}

/// The mesh: how many nodes, on what, joined how, with which agents.
#[derive(Debug, Clone, PartialEq)]
pub struct Mesh {
    /// Nodes at the start.
    pub nodes: usize,
    /// Memory transport (default) or loopback TCP.
    pub transport: TransportKind,
    /// Memory transport only: plaintext handshakes instead of noise
    /// (`security = "plaintext"`; see `NetworkConfig::memory_plaintext`).
    pub plaintext: bool,
    /// Bootstrap topology.
    pub topology: TopologyKind,
    /// Bootstrap peers per node (random topology, joiners, restarts).
    pub degree: usize,
    /// Agents registered on every node (joiners too).
    pub agents_per_node: usize,
    /// Distinct capabilities `sim/cap{k}` spread over the agents.
    pub capabilities: usize,
    /// Where node data dirs go (a fresh directory under it, removed after).
    pub data_dir: Option<PathBuf>,
}

/// The traffic the agents generate.
#[derive(Debug, Clone, PartialEq)]
pub struct Traffic {
    /// Sends per second, mesh-wide.
    pub rate: f64,
    /// Body size in bytes (a JSON string of that length).
    pub body_bytes: usize,
    /// Patterns with their weights.
    pub mix: Vec<(Pattern, u32)>,
    /// When sending starts (timeline time).
    pub start: Duration,
    /// When sending stops (timeline time).
    pub stop: Duration,
    /// Message TTL; the node default (`[delivery] ttl`) when `None`.
    pub ttl: Option<Duration>,
    /// Most sends in flight; a send due while all are busy is skipped and counted.
    pub max_in_flight: usize,
}

/// Ad convergence probes.
#[derive(Debug, Clone, PartialEq)]
pub struct Convergence {
    /// Register a probe agent this often (none when `None`).
    pub probe_every: Option<Duration>,
    /// How long a probe or a joiner's catch-up is watched.
    pub timeout: Duration,
    /// How often the nodes' registries are sampled.
    pub sample_every: Duration,
}

/// A parsed and validated scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Name (the file stem unless given).
    pub name: String,
    /// What it shows.
    pub description: String,
    /// Default seed (`--seed` overrides it).
    pub seed: u64,
    /// Length of the timeline (traffic and events).
    pub duration: Duration,
    /// Longest wait for the mesh to form and the first ads to spread.
    pub warmup_timeout: Duration,
    /// Longest wait, after the timeline, for every message to arrive.
    pub drain: Duration,
    /// Consumers keep polling this long after the drain, to catch duplicates.
    pub settle: Duration,
    /// The mesh.
    pub mesh: Mesh,
    /// The node configuration every node starts from (timer overrides applied).
    pub node: NodeConfig,
    /// Traffic (none when the file has no `[traffic]`).
    pub traffic: Option<Traffic>,
    /// Convergence probes.
    pub convergence: Convergence,
    /// The fault timeline, in file order.
    pub events: Vec<Event>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    name: Option<String>,
    description: Option<String>,
    seed: Option<u64>,
    duration: Dur,
    warmup_timeout: Option<Dur>,
    drain: Option<Dur>,
    settle: Option<Dur>,
    mesh: RawMesh,
    #[serde(default)]
    network: RawNetwork,
    #[serde(default)]
    discovery: RawDiscovery,
    #[serde(default)]
    delivery: RawDelivery,
    traffic: Option<RawTraffic>,
    #[serde(default)]
    convergence: RawConvergence,
    #[serde(default)]
    events: Vec<RawEvent>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMesh {
    nodes: usize,
    transport: Option<TransportKind>,
    security: Option<Security>,
    topology: Option<TopologyKind>,
    degree: Option<usize>,
    agents_per_node: Option<usize>,
    capabilities: Option<usize>,
    data_dir: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    idle_timeout: Option<Dur>,
    kad_bootstrap_interval: Option<Dur>,
    min_peers: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDiscovery {
    ad_ttl: Option<Dur>,
    refresh_interval: Option<Dur>,
    anti_entropy_interval: Option<Dur>,
    gossip: Option<bool>,
    anti_entropy: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDelivery {
    lease: Option<Dur>,
    max_deliveries: Option<u32>,
    ttl: Option<Dur>,
    retry_initial: Option<Dur>,
    retry_max: Option<Dur>,
    max_body_bytes: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTraffic {
    rate: f64,
    body_bytes: Option<usize>,
    pattern: Option<Pattern>,
    mix: Option<RawMix>,
    start: Option<Dur>,
    stop: Option<Dur>,
    ttl: Option<Dur>,
    max_in_flight: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMix {
    random_pairs: Option<u32>,
    fanout: Option<u32>,
    capability_one: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConvergence {
    probe_every: Option<Dur>,
    timeout: Option<Dur>,
    sample_every: Option<Dur>,
}

impl Scenario {
    /// Read and validate a scenario file.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|e| ScenarioError {
            file: path.to_path_buf(),
            message: format!("cannot read the scenario: {e}"),
        })?;
        Scenario::parse(path, &text)
    }

    /// Parse and validate scenario text; `path` names it in errors and
    /// gives the default name (its stem).
    pub fn parse(path: &Path, text: &str) -> Result<Scenario, ScenarioError> {
        let fail = |message: String| ScenarioError {
            file: path.to_path_buf(),
            message,
        };
        let raw: RawScenario = toml::from_str(text).map_err(|e| fail(e.to_string()))?;
        build(path, raw).map_err(fail)
    }

    /// The traffic's message TTL.
    pub fn message_ttl(&self) -> Duration {
        self.traffic
            .as_ref()
            .and_then(|t| t.ttl)
            .unwrap_or(self.node.delivery.default_ttl)
    }
}

fn build(path: &Path, raw: RawScenario) -> Result<Scenario, String> {
    let name = match raw.name {
        Some(n) => n,
        None => path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("scenario")
            .to_string(),
    };
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(format!(
            "name: {name:?} must be letters, digits, '-', '_' or '.' (it names the results directory)"
        ));
    }
    let duration = raw.duration.0;
    if duration.is_zero() {
        return Err("duration must be positive".into());
    }
    let mesh = build_mesh(raw.mesh)?;
    let mut node = build_node(&raw.network, &raw.discovery, &raw.delivery, mesh.transport)?;
    node.network.memory_plaintext = mesh.plaintext;
    let traffic = raw
        .traffic
        .map(|t| build_traffic(t, duration, &node))
        .transpose()?;
    let convergence = Convergence {
        probe_every: raw.convergence.probe_every.map(|d| d.0),
        timeout: dur(raw.convergence.timeout, Duration::from_secs(60)),
        sample_every: dur(raw.convergence.sample_every, Duration::from_millis(250)),
    };
    if convergence.probe_every.is_some_and(|d| d.is_zero()) {
        return Err("convergence.probe_every must be positive".into());
    }
    if convergence.timeout.is_zero() || convergence.sample_every.is_zero() {
        return Err("convergence.timeout and convergence.sample_every must be positive".into());
    }
    let events = raw
        .events
        .into_iter()
        .enumerate()
        .map(|(i, e)| events::build(i, e, duration))
        .collect::<Result<Vec<_>, _>>()?;
    let ttl = traffic
        .as_ref()
        .and_then(|t| t.ttl)
        .unwrap_or(node.delivery.default_ttl);
    Ok(Scenario {
        name,
        description: raw.description.unwrap_or_default(),
        seed: raw.seed.unwrap_or(1),
        duration,
        warmup_timeout: dur(raw.warmup_timeout, Duration::from_secs(180)),
        drain: dur(raw.drain, (ttl * 2).min(Duration::from_secs(180))),
        settle: dur(raw.settle, Duration::from_secs(3)),
        mesh,
        node,
        traffic,
        convergence,
        events,
    })
}

/// How simulated nodes secure their connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Security {
    /// Noise, as every real node.
    Noise,
    /// libp2p's plaintext handshake: memory transport only.
    Plaintext,
}

fn build_mesh(m: RawMesh) -> Result<Mesh, String> {
    if m.nodes < 2 {
        return Err(format!(
            "mesh.nodes is {}; a mesh needs at least 2",
            m.nodes
        ));
    }
    let mesh = Mesh {
        nodes: m.nodes,
        transport: m.transport.unwrap_or(TransportKind::Memory),
        plaintext: m.security == Some(Security::Plaintext),
        topology: m.topology.unwrap_or(TopologyKind::Random),
        degree: m.degree.unwrap_or(3),
        agents_per_node: m.agents_per_node.unwrap_or(1),
        capabilities: m.capabilities.unwrap_or(10),
        data_dir: m.data_dir,
    };
    if mesh.plaintext && mesh.transport != TransportKind::Memory {
        return Err(
            "mesh.security = \"plaintext\" needs transport = \"memory\" (TCP connections are always noise)"
                .into(),
        );
    }
    if mesh.degree == 0 {
        return Err("mesh.degree must be at least 1".into());
    }
    if mesh.agents_per_node == 0 {
        return Err("mesh.agents_per_node must be at least 1".into());
    }
    if mesh.capabilities == 0 {
        return Err("mesh.capabilities must be at least 1".into());
    }
    Ok(mesh)
}

/// The base node configuration with the scenario's timer overrides,
/// validated like a node's own configuration.
fn build_node(
    n: &RawNetwork,
    d: &RawDiscovery,
    l: &RawDelivery,
    transport: TransportKind,
) -> Result<NodeConfig, String> {
    let mut c = crate::cluster::ClusterOptions {
        transport,
        topology: crate::cluster::Topology::Chain,
        root: PathBuf::from("."),
    }
    .node_config(".");
    let net = &mut c.network;
    net.idle_timeout = dur(n.idle_timeout, net.idle_timeout);
    net.kad_bootstrap_interval = dur(n.kad_bootstrap_interval, net.kad_bootstrap_interval);
    net.min_peers = n.min_peers.unwrap_or(net.min_peers);
    let disc = &mut c.discovery;
    disc.ad_ttl = dur(d.ad_ttl, disc.ad_ttl);
    disc.refresh_interval = dur(d.refresh_interval, disc.refresh_interval);
    disc.anti_entropy_interval = dur(d.anti_entropy_interval, disc.anti_entropy_interval);
    disc.gossip = d.gossip.unwrap_or(disc.gossip);
    disc.anti_entropy = d.anti_entropy.unwrap_or(disc.anti_entropy);
    let del = &mut c.delivery;
    del.lease = dur(l.lease, del.lease);
    del.max_deliveries = l.max_deliveries.unwrap_or(del.max_deliveries);
    del.default_ttl = dur(l.ttl, del.default_ttl);
    del.retry_initial = dur(l.retry_initial, del.retry_initial);
    del.retry_max = dur(l.retry_max, del.retry_max);
    del.max_body_bytes = l.max_body_bytes.unwrap_or(del.max_body_bytes);
    if del.retry_initial.is_zero() || del.retry_max < del.retry_initial {
        return Err(
            "delivery.retry_initial must be positive and at most delivery.retry_max".into(),
        );
    }
    c.validate().map_err(|e| {
        format!("the [network], [discovery] and [delivery] tables give an invalid node configuration: {e}")
    })?;
    Ok(c)
}

fn build_traffic(t: RawTraffic, duration: Duration, node: &NodeConfig) -> Result<Traffic, String> {
    if !(t.rate.is_finite() && t.rate > 0.0) {
        return Err(format!("traffic.rate is {}; it must be above 0", t.rate));
    }
    let mix = match (t.pattern, t.mix) {
        (Some(_), Some(_)) => {
            return Err("traffic: give either pattern or mix, not both".into());
        }
        (Some(p), None) => vec![(p, 1)],
        (None, None) => vec![(Pattern::RandomPairs, 1)],
        (None, Some(m)) => [
            (Pattern::RandomPairs, m.random_pairs),
            (Pattern::Fanout, m.fanout),
            (Pattern::CapabilityOne, m.capability_one),
        ]
        .into_iter()
        .filter_map(|(p, w)| w.filter(|w| *w > 0).map(|w| (p, w)))
        .collect(),
    };
    if mix.is_empty() {
        return Err("traffic.mix gives no pattern a weight above 0".into());
    }
    let traffic = Traffic {
        rate: t.rate,
        body_bytes: t.body_bytes.unwrap_or(256),
        mix,
        start: dur(t.start, Duration::ZERO),
        stop: dur(t.stop, duration),
        ttl: t.ttl.map(|d| d.0),
        max_in_flight: t.max_in_flight.unwrap_or(256),
    };
    if traffic.body_bytes < 2 || traffic.body_bytes > node.delivery.max_body_bytes {
        return Err(format!(
            "traffic.body_bytes must be between 2 and delivery.max_body_bytes ({})",
            node.delivery.max_body_bytes
        ));
    }
    if traffic.stop > duration || traffic.start >= traffic.stop {
        return Err(format!(
            "traffic.start ({:?}) must be before traffic.stop ({:?}), which must not be after duration ({:?})",
            traffic.start, traffic.stop, duration
        ));
    }
    if traffic.ttl.is_some_and(|d| d.is_zero()) {
        return Err("traffic.ttl must be positive".into());
    }
    if traffic.max_in_flight == 0 {
        return Err("traffic.max_in_flight must be at least 1".into());
    }
    Ok(traffic)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Scenario, String> {
        Scenario::parse(Path::new("simulations/t.toml"), text).map_err(|e| e.to_string())
    }

    const MIN: &str = "duration = \"60s\"\n[mesh]\nnodes = 10\n";

    #[test]
    fn minimal_scenario_gets_defaults() {
        let s = parse(MIN).unwrap();
        assert_eq!(s.name, "t");
        assert_eq!(s.duration, Duration::from_secs(60));
        assert_eq!(s.mesh.transport, TransportKind::Memory);
        assert_eq!(s.mesh.topology, TopologyKind::Random);
        assert!(s.traffic.is_none() && s.events.is_empty());
        assert_eq!(s.seed, 1);
    }

    #[test]
    fn plaintext_is_for_the_memory_transport_only() {
        let s =
            parse(&MIN.replace("nodes = 10\n", "nodes = 10\nsecurity = \"plaintext\"\n")).unwrap();
        assert!(s.mesh.plaintext && s.node.network.memory_plaintext);
        assert!(!parse(MIN).unwrap().node.network.memory_plaintext);
        let e = parse(&MIN.replace(
            "nodes = 10\n",
            "nodes = 10\ntransport = \"tcp\"\nsecurity = \"plaintext\"\n",
        ))
        .unwrap_err();
        assert!(e.contains("mesh.security"), "{e}");
        let e =
            parse(&MIN.replace("nodes = 10\n", "nodes = 10\nsecurity = \"none\"\n")).unwrap_err();
        assert!(e.contains("security"), "{e}");
    }

    #[test]
    fn unknown_keys_are_named_with_the_file() {
        for (text, key) in [
            (format!("{MIN}colour = 1\n"), "colour"),
            (
                format!("{MIN}nodez = 3\n")
                    .replace("[mesh]\nnodes = 10\n", "[mesh]\nnodes = 10\nnodez = 3\n"),
                "nodez",
            ),
            (format!("{MIN}[delivery]\nleese = \"1s\"\n"), "leese"),
            (
                format!("{MIN}[traffic]\nrate = 1\nmix = {{ broadcast = 1 }}\n"),
                "broadcast",
            ),
            (
                format!("{MIN}[[events]]\nat = \"1s\"\nkind = \"heal\"\nwhen = 3\n"),
                "when",
            ),
        ] {
            let e = parse(&text).unwrap_err();
            assert!(
                e.contains("simulations/t.toml") && e.contains(key),
                "{key}: {e}"
            );
        }
    }

    #[test]
    fn bad_values_are_errors_not_panics() {
        for (text, needle) in [
            (
                "duration = \"soon\"\n[mesh]\nnodes = 10\n",
                "not a duration",
            ),
            ("duration = \"60s\"\n[mesh]\nnodes = 1\n", "mesh.nodes"),
            (&format!("{MIN}[traffic]\nrate = 0\n"), "traffic.rate"),
            (
                &format!("{MIN}[traffic]\nrate = 5\nstop = \"90s\"\n"),
                "traffic.stop",
            ),
            (
                &format!(
                    "{MIN}[traffic]\nrate = 5\npattern = \"fanout\"\nmix = {{ fanout = 1 }}\n"
                ),
                "either pattern or mix",
            ),
            (
                &format!("{MIN}[discovery]\nad_ttl = \"10s\"\nrefresh_interval = \"20s\"\n"),
                "refresh",
            ),
            (&format!("{MIN}[mesh.extra]\n"), "extra"),
            ("duration = \"60s\"\n", "mesh"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(needle), "{needle}: {e}");
        }
    }

    #[test]
    fn overrides_reach_the_node_config() {
        let s = parse(&format!(
            "{MIN}[delivery]\nlease = \"5s\"\nretry_max = \"4s\"\nttl = \"10m\"\n[discovery]\nanti_entropy_interval = \"7s\"\n[traffic]\nrate = 20\nmix = {{ random_pairs = 3, fanout = 1 }}\n"
        ))
        .unwrap();
        assert_eq!(s.node.delivery.lease, Duration::from_secs(5));
        assert_eq!(s.node.delivery.retry_max, Duration::from_secs(4));
        assert_eq!(
            s.node.discovery.anti_entropy_interval,
            Duration::from_secs(7)
        );
        assert_eq!(s.message_ttl(), Duration::from_secs(600));
        assert_eq!(s.drain, Duration::from_secs(180));
        let t = s.traffic.unwrap();
        assert_eq!(t.mix, vec![(Pattern::RandomPairs, 3), (Pattern::Fanout, 1)]);
        assert_eq!(t.stop, Duration::from_secs(60));
    }
}
