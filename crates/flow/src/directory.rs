//! Who is behind an address: the cluster's pods, nodes and services as the agent's watch
//! delivers them, plus the ids the policy and service stages hand to the datapath.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use ferrum_model::{Object, WatchEvent};
use serde::{Deserialize, Serialize};

use crate::record::{Endpoint, PolicyRef, ServiceRef};

/// Cilium's reserved identities for endpoints that are not pods.
pub const IDENTITY_HOST: u32 = 1;
pub const IDENTITY_WORLD: u32 = 2;
pub const IDENTITY_REMOTE_NODE: u32 = 6;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub node: String,
    pub ip: Option<Ipv4Addr>,
    /// Security identity, once the policy stage assigns them (0 until then).
    pub identity: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Option<Ipv4Addr>,
    pub selector: BTreeMap<String, String>,
}

/// One Service frontend as the datapath knows it: its id (in events of translated requests)
/// and its address, port and IP protocol (the source of translated replies).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceFrontend {
    pub id: u32,
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
    pub service: ServiceRef,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Objects {
    pods: BTreeMap<(String, String), PodInfo>,
    services: BTreeMap<(String, String), ServiceInfo>,
    nodes: BTreeMap<String, Ipv4Addr>,
}

/// The cluster as seen by one agent, for resolving flow endpoints.
#[derive(Clone, Debug, Default)]
pub struct Directory {
    objects: Objects,
    relisting: Option<Objects>,
    pods_by_ip: HashMap<Ipv4Addr, (String, String)>,
    nodes_by_ip: HashMap<Ipv4Addr, String>,
    service_ids: HashMap<u32, ServiceRef>,
    /// (address, port, IP protocol) of every frontend: replies come from these after the
    /// datapath translated them back.
    service_frontends: HashMap<(Ipv4Addr, u16, u8), ServiceRef>,
    policy_rules: HashMap<u32, PolicyRef>,
    identities: HashMap<(String, String), u32>,
}

impl Directory {
    /// Applies one watch event (the same stream the agent realizes).
    pub fn apply(&mut self, event: &WatchEvent) {
        match event {
            WatchEvent::Relist => self.relisting = Some(Objects::default()),
            WatchEvent::Synced { .. } => {
                if let Some(listed) = self.relisting.take() {
                    self.objects = listed;
                    self.reindex();
                }
            }
            WatchEvent::Upsert { object } => {
                let relisting = self.relisting.is_some();
                let target = self.relisting.as_mut().unwrap_or(&mut self.objects);
                upsert(target, object);
                if !relisting {
                    self.reindex();
                }
            }
            WatchEvent::Delete { object } => {
                let relisting = self.relisting.is_some();
                let target = self.relisting.as_mut().unwrap_or(&mut self.objects);
                delete(target, object);
                if !relisting {
                    self.reindex();
                }
            }
        }
    }

    fn reindex(&mut self) {
        self.pods_by_ip = self
            .objects
            .pods
            .iter()
            .filter_map(|(k, p)| Some((p.ip?, k.clone())))
            .collect();
        self.nodes_by_ip = self
            .objects
            .nodes
            .iter()
            .map(|(n, ip)| (*ip, n.clone()))
            .collect();
    }

    /// The policy stage's identity of a pod (hook for the policy issue).
    pub fn set_identity(&mut self, namespace: &str, pod: &str, identity: u32) {
        self.identities
            .insert((namespace.to_string(), pod.to_string()), identity);
    }

    /// What the datapath's service id stands for (hook for the Service issue).
    pub fn set_service_id(&mut self, id: u32, service: ServiceRef) {
        self.service_ids.insert(id, service);
    }

    /// What the datapath's policy rule id stands for (hook for the policy issue).
    pub fn set_policy_rule(&mut self, id: u32, policy: PolicyRef) {
        self.policy_rules.insert(id, policy);
    }

    /// Every Service frontend at once (frontends that went are forgotten).
    pub fn replace_service_frontends(
        &mut self,
        frontends: impl IntoIterator<Item = ServiceFrontend>,
    ) {
        self.service_ids.clear();
        self.service_frontends.clear();
        for fe in frontends {
            self.service_ids.insert(fe.id, fe.service.clone());
            self.service_frontends
                .insert((fe.addr, fe.port, fe.proto), fe.service);
        }
    }

    /// Every policy rule id at once.
    pub fn replace_policy_rules(&mut self, rules: impl IntoIterator<Item = (u32, PolicyRef)>) {
        self.policy_rules = rules.into_iter().collect();
    }

    pub fn service(&self, id: u32) -> Option<ServiceRef> {
        self.service_ids.get(&id).cloned()
    }

    /// The Service whose frontend is addr:port over `proto` (IP protocol number).
    pub fn service_at(&self, addr: Ipv4Addr, port: u16, proto: u8) -> Option<ServiceRef> {
        self.service_frontends.get(&(addr, port, proto)).cloned()
    }

    pub fn policy(&self, id: u32) -> Option<PolicyRef> {
        self.policy_rules.get(&id).cloned()
    }

    pub fn pods(&self) -> impl Iterator<Item = PodInfo> + '_ {
        self.objects.pods.iter().map(|(k, p)| PodInfo {
            identity: self.identities.get(k).copied().unwrap_or(p.identity),
            ..p.clone()
        })
    }

    pub fn services(&self) -> impl Iterator<Item = &ServiceInfo> {
        self.objects.services.values()
    }

    /// Node names and IPs.
    pub fn nodes(&self) -> impl Iterator<Item = (&String, &Ipv4Addr)> {
        self.objects.nodes.iter()
    }

    /// The endpoint behind `ip` as seen from `local_node`.
    pub fn endpoint(&self, ip: Ipv4Addr, local_node: &str) -> Endpoint {
        if let Some(key) = self.pods_by_ip.get(&ip)
            && let Some(pod) = self.objects.pods.get(key)
        {
            let mut labels: Vec<String> = pod
                .labels
                .iter()
                .map(|(k, v)| format!("k8s:{k}={v}"))
                .collect();
            labels.push(format!("k8s:io.kubernetes.pod.namespace={}", pod.namespace));
            return Endpoint {
                id: 0,
                identity: self.identities.get(key).copied().unwrap_or(pod.identity),
                namespace: pod.namespace.clone(),
                labels,
                pod_name: pod.name.clone(),
                node_name: pod.node.clone(),
            };
        }
        if let Some(node) = self.nodes_by_ip.get(&ip) {
            let local = node == local_node;
            return Endpoint {
                identity: if local {
                    IDENTITY_HOST
                } else {
                    IDENTITY_REMOTE_NODE
                },
                labels: vec![
                    if local {
                        "reserved:host"
                    } else {
                        "reserved:remote-node"
                    }
                    .into(),
                ],
                node_name: node.clone(),
                ..Endpoint::default()
            };
        }
        if ip.is_private() || ip.is_loopback() || ip.is_link_local() {
            // Inside the cluster's private ranges but unknown: say so rather than "world".
            return Endpoint {
                labels: vec!["reserved:unknown".into()],
                ..Endpoint::default()
            };
        }
        Endpoint {
            identity: IDENTITY_WORLD,
            labels: vec!["reserved:world".into()],
            ..Endpoint::default()
        }
    }
}

fn key(object: &Object) -> (String, String) {
    (
        object.namespace().unwrap_or_default().to_string(),
        object.name().to_string(),
    )
}

fn upsert(target: &mut Objects, object: &Object) {
    match object {
        Object::Pod(p) => {
            let ip = p
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse().ok());
            let info = PodInfo {
                namespace: object.namespace().unwrap_or("default").to_string(),
                name: object.name().to_string(),
                labels: p.metadata.labels.clone().unwrap_or_default(),
                node: p
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .unwrap_or_default(),
                ip,
                identity: 0,
            };
            target.pods.insert(key(object), info);
        }
        Object::Service(s) => {
            let spec = s.spec.as_ref();
            let info = ServiceInfo {
                namespace: object.namespace().unwrap_or("default").to_string(),
                name: object.name().to_string(),
                cluster_ip: spec
                    .and_then(|s| s.cluster_ip.as_deref())
                    .and_then(|ip| ip.parse().ok()),
                selector: spec.and_then(|s| s.selector.clone()).unwrap_or_default(),
            };
            target.services.insert(key(object), info);
        }
        Object::Node(n) => {
            let ip = n
                .status
                .as_ref()
                .and_then(|s| s.addresses.as_ref())
                .and_then(|a| a.iter().find(|a| a.type_ == "InternalIP"))
                .and_then(|a| a.address.parse().ok());
            match ip {
                Some(ip) => {
                    target.nodes.insert(object.name().to_string(), ip);
                }
                None => {
                    target.nodes.remove(object.name());
                }
            }
        }
        _ => {}
    }
}

fn delete(target: &mut Objects, object: &Object) {
    match object {
        Object::Pod(_) => {
            target.pods.remove(&key(object));
        }
        Object::Service(_) => {
            target.services.remove(&key(object));
        }
        Object::Node(_) => {
            target.nodes.remove(object.name());
        }
        _ => {}
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        Node, NodeAddress, NodeStatus, Pod, PodSpec, PodStatus, Service, ServiceSpec,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    pub fn pod(ns: &str, name: &str, ip: &str, node: &str, app: &str) -> Object {
        Object::Pod(Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                labels: Some([("app".to_string(), app.to_string())].into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.into()),
                ..Default::default()
            }),
            status: Some(PodStatus {
                pod_ip: Some(ip.into()),
                ..Default::default()
            }),
        })
    }

    pub fn node(name: &str, ip: &str) -> Object {
        Object::Node(Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            status: Some(NodeStatus {
                addresses: Some(vec![NodeAddress {
                    address: ip.into(),
                    type_: "InternalIP".into(),
                }]),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    pub fn directory() -> Directory {
        let mut d = Directory::default();
        for o in [
            pod("default", "a", "10.244.0.5", "node-1", "web"),
            pod("default", "b", "10.244.1.6", "node-2", "db"),
            node("node-1", "10.224.0.4"),
            node("node-2", "10.224.0.5"),
        ] {
            d.apply(&WatchEvent::Upsert { object: o });
        }
        d
    }

    #[test]
    fn resolves_pods_nodes_and_the_world() {
        let d = directory();
        let a = d.endpoint("10.244.0.5".parse().unwrap(), "node-1");
        assert_eq!(
            (a.namespace.as_str(), a.pod_name.as_str()),
            ("default", "a")
        );
        assert_eq!(a.label("app"), Some("web"));
        assert_eq!(a.node_name, "node-1");
        let host = d.endpoint("10.224.0.4".parse().unwrap(), "node-1");
        assert_eq!(host.identity, IDENTITY_HOST);
        let remote = d.endpoint("10.224.0.5".parse().unwrap(), "node-1");
        assert_eq!(remote.labels, vec!["reserved:remote-node".to_string()]);
        let unknown = d.endpoint("10.244.0.99".parse().unwrap(), "node-1");
        assert_eq!(unknown.labels, vec!["reserved:unknown".to_string()]);
        assert_eq!(unknown.identity, 0);
    }

    #[test]
    fn deletes_and_relists_replace_state() {
        let mut d = directory();
        d.apply(&WatchEvent::Delete {
            object: pod("default", "a", "10.244.0.5", "node-1", "web"),
        });
        assert!(
            d.endpoint("10.244.0.5".parse().unwrap(), "x")
                .pod_name
                .is_empty()
        );
        d.apply(&WatchEvent::Relist);
        d.apply(&WatchEvent::Upsert {
            object: pod("default", "c", "10.244.0.7", "node-1", "web"),
        });
        // Until the listing completes, the old state stays.
        assert_eq!(d.endpoint("10.244.1.6".parse().unwrap(), "x").pod_name, "b");
        d.apply(&WatchEvent::Synced { revision: 2 });
        assert!(
            d.endpoint("10.244.1.6".parse().unwrap(), "x")
                .pod_name
                .is_empty()
        );
        assert_eq!(d.endpoint("10.244.0.7".parse().unwrap(), "x").pod_name, "c");
        assert_eq!(d.pods().count(), 1);
    }

    #[test]
    fn services_and_identities() {
        let mut d = directory();
        d.apply(&WatchEvent::Upsert {
            object: Object::Service(Service {
                metadata: ObjectMeta {
                    name: Some("web".into()),
                    namespace: Some("default".into()),
                    ..Default::default()
                },
                spec: Some(ServiceSpec {
                    cluster_ip: Some("10.0.0.10".into()),
                    selector: Some([("app".to_string(), "web".to_string())].into()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        });
        assert_eq!(
            d.services().next().unwrap().cluster_ip,
            Some("10.0.0.10".parse().unwrap())
        );
        d.set_identity("default", "a", 12345);
        assert_eq!(
            d.endpoint("10.244.0.5".parse().unwrap(), "x").identity,
            12345
        );
        assert_eq!(d.pods().find(|p| p.name == "a").unwrap().identity, 12345);
    }
}
