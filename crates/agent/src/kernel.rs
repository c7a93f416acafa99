//! The real [`Dataplane`]: eBPF maps and tcx links through `ferrum_datapath`, routes through
//! netlink, all in the node's network namespace (the agent's threads all live in it).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use anyhow::Context;
use ferrum_datapath::bpf::{Datapath, EndpointInfo, IpcacheEntry, NodeConfig};
use ferrum_datapath::link::Netlink;
use ipnet::Ipv4Net;

use crate::handler::{Dataplane, EndpointSpec, IpamStore};
use crate::ipcache::{PeerEntry, PeerKind};
use crate::restore::{self, EndpointValue, Observed};

/// Source ports SNAT may use on the node IP; the node's own ephemeral range is moved below it.
pub const NAT_PORTS: std::ops::RangeInclusive<u16> = 49152..=65535;
pub const LOCAL_PORT_RANGE: &str = "32768 49151";

/// Node facts the datapath config needs besides the block.
#[derive(Debug, Clone)]
pub struct NodeDevices {
    pub node_ip: Ipv4Addr,
    pub cluster_cidr: Ipv4Net,
    pub uplink: String,
    pub uplink_ifindex: u32,
    pub overlay: String,
    pub overlay_ifindex: u32,
    /// Where the host stack routes local pods (see `Netlink::ensure_host_device`).
    pub host: String,
    pub vni: u32,
    /// Which forwarded packets produce flow events (drops always do).
    pub flow_events: ferrum_datapath::bpf::FlowEvents,
}

pub struct KernelDataplane {
    pub datapath: Datapath,
    pub netlink: Netlink,
    devices: NodeDevices,
    /// The block the datapath config was last written with.
    configured_block: Option<Ipv4Net>,
}

impl KernelDataplane {
    pub fn new(datapath: Datapath, netlink: Netlink, devices: NodeDevices) -> Self {
        Self {
            datapath,
            netlink,
            devices,
            configured_block: None,
        }
    }

    /// Writes the node config for `block` and attaches the overlay and uplink programs (they
    /// read the config, so they go in only once it is there). Idempotent: adopts pinned links.
    pub fn configure(&mut self, block: Ipv4Net) -> anyhow::Result<()> {
        if self.configured_block == Some(block) {
            return Ok(());
        }
        let d = &self.devices;
        self.datapath
            .set_config(&NodeConfig {
                node_ip: d.node_ip,
                cluster_cidr: d.cluster_cidr,
                local_block: block,
                overlay_ifindex: d.overlay_ifindex,
                uplink_ifindex: d.uplink_ifindex,
                vni: d.vni,
                nat_ports: NAT_PORTS,
                trace: false,
            })
            .with_context(|| format!("writing the datapath config for block {block}"))?;
        self.datapath
            .set_flow_events(d.flow_events)
            .context("setting the datapath's flow events")?;
        // VNet mode has no overlay device.
        if d.overlay_ifindex != 0 {
            self.datapath
                .attach_overlay(&d.overlay)
                .with_context(|| format!("attaching the overlay programs to {}", d.overlay))?;
        }
        self.datapath
            .attach_uplink(&d.uplink)
            .with_context(|| format!("attaching the uplink programs to {}", d.uplink))?;
        self.configured_block = Some(block);
        tracing::info!(%block, "datapath configured");
        Ok(())
    }

    /// Attaches to_pod to the host device and removes the per-pod egress links older agents
    /// pinned; until then those still judge what the host routes into the pods.
    pub fn attach_host_device(&mut self) -> anyhow::Result<()> {
        let dev = &self.devices.host;
        self.datapath
            .attach_host_device(dev)
            .with_context(|| format!("attaching the host device program to {dev}"))?;
        let removed = self
            .datapath
            .remove_legacy_pod_links()
            .context("removing per-pod egress links of an older agent")?;
        if removed > 0 {
            tracing::info!(removed, "per-pod egress links replaced by {dev}");
        }
        Ok(())
    }

    /// The host stack reaches a local pod through the host device, whose egress program
    /// judges the packet and hands it to the pod's veth.
    fn host_route(&self, ip: Ipv4Addr) -> anyhow::Result<()> {
        let dev = &self.devices.host;
        self.netlink
            .replace_route(
                Ipv4Net::from(ip),
                dev,
                None,
                true,
                Some(self.devices.node_ip),
            )
            .with_context(|| format!("routing {ip}/32 to {dev}"))
    }

    /// Restart convergence: makes endpoints, pinned pod links and host routes match the
    /// attachments in the IPAM store, changing only what differs. Orphans (veth gone) are
    /// recorded as detached; their addresses wait for CNI DEL or GC.
    pub fn restore(&mut self, store: &mut IpamStore) -> anyhow::Result<()> {
        let mut observed = Observed::default();
        for (_, lease) in store.pool().leases() {
            if let Some(ep) = &lease.owner.endpoint
                && let Some(link) = self
                    .netlink
                    .link(&ep.host_ifname)
                    .with_context(|| format!("looking up {}", ep.host_ifname))?
            {
                observed.links.insert(ep.host_ifname.clone(), link.index);
            }
        }
        for (ip, e) in self
            .datapath
            .endpoints()
            .context("reading the endpoints map")?
        {
            observed.endpoints.insert(
                ip,
                EndpointValue {
                    ifindex: e.ifindex,
                    pod_mac: e.pod_mac,
                    host_mac: e.host_mac,
                },
            );
        }
        observed.pinned_links = self
            .datapath
            .pinned_pod_links()
            .context("listing pinned pod links")?
            .into_iter()
            .collect::<BTreeSet<_>>();
        let plan = restore::plan(
            store.pool().leases().map(|(k, l)| (k, l.ip, &l.owner)),
            &observed,
        );
        for ifname in &plan.attach_links {
            self.datapath
                .attach_pod(ifname)
                .with_context(|| format!("re-attaching the pod program to {ifname}"))?;
        }
        for (ip, v) in &plan.endpoint_upserts {
            let info = EndpointInfo {
                ifindex: v.ifindex,
                pod_mac: v.pod_mac,
                host_mac: v.host_mac,
            };
            self.datapath
                .upsert_endpoint(*ip, &info)
                .with_context(|| format!("restoring endpoint {ip}"))?;
        }
        for ip in &plan.routes {
            self.host_route(*ip)?;
        }
        for ip in &plan.endpoint_removes {
            self.datapath
                .remove_endpoint(*ip)
                .with_context(|| format!("removing stale endpoint {ip}"))?;
        }
        for ip in &plan.route_removes {
            self.netlink
                .delete_route(Ipv4Net::from(*ip))
                .with_context(|| format!("removing the stale route to {ip}"))?;
        }
        for ifname in &plan.detach_links {
            self.datapath
                .detach_pod(ifname)
                .with_context(|| format!("removing the stale pod link on {ifname}"))?;
        }
        for (key, spec) in &plan.reindexed {
            if let Some(mut owner) = store.pool().get(key).map(|l| l.owner.clone()) {
                owner.endpoint = Some(spec.clone());
                store.set_owner(key, owner)?;
            }
        }
        for key in &plan.orphaned {
            if let Some(mut owner) = store.pool().get(key).map(|l| l.owner.clone()) {
                owner.endpoint = None;
                store.set_owner(key, owner)?;
            }
        }
        tracing::info!(
            restored_endpoints = plan.endpoint_upserts.len(),
            removed_endpoints = plan.endpoint_removes.len(),
            reattached = plan.attach_links.len(),
            unpinned = plan.detach_links.len(),
            orphaned = plan.orphaned.len(),
            kept = plan.routes.len(),
            "endpoints reconciled with the IPAM store"
        );
        Ok(())
    }
}

fn to_kernel(e: &PeerEntry) -> IpcacheEntry {
    use ferrum_datapath::bpf::PeerKind as K;
    IpcacheEntry {
        tunnel_endpoint: e.tunnel_endpoint,
        kind: match e.kind {
            PeerKind::LocalNode => K::LocalNode,
            PeerKind::RemoteNode => K::RemoteNode,
            PeerKind::LocalPodBlock => K::LocalPodBlock,
            PeerKind::RemotePodBlock => K::RemotePodBlock,
        },
    }
}

fn from_kernel(e: &IpcacheEntry) -> PeerEntry {
    use ferrum_datapath::bpf::PeerKind as K;
    PeerEntry {
        tunnel_endpoint: e.tunnel_endpoint,
        kind: match e.kind {
            K::LocalNode => PeerKind::LocalNode,
            K::RemoteNode => PeerKind::RemoteNode,
            K::LocalPodBlock => PeerKind::LocalPodBlock,
            K::RemotePodBlock => PeerKind::RemotePodBlock,
        },
    }
}

impl Dataplane for KernelDataplane {
    fn attach_endpoint(&mut self, ip: Ipv4Addr, ep: &EndpointSpec) -> anyhow::Result<()> {
        let link = self
            .netlink
            .link(&ep.host_ifname)
            .with_context(|| format!("looking up {}", ep.host_ifname))?
            .with_context(|| {
                format!(
                    "host veth {} does not exist in the node's network namespace",
                    ep.host_ifname
                )
            })?;
        anyhow::ensure!(
            link.index == ep.host_ifindex,
            "host veth {} has ifindex {}, the request says {}",
            ep.host_ifname,
            link.index,
            ep.host_ifindex
        );
        self.datapath
            .attach_pod(&ep.host_ifname)
            .with_context(|| format!("attaching the pod program to {}", ep.host_ifname))?;
        let info = EndpointInfo {
            ifindex: link.index,
            pod_mac: ep.pod_mac,
            host_mac: ep.host_mac,
        };
        self.datapath
            .upsert_endpoint(ip, &info)
            .with_context(|| format!("publishing endpoint {ip}"))?;
        self.host_route(ip)
    }

    fn detach_endpoint(&mut self, ip: Ipv4Addr, host_ifname: &str) -> anyhow::Result<()> {
        self.datapath
            .remove_endpoint(ip)
            .with_context(|| format!("removing endpoint {ip}"))?;
        self.netlink
            .delete_route(Ipv4Net::from(ip))
            .with_context(|| format!("removing the route to {ip}"))?;
        self.datapath
            .detach_pod(host_ifname)
            .with_context(|| format!("detaching the pod program from {host_ifname}"))
    }

    fn endpoint_present(&mut self, ip: Ipv4Addr, ep: &EndpointSpec) -> anyhow::Result<bool> {
        let published = self
            .datapath
            .endpoints()
            .context("reading the endpoints map")?
            .into_iter()
            .any(|(a, e)| {
                a == ip
                    && e.ifindex == ep.host_ifindex
                    && e.pod_mac == ep.pod_mac
                    && e.host_mac == ep.host_mac
            });
        let pinned = self
            .datapath
            .pinned_pod_links()
            .context("listing pinned pod links")?
            .contains(&ep.host_ifname);
        let link_ok = self
            .netlink
            .link(&ep.host_ifname)
            .with_context(|| format!("looking up {}", ep.host_ifname))?
            .is_some_and(|l| l.index == ep.host_ifindex);
        Ok(published && pinned && link_ok)
    }

    fn ipcache(&mut self) -> anyhow::Result<BTreeMap<Ipv4Net, PeerEntry>> {
        Ok(self
            .datapath
            .ipcache()
            .context("reading the ipcache")?
            .iter()
            .map(|(p, e)| (*p, from_kernel(e)))
            .collect())
    }

    fn upsert_ipcache(&mut self, prefix: Ipv4Net, entry: &PeerEntry) -> anyhow::Result<()> {
        self.datapath
            .upsert_ipcache(prefix, &to_kernel(entry))
            .with_context(|| format!("writing ipcache entry {prefix}"))
    }

    fn remove_ipcache(&mut self, prefix: Ipv4Net) -> anyhow::Result<()> {
        self.datapath
            .remove_ipcache(prefix)
            .with_context(|| format!("removing ipcache entry {prefix}"))
    }

    fn configure_block(&mut self, block: Ipv4Net) -> anyhow::Result<()> {
        self.configure(block)
    }
}
