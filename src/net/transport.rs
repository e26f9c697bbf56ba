//! Building the swarm: TCP + QUIC for real deployments, libp2p's in-memory
//! transport for simulations of many nodes in one process (with noise, or
//! with the plaintext handshake when a simulation asks for it).

use libp2p::core::transport::{MemoryTransport, Transport, upgrade};
use libp2p::identity::Keypair;
use libp2p::{Swarm, SwarmBuilder, noise, tcp};

use super::behaviour::{self, Behaviour, Protocols};
use super::mux::Yamux;
use crate::config::{NetworkConfig, TransportKind};

/// Why a swarm could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the libp2p swarm: {0}")]
pub struct BuildError(String);

/// Build a swarm for this node.
pub fn build_swarm(
    key: &Keypair,
    protocols: &Protocols,
    net: &NetworkConfig,
) -> Result<Swarm<Behaviour>, BuildError> {
    let err = |e: &dyn std::fmt::Display| BuildError(e.to_string());
    let idle = net.idle_timeout;
    let mdns = net.mdns && net.transport == TransportKind::Tcp;
    let make = |k: &Keypair| behaviour::build(k, protocols, mdns, net.kad_bootstrap_interval);
    let swarm = match net.transport {
        TransportKind::Tcp => SwarmBuilder::with_existing_identity(key.clone())
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                Yamux::new,
            )
            .map_err(|e| err(&e))?
            .with_quic()
            .with_dns()
            .map_err(|e| err(&e))?
            .with_behaviour(make)
            .map_err(|e| err(&e))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
            .build(),
        TransportKind::Memory => {
            let noise = noise::Config::new(key).map_err(|e| err(&e))?;
            let plain = net
                .memory_plaintext
                .then(|| libp2p::plaintext::Config::new(key));
            SwarmBuilder::with_existing_identity(key.clone())
                .with_tokio()
                .with_other_transport(move |_| {
                    let memory = MemoryTransport::default().upgrade(upgrade::Version::V1);
                    match plain {
                        Some(plain) => memory.authenticate(plain).multiplex(Yamux::new()).boxed(),
                        None => memory.authenticate(noise).multiplex(Yamux::new()).boxed(),
                    }
                })
                .map_err(|e| err(&e))?
                .with_behaviour(make)
                .map_err(|e| err(&e))?
                .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
                .build()
        }
    };
    Ok(swarm)
}
