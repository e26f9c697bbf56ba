//! A node: opens the store, starts the network, the services and the API,
//! and hands out the [`NodeHandle`] façade.
//!
//! [`Node`] owns the running parts and is the only thing that can stop them;
//! [`NodeHandle`] is the cheap clone the API and tests use to ask questions.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::config::{self, NodeConfig};
use crate::delivery::{self, Delivery};
use crate::discovery::{self, Discovery};
use crate::identity::{self, NodeKey};
use crate::net::{self, EventLoop, NetHandle, PeerInfo};
use crate::routing::Router;
use crate::store::{self, Store, WriterThread};
use crate::wire;

/// File holding the generated API token.
pub const TOKEN_FILE: &str = "api-token";
/// File the node writes its actual API address into (for CLI clients).
pub const API_ADDR_FILE: &str = "api-addr";
/// How long shutdown waits for tasks before aborting them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] config::Error),
    /// The data dir could not be created or used.
    #[error("data dir {path}: {source}")]
    DataDir {
        /// Directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Keys could not be loaded or created.
    #[error(transparent)]
    Identity(#[from] identity::Error),
    /// The database could not be opened.
    #[error(transparent)]
    Store(#[from] store::OpenError),
    /// The network could not start.
    #[error(transparent)]
    Net(#[from] net::StartError),
    /// Discovery could not start (its stored state is unreadable).
    #[error("discovery: {0}")]
    Discovery(#[from] discovery::Error),
    /// Delivery could not start (its stored state is unreadable).
    #[error("delivery: {0}")]
    Delivery(#[from] delivery::Error),
    /// The API address could not be bound.
    #[error("cannot bind the API on {addr}: {source}")]
    ApiBind {
        /// Address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Facts about the node for `/v1/node`.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// PeerId.
    pub node_id: PeerId,
    /// Mesh name.
    pub mesh: String,
    /// Listen addresses.
    pub listen_addrs: Vec<Multiaddr>,
    /// API address, when serving.
    pub api: Option<SocketAddr>,
    /// Identified peers connected now.
    pub peers_connected: usize,
    /// Agents registered on this node.
    pub agents_local: usize,
    /// Seconds since start.
    pub uptime_secs: u64,
}

struct Inner {
    node_id: PeerId,
    key: NodeKey,
    config: NodeConfig,
    net: NetHandle,
    store: Store,
    discovery: Discovery,
    router: Arc<Router>,
    delivery: Delivery,
    started: Instant,
    listen_addrs: Vec<Multiaddr>,
    api_addr: OnceLock<SocketAddr>,
    token: String,
    cancel: CancellationToken,
}

/// Cheap, cloneable façade over a running node.
#[derive(Clone)]
pub struct NodeHandle {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NodeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeHandle")
            .field("node_id", &self.inner.node_id)
            .finish()
    }
}

/// A running node. Dropping it without `shutdown` aborts its tasks.
pub struct Node {
    handle: Option<NodeHandle>,
    /// The node's tasks, named for the logs.
    tasks: Vec<(&'static str, JoinHandle<()>)>,
    writer: Option<WriterThread>,
}

impl Node {
    /// Start a node: keys, database, network, services, API.
    pub async fn start(config: NodeConfig) -> Result<Node, StartError> {
        config.validate()?;
        create_data_dir(&config.data_dir)?;
        let key = NodeKey::load_or_create(&config.data_dir)?;
        let node_id = key.peer_id();
        let span = info_span!("node", id = %short(&node_id));
        let (store, writer) = Store::open(&config.data_dir)?;
        let cancel = CancellationToken::new();
        let mut tasks = Vec::new();
        match Self::assemble(config, key, span, store, &mut tasks, cancel.clone()).await {
            Ok(handle) => Ok(Node {
                handle: Some(handle),
                tasks,
                writer: Some(writer),
            }),
            Err(e) => {
                // Undo what started, and close the database, so that a
                // caller may retry at once without finding it in use.
                cancel.cancel();
                for (_, t) in tasks {
                    t.abort();
                    let _ = t.await;
                }
                let join = tokio::task::spawn_blocking(move || writer.join());
                if tokio::time::timeout(SHUTDOWN_GRACE, join).await.is_err() {
                    warn!("the database stayed open after a failed start");
                }
                Err(e)
            }
        }
    }

    /// Everything of `start` after the database is open; tasks it spawns go
    /// into `tasks` so a failure can stop them.
    async fn assemble(
        config: NodeConfig,
        key: NodeKey,
        span: tracing::Span,
        store: Store,
        tasks: &mut Vec<(&'static str, JoinHandle<()>)>,
        cancel: CancellationToken,
    ) -> Result<NodeHandle, StartError> {
        let node_id = key.peer_id();
        let token = load_or_create_token(&config)?;

        let (net, commands) = NetHandle::channel(node_id);
        let (events_tx, events_rx) = mpsc::channel(net::EVENT_QUEUE);
        let event_loop = EventLoop::start(
            key.keypair(),
            &config.mesh,
            &config.network,
            commands,
            events_tx,
        )
        .instrument(span.clone())
        .await?;
        let listen_addrs = event_loop.listen_addrs().to_vec();
        tasks.push((
            "network",
            tokio::spawn(event_loop.run().instrument(span.clone())),
        ));

        let discovery = Discovery::start(
            key.clone(),
            &config.mesh,
            &listen_addrs,
            net.clone(),
            store.clone(),
            config.discovery.clone(),
        )
        .instrument(span.clone())
        .await?;
        tasks.push((
            "discovery",
            tokio::spawn(
                discovery
                    .clone()
                    .run(cancel.clone())
                    .instrument(span.clone()),
            ),
        ));
        let router = Arc::new(Router::new(discovery.clone()));
        let (delivery, courier) = Delivery::start(
            key.clone(),
            store.clone(),
            net.clone(),
            discovery.clone(),
            router.clone(),
            config.delivery.clone(),
            cancel.clone(),
        )?;
        tasks.push(("courier", tokio::spawn(courier.instrument(span.clone()))));

        let handle = NodeHandle {
            inner: Arc::new(Inner {
                node_id,
                key,
                config,
                net,
                store,
                discovery,
                router,
                delivery,
                started: Instant::now(),
                listen_addrs,
                api_addr: OnceLock::new(),
                token,
                cancel: cancel.clone(),
            }),
        };

        tasks.push((
            "dispatch",
            tokio::spawn(
                dispatch(handle.clone(), events_rx, cancel.clone()).instrument(span.clone()),
            ),
        ));

        if handle.inner.config.api.enabled {
            let listener = bind_api(&handle.inner.config).await?;
            let addr = listener
                .local_addr()
                .map_err(|source| StartError::ApiBind {
                    addr: handle.inner.config.api.listen,
                    source,
                })?;
            let _ = handle.inner.api_addr.set(addr);
            let addr_file = handle.inner.config.data_dir.join(API_ADDR_FILE);
            let tmp = addr_file.with_extension("tmp");
            // Atomic (write then rename): a CLI reading it never sees half an address.
            if let Err(e) = std::fs::write(&tmp, format!("{addr}\n"))
                .and_then(|()| std::fs::rename(&tmp, &addr_file))
            {
                warn!(error = %e, "cannot record the API address in the data dir");
            }
            let app = crate::api::router(handle.clone());
            let shutdown = cancel.clone();
            let api = async move {
                info!(%addr, "API listening");
                let serve = axum::serve(listener, app)
                    .with_graceful_shutdown(async move { shutdown.cancelled().await });
                if let Err(e) = serve.await {
                    warn!(error = %e, "API server stopped with an error");
                }
            };
            tasks.push(("api", tokio::spawn(api.instrument(span.clone()))));
        }
        info!(parent: &span, node_id = %node_id, mesh = %handle.inner.config.mesh, "node started");
        Ok(handle)
    }

    /// The façade.
    pub fn handle(&self) -> NodeHandle {
        self.handle
            .clone()
            .expect("the handle is only taken by shutdown, which consumes the node")
    }

    fn cancel(&self) {
        if let Some(h) = &self.handle {
            h.inner.cancel.cancel();
        }
    }

    /// Graceful stop: stop serving, let tasks finish, close the database.
    pub async fn shutdown(mut self) {
        let node_id = self.handle().node_id();
        // Tell the mesh our agents are offline (not gone) before leaving.
        self.handle().inner.discovery.announce_offline().await;
        self.cancel();
        self.handle().inner.net.shutdown().await;
        // One grace period for all tasks together, not one each.
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        for (task, mut t) in std::mem::take(&mut self.tasks) {
            if tokio::time::timeout_at(deadline, &mut t).await.is_err() {
                warn!(%node_id, task, "task did not stop within the shutdown grace; aborting it");
                t.abort();
            }
        }
        self.close_store().await;
        info!(%node_id, "node stopped");
    }

    /// Stop abruptly, as a crash would: abort every task without flushing
    /// anything. Committed data survives; the database is closed so the
    /// node can be started again in the same process.
    pub async fn crash(mut self) {
        self.cancel();
        for (_, t) in std::mem::take(&mut self.tasks) {
            t.abort();
            let _ = t.await;
        }
        self.close_store().await;
    }

    async fn close_store(&mut self) {
        let Some(handle) = self.handle.take() else {
            return;
        };
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        while Arc::strong_count(&handle.inner) > 1 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let last = Arc::strong_count(&handle.inner) == 1;
        drop(handle);
        match (last, self.writer.take()) {
            (true, Some(w)) => {
                let _ = tokio::task::spawn_blocking(move || w.join()).await;
            }
            _ => warn!(
                "NodeHandle clones are still alive; the database closes when the last one drops"
            ),
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for (_, t) in &self.tasks {
            t.abort();
        }
    }
}

impl NodeHandle {
    /// This node's id.
    pub fn node_id(&self) -> PeerId {
        self.inner.node_id
    }

    /// The configuration the node runs with.
    pub fn config(&self) -> &NodeConfig {
        &self.inner.config
    }

    /// The node's key.
    pub fn key(&self) -> &NodeKey {
        &self.inner.key
    }

    /// The network handle.
    pub fn net(&self) -> &NetHandle {
        &self.inner.net
    }

    /// The database.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Discovery: local agents and the mesh-wide registry.
    pub fn discovery(&self) -> &Discovery {
        &self.inner.discovery
    }

    /// Address resolution.
    pub fn router(&self) -> &Router {
        &self.inner.router
    }

    /// Messages: send, track, inbox.
    pub fn delivery(&self) -> &Delivery {
        &self.inner.delivery
    }

    /// The API bearer token.
    pub fn api_token(&self) -> &str {
        &self.inner.token
    }

    /// Where the API listens, if it does.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.inner.api_addr.get().copied()
    }

    /// Addresses libp2p listens on.
    pub fn listen_addrs(&self) -> &[Multiaddr] {
        &self.inner.listen_addrs
    }

    /// A dialable address of this node (first listen address + `/p2p/<id>`).
    pub fn dial_addr(&self) -> Option<Multiaddr> {
        self.inner.listen_addrs.first().map(|a| {
            a.clone()
                .with(libp2p::multiaddr::Protocol::P2p(self.inner.node_id))
        })
    }

    /// Cancelled when the node shuts down.
    pub fn cancelled(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.inner.cancel.cancelled()
    }

    /// Peers known to this node.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>, net::Error> {
        self.inner.net.peers().await
    }

    /// Facts for `/v1/node`.
    pub async fn info(&self) -> Result<NodeInfo, net::Error> {
        let peers = self.peers().await?;
        Ok(NodeInfo {
            node_id: self.inner.node_id,
            mesh: self.inner.config.mesh.clone(),
            listen_addrs: self.inner.listen_addrs.clone(),
            api: self.api_addr(),
            peers_connected: peers.iter().filter(|p| p.connected).count(),
            agents_local: self.inner.discovery.local_count(),
            uptime_secs: self.inner.started.elapsed().as_secs(),
        })
    }
}

/// Route network events to the services that own them.
async fn dispatch(
    node: NodeHandle,
    mut events: mpsc::Receiver<net::Event>,
    cancel: CancellationToken,
) {
    let ads_topic = discovery::ads_topic(&node.inner.config.mesh);
    loop {
        let ev = tokio::select! {
            _ = cancel.cancelled() => break,
            ev = events.recv() => match ev { Some(ev) => ev, None => break },
        };
        match ev {
            net::Event::PeerConnected { peer } => {
                node.inner.discovery.on_peer_connected(peer);
                node.inner.delivery.on_peer_connected(peer).await;
            }
            net::Event::PeerDisconnected { peer } => {
                node.inner.discovery.on_peer_disconnected(peer)
            }
            net::Event::InboundRequest {
                peer,
                data,
                channel,
            } => {
                let node = node.clone();
                tokio::spawn(
                    async move {
                        let resp = node.answer(peer, data).await;
                        let _ = node.inner.net.respond(channel, wire::encode(&resp)).await;
                    }
                    .in_current_span(),
                );
            }
            net::Event::Gossip {
                topic,
                message_id,
                propagation_source,
                data,
                ..
            } => {
                if topic == ads_topic {
                    let d = node.inner.discovery.clone();
                    tokio::spawn(
                        async move { d.on_gossip(data, message_id, propagation_source).await }
                            .in_current_span(),
                    );
                } else {
                    let _ = node
                        .inner
                        .net
                        .report_validation(
                            message_id,
                            propagation_source,
                            net::MessageAcceptance::Ignore,
                        )
                        .await;
                }
            }
        }
    }
}

impl NodeHandle {
    /// Decode a peer's request and let its owner answer it. Batches of
    /// messages and receipts are read where they lie in the frame.
    async fn answer(&self, peer: PeerId, frame: Vec<u8>) -> wire::Response {
        let refused = |e: wire::Error| {
            tracing::debug!(%peer, error = %e, "undecodable request");
            wire::Response::Error {
                message: format!("cannot decode request: {e}"),
            }
        };
        match wire::rpc::signed_parts(&frame) {
            Ok(Some(parts)) => self.inner.delivery.handle_batch(peer, frame, parts).await,
            Ok(None) => match wire::decode::<wire::Request>(&frame, wire::MAX_FRAME_BYTES) {
                Ok(req) => self.inner.discovery.handle_request(peer, req).await,
                Err(e) => refused(e),
            },
            Err(e) => refused(e),
        }
    }
}

/// First characters of a peer id, for log spans.
pub fn short(peer: &PeerId) -> String {
    let s = peer.to_string();
    s[s.len().saturating_sub(8)..].to_string()
}

fn create_data_dir(dir: &Path) -> Result<(), StartError> {
    let err = |source| StartError::DataDir {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(dir).map_err(err)?;
        if meta.permissions().mode() & 0o077 != 0 {
            // Keys live here: keep it private, but do not fail on shared dirs we cannot chmod.
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        }
    }
    Ok(())
}

fn load_or_create_token(config: &NodeConfig) -> Result<String, StartError> {
    if let Some(t) = &config.api.token {
        return Ok(t.clone());
    }
    let path = config.data_dir.join(TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(t) if t.trim().len() >= 16 => Ok(t.trim().to_string()),
        Ok(_) => Err(StartError::Identity(identity::Error::CorruptKey {
            path,
            reason: "API token shorter than 16 characters".into(),
        })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = bs58::encode(identity::random_seed()?).into_string();
            identity::write_secret_file(&path, format!("{token}\n").as_bytes())?;
            Ok(token)
        }
        Err(source) => Err(StartError::Identity(identity::Error::Io { path, source })),
    }
}

async fn bind_api(config: &NodeConfig) -> Result<tokio::net::TcpListener, StartError> {
    let addr = config.api.listen;
    match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => Ok(l),
        Err(e) if config.api.listen_is_default && e.kind() == std::io::ErrorKind::AddrInUse => {
            let fallback = SocketAddr::new(addr.ip(), 0);
            warn!(%addr, "default API port is taken; using an OS-chosen port (see {API_ADDR_FILE} in the data dir)");
            tokio::net::TcpListener::bind(fallback)
                .await
                .map_err(|source| StartError::ApiBind {
                    addr: fallback,
                    source,
                })
        }
        Err(source) => Err(StartError::ApiBind { addr, source }),
    }
}
