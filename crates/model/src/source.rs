//! How an agent learns the cluster's state and reports back what it has realized.

use serde::{Deserialize, Serialize};

use crate::object::Object;

/// One change in the watched state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum WatchEvent {
    /// An object was created or replaced (the whole new object).
    Upsert { object: Object },
    /// An object was removed (its last known state).
    Delete { object: Object },
    /// The source reconnected: a complete listing follows (Upserts, then Synced). Anything
    /// not in that listing is gone.
    Relist,
    /// Every change up to and including `revision` has been delivered. The first `Synced`
    /// after connecting closes the initial listing.
    Synced { revision: u64 },
}

/// What an agent tells the control plane about its node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentReport {
    pub node: String,
    /// The agent can serve CNI requests (datapath loaded, pod CIDR known).
    pub ready: bool,
    /// Every change up to this revision is in the node's datapath.
    pub realized_revision: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("source disconnected: {0}")]
    Disconnected(String),
    #[error("source protocol error: {0}")]
    Protocol(String),
}

/// A blocking stream of cluster changes. Implementations reconnect on their own where they can,
/// announce it with [`WatchEvent::Relist`] and then start again with a full listing (Upserts,
/// then Synced), which consumers treat as the complete state.
pub trait Source: Send {
    fn next_event(&mut self) -> Result<WatchEvent, SourceError>;
    fn report(&mut self, report: &AgentReport) -> Result<(), SourceError>;
    /// VNet mode: a handle through which the node asks the cloud for addresses (it writes the
    /// node's NodeNetworkConfig spec). None when the source cannot take such requests.
    fn ip_requester(&self) -> Option<Box<dyn IpRequester>> {
        None
    }
}

/// Writes a node's NodeNetworkConfig spec (the request half of VNet IPAM); the cloud answers
/// in the object's status, which arrives through the watch.
pub trait IpRequester: Send {
    fn request_ips(&mut self, node: &str, spec: &crate::nnc::NncSpec) -> Result<(), SourceError>;
}
