//! BPF_PROG_TEST_RUN tests of the service load balancer: lookup per protocol and scope, DNAT to
//! local and remote backends, reverse translation of replies (same node and across the
//! overlay), connection stickiness, the no-backend reject and hairpin SNAT. Root only.

mod bpf_support;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use anyhow::{Context, Result};
use bpf_support::node::{
    self, Fixture, HOST_MAC_A, HOST_MAC_B, MAC_A, MAC_B, NODE_IP, POD_A, POD_B, REMOTE_NODE,
    REMOTE_POD, sa,
};
use ferrum_datapath::bpf::packet::{self, Mac, PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use ferrum_datapath::bpf::{
    EventKind, LbBackend, LbFrontendKey, LbService, MAGLEV_CHUNK, MAGLEV_SIZE, Program, Reason,
    TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 20);
const HAIRPIN: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);

fn fixture() -> Result<Fixture> {
    node::fixture("fe-bpflb", node::NAT_PORTS)
}

fn internal(port: u16, proto: u8) -> LbFrontendKey {
    LbFrontendKey {
        addr: VIP,
        port,
        proto,
        scope: 0,
    }
}

impl Fixture {
    /// Installs a frontend with `backends` in slots 1..n.
    fn service(&mut self, key: LbFrontendKey, id: u32, backends: &[SocketAddrV4]) -> Result<()> {
        for (i, b) in backends.iter().enumerate() {
            self.dp.upsert_lb_backend(
                id,
                i as u32 + 1,
                &LbBackend {
                    addr: *b.ip(),
                    port: b.port(),
                },
            )?;
        }
        self.dp.upsert_lb_service(
            &key,
            &LbService {
                id,
                count: backends.len() as u16,
                ..LbService::default()
            },
        )?;
        Ok(())
    }

    fn reasons(&mut self) -> Vec<(EventKind, Reason)> {
        self.events
            .poll(Duration::from_millis(200))
            .expect("poll events")
            .into_iter()
            .map(|e| (e.kind, e.reason))
            .collect()
    }
}

#[test]
fn tcp_to_cluster_ip_is_dnated_to_a_local_backend_and_the_reply_is_translated_back() -> Result<()> {
    let mut f = fixture()?;
    f.service(internal(80, PROTO_TCP), 1, &[sa(POD_B, 8080)])?;
    let syn = packet::tcp_frame(MAC_A, HOST_MAC_A, sa(POD_A, 40000), sa(VIP, 80), b"hi");
    let out = f.dp.test_run(Program::FromPod, &syn, f.veth_a, 1)?;
    assert_eq!(out.retval, TC_ACT_REDIRECT);
    let p = packet::parse(&out.frame)?;
    assert_eq!(
        (p.src, p.sport, p.dst, p.dport),
        (POD_A, 40000, POD_B, 8080)
    );
    assert_eq!(
        (p.eth_dst, p.eth_src),
        (MAC_B, HOST_MAC_B),
        "delivered to B"
    );
    packet::verify_checksums(&out.frame)?;
    let ct = f.dp.lb_conntrack()?;
    assert_eq!(ct.len(), 1);
    assert_eq!(
        (ct[0].client, ct[0].frontend, ct[0].backend, ct[0].snat),
        (sa(POD_A, 40000), sa(VIP, 80), sa(POD_B, 8080), None)
    );
    let reasons = f.reasons();
    assert!(
        reasons.contains(&(EventKind::Trace, Reason::LbDnat)),
        "{reasons:?}"
    );

    let reply = packet::tcp_frame(MAC_B, HOST_MAC_B, sa(POD_B, 8080), sa(POD_A, 40000), b"ok");
    let out = f.dp.test_run(Program::FromPod, &reply, f.veth_b, 1)?;
    assert_eq!(out.retval, TC_ACT_REDIRECT);
    let p = packet::parse(&out.frame)?;
    assert_eq!((p.src, p.sport, p.dst, p.dport), (VIP, 80, POD_A, 40000));
    assert_eq!(p.eth_dst, MAC_A);
    packet::verify_checksums(&out.frame)?;
    assert!(f.reasons().contains(&(EventKind::Trace, Reason::LbRevDnat)));
    Ok(())
}

#[test]
fn remote_backend_goes_through_the_overlay_and_its_reply_is_translated_on_arrival() -> Result<()> {
    let mut f = fixture()?;
    f.service(internal(53, PROTO_UDP), 4, &[sa(REMOTE_POD, 5353)])?;
    let q = packet::udp_frame(MAC_A, HOST_MAC_A, sa(POD_A, 33000), sa(VIP, 53), b"q", true);
    let out = f.dp.test_run(Program::FromPod, &q, f.veth_a, 1)?;
    assert_eq!(
        out.retval, TC_ACT_REDIRECT,
        "wrapped in VXLAN, out of the uplink"
    );
    let (_, _, inner) = packet::vxlan_inner(&out.frame)?;
    let p = packet::parse(&inner)?;
    assert_eq!((p.dst, p.dport), (REMOTE_POD, 5353));
    packet::verify_checksums(&inner)?;
    assert!(f.reasons().contains(&(EventKind::Trace, Reason::ToOverlay)));

    // The reply arrives decapsulated on the overlay device.
    let reply = packet::udp_frame(
        [0x02, 0xbb, 0, 0, 0, 1],
        [0x02, 0xbb, 0, 0, 0, 2],
        sa(REMOTE_POD, 5353),
        sa(POD_A, 33000),
        b"answer",
        true,
    );
    let out = f.dp.test_run(Program::FromOverlay, &reply, f.veth_b, 1)?;
    assert_eq!(out.retval, TC_ACT_REDIRECT);
    let p = packet::parse(&out.frame)?;
    assert_eq!((p.src, p.sport, p.dst, p.dport), (VIP, 53, POD_A, 33000));
    assert_eq!(p.eth_dst, MAC_A);
    packet::verify_checksums(&out.frame)?;
    Ok(())
}

/// VNet mode: the remote backend is reached natively and its reply arrives on the uplink,
/// where it is translated back to the frontend and delivered straight to the client.
#[test]
fn vnet_remote_backend_reply_is_translated_on_the_uplink() -> Result<()> {
    let mut f = fixture()?;
    f.dp.set_config(&ferrum_datapath::bpf::NodeConfig {
        overlay_ifindex: 0,
        ..node::config(f.veth_b, node::NAT_PORTS)
    })?;
    let remote_backend = Ipv4Addr::new(10, 1, 0, 50);
    f.dp.upsert_ipcache(
        "10.1.0.50/32".parse()?,
        &ferrum_datapath::bpf::IpcacheEntry {
            tunnel_endpoint: None,
            kind: ferrum_datapath::bpf::PeerKind::RemotePodBlock,
        },
    )?;
    f.service(internal(80, PROTO_TCP), 5, &[sa(remote_backend, 8080)])?;
    let syn = packet::tcp_frame(MAC_A, HOST_MAC_A, sa(POD_A, 40000), sa(VIP, 80), b"");
    let out = f.dp.test_run(Program::FromPod, &syn, f.veth_a, 1)?;
    assert_eq!(out.retval, TC_ACT_OK, "to the underlay through the stack");
    let p = packet::parse(&out.frame)?;
    assert_eq!((p.dst, p.dport), (remote_backend, 8080));

    let reply = packet::tcp_frame(
        ROUTER_MAC,
        UPLINK_MAC,
        sa(remote_backend, 8080),
        sa(POD_A, 40000),
        b"ok",
    );
    let out = f.dp.test_run(Program::FromUplink, &reply, f.veth_b, 1)?;
    assert_eq!(out.retval, TC_ACT_REDIRECT);
    let p = packet::parse(&out.frame)?;
    assert_eq!((p.src, p.sport, p.dst, p.dport), (VIP, 80, POD_A, 40000));
    assert_eq!((p.eth_dst, p.eth_src), (MAC_A, HOST_MAC_A));
    packet::verify_checksums(&out.frame)?;
    assert!(f.reasons().contains(&(EventKind::Trace, Reason::LbRevDnat)));
    Ok(())
}

/// A backend's ICMP error about a balanced packet (here UDP port unreachable) reaches the
/// client as the frontend's: outer source and quoted destination are the VIP again, so the
/// client's socket, connected to the VIP, gets the error.
#[test]
fn backend_icmp_errors_reach_the_client_from_the_frontend() -> Result<()> {
    let mut f = fixture()?;
    f.service(internal(53, PROTO_UDP), 4, &[sa(POD_B, 5353)])?;
    f.service(internal(54, PROTO_UDP), 5, &[sa(REMOTE_POD, 5353)])?;
    // Same node; across the overlay; and (VNet) through the host stack to the host device.
    for (vport, backend, program) in [
        (53, POD_B, Program::FromPod),
        (54, REMOTE_POD, Program::FromOverlay),
        (54, REMOTE_POD, Program::ToPod),
    ] {
        let q = packet::udp_frame(
            MAC_A,
            HOST_MAC_A,
            sa(POD_A, 33000),
            sa(VIP, vport),
            b"q",
            true,
        );
        let out = f.dp.test_run(Program::FromPod, &q, f.veth_a, 1)?;
        assert_eq!(out.retval, TC_ACT_REDIRECT);
        // What the backend received, quoted whole in its port unreachable.
        let icmp = packet::icmp_error(3, 3, [0; 4], &packet::decapsulated(&out.frame)[14..]);
        let error = packet::ethernet(
            HOST_MAC_B,
            MAC_B,
            0x0800,
            &packet::ipv4(backend, POD_A, PROTO_ICMP, &icmp),
        );
        let out = f.dp.test_run(program, &error, f.veth_b, 1)?;
        assert_eq!(out.retval, TC_ACT_REDIRECT, "into the client");
        packet::verify_checksums(&out.frame)?;
        let p = packet::parse(&out.frame)?;
        assert_eq!((p.src, p.dst, p.icmp_type), (VIP, POD_A, Some(3)));
        assert_eq!(p.eth_dst, MAC_A);
        assert_eq!(
            &out.frame[14 + 20 + 8..],
            &q[14..],
            "the quote is the client's own datagram to the VIP"
        );
    }
    Ok(())
}

#[test]
fn udp_without_checksum_keeps_none_after_translation() -> Result<()> {
    let mut f = fixture()?;
    f.service(internal(53, PROTO_UDP), 4, &[sa(POD_B, 5353)])?;
    let q = packet::udp_frame(
        MAC_A,
        HOST_MAC_A,
        sa(POD_A, 33000),
        sa(VIP, 53),
        b"q",
        false,
    );
    let out = f.dp.test_run(Program::FromPod, &q, f.veth_a, 1)?;
    assert_eq!(out.retval, TC_ACT_REDIRECT);
    let udp_csum = &out.frame[14 + 20 + 6..14 + 20 + 8];
    assert_eq!(udp_csum, [0, 0], "no checksum stays no checksum");
    packet::verify_checksums(&out.frame)?;
    Ok(())
}

/// Runs `program` on each fragment; all must be redirected. Returns what came out.
fn run_fragments(f: &mut Fixture, program: Program, frags: &[Vec<u8>]) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for (i, frag) in frags.iter().enumerate() {
        let run = f.dp.test_run(program, frag, f.veth_a, 1)?;
        assert_eq!(run.retval, TC_ACT_REDIRECT, "fragment {i}");
        out.push(run.frame);
    }
    Ok(out)
}

/// Only a datagram's first fragment has the UDP header; the later ones must follow it to the
/// same backend (and back from it) by the IP id, or a large UDP request to a Service never
/// reassembles.
#[test]
fn fragmented_datagrams_are_translated_whole_both_ways() -> Result<()> {
    let mut f = fixture()?;
    f.service(internal(53, PROTO_UDP), 4, &[sa(REMOTE_POD, 5353)])?;
    let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
    let q = packet::udp_frame(
        MAC_A,
        HOST_MAC_A,
        sa(POD_A, 33000),
        sa(VIP, 53),
        &payload,
        true,
    );
    let frags = packet::fragment(&q, 0x4242, 1400);
    assert_eq!(frags.len(), 3);
    let out: Vec<Vec<u8>> = run_fragments(&mut f, Program::FromPod, &frags)?
        .iter()
        .map(|frame| packet::decapsulated(frame))
        .collect();
    for frame in &out {
        let p = packet::parse(frame)?;
        assert_eq!(
            (p.src, p.dst),
            (POD_A, REMOTE_POD),
            "every fragment to the backend"
        );
        assert_eq!(packet::fragment_info(frame)?.0, 0x4242);
    }
    let whole = packet::reassemble(&out)?;
    packet::verify_checksums(&whole)?;
    let p = packet::parse(&whole)?;
    assert_eq!((p.sport, p.dport), (33000, 5353));
    assert_eq!(whole[14 + 20 + 8..], payload[..], "payload untouched");

    // The backend's large answer, fragmented, comes back from the frontend.
    let answer = packet::udp_frame(
        [0x02, 0xbb, 0, 0, 0, 1],
        [0x02, 0xbb, 0, 0, 0, 2],
        sa(REMOTE_POD, 5353),
        sa(POD_A, 33000),
        &payload,
        true,
    );
    let out = run_fragments(
        &mut f,
        Program::FromOverlay,
        &packet::fragment(&answer, 7, 1400),
    )?;
    for frame in &out {
        let p = packet::parse(frame)?;
        assert_eq!((p.src, p.dst, p.eth_dst), (VIP, POD_A, MAC_A));
    }
    let whole = packet::reassemble(&out)?;
    packet::verify_checksums(&whole)?;
    let p = packet::parse(&whole)?;
    assert_eq!((p.sport, p.dport), (53, 33000));

    // A later fragment whose first one never passed has no ports: nothing translates it.
    let orphan = packet::fragment(&q, 0x4343, 1400).remove(1);
    let out = f.dp.test_run(Program::FromPod, &orphan, f.veth_a, 1)?;
    assert_eq!(packet::parse(&out.frame)?.dst, VIP);
    Ok(())
}

#[test]
fn a_flow_sticks_to_its_backend_and_new_flows_spread_randomly() -> Result<()> {
    let mut f = fixture()?;
    let backends = [sa(POD_B, 8080), sa(REMOTE_POD, 8080)];
    f.service(internal(80, PROTO_TCP), 2, &backends)?;
    let run = |f: &mut Fixture, sport: u16| -> Result<SocketAddrV4> {
        let frame = packet::tcp_frame(MAC_A, HOST_MAC_A, sa(POD_A, sport), sa(VIP, 80), b"");
        let out = f.dp.test_run(Program::FromPod, &frame, f.veth_a, 1)?;
        let p = packet::parse(&packet::decapsulated(&out.frame))?;
        Ok(sa(p.dst, p.dport))
    };
    let first = run(&mut f, 40000)?;
    for _ in 0..20 {
        assert_eq!(run(&mut f, 40000)?, first, "same connection, same backend");
    }
    let seen: BTreeSet<SocketAddrV4> = (0..64)
        .map(|i| run(&mut f, 41000 + i))
        .collect::<Result<_>>()?;
    assert_eq!(
        seen,
        backends.into_iter().collect(),
        "64 new flows reach both backends"
    );
    Ok(())
}

#[test]
fn purged_conntrack_sends_the_flow_to_a_remaining_backend() -> Result<()> {
    let mut f = fixture()?;
    f.service(internal(80, PROTO_TCP), 2, &[sa(REMOTE_POD, 8080)])?;
    let frame = packet::tcp_frame(MAC_A, HOST_MAC_A, sa(POD_A, 40000), sa(VIP, 80), b"");
    f.dp.test_run(Program::FromPod, &frame, f.veth_a, 1)?;
    // The backend goes; the agent rewrites the slot and purges the flows that used it.
    f.service(internal(80, PROTO_TCP), 2, &[sa(POD_B, 8080)])?;
    for ct in f.dp.lb_conntrack()? {
        f.dp.remove_lb_conntrack(&ct)?;
    }
    assert!(
        f.dp.lb_reverse(PROTO_TCP, sa(REMOTE_POD, 8080), sa(POD_A, 40000))?
            .is_none()
    );
    let out = f.dp.test_run(Program::FromPod, &frame, f.veth_a, 1)?;
    let p = packet::parse(&out.frame)?;
    assert_eq!((p.dst, p.dport), (POD_B, 8080));
    Ok(())
}

#[test]
fn the_protocol_is_part_of_the_key() -> Result<()> {
    let mut f = fixture()?;
    f.service(internal(53, PROTO_TCP), 1, &[sa(POD_B, 1053)])?;
    f.service(internal(53, PROTO_UDP), 2, &[sa(REMOTE_POD, 2053)])?;
    let tcp = packet::tcp_frame(MAC_A, HOST_MAC_A, sa(POD_A, 40000), sa(VIP, 53), b"");
    let udp = packet::udp_frame(MAC_A, HOST_MAC_A, sa(POD_A, 40000), sa(VIP, 53), b"", true);
    let p = packet::parse(&f.dp.test_run(Program::FromPod, &tcp, f.veth_a, 1)?.frame)?;
    assert_eq!((p.dst, p.dport), (POD_B, 1053));
    let p = packet::parse(&packet::decapsulated(
        &f.dp.test_run(Program::FromPod, &udp, f.veth_a, 1)?.frame,
    ))?;
    assert_eq!((p.dst, p.dport), (REMOTE_POD, 2053));
    Ok(())
}

#[test]
fn external_scope_frontends_are_not_used_for_pod_traffic() -> Result<()> {
    let mut f = fixture()?;
    let key = LbFrontendKey {
        scope: 1,
        ..internal(80, PROTO_TCP)
    };
    f.service(key, 1, &[sa(POD_B, 8080)])?;
    let frame = packet::tcp_frame(MAC_A, HOST_MAC_A, sa(POD_A, 40000), sa(VIP, 80), b"");
    let out = f.dp.test_run(Program::FromPod, &frame, f.veth_a, 1)?;
    assert_eq!(
        out.retval, TC_ACT_OK,
        "not a Service for pods: to the stack"
    );
    assert_eq!(out.frame, frame);
    Ok(())
}

#[test]
fn no_backend_answers_with_icmp_port_unreachable_from_the_service() -> Result<()> {
    let mut f = fixture()?;
    f.service(internal(80, PROTO_TCP), 1, &[])?;
    f.service(internal(53, PROTO_UDP), 2, &[])?;
    let frames = [
        packet::tcp_frame(MAC_A, HOST_MAC_A, sa(POD_A, 40000), sa(VIP, 80), b""),
        packet::udp_frame(MAC_A, HOST_MAC_A, sa(POD_A, 40000), sa(VIP, 53), b"x", true),
    ];
    for frame in frames {
        let out = f.dp.test_run(Program::FromPod, &frame, f.veth_a, 1)?;
        assert_eq!(out.retval, TC_ACT_REDIRECT, "sent back into the client pod");
        let p = packet::parse(&out.frame)?;
        assert_eq!((p.src, p.dst, p.proto), (VIP, POD_A, PROTO_ICMP));
        assert_eq!((p.eth_dst, p.eth_src), (MAC_A, HOST_MAC_A));
        packet::verify_checksums(&out.frame)?;
        let icmp = &out.frame[14 + 20..];
        assert_eq!((icmp[0], icmp[1]), (3, 3), "destination port unreachable");
        assert_eq!(
            &icmp[8..8 + 28],
            &frame[14..14 + 28],
            "quotes the original IP header and 8 bytes of its payload"
        );
        assert_eq!(out.frame.len(), 14 + 20 + 8 + 28);
        let reasons = f.reasons();
        assert!(
            reasons.contains(&(EventKind::Drop, Reason::NoBackend)),
            "{reasons:?}"
        );
    }
    assert!(
        f.dp.lb_conntrack()?.is_empty(),
        "nothing tracked for a reject"
    );
    Ok(())
}

#[test]
fn a_pod_reaching_itself_through_its_service_is_hairpin_snatted() -> Result<()> {
    let mut f = fixture()?;
    f.service(internal(80, PROTO_TCP), 1, &[sa(POD_A, 8080)])?;
    let syn = packet::tcp_frame(MAC_A, HOST_MAC_A, sa(POD_A, 40000), sa(VIP, 80), b"me");
    let out = f.dp.test_run(Program::FromPod, &syn, f.veth_a, 1)?;
    assert_eq!(out.retval, TC_ACT_REDIRECT);
    let p = packet::parse(&out.frame)?;
    assert_eq!(
        (p.src, p.sport, p.dst, p.dport),
        (HAIRPIN, 40000, POD_A, 8080),
        "the pod must not see its own address as the source"
    );
    assert_eq!(p.eth_dst, MAC_A);
    packet::verify_checksums(&out.frame)?;
    assert_eq!(f.dp.lb_conntrack()?[0].snat, Some(sa(HAIRPIN, 40000)));

    let reply = packet::tcp_frame(MAC_A, HOST_MAC_A, sa(POD_A, 8080), sa(HAIRPIN, 40000), b"");
    let out = f.dp.test_run(Program::FromPod, &reply, f.veth_a, 1)?;
    assert_eq!(out.retval, TC_ACT_REDIRECT);
    let p = packet::parse(&out.frame)?;
    assert_eq!((p.src, p.sport, p.dst, p.dport), (VIP, 80, POD_A, 40000));
    packet::verify_checksums(&out.frame)?;
    Ok(())
}

const EXTERNAL: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const ROUTER_MAC: Mac = [0x02, 0x10, 0, 0, 0, 0x01];
const UPLINK_MAC: Mac = [0x02, 0x10, 0, 0, 0, 0x0a];

fn node_port(f: &mut Fixture, masquerade: bool, backends: &[SocketAddrV4]) -> Result<()> {
    let key = LbFrontendKey {
        addr: NODE_IP,
        port: 30080,
        proto: PROTO_TCP,
        scope: 1,
    };
    f.service(key, 7, backends)?;
    f.dp.upsert_lb_service(
        &key,
        &LbService {
            id: 7,
            count: backends.len() as u16,
            masquerade,
            ..LbService::default()
        },
    )?;
    Ok(())
}

#[test]
fn node_port_with_cluster_policy_masquerades_and_replies_leave_by_the_uplink() -> Result<()> {
    let mut f = fixture()?;
    node_port(&mut f, true, &[sa(REMOTE_POD, 8080)])?;
    let syn = packet::tcp_frame(
        ROUTER_MAC,
        UPLINK_MAC,
        sa(EXTERNAL, 50000),
        sa(NODE_IP, 30080),
        b"",
    );
    let out = f.dp.test_run(Program::FromUplink, &syn, f.veth_b, 1)?;
    assert_eq!(
        out.retval, TC_ACT_REDIRECT,
        "tunnelled to the backend's node"
    );
    let (outer, _, inner) = packet::vxlan_inner(&out.frame)?;
    assert_eq!(
        outer.dst, REMOTE_NODE,
        "wrapped in VXLAN to the backend's node"
    );
    let p = packet::parse(&inner)?;
    assert_eq!((p.src, p.dst, p.dport), (NODE_IP, REMOTE_POD, 8080));
    assert!((61000..=65535).contains(&p.sport), "SNAT port {}", p.sport);
    packet::verify_checksums(&inner)?;
    let nat_port = p.sport;
    assert_eq!(
        f.dp.lb_reverse(PROTO_TCP, sa(REMOTE_POD, 8080), sa(NODE_IP, nat_port))?,
        Some((sa(NODE_IP, 30080), Some(sa(EXTERNAL, 50000))))
    );

    let reply = packet::tcp_frame(
        [0x02, 0xbb, 0, 0, 0, 1],
        [0x02, 0xbb, 0, 0, 0, 2],
        sa(REMOTE_POD, 8080),
        sa(NODE_IP, nat_port),
        b"",
    );
    let out = f.dp.test_run(Program::FromOverlay, &reply, f.veth_b, 1)?;
    assert_eq!(out.retval, TC_ACT_REDIRECT, "straight out of the uplink");
    let p = packet::parse(&out.frame)?;
    assert_eq!(
        (p.src, p.sport, p.dst, p.dport),
        (NODE_IP, 30080, EXTERNAL, 50000)
    );
    packet::verify_checksums(&out.frame)?;
    Ok(())
}

/// Masqueraded external clients (externalTrafficPolicy=Cluster) hold a port on the node IP per
/// flow; once a flow has expired its port goes to a new client. Without expiry the ports toward
/// one backend would run out after as many connections as the range has ports.
#[test]
fn masqueraded_clients_release_their_node_ports_when_their_flows_expire() -> Result<()> {
    let mut f = node::fixture("fe-bpflb", 61000..=61001)?;
    node_port(&mut f, true, &[sa(REMOTE_POD, 8080)])?;
    let connect = |f: &mut Fixture, port| -> Result<i32> {
        let syn = packet::tcp_frame(
            ROUTER_MAC,
            UPLINK_MAC,
            sa(EXTERNAL, port),
            sa(NODE_IP, 30080),
            b"",
        );
        Ok(f.dp
            .test_run(Program::FromUplink, &syn, f.veth_b, 1)?
            .retval)
    };
    let snat_port = |f: &Fixture, client| -> Result<u16> {
        let ct = f.dp.lb_conntrack()?;
        let e = ct.iter().find(|e| e.client == sa(EXTERNAL, client));
        Ok(e.and_then(|e| e.snat).context("masqueraded")?.port())
    };

    assert_eq!(
        connect(&mut f, 50000)?,
        TC_ACT_REDIRECT,
        "to the backend's node"
    );
    assert_eq!(connect(&mut f, 50001)?, TC_ACT_REDIRECT);
    assert_eq!(connect(&mut f, 50002)?, TC_ACT_SHOT, "both ports held");
    assert!(f.reasons().contains(&(EventKind::Drop, Reason::NatNoPort)));

    // A minute on, neither flow has had an answer: their ports are free again.
    node::age_nat_entries(&f, "ferrum_lb_snat_seen", 61)?;
    assert_eq!(connect(&mut f, 50002)?, TC_ACT_REDIRECT);
    let answered = snat_port(&f, 50002)?;
    // The backend answers through the overlay; that flow keeps its port for hours.
    let reply = packet::tcp_frame(
        [0x02, 0xbb, 0, 0, 0, 1],
        [0x02, 0xbb, 0, 0, 0, 2],
        sa(REMOTE_POD, 8080),
        sa(NODE_IP, answered),
        b"",
    );
    assert_eq!(
        f.dp.test_run(Program::FromOverlay, &reply, f.veth_b, 1)?
            .retval,
        TC_ACT_REDIRECT
    );
    node::age_nat_entries(&f, "ferrum_lb_snat_seen", 61)?;
    assert_eq!(
        connect(&mut f, 50003)?,
        TC_ACT_REDIRECT,
        "the other, expired port"
    );
    assert_ne!(snat_port(&f, 50003)?, answered);
    assert_eq!(
        connect(&mut f, 50004)?,
        TC_ACT_SHOT,
        "the answered flow's port is kept"
    );
    Ok(())
}

#[test]
fn node_port_with_local_policy_keeps_the_client_address() -> Result<()> {
    let mut f = fixture()?;
    node_port(&mut f, false, &[sa(POD_B, 8080)])?;
    let syn = packet::tcp_frame(
        ROUTER_MAC,
        UPLINK_MAC,
        sa(EXTERNAL, 50000),
        sa(NODE_IP, 30080),
        b"",
    );
    let out = f.dp.test_run(Program::FromUplink, &syn, f.veth_b, 1)?;
    assert_eq!(out.retval, TC_ACT_REDIRECT);
    let p = packet::parse(&out.frame)?;
    assert_eq!(
        (p.src, p.sport, p.dst, p.dport),
        (EXTERNAL, 50000, POD_B, 8080),
        "the backend sees the real client"
    );
    assert_eq!(p.eth_dst, MAC_B);
    packet::verify_checksums(&out.frame)?;

    let reply = packet::tcp_frame(MAC_B, HOST_MAC_B, sa(POD_B, 8080), sa(EXTERNAL, 50000), b"");
    let out = f.dp.test_run(Program::FromPod, &reply, f.veth_b, 1)?;
    assert_eq!(
        out.retval, TC_ACT_REDIRECT,
        "out of the uplink, not via the stack"
    );
    let p = packet::parse(&out.frame)?;
    assert_eq!(
        (p.src, p.sport, p.dst, p.dport),
        (NODE_IP, 30080, EXTERNAL, 50000)
    );
    packet::verify_checksums(&out.frame)?;
    Ok(())
}

#[test]
fn external_client_without_backend_is_refused_and_other_uplink_traffic_is_untouched() -> Result<()>
{
    let mut f = fixture()?;
    node_port(&mut f, false, &[])?;
    let syn = packet::tcp_frame(
        ROUTER_MAC,
        UPLINK_MAC,
        sa(EXTERNAL, 50000),
        sa(NODE_IP, 30080),
        b"",
    );
    let out = f.dp.test_run(Program::FromUplink, &syn, f.veth_b, 1)?;
    assert_eq!(out.retval, TC_ACT_REDIRECT);
    let p = packet::parse(&out.frame)?;
    assert_eq!((p.src, p.dst, p.proto), (NODE_IP, EXTERNAL, PROTO_ICMP));
    packet::verify_checksums(&out.frame)?;
    // Another port on the node IP is the node's own business.
    let other = packet::tcp_frame(
        ROUTER_MAC,
        UPLINK_MAC,
        sa(EXTERNAL, 50000),
        sa(NODE_IP, 22),
        b"",
    );
    let out = f.dp.test_run(Program::FromUplink, &other, f.veth_b, 1)?;
    assert_eq!((out.retval, out.frame), (TC_ACT_OK, other));
    Ok(())
}

fn backends_n(n: u8) -> Vec<SocketAddrV4> {
    (0..n)
        .map(|i| sa(Ipv4Addr::new(10, 1, 1, 10 + i), 8080))
        .collect()
}

fn install_maglev(f: &mut Fixture, id: u32, backends: &[SocketAddrV4]) -> Result<()> {
    let lb: Vec<ferrum_lb::Backend> = backends
        .iter()
        .map(|b| ferrum_lb::Backend {
            addr: *b.ip(),
            port: b.port(),
        })
        .collect();
    let table = ferrum_lb::maglev::table(&lb, ferrum_lb::maglev::TABLE_SIZE);
    for (i, chunk) in ferrum_lb::maglev::chunks(&table).iter().enumerate() {
        f.dp.upsert_lb_maglev(id, i as u32, chunk)?;
    }
    Ok(())
}

#[test]
fn maglev_picks_by_flow_hash_so_a_flow_maps_to_the_same_backend_without_conntrack() -> Result<()> {
    let mut f = fixture()?;
    let backends = backends_n(4);
    let key = internal(80, PROTO_TCP);
    f.service(key, 3, &backends)?;
    f.dp.upsert_lb_service(
        &key,
        &LbService {
            id: 3,
            count: 4,
            maglev: true,
            ..LbService::default()
        },
    )?;
    install_maglev(&mut f, 3, &backends)?;
    let mut seen = BTreeSet::new();
    for sport in 42000..42040 {
        let frame = packet::tcp_frame(MAC_A, HOST_MAC_A, sa(POD_A, sport), sa(VIP, 80), b"");
        let first = packet::parse(&packet::decapsulated(
            &f.dp.test_run(Program::FromPod, &frame, f.veth_a, 1)?.frame,
        ))?;
        // Forget the connection: Maglev alone must send the flow to the same backend.
        for ct in f.dp.lb_conntrack()? {
            f.dp.remove_lb_conntrack(&ct)?;
        }
        let again = packet::parse(&packet::decapsulated(
            &f.dp.test_run(Program::FromPod, &frame, f.veth_a, 1)?.frame,
        ))?;
        assert_eq!(
            (first.dst, first.dport),
            (again.dst, again.dport),
            "sport {sport}"
        );
        seen.insert(sa(first.dst, first.dport));
    }
    assert_eq!(
        seen.len(),
        4,
        "40 flows spread over the 4 backends: {seen:?}"
    );

    // The table decides: point every entry at slot 2 and every new flow goes there.
    for chunk in 0..(MAGLEV_SIZE as usize).div_ceil(MAGLEV_CHUNK) {
        f.dp.upsert_lb_maglev(3, chunk as u32, &[2; MAGLEV_CHUNK])?;
    }
    for sport in 43000..43010 {
        let frame = packet::tcp_frame(MAC_A, HOST_MAC_A, sa(POD_A, sport), sa(VIP, 80), b"");
        let p = packet::parse(&packet::decapsulated(
            &f.dp.test_run(Program::FromPod, &frame, f.veth_a, 1)?.frame,
        ))?;
        assert_eq!(sa(p.dst, p.dport), backends[1]);
    }
    Ok(())
}

#[test]
fn session_affinity_sends_every_new_flow_of_a_client_to_the_same_backend() -> Result<()> {
    let mut f = fixture()?;
    let backends = backends_n(4);
    let key = internal(80, PROTO_TCP);
    f.service(key, 5, &backends)?;
    f.dp.upsert_lb_service(
        &key,
        &LbService {
            id: 5,
            count: 4,
            affinity_timeout: 60,
            ..LbService::default()
        },
    )?;
    let mut seen = BTreeSet::new();
    for sport in 44000..44020 {
        let frame = packet::tcp_frame(MAC_A, HOST_MAC_A, sa(POD_A, sport), sa(VIP, 80), b"");
        let p = packet::parse(&packet::decapsulated(
            &f.dp.test_run(Program::FromPod, &frame, f.veth_a, 1)?.frame,
        ))?;
        seen.insert(sa(p.dst, p.dport));
    }
    assert_eq!(seen.len(), 1, "20 connections of one client: {seen:?}");
    let aff = f.dp.lb_affinity()?;
    assert_eq!(aff.len(), 1);
    assert_eq!((aff[0].0, aff[0].1), (5, POD_A));
    // Without the affinity record (expired or purged), new flows spread again.
    f.dp.remove_lb_affinity(5, POD_A)?;
    f.dp.upsert_lb_service(
        &key,
        &LbService {
            id: 5,
            count: 4,
            ..LbService::default()
        },
    )?;
    let mut seen = BTreeSet::new();
    for sport in 45000..45040 {
        let frame = packet::tcp_frame(MAC_A, HOST_MAC_A, sa(POD_A, sport), sa(VIP, 80), b"");
        let p = packet::parse(&packet::decapsulated(
            &f.dp.test_run(Program::FromPod, &frame, f.veth_a, 1)?.frame,
        ))?;
        seen.insert(sa(p.dst, p.dport));
    }
    assert!(seen.len() > 1);
    Ok(())
}

#[test]
fn load_balancer_source_ranges_admit_only_listed_clients() -> Result<()> {
    let mut f = fixture()?;
    let key = LbFrontendKey {
        addr: Ipv4Addr::new(198, 51, 100, 1),
        port: 80,
        proto: PROTO_TCP,
        scope: 1,
    };
    f.service(key, 6, &[sa(POD_B, 8080)])?;
    f.dp.upsert_lb_service(
        &key,
        &LbService {
            id: 6,
            count: 1,
            source_ranges: true,
            ..LbService::default()
        },
    )?;
    f.dp.upsert_lb_range(6, Ipv4Addr::new(203, 0, 113, 0), 24)?;
    // Another frontend's range must not admit anyone here.
    f.dp.upsert_lb_range(7, Ipv4Addr::new(192, 0, 2, 0), 24)?;
    assert_eq!(
        f.dp.lb_ranges()?,
        vec![
            (6, Ipv4Addr::new(203, 0, 113, 0), 24),
            (7, Ipv4Addr::new(192, 0, 2, 0), 24)
        ]
    );
    let allowed = packet::tcp_frame(
        ROUTER_MAC,
        UPLINK_MAC,
        sa(EXTERNAL, 50000),
        sa(key.addr, 80),
        b"",
    );
    let out = f.dp.test_run(Program::FromUplink, &allowed, f.veth_b, 1)?;
    assert_eq!(out.retval, TC_ACT_REDIRECT);
    assert_eq!(packet::parse(&out.frame)?.dst, POD_B);
    let denied = packet::tcp_frame(
        ROUTER_MAC,
        UPLINK_MAC,
        sa(Ipv4Addr::new(192, 0, 2, 7), 50000),
        sa(key.addr, 80),
        b"",
    );
    let out = f.dp.test_run(Program::FromUplink, &denied, f.veth_b, 1)?;
    assert_eq!(out.retval, ferrum_datapath::bpf::TC_ACT_SHOT);
    assert!(
        f.reasons()
            .contains(&(EventKind::Drop, Reason::LbSourceDenied))
    );
    Ok(())
}

/// Socket-level load balancing: a process in the hooked cgroup connects to a frontend and is
/// connected to the backend before any packet exists (TCP and connected UDP).
#[test]
fn socket_lb_translates_connect_for_processes_in_the_cgroup() -> Result<()> {
    use std::io::Write;
    let root = ferrum_datapath::cgroup::cgroup2_root().expect("cgroup v2 is mounted");
    let cg = root.join(bpf_support::unique("ferrum-test-cg"));
    ferrum_datapath::cgroup::create(&cg)?;
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = ferrum_datapath::cgroup::remove_tree(&self.0);
        }
    }
    let _cleanup = Cleanup(cg.clone());
    let mut f = fixture()?;
    f.ns.ip(&["addr", "add", "10.9.9.1/32", "dev", "lo"])?;
    f.service(
        internal(80, PROTO_TCP),
        1,
        &[sa(Ipv4Addr::new(10, 9, 9, 1), 9000)],
    )?;
    f.service(
        internal(53, PROTO_UDP),
        2,
        &[sa(Ipv4Addr::new(10, 9, 9, 1), 9053)],
    )?;
    f.dp.attach_socket_lb(&cg)?;
    // Attaching again (a restarted agent) replaces the links without a gap.
    f.dp.attach_socket_lb(&cg)?;

    // The fixture thread is in the node netns: servers bound there.
    let tcp = std::net::TcpListener::bind("10.9.9.1:9000")?;
    let udp = std::net::UdpSocket::bind("10.9.9.1:9053")?;
    let server = std::thread::spawn(move || -> Result<()> {
        let (mut s, _) = tcp.accept()?;
        s.write_all(b"backend\n")?;
        let mut buf = [0u8; 64];
        let (n, peer) = udp.recv_from(&mut buf)?;
        udp.send_to(&buf[..n], peer)?;
        Ok(())
    });
    let netns = format!("/run/netns/{}", f.ns.name);
    let script = format!(
        "echo $$ > {cg}/cgroup.procs && nc -w 3 {VIP} 80 && echo ping | nc -u -w 1 {VIP} 53",
        cg = cg.display()
    );
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={netns}"))
        .args(["sh", "-c", &script])
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout, "backend\nping\n");
    server.join().expect("server thread")?;
    Ok(())
}
