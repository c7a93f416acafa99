//! VNet mode: the lab's stand-in for the cloud's network controller. It watches the
//! NodeNetworkConfig objects, serves each node's request from the pod subnet (batches, never
//! one address on two nodes), programs the fabric's routes to the node for every address it
//! assigns, and only then publishes the assignment in the object's status.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

use ferrum_ipam::SubnetAllocator;
use ferrum_model::{Kind, NncScaler, NncStatus, NodeNetworkConfig, Object, WatchEvent};
use ipnet::Ipv4Net;
use tracing::{info, warn};

use crate::controlplane::ControlPlane;
use crate::network_profile::NetworkProfile;

/// How the cloud makes an address reachable on the fabric.
pub trait Routes {
    /// Routes every address in `add` to `node_ip`, and stops routing `remove`.
    fn program(
        &mut self,
        node_ip: Ipv4Addr,
        add: &[Ipv4Addr],
        remove: &[Ipv4Addr],
    ) -> Result<(), String>;
}

/// The fabric namespace's routing table, through `ip -batch`.
pub struct FabricRoutes {
    pub netns: String,
}

impl Routes for FabricRoutes {
    fn program(
        &mut self,
        node_ip: Ipv4Addr,
        add: &[Ipv4Addr],
        remove: &[Ipv4Addr],
    ) -> Result<(), String> {
        if !remove.is_empty() {
            let lines: String = remove
                .iter()
                .map(|ip| format!("route del {ip}/32\n"))
                .collect();
            // A route already gone is fine: -force keeps going.
            let _ = ip_batch(&self.netns, &lines, true);
        }
        if !add.is_empty() {
            let lines: String = add
                .iter()
                .map(|ip| format!("route replace {ip}/32 via {node_ip}\n"))
                .collect();
            ip_batch(&self.netns, &lines, false)?;
        }
        Ok(())
    }
}

fn ip_batch(netns: &str, lines: &str, force: bool) -> Result<(), String> {
    use std::io::Write;
    let mut args = vec!["-n", netns];
    if force {
        args.push("-force");
    }
    args.extend(["-batch", "-"]);
    let mut child = std::process::Command::new("ip")
        .args(&args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run ip (is iproute2 installed?): {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(lines.as_bytes())
            .map_err(|e| format!("writing to ip -batch: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for ip -batch: {e}"))?;
    if !out.status.success() && !force {
        return Err(format!(
            "ip -n {netns} -batch failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    #[error("the pod subnet state in the NodeNetworkConfigs is inconsistent: {0}")]
    Inconsistent(#[from] ferrum_ipam::vnet::SubnetError),
    #[error("VNet mode needs a pod subnet in the profile")]
    NoSubnet,
}

/// The cloud's state: the subnet's assignments and where each node is.
pub struct Cloud {
    subnet: SubnetAllocator,
    scaler: NncScaler,
    node_ips: BTreeMap<String, Ipv4Addr>,
    /// Addresses whose fabric route is known to be in place.
    routed: BTreeSet<Ipv4Addr>,
}

fn nncs(cp: &ControlPlane) -> Vec<NodeNetworkConfig> {
    cp.list(Kind::NodeNetworkConfig, None)
        .into_iter()
        .filter_map(|o| match o {
            Object::NodeNetworkConfig(n) => Some(n),
            _ => None,
        })
        .collect()
}

fn assigned(n: &NodeNetworkConfig) -> BTreeSet<Ipv4Addr> {
    n.status
        .as_ref()
        .map(|s| s.assigned_ips.iter().copied().collect())
        .unwrap_or_default()
}

impl Cloud {
    /// Rebuilds the cloud from the persisted NodeNetworkConfig statuses.
    pub fn restore(cp: &ControlPlane, profile: &NetworkProfile) -> Result<Self, CloudError> {
        let subnet: Ipv4Net = profile.pod_subnet.ok_or(CloudError::NoSubnet)?;
        let existing = nncs(cp);
        let sets: Vec<(String, BTreeSet<Ipv4Addr>)> = existing
            .iter()
            .map(|n| (n.node().to_string(), assigned(n)))
            .collect();
        let allocator =
            SubnetAllocator::restore(subnet, sets.iter().map(|(n, s)| (n.as_str(), s)))?;
        let scaler = ferrum_ipam::Scaler::new(
            profile.ip_batch_size,
            profile.ip_request_threshold_percent,
            profile.ip_release_threshold_percent,
            profile.max_pods,
        );
        Ok(Self {
            subnet: allocator,
            scaler: NncScaler {
                batch_size: scaler.batch_size,
                request_threshold_percent: scaler.request_threshold_percent,
                release_threshold_percent: scaler.release_threshold_percent,
                max_ip_count: scaler.max_ip_count,
            },
            node_ips: profile
                .node_names()
                .into_iter()
                .enumerate()
                .map(|(i, n)| (n, profile.node_ip(u32::try_from(i).unwrap_or(u32::MAX))))
                .collect(),
            routed: BTreeSet::new(),
        })
    }

    /// Serves every node's current request; returns how many statuses changed.
    pub fn reconcile(&mut self, cp: &ControlPlane, routes: &mut dyn Routes) -> usize {
        let mut changed = 0;
        for nnc in nncs(cp) {
            let node = nnc.node().to_string();
            let Some(node_ip) = self.node_ips.get(&node).copied() else {
                continue;
            };
            let release: BTreeSet<Ipv4Addr> = nnc.spec.ips_not_in_use.iter().copied().collect();
            let f = self
                .subnet
                .reconcile(&node, nnc.spec.requested_ip_count, &release);
            // Routes first: an address is usable by the node only once the fabric reaches it.
            let missing: Vec<Ipv4Addr> = f
                .assigned
                .iter()
                .filter(|ip| !self.routed.contains(ip))
                .copied()
                .collect();
            if let Err(e) = routes.program(node_ip, &missing, &f.removed) {
                warn!(node = %node, error = %e, "cannot program fabric routes; taking the new addresses back");
                let back: BTreeSet<Ipv4Addr> = f.added.iter().copied().collect();
                self.subnet.reconcile(&node, 0, &back);
                // Restore the node's previous request bookkeeping on the next pass.
                continue;
            }
            self.routed.extend(missing.iter().copied());
            for ip in &f.removed {
                self.routed.remove(ip);
            }
            let message = if f.exhausted {
                format!(
                    "pod subnet {} is full: {} of {} addresses are assigned to nodes; {} wanted {}, holds {}",
                    self.subnet.subnet(),
                    self.subnet.in_use(),
                    self.subnet.capacity(),
                    node,
                    nnc.spec.requested_ip_count,
                    f.assigned.len()
                )
            } else {
                String::new()
            };
            let status = NncStatus {
                pod_subnet: self.subnet.subnet().to_string(),
                assigned_ips: f.assigned.iter().copied().collect(),
                scaler: self.scaler,
                subnet_exhausted: f.exhausted,
                message,
                // The lab cloud takes back single addresses.
                batch_prefix_length: None,
            };
            if nnc.status.as_ref() != Some(&status) {
                if !f.added.is_empty() || !f.removed.is_empty() {
                    info!(node = %node, added = f.added.len(), removed = f.removed.len(), holds = f.assigned.len(), exhausted = f.exhausted, "cloud: node addresses changed");
                }
                match cp.update_nnc_status(&node, status) {
                    Ok(_) => changed += 1,
                    Err(e) => {
                        warn!(node = %node, error = %e, "cannot publish the node's addresses")
                    }
                }
            }
        }
        changed
    }
}

/// Runs the cloud until `stop`: reconciles after every change to the control plane.
pub fn run(
    cp: ControlPlane,
    profile: NetworkProfile,
    mut routes: Box<dyn Routes>,
    stop: &AtomicBool,
) {
    let mut cloud = match Cloud::restore(&cp, &profile) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "the lab cloud cannot start; VNet nodes will get no addresses");
            return;
        }
    };
    let events = cp.subscribe();
    while !stop.load(Ordering::Relaxed) {
        match events.recv_timeout(Duration::from_millis(500)) {
            Ok(WatchEvent::Synced { .. }) | Err(RecvTimeoutError::Timeout) => {
                // Drain whatever else is queued: one pass serves all of it.
                while events.try_recv().is_ok() {}
                cloud.reconcile(&cp, routes.as_mut());
            }
            Ok(_) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrum_model::NncSpec;

    #[derive(Default)]
    struct Recorded {
        routes: BTreeMap<Ipv4Addr, Ipv4Addr>,
        fail: bool,
    }
    impl Routes for Recorded {
        fn program(
            &mut self,
            node_ip: Ipv4Addr,
            add: &[Ipv4Addr],
            remove: &[Ipv4Addr],
        ) -> Result<(), String> {
            if self.fail {
                return Err("fabric refused".into());
            }
            for ip in remove {
                self.routes.remove(ip);
            }
            for ip in add {
                self.routes.insert(*ip, node_ip);
            }
            Ok(())
        }
    }

    fn setup(subnet: &str) -> (tempfile::TempDir, ControlPlane, NetworkProfile) {
        let dir = tempfile::tempdir().unwrap();
        let cp = ControlPlane::open(dir.path()).unwrap();
        let profile = NetworkProfile {
            max_pods: 250,
            ..NetworkProfile::vnet_default(subnet.parse().unwrap())
        };
        let objs: Vec<Object> = profile
            .node_names()
            .iter()
            .map(|n| Object::NodeNetworkConfig(NodeNetworkConfig::new(n, 16)))
            .collect();
        cp.apply(objs).unwrap();
        (dir, cp, profile)
    }

    fn status(cp: &ControlPlane, node: &str) -> NncStatus {
        nncs(cp)
            .into_iter()
            .find(|n| n.node() == node)
            .unwrap()
            .status
            .unwrap()
    }

    #[test]
    fn batches_are_routed_then_published_and_released_addresses_unrouted() {
        let (_d, cp, profile) = setup("10.225.0.0/24");
        let mut cloud = Cloud::restore(&cp, &profile).unwrap();
        let mut routes = Recorded::default();
        assert_eq!(cloud.reconcile(&cp, &mut routes), 2);
        let a = status(&cp, "node-0");
        let b = status(&cp, "node-1");
        assert_eq!((a.assigned_ips.len(), b.assigned_ips.len()), (16, 16));
        assert_eq!(a.scaler.batch_size, 16);
        for ip in &a.assigned_ips {
            assert_eq!(routes.routes[ip], profile.node_ip(0));
            assert!(!b.assigned_ips.contains(ip));
        }
        // node-0 grows, then gives back a batch.
        cp.update_nnc_spec(
            "node-0",
            NncSpec {
                requested_ip_count: 32,
                ips_not_in_use: vec![],
            },
        )
        .unwrap();
        cloud.reconcile(&cp, &mut routes);
        assert_eq!(status(&cp, "node-0").assigned_ips.len(), 32);
        let give: Vec<Ipv4Addr> = status(&cp, "node-0").assigned_ips[16..].to_vec();
        cp.update_nnc_spec(
            "node-0",
            NncSpec {
                requested_ip_count: 16,
                ips_not_in_use: give.clone(),
            },
        )
        .unwrap();
        cloud.reconcile(&cp, &mut routes);
        let now = status(&cp, "node-0").assigned_ips;
        assert_eq!(now.len(), 16);
        for ip in &give {
            assert!(!now.contains(ip) && !routes.routes.contains_key(ip));
        }
        // Nothing to do: nothing is written.
        assert_eq!(cloud.reconcile(&cp, &mut routes), 0);
        // A restarted cloud sees the same state.
        let mut again = Cloud::restore(&cp, &profile).unwrap();
        assert_eq!(again.reconcile(&cp, &mut routes), 0);
    }

    #[test]
    fn a_full_subnet_is_reported_and_filled_once_addresses_free_up() {
        let (_d, cp, profile) = setup("10.225.0.0/27"); // 30 usable
        let mut cloud = Cloud::restore(&cp, &profile).unwrap();
        let mut routes = Recorded::default();
        cloud.reconcile(&cp, &mut routes);
        let b = status(&cp, "node-1");
        assert!(b.subnet_exhausted);
        assert!(b.message.contains("10.225.0.0/27 is full"), "{}", b.message);
        assert_eq!(b.assigned_ips.len(), 14);
        let give: Vec<Ipv4Addr> = status(&cp, "node-0").assigned_ips[..4].to_vec();
        cp.update_nnc_spec(
            "node-0",
            NncSpec {
                requested_ip_count: 12,
                ips_not_in_use: give,
            },
        )
        .unwrap();
        cloud.reconcile(&cp, &mut routes);
        let b = status(&cp, "node-1");
        assert!(!b.subnet_exhausted);
        assert_eq!(b.assigned_ips.len(), 16);
    }

    #[test]
    fn nothing_is_published_when_the_fabric_refuses() {
        let (_d, cp, profile) = setup("10.225.0.0/24");
        let mut cloud = Cloud::restore(&cp, &profile).unwrap();
        let mut routes = Recorded {
            fail: true,
            ..Default::default()
        };
        assert_eq!(cloud.reconcile(&cp, &mut routes), 0);
        assert!(nncs(&cp).iter().all(|n| n.status.is_none()));
        routes.fail = false;
        assert_eq!(cloud.reconcile(&cp, &mut routes), 2);
    }
}
