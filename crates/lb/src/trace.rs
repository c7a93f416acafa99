//! `ferrum service trace`: what the compiled state does with a flow from a given source to a
//! frontend, node by node. Pure: takes the per-node compilations.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use crate::{Backend, Compiled, Frontend, FrontendKey, Protocol, Scope};

/// Where the flow starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraceSource {
    /// A pod on `node`: translated by its node's from_pod, internal scope.
    Pod { ip: Ipv4Addr, node: String },
    /// Outside the cluster: whichever node receives it (NodePort: that node; LoadBalancer
    /// and externalIPs: any node the network sends it to), external scope.
    External { ip: Ipv4Addr },
}

/// The verdict of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceHop {
    pub node: String,
    pub frontend: FrontendKey,
    pub service: String,
    pub backends: Vec<Backend>,
    /// The source address the backends see is the node's (externalTrafficPolicy=Cluster).
    pub masquerade: bool,
    /// loadBalancerSourceRanges admit the source.
    pub source_allowed: bool,
    pub frontend_info: Frontend,
}

fn in_range(ip: Ipv4Addr, (net, len): (Ipv4Addr, u8)) -> bool {
    let mask = u32::MAX
        .checked_shl(32 - u32::from(len.min(32)))
        .unwrap_or(0);
    u32::from(ip) & mask == u32::from(net) & mask
}

/// The frontends matching (addr, port, proto) for `source`, per node (`by_node`: each node's
/// compiled state). Empty: the destination is not a Service frontend for that source.
pub fn trace(
    by_node: &BTreeMap<String, Compiled>,
    source: &TraceSource,
    addr: Ipv4Addr,
    port: u16,
    proto: Protocol,
) -> Vec<TraceHop> {
    let (scope, src, nodes): (Scope, Ipv4Addr, Vec<&String>) = match source {
        TraceSource::Pod { ip, node } => (Scope::Internal, *ip, vec![node]),
        TraceSource::External { ip } => (Scope::External, *ip, by_node.keys().collect()),
    };
    let key = FrontendKey {
        addr,
        port,
        proto,
        scope,
    };
    let mut out = Vec::new();
    for node in nodes {
        let Some(fe) = by_node.get(node).and_then(|c| c.frontends.get(&key)) else {
            continue;
        };
        out.push(TraceHop {
            node: node.clone(),
            frontend: key,
            service: fe.service.clone(),
            backends: fe.backends.clone(),
            masquerade: scope == Scope::External && fe.masquerade,
            source_allowed: fe.source_ranges.is_empty()
                || fe.source_ranges.iter().any(|r| in_range(src, *r)),
            frontend_info: fe.clone(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Algorithm;

    fn compiled(scope: Scope, masquerade: bool, ranges: Vec<(Ipv4Addr, u8)>) -> Compiled {
        let mut c = Compiled::default();
        c.frontends.insert(
            FrontendKey {
                addr: "10.224.0.10".parse().unwrap(),
                port: 30080,
                proto: Protocol::Tcp,
                scope,
            },
            Frontend {
                service: "default/web:80".into(),
                backends: vec![Backend {
                    addr: "10.244.0.5".parse().unwrap(),
                    port: 8080,
                }],
                affinity_timeout: None,
                algorithm: Algorithm::Random,
                source_ranges: ranges,
                masquerade,
            },
        );
        c
    }

    #[test]
    fn external_sources_see_masquerade_and_source_ranges_per_node() {
        let by_node: BTreeMap<String, Compiled> = [
            (
                "node-0".to_string(),
                compiled(
                    Scope::External,
                    true,
                    vec![("203.0.113.0".parse().unwrap(), 24)],
                ),
            ),
            ("node-1".to_string(), Compiled::default()),
        ]
        .into();
        let to: Ipv4Addr = "10.224.0.10".parse().unwrap();
        let ext = TraceSource::External {
            ip: "203.0.113.10".parse().unwrap(),
        };
        let hops = trace(&by_node, &ext, to, 30080, Protocol::Tcp);
        assert_eq!(hops.len(), 1);
        assert!(hops[0].masquerade && hops[0].source_allowed);
        assert_eq!(hops[0].node, "node-0");
        let other = TraceSource::External {
            ip: "192.0.2.1".parse().unwrap(),
        };
        assert!(!trace(&by_node, &other, to, 30080, Protocol::Tcp)[0].source_allowed);
        assert!(trace(&by_node, &ext, to, 30080, Protocol::Udp).is_empty());
        // A pod uses the internal frontend, which this compilation does not have.
        let pod = TraceSource::Pod {
            ip: "10.244.0.9".parse().unwrap(),
            node: "node-0".into(),
        };
        assert!(trace(&by_node, &pod, to, 30080, Protocol::Tcp).is_empty());
    }
}
