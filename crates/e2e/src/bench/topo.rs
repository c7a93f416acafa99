//! Baseline topologies, built only inside namespaces this process creates (names carry the
//! pid) and removed on drop; deleting a namespace removes the links inside it.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use ferrum_lab::fabric::{add_netns, delete_netns, ip, netns_path, set_sysctl};
use tracing::{info, warn};

/// The VXLAN port and MTUs Ferrum uses, so the baseline carries the same overhead.
pub const VXLAN_PORT: u16 = 8472;
pub const UPLINK_MTU: u32 = 1500;
pub const OVERLAY_MTU: u32 = 1450;

/// A named network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: String) -> Result<Netns> {
        add_netns(&name).with_context(|| format!("cannot create network namespace {name}"))?;
        Ok(Netns { name })
    }

    pub fn path(&self) -> PathBuf {
        netns_path(&self.name)
    }

    /// `ip -n <self> ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full).with_context(|| format!("in network namespace {}", self.name))?;
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = delete_netns(&self.name) {
            warn!(netns = %self.name, error = %e, "cannot delete baseline namespace; remove it with `ip netns delete`");
        }
    }
}

/// Two traffic endpoints: where each side runs and the address the server listens on.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub client_netns: PathBuf,
    pub server_netns: PathBuf,
    pub server_ip: Ipv4Addr,
}

/// Same-node baseline: namespaces A and B joined by a plain veth pair.
pub struct VethBaseline {
    a: Netns,
    b: Netns,
}

impl VethBaseline {
    pub const A_IP: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 1);
    pub const B_IP: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 2);

    /// `mtu`: the pods' MTU, so both sides move the same segment sizes.
    pub fn build(tag: &str, mtu: u32) -> Result<VethBaseline> {
        let a = Netns::create(format!("fb-{tag}-va"))?;
        let b = Netns::create(format!("fb-{tag}-vb"))?;
        let mtu = mtu.to_string();
        a.ip(&[
            "link", "add", "eth0", "mtu", &mtu, "type", "veth", "peer", "name", "eth0", "mtu",
            &mtu, "netns", &b.name,
        ])?;
        for (ns, addr) in [(&a, Self::A_IP), (&b, Self::B_IP)] {
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            ns.ip(&["link", "set", "eth0", "up"])?;
        }
        info!(a = %a.name, b = %b.name, "veth baseline built");
        Ok(VethBaseline { a, b })
    }

    pub fn endpoints(&self) -> Endpoints {
        Endpoints {
            client_netns: self.a.path(),
            server_netns: self.b.path(),
            server_ip: Self::B_IP,
        }
    }
}

/// Across-nodes baseline: two "node" namespaces whose uplinks meet on a bridge in a fabric
/// namespace (as in the lab), each with a unicast kernel VXLAN device to the other; traffic
/// runs between the VXLAN addresses.
pub struct VxlanBaseline {
    // Field order is drop order: pods, nodes, then the fabric holding the bridge.
    pod1: Netns,
    pod2: Netns,
    node1: Netns,
    node2: Netns,
    _fabric: Netns,
}

impl VxlanBaseline {
    pub const NODE1_UPLINK: Ipv4Addr = Ipv4Addr::new(10, 255, 1, 1);
    pub const NODE2_UPLINK: Ipv4Addr = Ipv4Addr::new(10, 255, 1, 2);
    pub const NODE1_OVERLAY: Ipv4Addr = Ipv4Addr::new(10, 255, 2, 1);
    pub const NODE2_OVERLAY: Ipv4Addr = Ipv4Addr::new(10, 255, 2, 2);
    pub const POD1: Ipv4Addr = Ipv4Addr::new(10, 255, 3, 1);
    pub const POD2: Ipv4Addr = Ipv4Addr::new(10, 255, 4, 1);

    pub fn build(tag: &str) -> Result<VxlanBaseline> {
        let fabric = Netns::create(format!("fb-{tag}-xf"))?;
        let node1 = Netns::create(format!("fb-{tag}-x1"))?;
        let node2 = Netns::create(format!("fb-{tag}-x2"))?;
        fabric.ip(&["link", "add", "br0", "type", "bridge"])?;
        fabric.ip(&["link", "set", "br0", "up"])?;
        let uplink_mtu = UPLINK_MTU.to_string();
        let overlay_mtu = OVERLAY_MTU.to_string();
        let nodes = [
            (
                &node1,
                "n1",
                Self::NODE1_UPLINK,
                Self::NODE2_UPLINK,
                Self::NODE1_OVERLAY,
            ),
            (
                &node2,
                "n2",
                Self::NODE2_UPLINK,
                Self::NODE1_UPLINK,
                Self::NODE2_OVERLAY,
            ),
        ];
        for (node, port, local, remote, overlay) in nodes {
            fabric.ip(&[
                "link",
                "add",
                port,
                "mtu",
                &uplink_mtu,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "mtu",
                &uplink_mtu,
                "netns",
                &node.name,
            ])?;
            fabric.ip(&["link", "set", port, "master", "br0"])?;
            fabric.ip(&["link", "set", port, "up"])?;
            node.ip(&["addr", "add", &format!("{local}/24"), "dev", "eth0"])?;
            node.ip(&["link", "set", "eth0", "up"])?;
            node.ip(&[
                "link",
                "add",
                "vx0",
                "mtu",
                &overlay_mtu,
                "type",
                "vxlan",
                "id",
                "1",
                "local",
                &local.to_string(),
                "remote",
                &remote.to_string(),
                "dstport",
                &VXLAN_PORT.to_string(),
                "dev",
                "eth0",
            ])?;
            node.ip(&["addr", "add", &format!("{overlay}/24"), "dev", "vx0"])?;
            node.ip(&["link", "set", "vx0", "up"])?;
        }
        let pod1 = Netns::create(format!("fb-{tag}-xp1"))?;
        let pod2 = Netns::create(format!("fb-{tag}-xp2"))?;
        let routed = [
            (&node1, &pod1, Self::POD1, Self::POD2, Self::NODE2_OVERLAY),
            (&node2, &pod2, Self::POD2, Self::POD1, Self::NODE1_OVERLAY),
        ];
        for (node, pod, local, remote, remote_node) in routed {
            route_pod(node, pod, local, remote, remote_node)?;
        }
        info!(fabric = %fabric.name, "vxlan baseline built");
        Ok(VxlanBaseline {
            pod1,
            pod2,
            node1,
            node2,
            _fabric: fabric,
        })
    }

    /// Pod to pod over the same VXLAN devices, each pod behind a veth pair its node forwards
    /// with plain kernel routing (what host-routing overlay plugins such as Flannel do): a
    /// reference for what the pod's veth hop costs with no eBPF at all.
    pub fn routed_pod_endpoints(&self) -> Endpoints {
        Endpoints {
            client_netns: self.pod1.path(),
            server_netns: self.pod2.path(),
            server_ip: Self::POD2,
        }
    }

    pub fn endpoints(&self) -> Endpoints {
        Endpoints {
            client_netns: self.node1.path(),
            server_netns: self.node2.path(),
            server_ip: Self::NODE2_OVERLAY,
        }
    }
}

/// Puts `pod` (address `local`/32) behind a veth pair in `node`, routed by the kernel: the pod
/// defaults to a link-local gateway answered by a permanent neighbour entry, the node routes
/// the pod's /32 to the veth and the remote pod via the other node's overlay address.
fn route_pod(
    node: &Netns,
    pod: &Netns,
    local: Ipv4Addr,
    remote: Ipv4Addr,
    remote_node: Ipv4Addr,
) -> Result<()> {
    const HOST_MAC: &str = "02:fb:00:00:00:01";
    const GATEWAY: &str = "169.254.1.1";
    let mtu = OVERLAY_MTU.to_string();
    node.ip(&[
        "link", "add", "hv0", "address", HOST_MAC, "mtu", &mtu, "type", "veth", "peer", "name",
        "eth0", "mtu", &mtu, "netns", &pod.name,
    ])?;
    node.ip(&["link", "set", "hv0", "up"])?;
    pod.ip(&["addr", "add", &format!("{local}/32"), "dev", "eth0"])?;
    pod.ip(&["link", "set", "eth0", "up"])?;
    pod.ip(&["link", "set", "lo", "up"])?;
    pod.ip(&["route", "add", GATEWAY, "dev", "eth0", "scope", "link"])?;
    pod.ip(&["route", "add", "default", "via", GATEWAY, "dev", "eth0"])?;
    pod.ip(&[
        "neigh",
        "replace",
        GATEWAY,
        "lladdr",
        HOST_MAC,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ])?;
    node.ip(&["route", "add", &format!("{local}/32"), "dev", "hv0"])?;
    node.ip(&[
        "route",
        "add",
        &format!("{remote}/32"),
        "via",
        &remote_node.to_string(),
        "dev",
        "vx0",
    ])?;
    for (key, value) in [
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.hv0.rp_filter", "0"),
        ("net.ipv4.conf.vx0.rp_filter", "0"),
    ] {
        set_sysctl(&node.name, key, value)
            .with_context(|| format!("in network namespace {}", node.name))?;
    }
    Ok(())
}
