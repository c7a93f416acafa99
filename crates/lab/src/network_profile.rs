//! The lab's network profile: the cluster's address plan (the `az aks create` network options),
//! its defaults, validation with errors that name the option, and its file (`profile.json`).

use std::net::Ipv4Addr;
use std::path::Path;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// The external host's address (TEST-NET-3, so it never collides with a real network).
pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The fabric's side of the link to the external host.
pub const EXTERNAL_GATEWAY: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The external link's prefix length.
pub const EXTERNAL_PREFIX_LEN: u8 = 24;
/// Node i gets the node subnet's address number `NODE_IP_OFFSET + i` (the router is number 1).
pub const NODE_IP_OFFSET: u32 = 10;
pub const MAX_NODES: u32 = 64;
pub const MIN_MAX_PODS: u32 = 10;
pub const MAX_MAX_PODS: u32 = 250;
/// AKS's default max pods in VNet mode (overlay: [`MAX_MAX_PODS`]).
pub const DEFAULT_VNET_MAX_PODS: u32 = 110;
/// The largest service CIDR AKS accepts (a /12).
pub const MAX_SERVICE_PREFIX: u8 = 12;
/// VNet mode: addresses handed to a node at a time, and the free-address thresholds (percent
/// of a batch) below which a node asks for another batch and above which it gives one back.
pub const DEFAULT_IP_BATCH_SIZE: u32 = 16;
pub const DEFAULT_IP_REQUEST_THRESHOLD_PERCENT: u32 = 50;
pub const DEFAULT_IP_RELEASE_THRESHOLD_PERCENT: u32 = 150;
/// Each node's pod CIDR in overlay mode.
pub const NODE_POD_PREFIX_LEN: u8 = 24;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkPluginMode {
    Overlay,
    Vnet,
}

impl std::str::FromStr for NetworkPluginMode {
    type Err = ProfileError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "overlay" => Ok(Self::Overlay),
            "vnet" => Ok(Self::Vnet),
            other => Err(ProfileError::Invalid {
                option: "network-plugin-mode",
                reason: format!("{other:?} is not a mode; use overlay or vnet"),
            }),
        }
    }
}

impl std::fmt::Display for NetworkPluginMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Overlay => "overlay",
            Self::Vnet => "vnet",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("invalid --{option}: {reason}")]
    Invalid {
        option: &'static str,
        reason: String,
    },
    #[error("--{option} {value} conflicts with --{other} {other_value}: {reason}")]
    Conflict {
        option: &'static str,
        value: String,
        other: &'static str,
        other_value: String,
        reason: String,
    },
    #[error("cannot read lab profile {path}: {error} (is the lab up?)")]
    Read { path: String, error: std::io::Error },
    #[error("lab profile {path} is corrupt: {error}; remove the lab with `ferrum lab down`")]
    Corrupt {
        path: String,
        error: serde_json::Error,
    },
    #[error("cannot write lab profile {path}: {error}")]
    Write { path: String, error: std::io::Error },
}

/// Everything that describes a lab's network; written to `profile.json` at `lab up` and read by
/// the daemon and `lab status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkProfile {
    pub network_plugin_mode: NetworkPluginMode,
    pub nodes: u32,
    pub pod_cidr: Ipv4Net,
    pub service_cidr: Ipv4Net,
    pub dns_service_ip: Ipv4Addr,
    pub max_pods: u32,
    pub vnet_cidr: Ipv4Net,
    pub node_subnet: Ipv4Net,
    /// VNet mode only: the subnet pods take their addresses from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_subnet: Option<Ipv4Net>,
    /// Where LoadBalancer Services get their ingress IPs (the "public" addresses the fabric
    /// routes to the nodes).
    #[serde(default = "default_lb_pool")]
    pub lb_pool: Ipv4Net,
    /// The cluster's default Service load-balancing algorithm: random or maglev (a Service
    /// may choose its own with the ferrum.io/lb-algorithm annotation).
    #[serde(default = "default_lb_algorithm")]
    pub lb_algorithm: String,
    /// VNet mode: addresses per batch a node receives.
    #[serde(default = "default_batch")]
    pub ip_batch_size: u32,
    /// VNet mode: a node requests a batch when fewer than this percent of a batch is free.
    #[serde(default = "default_request_pct")]
    pub ip_request_threshold_percent: u32,
    /// VNet mode: a node releases a batch when more than this percent of a batch is free.
    #[serde(default = "default_release_pct")]
    pub ip_release_threshold_percent: u32,
}

pub fn default_lb_algorithm() -> String {
    "random".into()
}

/// TEST-NET-2: public-looking, and outside every other lab range.
pub fn default_lb_pool() -> Ipv4Net {
    net("198.51.100.0/24")
}

fn default_batch() -> u32 {
    DEFAULT_IP_BATCH_SIZE
}
fn default_request_pct() -> u32 {
    DEFAULT_IP_REQUEST_THRESHOLD_PERCENT
}
fn default_release_pct() -> u32 {
    DEFAULT_IP_RELEASE_THRESHOLD_PERCENT
}

fn net(s: &str) -> Ipv4Net {
    // Only called on the literals below, which are valid.
    s.parse().unwrap_or_default()
}

impl Default for NetworkProfile {
    /// AKS's defaults for overlay clusters, scaled to a 2-node lab.
    fn default() -> Self {
        Self {
            network_plugin_mode: NetworkPluginMode::Overlay,
            nodes: 2,
            pod_cidr: net("10.244.0.0/16"),
            service_cidr: net("10.0.0.0/16"),
            dns_service_ip: Ipv4Addr::new(10, 0, 0, 10),
            max_pods: MAX_MAX_PODS,
            vnet_cidr: net("10.224.0.0/12"),
            node_subnet: net("10.224.0.0/16"),
            pod_subnet: None,
            lb_pool: default_lb_pool(),
            lb_algorithm: default_lb_algorithm(),
            ip_batch_size: DEFAULT_IP_BATCH_SIZE,
            ip_request_threshold_percent: DEFAULT_IP_REQUEST_THRESHOLD_PERCENT,
            ip_release_threshold_percent: DEFAULT_IP_RELEASE_THRESHOLD_PERCENT,
        }
    }
}

fn invalid(option: &'static str, reason: String) -> ProfileError {
    ProfileError::Invalid { option, reason }
}

fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Parses a CIDR that must be written in canonical form (no host bits set), naming the option.
pub fn parse_cidr(option: &'static str, s: &str) -> Result<Ipv4Net, ProfileError> {
    let parsed: Ipv4Net = s.parse().map_err(|_| {
        invalid(
            option,
            format!("{s:?} is not an IPv4 CIDR like 10.244.0.0/16"),
        )
    })?;
    if parsed.trunc() != parsed {
        return Err(invalid(
            option,
            format!("{s} has host bits set; did you mean {}?", parsed.trunc()),
        ));
    }
    Ok(parsed)
}

pub fn parse_ip(option: &'static str, s: &str) -> Result<Ipv4Addr, ProfileError> {
    s.parse()
        .map_err(|_| invalid(option, format!("{s:?} is not an IPv4 address")))
}

impl NetworkProfile {
    /// A VNet-mode profile with AKS's VNet defaults (max pods 110).
    pub fn vnet_default(pod_subnet: Ipv4Net) -> Self {
        Self {
            network_plugin_mode: NetworkPluginMode::Vnet,
            max_pods: DEFAULT_VNET_MAX_PODS,
            pod_subnet: Some(pod_subnet),
            ..Default::default()
        }
    }

    /// The default max pods of a mode (as AKS: 250 overlay, 110 VNet).
    pub fn default_max_pods(mode: NetworkPluginMode) -> u32 {
        match mode {
            NetworkPluginMode::Overlay => MAX_MAX_PODS,
            NetworkPluginMode::Vnet => DEFAULT_VNET_MAX_PODS,
        }
    }

    /// The address range pods take addresses from: the pod CIDR (overlay) or the pod subnet
    /// (VNet).
    pub fn pod_range(&self) -> Ipv4Net {
        match (self.network_plugin_mode, self.pod_subnet) {
            (NetworkPluginMode::Vnet, Some(subnet)) => subnet,
            _ => self.pod_cidr,
        }
    }

    /// Checks the whole plan as `az aks create` does; every error names the option to change,
    /// and a conflict names both values.
    pub fn validate(&self) -> Result<(), ProfileError> {
        let conflict = |option,
                        value: &dyn std::fmt::Display,
                        other,
                        other_value: &dyn std::fmt::Display,
                        reason: &str| {
            ProfileError::Conflict {
                option,
                value: value.to_string(),
                other,
                other_value: other_value.to_string(),
                reason: reason.to_string(),
            }
        };
        let vnet = self.network_plugin_mode == NetworkPluginMode::Vnet;
        if !vnet && let Some(subnet) = self.pod_subnet {
            return Err(conflict(
                "pod-subnet",
                &subnet,
                "network-plugin-mode",
                &self.network_plugin_mode,
                "a pod subnet applies only to --network-plugin-mode vnet",
            ));
        }
        if vnet && self.pod_subnet.is_none() {
            return Err(invalid(
                "pod-subnet",
                "--network-plugin-mode vnet needs a pod subnet inside the VNet, e.g. 10.225.0.0/16"
                    .into(),
            ));
        }
        if !(1..=MAX_NODES).contains(&self.nodes) {
            return Err(invalid(
                "nodes",
                format!("{} is out of range; use 1..={MAX_NODES}", self.nodes),
            ));
        }
        if !(MIN_MAX_PODS..=MAX_MAX_PODS).contains(&self.max_pods) {
            return Err(invalid(
                "max-pods",
                format!(
                    "{} is out of range; use {MIN_MAX_PODS}..={MAX_MAX_PODS}",
                    self.max_pods
                ),
            ));
        }
        let mut cidrs = vec![
            ("pod-cidr", &self.pod_cidr),
            ("service-cidr", &self.service_cidr),
            ("vnet-cidr", &self.vnet_cidr),
            ("node-subnet", &self.node_subnet),
        ];
        if let Some(subnet) = &self.pod_subnet {
            cidrs.push(("pod-subnet", subnet));
        }
        for (option, cidr) in &cidrs {
            if cidr.trunc() != **cidr {
                return Err(invalid(option, format!("{cidr} has host bits set")));
            }
        }
        if self.service_cidr.prefix_len() < MAX_SERVICE_PREFIX {
            return Err(invalid(
                "service-cidr",
                format!(
                    "{} is larger than a /{MAX_SERVICE_PREFIX}; use a /{MAX_SERVICE_PREFIX} or smaller",
                    self.service_cidr
                ),
            ));
        }
        if !vnet {
            // Pod CIDR: one /24 per node.
            if self.pod_cidr.prefix_len() > NODE_POD_PREFIX_LEN {
                return Err(invalid(
                    "pod-cidr",
                    format!(
                        "{} is smaller than one node's /{NODE_POD_PREFIX_LEN}",
                        self.pod_cidr
                    ),
                ));
            }
            let blocks = 1u64 << (NODE_POD_PREFIX_LEN - self.pod_cidr.prefix_len());
            if blocks < u64::from(self.nodes) {
                return Err(conflict(
                    "pod-cidr",
                    &self.pod_cidr,
                    "nodes",
                    &self.nodes,
                    &format!(
                        "the pod CIDR holds {blocks} /{NODE_POD_PREFIX_LEN} node blocks, but every node needs one"
                    ),
                ));
            }
        }
        // Node subnet: the router (.1) plus the nodes from NODE_IP_OFFSET, below broadcast.
        let hosts = 1u64 << (32 - u32::from(self.node_subnet.prefix_len()));
        if hosts < u64::from(NODE_IP_OFFSET + self.nodes) + 1 {
            return Err(conflict(
                "node-subnet",
                &self.node_subnet,
                "nodes",
                &self.nodes,
                &format!(
                    "the node subnet is too small (nodes take addresses from .{NODE_IP_OFFSET})"
                ),
            ));
        }
        if !self.vnet_cidr.contains(&self.node_subnet) {
            return Err(conflict(
                "node-subnet",
                &self.node_subnet,
                "vnet-cidr",
                &self.vnet_cidr,
                "the node subnet must be inside the VNet",
            ));
        }
        let external = Ipv4Net::new(EXTERNAL_GATEWAY, EXTERNAL_PREFIX_LEN)
            .map(|n| n.trunc())
            .unwrap_or_default();
        for (option, cidr) in &cidrs {
            if overlaps(cidr, &external) {
                return Err(invalid(
                    option,
                    format!(
                        "{cidr} overlaps the external host's network {external} (reserved by the lab)"
                    ),
                ));
            }
        }
        if vnet {
            let subnet = self.pod_subnet.unwrap_or_default();
            if !self.vnet_cidr.contains(&subnet) {
                return Err(conflict(
                    "pod-subnet",
                    &subnet,
                    "vnet-cidr",
                    &self.vnet_cidr,
                    "the pod subnet must be a subnet of the VNet",
                ));
            }
            if overlaps(&subnet, &self.node_subnet) {
                return Err(conflict(
                    "pod-subnet",
                    &subnet,
                    "node-subnet",
                    &self.node_subnet,
                    "pod and node subnets must not overlap",
                ));
            }
            if overlaps(&subnet, &self.service_cidr) {
                return Err(conflict(
                    "pod-subnet",
                    &subnet,
                    "service-cidr",
                    &self.service_cidr,
                    "pod addresses and service addresses must not overlap",
                ));
            }
            self.validate_batches(subnet)?;
        } else {
            for (other, other_value) in [
                ("vnet-cidr", &self.vnet_cidr),
                ("node-subnet", &self.node_subnet),
                ("service-cidr", &self.service_cidr),
            ] {
                if overlaps(&self.pod_cidr, other_value) {
                    return Err(conflict(
                        "pod-cidr",
                        &self.pod_cidr,
                        other,
                        other_value,
                        "the overlay pod CIDR must not overlap it",
                    ));
                }
            }
        }
        for (option, cidr) in [
            ("pod-cidr", &self.pod_cidr),
            ("service-cidr", &self.service_cidr),
            ("vnet-cidr", &self.vnet_cidr),
            ("external host network", &external),
        ] {
            if overlaps(&self.lb_pool, cidr) {
                return Err(invalid(
                    "lb-pool",
                    format!("{} overlaps the {option} {cidr}", self.lb_pool),
                ));
            }
        }
        if !matches!(self.lb_algorithm.as_str(), "random" | "maglev") {
            return Err(invalid(
                "lb-algorithm",
                format!(
                    "{:?} is not an algorithm; use random or maglev",
                    self.lb_algorithm
                ),
            ));
        }
        if self.lb_pool.trunc() != self.lb_pool {
            return Err(invalid(
                "lb-pool",
                format!("{} has host bits set", self.lb_pool),
            ));
        }
        for (other, other_value) in [
            ("vnet-cidr", &self.vnet_cidr),
            ("node-subnet", &self.node_subnet),
        ] {
            if overlaps(&self.service_cidr, other_value) {
                return Err(conflict(
                    "service-cidr",
                    &self.service_cidr,
                    other,
                    other_value,
                    "service addresses must not overlap the cluster's network",
                ));
            }
        }
        let first_usable = Ipv4Addr::from(u32::from(self.service_cidr.network()).wrapping_add(1));
        if !self.service_cidr.contains(&self.dns_service_ip)
            || self.dns_service_ip == self.service_cidr.network()
            || self.dns_service_ip == self.service_cidr.broadcast()
        {
            return Err(conflict(
                "dns-service-ip",
                &self.dns_service_ip,
                "service-cidr",
                &self.service_cidr,
                "the DNS service IP must be a usable address inside the service CIDR",
            ));
        }
        if self.dns_service_ip == first_usable {
            return Err(conflict(
                "dns-service-ip",
                &self.dns_service_ip,
                "service-cidr",
                &self.service_cidr,
                "the first address of the service CIDR is the kubernetes Service's",
            ));
        }
        Ok(())
    }

    /// The profile with the overlay pod CIDR expanded to `larger` (`ferrum lab update
    /// --pod-cidr`): it must contain the current one, so every node keeps its block and every
    /// running pod its address. Shrinking, moving, or a pod CIDR in VNet mode is refused.
    pub fn with_pod_cidr(&self, larger: Ipv4Net) -> Result<NetworkProfile, ProfileError> {
        if self.network_plugin_mode != NetworkPluginMode::Overlay {
            return Err(ProfileError::Conflict {
                option: "pod-cidr",
                value: larger.to_string(),
                other: "network-plugin-mode",
                other_value: self.network_plugin_mode.to_string(),
                reason: "a pod CIDR applies only to overlay mode (VNet pods use --pod-subnet)"
                    .into(),
            });
        }
        if !larger.contains(&self.pod_cidr) {
            return Err(ProfileError::Conflict {
                option: "pod-cidr",
                value: larger.to_string(),
                other: "pod-cidr (current)",
                other_value: self.pod_cidr.to_string(),
                reason: "the pod CIDR can only be expanded to a CIDR containing the current one; \
                         shrinking or moving it would take addresses from running pods"
                    .into(),
            });
        }
        let next = NetworkProfile {
            pod_cidr: larger,
            ..self.clone()
        };
        next.validate()?;
        Ok(next)
    }

    fn validate_batches(&self, subnet: Ipv4Net) -> Result<(), ProfileError> {
        if !(1..=256).contains(&self.ip_batch_size) {
            return Err(invalid(
                "ip-batch-size",
                format!("{} is out of range; use 1..=256", self.ip_batch_size),
            ));
        }
        if self.ip_request_threshold_percent > 100 {
            return Err(invalid(
                "ip-request-threshold-percent",
                format!(
                    "{} is out of range; use 0..=100",
                    self.ip_request_threshold_percent
                ),
            ));
        }
        // Releasing must leave at least the request threshold free, or nodes would flap
        // between requesting and releasing the same batch.
        if self.ip_release_threshold_percent < self.ip_request_threshold_percent + 100 {
            return Err(ProfileError::Conflict {
                option: "ip-release-threshold-percent",
                value: self.ip_release_threshold_percent.to_string(),
                other: "ip-request-threshold-percent",
                other_value: self.ip_request_threshold_percent.to_string(),
                reason: "the release threshold must be at least the request threshold + 100, or a node would release a batch it must request again at once".into(),
            });
        }
        let usable = (1u64 << (32 - u32::from(subnet.prefix_len()))).saturating_sub(2);
        if usable < u64::from(self.ip_batch_size) {
            return Err(ProfileError::Conflict {
                option: "pod-subnet",
                value: subnet.to_string(),
                other: "ip-batch-size",
                other_value: self.ip_batch_size.to_string(),
                reason: format!(
                    "the pod subnet has {usable} usable addresses, less than one batch"
                ),
            });
        }
        Ok(())
    }

    pub fn node_names(&self) -> Vec<String> {
        (0..self.nodes).map(node_name).collect()
    }

    /// The fabric router's address on the node subnet (every node's default gateway).
    pub fn router_ip(&self) -> Ipv4Addr {
        nth_address(self.node_subnet, 1)
    }

    pub fn node_ip(&self, index: u32) -> Ipv4Addr {
        nth_address(self.node_subnet, NODE_IP_OFFSET + index)
    }

    /// Node `index`'s pod CIDR: the index-th /24 of the cluster pod CIDR.
    pub fn node_pod_cidr(&self, index: u32) -> Ipv4Net {
        let step = 1u32 << (32 - u32::from(NODE_POD_PREFIX_LEN));
        let base = u32::from(self.pod_cidr.network()).wrapping_add(index.wrapping_mul(step));
        Ipv4Net::new(Ipv4Addr::from(base), NODE_POD_PREFIX_LEN).unwrap_or_default()
    }

    pub fn load(path: &Path) -> Result<Self, ProfileError> {
        let text = std::fs::read_to_string(path).map_err(|error| ProfileError::Read {
            path: path.display().to_string(),
            error,
        })?;
        serde_json::from_str(&text).map_err(|error| ProfileError::Corrupt {
            path: path.display().to_string(),
            error,
        })
    }

    /// Writes the profile atomically (temp file + rename).
    pub fn save(&self, path: &Path) -> Result<(), ProfileError> {
        let write_err = |error| ProfileError::Write {
            path: path.display().to_string(),
            error,
        };
        let text = serde_json::to_string_pretty(self).map_err(|e| write_err(e.into()))?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text + "\n").map_err(write_err)?;
        std::fs::rename(&tmp, path).map_err(write_err)
    }
}

pub fn node_name(index: u32) -> String {
    format!("node-{index}")
}

fn nth_address(subnet: Ipv4Net, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()).wrapping_add(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_of(p: &NetworkProfile) -> String {
        match p.validate() {
            Ok(()) => panic!("{p:?} accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn defaults_are_valid_and_lay_out_nodes() {
        let p = NetworkProfile::default();
        p.validate().unwrap();
        assert_eq!(p.node_names(), ["node-0", "node-1"]);
        assert_eq!(p.router_ip(), Ipv4Addr::new(10, 224, 0, 1));
        assert_eq!(p.node_ip(0), Ipv4Addr::new(10, 224, 0, 10));
        assert_eq!(p.node_ip(1), Ipv4Addr::new(10, 224, 0, 11));
        assert_eq!(p.node_pod_cidr(0), net("10.244.0.0/24"));
        assert_eq!(p.node_pod_cidr(1), net("10.244.1.0/24"));
    }

    #[test]
    fn ranges_are_enforced() {
        for (nodes, ok) in [(0, false), (1, true), (64, true), (65, false)] {
            let p = NetworkProfile {
                nodes,
                ..Default::default()
            };
            assert_eq!(p.validate().is_ok(), ok, "nodes={nodes}");
        }
        for (max_pods, ok) in [(9, false), (10, true), (250, true), (251, false)] {
            let p = NetworkProfile {
                max_pods,
                ..Default::default()
            };
            assert_eq!(p.validate().is_ok(), ok, "max_pods={max_pods}");
        }
        let p = NetworkProfile {
            nodes: 65,
            ..Default::default()
        };
        assert!(err_of(&p).contains("--nodes"));
    }

    #[test]
    fn pod_cidr_must_fit_every_node() {
        let p = NetworkProfile {
            nodes: 5,
            pod_cidr: net("10.244.0.0/22"),
            ..Default::default()
        };
        let e = err_of(&p);
        assert!(e.contains("--pod-cidr") && e.contains("4 /24"), "{e}");
        let p = NetworkProfile {
            nodes: 4,
            pod_cidr: net("10.244.0.0/22"),
            ..Default::default()
        };
        p.validate().unwrap();
        let p = NetworkProfile {
            nodes: 1,
            pod_cidr: net("10.244.0.0/25"),
            ..Default::default()
        };
        assert!(err_of(&p).contains("--pod-cidr"));
    }

    #[test]
    fn overlaps_are_refused() {
        let p = NetworkProfile {
            pod_cidr: net("10.224.0.0/16"),
            ..Default::default()
        };
        assert!(err_of(&p).contains("--pod-cidr"));
        let p = NetworkProfile {
            pod_cidr: net("10.0.0.0/8"),
            ..Default::default()
        };
        assert!(err_of(&p).contains("--pod-cidr"));
        let p = NetworkProfile {
            service_cidr: net("10.244.128.0/20"),
            dns_service_ip: Ipv4Addr::new(10, 244, 128, 10),
            ..Default::default()
        };
        let e = err_of(&p);
        assert!(
            e.contains("--pod-cidr 10.244.0.0/16") && e.contains("--service-cidr 10.244.128.0/20"),
            "{e}"
        );
        let p = NetworkProfile {
            service_cidr: net("203.0.113.0/24"),
            dns_service_ip: Ipv4Addr::new(203, 0, 113, 53),
            ..Default::default()
        };
        assert!(err_of(&p).contains("external"));
    }

    #[test]
    fn dns_ip_must_be_in_service_cidr() {
        let p = NetworkProfile {
            dns_service_ip: Ipv4Addr::new(10, 1, 0, 10),
            ..Default::default()
        };
        assert!(err_of(&p).contains("--dns-service-ip"));
        let p = NetworkProfile {
            dns_service_ip: Ipv4Addr::new(10, 0, 0, 0),
            ..Default::default()
        };
        assert!(err_of(&p).contains("--dns-service-ip"));
    }

    #[test]
    fn node_subnet_must_fit_and_sit_in_vnet() {
        let p = NetworkProfile {
            node_subnet: net("10.224.0.0/28"),
            nodes: 6,
            ..Default::default()
        };
        assert!(err_of(&p).contains("--node-subnet"));
        let p = NetworkProfile {
            node_subnet: net("10.100.0.0/16"),
            ..Default::default()
        };
        let e = err_of(&p);
        assert!(
            e.contains("10.100.0.0/16") && e.contains("--vnet-cidr 10.224.0.0/12"),
            "{e}"
        );
    }

    fn subnet_profile() -> NetworkProfile {
        NetworkProfile::vnet_default(net("10.225.0.0/16"))
    }

    #[test]
    fn vnet_mode_needs_a_pod_subnet_inside_the_vnet_and_clear_of_the_rest() {
        let p = subnet_profile();
        p.validate().unwrap();
        assert_eq!(p.max_pods, 110);
        assert_eq!(p.pod_range(), net("10.225.0.0/16"));
        let p = NetworkProfile {
            pod_subnet: None,
            ..subnet_profile()
        };
        assert!(err_of(&p).contains("--pod-subnet"));
        let p = NetworkProfile {
            pod_subnet: Some(net("10.240.0.0/16")),
            ..subnet_profile()
        };
        let e = err_of(&p);
        assert!(
            e.contains("--pod-subnet 10.240.0.0/16") && e.contains("--vnet-cidr 10.224.0.0/12"),
            "{e}"
        );
        let p = NetworkProfile {
            pod_subnet: Some(net("10.224.128.0/17")),
            node_subnet: net("10.224.0.0/16"),
            ..subnet_profile()
        };
        let e = err_of(&p);
        assert!(
            e.contains("--pod-subnet 10.224.128.0/17") && e.contains("--node-subnet 10.224.0.0/16"),
            "{e}"
        );
        let p = NetworkProfile {
            service_cidr: net("10.225.0.0/20"),
            dns_service_ip: Ipv4Addr::new(10, 225, 0, 10),
            vnet_cidr: net("10.224.0.0/12"),
            ..subnet_profile()
        };
        let e = err_of(&p);
        assert!(
            e.contains("--pod-subnet 10.225.0.0/16") && e.contains("--service-cidr 10.225.0.0/20"),
            "{e}"
        );
        // Overlay with a pod subnet names both.
        let p = NetworkProfile {
            pod_subnet: Some(net("10.225.0.0/16")),
            ..Default::default()
        };
        let e = err_of(&p);
        assert!(
            e.contains("--pod-subnet 10.225.0.0/16") && e.contains("--network-plugin-mode overlay"),
            "{e}"
        );
        assert!("bogus".parse::<NetworkPluginMode>().is_err());
    }

    #[test]
    fn batch_thresholds_must_not_flap_and_subnet_must_hold_a_batch() {
        let p = NetworkProfile {
            ip_release_threshold_percent: 120,
            ..subnet_profile()
        };
        let e = err_of(&p);
        assert!(
            e.contains("--ip-release-threshold-percent 120")
                && e.contains("--ip-request-threshold-percent 50"),
            "{e}"
        );
        let p = NetworkProfile {
            pod_subnet: Some(net("10.225.0.0/28")),
            ip_batch_size: 16,
            ..subnet_profile()
        };
        let e = err_of(&p);
        assert!(
            e.contains("--pod-subnet 10.225.0.0/28") && e.contains("--ip-batch-size 16"),
            "{e}"
        );
        let p = NetworkProfile {
            ip_batch_size: 0,
            ..subnet_profile()
        };
        assert!(err_of(&p).contains("--ip-batch-size"));
    }

    #[test]
    fn service_cidr_at_most_a_12_and_dns_not_its_first_address() {
        let p = NetworkProfile {
            service_cidr: net("10.0.0.0/11"),
            ..Default::default()
        };
        assert!(err_of(&p).contains("--service-cidr"));
        let p = NetworkProfile {
            service_cidr: net("10.0.0.0/12"),
            ..Default::default()
        };
        p.validate().unwrap();
        let p = NetworkProfile {
            dns_service_ip: Ipv4Addr::new(10, 0, 0, 1),
            ..Default::default()
        };
        let e = err_of(&p);
        assert!(
            e.contains("--dns-service-ip 10.0.0.1") && e.contains("--service-cidr 10.0.0.0/16"),
            "{e}"
        );
        let p = NetworkProfile {
            dns_service_ip: Ipv4Addr::new(10, 1, 0, 10),
            ..Default::default()
        };
        let e = err_of(&p);
        assert!(
            e.contains("--dns-service-ip 10.1.0.10") && e.contains("--service-cidr 10.0.0.0/16"),
            "{e}"
        );
    }

    #[test]
    fn pod_cidr_only_expands() {
        let p = NetworkProfile {
            pod_cidr: net("10.244.0.0/22"),
            ..Default::default()
        };
        let bigger = p.with_pod_cidr(net("10.244.0.0/16")).unwrap();
        assert_eq!(bigger.pod_cidr, net("10.244.0.0/16"));
        assert_eq!(
            bigger.node_pod_cidr(1),
            p.node_pod_cidr(1),
            "blocks stay put"
        );
        for bad in ["10.244.0.0/23", "10.245.0.0/16"] {
            let e = p.with_pod_cidr(net(bad)).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("10.244.0.0/22"), "{e}");
        }
        // Expanding into the VNet is still refused by validation, naming both.
        let e = p
            .with_pod_cidr(net("10.224.0.0/11"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("10.224.0.0/11"), "{e}");
        let e = subnet_profile()
            .with_pod_cidr(net("10.244.0.0/15"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--network-plugin-mode vnet"), "{e}");
    }

    #[test]
    fn too_many_nodes_for_the_pod_cidr_names_both() {
        let p = NetworkProfile {
            nodes: 5,
            pod_cidr: net("10.244.0.0/22"),
            ..Default::default()
        };
        let e = err_of(&p);
        assert!(
            e.contains("--pod-cidr 10.244.0.0/22") && e.contains("--nodes 5"),
            "{e}"
        );
    }

    #[test]
    fn cidr_parsing_names_the_option() {
        assert!(
            parse_cidr("pod-cidr", "10.244.0.0/33")
                .unwrap_err()
                .to_string()
                .contains("--pod-cidr")
        );
        let e = parse_cidr("pod-cidr", "10.244.0.1/16")
            .unwrap_err()
            .to_string();
        assert!(e.contains("10.244.0.0/16"), "{e}");
        assert!(parse_ip("dns-service-ip", "10.0.0.300").is_err());
    }

    #[test]
    fn profile_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("profile.json");
        let p = NetworkProfile {
            nodes: 3,
            ..Default::default()
        };
        p.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"podCidr\": \"10.244.0.0/16\""), "{text}");
        assert!(
            text.contains("\"networkPluginMode\": \"overlay\""),
            "{text}"
        );
        assert_eq!(NetworkProfile::load(&path).unwrap(), p);
        std::fs::write(&path, "{").unwrap();
        assert!(matches!(
            NetworkProfile::load(&path),
            Err(ProfileError::Corrupt { .. })
        ));
    }
}
