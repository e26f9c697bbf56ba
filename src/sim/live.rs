//! The shared view of the running mesh: a handle per running node and the
//! simulation agents per node. The runner changes it as faults happen; the
//! traffic generator and the samplers read it.
//!
//! A handle is taken out of the view *before* its node is stopped or
//! crashed, so nobody picks it up again; those who cloned it just before
//! hold it only for one call (a node's database closes when its last
//! handle drops).

use std::collections::HashMap;
use std::sync::RwLock;

use crate::identity::AgentId;
use crate::node::NodeHandle;

/// What the view holds.
#[derive(Debug, Default)]
pub struct View {
    /// Node `i`'s handle while it runs.
    pub handles: Vec<Option<NodeHandle>>,
    /// Simulation agents registered on node `i` (not probes).
    pub agents: Vec<Vec<AgentId>>,
    /// Agents on nodes that never leave for good: random-pair recipients.
    pub recipients: Vec<AgentId>,
    /// The node of every simulation agent.
    pub agent_slot: HashMap<AgentId, usize>,
}

impl View {
    /// Whether node `i` runs now.
    pub fn is_running(&self, i: usize) -> bool {
        self.handles.get(i).is_some_and(Option::is_some)
    }
}

/// The view behind a lock (never held across an await).
#[derive(Debug, Default)]
pub struct Live {
    view: RwLock<View>,
}

impl Live {
    /// Read the view.
    pub fn with<R>(&self, f: impl FnOnce(&View) -> R) -> R {
        f(&self.view.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn write<R>(&self, f: impl FnOnce(&mut View) -> R) -> R {
        f(&mut self.view.write().unwrap_or_else(|p| p.into_inner()))
    }

    /// Node `i`'s handle, if it runs.
    pub fn handle(&self, i: usize) -> Option<NodeHandle> {
        self.with(|v| v.handles.get(i).cloned().flatten())
    }

    /// Every running node's index and handle.
    pub fn running(&self) -> Vec<(usize, NodeHandle)> {
        self.with(|v| {
            v.handles
                .iter()
                .enumerate()
                .filter_map(|(i, h)| Some((i, h.clone()?)))
                .collect()
        })
    }

    /// Number of running nodes.
    pub fn running_count(&self) -> usize {
        self.with(|v| v.handles.iter().filter(|h| h.is_some()).count())
    }

    /// Put node `i`'s handle in (it started) or take it out (it is stopping).
    pub fn set_handle(&self, i: usize, h: Option<NodeHandle>) {
        self.write(|v| {
            if v.handles.len() <= i {
                v.handles.resize(i + 1, None);
            }
            v.handles[i] = h;
        });
    }

    /// Record node `i`'s simulation agents; `stays` says whether the node
    /// never leaves for good (then they receive random-pair traffic).
    pub fn add_agents(&self, i: usize, ids: &[AgentId], stays: bool) {
        self.write(|v| {
            if v.agents.len() <= i {
                v.agents.resize(i + 1, Vec::new());
            }
            v.agents[i].extend(ids.iter().cloned());
            for id in ids {
                v.agent_slot.insert(id.clone(), i);
                if stays {
                    v.recipients.push(id.clone());
                }
            }
        });
    }

    /// Node `i`'s simulation agents.
    pub fn agents_of(&self, i: usize) -> Vec<AgentId> {
        self.with(|v| v.agents.get(i).cloned().unwrap_or_default())
    }
}
