//! The compiled state as BPF map entries for one node, and the datapath's lookup over them.
//!
//! Maps (keyed so that one packet costs a constant number of lookups, whatever the number of
//! pods, identities or policies):
//! - ipcache (LPM, address -> identity): every pod, this node as `HOST`, other nodes as
//!   `REMOTE_NODE`; no match means `WORLD`.
//! - endpoint config (hash, endpoint address -> rule id of the isolating policy per direction,
//!   0 = not isolated).
//! - CIDR classes (LPM, (endpoint, direction, peer address) -> class): every ipBlock `cidr` and
//!   `except` of the endpoint's rules is a prefix; a prefix's class stands for exactly the
//!   ipBlock grants that match every address whose longest inserted prefix it is (class 0:
//!   none), so `except` needs no negative entries.
//! - policy (LPM over endpoint 32 | direction 8 | peer 32 | protocol 8 | port 16 bits -> rule
//!   id): a grant for every port is a 72-bit prefix, a protocol with all its ports 80 bits, a
//!   port range one aligned block per entry. Every entry allows, so any match allows.
//!
//! Lookup (first packet of a connection): not isolated -> allow; ingress from HOST -> allow;
//! policy[peer identity]; policy[ANY]; policy[CIDR class of the peer address]; else deny with
//! the isolating policy's rule id.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::compile::{Direction, EndpointPolicy, PeerMatch, PolicyState, PortSet};
use crate::identity::Identity;

/// Bits of the policy key's data.
pub const POLICY_KEY_BITS: u32 = 96;
const PEER_END: u32 = 72;
const PROTO_END: u32 = 80;

/// Policy LPM key data, byte order as the kernel compares it (network order, MSB first).
pub type PolicyKeyData = [u8; 12];
/// CIDR class LPM key data: endpoint (4) | direction (1) | peer address (4).
pub type CidrKeyData = [u8; 9];
pub const CIDR_KEY_PREFIX: u32 = 40;

pub fn policy_key(ep: Ipv4Addr, dir: Direction, peer: u32, proto: u8, port: u16) -> PolicyKeyData {
    let mut k = [0u8; 12];
    k[0..4].copy_from_slice(&ep.octets());
    k[4] = dir.as_u8();
    k[5..9].copy_from_slice(&peer.to_be_bytes());
    k[9] = proto;
    k[10..12].copy_from_slice(&port.to_be_bytes());
    k
}

pub fn cidr_key(ep: Ipv4Addr, dir: Direction, peer: Ipv4Addr) -> CidrKeyData {
    let mut k = [0u8; 9];
    k[0..4].copy_from_slice(&ep.octets());
    k[4] = dir.as_u8();
    k[5..9].copy_from_slice(&peer.octets());
    k
}

fn mask<const N: usize>(mut data: [u8; N], bits: u32) -> [u8; N] {
    for (i, b) in data.iter_mut().enumerate() {
        let start = i as u32 * 8;
        if start >= bits {
            *b = 0;
        } else if start + 8 > bits {
            *b &= 0xffu8 << (8 - (bits - start));
        }
    }
    data
}

/// An LPM trie as the kernel's BPF_MAP_TYPE_LPM_TRIE behaves (the longest matching prefix wins).
#[derive(Debug, Clone)]
pub struct Lpm<const N: usize> {
    entries: HashMap<(u32, [u8; N]), u32>,
    lens: BTreeSet<u32>,
}

impl<const N: usize> Default for Lpm<N> {
    fn default() -> Self {
        Lpm {
            entries: HashMap::new(),
            lens: BTreeSet::new(),
        }
    }
}

impl<const N: usize> Lpm<N> {
    /// Inserts unless the prefix is there already (the first writer keeps it).
    pub fn insert(&mut self, prefix_len: u32, data: [u8; N], value: u32) {
        self.lens.insert(prefix_len);
        self.entries
            .entry((prefix_len, mask(data, prefix_len)))
            .or_insert(value);
    }

    pub fn lookup(&self, data: [u8; N]) -> Option<u32> {
        self.lens
            .iter()
            .rev()
            .find_map(|len| self.entries.get(&(*len, mask(data, *len))).copied())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// (prefix length, data, value), sorted: what goes into the kernel map.
    pub fn entries(&self) -> Vec<(u32, [u8; N], u32)> {
        let mut v: Vec<_> = self
            .entries
            .iter()
            .map(|((l, d), v)| (*l, *d, *v))
            .collect();
        v.sort();
        v
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EndpointConfig {
    /// Rule id of the first policy isolating the endpoint per direction; 0: not isolated.
    pub ingress_deny_rule: u32,
    pub egress_deny_rule: u32,
}

/// One node's maps.
#[derive(Debug, Clone, Default)]
pub struct NodeMaps {
    pub ipcache: Lpm<4>,
    pub endpoints: BTreeMap<Ipv4Addr, EndpointConfig>,
    pub cidr_classes: Lpm<9>,
    pub policy: Lpm<12>,
}

/// Aligned power-of-two blocks covering `lo..=hi`: (start, prefix length within 16 bits).
pub fn port_blocks(lo: u16, hi: u16) -> Vec<(u16, u32)> {
    let (mut lo, hi) = (lo as u32, hi as u32);
    let mut out = Vec::new();
    while lo <= hi {
        let mut size = if lo == 0 {
            1 << 16
        } else {
            lo & lo.wrapping_neg()
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        out.push((lo as u16, 16 - size.trailing_zeros()));
        lo += size;
    }
    out
}

fn insert_ports(
    maps: &mut NodeMaps,
    ep: Ipv4Addr,
    dir: Direction,
    peer: u32,
    ports: &PortSet,
    rule: u32,
) {
    match ports {
        PortSet::All => maps
            .policy
            .insert(PEER_END, policy_key(ep, dir, peer, 0, 0), rule),
        PortSet::Ranges(rs) => {
            for r in rs {
                let proto = r.proto.number();
                if r.lo == 0 && r.hi == u16::MAX {
                    maps.policy
                        .insert(PROTO_END, policy_key(ep, dir, peer, proto, 0), rule);
                    continue;
                }
                for (start, len) in port_blocks(r.lo, r.hi) {
                    maps.policy.insert(
                        PROTO_END + len,
                        policy_key(ep, dir, peer, proto, start),
                        rule,
                    );
                }
            }
        }
    }
}

fn lower_direction(maps: &mut NodeMaps, ep: &EndpointPolicy, dir: Direction, next_class: &mut u32) {
    let dp = ep.direction(dir);
    if !dp.is_isolated() {
        return;
    }
    let mut prefixes: BTreeSet<Ipv4Net> = BTreeSet::new();
    for g in &dp.grants {
        match &g.peer {
            PeerMatch::Any => insert_ports(maps, ep.ip, dir, Identity::ANY.0, &g.ports, g.rule),
            PeerMatch::Identity(id) => insert_ports(maps, ep.ip, dir, id.0, &g.ports, g.rule),
            PeerMatch::Cidr { cidr, except } => {
                prefixes.insert(*cidr);
                prefixes.extend(except.iter().copied());
            }
        }
    }
    // A class per inserted prefix: the grants covering the whole prefix (see module docs).
    for p in prefixes {
        let members: Vec<usize> = dp
            .grants
            .iter()
            .enumerate()
            .filter(|(_, g)| match &g.peer {
                PeerMatch::Cidr { cidr, except } => {
                    cidr.contains(&p) && !except.iter().any(|e| e.contains(&p))
                }
                _ => false,
            })
            .map(|(i, _)| i)
            .collect();
        let class = if members.is_empty() {
            0
        } else {
            *next_class += 1;
            *next_class
        };
        maps.cidr_classes.insert(
            CIDR_KEY_PREFIX + p.prefix_len() as u32,
            cidr_key(ep.ip, dir, p.network()),
            class,
        );
        for i in members {
            let g = &dp.grants[i];
            insert_ports(maps, ep.ip, dir, class, &g.ports, g.rule);
        }
    }
}

/// The entries of one endpoint (its config, CIDR classes and allow rules; no ipcache). Every
/// key starts with the endpoint's address and its CIDR classes are numbered on their own, so
/// a node's maps are the union of its endpoints' and an endpoint whose policy did not change
/// keeps exactly the same entries.
pub fn lower_endpoint(ep: &EndpointPolicy) -> NodeMaps {
    let mut maps = NodeMaps::default();
    add_endpoint(&mut maps, ep);
    maps
}

fn add_endpoint(maps: &mut NodeMaps, ep: &EndpointPolicy) {
    maps.endpoints.insert(
        ep.ip,
        EndpointConfig {
            ingress_deny_rule: ep.ingress.isolated_by.first().copied().unwrap_or(0),
            egress_deny_rule: ep.egress.isolated_by.first().copied().unwrap_or(0),
        },
    );
    // Classes are scoped by the (endpoint, direction) in both keys, so numbering them per
    // endpoint is enough and keeps one endpoint's change from renumbering the others.
    let mut next_class = Identity::FIRST_CIDR_CLASS;
    lower_direction(maps, ep, Direction::Ingress, &mut next_class);
    lower_direction(maps, ep, Direction::Egress, &mut next_class);
}

impl PolicyState {
    /// The maps of `node`: its endpoints' policies and the cluster-wide ipcache.
    pub fn lower(&self, node: &str) -> NodeMaps {
        let mut maps = NodeMaps {
            ipcache: self.lower_ipcache(node),
            ..NodeMaps::default()
        };
        for ep in self.endpoints.values().filter(|e| e.node == node) {
            add_endpoint(&mut maps, ep);
        }
        maps
    }

    /// The ipcache of `node`: every pod, this node as `HOST`, the others as `REMOTE_NODE`.
    pub fn lower_ipcache(&self, node: &str) -> Lpm<4> {
        let mut maps = NodeMaps::default();
        for (ip, id) in &self.pod_identities {
            maps.ipcache.insert(32, ip.octets(), id.0);
        }
        for (name, addrs) in &self.nodes {
            let id = if name == node {
                Identity::HOST
            } else {
                Identity::REMOTE_NODE
            };
            for a in addrs {
                maps.ipcache.insert(32, a.octets(), id.0);
            }
        }
        maps.ipcache
    }
}

/// What the datapath decided: allowed (with the rule; 0 when not isolated or from the host) or
/// denied (with the isolating policy's rule id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapVerdict {
    pub allowed: bool,
    pub rule: u32,
}

impl NodeMaps {
    /// The BPF program's lookup, step by step.
    pub fn lookup(
        &self,
        ep: Ipv4Addr,
        dir: Direction,
        peer: Ipv4Addr,
        proto: u8,
        port: u16,
    ) -> MapVerdict {
        let allow = |rule| MapVerdict {
            allowed: true,
            rule,
        };
        let Some(cfg) = self.endpoints.get(&ep) else {
            return allow(0);
        };
        let deny_rule = match dir {
            Direction::Ingress => cfg.ingress_deny_rule,
            Direction::Egress => cfg.egress_deny_rule,
        };
        if deny_rule == 0 {
            return allow(0);
        }
        let identity = self
            .ipcache
            .lookup(peer.octets())
            .unwrap_or(Identity::WORLD.0);
        if dir == Direction::Ingress && identity == Identity::HOST.0 {
            return allow(0);
        }
        for peer_key in [identity, Identity::ANY.0] {
            if let Some(rule) = self
                .policy
                .lookup(policy_key(ep, dir, peer_key, proto, port))
            {
                return allow(rule);
            }
        }
        if let Some(class) = self
            .cidr_classes
            .lookup(cidr_key(ep, dir, peer))
            .filter(|c| *c != 0)
            && let Some(rule) = self.policy.lookup(policy_key(ep, dir, class, proto, port))
        {
            return allow(rule);
        }
        MapVerdict {
            allowed: false,
            rule: deny_rule,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn port_blocks_cover_exactly(lo in any::<u16>(), len in 0u32..70000) {
            let hi = (lo as u32 + len).min(65535) as u16;
            let blocks = port_blocks(lo, hi);
            let mut covered = 0u32;
            let mut next = lo as u32;
            for (start, plen) in &blocks {
                prop_assert_eq!(*start as u32, next, "contiguous");
                let size = 1u32 << (16 - plen);
                prop_assert_eq!(*start as u32 % size, 0, "aligned");
                next += size;
                covered += size;
            }
            prop_assert_eq!(covered, hi as u32 - lo as u32 + 1);
            prop_assert!(blocks.len() <= 32);
        }
    }

    #[test]
    fn lpm_longest_prefix_wins() {
        let mut l = Lpm::<4>::default();
        l.insert(8, [10, 0, 0, 0], 1);
        l.insert(24, [10, 1, 2, 99], 2);
        assert_eq!(l.lookup([10, 1, 2, 3]), Some(2));
        assert_eq!(l.lookup([10, 1, 3, 3]), Some(1));
        assert_eq!(l.lookup([11, 1, 3, 3]), None);
        assert_eq!(port_blocks(0, 65535), vec![(0, 0)]);
        assert_eq!(port_blocks(80, 81), vec![(80, 15)]);
        assert_eq!(port_blocks(81, 82), vec![(81, 16), (82, 16)]);
    }
}
