//! Routing: turning an address (`@handle`, an agent id, or a capability
//! query) into concrete recipients.
//!
//! `parse_address` and `resolve` are pure and unit-tested; [`Router`] adds
//! the DHT fallback (through discovery) and per-capability round-robin.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use libp2p::{Multiaddr, PeerId};
use serde_json::Value;

use crate::discovery::{self, Discovery, Entry, Filter, NamePattern, Registry, matching};
use crate::identity::AgentId;
use crate::wire::AdState;

/// How many characters of an agent id disambiguate a handle in listings.
const DISAMBIGUATION_CHARS: usize = 8;

/// Where a message should go.
#[derive(Debug, Clone, PartialEq)]
pub enum Address {
    /// `@handle`, optionally `@handle#<first chars of the agent id>`.
    Handle {
        /// The handle.
        handle: String,
        /// Agent id prefix (after `agt_`) to pick one of several agents.
        id_prefix: Option<String>,
    },
    /// An agent id.
    Agent(AgentId),
    /// Any agent offering a capability.
    Capability {
        /// Name pattern, tags, version.
        filter: Filter,
        /// One provider or all.
        strategy: Strategy,
    },
}

/// Pick one provider or fan out to all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// One provider, preferring reachable nodes, spreading load round-robin.
    One,
    /// Every provider.
    All,
}

/// Routing failures; each names what was looked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The address is malformed.
    #[error("invalid recipient: {0}")]
    Invalid(String),
    /// Nothing matches.
    #[error("no recipient found: {0}")]
    NotFound(String),
    /// A handle names several agents.
    #[error("@{handle} is ambiguous; use one of: {}", candidates.join(", "))]
    Ambiguous {
        /// The handle.
        handle: String,
        /// `@handle#prefix` forms that pick each one.
        candidates: Vec<String>,
    },
}

/// One concrete recipient.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipient {
    /// The agent.
    pub agent_id: AgentId,
    /// Its handle.
    pub handle: String,
    /// The node hosting it.
    pub node_id: PeerId,
    /// The same, as text (the ad's verified `node_id`; saves formatting
    /// the PeerId on every message).
    pub node_name: String,
    /// Where that node can be dialled.
    pub addrs: Vec<Multiaddr>,
}

impl Recipient {
    fn from_entry(e: &Entry) -> Option<Recipient> {
        let b = &e.ad.body;
        Some(Recipient {
            agent_id: b.agent_id.clone(),
            handle: b.handle.clone(),
            node_id: e.node?,
            node_name: b.node_id.clone(),
            addrs: e.addrs.clone(),
        })
    }
}

/// Parse the `to` of a message: `"@handle"`, `"@handle#abc123"`,
/// `"agt_..."`, or `{"capability": "...", "tags": [...], "version": "...",
/// "strategy": "one"|"all"}`.
pub fn parse_address(v: &Value) -> Result<Address, RouteError> {
    match v {
        Value::String(s) => parse_address_str(s),
        Value::Object(o) => {
            for k in o.keys() {
                if !matches!(k.as_str(), "capability" | "tags" | "version" | "strategy") {
                    return Err(RouteError::Invalid(format!(
                        "unknown field {k:?} in a capability address (expected capability, tags, version, strategy)"
                    )));
                }
            }
            let cap = match o.get("capability") {
                Some(Value::String(c)) => Some(
                    NamePattern::parse(c)
                        .map_err(|e| RouteError::Invalid(format!("capability: {e}")))?,
                ),
                None | Some(Value::Null) => None,
                Some(_) => return Err(RouteError::Invalid("capability must be a string".into())),
            };
            let tags = match o.get("tags") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|t| {
                        t.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| RouteError::Invalid("tags must be strings".into()))
                    })
                    .collect::<Result<_, _>>()?,
                Some(_) => {
                    return Err(RouteError::Invalid(
                        "tags must be an array of strings".into(),
                    ));
                }
            };
            let version = match o.get("version") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(
                    matching::parse_version_req(s)
                        .map_err(|e| RouteError::Invalid(e.to_string()))?,
                ),
                Some(_) => {
                    return Err(RouteError::Invalid(
                        "version must be a string like \"^1.2\"".into(),
                    ));
                }
            };
            let strategy = match o.get("strategy") {
                None | Some(Value::Null) => Strategy::One,
                Some(Value::String(s)) if s == "one" => Strategy::One,
                Some(Value::String(s)) if s == "all" => Strategy::All,
                Some(other) => {
                    return Err(RouteError::Invalid(format!(
                        "strategy must be \"one\" or \"all\", not {other}"
                    )));
                }
            };
            if cap.is_none() && tags.is_empty() {
                return Err(RouteError::Invalid(
                    "a capability address needs a capability or tags".into(),
                ));
            }
            Ok(Address::Capability {
                filter: Filter {
                    name: cap,
                    tags,
                    version,
                },
                strategy,
            })
        }
        _ => Err(RouteError::Invalid(
            "expected \"@handle\", an agent id, or {\"capability\": ...}".into(),
        )),
    }
}

fn parse_address_str(s: &str) -> Result<Address, RouteError> {
    if let Some(rest) = s.strip_prefix('@') {
        let (handle, id_prefix) = match rest.split_once('#') {
            Some((h, p)) if !p.is_empty() => {
                (h, Some(p.strip_prefix("agt_").unwrap_or(p).to_string()))
            }
            Some(_) => return Err(RouteError::Invalid(format!("{s:?}: nothing after '#'"))),
            None => (rest, None),
        };
        discovery::ad::validate_handle(handle).map_err(|e| RouteError::Invalid(e.to_string()))?;
        return Ok(Address::Handle {
            handle: handle.to_string(),
            id_prefix,
        });
    }
    if s.starts_with("agt_") {
        return s
            .parse::<AgentId>()
            .map(Address::Agent)
            .map_err(|e| RouteError::Invalid(e.to_string()));
    }
    Err(RouteError::Invalid(format!(
        "{s:?} is neither \"@handle\" nor an agent id (agt_...)"
    )))
}

/// What `resolve` needs besides the registry.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// This node.
    pub local_node: PeerId,
    /// Nodes connected now.
    pub connected: &'a HashSet<PeerId>,
    /// Round-robin position for `strategy: one`.
    pub turn: u64,
}

/// Resolve against a registry snapshot.
pub fn resolve(
    addr: &Address,
    reg: &Registry,
    ctx: Context<'_>,
) -> Result<Vec<Recipient>, RouteError> {
    match addr {
        Address::Agent(id) => match reg.get(id) {
            Some(e) if e.ad.body.state == AdState::Withdrawn => {
                Err(RouteError::NotFound(format!("agent {id} was withdrawn")))
            }
            Some(e) => Recipient::from_entry(e)
                .map(|r| vec![r])
                .ok_or_else(|| RouteError::NotFound(format!("agent {id} has an unusable node id"))),
            None => Err(RouteError::NotFound(format!(
                "no agent {id} is known in the mesh"
            ))),
        },
        Address::Handle { handle, id_prefix } => {
            let all = reg.with_handle(handle);
            let matching: Vec<&Entry> = all
                .into_iter()
                .filter(|e| e.ad.body.state != AdState::Withdrawn)
                .filter(|e| {
                    id_prefix.as_ref().is_none_or(|p| {
                        e.ad.body.agent_id.as_str()["agt_".len()..].starts_with(p.as_str())
                    })
                })
                .collect();
            let active: Vec<&Entry> = matching.iter().copied().filter(|e| e.is_active()).collect();
            // Offline agents (node restarting) are still addressable directly.
            let pool = if active.is_empty() { matching } else { active };
            match pool.as_slice() {
                [] => Err(RouteError::NotFound(match id_prefix {
                    Some(p) => format!("no agent with handle @{handle} and id starting with {p}"),
                    None => format!("no agent with handle @{handle}"),
                })),
                [one] => Recipient::from_entry(one).map(|r| vec![r]).ok_or_else(|| {
                    RouteError::NotFound(format!("@{handle} has an unusable node id"))
                }),
                many => Err(RouteError::Ambiguous {
                    handle: handle.clone(),
                    candidates: many
                        .iter()
                        .map(|e| {
                            let id = &e.ad.body.agent_id.as_str()["agt_".len()..];
                            format!("@{handle}#{}", &id[..DISAMBIGUATION_CHARS.min(id.len())])
                        })
                        .collect(),
                }),
            }
        }
        Address::Capability { filter, strategy } => {
            let mut providers: Vec<&Entry> = reg
                .active()
                .filter(|e| filter.matches(&e.ad.body.capabilities))
                .collect();
            providers.sort_by(|a, b| a.ad.body.agent_id.cmp(&b.ad.body.agent_id));
            if providers.is_empty() {
                return Err(RouteError::NotFound(describe_filter(filter)));
            }
            let chosen: Vec<&Entry> = match strategy {
                Strategy::All => providers,
                Strategy::One => {
                    let reachable: Vec<&Entry> = providers
                        .iter()
                        .copied()
                        .filter(|e| {
                            e.local
                                || e.ad.body.node_id.parse::<PeerId>().is_ok_and(|p| {
                                    p == ctx.local_node || ctx.connected.contains(&p)
                                })
                        })
                        .collect();
                    let pool = if reachable.is_empty() {
                        providers
                    } else {
                        reachable
                    };
                    vec![pool[(ctx.turn % pool.len() as u64) as usize]]
                }
            };
            Ok(chosen
                .into_iter()
                .filter_map(Recipient::from_entry)
                .collect())
        }
    }
}

fn describe_filter(f: &Filter) -> String {
    let mut parts = Vec::new();
    if let Some(n) = &f.name {
        parts.push(format!("capability {n}"));
    }
    if !f.tags.is_empty() {
        parts.push(format!("tags [{}]", f.tags.join(", ")));
    }
    if let Some(v) = &f.version {
        parts.push(format!("version {v}"));
    }
    format!("no agent offers {}", parts.join(" with "))
}

/// Resolves addresses against the live registry, asking the DHT when the
/// local view has no answer, and rotating among providers.
#[derive(Debug)]
pub struct Router {
    discovery: Discovery,
    turns: Mutex<HashMap<String, u64>>,
}

impl Router {
    /// A router over this node's discovery.
    pub fn new(discovery: Discovery) -> Self {
        Router {
            discovery,
            turns: Mutex::new(HashMap::new()),
        }
    }

    fn next_turn(&self, addr: &Address) -> u64 {
        let key = match addr {
            Address::Capability { filter, .. } => format!("{:?}", filter),
            _ => return 0,
        };
        let mut t = self.turns.lock().unwrap_or_else(|p| p.into_inner());
        let v = t.entry(key).or_insert(0);
        let now = *v;
        *v = v.wrapping_add(1);
        now
    }

    fn resolve_local(&self, addr: &Address, turn: u64) -> Result<Vec<Recipient>, RouteError> {
        let connected = self.discovery.connected_peers();
        let ctx = Context {
            local_node: self.discovery.node_id(),
            connected: &connected,
            turn,
        };
        self.discovery.with_registry(|reg| resolve(addr, reg, ctx))
    }

    /// Resolve an address to recipients.
    pub async fn resolve(&self, addr: &Address) -> Result<Vec<Recipient>, RouteError> {
        let turn = self.next_turn(addr);
        match self.resolve_local(addr, turn) {
            Err(RouteError::NotFound(_)) => {}
            other => return other,
        }
        let key = match addr {
            Address::Agent(id) => format!("agent/{id}"),
            Address::Handle { handle, .. } => format!("handle/{handle}"),
            Address::Capability { filter, .. } => {
                match discovery::dht::key_for_query(None, None, filter.name.as_ref(), &filter.tags)
                {
                    Some(k) => k,
                    None => return self.resolve_local(addr, turn),
                }
            }
        };
        self.discovery.lookup_dht(&key).await;
        self.resolve_local(addr, turn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::ad::{self, tests::sample};
    use crate::identity::{NodeKey, generate_key};
    use serde_json::json;

    fn reg_with(entries: &[(&str, &NodeKey, AdState)]) -> (Registry, Vec<AgentId>) {
        let mut r = Registry::default();
        let mut ids = Vec::new();
        for (i, (handle, node, state)) in entries.iter().enumerate() {
            let k = generate_key().unwrap();
            let mut a = sample(&k, node, handle, 1, 1000 + i as u64);
            a.body.state = *state;
            let a = ad::sign(a.body, &k, node);
            ids.push(a.body.agent_id.clone());
            r.apply(a, 1000, false);
        }
        (r, ids)
    }

    fn ctx(connected: &HashSet<PeerId>) -> Context<'_> {
        Context {
            local_node: PeerId::random(),
            connected,
            turn: 0,
        }
    }

    #[test]
    fn parses_addresses() {
        assert_eq!(
            parse_address(&json!("@bob")).unwrap(),
            Address::Handle {
                handle: "bob".into(),
                id_prefix: None
            }
        );
        assert_eq!(
            parse_address(&json!("@bob#agt_3xY")).unwrap(),
            Address::Handle {
                handle: "bob".into(),
                id_prefix: Some("3xY".into())
            }
        );
        let Address::Capability { filter, strategy } =
            parse_address(&json!({"capability": "translate/*", "tags": ["fr"], "strategy": "all"}))
                .unwrap()
        else {
            panic!("capability address")
        };
        assert_eq!(strategy, Strategy::All);
        assert_eq!(filter.tags, vec!["fr".to_string()]);
        for bad in [
            json!("bob"),
            json!("@"),
            json!("@Bob"),
            json!("@bob#"),
            json!("agt_nope"),
            json!(3),
            json!({"capability": "a", "strategy": "some"}),
            json!({"tags": "x"}),
            json!({}),
            json!({"capability": "x", "colour": 1}),
        ] {
            assert!(
                matches!(parse_address(&bad), Err(RouteError::Invalid(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn ambiguous_handles_list_candidates_that_resolve() {
        let (n1, n2) = (NodeKey::generate().unwrap(), NodeKey::generate().unwrap());
        let (reg, ids) = reg_with(&[("bob", &n1, AdState::Active), ("bob", &n2, AdState::Active)]);
        let c = HashSet::new();
        let err = resolve(&parse_address(&json!("@bob")).unwrap(), &reg, ctx(&c)).unwrap_err();
        let RouteError::Ambiguous { candidates, .. } = &err else {
            panic!("{err}")
        };
        assert_eq!(candidates.len(), 2);
        for cand in candidates {
            let r = resolve(&parse_address(&json!(cand)).unwrap(), &reg, ctx(&c)).unwrap();
            assert_eq!(r.len(), 1);
            assert!(ids.contains(&r[0].agent_id));
        }
    }

    #[test]
    fn offline_agents_are_addressable_withdrawn_are_not() {
        let n = NodeKey::generate().unwrap();
        let (reg, ids) = reg_with(&[
            ("bob", &n, AdState::Offline),
            ("gone", &n, AdState::Withdrawn),
        ]);
        let c = HashSet::new();
        assert_eq!(
            resolve(&parse_address(&json!("@bob")).unwrap(), &reg, ctx(&c))
                .unwrap()
                .len(),
            1
        );
        assert!(matches!(
            resolve(&parse_address(&json!("@gone")).unwrap(), &reg, ctx(&c)),
            Err(RouteError::NotFound(_))
        ));
        assert!(matches!(
            resolve(&Address::Agent(ids[1].clone()), &reg, ctx(&c)),
            Err(RouteError::NotFound(m)) if m.contains("withdrawn")
        ));
    }

    #[test]
    fn capability_one_prefers_connected_and_rotates() {
        let (n1, n2, n3) = (
            NodeKey::generate().unwrap(),
            NodeKey::generate().unwrap(),
            NodeKey::generate().unwrap(),
        );
        let (reg, _) = reg_with(&[
            ("a", &n1, AdState::Active),
            ("b", &n2, AdState::Active),
            ("c", &n3, AdState::Active),
        ]);
        let addr = parse_address(&json!({"capability": "summarize"})).unwrap();
        let connected: HashSet<PeerId> = [n1.peer_id(), n2.peer_id()].into();
        let mut seen = HashSet::new();
        for turn in 0..4 {
            let r = resolve(
                &addr,
                &reg,
                Context {
                    local_node: PeerId::random(),
                    connected: &connected,
                    turn,
                },
            )
            .unwrap();
            assert_eq!(r.len(), 1);
            assert_ne!(r[0].node_id, n3.peer_id(), "unconnected provider avoided");
            seen.insert(r[0].node_id);
        }
        assert_eq!(seen.len(), 2, "load spread over both connected providers");
        let all = parse_address(&json!({"capability": "summarize", "strategy": "all"})).unwrap();
        assert_eq!(resolve(&all, &reg, ctx(&connected)).unwrap().len(), 3);
        let none = parse_address(&json!({"capability": "translate/*", "tags": ["fr"]})).unwrap();
        let err = resolve(&none, &reg, ctx(&connected)).unwrap_err();
        assert!(
            err.to_string().contains("translate/*") && err.to_string().contains("fr"),
            "{err}"
        );
    }
}
