//! `#[repr(C)]` mirrors of the structures in bpf/ferrum.h. Sizes are asserted at compile time
//! so a layout change on one side cannot go unnoticed.

use std::mem::size_of;

/// `struct ferrum_config`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RawConfig {
    pub node_ip: u32,
    pub cluster_cidr_addr: u32,
    pub cluster_cidr_prefix_len: u32,
    pub local_block_addr: u32,
    pub local_block_prefix_len: u32,
    pub overlay_ifindex: u32,
    pub uplink_ifindex: u32,
    pub vni: u32,
    pub nat_port_min: u16,
    pub nat_port_max: u16,
    pub flags: u32,
    pub policy_gen: u32,
}
pub(crate) const CONFIG_FLAG_TRACE: u32 = 1;
pub(crate) const CONFIG_FLAG_TRACE_ALL: u32 = 1 << 1;

/// `struct ferrum_endpoint`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RawEndpoint {
    pub ifindex: u32,
    pub pod_mac: [u8; 6],
    pub host_mac: [u8; 6],
    pub flags: u32,
}

/// `struct ferrum_ipcache_value` (the key is aya's `lpm_trie::Key<u32>`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RawIpcacheValue {
    pub tunnel_endpoint: u32,
    pub kind: u8,
    pub pad: u8,
    pub flags: u16,
}

/// `struct ferrum_nat_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct RawNatKey {
    pub addr_a: u32,
    pub addr_b: u32,
    pub port_a: u16,
    pub port_b: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}

/// `struct ferrum_nat_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RawNatValue {
    pub addr: u32,
    pub port: u16,
    pub flags: u16,
    pub last_ns: u64,
}

/// `struct ferrum_event`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RawEvent {
    pub ts_ns: u64,
    pub kind: u8,
    pub reason: u8,
    pub proto: u8,
    pub tcp_flags: u8,
    pub ifindex: u32,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub tunnel_endpoint: u32,
    pub nat_addr: u32,
    pub nat_port: u16,
    pub ev_flags: u8,
    pub icmp_type: u8,
    pub rule_id: u32,
    pub service_id: u32,
}

/// `struct ferrum_lb_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct RawLbKey {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
}

/// `struct ferrum_lb_service`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RawLbService {
    pub id: u32,
    pub count: u16,
    pub flags: u8,
    pub algorithm: u8,
    pub affinity_timeout: u32,
    pub pad: u32,
}

/// `struct ferrum_lb_backend_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct RawLbBackendKey {
    pub id: u32,
    pub slot: u32,
}

/// `struct ferrum_lb_backend`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RawLbBackend {
    pub addr: u32,
    pub port: u16,
    pub pad: u16,
}

/// `struct ferrum_lb_ct`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RawLbCt {
    pub backend_addr: u32,
    pub backend_port: u16,
    pub snat_port: u16,
    pub id: u32,
    pub snat_addr: u32,
}

/// `struct ferrum_lb_rev`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RawLbRev {
    pub frontend_addr: u32,
    pub frontend_port: u16,
    pub client_port: u16,
    pub client_addr: u32,
    pub flags: u32,
}

/// `struct ferrum_lb_maglev_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct RawLbMaglevKey {
    pub id: u32,
    pub chunk: u32,
}

/// `struct ferrum_lb_maglev_chunk`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RawLbMaglevChunk {
    pub slots: [u16; 64],
}

/// `struct ferrum_lb_affinity_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct RawLbAffinityKey {
    pub id: u32,
    pub client: u32,
}

/// `struct ferrum_lb_affinity`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RawLbAffinity {
    pub backend_addr: u32,
    pub backend_port: u16,
    pub pad: u16,
    pub last_ns: u64,
}

/// `struct ferrum_lb_range_key` without its prefixlen (aya's `lpm_trie::Key` adds it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct RawLbRangeData {
    pub id_be: u32,
    pub addr: u32,
}

/// `struct ferrum_pol_endpoint`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RawPolEndpoint {
    pub ingress_deny_rule: u32,
    pub egress_deny_rule: u32,
}

/// `struct ferrum_pol_ct`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RawPolCt {
    pub last_ns: u64,
    pub initiator: u32,
    pub generation: u32,
    pub rule_id: u32,
    pub flags: u8,
    pub reason: u8,
    pub pad: u16,
}
pub(crate) const POL_CT_A_INITIATED: u8 = 1;
pub(crate) const POL_CT_CLOSING: u8 = 1 << 1;
pub(crate) const POL_CT_DENIED: u8 = 1 << 2;

// SAFETY: plain old data, no padding the kernel could leave uninitialised that we rely on.
unsafe impl aya::Pod for RawConfig {}
unsafe impl aya::Pod for RawEndpoint {}
unsafe impl aya::Pod for RawIpcacheValue {}
unsafe impl aya::Pod for RawNatKey {}
unsafe impl aya::Pod for RawNatValue {}
unsafe impl aya::Pod for RawEvent {}
unsafe impl aya::Pod for RawLbKey {}
unsafe impl aya::Pod for RawLbService {}
unsafe impl aya::Pod for RawLbBackendKey {}
unsafe impl aya::Pod for RawLbBackend {}
unsafe impl aya::Pod for RawLbCt {}
unsafe impl aya::Pod for RawLbRev {}
unsafe impl aya::Pod for RawLbMaglevKey {}
unsafe impl aya::Pod for RawLbMaglevChunk {}
unsafe impl aya::Pod for RawLbAffinityKey {}
unsafe impl aya::Pod for RawLbAffinity {}
unsafe impl aya::Pod for RawLbRangeData {}
unsafe impl aya::Pod for RawPolEndpoint {}
unsafe impl aya::Pod for RawPolCt {}

pub(crate) const CONFIG_SIZE: usize = 44;
pub(crate) const ENDPOINT_SIZE: usize = 20;
pub(crate) const IPCACHE_KEY_SIZE: usize = 8;
pub(crate) const IPCACHE_VALUE_SIZE: usize = 8;
pub(crate) const NAT_KEY_SIZE: usize = 16;
pub(crate) const NAT_VALUE_SIZE: usize = 16;
pub(crate) const EVENT_SIZE: usize = 48;
/// `struct ferrum_flow_slot`: a 16-byte flow key and a u64 time (only the kernel reads it).
pub(crate) const FLOW_SLOT_SIZE: usize = 24;
pub(crate) const EVENT_FLAG_REPLY: u8 = 1;

const _: () = assert!(size_of::<RawConfig>() == CONFIG_SIZE);
const _: () = assert!(size_of::<RawEndpoint>() == ENDPOINT_SIZE);
const _: () = assert!(size_of::<aya::maps::lpm_trie::Key<u32>>() == IPCACHE_KEY_SIZE);
const _: () = assert!(size_of::<RawIpcacheValue>() == IPCACHE_VALUE_SIZE);
const _: () = assert!(size_of::<RawNatKey>() == NAT_KEY_SIZE);
const _: () = assert!(size_of::<RawNatValue>() == NAT_VALUE_SIZE);
const _: () = assert!(size_of::<RawEvent>() == EVENT_SIZE);
pub(crate) const LB_KEY_SIZE: usize = 8;
pub(crate) const LB_SERVICE_SIZE: usize = 16;
pub(crate) const LB_BACKEND_KEY_SIZE: usize = 8;
pub(crate) const LB_BACKEND_SIZE: usize = 8;
pub(crate) const LB_CT_SIZE: usize = 16;
pub(crate) const LB_REV_SIZE: usize = 16;
const _: () = assert!(size_of::<RawLbKey>() == LB_KEY_SIZE);
const _: () = assert!(size_of::<RawLbService>() == LB_SERVICE_SIZE);
const _: () = assert!(size_of::<RawLbBackendKey>() == LB_BACKEND_KEY_SIZE);
const _: () = assert!(size_of::<RawLbBackend>() == LB_BACKEND_SIZE);
const _: () = assert!(size_of::<RawLbCt>() == LB_CT_SIZE);
const _: () = assert!(size_of::<RawLbRev>() == LB_REV_SIZE);
pub(crate) const LB_MAGLEV_KEY_SIZE: usize = 8;
pub(crate) const LB_MAGLEV_VALUE_SIZE: usize = 128;
pub(crate) const LB_AFFINITY_KEY_SIZE: usize = 8;
pub(crate) const LB_AFFINITY_SIZE: usize = 16;
pub(crate) const LB_RANGE_KEY_SIZE: usize = 12;
const _: () = assert!(size_of::<RawLbMaglevKey>() == LB_MAGLEV_KEY_SIZE);
const _: () = assert!(size_of::<RawLbMaglevChunk>() == LB_MAGLEV_VALUE_SIZE);
const _: () = assert!(size_of::<RawLbAffinityKey>() == LB_AFFINITY_KEY_SIZE);
const _: () = assert!(size_of::<RawLbAffinity>() == LB_AFFINITY_SIZE);
const _: () = assert!(size_of::<aya::maps::lpm_trie::Key<RawLbRangeData>>() == LB_RANGE_KEY_SIZE);
pub(crate) const POL_ENDPOINT_SIZE: usize = 8;
pub(crate) const POL_CIDR_KEY_SIZE: usize = 13;
pub(crate) const POLICY_KEY_SIZE: usize = 16;
pub(crate) const POL_CT_SIZE: usize = 24;
const _: () = assert!(size_of::<RawPolEndpoint>() == POL_ENDPOINT_SIZE);
const _: () = assert!(size_of::<aya::maps::lpm_trie::Key<[u8; 9]>>() == POL_CIDR_KEY_SIZE);
const _: () = assert!(size_of::<aya::maps::lpm_trie::Key<[u8; 12]>>() == POLICY_KEY_SIZE);
const _: () = assert!(size_of::<RawPolCt>() == POL_CT_SIZE);

/// Converts an address to the network-order `u32` the programs compare against.
pub(crate) fn addr_to_raw(addr: std::net::Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

pub(crate) fn addr_from_raw(raw: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(raw.to_ne_bytes())
}

/// Ports travel in network order inside the maps and events.
pub(crate) fn port_from_raw(raw: u16) -> u16 {
    u16::from_be(raw)
}
