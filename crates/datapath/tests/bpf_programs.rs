//! BPF_PROG_TEST_RUN tests of every datapath branch on crafted frames. Root only: each test
//! makes its own netns with a veth pair (skb->ifindex must be a real device) and its own
//! pin directory, so tests run in parallel without sharing maps.

mod bpf_support;

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::Result;
use bpf_support::node::{
    self, Fixture, HOST_MAC_A, HOST_MAC_B, MAC_A, MAC_B, NAT_PORTS, NODE_IP, POD_A, POD_B,
    REMOTE_NODE, REMOTE_POD, config, sa,
};
use ferrum_datapath::bpf::packet::{self, Mac};
use ferrum_datapath::bpf::{
    Event, EventKind, IpcacheEntry, NodeConfig, PeerKind, Program, Reason, TC_ACT_OK,
    TC_ACT_REDIRECT, TC_ACT_SHOT,
};

const EXTERNAL: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const UPLINK_MAC: Mac = [0x02, 0x10, 0, 0, 0, 0x0a];
const ROUTER_MAC: Mac = [0x02, 0x10, 0, 0, 0, 0x01];

fn fixture() -> Result<Fixture> {
    fixture_with_ports(NAT_PORTS)
}

/// The shared node plus the remote node's own address, which these tests route to.
fn fixture_with_ports(nat_ports: std::ops::RangeInclusive<u16>) -> Result<Fixture> {
    let mut f = node::fixture("fe-bpft", nat_ports)?;
    f.dp.upsert_ipcache(
        "10.224.0.11/32".parse()?,
        &IpcacheEntry {
            tunnel_endpoint: None,
            kind: PeerKind::RemoteNode,
        },
    )?;
    Ok(f)
}

impl Fixture {
    fn events(&mut self) -> Vec<Event> {
        self.events
            .poll(Duration::from_millis(200))
            .expect("poll events")
    }

    fn drop_reason(&mut self) -> Option<Reason> {
        self.events()
            .into_iter()
            .find(|e| e.kind == EventKind::Drop)
            .map(|e| e.reason)
    }
}

#[test]
fn local_pod_to_pod_is_redirected_to_the_peer_with_rewritten_macs() -> Result<()> {
    let mut f = fixture()?;
    let frame = packet::tcp_frame(MAC_A, HOST_MAC_A, sa(POD_A, 40000), sa(POD_B, 80), b"hi");
    let out = f.dp.test_run(Program::FromPod, &frame, f.veth_a, 1)?;
    assert_eq!(out.retval, TC_ACT_REDIRECT);
    let p = packet::parse(&out.frame)?;
    assert_eq!((p.eth_dst, p.eth_src), (MAC_B, HOST_MAC_B));
    assert_eq!(out.frame[12..], frame[12..], "only the MACs change");
    let events = f.events();
    assert!(
        events.iter().any(|e| e.kind == EventKind::Trace
            && e.reason == Reason::ToEndpoint
            && e.dst == sa(POD_B, 80)),
        "{events:?}"
    );
    Ok(())
}

#[test]
fn remote_pod_traffic_is_encapsulated_toward_the_owning_node() -> Result<()> {
    let mut f = fixture()?;
    let frame = packet::udp_frame(
        MAC_A,
        HOST_MAC_A,
        sa(POD_A, 5000),
        sa(REMOTE_POD, 53),
        b"q",
        true,
    );
    let out = f.dp.test_run(Program::FromPod, &frame, f.veth_a, 1)?;
    assert_eq!(out.retval, TC_ACT_REDIRECT, "out of the uplink");
    // Wrapped in VXLAN here: node to node, the overlay's port and VNI, the frame untouched.
    packet::verify_checksums(&out.frame)?;
    let (outer, vni, inner) = packet::vxlan_inner(&out.frame)?;
    assert_eq!(
        (outer.src, outer.dst, outer.proto, outer.dport, vni),
        (NODE_IP, REMOTE_NODE, 17, 8472, 42)
    );
    assert!((32768..61000).contains(&outer.sport), "{}", outer.sport);
    assert_eq!(inner, frame, "the inner frame is the pod's own");
    // Another flow to the same node may take another source port (ECMP entropy); the same
    // flow always the same.
    let again = f.dp.test_run(Program::FromPod, &frame, f.veth_a, 1)?;
    assert_eq!(packet::vxlan_inner(&again.frame)?.0.sport, outer.sport);
    let events = f.events();
    let trace = events
        .iter()
        .find(|e| e.reason == Reason::ToOverlay)
        .expect("TO_OVERLAY trace event");
    assert_eq!(trace.tunnel_endpoint, Some(REMOTE_NODE));
    assert_eq!(trace.dst, sa(REMOTE_POD, 53));
    assert_eq!(trace.ifindex, f.veth_a);
    Ok(())
}

#[test]
fn unknown_address_in_the_local_block_is_dropped() -> Result<()> {
    let mut f = fixture()?;
    let frame = packet::tcp_frame(
        MAC_A,
        HOST_MAC_A,
        sa(POD_A, 40000),
        sa(Ipv4Addr::new(10, 1, 0, 99), 80),
        b"",
    );
    assert_eq!(
        f.dp.test_run(Program::FromPod, &frame, f.veth_a, 1)?.retval,
        TC_ACT_SHOT
    );
    assert_eq!(f.drop_reason(), Some(Reason::UnknownEndpoint));
    Ok(())
}

#[test]
fn traffic_leaving_the_cluster_goes_to_the_stack() -> Result<()> {
    let mut f = fixture()?;
    for dst in [EXTERNAL, NODE_IP, REMOTE_NODE] {
        let frame = packet::tcp_frame(MAC_A, HOST_MAC_A, sa(POD_A, 40000), sa(dst, 80), b"");
        let out = f.dp.test_run(Program::FromPod, &frame, f.veth_a, 1)?;
        assert_eq!(out.retval, TC_ACT_OK, "to {dst}");
        assert_eq!(out.frame, frame);
    }
    assert!(f.events().iter().all(|e| e.reason == Reason::ToStack));
    Ok(())
}

#[test]
fn spoofed_source_ip_is_dropped() -> Result<()> {
    let mut f = fixture()?;
    // An address nobody owns, and pod B's address sent from pod A's veth.
    for src in [Ipv4Addr::new(10, 1, 0, 50), POD_B] {
        let frame = packet::tcp_frame(MAC_A, HOST_MAC_A, sa(src, 40000), sa(EXTERNAL, 80), b"");
        assert_eq!(
            f.dp.test_run(Program::FromPod, &frame, f.veth_a, 1)?.retval,
            TC_ACT_SHOT
        );
        let events = f.events();
        let drop = events
            .iter()
            .find(|e| e.kind == EventKind::Drop)
            .expect("drop event");
        assert_eq!(drop.reason, Reason::SpoofedIp);
        assert_eq!(drop.src, sa(src, 40000));
        assert_eq!(drop.ifindex, f.veth_a);
    }
    Ok(())
}

#[test]
fn spoofed_source_mac_is_dropped() -> Result<()> {
    let mut f = fixture()?;
    let frame = packet::tcp_frame(
        [0x02, 0xde, 0xad, 0, 0, 1],
        HOST_MAC_A,
        sa(POD_A, 40000),
        sa(POD_B, 80),
        b"",
    );
    assert_eq!(
        f.dp.test_run(Program::FromPod, &frame, f.veth_a, 1)?.retval,
        TC_ACT_SHOT
    );
    assert_eq!(f.drop_reason(), Some(Reason::SpoofedMac));
    Ok(())
}

#[test]
fn arp_is_checked_for_spoofing_then_passed() -> Result<()> {
    let mut f = fixture()?;
    let gw = Ipv4Addr::new(169, 254, 1, 1);
    let good = packet::arp_frame(1, MAC_A, POD_A, [0; 6], gw);
    assert_eq!(
        f.dp.test_run(Program::FromPod, &good, f.veth_a, 1)?.retval,
        TC_ACT_OK
    );
    assert_eq!(f.drop_reason(), None);

    let stolen_ip = packet::arp_frame(2, MAC_A, POD_B, HOST_MAC_A, gw);
    assert_eq!(
        f.dp.test_run(Program::FromPod, &stolen_ip, f.veth_a, 1)?
            .retval,
        TC_ACT_SHOT
    );
    assert_eq!(f.drop_reason(), Some(Reason::SpoofedIp));

    let forged_mac = packet::arp_frame(2, [0x02, 0xde, 0xad, 0, 0, 1], POD_A, HOST_MAC_A, gw);
    assert_eq!(
        f.dp.test_run(Program::FromPod, &forged_mac, f.veth_a, 1)?
            .retval,
        TC_ACT_SHOT
    );
    assert_eq!(f.drop_reason(), Some(Reason::SpoofedMac));
    Ok(())
}

#[test]
fn ipv6_from_a_pod_is_dropped() -> Result<()> {
    let mut f = fixture()?;
    let frame = packet::ipv6_frame(MAC_A, HOST_MAC_A);
    assert_eq!(
        f.dp.test_run(Program::FromPod, &frame, f.veth_a, 1)?.retval,
        TC_ACT_SHOT
    );
    assert_eq!(f.drop_reason(), Some(Reason::UnsupportedL3));
    Ok(())
}

#[test]
fn from_overlay_delivers_to_local_pods_and_passes_the_rest() -> Result<()> {
    let mut f = fixture()?;
    let to_pod = packet::tcp_frame(
        [2, 0, 0, 0, 0, 9],
        [2, 0, 0, 0, 0, 8],
        sa(REMOTE_POD, 3333),
        sa(POD_B, 80),
        b"",
    );
    let out = f.dp.test_run(Program::FromOverlay, &to_pod, f.veth_b, 1)?;
    assert_eq!(out.retval, TC_ACT_REDIRECT);
    let p = packet::parse(&out.frame)?;
    assert_eq!((p.eth_dst, p.eth_src), (MAC_B, HOST_MAC_B));

    let to_node = packet::tcp_frame(
        [2, 0, 0, 0, 0, 9],
        [2, 0, 0, 0, 0, 8],
        sa(REMOTE_POD, 3333),
        sa(NODE_IP, 22),
        b"",
    );
    let out = f.dp.test_run(Program::FromOverlay, &to_node, f.veth_b, 1)?;
    assert_eq!(out.retval, TC_ACT_OK);
    assert_eq!(out.frame, to_node);
    Ok(())
}

/// The uplink decapsulates VXLAN packets for local pods and delivers them as from_overlay does;
/// what it does not handle reaches the VXLAN device unchanged.
#[test]
fn from_uplink_decapsulates_vxlan_for_local_pods_and_leaves_the_rest() -> Result<()> {
    let mut f = fixture()?;
    let inner = |dst: Ipv4Addr| {
        packet::tcp_frame(
            [2, 0, 0, 0, 0, 9],
            [2, 0, 0, 0, 0, 8],
            sa(REMOTE_POD, 3333),
            sa(dst, 80),
            b"data",
        )
    };
    let wrapped = |vni: u32, inner: &[u8]| {
        packet::vxlan_frame(
            ROUTER_MAC,
            UPLINK_MAC,
            sa(REMOTE_NODE, 40000),
            sa(NODE_IP, 8472),
            vni,
            inner,
        )
    };
    let out = f.dp.test_run(
        Program::FromUplink,
        &wrapped(42, &inner(POD_B)),
        f.veth_b,
        1,
    )?;
    assert_eq!(out.retval, TC_ACT_REDIRECT, "into the pod");
    packet::verify_checksums(&out.frame)?;
    let p = packet::parse(&out.frame)?;
    assert_eq!(
        (p.src, p.dst, p.sport, p.dport),
        (REMOTE_POD, POD_B, 3333, 80)
    );
    assert_eq!((p.eth_dst, p.eth_src), (MAC_B, HOST_MAC_B));
    assert_eq!(
        out.frame[14..],
        inner(POD_B)[14..],
        "the inner packet untouched"
    );
    assert!(f.events().iter().any(|e| e.reason == Reason::ToEndpoint));

    // Another VNI, an inner destination that is no local pod, an outer fragment: the VXLAN
    // device's.
    let mut fragment = wrapped(42, &inner(POD_B));
    fragment[14 + 6] |= 0x20; // more fragments
    for frame in [
        wrapped(7, &inner(POD_B)),
        wrapped(42, &inner(NODE_IP)),
        wrapped(42, &inner(Ipv4Addr::new(10, 1, 0, 99))),
        fragment,
    ] {
        let out = f.dp.test_run(Program::FromUplink, &frame, f.veth_b, 1)?;
        assert_eq!(out.retval, TC_ACT_OK);
        assert_eq!(out.frame, frame);
    }
    Ok(())
}

#[test]
fn to_overlay_sets_the_tunnel_or_drops_without_one() -> Result<()> {
    let mut f = fixture()?;
    let routed = packet::icmp_echo_frame(UPLINK_MAC, UPLINK_MAC, NODE_IP, REMOTE_POD, true, 9);
    assert_eq!(
        f.dp.test_run(Program::ToOverlay, &routed, f.veth_b, 1)?
            .retval,
        TC_ACT_OK
    );
    let events = f.events();
    assert_eq!(
        events
            .iter()
            .find(|e| e.reason == Reason::ToOverlay)
            .and_then(|e| e.tunnel_endpoint),
        Some(REMOTE_NODE)
    );

    let nowhere = packet::icmp_echo_frame(
        UPLINK_MAC,
        UPLINK_MAC,
        NODE_IP,
        Ipv4Addr::new(10, 1, 9, 9),
        true,
        9,
    );
    assert_eq!(
        f.dp.test_run(Program::ToOverlay, &nowhere, f.veth_b, 1)?
            .retval,
        TC_ACT_SHOT
    );
    assert_eq!(f.drop_reason(), Some(Reason::NoTunnelEndpoint));
    // A node prefix without a tunnel endpoint cannot be reached through the overlay either.
    let node = packet::icmp_echo_frame(UPLINK_MAC, UPLINK_MAC, NODE_IP, REMOTE_NODE, true, 9);
    assert_eq!(
        f.dp.test_run(Program::ToOverlay, &node, f.veth_b, 1)?
            .retval,
        TC_ACT_SHOT
    );
    Ok(())
}

/// Runs to_uplink on a pod frame and returns the translated frame (checked for valid sums).
fn snat(f: &mut Fixture, frame: &[u8]) -> Result<packet::Parsed> {
    let out = f.dp.test_run(Program::ToUplink, frame, f.veth_b, 1)?;
    assert_eq!(out.retval, TC_ACT_OK);
    packet::verify_checksums(&out.frame)?;
    let p = packet::parse(&out.frame)?;
    assert_eq!(p.src, NODE_IP);
    assert!(
        NAT_PORTS.contains(&p.sport),
        "NAT port {} outside the range",
        p.sport
    );
    Ok(p)
}

#[test]
fn tcp_to_outside_is_snatted_with_a_stable_port_per_flow() -> Result<()> {
    let mut f = fixture()?;
    let flow1 = packet::tcp_frame(
        HOST_MAC_B,
        ROUTER_MAC,
        sa(POD_A, 40000),
        sa(EXTERNAL, 80),
        b"GET /",
    );
    let first = snat(&mut f, &flow1)?;
    assert_eq!(first.dst, EXTERNAL);
    assert_eq!(first.dport, 80);
    let again = snat(&mut f, &flow1)?;
    assert_eq!(again.sport, first.sport, "same flow, same NAT port");
    let flow2 = packet::tcp_frame(
        HOST_MAC_B,
        ROUTER_MAC,
        sa(POD_A, 40001),
        sa(EXTERNAL, 80),
        b"GET /",
    );
    let second = snat(&mut f, &flow2)?;
    assert_ne!(
        second.sport, first.sport,
        "different flows, different NAT ports"
    );

    let entries = f.dp.nat_entries()?;
    assert_eq!(entries.len(), 2, "{entries:?}");
    let e = entries
        .iter()
        .find(|e| e.pod == sa(POD_A, 40000))
        .expect("forward entry");
    assert_eq!(
        (e.proto, e.remote, e.nat),
        (6, sa(EXTERNAL, 80), sa(NODE_IP, first.sport))
    );
    assert!(e.has_reverse);
    let snat_event = f
        .events()
        .into_iter()
        .find(|e| e.reason == Reason::Snat)
        .expect("SNAT trace");
    assert_eq!(snat_event.nat, Some(sa(NODE_IP, first.sport)));
    Ok(())
}

/// An ICMP error from a router on the way (here "fragmentation needed", MTU 1300) about a
/// packet the node SNAT'd: the node's address and port in the quote become the pod's again,
/// every checksum stays valid, and the error goes into the pod (path MTU discovery).
#[test]
fn icmp_errors_about_snatted_packets_go_back_to_the_pod() -> Result<()> {
    let mut f = fixture()?;
    let router = Ipv4Addr::new(198, 51, 100, 1);
    let frag_needed = |quoted: &[u8]| {
        let icmp = packet::icmp_error(3, 4, [0, 0, 0x05, 0x14], quoted);
        packet::ethernet(
            UPLINK_MAC,
            ROUTER_MAC,
            0x0800,
            &packet::ipv4(router, NODE_IP, packet::PROTO_ICMP, &icmp),
        )
    };
    // The quote as it came back: the SNAT'd packet's IP header and transport header.
    let quote_of = |frame: &[u8], len: usize| frame[14..14 + len].to_vec();

    let cases: [(Vec<u8>, usize, u16); 3] = [
        (
            packet::tcp_frame(
                HOST_MAC_A,
                ROUTER_MAC,
                sa(POD_A, 40000),
                sa(EXTERNAL, 443),
                b"x",
            ),
            20 + 20, // IP + the whole TCP header: its checksum is in the quote
            40000,
        ),
        (
            packet::udp_frame(
                HOST_MAC_A,
                ROUTER_MAC,
                sa(POD_A, 5353),
                sa(EXTERNAL, 53),
                b"q",
                true,
            ),
            20 + 8 + 1,
            5353,
        ),
        (
            packet::icmp_echo_frame(HOST_MAC_A, ROUTER_MAC, POD_A, EXTERNAL, true, 77),
            20 + 8,
            77,
        ),
    ];
    for (request, quote_len, pod_port) in cases {
        let out = f.dp.test_run(Program::ToUplink, &request, f.veth_b, 1)?;
        assert_eq!(out.retval, TC_ACT_OK);
        let snatted = out.frame;
        let error = frag_needed(&quote_of(&snatted, quote_len));
        let out = f.dp.test_run(Program::FromUplink, &error, f.veth_b, 1)?;
        assert_eq!(out.retval, TC_ACT_REDIRECT, "into the pod");
        packet::verify_checksums(&out.frame)?;
        let p = packet::parse(&out.frame)?;
        assert_eq!((p.src, p.dst, p.icmp_type), (router, POD_A, Some(3)));
        assert_eq!((p.eth_dst, p.eth_src), (MAC_A, HOST_MAC_A));
        // The quote is the pod's own packet again, with valid checksums.
        let quote = &out.frame[14 + 20 + 8..];
        assert_eq!(
            quote,
            &quote_of(&request, quote_len)[..],
            "the pod's packet, byte for byte"
        );
        let port_at = if quote[9] == packet::PROTO_ICMP {
            24
        } else {
            20
        };
        assert_eq!(
            u16::from_be_bytes([quote[port_at], quote[port_at + 1]]),
            pod_port
        );
        assert_eq!(&quote[12..16], &POD_A.octets());
    }

    // An error about a packet nobody SNAT'd goes to the node's stack untouched.
    let stray = frag_needed(&quote_of(
        &packet::tcp_frame(
            UPLINK_MAC,
            ROUTER_MAC,
            sa(NODE_IP, 61999),
            sa(EXTERNAL, 443),
            b"",
        ),
        40,
    ));
    let out = f.dp.test_run(Program::FromUplink, &stray, f.veth_b, 1)?;
    assert_eq!((out.retval, &out.frame), (TC_ACT_OK, &stray));
    Ok(())
}

#[test]
fn reply_is_reverse_snatted_and_redirected_to_the_pod() -> Result<()> {
    let mut f = fixture()?;
    let request = packet::tcp_frame(
        HOST_MAC_B,
        ROUTER_MAC,
        sa(POD_A, 40000),
        sa(EXTERNAL, 443),
        b"x",
    );
    let nat_port = snat(&mut f, &request)?.sport;
    let reply = packet::tcp_frame(
        ROUTER_MAC,
        UPLINK_MAC,
        sa(EXTERNAL, 443),
        sa(NODE_IP, nat_port),
        b"reply",
    );
    let out = f.dp.test_run(Program::FromUplink, &reply, f.veth_b, 1)?;
    assert_eq!(out.retval, TC_ACT_REDIRECT);
    packet::verify_checksums(&out.frame)?;
    let p = packet::parse(&out.frame)?;
    assert_eq!(
        (p.src, p.sport, p.dst, p.dport),
        (EXTERNAL, 443, POD_A, 40000)
    );
    assert_eq!((p.eth_dst, p.eth_src), (MAC_A, HOST_MAC_A));
    assert!(f.events().iter().any(|e| e.reason == Reason::RevSnat));
    Ok(())
}

#[test]
fn udp_snat_handles_both_checksummed_and_zero_checksum_datagrams() -> Result<()> {
    let mut f = fixture()?;
    let with_sum = packet::udp_frame(
        HOST_MAC_B,
        ROUTER_MAC,
        sa(POD_A, 5353),
        sa(EXTERNAL, 53),
        b"query",
        true,
    );
    let p = snat(&mut f, &with_sum)?;
    let reply = packet::udp_frame(
        ROUTER_MAC,
        UPLINK_MAC,
        sa(EXTERNAL, 53),
        sa(NODE_IP, p.sport),
        b"answer",
        true,
    );
    let out = f.dp.test_run(Program::FromUplink, &reply, f.veth_b, 1)?;
    assert_eq!(out.retval, TC_ACT_REDIRECT);
    packet::verify_checksums(&out.frame)?;
    assert_eq!(packet::parse(&out.frame)?.dport, 5353);

    let no_sum = packet::udp_frame(
        HOST_MAC_B,
        ROUTER_MAC,
        sa(POD_A, 6000),
        sa(EXTERNAL, 53),
        b"query",
        false,
    );
    let out = f.dp.test_run(Program::ToUplink, &no_sum, f.veth_b, 1)?;
    packet::verify_checksums(&out.frame)?;
    let l4 = 14 + 20;
    assert_eq!(
        out.frame[l4 + 6..l4 + 8],
        [0, 0],
        "a zero UDP checksum stays zero"
    );
    assert_eq!(packet::parse(&out.frame)?.src, NODE_IP);
    Ok(())
}

#[test]
fn icmp_echo_is_snatted_by_echo_id_and_reversed() -> Result<()> {
    let mut f = fixture()?;
    let ping = packet::icmp_echo_frame(HOST_MAC_B, ROUTER_MAC, POD_A, EXTERNAL, true, 777);
    let p = snat(&mut f, &ping)?;
    assert_eq!(p.icmp_type, Some(8));
    let nat_id = p.sport;
    let pong = packet::icmp_echo_frame(ROUTER_MAC, UPLINK_MAC, EXTERNAL, NODE_IP, false, nat_id);
    let out = f.dp.test_run(Program::FromUplink, &pong, f.veth_b, 1)?;
    assert_eq!(out.retval, TC_ACT_REDIRECT);
    packet::verify_checksums(&out.frame)?;
    let back = packet::parse(&out.frame)?;
    assert_eq!(
        (back.dst, back.dport, back.icmp_type),
        (POD_A, 777, Some(0))
    );
    Ok(())
}

/// A datagram's later fragments carry no ports: they are SNATted (and reversed) by the flow
/// their first fragment belongs to, so large UDP and large pings leave the cluster whole.
#[test]
fn fragmented_datagrams_are_snatted_and_reversed_whole() -> Result<()> {
    let mut f = fixture()?;
    let payload: Vec<u8> = (0..2500u32).map(|i| (i * 13) as u8).collect();
    let big_udp = packet::udp_frame(
        HOST_MAC_B,
        ROUTER_MAC,
        sa(POD_A, 5353),
        sa(EXTERNAL, 53),
        &payload,
        true,
    );
    let ping = |from: Ipv4Addr, to: Ipv4Addr, request: bool, id: u16| {
        let msg = packet::icmp_echo(request, id, 1, &payload);
        packet::ethernet(
            ROUTER_MAC,
            UPLINK_MAC,
            0x0800,
            &packet::ipv4(from, to, 1, &msg),
        )
    };
    for (i, request) in [big_udp, ping(POD_A, EXTERNAL, true, 777)]
        .into_iter()
        .enumerate()
    {
        let mut out = Vec::new();
        for frag in packet::fragment(&request, 100 + i as u16, 1000) {
            let run = f.dp.test_run(Program::ToUplink, &frag, f.veth_b, 1)?;
            assert_eq!(run.retval, TC_ACT_OK);
            assert_eq!(packet::parse(&run.frame)?.src, NODE_IP, "every fragment");
            out.push(run.frame);
        }
        let whole = packet::reassemble(&out)?;
        packet::verify_checksums(&whole)?;
        let p = packet::parse(&whole)?;
        assert!(NAT_PORTS.contains(&p.sport), "NAT port {}", p.sport);

        // The answer, as large, comes back to the pod.
        let answer = if p.proto == 1 {
            ping(EXTERNAL, NODE_IP, false, p.sport)
        } else {
            packet::udp_frame(
                ROUTER_MAC,
                UPLINK_MAC,
                sa(EXTERNAL, 53),
                sa(NODE_IP, p.sport),
                &payload,
                true,
            )
        };
        let mut back = Vec::new();
        for frag in packet::fragment(&answer, 200 + i as u16, 1000) {
            let run = f.dp.test_run(Program::FromUplink, &frag, f.veth_b, 1)?;
            assert_eq!(run.retval, TC_ACT_REDIRECT, "into the pod");
            assert_eq!(packet::parse(&run.frame)?.dst, POD_A, "every fragment");
            back.push(run.frame);
        }
        let whole = packet::reassemble(&back)?;
        packet::verify_checksums(&whole)?;
        let p = packet::parse(&whole)?;
        assert_eq!(p.dport, if p.proto == 1 { 777 } else { 5353 });
    }
    Ok(())
}

#[test]
fn non_pod_and_in_cluster_traffic_on_the_uplink_is_untouched() -> Result<()> {
    let mut f = fixture()?;
    let cases = [
        // the node's own traffic
        packet::tcp_frame(
            UPLINK_MAC,
            ROUTER_MAC,
            sa(NODE_IP, 5000),
            sa(EXTERNAL, 80),
            b"",
        ),
        // pod to another pod of the cluster (not SNATed)
        packet::tcp_frame(
            UPLINK_MAC,
            ROUTER_MAC,
            sa(POD_A, 5000),
            sa(REMOTE_POD, 80),
            b"",
        ),
        // VXLAN between nodes
        packet::udp_frame(
            UPLINK_MAC,
            ROUTER_MAC,
            sa(NODE_IP, 40000),
            sa(REMOTE_NODE, 4789),
            b"vx",
            false,
        ),
        packet::arp_frame(1, UPLINK_MAC, NODE_IP, [0; 6], REMOTE_NODE),
    ];
    for frame in &cases {
        let out = f.dp.test_run(Program::ToUplink, frame, f.veth_b, 1)?;
        assert_eq!((out.retval, &out.frame), (TC_ACT_OK, frame));
    }
    // Inbound to the node on a port with no NAT entry (e.g. the node's own connection).
    let inbound = packet::tcp_frame(
        ROUTER_MAC,
        UPLINK_MAC,
        sa(EXTERNAL, 80),
        sa(NODE_IP, 61001),
        b"",
    );
    let out = f.dp.test_run(Program::FromUplink, &inbound, f.veth_b, 1)?;
    assert_eq!((out.retval, &out.frame), (TC_ACT_OK, &inbound));
    // The overlay's datagrams from another node go to the VXLAN socket untouched.
    let vxlan = packet::udp_frame(
        ROUTER_MAC,
        UPLINK_MAC,
        sa(REMOTE_NODE, 40000),
        sa(NODE_IP, ferrum_datapath::bpf::VXLAN_PORT),
        b"vx",
        false,
    );
    let out = f.dp.test_run(Program::FromUplink, &vxlan, f.veth_b, 1)?;
    assert_eq!((out.retval, &out.frame), (TC_ACT_OK, &vxlan));
    assert!(f.dp.nat_entries()?.is_empty());
    Ok(())
}

#[test]
fn exhausted_nat_port_range_drops_new_flows() -> Result<()> {
    let mut f = fixture_with_ports(61000..=61001)?;
    for sport in [40000, 40001] {
        let frame = packet::tcp_frame(
            HOST_MAC_B,
            ROUTER_MAC,
            sa(POD_A, sport),
            sa(EXTERNAL, 80),
            b"",
        );
        snat(&mut f, &frame)?;
    }
    let third = packet::tcp_frame(
        HOST_MAC_B,
        ROUTER_MAC,
        sa(POD_A, 40002),
        sa(EXTERNAL, 80),
        b"",
    );
    assert_eq!(
        f.dp.test_run(Program::ToUplink, &third, f.veth_b, 1)?
            .retval,
        TC_ACT_SHOT
    );
    assert_eq!(f.drop_reason(), Some(Reason::NatNoPort));
    // The same pod port toward another remote can reuse a NAT port.
    let other_remote = packet::tcp_frame(
        HOST_MAC_B,
        ROUTER_MAC,
        sa(POD_A, 40002),
        sa(REMOTE_NODE, 80),
        b"",
    );
    snat(&mut f, &other_remote)?;
    Ok(())
}

/// A SNAT port stays with its flow while the flow lives and goes to a new flow once the old
/// one has expired: 60 s without an answer, 6 h once answered, 10 s after FIN or RST. Without
/// expiry, every port toward one remote address and port would be used up for good.
#[test]
fn snat_ports_expire_with_their_flows_and_are_reused() -> Result<()> {
    use packet::{TCP_ACK, TCP_FIN, TCP_SYN};
    let mut f = fixture_with_ports(61000..=61001)?;
    let out = |sport, flags| {
        packet::tcp_frame_flags(
            HOST_MAC_B,
            ROUTER_MAC,
            sa(POD_A, sport),
            sa(EXTERNAL, 80),
            flags,
        )
    };
    let back = |nat_port, flags| {
        packet::tcp_frame_flags(
            ROUTER_MAC,
            UPLINK_MAC,
            sa(EXTERNAL, 80),
            sa(NODE_IP, nat_port),
            flags,
        )
    };
    let refused = |f: &mut Fixture, sport| -> Result<bool> {
        let r =
            f.dp.test_run(Program::ToUplink, &out(sport, TCP_SYN), f.veth_b, 1)?;
        Ok(r.retval == TC_ACT_SHOT)
    };

    // Two ports, two flows; the one toward the same remote that follows finds none.
    let answered = snat(&mut f, &out(40000, TCP_SYN))?.sport;
    let unanswered = snat(&mut f, &out(40001, TCP_SYN))?.sport;
    assert!(refused(&mut f, 40002)?);
    let reply = f.dp.test_run(
        Program::FromUplink,
        &back(answered, TCP_SYN | TCP_ACK),
        f.veth_b,
        1,
    )?;
    assert_eq!(reply.retval, TC_ACT_REDIRECT);
    let state: Vec<_> =
        f.dp.nat_entries()?
            .iter()
            .map(|e| (e.pod.port(), e.replied, e.closing))
            .collect();
    assert_eq!(state, vec![(40000, true, false), (40001, false, false)]);

    // A minute later the unanswered flow has expired and its port goes to the new flow; the
    // answered one keeps its port and its replies.
    node::age_nat_entries(&f, "ferrum_nat_rev", 61)?;
    assert_eq!(snat(&mut f, &out(40002, TCP_SYN))?.sport, unanswered);
    assert!(refused(&mut f, 40003)?);
    let reply =
        f.dp.test_run(Program::FromUplink, &back(answered, TCP_ACK), f.veth_b, 1)?;
    assert_eq!(reply.retval, TC_ACT_REDIRECT);
    assert_eq!(packet::parse(&reply.frame)?.dport, 40000);

    // Packets keep a flow alive: 40002 sends again before aging, so it is not taken.
    node::age_nat_entries(&f, "ferrum_nat_rev", 50)?;
    assert_eq!(snat(&mut f, &out(40002, TCP_ACK))?.sport, unanswered);
    node::age_nat_entries(&f, "ferrum_nat_rev", 30)?;
    assert!(refused(&mut f, 40003)?, "40002 was seen 30 s ago");

    // The answered flow closes: 10 s after its FIN its port is free again.
    snat(&mut f, &out(40000, TCP_FIN | TCP_ACK))?;
    assert!(
        f.dp.nat_entries()?
            .iter()
            .any(|e| e.pod.port() == 40000 && e.closing)
    );
    node::age_nat_entries(&f, "ferrum_nat_rev", 5)?;
    assert!(refused(&mut f, 40003)?, "closing, but only 5 s ago");
    node::age_nat_entries(&f, "ferrum_nat_rev", 6)?;
    assert_eq!(snat(&mut f, &out(40003, TCP_SYN))?.sport, answered);
    Ok(())
}

#[test]
fn trace_events_are_off_unless_configured() -> Result<()> {
    let mut f = fixture()?;
    let mut cfg = config(f.veth_b, NAT_PORTS);
    cfg.trace = false;
    f.dp.set_config(&cfg)?;
    let frame = packet::tcp_frame(MAC_A, HOST_MAC_A, sa(POD_A, 40000), sa(POD_B, 80), b"");
    assert_eq!(
        f.dp.test_run(Program::FromPod, &frame, f.veth_a, 1)?.retval,
        TC_ACT_REDIRECT
    );
    assert!(f.events.poll(Duration::from_millis(50))?.is_empty());
    // Drops are reported regardless.
    let spoofed = packet::tcp_frame(MAC_A, HOST_MAC_A, sa(POD_B, 40000), sa(EXTERNAL, 80), b"");
    f.dp.test_run(Program::FromPod, &spoofed, f.veth_a, 1)?;
    assert_eq!(f.drop_reason(), Some(Reason::SpoofedIp));
    Ok(())
}

/// VNet mode: a pod of another node has an address inside this node's range (the pod subnet)
/// and an ipcache /32 without a tunnel: the packet goes to the node's stack unchanged, which
/// routes it on the underlay; an address of the range that nobody holds is still dropped.
#[test]
fn vnet_remote_pod_without_tunnel_goes_to_the_underlay_unencapsulated() -> Result<()> {
    let mut f = fixture()?;
    let remote_pod = Ipv4Addr::new(10, 1, 0, 50);
    f.dp.upsert_ipcache(
        "10.1.0.50/32".parse()?,
        &IpcacheEntry {
            tunnel_endpoint: None,
            kind: PeerKind::RemotePodBlock,
        },
    )?;
    let frame = packet::tcp_frame(MAC_A, HOST_MAC_A, sa(POD_A, 40000), sa(remote_pod, 80), b"");
    let out = f.dp.test_run(Program::FromPod, &frame, f.veth_a, 1)?;
    assert_eq!(out.retval, TC_ACT_OK);
    assert_eq!(out.frame, frame, "no encapsulation, no rewrite");
    let events = f.events();
    assert!(
        events.iter().any(|e| e.reason == Reason::ToStack),
        "{events:?}"
    );
    assert!(
        events.iter().all(|e| e.kind != EventKind::Drop),
        "{events:?}"
    );

    let unheld = packet::tcp_frame(
        MAC_A,
        HOST_MAC_A,
        sa(POD_A, 40000),
        sa(Ipv4Addr::new(10, 1, 0, 51), 80),
        b"",
    );
    assert_eq!(
        f.dp.test_run(Program::FromPod, &unheld, f.veth_a, 1)?
            .retval,
        TC_ACT_SHOT
    );
    assert_eq!(f.drop_reason(), Some(Reason::UnknownEndpoint));
    Ok(())
}

/// to_pod on the node's host device: what the host stack routes to a local pod is handed to
/// the pod's veth, MACs as if routed out of it; an address no pod holds and non-IPv4 are
/// dropped with their reasons (the device itself would discard them silently).
#[test]
fn host_device_hands_host_traffic_to_the_pod_veth() -> Result<()> {
    let mut f = fixture()?;
    let dev_mac = [0x02, 0xee, 0, 0, 0, 1];
    let probe = packet::tcp_frame(dev_mac, dev_mac, sa(NODE_IP, 50000), sa(POD_B, 8080), b"");
    let out = f.dp.test_run(Program::ToPod, &probe, f.veth_a, 1)?;
    assert_eq!(out.retval, TC_ACT_REDIRECT);
    let p = packet::parse(&out.frame)?;
    assert_eq!((p.eth_dst, p.eth_src), (MAC_B, HOST_MAC_B));
    assert_eq!(out.frame[12..], probe[12..], "only the MACs change");
    let events = f.events();
    assert!(
        events
            .iter()
            .any(|e| e.reason == Reason::ToEndpoint && e.dst == sa(POD_B, 8080)),
        "{events:?}"
    );

    let unheld = packet::tcp_frame(
        dev_mac,
        dev_mac,
        sa(NODE_IP, 50000),
        sa(Ipv4Addr::new(10, 1, 0, 99), 80),
        b"",
    );
    assert_eq!(
        f.dp.test_run(Program::ToPod, &unheld, f.veth_a, 1)?.retval,
        TC_ACT_SHOT
    );
    assert_eq!(f.drop_reason(), Some(Reason::UnknownEndpoint));

    let mut ipv6 = probe.clone();
    ipv6[12..14].copy_from_slice(&[0x86, 0xdd]);
    assert_eq!(
        f.dp.test_run(Program::ToPod, &ipv6, f.veth_a, 1)?.retval,
        TC_ACT_SHOT
    );
    assert_eq!(f.drop_reason(), Some(Reason::UnsupportedL3));
    Ok(())
}

/// VNet mode (no overlay device): other nodes' pods arrive natively on the uplink and go
/// straight into the local pod; the node's own traffic still goes to the stack.
#[test]
fn vnet_uplink_delivers_straight_to_local_pods() -> Result<()> {
    let mut f = fixture()?;
    f.dp.set_config(&NodeConfig {
        overlay_ifindex: 0,
        ..config(f.veth_b, NAT_PORTS)
    })?;
    let from_remote = packet::tcp_frame(
        UPLINK_MAC,
        ROUTER_MAC,
        sa(REMOTE_POD, 3333),
        sa(POD_B, 80),
        b"",
    );
    let out =
        f.dp.test_run(Program::FromUplink, &from_remote, f.veth_b, 1)?;
    assert_eq!(out.retval, TC_ACT_REDIRECT);
    let p = packet::parse(&out.frame)?;
    assert_eq!((p.eth_dst, p.eth_src), (MAC_B, HOST_MAC_B));
    assert_eq!(out.frame[12..], from_remote[12..], "only the MACs change");

    let to_node = packet::tcp_frame(
        UPLINK_MAC,
        ROUTER_MAC,
        sa(REMOTE_POD, 3333),
        sa(NODE_IP, 22),
        b"",
    );
    let out = f.dp.test_run(Program::FromUplink, &to_node, f.veth_b, 1)?;
    assert_eq!((out.retval, &out.frame), (TC_ACT_OK, &to_node));
    Ok(())
}
