//! Test harness: real nodes in-process on 127.0.0.1 with ephemeral ports and
//! temporary data dirs, plus polling with deadlines (never fixed sleeps).
#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agentmesh::client::Client;
use agentmesh::{Node, NodeConfig, NodeHandle};
use libp2p::Multiaddr;
use serde_json::Value;

/// A fixed token keeps test clients simple.
pub const TOKEN: &str = "test-token-0123456789abcdef";

/// One real node.
pub struct TestNode {
    node: Option<Node>,
    pub config: NodeConfig,
    pub client: Client,
    pub node_id: String,
    pub dial_addr: Multiaddr,
    _dir: Option<tempfile::TempDir>,
}

/// Test config in `dir`: loopback, port 0, no mDNS, fast timers.
pub fn test_config(dir: &Path) -> NodeConfig {
    let mut cfg = NodeConfig::local_test(dir);
    cfg.api.token = Some(TOKEN.into());
    cfg
}

impl TestNode {
    /// Start a node in a fresh temp dir; `tweak` adjusts the config.
    pub async fn start(tweak: impl FnOnce(&mut NodeConfig)) -> TestNode {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cfg = test_config(dir.path());
        tweak(&mut cfg);
        let mut n = Self::start_with(cfg).await;
        n._dir = Some(dir);
        n
    }

    /// Start a node with exactly this config.
    pub async fn start_with(config: NodeConfig) -> TestNode {
        let node = Node::start(config.clone()).await.expect("node starts");
        let h = node.handle();
        let client = Client::new(h.api_addr().expect("api enabled"), TOKEN);
        let node_id = h.node_id().to_string();
        let dial_addr = h.dial_addr().expect("listening");
        drop(h);
        TestNode {
            node: Some(node),
            config,
            client,
            node_id,
            dial_addr,
            _dir: None,
        }
    }

    /// Handle to the running node (do not keep it across `restart`).
    pub fn handle(&self) -> NodeHandle {
        self.node.as_ref().expect("node running").handle()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.config.data_dir.clone()
    }

    /// Graceful stop.
    pub async fn stop(&mut self) {
        if let Some(n) = self.node.take() {
            n.shutdown().await;
        }
    }

    /// Abrupt stop, as a crash.
    pub async fn crash(&mut self) {
        if let Some(n) = self.node.take() {
            n.crash().await;
        }
    }

    /// Start again on the same data dir (new ephemeral ports).
    pub async fn restart(&mut self) {
        self.stop().await;
        self.start_again().await;
    }

    /// Start after `stop`/`crash`, on the same data dir and config.
    pub async fn start_again(&mut self) {
        assert!(self.node.is_none(), "node still running");
        let node = Node::start(self.config.clone())
            .await
            .expect("node restarts");
        let h = node.handle();
        self.client = Client::new(h.api_addr().expect("api enabled"), TOKEN);
        self.node_id = h.node_id().to_string();
        self.dial_addr = h.dial_addr().expect("listening");
        drop(h);
        self.node = Some(node);
    }

    pub fn is_running(&self) -> bool {
        self.node.is_some()
    }

    /// Node ids in this node's `/v1/peers`.
    pub async fn peer_ids(&self) -> Vec<String> {
        let v = self.client.get("/v1/peers").await.expect("GET /v1/peers");
        v.as_array()
            .expect("peers array")
            .iter()
            .filter_map(|p| p["node_id"].as_str().map(str::to_string))
            .collect()
    }
}

/// Start `n` nodes, each bootstrapped to the one before it.
pub async fn chain(n: usize, tweak: impl Fn(&mut NodeConfig)) -> Vec<TestNode> {
    let mut nodes: Vec<TestNode> = Vec::with_capacity(n);
    for i in 0..n {
        let prev = if i > 0 {
            Some(nodes[i - 1].dial_addr.clone())
        } else {
            None
        };
        let node = TestNode::start(|c| {
            if let Some(p) = prev {
                c.network.bootstrap = vec![p];
            }
            tweak(c);
        })
        .await;
        nodes.push(node);
    }
    nodes
}

/// Poll `f` every 50 ms until it returns `Some`, or panic after `timeout`
/// naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Poll until `f` is true.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(what, timeout, || {
        let fut = f();
        async move { fut.await.then_some(()) }
    })
    .await
}

/// A metric's value from `/metrics`.
pub async fn metric(client: &Client, name: &str) -> Option<f64> {
    let text = match client.get("/metrics").await.ok()? {
        Value::String(s) => s,
        _ => return None,
    };
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l[name.len()..].trim().parse().ok())
}

/// Install a tracing subscriber once (RUST_LOG controls it).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}
