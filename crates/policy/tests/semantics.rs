//! The compiler against a table of NetworkPolicy semantics (upstream networking.k8s.io/v1),
//! on the conformance cluster: namespaces x, y, z with pods a, b, c each (label pod=<name>,
//! TCP/UDP 80 and 81 with named ports serve-80-tcp etc.), plus x/d naming port 8080
//! serve-80-tcp. Every scenario also checks that the lowered BPF maps decide exactly as the
//! compiled state does, for every pod pair and a set of peers, protocols and ports.

use std::net::Ipv4Addr;

use ferrum_policy::compile::{Direction, Reason};
use ferrum_policy::{Identity, IdentityAllocator, Inputs, PolicyState};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;

const TCP: u8 = 6;
const UDP: u8 = 17;
const SCTP: u8 = 132;
const ICMP: u8 = 1;
const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];
const NODE1: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const NODE2: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const EXTERNAL: Ipv4Addr = Ipv4Addr::new(192, 168, 7, 7);

fn ns_index(ns: &str) -> u8 {
    NAMESPACES.iter().position(|n| *n == ns).unwrap() as u8 + 1
}

fn ip(pod: &str) -> Ipv4Addr {
    let (ns, name) = pod.split_once('/').unwrap();
    let p = match name {
        "d" => 4,
        n => PODS.iter().position(|p| *p == n).unwrap() as u8 + 1,
    };
    Ipv4Addr::new(10, 244, ns_index(ns), p)
}

fn yaml<T: serde::de::DeserializeOwned>(s: &str) -> T {
    serde_yaml::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

struct Cluster {
    namespaces: Vec<Namespace>,
    pods: Vec<Pod>,
    nodes: Vec<Node>,
    policies: Vec<NetworkPolicy>,
    alloc: IdentityAllocator,
}

fn pod(ns: &str, name: &str, labels: &str, port80: u16) -> Pod {
    pod_at(ns, name, labels, port80, ip(&format!("{ns}/{name}")))
}

fn pod_at(ns: &str, name: &str, labels: &str, port80: u16, addr: Ipv4Addr) -> Pod {
    let node = if ns == "z" { "n2" } else { "n1" };
    yaml(&format!(
        "metadata: {{name: {name}, namespace: {ns}, labels: {labels}}}
spec:
  nodeName: {node}
  containers:
  - name: c
    ports:
    - {{name: serve-80-tcp, containerPort: {port80}, protocol: TCP}}
    - {{name: serve-80-udp, containerPort: {port80}, protocol: UDP}}
    - {{name: serve-81-tcp, containerPort: 81, protocol: TCP}}
    - {{name: serve-81-udp, containerPort: 81, protocol: UDP}}
    - {{name: serve-80-sctp, containerPort: {port80}, protocol: SCTP}}
status: {{podIP: {addr}}}"
    ))
}

impl Cluster {
    fn new() -> Self {
        let namespaces = NAMESPACES
            .iter()
            .map(|n| yaml(&format!("metadata: {{name: {n}, labels: {{ns: {n}}}}}")))
            .collect();
        let mut pods = Vec::new();
        for ns in NAMESPACES {
            for p in PODS {
                pods.push(pod(ns, p, &format!("{{pod: {p}}}"), 80));
            }
        }
        pods.push(pod("x", "d", "{pod: d}", 8080));
        let nodes = [("n1", NODE1), ("n2", NODE2)]
            .iter()
            .map(|(n, a)| {
                yaml(&format!(
                    "metadata: {{name: {n}}}\nstatus: {{addresses: [{{type: InternalIP, address: {a}}}]}}"
                ))
            })
            .collect();
        Cluster {
            namespaces,
            pods,
            nodes,
            policies: Vec::new(),
            alloc: IdentityAllocator::new(),
        }
    }

    fn policy(&mut self, ns: &str, name: &str, spec: &str) -> &mut Self {
        self.policies.retain(|p| {
            !(p.metadata.namespace.as_deref() == Some(ns)
                && p.metadata.name.as_deref() == Some(name))
        });
        self.policies.push(yaml(&format!(
            "metadata: {{name: {name}, namespace: {ns}}}\nspec:\n{}",
            indent(spec)
        )));
        self
    }

    fn compile(&mut self) -> PolicyState {
        let state = PolicyState::compile(
            Inputs {
                namespaces: &self.namespaces,
                pods: &self.pods,
                policies: &self.policies,
                nodes: &self.nodes,
            },
            &mut self.alloc,
        );
        check_lowering(&state);
        state
    }
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("  {l}\n")).collect()
}

fn all_pods() -> Vec<String> {
    let mut v: Vec<String> = NAMESPACES
        .iter()
        .flat_map(|n| PODS.iter().map(move |p| format!("{n}/{p}")))
        .collect();
    v.push("x/d".into());
    v
}

/// Every pod pair and some outside peers, on TCP/UDP/SCTP/ICMP and a few ports: the lowered
/// maps of each node must give the same verdict as `decide`, and an allowing rule that
/// `decide` also knows allows.
fn check_lowering(state: &PolicyState) {
    let maps = [("n1", state.lower("n1")), ("n2", state.lower("n2"))];
    let peers: Vec<Ipv4Addr> = all_pods()
        .iter()
        .map(|p| ip(p))
        .chain([NODE1, NODE2, EXTERNAL, Ipv4Addr::new(10, 244, 2, 200)])
        .collect();
    for ep in state.endpoints.values() {
        let m = &maps.iter().find(|(n, _)| *n == ep.node).unwrap().1;
        for dir in [Direction::Ingress, Direction::Egress] {
            for peer in &peers {
                for (proto, port) in [
                    (TCP, 80),
                    (TCP, 81),
                    (TCP, 82),
                    (TCP, 8080),
                    (UDP, 80),
                    (UDP, 81),
                    (SCTP, 80),
                    (ICMP, 0),
                ] {
                    let want = state.decide(ep, dir, *peer, proto, port);
                    let got = m.lookup(ep.ip, dir, *peer, proto, port);
                    assert_eq!(
                        got.allowed, want.allowed,
                        "{}/{} {dir} peer {peer} proto {proto} port {port}: maps {got:?} vs {want:?}",
                        ep.namespace, ep.name
                    );
                    match &want.reason {
                        Reason::Allowed { .. } => {
                            let identity = state.identity_of(*peer, &ep.node);
                            let rules = ep
                                .direction(dir)
                                .allowing_rules(*peer, identity, proto, port);
                            assert!(rules.contains(&got.rule), "{got:?} not in {rules:?}");
                        }
                        Reason::Denied { isolated_by } => assert_eq!(got.rule, isolated_by[0]),
                        _ => assert_eq!(got.rule, 0),
                    }
                }
            }
        }
    }
}

fn reach(s: &PolicyState, from: &str, to: &str, proto: u8, port: u16) -> bool {
    s.trace(ip(from), ip(to), proto, port).allowed
}

/// The 9×9 matrix (plus x/d) as text: one line per source, X = allowed.
fn matrix(s: &PolicyState, proto: u8, port: u16) -> String {
    let pods = all_pods();
    pods.iter()
        .map(|from| {
            let row: String = pods
                .iter()
                .map(|to| {
                    if reach(s, from, to, proto, port) {
                        'X'
                    } else {
                        '.'
                    }
                })
                .collect();
            format!("{from} {row}\n")
        })
        .collect()
}

/// Expected matrix from a predicate.
fn expect(f: impl Fn(&str, &str) -> bool) -> String {
    let pods = all_pods();
    pods.iter()
        .map(|from| {
            let row: String = pods
                .iter()
                .map(|to| if f(from, to) { 'X' } else { '.' })
                .collect();
            format!("{from} {row}\n")
        })
        .collect()
}

fn ns(p: &str) -> &str {
    p.split_once('/').unwrap().0
}

#[test]
fn no_policy_allows_everything() {
    let s = Cluster::new().compile();
    assert_eq!(matrix(&s, TCP, 80), expect(|_, _| true));
    let t = s.trace(ip("x/a"), ip("y/b"), TCP, 80);
    assert_eq!(t.ingress.unwrap().reason, Reason::NotIsolated);
    assert!(t.text.contains("no NetworkPolicy selects"), "{}", t.text);
}

#[test]
fn default_deny_ingress_and_the_host_exception() {
    let mut c = Cluster::new();
    c.policy("x", "deny-all", "podSelector: {}\npolicyTypes: [Ingress]");
    let s = c.compile();
    assert_eq!(matrix(&s, TCP, 80), expect(|_, to| ns(to) != "x"));
    // The node reaches its own pods (probes); another node and the world do not.
    assert!(s.trace(NODE1, ip("x/a"), TCP, 80).allowed);
    assert!(!s.trace(NODE2, ip("x/a"), TCP, 80).allowed);
    assert!(!s.trace(EXTERNAL, ip("x/a"), TCP, 80).allowed);
    let t = s.trace(ip("y/a"), ip("x/a"), TCP, 80);
    assert!(t.text.contains("x/deny-all"), "{}", t.text);
    let Some(Reason::Denied { isolated_by }) = t.ingress.map(|d| d.reason) else {
        panic!("denied");
    };
    let r = s.rule(isolated_by[0]).unwrap();
    assert_eq!(
        (r.policy.as_str(), r.direction, r.rule),
        ("deny-all", Direction::Ingress, None)
    );
}

#[test]
fn allow_all_rule_and_deny_all_combined_is_the_union() {
    let mut c = Cluster::new();
    c.policy("x", "deny-all", "podSelector: {}\npolicyTypes: [Ingress]");
    c.policy("x", "allow-all", "podSelector: {}\ningress: [{}]");
    let s = c.compile();
    assert_eq!(matrix(&s, TCP, 80), expect(|_, _| true));
    assert_eq!(matrix(&s, UDP, 81), expect(|_, _| true));
    assert!(s.trace(EXTERNAL, ip("x/b"), ICMP, 0).allowed);
    let t = s.trace(ip("z/c"), ip("x/b"), TCP, 80);
    assert!(
        t.text.contains("allowed by x/allow-all ingress[0]"),
        "{}",
        t.text
    );
}

#[test]
fn pod_selector_alone_means_the_policy_namespace() {
    let mut c = Cluster::new();
    c.policy(
        "x",
        "a-from-b",
        "podSelector: {matchLabels: {pod: a}}\ningress:\n- from: [{podSelector: {matchLabels: {pod: b}}}]",
    );
    let s = c.compile();
    assert_eq!(
        matrix(&s, TCP, 80),
        expect(|from, to| to != "x/a" || from == "x/b")
    );
}

#[test]
fn namespace_selector_alone_means_all_pods_there() {
    let mut c = Cluster::new();
    c.policy(
        "x",
        "a-from-y",
        "podSelector: {matchLabels: {pod: a}}\ningress:\n- from: [{namespaceSelector: {matchLabels: {ns: y}}}]",
    );
    let s = c.compile();
    assert_eq!(
        matrix(&s, TCP, 80),
        expect(|from, to| to != "x/a" || ns(from) == "y")
    );
}

#[test]
fn namespace_selector_by_metadata_name_label() {
    let mut c = Cluster::new();
    c.policy(
        "x",
        "a-from-z",
        "podSelector: {matchLabels: {pod: a}}\ningress:\n- from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: z}}}]",
    );
    let s = c.compile();
    assert_eq!(
        matrix(&s, TCP, 80),
        expect(|from, to| to != "x/a" || ns(from) == "z")
    );
}

#[test]
fn pod_and_namespace_selector_in_one_peer_is_and() {
    let mut c = Cluster::new();
    c.policy(
        "x",
        "and",
        "podSelector: {matchLabels: {pod: a}}\ningress:\n- from:\n  - namespaceSelector: {matchLabels: {ns: y}}\n    podSelector: {matchLabels: {pod: b}}",
    );
    let s = c.compile();
    assert_eq!(
        matrix(&s, TCP, 80),
        expect(|from, to| to != "x/a" || from == "y/b")
    );
}

#[test]
fn separate_peers_are_or() {
    let mut c = Cluster::new();
    c.policy(
        "x",
        "or",
        "podSelector: {matchLabels: {pod: a}}\ningress:\n- from:\n  - namespaceSelector: {matchLabels: {ns: y}}\n  - podSelector: {matchLabels: {pod: b}}",
    );
    let s = c.compile();
    assert_eq!(
        matrix(&s, TCP, 80),
        expect(|from, to| to != "x/a" || ns(from) == "y" || from == "x/b")
    );
}

#[test]
fn match_expressions() {
    let mut c = Cluster::new();
    c.policy(
        "x",
        "exprs",
        "podSelector: {matchExpressions: [{key: pod, operator: In, values: [a, b]}]}
ingress:
- from:
  - namespaceSelector: {matchExpressions: [{key: ns, operator: NotIn, values: [x]}]}
    podSelector: {matchExpressions: [{key: pod, operator: Exists}, {key: tier, operator: DoesNotExist}, {key: pod, operator: NotIn, values: [c]}]}",
    );
    let s = c.compile();
    assert_eq!(
        matrix(&s, TCP, 80),
        expect(
            |from, to| !(to == "x/a" || to == "x/b") || (ns(from) != "x" && !from.ends_with("/c"))
        )
    );
}

#[test]
fn numeric_ports_protocols_sctp_and_end_port() {
    let mut c = Cluster::new();
    c.policy(
        "x",
        "ports",
        "podSelector: {}
ingress:
- ports: [{port: 80}]
- ports: [{protocol: UDP, port: 81}]
- ports: [{protocol: SCTP, port: 80}]
- ports: [{protocol: TCP, port: 8000, endPort: 8081}]",
    );
    let s = c.compile();
    assert!(reach(&s, "y/a", "x/a", TCP, 80));
    assert!(!reach(&s, "y/a", "x/a", TCP, 81));
    assert!(!reach(&s, "y/a", "x/a", UDP, 80));
    assert!(reach(&s, "y/a", "x/a", UDP, 81));
    assert!(reach(&s, "y/a", "x/a", SCTP, 80), "SCTP matched by number");
    assert!(!reach(&s, "y/a", "x/a", SCTP, 81));
    assert!(reach(&s, "y/a", "x/a", TCP, 8000));
    assert!(reach(&s, "y/a", "x/a", TCP, 8080));
    assert!(reach(&s, "y/a", "x/a", TCP, 8081));
    assert!(!reach(&s, "y/a", "x/a", TCP, 8082));
    assert!(!reach(&s, "y/a", "x/a", TCP, 7999));
    assert!(
        !reach(&s, "y/a", "x/a", ICMP, 0),
        "ports rules do not allow ICMP"
    );
    let t = s.trace(ip("y/a"), ip("x/a"), TCP, 8080);
    assert!(t.text.contains("x/ports ingress[3]"), "{}", t.text);
}

#[test]
fn protocol_without_port_allows_every_port_of_it() {
    let mut c = Cluster::new();
    c.policy(
        "x",
        "udp",
        "podSelector: {}\ningress:\n- ports: [{protocol: UDP}]",
    );
    let s = c.compile();
    assert!(reach(&s, "y/a", "x/a", UDP, 80) && reach(&s, "y/a", "x/a", UDP, 81));
    assert!(!reach(&s, "y/a", "x/a", TCP, 80));
}

#[test]
fn named_ports_resolve_on_the_destination_pod() {
    let mut c = Cluster::new();
    c.policy(
        "x",
        "named",
        "podSelector: {}\ningress:\n- ports: [{port: serve-80-tcp}, {port: serve-81-udp, protocol: UDP}]",
    );
    let s = c.compile();
    assert!(reach(&s, "y/a", "x/a", TCP, 80));
    assert!(!reach(&s, "y/a", "x/a", TCP, 8080));
    assert!(
        reach(&s, "y/a", "x/d", TCP, 8080),
        "x/d names 8080 serve-80-tcp"
    );
    assert!(!reach(&s, "y/a", "x/d", TCP, 80));
    assert!(reach(&s, "y/a", "x/a", UDP, 81));
    assert!(
        !reach(&s, "y/a", "x/a", TCP, 81),
        "serve-81-udp is UDP only"
    );
    // A name no container uses (or with another protocol) allows nothing.
    c.policy(
        "x",
        "named",
        "podSelector: {}\ningress:\n- ports: [{port: nope}, {port: serve-81-udp}]",
    );
    let s = c.compile();
    assert_eq!(matrix(&s, TCP, 81), expect(|_, to| ns(to) != "x"));
    assert_eq!(matrix(&s, UDP, 81), expect(|_, to| ns(to) != "x"));
}

#[test]
fn egress_named_ports_resolve_on_the_destination() {
    let mut c = Cluster::new();
    c.policy(
        "x",
        "egress-named",
        "podSelector: {matchLabels: {pod: a}}\npolicyTypes: [Egress]\negress:\n- ports: [{port: serve-80-tcp}]",
    );
    let s = c.compile();
    assert!(reach(&s, "x/a", "x/b", TCP, 80));
    assert!(reach(&s, "x/a", "x/d", TCP, 8080));
    assert!(!reach(&s, "x/a", "x/b", TCP, 8080));
    assert!(!reach(&s, "x/a", "x/d", TCP, 80));
    assert!(!reach(&s, "x/a", "x/b", TCP, 81));
}

#[test]
fn policy_types_defaults() {
    // Egress rules without policyTypes: Ingress and Egress; no ingress rules: ingress denied.
    let mut c = Cluster::new();
    c.policy(
        "x",
        "egress-only-rules",
        "podSelector: {matchLabels: {pod: a}}\negress:\n- to: [{podSelector: {matchLabels: {pod: b}}}]",
    );
    let s = c.compile();
    assert_eq!(
        matrix(&s, TCP, 80),
        expect(|from, to| to != "x/a" && (from != "x/a" || to == "x/b"))
    );
    // policyTypes [Egress] ignores ingress rules and leaves ingress open.
    let mut c = Cluster::new();
    c.policy(
        "x",
        "egress-typed",
        "podSelector: {matchLabels: {pod: a}}\npolicyTypes: [Egress]\ningress:\n- from: [{podSelector: {matchLabels: {pod: b}}}]",
    );
    let s = c.compile();
    assert_eq!(matrix(&s, TCP, 80), expect(|from, _| from != "x/a"));
    // No policyTypes, no egress: ingress only.
    let mut c = Cluster::new();
    c.policy("x", "plain", "podSelector: {matchLabels: {pod: a}}");
    let s = c.compile();
    assert_eq!(matrix(&s, TCP, 80), expect(|_, to| to != "x/a"));
}

#[test]
fn egress_isolation_and_deny_all_egress() {
    let mut c = Cluster::new();
    c.policy("y", "deny-egress", "podSelector: {}\npolicyTypes: [Egress]");
    let s = c.compile();
    assert_eq!(matrix(&s, TCP, 80), expect(|from, _| ns(from) != "y"));
    assert!(!s.trace(ip("y/a"), EXTERNAL, UDP, 53).allowed);
    let t = s.trace(ip("y/a"), ip("x/a"), TCP, 80);
    assert!(!t.egress.as_ref().unwrap().allowed);
    assert!(t.ingress.as_ref().unwrap().allowed);
    assert!(t.text.contains("y/deny-egress"), "{}", t.text);
}

#[test]
fn ingress_and_egress_both_must_allow() {
    let mut c = Cluster::new();
    c.policy(
        "x",
        "a-out-to-b",
        "podSelector: {matchLabels: {pod: a}}\npolicyTypes: [Egress]\negress:\n- to: [{podSelector: {matchLabels: {pod: b}}}]",
    );
    c.policy(
        "x",
        "b-in-from-c",
        "podSelector: {matchLabels: {pod: b}}\ningress:\n- from: [{podSelector: {matchLabels: {pod: c}}}]",
    );
    let s = c.compile();
    assert!(!reach(&s, "x/a", "x/b", TCP, 80), "b's ingress denies a");
    assert!(reach(&s, "x/c", "x/b", TCP, 80));
    assert!(!reach(&s, "x/a", "x/c", TCP, 80), "a's egress only to b");
}

#[test]
fn policies_only_select_pods_in_their_namespace() {
    let mut c = Cluster::new();
    c.policy(
        "y",
        "deny-all",
        "podSelector: {}\npolicyTypes: [Ingress, Egress]",
    );
    let s = c.compile();
    assert_eq!(
        matrix(&s, TCP, 80),
        expect(|from, to| ns(from) != "y" && ns(to) != "y")
    );
}

#[test]
fn ip_block_with_except_matches_pods_nodes_and_the_world() {
    let mut c = Cluster::new();
    c.policy(
        "x",
        "cidr",
        "podSelector: {matchLabels: {pod: a}}
ingress:
- from: [{ipBlock: {cidr: 10.244.0.0/16, except: [10.244.2.0/24]}}]
- from: [{ipBlock: {cidr: 10.244.2.2/32}}]
  ports: [{port: 81}]
- from: [{ipBlock: {cidr: 192.168.0.0/16}}]
  ports: [{port: 80}]
- from: [{ipBlock: {cidr: 10.0.0.2/32}}]",
    );
    let s = c.compile();
    assert_eq!(
        matrix(&s, TCP, 80),
        expect(|from, to| to != "x/a" || ns(from) != "y")
    );
    assert!(
        reach(&s, "y/b", "x/a", TCP, 81),
        "second rule: y/b (10.244.2.2) on 81"
    );
    assert!(!reach(&s, "y/a", "x/a", TCP, 81));
    assert!(s.trace(EXTERNAL, ip("x/a"), TCP, 80).allowed);
    assert!(!s.trace(EXTERNAL, ip("x/a"), TCP, 81).allowed);
    assert!(
        s.trace(NODE2, ip("x/a"), TCP, 81).allowed,
        "a node IP by ipBlock"
    );
    // Egress to an external block.
    c.policy(
        "x",
        "egress-cidr",
        "podSelector: {matchLabels: {pod: b}}\npolicyTypes: [Egress]\negress:\n- to: [{ipBlock: {cidr: 192.168.0.0/16, except: [192.168.7.0/24]}}]",
    );
    let s = c.compile();
    assert!(
        s.trace(ip("x/b"), Ipv4Addr::new(192, 168, 1, 1), TCP, 443)
            .allowed
    );
    assert!(!s.trace(ip("x/b"), EXTERNAL, TCP, 443).allowed);
    assert!(!reach(&s, "x/b", "x/c", TCP, 80));
}

#[test]
fn overlapping_ip_blocks_across_rules() {
    // One rule's except must not hide another rule's broader block.
    let mut c = Cluster::new();
    c.policy(
        "x",
        "overlap",
        "podSelector: {}
ingress:
- from: [{ipBlock: {cidr: 10.244.0.0/16, except: [10.244.2.0/24, 10.244.3.0/24]}}]
  ports: [{port: 80}]
- from: [{ipBlock: {cidr: 10.244.2.0/23, except: [10.244.2.2/32]}}]
  ports: [{port: 80}, {port: 81}]",
    );
    let s = c.compile();
    assert!(reach(&s, "y/a", "x/a", TCP, 80));
    assert!(reach(&s, "y/a", "x/a", TCP, 81));
    assert!(!reach(&s, "y/b", "x/a", TCP, 80), "excepted by both rules");
    assert!(reach(&s, "z/a", "x/a", TCP, 81));
    assert!(reach(&s, "x/b", "x/a", TCP, 80));
    assert!(!reach(&s, "x/b", "x/a", TCP, 81));
}

#[test]
fn updates_relabel_move_and_delete() {
    let mut c = Cluster::new();
    c.policy(
        "x",
        "a-from-b",
        "podSelector: {matchLabels: {pod: a}}\ningress:\n- from: [{podSelector: {matchLabels: {pod: b}}}, {namespaceSelector: {matchLabels: {team: blue}}}]",
    );
    let s1 = c.compile();
    let xb = s1.endpoints[&ip("x/b")].identity;
    assert!(reach(&s1, "x/b", "x/a", TCP, 80));
    assert!(!reach(&s1, "z/c", "x/a", TCP, 80));
    // Pod label changed: it no longer matches.
    let i = c
        .pods
        .iter()
        .position(|p| {
            p.metadata.namespace.as_deref() == Some("x") && p.metadata.name.as_deref() == Some("b")
        })
        .unwrap();
    c.pods[i].metadata.labels = Some([("pod".to_string(), "zz".to_string())].into());
    // Namespace label added: z now matches.
    c.namespaces[2]
        .metadata
        .labels
        .get_or_insert_default()
        .insert("team".into(), "blue".into());
    let s2 = c.compile();
    assert!(!reach(&s2, "x/b", "x/a", TCP, 80));
    assert!(reach(&s2, "z/c", "x/a", TCP, 80));
    assert_ne!(s2.endpoints[&ip("x/b")].identity, xb);
    assert_eq!(
        s2.endpoints[&ip("x/c")].identity,
        s1.endpoints[&ip("x/c")].identity,
        "unchanged pods keep their identity"
    );
    // Policy changed, then deleted.
    c.policy("x", "a-from-b", "podSelector: {matchLabels: {pod: a}}\ningress:\n- from: [{podSelector: {matchLabels: {pod: c}}}]");
    let s3 = c.compile();
    assert!(reach(&s3, "x/c", "x/a", TCP, 80));
    assert!(!reach(&s3, "z/c", "x/a", TCP, 80));
    c.policies.clear();
    let s4 = c.compile();
    assert_eq!(matrix(&s4, TCP, 80), expect(|_, _| true));
    // Pod gone: its address is the world now.
    c.policy("x", "a-from-c", "podSelector: {matchLabels: {pod: a}}\ningress:\n- from: [{podSelector: {matchLabels: {pod: c}}}]");
    c.pods.retain(|p| {
        !(p.metadata.namespace.as_deref() == Some("x") && p.metadata.name.as_deref() == Some("c"))
    });
    let s5 = c.compile();
    assert_eq!(s5.identity_of(ip("x/c"), "n1"), Identity::WORLD);
    assert!(!s5.trace(ip("x/c"), ip("x/a"), TCP, 80).allowed);
}

#[test]
fn identities_are_shared_and_bounded() {
    let mut c = Cluster::new();
    // 50 more pods labelled like x/a share its identity.
    for i in 0..50 {
        let addr = Ipv4Addr::new(10, 244, 9, i + 1);
        c.pods
            .push(pod_at("x", &format!("a{i}"), "{pod: a}", 80, addr));
    }
    let s = c.compile();
    assert_eq!(s.identities.len(), 10, "9 label sets in 3 namespaces + x/d");
    let xa = s.endpoints[&ip("x/a")].identity;
    assert_eq!(s.endpoints[&"10.244.9.7".parse().unwrap()].identity, xa);
    assert_ne!(
        s.endpoints[&ip("y/a")].identity,
        xa,
        "same labels, other namespace"
    );
    assert!(s.identities.keys().all(|i| !i.is_reserved()));
}

#[test]
fn a_policy_that_cannot_compile_is_rejected_and_others_stay() {
    let mut c = Cluster::new();
    c.policy("x", "good", "podSelector: {}\npolicyTypes: [Ingress]");
    c.policy(
        "x",
        "bad",
        "podSelector: {}\ningress:\n- from: [{podSelector: {matchExpressions: [{key: pod, operator: Like, values: [a]}]}}]",
    );
    c.policy(
        "y",
        "bad-cidr",
        "podSelector: {}\ningress:\n- from: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}]",
    );
    let s = c.compile();
    assert_eq!(s.rejected.len(), 2);
    assert_eq!(
        s.rejected[0].field,
        "spec.ingress[0].from[0].podSelector.matchExpressions[0]"
    );
    assert_eq!(
        s.rejected[1].field,
        "spec.ingress[0].from[0].ipBlock.except[0]"
    );
    assert!(s.rejected[1].to_string().contains("y/bad-cidr"));
    assert_eq!(matrix(&s, TCP, 80), expect(|_, to| ns(to) != "x"));
}
