//! The lab's embedded control plane: a persistent object store with Kubernetes apply
//! semantics, a watch stream, node scheduling, and the realization reports of agents and
//! runtimes (so `apply` can wait until the datapath has caught up).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferrum_model::nnc::NNC_NAMESPACE;
use ferrum_model::{
    AgentReport, Kind, NncSpec, NncStatus, NodeNetworkConfig, Object, ObjectRef, ValidationError,
    WatchEvent, normalize, validate,
};
use k8s_openapi::api::core::v1::{Namespace, NamespaceStatus, Pod, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;

use crate::api::{ApplyAction, ApplyOutcome};
use crate::store::{Store, StoreError};

/// Namespaces that always exist and cannot be deleted, as in Kubernetes.
pub const BUILTIN_NAMESPACES: [&str; 2] = ["default", "kube-system"];
/// The label the API server puts on every Namespace.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Debug, thiserror::Error)]
pub enum CpError {
    #[error("invalid object: {0}")]
    Invalid(#[from] ValidationError),
    #[error(
        "{object}: namespace {namespace:?} does not exist; create the Namespace first (it may be in the same file)"
    )]
    NamespaceNotFound { object: String, namespace: String },
    #[error(
        "{object}: spec.nodeName names node {node:?}, which does not exist (nodes: {known}); leave nodeName out to let the lab schedule the pod"
    )]
    NodeNotFound {
        object: String,
        node: String,
        known: String,
    },
    #[error("{object}: no Node exists to schedule it on; is the lab up?")]
    NoNodes { object: String },
    #[error("not found: {}; nothing was deleted", list_refs(.0))]
    NotFound(Vec<ObjectRef>),
    #[error(
        "NodeNetworkConfig {name} not found: this lab is not in VNet mode, or node {name} does not exist"
    )]
    NncNotFound { name: String },
    #[error("Pod {namespace}/{name} not found")]
    PodNotFound { namespace: String, name: String },
    #[error("{object}: this namespace may not be deleted")]
    Forbidden { object: String },
    #[error(
        "{object} is owned by the lab, not by `ferrum apply`/`ferrum delete`: its spec is written by node {name}'s agent and its status by the lab's cloud; inspect it with `ferrum get nnc -A` (nothing of the request was applied)"
    )]
    LabOwned { object: String, name: String },
    #[error("control-plane store: {0}")]
    Store(#[from] StoreError),
    #[error("cannot generate a uid from /dev/urandom: {0}")]
    Random(std::io::Error),
    #[error("cannot serve the control plane on {socket}: {source}")]
    Serve {
        socket: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "another control plane is already serving on {socket}; stop it first (ferrum lab down)"
    )]
    AlreadyServing { socket: std::path::PathBuf },
    #[error(
        "revision {revision} not realized after {timeout:?}; lagging: {}. Check the node logs under the lab's state directory",
        .lagging.join("; ")
    )]
    Timeout {
        revision: u64,
        timeout: Duration,
        lagging: Vec<String>,
    },
}

fn list_refs(refs: &[ObjectRef]) -> String {
    refs.iter()
        .map(ObjectRef::kubectl_name)
        .collect::<Vec<_>>()
        .join(", ")
}

struct State {
    store: Store,
    subscribers: Vec<Sender<WatchEvent>>,
    reports: BTreeMap<String, AgentReport>,
    /// Where clusterIPs come from (None: Services keep whatever they were given).
    service_net: Option<ServiceNet>,
}

/// The service CIDR and the addresses in it that are never handed out automatically (the DNS
/// Service's, which a Service may still ask for by name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceNet {
    pub cidr: ipnet::Ipv4Net,
    pub reserved: Vec<std::net::Ipv4Addr>,
    /// LoadBalancer ingress IPs (None: LoadBalancer Services stay pending).
    pub lb_pool: Option<ipnet::Ipv4Net>,
}

struct Inner {
    state: Mutex<State>,
    changed: Condvar,
}

/// Handle to the control plane; clones share it.
#[derive(Clone)]
pub struct ControlPlane {
    inner: Arc<Inner>,
}

impl ControlPlane {
    /// Loads `state_dir/objects.json` (or starts empty) and makes sure the built-in
    /// namespaces exist.
    pub fn open(state_dir: &Path) -> Result<Self, CpError> {
        let store = Store::open(&state_dir.join("objects.json"))?;
        let cp = ControlPlane {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    store,
                    subscribers: Vec::new(),
                    reports: BTreeMap::new(),
                    service_net: None,
                }),
                changed: Condvar::new(),
            }),
        };
        let missing: Vec<Object> = {
            let state = cp.lock();
            BUILTIN_NAMESPACES
                .iter()
                .filter(|ns| {
                    !state
                        .store
                        .objects()
                        .contains_key(&ObjectRef::new(Kind::Namespace, None, ns))
                })
                .map(|ns| {
                    Object::Namespace(Namespace {
                        metadata: ObjectMeta {
                            name: Some(ns.to_string()),
                            ..Default::default()
                        },
                        ..Default::default()
                    })
                })
                .collect()
        };
        if !missing.is_empty() {
            cp.apply(missing)?;
        }
        Ok(cp)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the store half-written (commit writes
        // the file before touching memory), so the state is still consistent.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn revision(&self) -> u64 {
        self.lock().store.revision()
    }

    /// Makes the control plane allocate clusterIPs from `net` (the lab's --service-cidr).
    pub fn set_service_network(&self, net: ServiceNet) {
        self.lock().service_net = Some(net);
    }

    /// `apply` on behalf of a user (`ferrum apply`): refuses, whole, any object the lab itself
    /// owns (NodeNetworkConfig: spec by the node's agent, status by the lab's cloud).
    pub fn apply_from_user(&self, objects: Vec<Object>) -> Result<ApplyOutcome, CpError> {
        refuse_lab_owned(objects.iter().map(ObjectRef::of))?;
        self.apply(objects)
    }

    /// `delete` on behalf of a user (`ferrum delete`): refuses, whole, objects the lab owns.
    pub fn delete_from_user(&self, refs: Vec<ObjectRef>) -> Result<u64, CpError> {
        refuse_lab_owned(refs.iter().cloned())?;
        self.delete(refs)
    }

    /// Creates or replaces every object, all or nothing.
    pub fn apply(&self, mut objects: Vec<Object>) -> Result<ApplyOutcome, CpError> {
        for object in &mut objects {
            normalize(object);
            validate(object)?;
        }
        let mut state = self.lock();
        let revision = state.store.revision() + 1;
        let mut work = state.store.objects().clone();
        let batch_namespaces: BTreeSet<String> = objects
            .iter()
            .filter(|o| Kind::of(o) == Kind::Namespace)
            .map(|o| o.name().to_string())
            .collect();
        let batch_nodes: BTreeSet<String> = objects
            .iter()
            .filter(|o| Kind::of(o) == Kind::Node)
            .map(|o| o.name().to_string())
            .collect();
        let now = now();

        let mut results = Vec::with_capacity(objects.len());
        let mut events = Vec::new();
        for object in objects {
            let key = ObjectRef::of(&object);
            if let Some(ns) = &key.namespace {
                let exists = ns == "default"
                    || batch_namespaces.contains(ns)
                    || work.contains_key(&ObjectRef::new(Kind::Namespace, None, ns));
                if !exists {
                    return Err(CpError::NamespaceNotFound {
                        object: key.to_string(),
                        namespace: ns.clone(),
                    });
                }
            }
            let existing = work.get(&key);
            let candidate = prepare(object, existing, &work, &batch_nodes, &now)?;
            let candidate = crate::services::assign_addresses(
                candidate,
                existing,
                &work,
                state.service_net.as_ref(),
            )?;
            let action = match existing {
                Some(old) if *old == candidate => {
                    results.push((key, ApplyAction::Unchanged));
                    continue;
                }
                Some(_) => ApplyAction::Configured,
                None => ApplyAction::Created,
            };
            let mut candidate = candidate;
            candidate.metadata_mut().resource_version = Some(revision.to_string());
            events.push(WatchEvent::Upsert {
                object: candidate.clone(),
            });
            work.insert(key.clone(), candidate);
            results.push((key, action));
        }
        let revision = if events.is_empty() {
            state.store.revision()
        } else {
            self.commit(&mut state, work, revision, events)?;
            revision
        };
        Ok(ApplyOutcome { revision, results })
    }

    /// Deletes every referenced object (a Namespace takes its objects with it). Refused whole,
    /// naming them, if any is missing.
    pub fn delete(&self, refs: Vec<ObjectRef>) -> Result<u64, CpError> {
        let mut state = self.lock();
        let mut work = state.store.objects().clone();
        let missing: Vec<ObjectRef> = refs
            .iter()
            .filter(|r| !work.contains_key(r))
            .cloned()
            .collect();
        if !missing.is_empty() {
            return Err(CpError::NotFound(missing));
        }
        let mut doomed: BTreeSet<ObjectRef> = BTreeSet::new();
        for r in &refs {
            if r.kind == Kind::Namespace {
                if BUILTIN_NAMESPACES.contains(&r.name.as_str()) {
                    return Err(CpError::Forbidden {
                        object: r.to_string(),
                    });
                }
                doomed.extend(
                    work.keys()
                        .filter(|k| k.namespace.as_deref() == Some(r.name.as_str()))
                        .cloned(),
                );
            }
            doomed.insert(r.clone());
        }
        let revision = state.store.revision() + 1;
        // Namespaced objects go before their Namespace, as the namespace controller does it.
        let mut ordered: Vec<ObjectRef> = doomed.into_iter().collect();
        ordered.sort_by_key(|r| (r.kind == Kind::Namespace, r.clone()));
        let mut events = Vec::new();
        for r in ordered {
            if let Some(mut object) = work.remove(&r) {
                object.metadata_mut().resource_version = Some(revision.to_string());
                events.push(WatchEvent::Delete { object });
            }
        }
        self.commit(&mut state, work, revision, events)?;
        Ok(revision)
    }

    pub fn list(&self, kind: Kind, namespace: Option<&str>) -> Vec<Object> {
        self.lock()
            .store
            .objects()
            .iter()
            .filter(|(k, _)| {
                k.kind == kind && (namespace.is_none() || k.namespace.as_deref() == namespace)
            })
            .map(|(_, o)| o.clone())
            .collect()
    }

    pub fn get(&self, r: &ObjectRef) -> Option<Object> {
        self.lock().store.objects().get(r).cloned()
    }

    /// A stream of changes: every object as an Upsert, Synced at the current revision, then
    /// live events (each change followed by Synced) in revision order.
    pub fn subscribe(&self) -> Receiver<WatchEvent> {
        let (tx, rx) = mpsc::channel();
        let mut state = self.lock();
        for object in state.store.objects().values() {
            let _ = tx.send(WatchEvent::Upsert {
                object: object.clone(),
            });
        }
        let _ = tx.send(WatchEvent::Synced {
            revision: state.store.revision(),
        });
        state.subscribers.push(tx);
        rx
    }

    /// Sets a Pod's status (the runtime's part, as kubelet does).
    pub fn update_pod_status(
        &self,
        namespace: &str,
        name: &str,
        status: PodStatus,
    ) -> Result<u64, CpError> {
        let mut state = self.lock();
        let key = ObjectRef::new(Kind::Pod, Some(namespace), name);
        let mut work = state.store.objects().clone();
        let Some(Object::Pod(pod)) = work.get_mut(&key) else {
            return Err(CpError::PodNotFound {
                namespace: namespace.to_string(),
                name: name.to_string(),
            });
        };
        if pod.status.as_ref() == Some(&status) {
            return Ok(state.store.revision());
        }
        let revision = state.store.revision() + 1;
        pod.status = Some(status);
        pod.metadata.resource_version = Some(revision.to_string());
        let event = WatchEvent::Upsert {
            object: Object::Pod(pod.clone()),
        };
        self.commit(&mut state, work, revision, vec![event])?;
        Ok(revision)
    }

    /// VNet mode: a node's request (the agent writes its NodeNetworkConfig spec).
    pub fn update_nnc_spec(&self, name: &str, spec: NncSpec) -> Result<u64, CpError> {
        self.update_nnc(name, |nnc| nnc.spec = spec)
    }

    /// VNet mode: the cloud's answer (the lab's cloud writes the status).
    pub fn update_nnc_status(&self, name: &str, status: NncStatus) -> Result<u64, CpError> {
        self.update_nnc(name, |nnc| nnc.status = Some(status))
    }

    fn update_nnc(
        &self,
        name: &str,
        change: impl FnOnce(&mut NodeNetworkConfig),
    ) -> Result<u64, CpError> {
        let mut state = self.lock();
        let key = ObjectRef::new(Kind::NodeNetworkConfig, Some(NNC_NAMESPACE), name);
        let mut work = state.store.objects().clone();
        let Some(Object::NodeNetworkConfig(nnc)) = work.get_mut(&key) else {
            return Err(CpError::NncNotFound {
                name: name.to_string(),
            });
        };
        let before = nnc.clone();
        change(nnc);
        if *nnc == before {
            return Ok(state.store.revision());
        }
        let revision = state.store.revision() + 1;
        nnc.metadata.resource_version = Some(revision.to_string());
        let event = WatchEvent::Upsert {
            object: Object::NodeNetworkConfig(nnc.clone()),
        };
        self.commit(&mut state, work, revision, vec![event])?;
        Ok(revision)
    }

    /// Records what a component ("agent/<node>" or "runtime/<node>") has realized.
    pub fn report(&self, component: &str, report: AgentReport) {
        let mut state = self.lock();
        state.reports.insert(component.to_string(), report);
        drop(state);
        self.inner.changed.notify_all();
    }

    pub fn reports(&self) -> BTreeMap<String, AgentReport> {
        self.lock().reports.clone()
    }

    /// Waits until the agent and the runtime of every Node report `realized_revision >=
    /// revision`.
    pub fn wait_realized(&self, revision: u64, timeout: Duration) -> Result<(), CpError> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            let lagging = lagging_components(&state, revision);
            if lagging.is_empty() {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(CpError::Timeout {
                    revision,
                    timeout,
                    lagging,
                });
            }
            state = self
                .inner
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    fn commit(
        &self,
        state: &mut State,
        work: BTreeMap<ObjectRef, Object>,
        revision: u64,
        events: Vec<WatchEvent>,
    ) -> Result<(), CpError> {
        let (mut work, mut events) = (work, events);
        // The endpointslice controller's share of this change, in the same revision.
        crate::services::reconcile_slices(&mut work, &mut events, revision)?;
        state.store.commit(work, revision)?;
        // Sent under the lock, so every subscriber sees changes in revision order.
        state.subscribers.retain(|tx| {
            events.iter().all(|e| tx.send(e.clone()).is_ok())
                && tx.send(WatchEvent::Synced { revision }).is_ok()
        });
        self.inner.changed.notify_all();
        Ok(())
    }
}

fn lagging_components(state: &State, revision: u64) -> Vec<String> {
    let mut lagging = Vec::new();
    for key in state
        .store
        .objects()
        .keys()
        .filter(|k| k.kind == Kind::Node)
    {
        for role in ["agent", "runtime"] {
            let component = format!("{role}/{}", key.name);
            match state.reports.get(&component) {
                None => lagging.push(format!("{component} has not reported")),
                Some(r) if r.realized_revision < revision => lagging.push(format!(
                    "{component} at revision {}{}",
                    r.realized_revision,
                    if r.message.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", r.message)
                    }
                )),
                Some(_) => {}
            }
        }
    }
    lagging
}

/// Turns an applied document into the object to store: server-owned metadata carried over
/// or assigned, and the kind's server-side rules (namespace label, pod scheduling and status).
fn prepare(
    mut object: Object,
    existing: Option<&Object>,
    work: &BTreeMap<ObjectRef, Object>,
    batch_nodes: &BTreeSet<String>,
    now: &Time,
) -> Result<Object, CpError> {
    let key = ObjectRef::of(&object);
    {
        let meta = object.metadata_mut();
        meta.resource_version = None;
        meta.generation = None;
        meta.managed_fields = None;
        meta.deletion_timestamp = None;
        match existing {
            Some(old) => {
                meta.uid = old.metadata().uid.clone();
                meta.creation_timestamp = old.metadata().creation_timestamp.clone();
                meta.resource_version = old.metadata().resource_version.clone();
            }
            None => {
                meta.uid = Some(new_uid()?);
                meta.creation_timestamp = Some(now.clone());
            }
        }
    }
    match (&mut object, existing) {
        (Object::Namespace(ns), old) => {
            ns.metadata
                .labels
                .get_or_insert_default()
                .insert(NAMESPACE_NAME_LABEL.to_string(), key.name.clone());
            ns.status = match old {
                Some(Object::Namespace(old)) => old.status.clone(),
                _ => Some(NamespaceStatus {
                    phase: Some("Active".to_string()),
                    ..Default::default()
                }),
            };
        }
        (Object::Pod(pod), old) => {
            let old = match old {
                Some(Object::Pod(p)) => Some(p),
                _ => None,
            };
            prepare_pod(pod, old, work, batch_nodes, &key, now)?;
        }
        (Object::Service(svc), Some(Object::Service(old))) => {
            // The allocated clusterIP stays with the Service unless the document sets one.
            if let (Some(spec), Some(old_spec)) = (svc.spec.as_mut(), old.spec.as_ref())
                && spec.cluster_ip.is_none()
            {
                spec.cluster_ip = old_spec.cluster_ip.clone();
                spec.cluster_ips = old_spec.cluster_ips.clone();
            }
            svc.status = old.status.clone();
        }
        (Object::Node(node), Some(Object::Node(old))) if node.status.is_none() => {
            node.status = old.status.clone();
        }
        _ => {}
    }
    Ok(object)
}

fn prepare_pod(
    pod: &mut Pod,
    old: Option<&Pod>,
    work: &BTreeMap<ObjectRef, Object>,
    batch_nodes: &BTreeSet<String>,
    key: &ObjectRef,
    now: &Time,
) -> Result<(), CpError> {
    let known_nodes: BTreeSet<String> = work
        .keys()
        .filter(|k| k.kind == Kind::Node)
        .map(|k| k.name.clone())
        .chain(batch_nodes.iter().cloned())
        .collect();
    let Some(spec) = pod.spec.as_mut() else {
        return Ok(()); // validate() refuses Pods without spec
    };
    match spec.node_name.as_deref() {
        Some(node) => {
            if !known_nodes.contains(node) {
                return Err(CpError::NodeNotFound {
                    object: key.to_string(),
                    node: node.to_string(),
                    known: known_nodes.into_iter().collect::<Vec<_>>().join(", "),
                });
            }
        }
        None => {
            // A re-applied Pod stays where it was scheduled.
            let previous = old
                .and_then(|p| p.spec.as_ref())
                .and_then(|s| s.node_name.clone())
                .filter(|n| known_nodes.contains(n));
            spec.node_name = match previous {
                Some(node) => Some(node),
                None => Some(
                    schedule(work, &known_nodes).ok_or_else(|| CpError::NoNodes {
                        object: key.to_string(),
                    })?,
                ),
            };
        }
    }
    match old {
        // Same spec: the same pod keeps running, so it keeps its uid, IP and status.
        Some(old) if old.spec == pod.spec => pod.status = old.status.clone(),
        // A changed spec replaces the pod: a new sandbox, a new uid.
        Some(_) => {
            pod.metadata.uid = Some(new_uid()?);
            pod.metadata.creation_timestamp = Some(now.clone());
            pod.status = Some(pending_status());
        }
        None => pod.status = Some(pending_status()),
    }
    Ok(())
}

fn pending_status() -> PodStatus {
    PodStatus {
        phase: Some("Pending".to_string()),
        ..Default::default()
    }
}

/// The node with the fewest pods; ties go to the first name.
fn schedule(work: &BTreeMap<ObjectRef, Object>, nodes: &BTreeSet<String>) -> Option<String> {
    let mut counts: BTreeMap<&str, usize> = nodes.iter().map(|n| (n.as_str(), 0)).collect();
    for object in work.values() {
        if let Object::Pod(p) = object
            && let Some(n) = p.spec.as_ref().and_then(|s| s.node_name.as_deref())
            && let Some(c) = counts.get_mut(n)
        {
            *c += 1;
        }
    }
    // min_by_key keeps the first minimum, and BTreeMap iterates in name order.
    counts
        .into_iter()
        .min_by_key(|(_, c)| *c)
        .map(|(n, _)| n.to_string())
}

/// The current time as Kubernetes stores it (whole seconds). k8s-openapi's jiff is built
/// without its clock, so the time comes from std.
pub fn now() -> Time {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    Time(Timestamp::from_second(i64::try_from(secs).unwrap_or_default()).unwrap_or_default())
}

/// A random (version 4) UUID.
pub(crate) fn new_uid() -> Result<String, CpError> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(CpError::Random)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    ))
}

/// Kinds that only the lab's components write (see `ControlPlane::apply_from_user`).
fn refuse_lab_owned(refs: impl IntoIterator<Item = ObjectRef>) -> Result<(), CpError> {
    match refs.into_iter().find(|r| r.kind == Kind::NodeNetworkConfig) {
        Some(r) => Err(CpError::LabOwned {
            object: r.to_string(),
            name: r.name.clone(),
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrum_model::parse_documents;

    fn objects(yaml: &str) -> Vec<Object> {
        parse_documents(yaml).expect("test YAML is valid")
    }

    const NODES: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: node-0}\n---\n\
                         apiVersion: v1\nkind: Node\nmetadata: {name: node-1}\n";

    fn pod(name: &str, extra_spec: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: web}}}}\n\
             spec: {{containers: [{{name: c, ports: [{{containerPort: 80}}]}}]{extra_spec}}}\n"
        )
    }

    fn pod_ref(name: &str) -> ObjectRef {
        ObjectRef::new(Kind::Pod, Some("default"), name)
    }

    fn get_pod(cp: &ControlPlane, name: &str) -> Pod {
        match cp.get(&pod_ref(name)) {
            Some(Object::Pod(p)) => p,
            other => panic!("pod {name}: {other:?}"),
        }
    }

    #[test]
    fn builtin_namespaces_exist_with_the_name_label() {
        let dir = tempfile::tempdir().unwrap();
        let cp = ControlPlane::open(dir.path()).unwrap();
        let names: Vec<String> = cp
            .list(Kind::Namespace, None)
            .iter()
            .map(|o| o.name().to_string())
            .collect();
        assert_eq!(names, ["default", "kube-system"]);
        let outcome = cp
            .apply(objects(
                "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {team: a}}\n",
            ))
            .unwrap();
        let ns = cp
            .get(&ObjectRef::new(Kind::Namespace, None, "shop"))
            .unwrap();
        let labels = ns.metadata().labels.clone().unwrap();
        assert_eq!(
            labels.get(NAMESPACE_NAME_LABEL).map(String::as_str),
            Some("shop")
        );
        assert_eq!(labels.get("team").map(String::as_str), Some("a"));
        assert_eq!(
            ns.metadata().resource_version,
            Some(outcome.revision.to_string())
        );
        assert!(ns.metadata().uid.is_some() && ns.metadata().creation_timestamp.is_some());
    }

    #[test]
    fn namespace_name_label_is_the_servers_on_every_update() {
        let dir = tempfile::tempdir().unwrap();
        let cp = ControlPlane::open(dir.path()).unwrap();
        let ns = |labels: &str| {
            objects(&format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{{labels}}}}}\n"
            ))
        };
        let shop = ObjectRef::new(Kind::Namespace, None, "shop");
        // A user value is overwritten on create...
        cp.apply(ns("kubernetes.io/metadata.name: other")).unwrap();
        let created = cp.get(&shop).unwrap();
        assert_eq!(
            created.metadata().labels.as_ref().unwrap()[NAMESPACE_NAME_LABEL],
            "shop"
        );
        let rx = cp.subscribe();
        let _snapshot: Vec<WatchEvent> = rx.try_iter().collect();
        // ...and on update, where the other labels are replaced whole and watchers see the
        // same Namespace (same uid) change in place.
        let out = cp
            .apply(ns("team: blue, kubernetes.io/metadata.name: other"))
            .unwrap();
        assert_eq!(out.results[0].1, ApplyAction::Configured);
        let updated = cp.get(&shop).unwrap();
        let labels = updated.metadata().labels.clone().unwrap();
        assert_eq!(labels[NAMESPACE_NAME_LABEL], "shop");
        assert_eq!(labels["team"], "blue");
        assert_eq!(updated.metadata().uid, created.metadata().uid);
        let live: Vec<WatchEvent> = rx.try_iter().collect();
        assert!(
            matches!(&live[..], [WatchEvent::Upsert { object }, WatchEvent::Synced { .. }]
                if object == &updated),
            "{live:?}"
        );
        // Leaving the label out keeps it too: re-applying the same labels changes nothing.
        let again = cp.apply(ns("team: blue")).unwrap();
        assert_eq!(again.results[0].1, ApplyAction::Unchanged);
        // The built-in namespaces carry it as well ("default" is referenced without applying).
        let default = cp
            .get(&ObjectRef::new(Kind::Namespace, None, "default"))
            .unwrap();
        assert_eq!(
            default.metadata().labels.as_ref().unwrap()[NAMESPACE_NAME_LABEL],
            "default"
        );
    }

    #[test]
    fn pod_relabel_is_an_in_place_update_for_watchers() {
        let dir = tempfile::tempdir().unwrap();
        let cp = ControlPlane::open(dir.path()).unwrap();
        cp.apply(objects(NODES)).unwrap();
        cp.apply(objects(&pod("a", ""))).unwrap();
        let running = PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some("10.244.0.7".into()),
            ..Default::default()
        };
        cp.update_pod_status("default", "a", running.clone())
            .unwrap();
        let before = get_pod(&cp, "a");
        let rx = cp.subscribe();
        let _snapshot: Vec<WatchEvent> = rx.try_iter().collect();
        let yaml = pod("a", "").replace("labels: {app: web}", "labels: {app: web, role: client}");
        let out = cp.apply(objects(&yaml)).unwrap();
        assert_eq!(out.results[0].1, ApplyAction::Configured);
        let live: Vec<WatchEvent> = rx.try_iter().collect();
        let [
            WatchEvent::Upsert {
                object: Object::Pod(after),
            },
            WatchEvent::Synced { .. },
        ] = &live[..]
        else {
            panic!("one in-place update expected: {live:?}");
        };
        assert_eq!(after.metadata.uid, before.metadata.uid, "same sandbox");
        assert_eq!(
            after.status.as_ref(),
            Some(&running),
            "keeps its IP and phase"
        );
        assert_eq!(after.spec, before.spec, "stays on its node");
        assert_eq!(after.metadata.labels.as_ref().unwrap()["role"], "client");
    }

    #[test]
    fn apply_creates_replaces_and_reports_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let cp = ControlPlane::open(dir.path()).unwrap();
        cp.apply(objects(NODES)).unwrap();
        let first = cp.apply(objects(&pod("a", ""))).unwrap();
        assert_eq!(first.results, [(pod_ref("a"), ApplyAction::Created)]);
        let again = cp.apply(objects(&pod("a", ""))).unwrap();
        assert_eq!(again.results, [(pod_ref("a"), ApplyAction::Unchanged)]);
        assert_eq!(again.revision, first.revision, "no change, no new revision");

        // Replace whole: the label left out is removed.
        let yaml = pod("a", "").replace("labels: {app: web}", "labels: {tier: x}");
        let third = cp.apply(objects(&yaml)).unwrap();
        assert_eq!(third.results, [(pod_ref("a"), ApplyAction::Configured)]);
        assert!(third.revision > first.revision);
        let labels = get_pod(&cp, "a").metadata.labels.unwrap();
        assert!(!labels.contains_key("app") && labels.contains_key("tier"));
    }

    #[test]
    fn pod_keeps_uid_and_ip_when_spec_is_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let cp = ControlPlane::open(dir.path()).unwrap();
        cp.apply(objects(NODES)).unwrap();
        cp.apply(objects(&pod("a", ""))).unwrap();
        let before = get_pod(&cp, "a");
        assert_eq!(
            before.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Pending")
        );
        cp.update_pod_status(
            "default",
            "a",
            PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some("10.244.0.5".into()),
                ..Default::default()
            },
        )
        .unwrap();
        // Labels change, spec does not: same pod.
        let yaml = pod("a", "").replace("app: web", "app: web2");
        cp.apply(objects(&yaml)).unwrap();
        let after = get_pod(&cp, "a");
        assert_eq!(after.metadata.uid, before.metadata.uid);
        assert_eq!(
            after.status.as_ref().and_then(|s| s.pod_ip.as_deref()),
            Some("10.244.0.5")
        );
        // Spec changes: a new pod.
        let changed = pod("a", "").replace("containerPort: 80", "containerPort: 81");
        cp.apply(objects(&changed)).unwrap();
        let replaced = get_pod(&cp, "a");
        assert_ne!(replaced.metadata.uid, before.metadata.uid);
        assert_eq!(replaced.status.and_then(|s| s.pod_ip), None);
    }

    #[test]
    fn pods_are_spread_and_stay_where_they_were_scheduled() {
        let dir = tempfile::tempdir().unwrap();
        let cp = ControlPlane::open(dir.path()).unwrap();
        cp.apply(objects(NODES)).unwrap();
        cp.apply(objects(&pod("pinned", ", nodeName: node-0")))
            .unwrap();
        let batch = format!("{}---\n{}---\n{}", pod("a", ""), pod("b", ""), pod("c", ""));
        cp.apply(objects(&batch)).unwrap();
        let node_of = |n: &str| get_pod(&cp, n).spec.unwrap().node_name.unwrap();
        // node-0 has one pod, so a goes to node-1; then tie -> node-0 by name; then node-1.
        assert_eq!(node_of("a"), "node-1");
        assert_eq!(node_of("b"), "node-0");
        assert_eq!(node_of("c"), "node-1");
        let again = cp.apply(objects(&pod("b", ""))).unwrap();
        assert_eq!(again.results[0].1, ApplyAction::Unchanged);
        assert_eq!(node_of("b"), "node-0");
    }

    #[test]
    fn unknown_node_and_namespace_are_refused_and_nothing_is_half_applied() {
        let dir = tempfile::tempdir().unwrap();
        let cp = ControlPlane::open(dir.path()).unwrap();
        cp.apply(objects(NODES)).unwrap();
        let rev = cp.revision();
        let batch = format!(
            "{}---\n{}",
            pod("good", ""),
            pod("bad", ", nodeName: node-9")
        );
        let err = cp.apply(objects(&batch)).unwrap_err().to_string();
        assert!(
            err.contains("Pod default/bad") && err.contains("\"node-9\""),
            "{err}"
        );
        assert!(
            cp.get(&pod_ref("good")).is_none(),
            "first pod of a refused batch was stored"
        );
        assert_eq!(cp.revision(), rev);

        let in_missing_ns = pod("x", "").replace("name: x,", "name: x, namespace: nope,");
        let err = cp.apply(objects(&in_missing_ns)).unwrap_err().to_string();
        assert!(err.contains("namespace \"nope\" does not exist"), "{err}");
        // Together with its Namespace it is fine.
        let with_ns = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: nope}}\n---\n{in_missing_ns}"
        );
        cp.apply(objects(&with_ns)).unwrap();
    }

    #[test]
    fn invalid_object_refuses_the_batch() {
        let dir = tempfile::tempdir().unwrap();
        let cp = ControlPlane::open(dir.path()).unwrap();
        cp.apply(objects(NODES)).unwrap();
        let mut batch = objects(&pod("ok", ""));
        let mut bad = objects(&pod("bad", "")).remove(0);
        if let Object::Pod(p) = &mut bad {
            p.spec.as_mut().unwrap().containers.clear();
        }
        batch.push(bad);
        let err = cp.apply(batch).unwrap_err().to_string();
        assert!(err.contains("Pod default/bad: spec.containers"), "{err}");
        assert!(cp.get(&pod_ref("ok")).is_none());
    }

    #[test]
    fn state_and_revision_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (rev, uid) = {
            let cp = ControlPlane::open(dir.path()).unwrap();
            cp.apply(objects(NODES)).unwrap();
            let out = cp.apply(objects(&pod("a", ""))).unwrap();
            (out.revision, get_pod(&cp, "a").metadata.uid)
        };
        let cp = ControlPlane::open(dir.path()).unwrap();
        assert_eq!(cp.revision(), rev);
        assert_eq!(get_pod(&cp, "a").metadata.uid, uid);
        let out = cp.apply(objects(&pod("a", ""))).unwrap();
        assert_eq!(out.results[0].1, ApplyAction::Unchanged);
        let next = cp.apply(objects(&pod("b", ""))).unwrap();
        assert_eq!(next.revision, rev + 1);
    }

    /// NodeNetworkConfig belongs to the node's agent (spec) and the lab's cloud (status): a
    /// user's apply or delete naming one is refused whole, naming the owners and `get nnc`.
    #[test]
    fn users_cannot_apply_or_delete_node_network_configs() {
        let dir = tempfile::tempdir().unwrap();
        let cp = ControlPlane::open(dir.path()).unwrap();
        cp.apply(objects(NODES)).unwrap();
        cp.apply(vec![Object::NodeNetworkConfig(NodeNetworkConfig::new(
            "node-0", 16,
        ))])
        .unwrap();
        let nnc_ref = ObjectRef::new(Kind::NodeNetworkConfig, Some(NNC_NAMESPACE), "node-0");
        let before = (cp.revision(), cp.get(&nnc_ref));
        let forged = pod("a", "")
            + "---\napiVersion: ferrum.io/v1alpha1\nkind: NodeNetworkConfig\n\
               metadata: {name: node-0, namespace: kube-system}\n\
               spec: {requestedIPCount: 32}\n\
               status: {podSubnet: 10.225.0.0/16, assignedIPs: [10.225.0.9], \
               scaler: {batchSize: 16, requestThresholdPercent: 50, \
               releaseThresholdPercent: 150, maxIPCount: 250}}\n";
        let err = cp.apply_from_user(objects(&forged)).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, CpError::LabOwned { .. }), "{err:?}");
        for needle in [
            "NodeNetworkConfig kube-system/node-0",
            "node node-0's agent",
            "lab's cloud",
            "ferrum get nnc",
            "nothing of the request was applied",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from {text}");
        }
        assert_eq!((cp.revision(), cp.get(&nnc_ref)), before);
        assert!(
            cp.get(&pod_ref("a")).is_none(),
            "the pod of the batch was applied"
        );

        let err = cp
            .delete_from_user(vec![pod_ref("ghost"), nnc_ref.clone()])
            .unwrap_err();
        assert!(matches!(err, CpError::LabOwned { .. }), "{err:?}");
        assert_eq!((cp.revision(), cp.get(&nnc_ref)), before);

        // Everything else still goes through the user paths.
        cp.apply_from_user(objects(&pod("a", ""))).unwrap();
        cp.delete_from_user(vec![pod_ref("a")]).unwrap();
        assert!(cp.get(&pod_ref("a")).is_none());
    }

    #[test]
    fn delete_checks_everything_first_and_cascades_namespaces() {
        let dir = tempfile::tempdir().unwrap();
        let cp = ControlPlane::open(dir.path()).unwrap();
        cp.apply(objects(NODES)).unwrap();
        cp.apply(objects(&pod("a", ""))).unwrap();
        let err = cp
            .delete(vec![pod_ref("a"), pod_ref("ghost")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pod/ghost") && err.contains("nothing was deleted"),
            "{err}"
        );
        assert!(cp.get(&pod_ref("a")).is_some());
        let err = cp
            .delete(vec![ObjectRef::new(Kind::Namespace, None, "default")])
            .unwrap_err();
        assert!(matches!(err, CpError::Forbidden { .. }));

        let shop = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n".to_string()
            + &pod("s", "").replace("name: s,", "name: s, namespace: shop,");
        cp.apply(objects(&shop)).unwrap();
        let events = cp.subscribe();
        let rev = cp
            .delete(vec![ObjectRef::new(Kind::Namespace, None, "shop")])
            .unwrap();
        assert!(cp.list(Kind::Pod, Some("shop")).is_empty());
        let live: Vec<WatchEvent> = events
            .try_iter()
            .skip_while(|e| !matches!(e, WatchEvent::Synced { .. }))
            .skip(1)
            .collect();
        let deleted: Vec<String> = live
            .iter()
            .filter_map(|e| match e {
                WatchEvent::Delete { object } => Some(ObjectRef::of(object).to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(deleted, ["Pod shop/s", "Namespace shop"]);
        assert_eq!(live.last(), Some(&WatchEvent::Synced { revision: rev }));
    }

    #[test]
    fn watch_gets_snapshot_then_ordered_changes() {
        let dir = tempfile::tempdir().unwrap();
        let cp = ControlPlane::open(dir.path()).unwrap();
        cp.apply(objects(NODES)).unwrap();
        let rx = cp.subscribe();
        let snapshot: Vec<WatchEvent> = rx.try_iter().collect();
        assert_eq!(
            snapshot.len(),
            5,
            "2 namespaces + 2 nodes + Synced: {snapshot:?}"
        );
        assert_eq!(
            snapshot.last(),
            Some(&WatchEvent::Synced {
                revision: cp.revision()
            })
        );
        let out = cp.apply(objects(&pod("a", ""))).unwrap();
        let rev2 = cp
            .update_pod_status(
                "default",
                "a",
                PodStatus {
                    pod_ip: Some("10.0.0.1".into()),
                    ..Default::default()
                },
            )
            .unwrap();
        let live: Vec<WatchEvent> = rx.try_iter().collect();
        assert_eq!(live.len(), 4);
        assert!(matches!(&live[0], WatchEvent::Upsert { object } if object.name() == "a"));
        assert_eq!(
            live[1],
            WatchEvent::Synced {
                revision: out.revision
            }
        );
        assert_eq!(live[3], WatchEvent::Synced { revision: rev2 });
        assert!(rev2 > out.revision);
    }

    #[test]
    fn wait_realized_needs_every_nodes_agent_and_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let cp = ControlPlane::open(dir.path()).unwrap();
        let rev = cp.apply(objects(NODES)).unwrap().revision;
        let report = |node: &str, r: u64| AgentReport {
            node: node.into(),
            ready: true,
            realized_revision: r,
            message: String::new(),
        };
        cp.report("agent/node-0", report("node-0", rev));
        cp.report("runtime/node-0", report("node-0", rev));
        cp.report(
            "agent/node-1",
            AgentReport {
                message: "loading maps".into(),
                ..report("node-1", rev - 1)
            },
        );
        let err = cp
            .wait_realized(rev, Duration::from_millis(100))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("agent/node-1 at revision") && err.contains("loading maps"),
            "{err}"
        );
        assert!(err.contains("runtime/node-1 has not reported"), "{err}");
        assert!(!err.contains("node-0"), "{err}");

        let late = cp.clone();
        let reporter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            late.report("agent/node-1", report("node-1", rev));
            late.report("runtime/node-1", report("node-1", rev + 5));
        });
        cp.wait_realized(rev, Duration::from_secs(10)).unwrap();
        reporter.join().unwrap();
    }
}
