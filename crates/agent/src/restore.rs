//! Restart convergence: what to change so the kernel matches the IPAM store after the agent
//! was down (possibly killed mid-request). Pure; the caller applies the plan. Nothing is
//! flushed: entries that are already right are not touched, so traffic never blips.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ferrum_agent_api::AttachmentKey;

use crate::handler::{Attachment, EndpointSpec};
use crate::ipcache::diff;

/// An endpoints-map value as the datapath holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointValue {
    pub ifindex: u32,
    pub pod_mac: [u8; 6],
    pub host_mac: [u8; 6],
}

/// What the kernel holds right now.
#[derive(Debug, Default, Clone)]
pub struct Observed {
    /// Host veth name -> current ifindex, for the veths named by attachments.
    pub links: BTreeMap<String, u32>,
    pub endpoints: BTreeMap<Ipv4Addr, EndpointValue>,
    /// Interfaces with a pinned pod program link.
    pub pinned_links: BTreeSet<String>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RestorePlan {
    pub endpoint_upserts: Vec<(Ipv4Addr, EndpointValue)>,
    pub endpoint_removes: Vec<Ipv4Addr>,
    /// Kept endpoints whose pinned program link is missing.
    pub attach_links: Vec<String>,
    /// Pinned links that belong to no kept endpoint.
    pub detach_links: Vec<String>,
    /// Routes `ip/32` (via the node's host device) to (re)state for kept endpoints; replace
    /// is idempotent and also moves routes older agents pointed at the host veth.
    pub routes: Vec<Ipv4Addr>,
    /// Routes of endpoints that are gone.
    pub route_removes: Vec<Ipv4Addr>,
    /// Attachments recorded as attached whose veth no longer exists: their endpoint is gone,
    /// the address stays allocated until CNI DEL or GC releases it.
    pub orphaned: Vec<AttachmentKey>,
    /// Kept attachments whose veth now has another ifindex than recorded.
    pub reindexed: Vec<(AttachmentKey, EndpointSpec)>,
}

pub fn plan<'a>(
    attachments: impl IntoIterator<Item = (&'a AttachmentKey, Ipv4Addr, &'a Attachment)>,
    observed: &Observed,
) -> RestorePlan {
    let mut plan = RestorePlan::default();
    let mut desired: BTreeMap<Ipv4Addr, EndpointValue> = BTreeMap::new();
    let mut kept_links = BTreeSet::new();
    for (key, ip, att) in attachments {
        let Some(ep) = &att.endpoint else { continue };
        let Some(&ifindex) = observed.links.get(&ep.host_ifname) else {
            plan.orphaned.push(key.clone());
            continue;
        };
        if ifindex != ep.host_ifindex {
            let mut spec = ep.clone();
            spec.host_ifindex = ifindex;
            plan.reindexed.push((key.clone(), spec));
        }
        desired.insert(
            ip,
            EndpointValue {
                ifindex,
                pod_mac: ep.pod_mac,
                host_mac: ep.host_mac,
            },
        );
        kept_links.insert(ep.host_ifname.clone());
        if !observed.pinned_links.contains(&ep.host_ifname) {
            plan.attach_links.push(ep.host_ifname.clone());
        }
        plan.routes.push(ip);
    }
    let d = diff(&desired, &observed.endpoints);
    plan.endpoint_upserts = d.upserts;
    plan.route_removes = d.removes.clone();
    plan.endpoint_removes = d.removes;
    plan.detach_links = observed
        .pinned_links
        .difference(&kept_links)
        .cloned()
        .collect();
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::tests::key;

    fn att(ifname: &str, ifindex: u32) -> Attachment {
        Attachment {
            pod: None,
            netns: "/run/netns/x".into(),
            network: "ferrum".into(),
            endpoint: Some(EndpointSpec {
                host_ifname: ifname.into(),
                host_ifindex: ifindex,
                host_mac: [2, 0, 0, 0, 0, 1],
                pod_mac: [2, 0, 0, 0, 0, 2],
            }),
        }
    }

    fn val(ifindex: u32) -> EndpointValue {
        EndpointValue {
            ifindex,
            pod_mac: [2, 0, 0, 0, 0, 2],
            host_mac: [2, 0, 0, 0, 0, 1],
        }
    }

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, 0, last)
    }

    #[test]
    fn intact_state_changes_nothing_but_restates_routes() {
        let (ka, a) = (key("a"), att("fea", 5));
        let obs = Observed {
            links: [("fea".to_string(), 5)].into(),
            endpoints: [(ip(1), val(5))].into(),
            pinned_links: ["fea".to_string()].into(),
        };
        let p = plan([(&ka, ip(1), &a)], &obs);
        assert!(p.endpoint_upserts.is_empty() && p.endpoint_removes.is_empty());
        assert!(p.attach_links.is_empty() && p.detach_links.is_empty());
        assert!(p.orphaned.is_empty() && p.reindexed.is_empty());
        assert_eq!(p.routes, vec![ip(1)]);
    }

    #[test]
    fn missing_pieces_are_restored_and_strays_removed() {
        let (ka, a) = (key("a"), att("fea", 5));
        let (kb, b) = (key("b"), att("feb", 6));
        let (kc, c) = (key("c"), att("fec", 7));
        let unattached = Attachment {
            endpoint: None,
            ..att("x", 0)
        };
        let kd = key("d");
        let obs = Observed {
            // a: intact link, map entry missing, pin missing. b: veth gone. c: reindexed.
            links: [("fea".to_string(), 5), ("fec".to_string(), 9)].into(),
            // 10.244.0.9 is a stray entry from an attachment the store never recorded.
            endpoints: [(ip(2), val(6)), (ip(3), val(7)), (ip(9), val(11))].into(),
            pinned_links: ["feb".to_string(), "fec".to_string(), "fez".to_string()].into(),
        };
        let p = plan(
            [
                (&ka, ip(1), &a),
                (&kb, ip(2), &b),
                (&kc, ip(3), &c),
                (&kd, ip(4), &unattached),
            ],
            &obs,
        );
        assert_eq!(p.endpoint_upserts, vec![(ip(1), val(5)), (ip(3), val(9))]);
        assert_eq!(p.endpoint_removes, vec![ip(2), ip(9)]);
        assert_eq!(p.route_removes, vec![ip(2), ip(9)]);
        assert_eq!(p.attach_links, vec!["fea".to_string()]);
        assert_eq!(p.detach_links, vec!["feb".to_string(), "fez".to_string()]);
        assert_eq!(p.orphaned, vec![kb]);
        assert_eq!(p.reindexed.len(), 1);
        assert_eq!(p.reindexed[0].1.host_ifindex, 9);
    }
}
