//! The lab's endpointslice controller, as a pure function of the stored objects: for every
//! Service with a selector, the EndpointSlices Kubernetes' controller would maintain from the
//! selected pods and their readiness. The control plane runs it inside every commit, so slices
//! change in the same revision as the pods and Services they follow.

use std::collections::{BTreeMap, BTreeSet};

use ferrum_model::{Kind, Object, ObjectRef};
use k8s_openapi::api::core::v1::{ObjectReference, Pod, Service, ServicePort};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "endpointslice-controller.k8s.io";

/// The changes that bring the stored slices in line with the pods and Services.
#[derive(Debug, Default, PartialEq)]
pub struct SliceChanges {
    /// New or changed slices (metadata carries the existing uid where there is one).
    pub upserts: Vec<EndpointSlice>,
    pub deletes: Vec<ObjectRef>,
}

fn is_managed(slice: &EndpointSlice) -> bool {
    slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .is_some_and(|v| v == MANAGED_BY)
}

fn selects(selector: &BTreeMap<String, String>, pod: &Pod) -> bool {
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The port a Service port reaches on this pod: a number, or a named containerPort of the same
/// protocol (None when the pod has no such port: the pod is left out of that port).
pub fn resolve_target_port(port: &ServicePort, pod: &Pod) -> Option<i32> {
    let protocol = port.protocol.as_deref().unwrap_or("TCP");
    match &port.target_port {
        None => Some(port.port),
        Some(IntOrString::Int(n)) => Some(*n),
        Some(IntOrString::String(name)) => {
            if let Ok(n) = name.parse::<i32>() {
                return Some(n);
            }
            pod.spec
                .iter()
                .flat_map(|s| s.containers.iter())
                .flat_map(|c| c.ports.iter().flatten())
                .find(|p| {
                    p.name.as_deref() == Some(name.as_str())
                        && p.protocol.as_deref().unwrap_or("TCP") == protocol
                })
                .map(|p| p.container_port)
        }
    }
}

fn fnv(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// The slices one Service should have: pods grouped by their resolved port list (pods whose
/// named ports resolve differently land in different slices, as in Kubernetes).
pub fn desired_for_service(svc: &Service, pods: &[&Pod]) -> Vec<EndpointSlice> {
    let Some(spec) = &svc.spec else {
        return Vec::new();
    };
    let Some(selector) = &spec.selector else {
        return Vec::new();
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Vec::new();
    }
    let namespace = svc
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = svc.metadata.name.clone().unwrap_or_default();
    let publish_not_ready = spec.publish_not_ready_addresses == Some(true);
    let mut groups: BTreeMap<Vec<(String, String, i32)>, Vec<Endpoint>> = BTreeMap::new();
    let mut selected: Vec<&&Pod> = pods
        .iter()
        .filter(|p| p.metadata.namespace.as_deref().unwrap_or("default") == namespace)
        .filter(|p| selects(selector, p))
        .collect();
    selected.sort_by_key(|p| p.metadata.name.clone());
    for pod in selected {
        let status = pod.status.clone().unwrap_or_default();
        let Some(ip) = status.pod_ip.clone().filter(|ip| !ip.is_empty()) else {
            continue;
        };
        if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
            continue;
        }
        let ports: Vec<(String, String, i32)> = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                resolve_target_port(p, pod).map(|n| {
                    (
                        p.name.clone().unwrap_or_default(),
                        p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                        n,
                    )
                })
            })
            .collect();
        let terminating = pod.metadata.deletion_timestamp.is_some();
        let ready = (publish_not_ready || pod_ready(pod)) && !terminating;
        let serving = publish_not_ready || pod_ready(pod);
        groups.entry(ports).or_default().push(Endpoint {
            addresses: vec![ip],
            conditions: Some(EndpointConditions {
                ready: Some(ready),
                serving: Some(serving),
                terminating: Some(terminating),
            }),
            node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            target_ref: Some(ObjectReference {
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                namespace: Some(namespace.clone()),
                uid: pod.metadata.uid.clone(),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    // A Service that selects nothing still gets one empty slice, as in Kubernetes.
    if groups.is_empty() {
        let ports = spec
            .ports
            .iter()
            .flatten()
            .filter(|p| !matches!(p.target_port, Some(IntOrString::String(ref s)) if s.parse::<i32>().is_err()))
            .map(|p| {
                let n = match &p.target_port {
                    Some(IntOrString::Int(n)) => *n,
                    Some(IntOrString::String(s)) => s.parse().unwrap_or(p.port),
                    None => p.port,
                };
                (
                    p.name.clone().unwrap_or_default(),
                    p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                    n,
                )
            })
            .collect();
        groups.insert(ports, Vec::new());
    }
    groups
        .into_iter()
        .map(|(ports, endpoints)| {
            let key: String = ports
                .iter()
                .map(|(n, p, port)| format!("{n}/{p}/{port};"))
                .collect();
            EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(format!("{name}-{:08x}", fnv(&key))),
                    namespace: Some(namespace.clone()),
                    labels: Some(
                        [
                            (SERVICE_NAME_LABEL.to_string(), name.clone()),
                            (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
                        ]
                        .into(),
                    ),
                    owner_references: Some(vec![OwnerReference {
                        api_version: "v1".into(),
                        kind: "Service".into(),
                        name: name.clone(),
                        uid: svc.metadata.uid.clone().unwrap_or_default(),
                        controller: Some(true),
                        block_owner_deletion: Some(true),
                    }]),
                    ..Default::default()
                },
                address_type: "IPv4".into(),
                endpoints,
                ports: Some(
                    ports
                        .into_iter()
                        .map(|(n, p, port)| EndpointPort {
                            name: Some(n),
                            protocol: Some(p),
                            port: Some(port),
                            app_protocol: None,
                        })
                        .collect(),
                ),
            }
        })
        .collect()
}

/// Compares desired slices with the managed slices in `objects`.
pub fn reconcile(objects: &BTreeMap<ObjectRef, Object>) -> SliceChanges {
    let mut pods: Vec<&Pod> = Vec::new();
    let mut services: Vec<&Service> = Vec::new();
    let mut existing: BTreeMap<ObjectRef, &EndpointSlice> = BTreeMap::new();
    for (key, object) in objects {
        match object {
            Object::Pod(p) => pods.push(p),
            Object::Service(s) => services.push(s),
            Object::EndpointSlice(s) if is_managed(s) => {
                existing.insert(key.clone(), s);
            }
            _ => {}
        }
    }
    let mut changes = SliceChanges::default();
    let mut wanted: BTreeSet<ObjectRef> = BTreeSet::new();
    for svc in services {
        for mut slice in desired_for_service(svc, &pods) {
            let key = ObjectRef::of(&Object::EndpointSlice(slice.clone()));
            if let Some(old) = existing.get(&key) {
                // Server-owned metadata follows the stored object, so equality means "same".
                slice.metadata.uid = old.metadata.uid.clone();
                slice.metadata.creation_timestamp = old.metadata.creation_timestamp.clone();
                slice.metadata.resource_version = old.metadata.resource_version.clone();
                if **old != slice {
                    changes.upserts.push(slice);
                }
            } else {
                changes.upserts.push(slice);
            }
            wanted.insert(key);
        }
    }
    changes.deletes = existing
        .into_keys()
        .filter(|k| k.kind == Kind::EndpointSlice && !wanted.contains(k))
        .collect();
    changes
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrum_model::parse_documents;
    use k8s_openapi::api::core::v1::{PodCondition, PodStatus};

    fn objects(yaml: &str) -> Vec<Object> {
        parse_documents(yaml).expect("test YAML")
    }

    fn running(pod: &mut Object, ip: &str, ready: bool) {
        if let Object::Pod(p) = pod {
            p.spec.as_mut().unwrap().node_name = Some("node-0".into());
            p.status = Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some(ip.into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            });
        }
    }

    fn pod(name: &str, port_name: &str, port: i32) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: web}}}}\n\
             spec: {{containers: [{{name: c, ports: [{{name: {port_name}, containerPort: {port}}}]}}]}}\n"
        )
    }

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n\
        spec: {selector: {app: web}, ports: [{name: http, port: 80, targetPort: web}]}\n";

    fn table(objs: Vec<Object>) -> BTreeMap<ObjectRef, Object> {
        objs.into_iter().map(|o| (ObjectRef::of(&o), o)).collect()
    }

    #[test]
    fn slices_follow_readiness_and_named_ports_per_pod() {
        let mut objs = objects(SVC);
        let mut a = objects(&pod("a", "web", 8080)).remove(0);
        let mut b = objects(&pod("b", "web", 9090)).remove(0);
        let mut c = objects(&pod("c", "web", 8080)).remove(0);
        let mut other = objects(&pod("d", "web", 8080).replace("app: web", "app: db")).remove(0);
        running(&mut a, "10.244.0.5", true);
        running(&mut b, "10.244.0.6", true);
        running(&mut c, "10.244.0.7", false);
        running(&mut other, "10.244.0.8", true);
        objs.extend([a, b, c, other]);
        let changes = reconcile(&table(objs));
        assert!(changes.deletes.is_empty());
        assert_eq!(changes.upserts.len(), 2, "two port sets: 8080 and 9090");
        let by_port: BTreeMap<i32, &EndpointSlice> = changes
            .upserts
            .iter()
            .map(|s| (s.ports.as_ref().unwrap()[0].port.unwrap(), s))
            .collect();
        let s8080 = by_port[&8080];
        let addrs: Vec<(String, Option<bool>)> = s8080
            .endpoints
            .iter()
            .map(|e| (e.addresses[0].clone(), e.conditions.as_ref().unwrap().ready))
            .collect();
        assert_eq!(
            addrs,
            vec![
                ("10.244.0.5".to_string(), Some(true)),
                ("10.244.0.7".to_string(), Some(false))
            ]
        );
        assert_eq!(
            s8080.ports.as_ref().unwrap()[0].name.as_deref(),
            Some("http")
        );
        let labels = s8080.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[SERVICE_NAME_LABEL], "web");
        assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY);
        assert_eq!(by_port[&9090].endpoints[0].addresses, vec!["10.244.0.6"]);
        assert_eq!(
            by_port[&9090].endpoints[0].node_name.as_deref(),
            Some("node-0")
        );
    }

    #[test]
    fn unchanged_slices_are_left_alone_and_stale_ones_deleted() {
        let mut objs = objects(SVC);
        let mut a = objects(&pod("a", "web", 8080)).remove(0);
        running(&mut a, "10.244.0.5", true);
        objs.push(a);
        let mut t = table(objs);
        let first = reconcile(&t);
        for s in first.upserts {
            let o = Object::EndpointSlice(s);
            t.insert(ObjectRef::of(&o), o);
        }
        assert_eq!(reconcile(&t), SliceChanges::default(), "converged");
        // A hand-written slice (not managed) is never touched; the Service going removes ours.
        let manual = objects(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: ext-1, labels: {kubernetes.io/service-name: ext}}\n\
             addressType: IPv4\nendpoints: [{addresses: [192.0.2.1]}]\nports: [{port: 80}]\n",
        )
        .remove(0);
        t.insert(ObjectRef::of(&manual), manual);
        t.remove(&ObjectRef::new(Kind::Service, Some("default"), "web"));
        let gone = reconcile(&t);
        assert!(gone.upserts.is_empty());
        assert_eq!(gone.deletes.len(), 1);
        assert!(gone.deletes[0].name.starts_with("web-"));
    }

    #[test]
    fn a_service_without_pods_gets_an_empty_slice_and_without_selector_none() {
        let t = table(objects(SVC));
        let c = reconcile(&t);
        assert_eq!(c.upserts.len(), 1);
        assert!(c.upserts[0].endpoints.is_empty());
        let no_selector = SVC.replace("selector: {app: web}, ", "");
        assert_eq!(
            reconcile(&table(objects(&no_selector))),
            SliceChanges::default()
        );
    }

    #[test]
    fn terminating_and_not_ready_publishing() {
        let svc = objects(SVC).remove(0);
        let mut a = objects(&pod("a", "web", 8080)).remove(0);
        running(&mut a, "10.244.0.5", true);
        let Object::Pod(mut a) = a else {
            unreachable!()
        };
        a.metadata.deletion_timestamp = Some(crate::controlplane::now());
        let Object::Service(svc) = svc else {
            unreachable!()
        };
        let slices = desired_for_service(&svc, &[&a]);
        let c = slices[0].endpoints[0].conditions.clone().unwrap();
        assert_eq!(
            (c.ready, c.serving, c.terminating),
            (Some(false), Some(true), Some(true))
        );
    }
}
