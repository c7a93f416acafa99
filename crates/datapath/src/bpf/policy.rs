//! The NetworkPolicy maps: what crates/policy lowers a node's compiled state to (keys arrive as
//! the bytes the kernel compares), the generation that makes tracked connections be judged
//! again, and the policy conntrack table for inspection.

use std::net::{Ipv4Addr, SocketAddrV4};

use aya::maps::lpm_trie::Key as LpmKey;
use aya::maps::{Array, HashMap, LpmTrie, MapData};

use super::abi::{
    POL_CT_A_INITIATED, POL_CT_CLOSING, POL_CT_DENIED, RawConfig, RawNatKey, RawPolCt,
    RawPolEndpoint, addr_from_raw, addr_to_raw, port_from_raw,
};
use super::{
    Datapath, DatapathError, MAP_CONFIG, MAP_POL_CIDR, MAP_POL_CT, MAP_POL_ENDPOINTS,
    MAP_POL_IPCACHE, MAP_POLICY, MAP_POLICY_EXACT, ignore_missing, map_op_err,
};

/// Data bytes of a `ferrum_policy` key: endpoint (4) | direction (1) | peer (4) | protocol (1)
/// | port (2), network order.
pub const POLICY_KEY_LEN: usize = 12;
/// Data bytes of a `ferrum_pol_cidr` key: endpoint (4) | direction (1) | peer address (4).
pub const POLICY_CIDR_KEY_LEN: usize = 9;

/// The rule ids of the policies isolating a local endpoint (0: not isolated).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyEndpoint {
    pub ingress_deny_rule: u32,
    pub egress_deny_rule: u32,
}

/// Everything in the four policy maps, as (prefix length, key data, value).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyMapsDump {
    pub endpoints: Vec<(Ipv4Addr, PolicyEndpoint)>,
    pub identities: Vec<(u32, [u8; 4], u32)>,
    pub cidr_classes: Vec<(u32, [u8; POLICY_CIDR_KEY_LEN], u32)>,
    pub rules: Vec<(u32, [u8; POLICY_KEY_LEN], u32)>,
}

/// One connection the policy stage tracks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyConntrack {
    pub proto: u8,
    /// The side that opened the connection, and the other.
    pub initiator: SocketAddrV4,
    pub responder: SocketAddrV4,
    /// The address policy judged the initiator by (differs after hairpin or masquerade SNAT).
    pub judged_source: Ipv4Addr,
    pub generation: u32,
    pub rule_id: u32,
    pub closing: bool,
    /// Judged again under a newer policy and denied: its packets are dropped.
    pub denied: bool,
}

/// Prefix lengths of policy entries that are exact keys (peer | protocol | port, peer |
/// protocol with port 0, peer with protocol and port 0).
const EVERY_PROTOCOL_BITS: u32 = 72;
const WHOLE_PROTOCOL_BITS: u32 = 80;
const WHOLE_PORT_BITS: u32 = 96;

fn is_exact(prefix_len: u32) -> bool {
    matches!(
        prefix_len,
        EVERY_PROTOCOL_BITS | WHOLE_PROTOCOL_BITS | WHOLE_PORT_BITS
    )
}

/// The key with every bit past `bits` cleared (what the LPM would compare).
fn masked(mut data: [u8; POLICY_KEY_LEN], bits: u32) -> [u8; POLICY_KEY_LEN] {
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

fn single_address(prefix_len: u32) -> Result<(), DatapathError> {
    if prefix_len != 32 {
        return Err(DatapathError::InvalidConfig(format!(
            "policy identities are per address (/32), got a /{prefix_len}"
        )));
    }
    Ok(())
}

type Lpm<'a, const N: usize> = LpmTrie<&'a mut MapData, [u8; N], u32>;

impl Datapath {
    fn lpm_mut<const N: usize>(&mut self, name: &'static str) -> Result<Lpm<'_, N>, DatapathError> {
        LpmTrie::try_from(self.map_mut(name)?).map_err(map_op_err(name, "open"))
    }

    fn lpm_entries<const N: usize>(
        &self,
        name: &'static str,
    ) -> Result<Vec<(u32, [u8; N], u32)>, DatapathError> {
        let trie: LpmTrie<&MapData, [u8; N], u32> =
            LpmTrie::try_from(self.map(name)?).map_err(map_op_err(name, "open"))?;
        let mut out = Vec::new();
        for item in trie.iter() {
            let (key, value) = item.map_err(map_op_err(name, "iterate"))?;
            out.push((key.prefix_len(), key.data(), value));
        }
        out.sort();
        Ok(out)
    }

    pub fn upsert_policy_endpoint(
        &mut self,
        ip: Ipv4Addr,
        e: PolicyEndpoint,
    ) -> Result<(), DatapathError> {
        let raw = RawPolEndpoint {
            ingress_deny_rule: e.ingress_deny_rule,
            egress_deny_rule: e.egress_deny_rule,
        };
        self.hash_map_mut::<u32, RawPolEndpoint>(MAP_POL_ENDPOINTS)?
            .insert(addr_to_raw(ip), raw, 0)
            .map_err(map_op_err(MAP_POL_ENDPOINTS, format!("insert {ip}")))
    }

    /// Ok if absent.
    pub fn remove_policy_endpoint(&mut self, ip: Ipv4Addr) -> Result<(), DatapathError> {
        let mut map = self.hash_map_mut::<u32, RawPolEndpoint>(MAP_POL_ENDPOINTS)?;
        ignore_missing(map.remove(&addr_to_raw(ip)))
            .map_err(map_op_err(MAP_POL_ENDPOINTS, format!("remove {ip}")))
    }

    /// An address's security identity. The datapath knows single addresses only (pods and
    /// nodes); anything else is refused.
    pub fn upsert_identity(
        &mut self,
        prefix_len: u32,
        data: [u8; 4],
        identity: u32,
    ) -> Result<(), DatapathError> {
        single_address(prefix_len)?;
        self.hash_map_mut::<[u8; 4], u32>(MAP_POL_IPCACHE)?
            .insert(data, identity, 0)
            .map_err(map_op_err(MAP_POL_IPCACHE, "insert"))
    }

    pub fn remove_identity(&mut self, prefix_len: u32, data: [u8; 4]) -> Result<(), DatapathError> {
        single_address(prefix_len)?;
        let mut map = self.hash_map_mut::<[u8; 4], u32>(MAP_POL_IPCACHE)?;
        ignore_missing(map.remove(&data)).map_err(map_op_err(MAP_POL_IPCACHE, "remove"))
    }

    pub fn upsert_policy_cidr(
        &mut self,
        prefix_len: u32,
        data: [u8; POLICY_CIDR_KEY_LEN],
        class: u32,
    ) -> Result<(), DatapathError> {
        self.lpm_mut::<POLICY_CIDR_KEY_LEN>(MAP_POL_CIDR)?
            .insert(&LpmKey::new(prefix_len, data), class, 0)
            .map_err(map_op_err(MAP_POL_CIDR, "insert"))
    }

    pub fn remove_policy_cidr(
        &mut self,
        prefix_len: u32,
        data: [u8; POLICY_CIDR_KEY_LEN],
    ) -> Result<(), DatapathError> {
        let mut trie = self.lpm_mut::<POLICY_CIDR_KEY_LEN>(MAP_POL_CIDR)?;
        ignore_missing(trie.remove(&LpmKey::new(prefix_len, data)))
            .map_err(map_op_err(MAP_POL_CIDR, "remove"))
    }

    /// One entry of the policy LPM (crates/policy's model). Whole-port, whole-protocol and
    /// every-protocol entries go to the hash `ferrum_policy_exact` (constant-time lookups);
    /// port ranges to the LPM.
    pub fn upsert_policy_rule(
        &mut self,
        prefix_len: u32,
        data: [u8; POLICY_KEY_LEN],
        rule: u32,
    ) -> Result<(), DatapathError> {
        if is_exact(prefix_len) {
            return self
                .hash_map_mut::<[u8; POLICY_KEY_LEN], u32>(MAP_POLICY_EXACT)?
                .insert(masked(data, prefix_len), rule, 0)
                .map_err(map_op_err(MAP_POLICY_EXACT, "insert"));
        }
        self.lpm_mut::<POLICY_KEY_LEN>(MAP_POLICY)?
            .insert(&LpmKey::new(prefix_len, data), rule, 0)
            .map_err(map_op_err(MAP_POLICY, "insert"))
    }

    pub fn remove_policy_rule(
        &mut self,
        prefix_len: u32,
        data: [u8; POLICY_KEY_LEN],
    ) -> Result<(), DatapathError> {
        if is_exact(prefix_len) {
            let mut map = self.hash_map_mut::<[u8; POLICY_KEY_LEN], u32>(MAP_POLICY_EXACT)?;
            return ignore_missing(map.remove(&masked(data, prefix_len)))
                .map_err(map_op_err(MAP_POLICY_EXACT, "remove"));
        }
        let mut trie = self.lpm_mut::<POLICY_KEY_LEN>(MAP_POLICY)?;
        ignore_missing(trie.remove(&LpmKey::new(prefix_len, data)))
            .map_err(map_op_err(MAP_POLICY, "remove"))
    }

    /// Both halves of the policy map as LPM entries.
    fn policy_rules(&self) -> Result<Vec<(u32, [u8; POLICY_KEY_LEN], u32)>, DatapathError> {
        let mut out = self.lpm_entries::<POLICY_KEY_LEN>(MAP_POLICY)?;
        let map = self.hash_map::<[u8; POLICY_KEY_LEN], u32>(MAP_POLICY_EXACT)?;
        for item in map.iter() {
            let (data, rule) = item.map_err(map_op_err(MAP_POLICY_EXACT, "iterate"))?;
            let len = match (data[9], u16::from_be_bytes([data[10], data[11]])) {
                (0, _) => EVERY_PROTOCOL_BITS,
                (_, 0) => WHOLE_PROTOCOL_BITS,
                _ => WHOLE_PORT_BITS,
            };
            out.push((len, data, rule));
        }
        out.sort();
        Ok(out)
    }

    /// Everything in the policy maps (a restarted agent diffs against it).
    pub fn policy_maps(&self) -> Result<PolicyMapsDump, DatapathError> {
        let endpoints = self.hash_map::<u32, RawPolEndpoint>(MAP_POL_ENDPOINTS)?;
        let mut eps = Vec::new();
        for item in endpoints.iter() {
            let (ip, raw) = item.map_err(map_op_err(MAP_POL_ENDPOINTS, "iterate"))?;
            eps.push((
                addr_from_raw(ip),
                PolicyEndpoint {
                    ingress_deny_rule: raw.ingress_deny_rule,
                    egress_deny_rule: raw.egress_deny_rule,
                },
            ));
        }
        eps.sort_by_key(|(ip, _)| *ip);
        Ok(PolicyMapsDump {
            endpoints: eps,
            identities: {
                let map = self.hash_map::<[u8; 4], u32>(MAP_POL_IPCACHE)?;
                let mut v = Vec::new();
                for item in map.iter() {
                    let (addr, id) = item.map_err(map_op_err(MAP_POL_IPCACHE, "iterate"))?;
                    v.push((32, addr, id));
                }
                v.sort();
                v
            },
            cidr_classes: self.lpm_entries::<POLICY_CIDR_KEY_LEN>(MAP_POL_CIDR)?,
            rules: self.policy_rules()?,
        })
    }

    pub fn policy_generation(&self) -> Result<u32, DatapathError> {
        let array: Array<&MapData, RawConfig> =
            Array::try_from(self.map(MAP_CONFIG)?).map_err(map_op_err(MAP_CONFIG, "open"))?;
        Ok(array
            .get(&0, 0)
            .map_err(map_op_err(MAP_CONFIG, "read the node config"))?
            .policy_gen)
    }

    /// Makes every tracked connection be judged again on its next packet. Call after the
    /// policy maps hold the new state.
    pub fn bump_policy_generation(&mut self) -> Result<u32, DatapathError> {
        let mut array: Array<&mut MapData, RawConfig> =
            Array::try_from(self.map_mut(MAP_CONFIG)?).map_err(map_op_err(MAP_CONFIG, "open"))?;
        let mut raw = array
            .get(&0, 0)
            .map_err(map_op_err(MAP_CONFIG, "read the node config"))?;
        raw.policy_gen = raw.policy_gen.wrapping_add(1);
        array
            .set(0, raw, 0)
            .map_err(map_op_err(MAP_CONFIG, "write the policy generation"))?;
        Ok(raw.policy_gen)
    }

    /// The policy stage's conntrack table.
    pub fn policy_conntrack(&self) -> Result<Vec<PolicyConntrack>, DatapathError> {
        let map: HashMap<&MapData, RawNatKey, RawPolCt> = self.hash_map(MAP_POL_CT)?;
        let mut out = Vec::new();
        for item in map.iter() {
            let (k, v) = item.map_err(map_op_err(MAP_POL_CT, "iterate"))?;
            let a = SocketAddrV4::new(addr_from_raw(k.addr_a), port_from_raw(k.port_a));
            let b = SocketAddrV4::new(addr_from_raw(k.addr_b), port_from_raw(k.port_b));
            let (initiator, responder) = if v.flags & POL_CT_A_INITIATED != 0 {
                (a, b)
            } else {
                (b, a)
            };
            out.push(PolicyConntrack {
                proto: k.proto,
                initiator,
                responder,
                judged_source: addr_from_raw(v.initiator),
                generation: v.generation,
                rule_id: v.rule_id,
                closing: v.flags & POL_CT_CLOSING != 0,
                denied: v.flags & POL_CT_DENIED != 0,
            });
        }
        out.sort_by_key(|c| (c.initiator, c.responder, c.proto));
        Ok(out)
    }
}
