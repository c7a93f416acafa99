//! Random policies (selectors, overlapping ipBlocks with excepts, port ranges, named ports,
//! policy types): the lowered BPF map entries must give the compiler's verdict for every
//! endpoint, direction, peer, protocol and port tried.

use std::net::Ipv4Addr;

mod random_policy;

use ferrum_policy::compile::{Direction, Reason};
use ferrum_policy::{IdentityAllocator, Inputs, PolicyState};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use proptest::prelude::*;

use random_policy::yaml;

fn cluster() -> (Vec<Namespace>, Vec<Pod>, Vec<Node>) {
    let namespaces = ["x", "y"]
        .iter()
        .map(|n| yaml(&format!("metadata: {{name: {n}, labels: {{ns: {n}}}}}")))
        .collect();
    let mut pods = Vec::new();
    for (i, ns) in ["x", "y"].iter().enumerate() {
        for (j, p) in ["a", "b", "c"].iter().enumerate() {
            let web = if j == 2 { 8080 } else { 80 };
            pods.push(yaml(&format!(
                "metadata: {{name: {p}, namespace: {ns}, labels: {{pod: {p}}}}}
spec:
  nodeName: n{}
  containers: [{{name: c, ports: [{{name: web, containerPort: {web}}}, {{name: dns, containerPort: 53, protocol: UDP}}]}}]
status: {{podIP: 10.244.{}.{}}}",
                j % 2,
                i + 1,
                j + 1
            )));
        }
    }
    (namespaces, pods, random_policy::nodes())
}

fn cidr() -> impl Strategy<Value = (String, Vec<String>)> {
    (
        0u8..4,
        0u8..8,
        14u8..31,
        prop::collection::vec((0u8..8, 1u8..3), 0..3),
    )
        .prop_map(|(b2, b3, len, excepts)| {
            let base = u32::from(Ipv4Addr::new(10, 244, b2, b3 * 2));
            let mask = u32::MAX << (32 - len);
            let net = base & mask;
            let ex = excepts
                .into_iter()
                .map(|(off, extra)| {
                    let el = (len + extra).min(32);
                    let size = 1u64 << (32 - len);
                    let addr = net + ((off as u64 * 7919) % size) as u32;
                    let em = if el == 32 {
                        u32::MAX
                    } else {
                        u32::MAX << (32 - el)
                    };
                    format!("{}/{el}", Ipv4Addr::from(addr & em))
                })
                .collect();
            (format!("{}/{len}", Ipv4Addr::from(net)), ex)
        })
}

fn peer() -> BoxedStrategy<String> {
    prop_oneof![
        prop::sample::select(vec!["a", "b", "c"]).prop_map(|p| format!("{{podSelector: {{matchLabels: {{pod: {p}}}}}}}")),
        prop::sample::select(vec!["x", "y"]).prop_map(|n| format!("{{namespaceSelector: {{matchLabels: {{ns: {n}}}}}}}")),
        (prop::sample::select(vec!["x", "y"]), prop::sample::select(vec!["a", "b"])).prop_map(|(n, p)| format!(
            "{{namespaceSelector: {{matchLabels: {{ns: {n}}}}}, podSelector: {{matchExpressions: [{{key: pod, operator: NotIn, values: [{p}]}}]}}}}"
        )),
        cidr().prop_map(|(c, ex)| format!("{{ipBlock: {{cidr: {c}, except: [{}]}}}}", ex.join(", "))),
    ]
    .boxed()
}

fn policy() -> impl Strategy<Value = String> {
    random_policy::policy(
        vec!["x", "y"],
        vec![
            "{}",
            "{matchLabels: {pod: a}}",
            "{matchExpressions: [{key: pod, operator: In, values: [b, c]}]}",
        ],
        peer,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn lowered_maps_agree_with_the_compiler(policies in prop::collection::vec(policy(), 1..4)) {
        let (namespaces, pods, nodes) = cluster();
        let policies: Vec<NetworkPolicy> = policies
            .iter()
            .enumerate()
            .map(|(i, p)| yaml(&p.replace("metadata: {", &format!("metadata: {{name: p{i}, "))))
            .collect();
        let state = PolicyState::compile(
            Inputs { namespaces: &namespaces, pods: &pods, policies: &policies, nodes: &nodes },
            &mut IdentityAllocator::new(),
        );
        prop_assert!(state.rejected.is_empty(), "{:?}", state.rejected);
        let mut peers: Vec<Ipv4Addr> = state.endpoints.keys().copied().collect();
        peers.extend(["10.0.0.1", "10.0.0.2", "192.168.1.1"].map(|s| s.parse::<Ipv4Addr>().unwrap()));
        for b2 in 0..4u8 {
            for b4 in [0u8, 1, 2, 3, 5, 9, 17, 200] {
                peers.push(Ipv4Addr::new(10, 244, b2, b4));
                peers.push(Ipv4Addr::new(10, 244, b2 + 1, b4.wrapping_add(128)));
            }
        }
        for node in ["n0", "n1"] {
            let maps = state.lower(node);
            for ep in state.endpoints.values().filter(|e| e.node == node) {
                for dir in [Direction::Ingress, Direction::Egress] {
                    for peer in &peers {
                        for (proto, port) in [(6u8, 79u16), (6, 80), (6, 82), (6, 8080), (17, 53), (17, 81), (132, 80), (1, 0)] {
                            let want = state.decide(ep, dir, *peer, proto, port);
                            let got = maps.lookup(ep.ip, dir, *peer, proto, port);
                            prop_assert_eq!(got.allowed, want.allowed,
                                "{}/{} {:?} peer {} {}/{}: {:?} vs {:?}", ep.namespace, ep.name, dir, peer, proto, port, got, want);
                            if let Reason::Allowed { .. } = want.reason {
                                let id = state.identity_of(*peer, node);
                                prop_assert!(ep.direction(dir).allowing_rules(*peer, id, proto, port).contains(&got.rule));
                            }
                        }
                    }
                }
            }
        }
    }
}
