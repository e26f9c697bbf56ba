//! Delivery: persistent, tracked messages between agents.
//!
//! An agent hands a message to its node and can forget about it. The
//! sending node commits it to its outbox (fsynced) before answering; the
//! courier task sends it in batches, one batch in flight per peer, retrying
//! with backoff; the receiving node commits it to the recipient's inbox and
//! only then answers `Stored`; the agent leases it (long-poll or SSE) and
//! acknowledges it, and a receipt travels back so the sender's tracking
//! reads `processed`. Every step is on disk before it is acknowledged, so a
//! node killed at any moment resumes from its database.
//!
//! # Layout
//! - `ids`: sortable message ids.
//! - `records`: what is stored; the status state machine.
//! - `queue`: per-peer queues with backoff (no I/O).
//! - `send`: accepting a message from a local agent (routing, idempotency).
//! - `courier`: the task that sends batches of messages and receipts.
//! - `inbox`: receiving batches, leases, acks, dead letters.
//! - `tracking`: status queries and receipts from peers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use libp2p::PeerId;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::DeliveryConfig;
use crate::discovery::Discovery;
use crate::identity::{AgentId, NodeKey};
use crate::net::NetHandle;
use crate::routing::{RouteError, Router};
use crate::store::{self, Store};
use crate::wire::rpc::{Batch, SignedParts};
use crate::wire::{self, Response};

mod ack;
mod courier;
mod ending;
mod gc;
mod handed;
pub mod ids;
mod inbox;
mod lease;
pub mod queue;
pub mod records;
mod routes;
mod send;
#[cfg(test)]
pub(crate) mod testing;
mod tracking;

pub use gc::GcReport;
pub use inbox::InboxMessage;
pub use records::{HistoryEntry, Status, Tracking};
pub use send::{SendRequest, Sent};
pub use tracking::MessageView;

/// Longest TTL a message may ask for.
pub const MAX_TTL_SECS: u64 = 30 * 24 * 3600;
/// Longest long-poll.
pub const MAX_WAIT_SECS: u64 = 60;
/// Most messages one poll returns.
pub const MAX_POLL: usize = 1000;

/// Delivery errors, each naming what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `from` is not an agent registered on this node.
    #[error("sender {0} is not an agent registered on this node")]
    SenderNotLocal(String),
    /// The agent is not registered on this node.
    #[error("agent {0} is not registered on this node")]
    AgentNotLocal(AgentId),
    /// The recipient could not be resolved.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// The body is larger than allowed.
    #[error("message body is {size} bytes; the limit is {limit}")]
    BodyTooLarge {
        /// Size.
        size: usize,
        /// Limit.
        limit: usize,
    },
    /// A field is invalid.
    #[error("{0}")]
    Invalid(String),
    /// No such message.
    #[error("no message {0} here")]
    UnknownMessage(String),
    /// The message is not waiting for an ack.
    #[error("message {id} cannot be acknowledged: it is {state}")]
    NotPending {
        /// Message.
        id: String,
        /// Its state.
        state: &'static str,
    },
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] store::Error),
    /// The node is shutting down.
    #[error("the node is shutting down")]
    Stopped,
}

/// Counters for `/metrics` and benchmarks.
#[derive(Debug, Default)]
pub struct Stats {
    /// Messages accepted from local agents.
    pub queued: AtomicU64,
    /// Messages the recipient's node confirmed stored.
    pub delivered: AtomicU64,
    /// Batches sent to peers.
    pub batches_sent: AtomicU64,
    /// Batches that failed and will be retried.
    pub batches_failed: AtomicU64,
    /// Messages stored in local inboxes.
    pub inbox_stored: AtomicU64,
    /// Duplicates recognised and not stored again.
    pub inbox_duplicates: AtomicU64,
    /// Messages refused on arrival.
    pub inbox_rejected: AtomicU64,
    /// Acks from local agents.
    pub acked: AtomicU64,
    /// Receipts applied to tracking.
    pub receipts_applied: AtomicU64,
    /// Messages that expired (either side).
    pub expired: AtomicU64,
    /// Messages that went to the dead-letter state here.
    pub dead_lettered: AtomicU64,
}

impl Stats {
    pub(crate) fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

struct Inner {
    node_id: PeerId,
    node_key: NodeKey,
    store: Store,
    net: NetHandle,
    discovery: Discovery,
    router: Arc<Router>,
    cfg: DeliveryConfig,
    ids: ids::IdGen,
    courier: mpsc::Sender<courier::Cmd>,
    inboxes: inbox::Inboxes,
    /// Deliveries not yet written (`delivery::handed`).
    handed: handed::Handed,
    /// Addresses last given to the swarm per peer (avoids re-teaching them per message).
    taught: std::sync::Mutex<std::collections::HashMap<PeerId, Vec<libp2p::Multiaddr>>>,
    /// Bytes of envelopes queued in memory (`queue::Cached`).
    cached_bytes: Arc<std::sync::atomic::AtomicUsize>,
    stats: Stats,
}

/// Cheap, cloneable handle to delivery.
#[derive(Clone)]
pub struct Delivery {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("node_id", &self.inner.node_id)
            .finish()
    }
}

impl Delivery {
    /// Load the inboxes from the database; returns the courier task's
    /// future, for the caller to spawn (it reads the outbox and the
    /// receipts to send first, beside the node's start).
    pub fn start(
        node_key: NodeKey,
        store: Store,
        net: NetHandle,
        discovery: Discovery,
        router: Arc<Router>,
        cfg: DeliveryConfig,
        cancel: CancellationToken,
    ) -> Result<
        (
            Delivery,
            impl std::future::Future<Output = ()> + Send + 'static,
        ),
        Error,
    > {
        let (tx, rx) = mpsc::channel(courier::QUEUE);
        let d = Delivery {
            inner: Arc::new(Inner {
                node_id: node_key.peer_id(),
                node_key,
                store,
                net,
                discovery,
                router,
                cfg,
                ids: ids::IdGen::default(),
                courier: tx,
                inboxes: inbox::Inboxes::default(),
                handed: handed::Handed::default(),
                taught: std::sync::Mutex::new(std::collections::HashMap::new()),
                cached_bytes: Arc::default(),
                stats: Stats::default(),
            }),
        };
        d.load_inboxes()?;
        // Status rows name their route; reading them needs every route.
        routes::load(&d.inner.store).map_err(Error::Store)?;
        // The courier reads the outbox itself, beside the node's start.
        let task = courier::run(d.clone(), rx, cancel);
        Ok((d, task))
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    /// Messages waiting in the outbox and receipts waiting to be sent.
    pub async fn backlog(&self) -> Result<(usize, usize), Error> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.inner
            .courier
            .send(courier::Cmd::Backlog(tx))
            .await
            .map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)
    }

    /// Answer a signed batch request from a peer (`Deliver` or `Receipts`),
    /// its fields where `parts` says they lie in `frame`.
    pub async fn handle_batch(&self, peer: PeerId, frame: Vec<u8>, parts: SignedParts) -> Response {
        let frame = Arc::new(frame);
        let sig = &frame[parts.sig.clone()];
        let done = match parts.batch {
            Batch::Deliver => self
                .accept_batch(peer, &frame, parts.payload, sig)
                .await
                .map(Response::Delivered),
            Batch::Receipts => self
                .apply_receipts(peer, &frame[parts.payload], sig)
                .await
                .map(|()| Response::Ack),
        };
        done.unwrap_or_else(|message| Response::Error { message })
    }

    /// A peer connected: retry its queues now.
    pub async fn on_peer_connected(&self, peer: PeerId) {
        let _ = self.inner.courier.send(courier::Cmd::PeerUp(peer)).await;
    }
}

/// Signing domain of delivery batches (`wire::digest_signing_bytes`).
pub(crate) const DELIVER_DOMAIN: &str = "deliver.b3";
/// Signing domain of receipt batches.
pub(crate) const RECEIPTS_DOMAIN: &str = "receipts.b3";

/// Verify a node's signature over an encoded payload.
fn verify_node_sig(peer: &PeerId, domain: &str, payload: &[u8], sig: &[u8]) -> Result<(), String> {
    let pk = crate::identity::public_key_of(peer).map_err(|e| format!("sender node key: {e}"))?;
    let sig: [u8; 64] = sig
        .try_into()
        .map_err(|_| "signature is not 64 bytes".to_string())?;
    crate::identity::verify(&pk, &wire::digest_signing_bytes(domain, payload), &sig)
        .map_err(|_| format!("{domain} batch signature does not verify"))
}
