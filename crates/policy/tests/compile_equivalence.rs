//! The optimized compiler (identities indexed by namespace, policies by namespace, one compiled
//! direction shared by the pods with the same identity and named ports) against the
//! straightforward one it replaced (`reference`): on random clusters and policies, every field
//! of the compiled state must be the same, and so must the rejected policies.

mod random_policy;
mod reference;

use ferrum_policy::{IdentityAllocator, Inputs, PolicyState, RuleAllocator};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use proptest::prelude::*;

use random_policy::yaml;

/// (namespace index, pod label, tier, node, named ports variant, address variant)
type PodSpec = (usize, &'static str, u8, u8, u8, u8);

fn pod_spec() -> impl Strategy<Value = PodSpec> {
    (
        0usize..3,
        prop::sample::select(vec!["a", "b", "c"]),
        0u8..3,
        0u8..2,
        0u8..4,
        0u8..6,
    )
}

fn cluster(team_y: &str, specs: &[PodSpec]) -> (Vec<Namespace>, Vec<Pod>, Vec<Node>) {
    // z has pods but no Namespace object (it gets only the name label).
    let namespaces = vec![
        yaml("metadata: {name: x, labels: {ns: x, team: t1}}"),
        yaml(&format!(
            "metadata: {{name: y, labels: {{ns: y, team: {team_y}}}}}"
        )),
    ];
    let mut pods = Vec::new();
    for (i, (ns, p, tier, node, ports, addr)) in specs.iter().enumerate() {
        let ns = ["x", "y", "z"][*ns];
        let tier = match tier {
            0 => String::new(),
            t => format!(", tier: t{t}"),
        };
        let ports = match ports {
            0 => "[]",
            1 => "[{name: web, containerPort: 80}, {name: dns, containerPort: 53, protocol: UDP}]",
            2 => "[{name: web, containerPort: 8080}]",
            _ => "[{name: web, containerPort: 81, protocol: SCTP}, {containerPort: 9}]",
        };
        let (host, status) = match addr {
            0 => ("", String::new()),
            1 => (
                "hostNetwork: true, ",
                format!("status: {{podIP: 10.0.0.{}}}", node + 1),
            ),
            _ => ("", format!("status: {{podIP: 10.244.{}.{}}}", i % 3, i + 1)),
        };
        pods.push(yaml(&format!(
            "metadata: {{name: p{i}, namespace: {ns}, labels: {{pod: {p}{tier}}}}}
spec: {{nodeName: n{node}, {host}containers: [{{name: c, ports: {ports}}}]}}
{status}"
        )));
    }
    (namespaces, pods, random_policy::nodes())
}

fn peer() -> BoxedStrategy<String> {
    prop_oneof![
        prop::sample::select(vec!["a", "b", "c"])
            .prop_map(|p| format!("{{podSelector: {{matchLabels: {{pod: {p}}}}}}}")),
        Just("{podSelector: {}}".to_string()),
        prop::sample::select(vec!["{}", "{matchLabels: {team: t1}}", "{matchLabels: {ns: z}}"])
            .prop_map(|n| format!("{{namespaceSelector: {n}}}")),
        (
            prop::sample::select(vec!["{}", "{matchLabels: {team: t2}}", "{matchLabels: {kubernetes.io/metadata.name: z}}"]),
            prop::sample::select(vec!["a", "b"]),
        )
            .prop_map(|(n, p)| format!(
                "{{namespaceSelector: {n}, podSelector: {{matchExpressions: [{{key: pod, operator: NotIn, values: [{p}]}}, {{key: tier, operator: Exists}}]}}}}"
            )),
        (0u8..3, 16u8..30).prop_map(|(b, len)| format!(
            "{{ipBlock: {{cidr: 10.244.{b}.0/{len}, except: [10.244.{b}.0/31]}}}}"
        )),
        Just("{ipBlock: {cidr: 10.244.0.0/33}}".to_string()),
    ]
    .boxed()
}

fn policy() -> impl Strategy<Value = String> {
    random_policy::policy(
        vec!["x", "y", "z"],
        vec![
            "{}",
            "{matchLabels: {pod: a}}",
            "{matchExpressions: [{key: pod, operator: In, values: [b, c]}]}",
            "{matchExpressions: [{key: tier, operator: DoesNotExist}]}",
        ],
        peer,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]
    #[test]
    fn optimized_compile_equals_the_reference(
        team_y in prop::sample::select(vec!["t1", "t2"]),
        pods in prop::collection::vec(pod_spec(), 0..14),
        policies in prop::collection::vec(policy(), 0..6),
    ) {
        let (namespaces, pods, nodes) = cluster(team_y, &pods);
        // Names out of order, so sorting by name is exercised.
        let policies: Vec<NetworkPolicy> = policies
            .iter()
            .enumerate()
            .map(|(i, p)| yaml(&p.replace("metadata: {", &format!("metadata: {{name: p{}, ", 9 - i))))
            .collect();
        let got = PolicyState::compile(
            Inputs { namespaces: &namespaces, pods: &pods, policies: &policies, nodes: &nodes },
            &mut IdentityAllocator::new(),
        );
        let want = reference::PolicyState::compile(
            reference::Inputs { namespaces: &namespaces, pods: &pods, policies: &policies, nodes: &nodes },
            &mut IdentityAllocator::new(),
        );
        // The reference numbers rules 1.. in policy name order (a list); a fresh allocator must
        // hand out the same numbers.
        let mut want_json = serde_json::to_value(&want).expect("serializable");
        let numbered: serde_json::Map<String, serde_json::Value> = want
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| ((i + 1).to_string(), serde_json::to_value(r).expect("serializable")))
            .collect();
        want_json["rules"] = numbered.into();
        prop_assert_eq!(serde_json::to_value(&got).expect("serializable"), want_json);
        let got_rejected: Vec<String> = got.rejected.iter().map(|e| e.to_string()).collect();
        let want_rejected: Vec<String> = want.rejected.iter().map(|e| e.to_string()).collect();
        prop_assert_eq!(got_rejected, want_rejected);
        // Borrowed objects compile the same as slices.
        let borrowed = PolicyState::compile_objects(&namespaces, &pods, &policies, &nodes, &mut IdentityAllocator::new(), &mut RuleAllocator::new());
        prop_assert_eq!(serde_json::to_value(&borrowed).expect("serializable"), serde_json::to_value(&got).expect("serializable"));
        // Every pod with its own address is an endpoint (host-network pods are not).
        let pod_ips = got.pod_identities.keys().filter(|ip| ip.octets()[..2] == [10, 244]).count();
        prop_assert_eq!(pod_ips, got.endpoints.len());
    }
}
