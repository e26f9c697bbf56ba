//! Discovery: local agents, their signed advertisements, and the registry
//! of every agent in the mesh, with no registry server.
//!
//! Ads spread three ways, because gossip alone leaves late joiners blind:
//! gossipsub for new, changed and withdrawn ads (the fast path); Kademlia
//! provider records per handle, agent id, capability, prefix and tag (the
//! fallback for lookups that miss the local view); and anti-entropy between
//! connected peers (digest exchange, then pull and push of the difference)
//! on connect and periodically. The registry is persisted so a restarted
//! node answers at once, then catches up.
//!
//! # Layout
//! - `ad`: building, signing, verifying ads; field limits.
//! - `registry`: the in-memory view (pure data).
//! - `matching`: capability patterns, tag/version filters, free-text ranking.
//! - `local`: local agents and their keys, persisted.
//! - `dht`: provider keys.
//! - `publish`: gossiping our ads, again when none could go out.
//! - `ingest`: ads from peers (gossip, anti-entropy, DHT): verify, apply, persist.
//! - `sync`: anti-entropy and the requests peers send us.
//! - `service`: the background task (refresh, expiry, periodic sync).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use libp2p::{Multiaddr, PeerId};
use tracing::{debug, warn};

use crate::config::DiscoveryConfig;
use crate::identity::{self, AgentId, IdMap, NodeKey};
use crate::net::NetHandle;
use crate::store::{self, Store, tables::REGISTRY};
use crate::time::now_ms;
use crate::wire::{self, AdBody, AdState, Capability, SignedAd};

pub mod ad;
pub mod dht;
mod ingest;
pub mod local;
pub mod matching;
mod publish;
pub mod registry;
mod service;
mod sync;

pub use ad::AdError;
pub use local::LocalAgent;
pub use matching::{Filter, NamePattern};
pub use registry::{Applied, Entry, Registry};

/// How long a DHT fallback lookup may take.
const DHT_LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// Providers asked in one DHT fallback lookup.
const DHT_MAX_PROVIDERS: usize = 8;

/// Discovery errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The registration or query is invalid.
    #[error(transparent)]
    Invalid(#[from] AdError),
    /// The agent is not registered on this node.
    #[error("agent {0} is not registered on this node")]
    NotLocal(AgentId),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] store::Error),
    /// The node is shutting down.
    #[error("the node is shutting down")]
    Stopped,
}

/// What an agent registers.
#[derive(Debug, Clone, Default)]
pub struct Registration {
    /// Handle, unique on this node.
    pub handle: String,
    /// What the agent is.
    pub description: String,
    /// What it offers.
    pub capabilities: Vec<Capability>,
    /// Opaque metadata as JSON text.
    pub metadata_json: String,
}

/// Result of a registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// The agent's id.
    pub agent_id: AgentId,
    /// True for a new agent, false when an existing handle was updated.
    pub created: bool,
}

/// A query over the registry.
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// Capability name, tags and version requirement.
    pub filter: Filter,
    /// Exact handle.
    pub handle: Option<String>,
    /// Free text, ranked by relevance.
    pub text: Option<String>,
    /// Most results.
    pub limit: Option<usize>,
}

impl Query {
    fn names_something(&self) -> bool {
        self.handle.is_some() || self.filter.name.is_some() || !self.filter.tags.is_empty()
    }
}

/// Counters for `/metrics` and tests.
#[derive(Debug, Default)]
pub struct Stats {
    /// Ads that failed verification and were dropped.
    pub ads_rejected: AtomicU64,
    /// Ads applied (new or newer).
    pub ads_applied: AtomicU64,
    /// Anti-entropy rounds run with peers.
    pub sync_rounds: AtomicU64,
    /// DHT fallback lookups.
    pub dht_lookups: AtomicU64,
}

struct Inner {
    node_key: NodeKey,
    node_id: PeerId,
    mesh: String,
    topic: String,
    addrs: Vec<String>,
    net: NetHandle,
    store: Store,
    cfg: DiscoveryConfig,
    registry: RwLock<Registry>,
    local: RwLock<IdMap<LocalAgent>>,
    connected: RwLock<HashSet<PeerId>>,
    /// When an anti-entropy round last got an answer (see `on_peer_connected`).
    last_sync: std::sync::Mutex<Option<std::time::Instant>>,
    /// Our ads whose gossip found no peer yet (see `publish`).
    unsent: publish::Unsent,
    register_lock: tokio::sync::Mutex<()>,
    stats: Stats,
}

/// Cheap, cloneable handle to discovery.
#[derive(Clone)]
pub struct Discovery {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("node_id", &self.inner.node_id)
            .finish()
    }
}

/// Gossip topic of a mesh's ads.
pub fn ads_topic(mesh: &str) -> String {
    format!("agentmesh/{mesh}/ads")
}

impl Discovery {
    /// Load local agents and the persisted registry, subscribe to the ads
    /// topic and announce local agents. Spawn [`Discovery::run`] afterwards.
    pub async fn start(
        node_key: NodeKey,
        mesh: &str,
        listen_addrs: &[Multiaddr],
        net: NetHandle,
        store: Store,
        cfg: DiscoveryConfig,
    ) -> Result<Discovery, Error> {
        let local = local::load(&store)?;
        let now = now_ms();
        let mut reg = Registry::default();
        let mut dropped = 0usize;
        for ad in load_registry(&store)? {
            if ad::verify(&ad, now).is_ok() {
                let is_local = local.contains_key(&ad.body.agent_id);
                reg.apply(ad, now, is_local);
            } else {
                dropped += 1;
            }
        }
        debug!(
            agents = reg.len(),
            expired = dropped,
            local = local.len(),
            "registry loaded"
        );
        let addrs = listen_addrs
            .iter()
            .filter(|a| {
                !a.iter().any(|p| {
                    matches!(p, libp2p::multiaddr::Protocol::Ip4(ip) if ip.is_unspecified())
                        || matches!(p, libp2p::multiaddr::Protocol::Ip6(ip) if ip.is_unspecified())
                })
            })
            .take(ad::MAX_ADDRS)
            .map(|a| a.to_string())
            .collect();
        let d = Discovery {
            inner: Arc::new(Inner {
                node_id: node_key.peer_id(),
                node_key,
                mesh: mesh.to_string(),
                topic: ads_topic(mesh),
                addrs,
                net,
                store,
                cfg,
                registry: RwLock::new(reg),
                local: RwLock::new(local),
                connected: RwLock::new(HashSet::new()),
                last_sync: std::sync::Mutex::new(None),
                unsent: Default::default(),
                register_lock: tokio::sync::Mutex::new(()),
                stats: Stats::default(),
            }),
        };
        if d.inner.cfg.gossip {
            d.inner
                .net
                .subscribe(d.inner.topic.clone())
                .await
                .map_err(|_| Error::Stopped)?;
        }
        let ids: Vec<AgentId> = d.read_local().keys().cloned().collect();
        for id in ids {
            d.reissue(&id, AdState::Active).await;
            d.provide(&id).await;
        }
        Ok(d)
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    fn read_registry(&self) -> std::sync::RwLockReadGuard<'_, Registry> {
        self.inner
            .registry
            .read()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn write_registry(&self) -> std::sync::RwLockWriteGuard<'_, Registry> {
        self.inner
            .registry
            .write()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn read_local(&self) -> std::sync::RwLockReadGuard<'_, IdMap<LocalAgent>> {
        self.inner.local.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_local(&self) -> std::sync::RwLockWriteGuard<'_, IdMap<LocalAgent>> {
        self.inner.local.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Run a closure over the registry (no awaits inside).
    pub fn with_registry<R>(&self, f: impl FnOnce(&Registry) -> R) -> R {
        f(&self.read_registry())
    }

    /// Peers connected now (as reported by the network).
    pub fn connected_peers(&self) -> HashSet<PeerId> {
        self.inner
            .connected
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// This node's id.
    pub fn node_id(&self) -> PeerId {
        self.inner.node_id
    }

    /// Number of agents registered on this node.
    pub fn local_count(&self) -> usize {
        self.read_local().len()
    }

    /// The local agent with this id.
    pub fn local_agent(&self, id: &AgentId) -> Option<LocalAgent> {
        self.read_local().get(id).cloned()
    }

    /// Whether an agent is registered on this node (no copy made).
    pub fn is_local(&self, id: &AgentId) -> bool {
        self.read_local().contains_key(id)
    }

    /// [`Discovery::is_local`] by the id's text (a borrowed wire field).
    pub fn is_local_str(&self, id: &str) -> bool {
        self.read_local().contains_key(id)
    }

    /// The handle of a local agent.
    pub fn local_handle(&self, id: &AgentId) -> Option<String> {
        self.read_local().get(id).map(|a| a.handle.clone())
    }

    /// The local agent with this handle.
    pub fn local_by_handle(&self, handle: &str) -> Option<(AgentId, LocalAgent)> {
        self.read_local()
            .iter()
            .find(|(_, a)| a.handle == handle)
            .map(|(id, a)| (id.clone(), a.clone()))
    }

    /// Register an agent (or update the one with this handle on this node).
    pub async fn register(&self, reg: Registration) -> Result<Registered, Error> {
        ad::validate_handle(&reg.handle)?;
        ad::validate_agent_fields(&reg.description, &reg.capabilities, &reg.metadata_json)?;
        let _guard = self.inner.register_lock.lock().await;
        let existing = self.local_by_handle(&reg.handle);
        let now = now_ms();
        let (agent, created) = match existing {
            Some((_, mut a)) => {
                a.description = reg.description;
                a.capabilities = reg.capabilities;
                a.metadata_json = reg.metadata_json;
                (a, false)
            }
            None => (
                LocalAgent {
                    secret: identity::random_seed()
                        .map_err(|e| Error::Invalid(AdError::TooLarge(e.to_string())))?,
                    handle: reg.handle,
                    description: reg.description,
                    capabilities: reg.capabilities,
                    metadata_json: reg.metadata_json,
                    seq: 0,
                    registered_at_ms: now,
                },
                true,
            ),
        };
        let id = agent.id();
        let stored = agent.clone();
        self.inner
            .store
            .write(move |txn| local::put(txn, &stored))
            .await?;
        self.write_local().insert(id.clone(), agent);
        self.reissue(&id, AdState::Active).await;
        self.provide(&id).await;
        debug!(agent = %id, created, "agent registered");
        Ok(Registered {
            agent_id: id,
            created,
        })
    }

    /// Withdraw a local agent: signed tombstone to the mesh, then forget it.
    pub async fn withdraw(&self, id: &AgentId) -> Result<(), Error> {
        let _guard = self.inner.register_lock.lock().await;
        if !self.read_local().contains_key(id) {
            return Err(Error::NotLocal(id.clone()));
        }
        self.reissue(id, AdState::Withdrawn).await;
        let del = id.clone();
        self.inner
            .store
            .write(move |txn| local::remove(txn, &del))
            .await?;
        let removed = self.write_local().remove(id);
        if let Some(a) = removed {
            let still: HashSet<String> = self
                .read_local()
                .iter()
                .flat_map(|(i, l)| dht::keys_for(i.as_str(), &l.handle, &l.capabilities))
                .collect();
            for key in dht::keys_for(id.as_str(), &a.handle, &a.capabilities) {
                if !still.contains(&key) {
                    let _ = self
                        .inner
                        .net
                        .stop_providing(dht::record_key(&self.inner.mesh, &key))
                        .await;
                }
            }
        }
        debug!(agent = %id, "agent withdrawn");
        Ok(())
    }

    /// Announce every local agent as offline (graceful shutdown).
    pub async fn announce_offline(&self) {
        let ids: Vec<AgentId> = self.read_local().keys().cloned().collect();
        for id in ids {
            self.reissue(&id, AdState::Offline).await;
        }
    }

    /// Sign a fresh ad for a local agent, apply it locally and gossip it.
    async fn reissue(&self, id: &AgentId, state: AdState) {
        let now = now_ms();
        let signed = {
            let mut local = self.write_local();
            let Some(a) = local.get_mut(id) else {
                return;
            };
            // Monotonic across restarts without a write per refresh: the
            // clock is ahead of any seq issued before.
            a.seq = (a.seq + 1).max(now);
            let body = AdBody {
                agent_id: id.clone(),
                handle: a.handle.clone(),
                node_id: self.inner.node_id.to_string(),
                node_key: self.inner.node_key.public_bytes(),
                node_addrs: self.inner.addrs.clone(),
                description: a.description.clone(),
                capabilities: a.capabilities.clone(),
                metadata_json: a.metadata_json.clone(),
                seq: a.seq,
                issued_at_ms: now,
                ttl_secs: self
                    .inner
                    .cfg
                    .ad_ttl
                    .as_secs()
                    .clamp(1, u64::from(ad::MAX_TTL_SECS)) as u32,
                state,
            };
            ad::sign(body, &a.key(), &self.inner.node_key)
        };
        self.write_registry().apply(signed.clone(), now, true);
        self.persist(vec![signed.clone()]).await;
        self.gossip(&signed).await;
    }

    async fn provide(&self, id: &AgentId) {
        let keys = match self.read_local().get(id) {
            Some(a) => dht::keys_for(id.as_str(), &a.handle, &a.capabilities),
            None => return,
        };
        for key in keys {
            let _ = self
                .inner
                .net
                .start_providing(dht::record_key(&self.inner.mesh, &key))
                .await;
        }
    }

    /// A peer of our mesh connected: note it, and reconcile registries
    /// with it unless a round with some peer got an answer within the last
    /// anti-entropy interval. A node that starts or restarts syncs with its
    /// first peers at once; a node in the mesh does not sync on each of the
    /// many short connections deliveries and DHT queries open (that cost a
    /// fifth of the CPU of a 300-node mesh under churn): its periodic rounds,
    /// which rotate over connected peers, keep it in step, across a healed
    /// partition too.
    pub fn on_peer_connected(&self, peer: PeerId) {
        self.inner
            .connected
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer);
        let recent = self
            .inner
            .last_sync
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| t.elapsed() < self.inner.cfg.anti_entropy_interval);
        if self.inner.cfg.anti_entropy && !recent {
            let d = self.clone();
            tokio::spawn(async move { d.sync_with(peer).await });
        }
    }

    /// A peer went away.
    pub fn on_peer_disconnected(&self, peer: PeerId) {
        self.inner
            .connected
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&peer);
    }

    /// Agents matching a query from the local view, best first.
    pub fn search(&self, q: &Query) -> Vec<Entry> {
        let reg = self.read_registry();
        let candidates: Vec<&Entry> = reg
            .active()
            .filter(|e| q.handle.as_ref().is_none_or(|h| *h == e.ad.body.handle))
            .filter(|e| q.filter == Filter::default() || q.filter.matches(&e.ad.body.capabilities))
            .collect();
        let mut out: Vec<Entry> = match q.text.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
            Some(text) => {
                let docs: Vec<matching::Document<'_>> = candidates
                    .iter()
                    .map(|e| matching::Document {
                        handle: &e.ad.body.handle,
                        description: &e.ad.body.description,
                        capabilities: &e.ad.body.capabilities,
                    })
                    .collect();
                matching::rank(text, &docs)
                    .into_iter()
                    .map(|(i, _)| candidates[i].clone())
                    .collect()
            }
            None => {
                let mut v: Vec<Entry> = candidates.into_iter().cloned().collect();
                v.sort_by(|a, b| {
                    (&a.ad.body.handle, &a.ad.body.agent_id)
                        .cmp(&(&b.ad.body.handle, &b.ad.body.agent_id))
                });
                v
            }
        };
        if let Some(l) = q.limit {
            out.truncate(l);
        }
        out
    }

    /// Like [`search`](Self::search), but a query naming a handle,
    /// capability or tag that finds nothing locally asks the DHT.
    pub async fn find(&self, q: &Query) -> Vec<Entry> {
        let found = self.search(q);
        if !found.is_empty() || !q.names_something() {
            return found;
        }
        let key = dht::key_for_query(
            q.handle.as_deref(),
            None,
            q.filter.name.as_ref(),
            &q.filter.tags,
        );
        if let Some(key) = key {
            self.lookup_dht(&key).await;
        }
        self.search(q)
    }

    /// One agent by id, in any state; asks the DHT when unknown.
    pub async fn get(&self, id: &AgentId) -> Option<Entry> {
        if let Some(e) = self.read_registry().get(id) {
            return Some(e.clone());
        }
        self.lookup_dht(&format!("agent/{id}")).await;
        self.read_registry().get(id).cloned()
    }

    /// Ask the DHT for providers of `key` and fetch their matching ads.
    pub(crate) async fn lookup_dht(&self, key: &str) {
        self.inner.stats.dht_lookups.fetch_add(1, Ordering::Relaxed);
        let rk = dht::record_key(&self.inner.mesh, key);
        let providers = match tokio::time::timeout(
            DHT_LOOKUP_TIMEOUT,
            self.inner.net.get_providers(rk),
        )
        .await
        {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                debug!(%key, error = %e, "DHT lookup found no providers");
                return;
            }
            Err(_) => {
                debug!(%key, "DHT lookup timed out");
                return;
            }
        };
        let me = self.inner.node_id;
        let asks = providers
            .into_iter()
            .filter(|p| *p != me)
            .take(DHT_MAX_PROVIDERS)
            .map(|peer| {
                let d = self.clone();
                let key = key.to_string();
                async move {
                    let req = wire::encode(&wire::Request::FindAds { key });
                    match d.inner.net.request(peer, req).await {
                        Ok(bytes) => {
                            match wire::decode::<wire::Response>(&bytes, wire::MAX_FRAME_BYTES) {
                                Ok(wire::Response::Ads(ads)) => {
                                    d.ingest(ads).await;
                                }
                                Ok(other) => debug!(%peer, ?other, "unexpected answer to FindAds"),
                                Err(e) => debug!(%peer, error = %e, "bad answer to FindAds"),
                            }
                        }
                        Err(e) => debug!(%peer, error = %e, "FindAds failed"),
                    }
                }
            });
        futures::future::join_all(asks).await;
    }

    /// Re-issue every local agent's ad (periodic refresh).
    pub(crate) async fn refresh_all(&self) {
        let ids: Vec<AgentId> = self.read_local().keys().cloned().collect();
        for id in ids {
            self.reissue(&id, AdState::Active).await;
        }
    }

    /// Drop expired registry entries (memory and disk).
    pub(crate) async fn expire(&self) -> usize {
        let gone = self.write_registry().expire(now_ms());
        let n = gone.len();
        if n > 0 {
            debug!(count = n, "advertisements expired");
            let r = self
                .inner
                .store
                .write_lazy(move |txn| {
                    let mut t = txn.open_table(REGISTRY)?;
                    for id in &gone {
                        t.remove(id.as_str())?;
                    }
                    Ok(())
                })
                .await;
            if let Err(e) = r {
                warn!(error = %e, "cannot remove expired registry entries");
            }
        }
        n
    }
}

/// The gossip payload on the ads topic.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum GossipAd {
    /// One ad.
    V1(SignedAd),
}

fn load_registry(store: &Store) -> Result<Vec<SignedAd>, store::Error> {
    let r = store.read()?;
    let t = r.open_table(REGISTRY)?;
    let mut out = Vec::new();
    for item in t.iter()? {
        let (k, v) = item?;
        match wire::decode::<SignedAd>(v.value(), wire::ad::MAX_AD_BYTES) {
            Ok(ad) => out.push(ad),
            // A cache entry we cannot read is dropped, not fatal: anti-entropy refills it.
            Err(e) => warn!(agent = k.value(), error = %e, "skipping unreadable registry entry"),
        }
    }
    Ok(out)
}
