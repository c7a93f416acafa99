//! The node most program tests run against: a netns whose veth-a/veth-b stand in for two pods'
//! host veths (veth-b also plays the uplink and the overlay device), both pods published as
//! endpoints, and a remote node's pod block in the ipcache.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::ops::RangeInclusive;

use anyhow::Result;
use ferrum_datapath::bpf::packet::Mac;
use ferrum_datapath::bpf::{
    Datapath, EndpointInfo, EventReader, IpcacheEntry, NodeConfig, PeerKind,
};

use super::{Netns, PinDir, ifindex};

pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 224, 0, 10);
pub const REMOTE_NODE: Ipv4Addr = Ipv4Addr::new(10, 224, 0, 11);
pub const POD_A: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 5);
pub const POD_B: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 6);
pub const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 7);
pub const MAC_A: Mac = [0x02, 0xaa, 0, 0, 0, 0x05];
pub const HOST_MAC_A: Mac = [0x02, 0xee, 0, 0, 0, 0x05];
pub const MAC_B: Mac = [0x02, 0xaa, 0, 0, 0, 0x06];
pub const HOST_MAC_B: Mac = [0x02, 0xee, 0, 0, 0, 0x06];
pub const NAT_PORTS: RangeInclusive<u16> = 61000..=65535;

pub struct Fixture {
    pub dp: Datapath,
    pub events: EventReader,
    pub veth_a: u32,
    pub veth_b: u32,
    pub pins: PinDir,
    pub ns: Netns,
}

pub fn config(veth_b: u32, nat_ports: RangeInclusive<u16>) -> NodeConfig {
    NodeConfig {
        node_ip: NODE_IP,
        cluster_cidr: "10.1.0.0/16".parse().expect("cluster CIDR"),
        local_block: "10.1.0.0/24".parse().expect("local block"),
        overlay_ifindex: veth_b,
        uplink_ifindex: veth_b,
        vni: 42,
        nat_ports,
        trace: true,
    }
}

/// Builds the node (netns named from `prefix`) and enters it on the calling thread.
pub fn fixture(prefix: &str, nat_ports: RangeInclusive<u16>) -> Result<Fixture> {
    let ns = Netns::new(prefix)?;
    ns.ip(&[
        "link", "add", "veth-a", "type", "veth", "peer", "name", "veth-b",
    ])?;
    ns.ip(&["link", "set", "veth-a", "up"])?;
    ns.ip(&["link", "set", "veth-b", "up"])?;
    ns.enter()?;
    let pins = PinDir::new();
    let mut dp = Datapath::open(&pins.path)?;
    let (veth_a, veth_b) = (ifindex("veth-a")?, ifindex("veth-b")?);
    dp.set_config(&config(veth_b, nat_ports))?;
    for (ip, ifindex, pod_mac, host_mac) in [
        (POD_A, veth_a, MAC_A, HOST_MAC_A),
        (POD_B, veth_b, MAC_B, HOST_MAC_B),
    ] {
        dp.upsert_endpoint(
            ip,
            &EndpointInfo {
                ifindex,
                pod_mac,
                host_mac,
            },
        )?;
    }
    dp.upsert_ipcache(
        "10.1.1.0/24".parse()?,
        &IpcacheEntry {
            tunnel_endpoint: Some(REMOTE_NODE),
            kind: PeerKind::RemotePodBlock,
        },
    )?;
    let events = dp.take_events()?;
    Ok(Fixture {
        dp,
        events,
        veth_a,
        veth_b,
        pins,
        ns,
    })
}

pub fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// Test-side mirrors of `struct ferrum_nat_key` / `struct ferrum_nat_value` (bpf/ferrum.h).
#[repr(C)]
#[derive(Clone, Copy)]
struct NatKey {
    addr_a: u32,
    addr_b: u32,
    port_a: u16,
    port_b: u16,
    proto: u8,
    pad: [u8; 3],
}
#[repr(C)]
#[derive(Clone, Copy)]
struct NatValue {
    addr: u32,
    port: u16,
    flags: u16,
    last_ns: u64,
}
// SAFETY: plain C structs without padding holes the kernel would not fill.
unsafe impl aya::Pod for NatKey {}
unsafe impl aya::Pod for NatValue {}

/// Moves the last packet of every flow in `map` (keyed by `ferrum_nat_key`, valued by
/// `ferrum_nat_value`: the SNAT and masquerade maps) `secs` into the past: the programs' clock
/// cannot be wound forward, their map entries can be wound back.
pub fn age_nat_entries(f: &Fixture, map: &str, secs: u64) -> Result<()> {
    use aya::maps::{HashMap, Map, MapData};
    let data = MapData::from_pin(f.pins.path.join(map))?;
    let mut map: HashMap<_, NatKey, NatValue> = HashMap::try_from(Map::LruHashMap(data))?;
    let entries = map.iter().collect::<Result<Vec<_>, _>>()?;
    for (key, mut value) in entries {
        value.last_ns = value.last_ns.saturating_sub(secs * 1_000_000_000);
        map.insert(key, value, 0)?;
    }
    Ok(())
}
