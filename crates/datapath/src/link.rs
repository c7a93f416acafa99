//! Links, addresses, routes and neighbours over rtnetlink, behind a small synchronous facade.
//!
//! rtnetlink is async; callers (the CNI plugin, the agent's handlers) are plain threads, so each
//! [`Netlink`] owns a current-thread tokio runtime and blocks on each request. The netlink
//! socket belongs to the network namespace of the thread that called [`Netlink::connect`]:
//! to work in a pod's namespace, connect from inside `netns::run_in_netns`.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::PathBuf;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVeth, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo as NlLinkInfo,
    LinkMessage,
};
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::{RouteProtocol, RouteScope};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVxlan, RouteMessageBuilder};

const ESRCH: i32 = 3;
const ENODEV: i32 = 19;
const EEXIST: i32 = 17;

/// What callers need to know about a network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    /// All zeros for links without a 6-byte hardware address.
    pub mac: [u8; 6],
    pub mtu: u32,
    /// Administratively up (IFF_UP).
    pub up: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot start the netlink client: {0}")]
    Connect(#[source] std::io::Error),
    #[error("interface {name} does not exist in this network namespace")]
    NoSuchLink { name: String },
    #[error("netlink: cannot {op} {object}: {source}")]
    Netlink {
        op: &'static str,
        object: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("netlink: {op} {object} returned nothing")]
    NoReply { op: &'static str, object: String },
    #[error("cannot write sysctl {path}: {source}")]
    Sysctl {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl LinkError {
    /// The kernel's errno, when the kernel refused the request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            LinkError::Netlink { source, .. } => errno_of(source),
            _ => None,
        }
    }
}

fn errno_of(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| -c.get()),
        _ => None,
    }
}

/// A netlink connection bound to the network namespace it was created in.
pub struct Netlink {
    runtime: tokio::runtime::Runtime,
    handle: Handle,
}

impl Netlink {
    /// Opens a NETLINK_ROUTE socket in the calling thread's network namespace.
    pub fn connect() -> Result<Netlink, LinkError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(LinkError::Connect)?;
        // The socket registers with the runtime's reactor, so it must be made inside it.
        let handle = runtime.block_on(async {
            let (connection, handle, _) = rtnetlink::new_connection()?;
            tokio::spawn(connection);
            Ok::<_, std::io::Error>(handle)
        });
        Ok(Netlink {
            runtime,
            handle: handle.map_err(LinkError::Connect)?,
        })
    }

    fn wrap<T>(
        op: &'static str,
        object: &str,
        r: Result<T, rtnetlink::Error>,
    ) -> Result<T, LinkError> {
        r.map_err(|source| LinkError::Netlink {
            op,
            object: object.to_string(),
            source,
        })
    }

    /// Looks up an interface by name; `None` when it does not exist.
    pub fn link(&self, name: &str) -> Result<Option<LinkInfo>, LinkError> {
        match self.link_message(name)? {
            Some(msg) => Ok(Some(link_info(&msg))),
            None => Ok(None),
        }
    }

    fn link_message(&self, name: &str) -> Result<Option<LinkMessage>, LinkError> {
        let result = self.runtime.block_on(async {
            self.handle
                .link()
                .get()
                .match_name(name)
                .execute()
                .try_next()
                .await
        });
        match result {
            Ok(msg) => Ok(msg),
            Err(e) if errno_of(&e) == Some(ENODEV) => Ok(None),
            Err(source) => Err(LinkError::Netlink {
                op: "look up interface",
                object: name.to_string(),
                source,
            }),
        }
    }

    fn index(&self, name: &str) -> Result<u32, LinkError> {
        self.link(name)?
            .map(|l| l.index)
            .ok_or_else(|| LinkError::NoSuchLink {
                name: name.to_string(),
            })
    }

    fn change(&self, op: &'static str, name: &str, msg: LinkMessage) -> Result<(), LinkError> {
        let r = self
            .runtime
            .block_on(async { self.handle.link().change(msg).execute().await });
        Self::wrap(op, name, r)
    }

    /// Creates a veth pair, both ends in this namespace and down, with `mtu` on both.
    pub fn create_veth(&self, name: &str, peer: &str, mtu: u32) -> Result<LinkInfo, LinkError> {
        self.add_veth(name, peer, mtu, None)
    }

    /// Creates a veth pair whose peer is born inside another namespace under its final name
    /// (one atomic request: no temporary name, no window where the peer sits in this
    /// namespace). The local end is returned; both ends are down.
    pub fn create_veth_with_peer_in(
        &self,
        name: &str,
        peer: &str,
        peer_netns: BorrowedFd,
        mtu: u32,
    ) -> Result<LinkInfo, LinkError> {
        self.add_veth(name, peer, mtu, Some(peer_netns))
    }

    fn add_veth(
        &self,
        name: &str,
        peer: &str,
        mtu: u32,
        peer_netns: Option<BorrowedFd>,
    ) -> Result<LinkInfo, LinkError> {
        let mut peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer.to_string())
            .mtu(mtu);
        if let Some(fd) = peer_netns {
            peer_msg = peer_msg.setns_by_fd(fd.as_raw_fd());
        }
        let msg = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
            .name(name.to_string())
            .mtu(mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg.build())))
            .build();
        let r = self
            .runtime
            .block_on(async { self.handle.link().add(msg).execute().await });
        Self::wrap("create veth", &format!("{name} (peer {peer})"), r)?;
        self.link(name)?.ok_or_else(|| LinkError::NoReply {
            op: "create veth",
            object: name.to_string(),
        })
    }

    /// Moves an interface into the namespace behind `netns_fd` (it arrives down).
    pub fn move_to_netns(&self, name: &str, netns_fd: BorrowedFd) -> Result<(), LinkError> {
        let msg = LinkUnspec::new_with_index(self.index(name)?)
            .setns_by_fd(netns_fd.as_raw_fd())
            .build();
        self.change("move to another namespace", name, msg)
    }

    /// Renames an interface (the kernel may refuse while it is up).
    pub fn rename(&self, name: &str, new: &str) -> Result<(), LinkError> {
        let msg = LinkUnspec::new_with_index(self.index(name)?)
            .name(new.to_string())
            .build();
        self.change("rename", &format!("{name} to {new}"), msg)
    }

    pub fn set_up(&self, name: &str) -> Result<(), LinkError> {
        let msg = LinkUnspec::new_with_index(self.index(name)?).up().build();
        self.change("set up", name, msg)
    }

    pub fn set_mtu(&self, name: &str, mtu: u32) -> Result<(), LinkError> {
        let msg = LinkUnspec::new_with_index(self.index(name)?)
            .mtu(mtu)
            .build();
        self.change("set mtu of", name, msg)
    }

    /// Turns ARP off on the interface (IFF_NOARP).
    pub fn set_noarp(&self, name: &str) -> Result<(), LinkError> {
        let msg = LinkUnspec::new_with_index(self.index(name)?)
            .arp(false)
            .build();
        self.change("set noarp on", name, msg)
    }

    /// Adds an IPv4 address; an address that is already there is fine.
    pub fn add_address(&self, name: &str, addr: Ipv4Net) -> Result<(), LinkError> {
        let index = self.index(name)?;
        let r = self.runtime.block_on(async {
            self.handle
                .address()
                .add(index, IpAddr::V4(addr.addr()), addr.prefix_len())
                .execute()
                .await
        });
        match r {
            Err(e) if errno_of(&e) == Some(EEXIST) => Ok(()),
            r => Self::wrap("add address", &format!("{addr} on {name}"), r),
        }
    }

    /// The IPv4 addresses on an interface, with their prefix lengths.
    pub fn addresses(&self, name: &str) -> Result<Vec<Ipv4Net>, LinkError> {
        let index = self.index(name)?;
        let r = self.runtime.block_on(async {
            self.handle
                .address()
                .get()
                .set_link_index_filter(index)
                .execute()
                .try_collect::<Vec<_>>()
                .await
        });
        let messages = Self::wrap("list addresses of", name, r)?;
        let mut out = Vec::new();
        for msg in messages {
            // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer on
            // point-to-point links, and the same as IFA_LOCAL otherwise.
            let local = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            let address = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            if let Some(ip) = local.or(address)
                && let Ok(net) = Ipv4Net::new(ip, msg.header.prefix_len)
            {
                out.push(net);
            }
        }
        Ok(out)
    }

    /// Creates or replaces the main-table route to `dst` through `dev`.
    pub fn replace_route(
        &self,
        dst: Ipv4Net,
        dev: &str,
        via: Option<Ipv4Addr>,
        scope_link: bool,
        src: Option<Ipv4Addr>,
    ) -> Result<(), LinkError> {
        let index = self.index(dev)?;
        let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.network(), dst.prefix_len())
            .output_interface(index);
        if let Some(gw) = via {
            builder = builder.gateway(gw);
        }
        if scope_link {
            builder = builder.scope(RouteScope::Link);
        }
        if let Some(src) = src {
            builder = builder.pref_source(src);
        }
        let msg = builder.build();
        let r = self
            .runtime
            .block_on(async { self.handle.route().add(msg).replace().execute().await });
        Self::wrap("replace route", &format!("{dst} dev {dev}"), r)
    }

    /// Deletes the main-table route to `dst`; a missing route is fine.
    pub fn delete_route(&self, dst: Ipv4Net) -> Result<(), LinkError> {
        // Scope "nowhere" and protocol "unspec" are wildcards for the kernel's match, as
        // `ip route del` sends them; the builder's defaults would miss scope-link routes.
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.network(), dst.prefix_len())
            .scope(RouteScope::NoWhere)
            .protocol(RouteProtocol::Unspec)
            .build();
        let r = self
            .runtime
            .block_on(async { self.handle.route().del(msg).execute().await });
        match r {
            Err(e) if errno_of(&e) == Some(ESRCH) => Ok(()),
            r => Self::wrap("delete route", &dst.to_string(), r),
        }
    }

    /// Sets a PERMANENT neighbour entry `ip -> mac` on `dev`, replacing any existing one.
    pub fn replace_permanent_neighbor(
        &self,
        dev: &str,
        ip: Ipv4Addr,
        mac: [u8; 6],
    ) -> Result<(), LinkError> {
        let index = self.index(dev)?;
        let r = self.runtime.block_on(async {
            self.handle
                .neighbours()
                .add(index, IpAddr::V4(ip))
                .link_layer_address(&mac)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
        });
        Self::wrap(
            "set permanent neighbour",
            &format!("{ip} lladdr {} dev {dev}", format_mac(&mac)),
            r,
        )
    }

    /// Deletes an interface (for a veth, both ends go); a missing interface is fine.
    pub fn delete_link(&self, name: &str) -> Result<(), LinkError> {
        let Some(link) = self.link(name)? else {
            return Ok(());
        };
        let r = self
            .runtime
            .block_on(async { self.handle.link().del(link.index).execute().await });
        match r {
            Err(e) if errno_of(&e) == Some(ENODEV) => Ok(()),
            r => Self::wrap("delete interface", name, r),
        }
    }

    /// VXLAN in collect-metadata mode (`external`), UDP dstport, learning off, NOARP, up.
    ///
    /// An existing device of that name is kept when it is already such a device (MTU is
    /// corrected); otherwise it is replaced, since a VXLAN device in another mode or on another
    /// port cannot carry the overlay.
    pub fn ensure_vxlan_external(
        &self,
        name: &str,
        dstport: u16,
        mtu: u32,
    ) -> Result<LinkInfo, LinkError> {
        if let Some(existing) = self.link_message(name)? {
            if is_external_vxlan_on(&existing, dstport) {
                let info = link_info(&existing);
                if info.mtu != mtu {
                    self.set_mtu(name, mtu)?;
                }
                self.set_noarp(name)?;
                set_sysctl(&format!("net/ipv6/conf/{name}/disable_ipv6"), "1")?;
                self.set_up(name)?;
                return self.link(name)?.ok_or_else(|| LinkError::NoSuchLink {
                    name: name.to_string(),
                });
            }
            tracing::warn!(
                device = name,
                "existing interface is not an external VXLAN device on port {dstport}; replacing it"
            );
            self.delete_link(name)?;
        }
        let msg = LinkMessageBuilder::<LinkVxlan>::new(name)
            .port(dstport)
            .learning(false)
            .collect_metadata(true)
            .mtu(mtu)
            .arp(false)
            .build();
        let r = self
            .runtime
            .block_on(async { self.handle.link().add(msg).execute().await });
        Self::wrap("create vxlan device", name, r)?;
        // The overlay carries IPv4 only: without this, bringing the device up sends IPv6
        // router solicitations and MLD reports that the overlay program can only drop.
        set_sysctl(&format!("net/ipv6/conf/{name}/disable_ipv6"), "1")?;
        self.set_up(name)?;
        self.link(name)?.ok_or_else(|| LinkError::NoReply {
            op: "create vxlan device",
            object: name.to_string(),
        })
    }

    /// The node's device for traffic the host stack routes to local pods (Cilium's
    /// `cilium_host` plays this part): one end of a veth pair whose other end (`peer`) only
    /// keeps it up; both NOARP, IPv4 only. Its egress program hands each packet to its pod.
    /// A leftover device of another kind under the name is replaced.
    pub fn ensure_host_device(
        &self,
        name: &str,
        peer: &str,
        mtu: u32,
    ) -> Result<LinkInfo, LinkError> {
        let existing = self.link_message(name)?;
        let adoptable = existing
            .as_ref()
            .is_some_and(|m| link_kind_is(m, &InfoKind::Veth))
            && self.link(peer)?.is_some();
        if !adoptable {
            if existing.is_some() {
                tracing::warn!(
                    device = name,
                    "existing interface is not the host device's veth pair; replacing it"
                );
                self.delete_link(name)?;
            }
            // A peer left without its partner would make the create fail.
            self.delete_link(peer)?;
            self.create_veth(name, peer, mtu)?;
        }
        for dev in [name, peer] {
            if self.link(dev)?.is_some_and(|l| l.mtu != mtu) {
                self.set_mtu(dev, mtu)?;
            }
            self.set_noarp(dev)?;
            // Nothing should send router solicitations through it.
            set_sysctl(&format!("net/ipv6/conf/{dev}/disable_ipv6"), "1")?;
            self.set_up(dev)?;
        }
        self.link(name)?.ok_or_else(|| LinkError::NoReply {
            op: "create host device",
            object: name.to_string(),
        })
    }
}

fn link_infos(msg: &LinkMessage) -> &[NlLinkInfo] {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => Some(infos.as_slice()),
            _ => None,
        })
        .unwrap_or_default()
}

fn link_kind_is(msg: &LinkMessage, kind: &InfoKind) -> bool {
    link_infos(msg)
        .iter()
        .any(|i| matches!(i, NlLinkInfo::Kind(k) if k == kind))
}

fn is_external_vxlan_on(msg: &LinkMessage, dstport: u16) -> bool {
    let data = link_infos(msg).iter().find_map(|i| match i {
        NlLinkInfo::Data(InfoData::Vxlan(d)) => Some(d),
        _ => None,
    });
    let Some(data) = data else { return false };
    link_kind_is(msg, &InfoKind::Vxlan)
        && data.contains(&InfoVxlan::CollectMetadata(true))
        && data.contains(&InfoVxlan::Port(dstport))
}

fn link_info(msg: &LinkMessage) -> LinkInfo {
    let mut info = LinkInfo {
        index: msg.header.index,
        name: String::new(),
        mac: [0; 6],
        mtu: 0,
        up: msg.header.flags.contains(LinkFlags::Up),
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => info.name = n.clone(),
            LinkAttribute::Mtu(m) => info.mtu = *m,
            LinkAttribute::Address(a) if a.len() == 6 => info.mac.copy_from_slice(a),
            _ => {}
        }
    }
    info
}

/// `aa:bb:cc:dd:ee:ff`, the form CNI results and `ip` use.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Writes /proc/sys/<key> in the calling thread's netns. `key` is either dotted
/// (`net.ipv4.ip_forward`) or a path (`net/ipv6/conf/eth0/disable_ipv6`); use the path form
/// when a component (an interface name) contains dots.
pub fn set_sysctl(key: &str, value: &str) -> Result<(), LinkError> {
    let path = sysctl_path(key);
    // /proc/sys/net resolves against the namespace of the task that opens the file: this thread.
    std::fs::write(&path, value).map_err(|source| LinkError::Sysctl { path, source })
}

fn sysctl_path(key: &str) -> PathBuf {
    let relative = if key.contains('/') {
        key.trim_start_matches('/').to_string()
    } else {
        key.replace('.', "/")
    };
    PathBuf::from("/proc/sys").join(relative)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netns::{open_netns, run_in_netns};
    use std::os::fd::AsFd;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    struct TestNetns {
        name: String,
    }

    impl TestNetns {
        fn new(tag: &str) -> Self {
            let name = format!("fe-lktest-{tag}-{}", std::process::id());
            let ok = Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .expect("run ip")
                .success();
            assert!(ok, "ip netns add {name}");
            Self { name }
        }
        fn path(&self) -> PathBuf {
            PathBuf::from(format!("/run/netns/{}", self.name))
        }
        fn run<T: Send>(&self, f: impl FnOnce(&Netlink) -> T + Send) -> T {
            run_in_netns(&self.path(), || {
                let nl = Netlink::connect().expect("connect netlink");
                f(&nl)
            })
            .expect("run in netns")
        }
        fn ip(&self, args: &str) -> String {
            let out = Command::new("ip")
                .args(["-n", &self.name])
                .args(args.split_whitespace())
                .output()
                .expect("run ip");
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    }

    impl Drop for TestNetns {
        fn drop(&mut self) {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
        }
    }

    #[test]
    fn sysctl_keys_map_to_proc_paths() {
        assert_eq!(
            sysctl_path("net.ipv4.ip_forward"),
            Path::new("/proc/sys/net/ipv4/ip_forward")
        );
        assert_eq!(
            sysctl_path("net/ipv6/conf/eth0.100/disable_ipv6"),
            Path::new("/proc/sys/net/ipv6/conf/eth0.100/disable_ipv6")
        );
    }

    #[test]
    fn mac_formatting() {
        assert_eq!(
            format_mac(&[0x02, 0, 0xab, 0x10, 0xff, 1]),
            "02:00:ab:10:ff:01"
        );
    }

    #[test]
    fn veth_addresses_routes_and_neighbours() {
        let ns = TestNetns::new("veth");
        ns.run(|nl| {
            assert_eq!(nl.link("nope0").expect("lookup"), None);
            let a = nl.create_veth("va", "vb", 1400).expect("create veth");
            assert_eq!(a.mtu, 1400);
            assert!(!a.up);
            assert_eq!(nl.link("vb").expect("lookup").expect("peer").mtu, 1400);
            nl.set_mtu("va", 1300).expect("mtu");
            nl.rename("vb", "vpod").expect("rename");
            assert!(nl.link("vb").expect("lookup").is_none());
            nl.set_up("va").expect("up");
            nl.set_up("vpod").expect("up");
            let a = nl.link("va").expect("lookup").expect("va");
            assert!(a.up);
            assert_eq!(a.mtu, 1300);
            assert_ne!(a.mac, [0; 6]);

            let addr: Ipv4Net = "10.9.8.7/32".parse().expect("net");
            nl.add_address("vpod", addr).expect("address");
            nl.add_address("vpod", addr)
                .expect("same address again is fine");
            assert_eq!(nl.addresses("vpod").expect("list"), vec![addr]);

            let gw = Ipv4Addr::new(169, 254, 1, 1);
            nl.replace_route(Ipv4Net::from(gw), "vpod", None, true, None)
                .expect("link route");
            nl.replace_route(
                Ipv4Net::default(),
                "vpod",
                Some(gw),
                false,
                Some(addr.addr()),
            )
            .expect("default route");
            nl.replace_route(Ipv4Net::default(), "vpod", Some(gw), false, None)
                .expect("replacing is idempotent");
            nl.replace_permanent_neighbor("vpod", gw, a.mac)
                .expect("neighbour");
            nl.replace_permanent_neighbor("vpod", gw, a.mac)
                .expect("neighbour replace");
        });
        let routes = ns.ip("-4 route show");
        assert!(
            routes.contains("default via 169.254.1.1 dev vpod"),
            "{routes}"
        );
        assert!(
            routes
                .lines()
                .any(|l| l.starts_with("169.254.1.1 dev vpod") && l.contains("scope link")),
            "{routes}"
        );
        let neigh = ns.ip("neigh show dev vpod");
        assert!(
            neigh.contains("169.254.1.1") && neigh.contains("PERMANENT"),
            "{neigh}"
        );

        ns.run(|nl| {
            nl.delete_route(Ipv4Net::default()).expect("delete route");
            nl.delete_route(Ipv4Net::default())
                .expect("absent route is fine");
            nl.delete_link("va").expect("delete");
            assert!(nl.link("vpod").expect("lookup").is_none(), "peer goes too");
            nl.delete_link("va").expect("absent link is fine");
        });
        assert!(!ns.ip("-4 route show").contains("default"));
    }

    #[test]
    fn host_device_is_a_noarp_veth_pair_adopted_or_replaced() {
        let ns = TestNetns::new("hostdev");
        ns.run(|nl| {
            let d = nl
                .ensure_host_device("fe_host", "fe_net", 1450)
                .expect("create");
            assert!(d.up);
            assert_eq!(d.mtu, 1450);
            let again = nl
                .ensure_host_device("fe_host", "fe_net", 1400)
                .expect("adopt");
            assert_eq!(again.index, d.index, "an existing pair is kept");
            assert_eq!(again.mtu, 1400);
            assert_eq!(nl.link("fe_net").expect("lookup").expect("peer").mtu, 1400);
            // A partner-less name (here a veth to something else) is replaced.
            nl.delete_link("fe_host").expect("delete");
            nl.create_veth("fe_host", "other", 1500).expect("veth");
            let replaced = nl
                .ensure_host_device("fe_host", "fe_net", 1450)
                .expect("replace");
            assert!(nl.link("other").expect("lookup").is_none(), "old pair gone");
            assert_ne!(replaced.index, again.index);
            assert!(nl.link("fe_net").expect("lookup").expect("peer").up);
        });
        let link = ns.ip("-d link show fe_host");
        assert!(link.contains("NOARP") && link.contains("veth"), "{link}");
    }

    #[test]
    fn veth_peer_is_born_in_the_other_namespace() {
        let node = TestNetns::new("node");
        let pod = TestNetns::new("pod");
        let pod_fd = open_netns(&pod.path()).expect("open pod netns");
        node.run(|nl| {
            let host = nl
                .create_veth_with_peer_in("fehost0", "eth0", pod_fd.as_fd(), 1450)
                .expect("create");
            assert_eq!(host.mtu, 1450);
            assert!(nl.link("eth0").expect("lookup").is_none());
        });
        pod.run(|nl| {
            let eth0 = nl.link("eth0").expect("lookup").expect("eth0 in pod");
            assert_eq!(eth0.mtu, 1450);
            // The classic path too: move back out by fd.
            let node_fd = open_netns(&node.path()).expect("open node netns");
            nl.rename("eth0", "tmp0").expect("rename");
            nl.move_to_netns("tmp0", node_fd.as_fd()).expect("move");
            assert!(nl.link("tmp0").expect("lookup").is_none());
        });
        node.run(|nl| {
            assert!(nl.link("tmp0").expect("lookup").is_some());
            nl.delete_link("fehost0").expect("delete");
        });
    }

    #[test]
    fn vxlan_external_is_created_once_and_kept() {
        let ns = TestNetns::new("vx");
        let first = ns.run(|nl| {
            nl.ensure_vxlan_external("fevx", 8472, 1450)
                .expect("create")
        });
        assert!(first.up);
        let details = ns.ip("-d link show fevx");
        assert!(details.contains("external"), "{details}");
        assert!(details.contains("dstport 8472"), "{details}");
        assert!(details.contains("nolearning"), "{details}");
        assert!(details.contains("NOARP"), "{details}");
        let second = ns.run(|nl| nl.ensure_vxlan_external("fevx", 8472, 1400).expect("again"));
        assert_eq!(second.index, first.index, "a matching device is kept");
        assert_eq!(second.mtu, 1400);
        let third = ns.run(|nl| nl.ensure_vxlan_external("fevx", 4789, 1400).expect("port"));
        assert_ne!(
            third.index, first.index,
            "a device on another port is replaced"
        );
        assert!(ns.ip("-d link show fevx").contains("dstport 4789"));
    }

    #[test]
    fn sysctl_is_written_in_the_thread_namespace() {
        let ns = TestNetns::new("sysctl");
        let root_before = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").ok();
        let inside = ns.run(|_| {
            set_sysctl("net.ipv4.ip_forward", "1").expect("write");
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").expect("read")
        });
        assert_eq!(inside.trim(), "1");
        assert_eq!(
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").ok(),
            root_before,
            "the caller's namespace is untouched"
        );
        let err = ns
            .run(|_| set_sysctl("net.ipv4.no_such_key", "1"))
            .expect_err("missing key");
        assert!(err.to_string().contains("no_such_key"), "{err}");
    }

    #[test]
    fn missing_interface_errors_name_it() {
        let ns = TestNetns::new("missing");
        let err = ns.run(|nl| nl.set_up("ghost0")).expect_err("must fail");
        assert!(err.to_string().contains("ghost0"), "{err}");
    }
}
