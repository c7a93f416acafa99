//! Ferrum's custom resources, defined in Rust (kube-derive); their CRD YAML in deploy/ is
//! generated from these types by [`crd_yaml`] and a test keeps the checked-in file current.

use std::collections::BTreeMap;

use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of Ferrum's resources.
pub const GROUP: &str = "ferrum.dev";
/// Name of the cluster's one address pool object.
pub const POOL_NAME: &str = "default";

/// One per node (named after the Node): the node's VNet pod address batches and what the
/// node's agent reports back, like the product's per-node network-config resource.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "ferrum.dev",
    version = "v1alpha1",
    kind = "FerrumNode",
    plural = "ferrumnodes",
    shortname = "fnode",
    status = "FerrumNodeStatus",
    printcolumn = r#"{"name":"Ready","type":"boolean","jsonPath":".status.ready"}"#,
    printcolumn = r#"{"name":"Pod CIDRs","type":"string","jsonPath":".spec.podCIDRs"}"#,
    printcolumn = r#"{"name":"Message","type":"string","jsonPath":".status.message"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct FerrumNodeSpec {
    /// VNet mode: the pod address batches (CIDRs) allocated to this node, in allocation order.
    /// Written by the node's agent after each claim or release; a copy of the node's entry in
    /// the FerrumIPPool, which is the authority.
    #[serde(default, rename = "podCIDRs")]
    #[schemars(rename = "podCIDRs")]
    pub pod_cidrs: Vec<String>,
    /// VNet mode: how many pod addresses the node's agent wants to hold (its batch scaler's
    /// request, as in the lab's NodeNetworkConfig spec.requestedIPCount). Batches are claimed
    /// until the node holds this many batches' worth; 0 before the agent first asked.
    #[serde(default, rename = "requestedIPCount")]
    #[schemars(rename = "requestedIPCount")]
    pub requested_ip_count: u32,
}

/// What the node's agent reports.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FerrumNodeStatus {
    /// The agent serves CNI requests (datapath loaded, pod addresses known).
    pub ready: bool,
    /// Changes the agent has put into the node's datapath, counted by the agent's watch.
    pub realized_revision: u64,
    /// Why the node is not ready, when it is not.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// The cluster's VNet pod subnet and which node owns which batch of it. One object, named
/// `default`; agents claim batches by replacing it with the resourceVersion they read, so two
/// agents can never take the same batch (the loser gets 409 Conflict, re-reads and retries).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "ferrum.dev",
    version = "v1alpha1",
    kind = "FerrumIPPool",
    plural = "ferrumippools",
    shortname = "fpool",
    printcolumn = r#"{"name":"CIDR","type":"string","jsonPath":".spec.cidr"}"#,
    printcolumn = r#"{"name":"Batch","type":"integer","jsonPath":".spec.batchPrefixLength"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct FerrumIPPoolSpec {
    /// The pod subnet batches are carved from (IPv4 CIDR).
    pub cidr: String,
    /// Prefix length of one batch (e.g. 28: 16 addresses).
    pub batch_prefix_length: u8,
    /// Node name -> the batches it owns.
    #[serde(default)]
    pub allocations: BTreeMap<String, Vec<String>>,
    /// A node asks for another batch when fewer than this percentage of a batch is free.
    #[serde(default = "default_request_threshold")]
    pub request_threshold_percent: u32,
    /// A node gives a whole free batch back when more than this percentage of a batch is free.
    #[serde(default = "default_release_threshold")]
    pub release_threshold_percent: u32,
}

impl Default for FerrumIPPoolSpec {
    fn default() -> Self {
        Self {
            cidr: String::new(),
            batch_prefix_length: 28,
            allocations: BTreeMap::new(),
            request_threshold_percent: default_request_threshold(),
            release_threshold_percent: default_release_threshold(),
        }
    }
}

fn default_request_threshold() -> u32 {
    50
}

fn default_release_threshold() -> u32 {
    150
}

/// The CRDs as one multi-document YAML, exactly as checked in at deploy/crds.yaml.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    let header = "# Generated from crates/k8s/src/crd.rs by `ferrum-agent crds`; do not edit.\n";
    let mut out = String::from(header);
    for crd in [FerrumNode::crd(), FerrumIPPool::crd()] {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crds_are_cluster_scoped_and_name_their_fields() {
        let node = FerrumNode::crd();
        assert_eq!(node.spec.scope, "Cluster");
        assert_eq!(node.spec.group, GROUP);
        let yaml = crd_yaml().unwrap();
        assert!(yaml.contains("podCIDRs"), "{yaml}");
        assert!(yaml.contains("batchPrefixLength"));
        assert!(yaml.contains("realizedRevision"));
        assert_eq!(FerrumIPPool::crd().spec.scope, "Cluster");
    }

    #[test]
    fn node_spec_round_trips_with_kubernetes_field_names() {
        let spec: FerrumNodeSpec =
            serde_json::from_value(serde_json::json!({"podCIDRs": ["10.241.0.0/28"]})).unwrap();
        assert_eq!(spec.pod_cidrs, vec!["10.241.0.0/28"]);
        assert_eq!(spec.requested_ip_count, 0, "absent before the agent asked");
        let spec = FerrumNodeSpec {
            requested_ip_count: 32,
            ..spec
        };
        assert_eq!(
            serde_json::to_value(&spec).unwrap(),
            serde_json::json!({"podCIDRs": ["10.241.0.0/28"], "requestedIPCount": 32})
        );
        // The pool's thresholds default to the documented 50% / 150%.
        let pool: FerrumIPPoolSpec = serde_json::from_value(
            serde_json::json!({"cidr": "10.241.0.0/16", "batchPrefixLength": 28}),
        )
        .unwrap();
        assert_eq!(
            (
                pool.request_threshold_percent,
                pool.release_threshold_percent
            ),
            (50, 150)
        );
    }
}
