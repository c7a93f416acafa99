//! The service load-balancer compiler: Kubernetes Services and EndpointSlices in, the
//! frontends a node's datapath needs out. Pure code, no syscalls.
//!
//! A frontend is keyed by (address, port, protocol, scope): the protocol is part of every key,
//! so two Services on the same port with different protocols never collide, and the scope
//! separates traffic from inside the cluster (pods) from traffic arriving from outside, which
//! may see a different backend set (externalTrafficPolicy vs internalTrafficPolicy).
//!
//! Endpoint selection follows kube-proxy (`CategorizeEndpoints`): ready endpoints serve; when
//! none is ready, serving-but-terminating endpoints do; a `Local` traffic policy narrows that
//! choice to endpoints on this node, with the same terminating fallback among local ones.

pub mod alloc;
pub mod maglev;
pub mod trace;

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Annotation selecting the backend selection algorithm of one Service (`random`, `maglev`).
pub const ALGORITHM_ANNOTATION: &str = "ferrum.io/lb-algorithm";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// IANA protocol number, as in the IP header.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }

    pub fn from_number(n: u8) -> Option<Protocol> {
        match n {
            6 => Some(Protocol::Tcp),
            17 => Some(Protocol::Udp),
            _ => None,
        }
    }

    /// Kubernetes spelling; None for protocols the datapath does not balance (SCTP).
    pub fn from_k8s(p: Option<&str>) -> Option<Protocol> {
        match p.unwrap_or("TCP") {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// Who is asking: traffic from pods (and this node) or traffic from outside the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    Internal,
    External,
}

impl Scope {
    pub fn code(self) -> u8 {
        match self {
            Scope::Internal => 0,
            Scope::External => 1,
        }
    }

    pub fn from_code(c: u8) -> Option<Scope> {
        match c {
            0 => Some(Scope::Internal),
            1 => Some(Scope::External),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendKey {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Protocol,
    pub scope: Scope,
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scope = match self.scope {
            Scope::Internal => "internal",
            Scope::External => "external",
        };
        write!(f, "{}:{}/{} ({scope})", self.addr, self.port, self.proto)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub addr: Ipv4Addr,
    pub port: u16,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.addr, self.port)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Algorithm {
    #[default]
    Random,
    Maglev,
}

impl Algorithm {
    pub fn parse(s: &str) -> Option<Algorithm> {
        match s {
            "random" => Some(Algorithm::Random),
            "maglev" => Some(Algorithm::Maglev),
            _ => None,
        }
    }
}

/// What a frontend does with a new flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frontend {
    /// `namespace/name:port-name`, for tracing and logs.
    pub service: String,
    /// Candidate backends in a stable order (sorted). Empty: reject new flows at once.
    pub backends: Vec<Backend>,
    /// sessionAffinity ClientIP timeout in seconds.
    pub affinity_timeout: Option<u32>,
    pub algorithm: Algorithm,
    /// Source addresses allowed (loadBalancerSourceRanges); empty allows everyone.
    pub source_ranges: Vec<(Ipv4Addr, u8)>,
    /// External scope only: client source address is replaced by the node's (Cluster policy).
    pub masquerade: bool,
}

/// One endpoint as kube-proxy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointInfo {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub node: Option<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

/// The cluster as this node's compiler sees it.
#[derive(Debug, Clone, Default)]
pub struct Cluster<'a> {
    pub services: Vec<&'a Service>,
    pub slices: Vec<&'a EndpointSlice>,
    /// This node's name (for Local traffic policies) and IP (NodePort frontends).
    pub node_name: String,
    pub node_ip: Option<Ipv4Addr>,
    /// Every node IP in the cluster: a NodePort is reachable on each of them from pods.
    pub node_ips: Vec<Ipv4Addr>,
    /// Cluster default when a Service has no algorithm annotation.
    pub default_algorithm: Algorithm,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Compiled {
    pub frontends: BTreeMap<FrontendKey, Frontend>,
    /// Things skipped, with why (bad annotations, unsupported protocols, clashes).
    pub warnings: Vec<String>,
}

/// kube-proxy's choice among endpoints: ready ones, else serving-and-terminating ones.
pub fn usable<'e>(endpoints: impl IntoIterator<Item = &'e EndpointInfo>) -> Vec<&'e EndpointInfo> {
    let all: Vec<&EndpointInfo> = endpoints.into_iter().collect();
    let ready: Vec<&EndpointInfo> = all.iter().copied().filter(|e| e.ready).collect();
    if !ready.is_empty() {
        return ready;
    }
    all.into_iter()
        .filter(|e| e.serving && e.terminating)
        .collect()
}

/// The endpoints a traffic policy allows: `Cluster` takes every usable endpoint, `Local` the
/// usable ones on `node` (with the terminating fallback applied among local endpoints only).
pub fn select<'e>(
    endpoints: &'e [EndpointInfo],
    local_only: bool,
    node: &str,
) -> Vec<&'e EndpointInfo> {
    if local_only {
        usable(endpoints.iter().filter(|e| e.node.as_deref() == Some(node)))
    } else {
        usable(endpoints)
    }
}

fn condition(c: Option<bool>, default: bool) -> bool {
    c.unwrap_or(default)
}

/// Reads one slice endpoint: a missing `ready` means ready (the API's "unknown"), a missing
/// `serving` follows `ready`, a missing `terminating` means not terminating.
pub fn endpoint_info(e: &Endpoint, port: u16) -> Vec<EndpointInfo> {
    let conds = e.conditions.clone().unwrap_or_default();
    let ready = condition(conds.ready, true);
    let serving = condition(conds.serving, ready);
    let terminating = condition(conds.terminating, false);
    e.addresses
        .iter()
        .filter_map(|a| a.parse::<Ipv4Addr>().ok())
        .map(|addr| EndpointInfo {
            addr,
            port,
            node: e.node_name.clone(),
            ready,
            serving,
            terminating,
        })
        .collect()
}

fn service_id(svc: &Service) -> (String, String) {
    (
        svc.metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        svc.metadata.name.clone().unwrap_or_default(),
    )
}

/// The endpoints of one Service port, from every slice of the Service: the slice port with the
/// same name and protocol gives the backend port (named targetPorts were resolved per pod by
/// the endpointslice controller, so pods may differ).
pub fn port_endpoints(slices: &[&EndpointSlice], port: &ServicePort) -> Vec<EndpointInfo> {
    let name = port.name.clone().unwrap_or_default();
    let proto = Protocol::from_k8s(port.protocol.as_deref());
    let mut out: Vec<EndpointInfo> = Vec::new();
    for slice in slices {
        if slice.address_type != "IPv4" {
            continue;
        }
        let Some(sp) = slice.ports.iter().flatten().find(|sp| {
            sp.name.clone().unwrap_or_default() == name
                && Protocol::from_k8s(sp.protocol.as_deref()) == proto
        }) else {
            continue;
        };
        let Some(p) = sp
            .port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
        else {
            continue;
        };
        for e in &slice.endpoints {
            for info in endpoint_info(e, p) {
                // The same address in two slices (a pod moving between slices): keep one.
                if !out
                    .iter()
                    .any(|o| o.addr == info.addr && o.port == info.port)
                {
                    out.push(info);
                }
            }
        }
    }
    out
}

fn backends(eps: &[&EndpointInfo]) -> Vec<Backend> {
    let mut b: Vec<Backend> = eps
        .iter()
        .map(|e| Backend {
            addr: e.addr,
            port: e.port,
        })
        .collect();
    b.sort();
    b.dedup();
    b
}

fn parse_range(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (addr, len) = s.trim().split_once('/')?;
    let addr: Ipv4Addr = addr.parse().ok()?;
    let len: u8 = len.parse().ok().filter(|l| *l <= 32)?;
    Some((addr, len))
}

/// Compiles every Service into frontends for `cluster.node_name`.
pub fn compile(cluster: &Cluster<'_>) -> Compiled {
    let mut out = Compiled::default();
    let mut by_service: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in &cluster.slices {
        let Some(svc) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        let ns = slice
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        by_service.entry((ns, svc.clone())).or_default().push(slice);
    }
    let no_slices = Vec::new();
    for svc in &cluster.services {
        let slices = by_service.get(&service_id(svc)).unwrap_or(&no_slices);
        compile_service(cluster, svc, slices, &mut out);
    }
    out
}

/// Merges per-Service compilations (in Service order) as [`compile`] would have produced
/// them: a key claimed twice stays with the first Service, with a warning.
pub fn merge<'c>(parts: impl IntoIterator<Item = &'c Compiled>) -> Compiled {
    let mut out = Compiled::default();
    for part in parts {
        out.warnings.extend(part.warnings.iter().cloned());
        for (key, fe) in &part.frontends {
            match out.frontends.get(key) {
                Some(prev) => out.warnings.push(format!(
                    "{key} is claimed by {} and {}; keeping {}",
                    prev.service, fe.service, prev.service
                )),
                None => {
                    out.frontends.insert(*key, fe.clone());
                }
            }
        }
    }
    out
}

/// Compiles one Service with its slices (`cluster.services` and `cluster.slices` are not
/// read), adding its frontends to `out`.
pub fn compile_service(
    cluster: &Cluster<'_>,
    svc: &Service,
    slices: &[&EndpointSlice],
    out: &mut Compiled,
) {
    let id = service_id(svc);
    let Some(spec) = &svc.spec else { return };
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if svc_type == "ExternalName" {
        return;
    }
    let algorithm = match svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ALGORITHM_ANNOTATION))
    {
        None => cluster.default_algorithm,
        Some(v) => Algorithm::parse(v).unwrap_or_else(|| {
            out.warnings.push(format!(
                "Service {}/{}: annotation {ALGORITHM_ANNOTATION}={v:?} is not random or maglev; using the cluster default",
                id.0, id.1
            ));
            cluster.default_algorithm
        }),
    };
    let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .unwrap_or(10_800)
    });
    let itp_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let etp_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let source_ranges: Vec<(Ipv4Addr, u8)> = spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .filter_map(|r| parse_range(r))
        .collect();
    let cluster_ip = spec
        .cluster_ip
        .as_deref()
        .and_then(|ip| ip.parse::<Ipv4Addr>().ok());
    let mut external_ips: Vec<Ipv4Addr> = spec
        .external_ips
        .iter()
        .flatten()
        .filter_map(|ip| ip.parse().ok())
        .collect();
    if svc_type == "LoadBalancer" {
        external_ips.extend(
            svc.status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref())
                .into_iter()
                .flatten()
                .filter_map(|i| i.ip.as_deref())
                .filter_map(|ip| ip.parse::<Ipv4Addr>().ok()),
        );
    }
    for port in spec.ports.iter().flatten() {
        let Some(proto) = Protocol::from_k8s(port.protocol.as_deref()) else {
            out.warnings.push(format!(
                "Service {}/{} port {}: protocol {:?} is not load-balanced (TCP and UDP are)",
                id.0,
                id.1,
                port.port,
                port.protocol.as_deref().unwrap_or_default()
            ));
            continue;
        };
        let Ok(svc_port) = u16::try_from(port.port) else {
            continue;
        };
        let eps = port_endpoints(slices, port);
        let service = format!(
            "{}/{}:{}",
            id.0,
            id.1,
            port.name
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| svc_port.to_string())
        );
        let frontend = |eps: Vec<&EndpointInfo>, masquerade: bool, ranges: bool| Frontend {
            service: service.clone(),
            backends: backends(&eps),
            affinity_timeout,
            algorithm,
            source_ranges: if ranges {
                source_ranges.clone()
            } else {
                Vec::new()
            },
            masquerade,
        };
        let internal = select(&eps, itp_local, &cluster.node_name);
        // Pods reaching an external address of the Service are short-circuited to the
        // cluster-wide endpoints, as kube-proxy does (no hairpin out through the LB).
        let all = usable(&eps);
        let external = select(&eps, etp_local, &cluster.node_name);
        let mut insert = |key: FrontendKey, fe: Frontend| {
            if let Some(prev) = out.frontends.get(&key) {
                if prev.service != fe.service {
                    out.warnings.push(format!(
                        "{key} is claimed by {} and {}; keeping {}",
                        prev.service, fe.service, prev.service
                    ));
                }
                return;
            }
            out.frontends.insert(key, fe);
        };
        let key = |addr, port, scope| FrontendKey {
            addr,
            port,
            proto,
            scope,
        };
        if let Some(vip) = cluster_ip {
            insert(
                key(vip, svc_port, Scope::Internal),
                frontend(internal.clone(), false, false),
            );
        }
        let lb_scoped = svc_type == "LoadBalancer";
        for ip in &external_ips {
            insert(
                key(*ip, svc_port, Scope::Internal),
                frontend(all.clone(), false, false),
            );
            insert(
                key(*ip, svc_port, Scope::External),
                frontend(external.clone(), !etp_local, lb_scoped),
            );
        }
        let node_port = port
            .node_port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0 && matches!(svc_type, "NodePort" | "LoadBalancer"));
        if let Some(np) = node_port {
            for ip in &cluster.node_ips {
                insert(
                    key(*ip, np, Scope::Internal),
                    frontend(all.clone(), false, false),
                );
            }
            if let Some(ip) = cluster.node_ip {
                insert(
                    key(ip, np, Scope::External),
                    frontend(external.clone(), !etp_local, false),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests;
