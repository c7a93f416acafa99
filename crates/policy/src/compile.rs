//! NetworkPolicy -> per-endpoint allow rules, with upstream semantics.
//!
//! Semantics (networking.k8s.io/v1): a pod is isolated for a direction when at least one policy
//! in its namespace selects it and has that policy type; isolated traffic is allowed when some
//! rule of some selecting policy allows it (the union), otherwise denied. `policyTypes` defaults
//! to Ingress, plus Egress when the policy has egress rules. A rule with no peers allows every
//! peer, a rule with no ports every port of every protocol; a policy type with no rules denies
//! everything. In one peer, podSelector and namespaceSelector are ANDed; separate peers are
//! ORed; podSelector alone means the policy's namespace. ipBlock matches every address in the
//! block outside its `except`s: external hosts, pods and nodes alike. Named ports are resolved
//! on the destination pod: for ingress the selected pod itself; for egress the pods of the
//! destination identity (pods with equal labels in one namespace normally run the same spec;
//! if they name ports differently the identity gets the union). A node always reaches its own
//! pods (health probes).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;
use thiserror::Error;

use crate::identity::{Identity, IdentityAllocator, IdentityKey};
use crate::selector::{Labels, Selector};

/// The label the API server puts on every namespace.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("networkpolicy {namespace}/{name}: {field}: {message}")]
pub struct CompileError {
    pub namespace: String,
    pub name: String,
    pub field: String,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub fn as_u8(self) -> u8 {
        match self {
            Direction::Ingress => 0,
            Direction::Egress => 1,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        })
    }
}

/// The protocols a NetworkPolicy port can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
            Proto::Sctp => 132,
        }
    }

    pub fn parse(s: &str) -> Option<Proto> {
        match s.to_ascii_uppercase().as_str() {
            "TCP" => Some(Proto::Tcp),
            "UDP" => Some(Proto::Udp),
            "SCTP" => Some(Proto::Sctp),
            _ => None,
        }
    }
}

/// Inclusive port range of one protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PortRange {
    pub proto: Proto,
    pub lo: u16,
    pub hi: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum PortSet {
    /// Every port of every protocol (a rule without ports).
    All,
    /// Only these (empty: a named port that resolves nowhere, matching nothing).
    Ranges(Vec<PortRange>),
}

impl PortSet {
    pub fn matches(&self, proto: u8, port: u16) -> bool {
        match self {
            PortSet::All => true,
            PortSet::Ranges(rs) => rs
                .iter()
                .any(|r| r.proto.number() == proto && (r.lo..=r.hi).contains(&port)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum PeerMatch {
    Any,
    Identity(Identity),
    Cidr { cidr: Ipv4Net, except: Vec<Ipv4Net> },
}

impl PeerMatch {
    pub fn matches(&self, ip: Ipv4Addr, identity: Identity) -> bool {
        match self {
            PeerMatch::Any => true,
            PeerMatch::Identity(i) => *i == identity,
            PeerMatch::Cidr { cidr, except } => {
                cidr.contains(&ip) && !except.iter().any(|e| e.contains(&ip))
            }
        }
    }
}

/// One (peer, ports) pair a rule allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Grant {
    pub rule: u32,
    pub peer: PeerMatch,
    pub ports: PortSet,
}

/// One direction of one endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DirectionPolicy {
    /// Rule ids of the policies (their `rule: None` entry) that isolate the endpoint; empty:
    /// not isolated, everything allowed.
    pub isolated_by: Vec<u32>,
    pub grants: Vec<Grant>,
}

impl DirectionPolicy {
    pub fn is_isolated(&self) -> bool {
        !self.isolated_by.is_empty()
    }

    /// Every rule that allows this peer/protocol/port.
    pub fn allowing_rules(
        &self,
        ip: Ipv4Addr,
        identity: Identity,
        proto: u8,
        port: u16,
    ) -> Vec<u32> {
        let mut r: Vec<u32> = self
            .grants
            .iter()
            .filter(|g| g.peer.matches(ip, identity) && g.ports.matches(proto, port))
            .map(|g| g.rule)
            .collect();
        r.dedup();
        r
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointPolicy {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub ip: Ipv4Addr,
    pub identity: Identity,
    /// Shared between the endpoints that compile to the same policy (same identity, same
    /// named ports), so compiling many pods costs little more than compiling their identities.
    pub ingress: Arc<DirectionPolicy>,
    pub egress: Arc<DirectionPolicy>,
}

impl EndpointPolicy {
    pub fn direction(&self, d: Direction) -> &DirectionPolicy {
        match d {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

/// What a rule id stands for: a rule of a policy, or (`rule: None`) the policy's default deny.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct RuleInfo {
    pub namespace: String,
    pub policy: String,
    pub direction: Direction,
    pub rule: Option<usize>,
}

impl fmt::Display for RuleInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rule {
            Some(i) => write!(
                f,
                "{}/{} {}[{i}]",
                self.namespace, self.policy, self.direction
            ),
            None => write!(
                f,
                "{}/{} (selects the pod for {}, no rule allows)",
                self.namespace, self.policy, self.direction
            ),
        }
    }
}

/// Hands out rule ids, stable across recompiles: a rule (namespace, policy, direction, index)
/// keeps its number while its policy exists, so adding or removing a policy rewrites only the
/// map entries of its own rules. A number is not handed out again (a stale entry never names
/// another rule); a fresh allocator numbers in policy name order from 1.
#[derive(Debug, Clone, Default)]
pub struct RuleAllocator {
    by_rule: HashMap<RuleInfo, u32>,
    next: u32,
}

impl RuleAllocator {
    pub fn new() -> Self {
        RuleAllocator::default()
    }

    pub fn get_or_allocate(&mut self, rule: &RuleInfo) -> u32 {
        if let Some(id) = self.by_rule.get(rule) {
            return *id;
        }
        // 0 means "no rule" in the maps.
        self.next = self.next.checked_add(1).unwrap_or(1).max(1);
        self.by_rule.insert(rule.clone(), self.next);
        self.next
    }

    /// Forgets every rule `in_use` does not hold.
    pub fn retain(&mut self, in_use: &BTreeMap<u32, RuleInfo>) {
        self.by_rule.retain(|_, id| in_use.contains_key(id));
    }

    pub fn len(&self) -> usize {
        self.by_rule.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_rule.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Reason {
    /// No policy selects the endpoint for this direction.
    NotIsolated,
    /// The endpoint's own node (health probes) always gets in.
    Host,
    Allowed {
        rule: u32,
    },
    Denied {
        isolated_by: Vec<u32>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub allowed: bool,
    pub reason: Reason,
}

/// Everything the compiler looks at.
#[derive(Debug, Clone, Copy, Default)]
pub struct Inputs<'a> {
    pub namespaces: &'a [Namespace],
    pub pods: &'a [Pod],
    pub policies: &'a [NetworkPolicy],
    pub nodes: &'a [Node],
}

/// A container port's (name, protocol, port).
type NamedPort = (String, Proto, u16);

/// A pod as the compiler sees it.
#[derive(Debug, Clone)]
struct PodView {
    namespace: String,
    name: String,
    node: String,
    ip: Ipv4Addr,
    identity: Identity,
    named_ports: Vec<NamedPort>,
}

/// The compiled state: one source for the datapath maps and for `trace`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PolicyState {
    /// Rule id -> what it stands for.
    pub rules: BTreeMap<u32, RuleInfo>,
    pub identities: BTreeMap<Identity, IdentityKey>,
    pub endpoints: BTreeMap<Ipv4Addr, EndpointPolicy>,
    /// Node name -> its addresses.
    pub nodes: BTreeMap<String, Vec<Ipv4Addr>>,
    /// Pod IP -> identity, for every pod with an IP (the ipcache).
    pub pod_identities: BTreeMap<Ipv4Addr, Identity>,
    /// Policies left out because they could not be compiled (the rest is in force).
    #[serde(skip)]
    pub rejected: Vec<CompileError>,
}

#[derive(Debug, Clone)]
enum PeerSpec {
    Selected(BTreeSet<Identity>),
    Cidr { cidr: Ipv4Net, except: Vec<Ipv4Net> },
}

#[derive(Debug, Clone)]
enum PortSpec {
    Range(PortRange),
    Named(String, Proto),
}

/// Namespace -> (its labels, its identities with their pod labels).
type IdentityIndex = BTreeMap<String, (Labels, Vec<(Identity, Labels)>)>;

/// A rule's peers and ports before it has an id.
type ParsedRule = (Option<Vec<PeerSpec>>, Option<Vec<PortSpec>>);

#[derive(Debug, Clone)]
struct RuleSpec {
    id: u32,
    /// None: every peer.
    peers: Option<Vec<PeerSpec>>,
    /// None: every port.
    ports: Option<Vec<PortSpec>>,
}

#[derive(Debug, Clone)]
struct PolicySpec {
    namespace: String,
    selector: Selector,
    ingress: Option<(u32, Vec<RuleSpec>)>,
    egress: Option<(u32, Vec<RuleSpec>)>,
}

fn labels_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Labels {
    meta.labels.clone().unwrap_or_default()
}

fn parse_ipv4(s: &str) -> Option<Ipv4Addr> {
    match s.parse::<IpAddr>().ok()? {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    }
}

impl PolicyState {
    /// Compiles `inputs`. Identities come from `alloc`, so numbers stay stable across calls;
    /// rule ids are numbered afresh, in policy name order. A policy that cannot be compiled is
    /// left out and reported in `rejected`.
    pub fn compile(inputs: Inputs<'_>, alloc: &mut IdentityAllocator) -> PolicyState {
        PolicyState::compile_objects(
            inputs.namespaces,
            inputs.pods,
            inputs.policies,
            inputs.nodes,
            alloc,
            &mut RuleAllocator::new(),
        )
    }

    /// [`PolicyState::compile`] over borrowed objects from anywhere (the agent keeps them in
    /// maps and need not copy them into slices first), with rule ids from `rules` (stable
    /// across calls, like identities).
    pub fn compile_objects<'a>(
        namespaces: impl IntoIterator<Item = &'a Namespace>,
        pod_objects: impl IntoIterator<Item = &'a Pod>,
        policies: impl IntoIterator<Item = &'a NetworkPolicy>,
        nodes: impl IntoIterator<Item = &'a Node>,
        alloc: &mut IdentityAllocator,
        rules: &mut RuleAllocator,
    ) -> PolicyState {
        let mut state = PolicyState::default();
        let mut ns_labels: HashMap<String, Labels> = HashMap::new();
        for ns in namespaces {
            let name = ns.metadata.name.clone().unwrap_or_default();
            let mut l = labels_of(&ns.metadata);
            l.insert(NAMESPACE_NAME_LABEL.into(), name.clone());
            ns_labels.insert(name, l);
        }
        let ns_labels_of = |ns: &str| -> Labels {
            ns_labels
                .get(ns)
                .cloned()
                .unwrap_or_else(|| [(NAMESPACE_NAME_LABEL.to_string(), ns.to_string())].into())
        };
        for node in nodes {
            let name = node.metadata.name.clone().unwrap_or_default();
            let addrs = node
                .status
                .iter()
                .flat_map(|s| s.addresses.iter().flatten())
                .filter_map(|a| parse_ipv4(&a.address))
                .collect();
            state.nodes.insert(name, addrs);
        }

        // Pods with an address (host-network pods are the node, not endpoints).
        let mut pods: Vec<PodView> = Vec::new();
        // Namespace labels are looked up once per namespace, not once per pod.
        let mut ns_label_cache: HashMap<String, Labels> = HashMap::new();
        for pod in pod_objects {
            let spec = pod.spec.as_ref();
            if spec.and_then(|s| s.host_network).unwrap_or(false) {
                continue;
            }
            let Some(ip) = pod
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(parse_ipv4)
            else {
                continue;
            };
            let namespace = pod
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            let labels = labels_of(&pod.metadata);
            let namespace_labels = ns_label_cache
                .entry(namespace.clone())
                .or_insert_with(|| ns_labels_of(&namespace))
                .clone();
            let key = IdentityKey {
                namespace: namespace.clone(),
                pod_labels: labels,
                namespace_labels,
            };
            let identity = alloc.get_or_allocate(&key);
            state.identities.entry(identity).or_insert(key);
            let named_ports = spec
                .into_iter()
                .flat_map(|s| s.containers.iter())
                .flat_map(|c| c.ports.iter().flatten())
                .filter_map(|p| {
                    let proto = Proto::parse(p.protocol.as_deref().unwrap_or("TCP"))?;
                    Some((
                        p.name.clone()?,
                        proto,
                        u16::try_from(p.container_port).ok()?,
                    ))
                })
                .collect();
            state.pod_identities.insert(ip, identity);
            pods.push(PodView {
                namespace,
                name: pod.metadata.name.clone().unwrap_or_default(),
                node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
                ip,
                identity,
                named_ports,
            });
        }
        let in_use: std::collections::HashSet<&IdentityKey> = state.identities.values().collect();
        alloc.retain(|k| in_use.contains(k));
        // Identities by namespace, for resolving peer selectors without scanning them all.
        let mut index: IdentityIndex = BTreeMap::new();
        for (id, k) in &state.identities {
            index
                .entry(k.namespace.clone())
                .or_insert_with(|| (k.namespace_labels.clone(), Vec::new()))
                .1
                .push((*id, k.pod_labels.clone()));
        }

        // Named ports per identity, for egress rules.
        let mut ports_by_identity: HashMap<Identity, BTreeSet<(String, Proto, u16)>> =
            HashMap::new();
        for p in &pods {
            ports_by_identity
                .entry(p.identity)
                .or_default()
                .extend(p.named_ports.iter().cloned());
        }

        // Policies, sorted so rule ids do not depend on input order.
        let mut sorted: Vec<&NetworkPolicy> = policies.into_iter().collect();
        sorted.sort_by_key(|p| (p.metadata.namespace.clone(), p.metadata.name.clone()));
        let mut specs: Vec<PolicySpec> = Vec::new();
        for np in sorted {
            match state.parse_policy(np, &index, rules) {
                Ok(s) => specs.push(s),
                Err(e) => {
                    state.rejected.push(e);
                }
            }
        }
        rules.retain(&state.rules);
        // Peer selectors were resolved against identities (not pods) while parsing.
        let resolved = specs;

        // Which policies select each identity (only those of its namespace can).
        let mut by_namespace: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, s) in resolved.iter().enumerate() {
            by_namespace
                .entry(s.namespace.as_str())
                .or_default()
                .push(i);
        }
        let mut selecting: HashMap<Identity, Vec<usize>> = HashMap::new();
        for (id, key) in &state.identities {
            let v: Vec<usize> = by_namespace
                .get(key.namespace.as_str())
                .into_iter()
                .flatten()
                .copied()
                .filter(|&i| resolved[i].selector.matches(&key.pod_labels))
                .collect();
            selecting.insert(*id, v);
        }
        let selected =
            |id: Identity| -> &[usize] { selecting.get(&id).map(Vec::as_slice).unwrap_or(&[]) };

        // Ingress depends on the pod only through its identity and named ports, egress only
        // through its identity: each distinct one is compiled once and shared.
        let ingress_of = |pod: &PodView| -> DirectionPolicy {
            let mut d = DirectionPolicy::default();
            for &i in selected(pod.identity) {
                let spec = &resolved[i];
                if let Some((iso, rules)) = &spec.ingress {
                    d.isolated_by.push(*iso);
                    for r in rules {
                        let ports = resolve_ports(r.ports.as_deref(), |name, proto| {
                            pod.named_ports
                                .iter()
                                .filter(|(n, p, _)| n == name && *p == proto)
                                .map(|(_, _, port)| *port)
                                .collect()
                        });
                        push_grants(&mut d.grants, r, |_| ports.clone());
                    }
                }
            }
            d
        };
        let egress_of = |identity: Identity| -> DirectionPolicy {
            let mut d = DirectionPolicy::default();
            for &i in selected(identity) {
                let spec = &resolved[i];
                if let Some((iso, rules)) = &spec.egress {
                    d.isolated_by.push(*iso);
                    for r in rules {
                        let has_named = r
                            .ports
                            .iter()
                            .flatten()
                            .any(|p| matches!(p, PortSpec::Named(..)));
                        let named_in = |ids: &mut dyn Iterator<Item = Identity>,
                                        name: &str,
                                        proto: Proto|
                         -> Vec<u16> {
                            let mut v: Vec<u16> = ids
                                .flat_map(|id| ports_by_identity.get(&id).into_iter().flatten())
                                .filter(|(n, p, _)| n == name && *p == proto)
                                .map(|(_, _, port)| *port)
                                .collect();
                            v.sort_unstable();
                            v.dedup();
                            v
                        };
                        if has_named && r.peers.is_none() {
                            // "Every peer" with a named port: exactly the pods naming it.
                            for id in state.identities.keys() {
                                let ports = resolve_ports(r.ports.as_deref(), |name, proto| {
                                    named_in(&mut std::iter::once(*id), name, proto)
                                });
                                d.grants.push(Grant {
                                    rule: r.id,
                                    peer: PeerMatch::Identity(*id),
                                    ports,
                                });
                            }
                            // Numeric ports of the same rule still apply to every peer.
                            let numeric = resolve_ports(r.ports.as_deref(), |_, _| Vec::new());
                            d.grants.push(Grant {
                                rule: r.id,
                                peer: PeerMatch::Any,
                                ports: numeric,
                            });
                            continue;
                        }
                        push_grants(&mut d.grants, r, |peer| {
                            if !has_named {
                                return resolve_ports(r.ports.as_deref(), |_, _| Vec::new());
                            }
                            resolve_ports(r.ports.as_deref(), |name, proto| match peer {
                                PeerMatch::Identity(id) => {
                                    named_in(&mut std::iter::once(*id), name, proto)
                                }
                                PeerMatch::Any => {
                                    named_in(&mut ports_by_identity.keys().copied(), name, proto)
                                }
                                PeerMatch::Cidr { .. } => named_in(
                                    &mut pods
                                        .iter()
                                        .filter(|p| peer.matches(p.ip, p.identity))
                                        .map(|p| p.identity),
                                    name,
                                    proto,
                                ),
                            })
                        });
                    }
                }
            }
            d
        };
        let mut ingress_memo: HashMap<(Identity, &[NamedPort]), Arc<DirectionPolicy>> =
            HashMap::new();
        let mut egress_memo: HashMap<Identity, Arc<DirectionPolicy>> = HashMap::new();
        let mut endpoints = BTreeMap::new();
        for pod in &pods {
            let ingress = ingress_memo
                .entry((pod.identity, pod.named_ports.as_slice()))
                .or_insert_with(|| Arc::new(ingress_of(pod)))
                .clone();
            let egress = egress_memo
                .entry(pod.identity)
                .or_insert_with(|| Arc::new(egress_of(pod.identity)))
                .clone();
            let ep = EndpointPolicy {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                node: pod.node.clone(),
                ip: pod.ip,
                identity: pod.identity,
                ingress,
                egress,
            };
            endpoints.insert(pod.ip, ep);
        }
        state.endpoints = endpoints;
        state
    }

    fn parse_policy(
        &mut self,
        np: &NetworkPolicy,
        index: &IdentityIndex,
        rule_ids: &mut RuleAllocator,
    ) -> Result<PolicySpec, CompileError> {
        let namespace = np
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = np.metadata.name.clone().unwrap_or_default();
        let err = |field: String, message: String| CompileError {
            namespace: namespace.clone(),
            name: name.clone(),
            field,
            message,
        };
        let spec = np
            .spec
            .as_ref()
            .ok_or_else(|| err("spec".into(), "required".into()))?;
        let selector = match &spec.pod_selector {
            Some(s) => {
                Selector::parse("spec.podSelector", s).map_err(|e| err(e.field, e.message))?
            }
            None => Selector::everything(),
        };
        let has_egress = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
        let (ingress_on, egress_on) = match &spec.policy_types {
            Some(types) => {
                for (i, t) in types.iter().enumerate() {
                    if t != "Ingress" && t != "Egress" {
                        return Err(err(
                            format!("spec.policyTypes[{i}]"),
                            format!("unsupported value {t:?}: use Ingress or Egress"),
                        ));
                    }
                }
                (
                    types.iter().any(|t| t == "Ingress"),
                    types.iter().any(|t| t == "Egress"),
                )
            }
            None => (true, has_egress),
        };
        // Parse everything before allocating ids, so a bad policy leaves no ids behind.
        let mut ingress = Vec::new();
        for (i, r) in spec.ingress.iter().flatten().enumerate() {
            let f = format!("spec.ingress[{i}]");
            ingress.push((
                parse_peers(index, &namespace, &format!("{f}.from"), r.from.as_deref())
                    .map_err(|(f, m)| err(f, m))?,
                parse_ports(&format!("{f}.ports"), r.ports.as_deref())
                    .map_err(|(f, m)| err(f, m))?,
            ));
        }
        let mut egress = Vec::new();
        for (i, r) in spec.egress.iter().flatten().enumerate() {
            let f = format!("spec.egress[{i}]");
            egress.push((
                parse_peers(index, &namespace, &format!("{f}.to"), r.to.as_deref())
                    .map_err(|(f, m)| err(f, m))?,
                parse_ports(&format!("{f}.ports"), r.ports.as_deref())
                    .map_err(|(f, m)| err(f, m))?,
            ));
        }
        let mut make = |dir: Direction, on: bool, rules: Vec<ParsedRule>| {
            if !on {
                return None;
            }
            let iso = self.add_rule(rule_ids, &namespace, &name, dir, None);
            let rules = rules
                .into_iter()
                .enumerate()
                .map(|(i, (peers, ports))| RuleSpec {
                    id: self.add_rule(rule_ids, &namespace, &name, dir, Some(i)),
                    peers,
                    ports,
                })
                .collect();
            Some((iso, rules))
        };
        let ingress = make(Direction::Ingress, ingress_on, ingress);
        let egress = make(Direction::Egress, egress_on, egress);
        Ok(PolicySpec {
            namespace,
            selector,
            ingress,
            egress,
        })
    }

    fn add_rule(
        &mut self,
        ids: &mut RuleAllocator,
        ns: &str,
        name: &str,
        direction: Direction,
        rule: Option<usize>,
    ) -> u32 {
        let info = RuleInfo {
            namespace: ns.into(),
            policy: name.into(),
            direction,
            rule,
        };
        let id = ids.get_or_allocate(&info);
        self.rules.insert(id, info);
        id
    }

    /// The peer's identity as the datapath of `node` sees it.
    pub fn identity_of(&self, ip: Ipv4Addr, node: &str) -> Identity {
        if let Some(id) = self.pod_identities.get(&ip) {
            return *id;
        }
        for (name, addrs) in &self.nodes {
            if addrs.contains(&ip) {
                return if name == node {
                    Identity::HOST
                } else {
                    Identity::REMOTE_NODE
                };
            }
        }
        Identity::WORLD
    }

    /// The verdict of `endpoint`'s `direction` for a connection's first packet from/to `peer`.
    pub fn decide(
        &self,
        endpoint: &EndpointPolicy,
        direction: Direction,
        peer: Ipv4Addr,
        proto: u8,
        port: u16,
    ) -> Decision {
        let dp = endpoint.direction(direction);
        if !dp.is_isolated() {
            return Decision {
                allowed: true,
                reason: Reason::NotIsolated,
            };
        }
        let identity = self.identity_of(peer, &endpoint.node);
        if direction == Direction::Ingress && identity == Identity::HOST {
            return Decision {
                allowed: true,
                reason: Reason::Host,
            };
        }
        match dp.allowing_rules(peer, identity, proto, port).first() {
            Some(rule) => Decision {
                allowed: true,
                reason: Reason::Allowed { rule: *rule },
            },
            None => Decision {
                allowed: false,
                reason: Reason::Denied {
                    isolated_by: dp.isolated_by.clone(),
                },
            },
        }
    }

    pub fn rule(&self, id: u32) -> Option<&RuleInfo> {
        self.rules.get(&id)
    }

    pub fn endpoint_by_name(&self, namespace: &str, name: &str) -> Option<&EndpointPolicy> {
        self.endpoints
            .values()
            .find(|e| e.namespace == namespace && e.name == name)
    }
}

fn parse_peers(
    index: &IdentityIndex,
    policy_ns: &str,
    field: &str,
    peers: Option<&[NetworkPolicyPeer]>,
) -> Result<Option<Vec<PeerSpec>>, (String, String)> {
    let Some(peers) = peers.filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    let mut out = Vec::new();
    for (j, peer) in peers.iter().enumerate() {
        let f = format!("{field}[{j}]");
        if let Some(block) = &peer.ip_block {
            let cidr: Ipv4Net = block.cidr.parse().map_err(|_| {
                (
                    format!("{f}.ipBlock.cidr"),
                    format!("{:?} is not an IPv4 CIDR", block.cidr),
                )
            })?;
            let cidr = cidr.trunc();
            let mut except = Vec::new();
            for (k, e) in block.except.iter().flatten().enumerate() {
                let ef = format!("{f}.ipBlock.except[{k}]");
                let e: Ipv4Net = e
                    .parse()
                    .map_err(|_| (ef.clone(), format!("{e:?} is not an IPv4 CIDR")))?;
                let e = e.trunc();
                if !(cidr.contains(&e) && e.prefix_len() > cidr.prefix_len()) {
                    return Err((ef, format!("{e} must be strictly within {cidr}")));
                }
                except.push(e);
            }
            out.push(PeerSpec::Cidr { cidr, except });
            continue;
        }
        let pod_sel = peer
            .pod_selector
            .as_ref()
            .map(|s| Selector::parse(&format!("{f}.podSelector"), s))
            .transpose()
            .map_err(|e| (e.field, e.message))?;
        let ns_sel = peer
            .namespace_selector
            .as_ref()
            .map(|s| Selector::parse(&format!("{f}.namespaceSelector"), s))
            .transpose()
            .map_err(|e| (e.field, e.message))?;
        if pod_sel.is_none() && ns_sel.is_none() {
            return Err((f, "needs podSelector, namespaceSelector or ipBlock".into()));
        }
        // Namespaces first (a handful), then the identities of those that match.
        let namespaces: Vec<&(Labels, Vec<(Identity, Labels)>)> = match &ns_sel {
            Some(s) => index.values().filter(|(l, _)| s.matches(l)).collect(),
            None => index.get(policy_ns).into_iter().collect(),
        };
        let ids = namespaces
            .into_iter()
            .flat_map(|(_, ids)| ids)
            .filter(|(_, l)| pod_sel.as_ref().is_none_or(|s| s.matches(l)))
            .map(|(id, _)| *id)
            .collect();
        out.push(PeerSpec::Selected(ids));
    }
    Ok(Some(out))
}

fn parse_ports(
    field: &str,
    ports: Option<&[NetworkPolicyPort]>,
) -> Result<Option<Vec<PortSpec>>, (String, String)> {
    let Some(ports) = ports.filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    let mut out = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let f = format!("{field}[{i}]");
        let proto_s = p.protocol.as_deref().unwrap_or("TCP");
        let proto = Proto::parse(proto_s).ok_or_else(|| {
            (
                format!("{f}.protocol"),
                format!("unsupported protocol {proto_s:?}: use TCP, UDP or SCTP"),
            )
        })?;
        let spec = match &p.port {
            None => PortSpec::Range(PortRange {
                proto,
                lo: 0,
                hi: u16::MAX,
            }),
            Some(IntOrString::String(name)) => {
                if p.end_port.is_some() {
                    return Err((
                        format!("{f}.endPort"),
                        "may only be set together with a numeric port".into(),
                    ));
                }
                PortSpec::Named(name.clone(), proto)
            }
            Some(IntOrString::Int(n)) => {
                let lo = u16::try_from(*n)
                    .ok()
                    .filter(|n| *n != 0)
                    .ok_or_else(|| (format!("{f}.port"), format!("{n} is not a port (1-65535)")))?;
                let hi = match p.end_port {
                    None => lo,
                    Some(e) => u16::try_from(e).ok().filter(|e| *e >= lo).ok_or_else(|| {
                        (
                            format!("{f}.endPort"),
                            format!("must be between port ({lo}) and 65535, got {e}"),
                        )
                    })?,
                };
                PortSpec::Range(PortRange { proto, lo, hi })
            }
        };
        out.push(spec);
    }
    Ok(Some(out))
}

fn resolve_ports(ports: Option<&[PortSpec]>, named: impl Fn(&str, Proto) -> Vec<u16>) -> PortSet {
    let Some(ports) = ports else {
        return PortSet::All;
    };
    let mut out = Vec::new();
    for p in ports {
        match p {
            PortSpec::Range(r) => out.push(*r),
            PortSpec::Named(name, proto) => {
                out.extend(named(name, *proto).into_iter().map(|n| PortRange {
                    proto: *proto,
                    lo: n,
                    hi: n,
                }))
            }
        }
    }
    PortSet::Ranges(out)
}

fn push_grants(out: &mut Vec<Grant>, r: &RuleSpec, ports_for: impl Fn(&PeerMatch) -> PortSet) {
    let mut push = |peer: PeerMatch| {
        let ports = ports_for(&peer);
        out.push(Grant {
            rule: r.id,
            peer,
            ports,
        });
    };
    match &r.peers {
        None => push(PeerMatch::Any),
        Some(peers) => {
            for p in peers {
                match p {
                    PeerSpec::Selected(ids) => {
                        for id in ids {
                            push(PeerMatch::Identity(*id));
                        }
                    }
                    PeerSpec::Cidr { cidr, except } => push(PeerMatch::Cidr {
                        cidr: *cidr,
                        except: except.clone(),
                    }),
                }
            }
        }
    }
}
