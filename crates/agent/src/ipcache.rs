//! The ipcache this node should have, computed purely from the cluster's nodes, and the diff
//! between two map states (desired vs. what the kernel holds).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;

/// What an ipcache prefix is, from this node's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PeerKind {
    LocalNode,
    RemoteNode,
    LocalPodBlock,
    RemotePodBlock,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerEntry {
    pub kind: PeerKind,
    /// The node to tunnel to (remote entries only).
    pub tunnel_endpoint: Option<Ipv4Addr>,
}

/// The routing-relevant facts of one Node object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub internal_ip: Option<Ipv4Addr>,
    pub pod_cidrs: Vec<Ipv4Net>,
}

impl NodeInfo {
    /// Reads a Node: the first IPv4 InternalIP, and spec.podCIDRs (or spec.podCIDR). IPv6 and
    /// unparsable values are skipped (this agent routes IPv4 only).
    pub fn from_node(node: &Node) -> Self {
        let name = node.metadata.name.clone().unwrap_or_default();
        let internal_ip = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP")
            .find_map(|a| a.address.parse::<Ipv4Addr>().ok());
        let mut pod_cidrs: Vec<Ipv4Net> = Vec::new();
        if let Some(spec) = &node.spec {
            let listed = spec.pod_cidrs.iter().flatten();
            for cidr in listed.chain(spec.pod_cidr.iter()) {
                if let Ok(net) = cidr.parse::<Ipv4Net>() {
                    let net = net.trunc();
                    if !pod_cidrs.contains(&net) {
                        pod_cidrs.push(net);
                    }
                }
            }
        }
        Self {
            name,
            internal_ip,
            pod_cidrs,
        }
    }
}

/// The desired ipcache: own node IP and block as local, every other node's InternalIP and pod
/// blocks as remote, tunnelled to that node's InternalIP. A remote node without an InternalIP
/// cannot be tunnelled to and contributes nothing.
pub fn desired_ipcache(
    own_ip: Ipv4Addr,
    own_block: Option<Ipv4Net>,
    own_name: &str,
    nodes: &BTreeMap<String, NodeInfo>,
) -> BTreeMap<Ipv4Net, PeerEntry> {
    let mut out = BTreeMap::new();
    for node in nodes.values().filter(|n| n.name != own_name) {
        let Some(ip) = node.internal_ip else { continue };
        let remote = |kind| PeerEntry {
            kind,
            tunnel_endpoint: Some(ip),
        };
        out.insert(Ipv4Net::from(ip), remote(PeerKind::RemoteNode));
        for block in &node.pod_cidrs {
            out.insert(*block, remote(PeerKind::RemotePodBlock));
        }
    }
    // Own entries last: they win over anything a misconfigured peer claims.
    if let Some(block) = own_block {
        out.insert(
            block,
            PeerEntry {
                kind: PeerKind::LocalPodBlock,
                tunnel_endpoint: None,
            },
        );
    }
    out.insert(
        Ipv4Net::from(own_ip),
        PeerEntry {
            kind: PeerKind::LocalNode,
            tunnel_endpoint: None,
        },
    );
    out
}

/// VNet mode: no tunnels. Remote nodes and every address the cloud assigned to another node
/// (a /32 each) are reached through the underlay; own node as local.
pub fn desired_ipcache_vnet(
    own_ip: Ipv4Addr,
    own_name: &str,
    nodes: &BTreeMap<String, NodeInfo>,
    assigned: &BTreeMap<String, Vec<Ipv4Addr>>,
) -> BTreeMap<Ipv4Net, PeerEntry> {
    let mut out = BTreeMap::new();
    let remote = |kind| PeerEntry {
        kind,
        tunnel_endpoint: None,
    };
    for node in nodes.values().filter(|n| n.name != own_name) {
        if let Some(ip) = node.internal_ip {
            out.insert(Ipv4Net::from(ip), remote(PeerKind::RemoteNode));
        }
    }
    for (node, ips) in assigned.iter().filter(|(n, _)| n.as_str() != own_name) {
        let _ = node;
        for ip in ips {
            out.insert(Ipv4Net::from(*ip), remote(PeerKind::RemotePodBlock));
        }
    }
    out.insert(
        Ipv4Net::from(own_ip),
        PeerEntry {
            kind: PeerKind::LocalNode,
            tunnel_endpoint: None,
        },
    );
    out
}

/// The changes that turn `actual` into `desired`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diff<K, V> {
    pub upserts: Vec<(K, V)>,
    pub removes: Vec<K>,
}

impl<K, V> Diff<K, V> {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removes.is_empty()
    }
}

/// Entries missing or different in `actual` are upserted, entries only in `actual` removed;
/// equal entries are left alone (no flush-and-rebuild, so traffic never blips).
pub fn diff<K: Ord + Clone, V: PartialEq + Clone>(
    desired: &BTreeMap<K, V>,
    actual: &BTreeMap<K, V>,
) -> Diff<K, V> {
    let upserts = desired
        .iter()
        .filter(|(k, v)| actual.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let removes = actual
        .keys()
        .filter(|k| !desired.contains_key(*k))
        .cloned()
        .collect();
    Diff { upserts, removes }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAddress, NodeSpec, NodeStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn node(name: &str, ip: &str, cidr: Option<&str>) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                pod_cidr: cidr.map(Into::into),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                addresses: Some(vec![
                    NodeAddress {
                        address: "fd00::1".into(),
                        type_: "InternalIP".into(),
                    },
                    NodeAddress {
                        address: ip.into(),
                        type_: "InternalIP".into(),
                    },
                ]),
                ..Default::default()
            }),
        }
    }

    fn table(nodes: &[Node]) -> BTreeMap<String, NodeInfo> {
        nodes
            .iter()
            .map(NodeInfo::from_node)
            .map(|n| (n.name.clone(), n))
            .collect()
    }

    fn n(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn node_info_takes_ipv4_internal_ip_and_pod_cidrs() {
        let mut nd = node("a", "10.224.0.4", Some("10.244.1.0/24"));
        nd.spec.as_mut().unwrap().pod_cidrs =
            Some(vec!["10.244.1.0/24".into(), "fd00:10::/64".into()]);
        let info = NodeInfo::from_node(&nd);
        assert_eq!(info.internal_ip, Some("10.224.0.4".parse().unwrap()));
        assert_eq!(info.pod_cidrs, vec![n("10.244.1.0/24")]);
    }

    #[test]
    fn desired_covers_own_and_remote_nodes() {
        let nodes = table(&[
            node("a", "10.224.0.4", Some("10.244.0.0/24")),
            node("b", "10.224.0.5", Some("10.244.1.0/24")),
            node("c", "10.224.0.6", None),
        ]);
        let own_ip = "10.224.0.4".parse().unwrap();
        let d = desired_ipcache(own_ip, Some(n("10.244.0.0/24")), "a", &nodes);
        let b_ip = Some("10.224.0.5".parse().unwrap());
        assert_eq!(d.len(), 5, "{d:?}");
        assert_eq!(d[&n("10.224.0.4/32")].kind, PeerKind::LocalNode);
        assert_eq!(d[&n("10.244.0.0/24")].kind, PeerKind::LocalPodBlock);
        assert_eq!(d[&n("10.244.0.0/24")].tunnel_endpoint, None);
        assert_eq!(
            d[&n("10.224.0.5/32")],
            PeerEntry {
                kind: PeerKind::RemoteNode,
                tunnel_endpoint: b_ip
            }
        );
        assert_eq!(
            d[&n("10.244.1.0/24")],
            PeerEntry {
                kind: PeerKind::RemotePodBlock,
                tunnel_endpoint: b_ip
            }
        );
        // c has no block yet but is a node we can reach.
        assert_eq!(d[&n("10.224.0.6/32")].kind, PeerKind::RemoteNode);
    }

    #[test]
    fn own_node_without_block_still_has_node_entry() {
        let d = desired_ipcache("10.0.0.1".parse().unwrap(), None, "a", &BTreeMap::new());
        assert_eq!(d.len(), 1);
        assert_eq!(d[&n("10.0.0.1/32")].kind, PeerKind::LocalNode);
    }

    #[test]
    fn a_peer_claiming_our_block_does_not_override_it() {
        let nodes = table(&[node("b", "10.224.0.5", Some("10.244.0.0/24"))]);
        let d = desired_ipcache(
            "10.224.0.4".parse().unwrap(),
            Some(n("10.244.0.0/24")),
            "a",
            &nodes,
        );
        assert_eq!(d[&n("10.244.0.0/24")].kind, PeerKind::LocalPodBlock);
    }

    #[test]
    fn diff_changes_only_what_differs() {
        let desired: BTreeMap<u8, &str> = [(1, "a"), (2, "b"), (3, "c")].into();
        let actual: BTreeMap<u8, &str> = [(1, "a"), (2, "x"), (4, "d")].into();
        let d = diff(&desired, &actual);
        assert_eq!(d.upserts, vec![(2, "b"), (3, "c")]);
        assert_eq!(d.removes, vec![4]);
        assert!(diff(&desired, &desired).is_empty());
    }
}
