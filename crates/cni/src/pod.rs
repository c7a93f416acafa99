//! The kernel side of an attachment: the veth pair and the pod's addressing, over netlink.

use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::Path;

use anyhow::{Context, Result, bail};
use ferrum_datapath::link::{LinkError, LinkInfo, Netlink, set_sysctl};
use ferrum_datapath::netns::{open_netns, run_in_netns};
use ipnet::Ipv4Net;

/// What the pod side should look like.
pub struct PodSpec<'a> {
    pub netns: &'a Path,
    pub ifname: &'a str,
    pub ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub mtu: u32,
}

pub struct Built {
    pub host: LinkInfo,
    pub pod: LinkInfo,
}

/// Creates the veth pair (host end `host_ifname` here in the node namespace, peer born in the
/// pod namespace as `spec.ifname`), configures the pod end, and brings the host end up.
pub fn build(host_ifname: &str, spec: &PodSpec) -> Result<Built> {
    let nl = Netlink::connect().context("open netlink in the node namespace")?;
    // The name derives from the attachment key, so an existing link is a leftover of an
    // earlier ADD of this same attachment: replace it.
    if nl.link(host_ifname)?.is_some() {
        tracing::info!(
            host_ifname,
            "removing leftover host interface of this attachment"
        );
        nl.delete_link(host_ifname)?;
    }
    let pod_ns = open_netns(spec.netns)?;
    let host = nl
        .create_veth_with_peer_in(host_ifname, spec.ifname, pod_ns.as_fd(), spec.mtu)
        .with_context(|| {
            format!(
                "create veth {host_ifname} with {} in {}",
                spec.ifname,
                spec.netns.display()
            )
        })?;
    let pod = run_in_netns(spec.netns, || configure_pod_side(spec, host.mac))?
        .with_context(|| format!("configure {} in {}", spec.ifname, spec.netns.display()))?;
    nl.set_up(host_ifname)?;
    let host = nl
        .link(host_ifname)?
        .with_context(|| format!("host interface {host_ifname} vanished after creation"))?;
    Ok(Built { host, pod })
}

/// Runs inside the pod namespace.
fn configure_pod_side(spec: &PodSpec, host_mac: [u8; 6]) -> Result<LinkInfo> {
    let nl = Netlink::connect().context("open netlink in the pod namespace")?;
    // Before link up, so the interface never sends IPv6 router solicitations or DAD probes.
    match set_sysctl(&format!("net/ipv6/conf/{}/disable_ipv6", spec.ifname), "1") {
        Err(LinkError::Sysctl { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            tracing::debug!("IPv6 is not available in the pod namespace; nothing to disable");
        }
        r => r?,
    }
    nl.set_up("lo")?;
    nl.add_address(spec.ifname, Ipv4Net::from(spec.ip))?;
    nl.set_up(spec.ifname)?;
    nl.replace_route(Ipv4Net::from(spec.gateway), spec.ifname, None, true, None)?;
    nl.replace_route(
        Ipv4Net::default(),
        spec.ifname,
        Some(spec.gateway),
        false,
        None,
    )?;
    // The gateway is not a real host: answer for it with the host end's MAC, forever.
    nl.replace_permanent_neighbor(spec.ifname, spec.gateway, host_mac)?;
    nl.link(spec.ifname)?
        .with_context(|| format!("{} vanished during configuration", spec.ifname))
}

/// Deletes the host end (the peer goes with it); a missing interface is fine.
pub fn remove(host_ifname: &str) -> Result<()> {
    let nl = Netlink::connect().context("open netlink in the node namespace")?;
    nl.delete_link(host_ifname)
        .with_context(|| format!("delete host interface {host_ifname}"))
}

/// CHECK: the host end exists and is up; in the pod, `ifname` is up and holds `ip/32`.
pub fn verify(host_ifname: &str, netns: &Path, ifname: &str, ip: Ipv4Addr) -> Result<()> {
    let nl = Netlink::connect().context("open netlink in the node namespace")?;
    match nl.link(host_ifname)? {
        Some(l) if l.up => {}
        Some(_) => bail!("host interface {host_ifname} is down"),
        None => bail!("host interface {host_ifname} is missing"),
    }
    run_in_netns(netns, || -> Result<()> {
        let nl = Netlink::connect().context("open netlink in the pod namespace")?;
        match nl.link(ifname)? {
            Some(l) if l.up => {}
            Some(_) => bail!("{ifname} in {} is down", netns.display()),
            None => bail!("{ifname} is missing from {}", netns.display()),
        }
        let want = Ipv4Net::from(ip);
        let have = nl.addresses(ifname)?;
        if !have.contains(&want) {
            bail!(
                "{ifname} in {} lacks address {want} (has {have:?})",
                netns.display()
            );
        }
        Ok(())
    })?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::process::Command;

    struct TestNetns(String);
    impl TestNetns {
        fn new(tag: &str) -> Self {
            let name = format!("fe-cnipod-{tag}-{}", std::process::id());
            assert!(
                Command::new("ip")
                    .args(["netns", "add", &name])
                    .status()
                    .expect("run ip")
                    .success()
            );
            Self(name)
        }
        fn path(&self) -> PathBuf {
            PathBuf::from(format!("/run/netns/{}", self.0))
        }
        fn ip(&self, args: &str) -> String {
            let out = Command::new("ip")
                .args(["-n", &self.0])
                .args(args.split_whitespace())
                .output()
                .expect("run ip");
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    }
    impl Drop for TestNetns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    /// The kernel half of ADD, CHECK and DEL, in a test node and pod namespace.
    #[test]
    fn build_verify_remove() {
        let node = TestNetns::new("node");
        let pod = TestNetns::new("pod");
        let pod_path = pod.path();
        let spec = PodSpec {
            netns: &pod_path,
            ifname: "eth0",
            ip: Ipv4Addr::new(10, 244, 1, 7),
            gateway: Ipv4Addr::new(169, 254, 1, 1),
            mtu: 1450,
        };
        let built = run_in_netns(&node.path(), || build("fetest0", &spec))
            .expect("enter node")
            .expect("build");
        assert!(built.host.up);
        assert_eq!(built.host.mtu, 1450);
        assert_eq!(built.pod.mtu, 1450);
        assert!(built.pod.up);

        let addrs = pod.ip("-4 addr show dev eth0");
        assert!(addrs.contains("10.244.1.7/32"), "{addrs}");
        assert!(pod.ip("link show lo").contains("UP"));
        let routes = pod.ip("-4 route show");
        assert!(
            routes.contains("default via 169.254.1.1 dev eth0"),
            "{routes}"
        );
        let neigh = pod.ip("neigh show 169.254.1.1 dev eth0");
        assert!(neigh.contains(&ferrum_datapath::link::format_mac(&built.host.mac)));
        assert!(neigh.contains("PERMANENT"), "{neigh}");
        let v6 = run_in_netns(&pod_path, || {
            std::fs::read_to_string("/proc/sys/net/ipv6/conf/eth0/disable_ipv6")
        })
        .expect("enter pod");
        if let Ok(v6) = v6 {
            assert_eq!(v6.trim(), "1");
        }

        run_in_netns(&node.path(), || {
            verify("fetest0", &pod_path, "eth0", spec.ip).expect("verify");
            let wrong = verify("fetest0", &pod_path, "eth0", Ipv4Addr::new(10, 244, 1, 8));
            assert!(wrong.is_err(), "verify must notice a wrong address");
            // A second build of the same attachment replaces the leftover.
            build("fetest0", &spec).expect("rebuild");
            remove("fetest0").expect("remove");
            remove("fetest0").expect("remove again");
            assert!(verify("fetest0", &pod_path, "eth0", spec.ip).is_err());
        })
        .expect("enter node");
        assert!(!pod.ip("link show").contains("eth0"));
    }
}
