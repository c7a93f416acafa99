//! The control plane's wire protocol: one JSON request line per unix-socket connection, answered
//! by one JSON response line (or, for `Watch`, a stream of `Event` lines).

use std::collections::BTreeMap;

use ferrum_model::{AgentReport, Kind, NncSpec, Object, ObjectRef, WatchEvent};
use k8s_openapi::api::core::v1::PodStatus;
use serde::{Deserialize, Serialize};

/// What happened to one object in an apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ApplyAction {
    Created,
    Configured,
    Unchanged,
}

impl ApplyAction {
    /// kubectl's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            ApplyAction::Created => "created",
            ApplyAction::Configured => "configured",
            ApplyAction::Unchanged => "unchanged",
        }
    }
}

/// The answer to an apply: the store's revision after it, and one result per object in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyOutcome {
    pub revision: u64,
    pub results: Vec<(ObjectRef, ApplyAction)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "camelCase")]
pub enum Request {
    /// Create or replace; with `wait`, answer only once every node has realized the change.
    Apply {
        objects: Vec<Object>,
        wait: bool,
    },
    /// Delete all of `refs` (refused whole if any is missing).
    Delete {
        refs: Vec<ObjectRef>,
        wait: bool,
    },
    List {
        kind: Kind,
        #[serde(default)]
        namespace: Option<String>,
    },
    Get {
        object: ObjectRef,
    },
    /// Stream: a snapshot of Upserts, Synced, then live events until the client goes away.
    Watch,
    UpdatePodStatus {
        namespace: String,
        name: String,
        status: Box<PodStatus>,
    },
    Report {
        component: String,
        report: AgentReport,
    },
    Reports,
    Revision,
    /// VNet mode: a node's request for addresses (its NodeNetworkConfig spec).
    UpdateNncSpec {
        name: String,
        spec: NncSpec,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "camelCase")]
pub enum Response {
    Applied {
        outcome: ApplyOutcome,
    },
    Revision {
        revision: u64,
    },
    Objects {
        items: Vec<Object>,
    },
    Object {
        object: Option<Object>,
    },
    Event {
        event: WatchEvent,
    },
    Reports {
        reports: BTreeMap<String, AgentReport>,
    },
    Ok,
    Error {
        message: String,
    },
}
