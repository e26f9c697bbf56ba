//! The task that owns the swarm.
//!
//! It `select!`s, in priority order, over commands from [`NetHandle`]s,
//! handing queued events to the node, swarm events, and the bootstrap
//! redial timer. Events for the node wait in a bounded local queue so the
//! loop never blocks on a slow consumer (which could otherwise deadlock
//! against that consumer's own commands).

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use libp2p::core::ConnectedPoint;
use libp2p::kad::{self, GetProvidersOk, QueryResult};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, DialError, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, gossipsub, identify, mdns, ping};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::behaviour::{Behaviour, BehaviourEvent, Protocols};
use super::idle::Activity;
use super::peers::{Bootstrap, Identified, PeerTable, p2p_of, strip_p2p};
use super::{Command, Error, Event, NetStats};

mod commands;
use crate::config::NetworkConfig;

/// Events held for the node before the oldest droppable ones are shed.
const MAX_PENDING_EVENTS: usize = 16 * 1024;
/// How long shutdown keeps the swarm running to flush queued messages.
const SHUTDOWN_DRAIN: Duration = Duration::from_millis(300);
/// How long start-up waits for the listeners to report addresses.
const LISTEN_WAIT: Duration = Duration::from_secs(10);

/// Errors starting the network.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The swarm could not be built.
    #[error(transparent)]
    Build(#[from] super::BuildError),
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// Address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
    /// Listeners did not come up in time.
    #[error("listeners did not report an address within {LISTEN_WAIT:?}")]
    ListenTimeout,
}

type Reply<T> = oneshot::Sender<Result<T, Error>>;

/// What one turn of the loop got.
#[allow(clippy::large_enum_variant)] // one lives at a time, on the stack
enum Step {
    Command(Option<Command>),
    Delivered,
    Swarm(SwarmEvent<BehaviourEvent>),
    Bootstrap,
    Delayed(DelayedRequest),
    Prune,
}

/// A request held back by an artificial link delay (simulations).
struct DelayedRequest {
    peer: PeerId,
    data: Vec<u8>,
    reply: Reply<Vec<u8>>,
}

/// The swarm owner. Create with [`EventLoop::start`], then spawn [`EventLoop::run`].
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    out: VecDeque<Event>,
    protocols: Protocols,
    peers: PeerTable,
    bootstrap: Bootstrap,
    boot_dials: HashMap<ConnectionId, usize>,
    dials: HashMap<ConnectionId, Reply<()>>,
    requests: HashMap<OutboundRequestId, (PeerId, Reply<Vec<u8>>)>,
    providers: HashMap<kad::QueryId, (HashSet<PeerId>, Reply<HashSet<PeerId>>)>,
    listen_addrs: Vec<Multiaddr>,
    stats: NetStats,
    rng: u64,
    /// Artificial one-way delay of requests to some peers (simulated slow links).
    link_delays: HashMap<PeerId, Duration>,
    delayed: FuturesUnordered<BoxFuture<'static, DelayedRequest>>,
    /// Last request/response per connected peer, to close idle connections.
    activity: Activity,
    /// Connections idle this long are closed (see [`super::idle`]).
    idle_timeout: Duration,
    /// Idle connections are not closed below this many connected peers.
    min_peers: usize,
}

impl EventLoop {
    /// Build the swarm, bind the listeners and wait until they report
    /// their addresses.
    pub async fn start(
        key: &libp2p::identity::Keypair,
        mesh: &str,
        net: &NetworkConfig,
        commands: mpsc::Receiver<Command>,
        events: mpsc::Sender<Event>,
    ) -> Result<EventLoop, StartError> {
        let protocols = Protocols::for_mesh(mesh);
        let swarm = super::build_swarm(key, &protocols, net)?;
        let now = Instant::now();
        let mut lp = EventLoop {
            swarm,
            commands,
            events,
            out: VecDeque::new(),
            protocols,
            peers: PeerTable::default(),
            bootstrap: Bootstrap::new(&net.bootstrap, now),
            boot_dials: HashMap::new(),
            dials: HashMap::new(),
            requests: HashMap::new(),
            providers: HashMap::new(),
            listen_addrs: Vec::new(),
            stats: NetStats::default(),
            rng: seed_rng(),
            link_delays: HashMap::new(),
            delayed: FuturesUnordered::new(),
            activity: Activity::default(),
            idle_timeout: net.idle_timeout,
            min_peers: net.min_peers,
        };
        let mut listeners = HashSet::new();
        for addr in &net.listen {
            let id = match lp.swarm.listen_on(addr.clone()) {
                Ok(id) => id,
                Err(e) if net.listen_is_default => {
                    let fallback = with_port_zero(addr);
                    warn!(%addr, error = %e, %fallback, "default port unavailable; using an OS-chosen port");
                    lp.swarm
                        .listen_on(fallback.clone())
                        .map_err(|e| StartError::Listen {
                            addr: fallback,
                            reason: e.to_string(),
                        })?
                }
                Err(e) => {
                    return Err(StartError::Listen {
                        addr: addr.clone(),
                        reason: e.to_string(),
                    });
                }
            };
            listeners.insert(id);
        }
        let deadline = tokio::time::Instant::now() + LISTEN_WAIT;
        while !listeners.is_empty() {
            let ev = tokio::time::timeout_at(deadline, lp.swarm.select_next_some())
                .await
                .map_err(|_| StartError::ListenTimeout)?;
            match &ev {
                SwarmEvent::NewListenAddr { listener_id, .. } => {
                    listeners.remove(listener_id);
                }
                SwarmEvent::ListenerClosed {
                    listener_id,
                    reason,
                    ..
                } => {
                    return Err(StartError::Listen {
                        addr: format!("/listener/{listener_id:?}")
                            .parse()
                            .unwrap_or(Multiaddr::empty()),
                        reason: format!("{reason:?}"),
                    });
                }
                _ => {}
            }
            lp.handle_swarm_event(ev);
        }
        // Bootstrap peers join the DHT routing table only once identify
        // shows they are of this mesh: a foreign one that hangs up first
        // would otherwise stay listed (and queried) forever.
        for (peer, addr) in lp.bootstrap.named_peers() {
            lp.swarm.add_peer_address(peer, addr);
        }
        Ok(lp)
    }

    /// Addresses the listeners are bound to.
    pub fn listen_addrs(&self) -> &[Multiaddr] {
        &self.listen_addrs
    }

    /// Run until shutdown.
    pub async fn run(mut self) {
        let every = (self.idle_timeout / 4).clamp(Duration::from_secs(1), Duration::from_secs(15));
        let mut prune = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_boot = self.bootstrap.next_due();
            let boot_sleep = tokio::time::sleep_until(
                next_boot
                    .map(tokio::time::Instant::from_std)
                    .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600)),
            );
            let step = tokio::select! {
                biased;
                cmd = self.commands.recv() => Step::Command(cmd),
                permit = self.events.reserve(), if !self.out.is_empty() => {
                    match permit {
                        Ok(permit) => {
                            if let Some(ev) = self.out.pop_front() {
                                permit.send(ev);
                            }
                        }
                        // The node stopped reading events: it is shutting down.
                        Err(_) => self.out.clear(),
                    }
                    Step::Delivered
                }
                ev = self.swarm.select_next_some() => Step::Swarm(ev),
                Some(cmd) = self.delayed.next(), if !self.delayed.is_empty() => Step::Delayed(cmd),
                _ = boot_sleep, if next_boot.is_some() => Step::Bootstrap,
                _ = prune.tick() => Step::Prune,
            };
            match step {
                Step::Command(None) => break,
                Step::Command(Some(Command::Shutdown)) => {
                    self.drain().await;
                    break;
                }
                Step::Command(Some(cmd)) => self.handle_command(cmd),
                Step::Delivered => {}
                Step::Swarm(ev) => self.handle_swarm_event(ev),
                Step::Bootstrap => self.dial_bootstrap(),
                Step::Delayed(cmd) => self.send_request_now(cmd),
                Step::Prune => self.close_idle(),
            }
        }
        debug!("network event loop stopped");
    }

    /// Keep the swarm running briefly so messages queued just before
    /// shutdown (offline announcements) reach the wire.
    async fn drain(&mut self) {
        let _ = tokio::time::timeout(SHUTDOWN_DRAIN, async {
            loop {
                let ev = self.swarm.select_next_some().await;
                self.handle_swarm_event(ev);
            }
        })
        .await;
    }

    fn jitter(&mut self) -> f64 {
        // xorshift64*: cheap, good enough to spread redials.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn emit(&mut self, ev: Event) {
        if self.out.len() >= MAX_PENDING_EVENTS {
            self.stats.events_shed += 1;
            match ev {
                Event::InboundRequest { peer, .. } => {
                    // Dropping the channel fails the peer's request; it retries.
                    warn!(%peer, "node is not keeping up; shedding an inbound request");
                    return;
                }
                Event::Gossip {
                    message_id,
                    propagation_source,
                    ..
                } => {
                    warn!("node is not keeping up; ignoring a gossip message");
                    self.swarm
                        .behaviour_mut()
                        .gossipsub
                        .report_message_validation_result(
                            &message_id,
                            &propagation_source,
                            gossipsub::MessageAcceptance::Ignore,
                        );
                    return;
                }
                _ => {}
            }
        }
        self.out.push_back(ev);
    }

    fn dial_bootstrap(&mut self) {
        let now = Instant::now();
        for (idx, addr) in self.bootstrap.due(now) {
            let peer = p2p_of(&addr);
            if let Some(p) = peer
                && self.peers.is_foreign(&p, now)
            {
                // A bootstrap peer of another mesh: back off without dialling.
                let j = self.jitter();
                self.bootstrap.dial_failed(idx, now, j);
                continue;
            }
            let opts = match peer {
                Some(p) => DialOpts::peer_id(p)
                    .addresses(vec![strip_p2p(addr.clone())])
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build(),
                None => DialOpts::unknown_peer_id().address(addr.clone()).build(),
            };
            let id = opts.connection_id();
            match self.swarm.dial(opts) {
                Ok(()) => {
                    debug!(%addr, "dialling bootstrap peer");
                    self.boot_dials.insert(id, idx);
                }
                Err(DialError::DialPeerConditionFalse(_)) => {
                    if let Some(p) = peer {
                        self.bootstrap.dial_succeeded(idx, p);
                    }
                }
                Err(e) => {
                    warn!(%addr, error = %e, "cannot dial bootstrap peer");
                    let j = self.jitter();
                    self.bootstrap.dial_failed(idx, now, j);
                }
            }
        }
    }

    fn handle_swarm_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(%address, "listening");
                if !self.listen_addrs.contains(&address) {
                    self.listen_addrs.push(address);
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| *a != address);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                if self.peers.is_foreign(&peer_id, Instant::now()) {
                    debug!(peer = %peer_id, "closing connection to a peer of another mesh");
                    self.swarm.close_connection(connection_id);
                    return;
                }
                self.peers.connected(peer_id);
                self.activity
                    .connected(peer_id, endpoint.is_dialer(), Instant::now());
                if let ConnectedPoint::Dialer { address, .. } = &endpoint {
                    self.peers.add_addr(peer_id, address.clone());
                }
                if let Some(idx) = self.boot_dials.remove(&connection_id) {
                    self.bootstrap.dial_succeeded(idx, peer_id);
                }
                if let Some(reply) = self.dials.remove(&connection_id) {
                    let _ = reply.send(Ok(()));
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                ..
            } => {
                if self.peers.disconnected(&peer_id, num_established) {
                    debug!(peer = %peer_id, "peer disconnected");
                    self.emit(Event::PeerDisconnected { peer: peer_id });
                }
                if num_established == 0 {
                    self.activity.disconnected(&peer_id);
                    let j = self.jitter();
                    self.bootstrap.peer_gone(&peer_id, Instant::now(), j);
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                error,
                ..
            } => {
                if let Some(idx) = self.boot_dials.remove(&connection_id) {
                    debug!(error = %error, "bootstrap dial failed");
                    let j = self.jitter();
                    self.bootstrap.dial_failed(idx, Instant::now(), j);
                }
                if let Some(reply) = self.dials.remove(&connection_id) {
                    let _ = reply.send(Err(Error::Dial {
                        addr: Multiaddr::empty(),
                        reason: error.to_string(),
                    }));
                }
            }
            SwarmEvent::Behaviour(ev) => self.handle_behaviour_event(ev),
            _ => {}
        }
    }

    fn handle_behaviour_event(&mut self, ev: BehaviourEvent) {
        match ev {
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                self.on_identified(peer_id, info)
            }
            BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            }) => self.peers.set_rtt(&peer, rtt),
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id, result, step, ..
            }) => self.on_kad_progress(id, result, step.last),
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => self.emit(Event::Gossip {
                topic: message.topic.into_string(),
                propagation_source,
                message_id,
                data: message.data,
            }),
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                let now = Instant::now();
                for (peer, addr) in found {
                    if self.peers.is_foreign(&peer, now) || peer == *self.swarm.local_peer_id() {
                        continue;
                    }
                    self.swarm.add_peer_address(peer, addr.clone());
                    if !self.swarm.is_connected(&peer) {
                        let opts = DialOpts::peer_id(peer)
                            .addresses(vec![addr])
                            .condition(PeerCondition::DisconnectedAndNotDialing)
                            .build();
                        let _ = self.swarm.dial(opts);
                    }
                }
            }
            BehaviourEvent::Rpc(ev) => self.on_rpc(ev),
            _ => {}
        }
    }

    fn on_identified(&mut self, peer: PeerId, info: identify::Info) {
        let same_mesh = info.protocol_version == self.protocols.identify_version;
        let addrs: Vec<Multiaddr> = info.listen_addrs.into_iter().filter(dialable).collect();
        match self
            .peers
            .identified(peer, same_mesh, &addrs, Instant::now())
        {
            Identified::Foreign => {
                self.stats.foreign_rejected += 1;
                warn!(%peer, theirs = %info.protocol_version, ours = %self.protocols.identify_version,
                    "peer belongs to another mesh; disconnecting and ignoring it");
                self.swarm.behaviour_mut().kad.remove_peer(&peer);
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            outcome => {
                for a in addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer, a);
                }
                if outcome == Identified::New {
                    debug!(%peer, "peer connected");
                    self.emit(Event::PeerConnected { peer });
                }
            }
        }
    }

    fn on_kad_progress(&mut self, id: kad::QueryId, result: QueryResult, last: bool) {
        match result {
            QueryResult::GetProviders(r) => {
                let Some((found, _)) = self.providers.get_mut(&id) else {
                    return;
                };
                let failure = match r {
                    Ok(GetProvidersOk::FoundProviders { providers, .. }) => {
                        found.extend(providers);
                        None
                    }
                    Ok(GetProvidersOk::FinishedWithNoAdditionalRecord { .. }) => None,
                    Err(e) => Some(e.to_string()),
                };
                // Answer with the first providers found instead of waiting
                // for the query to exhaust the DHT (seconds on a large mesh);
                // the caller fetches ads from them and needs no more.
                let found_some = !found.is_empty();
                let done = last || failure.is_some() || found_some;
                if found_some
                    && !last
                    && let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id)
                {
                    q.finish();
                }
                if done && let Some((found, reply)) = self.providers.remove(&id) {
                    let r = match failure {
                        Some(e) if found.is_empty() => Err(Error::Dht(e)),
                        _ => Ok(found),
                    };
                    let _ = reply.send(r);
                }
            }
            QueryResult::StartProviding(Err(e)) | QueryResult::RepublishProvider(Err(e)) => {
                debug!(error = %e, "provider announcement incomplete");
            }
            _ => {}
        }
    }

    fn on_rpc(&mut self, ev: request_response::Event<Vec<u8>, Vec<u8>>) {
        match ev {
            request_response::Event::Message { peer, message, .. } => {
                self.activity.touch(&peer, Instant::now());
                match message {
                    request_response::Message::Request {
                        request, channel, ..
                    } => {
                        self.emit(Event::InboundRequest {
                            peer,
                            data: request,
                            channel,
                        });
                    }
                    request_response::Message::Response {
                        request_id,
                        response,
                    } => {
                        if let Some((_, reply)) = self.requests.remove(&request_id) {
                            let _ = reply.send(Ok(response));
                        }
                    }
                }
            }
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some((_, reply)) = self.requests.remove(&request_id) {
                    let _ = reply.send(Err(Error::Request {
                        peer,
                        reason: error.to_string(),
                    }));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                debug!(%peer, error = %error, "inbound request failed");
            }
            request_response::Event::ResponseSent { peer, .. } => {
                self.activity.touch(&peer, Instant::now())
            }
        }
    }
}

/// Addresses worth dialling: not unspecified (`0.0.0.0`) ones.
fn dialable(addr: &Multiaddr) -> bool {
    !addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_unspecified(),
        Protocol::Ip6(ip) => ip.is_unspecified(),
        _ => false,
    })
}

fn with_port_zero(addr: &Multiaddr) -> Multiaddr {
    addr.iter()
        .map(|p| match p {
            Protocol::Tcp(_) => Protocol::Tcp(0),
            Protocol::Udp(_) => Protocol::Udp(0),
            other => other,
        })
        .collect()
}

fn seed_rng() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return 0x9E37_79B9_7F4A_7C15;
    }
    u64::from_le_bytes(b) | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_fallback_keeps_the_rest() {
        let a: Multiaddr = "/ip4/0.0.0.0/udp/7710/quic-v1".parse().unwrap();
        assert_eq!(with_port_zero(&a).to_string(), "/ip4/0.0.0.0/udp/0/quic-v1");
    }

    #[test]
    fn unspecified_addresses_are_not_dialable() {
        assert!(!dialable(&"/ip4/0.0.0.0/tcp/1".parse().unwrap()));
        assert!(dialable(&"/ip4/127.0.0.1/tcp/1".parse().unwrap()));
    }
}
