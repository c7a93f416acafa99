//! NodeNetworkConfig: the per-node VNet IP state, shaped after the resource Azure CNS and the
//! cloud's delegated network controller share on AKS. The node (agent) writes `spec` — how many
//! addresses it wants and which it no longer uses; the cloud writes `status` — the addresses it
//! assigned and the batch policy. One per node, named after the node, in kube-system.

use std::net::Ipv4Addr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

pub const NNC_API_VERSION: &str = "ferrum.io/v1alpha1";
pub const NNC_KIND: &str = "NodeNetworkConfig";
pub const NNC_NAMESPACE: &str = "kube-system";
/// Annotation on a NodeNetworkConfig that has no status: why none can be given yet (Kubernetes
/// mode: the FerrumIPPool is missing, invalid, or outside the agent's --cluster-pod-cidr). The
/// agent reports it as the reason it is not ready.
pub const NNC_PENDING_ANNOTATION: &str = "ferrum.dev/pending-reason";

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeNetworkConfig {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: NncSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<NncStatus>,
}

/// The node's request.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NncSpec {
    /// How many addresses the node wants to hold (a multiple of the batch size).
    #[serde(rename = "requestedIPCount")]
    pub requested_ip_count: u32,
    /// Addresses the node gives back; it never hands them to pods again.
    #[serde(default, rename = "ipsNotInUse", skip_serializing_if = "Vec::is_empty")]
    pub ips_not_in_use: Vec<Ipv4Addr>,
}

/// The batch policy the cloud tells the node to follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NncScaler {
    pub batch_size: u32,
    pub request_threshold_percent: u32,
    pub release_threshold_percent: u32,
    #[serde(rename = "maxIPCount")]
    pub max_ip_count: u32,
}

/// What the cloud did.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NncStatus {
    /// The pod subnet the addresses come from (CIDR).
    pub pod_subnet: String,
    /// Every address assigned to the node (sorted).
    #[serde(default, rename = "assignedIPs")]
    pub assigned_ips: Vec<Ipv4Addr>,
    pub scaler: NncScaler,
    /// The pod subnet had no address left for the last request.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub subnet_exhausted: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Set when addresses come and go in aligned CIDR batches of this prefix length
    /// (Kubernetes mode, from the FerrumIPPool): the node gives back only whole batches.
    /// Absent: any address can be given back (the lab cloud).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_prefix_length: Option<u8>,
}

impl NodeNetworkConfig {
    /// The NodeNetworkConfig of `node`, with the node's initial request.
    pub fn new(node: &str, requested_ip_count: u32) -> Self {
        Self {
            api_version: NNC_API_VERSION.into(),
            kind: NNC_KIND.into(),
            metadata: ObjectMeta {
                name: Some(node.into()),
                namespace: Some(NNC_NAMESPACE.into()),
                ..Default::default()
            },
            spec: NncSpec {
                requested_ip_count,
                ips_not_in_use: Vec::new(),
            },
            status: None,
        }
    }

    /// The node it belongs to (its name).
    pub fn node(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or_default()
    }

    /// Why the status is missing, when whoever writes it said so ([`NNC_PENDING_ANNOTATION`]).
    pub fn pending_reason(&self) -> Option<&str> {
        self.metadata
            .annotations
            .as_ref()?
            .get(NNC_PENDING_ANNOTATION)
            .map(String::as_str)
            .filter(|r| !r.is_empty())
    }

    /// Records why the status is missing (see [`NodeNetworkConfig::pending_reason`]).
    pub fn set_pending_reason(&mut self, reason: &str) {
        self.metadata
            .annotations
            .get_or_insert_default()
            .insert(NNC_PENDING_ANNOTATION.into(), reason.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_uses_the_aks_field_names() {
        let mut n = NodeNetworkConfig::new("node-0", 16);
        n.spec.ips_not_in_use = vec![Ipv4Addr::new(10, 225, 0, 9)];
        n.status = Some(NncStatus {
            pod_subnet: "10.225.0.0/16".into(),
            assigned_ips: vec![Ipv4Addr::new(10, 225, 0, 1)],
            scaler: NncScaler {
                batch_size: 16,
                request_threshold_percent: 50,
                release_threshold_percent: 150,
                max_ip_count: 112,
            },
            subnet_exhausted: false,
            message: String::new(),
            batch_prefix_length: None,
        });
        let v = serde_json::to_value(&n).unwrap();
        assert_eq!(v["apiVersion"], NNC_API_VERSION);
        assert_eq!(v["kind"], "NodeNetworkConfig");
        assert_eq!(v["spec"]["requestedIPCount"], 16);
        assert_eq!(v["spec"]["ipsNotInUse"][0], "10.225.0.9");
        assert_eq!(v["status"]["assignedIPs"][0], "10.225.0.1");
        assert_eq!(v["status"]["scaler"]["maxIPCount"], 112);
        assert_eq!(serde_json::from_value::<NodeNetworkConfig>(v).unwrap(), n);
    }
}
