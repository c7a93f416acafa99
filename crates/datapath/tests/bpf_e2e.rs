//! End-to-end smoke test of from_pod on real veths: one "node" netns and two "pod" netns
//! wired the way the CNI plugin wires pods; pods ping each other through bpf_redirect_peer
//! and a spoofed source is dropped with an event.

mod bpf_support;

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::Result;
use bpf_support::{Netns, PinDir, ifindex};
use ferrum_datapath::bpf::{Datapath, EndpointInfo, EventKind, NodeConfig, Reason};

struct Pod {
    ns: Netns,
    host_if: String,
    ip: Ipv4Addr,
    mac: [u8; 6],
    host_mac: [u8; 6],
}

fn mac_str(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn make_pod(node: &Netns, n: u8) -> Result<Pod> {
    let ns = Netns::new("fe-bpfe-pod")?;
    let host_if = format!("fe{}x{n}", std::process::id() % 100000);
    let pod = Pod {
        ns,
        host_if,
        ip: Ipv4Addr::new(10, 1, 0, 10 + n),
        mac: [0x02, 0xaa, 0, 0, 0, n],
        host_mac: [0x02, 0xee, 0, 0, 0, n],
    };
    node.ip(&[
        "link",
        "add",
        &pod.host_if,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &pod.ns.name,
    ])?;
    node.ip(&[
        "link",
        "set",
        &pod.host_if,
        "address",
        &mac_str(pod.host_mac),
        "up",
    ])?;
    let p = &pod.ns;
    p.exec_ok(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
    p.ip(&["link", "set", "eth0", "address", &mac_str(pod.mac), "up"])?;
    p.ip(&["addr", "add", &format!("{}/32", pod.ip), "dev", "eth0"])?;
    p.ip(&[
        "route",
        "add",
        "169.254.1.1",
        "dev",
        "eth0",
        "scope",
        "link",
    ])?;
    p.ip(&[
        "route",
        "add",
        "default",
        "via",
        "169.254.1.1",
        "dev",
        "eth0",
    ])?;
    p.ip(&[
        "neigh",
        "add",
        "169.254.1.1",
        "lladdr",
        &mac_str(pod.host_mac),
        "dev",
        "eth0",
        "nud",
        "permanent",
    ])?;
    Ok(pod)
}

#[test]
fn pods_on_one_node_ping_each_other_and_spoofing_is_dropped() -> Result<()> {
    let node = Netns::new("fe-bpfe-node")?;
    let pod1 = make_pod(&node, 1)?;
    let pod2 = make_pod(&node, 2)?;
    node.enter()?;
    let pins = PinDir::new();
    let mut dp = Datapath::open(&pins.path)?;
    dp.set_config(&NodeConfig {
        node_ip: Ipv4Addr::new(10, 224, 0, 10),
        cluster_cidr: "10.1.0.0/16".parse()?,
        local_block: "10.1.0.0/24".parse()?,
        overlay_ifindex: 0,
        uplink_ifindex: 0,
        vni: 42,
        nat_ports: 61000..=65535,
        trace: false,
    })?;
    let mut events = dp.take_events()?;
    for pod in [&pod1, &pod2] {
        let ep = EndpointInfo {
            ifindex: ifindex(&pod.host_if)?,
            pod_mac: pod.mac,
            host_mac: pod.host_mac,
        };
        dp.upsert_endpoint(pod.ip, &ep)?;
        dp.attach_pod(&pod.host_if)?;
    }
    let dst = pod2.ip.to_string();
    assert!(
        pod1.ns
            .exec_ok(&["ping", "-c", "2", "-W", "2", "-i", "0.2", &dst])?,
        "pod1 -> pod2 ping failed"
    );
    assert!(
        pod2.ns
            .exec_ok(&["ping", "-c", "1", "-W", "2", &pod1.ip.to_string()])?,
        "pod2 -> pod1 ping failed"
    );
    assert!(
        events
            .poll(Duration::from_millis(50))?
            .iter()
            .all(|e| e.kind != EventKind::Drop)
    );

    // Pod 1 claims an address it was not given: its packets never reach pod 2.
    pod1.ns
        .ip(&["addr", "add", "10.1.0.77/32", "dev", "eth0"])?;
    assert!(
        !pod1
            .ns
            .exec_ok(&["ping", "-c", "1", "-W", "1", "-I", "10.1.0.77", &dst])?,
        "spoofed ping got through"
    );
    let drops = events.poll(Duration::from_secs(1))?;
    let spoofed = drops
        .iter()
        .find(|e| e.reason == Reason::SpoofedIp)
        .expect("SPOOFED_IP drop event");
    assert_eq!(spoofed.src.ip(), &Ipv4Addr::new(10, 1, 0, 77));
    assert_eq!(spoofed.ifindex, ifindex(&pod1.host_if)?);

    // Without the program the isolation is gone: detaching really removes the datapath.
    dp.detach_pod(&pod1.host_if)?;
    dp.detach_pod(&pod2.host_if)?;
    assert!(
        !pod1.ns.exec_ok(&["ping", "-c", "1", "-W", "1", &dst])?,
        "no route without the datapath"
    );
    Ok(())
}
