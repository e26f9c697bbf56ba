//! Node configuration: built-in defaults that make a bare `agentmesh node`
//! work, a TOML file format, and validation.
//!
//! Precedence is applied by the caller (the CLI): defaults, then the file,
//! then flags. Everything here is plain data plus `validate`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use libp2p::Multiaddr;
use serde::{Deserialize, Serialize};

/// Default libp2p port (TCP and QUIC).
pub const DEFAULT_P2P_PORT: u16 = 7710;
/// Default address of the local HTTP API.
pub const DEFAULT_API_ADDR: &str = "127.0.0.1:7700";
/// Default mesh name.
pub const DEFAULT_MESH: &str = "default";
/// Name of the config file `agentmesh init` writes into the data dir.
pub const CONFIG_FILE_NAME: &str = "config.toml";

/// Errors loading or validating a configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has unknown / mistyped keys.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML parser's explanation (line, column, key).
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// No home directory to put the default data dir in.
    #[error("no data dir given and neither $AGENTMESH_DATA nor $HOME is set")]
    NoDataDir,
}

/// Which libp2p transport a node uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// TCP and QUIC: real deployments.
    #[default]
    Tcp,
    /// libp2p's in-process memory transport: simulations of many nodes.
    Memory,
}

/// The whole node configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeConfig {
    /// Where keys, the database and the API token live.
    pub data_dir: PathBuf,
    /// Mesh name: nodes of different meshes never join each other's DHT or topics.
    pub mesh: String,
    /// Peer-to-peer networking.
    pub network: NetworkConfig,
    /// The local HTTP API.
    pub api: ApiConfig,
    /// Agent advertisement and registry timing.
    pub discovery: DiscoveryConfig,
    /// Message delivery parameters.
    pub delivery: DeliveryConfig,
}

/// Peer-to-peer settings.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkConfig {
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// True when `listen` is the built-in default: a taken port then falls
    /// back to an OS-chosen one with a warning instead of failing.
    pub listen_is_default: bool,
    /// Peers dialled at start and redialled with backoff when dropped.
    pub bootstrap: Vec<Multiaddr>,
    /// mDNS discovery of nodes on the LAN.
    pub mdns: bool,
    /// Transport family.
    pub transport: TransportKind,
    /// Connections we opened are closed when no request crossed them for
    /// this long, unless the peer is a gossip mesh neighbour or one of our
    /// bootstrap peers.
    pub idle_timeout: Duration,
    /// Idle connections are only closed while more peers than this are connected.
    pub min_peers: usize,
    /// Interval of the periodic Kademlia bootstrap (routing table refresh).
    pub kad_bootstrap_interval: Duration,
    /// Memory transport only: authenticate peers with libp2p's plaintext
    /// handshake (keys exchanged, nothing encrypted) instead of noise.
    /// Simulations of hundreds of nodes in one process set it, where noise
    /// handshakes and encryption were a third of the CPU. Not settable from
    /// a node's configuration file, and refused with the TCP transport.
    pub memory_plaintext: bool,
}

/// Local HTTP API settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiConfig {
    /// Serve the API at all (simulations run nodes without it).
    pub enabled: bool,
    /// Address to bind.
    pub listen: SocketAddr,
    /// True when `listen` is the built-in default (falls back to port 0 if taken).
    pub listen_is_default: bool,
    /// Fixed bearer token; when `None` one is generated into `<data_dir>/api-token`.
    pub token: Option<String>,
    /// Maximum request body size in bytes.
    pub max_body_bytes: usize,
    /// Whether `/metrics` needs the bearer token.
    pub metrics_need_token: bool,
}

/// Discovery timing.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscoveryConfig {
    /// Lifetime of an advertisement: not refreshed within it, it expires.
    pub ad_ttl: Duration,
    /// How often local agents' ads are re-issued (must be well under `ad_ttl`).
    pub refresh_interval: Duration,
    /// How often registry digests are exchanged with connected peers.
    pub anti_entropy_interval: Duration,
    /// Spread ads over gossipsub (the fast path). Off only for experiments.
    pub gossip: bool,
    /// Reconcile registries with peers on connect and periodically. Off
    /// only for experiments: without it late joiners rely on the DHT.
    pub anti_entropy: bool,
}

/// Delivery parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryConfig {
    /// Visibility timeout of a message handed to an agent.
    pub lease: Duration,
    /// Offers before a message goes to the dead-letter state.
    pub max_deliveries: u32,
    /// Default message time to live.
    pub default_ttl: Duration,
    /// Maximum size of a message body (JSON bytes).
    pub max_body_bytes: usize,
    /// First retry delay when a recipient's node is unreachable.
    pub retry_initial: Duration,
    /// Largest retry delay.
    pub retry_max: Duration,
    /// How long tracking of a finished message is kept.
    pub tracking_retention: Duration,
    /// How long a delivered message's status waits in memory for its
    /// receipt before it is written on its own (`delivery::handed`). Not
    /// in the config file: a tuning of the write path.
    pub hold_delivered: Duration,
}

impl NodeConfig {
    /// Built-in defaults for the given data dir.
    pub fn with_data_dir(data_dir: impl Into<PathBuf>) -> Self {
        NodeConfig {
            data_dir: data_dir.into(),
            mesh: DEFAULT_MESH.to_string(),
            network: NetworkConfig::default(),
            api: ApiConfig::default(),
            discovery: DiscoveryConfig::default(),
            delivery: DeliveryConfig::default(),
        }
    }

    /// A configuration for tests and local simulations: loopback, port 0,
    /// no mDNS, API on an ephemeral loopback port.
    pub fn local_test(data_dir: impl Into<PathBuf>) -> Self {
        let mut cfg = Self::with_data_dir(data_dir);
        cfg.network.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("static multiaddr")];
        cfg.network.listen_is_default = false;
        cfg.network.mdns = false;
        cfg.api.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        cfg.api.listen_is_default = false;
        cfg
    }

    /// Apply a parsed config file on top of `self`.
    pub fn apply_file(&mut self, file: FileConfig) -> Result<(), Error> {
        if let Some(d) = file.data_dir {
            self.data_dir = d;
        }
        if let Some(m) = file.mesh {
            self.mesh = m;
        }
        if let Some(n) = file.network {
            if let Some(l) = n.listen {
                self.network.listen = parse_addrs("network.listen", &l)?;
                self.network.listen_is_default = false;
            }
            if let Some(b) = n.bootstrap {
                self.network.bootstrap = parse_addrs("network.bootstrap", &b)?;
            }
            if let Some(m) = n.mdns {
                self.network.mdns = m;
            }
            if let Some(t) = n.transport {
                self.network.transport = t;
            }
            if let Some(s) = n.idle_timeout_secs {
                self.network.idle_timeout = Duration::from_secs(s);
            }
            if let Some(m) = n.min_peers {
                self.network.min_peers = m;
            }
            if let Some(s) = n.kad_bootstrap_secs {
                self.network.kad_bootstrap_interval = Duration::from_secs(s);
            }
        }
        if let Some(a) = file.api {
            if let Some(e) = a.enabled {
                self.api.enabled = e;
            }
            if let Some(l) = a.listen {
                self.api.listen = l.parse().map_err(|e| {
                    Error::Invalid(format!("api.listen {l:?} is not a socket address: {e}"))
                })?;
                self.api.listen_is_default = false;
            }
            if let Some(t) = a.token {
                self.api.token = Some(t);
            }
            if let Some(b) = a.max_body_bytes {
                self.api.max_body_bytes = b;
            }
            if let Some(m) = a.metrics_need_token {
                self.api.metrics_need_token = m;
            }
        }
        if let Some(d) = file.discovery {
            if let Some(s) = d.ad_ttl_secs {
                self.discovery.ad_ttl = Duration::from_secs(s);
            }
            if let Some(s) = d.refresh_secs {
                self.discovery.refresh_interval = Duration::from_secs(s);
            }
            if let Some(s) = d.anti_entropy_secs {
                self.discovery.anti_entropy_interval = Duration::from_secs(s);
            }
            if let Some(g) = d.gossip {
                self.discovery.gossip = g;
            }
            if let Some(a) = d.anti_entropy {
                self.discovery.anti_entropy = a;
            }
        }
        if let Some(d) = file.delivery {
            if let Some(s) = d.lease_secs {
                self.delivery.lease = Duration::from_secs(s);
            }
            if let Some(m) = d.max_deliveries {
                self.delivery.max_deliveries = m;
            }
            if let Some(s) = d.default_ttl_secs {
                self.delivery.default_ttl = Duration::from_secs(s);
            }
            if let Some(b) = d.max_body_bytes {
                self.delivery.max_body_bytes = b;
            }
            if let Some(s) = d.tracking_retention_secs {
                self.delivery.tracking_retention = Duration::from_secs(s);
            }
        }
        Ok(())
    }

    /// Check every value; the error names the offending key.
    pub fn validate(&self) -> Result<(), Error> {
        validate_mesh_name(&self.mesh)?;
        if self.network.listen.is_empty() {
            return Err(Error::Invalid(
                "network.listen must name at least one address".into(),
            ));
        }
        if self.network.idle_timeout < Duration::from_secs(1) {
            return Err(Error::Invalid(
                "network.idle_timeout_secs must be at least 1".into(),
            ));
        }
        if self.network.kad_bootstrap_interval < Duration::from_secs(1) {
            return Err(Error::Invalid(
                "network.kad_bootstrap_secs must be at least 1".into(),
            ));
        }
        if self.network.memory_plaintext && self.network.transport != TransportKind::Memory {
            return Err(Error::Invalid(
                "unencrypted connections (memory_plaintext) exist only on the memory transport"
                    .into(),
            ));
        }
        if self.api.token.as_deref().is_some_and(|t| t.len() < 16) {
            return Err(Error::Invalid(
                "api.token must be at least 16 characters".into(),
            ));
        }
        if self.api.max_body_bytes < 1024 {
            return Err(Error::Invalid(
                "api.max_body_bytes must be at least 1024".into(),
            ));
        }
        let d = &self.discovery;
        if d.ad_ttl < Duration::from_secs(1) {
            return Err(Error::Invalid(
                "discovery.ad_ttl_secs must be at least 1".into(),
            ));
        }
        if d.refresh_interval.is_zero() || d.refresh_interval >= d.ad_ttl {
            return Err(Error::Invalid(
                "discovery.refresh_secs must be positive and below discovery.ad_ttl_secs".into(),
            ));
        }
        if d.anti_entropy_interval.is_zero() {
            return Err(Error::Invalid(
                "discovery.anti_entropy_secs must be positive".into(),
            ));
        }
        let del = &self.delivery;
        if del.lease.is_zero() {
            return Err(Error::Invalid(
                "delivery.lease_secs must be positive".into(),
            ));
        }
        if del.max_deliveries == 0 {
            return Err(Error::Invalid(
                "delivery.max_deliveries must be at least 1".into(),
            ));
        }
        if del.default_ttl.is_zero() {
            return Err(Error::Invalid(
                "delivery.default_ttl_secs must be positive".into(),
            ));
        }
        if del.max_body_bytes == 0 || del.max_body_bytes > crate::wire::MAX_BODY_BYTES {
            return Err(Error::Invalid(format!(
                "delivery.max_body_bytes must be between 1 and {}",
                crate::wire::MAX_BODY_BYTES
            )));
        }
        Ok(())
    }
}

/// Mesh names become part of protocol ids and topics.
pub fn validate_mesh_name(mesh: &str) -> Result<(), Error> {
    let ok = !mesh.is_empty()
        && mesh.len() <= 64
        && mesh
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "mesh name {mesh:?} must be 1-64 characters of a-z, 0-9, '-' or '_'"
        )))
    }
}

fn parse_addrs(key: &str, raw: &[String]) -> Result<Vec<Multiaddr>, Error> {
    raw.iter()
        .map(|s| {
            s.parse::<Multiaddr>()
                .map_err(|e| Error::Invalid(format!("{key}: {s:?} is not a multiaddr: {e}")))
        })
        .collect()
}

/// The data dir when none is given: `$AGENTMESH_DATA`, else `~/.agentmesh`.
pub fn default_data_dir() -> Result<PathBuf, Error> {
    if let Some(d) = std::env::var_os("AGENTMESH_DATA").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or(Error::NoDataDir)?;
    Ok(PathBuf::from(home).join(".agentmesh"))
}

impl Default for NetworkConfig {
    fn default() -> Self {
        let p = DEFAULT_P2P_PORT;
        NetworkConfig {
            listen: vec![
                format!("/ip4/0.0.0.0/tcp/{p}")
                    .parse()
                    .expect("static multiaddr"),
                format!("/ip4/0.0.0.0/udp/{p}/quic-v1")
                    .parse()
                    .expect("static multiaddr"),
            ],
            listen_is_default: true,
            bootstrap: Vec::new(),
            mdns: true,
            transport: TransportKind::Tcp,
            idle_timeout: Duration::from_secs(60),
            min_peers: 16,
            kad_bootstrap_interval: Duration::from_secs(300),
            memory_plaintext: false,
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            enabled: true,
            listen: DEFAULT_API_ADDR.parse().expect("static socket address"),
            listen_is_default: true,
            token: None,
            max_body_bytes: 1024 * 1024 + 64 * 1024,
            metrics_need_token: false,
        }
    }
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            ad_ttl: Duration::from_secs(600),
            refresh_interval: Duration::from_secs(180),
            anti_entropy_interval: Duration::from_secs(30),
            gossip: true,
            anti_entropy: true,
        }
    }
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            lease: Duration::from_secs(30),
            max_deliveries: 10,
            default_ttl: Duration::from_secs(86_400),
            max_body_bytes: 1024 * 1024,
            retry_initial: Duration::from_millis(500),
            retry_max: Duration::from_secs(60),
            tracking_retention: Duration::from_secs(7 * 86_400),
            hold_delivered: Duration::from_secs(1),
        }
    }
}

/// The TOML file, every key optional. Unknown keys are an error so typos
/// do not silently fall back to defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Data directory.
    pub data_dir: Option<PathBuf>,
    /// Mesh name.
    pub mesh: Option<String>,
    /// `[network]`.
    pub network: Option<FileNetwork>,
    /// `[api]`.
    pub api: Option<FileApi>,
    /// `[discovery]`.
    pub discovery: Option<FileDiscovery>,
    /// `[delivery]`.
    pub delivery: Option<FileDelivery>,
}

/// `[network]` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileNetwork {
    /// Listen multiaddrs.
    pub listen: Option<Vec<String>>,
    /// Bootstrap multiaddrs.
    pub bootstrap: Option<Vec<String>>,
    /// mDNS on/off.
    pub mdns: Option<bool>,
    /// `tcp` or `memory`.
    pub transport: Option<TransportKind>,
    /// Idle connection timeout.
    pub idle_timeout_secs: Option<u64>,
    /// Connected peers kept even when idle.
    pub min_peers: Option<usize>,
    /// Period of the DHT routing-table refresh.
    pub kad_bootstrap_secs: Option<u64>,
}

/// `[api]` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileApi {
    /// Serve the API.
    pub enabled: Option<bool>,
    /// Socket address.
    pub listen: Option<String>,
    /// Fixed bearer token.
    pub token: Option<String>,
    /// Request body limit.
    pub max_body_bytes: Option<usize>,
    /// Protect `/metrics` with the token.
    pub metrics_need_token: Option<bool>,
}

/// `[discovery]` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDiscovery {
    /// Ad lifetime.
    pub ad_ttl_secs: Option<u64>,
    /// Ad refresh interval.
    pub refresh_secs: Option<u64>,
    /// Anti-entropy interval.
    pub anti_entropy_secs: Option<u64>,
    /// Gossip ads.
    pub gossip: Option<bool>,
    /// Run anti-entropy.
    pub anti_entropy: Option<bool>,
}

/// `[delivery]` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDelivery {
    /// Visibility timeout.
    pub lease_secs: Option<u64>,
    /// Offers before dead-letter.
    pub max_deliveries: Option<u32>,
    /// Default message TTL.
    pub default_ttl_secs: Option<u64>,
    /// Body limit.
    pub max_body_bytes: Option<usize>,
    /// Tracking retention of finished messages.
    pub tracking_retention_secs: Option<u64>,
}

impl FileConfig {
    /// Read and parse a config file.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parse config text; `path` is only used in error messages.
    pub fn parse(path: &Path, text: &str) -> Result<Self, Error> {
        toml::from_str(text).map_err(|e| Error::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }
}

/// The commented config file `agentmesh init` writes.
pub fn commented_template(mesh: &str) -> String {
    format!(
        r#"# agentmesh node configuration. Every key is optional; flags override this file.

# Nodes with different mesh names never join each other's DHT or topics.
mesh = "{mesh}"

[network]
# Where libp2p listens (TCP and QUIC). A taken default port falls back to a random one.
# listen = ["/ip4/0.0.0.0/tcp/{p}", "/ip4/0.0.0.0/udp/{p}/quic-v1"]
# Peers dialled at start and redialled when the connection drops.
# bootstrap = ["/ip4/203.0.113.7/tcp/{p}/p2p/12D3KooW..."]
# Find nodes of this mesh on the LAN.
# mdns = true
# Connections with no requests for this long are closed (gossip neighbours and
# bootstrap peers excepted), as long as more than min_peers stay connected.
# idle_timeout_secs = 60
# min_peers = 16
# How often the DHT routing table is refreshed (each refresh contacts many peers).
# kad_bootstrap_secs = 300

[api]
# The local HTTP API. Keep it on loopback unless you know why not.
# listen = "{api}"
# A fixed bearer token; by default one is generated into <data_dir>/api-token.
# token = "a-long-random-string"
# max_body_bytes = 1114112

[discovery]
# ad_ttl_secs = 600
# refresh_secs = 180
# anti_entropy_secs = 30
# Experiments only: turn off a spreading mechanism to see the others at work.
# gossip = true
# anti_entropy = true

[delivery]
# lease_secs = 30
# max_deliveries = 10
# default_ttl_secs = 86400
# max_body_bytes = 1048576
# How long the status of a finished message stays queryable.
# tracking_retention_secs = 604800
"#,
        p = DEFAULT_P2P_PORT,
        api = DEFAULT_API_ADDR
    )
}

#[cfg(test)]
mod tests;
