//! The control plane's Service duties: allocating clusterIPs and nodePorts (kept across
//! re-applies) and running the endpointslice controller inside every commit.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ferrum_model::{Kind, Object, ObjectRef, ValidationError, WatchEvent};
use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, Service};

use crate::controlplane::{CpError, ServiceNet, new_uid, now};
use crate::endpointslice;

/// The default NodePort range (kube-apiserver --service-node-port-range).
pub const NODE_PORTS: std::ops::RangeInclusive<i32> = 30000..=32767;

fn invalid(key: &ObjectRef, field: &str, message: String) -> CpError {
    CpError::Invalid(ValidationError {
        object: key.to_string(),
        field: field.to_string(),
        message,
    })
}

fn services_except<'a>(
    work: &'a BTreeMap<ObjectRef, Object>,
    key: &'a ObjectRef,
) -> impl Iterator<Item = (&'a ObjectRef, &'a Service)> {
    work.iter().filter_map(move |(k, o)| match o {
        Object::Service(s) if k != key => Some((k, s)),
        _ => None,
    })
}

/// Gives a Service its clusterIP (the old one on re-apply, a requested one if free and in the
/// service CIDR, else the lowest free address) and its nodePorts (likewise).
pub fn assign_addresses(
    object: Object,
    existing: Option<&Object>,
    work: &BTreeMap<ObjectRef, Object>,
    net: Option<&ServiceNet>,
) -> Result<Object, CpError> {
    let Object::Service(mut svc) = object else {
        return Ok(object);
    };
    let key = ObjectRef::of(&Object::Service(svc.clone()));
    let old = match existing {
        Some(Object::Service(s)) => s.spec.clone(),
        _ => None,
    };
    let Some(spec) = svc.spec.as_mut() else {
        return Ok(Object::Service(svc));
    };
    let svc_type = spec.type_.clone().unwrap_or_else(|| "ClusterIP".into());
    if svc_type == "ExternalName" {
        return Ok(Object::Service(svc));
    }
    if let Some(net) = net {
        let requested = spec.cluster_ip.clone().filter(|ip| !ip.is_empty());
        let old_ip = old.as_ref().and_then(|o| o.cluster_ip.clone());
        if let (Some(req), Some(old_ip)) = (&requested, &old_ip)
            && req != old_ip
        {
            return Err(invalid(
                &key,
                "spec.clusterIP",
                format!(
                    "field is immutable: the Service has {old_ip}; delete and re-create the Service to change it"
                ),
            ));
        }
        let used: BTreeSet<String> = services_except(work, &key)
            .filter_map(|(_, s)| s.spec.as_ref()?.cluster_ip.clone())
            .collect();
        let ip = match requested {
            Some(ip) if ip == "None" => ip,
            Some(ip) => {
                let parsed: Ipv4Addr = ip.parse().map_err(|_| {
                    invalid(
                        &key,
                        "spec.clusterIP",
                        format!("{ip:?} is not an IPv4 address"),
                    )
                })?;
                if !net.cidr.contains(&parsed) {
                    return Err(invalid(
                        &key,
                        "spec.clusterIP",
                        format!(
                            "{ip} is not in the service CIDR {}; leave clusterIP out to get one allocated",
                            net.cidr
                        ),
                    ));
                }
                if used.contains(&ip) && old_ip.as_deref() != Some(ip.as_str()) {
                    return Err(invalid(
                        &key,
                        "spec.clusterIP",
                        format!("{ip} is already allocated to another Service"),
                    ));
                }
                ip
            }
            None => match old_ip {
                Some(ip) => ip,
                None => net
                    .cidr
                    .hosts()
                    .map(|a| a.to_string())
                    .find(|a| {
                        !used.contains(a) && !net.reserved.iter().any(|r| r.to_string() == *a)
                    })
                    .ok_or_else(|| {
                        invalid(
                            &key,
                            "spec.clusterIP",
                            format!("the service CIDR {} is full", net.cidr),
                        )
                    })?,
            },
        };
        spec.cluster_ips = Some(vec![ip.clone()]);
        spec.cluster_ip = Some(ip);
    }
    if matches!(svc_type.as_str(), "NodePort" | "LoadBalancer") {
        let mut used: BTreeSet<(i32, String)> = services_except(work, &key)
            .flat_map(|(_, s)| s.spec.iter().flat_map(|sp| sp.ports.iter().flatten()))
            .filter_map(|p| {
                Some((
                    p.node_port.filter(|n| *n != 0)?,
                    p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                ))
            })
            .collect();
        let old_ports = old.and_then(|o| o.ports).unwrap_or_default();
        for (i, port) in spec.ports.iter_mut().flatten().enumerate() {
            let proto = port.protocol.clone().unwrap_or_else(|| "TCP".into());
            let wanted = match port.node_port.filter(|n| *n != 0) {
                Some(n) => {
                    if used.contains(&(n, proto.clone())) {
                        return Err(invalid(
                            &key,
                            &format!("spec.ports[{i}].nodePort"),
                            format!("{n}/{proto} is already allocated to another Service"),
                        ));
                    }
                    n
                }
                None => {
                    let kept = old_ports
                        .iter()
                        .find(|o| {
                            o.name == port.name
                                && o.port == port.port
                                && o.protocol.clone().unwrap_or_else(|| "TCP".into()) == proto
                        })
                        .and_then(|o| o.node_port)
                        .filter(|n| *n != 0 && !used.contains(&(*n, proto.clone())));
                    match kept {
                        Some(n) => n,
                        None => NODE_PORTS
                            .clone()
                            .find(|n| !used.contains(&(*n, proto.clone())))
                            .ok_or_else(|| {
                                invalid(
                                    &key,
                                    &format!("spec.ports[{i}].nodePort"),
                                    "every node port in 30000-32767 is allocated".into(),
                                )
                            })?,
                    }
                }
            };
            used.insert((wanted, proto));
            port.node_port = Some(wanted);
        }
    }
    let pool = net.and_then(|n| n.lb_pool);
    match (svc_type.as_str(), pool) {
        ("LoadBalancer", Some(pool)) => {
            let ip = ingress_ip(&svc, existing, work, &key, pool)?;
            let status = svc.status.get_or_insert_default();
            status.load_balancer = Some(LoadBalancerStatus {
                ingress: Some(vec![LoadBalancerIngress {
                    ip: Some(ip.to_string()),
                    ip_mode: Some("VIP".into()),
                    ..Default::default()
                }]),
            });
        }
        ("LoadBalancer", None) => {}
        _ => {
            if let Some(status) = svc.status.as_mut() {
                status.load_balancer = None;
            }
        }
    }
    Ok(Object::Service(svc))
}

fn ports_of(svc: &Service) -> BTreeSet<(i32, String)> {
    svc.spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .map(|p| (p.port, p.protocol.clone().unwrap_or_else(|| "TCP".into())))
        .collect()
}

/// The ingress IP of a LoadBalancer Service: the one it has, else the one it asks for
/// (spec.loadBalancerIP: Services may share an address when their ports and protocols differ,
/// e.g. DNS on 53/TCP and 53/UDP), else the lowest unused address of the pool.
fn ingress_ip(
    svc: &Service,
    existing: Option<&Object>,
    work: &BTreeMap<ObjectRef, Object>,
    key: &ObjectRef,
    pool: ipnet::Ipv4Net,
) -> Result<Ipv4Addr, CpError> {
    let mine = ports_of(svc);
    let mut taken: BTreeMap<Ipv4Addr, BTreeSet<(i32, String)>> = BTreeMap::new();
    for (_, other) in services_except(work, key) {
        for ip in lb_ips(other) {
            taken.entry(ip).or_default().extend(ports_of(other));
        }
    }
    let clashes = |ip: &Ipv4Addr| taken.get(ip).is_some_and(|ports| !ports.is_disjoint(&mine));
    let requested = svc
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_ip.clone())
        .filter(|s| !s.is_empty());
    if let Some(req) = requested {
        let field = "spec.loadBalancerIP";
        let ip: Ipv4Addr = req
            .parse()
            .map_err(|_| invalid(key, field, format!("{req:?} is not an IPv4 address")))?;
        if !pool.contains(&ip) {
            return Err(invalid(
                key,
                field,
                format!("{ip} is not in the lab's LoadBalancer pool {pool} (--lb-pool)"),
            ));
        }
        if clashes(&ip) {
            return Err(invalid(
                key,
                field,
                format!("{ip} is used by another Service on the same port and protocol"),
            ));
        }
        return Ok(ip);
    }
    if let Some(Object::Service(old)) = existing
        && let Some(ip) = lb_ips(old).into_iter().next()
        && pool.contains(&ip)
        && !clashes(&ip)
    {
        return Ok(ip);
    }
    pool.hosts()
        .find(|ip| !taken.contains_key(ip))
        .ok_or_else(|| {
            invalid(
                key,
                "status.loadBalancer",
                format!("the LoadBalancer pool {pool} is exhausted"),
            )
        })
}

/// The LoadBalancer ingress IPs in a Service's status.
pub fn lb_ips(svc: &Service) -> Vec<Ipv4Addr> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_deref()?.parse().ok())
        .collect()
}

/// Runs the endpointslice controller over `work` and folds its changes into the commit.
pub fn reconcile_slices(
    work: &mut BTreeMap<ObjectRef, Object>,
    events: &mut Vec<WatchEvent>,
    revision: u64,
) -> Result<(), CpError> {
    // Only changes to pods, Services or slices can move slices.
    let relevant = events.iter().any(|e| match e {
        WatchEvent::Upsert { object } | WatchEvent::Delete { object } => matches!(
            Kind::of(object),
            Kind::Pod | Kind::Service | Kind::EndpointSlice
        ),
        _ => false,
    });
    if !relevant {
        return Ok(());
    }
    let changes = endpointslice::reconcile(work);
    let stamp = now();
    for mut slice in changes.upserts {
        if slice.metadata.uid.is_none() {
            slice.metadata.uid = Some(new_uid()?);
            slice.metadata.creation_timestamp = Some(stamp.clone());
        }
        slice.metadata.resource_version = Some(revision.to_string());
        let object = Object::EndpointSlice(slice);
        events.push(WatchEvent::Upsert {
            object: object.clone(),
        });
        work.insert(ObjectRef::of(&object), object);
    }
    for key in changes.deletes {
        if let Some(mut object) = work.remove(&key) {
            object.metadata_mut().resource_version = Some(revision.to_string());
            events.push(WatchEvent::Delete { object });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controlplane::ControlPlane;
    use ferrum_model::parse_documents;
    use k8s_openapi::api::core::v1::{PodCondition, PodStatus};

    fn objects(yaml: &str) -> Vec<Object> {
        parse_documents(yaml).expect("test YAML")
    }

    fn cp() -> (tempfile::TempDir, ControlPlane) {
        let dir = tempfile::tempdir().unwrap();
        let cp = ControlPlane::open(dir.path()).unwrap();
        cp.set_service_network(ServiceNet {
            cidr: "10.0.0.0/28".parse().unwrap(),
            reserved: vec!["10.0.0.10".parse().unwrap()],
            lb_pool: Some("198.51.100.0/30".parse().unwrap()),
        });
        cp.apply(objects(
            "apiVersion: v1\nkind: Node\nmetadata: {name: node-0}\n",
        ))
        .unwrap();
        (dir, cp)
    }

    fn svc(name: &str, extra: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n\
             spec: {{selector: {{app: {name}}}, ports: [{{port: 80}}]{extra}}}\n"
        )
    }

    fn get_svc(cp: &ControlPlane, name: &str) -> Service {
        match cp.get(&ObjectRef::new(Kind::Service, Some("default"), name)) {
            Some(Object::Service(s)) => s,
            other => panic!("{other:?}"),
        }
    }

    fn cluster_ip(cp: &ControlPlane, name: &str) -> String {
        get_svc(cp, name).spec.unwrap().cluster_ip.unwrap()
    }

    #[test]
    fn cluster_ips_are_allocated_kept_and_checked() {
        let (_d, cp) = cp();
        cp.apply(objects(&svc("a", ""))).unwrap();
        cp.apply(objects(&svc("b", ""))).unwrap();
        assert_eq!(cluster_ip(&cp, "a"), "10.0.0.1");
        assert_eq!(cluster_ip(&cp, "b"), "10.0.0.2");
        // Re-applied without clusterIP (and with other changes): keeps its address.
        cp.apply(objects(&svc("a", "").replace("port: 80", "port: 81")))
            .unwrap();
        assert_eq!(cluster_ip(&cp, "a"), "10.0.0.1");
        assert_eq!(
            get_svc(&cp, "a").spec.unwrap().cluster_ips,
            Some(vec!["10.0.0.1".to_string()])
        );
        let taken = cp
            .apply(objects(&svc("c", ", clusterIP: 10.0.0.2")))
            .unwrap_err()
            .to_string();
        assert!(
            taken.contains("spec.clusterIP") && taken.contains("already allocated"),
            "{taken}"
        );
        let outside = cp
            .apply(objects(&svc("c", ", clusterIP: 10.9.0.2")))
            .unwrap_err()
            .to_string();
        assert!(outside.contains("not in the service CIDR"), "{outside}");
        let immutable = cp
            .apply(objects(&svc("a", ", clusterIP: 10.0.0.5")))
            .unwrap_err()
            .to_string();
        assert!(immutable.contains("immutable"), "{immutable}");
        // The reserved DNS address is only given on request.
        cp.apply(objects(&svc("dns", ", clusterIP: 10.0.0.10")))
            .unwrap();
        for n in 3..=13 {
            cp.apply(objects(&svc(&format!("s{n}"), "")))
                .unwrap_or_else(|e| {
                    panic!("s{n}: {e}");
                });
        }
        let ips: BTreeSet<String> = (3..=13)
            .map(|n| cluster_ip(&cp, &format!("s{n}")))
            .collect();
        assert!(!ips.contains("10.0.0.10"));
        let full = cp.apply(objects(&svc("z", ""))).unwrap_err().to_string();
        assert!(full.contains("full"), "{full}");
        // Headless stays headless.
        cp.apply(objects(&svc("h", ", clusterIP: None"))).unwrap();
        assert_eq!(cluster_ip(&cp, "h"), "None");
    }

    #[test]
    fn node_ports_are_allocated_kept_and_unique_per_protocol() {
        let (_d, cp) = cp();
        cp.apply(objects(&svc("a", ", type: NodePort"))).unwrap();
        let port = |cp: &ControlPlane, n: &str| {
            get_svc(cp, n).spec.unwrap().ports.unwrap()[0]
                .node_port
                .unwrap()
        };
        assert_eq!(port(&cp, "a"), 30000);
        cp.apply(objects(&svc("b", ", type: NodePort"))).unwrap();
        assert_eq!(port(&cp, "b"), 30001);
        cp.apply(objects(&svc("a", ", type: NodePort"))).unwrap();
        assert_eq!(port(&cp, "a"), 30000, "kept on re-apply");
        let clash = svc("c", ", type: NodePort").replace("port: 80", "port: 80, nodePort: 30001");
        let e = cp.apply(objects(&clash)).unwrap_err().to_string();
        assert!(e.contains("spec.ports[0].nodePort"), "{e}");
        let udp = clash.replace("port: 80,", "port: 80, protocol: UDP,");
        cp.apply(objects(&udp)).unwrap();
        assert_eq!(port(&cp, "c"), 30001, "same number, other protocol");
    }

    #[test]
    fn load_balancers_get_pool_addresses_and_may_share_one_across_protocols() {
        let (_d, cp) = cp();
        let lb = |name: &str, extra: &str| {
            svc(name, ", type: LoadBalancer").replace("ports: [{port: 80}]", extra)
        };
        cp.apply(objects(&lb("a", "ports: [{port: 80}]"))).unwrap();
        let ip_of = |cp: &ControlPlane, n: &str| lb_ips(&get_svc(cp, n));
        assert_eq!(
            ip_of(&cp, "a"),
            vec!["198.51.100.1".parse::<Ipv4Addr>().unwrap()]
        );
        assert!(
            get_svc(&cp, "a").spec.unwrap().ports.unwrap()[0]
                .node_port
                .is_some()
        );
        cp.apply(objects(&lb("a", "ports: [{port: 80}]"))).unwrap();
        assert_eq!(ip_of(&cp, "a").len(), 1, "kept on re-apply");
        let dns = |name: &str, proto: &str| {
            lb(
                name,
                &format!("loadBalancerIP: 198.51.100.2, ports: [{{port: 53, protocol: {proto}}}]"),
            )
        };
        cp.apply(objects(&dns("dns-tcp", "TCP"))).unwrap();
        cp.apply(objects(&dns("dns-udp", "UDP"))).unwrap();
        assert_eq!(ip_of(&cp, "dns-tcp"), ip_of(&cp, "dns-udp"));
        let e = cp
            .apply(objects(&dns("dns-tcp2", "TCP")))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("spec.loadBalancerIP") && e.contains("same port"),
            "{e}"
        );
        // /30 has two usable addresses, both taken now.
        let e = cp
            .apply(objects(&lb("c", "ports: [{port: 80}]")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("exhausted"), "{e}");
        // Turning it into a ClusterIP drops the ingress.
        cp.apply(objects(&svc("a", ""))).unwrap();
        assert!(ip_of(&cp, "a").is_empty());
    }

    #[test]
    fn slices_follow_pods_in_the_same_revision() {
        let (_d, cp) = cp();
        cp.apply(objects(
            &svc("web", "").replace("port: 80", "port: 80, targetPort: 8080"),
        ))
        .unwrap();
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, labels: {app: web}}\n\
                   spec: {containers: [{name: c}]}\n";
        cp.apply(objects(pod)).unwrap();
        let slices = cp.list(Kind::EndpointSlice, Some("default"));
        assert_eq!(slices.len(), 1);
        let Object::EndpointSlice(s) = &slices[0] else {
            unreachable!()
        };
        assert!(s.endpoints.is_empty(), "no IP yet");
        let rev = cp
            .update_pod_status(
                "default",
                "p",
                PodStatus {
                    pod_ip: Some("10.244.0.5".into()),
                    phase: Some("Running".into()),
                    conditions: Some(vec![PodCondition {
                        type_: "Ready".into(),
                        status: "True".into(),
                        ..Default::default()
                    }]),
                    ..Default::default()
                },
            )
            .unwrap();
        let slices = cp.list(Kind::EndpointSlice, Some("default"));
        let Object::EndpointSlice(s) = &slices[0] else {
            unreachable!()
        };
        assert_eq!(s.endpoints[0].addresses, vec!["10.244.0.5"]);
        assert_eq!(s.metadata.resource_version, Some(rev.to_string()));
        assert_eq!(s.ports.as_ref().unwrap()[0].port, Some(8080));
        // Deleting the Service takes its slices in the same revision.
        cp.delete(vec![ObjectRef::new(Kind::Service, Some("default"), "web")])
            .unwrap();
        assert!(cp.list(Kind::EndpointSlice, Some("default")).is_empty());
    }
}
