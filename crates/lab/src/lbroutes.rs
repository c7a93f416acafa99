//! The lab's cloud load balancer: the fabric routes every LoadBalancer ingress IP and every
//! externalIP to the nodes (ECMP, hashed per flow), as a cloud LB spreads flows over the
//! nodes. With externalTrafficPolicy=Local only nodes with a ready local endpoint get flows
//! (the cloud's health check), unless no node has one.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ferrum_model::{Object, WatchEvent};
use k8s_openapi::api::core::v1::Service;
use tracing::{info, warn};

use crate::controlplane::ControlPlane;
use crate::endpointslice::SERVICE_NAME_LABEL;
use crate::fabric::{FabricError, ip, set_sysctl};
use crate::services::lb_ips;

/// Route protocol number marking the routes this controller owns in the fabric.
const ROUTE_PROTO: &str = "250";

fn external_addresses(svc: &Service) -> Vec<Ipv4Addr> {
    let mut out: Vec<Ipv4Addr> = svc
        .spec
        .iter()
        .flat_map(|s| s.external_ips.iter().flatten())
        .filter_map(|ip| ip.parse().ok())
        .collect();
    if svc.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("LoadBalancer") {
        out.extend(lb_ips(svc));
    }
    out
}

/// Address -> the node IPs that receive its flows.
pub fn desired_routes(
    objects: &[Object],
    nodes: &BTreeMap<String, Ipv4Addr>,
) -> BTreeMap<Ipv4Addr, BTreeSet<Ipv4Addr>> {
    let all: BTreeSet<Ipv4Addr> = nodes.values().copied().collect();
    let mut ready_nodes: BTreeMap<(String, String), BTreeSet<Ipv4Addr>> = BTreeMap::new();
    for o in objects {
        let Object::EndpointSlice(slice) = o else {
            continue;
        };
        let Some(svc) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        let ns = slice.metadata.namespace.clone().unwrap_or_default();
        for e in &slice.endpoints {
            let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            if let (true, Some(ip)) = (ready, e.node_name.as_ref().and_then(|n| nodes.get(n))) {
                ready_nodes
                    .entry((ns.clone(), svc.clone()))
                    .or_default()
                    .insert(*ip);
            }
        }
    }
    let mut out: BTreeMap<Ipv4Addr, BTreeSet<Ipv4Addr>> = BTreeMap::new();
    for o in objects {
        let Object::Service(svc) = o else { continue };
        let local = svc
            .spec
            .as_ref()
            .and_then(|s| s.external_traffic_policy.as_deref())
            == Some("Local");
        let id = (
            svc.metadata.namespace.clone().unwrap_or_default(),
            svc.metadata.name.clone().unwrap_or_default(),
        );
        let hops = match ready_nodes.get(&id) {
            Some(n) if local && !n.is_empty() => n.clone(),
            _ => all.clone(),
        };
        for addr in external_addresses(svc) {
            // Services sharing an address (one per protocol) share its routes.
            out.entry(addr).or_default().extend(hops.iter().copied());
        }
    }
    out.retain(|_, hops| !hops.is_empty());
    out
}

fn route_args(addr: Ipv4Addr, hops: &BTreeSet<Ipv4Addr>) -> Vec<String> {
    let mut args = vec![
        "route".to_string(),
        "replace".into(),
        format!("{addr}/32"),
        "proto".into(),
        ROUTE_PROTO.into(),
    ];
    if hops.len() == 1 {
        args.extend([
            "via".into(),
            hops.iter()
                .next()
                .map(|h| h.to_string())
                .unwrap_or_default(),
        ]);
    } else {
        for h in hops {
            args.extend(["nexthop".into(), "via".into(), h.to_string()]);
        }
    }
    args
}

/// Brings the fabric's owned routes in line with `desired`.
fn sync(
    fabric: &str,
    current: &mut BTreeMap<Ipv4Addr, BTreeSet<Ipv4Addr>>,
    desired: &BTreeMap<Ipv4Addr, BTreeSet<Ipv4Addr>>,
) -> Result<(), FabricError> {
    for (addr, hops) in desired {
        if current.get(addr) != Some(hops) {
            let mut args = vec!["-n".to_string(), fabric.to_string()];
            args.extend(route_args(*addr, hops));
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            ip(&refs)?;
            info!(%addr, hops = ?hops, "fabric routes a load-balanced address");
        }
    }
    for addr in current.keys().filter(|a| !desired.contains_key(a)) {
        let dst = format!("{addr}/32");
        ip(&["-n", fabric, "route", "del", &dst, "proto", ROUTE_PROTO])?;
        info!(%addr, "fabric route of a load-balanced address removed");
    }
    *current = desired.clone();
    Ok(())
}

/// Runs until `stop`: follows the control plane and keeps the fabric routes.
pub fn run(cp: &ControlPlane, fabric: &str, nodes: BTreeMap<String, Ipv4Addr>, stop: &AtomicBool) {
    // Hash flows on ports too, so one client's connections spread over the nodes.
    if let Err(e) = set_sysctl(fabric, "net.ipv4.fib_multipath_hash_policy", "1") {
        warn!(error = %e, "cannot set the fabric's multipath hash policy");
    }
    // Routes left by an earlier daemon: known by their protocol, replaced or removed below.
    let mut current: BTreeMap<Ipv4Addr, BTreeSet<Ipv4Addr>> = BTreeMap::new();
    if let Ok(out) = ip(&["-n", fabric, "-o", "route", "show", "proto", ROUTE_PROTO]) {
        for line in out.lines() {
            if let Some(addr) = line.split_whitespace().next().and_then(|a| a.parse().ok()) {
                current.insert(addr, BTreeSet::new());
            }
        }
    }
    let events = cp.subscribe();
    let mut dirty = true;
    while !stop.load(Ordering::Relaxed) {
        match events.recv_timeout(Duration::from_millis(300)) {
            Ok(WatchEvent::Synced { .. }) => {}
            Ok(WatchEvent::Upsert { object } | WatchEvent::Delete { object }) => {
                dirty |= matches!(object, Object::Service(_) | Object::EndpointSlice(_));
                continue;
            }
            Ok(WatchEvent::Relist) => continue,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
        }
        if !dirty {
            continue;
        }
        let mut objects = cp.list(ferrum_model::Kind::Service, None);
        objects.extend(cp.list(ferrum_model::Kind::EndpointSlice, None));
        let desired = desired_routes(&objects, &nodes);
        match sync(fabric, &mut current, &desired) {
            Ok(()) => dirty = false,
            Err(e) => {
                warn!(error = %e, "cannot update the fabric's load-balancer routes; retrying")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrum_model::parse_documents;

    #[test]
    fn local_policy_routes_only_to_nodes_with_ready_endpoints() {
        let mut objects = parse_documents(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n\
             spec: {type: LoadBalancer, externalTrafficPolicy: Local, externalIPs: [192.0.2.9], ports: [{port: 80}]}\n\
             status: {loadBalancer: {ingress: [{ip: 198.51.100.1}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}\n\
             addressType: IPv4\nports: [{port: 80}]\n\
             endpoints: [{addresses: [10.244.1.5], nodeName: node-1, conditions: {ready: true}},\n\
                         {addresses: [10.244.0.5], nodeName: node-0, conditions: {ready: false}}]\n",
        )
        .unwrap();
        let nodes: BTreeMap<String, Ipv4Addr> = [
            ("node-0".to_string(), "10.224.0.10".parse().unwrap()),
            ("node-1".to_string(), "10.224.0.11".parse().unwrap()),
        ]
        .into();
        let r = desired_routes(&objects, &nodes);
        let n1: BTreeSet<Ipv4Addr> = ["10.224.0.11".parse().unwrap()].into();
        assert_eq!(r[&"198.51.100.1".parse().unwrap()], n1);
        assert_eq!(r[&"192.0.2.9".parse().unwrap()], n1);
        // Cluster policy: every node.
        if let Object::Service(s) = &mut objects[0] {
            s.spec.as_mut().unwrap().external_traffic_policy = Some("Cluster".into());
        }
        let r = desired_routes(&objects, &nodes);
        assert_eq!(r[&"198.51.100.1".parse().unwrap()].len(), 2);
        let args = route_args(
            "198.51.100.1".parse().unwrap(),
            &r[&"198.51.100.1".parse().unwrap()],
        );
        assert_eq!(
            args.join(" "),
            "route replace 198.51.100.1/32 proto 250 nexthop via 10.224.0.10 nexthop via 10.224.0.11"
        );
    }
}
