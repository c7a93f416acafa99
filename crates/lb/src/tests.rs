use super::*;
use crate::alloc::IdAllocator;
use serde_json::json;

fn service(v: serde_json::Value) -> Service {
    serde_json::from_value(v).expect("test Service")
}

fn slice(v: serde_json::Value) -> EndpointSlice {
    serde_json::from_value(v).expect("test EndpointSlice")
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn be(s: &str, port: u16) -> Backend {
    Backend { addr: ip(s), port }
}

/// An endpoint: (address, node, ready, serving, terminating).
fn ep(addr: &str, node: &str, ready: bool, serving: bool, terminating: bool) -> serde_json::Value {
    json!({"addresses": [addr], "nodeName": node,
           "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
}

fn web_service(extra_spec: serde_json::Value) -> Service {
    let mut spec = json!({
        "clusterIP": "10.0.0.20",
        "selector": {"app": "web"},
        "ports": [{"name": "http", "port": 80, "targetPort": "web"}]
    });
    for (k, v) in extra_spec.as_object().unwrap() {
        spec[k] = v.clone();
    }
    service(json!({"metadata": {"name": "web", "namespace": "shop"}, "spec": spec}))
}

fn web_slice(endpoints: Vec<serde_json::Value>) -> EndpointSlice {
    slice(json!({
        "metadata": {"name": "web-1", "namespace": "shop",
                     "labels": {SERVICE_NAME_LABEL: "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints
    }))
}

fn cluster<'a>(services: &'a [Service], slices: &'a [EndpointSlice]) -> Cluster<'a> {
    Cluster {
        services: services.iter().collect(),
        slices: slices.iter().collect(),
        node_name: "node-0".into(),
        node_ip: Some(ip("10.224.0.4")),
        node_ips: vec![ip("10.224.0.4"), ip("10.224.0.5")],
        default_algorithm: Algorithm::Random,
    }
}

fn key(addr: &str, port: u16, proto: Protocol, scope: Scope) -> FrontendKey {
    FrontendKey {
        addr: ip(addr),
        port,
        proto,
        scope,
    }
}

fn backends_of(c: &Compiled, k: FrontendKey) -> Vec<Backend> {
    c.frontends
        .get(&k)
        .unwrap_or_else(|| panic!("no frontend {k}: {:?}", c.frontends.keys()))
        .backends
        .clone()
}

#[test]
fn cluster_ip_gets_ready_backends_with_the_slice_port() {
    let svcs = [web_service(json!({}))];
    let slices = [web_slice(vec![
        ep("10.244.0.5", "node-0", true, true, false),
        ep("10.244.1.6", "node-1", true, true, false),
        ep("10.244.1.7", "node-1", false, false, false),
    ])];
    let c = compile(&cluster(&svcs, &slices));
    let k = key("10.0.0.20", 80, Protocol::Tcp, Scope::Internal);
    assert_eq!(
        backends_of(&c, k),
        vec![be("10.244.0.5", 8080), be("10.244.1.6", 8080)]
    );
    assert_eq!(
        c.frontends.len(),
        1,
        "a ClusterIP Service has no external frontends"
    );
    assert_eq!(c.frontends[&k].service, "shop/web:http");
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

/// kube-proxy's endpoint selection, as documented for internalTrafficPolicy,
/// externalTrafficPolicy and terminating endpoints (KEP-1669, KEP-2086): every combination of
/// policy and where the ready/terminating endpoints are.
#[test]
fn endpoint_selection_table() {
    // (policy Local?, endpoints, expected backends from node-0)
    type Row = (
        &'static str,
        bool,
        Vec<serde_json::Value>,
        Vec<&'static str>,
    );
    let rows: Vec<Row> = vec![
        (
            "Cluster: every ready endpoint, local or remote",
            false,
            vec![
                ep("10.244.0.5", "node-0", true, true, false),
                ep("10.244.1.6", "node-1", true, true, false),
            ],
            vec!["10.244.0.5", "10.244.1.6"],
        ),
        (
            "Cluster: terminating endpoints are not used while any endpoint is ready",
            false,
            vec![
                ep("10.244.0.5", "node-0", false, true, true),
                ep("10.244.1.6", "node-1", true, true, false),
            ],
            vec!["10.244.1.6"],
        ),
        (
            "Cluster: no ready endpoint, serving terminating ones take over",
            false,
            vec![
                ep("10.244.0.5", "node-0", false, true, true),
                ep("10.244.1.6", "node-1", false, false, true),
                ep("10.244.1.7", "node-1", false, false, false),
            ],
            vec!["10.244.0.5"],
        ),
        (
            "Cluster: nothing ready or serving means no backend",
            false,
            vec![ep("10.244.1.6", "node-1", false, false, true)],
            vec![],
        ),
        (
            "Local: only ready endpoints on this node",
            true,
            vec![
                ep("10.244.0.5", "node-0", true, true, false),
                ep("10.244.1.6", "node-1", true, true, false),
            ],
            vec!["10.244.0.5"],
        ),
        (
            "Local: only remote endpoints means no backend (no fallback to remote)",
            true,
            vec![ep("10.244.1.6", "node-1", true, true, false)],
            vec![],
        ),
        (
            "Local: a local terminating endpoint serves when no local endpoint is ready, even \
             though a remote one is ready",
            true,
            vec![
                ep("10.244.0.5", "node-0", false, true, true),
                ep("10.244.1.6", "node-1", true, true, false),
            ],
            vec!["10.244.0.5"],
        ),
        (
            "Local: local ready wins over local terminating",
            true,
            vec![
                ep("10.244.0.5", "node-0", false, true, true),
                ep("10.244.0.8", "node-0", true, true, false),
            ],
            vec!["10.244.0.8"],
        ),
        (
            "Local: a local endpoint that is terminating and not serving is never used",
            true,
            vec![ep("10.244.0.5", "node-0", false, false, true)],
            vec![],
        ),
    ];
    for (what, local, endpoints, want) in rows {
        let slices = [web_slice(endpoints)];
        let want: Vec<Backend> = want.iter().map(|a| be(a, 8080)).collect();
        // internalTrafficPolicy decides the ClusterIP frontend.
        let itp = if local { "Local" } else { "Cluster" };
        let svcs = [web_service(json!({"internalTrafficPolicy": itp}))];
        let c = compile(&cluster(&svcs, &slices));
        let internal = key("10.0.0.20", 80, Protocol::Tcp, Scope::Internal);
        assert_eq!(
            backends_of(&c, internal),
            want,
            "internalTrafficPolicy: {what}"
        );
        // externalTrafficPolicy decides the external frontends, and masquerading.
        let etp = if local { "Local" } else { "Cluster" };
        let svcs = [web_service(json!({
            "type": "NodePort", "externalTrafficPolicy": etp,
            "ports": [{"name": "http", "port": 80, "targetPort": "web", "nodePort": 30080}]
        }))];
        let c = compile(&cluster(&svcs, &slices));
        let external = key("10.224.0.4", 30080, Protocol::Tcp, Scope::External);
        assert_eq!(
            backends_of(&c, external),
            want,
            "externalTrafficPolicy: {what}"
        );
        assert_eq!(c.frontends[&external].masquerade, !local, "{what}");
    }
}

#[test]
fn external_policy_local_does_not_narrow_the_cluster_ip() {
    let svcs = [web_service(json!({
        "type": "NodePort", "externalTrafficPolicy": "Local",
        "ports": [{"name": "http", "port": 80, "nodePort": 30080}]
    }))];
    let slices = [web_slice(vec![
        ep("10.244.0.5", "node-0", true, true, false),
        ep("10.244.1.6", "node-1", true, true, false),
    ])];
    let c = compile(&cluster(&svcs, &slices));
    let both = vec![be("10.244.0.5", 8080), be("10.244.1.6", 8080)];
    assert_eq!(
        backends_of(&c, key("10.0.0.20", 80, Protocol::Tcp, Scope::Internal)),
        both
    );
    // Pods reaching the node port on any node go to every endpoint (kube-proxy short-circuit).
    for node in ["10.224.0.4", "10.224.0.5"] {
        assert_eq!(
            backends_of(&c, key(node, 30080, Protocol::Tcp, Scope::Internal)),
            both
        );
    }
    // From outside, only this node's external frontend exists.
    assert!(
        !c.frontends
            .contains_key(&key("10.224.0.5", 30080, Protocol::Tcp, Scope::External))
    );
    assert_eq!(
        backends_of(&c, key("10.224.0.4", 30080, Protocol::Tcp, Scope::External)),
        vec![be("10.244.0.5", 8080)]
    );
}

#[test]
fn same_port_different_protocols_are_separate_frontends() {
    let tcp = service(json!({"metadata": {"name": "a", "namespace": "default"},
        "spec": {"clusterIP": "10.0.0.30", "ports": [{"port": 53, "protocol": "TCP"}]}}));
    let udp = service(json!({"metadata": {"name": "b", "namespace": "default"},
        "spec": {"clusterIP": "10.0.0.30", "ports": [{"port": 53, "protocol": "UDP"}]}}));
    let s = |name: &str, proto: &str, addr: &str| {
        slice(
            json!({"metadata": {"name": format!("{name}-x"), "namespace": "default",
            "labels": {SERVICE_NAME_LABEL: name}},
            "addressType": "IPv4", "ports": [{"port": 5353, "protocol": proto}],
            "endpoints": [{"addresses": [addr]}]}),
        )
    };
    let svcs = [tcp, udp];
    let slices = [s("a", "TCP", "10.244.0.5"), s("b", "UDP", "10.244.0.6")];
    let c = compile(&cluster(&svcs, &slices));
    assert_eq!(
        backends_of(&c, key("10.0.0.30", 53, Protocol::Tcp, Scope::Internal)),
        vec![be("10.244.0.5", 5353)]
    );
    assert_eq!(
        backends_of(&c, key("10.0.0.30", 53, Protocol::Udp, Scope::Internal)),
        vec![be("10.244.0.6", 5353)]
    );
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

#[test]
fn named_target_ports_resolve_per_slice_so_pods_may_differ() {
    let svcs = [web_service(json!({}))];
    let mut a = web_slice(vec![ep("10.244.0.5", "node-0", true, true, false)]);
    let mut b = web_slice(vec![ep("10.244.1.6", "node-1", true, true, false)]);
    a.metadata.name = Some("web-a".into());
    b.metadata.name = Some("web-b".into());
    b.ports.as_mut().unwrap()[0].port = Some(9090);
    let slices = [a, b];
    let c = compile(&cluster(&svcs, &slices));
    assert_eq!(
        backends_of(&c, key("10.0.0.20", 80, Protocol::Tcp, Scope::Internal)),
        vec![be("10.244.0.5", 8080), be("10.244.1.6", 9090)]
    );
}

#[test]
fn multi_port_service_matches_slice_ports_by_name_and_protocol() {
    let svcs = [service(
        json!({"metadata": {"name": "web", "namespace": "shop"},
        "spec": {"clusterIP": "10.0.0.20", "ports": [
            {"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}]}}),
    )];
    let slices = [slice(
        json!({"metadata": {"name": "web-1", "namespace": "shop",
        "labels": {SERVICE_NAME_LABEL: "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"}],
        "endpoints": [{"addresses": ["10.244.0.5"]}]}),
    )];
    let c = compile(&cluster(&svcs, &slices));
    assert_eq!(
        backends_of(&c, key("10.0.0.20", 80, Protocol::Tcp, Scope::Internal)),
        vec![be("10.244.0.5", 8080)]
    );
    assert_eq!(
        backends_of(&c, key("10.0.0.20", 53, Protocol::Udp, Scope::Internal)),
        vec![be("10.244.0.5", 5353)]
    );
}

#[test]
fn slices_of_other_namespaces_or_services_are_ignored() {
    let svcs = [web_service(json!({}))];
    let mut other_ns = web_slice(vec![ep("10.244.0.9", "node-0", true, true, false)]);
    other_ns.metadata.namespace = Some("default".into());
    let slices = [other_ns];
    let c = compile(&cluster(&svcs, &slices));
    assert_eq!(
        backends_of(&c, key("10.0.0.20", 80, Protocol::Tcp, Scope::Internal)),
        vec![],
        "a Service without endpoints still has a frontend, so new flows are rejected"
    );
}

#[test]
fn headless_external_name_and_sctp_have_no_frontends() {
    let svcs = [
        service(json!({"metadata": {"name": "h", "namespace": "default"},
            "spec": {"clusterIP": "None", "ports": [{"port": 80}]}})),
        service(json!({"metadata": {"name": "x", "namespace": "default"},
            "spec": {"type": "ExternalName", "externalName": "example.com"}})),
        service(json!({"metadata": {"name": "s", "namespace": "default"},
            "spec": {"clusterIP": "10.0.0.40", "ports": [{"port": 80, "protocol": "SCTP"}]}})),
    ];
    let c = compile(&cluster(&svcs, &[]));
    assert!(c.frontends.is_empty(), "{:?}", c.frontends);
    assert_eq!(c.warnings.len(), 1);
    assert!(c.warnings[0].contains("SCTP"), "{:?}", c.warnings);
}

#[test]
fn load_balancer_and_external_ips_get_both_scopes_and_source_ranges() {
    let mut svc = web_service(json!({
        "type": "LoadBalancer",
        "externalIPs": ["198.51.100.7"],
        "loadBalancerSourceRanges": ["203.0.113.0/24"],
        "sessionAffinity": "ClientIP",
        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
        "ports": [{"name": "http", "port": 80, "nodePort": 30080}]
    }));
    svc.status = Some(
        serde_json::from_value(json!({"loadBalancer": {"ingress": [{"ip": "10.225.0.1"}]}}))
            .unwrap(),
    );
    svc.metadata.annotations =
        Some([(ALGORITHM_ANNOTATION.to_string(), "maglev".to_string())].into());
    let svcs = [svc];
    let slices = [web_slice(vec![ep(
        "10.244.1.6",
        "node-1",
        true,
        true,
        false,
    )])];
    let c = compile(&cluster(&svcs, &slices));
    let lb_ext = &c.frontends[&key("10.225.0.1", 80, Protocol::Tcp, Scope::External)];
    assert_eq!(lb_ext.source_ranges, vec![(ip("203.0.113.0"), 24)]);
    assert!(lb_ext.masquerade);
    assert_eq!(lb_ext.affinity_timeout, Some(60));
    assert_eq!(lb_ext.algorithm, Algorithm::Maglev);
    let ext_ip = &c.frontends[&key("198.51.100.7", 80, Protocol::Tcp, Scope::External)];
    assert_eq!(ext_ip.backends, vec![be("10.244.1.6", 8080)]);
    assert!(
        c.frontends
            .contains_key(&key("198.51.100.7", 80, Protocol::Tcp, Scope::Internal))
    );
    // Cluster IP + (LB IP, external IP) x 2 scopes + node port on 2 node IPs + 1 external.
    assert_eq!(c.frontends.len(), 1 + 4 + 2 + 1, "{:?}", c.frontends.keys());
}

#[test]
fn bad_algorithm_annotation_warns_and_uses_the_default() {
    let mut svc = web_service(json!({}));
    svc.metadata.annotations =
        Some([(ALGORITHM_ANNOTATION.to_string(), "fancy".to_string())].into());
    let svcs = [svc];
    let c = compile(&cluster(&svcs, &[]));
    assert_eq!(c.warnings.len(), 1);
    assert!(c.warnings[0].contains("fancy"));
    assert!(
        c.frontends
            .values()
            .all(|f| f.algorithm == Algorithm::Random)
    );
}

#[test]
fn missing_conditions_follow_the_api_defaults() {
    let e: Endpoint = serde_json::from_value(json!({"addresses": ["10.244.0.5"]})).unwrap();
    let info = &endpoint_info(&e, 80)[0];
    assert!(info.ready && info.serving && !info.terminating);
    let e: Endpoint = serde_json::from_value(
        json!({"addresses": ["10.244.0.5"], "conditions": {"ready": false, "terminating": true}}),
    )
    .unwrap();
    let info = &endpoint_info(&e, 80)[0];
    assert!(!info.ready && !info.serving && info.terminating);
}

#[test]
fn ids_are_stable_and_reuse_freed_numbers() {
    let a = key("10.0.0.1", 80, Protocol::Tcp, Scope::Internal);
    let b = key("10.0.0.2", 80, Protocol::Tcp, Scope::Internal);
    let c = key("10.0.0.3", 80, Protocol::Udp, Scope::Internal);
    let mut alloc = IdAllocator::seeded([(b, 7)]);
    let ids = alloc.assign([&a, &b]);
    assert_eq!((ids[&a], ids[&b]), (1, 7));
    let ids = alloc.assign([&b, &c]);
    assert_eq!((ids[&b], ids[&c]), (7, 1), "a's id was freed and reused");
    assert_eq!(alloc.get(&a), None);
    // Duplicate ids from a corrupted map: one key keeps it, the other is renumbered.
    let mut alloc = IdAllocator::seeded([(a, 3), (b, 3)]);
    let ids = alloc.assign([&a, &b]);
    assert_ne!(ids[&a], ids[&b]);
}
