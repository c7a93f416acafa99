//! Consumes the cluster's watch stream: keeps the Node objects, and at every `Synced` realizes
//! them (this node's block into IPAM, everyone's addresses into the ipcache), then reports.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use ferrum_model::{AgentReport, NodeNetworkConfig, Object, Source, WatchEvent};
use ipnet::Ipv4Net;

use crate::handler::{Dataplane, NodeState};
use crate::ipcache::{NodeInfo, desired_ipcache, desired_ipcache_vnet, diff};
use crate::server::SharedState;

/// The nodes as last listed, rebuilt from scratch after the source reconnects.
#[derive(Debug, Default)]
pub struct NodeTable {
    nodes: BTreeMap<String, NodeInfo>,
    /// A listing in progress after a reconnect: it replaces `nodes` at its Synced.
    relisting: Option<BTreeMap<String, NodeInfo>>,
    /// VNet mode: every node's NodeNetworkConfig, by node name.
    nncs: BTreeMap<String, NodeNetworkConfig>,
    relisting_nncs: Option<BTreeMap<String, NodeNetworkConfig>>,
}

impl NodeTable {
    pub fn nodes(&self) -> &BTreeMap<String, NodeInfo> {
        &self.nodes
    }

    pub fn nncs(&self) -> &BTreeMap<String, NodeNetworkConfig> {
        &self.nncs
    }

    /// The source failed: the next events are a full listing.
    pub fn start_relist(&mut self) {
        self.relisting = Some(BTreeMap::new());
        self.relisting_nncs = Some(BTreeMap::new());
    }

    /// Applies one event; returns the revision when the event is a `Synced`.
    pub fn apply(&mut self, event: WatchEvent) -> Option<u64> {
        if matches!(event, WatchEvent::Relist) {
            self.start_relist();
            return None;
        }
        let nncs = self.relisting_nncs.as_mut().unwrap_or(&mut self.nncs);
        match &event {
            WatchEvent::Upsert {
                object: Object::NodeNetworkConfig(n),
            } => {
                nncs.insert(n.node().to_string(), n.clone());
                return None;
            }
            WatchEvent::Delete {
                object: Object::NodeNetworkConfig(n),
            } => {
                nncs.remove(n.node());
                return None;
            }
            _ => {}
        }
        let target = self.relisting.as_mut().unwrap_or(&mut self.nodes);
        match event {
            WatchEvent::Upsert {
                object: Object::Node(n),
            } => {
                let info = NodeInfo::from_node(&n);
                target.insert(info.name.clone(), info);
                None
            }
            WatchEvent::Delete {
                object: Object::Node(n),
            } => {
                target.remove(n.metadata.name.as_deref().unwrap_or_default());
                None
            }
            WatchEvent::Upsert { .. } | WatchEvent::Delete { .. } | WatchEvent::Relist => None,
            WatchEvent::Synced { revision } => {
                if let Some(listed) = self.relisting.take() {
                    self.nodes = listed;
                }
                if let Some(listed) = self.relisting_nncs.take() {
                    self.nncs = listed;
                }
                Some(revision)
            }
        }
    }
}

/// Fixed facts about this node the realization needs.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub name: String,
    pub ip: Ipv4Addr,
    pub cluster_cidr: Ipv4Net,
    /// The cluster's default load-balancing algorithm.
    pub lb_algorithm: ferrum_lb::Algorithm,
}

/// This node's block from its Node object, validated against the cluster CIDR.
pub fn own_block(id: &NodeIdentity, nodes: &BTreeMap<String, NodeInfo>) -> Result<Ipv4Net, String> {
    let node = nodes
        .get(&id.name)
        .ok_or_else(|| format!("Node {:?} does not exist in the cluster yet", id.name))?;
    let block = *node
        .pod_cidrs
        .first()
        .ok_or_else(|| format!("Node {:?} has no IPv4 spec.podCIDR yet", id.name))?;
    if !id.cluster_cidr.contains(&block) {
        return Err(format!(
            "Node {:?} spec.podCIDR {block} is outside the cluster pod CIDR {}; \
             fix the node's podCIDR or the agent's --cluster-pod-cidr",
            id.name, id.cluster_cidr
        ));
    }
    Ok(block)
}

/// VNet mode: takes this node's addresses from its NodeNetworkConfig status, and points the
/// ipcache at every other node's addresses (no tunnels).
pub fn realize_vnet<D: Dataplane>(
    state: &mut NodeState<D>,
    id: &NodeIdentity,
    table: &NodeTable,
) -> anyhow::Result<()> {
    let own = table.nncs().get(&id.name);
    match own.and_then(|n| n.status.as_ref()) {
        Some(status) => {
            let assigned = status.assigned_ips.iter().copied().collect();
            match state.store.update(|p| p.set_addresses(assigned)) {
                Ok(true) => tracing::info!(
                    assigned = status.assigned_ips.len(),
                    free = state.store.pool().free(),
                    "node addresses updated by the cloud"
                ),
                Ok(false) => {}
                Err(e) => tracing::error!("cannot take the cloud's address assignment: {e}"),
            }
            let s = status.scaler;
            let vnet = state.vnet.get_or_insert_default();
            vnet.scaler = Some(ferrum_ipam::Scaler {
                batch_size: s.batch_size.max(1),
                request_threshold_percent: s.request_threshold_percent,
                release_threshold_percent: s.release_threshold_percent,
                max_ip_count: s.max_ip_count,
            });
            vnet.exhausted = status.subnet_exhausted;
            vnet.message = status.message.clone();
            vnet.batch_prefix_length = status.batch_prefix_length;
            state.block_confirmed = true;
            state.not_ready_reason = None;
        }
        None => {
            let why = match own.and_then(NodeNetworkConfig::pending_reason) {
                // Kubernetes mode says why the pool cannot be used: that is what to fix.
                Some(reason) => format!("waiting for addresses: {reason}"),
                None => format!(
                    "waiting for the cloud to assign addresses (NodeNetworkConfig kube-system/{} has {})",
                    id.name,
                    if own.is_some() {
                        "no status yet"
                    } else {
                        "not been created"
                    }
                ),
            };
            state.block_confirmed = false;
            state.not_ready_reason = Some(why);
        }
    }
    state.wake_scaler();
    let assigned: BTreeMap<String, Vec<Ipv4Addr>> = table
        .nncs()
        .iter()
        .map(|(n, c)| {
            (
                n.clone(),
                c.status
                    .as_ref()
                    .map(|s| s.assigned_ips.clone())
                    .unwrap_or_default(),
            )
        })
        .collect();
    let desired = desired_ipcache_vnet(id.ip, &id.name, table.nodes(), &assigned);
    reconcile_ipcache(state, &desired)
}

fn reconcile_ipcache<D: Dataplane>(
    state: &mut NodeState<D>,
    desired: &BTreeMap<Ipv4Net, crate::ipcache::PeerEntry>,
) -> anyhow::Result<()> {
    let actual = state.dataplane.ipcache()?;
    let changes = diff(desired, &actual);
    for prefix in &changes.removes {
        state.dataplane.remove_ipcache(*prefix)?;
    }
    for (prefix, entry) in &changes.upserts {
        state.dataplane.upsert_ipcache(*prefix, entry)?;
    }
    if !changes.is_empty() {
        tracing::info!(
            upserts = changes.upserts.len(),
            removes = changes.removes.len(),
            "ipcache reconciled"
        );
    }
    Ok(())
}

/// Brings IPAM and the ipcache in line with `nodes`. IPAM readiness follows the node's block;
/// the ipcache is reconciled by diff. Errors name what failed.
pub fn realize<D: Dataplane>(
    state: &mut NodeState<D>,
    id: &NodeIdentity,
    nodes: &BTreeMap<String, NodeInfo>,
) -> anyhow::Result<()> {
    match own_block(id, nodes) {
        Ok(block) => match state.store.set_block(block) {
            Ok(changed) => {
                state.dataplane.configure_block(block)?;
                if changed || !state.block_confirmed {
                    tracing::info!(%block, "node pod block set");
                }
                state.block_confirmed = true;
                state.not_ready_reason = None;
            }
            Err(e) => {
                tracing::error!("cannot take the node's pod block {block}: {e}");
                state.block_confirmed = false;
                state.not_ready_reason = Some(e.to_string());
            }
        },
        Err(why) => {
            if state.not_ready_reason.as_deref() != Some(why.as_str()) {
                tracing::warn!("not ready: {why}");
            }
            state.block_confirmed = false;
            state.not_ready_reason = Some(why);
        }
    }
    // Pods already in the stored block keep their routes even while the block is unconfirmed.
    let desired = desired_ipcache(id.ip, state.store.pool().block(), &id.name, nodes);
    reconcile_ipcache(state, &desired)
}

/// Compiles the Services for this node and reconciles the load-balancer maps, when anything
/// they depend on changed.
pub fn realize_services<D: crate::services::LbDataplane>(
    dataplane: &mut D,
    id: &NodeIdentity,
    nodes: &BTreeMap<String, NodeInfo>,
    services: &mut crate::services::ServiceTable,
    lb: &mut crate::services::LbReconciler,
    observer: Option<&crate::observe::Observer>,
) -> anyhow::Result<()> {
    if !services.dirty {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let node_ips = nodes.values().filter_map(|n| n.internal_ip).collect();
    let compiled = services.compile(&id.name, id.ip, node_ips, id.lb_algorithm);
    for w in &compiled.warnings {
        tracing::warn!("services: {w}");
    }
    let stats = lb.reconcile(dataplane, &compiled)?;
    services.dirty = false;
    if let Some(observer) = observer {
        // Flow records name the Service a translated packet went through (requests by
        // frontend id, replies by the frontend they come from).
        observer
            .directory_mut()
            .replace_service_frontends(lb.service_frontends(&compiled));
    }
    if stats != crate::services::LbStats::default() {
        tracing::info!(
            frontends = compiled.frontends.len(),
            writes = stats.writes,
            removes = stats.removes,
            purged_flows = stats.purged_flows,
            elapsed_us = started.elapsed().as_micros() as u64,
            "load balancer reconciled"
        );
    }
    Ok(())
}

/// Compiles NetworkPolicy for this node and reconciles the policy maps, when anything it
/// depends on changed; flow records learn what the rule ids and identities stand for.
pub fn realize_policy<D: crate::policy::PolicyDataplane>(
    dataplane: &mut D,
    id: &NodeIdentity,
    table: &mut crate::policy::PolicyTable,
    reconciler: &mut crate::policy::PolicyReconciler,
    observer: Option<&crate::observe::Observer>,
) -> anyhow::Result<()> {
    if !table.dirty {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let (state, stats) = reconciler.reconcile(dataplane, table, &id.name)?;
    table.dirty = false;
    for e in &state.rejected {
        tracing::warn!("policy not enforced: {e}");
    }
    if let Some(observer) = observer {
        let mut dir = observer.directory_mut();
        dir.replace_policy_rules(state.rules.iter().map(|(id, r)| {
            (
                *id,
                ferrum_flow::PolicyRef {
                    name: r.policy.clone(),
                    namespace: r.namespace.clone(),
                    labels: Vec::new(),
                    kind: "NetworkPolicy".into(),
                },
            )
        }));
        for ep in state.endpoints.values() {
            dir.set_identity(&ep.namespace, &ep.name, ep.identity.0);
        }
    }
    if stats.generation.is_some() {
        tracing::info!(
            endpoints = state.endpoints.len(),
            rules = state.rules.len(),
            writes = stats.writes,
            removes = stats.removes,
            generation = stats.generation,
            elapsed_us = started.elapsed().as_micros() as u64,
            "policy reconciled"
        );
    }
    Ok(())
}

/// VNet mode: keeps the node's NodeNetworkConfig spec in line with its address use. Woken by
/// every allocation, release and cloud answer; pushes only when the request changed, and
/// retries a failed push.
pub fn scaler_loop<D: Dataplane>(
    mut requester: Box<dyn ferrum_model::IpRequester>,
    wake: std::sync::mpsc::Receiver<()>,
    state: SharedState<D>,
    node: String,
) {
    let mut pushed: Option<ferrum_model::NncSpec> = None;
    let mut retry = false;
    loop {
        let timeout = if retry {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(30)
        };
        match wake.recv_timeout(timeout) {
            Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
        }
        while wake.try_recv().is_ok() {}
        let spec = {
            let mut guard = state.lock().unwrap_or_else(|p| p.into_inner());
            match guard.vnet_request() {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!("cannot record addresses being released: {e}");
                    retry = true;
                    continue;
                }
            }
        };
        let Some(spec) = spec else { continue };
        if pushed.as_ref() == Some(&spec) {
            retry = false;
            continue;
        }
        match requester.request_ips(&node, &spec) {
            Ok(()) => {
                tracing::info!(
                    requested = spec.requested_ip_count,
                    releasing = spec.ips_not_in_use.len(),
                    "asked the cloud for addresses"
                );
                pushed = Some(spec);
                retry = false;
            }
            Err(e) => {
                tracing::warn!("cannot send the address request to the cloud: {e}; retrying");
                retry = true;
            }
        }
    }
}

/// Runs until the process ends: consume events, realize at each Synced, report.
pub fn watch_loop<D: Dataplane + crate::services::LbDataplane + crate::policy::PolicyDataplane>(
    mut source: Box<dyn Source>,
    state: SharedState<D>,
    id: NodeIdentity,
    observer: Option<std::sync::Arc<crate::observe::Observer>>,
) {
    let mut table = NodeTable::default();
    let mut services = crate::services::ServiceTable::default();
    let mut lb = crate::services::LbReconciler::default();
    let mut policies = crate::policy::PolicyTable::default();
    let mut policy = crate::policy::PolicyReconciler::default();
    let mut backoff = Duration::from_millis(200);
    loop {
        let event = match source.next_event() {
            Ok(e) => {
                backoff = Duration::from_millis(200);
                e
            }
            Err(e) => {
                tracing::warn!("cluster watch failed: {e}; retrying in {backoff:?}");
                table.start_relist();
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        services.apply(&event);
        policies.apply(&event);
        let Some(revision) = table.apply(event) else {
            continue;
        };
        let report = {
            let mut guard = state.lock().unwrap_or_else(|p| p.into_inner());
            let realized = if guard.vnet.is_some() {
                realize_vnet(&mut guard, &id, &table)
            } else {
                realize(&mut guard, &id, table.nodes())
            }
            .and_then(|()| {
                realize_services(
                    &mut guard.dataplane,
                    &id,
                    table.nodes(),
                    &mut services,
                    &mut lb,
                    observer.as_deref(),
                )
            })
            .and_then(|()| {
                realize_policy(
                    &mut guard.dataplane,
                    &id,
                    &mut policies,
                    &mut policy,
                    observer.as_deref(),
                )
            });
            match realized {
                Ok(()) => AgentReport {
                    node: id.name.clone(),
                    ready: guard.ready(),
                    realized_revision: revision,
                    message: guard.not_ready_reason.clone().unwrap_or_default(),
                },
                Err(e) => {
                    tracing::error!("realizing revision {revision} failed: {e:#}");
                    // Not realized: report readiness without claiming the revision.
                    AgentReport {
                        node: id.name.clone(),
                        ready: false,
                        realized_revision: 0,
                        message: format!("datapath update failed: {e:#}"),
                    }
                }
            }
        };
        if report.realized_revision != 0 {
            tracing::debug!(revision, ready = report.ready, "realized");
        }
        if let Err(e) = source.report(&report) {
            tracing::warn!("reporting node status failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::IpamStore;
    use crate::handler::tests::MemDataplane;
    use crate::ipcache::PeerKind;
    use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeSpec, NodeStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn node(name: &str, ip: &str, cidr: &str) -> Object {
        Object::Node(Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                pod_cidr: Some(cidr.into()),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                addresses: Some(vec![NodeAddress {
                    address: ip.into(),
                    type_: "InternalIP".into(),
                }]),
                ..Default::default()
            }),
        })
    }

    fn id() -> NodeIdentity {
        NodeIdentity {
            name: "a".into(),
            ip: "10.224.0.4".parse().unwrap(),
            cluster_cidr: "10.244.0.0/16".parse().unwrap(),
            lb_algorithm: ferrum_lb::Algorithm::Random,
        }
    }

    fn upsert(o: Object) -> WatchEvent {
        WatchEvent::Upsert { object: o }
    }

    /// Kubernetes mode hands addresses out in aligned batches (status.batchPrefixLength): the
    /// same VNet path takes them, and gives surplus back only as whole batches.
    #[test]
    fn vnet_batches_are_taken_and_given_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = IpamStore::open(dir.path(), 110).unwrap();
        store
            .update(|p| {
                *p = ferrum_ipam::Pool::with_subnet("10.241.0.0/16".parse().unwrap(), 110);
                Ok(())
            })
            .unwrap();
        let mut s = NodeState::new(store, MemDataplane::default(), 1500);
        s.vnet = Some(crate::handler::VnetState::default());
        let mut nnc = NodeNetworkConfig::new("a", 32);
        let first = u32::from("10.241.0.16".parse::<Ipv4Addr>().unwrap());
        nnc.status = Some(ferrum_model::NncStatus {
            pod_subnet: "10.241.0.0/16".into(),
            assigned_ips: (first..first + 32).map(Ipv4Addr::from).collect(),
            scaler: ferrum_model::NncScaler {
                batch_size: 16,
                request_threshold_percent: 50,
                release_threshold_percent: 150,
                max_ip_count: 112,
            },
            batch_prefix_length: Some(28),
            ..Default::default()
        });
        let mut t = NodeTable::default();
        t.apply(upsert(Object::NodeNetworkConfig(nnc)));
        t.apply(WatchEvent::Synced { revision: 1 });
        realize_vnet(&mut s, &id(), &t).unwrap();
        assert!(s.ready());
        assert_eq!(s.store.pool().free(), 32);
        // One pod left, holding .32 (the first of the upper batch).
        let key = |i: u32| ferrum_agent_api::AttachmentKey {
            container_id: format!("c{i}"),
            ifname: "eth0".into(),
        };
        let owner = || crate::handler::Attachment {
            pod: None,
            netns: "/proc/1/ns/net".into(),
            network: "ferrum".into(),
            endpoint: None,
        };
        for i in 0..17 {
            s.store.allocate(key(i), owner()).unwrap();
        }
        for i in 0..16 {
            s.store.release(&key(i)).unwrap();
        }
        assert_eq!(
            s.store.pool().get(&key(16)).unwrap().ip,
            "10.241.0.32".parse::<Ipv4Addr>().unwrap()
        );
        // 31 free: above 150% of a batch, so a batch goes back: the lower one, whole (freeing
        // the 16 highest addresses instead would split both batches and free neither).
        let request = s.vnet_request().unwrap().unwrap();
        assert_eq!(request.requested_ip_count, 16);
        let batch: Ipv4Net = "10.241.0.16/28".parse().unwrap();
        assert_eq!(request.ips_not_in_use.len(), 16);
        assert!(request.ips_not_in_use.iter().all(|ip| batch.contains(ip)));
    }

    /// Kubernetes mode without a usable FerrumIPPool: the not-ready reason is the real one
    /// (the pool is missing, or outside --cluster-pod-cidr), not "no status yet".
    #[test]
    fn vnet_not_ready_reason_carries_why_the_pool_is_unusable() {
        let dir = tempfile::tempdir().unwrap();
        let store = IpamStore::open(dir.path(), 110).unwrap();
        let mut s = NodeState::new(store, MemDataplane::default(), 1500);
        s.vnet = Some(crate::handler::VnetState::default());
        let mut t = NodeTable::default();
        t.apply(upsert(Object::NodeNetworkConfig(NodeNetworkConfig::new(
            "a", 0,
        ))));
        t.apply(WatchEvent::Synced { revision: 1 });
        realize_vnet(&mut s, &id(), &t).unwrap();
        assert!(!s.ready());
        assert!(
            s.not_ready_reason
                .as_deref()
                .unwrap()
                .contains("no status yet"),
            "{:?}",
            s.not_ready_reason
        );
        let reason = "FerrumIPPool default spec.cidr 10.99.0.0/24 is not inside the agent's \
                      pod subnet --cluster-pod-cidr 10.241.0.0/16: make them agree";
        let mut nnc = NodeNetworkConfig::new("a", 0);
        nnc.set_pending_reason(reason);
        t.apply(upsert(Object::NodeNetworkConfig(nnc)));
        t.apply(WatchEvent::Synced { revision: 2 });
        realize_vnet(&mut s, &id(), &t).unwrap();
        assert!(!s.ready());
        assert_eq!(
            s.not_ready_reason.as_deref(),
            Some(format!("waiting for addresses: {reason}").as_str())
        );
    }

    #[test]
    fn relist_after_failure_replaces_the_table() {
        let mut t = NodeTable::default();
        t.apply(upsert(node("a", "10.224.0.4", "10.244.0.0/24")));
        t.apply(upsert(node("b", "10.224.0.5", "10.244.1.0/24")));
        assert_eq!(t.apply(WatchEvent::Synced { revision: 3 }), Some(3));
        assert_eq!(t.apply(WatchEvent::Relist), None);
        t.apply(upsert(node("a", "10.224.0.4", "10.244.0.0/24")));
        // Until the listing completes, the old table stays in force.
        assert_eq!(t.nodes().len(), 2);
        t.apply(WatchEvent::Synced { revision: 9 });
        assert_eq!(t.nodes().keys().collect::<Vec<_>>(), vec!["a"]);
    }

    #[test]
    fn block_outside_cluster_cidr_is_refused() {
        let mut t = NodeTable::default();
        t.apply(upsert(node("a", "10.224.0.4", "10.99.0.0/24")));
        let e = own_block(&id(), t.nodes()).unwrap_err();
        assert!(e.contains("outside the cluster pod CIDR"), "{e}");
    }

    #[test]
    fn realize_sets_block_and_reconciles_ipcache_by_diff() {
        let dir = tempfile::tempdir().unwrap();
        let store = IpamStore::open(dir.path(), 250).unwrap();
        let mut s = NodeState::new(store, MemDataplane::default(), 1450);
        let stray: Ipv4Net = "10.244.77.0/24".parse().unwrap();
        s.dataplane.ipcache.insert(
            stray,
            crate::ipcache::PeerEntry {
                kind: PeerKind::RemotePodBlock,
                tunnel_endpoint: Some("10.224.0.77".parse().unwrap()),
            },
        );
        let mut t = NodeTable::default();
        t.apply(upsert(node("b", "10.224.0.5", "10.244.1.0/24")));
        realize(&mut s, &id(), t.nodes()).unwrap();
        assert!(!s.ready(), "own Node not seen yet");
        assert!(
            s.not_ready_reason
                .as_deref()
                .unwrap()
                .contains("does not exist")
        );

        t.apply(upsert(node("a", "10.224.0.4", "10.244.0.0/24")));
        realize(&mut s, &id(), t.nodes()).unwrap();
        assert!(s.ready());
        assert_eq!(
            s.store.pool().block(),
            Some("10.244.0.0/24".parse().unwrap())
        );
        assert_eq!(s.dataplane.block, s.store.pool().block());
        assert!(!s.dataplane.ipcache.contains_key(&stray));
        assert_eq!(s.dataplane.ipcache.len(), 4);

        // Nothing changed: a second pass writes nothing.
        let writes = s.dataplane.ipcache_writes;
        realize(&mut s, &id(), t.nodes()).unwrap();
        assert_eq!(s.dataplane.ipcache_writes, writes);

        // A node leaves: exactly its two entries go.
        t.apply(WatchEvent::Delete {
            object: node("b", "10.224.0.5", "10.244.1.0/24"),
        });
        realize(&mut s, &id(), t.nodes()).unwrap();
        assert_eq!(s.dataplane.ipcache_writes, writes + 2);
        assert_eq!(s.dataplane.ipcache.len(), 2);
    }
}
