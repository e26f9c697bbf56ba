//! Networking: the one task that owns the libp2p `Swarm`, and the handle
//! everything else uses to talk to it.
//!
//! `net` knows nothing of agents or messages. It moves opaque frames over
//! our request-response protocol, publishes and delivers gossip, keeps the
//! DHT, and reports peers coming and going. Callers hold a cloneable
//! [`NetHandle`]; each method sends a [`Command`] with a oneshot for the
//! reply. Inbound traffic comes out as [`Event`]s on one bounded channel.
//!
//! # Layout
//! - `behaviour`: the composed `NetworkBehaviour` and its configuration.
//! - `codec`: length-prefixed frames for request-response.
//! - `event_loop`: the task owning the swarm.
//! - `peers`: the peer table and bootstrap redial schedule (no I/O).
//! - `transport`: building the swarm for TCP+QUIC or the memory transport.

use std::collections::HashSet;
use std::time::Duration;

use libp2p::{Multiaddr, PeerId, gossipsub, request_response::ResponseChannel};
use tokio::sync::{mpsc, oneshot};

mod behaviour;
mod codec;
mod event_loop;
mod idle;
mod mux;
mod peers;
mod transport;

pub use behaviour::{MAX_GOSSIP_BYTES, Protocols};
pub use event_loop::{EventLoop, StartError};
pub use gossipsub::{MessageAcceptance, MessageId};
pub use transport::{BuildError, build_swarm};

/// Capacity of the command channel.
const COMMAND_QUEUE: usize = 1024;
/// Capacity of the event channel.
pub const EVENT_QUEUE: usize = 1024;

/// Errors of `NetHandle` calls.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The event loop is gone (node shutting down).
    #[error("the network task has stopped")]
    Stopped,
    /// A request could not be completed.
    #[error("request to {peer} failed: {reason}")]
    Request {
        /// The peer.
        peer: PeerId,
        /// Why (dial failure, timeout, connection closed, ...).
        reason: String,
    },
    /// Publishing to a gossip topic failed.
    #[error("publish to {topic} failed: {reason}")]
    Publish {
        /// Topic.
        topic: String,
        /// Why.
        reason: String,
        /// True when it may succeed later: no peer subscribed yet, or every
        /// peer's send queue full.
        retryable: bool,
    },
    /// A DHT operation failed.
    #[error("DHT: {0}")]
    Dht(String),
    /// Dialing failed.
    #[error("dial {addr}: {reason}")]
    Dial {
        /// Address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
}

/// One peer as seen by this node.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerInfo {
    /// The peer.
    pub peer_id: PeerId,
    /// Known addresses.
    pub addrs: Vec<Multiaddr>,
    /// Connected now.
    pub connected: bool,
    /// Last measured round trip.
    pub rtt: Option<Duration>,
}

/// Counters of the network task.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Peers of another mesh that were identified and turned away.
    pub foreign_rejected: u64,
    /// Inbound events dropped because the node was not keeping up.
    pub events_shed: u64,
    /// Connections closed for being idle (see `network.idle_timeout_secs`).
    pub idle_closed: u64,
}

/// Inbound traffic and peer changes, for the node to route to its owners.
#[derive(Debug)]
pub enum Event {
    /// A peer of our mesh is connected and identified.
    PeerConnected {
        /// The peer.
        peer: PeerId,
    },
    /// The last connection to a peer closed.
    PeerDisconnected {
        /// The peer.
        peer: PeerId,
    },
    /// A peer sent a request; answer it with [`NetHandle::respond`].
    InboundRequest {
        /// The requester.
        peer: PeerId,
        /// The frame.
        data: Vec<u8>,
        /// Where the answer goes.
        channel: ResponseChannel<Vec<u8>>,
    },
    /// A gossip message awaiting validation; report with
    /// [`NetHandle::report_validation`].
    Gossip {
        /// Topic name.
        topic: String,
        /// Peer that forwarded it to us.
        propagation_source: PeerId,
        /// Message id for validation.
        message_id: MessageId,
        /// Payload.
        data: Vec<u8>,
    },
}

/// Requests to the event loop; each carries its reply channel.
#[derive(Debug)]
pub enum Command {
    /// Dial an address.
    Dial {
        /// Where.
        addr: Multiaddr,
        /// Reply.
        reply: oneshot::Sender<Result<(), Error>>,
    },
    /// Current peer table.
    Peers {
        /// Reply.
        reply: oneshot::Sender<Vec<PeerInfo>>,
    },
    /// Counters.
    Stats {
        /// Reply.
        reply: oneshot::Sender<NetStats>,
    },
    /// Addresses we listen on.
    ListenAddrs {
        /// Reply.
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    /// Remember addresses for a peer (all behaviours learn them).
    AddAddresses {
        /// The peer.
        peer: PeerId,
        /// Addresses.
        addrs: Vec<Multiaddr>,
    },
    /// Send a request frame and wait for the response frame.
    Request {
        /// The peer.
        peer: PeerId,
        /// Frame.
        data: Vec<u8>,
        /// Reply.
        reply: oneshot::Sender<Result<Vec<u8>, Error>>,
    },
    /// Answer an inbound request.
    Respond {
        /// From the `InboundRequest` event.
        channel: ResponseChannel<Vec<u8>>,
        /// Frame.
        data: Vec<u8>,
    },
    /// Subscribe to a gossip topic.
    Subscribe {
        /// Topic name.
        topic: String,
        /// Reply.
        reply: oneshot::Sender<Result<(), Error>>,
    },
    /// Publish to a gossip topic.
    Publish {
        /// Topic name.
        topic: String,
        /// Payload.
        data: Vec<u8>,
        /// Reply.
        reply: oneshot::Sender<Result<(), Error>>,
    },
    /// Verdict on a gossip message: accepted ones are forwarded.
    ReportValidation {
        /// Message.
        message_id: MessageId,
        /// Who forwarded it.
        propagation_source: PeerId,
        /// Verdict.
        acceptance: MessageAcceptance,
    },
    /// Announce this node as a provider of a DHT key.
    StartProviding {
        /// Key.
        key: Vec<u8>,
    },
    /// Stop announcing a key.
    StopProviding {
        /// Key.
        key: Vec<u8>,
    },
    /// Find providers of a key.
    GetProviders {
        /// Key.
        key: Vec<u8>,
        /// Reply.
        reply: oneshot::Sender<Result<HashSet<PeerId>, Error>>,
    },
    /// Refuse connections with a peer (and close existing ones).
    Block {
        /// The peer.
        peer: PeerId,
    },
    /// Allow a blocked peer again.
    Unblock {
        /// The peer.
        peer: PeerId,
    },
    /// Add an artificial delay to requests to a peer (simulations).
    SetLinkDelay {
        /// The peer.
        peer: PeerId,
        /// One-way delay; zero removes it.
        delay: Duration,
    },
    /// Stop the event loop.
    Shutdown,
}

/// Cheap, cloneable handle to the event loop.
#[derive(Debug, Clone)]
pub struct NetHandle {
    commands: mpsc::Sender<Command>,
    local_peer_id: PeerId,
}

impl NetHandle {
    /// Create the command channel; the receiver goes to the [`EventLoop`].
    pub fn channel(local_peer_id: PeerId) -> (NetHandle, mpsc::Receiver<Command>) {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        (
            NetHandle {
                commands: tx,
                local_peer_id,
            },
            rx,
        )
    }

    /// This node's peer id.
    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    async fn send(&self, cmd: Command) -> Result<(), Error> {
        self.commands.send(cmd).await.map_err(|_| Error::Stopped)
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Error> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx)).await?;
        rx.await.map_err(|_| Error::Stopped)
    }

    /// Dial an address.
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), Error> {
        self.call(|reply| Command::Dial { addr, reply }).await?
    }

    /// The peer table: identified peers of our mesh and DHT routing entries.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>, Error> {
        self.call(|reply| Command::Peers { reply }).await
    }

    /// Counters of the network task.
    pub async fn stats(&self) -> Result<NetStats, Error> {
        self.call(|reply| Command::Stats { reply }).await
    }

    /// Addresses this node listens on.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, Error> {
        self.call(|reply| Command::ListenAddrs { reply }).await
    }

    /// Teach the swarm addresses of a peer.
    pub async fn add_addresses(&self, peer: PeerId, addrs: Vec<Multiaddr>) -> Result<(), Error> {
        self.send(Command::AddAddresses { peer, addrs }).await
    }

    /// Send a request frame to a peer (dialling it if needed) and await the response.
    pub async fn request(&self, peer: PeerId, data: Vec<u8>) -> Result<Vec<u8>, Error> {
        self.call(|reply| Command::Request { peer, data, reply })
            .await?
    }

    /// Answer an inbound request.
    pub async fn respond(
        &self,
        channel: ResponseChannel<Vec<u8>>,
        data: Vec<u8>,
    ) -> Result<(), Error> {
        self.send(Command::Respond { channel, data }).await
    }

    /// Subscribe to a topic.
    pub async fn subscribe(&self, topic: String) -> Result<(), Error> {
        self.call(|reply| Command::Subscribe { topic, reply })
            .await?
    }

    /// Publish to a topic.
    pub async fn publish(&self, topic: String, data: Vec<u8>) -> Result<(), Error> {
        self.call(|reply| Command::Publish { topic, data, reply })
            .await?
    }

    /// Report the validation verdict of a gossip message.
    pub async fn report_validation(
        &self,
        message_id: MessageId,
        propagation_source: PeerId,
        acceptance: MessageAcceptance,
    ) -> Result<(), Error> {
        self.send(Command::ReportValidation {
            message_id,
            propagation_source,
            acceptance,
        })
        .await
    }

    /// Announce this node as a provider of `key` in the DHT (republished automatically).
    pub async fn start_providing(&self, key: Vec<u8>) -> Result<(), Error> {
        self.send(Command::StartProviding { key }).await
    }

    /// Stop announcing `key`.
    pub async fn stop_providing(&self, key: Vec<u8>) -> Result<(), Error> {
        self.send(Command::StopProviding { key }).await
    }

    /// Providers of `key` found in the DHT.
    pub async fn get_providers(&self, key: Vec<u8>) -> Result<HashSet<PeerId>, Error> {
        self.call(|reply| Command::GetProviders { key, reply })
            .await?
    }

    /// Block a peer (simulated partitions, misbehaving peers).
    pub async fn block(&self, peer: PeerId) -> Result<(), Error> {
        self.send(Command::Block { peer }).await
    }

    /// Delay every request to `peer` by `delay` (simulated slow link; zero removes it).
    pub async fn set_link_delay(&self, peer: PeerId, delay: Duration) -> Result<(), Error> {
        self.send(Command::SetLinkDelay { peer, delay }).await
    }

    /// Unblock a peer.
    pub async fn unblock(&self, peer: PeerId) -> Result<(), Error> {
        self.send(Command::Unblock { peer }).await
    }

    /// Ask the event loop to stop.
    pub async fn shutdown(&self) {
        let _ = self.send(Command::Shutdown).await;
    }
}
