//! The control plane's Service duties: allocating clusterIPs and nodePorts (kept across
//! re-applies) and running the endpointslice controller inside every commit.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ferrum_model::{Kind, Object, ObjectRef, ValidationError, WatchEvent};
use k8s_openapi::api::core::v1::Service;

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
    Ok(Object::Service(svc))
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
