//! Baseline topologies, built only inside namespaces this process creates (names carry the
//! pid) and removed on drop; deleting a namespace removes the links inside it.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use ferrum_lab::fabric::{add_netns, delete_netns, ip, netns_path};
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
    // Field order is drop order: nodes first, then the fabric holding the bridge.
    node1: Netns,
    node2: Netns,
    _fabric: Netns,
}

impl VxlanBaseline {
    pub const NODE1_UPLINK: Ipv4Addr = Ipv4Addr::new(10, 255, 1, 1);
    pub const NODE2_UPLINK: Ipv4Addr = Ipv4Addr::new(10, 255, 1, 2);
    pub const NODE1_OVERLAY: Ipv4Addr = Ipv4Addr::new(10, 255, 2, 1);
    pub const NODE2_OVERLAY: Ipv4Addr = Ipv4Addr::new(10, 255, 2, 2);

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
        info!(fabric = %fabric.name, "vxlan baseline built");
        Ok(VxlanBaseline {
            node1,
            node2,
            _fabric: fabric,
        })
    }

    pub fn endpoints(&self) -> Endpoints {
        Endpoints {
            client_netns: self.node1.path(),
            server_netns: self.node2.path(),
            server_ip: Self::NODE2_OVERLAY,
        }
    }
}
