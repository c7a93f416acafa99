//! Compile time of the policy compiler: 1,000 policies over 10,000 pods (issue 4, item 6).
//!
//!     cargo run --release -p ferrum-policy --example compile_bench
//!
//! 100 namespaces × 100 pods; 20 label sets per namespace (so 2,000 identities), 10 nodes.
//! Each namespace has 10 policies: selecting one app, allowing from an app in the same
//! namespace, from a team of namespaces (AND), from an ipBlock with an except, on numeric,
//! named and endPort ports. Prints the median of 5 runs for compile and for lowering every
//! node's maps, and the map sizes.

use std::time::{Duration, Instant};

use ferrum_policy::{IdentityAllocator, Inputs, PolicyState};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;

fn yaml<T: serde::de::DeserializeOwned>(s: &str) -> T {
    serde_yaml::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

fn main() {
    let (n_ns, pods_per_ns, apps, nodes) = (100usize, 100usize, 20usize, 10usize);
    let namespaces: Vec<Namespace> = (0..n_ns)
        .map(|n| {
            yaml(&format!(
                "metadata: {{name: ns{n}, labels: {{team: t{}}}}}",
                n % 10
            ))
        })
        .collect();
    let mut pods: Vec<Pod> = Vec::new();
    for n in 0..n_ns {
        for p in 0..pods_per_ns {
            let i = n * pods_per_ns + p;
            pods.push(yaml(&format!(
                "metadata: {{name: p{p}, namespace: ns{n}, labels: {{app: app{}, tier: t{}}}}}
spec:
  nodeName: node{}
  containers: [{{name: c, ports: [{{name: http, containerPort: 8080}}]}}]
status: {{podIP: 10.{}.{}.{}}}",
                p % apps,
                p % 2,
                i % nodes,
                100 + i / 65536,
                (i / 256) % 256,
                i % 256
            )));
        }
    }
    let node_objs: Vec<Node> = (0..nodes)
        .map(|n| {
            yaml(&format!(
                "metadata: {{name: node{n}}}\nstatus: {{addresses: [{{type: InternalIP, address: 192.0.2.{}}}]}}",
                n + 1
            ))
        })
        .collect();
    let mut policies: Vec<NetworkPolicy> = Vec::new();
    for n in 0..n_ns {
        for k in 0..10 {
            policies.push(yaml(&format!(
                "metadata: {{name: pol{k}, namespace: ns{n}}}
spec:
  podSelector: {{matchLabels: {{app: app{}}}}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - podSelector: {{matchLabels: {{app: app{}}}}}
    - namespaceSelector: {{matchLabels: {{team: t{}}}}}
      podSelector: {{matchExpressions: [{{key: tier, operator: In, values: [t0]}}]}}
    ports: [{{port: 80}}, {{port: http}}, {{port: 9000, endPort: 9100}}]
  - from: [{{ipBlock: {{cidr: 172.16.0.0/12, except: [172.16.{k}.0/24]}}}}]
  egress:
  - to: [{{podSelector: {{}}}}]
    ports: [{{port: http}}, {{protocol: UDP, port: 53}}]",
                (k * 2) % apps,
                (k * 2 + 1) % apps,
                k
            )));
        }
    }
    let inputs = Inputs {
        namespaces: &namespaces,
        pods: &pods,
        policies: &policies,
        nodes: &node_objs,
    };
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let mut compile_t = Vec::new();
    let mut lower_t = Vec::new();
    let mut state = PolicyState::default();
    for _ in 0..5 {
        let mut alloc = IdentityAllocator::new();
        let t = Instant::now();
        state = PolicyState::compile(inputs, &mut alloc);
        compile_t.push(t.elapsed());
        let t = Instant::now();
        let sizes: Vec<usize> = (0..nodes)
            .map(|n| state.lower(&format!("node{n}")).policy.len())
            .collect();
        lower_t.push(t.elapsed());
        std::hint::black_box(sizes);
    }
    assert!(state.rejected.is_empty(), "{:?}", state.rejected);
    let maps = state.lower("node0");
    let grants: usize = state
        .endpoints
        .values()
        .map(|e| e.ingress.grants.len() + e.egress.grants.len())
        .sum();
    println!(
        "pods {} policies {} identities {} rules {} grants {}",
        pods.len(),
        policies.len(),
        state.identities.len(),
        state.rules.len(),
        grants
    );
    println!("compile (median of 5): {:?}", median(compile_t));
    println!(
        "lower all {nodes} nodes (median of 5): {:?}",
        median(lower_t)
    );
    println!(
        "node0 maps: ipcache {} endpoints {} cidr classes {} policy {}",
        maps.ipcache.len(),
        maps.endpoints.len(),
        maps.cidr_classes.len(),
        maps.policy.len()
    );
}
