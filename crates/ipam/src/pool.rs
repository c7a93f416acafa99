//! The pure allocator for one node's pod block.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One allocated address and the data its owner keeps with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease<V> {
    pub ip: Ipv4Addr,
    pub owner: V,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("no pod block is assigned to this node yet: wait until the node's spec.podCIDR is set")]
    NoBlock,
    #[error(
        "pod block {block} is exhausted: {used} addresses in use, limit {limit} (max pods {max_pods}); \
         delete pods on this node or raise --max-pods"
    )]
    Exhausted {
        block: Ipv4Net,
        used: u32,
        limit: u32,
        max_pods: u32,
    },
    #[error(
        "cannot change the pod block from {current} to {requested}: {in_use} addresses are still \
         allocated from {current}; delete the pods on this node first"
    )]
    BlockInUse {
        current: Ipv4Net,
        requested: Ipv4Net,
        in_use: u32,
    },
    #[error(
        "no free address on this node: {assigned} assigned by the cloud, {used} in use, \
         {releasing} being released; more have been requested"
    )]
    NoAddresses {
        assigned: u32,
        used: u32,
        releasing: u32,
    },
    #[error(
        "address {ip} is in use by a pod but the cloud no longer assigns it to this node; \
         keeping it until the pod is deleted"
    )]
    AssignedAddressInUse { ip: Ipv4Addr },
    #[error("address {ip} is not a usable address of {block}")]
    OutsideBlock { ip: Ipv4Addr, block: Ipv4Net },
    #[error("invalid IPAM state: {0}")]
    Invalid(String),
}

/// Addresses of `block` that can be given to pods: all but the network and broadcast
/// addresses (a /31 or /32 has neither, RFC 3021).
fn host_range(block: Ipv4Net) -> (u32, u32) {
    let first = u32::from(block.network());
    let last = u32::from(block.broadcast());
    if block.prefix_len() <= 30 {
        (first + 1, last - 1)
    } else {
        (first, last)
    }
}

fn is_host(block: Ipv4Net, ip: Ipv4Addr) -> bool {
    let (first, last) = host_range(block);
    (first..=last).contains(&u32::from(ip))
}

/// A node's pod block with its allocations, keyed by attachment `K`, each carrying owner data
/// `V`. Allocation is idempotent per key and walks the block round-robin from the last address
/// handed out, so a just-freed address is the last one to be reused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool<K: Ord, V> {
    block: Option<Ipv4Net>,
    max_allocations: u32,
    leases: BTreeMap<K, Lease<V>>,
    /// Reverse index: which key holds an address.
    holders: BTreeMap<Ipv4Addr, K>,
    /// The last address handed out; the next search starts after it.
    cursor: Option<Ipv4Addr>,
    /// VNet mode: the addresses the cloud assigned to this node (all inside `block`, the pod
    /// subnet). None: every host address of the block (overlay mode).
    addresses: Option<BTreeSet<Ipv4Addr>>,
    /// VNet mode: assigned addresses this node is giving back; never allocated again.
    releasing: BTreeSet<Ipv4Addr>,
}

impl<K: Ord + Clone, V> Pool<K, V> {
    /// An empty pool without a block (the node's block is not known yet).
    pub fn new(max_allocations: u32) -> Self {
        Self {
            block: None,
            max_allocations,
            leases: BTreeMap::new(),
            holders: BTreeMap::new(),
            cursor: None,
            addresses: None,
            releasing: BTreeSet::new(),
        }
    }

    /// A VNet-mode pool: addresses come from `subnet`, but only those the cloud assigned
    /// (none yet).
    pub fn with_subnet(subnet: Ipv4Net, max_allocations: u32) -> Self {
        let mut pool = Self::with_block(subnet, max_allocations);
        pool.addresses = Some(BTreeSet::new());
        pool
    }

    /// VNet mode: the assigned addresses (None in overlay mode).
    pub fn addresses(&self) -> Option<&BTreeSet<Ipv4Addr>> {
        self.addresses.as_ref()
    }

    pub fn releasing(&self) -> &BTreeSet<Ipv4Addr> {
        &self.releasing
    }

    /// VNet mode: replaces the set of assigned addresses with what the cloud says. Addresses
    /// still held by a pod are never dropped (the cloud only takes back what was released;
    /// anything else is an error, and the held address is kept). Releasing addresses the
    /// cloud took back are forgotten. Returns whether anything changed.
    pub fn set_addresses(&mut self, assigned: BTreeSet<Ipv4Addr>) -> Result<bool, PoolError> {
        let block = self.block.ok_or(PoolError::NoBlock)?;
        if let Some(ip) = assigned.iter().find(|ip| !is_host(block, **ip)) {
            return Err(PoolError::OutsideBlock { ip: *ip, block });
        }
        if let Some(ip) = self.holders.keys().find(|ip| !assigned.contains(ip)) {
            return Err(PoolError::AssignedAddressInUse { ip: *ip });
        }
        let releasing: BTreeSet<Ipv4Addr> =
            self.releasing.intersection(&assigned).copied().collect();
        let changed = self.addresses.as_ref() != Some(&assigned) || releasing != self.releasing;
        self.addresses = Some(assigned);
        self.releasing = releasing;
        Ok(changed)
    }

    /// VNet mode: marks up to `n` free addresses (highest first) as being released; returns
    /// them. They are never allocated again.
    pub fn mark_releasing(&mut self, n: usize) -> Vec<Ipv4Addr> {
        let Some(addresses) = &self.addresses else {
            return Vec::new();
        };
        let picked: Vec<Ipv4Addr> = addresses
            .iter()
            .rev()
            .filter(|ip| !self.holders.contains_key(ip) && !self.releasing.contains(ip))
            .take(n)
            .copied()
            .collect();
        self.releasing.extend(picked.iter().copied());
        picked
    }

    /// VNet mode with addresses assigned in aligned CIDR batches of `prefix_len` (Kubernetes
    /// mode: the cluster pool hands out whole batches and takes back only whole batches):
    /// marks the addresses of whole batches as being released, highest batch first, taking a
    /// batch only when none of its addresses is held or already releasing and it fits in the
    /// `n` addresses to give back. Returns them.
    pub fn mark_releasing_batches(&mut self, n: usize, prefix_len: u8) -> Vec<Ipv4Addr> {
        let Some(addresses) = &self.addresses else {
            return Vec::new();
        };
        let mut batches: BTreeMap<Ipv4Net, Vec<Ipv4Addr>> = BTreeMap::new();
        for ip in addresses {
            if let Ok(net) = Ipv4Net::new(*ip, prefix_len.min(32)) {
                batches.entry(net.trunc()).or_default().push(*ip);
            }
        }
        let mut picked = Vec::new();
        for ips in batches.values().rev() {
            let whole = ips
                .iter()
                .all(|ip| !self.holders.contains_key(ip) && !self.releasing.contains(ip));
            if whole && picked.len() + ips.len() <= n {
                picked.extend(ips.iter().copied());
            }
        }
        self.releasing.extend(picked.iter().copied());
        picked
    }

    /// VNet mode: assigned addresses not being released, whatever the max-pods limit.
    pub fn capacity_unbounded(&self) -> u32 {
        u32::try_from(self.available()).unwrap_or(u32::MAX)
    }

    /// Addresses this pool can hand out: assigned (or the block's hosts) minus releasing.
    fn available(&self) -> u64 {
        match (&self.addresses, self.block) {
            (_, None) => 0,
            (Some(set), Some(_)) => (set.len() - self.releasing.len()) as u64,
            (None, Some(block)) => {
                let (first, last) = host_range(block);
                u64::from(last - first) + 1
            }
        }
    }

    pub fn with_block(block: Ipv4Net, max_allocations: u32) -> Self {
        let mut pool = Self::new(max_allocations);
        pool.block = Some(block.trunc());
        pool
    }

    pub fn block(&self) -> Option<Ipv4Net> {
        self.block
    }

    pub fn max_allocations(&self) -> u32 {
        self.max_allocations
    }

    /// Changes the limit; existing allocations above a lowered limit are kept (no new ones are
    /// made until enough are released).
    pub fn set_max_allocations(&mut self, max: u32) {
        self.max_allocations = max;
    }

    /// Sets the block. Returns whether it changed. A different block is refused while any
    /// address of the current one is allocated.
    pub fn set_block(&mut self, block: Ipv4Net) -> Result<bool, PoolError> {
        let block = block.trunc();
        match self.block {
            Some(current) if current == block => Ok(false),
            Some(current) if !self.leases.is_empty() || self.addresses.is_some() => {
                Err(PoolError::BlockInUse {
                    current,
                    requested: block,
                    in_use: self.used(),
                })
            }
            _ => {
                self.block = Some(block);
                self.cursor = None;
                Ok(true)
            }
        }
    }

    /// How many addresses can be allocated at once: the max-pods limit or the block's usable
    /// addresses, whichever is smaller; 0 without a block.
    pub fn capacity(&self) -> u32 {
        u32::try_from(self.available().min(u64::from(self.max_allocations))).unwrap_or(u32::MAX)
    }

    pub fn used(&self) -> u32 {
        u32::try_from(self.leases.len()).unwrap_or(u32::MAX)
    }

    pub fn free(&self) -> u32 {
        self.capacity().saturating_sub(self.used())
    }

    pub fn get(&self, key: &K) -> Option<&Lease<V>> {
        self.leases.get(key)
    }

    /// The owner data of an allocation, to update it (e.g. once the endpoint is attached).
    pub fn owner_mut(&mut self, key: &K) -> Option<&mut V> {
        self.leases.get_mut(key).map(|l| &mut l.owner)
    }

    pub fn holder(&self, ip: Ipv4Addr) -> Option<&K> {
        self.holders.get(&ip)
    }

    pub fn leases(&self) -> impl Iterator<Item = (&K, &Lease<V>)> {
        self.leases.iter()
    }

    /// The address for `key`: the one it already holds (its owner data is left as is), or the
    /// next free one after the cursor. Returns the address and whether it is new.
    pub fn allocate(&mut self, key: K, owner: V) -> Result<(Ipv4Addr, bool), PoolError> {
        if let Some(lease) = self.leases.get(&key) {
            return Ok((lease.ip, false));
        }
        let block = self.block.ok_or(PoolError::NoBlock)?;
        let exhausted = || PoolError::Exhausted {
            block,
            used: self.used(),
            limit: self.capacity(),
            max_pods: self.max_allocations,
        };
        if self.used() >= self.capacity() {
            if let Some(set) = &self.addresses
                && self.used() < self.max_allocations
            {
                return Err(PoolError::NoAddresses {
                    assigned: u32::try_from(set.len()).unwrap_or(u32::MAX),
                    used: self.used(),
                    releasing: u32::try_from(self.releasing.len()).unwrap_or(u32::MAX),
                });
            }
            return Err(exhausted());
        }
        if let Some(set) = &self.addresses {
            // Round-robin over the assigned set: after the cursor, then wrap.
            let after = match self.cursor {
                Some(c) => set.range((std::ops::Bound::Excluded(c), std::ops::Bound::Unbounded)),
                None => set.range(..),
            };
            let ip = after
                .chain(set.iter())
                .find(|ip| !self.holders.contains_key(ip) && !self.releasing.contains(ip))
                .copied()
                .ok_or_else(exhausted)?;
            self.holders.insert(ip, key.clone());
            self.leases.insert(key, Lease { ip, owner });
            self.cursor = Some(ip);
            return Ok((ip, true));
        }
        let (first, last) = host_range(block);
        let start = match self.cursor {
            Some(c) if is_host(block, c) && u32::from(c) < last => u32::from(c) + 1,
            _ => first,
        };
        // At most used()+1 steps: there is a free address and every step past a used one is
        // either free or one of the `used` addresses.
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
            if candidate == start {
                return Err(exhausted());
            }
        };
        self.holders.insert(ip, key.clone());
        self.leases.insert(key, Lease { ip, owner });
        self.cursor = Some(ip);
        Ok((ip, true))
    }

    /// Frees `key`'s address. An unknown key is not an error: nothing changes.
    pub fn release(&mut self, key: &K) -> Option<Lease<V>> {
        let lease = self.leases.remove(key)?;
        self.holders.remove(&lease.ip);
        Some(lease)
    }

    /// Releases every allocation whose key `keep` rejects; returns what was released.
    pub fn gc(&mut self, keep: impl Fn(&K) -> bool) -> Vec<(K, Lease<V>)> {
        let stale: Vec<K> = self.leases.keys().filter(|k| !keep(k)).cloned().collect();
        stale
            .into_iter()
            .filter_map(|k| self.release(&k).map(|l| (k, l)))
            .collect()
    }
}

/// The on-disk shape: map keys of JSON objects must be strings, so leases are a list.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PoolRepr<K, V> {
    version: u32,
    block: Option<Ipv4Net>,
    max_allocations: u32,
    cursor: Option<Ipv4Addr>,
    leases: Vec<LeaseRepr<K, V>>,
    #[serde(default)]
    addresses: Option<BTreeSet<Ipv4Addr>>,
    #[serde(default)]
    releasing: BTreeSet<Ipv4Addr>,
}

#[derive(Serialize, Deserialize)]
struct LeaseRepr<K, V> {
    key: K,
    ip: Ipv4Addr,
    owner: V,
}

const FORMAT_VERSION: u32 = 1;

impl<K: Ord + Clone + Serialize, V: Serialize> Serialize for Pool<K, V> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Out<'a, K, V> {
            version: u32,
            block: Option<Ipv4Net>,
            max_allocations: u32,
            cursor: Option<Ipv4Addr>,
            leases: Vec<LeaseRef<'a, K, V>>,
            #[serde(skip_serializing_if = "Option::is_none")]
            addresses: Option<&'a BTreeSet<Ipv4Addr>>,
            #[serde(skip_serializing_if = "BTreeSet::is_empty")]
            releasing: &'a BTreeSet<Ipv4Addr>,
        }
        #[derive(Serialize)]
        struct LeaseRef<'a, K, V> {
            key: &'a K,
            ip: Ipv4Addr,
            owner: &'a V,
        }
        Out {
            version: FORMAT_VERSION,
            block: self.block,
            max_allocations: self.max_allocations,
            cursor: self.cursor,
            leases: self
                .leases
                .iter()
                .map(|(key, l)| LeaseRef {
                    key,
                    ip: l.ip,
                    owner: &l.owner,
                })
                .collect(),
            addresses: self.addresses.as_ref(),
            releasing: &self.releasing,
        }
        .serialize(s)
    }
}

impl<'de, K, V> Deserialize<'de> for Pool<K, V>
where
    K: Ord + Clone + DeserializeOwned + std::fmt::Debug,
    V: DeserializeOwned,
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let repr = PoolRepr::<K, V>::deserialize(d)?;
        Pool::try_from(repr).map_err(serde::de::Error::custom)
    }
}

impl<K: Ord + Clone + std::fmt::Debug, V> TryFrom<PoolRepr<K, V>> for Pool<K, V> {
    type Error = PoolError;

    /// Rebuilds a pool from its saved form, refusing anything that breaks an invariant (an
    /// address twice, a key twice, an address outside the block) rather than guessing.
    fn try_from(r: PoolRepr<K, V>) -> Result<Self, PoolError> {
        if r.version != FORMAT_VERSION {
            return Err(PoolError::Invalid(format!(
                "unsupported format version {} (this agent reads version {FORMAT_VERSION})",
                r.version
            )));
        }
        let mut pool = Pool::new(r.max_allocations);
        pool.block = r.block.map(|b| b.trunc());
        pool.cursor = r.cursor;
        if let Some(set) = &r.addresses {
            let Some(block) = pool.block else {
                return Err(PoolError::Invalid(
                    "assigned addresses but no subnet".into(),
                ));
            };
            if let Some(ip) = set.iter().find(|ip| !is_host(block, **ip)) {
                return Err(PoolError::Invalid(format!(
                    "assigned address {ip} is not a usable address of {block}"
                )));
            }
            if let Some(ip) = r.releasing.iter().find(|ip| !set.contains(ip)) {
                return Err(PoolError::Invalid(format!(
                    "address {ip} is being released but is not assigned"
                )));
            }
        } else if !r.releasing.is_empty() {
            return Err(PoolError::Invalid(
                "addresses are being released but none are assigned".into(),
            ));
        }
        pool.addresses = r.addresses;
        pool.releasing = r.releasing;
        for l in r.leases {
            let Some(block) = pool.block else {
                return Err(PoolError::Invalid(format!(
                    "address {} is allocated but no block is set",
                    l.ip
                )));
            };
            if !is_host(block, l.ip) {
                return Err(PoolError::Invalid(format!(
                    "address {} is not a usable address of block {block}",
                    l.ip
                )));
            }
            if let Some(set) = &pool.addresses
                && (!set.contains(&l.ip) || pool.releasing.contains(&l.ip))
            {
                return Err(PoolError::Invalid(format!(
                    "address {} is allocated but not assigned to this node (or being released)",
                    l.ip
                )));
            }
            if let Some(other) = pool.holders.get(&l.ip) {
                return Err(PoolError::Invalid(format!(
                    "address {} is allocated twice ({other:?} and {:?})",
                    l.ip, l.key
                )));
            }
            if pool.leases.contains_key(&l.key) {
                return Err(PoolError::Invalid(format!(
                    "key {:?} holds more than one address",
                    l.key
                )));
            }
            pool.holders.insert(l.ip, l.key.clone());
            pool.leases.insert(
                l.key,
                Lease {
                    ip: l.ip,
                    owner: l.owner,
                },
            );
        }
        Ok(pool)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn batches_are_released_whole_and_only_when_unused() {
        // Three /28 batches of 10.241.0.0/24 (the first without the pool's network address).
        let mut p: Pool<u32, ()> = Pool::with_subnet(net("10.241.0.0/24"), 100);
        let assigned: BTreeSet<Ipv4Addr> = (1..48u32)
            .map(|i| Ipv4Addr::from(u32::from(ip("10.241.0.0")) + i))
            .collect();
        p.set_addresses(assigned).unwrap();
        // A pod in the top batch keeps it; the middle one can go, the edge one (15) too.
        let mut k = 10;
        let top = loop {
            let (a, _) = p.allocate(k, ()).unwrap();
            if u32::from(a) >= u32::from(ip("10.241.0.32")) {
                break a;
            }
            k += 1;
        };
        for key in 10..k {
            p.release(&key);
        }
        let got = p.mark_releasing_batches(16, 28);
        assert_eq!(got.len(), 16, "{got:?}");
        assert!(
            got.iter().all(|a| net("10.241.0.16/28").contains(a)),
            "{got:?}"
        );
        assert!(!got.contains(&top));
        // Less than a whole batch to give back: nothing.
        assert!(p.mark_releasing_batches(14, 28).is_empty());
        // The edge batch has 15 addresses: it fits in 15.
        let edge = p.mark_releasing_batches(15, 28);
        assert_eq!(edge.len(), 15);
        assert!(edge.iter().all(|a| net("10.241.0.0/28").contains(a)));
        // Releasing addresses are never handed out again.
        assert_eq!(p.capacity_unbounded(), 16);
    }

    #[test]
    fn first_allocation_skips_network_address() {
        let mut p: Pool<u32, ()> = Pool::with_block(net("10.244.1.0/24"), 250);
        assert_eq!(p.allocate(1, ()).unwrap(), (ip("10.244.1.1"), true));
        assert_eq!(p.allocate(2, ()).unwrap(), (ip("10.244.1.2"), true));
    }

    #[test]
    fn same_key_gets_same_address_and_keeps_owner() {
        let mut p: Pool<&str, u8> = Pool::with_block(net("10.244.1.0/24"), 250);
        let (a, fresh) = p.allocate("a", 1).unwrap();
        assert!(fresh);
        assert_eq!(p.allocate("a", 2).unwrap(), (a, false));
        assert_eq!(p.get(&"a").unwrap().owner, 1);
        assert_eq!(p.used(), 1);
    }

    #[test]
    fn freed_address_is_not_reused_immediately() {
        let mut p: Pool<u32, ()> = Pool::with_block(net("10.244.1.0/24"), 250);
        let (a, _) = p.allocate(1, ()).unwrap();
        p.release(&1);
        let (b, _) = p.allocate(2, ()).unwrap();
        assert_ne!(a, b);
        assert_eq!(b, ip("10.244.1.2"));
    }

    #[test]
    fn wraps_around_and_never_hands_out_broadcast() {
        let mut p: Pool<u32, ()> = Pool::with_block(net("10.0.0.0/29"), 250);
        assert_eq!(p.capacity(), 6);
        let all: Vec<_> = (0..6).map(|k| p.allocate(k, ()).unwrap().0).collect();
        assert_eq!(all.last(), Some(&ip("10.0.0.6")));
        assert!(!all.contains(&ip("10.0.0.0")) && !all.contains(&ip("10.0.0.7")));
        p.release(&2); // 10.0.0.3
        assert_eq!(p.allocate(10, ()).unwrap().0, ip("10.0.0.3"));
    }

    #[test]
    fn exhaustion_names_block_and_limit() {
        let mut p: Pool<u32, ()> = Pool::with_block(net("10.244.7.0/24"), 3);
        for k in 0..3 {
            p.allocate(k, ()).unwrap();
        }
        let err = p.allocate(3, ()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("10.244.7.0/24") && msg.contains("max pods 3"),
            "{msg}"
        );
        assert_eq!(p.free(), 0);
    }

    #[test]
    fn max_pods_default_bounds_a_24_below_its_254_hosts() {
        let mut p: Pool<u32, ()> = Pool::with_block(net("10.244.0.0/24"), crate::DEFAULT_MAX_PODS);
        assert_eq!(p.capacity(), 250);
        for k in 0..250 {
            p.allocate(k, ()).unwrap();
        }
        assert!(matches!(
            p.allocate(250, ()),
            Err(PoolError::Exhausted { .. })
        ));
    }

    #[test]
    fn no_block_means_not_ready() {
        let mut p: Pool<u32, ()> = Pool::new(250);
        assert_eq!(p.allocate(1, ()), Err(PoolError::NoBlock));
        assert_eq!(p.capacity(), 0);
    }

    #[test]
    fn block_change_refused_while_in_use() {
        let mut p: Pool<u32, ()> = Pool::with_block(net("10.244.1.0/24"), 250);
        assert_eq!(p.set_block(net("10.244.1.0/24")), Ok(false));
        p.allocate(1, ()).unwrap();
        assert!(matches!(
            p.set_block(net("10.244.2.0/24")),
            Err(PoolError::BlockInUse { .. })
        ));
        p.release(&1);
        assert_eq!(p.set_block(net("10.244.2.0/24")), Ok(true));
        assert_eq!(p.allocate(2, ()).unwrap().0, ip("10.244.2.1"));
    }

    #[test]
    fn release_unknown_is_noop_and_gc_returns_released() {
        let mut p: Pool<u32, ()> = Pool::with_block(net("10.244.1.0/24"), 250);
        assert!(p.release(&9).is_none());
        for k in 0..4 {
            p.allocate(k, ()).unwrap();
        }
        let released: Vec<u32> = p.gc(|k| k % 2 == 0).into_iter().map(|(k, _)| k).collect();
        assert_eq!(released, vec![1, 3]);
        assert_eq!(p.used(), 2);
    }

    #[test]
    fn loading_rejects_duplicates_and_foreign_addresses() {
        let dup = r#"{"version":1,"block":"10.0.0.0/24","maxAllocations":250,"cursor":null,
            "leases":[{"key":1,"ip":"10.0.0.5","owner":null},{"key":2,"ip":"10.0.0.5","owner":null}]}"#;
        let e = serde_json::from_str::<Pool<u32, ()>>(dup).unwrap_err();
        assert!(e.to_string().contains("allocated twice"), "{e}");
        let foreign = r#"{"version":1,"block":"10.0.0.0/24","maxAllocations":250,"cursor":null,
            "leases":[{"key":1,"ip":"10.0.1.5","owner":null}]}"#;
        assert!(serde_json::from_str::<Pool<u32, ()>>(foreign).is_err());
        let bcast = r#"{"version":1,"block":"10.0.0.0/24","maxAllocations":250,"cursor":null,
            "leases":[{"key":1,"ip":"10.0.0.255","owner":null}]}"#;
        assert!(serde_json::from_str::<Pool<u32, ()>>(bcast).is_err());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Allocate(u8),
        Release(u8),
        Gc(BTreeSet<u8>),
        Restart,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..40).prop_map(Op::Allocate),
            2 => (0u8..40).prop_map(Op::Release),
            1 => proptest::collection::btree_set(0u8..40, 0..20).prop_map(Op::Gc),
            1 => Just(Op::Restart),
        ]
    }

    /// The invariants every reachable state keeps.
    fn check(p: &Pool<u8, u8>) {
        let ips: BTreeSet<Ipv4Addr> = p.leases().map(|(_, l)| l.ip).collect();
        assert_eq!(ips.len(), p.leases().count(), "an address is held twice");
        for (k, l) in p.leases() {
            assert_eq!(p.holder(l.ip), Some(k));
            assert_eq!(l.owner, *k, "owner data drifted");
            assert!(is_host(p.block().unwrap(), l.ip));
        }
        assert_eq!(p.holders.len(), p.leases.len());
        assert_eq!(p.free() + p.used(), p.capacity());
    }

    proptest! {
        #[test]
        fn random_operations_keep_invariants(
            prefix in 26u8..=30,
            max in 1u32..80,
            ops in proptest::collection::vec(op(), 1..120),
        ) {
            let block = Ipv4Net::new(ip("10.244.3.0"), prefix).unwrap();
            let mut p: Pool<u8, u8> = Pool::with_block(block, max);
            for op in ops {
                match op {
                    Op::Allocate(k) => {
                        let before = p.get(&k).map(|l| l.ip);
                        let last_freed_guard = p.used() < p.capacity();
                        match p.allocate(k, k) {
                            Ok((ip, fresh)) => {
                                prop_assert_eq!(fresh, before.is_none());
                                if let Some(b) = before { prop_assert_eq!(ip, b); }
                            }
                            Err(PoolError::Exhausted { .. }) => prop_assert!(!last_freed_guard),
                            Err(e) => prop_assert!(false, "unexpected {e}"),
                        }
                    }
                    Op::Release(k) => {
                        let had = p.get(&k).is_some();
                        prop_assert_eq!(p.release(&k).is_some(), had);
                        prop_assert!(p.get(&k).is_none());
                    }
                    Op::Gc(valid) => {
                        let released = p.gc(|k| valid.contains(k));
                        for (k, _) in &released { prop_assert!(!valid.contains(k)); }
                        for (k, _) in p.leases() { prop_assert!(valid.contains(k)); }
                    }
                    Op::Restart => {
                        let json = serde_json::to_string(&p).unwrap();
                        let back: Pool<u8, u8> = serde_json::from_str(&json).unwrap();
                        prop_assert_eq!(&back, &p);
                        p = back;
                    }
                }
                check(&p);
            }
        }

        /// Round-robin: after freeing an address, it comes back only once every other free
        /// address has been handed out.
        #[test]
        fn freed_address_comes_back_last(prefix in 27u8..=30, n in 1usize..6) {
            let block = Ipv4Net::new(ip("10.1.0.0"), prefix).unwrap();
            let mut p: Pool<u32, ()> = Pool::with_block(block, 1000);
            let cap = p.capacity() as usize;
            let n = n.min(cap);
            for k in 0..n as u32 { p.allocate(k, ()).unwrap(); }
            let freed = p.release(&0).unwrap().ip;
            let mut k = 100;
            while p.free() > 1 {
                prop_assert_ne!(p.allocate(k, ()).unwrap().0, freed);
                k += 1;
            }
            prop_assert_eq!(p.allocate(k, ()).unwrap().0, freed);
        }
    }
}
