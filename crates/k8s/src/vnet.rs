//! VNet mode in Kubernetes: the cluster's FerrumIPPool and the FerrumNodes, as watched, turned
//! into the NodeNetworkConfig objects the agent already consumes in the lab. So the agent's
//! VNet code path (batch scaler, pool restricted to assigned addresses, ipcache of every
//! node's addresses) is the same in both: the lab's "cloud" writes NodeNetworkConfig status,
//! here the pool's allocations (claimed by each agent with optimistic concurrency) are the
//! status. Pure: no API calls.

use std::collections::{BTreeMap, BTreeSet};

use ferrum_model::{NncScaler, NncStatus, NodeNetworkConfig};
use ipnet::Ipv4Net;
use kube::ResourceExt;
use kube::runtime::watcher::Event;

use crate::crd::{FerrumIPPool, FerrumIPPoolSpec, FerrumNode, POOL_NAME};
use crate::pool::{PoolError, has_free_batch, node_addresses, node_batches};

/// What the agent's VNet mode needs to know about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VnetOptions {
    /// The agent's pod subnet (--cluster-pod-cidr): the pool must lie inside it.
    pub pod_subnet: Ipv4Net,
    /// Most pods on this node: the node never asks for more than this many addresses'
    /// worth of batches.
    pub max_pods: u32,
}

/// One watched kind's objects by name, with list/relist handling.
#[derive(Debug)]
struct Listed<T> {
    items: BTreeMap<String, T>,
    listing: Option<BTreeMap<String, T>>,
    listed: bool,
}

impl<T> Default for Listed<T> {
    fn default() -> Self {
        Self {
            items: BTreeMap::new(),
            listing: None,
            listed: false,
        }
    }
}

impl<T: ResourceExt> Listed<T> {
    fn apply(&mut self, event: Event<T>) {
        match event {
            Event::Init => self.listing = Some(BTreeMap::new()),
            Event::InitApply(o) => {
                self.listing.get_or_insert_default().insert(o.name_any(), o);
            }
            Event::InitDone => {
                self.items = self.listing.take().unwrap_or_default();
                self.listed = true;
            }
            Event::Apply(o) => {
                self.items.insert(o.name_any(), o);
            }
            Event::Delete(o) => {
                self.items.remove(&o.name_any());
            }
        }
    }
}

/// The watched FerrumIPPool and FerrumNodes, and the NodeNetworkConfigs they amount to.
#[derive(Debug)]
pub struct VnetView {
    node: String,
    options: VnetOptions,
    pools: Listed<FerrumIPPool>,
    nodes: Listed<FerrumNode>,
    /// What was last handed on (to pass on changes only).
    last: Option<BTreeMap<String, NodeNetworkConfig>>,
    /// The last reason the pool could not be used, to log it once.
    last_problem: Option<String>,
}

impl VnetView {
    pub fn new(node: &str, options: VnetOptions) -> Self {
        Self {
            node: node.to_string(),
            options,
            pools: Listed::default(),
            nodes: Listed::default(),
            last: None,
            last_problem: None,
        }
    }

    pub fn apply_pool(&mut self, event: Event<FerrumIPPool>) {
        self.pools.apply(event);
    }

    pub fn apply_node(&mut self, event: Event<FerrumNode>) {
        self.nodes.apply(event);
    }

    /// Both kinds have been listed once.
    pub fn initialized(&self) -> bool {
        self.pools.listed && self.nodes.listed
    }

    /// The pool, when it exists and fits the agent's pod subnet.
    fn pool(&self) -> Result<&FerrumIPPoolSpec, String> {
        let pool = self.pools.items.get(POOL_NAME).ok_or_else(|| {
            format!(
                "FerrumIPPool {POOL_NAME} does not exist: apply deploy/ippool.yaml (VNet mode needs it)"
            )
        })?;
        let spec = &pool.spec;
        // Validates cidr and batchPrefixLength.
        node_batches(spec, &self.node).map_err(|e| e.to_string())?;
        let cidr: Ipv4Net = spec
            .cidr
            .parse()
            .map_err(|_| PoolError::BadCidr(spec.cidr.clone()).to_string())?;
        if !self.options.pod_subnet.contains(&cidr.trunc()) {
            return Err(format!(
                "FerrumIPPool {POOL_NAME} spec.cidr {} is not inside the agent's pod subnet \
                 --cluster-pod-cidr {}: make them agree",
                spec.cidr, self.options.pod_subnet
            ));
        }
        Ok(spec)
    }

    /// The NodeNetworkConfig of every node the pool or a FerrumNode names, and of this node:
    /// spec.requestedIPCount from the FerrumNode, status from the pool (None while the pool
    /// is missing or unusable, with the reason).
    pub fn nncs(&self) -> (BTreeMap<String, NodeNetworkConfig>, Option<String>) {
        let pool = self.pool();
        let mut names: BTreeSet<String> = self.nodes.items.keys().cloned().collect();
        names.insert(self.node.clone());
        if let Ok(spec) = pool {
            names.extend(spec.allocations.keys().cloned());
        }
        let mut out = BTreeMap::new();
        for name in names {
            let requested = self
                .nodes
                .items
                .get(&name)
                .map_or(0, |n| n.spec.requested_ip_count);
            let mut nnc = NodeNetworkConfig::new(&name, requested);
            match pool {
                Ok(spec) => nnc.status = Some(self.status(spec, &name, requested)),
                // The agent reports this as why it is not ready (not just a log line).
                Err(ref why) => nnc.set_pending_reason(why),
            }
            out.insert(name, nnc);
        }
        (out, pool.err())
    }

    fn status(&self, spec: &FerrumIPPoolSpec, node: &str, requested: u32) -> NncStatus {
        let batch_size =
            u32::try_from(1u64 << (32 - u32::from(spec.batch_prefix_length))).unwrap_or(u32::MAX);
        let owned = node_batches(spec, node).map_or(0, |b| b.len() as u64);
        let wanted = u64::from(requested).div_ceil(u64::from(batch_size));
        let exhausted = owned < wanted && !has_free_batch(spec);
        NncStatus {
            pod_subnet: spec.cidr.clone(),
            assigned_ips: node_addresses(spec, node).unwrap_or_default(),
            scaler: NncScaler {
                batch_size,
                request_threshold_percent: spec.request_threshold_percent,
                release_threshold_percent: spec.release_threshold_percent,
                max_ip_count: self
                    .options
                    .max_pods
                    .div_ceil(batch_size)
                    .saturating_mul(batch_size),
            },
            subnet_exhausted: exhausted,
            message: if exhausted {
                format!(
                    "FerrumIPPool {POOL_NAME} ({}) has no free /{} batch left: delete pods on \
                     other nodes to free batches, or give the pool a larger spec.cidr",
                    spec.cidr, spec.batch_prefix_length
                )
            } else {
                String::new()
            },
            batch_prefix_length: Some(spec.batch_prefix_length),
        }
    }

    /// Once both kinds are listed: the NodeNetworkConfigs when they differ from the last ones
    /// handed on (a full listing for the merger), None otherwise. Logs a pool problem once.
    pub fn changed(&mut self) -> Option<Vec<NodeNetworkConfig>> {
        if !self.initialized() {
            return None;
        }
        let (nncs, problem) = self.nncs();
        if problem != self.last_problem {
            if let Some(p) = &problem {
                tracing::error!("VNet mode: {p}");
            }
            self.last_problem = problem;
        }
        if self.last.as_ref() == Some(&nncs) {
            return None;
        }
        self.last = Some(nncs.clone());
        Some(nncs.into_values().collect())
    }

    /// Node garbage collection: the nodes whose pool entry or FerrumNode outlived their Node
    /// (`live`: the complete set of Nodes), when this agent is the collector: the lowest-named
    /// live node running an agent (one with a FerrumNode). Every agent sees the same Nodes and
    /// FerrumNodes, so exactly one collects without talking to the others (two at a moment of
    /// disagreement are harmless: the writes are optimistic and idempotent). Empty until the
    /// pool and the FerrumNodes are listed.
    pub fn stale_nodes(&self, live: &BTreeSet<String>) -> Vec<String> {
        if !self.initialized() {
            return Vec::new();
        }
        let collector = self.nodes.items.keys().filter(|n| live.contains(*n)).min();
        if collector != Some(&self.node) {
            return Vec::new();
        }
        let mut known: BTreeSet<&String> = self.nodes.items.keys().collect();
        if let Some(pool) = self.pools.items.get(POOL_NAME) {
            known.extend(pool.spec.allocations.keys());
        }
        known
            .into_iter()
            .filter(|n| !live.contains(*n) && **n != self.node)
            .cloned()
            .collect()
    }

    /// This node asked for more batches than it owns and the pool has a free one: a claim
    /// is due (the request could not be met earlier, or has not been yet).
    pub fn shortfall(&self) -> bool {
        let Ok(spec) = self.pool() else {
            return false;
        };
        let (nncs, _) = self.nncs();
        nncs.get(&self.node)
            .and_then(|n| n.status.as_ref().map(|s| (n.spec.requested_ip_count, s)))
            .is_some_and(|(requested, s)| {
                let owned = node_batches(spec, &self.node).map_or(0, |b| b.len() as u64);
                owned < u64::from(requested).div_ceil(u64::from(s.scaler.batch_size))
                    && has_free_batch(spec)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{FerrumIPPoolSpec, FerrumNodeSpec};
    use std::net::Ipv4Addr;

    fn pool(cidr: &str, allocs: &[(&str, &[&str])]) -> FerrumIPPool {
        let mut p = FerrumIPPool::new(
            POOL_NAME,
            FerrumIPPoolSpec {
                cidr: cidr.into(),
                batch_prefix_length: 28,
                ..Default::default()
            },
        );
        for (n, b) in allocs {
            p.spec
                .allocations
                .insert(n.to_string(), b.iter().map(|s| s.to_string()).collect());
        }
        p
    }

    fn fnode(name: &str, requested: u32) -> FerrumNode {
        FerrumNode::new(
            name,
            FerrumNodeSpec {
                requested_ip_count: requested,
                ..Default::default()
            },
        )
    }

    fn view() -> VnetView {
        VnetView::new(
            "a",
            VnetOptions {
                pod_subnet: "10.241.0.0/16".parse().unwrap(),
                max_pods: 110,
            },
        )
    }

    fn list<T>(items: Vec<T>) -> Vec<Event<T>> {
        let mut out = vec![Event::Init];
        out.extend(items.into_iter().map(Event::InitApply));
        out.push(Event::InitDone);
        out
    }

    #[test]
    fn batches_become_assigned_addresses_with_the_pools_policy() {
        let mut v = view();
        for e in list(vec![pool(
            "10.241.0.0/26",
            &[("a", &["10.241.0.0/28"]), ("b", &["10.241.0.16/28"])],
        )]) {
            v.apply_pool(e);
            assert!(
                v.changed().is_none(),
                "nothing before both kinds are listed"
            );
        }
        for e in list(vec![fnode("a", 16)]) {
            v.apply_node(e);
        }
        let nncs = v.changed().expect("first listing");
        let a = nncs.iter().find(|n| n.node() == "a").unwrap();
        let status = a.status.as_ref().unwrap();
        assert_eq!(a.spec.requested_ip_count, 16);
        // The pool's network address is not usable: 15 addresses in the first batch.
        assert_eq!(status.assigned_ips.len(), 15);
        assert_eq!(status.assigned_ips[0], Ipv4Addr::new(10, 241, 0, 1));
        assert_eq!(
            status.scaler,
            NncScaler {
                batch_size: 16,
                request_threshold_percent: 50,
                release_threshold_percent: 150,
                max_ip_count: 112
            }
        );
        assert_eq!(status.batch_prefix_length, Some(28));
        assert!(!status.subnet_exhausted);
        // Other nodes' addresses come along (the ipcache routes them to their node).
        let b = nncs.iter().find(|n| n.node() == "b").unwrap();
        assert_eq!(b.status.as_ref().unwrap().assigned_ips.len(), 16);
        assert!(v.changed().is_none(), "unchanged: nothing handed on");
        assert!(!v.shortfall());

        // a asks for 32: a free batch exists, so a claim is due.
        v.apply_node(Event::Apply(fnode("a", 32)));
        assert!(v.changed().is_some());
        assert!(v.shortfall());
        // The pool is full (b took the rest): a is exhausted, with a message naming the pool.
        v.apply_pool(Event::Apply(pool(
            "10.241.0.0/26",
            &[
                ("a", &["10.241.0.0/28"]),
                ("b", &["10.241.0.16/28", "10.241.0.32/28", "10.241.0.48/28"]),
            ],
        )));
        let nncs = v.changed().unwrap();
        let s = nncs[0].status.clone().unwrap();
        assert!(s.subnet_exhausted);
        assert!(s.message.contains("10.241.0.0/26"), "{}", s.message);
        assert!(!v.shortfall(), "nothing to claim");
    }

    #[test]
    fn the_lowest_live_node_with_an_agent_collects_nodes_that_are_gone() {
        let live = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<BTreeSet<_>>();
        let mut v = view(); // node "a"
        assert!(
            v.stale_nodes(&live(&["a"])).is_empty(),
            "nothing before both kinds are listed"
        );
        for e in list(vec![pool(
            "10.241.0.0/24",
            &[
                ("a", &["10.241.0.0/28"]),
                ("b", &["10.241.0.16/28"]),
                ("gone", &["10.241.0.32/28"]),
            ],
        )]) {
            v.apply_pool(e);
        }
        // "0" is live and sorts first, but runs no agent (no FerrumNode): "a" collects.
        for e in list(vec![fnode("a", 16), fnode("b", 16), fnode("old", 0)]) {
            v.apply_node(e);
        }
        assert_eq!(
            v.stale_nodes(&live(&["0", "a", "b"])),
            ["gone", "old"],
            "the pool entry and the FerrumNode of deleted nodes"
        );
        // b goes too.
        assert_eq!(v.stale_nodes(&live(&["0", "a"])), ["b", "gone", "old"]);
        // Another agent is lower: a leaves it to that one.
        v.apply_node(Event::Apply(fnode("0", 16)));
        assert!(v.stale_nodes(&live(&["0", "a"])).is_empty());
        // ... until that node is gone itself: then a collects it as well.
        assert_eq!(v.stale_nodes(&live(&["a"])), ["0", "b", "gone", "old"]);
        // An agent whose own Node is not (yet) in the set never collects itself.
        assert!(!v.stale_nodes(&live(&["b"])).contains(&"a".to_string()));
    }

    #[test]
    fn a_missing_or_foreign_pool_gives_no_status_and_says_why() {
        let mut v = view();
        for e in list(vec![]) {
            v.apply_pool(e);
        }
        for e in list(vec![]) {
            v.apply_node(e);
        }
        let nncs = v.changed().unwrap();
        assert_eq!(nncs.len(), 1, "this node, waiting");
        assert!(nncs[0].status.is_none());
        assert!(v.nncs().1.unwrap().contains("ippool.yaml"));
        // The reason travels with the NodeNetworkConfig, for the agent's not-ready message.
        let why = nncs[0].pending_reason().unwrap();
        assert!(why.contains("FerrumIPPool default does not exist"), "{why}");
        v.apply_pool(Event::Apply(pool("10.99.0.0/24", &[])));
        let nncs = v.changed().expect("a new reason is handed on");
        assert!(nncs[0].status.is_none(), "still no status");
        let why = nncs[0].pending_reason().unwrap();
        assert!(
            why.contains("10.99.0.0/24") && why.contains("--cluster-pod-cidr 10.241.0.0/16"),
            "{why}"
        );
        assert_eq!(Some(why), v.nncs().1.as_deref());
        // A relist that drops the pool takes the statuses away again.
        v.apply_pool(Event::Apply(pool(
            "10.241.0.0/24",
            &[("a", &["10.241.0.16/28"])],
        )));
        assert_eq!(
            v.changed().unwrap()[0]
                .status
                .as_ref()
                .unwrap()
                .assigned_ips
                .len(),
            16
        );
        for e in list(vec![]) {
            v.apply_pool(e);
        }
        assert!(v.changed().unwrap()[0].status.is_none());
    }
}
