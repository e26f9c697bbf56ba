//! Building the swarm: TCP + QUIC for real deployments, libp2p's in-memory
//! transport for simulations of many nodes in one process (with noise, or
//! with the plaintext handshake when a simulation asks for it).

use libp2p::core::transport::{MemoryTransport, Transport, upgrade};
use libp2p::identity::Keypair;
use libp2p::{Swarm, SwarmBuilder, noise, tcp};

use super::behaviour::{self, Behaviour, Protocols};
use super::mux::Yamux;
use crate::config::{NetworkConfig, TransportKind};

/// Bytes read from a TCP socket at a time. Noise reads its frames 8 KiB
/// at a time (its framing codec's stack buffer), so a 64 KiB frame took
/// eight `recvfrom` calls; under a buffer this size it takes one, and the
/// rest are copies. A read returns whatever the socket has, so nothing
/// waits for the buffer to fill.
const READ_BUFFER: usize = 128 * 1024;

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
        TransportKind::Tcp => {
            let noise = noise::Config::new(key).map_err(|e| err(&e))?;
            SwarmBuilder::with_existing_identity(key.clone())
                .with_tokio()
                .with_quic()
                .with_other_transport(move |_| {
                    // What `with_tcp` builds, with reads buffered under noise
                    // (see `READ_BUFFER`).
                    tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                        .map(|s, _| futures::io::BufReader::with_capacity(READ_BUFFER, s))
                        .upgrade(upgrade::Version::V1Lazy)
                        .authenticate(noise)
                        .multiplex(Yamux::new())
                        .boxed()
                })
                .map_err(|e| err(&e))?
                .with_dns()
                .map_err(|e| err(&e))?
                .with_behaviour(make)
                .map_err(|e| err(&e))?
                .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
                .build()
        }
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
