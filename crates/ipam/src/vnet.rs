//! VNet mode: pod addresses come from a pod subnet of the cloud network, handed to nodes in
//! batches. [`Scaler`] is the node's side (how many addresses to hold, as Azure CNS does it);
//! [`SubnetAllocator`] is the cloud's side (which addresses each node holds, never one address
//! on two nodes).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// The batch policy: a node holds a multiple of `batch_size` addresses, asks for another batch
/// when fewer than `request_threshold_percent` of a batch are free, and gives one back when more
/// than `release_threshold_percent` of a batch are free.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Scaler {
    pub batch_size: u32,
    pub request_threshold_percent: u32,
    pub release_threshold_percent: u32,
    /// Never hold more than this (max pods rounded up to a batch).
    pub max_ip_count: u32,
}

impl Scaler {
    pub fn new(batch_size: u32, request_pct: u32, release_pct: u32, max_pods: u32) -> Self {
        let batch_size = batch_size.max(1);
        Self {
            batch_size,
            request_threshold_percent: request_pct,
            release_threshold_percent: release_pct,
            max_ip_count: max_pods.div_ceil(batch_size) * batch_size,
        }
    }

    /// Free addresses below which a node asks for more (8 of a 16 batch at 50%).
    pub fn min_free(&self) -> u32 {
        self.batch_size * self.request_threshold_percent / 100
    }

    /// Free addresses above which a node gives some back (24 of a 16 batch at 150%).
    pub fn max_free(&self) -> u32 {
        self.batch_size * self.release_threshold_percent / 100
    }

    /// How many addresses a node with `used` allocated and `held` usable (assigned and not
    /// being released) should hold: unchanged between the thresholds, else the smallest
    /// multiple of a batch (at least one) that leaves `min_free` free, capped at `max_ip_count`.
    pub fn target(&self, used: u32, held: u32) -> u32 {
        let free = held.saturating_sub(used);
        if free >= self.min_free() && free <= self.max_free() && held >= self.batch_size {
            return held.min(self.max_ip_count.max(used));
        }
        let want = (used + self.min_free()).div_ceil(self.batch_size) * self.batch_size;
        want.max(self.batch_size).min(self.max_ip_count).max(used)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubnetError {
    #[error("address {ip} is not a usable address of the pod subnet {subnet}")]
    Outside { ip: Ipv4Addr, subnet: Ipv4Net },
    #[error("address {ip} is assigned to both {first} and {second}")]
    Duplicate {
        ip: Ipv4Addr,
        first: String,
        second: String,
    },
}

/// What the cloud did for one node's request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fulfilment {
    /// Every address the node holds now.
    pub assigned: BTreeSet<Ipv4Addr>,
    pub added: Vec<Ipv4Addr>,
    pub removed: Vec<Ipv4Addr>,
    /// The subnet ran out before the request could be met.
    pub exhausted: bool,
}

/// The cloud's view of a pod subnet: which node holds which address. An address is held by at
/// most one node; released addresses go back to the subnet and are handed out again only after
/// every other free address (round-robin), so a stale route or ARP entry has time to age out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetAllocator {
    subnet: Ipv4Net,
    nodes: BTreeMap<String, BTreeSet<Ipv4Addr>>,
    holders: BTreeMap<Ipv4Addr, String>,
    cursor: Option<Ipv4Addr>,
}

/// Usable addresses of a pod subnet: all but the network and broadcast addresses.
fn usable(subnet: Ipv4Net) -> (u32, u32) {
    let first = u32::from(subnet.network());
    let last = u32::from(subnet.broadcast());
    if subnet.prefix_len() <= 30 {
        (first + 1, last - 1)
    } else {
        (first, last)
    }
}

impl SubnetAllocator {
    pub fn new(subnet: Ipv4Net) -> Self {
        Self {
            subnet: subnet.trunc(),
            nodes: BTreeMap::new(),
            holders: BTreeMap::new(),
            cursor: None,
        }
    }

    /// Rebuilds the cloud's state from what nodes were last told they hold (the persisted
    /// NodeNetworkConfig statuses); refuses a state with an address on two nodes.
    pub fn restore<'a>(
        subnet: Ipv4Net,
        assignments: impl IntoIterator<Item = (&'a str, &'a BTreeSet<Ipv4Addr>)>,
    ) -> Result<Self, SubnetError> {
        let mut me = Self::new(subnet);
        let (first, last) = usable(me.subnet);
        for (node, ips) in assignments {
            for ip in ips {
                if !(first..=last).contains(&u32::from(*ip)) {
                    return Err(SubnetError::Outside {
                        ip: *ip,
                        subnet: me.subnet,
                    });
                }
                if let Some(other) = me.holders.get(ip) {
                    return Err(SubnetError::Duplicate {
                        ip: *ip,
                        first: other.clone(),
                        second: node.to_string(),
                    });
                }
                me.holders.insert(*ip, node.to_string());
                me.cursor = me.cursor.max(Some(*ip));
            }
            me.nodes.insert(node.to_string(), ips.clone());
        }
        Ok(me)
    }

    pub fn subnet(&self) -> Ipv4Net {
        self.subnet
    }

    pub fn assigned(&self, node: &str) -> BTreeSet<Ipv4Addr> {
        self.nodes.get(node).cloned().unwrap_or_default()
    }

    pub fn holder(&self, ip: Ipv4Addr) -> Option<&str> {
        self.holders.get(&ip).map(String::as_str)
    }

    pub fn capacity(&self) -> u32 {
        let (first, last) = usable(self.subnet);
        last - first + 1
    }

    pub fn in_use(&self) -> u32 {
        u32::try_from(self.holders.len()).unwrap_or(u32::MAX)
    }

    /// Serves a node's request: takes back `release` (only addresses the node holds), then
    /// tops the node up to `requested` addresses from the subnet. Never shrinks a node below
    /// `requested` on its own: only released addresses leave it.
    pub fn reconcile(
        &mut self,
        node: &str,
        requested: u32,
        release: &BTreeSet<Ipv4Addr>,
    ) -> Fulfilment {
        let mut held = self.nodes.remove(node).unwrap_or_default();
        let mut removed = Vec::new();
        for ip in release {
            if held.remove(ip) {
                self.holders.remove(ip);
                removed.push(*ip);
            }
        }
        let mut added = Vec::new();
        let (first, last) = usable(self.subnet);
        let mut exhausted = false;
        while (held.len() as u64) < u64::from(requested) {
            if self.holders.len() as u64 > u64::from(last - first) {
                exhausted = true;
                break;
            }
            let start = match self.cursor {
                Some(c) if u32::from(c) >= first && u32::from(c) < last => u32::from(c) + 1,
                _ => first,
            };
            let mut candidate = start;
            let ip = loop {
                let ip = Ipv4Addr::from(candidate);
                if !self.holders.contains_key(&ip) {
                    break ip;
                }
                candidate = if candidate == last {
                    first
                } else {
                    candidate + 1
                };
            };
            self.holders.insert(ip, node.to_string());
            self.cursor = Some(ip);
            held.insert(ip);
            added.push(ip);
        }
        self.nodes.insert(node.to_string(), held.clone());
        Fulfilment {
            assigned: held,
            added,
            removed,
            exhausted,
        }
    }

    /// A node left the cluster: everything it held goes back to the subnet.
    pub fn remove_node(&mut self, node: &str) -> BTreeSet<Ipv4Addr> {
        let held = self.nodes.remove(node).unwrap_or_default();
        for ip in &held {
            self.holders.remove(ip);
        }
        held
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Pool;
    use proptest::prelude::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn scaler_matches_the_documented_thresholds() {
        let s = Scaler::new(16, 50, 150, 110);
        assert_eq!((s.min_free(), s.max_free(), s.max_ip_count), (8, 24, 112));
        assert_eq!(s.target(0, 0), 16, "a node starts with one batch");
        assert_eq!(s.target(8, 16), 16, "8 free is enough");
        assert_eq!(s.target(9, 16), 32, "7 free: request another batch");
        assert_eq!(s.target(8, 32), 32, "24 free is not surplus yet");
        assert_eq!(s.target(7, 32), 16, "25 free: release a batch");
        assert_eq!(s.target(0, 32), 16, "never below one batch");
        assert_eq!(s.target(110, 112), 112, "capped at max pods");
        assert_eq!(s.target(100, 112), 112);
    }

    #[test]
    fn cloud_hands_out_batches_and_refuses_when_full() {
        let mut c = SubnetAllocator::new(net("10.225.0.0/27"));
        assert_eq!(c.capacity(), 30);
        let a = c.reconcile("a", 16, &BTreeSet::new());
        assert_eq!(a.added.len(), 16);
        assert_eq!(a.added[0], "10.225.0.1".parse::<Ipv4Addr>().unwrap());
        let b = c.reconcile("b", 16, &BTreeSet::new());
        assert!(b.exhausted);
        assert_eq!(b.assigned.len(), 14);
        assert!(a.assigned.is_disjoint(&b.assigned));
        // a gives back 4; b gets them only after asking again.
        let give: BTreeSet<Ipv4Addr> = a.assigned.iter().take(4).copied().collect();
        let a2 = c.reconcile("a", 12, &give);
        assert_eq!(a2.removed.len(), 4);
        let b2 = c.reconcile("b", 16, &BTreeSet::new());
        assert!(!b2.exhausted);
        assert_eq!(b2.assigned.len(), 16);
        // Releasing what a node does not hold takes nothing.
        let a3 = c.reconcile("a", 12, &b2.assigned);
        assert!(a3.removed.is_empty());
        assert_eq!(c.in_use(), 28);
    }

    #[test]
    fn restore_refuses_an_address_on_two_nodes() {
        let s: BTreeSet<Ipv4Addr> = ["10.225.0.5".parse().unwrap()].into();
        let err = SubnetAllocator::restore(net("10.225.0.0/24"), [("a", &s), ("b", &s)])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("10.225.0.5") && err.contains("a") && err.contains("b"),
            "{err}"
        );
        let c = SubnetAllocator::restore(net("10.225.0.0/24"), [("a", &s)]).unwrap();
        assert_eq!(c.holder("10.225.0.5".parse().unwrap()), Some("a"));
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// A pod is added on node n.
        Add(u8, u8),
        /// Pod k on node n is deleted.
        Del(u8, u8),
        /// Node n's agent restarts (its pool is reloaded from its saved form).
        Restart(u8),
        /// The cloud restarts (rebuilt from the nodes' assignments).
        CloudRestart,
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Nodes scaling with the batch policy against one cloud: no address is ever on two
        /// nodes or held by two pods, every pod's address is assigned to its node, and an
        /// address the cloud assigned is either held, free on its node, or being released.
        #[test]
        fn nodes_and_cloud_never_duplicate_or_leak(
            prefix in 24u8..=27,
            ops in proptest::collection::vec(prop_oneof![
                5 => (0u8..3, 0u8..60).prop_map(|(n, k)| Op::Add(n, k)),
                3 => (0u8..3, 0u8..60).prop_map(|(n, k)| Op::Del(n, k)),
                1 => (0u8..3).prop_map(Op::Restart),
                1 => Just(Op::CloudRestart),
            ], 1..200),
        ) {
            let subnet = Ipv4Net::new("10.225.0.0".parse().unwrap(), prefix).unwrap();
            let scaler = Scaler::new(16, 50, 150, 40);
            let mut cloud = SubnetAllocator::new(subnet);
            let mut pools: Vec<Pool<u8, ()>> = (0..3).map(|_| Pool::with_subnet(subnet, 40)).collect();
            let sync = |cloud: &mut SubnetAllocator, pool: &mut Pool<u8, ()>, node: &str| {
                // The agent's scaler, then the cloud, then the agent takes the new status.
                let held = pool.capacity_unbounded();
                let target = scaler.target(pool.used(), held);
                if target < held {
                    pool.mark_releasing((held - target) as usize);
                }
                let f = cloud.reconcile(node, target, pool.releasing());
                pool.set_addresses(f.assigned).unwrap();
            };
            for op in ops {
                match op {
                    Op::Add(n, k) => {
                        let name = format!("n{n}");
                        sync(&mut cloud, &mut pools[n as usize], &name);
                        let _ = pools[n as usize].allocate(k, ());
                        sync(&mut cloud, &mut pools[n as usize], &name);
                    }
                    Op::Del(n, k) => {
                        pools[n as usize].release(&k);
                        sync(&mut cloud, &mut pools[n as usize], &format!("n{n}"));
                    }
                    Op::Restart(n) => {
                        let json = serde_json::to_string(&pools[n as usize]).unwrap();
                        pools[n as usize] = serde_json::from_str(&json).unwrap();
                    }
                    Op::CloudRestart => {
                        let names: Vec<String> = (0..3).map(|n| format!("n{n}")).collect();
                        let sets: Vec<BTreeSet<Ipv4Addr>> = names.iter().map(|n| cloud.assigned(n)).collect();
                        cloud = SubnetAllocator::restore(subnet, names.iter().map(String::as_str).zip(sets.iter())).unwrap();
                    }
                }
                let mut seen: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();
                for (i, p) in pools.iter().enumerate() {
                    let assigned = cloud.assigned(&format!("n{i}"));
                    prop_assert_eq!(p.addresses().unwrap(), &assigned, "node and cloud disagree");
                    for ip in &assigned {
                        prop_assert!(seen.insert(*ip, i).is_none(), "{} on two nodes", ip);
                    }
                    for (_, l) in p.leases() {
                        prop_assert!(assigned.contains(&l.ip));
                        prop_assert!(!p.releasing().contains(&l.ip));
                    }
                    prop_assert!(p.used() <= 40);
                }
                prop_assert_eq!(seen.len() as u32, cloud.in_use(), "cloud holds an address no node has");
            }
        }
    }
}
