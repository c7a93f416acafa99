//! Random NetworkPolicies and the pieces of clusters shared by the policy property tests. Each
//! test brings its own peers (what its compiler or lowering must cope with) and namespaces.

use k8s_openapi::api::core::v1::Node;
use proptest::prelude::*;

pub fn yaml<T: serde::de::DeserializeOwned>(s: &str) -> T {
    serde_yaml::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

/// Nodes n0 and n1 at 10.0.0.1 and 10.0.0.2.
pub fn nodes() -> Vec<Node> {
    (0..2)
        .map(|n| {
            yaml(&format!(
                "metadata: {{name: n{n}}}\nstatus: {{addresses: [{{type: InternalIP, address: 10.0.0.{}}}]}}",
                n + 1
            ))
        })
        .collect()
}

/// Port numbers, endPort ranges, named ports (one no pod declares, one under another
/// protocol than the pods declare it) and whole protocols.
fn port() -> impl Strategy<Value = String> {
    prop_oneof![
        (79u16..83, prop::sample::select(vec!["TCP", "UDP", "SCTP"]))
            .prop_map(|(p, pr)| format!("{{port: {p}, protocol: {pr}}}")),
        (79u16..83, 0u16..4).prop_map(|(p, e)| format!("{{port: {p}, endPort: {}}}", p + e)),
        prop::sample::select(vec!["web", "dns", "nope"]).prop_map(|n| {
            let proto = if n == "dns" { "UDP" } else { "TCP" };
            format!("{{port: {n}, protocol: {proto}}}")
        }),
        Just("{port: web, protocol: SCTP}".to_string()),
        Just("{protocol: UDP}".to_string()),
    ]
}

/// One ingress (`key` = "from") or egress ("to") rule: optional peers, optional ports.
fn rule(key: &'static str, peer: fn() -> BoxedStrategy<String>) -> impl Strategy<Value = String> {
    (
        prop::option::of(prop::collection::vec(peer(), 1..3)),
        prop::option::of(prop::collection::vec(port(), 1..3)),
    )
        .prop_map(move |(peers, ports)| {
            let mut r = String::from("{");
            if let Some(p) = peers {
                r += &format!("{key}: [{}], ", p.join(", "));
            }
            if let Some(p) = ports {
                r += &format!("ports: [{}]", p.join(", "));
            }
            r + "}"
        })
}

/// A policy (without a name: the tests number them) in one of `namespaces`, selecting pods by
/// one of `selectors`, with any policyTypes and up to two rules each way built from `peer`.
pub fn policy(
    namespaces: Vec<&'static str>,
    selectors: Vec<&'static str>,
    peer: fn() -> BoxedStrategy<String>,
) -> impl Strategy<Value = String> {
    (
        prop::sample::select(namespaces),
        prop::sample::select(selectors),
        prop::sample::select(vec![
            "",
            "policyTypes: [Ingress]",
            "policyTypes: [Egress]",
            "policyTypes: [Ingress, Egress]",
        ]),
        prop::collection::vec(rule("from", peer), 0..3),
        prop::collection::vec(rule("to", peer), 0..3),
    )
        .prop_map(|(ns, sel, types, ing, eg)| {
            format!(
                "metadata: {{namespace: {ns}}}\nspec:\n  podSelector: {sel}\n  {types}\n  ingress: [{}]\n  egress: [{}]\n",
                ing.join(", "),
                eg.join(", ")
            )
        })
}
