//! Commands from [`super::super::NetHandle`]s, carried out by the swarm owner.

use std::collections::HashSet;
use std::time::Instant;

use libp2p::swarm::dial_opts::DialOpts;
use libp2p::{PeerId, gossipsub, kad};
use tracing::{debug, warn};

use super::super::peers::{p2p_of, strip_p2p};
use super::super::{Command, Error};
use super::{DelayedRequest, EventLoop};

impl EventLoop {
    pub(super) fn handle_command(&mut self, cmd: Command) {
        match cmd {
            Command::Dial { addr, reply } => {
                let opts = match p2p_of(&addr) {
                    Some(p) => DialOpts::peer_id(p)
                        .addresses(vec![strip_p2p(addr.clone())])
                        .build(),
                    None => DialOpts::unknown_peer_id().address(addr.clone()).build(),
                };
                let id = opts.connection_id();
                match self.swarm.dial(opts) {
                    Ok(()) => {
                        self.dials.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(Error::Dial {
                            addr,
                            reason: e.to_string(),
                        }));
                    }
                }
            }
            Command::Peers { reply } => {
                let mut routing = Vec::new();
                for bucket in self.swarm.behaviour_mut().kad.kbuckets() {
                    for entry in bucket.iter() {
                        routing.push((
                            *entry.node.key.preimage(),
                            entry.node.value.iter().cloned().collect(),
                        ));
                    }
                }
                let _ = reply.send(self.peers.snapshot(routing));
            }
            Command::Stats { reply } => {
                let _ = reply.send(self.stats.clone());
            }
            Command::ListenAddrs { reply } => {
                let _ = reply.send(self.listen_addrs.clone());
            }
            Command::AddAddresses { peer, addrs } => {
                for a in addrs {
                    let a = strip_p2p(a);
                    self.swarm.add_peer_address(peer, a.clone());
                    self.peers.add_addr(peer, a);
                }
            }
            Command::Request { peer, data, reply } => {
                if peer == *self.swarm.local_peer_id() {
                    let _ = reply.send(Err(Error::Request {
                        peer,
                        reason: "cannot send a request to this node itself".into(),
                    }));
                    return;
                }
                match self.link_delays.get(&peer) {
                    Some(d) if !d.is_zero() => {
                        let d = *d;
                        self.delayed.push(Box::pin(async move {
                            tokio::time::sleep(d).await;
                            DelayedRequest { peer, data, reply }
                        }));
                    }
                    _ => self.send_request_now(DelayedRequest { peer, data, reply }),
                }
            }
            Command::SetLinkDelay { peer, delay } => {
                if delay.is_zero() {
                    self.link_delays.remove(&peer);
                } else {
                    self.link_delays.insert(peer, delay);
                }
            }
            Command::Respond { channel, data } => {
                if self
                    .swarm
                    .behaviour_mut()
                    .rpc
                    .send_response(channel, data)
                    .is_err()
                {
                    debug!("response not sent: the requester's connection closed");
                }
            }
            Command::Subscribe { topic, reply } => {
                let t = gossipsub::IdentTopic::new(topic.clone());
                let r = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .subscribe(&t)
                    .map(|_| ())
                    .map_err(|e| Error::Publish {
                        topic,
                        reason: e.to_string(),
                        retryable: false,
                    });
                let _ = reply.send(r);
            }
            Command::Publish { topic, data, reply } => {
                let t = gossipsub::IdentTopic::new(topic.clone());
                let r = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(t, data)
                    .map(|_| ())
                    .map_err(|e| Error::Publish {
                        topic,
                        retryable: matches!(
                            e,
                            gossipsub::PublishError::NoPeersSubscribedToTopic
                                | gossipsub::PublishError::AllQueuesFull(_)
                        ),
                        reason: e.to_string(),
                    });
                let _ = reply.send(r);
            }
            Command::ReportValidation {
                message_id,
                propagation_source,
                acceptance,
            } => {
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&message_id, &propagation_source, acceptance);
            }
            Command::StartProviding { key } => {
                if let Err(e) = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .start_providing(kad::RecordKey::new(&key))
                {
                    warn!(error = %e, "cannot store provider record");
                }
            }
            Command::StopProviding { key } => {
                self.swarm
                    .behaviour_mut()
                    .kad
                    .stop_providing(&kad::RecordKey::new(&key));
            }
            Command::GetProviders { key, reply } => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .get_providers(kad::RecordKey::new(&key));
                self.providers.insert(id, (HashSet::new(), reply));
            }
            Command::Block { peer } => {
                self.swarm.behaviour_mut().blocked.block_peer(peer);
            }
            Command::Unblock { peer } => {
                self.swarm.behaviour_mut().blocked.unblock_peer(peer);
            }
            Command::Shutdown => {}
        }
    }

    /// Close connections to peers idle past the timeout (see [`super::idle`]).
    pub(super) fn close_idle(&mut self) {
        let behaviour = self.swarm.behaviour();
        let mut keep: HashSet<PeerId> = behaviour.gossipsub.all_mesh_peers().copied().collect();
        keep.extend(self.bootstrap.connected_peers());
        keep.extend(self.requests.values().map(|(p, _)| *p));
        let idle =
            self.activity
                .idle_peers(Instant::now(), self.idle_timeout, self.min_peers, |p| {
                    keep.contains(p)
                });
        for peer in idle {
            debug!(%peer, "closing an idle connection");
            self.stats.idle_closed += 1;
            // Forget it now: a peer whose close is under way is not a candidate again.
            self.activity.disconnected(&peer);
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    pub(super) fn send_request_now(&mut self, r: DelayedRequest) {
        self.activity.touch(&r.peer, Instant::now());
        let id = self.swarm.behaviour_mut().rpc.send_request(&r.peer, r.data);
        self.requests.insert(id, (r.peer, r.reply));
    }
}
