//! ferrum-agent: one per node. Owns the node's IPAM, endpoints and eBPF datapath, serves the
//! CNI API, and realizes the cluster's nodes as ipcache entries.
//!
//! [`start`] brings the node up and runs the agent's threads; the cluster comes in through any
//! [`ferrum_model::Source`] (the lab control plane today, Kubernetes later).

pub mod config;
pub mod events;
pub mod handler;
pub mod install;
pub mod ipcache;
pub mod kernel;
pub mod observe;
pub mod policy;
pub mod restore;
pub mod server;
pub mod services;
pub mod tools;
pub mod watch;

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, bail};
use ferrum_datapath::bpf::Datapath;
use ferrum_datapath::link::{Netlink, set_sysctl};
use ferrum_model::Source;

use crate::config::Config;
use crate::events::{EventCounters, Kind, SharedCounters};
use crate::handler::{Dataplane, IpamStore, NodeState};
use crate::kernel::{KernelDataplane, NodeDevices};
use crate::server::SharedState;
use crate::watch::NodeIdentity;

/// Name of the node's VXLAN device (collect-metadata mode: one device for all peers).
pub const OVERLAY_DEVICE: &str = "ferrum_vxlan";
/// Where the host stack routes local pods; its egress program hands packets to them.
pub const HOST_DEVICE: &str = "ferrum_host";
/// The other end of the host device's veth pair (nothing reaches it).
pub const HOST_DEVICE_PEER: &str = "ferrum_net";
/// The VXLAN UDP port (Linux's historical default, as Cilium and Flannel use).
pub const VXLAN_PORT: u16 = ferrum_datapath::bpf::VXLAN_PORT;
/// Outer IPv4 + UDP + VXLAN + inner Ethernet headers.
pub const VXLAN_OVERHEAD: u32 = 50;

/// A running agent.
pub struct AgentHandle {
    pub state: SharedState<KernelDataplane>,
    pub counters: SharedCounters,
    pub node_ip: std::net::Ipv4Addr,
    server: JoinHandle<()>,
}

impl AgentHandle {
    /// Blocks while the agent serves (the CNI server thread only ends if the process does).
    pub fn wait(self) -> anyhow::Result<()> {
        self.server
            .join()
            .map_err(|_| anyhow::anyhow!("the CNI API server thread panicked"))
    }
}

/// Brings the node up in the calling thread's network namespace (threads it starts inherit
/// it): datapath loaded or adopted, overlay device, sysctls, cluster route, endpoints
/// reconciled with the IPAM store; then serves the CNI API and watches `source`.
pub fn start(config: &Config, source: Box<dyn Source>) -> anyhow::Result<AgentHandle> {
    let netlink = Netlink::connect().context("opening netlink in the node's namespace")?;
    let uplink = netlink
        .link(&config.uplink)
        .with_context(|| format!("looking up the uplink {}", config.uplink))?
        .with_context(|| {
            format!(
                "uplink {} does not exist in this network namespace; pass --uplink",
                config.uplink
            )
        })?;
    let node_ip = netlink
        .addresses(&config.uplink)
        .with_context(|| format!("reading the addresses of {}", config.uplink))?
        .first()
        .map(|n| n.addr())
        .with_context(|| {
            format!(
                "uplink {} has no IPv4 address: the node IP comes from it",
                config.uplink
            )
        })?;
    let vnet = config.ipam_mode == config::IpamMode::Vnet;
    if uplink.mtu <= VXLAN_OVERHEAD + 576 {
        bail!(
            "uplink {} MTU {} is too small for the overlay",
            config.uplink,
            uplink.mtu
        );
    }
    // VNet mode routes pods natively on the underlay: no encapsulation, full MTU.
    let pod_mtu = if vnet {
        uplink.mtu
    } else {
        uplink.mtu - VXLAN_OVERHEAD
    };

    let datapath = Datapath::open(&config.bpf_pin_dir).with_context(|| {
        format!(
            "loading the eBPF datapath with pins in {}",
            config.bpf_pin_dir.display()
        )
    })?;
    let mut store =
        IpamStore::open(&config.state_dir, config.max_pods).context("opening the IPAM store")?;

    let overlay_ifindex = if vnet {
        store
            .update(|p| {
                match p.addresses() {
                    Some(_) => p.set_block(config.cluster_pod_cidr).map(|_| ())?,
                    None if p.block().is_none() => {
                        *p = ferrum_ipam::Pool::with_subnet(config.cluster_pod_cidr, config.max_pods);
                    }
                    None => {
                        return Err(ferrum_ipam::PoolError::Invalid(format!(
                            "the IPAM store holds overlay block {:?}; it cannot switch to VNet mode",
                            p.block()
                        )));
                    }
                }
                Ok(())
            })
            .context("preparing the IPAM store for VNet mode")?;
        0
    } else {
        netlink
            .ensure_vxlan_external(OVERLAY_DEVICE, VXLAN_PORT, pod_mtu)
            .with_context(|| format!("creating the overlay device {OVERLAY_DEVICE}"))?
            .index
    };
    let mut sysctls = vec![
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
        // SNAT owns the ports above this range on the node IP.
        ("net.ipv4.ip_local_port_range", kernel::LOCAL_PORT_RANGE),
    ];
    if !vnet {
        sysctls.push(("net/ipv4/conf/ferrum_vxlan/rp_filter", "0"));
    }
    for (key, value) in sysctls {
        set_sysctl(key, value).with_context(|| format!("setting {key}={value}"))?;
    }
    if !vnet {
        netlink
            .replace_route(
                config.cluster_pod_cidr,
                OVERLAY_DEVICE,
                None,
                true,
                Some(node_ip),
            )
            .with_context(|| {
                format!(
                    "routing the cluster pod CIDR {} via {OVERLAY_DEVICE}",
                    config.cluster_pod_cidr
                )
            })?;
    }

    netlink
        .ensure_host_device(HOST_DEVICE, HOST_DEVICE_PEER, pod_mtu)
        .with_context(|| format!("creating the host device {HOST_DEVICE}"))?;

    let mut dataplane = KernelDataplane::new(
        datapath,
        netlink,
        NodeDevices {
            node_ip,
            cluster_cidr: config.cluster_pod_cidr,
            uplink: config.uplink.clone(),
            uplink_ifindex: uplink.index,
            overlay: if vnet {
                String::new()
            } else {
                OVERLAY_DEVICE.into()
            },
            overlay_ifindex,
            host: HOST_DEVICE.into(),
            vni: config.vni,
            flow_events: config.flow_events.into(),
        },
    );
    // A restarted agent keeps forwarding for the block it had; the watch confirms it later.
    // VNet: local pods are anywhere in the pod subnet; the datapath's local range is all of it.
    if let Some(block) = store.pool().block() {
        dataplane.configure_block(block)?;
    }
    dataplane.attach_host_device()?;
    dataplane
        .restore(&mut store)
        .context("reconciling endpoints with the IPAM store")?;
    if let Some(cg) = &config.cgroup {
        attach_socket_lb(&mut dataplane, cg)?;
    }
    let events = dataplane
        .datapath
        .take_events()
        .context("opening the datapath event ring")?;

    let mut node_state = NodeState::new(store, dataplane, pod_mtu);
    let scaler_wake = if vnet {
        node_state.vnet = Some(handler::VnetState::default());
        node_state.not_ready_reason =
            Some("waiting for the cloud to assign this node's first batch of addresses".into());
        let (tx, rx) = std::sync::mpsc::channel();
        node_state.wake = Some(tx);
        Some(rx)
    } else {
        None
    };
    let requester = source.ip_requester();
    let state: SharedState<KernelDataplane> = Arc::new(Mutex::new(node_state));
    let counters: SharedCounters = Arc::new(Mutex::new(EventCounters::default()));

    let listener = server::bind(&config.socket)?;
    let server = spawn("cni-server", {
        let state = Arc::clone(&state);
        move || server::serve(listener, state)
    })?;
    let observer = Arc::new(observe::Observer::new(
        &config.node_name,
        config.flow_ring_size as usize,
        config.observe_addr.port(),
    ));
    spawn("events", {
        let counters = Arc::clone(&counters);
        let observer = Arc::clone(&observer);
        move || event_loop(events, counters, observer)
    })?;
    let api = Arc::new(observe::Api {
        observer: Arc::clone(&observer),
        stats: Box::new({
            let state = Arc::clone(&state);
            move || datapath_stats(&state)
        }),
    });
    let tcp = observe::bind_tcp(config.observe_addr)?;
    spawn("observe-tcp", {
        let api = Arc::clone(&api);
        move || observe::serve_tcp(tcp, api)
    })?;
    let unix = observe::bind_unix(&config.observe_socket)?;
    spawn("observe-unix", {
        let api = Arc::clone(&api);
        move || observe::serve_unix(unix, api)
    })?;
    let source: Box<dyn Source> =
        Box::new(observe::ObservedSource::new(source, Arc::clone(&observer)));
    let id = NodeIdentity {
        name: config.node_name.clone(),
        ip: node_ip,
        cluster_cidr: config.cluster_pod_cidr,
        lb_algorithm: config.lb_algorithm.to_lb(),
    };
    if let Some(wake) = scaler_wake {
        let requester = requester.context(
            "VNet mode needs a cluster source that can send address requests to the cloud",
        )?;
        spawn("ipam-scaler", {
            let state = Arc::clone(&state);
            let node = config.node_name.clone();
            move || watch::scaler_loop(requester, wake, state, node)
        })?;
    }
    spawn("watch", {
        let state = Arc::clone(&state);
        move || watch::watch_loop(source, state, id, Some(observer))
    })?;
    tracing::info!(node = %config.node_name, %node_ip, socket = %config.socket.display(), "agent started");
    Ok(AgentHandle {
        state,
        counters,
        node_ip,
        server,
    })
}

/// Joins the node's cgroup and hooks socket-level load balancing on it.
fn attach_socket_lb(dataplane: &mut KernelDataplane, cg: &std::path::Path) -> anyhow::Result<()> {
    let root = ferrum_datapath::cgroup::cgroup2_root()
        .context("socket-level load balancing needs cgroup v2, which is not mounted")?;
    if cg == root || !cg.starts_with(&root) {
        bail!(
            "--cgroup {} must be a cgroup below the cgroup v2 root {} (never the root itself)",
            cg.display(),
            root.display()
        );
    }
    ferrum_datapath::cgroup::add_process(cg, std::process::id())
        .with_context(|| format!("joining the node cgroup {}", cg.display()))?;
    dataplane
        .datapath
        .attach_socket_lb(cg)
        .with_context(|| format!("attaching socket-level load balancing to {}", cg.display()))?;
    tracing::info!(cgroup = %cg.display(), "socket-level load balancing attached");
    Ok(())
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> anyhow::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .with_context(|| format!("starting the {name} thread"))
}

fn datapath_stats(state: &SharedState<KernelDataplane>) -> anyhow::Result<observe::DatapathStats> {
    let guard = state.lock().unwrap_or_else(|p| p.into_inner());
    let dp = &guard.dataplane.datapath;
    let maps = dp.map_fill().context("reading BPF map fill levels")?;
    let nat_entries = maps
        .iter()
        .find(|m| m.name == "ferrum_nat")
        .map_or(0, |m| m.entries);
    Ok(observe::DatapathStats {
        endpoints: maps
            .iter()
            .find(|m| m.name == "ferrum_endpoints")
            .map_or(0, |m| m.entries),
        events_lost: dp
            .events_lost()
            .context("reading the lost-events counter")?,
        nat_entries,
        maps,
    })
}

fn event_loop(
    mut reader: ferrum_datapath::bpf::EventReader,
    counters: SharedCounters,
    observer: Arc<observe::Observer>,
) {
    use ferrum_datapath::bpf::EventKind;
    loop {
        let batch = match reader.poll(Duration::from_secs(1)) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!("reading datapath events failed: {e}");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        observer.record(&batch);
        let mut c = counters.lock().unwrap_or_else(|p| p.into_inner());
        for ev in batch {
            let kind = match ev.kind {
                EventKind::Drop => Kind::Drop,
                EventKind::Trace => Kind::Trace,
                EventKind::Unknown(_) => Kind::Unknown,
            };
            let reason = ev.reason.to_string();
            let first = c.record(kind, &reason);
            if kind == Kind::Drop && first {
                tracing::info!(reason = %reason, src = %ev.src, dst = %ev.dst, proto = ev.proto, ifindex = ev.ifindex, "datapath drop (first of this reason; later ones at debug)");
            } else {
                tracing::debug!(?kind, reason = %reason, src = %ev.src, dst = %ev.dst, proto = ev.proto, ifindex = ev.ifindex, "datapath event");
            }
        }
    }
}
