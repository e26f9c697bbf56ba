//! agentmesh: a peer-to-peer mesh for AI agents.
//!
//! Every agent host runs a sidecar node. Nodes find each other (bootstrap
//! peers, mDNS), gossip signed capability advertisements, keep a Kademlia
//! DHT, and deliver messages durably, with no central broker.
//!
//! # Layout
//! - [`config`]: `NodeConfig`, its TOML file format, defaults and validation.
//! - [`identity`]: node and agent keys, ids, signing.
//! - [`wire`]: encoding of everything that crosses the network.
//! - [`net`]: the task owning the libp2p swarm, and its handle.
//! - [`store`]: the redb database and its group committer.
//! - [`node`]: wires the parts together; `NodeHandle` is the façade.
//! - [`api`]: the local HTTP API.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod api;
pub mod bench;
pub mod client;
pub mod cluster;
pub mod config;
pub mod delivery;
pub mod discovery;
pub mod identity;
pub mod net;
pub mod node;
pub mod routing;
pub mod sim;
pub mod store;
pub mod time;
pub mod wire;

pub use config::NodeConfig;
pub use node::{Node, NodeHandle};
