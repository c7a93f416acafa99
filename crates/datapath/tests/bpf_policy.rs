//! BPF_PROG_TEST_RUN tests of the NetworkPolicy stage: policies compiled and lowered by
//! crates/policy, installed in the maps, and judged by the programs on crafted packets:
//! ingress and egress isolation, peers by identity and by ipBlock with except, ports, SCTP,
//! replies through conntrack, the node's own probes, other nodes, Service traffic judged by
//! its backend, hairpin, and a policy change cutting an established connection. Root only.

mod bpf_support;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use anyhow::Result;
use bpf_support::node::{
    self, Fixture, HOST_MAC_A, HOST_MAC_B, MAC_A, MAC_B, NODE_IP, POD_A, POD_B, REMOTE_NODE,
    REMOTE_POD, sa,
};
use ferrum_datapath::bpf::packet::{self, ETH_P_IP, PROTO_TCP, PROTO_UDP};
use ferrum_datapath::bpf::{
    Datapath, Event, EventKind, LbBackend, LbFrontendKey, LbService, PolicyEndpoint, Program,
    Reason, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
};
use ferrum_policy::compile::Direction;
use ferrum_policy::lower::NodeMaps;
use ferrum_policy::{IdentityAllocator, Inputs, PolicyState};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;

const PROTO_SCTP: u8 = 132;
const OVERLAY_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 1];
const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 20);

fn yaml<T: serde::de::DeserializeOwned>(s: &str) -> T {
    serde_yaml::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

/// The fixture's pods as a cluster: a (app=a) and b (app=b) on this node "n1", a remote pod
/// (app=r) on "n2", all in namespace "x".
fn cluster() -> (Vec<Namespace>, Vec<Pod>, Vec<Node>) {
    let pod = |name: &str, app: &str, node: &str, ip: Ipv4Addr| -> Pod {
        yaml(&format!(
            "metadata: {{name: {name}, namespace: x, labels: {{app: {app}}}}}
spec:
  nodeName: {node}
  containers: [{{name: c, ports: [{{name: web, containerPort: 8080}}]}}]
status: {{podIP: {ip}}}"
        ))
    };
    let node = |name: &str, ip: Ipv4Addr| -> Node {
        yaml(&format!(
            "metadata: {{name: {name}}}\nstatus: {{addresses: [{{type: InternalIP, address: {ip}}}]}}"
        ))
    };
    (
        vec![yaml("metadata: {name: x}")],
        vec![
            pod("a", "a", "n1", POD_A),
            pod("b", "b", "n1", POD_B),
            pod("r", "r", "n2", REMOTE_POD),
        ],
        vec![node("n1", NODE_IP), node("n2", REMOTE_NODE)],
    )
}

/// Compiles `policies` (YAML documents) for the fixture's cluster and lowers them for n1.
fn compile(policies: &[&str]) -> (PolicyState, NodeMaps) {
    let (namespaces, pods, nodes) = cluster();
    let policies: Vec<NetworkPolicy> = policies.iter().map(|p| yaml(p)).collect();
    let state = PolicyState::compile(
        Inputs {
            namespaces: &namespaces,
            pods: &pods,
            policies: &policies,
            nodes: &nodes,
        },
        &mut IdentityAllocator::new(),
    );
    assert!(state.rejected.is_empty(), "{:?}", state.rejected);
    let maps = state.lower("n1");
    (state, maps)
}

/// Replaces whatever policy state the maps hold with `maps` (what the agent does by diff).
fn install(dp: &mut Datapath, maps: &NodeMaps) -> Result<()> {
    let old = dp.policy_maps()?;
    for (ip, _) in &old.endpoints {
        dp.remove_policy_endpoint(*ip)?;
    }
    for (len, data, _) in &old.identities {
        dp.remove_identity(*len, *data)?;
    }
    for (len, data, _) in &old.cidr_classes {
        dp.remove_policy_cidr(*len, *data)?;
    }
    for (len, data, _) in &old.rules {
        dp.remove_policy_rule(*len, *data)?;
    }
    for (len, data, id) in maps.ipcache.entries() {
        dp.upsert_identity(len, data, id)?;
    }
    for (len, data, class) in maps.cidr_classes.entries() {
        dp.upsert_policy_cidr(len, data, class)?;
    }
    for (len, data, rule) in maps.policy.entries() {
        dp.upsert_policy_rule(len, data, rule)?;
    }
    for (ip, cfg) in &maps.endpoints {
        dp.upsert_policy_endpoint(
            *ip,
            PolicyEndpoint {
                ingress_deny_rule: cfg.ingress_deny_rule,
                egress_deny_rule: cfg.egress_deny_rule,
            },
        )?;
    }
    dp.bump_policy_generation()?;
    Ok(())
}

fn fixture(policies: &[&str]) -> Result<(Fixture, PolicyState, NodeMaps)> {
    let mut f = node::fixture("fe-bpfpol", node::NAT_PORTS)?;
    let (state, maps) = compile(policies);
    install(&mut f.dp, &maps)?;
    Ok((f, state, maps))
}

fn tcp(src: SocketAddrV4, dst: SocketAddrV4, syn: bool) -> Vec<u8> {
    let (smac, dmac) = macs(*src.ip());
    let seg = packet::tcp(src, dst, syn, b"x");
    packet::ethernet(
        dmac,
        smac,
        ETH_P_IP,
        &packet::ipv4(*src.ip(), *dst.ip(), PROTO_TCP, &seg),
    )
}

fn udp(src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
    let (smac, dmac) = macs(*src.ip());
    packet::udp_frame(smac, dmac, src, dst, b"q", true)
}

/// An SCTP INIT (common header + chunk header). This kernel cannot open SCTP sockets, so the
/// only way to see SCTP policy work is a crafted packet.
fn sctp(src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
    let (smac, dmac) = macs(*src.ip());
    let mut msg = Vec::new();
    msg.extend_from_slice(&src.port().to_be_bytes());
    msg.extend_from_slice(&dst.port().to_be_bytes());
    msg.extend_from_slice(&[0; 8]); // verification tag, checksum
    msg.extend_from_slice(&[1, 0, 0, 4]); // INIT chunk header
    packet::ethernet(
        dmac,
        smac,
        ETH_P_IP,
        &packet::ipv4(*src.ip(), *dst.ip(), PROTO_SCTP, &msg),
    )
}

fn macs(src: Ipv4Addr) -> ([u8; 6], [u8; 6]) {
    match src {
        a if a == POD_A => (MAC_A, HOST_MAC_A),
        b if b == POD_B => (MAC_B, HOST_MAC_B),
        _ => (OVERLAY_MAC, OVERLAY_MAC),
    }
}

impl Fixture {
    /// Runs from_pod for a packet leaving POD_A or POD_B.
    fn leave_pod(&mut self, frame: &[u8]) -> Result<i32> {
        let src = packet::parse(frame)?.src;
        let ifindex = if src == POD_A {
            self.veth_a
        } else {
            self.veth_b
        };
        Ok(self
            .dp
            .test_run(Program::FromPod, frame, ifindex, 1)?
            .retval)
    }

    fn run(&mut self, prog: Program, frame: &[u8]) -> Result<i32> {
        Ok(self.dp.test_run(prog, frame, self.veth_b, 1)?.retval)
    }

    fn drops(&mut self) -> Vec<Event> {
        self.events
            .poll(Duration::from_millis(100))
            .expect("poll events")
            .into_iter()
            .filter(|e| e.kind == EventKind::Drop)
            .collect()
    }
}

const B_FROM_A_8080: &str = "
metadata: {name: b-from-a, namespace: x}
spec:
  podSelector: {matchLabels: {app: b}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: a}}}]
    ports: [{port: web}, {port: 9000, endPort: 9010, protocol: UDP}, {port: 80, protocol: SCTP}]
";

#[test]
fn ingress_allows_only_the_selected_peer_ports_and_protocols_and_drops_name_the_policy()
-> Result<()> {
    let (mut f, state, maps) = fixture(&[B_FROM_A_8080])?;
    let isolating = maps.endpoints[&POD_B].ingress_deny_rule;
    assert_ne!(isolating, 0);

    // The named port resolves to 8080 on b.
    assert_eq!(
        f.leave_pod(&tcp(sa(POD_A, 40000), sa(POD_B, 8080), true))?,
        TC_ACT_REDIRECT
    );
    assert_eq!(
        f.leave_pod(&tcp(sa(POD_A, 40001), sa(POD_B, 8081), true))?,
        TC_ACT_SHOT
    );
    let drops = f.drops();
    assert_eq!(drops.len(), 1, "{drops:?}");
    assert_eq!(drops[0].reason, Reason::PolicyIngress);
    assert_eq!(drops[0].rule_id, isolating);
    let rule = state.rule(isolating).expect("rule info");
    assert_eq!((rule.policy.as_str(), rule.rule), ("b-from-a", None));

    // endPort range, UDP only.
    assert_eq!(
        f.leave_pod(&udp(sa(POD_A, 5000), sa(POD_B, 9005)))?,
        TC_ACT_REDIRECT
    );
    assert_eq!(
        f.leave_pod(&udp(sa(POD_A, 5001), sa(POD_B, 9011)))?,
        TC_ACT_SHOT
    );
    assert_eq!(
        f.leave_pod(&tcp(sa(POD_A, 5002), sa(POD_B, 9005), true))?,
        TC_ACT_SHOT
    );
    // SCTP 80 is allowed, SCTP 81 and TCP 80 are not.
    assert_eq!(
        f.leave_pod(&sctp(sa(POD_A, 7000), sa(POD_B, 80)))?,
        TC_ACT_REDIRECT
    );
    assert_eq!(
        f.leave_pod(&sctp(sa(POD_A, 7001), sa(POD_B, 81)))?,
        TC_ACT_SHOT
    );
    assert_eq!(
        f.leave_pod(&tcp(sa(POD_A, 7002), sa(POD_B, 80), true))?,
        TC_ACT_SHOT
    );
    // Another pod (the remote one, over the overlay) is not selected.
    assert_eq!(
        f.run(
            Program::FromOverlay,
            &tcp(sa(REMOTE_POD, 3000), sa(POD_B, 8080), true)
        )?,
        TC_ACT_SHOT
    );
    // b itself is not egress-isolated; a is not isolated at all.
    assert_eq!(
        f.leave_pod(&tcp(sa(POD_B, 41000), sa(POD_A, 22), true))?,
        TC_ACT_REDIRECT
    );
    Ok(())
}

/// Later fragments have no ports of their own: they are judged as their first fragment's
/// flow, so a large datagram to an allowed port arrives whole and one to a denied port not at
/// all.
#[test]
fn fragments_are_judged_by_their_datagrams_ports() -> Result<()> {
    let (mut f, _, _) = fixture(&[B_FROM_A_8080])?;
    let payload = vec![0x5a; 3000];
    let datagram = |dport| {
        packet::udp_frame(
            MAC_A,
            HOST_MAC_A,
            sa(POD_A, 5000),
            sa(POD_B, dport),
            &payload,
            true,
        )
    };
    for (id, dport, verdict) in [(1, 9005, TC_ACT_REDIRECT), (2, 9011, TC_ACT_SHOT)] {
        for (i, frag) in packet::fragment(&datagram(dport), id, 1400)
            .iter()
            .enumerate()
        {
            assert_eq!(f.leave_pod(frag)?, verdict, "port {dport}, fragment {i}");
        }
    }
    // A later fragment whose first never passed cannot show a port: the port rule denies it.
    let orphan = packet::fragment(&datagram(9005), 3, 1400).remove(2);
    assert_eq!(f.leave_pod(&orphan)?, TC_ACT_SHOT);
    Ok(())
}

#[test]
fn replies_follow_conntrack_and_the_node_always_reaches_its_pods() -> Result<()> {
    let deny_all = "
metadata: {name: deny-all, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
";
    let a_to_b = "
metadata: {name: a-to-b, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  egress: [{to: [{podSelector: {matchLabels: {app: b}}}]}]
";
    let b_from_a = "
metadata: {name: b-from-a, namespace: x}
spec:
  podSelector: {matchLabels: {app: b}}
  ingress: [{from: [{podSelector: {matchLabels: {app: a}}}]}]
";
    let (mut f, _, _) = fixture(&[deny_all, a_to_b, b_from_a])?;
    // a -> b is allowed by both sides; b's reply passes although b's egress denies all.
    let syn = tcp(sa(POD_A, 40000), sa(POD_B, 8080), true);
    assert_eq!(f.leave_pod(&syn)?, TC_ACT_REDIRECT);
    let reply = tcp(sa(POD_B, 8080), sa(POD_A, 40000), false);
    assert_eq!(f.leave_pod(&reply)?, TC_ACT_REDIRECT);
    // b cannot open its own connection to a.
    assert_eq!(
        f.leave_pod(&tcp(sa(POD_B, 8080), sa(POD_A, 40001), true))?,
        TC_ACT_SHOT
    );
    assert_eq!(f.drops()[0].reason, Reason::PolicyEgress);
    let ct = f.dp.policy_conntrack()?;
    assert_eq!(ct.len(), 1, "denied connections leave no entry: {ct:?}");
    assert_eq!(
        (ct[0].initiator, ct[0].responder),
        (sa(POD_A, 40000), sa(POD_B, 8080))
    );

    // The node's own probes reach b through the host stack (to_pod); b answers.
    let probe = tcp(sa(NODE_IP, 50000), sa(POD_B, 8080), true);
    assert_eq!(f.run(Program::ToPod, &probe)?, TC_ACT_REDIRECT);
    assert_eq!(
        f.leave_pod(&tcp(sa(POD_B, 8080), sa(NODE_IP, 50000), false))?,
        TC_ACT_OK,
        "the reply goes up the host stack"
    );
    // Another node is an ordinary peer: denied.
    let other = tcp(sa(REMOTE_NODE, 50000), sa(POD_B, 8080), true);
    assert_eq!(f.run(Program::ToPod, &other)?, TC_ACT_SHOT);
    assert_eq!(f.run(Program::FromOverlay, &other)?, TC_ACT_SHOT);
    // a's egress to anything but b is denied, whatever the path.
    assert_eq!(
        f.leave_pod(&udp(sa(POD_A, 5353), sa(REMOTE_POD, 53)))?,
        TC_ACT_SHOT
    );
    assert_eq!(
        f.leave_pod(&udp(sa(POD_A, 5353), sa(Ipv4Addr::new(192, 0, 2, 1), 53)))?,
        TC_ACT_SHOT
    );
    Ok(())
}

#[test]
fn ip_blocks_match_pods_and_external_hosts_with_excepts() -> Result<()> {
    let egress = "
metadata: {name: a-egress, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: 10.1.0.0/16, except: [10.1.1.0/24]}}]
  - to: [{ipBlock: {cidr: 10.1.1.7/32}}]
    ports: [{port: 53, protocol: UDP}]
  - to: [{ipBlock: {cidr: 192.0.2.0/24, except: [192.0.2.128/25]}}]
    ports: [{port: 443}]
";
    let (mut f, _, maps) = fixture(&[egress])?;
    // A pod on this node, inside the block.
    assert_eq!(
        f.leave_pod(&tcp(sa(POD_A, 40000), sa(POD_B, 8080), true))?,
        TC_ACT_REDIRECT
    );
    // The remote pod is in the except, but its own /32 rule allows UDP 53 only.
    assert_eq!(
        f.leave_pod(&udp(sa(POD_A, 5000), sa(REMOTE_POD, 53)))?,
        TC_ACT_REDIRECT
    );
    assert_eq!(
        f.leave_pod(&tcp(sa(POD_A, 5001), sa(REMOTE_POD, 53), true))?,
        TC_ACT_SHOT
    );
    assert_eq!(
        f.leave_pod(&udp(sa(POD_A, 5002), sa(Ipv4Addr::new(10, 1, 1, 8), 53)))?,
        TC_ACT_SHOT
    );
    // External hosts: inside the block and outside its except, port 443 only.
    let ext = |last| Ipv4Addr::new(192, 0, 2, last);
    for (dst, port, want) in [
        (ext(1), 443, TC_ACT_OK),
        (ext(127), 443, TC_ACT_OK),
        (ext(128), 443, TC_ACT_SHOT),
        (ext(1), 80, TC_ACT_SHOT),
        (Ipv4Addr::new(198, 51, 100, 1), 443, TC_ACT_SHOT),
    ] {
        let got = f.leave_pod(&tcp(sa(POD_A, 6000 + port), sa(dst, port), true))?;
        assert_eq!(got, want, "{dst}:{port}");
        let lookup = maps.lookup(POD_A, Direction::Egress, dst, PROTO_TCP, port);
        assert_eq!(lookup.allowed, want == TC_ACT_OK, "the compiler agrees");
    }
    Ok(())
}

#[test]
fn service_traffic_is_judged_by_its_backend_and_a_pod_reaches_itself() -> Result<()> {
    let b_web_only = "
metadata: {name: b-web, namespace: x}
spec:
  podSelector: {matchLabels: {app: b}}
  ingress: [{from: [{podSelector: {matchLabels: {app: a}}}], ports: [{port: 8080}]}]
";
    let a_self = "
metadata: {name: a-self, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  ingress: [{from: [{podSelector: {matchLabels: {app: a}}}]}]
";
    let (mut f, _, _) = fixture(&[b_web_only, a_self])?;
    let frontend = |port| LbFrontendKey {
        addr: VIP,
        port,
        proto: PROTO_TCP,
        scope: 0,
    };
    for (id, port, backend) in [(1, 80, sa(POD_B, 8080)), (2, 81, sa(POD_B, 9090))] {
        f.dp.upsert_lb_backend(
            id,
            1,
            &LbBackend {
                addr: *backend.ip(),
                port: backend.port(),
            },
        )?;
        f.dp.upsert_lb_service(
            &frontend(port),
            &LbService {
                id,
                count: 1,
                ..LbService::default()
            },
        )?;
    }
    // VIP:80 -> b:8080 is allowed by b's policy on the backend port; VIP:81 -> b:9090 is not.
    assert_eq!(
        f.leave_pod(&tcp(sa(POD_A, 40000), sa(VIP, 80), true))?,
        TC_ACT_REDIRECT
    );
    let out = f.dp.test_run(
        Program::FromPod,
        &tcp(sa(POD_A, 40001), sa(VIP, 81), true),
        f.veth_a,
        1,
    )?;
    assert_eq!(out.retval, TC_ACT_SHOT);
    let drop = f.drops().pop().expect("a drop event");
    assert_eq!(
        (drop.reason, drop.dst, drop.service_id),
        (Reason::PolicyIngress, sa(POD_B, 9090), 2),
        "the drop names the backend and the Service it came through"
    );
    // The backend's reply is translated back to the frontend and allowed.
    assert_eq!(
        f.leave_pod(&tcp(sa(POD_B, 8080), sa(POD_A, 40000), false))?,
        TC_ACT_REDIRECT
    );

    // a reaches itself through its own Service (hairpin SNAT); its policy allows app=a.
    f.dp.upsert_lb_backend(
        3,
        1,
        &LbBackend {
            addr: POD_A,
            port: 8080,
        },
    )?;
    f.dp.upsert_lb_service(
        &frontend(82),
        &LbService {
            id: 3,
            count: 1,
            ..LbService::default()
        },
    )?;
    let out = f.dp.test_run(
        Program::FromPod,
        &tcp(sa(POD_A, 42000), sa(VIP, 82), true),
        f.veth_a,
        1,
    )?;
    assert_eq!(out.retval, TC_ACT_REDIRECT);
    let p = packet::parse(&out.frame)?;
    assert_eq!(
        (p.src, p.dst, p.dport),
        (Ipv4Addr::new(169, 254, 42, 1), POD_A, 8080)
    );
    let reply = tcp(sa(POD_A, 8080), sa(p.src, p.sport), false);
    let out = f.dp.test_run(Program::FromPod, &reply, f.veth_a, 1)?;
    assert_eq!(out.retval, TC_ACT_REDIRECT, "the reply reaches the client");
    let p = packet::parse(&out.frame)?;
    assert_eq!((p.src, p.sport, p.dst, p.dport), (VIP, 82, POD_A, 42000));
    Ok(())
}

#[test]
fn a_policy_change_cuts_established_connections_it_denies_and_restores_them() -> Result<()> {
    let allow = "
metadata: {name: b-from-a, namespace: x}
spec:
  podSelector: {matchLabels: {app: b}}
  ingress: [{from: [{podSelector: {matchLabels: {app: a}}}]}]
";
    let (mut f, _, allowed) = fixture(&[allow])?;
    let fwd = tcp(sa(POD_A, 40000), sa(POD_B, 8080), false);
    let back = tcp(sa(POD_B, 8080), sa(POD_A, 40000), false);
    assert_eq!(
        f.leave_pod(&tcp(sa(POD_A, 40000), sa(POD_B, 8080), true))?,
        TC_ACT_REDIRECT
    );
    assert_eq!(f.leave_pod(&back)?, TC_ACT_REDIRECT);

    // The policy now allows nothing: both directions of the connection stop.
    let (_, denied) = compile(&["
metadata: {name: b-from-a, namespace: x}
spec: {podSelector: {matchLabels: {app: b}}, policyTypes: [Ingress]}
"]);
    install(&mut f.dp, &denied)?;
    assert_eq!(f.leave_pod(&fwd)?, TC_ACT_SHOT);
    assert_eq!(
        f.leave_pod(&back)?,
        TC_ACT_SHOT,
        "the reply path is cut too"
    );
    let ct = f.dp.policy_conntrack()?;
    assert!(ct[0].denied, "{ct:?}");
    assert!(
        f.drops().iter().all(|d| d.reason == Reason::PolicyIngress),
        "judged as the connection's first packet was"
    );
    // Allowed again: the same connection carries on.
    install(&mut f.dp, &allowed)?;
    assert_eq!(f.leave_pod(&back)?, TC_ACT_REDIRECT);
    assert_eq!(f.leave_pod(&fwd)?, TC_ACT_REDIRECT);
    assert!(!f.dp.policy_conntrack()?[0].denied);
    Ok(())
}

#[test]
fn verdicts_agree_with_the_compiled_maps_for_many_flows() -> Result<()> {
    let policies = [
        "
metadata: {name: mixed, namespace: x}
spec:
  podSelector: {matchLabels: {app: b}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: a}}}, {ipBlock: {cidr: 10.1.1.0/28, except: [10.1.1.4/30]}}]
    ports: [{port: 8000, endPort: 8100}, {port: 53, protocol: UDP}]
  - from: [{ipBlock: {cidr: 0.0.0.0/0, except: [10.0.0.0/8]}}]
    ports: [{port: 443}]
  egress:
  - to: [{podSelector: {}}]
    ports: [{port: 8080}]
",
        "
metadata: {name: a-out, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: 10.1.0.0/23, except: [10.1.1.0/26]}}]
    ports: [{port: 8000, endPort: 8050}]
",
    ];
    let (mut f, _, maps) = fixture(&policies)?;
    let peers = [
        Ipv4Addr::new(10, 1, 1, 1),
        Ipv4Addr::new(10, 1, 1, 2),
        Ipv4Addr::new(10, 1, 1, 100),
        Ipv4Addr::new(10, 1, 1, 5),
        REMOTE_POD,
        Ipv4Addr::new(10, 1, 1, 70),
        Ipv4Addr::new(192, 0, 2, 9),
        REMOTE_NODE,
    ];
    let ports = [53, 443, 7999, 8000, 8050, 8051, 8080, 8100, 8101];
    let (mut allowed, mut denied) = (0, 0);
    let mut sport = 20000;
    for peer in peers {
        for port in ports {
            for proto in [PROTO_TCP, PROTO_UDP] {
                sport += 1;
                let frame = |src, dst| {
                    if proto == PROTO_TCP {
                        tcp(src, dst, true)
                    } else {
                        udp(src, dst)
                    }
                };
                // Into b over the overlay: b's ingress.
                let want = maps
                    .lookup(POD_B, Direction::Ingress, peer, proto, port)
                    .allowed;
                let got = f.run(
                    Program::FromOverlay,
                    &frame(sa(peer, sport), sa(POD_B, port)),
                )?;
                assert_eq!(got == TC_ACT_REDIRECT, want, "{peer} -> b:{port}/{proto}");
                // Out of a: a's egress.
                let want2 = maps
                    .lookup(POD_A, Direction::Egress, peer, proto, port)
                    .allowed;
                let got = f.leave_pod(&frame(sa(POD_A, sport), sa(peer, port)))?;
                assert_eq!(got != TC_ACT_SHOT, want2, "a -> {peer}:{port}/{proto}");
                for w in [want, want2] {
                    if w {
                        allowed += 1;
                    } else {
                        denied += 1;
                    }
                }
            }
        }
    }
    assert_eq!(allowed + denied, peers.len() * ports.len() * 4);
    assert!(
        allowed >= 15 && denied >= 15,
        "{allowed} allowed, {denied} denied"
    );
    Ok(())
}

/// ICMP port unreachable from `from` to `to`, quoting `quoted` (an IP packet's first bytes).
fn icmp_unreachable(from: Ipv4Addr, to: Ipv4Addr, quoted: &[u8]) -> Vec<u8> {
    let msg = packet::icmp_error(3, 3, [0; 4], &quoted[..28]);
    packet::ethernet(
        OVERLAY_MAC,
        OVERLAY_MAC,
        ETH_P_IP,
        &packet::ipv4(from, to, packet::PROTO_ICMP, &msg),
    )
}

#[test]
fn icmp_errors_about_a_tracked_connection_belong_to_it() -> Result<()> {
    let isolate_a = "
metadata: {name: a-dns-only, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  policyTypes: [Ingress, Egress]
  egress:
  - ports: [{port: 53, protocol: UDP}]
  - to: [{ipBlock: {cidr: 10.1.1.7/32}}]
";
    let (mut f, _, _) = fixture(&[isolate_a])?;
    let query = udp(sa(POD_A, 5000), sa(REMOTE_POD, 53));
    assert_eq!(
        f.leave_pod(&query)?,
        TC_ACT_REDIRECT,
        "a's DNS query leaves"
    );
    let ip_of = |frame: &[u8]| frame[14..].to_vec();
    // The remote pod has nothing on 53: its node answers port unreachable, quoting the query.
    let error = icmp_unreachable(REMOTE_POD, POD_A, &ip_of(&query));
    assert_eq!(
        f.run(Program::FromOverlay, &error)?,
        TC_ACT_REDIRECT,
        "the error reaches a although a's ingress allows nothing"
    );
    // An error about a flow nobody opened is judged on its own: a admits nothing.
    let unknown = udp(sa(POD_A, 5001), sa(REMOTE_POD, 53));
    let error = icmp_unreachable(REMOTE_POD, POD_A, &ip_of(&unknown));
    assert_eq!(f.run(Program::FromOverlay, &error)?, TC_ACT_SHOT);
    // A ping's error quotes the echo request; the echo id identifies its flow.
    let (smac, dmac) = macs(POD_A);
    let ping = packet::icmp_echo_frame(smac, dmac, POD_A, REMOTE_POD, true, 99);
    assert_eq!(
        f.leave_pod(&ping)?,
        TC_ACT_REDIRECT,
        "allowed to the remote pod"
    );
    let error = icmp_unreachable(REMOTE_POD, POD_A, &ip_of(&ping));
    assert_eq!(
        f.run(Program::FromOverlay, &error)?,
        TC_ACT_REDIRECT,
        "the ping's error is related"
    );
    Ok(())
}
